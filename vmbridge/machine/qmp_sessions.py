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
"vmbridge: ..."}}`` and never reach QEMU; see :func:`refusal`.

Ends: a client that closes the connection loses its queued commands; the
one QEMU is running completes and its reply is dropped (QEMU does the same
for a monitor whose client left). A client that only shuts down its sending
side still gets the replies to everything it sent, as from QEMU (which reads
a monitor one command at a time and so meets the EOF last). When the QMP
connection goes away (QEMU quit or died, or vmbridged lets go of it), every
session writes out what it has, within ``FLUSH_TIMEOUT``, and is closed.
"""

from __future__ import annotations

import array
import collections
import enum
import itertools
import json
import logging
import os
import select
import socket

import gevent
import gevent.event
import gevent.monkey
import gevent.queue

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

_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_END = object()  # the writer's last item


def encode(message) -> bytes:
    """One QMP message as QEMU writes it: ``", "``/``": "`` separators, ASCII, CRLF."""
    return (json.dumps(message) + "\r\n").encode()


def error_reply(error_class: str, desc: str, has_id: bool = False, request_id=None) -> dict:
    # QEMU puts the id first in error replies and last in successful ones.
    error = {"error": {"class": error_class, "desc": desc}}
    return {"id": request_id, **error} if has_id else error


# ------------------------------------------------------------------- refusals

def _device_id(value):
    # device_del also takes the QOM path of a device with an id.
    if isinstance(value, str) and value.startswith("/machine/peripheral/"):
        return value[len("/machine/peripheral/"):]
    return value


_DEVICE = (("devices",), "device")
_NODE = (("nodes",), "block node")
_DEVICE_OR_NODE = (("devices", "nodes"), "block device")
_CHARDEV = (("chardevs",), "chardev")
_NETDEV = (("netdevs",), "netdev")
_OBJECT = (("objects",), "object")
_FDNAME = (("fdnames",), "file descriptor")
_FDSET = (("fdsets",), "fd set")
_JOB = (("jobs",), "job")

#: command -> ((argument, (kinds, what it names)), ...): refused when vmbridged
#: owns the argument's value as one of those kinds (``DeviceState.owns``).
_OWNED_ARGUMENTS = {
    # removing, replacing or re-pointing what is ours
    "device_del": (("id", _DEVICE),),
    "blockdev-del": (("node-name", _NODE),),
    "chardev-remove": (("id", _CHARDEV),),
    "chardev-change": (("id", _CHARDEV),),
    "netdev_del": (("id", _NETDEV),),
    "object-del": (("id", _OBJECT),),
    "closefd": (("fdname", _FDNAME),),
    "getfd": (("fdname", _FDNAME),),
    "remove-fd": (("fdset-id", _FDSET),),
    "add-fd": (("fdset-id", _FDSET),),
    "eject": (("device", _DEVICE_OR_NODE), ("id", _DEVICE)),
    "blockdev-open-tray": (("device", _DEVICE_OR_NODE), ("id", _DEVICE)),
    "blockdev-remove-medium": (("id", _DEVICE),),
    "blockdev-insert-medium": (("id", _DEVICE),),
    "blockdev-change-medium": (("device", _DEVICE_OR_NODE), ("id", _DEVICE)),
    "x-blockdev-change": (("parent", _NODE),),
    # jobs that rebuild the block graph under our nodes
    "block-stream": (("device", _NODE),),
    "block-commit": (("device", _NODE),),
    "drive-mirror": (("device", _NODE),),
    "blockdev-mirror": (("device", _NODE),),
    "blockdev-snapshot": (("node", _NODE),),
    "blockdev-snapshot-sync": (("device", _NODE), ("node-name", _NODE)),
    # our jobs
    "job-cancel": (("id", _JOB),),
    "job-dismiss": (("id", _JOB),),
    "job-finalize": (("id", _JOB),),
    "job-complete": (("id", _JOB),),
    "job-pause": (("id", _JOB),),
    "block-job-cancel": (("device", _JOB),),
    "block-job-complete": (("device", _JOB),),
    "block-job-pause": (("device", _JOB),),
    "block-job-dismiss": (("id", _JOB),),
    "block-job-finalize": (("id", _JOB),),
    # creating something under one of our names (vmbridged's own are vmb-...)
    "device_add": (("id", _DEVICE),),
    "blockdev-add": (("node-name", _NODE),),
    "blockdev-create": (("job-id", _JOB),),
    "chardev-add": (("id", _CHARDEV),),
    "netdev_add": (("id", _NETDEV),),
    "object-add": (("id", _OBJECT),),
}

#: HMP commands (through human-monitor-command) that do the same: name ->
#: (kinds, what) of their first operand, or of their ``id=`` option for
#: the ``*_add`` ones.
_HMP_OWNED = {
    "device_del": _DEVICE,
    "drive_del": _DEVICE_OR_NODE,
    "chardev-remove": _CHARDEV,
    "chardev-change": _CHARDEV,
    "netdev_del": _NETDEV,
    "object_del": _OBJECT,
    "closefd": _FDNAME,
    "getfd": _FDNAME,
    "eject": _DEVICE_OR_NODE,
    "change": _DEVICE_OR_NODE,
    "block_job_cancel": _JOB,
    "block_job_complete": _JOB,
    "block_stream": _NODE,
    "drive_mirror": _NODE,
    "snapshot_blkdev": _NODE,
}
_HMP_CREATE = {
    "device_add": _DEVICE,
    "chardev-add": _CHARDEV,
    "netdev_add": _NETDEV,
    "object_add": _OBJECT,
}

REFUSED_COMMANDS = sorted(_OWNED_ARGUMENTS) + ["blockdev-reopen", "human-monitor-command"]


def _owned(owns, value, kinds) -> bool:
    return any(owns(kind, value) for kind in kinds)


def refusal(command: str, arguments: dict | None, owns) -> str | None:
    """Why vmbridge refuses ``command``, or None to pass it to QEMU.

    The rule: nothing may remove, replace or re-point an object vmbridged
    created, nor take one of its names, through QMP or through HMP
    (``human-monitor-command``), because vmbridged's model of the VM (its
    monitors, its console, its devices, its fds) would silently stop being
    true. ``owns(kind, value)`` is ``DeviceState.owns``: kinds are devices,
    nodes, fdsets, fdnames, netdevs, chardevs, objects and jobs. Everything
    else - ``quit``, ``stop``, migration, the client's own devices - is the
    user's business and goes through; vmbridged's state follows QEMU's events.
    """
    arguments = arguments or {}
    if command == "human-monitor-command":
        return _hmp_refusal(arguments.get("command-line"), owns)
    if command == "blockdev-reopen":
        for options in arguments.get("options") or ():
            node = options.get("node-name") if isinstance(options, dict) else None
            if _owned(owns, node, _NODE[0]):
                return _refused(_NODE[1], node, command)
        return None
    for name, (kinds, what) in _OWNED_ARGUMENTS.get(command, ()):
        value = arguments.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
            continue  # absent, or QEMU will say what is wrong with it
        key = _device_id(value) if "devices" in kinds else value
        if _owned(owns, key, kinds):
            return _refused(what, value, command)
    return None


def _refused(what, value, command) -> str:
    return (f"vmbridge: {what} '{value}' belongs to vmbridged; "
            f"{command} would break vmbridged's bookkeeping")


def _hmp_refusal(command_line, owns) -> str | None:
    if not isinstance(command_line, str):
        return None  # QEMU will say what is wrong with it
    words = command_line.split()
    if not words:
        return None
    name = words[0]
    if name in _HMP_CREATE:
        kinds, what = _HMP_CREATE[name]
        for word in words[1:]:
            for option in word.split(","):
                key, _, value = option.partition("=")
                if key == "id" and _owned(owns, value, kinds):
                    return _refused(what, value, f"HMP {name}")
        return None
    if name not in _HMP_OWNED:
        return None
    operands = [w for w in words[1:] if not w.startswith("-")]
    if not operands:
        return None
    kinds, what = _HMP_OWNED[name]
    target = _device_id(operands[0]) if "devices" in kinds else operands[0]
    if _owned(owns, target, kinds):
        return _refused(what, operands[0], f"HMP {name}")
    return None


# ------------------------------------------------------------------- the hub

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
                    _close_fds(fds)
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
        fds = _fds_from_ancdata(ancdata)
        if flags & socket.MSG_CTRUNC:
            log.warning("%s: %s: more than %d fds in one message, dropped them",
                        self.hub.name, self, MAX_FDS)
            _close_fds(fds)
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
                    _close_fds(self._fds)  # like QEMU: new fds replace unused ones
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
            _close_fds(self._fds)
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
            _close_fds(rest)
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
            _close_fds(fds)
        if self.state is SessionState.CLOSED:
            return  # the client left while QEMU worked: nobody to tell
        self._push(encode(_with_id(reply, has_id, request_id)))

    def _refusal(self, command: str, arguments) -> str | None:
        if command not in _OWNED_ARGUMENTS and command not in ("blockdev-reopen", "human-monitor-command"):
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


def _fds_from_ancdata(ancdata) -> list:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _close_item(item) -> None:
    if item[0] == "fds":
        _close_fds(item[1])
