"""Shared fixtures: a real vmbridged in a subprocess, short runtime paths, cleanup.

Every process a test starts is found again and ended at teardown, also when
the test failed: the daemon and every QEMU it launched carry a marker in
their environment (VMBRIDGE_TEST_MARK), and teardown kills whatever still
carries it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBRIDGED = os.path.join(ROOT, "bin", "vmbridged")
VMCTL = os.path.join(ROOT, "bin", "vmctl")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The layer suites' fixtures (QMP client, varlink server), with assertion rewriting.
pytest.register_assert_rewrite("qemu_helpers", "mock_qmp", "varlink_fixtures", "leak_checks")
pytest_plugins = ["qemu_helpers", "mock_qmp", "varlink_fixtures"]


def marked_processes(mark: str):
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("VMBRIDGE_TEST_MARK") == mark:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def kill_marked(mark: str) -> list[int]:
    procs = marked_processes(mark)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


@pytest.fixture
def short_tmp():
    """A short directory under /tmp (AF_UNIX paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="vmb-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def open_to_everyone(daemon, control_socket: str) -> None:
    """Make the sockets and their directories world-accessible, so that only
    SO_PEERCRED stands between another UID and the daemon."""
    for path in (control_socket, daemon.manager_socket):
        os.chmod(path, 0o666)
    directory = os.path.dirname(control_socket)
    while directory != "/tmp":
        os.chmod(directory, 0o755)
        directory = os.path.dirname(directory)


def raw_call(path: str, message: dict | bytes, *, timeout: float = 10.0) -> dict:
    """One varlink call over a fresh connection, reading exactly one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        sock.sendall(data + b"\0")
        return json.loads(read_message(sock))


def read_message(sock: socket.socket, buffer: bytearray | None = None) -> bytes:
    """Read one NUL-terminated varlink message (extra bytes stay in `buffer`)."""
    buf = buffer if buffer is not None else bytearray()
    while b"\0" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    message, _, rest = bytes(buf).partition(b"\0")
    buf[:] = rest
    return message


class Daemon:
    """A vmbridged subprocess with its own runtime and config directories."""

    def __init__(self, base: str, *, extra_args=(), env=None):
        self.base = base
        self.runtime_dir = os.path.join(base, "run")
        self.config_dir = os.path.join(base, "etc")
        self.mark = uuid.uuid4().hex
        self.log_path = os.path.join(base, "vmbridged.log")
        self.extra_args = list(extra_args)
        self.env = dict(os.environ if env is None else env)
        self.env["VMBRIDGE_TEST_MARK"] = self.mark
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc = None

    @property
    def manager_socket(self) -> str:
        return os.path.join(self.runtime_dir, "io.vmbridge.Manager")

    def control_socket(self, name: str) -> str:
        return os.path.join(self.runtime_dir, "machines", name, "control")

    def start(self, timeout: float = 20.0) -> "Daemon":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, VMBRIDGED, "--runtime-dir", self.runtime_dir,
             "--config-dir", self.config_dir, "--verbose", *self.extra_args],
            stdout=self._log, stderr=self._log, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vmbridged exited with {self.proc.returncode}:\n{self.log()}")
            try:
                raw_call(self.manager_socket, {"method": "org.varlink.service.GetInfo", "parameters": {}},
                         timeout=2)
                return self
            except (OSError, EOFError):
                time.sleep(0.05)
        raise RuntimeError(f"vmbridged did not come up within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-8000:]
        except OSError:
            return ""

    def call(self, method: str, parameters: dict | None = None, *, timeout: float = 60.0) -> dict:
        """A manager call; returns the whole reply (parameters or error)."""
        return raw_call(self.manager_socket, {"method": f"io.vmbridge.Manager.{method}",
                                              "parameters": parameters or {}}, timeout=timeout)

    def create(self, name: str, **config) -> dict:
        config.setdefault("machine", "none")
        reply = self.call("Create", {"config": {"name": name, **config}})
        if "error" in reply:
            raise RuntimeError(f"Create {name} failed: {reply}")
        return reply["parameters"]["machine"]

    def qemu_processes(self):
        return [p for p in marked_processes(self.mark) if p.pid != self.proc.pid]

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> list[int]:
        """Stop the daemon and kill anything of this test still alive; returns leaked pids."""
        self.stop()
        return kill_marked(self.mark)


@pytest.fixture
def daemon_factory(short_tmp):
    daemons = []

    def make(*, start=True, **kwargs) -> Daemon:
        d = Daemon(os.path.join(short_tmp, f"d{len(daemons)}"), **kwargs)
        os.makedirs(d.base)
        daemons.append(d)
        return d.start() if start else d

    yield make
    leaked = []
    for d in daemons:
        leaked += d.cleanup()
    assert not leaked, f"processes left running after the test: {leaked}"


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    return daemon_factory()
