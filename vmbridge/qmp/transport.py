"""The socket-facing lower half of the QMP client: framing and fd passing.

QMP is newline-delimited JSON over a stream socket.  QEMU writes each message
as one line ending in ``\\r\\n`` and accepts one JSON object per line (it
actually runs a streaming JSON parser, so the newline we send is only a
courtesy; it is the object boundary that counts).

File descriptors travel as ``SCM_RIGHTS`` ancillary data.  QEMU's socket
chardev collects the fds that arrive with the bytes of a command and offers
them to that command (``getfd``, ``add-fd``).  Ancillary data is attached to
the first byte written by the ``sendmsg`` that carries it, so the fds go on
the first ``sendmsg`` of the command's bytes and any remainder of a partial
write follows with plain ``send``.  The kernel duplicates the fds into QEMU;
the sender keeps its own copies and the duty to close them.

Ownership: a :class:`Transport` owns its socket from construction on and
closes it in :meth:`Transport.close` (idempotent).  It never closes the fds it
is asked to send.

Concurrency: only the pump greenlet calls :meth:`read_line`; any greenlet may
call :meth:`send`, which holds a lock for the whole message so two commands
never interleave their bytes.
"""

from __future__ import annotations

import array
import socket

import gevent.lock
import gevent.socket

from .errors import QMPProtocolError

#: How much to ask the kernel for per read.  Large enough that a 200 KB
#: query-qmp-schema reply takes a handful of reads, small enough to not
#: matter per connection.
RECV_SIZE = 256 * 1024

#: How many leading bytes of bad input end up in error messages and logs.
EXCERPT_SIZE = 80


class SendProgress:
    """How far one :meth:`Transport.send` got; inspected when it fails.

    ``fds_sent`` becomes True as soon as the ``sendmsg`` carrying the fds
    has written at least one byte: from then on QEMU holds duplicates.
    ``bytes_sent`` between 0 and ``total`` exclusive means the peer holds
    half a command and the stream can no longer be used.
    """

    __slots__ = ("total", "bytes_sent", "fds_sent")

    def __init__(self):
        self.total = 0
        self.bytes_sent = 0
        self.fds_sent = False

    @property
    def partial(self) -> bool:
        return 0 < self.bytes_sent < self.total


class UnexpectedEOF(Exception):
    """The peer closed the stream in the middle of a message."""


def adopt_socket(sock) -> gevent.socket.socket:
    """Return a cooperative socket object that owns ``sock``'s fd.

    A stdlib socket is detached (the caller's object is left closed, with
    fileno -1, so its ``close()`` is harmless) and its fd rewrapped in a
    :class:`gevent.socket.socket`, which blocks only the calling greenlet.
    A gevent socket (also what ``socket.socket`` is after monkey-patching)
    is used as is.  Raises TypeError, without taking ownership, for
    anything else.
    """
    if isinstance(sock, gevent.socket.socket):
        adopted = sock
    elif isinstance(sock, socket.socket):
        adopted = gevent.socket.socket(sock.family, sock.type, sock.proto,
                                       fileno=sock.detach())
    else:
        raise TypeError(f"expected a socket, got {type(sock).__name__}")
    # Blocking from the greenlet's point of view: timeouts are applied by the
    # client around whole operations, never per socket call.
    adopted.settimeout(None)
    return adopted


class Transport:
    """Line framing over one owned stream socket (see the module docstring)."""

    def __init__(self, sock, max_message_size: int):
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        self.sock = adopt_socket(sock)
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        # Bytes of _buffer already searched for b"\n": each byte is scanned
        # once however many reads a long line takes (no quadratic rescans).
        self._scanned = 0
        self._send_lock = gevent.lock.Semaphore()
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def read_line(self) -> bytes | None:
        """Return the next line without its ``\\n`` (may end in ``\\r``), or
        None at a clean EOF (between messages).

        Blocks only the calling greenlet.  Raises :class:`QMPProtocolError`
        for a line longer than ``max_message_size`` (memory stays bounded by
        that plus one read), :class:`UnexpectedEOF` for EOF inside a line,
        OSError for socket errors.
        """
        buffer = self._buffer
        while True:
            newline = buffer.find(b"\n", self._scanned)
            if newline >= 0:
                if newline > self.max_message_size:
                    raise self._oversized()
                line = bytes(buffer[:newline])
                # Deleting a bytearray's head is O(1) amortised in CPython
                # (it moves the start offset), so leftover lines are cheap.
                del buffer[:newline + 1]
                self._scanned = 0
                return line
            self._scanned = len(buffer)
            if len(buffer) > self.max_message_size:
                raise self._oversized()
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                if buffer.strip():
                    raise UnexpectedEOF(
                        f"EOF after {len(buffer)} bytes of an unfinished message: "
                        f"{bytes(buffer[:EXCERPT_SIZE])!r}")
                return None
            if not buffer:
                # Common case: the read holds exactly one whole message.
                if chunk.endswith(b"\n") and chunk.find(b"\n") == len(chunk) - 1:
                    if len(chunk) - 1 > self.max_message_size:
                        buffer += chunk
                        raise self._oversized()
                    return chunk[:-1]
            buffer += chunk

    def _oversized(self) -> QMPProtocolError:
        excerpt = bytes(self._buffer[:EXCERPT_SIZE])
        self._buffer.clear()  # release the memory now, not when the client dies
        self._scanned = 0
        return QMPProtocolError(
            f"message longer than max_message_size ({self.max_message_size} bytes)",
            excerpt=excerpt)

    def send(self, data: bytes, fds=(), progress: SendProgress | None = None) -> None:
        """Write ``data`` completely, with ``fds`` as SCM_RIGHTS on its first
        byte.  Blocks only the calling greenlet, and other senders until done.

        On failure (OSError, or a gevent Timeout/kill interrupting the wait)
        ``progress`` says how far it got; the exception propagates.
        """
        if progress is None:
            progress = SendProgress()
        progress.total = len(data)
        with self._send_lock:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", fds))]
                sent = 0
                while not sent:
                    # gevent's sendmsg returns 0 if the socket was still not
                    # writable after one wait; nothing (fds included) left.
                    sent = self.sock.sendmsg([data], ancillary)
                progress.fds_sent = True
            else:
                sent = self.sock.send(data)
            progress.bytes_sent = sent
            if sent < progress.total:  # a partial write: send the rest
                view = memoryview(data)
                while progress.bytes_sent < progress.total:
                    progress.bytes_sent += self.sock.send(view[progress.bytes_sent:])

    def close(self) -> None:
        """Close the socket (idempotent).  A greenlet blocked on it gets an
        OSError from gevent."""
        if not self.closed:
            self.closed = True
            self._buffer = bytearray()
            self.sock.close()
