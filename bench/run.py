#!/usr/bin/env python3
"""vmbridge benchmarks (issue 9): every figure beside its baseline, same run, same QEMU.

    python bench/run.py [--full] [--qemu PATH] [--only NAME,...] [--vmctl PATH]
                        [--profile DIR] [--py-spy PATH]

Figures (name: what is measured / its baseline / target):

qmp        QMPClient.execute("query-status") / raw stdlib QMP loop / <= 1.3x
describe   Describe over a persistent varlink connection / raw QMP query-status
           round trip on a separate bare QEMU / p50 below the floor
newconn    Describe with a new connection per call / the same floor / <= 1.5x
pause      Pause+Resume pair / raw QMP stop + cont round trips / <= 1.3x
fanout     1000 SubscribeEvents clients, Pause -> STOP at each / 1 client /
           p99 <= 20 ms
start      Manager.Create round trip of a -machine none VM (reply = running) /
           bare QEMU spawn to QMP greeting / <= +50 ms
cli        `vmctl describe NAME`, the whole process / `python3 -c pass` / <= 4x
scale      100 VMs (--full: 500) in one daemon: RSS per added VM, idle CPU,
           Manager.List and `vmctl list` / the same daemon with 0 VMs /
           <= 0.5 MB per VM, idle CPU ~ 0; and `vmctl pause` of 100 VMs /
           `vmctl pause` of 1 VM / <= 2x
idle       the scale figure's idle CPU again in a daemon started with
           --stats-interval 0 (the resource sampler off)

Latency figures alternate with their floor in rounds, so background load hits
both alike. The latency client is bench/varlink_stdlib.py (stdlib only); the
fan-out receivers are non-blocking sockets in one epoll loop that stamps each
read with the time epoll returned. vmctl figures run bin/vmctl (or --vmctl)
and say "skipped" when it cannot even be imported.

Writes bench/results/<UTC timestamp>.json (and latest.json) and prints a table;
docs/performance.md explains how to read it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, ROOT)

import harness  # noqa: E402
from harness import (Daemon, QemuInfo, RawQMP, bare_qemu_start, bench_env, kill_marked,  # noqa: E402
                     load_average, median, summary_us)
import qmp_roundtrip  # noqa: E402
from varlink_stdlib import Connection, request  # noqa: E402

MI = "io.systemd.MachineInstance"
MB = 1024 * 1024

QUICK = dict(qmp_iterations=2000, describe_iterations=2000, newconn_iterations=1000,
             pair_iterations=600, fanout_clients=1000, fanout_rounds=5, fanout_single_rounds=40,
             start_repeats=8, cli_repeats=10, scale_vms=100, bulk_vms=100, idle_seconds=10.0,
             list_repeats=20, bulk_repeats=3, create_parallel=4)
FULL = dict(QUICK, qmp_iterations=10000, describe_iterations=10000, newconn_iterations=4000,
            pair_iterations=3000, fanout_rounds=20, fanout_single_rounds=200, start_repeats=20,
            cli_repeats=30, scale_vms=500, list_repeats=50, bulk_repeats=5)
ROUNDS = 4  # latency figures alternate with their floor this many times


# ------------------------------------------------------------------ results

class Row:
    """One line of the table."""

    def __init__(self, figure: str, value: str, baseline: str, *, ratio: float | None = None,
                 ratio_text: str | None = None, target: str = "", met: bool | None = None,
                 verdict: str | None = None, data: dict | None = None, note: str = ""):
        self.figure = figure
        self.value = value
        self.baseline = baseline
        self.ratio = ratio
        self.ratio_text = ratio_text if ratio_text is not None else (
            f"{ratio:.2f}x" if ratio is not None else "")
        self.target = target
        self.verdict = verdict or ("info" if met is None else ("met" if met else "MISSED"))
        self.data = data or {}
        self.note = note

    def to_dict(self, qemu: QemuInfo) -> dict:
        return {"figure": self.figure, "value": self.value, "baseline": self.baseline,
                "ratio": self.ratio, "ratio_text": self.ratio_text, "target": self.target,
                "verdict": self.verdict, "note": self.note, "qemu": qemu.to_dict(), "data": self.data}


def us(x: float) -> str:
    return f"{x:.0f} us" if x < 10000 else f"{x / 1000:.1f} ms"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = FULL if args.full else QUICK
        self.qemu = QemuInfo(args.qemu)
        self.rows: list[Row] = []
        self.figures: dict[str, dict] = {}
        self.vmctl = args.vmctl or os.path.join(ROOT, "bin", "vmctl")
        self.vmctl_problem: str | None = None
        self.profile_dir = args.profile
        self.py_spy = args.py_spy

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def daemon(self, name: str, *extra_args: str) -> Daemon:
        return Daemon(name, profile_dir=self.profile_dir if self.args.cprofile else None,
                      extra_args=extra_args).start()

    # ------------------------------------------------------------ profiling

    def sampling(self, daemon: Daemon, label: str):
        """py-spy recording the daemon for the duration of a `with` block."""
        bench = self

        class _Sampler:
            def __enter__(self):
                self.proc = None
                if bench.py_spy:
                    out = os.path.join(bench.profile_dir or tempfile.gettempdir(), f"py-spy-{label}.txt")
                    self.out = out
                    self.proc = subprocess.Popen(
                        [bench.py_spy, "record", "--pid", str(daemon.proc.pid), "--rate", "2000",
                         "--format", "raw", "--output", out, "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=bench_env())
                    time.sleep(0.5)  # attached before the figure starts
                return self

            def __exit__(self, *exc):
                if self.proc is not None:
                    self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
                    try:
                        self.proc.wait(30)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
                    print(f"    py-spy samples of the daemon: {self.out}", flush=True)
        return _Sampler()

    # ---------------------------------------------------------------- vmctl

    def vmctl_available(self) -> bool:
        if self.vmctl_problem is None:
            try:
                proc = subprocess.run([sys.executable, self.vmctl, "--help"], capture_output=True,
                                      text=True, timeout=60, env=bench_env(), stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as e:
                self.vmctl_problem = f"{self.vmctl}: {e}"
            else:
                if proc.returncode == 0:
                    self.vmctl_problem = ""
                else:
                    lines = (proc.stderr or proc.stdout).strip().splitlines()
                    self.vmctl_problem = lines[-1] if lines else f"exit status {proc.returncode}"
        return not self.vmctl_problem

    def skip_vmctl(self, figure: str, baseline: str, target: str) -> None:
        self.add(Row(figure, "skipped", baseline, target=target, verdict="skipped",
                     note=f"vmctl not available ({self.vmctl_problem})"))

    def run_vmctl(self, runtime_dir: str, *args: str, check: bool = True) -> float:
        """Wall time of one vmctl process, in seconds."""
        argv = [sys.executable, self.vmctl, "--runtime-dir", runtime_dir, *args]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=bench_env(),
                              stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        if check and proc.returncode != 0:
            raise RuntimeError(f"vmctl {' '.join(args[:3])}... exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return elapsed

    # ============================================================== figures

    def fig_qmp(self) -> None:
        r = qmp_roundtrip.run(self.qemu.path, self.cfg["qmp_iterations"])
        self.figures["qmp"] = r
        for q in ("p50", "p99"):
            value, floor = r["client"][f"{q}_us"], r["raw"][f"{q}_us"]
            self.add(Row(f"QMPClient query-status {q}", us(value), f"raw QMP {us(floor)}",
                         ratio=value / floor, target="<= 1.3x", met=value / floor <= 1.3,
                         data={"client": r["client"], "raw": r["raw"], "gevent": r["gevent"]}))

    def _interleaved(self, ways: dict, iterations: int, warmup: int = 200) -> dict:
        """Time each way `iterations` times, alternating in ROUNDS; a summary in µs per way."""
        samples = qmp_roundtrip.interleaved(ways, iterations, warmup=warmup, rounds=ROUNDS)
        return {name: summary_us(values) for name, values in samples.items()}

    def latency_figures(self, only) -> None:
        """describe, newconn, pause, fanout, start, cli: one daemon, one VM."""
        daemon = self.daemon("latency")
        floor = None
        try:
            if "start" in only:
                self.guard("start", self.fig_start, daemon)
            daemon.create("bench", self.qemu)
            path = daemon.control_socket("bench")
            floor = RawQMP(self.qemu)
            for name, fn in (("describe", self.fig_describe), ("newconn", self.fig_newconn),
                             ("pause", self.fig_pause)):
                if name in only:
                    with self.sampling(daemon, name):
                        self.guard(name, fn, path, floor)
            if "fanout" in only:
                with self.sampling(daemon, "fanout"):
                    self.guard("fanout", self.fig_fanout, daemon, path)
            if "cli" in only:
                self.guard("cli", self.fig_cli, daemon)
        finally:
            if floor is not None:
                floor.close()
            daemon.cleanup()

    def fig_describe(self, path: str, floor: RawQMP) -> None:
        describe = request(f"{MI}.Describe")
        with Connection(path) as conn:
            reply = json.loads(conn.roundtrip_raw(describe))
            assert reply == {"parameters": {"running": True, "status": "running"}}, reply
            assert b'"running"' in floor.roundtrip(floor.command("query-status"))
            r = self._interleaved({
                "describe": lambda: conn.roundtrip_raw(describe),
                "floor": lambda: floor.roundtrip(floor.command("query-status")),
            }, self.cfg["describe_iterations"])
        self.figures["describe"] = r
        d, f = r["describe"], r["floor"]
        self.add(Row("Describe p50, persistent connection", us(d["p50_us"]),
                     f"QMP query-status {us(f['p50_us'])}", ratio=d["p50_us"] / f["p50_us"],
                     target="< 1x (below floor)", met=d["p50_us"] < f["p50_us"], data=r))
        self.add(Row("Describe p99, persistent connection", us(d["p99_us"]),
                     f"QMP query-status {us(f['p99_us'])}", ratio=d["p99_us"] / f["p99_us"], data=r))

    def fig_newconn(self, path: str, floor: RawQMP) -> None:
        describe = request(f"{MI}.Describe")

        def once():
            with Connection(path) as conn:
                conn.roundtrip_raw(describe)
        r = self._interleaved({"newconn": once,
                               "floor": lambda: floor.roundtrip(floor.command("query-status"))},
                              self.cfg["newconn_iterations"], warmup=100)
        self.figures["newconn"] = r
        d, f = r["newconn"], r["floor"]
        self.add(Row("Describe p50, new connection per call", us(d["p50_us"]),
                     f"QMP query-status {us(f['p50_us'])}", ratio=d["p50_us"] / f["p50_us"],
                     target="<= 1.5x", met=d["p50_us"] / f["p50_us"] <= 1.5, data=r))

    def fig_pause(self, path: str, floor: RawQMP) -> None:
        pause, resume = request(f"{MI}.Pause"), request(f"{MI}.Resume")
        relay_dir = tempfile.mkdtemp(prefix="vmb-relay-", dir="/tmp")
        relay_path = os.path.join(relay_dir, "relay")
        relay_proc = subprocess.Popen([sys.executable, os.path.join(BENCH_DIR, "relay_floor.py"), relay_path,
                                       self.qemu.path], stdout=subprocess.PIPE, text=True, env=bench_env(),
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            if relay_proc.stdout.readline().strip() != "ready":
                raise RuntimeError("bench/relay_floor.py did not start")
            with Connection(path) as conn, Connection(relay_path) as relay:
                assert json.loads(conn.roundtrip_raw(pause)) == {}
                assert json.loads(conn.roundtrip_raw(resume)) == {}

                def pair():
                    conn.roundtrip_raw(pause)
                    conn.roundtrip_raw(resume)

                def relay_pair():
                    relay.roundtrip_raw(pause)
                    relay.roundtrip_raw(resume)

                def raw_pair():
                    floor.roundtrip(floor.command("stop"))
                    floor.roundtrip(floor.command("cont"))
                r = self._interleaved({"pair": pair, "floor": raw_pair, "relay": relay_pair},
                                      self.cfg["pair_iterations"], warmup=100)
                assert conn.call(f"{MI}.Describe")["running"] is True
        finally:
            # The relay exits (and ends its QEMU) once its client hung up.
            try:
                relay_proc.wait(10)
            except subprocess.TimeoutExpired:
                relay_proc.kill()
                relay_proc.wait()
            relay_proc.stdout.close()
            shutil.rmtree(relay_dir, ignore_errors=True)
        self.figures["pause"] = r
        p, f, rl = r["pair"], r["floor"], r["relay"]
        for q in ("p50", "p99"):
            self.add(Row(f"Pause+Resume pair {q}", us(p[f"{q}_us"]), f"QMP stop+cont {us(f[f'{q}_us'])}",
                         ratio=p[f"{q}_us"] / f[f"{q}_us"], target="<= 1.3x",
                         met=p[f"{q}_us"] / f[f"{q}_us"] <= 1.3, data=r,
                         note="" if q == "p99" else
                         f"through a blocking stdlib relay process (bench/relay_floor.py) the same pair takes "
                         f"{us(rl['p50_us'])} p50 ({rl['p50_us'] / f['p50_us']:.2f}x the floor): the cost of any "
                         f"process in between; vmbridged/relay = {p['p50_us'] / rl['p50_us']:.2f}x"))
        self.add(Row("Pause+Resume pair p50, minimal relay (reference)", us(rl["p50_us"]),
                     f"QMP stop+cont {us(f['p50_us'])}", ratio=rl["p50_us"] / f["p50_us"], data=r))

    # ------------------------------------------------------------ fan-out

    def _fanout(self, daemon: Daemon, path: str, clients: int, rounds: int) -> dict:
        """`rounds` Pause/Resume cycles with `clients` subscribers; STOP latencies."""
        subscribe = request(f"{MI}.SubscribeEvents", more=True)
        pause, resume = request(f"{MI}.Pause"), request(f"{MI}.Resume")
        subs: list[socket.socket] = []
        ctrl = Connection(path)
        ep = select.epoll(clients + 8)
        try:
            for _ in range(clients):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                subs.append(s)
                s.settimeout(30)
                s.connect(path)
                s.sendall(subscribe)
            for s in subs:
                data = b""
                while b"\0" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise RuntimeError(f"subscriber closed before READY: {data[:200]!r}")
                    data += chunk
                if b'"READY"' not in data:
                    raise RuntimeError(f"subscription refused: {data[:200]!r}")
            index = {}
            for i, s in enumerate(subs):
                s.setblocking(False)
                ep.register(s.fileno(), select.EPOLLIN)
                index[s.fileno()] = i
            cfd = ctrl.sock.fileno()
            ctrl.sock.setblocking(False)
            ep.register(cfd, select.EPOLLIN)
            buffers = [b""] * clients
            latencies: list[float] = []
            per_round: list[dict] = []
            warmup_max: list[float] = []
            clock = time.perf_counter
            cpu0, dcpu0, wall = time.process_time(), daemon.cpu_seconds(), 0.0

            def phase(call: bytes, marker: bytes, measure: bool) -> None:
                nonlocal wall
                got = [None] * clients
                pending = clients
                reply = b""
                t0 = clock()
                ctrl.sock.send(call)  # a few dozen bytes: one send
                deadline = t0 + 60
                while pending or b"\0" not in reply:
                    events = ep.poll(1.0)
                    t = clock()
                    if t > deadline:
                        raise RuntimeError(f"fan-out: {pending} of {clients} subscribers still "
                                           f"without {marker.decode()} after 60 s")
                    for fd, _mask in events:
                        if fd == cfd:
                            reply += ctrl.sock.recv(65536)
                            continue
                        i = index[fd]
                        chunk = subs[i].recv(65536)
                        if not chunk:
                            raise RuntimeError("a subscriber's connection was closed by vmbridged")
                        buf = buffers[i] + chunk
                        if got[i] is None and marker in buf:
                            got[i] = t
                            pending -= 1
                        buffers[i] = buf[buf.rfind(b"\0") + 1:]
                if b'"error"' in reply:
                    raise RuntimeError(f"fan-out: {call[:60]!r} failed: {reply[:300]!r}")
                wall += clock() - t0
                if not measure:
                    warmup_max.append(max(got) - t0)
                if measure:
                    latencies.extend(x - t0 for x in got)
                    ordered = sorted(x - t0 for x in got)
                    per_round.append({"first_us": ordered[0] * 1e6, "p50_us": ordered[len(ordered) // 2] * 1e6,
                                      "last_us": ordered[-1] * 1e6})

            for round_ in range(rounds + 1):
                run0, wait0 = daemon.schedstat()
                phase(pause, b'"STOP"', round_ > 0)  # round 0 warms up; its max is kept apart
                if round_ > 0:  # tells a busy daemon from one that waited for a CPU
                    run1, wait1 = daemon.schedstat()
                    per_round[-1].update(daemon_oncpu_us=(run1 - run0) * 1e6,
                                         daemon_runqueue_wait_us=(wait1 - wait0) * 1e6)
                time.sleep(0.02)
                phase(resume, b'"RESUME"', False)
                time.sleep(0.05)
            client_cpu = time.process_time() - cpu0
            daemon_cpu = daemon.cpu_seconds() - dcpu0
        finally:
            ep.close()
            ctrl.close()
            for s in subs:
                s.close()
        out = summary_us(latencies)
        out.update(clients=clients, rounds=rounds, client_cpu_s=client_cpu, daemon_cpu_s=daemon_cpu,
                   busy_wall_s=wall, client_busy_fraction=client_cpu / wall if wall else None,
                   per_round=per_round, warmup_round_max_us=warmup_max[0] * 1e6 if warmup_max else None)
        return out

    def fig_fanout(self, daemon: Daemon, path: str) -> None:
        n = self.cfg["fanout_clients"]
        single = self._fanout(daemon, path, 1, self.cfg["fanout_single_rounds"])
        time.sleep(0.5)
        many = self._fanout(daemon, path, n, self.cfg["fanout_rounds"])
        time.sleep(1.0)  # let the daemon see 1000 hang-ups before the next figure
        self.figures["fanout"] = {"single": single, "many": many}
        deliveries = 2 * (many["rounds"] + 1) * many["clients"]  # STOP and RESUME, warm-up round too
        many["daemon_cpu_per_delivery_us"] = many["daemon_cpu_s"] / deliveries * 1e6
        note = (f"measuring client busy {many['client_busy_fraction'] * 100:.0f}% of the "
                f"{many['busy_wall_s']:.2f} s it waited; daemon CPU {many['daemon_cpu_s']:.2f} s, "
                f"{many['daemon_cpu_per_delivery_us']:.1f} us per event delivered; per round the daemon was on "
                f"a CPU {median([r['daemon_oncpu_us'] for r in many['per_round']]) / 1000:.1f} ms (median) and "
                f"waited for one up to {max(r['daemon_runqueue_wait_us'] for r in many['per_round']) / 1000:.1f} ms; "
                f"the unmeasured first (warm-up) round's max {us(many['warmup_round_max_us'])}")
        for q in ("p50", "p99", "max"):
            target, met = ("<= 20 ms", many["p99_us"] <= 20000) if q == "p99" else ("", None)
            self.add(Row(f"event fan-out {n} clients, Pause->STOP {q}", us(many[f"{q}_us"]),
                         f"1 client {us(single[f'{q}_us'])}",
                         ratio=many[f"{q}_us"] / single[f"{q}_us"], target=target, met=met,
                         data={"single": single, "many": many}, note=note if q == "p99" else ""))

    # ------------------------------------------------------------ start-up

    def fig_start(self, daemon: Daemon) -> None:
        conn = Connection(daemon.manager_socket, timeout=120)
        try:
            t = time.perf_counter()
            daemon.create("warm", self.qemu, conn)
            first = time.perf_counter() - t
            conn.call(f"{harness.MANAGER}.Terminate", {"name": "warm"})
            bare, creates = [], []
            for i in range(self.cfg["start_repeats"]):
                bare.append(bare_qemu_start(self.qemu))
                t = time.perf_counter()
                info = daemon.create(f"s{i}", self.qemu, conn)
                creates.append(time.perf_counter() - t)
                assert info["state"] == "running", info
                conn.call(f"{harness.MANAGER}.Terminate", {"name": f"s{i}"})
        finally:
            conn.close()
        c, b = median(creates), median(bare)
        self.figures["start"] = {"create_s": creates, "bare_s": bare, "first_create_s": first}
        self.add(Row("VM start -> running (Create), median", ms(c), f"bare QEMU -> greeting {ms(b)}",
                     ratio_text=f"+{(c - b) * 1000:.1f} ms", target="<= +50 ms", met=(c - b) <= 0.050,
                     data=self.figures["start"],
                     note=f"first Create of the run (probes the QEMU binary): {ms(first)}"))

    # ----------------------------------------------------------------- CLI

    def fig_cli(self, daemon: Daemon) -> None:
        figure, baseline, target = "vmctl describe NAME, whole process", "python3 -c pass", "<= 4x"
        if not self.vmctl_available():
            self.skip_vmctl(figure, baseline, target)
            return
        python, vmctl = [], []
        for _ in range(2):  # warm the page cache
            subprocess.run([sys.executable, "-c", "pass"], env=bench_env())
            self.run_vmctl(daemon.runtime_dir, "describe", "bench")
        for _ in range(self.cfg["cli_repeats"]):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=bench_env(), check=True)
            python.append(time.perf_counter() - t)
            vmctl.append(self.run_vmctl(daemon.runtime_dir, "describe", "bench"))
        v, p = median(vmctl), median(python)
        self.figures["cli"] = {"vmctl_s": vmctl, "python_s": python}
        self.add(Row(figure + ", median", ms(v), f"{baseline} {ms(p)}", ratio=v / p, target=target,
                     met=v / p <= 4, data=self.figures["cli"]))

    # --------------------------------------------------------------- scale

    def _idle_cpu(self, daemon: Daemon) -> float:
        seconds = self.cfg["idle_seconds"]
        c0, t0 = daemon.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        return (daemon.cpu_seconds() - c0) / (time.monotonic() - t0) * 100

    def _list_times(self, daemon: Daemon) -> dict:
        lst = request(f"{harness.MANAGER}.List")
        samples = []
        with Connection(daemon.manager_socket) as conn:
            for _ in range(3):
                conn.roundtrip_raw(lst)
            for _ in range(self.cfg["list_repeats"]):
                t = time.perf_counter()
                conn.roundtrip_raw(lst)
                samples.append(time.perf_counter() - t)
        out = summary_us(samples)
        if self.vmctl_available():
            self.run_vmctl(daemon.runtime_dir, "list")
            out["vmctl_list_s"] = median([self.run_vmctl(daemon.runtime_dir, "list")
                                          for _ in range(max(3, self.cfg["cli_repeats"] // 2))])
        return out

    def fig_scale(self, only) -> None:
        n = self.cfg["scale_vms"]
        daemon = self.daemon("scale")
        try:
            time.sleep(1.0)
            rss0, uss0 = daemon.rss(), daemon.uss()
            idle0 = self._idle_cpu(daemon)
            list0 = self._list_times(daemon)
            t = time.perf_counter()
            self._create_many(daemon, n)
            created_in = time.perf_counter() - t
            time.sleep(2.0)
            rss1, uss1 = daemon.rss(), daemon.uss()
            idle1 = self._idle_cpu(daemon)
            list1 = self._list_times(daemon)
            per_vm = (rss1 - rss0) / n
            data = {"vms": n, "rss0": rss0, "rss1": rss1, "uss0": uss0, "uss1": uss1,
                    "idle_cpu_pct_0": idle0, "idle_cpu_pct_n": idle1, "created_in_s": created_in,
                    "list0": list0, "list1": list1}
            self.figures["scale"] = data
            self.add(Row(f"scale: daemon RSS with {n} VMs", f"{rss1 / MB:.1f} MB", f"0 VMs {rss0 / MB:.1f} MB",
                         ratio=rss1 / rss0, data=data,
                         note=f"USS {uss0 / MB:.1f} -> {uss1 / MB:.1f} MB; {n} VMs created in "
                              f"{created_in:.1f} s ({self.cfg['create_parallel']} at a time)"))
            self.add(Row("scale: RSS per added VM", f"{per_vm / MB:.3f} MB", f"0 VMs {rss0 / MB:.1f} MB",
                         target="<= 0.5 MB", met=per_vm <= 0.5 * MB, data=data,
                         note=f"USS per VM {(uss1 - uss0) / n / MB:.3f} MB"))
            self.add(Row(f"scale: idle CPU over {self.cfg['idle_seconds']:g} s, {n} VMs", f"{idle1:.2f} %",
                         f"0 VMs {idle0:.2f} %", target="~0 (<= 0.1 %)", met=idle1 <= 0.1, data=data))
            self.add(Row(f"scale: Manager.List p50, {n} VMs (stdlib)", us(list1["p50_us"]),
                         f"0 VMs {us(list0['p50_us'])}", ratio=list1["p50_us"] / list0["p50_us"], data=data))
            if "vmctl_list_s" in list1:
                self.add(Row(f"scale: vmctl list, {n} VMs, median", ms(list1["vmctl_list_s"]),
                             f"0 VMs {ms(list0['vmctl_list_s'])}",
                             ratio=list1["vmctl_list_s"] / list0["vmctl_list_s"], data=data))
            else:
                self.skip_vmctl(f"scale: vmctl list, {n} VMs", "0 VMs", "")
            if "bulk" in only:
                self.guard("bulk", self.fig_bulk, daemon)
        finally:
            daemon.cleanup()
        if "idle" in only:
            self.guard("idle", self.fig_idle_unsampled, n)

    def fig_idle_unsampled(self, n: int) -> None:
        """Idle CPU again, with the resource sampler off: what the rest of vmbridged costs idle."""
        daemon = self.daemon("idle", "--stats-interval", "0")
        try:
            self._create_many(daemon, n)
            time.sleep(2.0)
            idle = self._idle_cpu(daemon)
        finally:
            daemon.cleanup()
        sampled = self.figures["scale"]["idle_cpu_pct_n"]
        self.figures["idle_unsampled"] = {"vms": n, "idle_cpu_pct": idle}
        self.add(Row(f"scale: idle CPU, {n} VMs, --stats-interval 0", f"{idle:.2f} %",
                     f"sampler on (default 2 s) {sampled:.2f} %", target="~0 (<= 0.1 %)", met=idle <= 0.1,
                     data=self.figures["idle_unsampled"],
                     note="the resource sampler (issue 12) reads every QEMU with psutil and QMP each "
                          "interval; this row is the daemon without it"))

    def _create_many(self, daemon: Daemon, n: int) -> None:
        names = [f"vm{i:03d}" for i in range(n)]
        errors = []
        lock = threading.Lock()

        def worker():
            with Connection(daemon.manager_socket, timeout=120) as conn:
                while True:
                    with lock:
                        if not names or errors:
                            return
                        name = names.pop(0)
                    try:
                        daemon.create(name, self.qemu, conn)
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(f"{name}: {e}")
                        return
        threads = [threading.Thread(target=worker) for _ in range(self.cfg["create_parallel"])]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise RuntimeError(f"creating {n} VMs failed: {errors[0]}")

    @staticmethod
    def _parallel_call(paths: list[str], data: bytes) -> float:
        """One call on a new connection to each socket, all at once; seconds to the last reply."""
        socks = []
        try:
            start = time.perf_counter()
            for path in paths:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(s)
                s.connect(path)
                s.sendall(data)
            with select.epoll(len(socks)) as ep:
                replies = {}
                for s in socks:
                    ep.register(s.fileno(), select.EPOLLIN)
                    replies[s.fileno()] = (s, b"")
                pending = len(socks)
                while pending:
                    for fd, _mask in ep.poll(30):
                        s, buf = replies[fd]
                        chunk = s.recv(4096)
                        if not chunk:
                            raise RuntimeError("vmbridged closed a connection without replying")
                        buf += chunk
                        replies[fd] = (s, buf)
                        if buf.endswith(b"\0"):
                            if buf != b"{}\0":
                                raise RuntimeError(f"call failed: {buf[:200]!r}")
                            ep.unregister(fd)
                            pending -= 1
            return time.perf_counter() - start
        finally:
            for s in socks:
                s.close()

    def fig_bulk(self, daemon: Daemon) -> None:
        n = self.cfg["bulk_vms"]
        names = [f"vm{i:03d}" for i in range(n)]
        paths = [daemon.control_socket(name) for name in names]
        pause, resume = request(f"{MI}.Pause"), request(f"{MI}.Resume")
        # What the daemon and the QEMUs cost, without any vmctl: a new
        # connection per VM, every call sent before any reply is read.
        one, many = [], []
        for _ in range(self.cfg["bulk_repeats"] + 1):
            for _ in range(3):
                one.append(self._parallel_call(paths[:1], pause))
                self._parallel_call(paths[:1], resume)
            many.append(self._parallel_call(paths, pause))
            self._parallel_call(paths, resume)
        o, m = median(one[3:]), median(many[1:])  # the first round warms up
        self.figures["bulk_stdlib"] = {"one_s": one[3:], "many_s": many[1:], "vms": n}
        self.add(Row(f"bulk: Pause of {n} VMs at once, stdlib client, median", ms(m), f"Pause of 1 VM {ms(o)}",
                     ratio=m / o, data=self.figures["bulk_stdlib"],
                     note=f"{n} QEMUs each run a stop and vmbridged answers {n} calls on 2 CPUs: "
                          f"{m / n * 1e6:.0f} us per VM; what vmctl adds to it is its own"))
        figure, baseline, target = f"bulk: vmctl pause of {n} VMs, median", "vmctl pause of 1 VM", "<= 2x"
        if not self.vmctl_available():
            self.skip_vmctl(figure, baseline, target)
            return
        rt = daemon.runtime_dir
        self.run_vmctl(rt, "pause", names[0])
        self.run_vmctl(rt, "resume", names[0])
        one, many = [], []
        for _ in range(self.cfg["bulk_repeats"]):
            for _ in range(2):
                one.append(self.run_vmctl(rt, "pause", names[0]))
                self.run_vmctl(rt, "resume", names[0])
            many.append(self.run_vmctl(rt, "pause", *names))
            self.run_vmctl(rt, "resume", *names)
        o, m = median(one), median(many)
        self.figures["bulk"] = {"one_s": one, "many_s": many, "vms": n}
        self.add(Row(figure, ms(m), f"{baseline} {ms(o)}", ratio=m / o, target=target, met=m / o <= 2,
                     data=self.figures["bulk"]))

    # ------------------------------------------------------------------ run

    def guard(self, name: str, fn, *args) -> None:
        print(f"  {name} ...", flush=True)
        t = time.monotonic()
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - one broken figure must not hide the others
            traceback.print_exc()
            self.add(Row(name, "ERROR", "", verdict="ERROR", note=f"{type(e).__name__}: {e}"))
        print(f"  {name} done in {time.monotonic() - t:.1f} s", flush=True)

    def run(self) -> dict:
        only = set(self.args.only.split(",")) if self.args.only else {
            "qmp", "describe", "newconn", "pause", "fanout", "start", "cli", "scale", "bulk", "idle"}
        started = datetime.datetime.now(datetime.timezone.utc)
        load_before = load_average()
        t0 = time.monotonic()
        print(f"vmbridge bench ({'full' if self.args.full else 'quick'}): QEMU {self.qemu.path} "
              f"({self.qemu.version_text}); load average {load_before}", flush=True)
        if "qmp" in only:
            self.guard("qmp", self.fig_qmp)
        if only & {"describe", "newconn", "pause", "fanout", "start", "cli"}:
            self.latency_figures(only)
        if only & {"scale", "bulk", "idle"}:
            self.fig_scale(only)
        elapsed = time.monotonic() - t0
        return {
            "started": started.isoformat(timespec="seconds"),
            "mode": "full" if self.args.full else "quick",
            "elapsed_s": round(elapsed, 1),
            "load_average_before": load_before, "load_average_after": load_average(),
            "qemu": self.qemu.to_dict(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "kernel": platform.release(), "cpu": _cpu_model()},
            "git": _git_describe(),
            "config": self.cfg,
            "rows": [row.to_dict(self.qemu) for row in self.rows],
            "figures": self.figures,
        }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_describe() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def print_table(result: dict) -> None:
    rows = result["rows"]
    headers = ("figure", "value", "baseline (same run)", "ratio", "target", "verdict")
    keys = ("figure", "value", "baseline", "ratio_text", "target", "verdict")
    widths = [max(len(h), *(len(str(r[k])) for r in rows)) for h, k in zip(headers, keys)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print()
    print(f"QEMU {result['qemu']['path']} ({result['qemu']['version_text']}) for every figure; "
          f"{result['machine']['cpus']} CPUs ({result['machine']['cpu']}); Python {result['machine']['python']}")
    print(f"load average before {result['load_average_before']}, after {result['load_average_after']}; "
          f"{result['mode']} run took {result['elapsed_s']} s; git {result['git']}")
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)).rstrip())
    notes = [r for r in rows if r["note"]]
    if notes:
        print()
        for r in notes:
            print(f"  {r['figure']}: {r['note']}")
    missed = [r for r in rows if r["verdict"] in ("MISSED", "ERROR")]
    print()
    if missed:
        for r in missed:
            print(f"{r['verdict']}: {r['figure']}: {r['value']} vs {r['baseline']} (target {r['target']})")
    else:
        print("every target with a verdict was met")


def print_markdown(result: dict) -> None:
    """The table as docs/performance.md shows it."""
    print(f"{result['mode']} run, {result['started']}, git {result['git']}; QEMU {result['qemu']['path']} "
          f"({result['qemu']['version_text']}); {result['machine']['cpus']} CPUs ({result['machine']['cpu']}), "
          f"Python {result['machine']['python']}; load average before {result['load_average_before']}, "
          f"after {result['load_average_after']}\n")
    print("| figure | value | baseline (same run) | ratio | target | verdict |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        verdict = f"**{r['verdict']}**" if r["verdict"] in ("MISSED", "ERROR") else r["verdict"]
        print(f"| {r['figure']} | {r['value']} | {r['baseline']} | {r['ratio_text']} | "
              f"{r['target'].replace('<=', '≤')} | {verdict} |")
    notes = [r for r in result["rows"] if r["note"]]
    if notes:
        print()
        for r in notes:
            print(f"- {r['figure']}: {r['note']}")


def raise_nofile(wanted: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description="vmbridge benchmarks (each figure beside its baseline)")
    parser.add_argument("--full", action="store_true", help="the long run (500 VMs, more iterations)")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary for every figure")
    parser.add_argument("--only", help="comma-separated figures: qmp,describe,newconn,pause,fanout,"
                                       "start,cli,scale,bulk,idle (idle: the scale figure's idle CPU "
                                       "again with the resource sampler off)")
    parser.add_argument("--vmctl", help="vmctl launcher to time (default bin/vmctl of this tree)")
    parser.add_argument("--profile", metavar="DIR", help="where profiles go (default /tmp)")
    parser.add_argument("--cprofile", action="store_true", help="run vmbridged under cProfile (slows it: "
                                                                 "figures taken so are not comparable)")
    parser.add_argument("--py-spy", metavar="PATH", help="sample vmbridged with this py-spy during the "
                                                          "describe/newconn/pause/fanout figures")
    parser.add_argument("--results", default=os.path.join(BENCH_DIR, "results"), help="where the JSON goes")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--show", metavar="JSON", help="print the table of an earlier run and exit")
    parser.add_argument("--markdown", action="store_true", help="with --show: as a Markdown table")
    args = parser.parse_args()
    if args.show:
        with open(args.show) as f:
            result = json.load(f)
        (print_markdown if args.markdown else print_table)(result)
        return 0
    if args.profile or args.cprofile:
        args.profile = os.path.abspath(args.profile or tempfile.gettempdir())
        os.makedirs(args.profile, exist_ok=True)
    raise_nofile()  # 1000 subscribers; vmbridged inherits it (its caps derive from it)
    bench = Bench(args)
    try:
        result = bench.run()
    finally:
        leaked = kill_marked()
        if leaked:
            print(f"bench: killed leftover processes {leaked}", file=sys.stderr)
    os.makedirs(args.results, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.results, f"{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    shutil.copyfile(path, os.path.join(args.results, "latest.json"))
    print_table(result)
    print(f"\nresults: {path}")
    errors = any(r["verdict"] == "ERROR" for r in result["rows"])
    missed = any(r["verdict"] == "MISSED" for r in result["rows"])
    return 1 if errors or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
