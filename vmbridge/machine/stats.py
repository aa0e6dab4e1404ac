"""Resource figures of VMs: what each one costs the host, sampled on an interval.

DESIGN.md's "State is kept, not polled" has one deliberate exception, and it
is this module: CPU use, memory and I/O are not events, so a VM's figures are
*sampled* — by one greenlet for all VMs (:class:`StatsSampler`), every
``interval`` seconds (vmbridged's ``--stats-interval``, default 2; 0 turns it
off). Requests (the manager's ``List`` and ``Stats``) are answered from the
last sample and never wait for QEMU; the one figure read on request is PSS
(see :meth:`MachineSampler.pss`).

Per VM and round (:meth:`MachineSampler.sample`):

* psutil on QEMU and on each helper process of the VM
  (:meth:`Machine.helper_pids`, e.g. virtiofsd): CPU time, RSS, threads,
  open fds, storage I/O bytes (``/proc/PID/io``), start time. One
  ``oneshot()`` read per process, ~60-130 µs. CPU % is the CPU-time delta
  between two samples over the wall-clock delta — never psutil's blocking
  ``cpu_percent(interval)``. The vCPU threads' own CPU time comes from
  ``/proc/PID/task/TID/stat``.
* QMP, where QEMU knows better: ``query-blockstats`` (per drive bytes and
  operations) every round; ``query-cpus-fast`` (vCPU count and thread ids)
  on the first round and then every ``SLOW_ROUNDS``; ``query-balloon`` every
  round while a balloon answers, else retried every ``SLOW_ROUNDS`` (its
  "no balloon" error is normal and never logged). QMP is skipped, keeping the
  last answers, while QEMU cannot or need not answer: the VM is starting or
  shutting down, its vCPUs are paused (nothing it counts moves), its process
  is stopped (SIGSTOP), or a query timed out (then QMP is left alone for
  ``SLOW_ROUNDS`` rounds, logged once).
* A VM whose process vanished between samples is simply skipped (and its
  figures dropped); its exit is the Machine's business.

The figures are plain dicts in the wire shape of io.vmbridge.Manager's
``MachineFigures`` (documented field by field in
``vmbridge/interfaces/io.vmbridge.Manager.varlink``): :data:`SUMMARY_KEYS`
go into ``List``, the whole set (plus PSS) into ``Stats``.
"""

from __future__ import annotations

import logging
import os
import time

import gevent
import psutil

from vmbridge.machine.machine import MachineCommandError, MachineError, MachineState, MachineTimeout

log = logging.getLogger("vmbridge.stats")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: How many rounds between the QMP queries that rarely change
#: (query-cpus-fast; query-balloon while there is none), and how many rounds
#: QMP is left alone after a query timed out. 15 rounds: 30 s at the default.
SLOW_ROUNDS = 15

#: The figures List carries; Stats adds the rest (per process, per vCPU,
#: per drive, PSS).
SUMMARY_KEYS = ("sampledUSec", "intervalUSec", "cpuPercent", "cpuUSec", "rssBytes", "threads", "fds",
                "readBytes", "writeBytes", "uptimeUSec", "vcpuCount", "balloonBytes")

_STOPPED = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def _usec(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


def _percent(cpu_delta: float, wall_delta: float) -> float:
    """CPU % of one host CPU, one decimal (clock-tick resolution makes more noise)."""
    return round(max(cpu_delta, 0.0) * 100.0 / wall_delta, 1)


class ProcessReading:
    """One process's figures at one moment."""

    __slots__ = ("mono", "cpu", "rss", "threads", "fds", "read_bytes", "write_bytes", "status",
                 "create_time")

    def __init__(self, ps: psutil.Process):
        with ps.oneshot():
            self.status = ps.status()
            if self.status == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(ps.pid)
            times = ps.cpu_times()
            self.cpu = times.user + times.system
            self.rss = ps.memory_info().rss
            self.threads = ps.num_threads()
            self.create_time = ps.create_time()
            try:
                self.fds = ps.num_fds()
            except psutil.AccessDenied:
                self.fds = None
            try:
                io = ps.io_counters()
                self.read_bytes, self.write_bytes = io.read_bytes, io.write_bytes
            except (psutil.AccessDenied, AttributeError):
                self.read_bytes = self.write_bytes = None
        self.mono = time.monotonic()


def thread_cpu_seconds(pid: int, tid: int) -> float | None:
    """A thread's CPU time (user + system) from /proc/PID/task/TID/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # fields 3.. of proc(5): state, ppid, ...
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pss_bytes(pid: int) -> int | None:
    """Proportional set size from /proc/PID/smaps_rollup, or None if unreadable.

    Cheaper than psutil's memory_full_info() (which reads all of smaps for
    USS): ~0.4 ms for an idle 30 MiB QEMU, ~1.3 ms for a 260 MiB TCG guest;
    it walks the page tables, so it grows with what the VM has mapped.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def drive_name(entry: dict) -> str:
    """A query-blockstats entry's name: its block backend, else its device's id, else its node."""
    if entry.get("device"):
        return entry["device"]
    qdev = entry.get("qdev") or ""
    if qdev.startswith("/machine/peripheral/"):
        return qdev.split("/")[3]  # /machine/peripheral/ID/virtio-backend
    if qdev:
        return qdev
    return entry.get("node-name") or "?"


