"""What sampling resource figures costs: vmbridged's CPU with 50 guest-less VMs, sampling on vs off.

For each mode a fresh vmbridged (not --verbose: traffic logging would dominate)
gets N ``-machine none`` VMs; once they are up and a few sampling rounds have
passed, the daemon's CPU time (user + system, from /proc) and the QEMUs'
together are measured over a window of ``--seconds`` (default 10). The modes
alternate over ``--rounds`` so background load hits them alike. Also shown: how
long one sampling round takes (the daemon's own ``statsRoundUSec``) and how
long a ``Stats`` call for the daemon's own figures takes (it counts greenlets
by walking the garbage collector's objects, at most once a second). All
times are wall clock: on a loaded machine they include waiting for a CPU.

The QEMUs' share matters too: every QMP query costs the QEMU that answers it
(QEMU 7.2 reads QMP input a byte per main-loop turn; see qmp_roundtrip.py).

    python bench/stats_cost.py [--vms 50] [--seconds 10] [--interval 2] [--rounds 2]

``run(vms, seconds, interval, rounds)`` returns the figures as a dict for ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBRIDGED = os.path.join(ROOT, "bin", "vmbridged")
MANAGER = "io.vmbridge.Manager"


def call(path, method, parameters=None, timeout=60.0):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"method": f"{MANAGER}.{method}", "parameters": parameters or {}}).encode() + b"\0")
        buf = b""
        while b"\0" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("vmbridged closed the connection")
            buf += chunk
    reply = json.loads(buf[:buf.index(b"\0")])
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply}")
    return reply["parameters"]


def cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Daemon:
    def __init__(self, interval: float):
        self.base = tempfile.mkdtemp(prefix="vmb-bench-", dir="/tmp")
        self.socket = os.path.join(self.base, "run", MANAGER)
        self.mark = uuid.uuid4().hex
        env = dict(os.environ, VMBRIDGE_BENCH_MARK=self.mark)
        env.pop("NOTIFY_SOCKET", None)
        self.log = open(os.path.join(self.base, "vmbridged.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, VMBRIDGED, "--runtime-dir", os.path.join(self.base, "run"),
             "--config-dir", os.path.join(self.base, "etc"), "--stats-interval", str(interval)],
            stdout=self.log, stderr=self.log, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                call(self.socket, "List")
                break
            except (OSError, EOFError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("vmbridged did not come up")
                time.sleep(0.05)

    def qemus(self):
        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            out.append(p)
        return out

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Whatever still carries our mark (a QEMU of a daemon that died) goes too.
        for p in psutil.process_iter():
            try:
                if p.environ().get("VMBRIDGE_BENCH_MARK") == self.mark:
                    p.kill()
            except (psutil.Error, OSError):
                pass
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


def measure(vms: int, seconds: float, interval: float) -> dict:
    """One daemon, `vms` VMs, one window; interval 0: sampling off."""
    daemon = Daemon(interval)
    try:
        for i in range(vms):
            call(daemon.socket, "Create", {"config": {"name": f"vm{i}", "machine": "none", "memory": "64M"}})
        qemus = [psutil.Process(m["pid"]) for m in call(daemon.socket, "List")["machines"]]
        assert len(qemus) == vms
        time.sleep(max(3.0, 2 * interval))  # start-up settles; a few sampling rounds pass
        me = psutil.Process(daemon.proc.pid)
        d0, q0, t0 = cpu_seconds([me]), cpu_seconds(qemus), time.monotonic()
        time.sleep(seconds)
        d1, q1, t1 = cpu_seconds([me]), cpu_seconds(qemus), time.monotonic()
        stats_calls = []
        for _ in range(3):
            time.sleep(1.1)  # past the daemon's one-second cache of its greenlet count
            started = time.perf_counter()
            own = call(daemon.socket, "Stats")["daemon"]
            stats_calls.append(time.perf_counter() - started)
        listed = call(daemon.socket, "List")["machines"]
        return {"daemon_cpu_percent": (d1 - d0) * 100 / (t1 - t0),
                "qemus_cpu_percent": (q1 - q0) * 100 / (t1 - t0),
                "round_ms": own.get("statsRoundUSec", 0) / 1000,
                "stats_call_ms": statistics.median(stats_calls) * 1000,
                "greenlets": own["greenlets"], "daemon_rss_mib": own["rssBytes"] / 2**20,
                "with_figures": sum(1 for m in listed if "figures" in m)}
    finally:
        daemon.close()


def run(vms: int = 50, seconds: float = 10.0, interval: float = 2.0, rounds: int = 2) -> dict:
    results = {"on": [], "off": []}
    for _ in range(rounds):
        for mode in ("on", "off"):
            results[mode].append(measure(vms, seconds, interval if mode == "on" else 0))
    out = {"vms": vms, "seconds": seconds, "interval": interval, "rounds": rounds}
    for mode, runs in results.items():
        for key in runs[0]:
            out[f"{mode}_{key}"] = statistics.median(r[key] for r in runs)
    out["cost_daemon_cpu_percent"] = out["on_daemon_cpu_percent"] - out["off_daemon_cpu_percent"]
    out["cost_qemus_cpu_percent"] = out["on_qemus_cpu_percent"] - out["off_qemus_cpu_percent"]
    out["runs"] = results
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    r = run(args.vms, args.seconds, args.interval, args.rounds)
    print(f"{r['vms']} guest-less VMs, {r['seconds']:g} s windows, sampling every {r['interval']:g} s, "
          f"median of {r['rounds']} runs per mode (% of one CPU):")
    print(f"  vmbridged CPU   sampling on {r['on_daemon_cpu_percent']:6.2f}%   off {r['off_daemon_cpu_percent']:6.2f}%"
          f"   cost {r['cost_daemon_cpu_percent']:+.2f}%")
    print(f"  50 QEMUs' CPU   sampling on {r['on_qemus_cpu_percent']:6.2f}%   off {r['off_qemus_cpu_percent']:6.2f}%"
          f"   cost {r['cost_qemus_cpu_percent']:+.2f}%")
    print(f"  one sampling round {r['on_round_ms']:.1f} ms (wall, QMP round trips included); "
          f"Stats() for the daemon {r['on_stats_call_ms']:.1f} ms with {r['on_greenlets']:.0f} greenlets; "
          f"daemon RSS {r['on_daemon_rss_mib']:.0f} MiB; VMs with figures: {r['on_with_figures']:.0f}/{r['vms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
