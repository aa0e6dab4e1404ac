"""What the figures of bench/run.py stand on: QEMU floors, a vmbridged, statistics.

Every process started here carries ``VMBRIDGE_BENCH_MARK=<run id>`` in its
environment (QEMU inherits it from vmbridged), so :func:`kill_marked` finds
and ends whatever is left, also after a crash of the bench itself.
"""

from __future__ import annotations

import os
import re
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

from varlink_stdlib import Connection, call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBRIDGED = os.path.join(ROOT, "bin", "vmbridged")
MARK_VAR = "VMBRIDGE_BENCH_MARK"
# A helper process of the bench (relay_floor.py) keeps its parent's mark, so
# what it starts is found and ended by the same kill_marked().
RUN_MARK = os.environ.get(MARK_VAR) or uuid.uuid4().hex
MANAGER = "io.vmbridge.Manager"


# ---------------------------------------------------------------- statistics

def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_us(samples: list[float]) -> dict:
    """p50/p99/max/mean of samples in seconds, as microseconds."""
    ordered = sorted(samples)
    return {"p50_us": percentile(ordered, 0.50) * 1e6, "p99_us": percentile(ordered, 0.99) * 1e6,
            "max_us": ordered[-1] * 1e6, "mean_us": statistics.fmean(ordered) * 1e6,
            "n": len(ordered)}


def median(values):
    return statistics.median(values)


# ---------------------------------------------------------------------- QEMU

