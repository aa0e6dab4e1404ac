"""Soak: many VM lifecycles through one vmbridged; its resources must stay flat.

Starts its own vmbridged (own temporary runtime and config directories) and
runs N cycles of

    Create (manager) -> SubscribeEvents, Pause, Resume (control socket)
    -> Terminate (control socket and manager, alternately)

on guest-less VMs (``-machine none``), each under a new name. Every
``--every`` cycles it prints the daemon's open fds, greenlets (from the
statistics line vmbridged logs on SIGUSR1), threads and RSS. At the end it
compares the last sample with the first and prints a verdict: fds, greenlets
and threads must be exactly where they were, RSS within a small margin.
Exit status 0 if flat, 1 if not, 2 if a cycle failed.

    python bench/soak.py [--cycles 1000] [--every 100] [--qemu qemu-system-x86_64]

Everything it started is stopped on exit, Ctrl-C included (the daemon with
SIGTERM, which stops its VMs; anything left carrying this run's marker is
killed). Figures also go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBRIDGED = os.path.join(ROOT, "bin", "vmbridged")
RESULTS = os.path.join(ROOT, "bench", "results", "soak.json")
MARK_VAR = "VMBRIDGE_SOAK_MARK"
RSS_MARGIN_MIB = 4.0      # allocator noise; a leak of even 4 KiB per cycle exceeds it in 1000 cycles
RSS_MARGIN_RATIO = 0.05


class CycleFailed(Exception):
    pass


class Connection:
    """A blocking varlink connection (stdlib only)."""

    def __init__(self, path: str, timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = bytearray()

    def send(self, method: str, parameters: dict | None = None, **flags) -> None:
        message = {"method": method, "parameters": parameters or {}, **flags}
        self.sock.sendall(json.dumps(message).encode() + b"\0")

    def receive(self) -> dict:
        while b"\0" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        raw, _, rest = bytes(self.buf).partition(b"\0")
        self.buf[:] = rest
        return json.loads(raw)

    def call(self, method: str, parameters: dict | None = None) -> dict:
        self.send(method, parameters)
        reply = self.receive()
        if "error" in reply:
            raise CycleFailed(f"{method}: {reply}")
        return reply.get("parameters", {})

    def close(self) -> None:
        self.sock.close()


class Soak:
    def __init__(self, args):
        self.args = args
        self.base = tempfile.mkdtemp(prefix="vmb-soak-", dir="/tmp")
        self.runtime_dir = os.path.join(self.base, "run")
        self.log_path = os.path.join(self.base, "vmbridged.log")
        self.mark = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.samples: list[dict] = []

    # ---------------------------------------------------------------- daemon

    def start_daemon(self) -> None:
        env = dict(os.environ, **{MARK_VAR: self.mark})
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, VMBRIDGED, "--runtime-dir", self.runtime_dir,
             "--config-dir", os.path.join(self.base, "etc"), "--qmp-timeout", "30"],
            stdout=self._log, stderr=self._log, env=env, start_new_session=True)
        self.manager_path = os.path.join(self.runtime_dir, "io.vmbridge.Manager")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"vmbridged exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                conn = Connection(self.manager_path, timeout=2)
                conn.call("org.varlink.service.GetInfo")
                conn.close()
                self.daemon = psutil.Process(self.proc.pid)
                return
            except (OSError, EOFError):
                time.sleep(0.05)
        raise SystemExit("vmbridged did not come up within 30 s")

    def stats(self) -> dict:
        """The daemon's own statistics line (SIGUSR1), parsed."""
        with open(self.log_path, "rb") as f:
            before = f.read().count(b"stats: ")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                lines = [line for line in f.read().decode("utf-8", "replace").splitlines() if "stats: " in line]
            if len(lines) > before:
                return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("stats: ")[1])}
            time.sleep(0.02)
        raise CycleFailed("vmbridged logged no statistics after SIGUSR1")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leftovers = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get(MARK_VAR) == self.mark:
                    leftovers.append(proc)
            except (psutil.Error, OSError):
                continue
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        if leftovers:
            print(f"soak: killed {len(leftovers)} leftover process(es): {[p.pid for p in leftovers]}")
        if getattr(self, "_log", None):
            self._log.close()
        if self.args.keep:
            print(f"soak: kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    # ---------------------------------------------------------------- cycles

    def cycle(self, manager: Connection, i: int) -> None:
        name = f"soak{i}"
        config = {"name": name, "machine": "none"}
        if self.args.qemu:
            config["qemu"] = self.args.qemu
        machine = manager.call("io.vmbridge.Manager.Create", {"config": config})["machine"]
        if machine["state"] != "running":
            raise CycleFailed(f"{name}: created in state {machine['state']}")
        ctl_path = machine["controlAddress"]
        events = Connection(ctl_path)
        ctl = Connection(ctl_path)
        try:
            events.send("io.systemd.MachineInstance.SubscribeEvents", more=True)
            ready = events.receive()  # subscribed before the first Pause
            if ready.get("parameters") != {"event": "READY"}:
                raise CycleFailed(f"{name}: SubscribeEvents answered {ready}")
            expect = []
            ctl.call("io.systemd.MachineInstance.Pause")
            ctl.call("io.systemd.MachineInstance.Resume")
            expect += ["STOP", "RESUME"]
            if i % 2:
                ctl.call("io.systemd.MachineInstance.Terminate")
            else:
                manager.call("io.vmbridge.Manager.Terminate", {"name": name})
            expect += ["SHUTDOWN", "EXITED"]
            got = []
            while True:
                try:
                    got.append(events.receive()["parameters"]["event"])
                except EOFError:
                    break
            if got != expect:
                raise CycleFailed(f"{name}: events {got}, expected {expect}")
        finally:
            events.close()
            ctl.close()

    def sample(self, cycle: int, started: float) -> dict:
        stats = self.stats()
        sample = {"cycle": cycle, "seconds": round(time.monotonic() - started, 1),
                  "fds": self.daemon.num_fds(), "greenlets": stats["greenlets"],
                  "threads": self.daemon.num_threads(),
                  "rss_mib": round(self.daemon.memory_info().rss / 2**20, 2),
                  "vms": stats["vms"], "connections": stats["connections"]}
        self.samples.append(sample)
        print(f"{sample['cycle']:>7} {sample['seconds']:>8} {sample['fds']:>5} {sample['greenlets']:>9} "
              f"{sample['threads']:>7} {sample['rss_mib']:>8} {sample['vms']:>4} {sample['connections']:>5}",
              flush=True)
        return sample

    def run(self) -> int:
        self.start_daemon()
        print(f"soak: vmbridged pid {self.proc.pid}, {self.args.cycles} cycles, log {self.log_path}")
        print(f"{'cycle':>7} {'seconds':>8} {'fds':>5} {'greenlets':>9} {'threads':>7} {'rss_MiB':>8} "
              f"{'vms':>4} {'conns':>5}")
        manager = Connection(self.manager_path)
        started = time.monotonic()
        try:
            self.sample(0, started)
            for i in range(1, self.args.cycles + 1):
                self.cycle(manager, i)
                if i % self.args.every == 0 or i == self.args.cycles:
                    self.sample(i, started)
        except (CycleFailed, OSError, EOFError) as e:
            print(f"soak: cycle failed: {e}")
            return 2
        finally:
            manager.close()
        return self.verdict(time.monotonic() - started)

    def verdict(self, seconds: float) -> int:
        # The first sample after `every` cycles is the reference: by then
        # every code path has run once (imports, caches, the QEMU probe).
        reference = self.samples[1] if len(self.samples) > 2 else self.samples[0]
        last = self.samples[-1]
        rss_margin = max(RSS_MARGIN_MIB, reference["rss_mib"] * RSS_MARGIN_RATIO)
        checks = {
            "fds": last["fds"] == reference["fds"],
            "greenlets": last["greenlets"] == reference["greenlets"],
            "threads": last["threads"] == reference["threads"],
            "rss": last["rss_mib"] - reference["rss_mib"] <= rss_margin,
            "vms": last["vms"] == 0,
        }
        flat = all(checks.values())
        cycles = last["cycle"]
        print(f"soak: {cycles} cycles in {seconds:.1f}s ({cycles / seconds:.1f} cycles/s); from cycle "
              f"{reference['cycle']} to {cycles}: fds {reference['fds']}->{last['fds']}, greenlets "
              f"{reference['greenlets']}->{last['greenlets']}, threads {reference['threads']}->{last['threads']}, "
              f"RSS {reference['rss_mib']}->{last['rss_mib']} MiB (margin {rss_margin:.1f})")
        print("soak: verdict: " + ("FLAT" if flat else "NOT FLAT: " + ", ".join(k for k, ok in checks.items()
                                                                             if not ok)))
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            json.dump({"cycles": cycles, "seconds": round(seconds, 1), "flat": flat, "checks": checks,
                       "samples": self.samples, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
        return 0 if flat else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000, help="lifecycles to run (default 1000)")
    parser.add_argument("--every", type=int, default=100, help="sample every N cycles (default 100)")
    parser.add_argument("--qemu", help="QEMU binary for the VMs (default: vmbridged's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (log, sockets)")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.every < 1:
        parser.error("--cycles and --every must be positive")
    # SIGTERM ends the run like Ctrl-C: through the cleanup below.
    signal.signal(signal.SIGTERM, _interrupt)
    soak = Soak(args)
    try:
        return soak.run()
    except KeyboardInterrupt:
        print("\nsoak: interrupted")
        return 130
    finally:
        soak.cleanup()


if __name__ == "__main__":
    sys.exit(main())
