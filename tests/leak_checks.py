"""Leak checks on a vmbridged subprocess (psutil): its children and its fd count.

gevent (25.8.1 and later, with monkey-patching) defers ``os.close`` of anything but a
regular file - e.g. the directory fd of ``shutil.rmtree`` - to the event loop's next
iteration. An idle daemon may so show an fd more until something wakes its loop, so
the checks below poke it (a GetInfo call) before each count.
"""

from __future__ import annotations

import os
import time

import psutil

from conftest import raw_call


def poke(daemon) -> None:
    """One round trip on the manager socket: the daemon's loop runs its deferred closes."""
    raw_call(daemon.manager_socket, {"method": "org.varlink.service.GetInfo", "parameters": {}})
    time.sleep(0.05)


def stable_fd_count(daemon, timeout: float = 10.0) -> int:
    """The daemon's fd count once it has no children and the count held for 0.3 s."""
    proc = psutil.Process(daemon.proc.pid)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        poke(daemon)
        count = proc.num_fds() if not proc.children(recursive=True) else None
        if count is not None and count == last:
            return count
        last = count
        time.sleep(0.3)
    raise AssertionError("the daemon's fd count did not settle")


def settle(daemon, baseline: int, timeout: float = 10.0):
    """Wait until the daemon has no children and `baseline` fds; returns (child pids, fd count)."""
    proc = psutil.Process(daemon.proc.pid)
    deadline = time.monotonic() + timeout
    while True:
        poke(daemon)
        children = proc.children(recursive=True)
        fds = proc.num_fds()
        if (not children and fds == baseline) or time.monotonic() > deadline:
            return [c.pid for c in children], fds
        time.sleep(0.05)


def fd_table(daemon) -> dict[int, str]:
    """The daemon's open fds and what they point at (for assertion messages)."""
    out = {}
    for fd in psutil.Process(daemon.proc.pid).open_files():
        out[fd.fd] = fd.path
    base = f"/proc/{daemon.proc.pid}/fd"
    for name in os.listdir(base):
        try:
            out.setdefault(int(name), os.readlink(f"{base}/{name}"))
        except OSError:
            pass
    return dict(sorted(out.items()))


def warm_up(daemon) -> int:
    """Start and end one throw-away VM (the daemon opens a few fds for good with its first
    QEMU: gevent's child watcher...), then return the settled fd count."""
    daemon.create("warm")
    assert daemon.call("Terminate", {"name": "warm"}) == {}
    return stable_fd_count(daemon)
