"""The small parts of systemd's service protocol vmbridged speaks, in stdlib Python.

- sd_notify: READY=1, STATUS=..., STOPPING=1, WATCHDOG=1 as datagrams to
  ``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with '@').
- Socket activation: descriptors passed from fd 3 on, with ``$LISTEN_PID``,
  ``$LISTEN_FDS`` and ``$LISTEN_FDNAMES`` (sd_listen_fds_with_names()).
- Journal detection: stderr connected to journald (``$JOURNAL_STREAM``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

SD_LISTEN_FDS_START = 3

log = logging.getLogger("vmbridge.daemon")


class Notifier:
    """sd_notify(); silent no-op when not started by systemd with a notify socket."""

    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = None
        self._sock = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as e:
            log.warning("sd_notify(%s) failed: %s", ", ".join(assignments), e)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def listen_fds(unset_environment: bool = True) -> dict[str, list[int]]:
    """The sockets systemd passed us, by name ("unknown" when unnamed)."""
    fds: dict[str, list[int]] = {}
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return fds
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return fds
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if os.environ.get("LISTEN_FDNAMES") else []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        fds.setdefault(name, []).append(fd)
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    return fds


def stderr_is_journal() -> bool:
    """True when stderr is a journald stream (then log lines carry <N> priorities)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class JournalFormatter(logging.Formatter):
    """'<6>vmbridge.machine: demo: running' - journald reads the <N> as the priority."""

    PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


RESTART_JOB_TYPES = ("restart", "try-restart", "reload-or-restart", "reload-or-try-restart")


def unit_from_cgroup(cgroup_text: str) -> tuple[str, bool] | None:
    """(our service unit, whether it runs under a user manager) from /proc/self/cgroup."""
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        parts = [p for p in path.split("/") if p]
        services = [p for p in parts if p.endswith(".service")]
        if services:
            user_manager = any(p.startswith("user@") and p.endswith(".service") for p in parts[:-1])
            return services[-1], user_manager
    return None


def restart_pending(*, cgroup_text: str | None = None, run=None) -> bool:
    """True when systemd is restarting our unit: this stop will be followed by a start.

    `systemctl restart` sends the same SIGTERM as `systemctl stop`; only the
    job systemd is running for our unit tells them apart.
    """
    import subprocess

    if cgroup_text is None:
        if not os.environ.get("INVOCATION_ID"):
            return False  # not started by systemd
        try:
            with open("/proc/self/cgroup") as f:
                cgroup_text = f.read()
        except OSError:
            return False
    found = unit_from_cgroup(cgroup_text)
    if found is None:
        return False
    unit, user_manager = found
    argv = ["systemctl", *(["--user"] if user_manager else []), "list-jobs", "--no-legend", "--full"]
    try:
        out = (run or subprocess.run)(argv, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot ask systemd whether this is a restart: %s", e)
        return False
    for line in out.splitlines():
        fields = line.split()  # JOB UNIT TYPE STATE
        if len(fields) >= 3 and fields[1] == unit and fields[2] in RESTART_JOB_TYPES:
            return True
    return False
