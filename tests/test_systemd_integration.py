"""vmbridged under systemd's service protocol, without systemd.

What vmbridged.socket and vmbridged.service rely on, exercised the way systemd
does it, with the real bin/vmbridged in a subprocess:

- socket activation: a listening AF_UNIX socket passed as fd 3 with
  $LISTEN_PID/$LISTEN_FDS/$LISTEN_FDNAMES is served (a varlink call is
  answered on it), vmbridged binds no socket of its own, and never removes
  the passed one; without it (or with a $LISTEN_PID that is not its own)
  vmbridged binds RUNTIME_DIR/io.vmbridge.Manager itself, 0600 in 0700;
- sd_notify: on a $NOTIFY_SOCKET datagram socket, READY=1, then
  STATUS=0 VMs running, then on SIGTERM STOPPING=1, in that order, and the
  process exits 0;
- the watchdog: WATCHDOG=1 at half of $WATCHDOG_USEC, only when
  $WATCHDOG_PID is vmbridged's own (or unset).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBRIDGED = os.path.join(ROOT, "bin", "vmbridged")
MANAGER = "io.vmbridge.Manager"

sys.path.insert(0, ROOT)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vmbridge.varlink") is None or importlib.util.find_spec("gevent") is None,
    reason="vmbridged cannot run from this tree yet (no vmbridge.varlink layer, or no gevent)")

# Runs in the child: puts the listening socket on fd 3 and sets $LISTEN_PID to
# its own pid, then becomes vmbridged (same pid), as systemd's fork+exec does.
# Environment is copied at exec, so LISTEN_PID must be set in the process
# that execs, not in the parent.
ACTIVATE = r"""
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
pid = os.environ.pop("TEST_LISTEN_PID", None)
os.environ["LISTEN_PID"] = pid if pid is not None else str(os.getpid())
if os.environ.pop("TEST_WATCHDOG_PID_SELF", None):
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


class Notifications:
    """A $NOTIFY_SOCKET: a datagram socket collecting sd_notify messages in order."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[list[str]] = []  # one list of assignments per datagram

    def assignments(self) -> list[str]:
        return [a for m in self.messages for a in m]

    def poll(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        self.messages.append(data.decode().split("\n"))

    def wait_for(self, assignment: str, timeout: float = 30.0, proc=None) -> None:
        deadline = time.monotonic() + timeout
        while assignment not in self.assignments():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"vmbridged exited ({proc.returncode}) before {assignment}; "
                                     f"got {self.assignments()}\n{read_log(proc)}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {assignment} within {timeout}s; got {self.assignments()}")
            self.poll(min(left, 0.2))

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.poll(left)

    def close(self) -> None:
        self.sock.close()


def read_log(proc) -> str:
    try:
        with open(proc.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def varlink_call(path: str, method: str, parameters: dict | None = None, timeout: float = 10.0) -> dict:
    """One varlink call over a unix socket: NUL-terminated JSON each way."""
    message = {"method": method}
    if parameters is not None:
        message["parameters"] = parameters
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(message).encode() + b"\0")
        data = b""
        while not data.endswith(b"\0"):
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed after {data!r}")
            data += chunk
    return json.loads(data[:-1])


@pytest.fixture
def dirs(tmp_path):
    d = {name: tmp_path / name for name in ("run", "conf", "sockets")}
    d["sockets"].mkdir(mode=0o700)
    d["notify"] = tmp_path / "notify"
    d["log"] = tmp_path / "vmbridged.log"
    return d


@pytest.fixture
def daemon(dirs):
    """start(listen=None|socket, env={...}) -> Popen; every daemon is gone afterwards."""
    procs = []

    def start(listen: socket.socket | None = None, env: dict | None = None, notify=None):
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "RUNTIME_DIRECTORY",
                                        "CONFIGURATION_DIRECTORY", "JOURNAL_STREAM"))}
        if notify is not None:
            environ["NOTIFY_SOCKET"] = notify.path
        environ.update(env or {})
        argv = [VMBRIDGED, "--runtime-dir", str(dirs["run"]), "--config-dir", str(dirs["conf"])]
        log = open(dirs["log"], "ab")
        if listen is not None:
            environ.setdefault("LISTEN_FDS", "1")
            cmd = [sys.executable, "-c", ACTIVATE, str(listen.fileno()), *argv]
            proc = subprocess.Popen(cmd, env=environ, pass_fds=(listen.fileno(),),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        else:
            proc = subprocess.Popen([sys.executable, *argv], env=environ,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        proc.log_path = dirs["log"]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def listening_socket(path) -> socket.socket:
    """What vmbridged.socket makes: a listening stream socket, 0600."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    os.chmod(path, 0o600)
    s.listen(16)
    return s


def stop(proc, timeout: float = 30.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"vmbridged still running {timeout}s after SIGTERM\n{read_log(proc)}")


def test_serves_the_socket_passed_by_systemd(dirs, daemon):
    """LISTEN_FDS=1 + LISTEN_FDNAMES=io.vmbridge.Manager: GetInfo and List are answered on fd 3."""
    path = dirs["sockets"] / MANAGER
    listen = listening_socket(path)
    notify = Notifications(str(dirs["notify"]))
    try:
        proc = daemon(listen, env={"LISTEN_FDNAMES": MANAGER}, notify=notify)
        listen.close()  # vmbridged holds the only copy now, as with systemd
        notify.wait_for("READY=1", proc=proc)

        info = varlink_call(str(path), "org.varlink.service.GetInfo")
        assert "error" not in info, info
        params = info["parameters"]
        assert MANAGER in params["interfaces"]
        assert "org.varlink.service" in params["interfaces"]
        assert params["product"] and params["vendor"] and params["version"]

        reply = varlink_call(str(path), f"{MANAGER}.List")
        assert reply.get("parameters") == {"machines": []}, reply

        # It served the passed socket and bound none of its own.
        assert not os.path.exists(dirs["run"] / MANAGER)
        assert stop(proc) == 0, read_log(proc)
        # A socket systemd passed is systemd's: vmbridged never removes it.
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        notify.close()


