"""The QEMU process of one VM: launched by vmbridged, or adopted after a restart.

Nothing ties QEMU's life to the daemon's: it runs in its own session (so a
signal to the daemon's process group does not reach it) with no parent-death
signal. A child is reaped through gevent's SIGCHLD watcher, which gives its
exit status; a QEMU adopted by a restarted daemon is not our child, so its
end is seen through a pidfd (exit status unknown).

Exit callbacks run in a fresh greenlet, never in the hub.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

import gevent
import gevent.event
import gevent.subprocess
import psutil

log = logging.getLogger("vmbridge.machine")


@dataclasses.dataclass(frozen=True)
class ExitInfo:
    status: int | None = None  # exit code, when QEMU exited by itself
    signal: int | None = None  # the signal that ended it
    adopted: bool = False      # not our child: status unknown

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        if self.status is not None:
            return f"exited with status {self.status}"
        return "exited"

    def to_dict(self) -> dict:
        out = {}
        if self.status is not None:
            out["exitStatus"] = self.status
        if self.signal is not None:
            out["signal"] = signal.Signals(self.signal).name
        return out


def log_tail(path: str, lines: int = 3, max_bytes: int = 4096) -> str:
    """The last lines a process wrote to its log, on one line ("" if none): its own last complaint."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def process_start_time(pid: int) -> float | None:
    """The process's start time (to tell a reused pid from the QEMU we knew)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class QemuProcess:
    """Common part: pid, start time, one-shot exit notification."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start_time = process_start_time(pid)
        self.exit_info: ExitInfo | None = None
        self._exited = gevent.event.Event()
        self._callbacks = []

    @property
    def exited(self) -> bool:
        return self.exit_info is not None

    def on_exit(self, callback) -> None:
        """callback(ExitInfo), once, in its own greenlet (at once if already exited)."""
        if self.exit_info is not None:
            gevent.spawn(callback, self.exit_info)
        else:
            self._callbacks.append(callback)

    def _set_exited(self, info: ExitInfo) -> None:
        if self.exit_info is not None:
            return
        self.exit_info = info
        self._exited.set()
        for callback in self._callbacks:
            gevent.spawn(callback, info)
        self._callbacks.clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the process is gone; True if it is."""
        return self._exited.wait(timeout)

    def send_signal(self, sig: int) -> None:
        if self.exit_info is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, timeout: float = 10.0) -> bool:
        """SIGKILL and wait for the end."""
        self.send_signal(signal.SIGKILL)
        return self.wait(timeout)


class ChildProcess(QemuProcess):
    """A QEMU that vmbridged started."""

    def __init__(self, argv: list[str], *, pass_fds, stderr_fd: int, env=None):
        self._popen = gevent.subprocess.Popen(
            argv,
            pass_fds=tuple(pass_fds),
            stdin=gevent.subprocess.DEVNULL,
            stdout=stderr_fd,
            stderr=stderr_fd,
            start_new_session=True,  # own session and process group: outlives the daemon
            close_fds=True,
            env=env,
        )
        super().__init__(self._popen.pid)
        self._popen.result.rawlink(self._on_result)

    def _on_result(self, _result) -> None:
        code = self._popen.returncode
        info = ExitInfo(signal=-code) if code < 0 else ExitInfo(status=code)
        self._set_exited(info)


class AdoptedProcess(QemuProcess):
    """A QEMU left running by an earlier vmbridged, watched through a pidfd."""

    def __init__(self, pid: int, expected_start_time: float):
        super().__init__(pid)
        if self.start_time is None or abs(self.start_time - expected_start_time) > 1.0:
            raise ProcessLookupError(f"pid {pid} is gone or now belongs to another process")
        self._pidfd = os.pidfd_open(pid)
        self._watcher = gevent.get_hub().loop.io(self._pidfd, 1)
        self._watcher.start(self._on_readable)

    def _on_readable(self) -> None:
        self.close()
        self._set_exited(ExitInfo(adopted=True))

    def close(self) -> None:
        """Stop watching (idempotent); the process itself is left alone."""
        if self._pidfd >= 0:
            self._watcher.stop()
            self._watcher.close()
            os.close(self._pidfd)
            self._pidfd = -1
