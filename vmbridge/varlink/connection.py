"""One server-side varlink connection and its greenlet (see server.py)."""

import array
import collections
import errno
import logging
import socket as _socket
import struct
from collections.abc import Iterator, Mapping

import gevent

from vmbridge.fds import ancillary_space, close_fds, fds_from_ancdata

from . import protocol
from .protocol import VarlinkError
from .service import Call, SharedReply, Upgrade, errno_error

log = logging.getLogger("vmbridge.varlink")

_UCRED = struct.Struct("3i")
_FDS_ANCILLARY_SIZE = ancillary_space(protocol.FDS_MAX)
_CALL_FLAGS = ("more", "oneway", "upgrade")

PeerCredentials = collections.namedtuple("PeerCredentials", "pid uid gid")


class ConnectionClosed(GeneratorExit):
    """Thrown into a connection's greenlet to end it (peer gone, close(), stop()).

    A GeneratorExit, so a streaming handler sees what ``close()`` on its
    generator would raise, wherever it happens to be blocked.
    """


class _ProtocolViolation(Exception):
    pass


class _SendTimeout(Exception):
    pass


def peer_credentials(sock):
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid, uid, gid)



class _Connection:
    """A connected client: its socket, input buffer and greenlet.

    Handlers see it as ``call.connection``: ``close()``, ``peer`` and
    ``description`` are for them; the rest is the server's.
    """

    def __init__(self, server, sock, peer):
        self._server = server
        self._sock = sock
        self.peer = peer
        self.description = "pid=%d uid=%d" % (peer.pid, peer.uid)
        self.greenlet = None
        self._buffer = protocol.MessageBuffer()
        self._pending_fds = []        # arrived with the next message's first byte
        self._watcher = None
        self._close_requested = False     # close now, no further reply
        self._finish_requested = False    # close after the current reply
        self._interrupted = False
        self._released = False
        self._upgraded = False
        self._in_call = False

    def __repr__(self):
        return "<varlink connection %s>" % self.description

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        self.greenlet = gevent.spawn(self._run)
        # Runs even when the greenlet is killed before it ever started, when
        # _run's own cleanup could not.
        self.greenlet.link(lambda _: self.release())

    def close(self):
        """End this connection; safe from any greenlet, idempotent.

        From another greenlet the connection's greenlet is interrupted at
        once, wherever it is blocked (in a send, in a handler's generator).
        From inside a handler, the connection closes once that handler
        returns, without sending its reply.
        """
        if self._upgraded or self._released:
            return
        if self.greenlet is None or self.greenlet.dead:
            self.release()
        elif gevent.getcurrent() is self.greenlet:
            self._close_requested = True
        else:
            self._interrupt("closed by the server")

    def close_after_call(self):
        """Close once the call being handled has been answered."""
        self._finish_requested = True

    def close_gracefully(self):
        """Close now if idle; else once the call in progress (or stream) has ended."""
        if self._in_call:
            self.close_after_call()
        else:
            self.close()

    def _interrupt(self, reason):
        if self._interrupted or self.greenlet is None or self.greenlet.dead:
            return
        self._interrupted = True
        # The flag also ends a stream whose handler swallows the exception.
        self._close_requested = True
        self.greenlet.kill(ConnectionClosed(reason), block=False)

    def release(self):
        """Free everything the connection owns; idempotent."""
        if self._released:
            return
        self._released = True
        close_fds(self._pending_fds)
        self._pending_fds = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._server._forget(self)

    def _run(self):
        try:
            self._serve()
        except ConnectionClosed as e:
            log.debug("varlink: %s: %s", self.description, e or "closed")
        except Exception:
            log.exception("varlink: connection %s failed", self.description)
        finally:
            try:
                self._stop_watcher()
            except ConnectionClosed:
                pass        # an interrupt that arrived after we were done anyway
            self.release()
            log.debug("varlink: %s: connection ended", self.description)

    # -- reading ---------------------------------------------------------------

    def _serve(self):
        while not (self._close_requested or self._finish_requested):
            raw = self._read_message()
            if raw is None:
                return
            fds, self._pending_fds = self._pending_fds, []
            try:
                message = protocol.decode_message(raw)
                call = self._make_call(message, fds)
            except (ValueError, _ProtocolViolation) as e:
                close_fds(fds)
                log.warning("varlink: %s: protocol violation, closing: %s",
                            self.description, e)
                return
            if log.isEnabledFor(logging.DEBUG):
                log.debug("varlink: received from %s: %s%s", self.description,
                          protocol.describe_message(message),
                          " (+%d fds)" % len(fds) if fds else "")
            if self._dispatch(call):
                return                  # upgraded: the socket is no longer ours

    def _read_message(self):
        """The next message's bytes (without NUL), or None: EOF or violation."""
        while True:
            raw = self._buffer.next_message()
            if raw is not None:
                return raw
            if len(self._buffer) >= self._server.max_message_size:
                log.warning("varlink: %s: message exceeds %d bytes without "
                            "terminator, closing", self.description,
                            self._server.max_message_size)
                return None
            if not self._fill():
                return None

    def _fill(self):
        """Read once into the buffer. False on EOF, error or violation."""
        room = max(1, min(protocol.READ_SIZE,
                          self._server.max_message_size - len(self._buffer)))
        try:
            if self._server.allow_fd_passing:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    room, _FDS_ANCILLARY_SIZE, _socket.MSG_CMSG_CLOEXEC)
                fds = fds_from_ancdata(ancdata)
                if flags & _socket.MSG_CTRUNC:
                    close_fds(fds)
                    log.warning("varlink: %s: more than %d fds with one "
                                "message, closing", self.description,
                                protocol.FDS_MAX)
                    return False
                if fds:
                    # Like sd-varlink: fds travel with a message's first
                    # byte, so they may only arrive when no message is
                    # half-read (and not twice for one message).
                    if len(self._buffer) or self._pending_fds or not data:
                        close_fds(fds)
                        log.warning("varlink: %s: fds not at the start of a "
                                    "message, closing", self.description)
                        return False
                    self._pending_fds = fds
            else:
                # Plain recv(): the kernel closes any fds sent to us.
                data = self._sock.recv(room)
        except OSError as e:
            log.debug("varlink: %s: read failed: %s", self.description, e)
            return False
        if not data:
            return False
        self._buffer.append(data)
        return True

    def _make_call(self, message, fds):
        # The same checks as sd-varlink's varlink_dispatch_method(): anything
        # else in the call object is a protocol violation.
        method, parameters, flags = None, None, dict.fromkeys(_CALL_FLAGS, False)
        for key, value in message.items():
            if key == "method":
                if not isinstance(value, str):
                    raise _ProtocolViolation("method is not a string")
                method = value
            elif key == "parameters":
                if value is not None and not isinstance(value, dict):
                    raise _ProtocolViolation("parameters is not an object")
                parameters = value
            elif key in flags:
                if not isinstance(value, bool):
                    raise _ProtocolViolation("%s is not a boolean" % key)
                flags[key] = value
            else:
                raise _ProtocolViolation("unknown key %r in call" % key)
        if method is None:
            raise _ProtocolViolation("call without method")
        if sum(flags.values()) > 1:
            raise _ProtocolViolation("more, oneway and upgrade are exclusive")
        return Call(method, parameters or {}, fds=fds,
                    peer_pid=self.peer.pid, peer_uid=self.peer.uid,
                    peer_gid=self.peer.gid, connection=self,
                    allow_fd_passing=self._server.allow_fd_passing, **flags)

    # -- dispatching -------------------------------------------------------------

    def _dispatch(self, call):
        """Run one call and send its replies. True if the socket was handed over."""
        self._in_call = True
        try:
            try:
                result = self._server.service.handle(call)
            except VarlinkError as e:
                self._send_error(call, e)
                return False
            except Exception as e:
                log.exception("varlink: %s: %s failed", self.description, call.method)
                self._send_error(call, errno_error(e))
                return False
            if call.oneway or self._close_requested:
                _close_iterator(result)
                return False
            if isinstance(result, Upgrade):
                return self._upgrade(call, result)
            if isinstance(result, Iterator):
                self._stream(call, result)
            else:
                self._reply(call, result)
            return False
        finally:
            self._in_call = False
            call.close_fds()

    def _reply(self, call, parameters, continues=False):
        """Send one reply; a handler bug (not a dict, not encodable) becomes an EIO error.

        False if an error went out instead: that ends the call (and its stream).
        """
        if isinstance(parameters, SharedReply):
            try:
                data, bad = parameters.encoded(call.definition, continues)
            except (TypeError, ValueError, RecursionError):
                # Not encodable: _send() reports it as for any reply.
                return self._send(call, protocol.reply_message(parameters.parameters, continues))
            if bad is not None:
                log.warning("varlink: reply to %s does not match its IDL on "
                            "field '%s', sending it anyway", call.method, bad)
            return self._send(call, None, data)
        if parameters is not None and not isinstance(parameters, Mapping):
            log.error("varlink: %s returned %r, not a dict", call.method, parameters)
            self._send_error(call, VarlinkError.from_errno(errno.EIO))
            return False
        parameters = dict(parameters or {})
        if call.definition is not None and log.isEnabledFor(logging.WARNING):
            bad = call.definition.reply_mismatch(parameters)
            if bad is not None:
                log.warning("varlink: reply to %s does not match its IDL on "
                            "field '%s', sending it anyway", call.method, bad)
        return self._send(call, protocol.reply_message(parameters, continues))

    def _stream(self, call, iterator):
        """Send each item as a ``continues`` reply, then the final one."""
        if not call.more:
            # As sd_varlink_notify() does for a call without "more".
            _close_iterator(iterator)
            self._send_error(call, VarlinkError(protocol.EXPECTED_MORE))
            return
        self._watcher = gevent.spawn(self._watch_peer)
        try:
            while not self._close_requested:
                try:
                    item = next(iterator)
                except StopIteration as stop:
                    final = stop.value
                    break
                except VarlinkError as e:
                    self._send_error(call, e)
                    return
                except Exception as e:
                    log.exception("varlink: %s: %s stream failed",
                                  self.description, call.method)
                    self._send_error(call, errno_error(e))
                    return
                if not self._reply(call, item, continues=True):
                    return
            else:
                return
            if final is None:
                # A stream without a final reply ends by hanging up, as
                # systemd ends SubscribeEvents when the machine goes away.
                log.debug("varlink: %s: %s stream ended, closing",
                          self.description, call.method)
                self._close_requested = True
            else:
                self._reply(call, final)
        finally:
            self._stop_watcher()
            _close_iterator(iterator)

    def _watch_peer(self):
        """While a stream runs: read ahead, and end the stream on hang-up."""
        while self._fill():
            if len(self._buffer) >= self._server.max_message_size:
                log.warning("varlink: %s: too much input during a stream",
                            self.description)
                break
        if self._watcher is gevent.getcurrent():
            self._interrupt("peer hung up during a stream")

    def _stop_watcher(self):
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.kill(block=True)

    def _upgrade(self, call, upgrade):
        if not call.upgrade:
            log.error("varlink: %s returned Upgrade to a call without the "
                      "upgrade flag", call.method)
            self._send_error(call, VarlinkError(protocol.EXPECTED_UPGRADE))
            return False
        if not self._reply(call, upgrade.parameters):
            return False
        sock, self._sock = self._sock, None
        pending = self._buffer.take_rest()
        close_fds(self._pending_fds)
        self._pending_fds = []
        self._upgraded = True
        self._server._forget(self)
        log.debug("varlink: %s: upgraded by %s, %d bytes pending",
                  self.description, call.method, len(pending))
        try:
            upgrade.takeover(sock, pending)
        except Exception:
            log.exception("varlink: %s: takeover after %s failed",
                          self.description, call.method)
            sock.close()
        return True

    # -- writing -----------------------------------------------------------------

    def _send_error(self, call, error):
        close_fds(call.take_reply_fds())   # never fds with an error
        if not call.oneway:
            self._send(call, error.to_message())

    def _send(self, call, message, data=None):
        """Send `message`, or `data` when it is already encoded; False if it
        could not be and an EIO error went out instead."""
        fds = call.take_reply_fds()
        sent_as_given = True
        try:
            try:
                if data is None:
                    data = protocol.encode_message(message)
            except (TypeError, ValueError, RecursionError) as e:
                # RecursionError: data nested too deeply to encode (e.g. a
                # QMP event's, which decoded in a shallower stack).
                log.error("varlink: %s: cannot encode reply to %s: %s",
                          self.description, call.method, e)
                close_fds(fds)
                fds = []
                message = VarlinkError.from_errno(errno.EIO).to_message()
                data = protocol.encode_message(message)
                sent_as_given = False
            if len(data) > self._server.max_message_size:
                log.error("varlink: %s: reply to %s is %d bytes, over the limit",
                          self.description, call.method, len(data))
                close_fds(fds)
                fds = []
                message = VarlinkError.from_errno(errno.ENOBUFS).to_message()
                data = protocol.encode_message(message)
                sent_as_given = False
            if log.isEnabledFor(logging.DEBUG):
                log.debug("varlink: sending to %s: %s%s", self.description,
                          protocol.describe_message(message) if message is not None
                          else data[:-1].decode("utf-8", "replace"),
                          " (+%d fds)" % len(fds) if fds else "")
            if not fds:
                # Fast path: a reply usually fits the socket buffer at once.
                # timeout=0.0 makes gevent's send() raise instead of waiting,
                # so no Timeout needs arming, and sendall()'s getsockopt()
                # per call is skipped; what did not fit goes the slow way.
                try:
                    sent = self._sock.send(data, 0, 0.0)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    return sent_as_given
                data = memoryview(data)[sent:]
            with gevent.Timeout(self._server.send_timeout, _SendTimeout):
                if fds:
                    sent = self._sock.sendmsg(
                        [data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                  array.array("i", fds))])
                    data = data[sent:]
                self._sock.sendall(data)
            return sent_as_given
        except _SendTimeout:
            raise ConnectionClosed("peer did not read for %ss" % self._server.send_timeout)
        except OSError as e:
            raise ConnectionClosed("send failed: %s" % e)
        finally:
            # Sent fds were duplicated into the peer; ours are closed either way.
            close_fds(fds)


def _close_iterator(result):
    close = getattr(result, "close", None)
    if isinstance(result, Iterator) and callable(close):
        try:
            close()
        except Exception:
            log.exception("varlink: closing a stream generator failed")
