"""QMP sessions for any number of clients, over the VM's one QMP connection.

``io.systemd.QemuMachineInstance.AcquireQMP`` upgrades a varlink connection
to QMP (control.py does the varlink half and hands the socket here). Each
such connection becomes a :class:`Session` that speaks QMP exactly as a QEMU
monitor does, while every command actually travels over the VM's single QMP
connection, which vmbridged keeps using itself at the same time::

    client A ─┐                          ┌─ Machine (state, SubscribeEvents)
    client B ─┼─ Session ─ execute_raw ──┤
    vmbridged ┘   (ids rewritten)        └─ QMPClient ── socketpair ── QEMU
                         events ◄── pump: Machine first, then every session

A session, as its client sees it (``docs/acquireqmp.md`` has the details)::

    <- {"QMP": {"version": {...QEMU's own...}, "capabilities": []}}
    -> {"execute": "qmp_capabilities"}          (anything else first:
    <- {"return": {}}                            CommandNotFound, QEMU's text)
    -> {"execute": "query-status", "id": ["any", "json"]}
    <- {"return": {...}, "id": ["any", "json"]}
    <- {"timestamp": {...}, "event": "STOP"}    (every event, to every session)

Session states::

    NEGOTIATING --qmp_capabilities--> COMMAND
    NEGOTIATING/COMMAND --QMP connection lost, or the client's
                          input ended and all of it is answered--> ENDING
    ENDING --output flushed (or FLUSH_TIMEOUT)--> CLOSED
    any --client closes / garbage / overflow / never reads--> CLOSED

Per session, three greenlets: the *reader* (the varlink connection's own
greenlet, which called :meth:`QMPSessions.serve`) cuts the input into
messages (:mod:`.qmp_input`) and queues them, at most
``REQUEST_QUEUE_LENGTH`` (QEMU's own limit; then it stops reading, so a
flooding client is held back by its socket); the *executor* answers them one
at a time, in order — locally (negotiation, malformed input, refusals) or by
``QMPClient.execute_raw``, which sends the command under an id of the
client's and hands back the reply, to which the session's own ``id`` is put
back — so a session sees its replies in its own command order, as from
QEMU, while sessions overlap each other and vmbridged freely; the *writer*
drains the session's bounded output queue (replies and events) into the
socket.

Events: the QMP pump calls :meth:`QMPSessions._on_event` after the Machine's
own handler (registered first, when QEMU was started), so a client that sees
STOP can already read "paused" from Describe. Each event is encoded once and
offered to every negotiated session's output queue; that never blocks. A
session whose queue is full (``max_queued`` messages or ``max_queued_bytes``)
is closed on the spot: it has stopped reading, and nobody waits for it.

Refusals: commands that would pull an object vmbridged created out from
under it are answered ``{"error": {"class": "GenericError", "desc":
"vmbridge: ..."}}`` and never reach QEMU; see :mod:`.qmp_refusals`.

Ends: a client that closes the connection loses its queued commands; the
one QEMU is running completes and its reply is dropped (QEMU does the same
for a monitor whose client left). A client that only shuts down its sending
side still gets the replies to everything it sent, as from QEMU (which reads
a monitor one command at a time and so meets the EOF last). When the QMP
connection goes away (QEMU quit or died, or vmbridged lets go of it), every
session writes out what it has, within ``FLUSH_TIMEOUT``, and is closed.
"""

from __future__ import annotations

import collections
import enum
import itertools
import json
import logging
import select
import socket

import gevent
import gevent.event
import gevent.monkey
import gevent.queue

from vmbridge.fds import ancillary_space, close_fds, fds_from_ancdata
from vmbridge.machine.qmp_refusals import REFUSED_COMMANDS, refusal
from vmbridge.machine.qmp_input import (InputOverflow, InputSplitter, RequestError,
                                        check_capabilities_arguments, check_request)
from vmbridge.qmp import QMPDisconnectedError, QMPError