class QemuInfo:
    """The binary every figure of a run uses, and its version."""

    def __init__(self, binary: str):
        path = shutil.which(binary)
        if path is None:
            raise SystemExit(f"bench: QEMU binary {binary!r} not found")
        self.path = os.path.realpath(path) if not os.path.isabs(binary) else binary
        out = subprocess.run([self.path, "-version"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=60).stdout
        self.version_text = (out.splitlines() or ["?"])[0].strip()
        m = re.search(r"version (\d+\.\d+\.\d+)", self.version_text)
        self.version = m.group(1) if m else "?"
        objects = subprocess.run([self.path, "-object", "help"], capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, timeout=60).stdout
        self.monitor_qmp_object = bool(re.search(r"^\s*monitor-qmp\s*$", objects, re.M))

    def monitor_args(self, chardev_id: str) -> list[str]:
        if self.monitor_qmp_object:
            return ["-object", f"monitor-qmp,id=mon-{chardev_id},chardev={chardev_id}"]
        return ["-mon", f"chardev={chardev_id},mode=control"]

    def to_dict(self) -> dict:
        return {"path": self.path, "version": self.version, "version_text": self.version_text}


def bench_env(**extra) -> dict:
    env = dict(os.environ)
    env[MARK_VAR] = RUN_MARK
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.pop("LISTEN_FDS", None)
    env.update(extra)
    return env


class RawQMP:
    """The floor: a bare QEMU and a blocking stdlib QMP loop, no parsing.

    QEMU runs with the flags vmbridged gives a ``-machine none`` VM
    (``-S -nodefaults -no-user-config -display none``), its monitor on a
    socketpair; after the handshake it gets ``cont``, so it is running as a
    vmbridge VM is.  A round trip writes the command and reads lines until
    the reply (events in between are skipped, unparsed).
    """

    def __init__(self, qemu: QemuInfo):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [qemu.path, "-S", "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", "none", "-chardev", f"socket,id=qmp,fd={theirs.fileno()}",
                *qemu.monitor_args("qmp")]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         env=bench_env(), start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.sock.settimeout(30)
        self.buffer = b""
        self.next_id = 0
        self.read_line()  # greeting
        self.roundtrip(b'{"execute":"qmp_capabilities"}\n')
        self.roundtrip(b'{"execute":"cont"}\n')

    def read_line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed QMP")
            self.buffer += chunk

    def roundtrip(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        while True:
            line = self.read_line()
            if line.startswith(b'{"return"') or line.startswith(b'{"error"'):
                return line

    def command(self, name: str) -> bytes:
        """Bytes of ``name`` with a fresh id, as QMPClient frames them."""
        self.next_id += 1
        return b'{"execute":"%s","id":%d}\n' % (name.encode(), self.next_id)

    def close(self) -> None:
        self.sock.close()
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def bare_qemu_start(qemu: QemuInfo) -> float:
    """Seconds from spawning a ``-machine none`` QEMU to its QMP greeting.

    The same command line as vmbridged's for such a VM (both monitors), the
    same spawn (fork+exec, new session, fds passed), ended with SIGKILL.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    directory = tempfile.mkdtemp(prefix="vmb-bare-", dir="/tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(directory, "qmp"))
    listener.listen(1)
    argv = [qemu.path, "-name", "guest=bare,debug-threads=on", "-S", "-nodefaults", "-no-user-config",
            "-display", "none", "-machine", "none",
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", *qemu.monitor_args("qmp"),
            "-chardev", f"socket,id=qmp-reattach,fd={listener.fileno()},server=on,wait=off",
            *qemu.monitor_args("qmp-reattach")]
    proc = None
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), listener.fileno()],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=bench_env(), start_new_session=True)
        theirs.close()
        listener.close()
        ours.settimeout(30)
        data = b""
        while b"\n" not in data:
            chunk = ours.recv(65536)
            if not chunk:
                raise EOFError("QEMU exited before its greeting")
            data += chunk
        elapsed = time.perf_counter() - start
    finally:
        ours.close()
        theirs.close()
        listener.close()
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
    return elapsed


# ------------------------------------------------------------------ vmbridged

class Daemon:
    """A vmbridged subprocess (no --verbose: INFO logging, as in production)."""

    def __init__(self, name: str, *, profile_dir: str | None = None, extra_args=()):
        self.base = tempfile.mkdtemp(prefix=f"vmb-{name}-", dir="/tmp")
        self.name = name
        self.extra_args = list(extra_args)
        self.runtime_dir = os.path.join(self.base, "run")
        self.config_dir = os.path.join(self.base, "etc")
        self.log_path = os.path.join(self.base, "vmbridged.log")
        self.profile_dir = profile_dir
        self.proc = None
        self.ps = None
        self._log = None

    @property
    def manager_socket(self) -> str:
        return os.path.join(self.runtime_dir, MANAGER)

    def control_socket(self, vm: str) -> str:
        return os.path.join(self.runtime_dir, "machines", vm, "control")

    def start(self, timeout: float = 30.0) -> "Daemon":
        self._log = open(self.log_path, "ab")
        argv = [sys.executable, VMBRIDGED, "--runtime-dir", self.runtime_dir,
                "--config-dir", self.config_dir, *self.extra_args]
        env = bench_env()
        if self.profile_dir:
            # cProfile around the daemon's main(); greenlet switches blur
            # cumulative times, tottime per function is what to read.
            out = os.path.join(self.profile_dir, f"vmbridged-{self.name}.pstats")
            argv = [sys.executable, os.path.join(ROOT, "bench", "profiled_daemon.py"), out] + argv[2:]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vmbridged exited with {self.proc.returncode}:\n{self.log()}")
            try:
                call(self.manager_socket, "org.varlink.service.GetInfo", timeout=2)
                return self
            except (OSError, EOFError):
                time.sleep(0.05)
        raise RuntimeError(f"vmbridged did not come up within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def manager(self, method: str, parameters: dict | None = None, *, timeout: float = 120.0) -> dict:
        return call(self.manager_socket, f"{MANAGER}.{method}", parameters, timeout=timeout)

    def create(self, name: str, qemu: QemuInfo, conn: Connection | None = None) -> dict:
        params = {"config": {"name": name, "machine": "none", "qemu": qemu.path}}
        if conn is not None:
            return conn.call(f"{MANAGER}.Create", params)["machine"]
        return self.manager("Create", params)["machine"]

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def uss(self) -> int:
        try:
            return self.ps.memory_full_info().uss
        except psutil.Error:
            return 0

    def schedstat(self) -> tuple[float, float]:
        """(seconds on a CPU, seconds runnable but waiting for one) of the daemon's
        thread, in nanosecond resolution (/proc/PID/schedstat), or (0, 0)."""
        try:
            with open(f"/proc/{self.proc.pid}/schedstat") as f:
                run_ns, wait_ns, _slices = f.read().split()
            return int(run_ns) / 1e9, int(wait_ns) / 1e9
        except (OSError, ValueError):
            return 0.0, 0.0

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self, timeout: float = 120.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def kill_marked() -> list[int]:
    """End every process of this run still alive (daemons, QEMUs, vmctl)."""
    me = os.getpid()
    procs = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(MARK_VAR) == RUN_MARK:
                procs.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