def parse_blockstats(reply) -> list[dict]:
    """query-blockstats' reply as DriveFigures dicts."""
    drives = []
    for entry in reply or ():
        stats = entry.get("stats") or {}
        drive = {"name": drive_name(entry),
                 "readBytes": stats.get("rd_bytes", 0), "writeBytes": stats.get("wr_bytes", 0),
                 "readOps": stats.get("rd_operations", 0), "writeOps": stats.get("wr_operations", 0),
                 "flushOps": stats.get("flush_operations", 0)}
        if entry.get("qdev"):
            drive["qdev"] = entry["qdev"]
        if entry.get("node-name"):
            drive["nodeName"] = entry["node-name"]
        drives.append(drive)
    return drives


class _Process:
    """A process being sampled: its psutil handle and its last reading."""

    __slots__ = ("pid", "role", "ps", "last", "cpu_percent", "interval")

    def __init__(self, pid: int, role: str | None):
        self.ps = psutil.Process(pid)
        self.pid = pid
        self.role = role or self._name()
        self.last: ProcessReading | None = None
        self.cpu_percent: float | None = None
        self.interval: float | None = None

    def _name(self) -> str:
        try:
            return self.ps.name()
        except psutil.Error:
            return "helper"

    def read(self) -> ProcessReading:
        reading = ProcessReading(self.ps)
        if self.last is not None and reading.mono > self.last.mono:
            self.interval = reading.mono - self.last.mono
            self.cpu_percent = _percent(reading.cpu - self.last.cpu, self.interval)
        self.last = reading
        return reading


