"""A small varlink client on plain stdlib sockets.

It imports nothing heavy (no gevent, no python-varlink), so ``vmctl`` starts
fast. It looks ``socket.socket`` up at connect time, so after
gevent monkey-patching it is cooperative without knowing it.

    with Connection("/run/vmbridge/vm1/control", timeout=10) as c:
        c.call("io.systemd.MachineInstance.Pause")
        for event in c.call_more("io.systemd.MachineInstance.SubscribeEvents",
                                 timeout=None):
            print(event)

Errors: an error reply raises :class:`VarlinkError`; the server hanging up
before a call is fully answered raises :class:`VarlinkDisconnected` (this is
also how a SubscribeEvents stream ends when its machine goes away); an
unreadable reply raises :class:`VarlinkProtocolError`; a timeout raises
``TimeoutError``. After any of these except VarlinkError the connection is
closed, since its state is no longer known.
"""

import array
import socket

from vmbridge.fds import ancillary_space, close_fds, fds_from_ancdata

from . import protocol
from .protocol import VarlinkError

__all__ = ["Connection", "VarlinkError", "VarlinkDisconnected",
           "VarlinkProtocolError", "VarlinkConnectError", "parse_address"]

_DEFAULT = object()     # "use the connection's timeout"
_FDS_ANCILLARY_SIZE = ancillary_space(protocol.FDS_MAX)


class VarlinkDisconnected(ConnectionError):
    """The server closed the connection before the call was fully answered."""


class VarlinkProtocolError(ConnectionError):
    """The server sent something that is not a varlink reply."""


class VarlinkConnectError(OSError):
    """Connecting failed; ``errno`` is the connect() error (ENOENT, EACCES,
    ECONNREFUSED, ...) and ``filename`` the address."""


def parse_address(address):
    """The AF_UNIX address for ``/path``, ``unix:/path`` or ``unix:@abstract``."""
    if address.startswith("unix:"):
        address = address[len("unix:"):]
    elif ":" in address.split("/", 1)[0]:
        raise ValueError("unsupported varlink address %r (only unix:)" % address)
    if not address or any(c in address for c in ";?#"):
        raise ValueError("invalid varlink address %r" % address)
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


