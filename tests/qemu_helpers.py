"""Throw-away QEMUs for the QMP tests, and leak checks.

Every QEMU here is ``-machine none -S``: no guest, no accelerator, a few MB,
started in well under a second, so the suite stays light on a 2-core box.
Each is killed by pid (SIGKILL, then waited for) on every path, fixture
set-up failures included: no QEMU outlives its test.  As a last resort, each
also gets a parent-death signal, for when pytest itself is killed.

The monitor option is chosen by probing the binary, never assumed: a QEMU
that lists ``monitor-qmp`` among its user-creatable objects (``-object
help``) gets ``-object monitor-qmp,...``, otherwise the long-standing
``-mon chardev=...,mode=control``.

Fixtures (a test module gets them with ``pytest_plugins = ["qemu_helpers"]``):
``no_leaks``   fails the test if it left an fd open or a child process behind
``qemu_qmp``   ``(proc, sock)``: QEMU with its monitor on the other end of a
               socketpair; ``sock`` is a stdlib socket the test may hand to a
               QMPClient (which then owns it)
``qemu_client`` a QMPClient on such a QEMU, handshaken; closed afterwards
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import signal
import socket
import subprocess

import gevent
import psutil
import pytest

from vmbridge.qmp import QMPClient

#: Generous bound for anything a healthy QEMU does in these tests.
TIMEOUT = 30

QEMU_BINARY = os.environ.get("VMBRIDGE_QEMU", "qemu-system-x86_64")


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    return path


@functools.lru_cache(maxsize=None)
def monitor_form(binary: str) -> str:
    """``"object"`` if ``binary`` has a monitor-qmp object, else ``"mon"``."""
    objects = subprocess.run([binary, "-object", "help"], capture_output=True,
                             text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    if re.search(r"^\s*monitor-qmp\s*$", objects.stdout, re.MULTILINE):
        return "object"
    usage = subprocess.run([binary, "-help"], capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    if re.search(r"^-mon\b", usage.stdout, re.MULTILINE):
        return "mon"
    raise RuntimeError(f"{binary}: found neither -object monitor-qmp nor -mon")


def qemu_argv(binary: str, chardev: str) -> list[str]:
    """argv for a guest-less QEMU whose QMP monitor is the chardev ``qmp``
    described by ``chardev`` (the part after ``socket,id=qmp,``)."""
    argv = [binary, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-chardev", f"socket,id=qmp,{chardev}"]
    if monitor_form(binary) == "object":
        argv += ["-object", "monitor-qmp,id=mon0,chardev=qmp"]
    else:
        argv += ["-mon", "chardev=qmp,mode=control"]
    return argv


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child: SIGKILL me when the test process dies, even by
    SIGKILL, so a crashed or killed pytest leaves no QEMU behind.  (Tests
    only: vmbridged deliberately lets its VMs outlive it.)"""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _popen(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent, **kwargs)


def kill_qemu(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` by pid unless already reaped, then reap it."""
    if proc.returncode is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=TIMEOUT)


def spawn_qemu_socketpair(binary: str | None = None):
    """Start QEMU on one end of a socketpair; return ``(proc, our_end)``.

    Our end is a plain stdlib socket owned by the caller.  QEMU's end is
    closed here once QEMU has inherited it.
    """
    binary = binary or qemu_binary()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = None
    try:
        proc = _popen(qemu_argv(binary, f"fd={theirs.fileno()}"),
                      pass_fds=[theirs.fileno()])
        return proc, ours
    except BaseException:
        ours.close()
        if proc is not None:
            kill_qemu(proc)
        raise
    finally:
        theirs.close()


def spawn_qemu_unix(path: str, binary: str | None = None) -> subprocess.Popen:
    """Start QEMU listening for QMP on a unix socket at ``path``; return
    once the socket exists."""
    binary = binary or qemu_binary()
    proc = _popen(qemu_argv(binary, f"path={path},server=on,wait=off"))
    try:
        with gevent.Timeout(TIMEOUT):
            while not os.path.exists(path):
                if proc.poll() is not None:
                    raise RuntimeError(f"QEMU exited with {proc.returncode}")
                gevent.sleep(0.01)
        return proc
    except BaseException:
        kill_qemu(proc)
        raise


# -- leak checks ---------------------------------------------------------------

def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own fd, gone already
            pass
    return fds


def child_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.fixture
def no_leaks():
    gevent.get_hub()  # the hub's own fds are not the test's
    fds_before, children_before = open_fds(), child_pids()
    yield
    gevent.sleep(0)  # gevent may defer a socket's close to the next loop turn
    leaked_fds = {fd: target for fd, target in open_fds().items()
                  if fds_before.get(fd) != target}
    leaked_children = child_pids() - children_before
    assert not leaked_fds, f"test left fds open: {leaked_fds}"
    assert not leaked_children, f"test left child processes: {leaked_children}"


@pytest.fixture
def qemu_qmp(no_leaks):
    proc, sock = spawn_qemu_socketpair()
    try:
        yield proc, sock
    finally:
        sock.close()  # a no-op if a QMPClient adopted (detached) it
        kill_qemu(proc)


@pytest.fixture
def qemu_client(qemu_qmp):
    proc, sock = qemu_qmp
    client = QMPClient(sock, name="test-vm")
    try:
        client.handshake(timeout=TIMEOUT)
        yield client
    finally:
        client.close()