class MachineSampler:
    """The figures of one VM, and what the next sample needs of the last one."""

    def __init__(self, machine, *, qmp_timeout: float = 1.0, interval: float = 2.0):
        self.machine = machine
        self.qmp_timeout = qmp_timeout
        self.interval = interval
        self._reset(None)

    def _reset(self, process) -> None:
        self.process = process                 # the Machine's QemuProcess these figures are of
        self._procs: dict[int, _Process] = {}
        self._round = 0
        self._figures: dict | None = None
        # From QMP, kept while QEMU is not asked:
        self._vcpus: list[tuple[int, int]] | None = None     # (cpu-index, thread-id)
        self._vcpu_last: dict[int, tuple[float, float]] = {}  # tid -> (monotonic, cpu seconds)
        self._drives: list[dict] | None = None
        self._balloon: int | None = None
        self._balloon_next = 0                 # the round to ask for a balloon again
        self._qmp_wall: float | None = None
        self._qmp_quiet_until = 0              # round; after a timeout
        self._cpus_next = 0
        self._pss: tuple[float, dict[int, int | None]] | None = None  # (monotonic, pid -> PSS)

    # ------------------------------------------------------------- sampling

    def sample(self) -> bool:
        """Take one sample; False if the VM has no process to sample (any more)."""
        machine = self.machine
        process = machine.process
        if process is None or process.exited or not machine.state.active:
            return False
        if process is not self.process:  # (re)started since the last sample: begin afresh
            self._reset(process)
        self._round += 1
        wall = time.time()
        try:
            qemu = self._reading(process.pid, "qemu")
        except psutil.Error:
            return False  # vanished between samples: skipped
        readings = [(self._procs[process.pid], qemu)]
        helpers = set()
        for pid in machine.helper_pids():
            try:
                reading = self._reading(pid, None)
            except psutil.Error:
                continue  # a helper that just exited; its VM carries on
            readings.append((self._procs[pid], reading))
            helpers.add(pid)
        for pid in set(self._procs) - helpers - {process.pid}:
            del self._procs[pid]
        self._sample_qmp(qemu)
        self._figures = self._build(wall, qemu, readings)
        return True

    def _reading(self, pid: int, role: str | None) -> ProcessReading:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = _Process(pid, role)
        return proc.read()

    def _sample_qmp(self, qemu: ProcessReading) -> None:
        machine = self.machine
        if machine.state not in (MachineState.RUNNING, MachineState.PAUSED) or machine.qmp is None:
            return  # starting (set-up owns QMP) or shutting down
        if qemu.status in _STOPPED or self._round < self._qmp_quiet_until:
            return  # SIGSTOPped: it cannot answer; or it did not answer lately
        if not machine.qemu_running and self._qmp_wall is not None:
            return  # paused: what QEMU counts does not move
        command = None
        try:
            if self._vcpus is None or self._round >= self._cpus_next:
                command = "query-cpus-fast"
                cpus = machine.execute(command, timeout=self.qmp_timeout)
                self._vcpus = sorted((c["cpu-index"], c["thread-id"]) for c in cpus)
                self._cpus_next = self._round + SLOW_ROUNDS
            if machine.devices is not None and not machine.devices.drives:
                self._drives = []   # nothing to count: spare QEMU (and us) the round trip
            else:
                command = "query-blockstats"
                self._drives = parse_blockstats(machine.execute(command, timeout=self.qmp_timeout))
            if self._balloon is not None or self._round >= self._balloon_next:
                command = "query-balloon"
                try:
                    self._balloon = machine.execute(command, timeout=self.qmp_timeout)["actual"]
                except MachineCommandError:  # DeviceNotActive: no balloon, the usual case
                    self._balloon = None
                    self._balloon_next = self._round + SLOW_ROUNDS
            self._qmp_wall = time.time()
        except MachineTimeout:
            self._qmp_quiet_until = self._round + SLOW_ROUNDS
            log.info("%s: QEMU did not answer %s within %gs; its QMP figures are not refreshed for %d rounds",
                     machine.name, command, self.qmp_timeout, SLOW_ROUNDS)
        except MachineError as e:  # disconnected (exiting), or a command QEMU refused
            log.debug("%s: stats: %s", machine.name, e)
        except (KeyError, TypeError) as e:
            log.warning("%s: stats: unexpected %s reply (%s)", machine.name, command, e)

    def _build(self, wall: float, qemu: ProcessReading, readings) -> dict:
        figures = {"sampledUSec": _usec(wall)}
        main = readings[0][0]
        if main.interval is not None:
            figures["intervalUSec"] = _usec(main.interval)
        if main.cpu_percent is not None:  # a helper new in this interval counts from its next sample
            figures["cpuPercent"] = round(sum(p.cpu_percent or 0.0 for p, _ in readings), 1)
        figures["cpuUSec"] = sum(_usec(r.cpu) for _, r in readings)
        figures["rssBytes"] = sum(r.rss for _, r in readings)
        figures["threads"] = sum(r.threads for _, r in readings)
        if all(r.fds is not None for _, r in readings):
            figures["fds"] = sum(r.fds for _, r in readings)
        if all(r.read_bytes is not None for _, r in readings):
            figures["readBytes"] = sum(r.read_bytes for _, r in readings)
            figures["writeBytes"] = sum(r.write_bytes for _, r in readings)
        figures["uptimeUSec"] = _usec(max(wall - qemu.create_time, 0.0))
        if self._vcpus is not None:
            figures["vcpuCount"] = len(self._vcpus)
            figures["vcpus"] = self._vcpu_figures()
        if self._balloon is not None:
            figures["balloonBytes"] = self._balloon
        processes = []
        for proc, reading in readings:
            entry = {"pid": proc.pid, "role": proc.role, "cpuUSec": _usec(reading.cpu),
                     "rssBytes": reading.rss, "threads": reading.threads}
            if proc.cpu_percent is not None:
                entry["cpuPercent"] = proc.cpu_percent
            if reading.fds is not None:
                entry["fds"] = reading.fds
            if reading.read_bytes is not None:
                entry["readBytes"], entry["writeBytes"] = reading.read_bytes, reading.write_bytes
            processes.append(entry)
        figures["processes"] = processes
        if self._drives is not None:
            figures["drives"] = self._drives
        if self._qmp_wall is not None:
            figures["qmpSampledUSec"] = _usec(self._qmp_wall)
        return figures

    def _vcpu_figures(self) -> list[dict]:
        pid = self.process.pid
        now = time.monotonic()
        out, last = [], {}
        for index, tid in self._vcpus:
            entry = {"index": index, "threadId": tid}
            cpu = thread_cpu_seconds(pid, tid)
            if cpu is not None:
                entry["cpuUSec"] = _usec(cpu)
                before = self._vcpu_last.get(tid)
                if before is not None and now > before[0]:
                    entry["cpuPercent"] = _percent(cpu - before[1], now - before[0])
                last[tid] = (now, cpu)
            out.append(entry)
        self._vcpu_last = last
        return out

    # --------------------------------------------------------------- reading

    def figures(self, *, full: bool = False) -> dict | None:
        """The last sample's figures: the summary, or (``full``) the whole set."""
        figures = self._figures
        if figures is None:
            return None
        if not full:
            return {k: figures[k] for k in SUMMARY_KEYS if k in figures}
        out = dict(figures)
        pss = self.pss()
        processes = []
        for entry in figures["processes"]:
            entry = dict(entry)
            if pss.get(entry["pid"]) is not None:
                entry["pssBytes"] = pss[entry["pid"]]
            processes.append(entry)
        out["processes"] = processes
        if all("pssBytes" in p for p in processes):
            out["pssBytes"] = sum(p["pssBytes"] for p in processes)
        return out

    def pss(self) -> dict[int, int | None]:
        """PSS of the VM's processes, read on request (Stats for this one VM).

        The one figure not sampled: reading it walks the VM's page tables
        (see :func:`pss_bytes`), too much to do for every VM every round.
        Read at most once per interval per VM however often Stats asks.
        """
        now = time.monotonic()
        if self._pss is not None and now - self._pss[0] < self.interval:
            return self._pss[1]
        figures = self._figures or {}
        pss = {p["pid"]: pss_bytes(p["pid"]) for p in figures.get("processes", ())}
        self._pss = (now, pss)
        return pss


