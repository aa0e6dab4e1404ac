"""A VM's serial console, owned by vmbridged.

QEMU's serial port is a socket chardev on one end of a socketpair; vmbridged
holds the other end and reads it continuously (so a guest never blocks on a
full console), keeps a bounded ring buffer of recent output, appends
everything to ``console.log`` in the VM's directory (rotated at a size limit,
one old file kept as ``console.log.1``) and copies it to any attached viewers.
"""

from __future__ import annotations

import collections
import logging
import os
import socket

import gevent
import gevent.socket

log = logging.getLogger("vmbridge.machine")

RING_SIZE = 64 * 1024
LOG_LIMIT = 4 * 1024 * 1024


class ConsoleViewer:
    """An attached viewer: a callback for output, called from the console's reader.

    `write` must not block (it runs in the reader greenlet); a viewer that
    cannot keep up drops itself (see the console varlink service).
    """

    def __init__(self, write, *, on_detach=None):
        self.write = write
        self.on_detach = on_detach


class Console:
    def __init__(self, directory: str, name: str, *, ring_size=RING_SIZE, log_limit=LOG_LIMIT):
        self.name = name
        self.log_path = os.path.join(directory, "console.log")
        self._ring = collections.deque()
        self._ring_bytes = 0
        self._ring_size = ring_size
        self._log_limit = log_limit
        self._log_fd = -1
        self._log_size = 0
        self._sock = None
        self._reader = None
        self.viewers: list[ConsoleViewer] = []
        self.writer: ConsoleViewer | None = None

    def open(self) -> socket.socket:
        """Create the socketpair; returns QEMU's end (the caller passes it and closes it)."""
        ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = gevent.socket.socket(fileno=ours.detach())
        self._open_log()
        return qemus

    def attach_socket(self, sock: socket.socket) -> None:
        """Adopt an already-connected console socket (after a daemon restart)."""
        self._sock = gevent.socket.socket(fileno=sock.detach())
        self._open_log()

    def _open_log(self) -> None:
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._log_size = os.fstat(self._log_fd).st_size

    def start(self) -> None:
        self._reader = gevent.spawn(self._read_loop)
        self._reader.name = f"console:{self.name}"

    def _read_loop(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError as e:
                log.debug("%s: console read ended: %s", self.name, e)
                return
            if not data:
                return
            self._record(data)

    def _record(self, data: bytes) -> None:
        self._ring.append(data)
        self._ring_bytes += len(data)
        while self._ring_bytes - len(self._ring[0]) >= self._ring_size:
            self._ring_bytes -= len(self._ring.popleft())
        self._append_log(data)
        for viewer in tuple(self.viewers):
            viewer.write(data)

    def _append_log(self, data: bytes) -> None:
        if self._log_fd < 0:
            return
        try:
            if self._log_size + len(data) > self._log_limit:
                self._rotate()
            os.write(self._log_fd, data)
            self._log_size += len(data)
        except OSError as e:  # a full disk must not take the VM down
            log.warning("%s: console log write failed: %s", self.name, e)

    def _rotate(self) -> None:
        os.close(self._log_fd)
        os.replace(self.log_path, self.log_path + ".1")
        self._log_fd = -1
        self._open_log()

    def recent(self) -> bytes:
        """The ring buffer: the most recent output (up to ring_size bytes)."""
        data = b"".join(self._ring)
        return data[-self._ring_size:]

    def send(self, data: bytes) -> None:
        """Type into the guest."""
        if self._sock is None:
            raise OSError("console is closed")
        self._sock.sendall(data)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.kill(block=False)
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        for viewer in tuple(self.viewers):
            if viewer.on_detach is not None:
                viewer.on_detach()
        self.viewers.clear()
