"""A VM's serial console, owned by vmbridged.

QEMU's serial port is a socket chardev on one end of a socketpair; vmbridged
holds the other end and reads it continuously in one greenlet (so a guest
never blocks on a full console), keeps a bounded ring buffer of recent
output, appends everything to ``console.log`` in the VM's directory (rotated
at a size limit, one old file kept as ``console.log.1``) and copies it to the
attached viewers.

Viewers (see :class:`ConsoleViewer`) each have a bounded buffer of their own
that the reader only ever appends to; the viewer's owner drains it from its
own greenlet. A viewer that falls behind by more than its buffer holds
*loses the oldest pending output*, and reads a notice saying how much in its
place: it is never disconnected for being slow, and nothing it does (or
fails to do) slows the reader, the guest or the other viewers. The log file
always has everything.

Any number of viewers may watch; at most one of them is the *writer* whose
input reaches the guest (:meth:`Console.send`). A second writer is refused
(:class:`WriterPresent`) unless it forces its way in, which closes the old
writer with a notice.

vmbridged's own messages to a viewer are written into its byte stream as
lines of their own: ``\\r\\n[vmbridged: ...]\\r\\n``.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket

import gevent
import gevent.event
import gevent.lock
import gevent.socket

log = logging.getLogger("vmbridge.machine")

RING_SIZE = 64 * 1024          # recent output kept in memory (replay on attach)
LOG_LIMIT = 4 * 1024 * 1024    # console.log rotates to console.log.1 past this
VIEWER_BUFFER = 256 * 1024     # output one viewer may fall behind by before losing some
TAIL_MAX = 1024 * 1024         # the most Console.tail() reads back

# Terminal queries a guest may have printed (DSR ``ESC[6n``, DA ``ESC[c``, ...).
# Live, the viewer's terminal answers them into the guest, as the guest wants;
# in a replay nobody is waiting for the answer, so they are taken out.
_TERMINAL_QUERY = re.compile(rb"\x1b\[[0-9;?>=]*[nc]")


class ConsoleError(Exception):
    """Attaching to the console failed."""


class ConsoleClosed(ConsoleError):
    """The console is not connected (the VM has none, or it has gone away)."""


class WriterPresent(ConsoleError):
    """Another viewer is the console's writer (and force was not given)."""

    def __init__(self, writer: "ConsoleViewer"):
        super().__init__(f"the console already has a writer ({writer.owner or 'unknown'})")
        self.writer = writer


def notice(text: str) -> bytes:
    """vmbridged's own line in a viewer's stream."""
    return f"\r\n[vmbridged: {text}]\r\n".encode()


class ConsoleViewer:
    """One attached viewer: a bounded buffer the reader appends to, drained by its owner.

    :meth:`write` is called by the console's reader and never blocks; the
    owner calls :meth:`get` from its own greenlet. Past ``limit`` pending
    bytes the oldest are discarded and :meth:`get` returns a notice of how
    many in their place.
    """

    def __init__(self, *, read_only: bool, limit: int = VIEWER_BUFFER, owner: str | None = None,
                 pid: int | None = None):
        self.read_only = read_only
        self.limit = limit
        self.owner = owner          # for messages: "pid=123 uid=0"
        self.pid = pid
        self.closed = False
        self.close_reason: str | None = None
        self.skipped_total = 0      # bytes this viewer lost by falling behind, ever
        self.on_close = None        # called once, when the viewer is closed
        self._chunks: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._skipped = 0           # lost since the last get()
        self._ready = gevent.event.Event()

    def __repr__(self):
        return f"<ConsoleViewer {'ro' if self.read_only else 'rw'} {self.owner}{' closed' if self.closed else ''}>"

    @property
    def pending(self) -> int:
        return self._pending

    def write(self, data: bytes) -> None:
        """Queue output (the reader calls this): never blocks, never grows past `limit`."""
        if self.closed or not data:
            return
        if len(data) > self.limit:
            self._skip(len(data) - self.limit)
            data = data[-self.limit:]
        self._chunks.append(data)
        self._pending += len(data)
        excess = self._pending - self.limit
        while excess > 0:
            first = self._chunks[0]
            if len(first) <= excess:
                self._chunks.popleft()
                cut = len(first)
            else:
                self._chunks[0] = first[excess:]
                cut = excess
            self._pending -= cut
            self._skip(cut)
            excess -= cut
        self._ready.set()

    def _skip(self, count: int) -> None:
        self._skipped += count
        self.skipped_total += count

    def get(self, timeout: float | None = None) -> bytes | None:
        """All pending output at once (led by a notice if some was lost).

        Blocks until there is some; b"" once the viewer is closed and drained;
        None if `timeout` passed first.
        """
        while not self._chunks and not self._skipped:
            if self.closed:
                return b""
            self._ready.clear()
            if not self._ready.wait(timeout):
                return None
        parts = []
        if self._skipped:
            parts.append(notice(f"{self._skipped} bytes of console output skipped: this viewer fell behind"))
            self._skipped = 0
        parts.extend(self._chunks)
        self._chunks.clear()
        self._pending = 0
        return b"".join(parts)

    def close(self, reason: str | None = None, *, discard: bool = False) -> None:
        """End this viewer. Pending output (and `reason`, as a notice) is still
        there for get(), unless `discard`. Idempotent."""
        if self.closed:
            return
        if discard:
            self._chunks.clear()
            self._pending = self._skipped = 0
        if reason:
            # Past the limit on purpose: it is the last thing this viewer reads.
            self._chunks.append(notice(reason))
            self._pending += len(self._chunks[-1])
        self.close_reason = reason
        self.closed = True
        self._ready.set()
        callback, self.on_close = self.on_close, None
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("console viewer close callback failed")