log = logging.getLogger("vmbridge.qmp.sessions")

#: Sessions one VM serves at once (upgraded connections are outside the varlink
#: server's connection limits, so this is theirs).
MAX_SESSIONS = 64
#: Requests read ahead of the executor; QEMU's QMP_REQ_QUEUE_LEN_MAX.
REQUEST_QUEUE_LENGTH = 8
#: Malformed inputs in a row after which a session is closed.
MAX_CONSECUTIVE_ERRORS = 16
#: Output a session may have pending before it counts as not reading.
MAX_QUEUED = 1024
MAX_QUEUED_BYTES = 16 * 1024 * 1024
#: How long a session whose QEMU went away gets to take its last replies.
FLUSH_TIMEOUT = 5.0
#: File descriptors one read may bring (QEMU's socket chardev takes 16).
MAX_FDS = 16
RECV_SIZE = 64 * 1024

_FDS_SPACE = ancillary_space(MAX_FDS)
_END = object()  # the writer's last item


def encode(message) -> bytes:
    """One QMP message as QEMU writes it: ``", "``/``": "`` separators, ASCII, CRLF."""
    return (json.dumps(message) + "\r\n").encode()


def error_reply(error_class: str, desc: str, has_id: bool = False, request_id=None) -> dict:
    # QEMU puts the id first in error replies and last in successful ones.
    error = {"error": {"class": error_class, "desc": desc}}
    return {"id": request_id, **error} if has_id else error


class QMPSessions:
    """Every session on one QMP connection (one QEMU run).

    ``owns(kind, value)`` says whether vmbridged owns an id
    (``machine.devices.owns``); it is asked for each command that could take
    something of ours (see :func:`refusal`). Creating this registers an event
    and a disconnect callback on ``client``; a client that is already
    disconnected leaves it closed at once.
    """

    def __init__(self, client, *, owns=lambda kind, value: False, name: str = "qmp",
                 max_sessions: int = MAX_SESSIONS, max_queued: int = MAX_QUEUED,
                 max_queued_bytes: int = MAX_QUEUED_BYTES):
        if client.version is None:
            raise ValueError("the QMP client has no greeting yet (handshake first)")
        self.client = client
        self.name = name
        self.owns = owns
        self.max_sessions = max_sessions
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        # QEMU's own version, and no capabilities: out-of-band execution would
        # need it enabled on the shared connection (see docs/acquireqmp.md).
        self.greeting = encode({"QMP": {"version": client.version, "capabilities": []}})
        self.closed = False
        self._sessions: set[Session] = set()
        self._numbers = itertools.count(1)
        client.on_event(self._on_event)
        client.on_disconnect(self._on_disconnect)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def full(self) -> bool:
        return len(self._sessions) >= self.max_sessions

    def serve(self, sock, pending: bytes = b"", *, peer: str = "") -> None:
        """Run one session on ``sock`` (now ours) until it ends.

        Called in the greenlet that owns the connection (the varlink
        connection's, after the upgrade), which becomes the session's reader.
        ``pending``: bytes the client sent already. Never raises.
        """
        if self.closed:
            log.info("%s: QMP session for %s refused: the QMP connection is gone", self.name, peer)
            sock.close()
            return
        session = Session(self, sock, number=next(self._numbers), peer=peer)
        self._sessions.add(session)
        log.info("%s: %s opened (%d open)", self.name, session, len(self._sessions))
        session.run(pending)

    def _forget(self, session: "Session") -> None:
        self._sessions.discard(session)

    # The QMP pump completes a reply by setting the caller's AsyncResult,
    # whose waiter then runs from a loop callback. Handing events (and the
    # end) to the sessions through loop callbacks as well keeps QEMU's order:
    # an event QEMU sent after a reply reaches the session after that reply,
    # one sent before it (STOP before stop's reply), before; and the last
    # events before QEMU hung up are still delivered before the sessions end.

    def _on_event(self, event) -> None:
        # In the QMP pump: must not block.
        if self._sessions:
            gevent.get_hub().loop.run_callback(self._fan_out, encode(event.raw))

    def _fan_out(self, data: bytes) -> None:
        for session in tuple(self._sessions):
            try:
                session.offer_event(data)
            except Exception:
                log.exception("%s: %s: event delivery failed", self.name, session)

    def _on_disconnect(self, reason) -> None:
        self.closed = True  # no new sessions from now on
        gevent.get_hub().loop.run_callback(self._finish_all)

    def _finish_all(self) -> None:
        for session in tuple(self._sessions):
            session.finish("the QMP connection to QEMU is closed")

    def close(self) -> None:
        """End every session (as if QEMU had gone away)."""
        self.closed = True
        self._finish_all()