class StatsSampler:
    """One greenlet sampling every VM's figures every ``interval`` seconds.

    ``machines`` is a callable returning the Machines to sample (the
    manager's registry); VMs without a running process are left out.
    """

    def __init__(self, machines, interval: float, *, qmp_timeout: float | None = None):
        if interval <= 0:
            raise ValueError("the stats interval must be positive")
        self.interval = interval
        self.qmp_timeout = qmp_timeout if qmp_timeout is not None else min(1.0, max(interval / 2, 0.25))
        self._machines = machines
        self._samplers: dict[object, MachineSampler] = {}
        self._failed: set = set()  # machines whose sampling raised (logged once)
        self._greenlet = None
        self._self = psutil.Process()
        self._self_last: tuple[float, float] | None = None  # (monotonic, cpu seconds)
        self.self_cpu_percent: float | None = None
        self.rounds = 0
        self.last_round: float | None = None  # seconds the last round took (wall clock)

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
            self._greenlet.name = "stats-sampler"

    def stop(self) -> None:
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=True)

    def _run(self) -> None:
        next_round = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                self.sample_once()
            except Exception:  # a bug here must not end sampling for good
                log.exception("stats: sampling round failed")
            self.last_round = time.monotonic() - started
            next_round = max(next_round + self.interval, time.monotonic() + self.interval / 10)
            gevent.sleep(next_round - time.monotonic())

    def sample_once(self) -> None:
        """One round over every VM (and vmbridged itself)."""
        seen = set()
        machines = list(self._machines())
        for machine in machines:
            sampler = self._samplers.get(machine)
            if sampler is None:
                if not machine.state.active or machine.process is None:
                    continue
                sampler = self._samplers[machine] = MachineSampler(
                    machine, qmp_timeout=self.qmp_timeout, interval=self.interval)
            try:
                ok = sampler.sample()
            except Exception:
                if machine not in self._failed:
                    self._failed.add(machine)
                    log.exception("%s: stats: sampling failed", machine.name)
                ok = False
            if ok:
                seen.add(machine)
            gevent.sleep(0)  # many VMs: let others in between
        for machine in set(self._samplers) - seen:
            del self._samplers[machine]
        self._failed &= set(machines)
        self._sample_self()
        self.rounds += 1

    def _sample_self(self) -> None:
        times = self._self.cpu_times()
        now, cpu = time.monotonic(), times.user + times.system
        if self._self_last is not None and now > self._self_last[0]:
            self.self_cpu_percent = _percent(cpu - self._self_last[1], now - self._self_last[0])
        self._self_last = (now, cpu)

    def figures(self, machine, *, full: bool = False) -> dict | None:
        """The machine's figures from the last round, or None (not sampled, or no process)."""
        sampler = self._samplers.get(machine)
        if sampler is None or sampler.process is not machine.process:
            return None
        return sampler.figures(full=full)