def last_lines(data: bytes, count: int) -> tuple[bytes, bool]:
    """The last `count` lines of `data`, as ``tail -n`` counts them (a last
    line without its newline is a line), and whether there were that many."""
    if count <= 0:
        return b"", True
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for found in range(count):
        newline = data.rfind(b"\n", 0, pos)
        if newline < 0:     # data[:pos] is the first line: was it the last one wanted?
            return data, pos > 0 and found == count - 1
        pos = newline
    return data[pos + 1:], True


def _read_tail(path: str, count: int) -> bytes:
    """Up to the last `count` bytes of the file at `path` (b"" if there is none)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - count))
            return f.read(count)
    except FileNotFoundError:
        return b""


class Console:
    def __init__(self, directory: str, name: str, *, ring_size: int = RING_SIZE,
                 log_limit: int = LOG_LIMIT, viewer_buffer: int = VIEWER_BUFFER):
        self.name = name
        self.log_path = os.path.join(directory, "console.log")
        self._ring: collections.deque[bytes] = collections.deque()
        self._ring_bytes = 0
        self._ring_size = ring_size
        self._ring_cut = False       # the ring starts mid-stream (older output was dropped)
        self._log_limit = log_limit
        self._log_fd = -1
        self._log_size = 0
        self._viewer_buffer = viewer_buffer
        self._sock = None
        self._reader = None
        self._send_lock = gevent.lock.Semaphore()
        self.closed = False
        self.viewers: list[ConsoleViewer] = []
        self.writer: ConsoleViewer | None = None

    # ------------------------------------------------------------ plumbing

    def open(self, *, resume: bool = False) -> socket.socket:
        """Create the socketpair; returns QEMU's end (the caller passes it and closes it).

        `resume` (a restarted vmbridged taking over a running VM): the ring
        buffer starts with the end of the existing log, so a replay shows
        what the guest printed before the restart.
        """
        ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = gevent.socket.socket(fileno=ours.detach())
        self._open_log()
        if resume:
            self._restore_ring()
        return qemus

    def attach_socket(self, sock: socket.socket, *, resume: bool = True) -> None:
        """Adopt an already-connected console socket."""
        self._sock = gevent.socket.socket(fileno=sock.detach())
        self._open_log()
        if resume:
            self._restore_ring()

    def _open_log(self) -> None:
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._log_size = os.fstat(self._log_fd).st_size

    def _restore_ring(self) -> None:
        try:
            data = self._read_log(self._ring_size)
        except OSError as e:
            log.warning("%s: cannot read back the console log: %s", self.name, e)
            return
        if data:
            self._ring.append(data)
            self._ring_bytes = len(data)
            # Unless it is all of console.log, it may start mid-line.
            self._ring_cut = len(data) >= self._ring_size or os.path.exists(self.log_path + ".1")

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
                log.debug("%s: QEMU closed the console", self.name)
                return
            self._record(data)

    def _record(self, data: bytes) -> None:
        self._ring.append(data)
        self._ring_bytes += len(data)
        while self._ring_bytes - len(self._ring[0]) >= self._ring_size:
            self._ring_bytes -= len(self._ring.popleft())
            self._ring_cut = True
        self._append_log(data)
        for viewer in self.viewers:
            viewer.write(data)      # never blocks

    def _append_log(self, data: bytes) -> None:
        if self._log_fd < 0:
            return
        view = memoryview(data)
        try:
            while view:     # the files never pass the limit: a big read is split across them
                if self._log_size >= self._log_limit:
                    self._rotate()
                written = os.write(self._log_fd, view[:self._log_limit - self._log_size])
                self._log_size += written
                view = view[written:]
        except OSError as e:  # a full disk must not take the VM down
            log.warning("%s: console log write failed: %s", self.name, e)

    def _rotate(self) -> None:
        os.close(self._log_fd)
        self._log_fd = -1
        os.replace(self.log_path, self.log_path + ".1")
        self._open_log()

    # ----------------------------------------------------------- reading back

    def recent(self) -> bytes:
        """The ring buffer: the most recent output (up to ring_size bytes)."""
        data = b"".join(self._ring)
        return data[-self._ring_size:]

    def replay(self, lines: int | None = None) -> bytes:
        """What a new viewer is shown first: the last `lines` lines of the ring
        (None: all of its whole lines), without terminal queries."""
        data = self.recent()
        if self._ring_cut or len(data) < self._ring_bytes:
            newline = data.find(b"\n")      # don't start mid-line (or mid-escape)
            data = data[newline + 1:] if newline >= 0 else b""
        if lines is not None:
            data = last_lines(data, lines)[0]
        return _TERMINAL_QUERY.sub(b"", data)

    def _read_log(self, limit: int) -> bytes:
        """The last `limit` bytes of output from console.log, and console.log.1 before it."""
        data = _read_tail(self.log_path, limit)
        if len(data) < limit:
            data = _read_tail(self.log_path + ".1", limit - len(data)) + data
        return data

    def tail(self, lines: int, *, limit: int = TAIL_MAX) -> bytes:
        """The last `lines` lines of output (at most `limit` bytes), from the
        log files (all the output they hold), else from the ring buffer."""
        try:
            data = self._read_log(limit)
        except OSError as e:
            log.warning("%s: cannot read the console log: %s", self.name, e)
            data = b""
        if not data:
            data = self.recent()
        if len(data) >= limit:
            # Cut at `limit`: the first line may be partial, leave it out.
            data = data[data.find(b"\n") + 1:]
        return last_lines(data, lines)[0]

    # ---------------------------------------------------------------- viewers

    def attach(self, *, read_only: bool = False, force: bool = False, replay_lines: int | None = None,
               owner: str | None = None, pid: int | None = None) -> ConsoleViewer:
        """A new viewer, its buffer primed with the replay.

        A writer (not `read_only`) when there is one already raises
        WriterPresent, unless `force`: then the old writer is closed (told so
        in its stream) and the new one takes its place.
        """
        if self.closed or self._sock is None:
            raise ConsoleClosed(f"{self.name}: the console is not connected")
        old = self.writer
        if not read_only and old is not None:
            if not force:
                raise WriterPresent(old)
            log.info("%s: console writer %s taken over by %s", self.name, old.owner, owner)
            old.close(f"another writer ({owner or 'unknown'}) took over the console")
            self.detach(old)
        viewer = ConsoleViewer(read_only=read_only, limit=self._viewer_buffer, owner=owner, pid=pid)
        viewer.write(self.replay(replay_lines))
        self.viewers.append(viewer)
        if not read_only:
            self.writer = viewer
        log.info("%s: console %s attached (%s)", self.name, "viewer" if read_only else "writer", owner)
        return viewer

    def detach(self, viewer: ConsoleViewer, reason: str | None = None) -> None:
        """Remove `viewer` (closing it); idempotent."""
        viewer.close(reason)
        if viewer in self.viewers:
            self.viewers.remove(viewer)
            log.info("%s: console %s detached (%s)", self.name,
                     "viewer" if viewer.read_only else "writer", viewer.owner)
        if self.writer is viewer:
            self.writer = None

    def send(self, data: bytes, viewer: ConsoleViewer | None = None) -> bool:
        """Type into the guest; blocks (only the caller) while QEMU does not read.

        With `viewer`, only if it is (still) the writer: returns False otherwise.
        """
        with self._send_lock:   # one sendall at a time: input from two writers never interleaves
            if viewer is not None and self.writer is not viewer:
                return False
            if self._sock is None:
                raise ConsoleClosed(f"{self.name}: the console is not connected")
            self._sock.sendall(data)
            return True

    def close(self, reason: str | None = "the VM's console was closed") -> None:
        """Stop reading, close the socket and the log; every viewer is closed
        with `reason` as its last line."""
        self.closed = True
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
            self.detach(viewer, reason)