def test_serves_an_unnamed_passed_socket(dirs, daemon):
    """Without $LISTEN_FDNAMES (older systemd, or a hand-made activation), the one socket is used."""
    path = dirs["sockets"] / "manager"
    listen = listening_socket(path)
    notify = Notifications(str(dirs["notify"]))
    try:
        proc = daemon(listen, notify=notify)
        listen.close()
        notify.wait_for("READY=1", proc=proc)
        assert MANAGER in varlink_call(str(path), "org.varlink.service.GetInfo")["parameters"]["interfaces"]
        assert not os.path.exists(dirs["run"] / MANAGER)
        assert stop(proc) == 0, read_log(proc)
    finally:
        notify.close()


def test_binds_its_own_socket_when_started_by_hand(dirs, daemon):
    """No $LISTEN_FDS: RUNTIME_DIR/io.vmbridge.Manager, 0600 in a 0700 directory, removed at exit."""
    notify = Notifications(str(dirs["notify"]))
    try:
        proc = daemon(notify=notify)
        notify.wait_for("READY=1", proc=proc)
        path = dirs["run"] / MANAGER
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(dirs["run"]).st_mode) == 0o700
        assert MANAGER in varlink_call(str(path), "org.varlink.service.GetInfo")["parameters"]["interfaces"]
        assert stop(proc) == 0, read_log(proc)
        assert not os.path.exists(path)
    finally:
        notify.close()


def test_ignores_sockets_meant_for_another_process(dirs, daemon):
    """$LISTEN_PID names another process: fd 3 is not ours, bind our own socket."""
    path = dirs["sockets"] / MANAGER
    listen = listening_socket(path)
    notify = Notifications(str(dirs["notify"]))
    try:
        proc = daemon(listen, env={"LISTEN_FDNAMES": MANAGER, "TEST_LISTEN_PID": "1"}, notify=notify)
        notify.wait_for("READY=1", proc=proc)
        own = dirs["run"] / MANAGER
        assert stat.S_ISSOCK(os.lstat(own).st_mode)
        assert MANAGER in varlink_call(str(own), "org.varlink.service.GetInfo")["parameters"]["interfaces"]
        assert stop(proc) == 0, read_log(proc)
    finally:
        listen.close()
        notify.close()


def test_notify_ready_status_stopping_in_order(dirs, daemon):
    """READY=1, then STATUS=0 VMs running; on SIGTERM STOPPING=1, last; exit status 0."""
    notify = Notifications(str(dirs["notify"]))
    try:
        proc = daemon(notify=notify)
        notify.wait_for("STATUS=0 VMs running", proc=proc)
        before = notify.assignments()
        assert before.index("READY=1") < before.index("STATUS=0 VMs running"), before
        assert not any(a.startswith("STOPPING") for a in before), before
        # READY=1 comes once the manager socket answers.
        assert varlink_call(str(dirs["run"] / MANAGER), f"{MANAGER}.List")["parameters"] == {"machines": []}

        assert stop(proc) == 0, read_log(proc)
        notify.drain(0.3)
        after = notify.assignments()
        assert after[: len(before)] == before
        stopping = after.index("STOPPING=1")
        assert stopping >= len(before), after
        assert after.count("READY=1") == 1, after
        # Nothing claims readiness or a running count after STOPPING=1.
        assert not any(a == "READY=1" or a.endswith("VMs running") for a in after[stopping:]), after
        assert not any(a.startswith("WATCHDOG") for a in after), "no watchdog without $WATCHDOG_USEC"
    finally:
        notify.close()


def test_watchdog_pings_at_half_the_interval(dirs, daemon):
    """WATCHDOG_USEC=400ms and WATCHDOG_PID=vmbridged: WATCHDOG=1 about every 200 ms."""
    path = dirs["sockets"] / MANAGER
    listen = listening_socket(path)  # the activation wrapper knows vmbridged's pid
    notify = Notifications(str(dirs["notify"]))
    try:
        proc = daemon(listen, env={"LISTEN_FDNAMES": MANAGER, "WATCHDOG_USEC": "400000",
                                   "TEST_WATCHDOG_PID_SELF": "1"}, notify=notify)
        listen.close()
        notify.wait_for("READY=1", proc=proc)
        start = len(notify.assignments())
        notify.drain(1.5)
        pings = notify.assignments()[start:].count("WATCHDOG=1")
        assert 4 <= pings <= 12, f"{pings} WATCHDOG=1 in 1.5 s at a 0.4 s watchdog"
        assert stop(proc) == 0, read_log(proc)
    finally:
        notify.close()


def test_no_watchdog_for_another_pid(dirs, daemon):
    """$WATCHDOG_PID names another process: the watchdog is not ours to ping."""
    notify = Notifications(str(dirs["notify"]))
    try:
        proc = daemon(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, notify=notify)
        notify.wait_for("READY=1", proc=proc)
        notify.drain(0.8)
        assert "WATCHDOG=1" not in notify.assignments()
        assert stop(proc) == 0, read_log(proc)
    finally:
        notify.close()