class SessionState(enum.Enum):
    NEGOTIATING = "negotiating"
    COMMAND = "command"
    ENDING = "ending"
    CLOSED = "closed"


class Session:
    """One client's QMP session (see the module docstring)."""

    def __init__(self, hub: QMPSessions, sock, *, number: int, peer: str = ""):
        self.hub = hub
        self.sock = sock
        self.number = number
        self.peer = peer
        self.state = SessionState.NEGOTIATING
        self.close_reason: str | None = None
        self._splitter = InputSplitter()
        self._errors_in_a_row = 0
        self._requests = gevent.queue.Queue(REQUEST_QUEUE_LENGTH)
        self._fds: list[int] = []          # received, not yet used by getfd/add-fd
        self._out: collections.deque = collections.deque()
        self._out_bytes = 0
        self._out_ready = gevent.event.Event()
        self._reader = None
        self._executor = None
        self._writer = None
        self._executing = False            # the executor waits for QEMU
        self._flush_timer = None

    def __repr__(self) -> str:
        return f"QMP session {self.number}" + (f" ({self.peer})" if self.peer else "")

    # -------------------------------------------------------------- reader

    def run(self, pending: bytes) -> None:
        self._reader = gevent.getcurrent()
        self._writer = gevent.spawn(self._write_loop)
        self._executor = gevent.spawn(self._execute_loop)
        self._push(self.hub.greeting)
        try:
            if pending:
                self._receive(pending, [])
            while self.state in (SessionState.NEGOTIATING, SessionState.COMMAND):
                data, fds = self._recv()
                if not data:
                    close_fds(fds)
                    if self._peer_closed():
                        self.abort("the client hung up")
                    else:
                        # Half-closed: answer what came, then close.
                        self.close_reason = "the client's input ended"
                        self._enqueue(("eof", None))
                    break
                self._receive(data, fds)
        except InputOverflow as e:
            self.abort(str(e), level=logging.WARNING)
        except OSError as e:
            self.abort(f"read failed: {e}")
        except gevent.GreenletExit:
            pass  # finish() or abort() from elsewhere
        except Exception:
            log.exception("%s: %s failed", self.hub.name, self)
            self.abort("internal error", level=logging.ERROR)

    def _recv(self):
        data, ancdata, flags, _ = self.sock.recvmsg(RECV_SIZE, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds = fds_from_ancdata(ancdata)
        if flags & socket.MSG_CTRUNC:
            log.warning("%s: %s: more than %d fds in one message, dropped them",
                        self.hub.name, self, MAX_FDS)
            close_fds(fds)
            fds = []
        return data, fds

    def _peer_closed(self) -> bool:
        """After EOF: did the client close the socket (POLLHUP), rather than
        shut down only its sending side? (Unpatched poll: gevent's reports
        readiness, not hang-ups.)"""
        poller = gevent.monkey.get_original("select", "poll")()
        poller.register(self.sock.fileno(), select.POLLIN)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def _receive(self, data: bytes, fds: list) -> None:
        if fds:
            # The fds came with these bytes: the requests before them are
            # queued already; getfd/add-fd from here on may use them.
            self._enqueue(("fds", fds))
        for kind, value in self._splitter.feed(data):
            if kind == "error":
                self._errors_in_a_row += 1
                if self._errors_in_a_row > MAX_CONSECUTIVE_ERRORS:
                    self.abort(f"more than {MAX_CONSECUTIVE_ERRORS} malformed inputs in a row",
                               level=logging.WARNING)
                    return
            else:
                self._errors_in_a_row = 0
            self._enqueue((kind, value))
            if self.state not in (SessionState.NEGOTIATING, SessionState.COMMAND):
                return

    def _enqueue(self, item) -> None:
        if self.state is SessionState.CLOSED:
            _close_item(item)
            return
        try:
            self._requests.put(item)  # blocks while QEMU_REQ_QUEUE_LEN are waiting
        except BaseException:
            _close_item(item)
            raise

    # ------------------------------------------------------------ executor

    def _execute_loop(self) -> None:
        try:
            while self.state in (SessionState.NEGOTIATING, SessionState.COMMAND):
                kind, value = item = self._requests.get()
                if self.state not in (SessionState.NEGOTIATING, SessionState.COMMAND):
                    _close_item(item)
                    break
                if kind == "eof":
                    break
                if kind == "fds":
                    close_fds(self._fds)  # like QEMU: new fds replace unused ones
                    self._fds = value
                elif kind == "error":
                    self._push(encode(error_reply("GenericError", value)))
                else:
                    self._handle(value)
        except gevent.GreenletExit:
            pass
        except Exception:
            log.exception("%s: %s failed", self.hub.name, self)
            self.abort("internal error", level=logging.ERROR)
        finally:
            close_fds(self._fds)
            self._fds = []
            if self.state is not SessionState.CLOSED:  # nothing more to answer
                self.state = SessionState.ENDING
                self._push_end()

    def _handle(self, message) -> None:
        try:
            command, arguments = check_request(message)
        except RequestError as e:
            self._push(encode(error_reply("GenericError", e.desc, e.has_id, e.id)))
            return
        has_id, request_id = "id" in message, message.get("id")

        def answer_error(error_class, desc):
            self._push(encode(error_reply(error_class, desc, has_id, request_id)))

        if self.state is SessionState.NEGOTIATING:
            if command != "qmp_capabilities":
                answer_error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
                return
            problem = check_capabilities_arguments(arguments)
            if problem is not None:
                answer_error("GenericError", problem)
                return
            enable = (arguments or {}).get("enable") or []
            if enable:  # we offer none
                answer_error("GenericError", f"Capability {', '.join(enable)} not available")
                return
            # From here on the session gets events: after this reply.
            self.state = SessionState.COMMAND
            self._push(encode(_with_id({"return": {}}, has_id, request_id)))
            return
        if command == "qmp_capabilities":
            # QEMU checks the arguments first, then says it is too late.
            problem = check_capabilities_arguments(arguments)
            if problem is not None:
                answer_error("GenericError", problem)
            else:
                answer_error("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
            return
        reason = self._refusal(command, arguments)
        if reason is not None:
            log.info("%s: %s: refused %s: %s", self.hub.name, self, command, reason)
            answer_error("GenericError", reason)
            return
        fds = ()
        if command in ("getfd", "add-fd"):
            if not self._fds:
                # QEMU's answer when no fd came: and forwarding could hand
                # it an fd someone else left in the monitor.
                answer_error("GenericError", "No file descriptor supplied via SCM_RIGHTS")
                return
            # QEMU takes the first fd and closes the others.
            fds, rest, self._fds = (self._fds[0],), self._fds[1:], []
            close_fds(rest)
        request = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self._executing = True
        try:
            reply = self.hub.client.execute_raw(request, fds=fds)
        except QMPDisconnectedError:
            self.finish("the QMP connection to QEMU is closed")
            return
        except QMPError as e:
            log.warning("%s: %s: %s failed: %s", self.hub.name, self, command, e)
            self.finish(f"QMP failed: {e}")
            return
        finally:
            self._executing = False
            close_fds(fds)
        if self.state is SessionState.CLOSED:
            return  # the client left while QEMU worked: nobody to tell
        self._push(encode(_with_id(reply, has_id, request_id)))

    def _refusal(self, command: str, arguments) -> str | None:
        if command not in REFUSED_COMMANDS:
            return None
        try:
            return refusal(command, arguments, self.hub.owns)
        except Exception as e:  # a bug elsewhere: refuse rather than guess
            log.exception("%s: cannot tell what vmbridged owns", self.hub.name)
            return f"vmbridge: cannot tell which objects vmbridged owns ({e!r}); {command} refused"

    # -------------------------------------------------------------- output

    def offer_event(self, data: bytes) -> None:
        """From the QMP pump: queue an event (only after negotiation, as QEMU)."""
        if self.state is SessionState.COMMAND:
            self._push(data)

    def _push(self, data: bytes) -> None:
        if self.state is SessionState.CLOSED:
            return
        if self._out and (len(self._out) >= self.hub.max_queued
                          or self._out_bytes + len(data) > self.hub.max_queued_bytes):
            self.abort(f"it stopped reading ({len(self._out)} messages, "
                       f"{self._out_bytes} bytes not taken)", level=logging.WARNING)
            return
        self._out.append(data)
        self._out_bytes += len(data)
        self._out_ready.set()

    def _push_end(self) -> None:
        self._out.append(_END)
        self._out_ready.set()
        if self._flush_timer is None:
            self._flush_timer = gevent.spawn_later(
                FLUSH_TIMEOUT, self.abort, "it did not take its last replies", level=logging.WARNING)

    def _write_loop(self) -> None:
        try:
            while True:
                while not self._out:
                    self._out_ready.clear()
                    self._out_ready.wait()
                batch = []
                size = 0
                while self._out and size < RECV_SIZE and self._out[0] is not _END:
                    data = self._out.popleft()
                    batch.append(data)
                    size += len(data)
                if batch:
                    self._out_bytes -= size
                    self.sock.sendall(b"".join(batch))
                elif self._out[0] is _END:
                    break
        except gevent.GreenletExit:
            return
        except OSError as e:
            self.abort(f"write failed: {e}")
            return
        self.abort(self.close_reason or "ended")  # all written

    # ---------------------------------------------------------------- ends

    def finish(self, reason: str) -> None:
        """The QMP connection is gone: write out what is queued, then close.
        Never blocks (may run in the QMP pump)."""
        if self.state in (SessionState.ENDING, SessionState.CLOSED):
            return
        self.state = SessionState.ENDING
        self.close_reason = reason
        _kill(self._reader)
        if not self._executing:
            _kill(self._executor)  # waiting for a request: its `finally` ends the output
            if self._executor is None or self._executor.dead:
                self._push_end()

    def abort(self, reason: str, *, level: int = logging.INFO) -> None:
        """Close now: drop queued requests and output. Idempotent, never blocks.
        ``level``: WARNING when the client misbehaved."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self.close_reason = reason
        self.hub._forget(self)
        log.log(level, "%s: %s closed: %s", self.hub.name, self, reason)
        _kill(self._reader)
        _kill(self._writer)
        if not self._executing:
            _kill(self._executor)
        _kill(self._flush_timer)
        while True:
            try:
                _close_item(self._requests.get_nowait())
            except gevent.queue.Empty:
                break
        self._out.clear()
        self._out_bytes = 0
        try:
            self.sock.close()
        except OSError:
            pass


def _with_id(reply: dict, has_id: bool, request_id) -> dict:
    if not has_id:
        return reply
    if "error" in reply:
        return {"id": request_id, **reply}
    return {**reply, "id": request_id}


def _kill(greenlet) -> None:
    if greenlet is not None and greenlet is not gevent.getcurrent() and not greenlet.dead:
        greenlet.kill(block=False)




def _close_item(item) -> None:
    if item[0] == "fds":
        close_fds(item[1])