class Connection:
    """One client connection. Not for concurrent use by several callers."""

    def __init__(self, address, *, timeout=None, socket_class=None):
        """``socket_class``: e.g. gevent.socket.socket, for cooperative I/O
        without monkey-patching (default: the socket module's)."""
        self.address = address
        self.timeout = timeout
        self._buffer = protocol.MessageBuffer()
        self._received_fds = []      # fds of the reply being read
        self._streaming = False
        self._exact = False          # read no byte past the reply's NUL
        sock = (socket_class or socket.socket)(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(parse_address(address))
        except OSError as e:
            sock.close()
            if isinstance(e, socket.timeout):
                raise
            raise VarlinkConnectError(
                e.errno, "cannot connect to varlink socket: %s" % e.strerror,
                address) from e
        self._sock = sock

    def __repr__(self):
        return "<varlink Connection %s%s>" % (self.address,
                                              "" if self._sock else " closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def closed(self):
        return self._sock is None

    def close(self):
        """Close the socket and any fds received and not handed out. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        close_fds(self._received_fds)
        self._received_fds = []

    # -- calls -------------------------------------------------------------

    def call(self, method, parameters=None, *, fds=(), timeout=_DEFAULT,
             return_fds=False):
        """Call ``method``; returns the reply's parameters ({} when none).

        ``fds`` are sent with the call (the caller keeps its own copies).
        With ``return_fds`` the result is ``(parameters, fds)`` and the
        caller owns the fds that came with the reply; otherwise they are
        closed. An error reply raises VarlinkError.
        """
        self._check_idle()
        self._send(protocol.call_message(method, parameters), fds, timeout)
        reply, reply_fds = self._read_reply(timeout)
        if reply.get("continues"):
            close_fds(reply_fds)
            self.close()
            raise VarlinkProtocolError("reply to %s continues without 'more'" % method)
        parameters = self._result(reply, reply_fds)
        if return_fds:
            return parameters, reply_fds
        close_fds(reply_fds)
        return parameters

    def call_more(self, method, parameters=None, *, timeout=_DEFAULT):
        """Call with ``more``; returns an iterator of replies' parameters.

        The call is sent at once; the iterator yields each reply and ends
        after the one without ``continues``. An error reply raises
        VarlinkError; the server hanging up mid-stream raises
        VarlinkDisconnected. ``timeout`` bounds the wait for each reply
        (None: wait forever). Abandoning the iterator early closes the
        connection: that is how a varlink client cancels a stream.
        """
        self._check_idle()
        self._send(protocol.call_message(method, parameters, more=True), (), timeout)
        self._streaming = True
        return self._replies(method, timeout)

    def _replies(self, method, timeout):
        finished = False
        try:
            while True:
                reply, fds = self._read_reply(timeout)
                close_fds(fds)
                continues = reply.get("continues", False)
                if "error" in reply or not continues:
                    # The call is over: the connection is free for the next
                    # one even if the caller never resumes this iterator.
                    finished = True
                    self._streaming = False
                parameters = self._result(reply, [])
                yield parameters
                if not continues:
                    return
        finally:
            if not finished:
                self._streaming = False
                self.close()

    def call_oneway(self, method, parameters=None, *, fds=()):
        """Send a call that gets no reply."""
        self._check_idle()
        self._send(protocol.call_message(method, parameters, oneway=True), fds,
                   _DEFAULT)

    def call_upgrade(self, method, parameters=None, *, timeout=_DEFAULT,
                     return_reply=False):
        """Call with ``upgrade``; on success returns ``(sock, pending)``.

        ``sock`` is the connected socket, now the caller's (blocking, no
        timeout), and ``pending`` the bytes already read past the reply. The
        reply is read without reading past its NUL (as sd-varlink does), so
        ``pending`` is empty and the socket can go as it is to a library that
        speaks the upgraded protocol (e.g. qemu.qmp after AcquireQMP). The
        connection itself is closed. With ``return_reply`` the result is
        ``(sock, pending, parameters)``, the reply's parameters too. An error
        reply raises VarlinkError and leaves the connection usable.
        """
        self._check_idle()
        self._send(protocol.call_message(method, parameters, upgrade=True), (),
                   timeout)
        self._exact = True
        try:
            reply, fds = self._read_reply(timeout)
        finally:
            self._exact = False
        close_fds(fds)
        if reply.get("continues"):
            self.close()
            raise VarlinkProtocolError("reply to %s continues" % method)
        parameters = self._result(reply, [])
        sock, self._sock = self._sock, None
        pending = self._buffer.take_rest()
        self.close()
        sock.settimeout(None)
        if return_reply:
            return sock, pending, parameters
        return sock, pending

    # -- internals -----------------------------------------------------------

    def _check_idle(self):
        if self._sock is None:
            raise VarlinkDisconnected("varlink connection to %s is closed" % self.address)
        if self._streaming:
            raise RuntimeError("a 'more' call is still streaming on this connection")

    def _timeout(self, timeout):
        self._sock.settimeout(self.timeout if timeout is _DEFAULT else timeout)

    def _send(self, message, fds, timeout):
        data = protocol.encode_message(message)
        try:
            self._timeout(timeout)
            if fds:
                sent = self._sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", fds))])
                data = data[sent:]
            self._sock.sendall(data)
        except socket.timeout:
            self.close()
            raise TimeoutError("varlink: timed out sending to %s" % self.address)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.close()
            raise VarlinkDisconnected("varlink: %s hung up: %s" % (self.address, e)) from e

    def _read_reply(self, timeout):
        """(reply dict, fds that came with it)."""
        raw = self._read_message(timeout)
        fds, self._received_fds = self._received_fds, []
        try:
            reply = protocol.decode_message(raw)
            _check_reply(reply)
        except ValueError as e:
            close_fds(fds)
            self.close()
            raise VarlinkProtocolError("varlink: bad reply from %s: %s"
                                       % (self.address, e)) from None
        return reply, fds

    def _read_message(self, timeout):
        while True:
            raw = self._buffer.next_message()
            if raw is not None:
                return raw
            if len(self._buffer) >= protocol.BUFFER_MAX:
                self.close()
                raise VarlinkProtocolError("varlink: reply from %s exceeds %d bytes"
                                           % (self.address, protocol.BUFFER_MAX))
            try:
                self._timeout(timeout)
                size = protocol.READ_SIZE
                if self._exact:
                    # Peek, then take only up to the NUL: what follows belongs
                    # to the protocol the connection is upgraded to.
                    peeked = self._sock.recv(protocol.READ_SIZE, socket.MSG_PEEK)
                    end = peeked.find(b"\0")
                    size = end + 1 if end >= 0 else max(len(peeked), 1)
                data, ancdata, flags, _ = self._sock.recvmsg(
                    size, _FDS_ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
            except socket.timeout:
                self.close()
                raise TimeoutError("varlink: timed out waiting for %s" % self.address)
            except ConnectionResetError as e:
                self.close()
                raise VarlinkDisconnected("varlink: %s hung up: %s" % (self.address, e)) from e
            self._received_fds.extend(fds_from_ancdata(ancdata))
            if not data:
                self.close()
                raise VarlinkDisconnected("varlink: %s closed the connection" % self.address)
            self._buffer.append(data)

    @staticmethod
    def _result(reply, fds):
        if "error" in reply:
            close_fds(fds)
            raise VarlinkError(reply["error"], reply.get("parameters"))
        return reply.get("parameters") or {}


def _check_reply(reply):
    # The shape sd-varlink accepts; unknown keys are ignored for forward
    # compatibility.
    error = reply.get("error")
    if error is not None and not isinstance(error, str):
        raise ValueError("error is not a string")
    if "error" in reply and error is None:
        del reply["error"]
    parameters = reply.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ValueError("parameters is not an object")
    if not isinstance(reply.get("continues", False), bool):
        raise ValueError("continues is not a boolean")
    if error is not None and reply.get("continues"):
        raise ValueError("an error reply cannot continue")

