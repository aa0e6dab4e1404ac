"""The QMP client: handshake state machine, id-matched commands, events.

A QMP session, as QEMU speaks it on a monitor in control mode::

    <- {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22},
                            "package": "..."}, "capabilities": ["oob"]}}
    -> {"execute": "qmp_capabilities", "id": 1}
    <- {"return": {}, "id": 1}
    -> {"execute": "query-status", "id": 2}
    <- {"event": "RESUME", "timestamp": {"seconds": ..., "microseconds": ...}}
    <- {"return": {"status": "running", "running": true}, "id": 2}
    -> {"execute": "closefd", "arguments": {"fdname": "x"}, "id": 3}
    <- {"error": {"class": "GenericError", "desc": "..."}, "id": 3}

QEMU greets first; until ``qmp_capabilities`` succeeds it refuses every other
command.  Each reply echoes the request's ``id`` (any JSON value), and events
may arrive at any time, also between a command and its reply.  Input QEMU
cannot even parse as an object gets an error *without* an id.  We never ask
for out-of-band execution, so replies come in request order; we match by id
all the same.

States (``QMPClient.state``)::

    HANDSHAKE_INITIAL --greeting--> GREETING_RECEIVED --qmp_capabilities sent-->
    CAPABILITIES_SENT --its reply--> RUNNING
    any state --EOF, socket error, protocol error, close()--> DISCONNECTED

Upper and lower half: callers in any greenlet send commands (serialised by
the transport's send lock) and wait on a ``gevent.event.AsyncResult`` keyed by
the id.  Exactly one *pump* greenlet reads the socket; each step, in a fixed
order: read one line, decode it, then either complete the pending command with
its id, or call the event callbacks and feed the listeners.  The pump also
performs the handshake, so it starts on ``start()``, ``handshake()`` or the
first ``execute()``.  It never blocks on anybody: event callbacks must not
block, and listeners are bounded queues.

Ownership: the client owns its socket and closes it on every path to
DISCONNECTED.  File descriptors passed to ``execute(..., fds=...)`` stay owned
by the caller (SCM_RIGHTS hands QEMU duplicates); the client never closes them.

Logging: logger ``vmbridge.qmp``; at DEBUG every message sent (``>>>``) and
received (``<<<``), prefixed by the client's name (long ones truncated).
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import socket

import gevent
import gevent.event
import gevent.socket

from .errors import (QMPCommandError, QMPDisconnectedError, QMPError,
                     QMPProtocolError, QMPTimeoutError)
from .events import Event, EventListener
from .wrappers import CommandWrappers
from .transport import EXCERPT_SIZE, SendProgress, Transport, UnexpectedEOF

logger = logging.getLogger("vmbridge.qmp")

#: Messages longer than this are truncated in DEBUG logs.
LOG_MESSAGE_LIMIT = 4096


class State(enum.Enum):
    HANDSHAKE_INITIAL = "handshake-initial"
    GREETING_RECEIVED = "greeting-received"
    CAPABILITIES_SENT = "capabilities-sent"
    RUNNING = "running"
    DISCONNECTED = "disconnected"


# Compact JSON, because QEMU (7.2 at least) reads QMP input one byte per
# main-loop turn: every byte costs QEMU time.  One encoder for all, because
# json.dumps() with non-default options builds a new JSONEncoder every call.
_json_encode = json.JSONEncoder(separators=(",", ":")).encode


def _encode(message) -> bytes:
    return _json_encode(message).encode() + b"\n"


def _for_log(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    data = data.rstrip("\r\n")
    if len(data) > LOG_MESSAGE_LIMIT:
        return f"{data[:LOG_MESSAGE_LIMIT]}... ({len(data)} bytes)"
    return data


class QMPClient(CommandWrappers):
    """A QMP connection to one QEMU, driven from gevent greenlets.

    ``sock`` is a connected stream socket (AF_UNIX to pass fds), stdlib or
    gevent; the client takes ownership of it (a stdlib socket object is
    detached and left closed).  Constructing does no I/O.  If it raises
    (TypeError, ValueError for a bad ``max_message_size``), ``sock`` is
    still the caller's.
    """

    def __init__(self, sock, *, name: str = "qmp",
                 max_message_size: int = 32 * 1024 * 1024):
        self.name = name
        self._transport = Transport(sock, max_message_size)
        self.state = State.HANDSHAKE_INITIAL
        self.greeting: dict | None = None
        self.version: dict | None = None
        self.capabilities: list | None = None
        self.disconnect_reason: BaseException | None = None
        self._pump: gevent.Greenlet | None = None
        self._ids = itertools.count(1)
        self._capabilities_id: int | None = None
        self._pending: dict[int, gevent.event.AsyncResult] = {}
        self._abandoned: set[int] = set()  # ids whose caller timed out
        self._handshake_done = gevent.event.Event()  # RUNNING or DISCONNECTED
        self._event_callbacks: list = []
        self._disconnect_callbacks: list = []
        self._listeners: list[EventListener] = []
        CommandWrappers.__init__(self)

    @classmethod
    def connect_unix(cls, path: str, *, name: str = "qmp",
                     timeout: float | None = None, **kwargs) -> "QMPClient":
        """Connect to a QMP server socket at ``path`` (no handshake yet).

        Blocks only this greenlet.  Raises OSError as the connect does
        (FileNotFoundError, ConnectionRefusedError...), QMPTimeoutError if it
        takes longer than ``timeout``.
        """
        sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except socket.timeout as exc:
                raise QMPTimeoutError(f"connecting to {path} timed out") from exc
            return cls(sock, name=name, **kwargs)
        except BaseException:
            sock.close()  # still ours: the client takes it only on success
            raise

    def __repr__(self) -> str:
        return f"<QMPClient {self.name} {self.state.value}>"

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Spawn the pump greenlet, which performs the handshake.
        Idempotent, non-blocking; a no-op once DISCONNECTED."""
        if self._pump is None and self.state is not State.DISCONNECTED:
            self._pump = gevent.Greenlet(self._run_pump)
            self._pump.name = f"qmp-pump[{self.name}]"
            self._pump.start()

    def handshake(self, timeout: float | None = None) -> None:
        """Start the pump if needed and wait until RUNNING.

        Raises QMPTimeoutError (the client stays as it is: the caller may
        wait again or ``close()``), QMPProtocolError if the peer spoke
        something other than QMP, QMPDisconnectedError otherwise.
        """
        self._refuse_in_pump("handshake")
        if self.state is State.RUNNING:
            return
        self.start()
        if not self._handshake_done.wait(timeout):
            raise QMPTimeoutError(f"{self.name}: no QMP handshake within {timeout} s "
                                  f"(state {self.state.value})")
        if self.state is not State.RUNNING:
            reason = self.disconnect_reason
            if isinstance(reason, QMPProtocolError):
                raise QMPProtocolError(f"{self.name}: handshake failed: {reason}") from reason
            raise self._disconnected_error()

    def close(self) -> None:
        """Disconnect: close the socket, fail pending commands, end the
        listeners, fire the disconnect callbacks.  Idempotent; never blocks;
        callable from anywhere, an event callback included.  The pump
        greenlet ends at its next wake-up, which closing its socket causes."""
        self._disconnect(QMPDisconnectedError(f"{self.name}: closed by the client"))

    def on_event(self, callback) -> None:
        """Call ``callback(event)`` for every event, in order, in the pump
        greenlet.  It must not block (no I/O, no ``execute()``, no sleeping):
        the pump reads nothing else meanwhile.  Exceptions are logged."""
        self._event_callbacks.append(callback)

    def on_disconnect(self, callback) -> None:
        """Call ``callback(reason)`` once when the client becomes
        DISCONNECTED; immediately if it already is."""
        if self.state is State.DISCONNECTED:
            self._call_disconnect_callback(callback, self.disconnect_reason)
        else:
            self._disconnect_callbacks.append(callback)

    def listen(self, names=None, *, maxsize: int = 1024) -> EventListener:
        """A new :class:`EventListener` for the events named in ``names`` (an
        iterable of names, or one name; None for all).  After a disconnect
        it comes back already ended (``get()`` raises QMPDisconnectedError)."""
        listener = EventListener(names, maxsize, self._unregister_listener)
        if self.state is State.DISCONNECTED:
            listener._disconnected(self.disconnect_reason)
        else:
            self._listeners.append(listener)
        return listener

    def _unregister_listener(self, listener: EventListener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    # -- commands -----------------------------------------------------------

    def execute(self, command: str, arguments: dict | None = None, *,
                fds=(), timeout: float | None = None):
        """Run ``command`` and return its ``return`` value.

        Blocks this greenlet until the reply (any number of greenlets may
        wait at once).  Performs the handshake first if needed.  ``fds`` go
        to QEMU with SCM_RIGHTS on the command's first byte; the caller keeps
        ownership of them.  Raises QMPCommandError for an error reply,
        QMPDisconnectedError if the connection is or gets lost,
        QMPTimeoutError after ``timeout`` seconds (a late reply is dropped).
        Every QMPError raised here says in ``fds_sent`` whether QEMU got fds.
        """
        request = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        reply = self._roundtrip(request, fds, timeout)
        if "error" in reply:
            raise QMPCommandError(command, reply["error"], fds_sent=bool(fds))
        return reply["return"]

    def execute_raw(self, message: dict, *, fds=(), timeout: float | None = None) -> dict:
        """Send ``message`` (``{"execute"|"exec-oob": name, "arguments"?:
        {...}}``; any ``id`` of its own is replaced by ours) and return the
        whole reply, ``{"return": ...}`` or ``{"error": {...}}``, without
        ``id``.  QEMU judges the rest of the message; an error reply is
        returned, not raised.  Disconnects and timeouts raise as in
        :meth:`execute`.
        """
        if not isinstance(message, dict):
            raise TypeError("a QMP command is a JSON object (dict)")
        return self._roundtrip(dict(message), fds, timeout)

    def _roundtrip(self, request: dict, fds, timeout: float | None) -> dict:
        """Send ``request`` (ours to modify) with a fresh id and return the
        reply without its id.  The one path of execute and execute_raw."""
        if fds:
            fds = tuple(fds)
            if not all(isinstance(fd, int) and fd >= 0 for fd in fds):
                raise ValueError(f"fds must be non-negative ints: {fds!r}")
        self._refuse_in_pump("execute")
        progress = SendProgress()
        timer = gevent.Timeout.start_new(timeout) if timeout is not None else None
        msg_id = None
        try:
            if self.state is not State.RUNNING:
                self._wait_running()
            msg_id = next(self._ids)
            request["id"] = msg_id
            waiter = gevent.event.AsyncResult()
            self._pending[msg_id] = waiter
            self._send(request, fds, progress)
            reply = waiter.get()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            if progress.partial:
                raise QMPDisconnectedError(
                    f"{self.name}: timed out half-way through sending {request.get('execute')}",
                    reason=self.disconnect_reason, fds_sent=progress.fds_sent) from None
            raise QMPTimeoutError(
                f"{self.name}: no reply to {request.get('execute', request.get('exec-oob'))}"
                f" within {timeout} s", fds_sent=progress.fds_sent) from None
        except QMPError as exc:
            exc.fds_sent = progress.fds_sent
            raise
        finally:
            if timer is not None:
                timer.close()
            # Still pending: we stopped waiting (timeout, or this greenlet
            # was killed).  If QEMU got the command, drop its late reply.
            if (msg_id is not None and self._pending.pop(msg_id, None) is not None
                    and progress.bytes_sent):
                self._abandoned.add(msg_id)
        reply.pop("id", None)
        return reply

    def _wait_running(self) -> None:
        if self.state is State.DISCONNECTED:
            raise self._disconnected_error()
        self.start()
        self._handshake_done.wait()
        if self.state is not State.RUNNING:
            raise self._disconnected_error()

    def _send(self, request: dict, fds: tuple, progress: SendProgress) -> None:
        if self.state is State.DISCONNECTED:
            raise self._disconnected_error()
        data = _encode(request)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: >>> %s%s", self.name, _for_log(data),
                         f" [fds {list(fds)}]" if fds else "")
        try:
            self._transport.send(data, fds, progress)
        except BaseException as exc:
            if progress.partial or isinstance(exc, OSError):
                # Half a command is in QEMU's parser, or the socket broke:
                # nothing sent after this could be trusted.
                reason = QMPDisconnectedError(
                    f"{self.name}: sending failed after {progress.bytes_sent} of "
                    f"{progress.total} bytes: {exc!r}")
                reason.__cause__ = exc
                self._disconnect(reason)
            if isinstance(exc, OSError):
                raise self._disconnected_error() from exc
            raise

    def _disconnected_error(self) -> QMPDisconnectedError:
        reason = self.disconnect_reason
        error = QMPDisconnectedError(f"{self.name}: QMP disconnected: {reason}", reason=reason)
        error.__cause__ = reason
        return error

    def _refuse_in_pump(self, what: str) -> None:
        if self._pump is not None and gevent.getcurrent() is self._pump:
            raise RuntimeError(f"{what}() from inside the QMP pump (an event or "
                               f"disconnect callback) would wait for itself")

    # -- the pump -----------------------------------------------------------

    def _run_pump(self) -> None:
        if self.state is State.DISCONNECTED:  # closed before it first ran
            return
        try:
            self._receive_greeting()
            self._send_capabilities()
            while self.state is not State.DISCONNECTED:
                self._dispatch(self._read_message())
        except QMPProtocolError as exc:
            self._disconnect(exc)  # which logs it
        except QMPDisconnectedError:
            pass  # sending qmp_capabilities failed; _send disconnected already
        except UnexpectedEOF as exc:
            self._disconnect(QMPDisconnectedError(f"{self.name}: {exc}"))
        except EOFError:
            self._disconnect(QMPDisconnectedError(f"{self.name}: QEMU closed the QMP connection"))
        except OSError as exc:
            if self.state is not State.DISCONNECTED:
                reason = QMPDisconnectedError(f"{self.name}: QMP socket error: {exc}")
                reason.__cause__ = exc
                self._disconnect(reason)
        except gevent.GreenletExit:
            self._disconnect(QMPDisconnectedError(f"{self.name}: QMP pump was killed"))
            raise
        except Exception as exc:  # a bug of ours: still leave no waiter hanging
            logger.exception("%s: QMP pump failed", self.name)
            reason = QMPDisconnectedError(f"{self.name}: QMP pump failed: {exc!r}")
            reason.__cause__ = exc
            self._disconnect(reason)

    def _read_message(self):
        """The next decoded message; EOFError at a clean EOF."""
        while True:
            line = self._transport.read_line()
            if line is None:
                raise EOFError
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: <<< %s", self.name, _for_log(line))
            try:
                return json.loads(line)
            except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError
                if not line.strip():
                    continue  # a stray empty line carries no message
                raise QMPProtocolError(f"malformed JSON ({exc})",
                                       excerpt=line[:EXCERPT_SIZE]) from None

    def _receive_greeting(self) -> None:
        message = self._read_message()
        greeting = message.get("QMP") if isinstance(message, dict) else None
        if (not isinstance(greeting, dict) or not isinstance(greeting.get("version"), dict)
                or not isinstance(greeting.get("capabilities"), list)):
            raise QMPProtocolError("expected the QMP greeting",
                                   excerpt=_encode(message)[:EXCERPT_SIZE])
        self.greeting = greeting
        self.version = greeting["version"]
        self.capabilities = greeting["capabilities"]
        self.state = State.GREETING_RECEIVED
        qemu = self.version.get("qemu", {})
        logger.info("%s: QMP greeting from QEMU %s.%s.%s, capabilities %s", self.name,
                    qemu.get("major"), qemu.get("minor"), qemu.get("micro"),
                    self.capabilities)

    def _send_capabilities(self) -> None:
        # No capability is enabled: "oob" would let replies overtake each
        # other, which we do not need.
        self._capabilities_id = next(self._ids)
        self._send({"execute": "qmp_capabilities", "id": self._capabilities_id},
                   (), SendProgress())
        self.state = State.CAPABILITIES_SENT

    def _dispatch(self, message) -> None:
        if not isinstance(message, dict):
            raise QMPProtocolError("message is not a JSON object",
                                   excerpt=_encode(message)[:EXCERPT_SIZE])
        if "event" in message:
            self._dispatch_event(Event.from_message(message))
        elif "return" in message or "error" in message:
            self._dispatch_reply(message)
        else:
            raise QMPProtocolError("message is neither a reply nor an event",
                                   excerpt=_encode(message)[:EXCERPT_SIZE])

    def _dispatch_reply(self, message: dict) -> None:
        if "error" in message:
            error = message["error"]
            if not isinstance(error, dict) or not isinstance(error.get("class"), str):
                raise QMPProtocolError("malformed error reply",
                                       excerpt=_encode(message)[:EXCERPT_SIZE])
        if "id" not in message:
            # QEMU answers input it cannot parse as an object this way; we
            # only send objects we serialised, so this names no caller.
            logger.warning("%s: QMP reply without id, cannot be matched: %s",
                           self.name, _for_log(_encode(message)))
            return
        msg_id = message["id"]
        if type(msg_id) is not int:  # ours are ints; others may be unhashable
            logger.warning("%s: QMP reply with a foreign id %r ignored", self.name, msg_id)
            return
        if msg_id == self._capabilities_id and self.state is State.CAPABILITIES_SENT:
            self._finish_handshake(message)
            return
        waiter = self._pending.pop(msg_id, None)
        if waiter is not None:
            waiter.set(message)
        elif msg_id in self._abandoned:
            self._abandoned.discard(msg_id)
            logger.debug("%s: dropped the late reply to timed-out id %d", self.name, msg_id)
        else:
            logger.warning("%s: QMP reply with unknown id %d ignored", self.name, msg_id)

    def _finish_handshake(self, message: dict) -> None:
        if "error" in message:
            error = message["error"]
            raise QMPProtocolError(f"QEMU refused qmp_capabilities: "
                                   f"{error.get('class')}: {error.get('desc')}")
        self.state = State.RUNNING
        self._handshake_done.set()
        logger.debug("%s: QMP handshake complete", self.name)

    def _dispatch_event(self, event: Event) -> None:
        for callback in tuple(self._event_callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("%s: event callback %r failed on %s",
                                 self.name, callback, event.name)
        for listener in tuple(self._listeners):
            listener._deliver(event)

    # -- disconnecting ------------------------------------------------------

    def _disconnect(self, reason: BaseException) -> None:
        """Go to DISCONNECTED exactly once, leaving nothing behind."""
        if self.state is State.DISCONNECTED:
            return
        previous = self.state
        self.state = State.DISCONNECTED
        self.disconnect_reason = reason
        level = logging.WARNING if isinstance(reason, QMPProtocolError) else logging.INFO
        logger.log(level, "%s: QMP disconnected (was %s): %s",
                   self.name, previous.value, reason)
        # Closing the socket ends the pump too: gevent wakes the greenlet
        # blocked in recv() with an OSError, and the pump, seeing
        # DISCONNECTED, returns quietly.  Unlike Greenlet.kill(block=True)
        # this never switches, so nothing (a caller's Timeout included) can
        # interrupt the bookkeeping below half-way.
        self._transport.close()
        pending, self._pending = self._pending, {}
        self._abandoned.clear()
        for waiter in pending.values():
            waiter.set_exception(self._disconnected_error())
        self._handshake_done.set()
        for listener in tuple(self._listeners):
            listener._disconnected(reason)
        callbacks, self._disconnect_callbacks = self._disconnect_callbacks, []
        for callback in callbacks:
            self._call_disconnect_callback(callback, reason)

    def _call_disconnect_callback(self, callback, reason) -> None:
        try:
            callback(reason)
        except Exception:
            logger.exception("%s: disconnect callback %r failed", self.name, callback)
