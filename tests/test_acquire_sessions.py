"""QMPSessions against a scripted QEMU: orderings and failures real QEMU won't produce on cue.

In-process: the sessions run in greenlets on socketpairs, the QMP client under
them talks to tests/mock_qmp.py's peer.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket

import gevent
import gevent.socket
import pytest

from vmbridge.machine.qmp_refusals import refusal
from vmbridge.machine.qmp_sessions import QMPSessions

from mock_qmp import GREETING, establish
from qemu_helpers import TIMEOUT

pytestmark = pytest.mark.usefixtures("no_leaks")


class Peer:
    """A session's client end (a gevent socket)."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.buf = bytearray()

    def send(self, message, fds=()) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf[:] = rest
        return json.loads(line)

    def eof(self) -> bool:
        try:
            while True:
                self.read()
        except EOFError:
            return True

    def negotiate(self) -> None:
        assert self.read()["QMP"]["capabilities"] == []
        self.send({"execute": "qmp_capabilities"})
        assert self.read() == {"return": {}}


def owner(owned):
    """An ``owns(kind, value)`` like DeviceState.owns: listed ids, and vmb-*."""
    def owns(kind, value):
        return value in owned.get(kind, ()) or (isinstance(value, str) and value.startswith("vmb-"))
    return owns


@pytest.fixture
def hub(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    owned = {"chardevs": {"qmp", "serial0"}, "fdsets": {3}}
    sessions = QMPSessions(client, owns=owner(owned), name="mock", max_queued=50)
    sessions.owned = owned
    sessions.server = server
    peers, greenlets = [], []

    def connect(negotiate=True) -> Peer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        greenlets.append(gevent.spawn(sessions.serve, gevent.socket.socket(fileno=theirs.detach()),
                                      b"", peer="test"))
        peer = Peer(gevent.socket.socket(fileno=ours.detach()))
        peers.append(peer)
        if negotiate:
            peer.negotiate()
        return peer

    sessions.connect = connect
    yield sessions
    sessions.close()
    for peer in peers:
        peer.sock.close()
    gevent.joinall(greenlets, timeout=TIMEOUT)
    gevent.sleep(0.01)


def test_ids_are_rewritten_and_restored(hub):
    peer = hub.connect()
    for client_id in ["x", 7, None, [1, {"a": 2}]]:
        peer.send({"execute": "query-status", "id": client_id})
        request = hub.server.expect("query-status")
        assert type(request["id"]) is int and "arguments" not in request
        hub.server.reply(request, {"status": "running"})
        assert peer.read() == {"return": {"status": "running"}, "id": client_id}
    peer.send({"execute": "nope", "arguments": {"a": 1}})
    request = hub.server.expect("nope")
    assert request["arguments"] == {"a": 1}
    hub.server.error(request, "CommandNotFound", "The command nope has not been found")
    assert peer.read() == {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}


def test_events_keep_their_place_around_replies(hub):
    peer = hub.connect()
    other = hub.connect()
    peer.send({"execute": "a", "id": 1})
    request = hub.server.expect("a")
    # Event, reply, event, in one write: the session sees them in that order.
    event = {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BEFORE"}
    after = {"timestamp": {"seconds": 1, "microseconds": 3}, "event": "AFTER", "data": {"x": 1}}
    hub.server.send_raw(b"".join(json.dumps(m).encode() + b"\r\n" for m in
                                 (event, {"return": 5, "id": request["id"]}, after)))
    assert peer.read() == event
    assert peer.read() == {"return": 5, "id": 1}
    assert peer.read() == after
    assert other.read() == event and other.read() == after


def test_each_session_sees_its_replies_in_its_order(hub):
    a = hub.connect()
    b = hub.connect()
    a.send(b'{"execute": "a1", "id": 1}\n{"execute": "a2", "id": 2}\n')
    b.send({"execute": "b1", "id": 1})
    first = [hub.server.receive(), hub.server.receive()]
    # Only one command per session is in QEMU at a time.
    assert sorted(r["execute"] for r in first) == ["a1", "b1"]
    by_name = {r["execute"]: r for r in first}
    hub.server.reply(by_name["b1"], "B1")
    hub.server.reply(by_name["a1"], "A1")
    assert b.read() == {"return": "B1", "id": 1}
    assert a.read() == {"return": "A1", "id": 1}
    a2 = hub.server.expect("a2")
    hub.server.reply(a2, "A2")
    assert a.read() == {"return": "A2", "id": 2}


def test_refusals_never_reach_qemu(hub):
    peer = hub.connect()
    for command, arguments in [("chardev-remove", {"id": "serial0"}), ("remove-fd", {"fdset-id": 3}),
                               ("add-fd", {"fdset-id": 3}), ("device_add", {"driver": "x", "id": "vmb-new"}),
                               ("human-monitor-command", {"command-line": "chardev-remove qmp"})]:
        peer.send({"execute": command, "arguments": arguments, "id": command})
        reply = peer.read()
        assert reply["id"] == command and reply["error"]["desc"].startswith("vmbridge: ")
    hub.owned["devices"] = {"dev1"}  # asked afresh for every command
    peer.send({"execute": "device_del", "arguments": {"id": "/machine/peripheral/dev1"}})
    assert "device '/machine/peripheral/dev1' belongs to vmbridged" in peer.read()["error"]["desc"]
    peer.send({"execute": "device_del", "arguments": {"id": "serial0"}})  # a chardev of ours, no device
    hub.server.reply(hub.server.expect("device_del"))
    assert peer.read() == {"return": {}}


def test_owned_ids_failing_refuses(hub, caplog):
    peer = hub.connect()
    hub.owns = lambda kind, value: 1 / 0
    peer.send({"execute": "device_del", "arguments": {"id": "x"}})
    assert "cannot tell which objects vmbridged owns" in peer.read()["error"]["desc"]
    peer.send({"execute": "query-status"})         # others do not ask
    hub.server.reply(hub.server.expect("query-status"), {})
    assert peer.read() == {"return": {}}


def test_fds_are_forwarded_with_getfd(hub):
    peer = hub.connect()
    r, w = os.pipe()
    try:
        peer.send(b" ", fds=[r, w])                 # ahead of the command, as qemu.qmp does
        peer.send({"execute": "getfd", "arguments": {"fdname": "f"}})
        request = hub.server.expect("getfd")
        assert len(hub.server.received_fds) == 1    # the first; the other closed
        assert os.fstat(hub.server.received_fds[0]).st_ino == os.fstat(r).st_ino
        hub.server.reply(request)
        assert peer.read() == {"return": {}}
        peer.send({"execute": "getfd", "arguments": {"fdname": "g"}})
        assert peer.read()["error"]["desc"] == "No file descriptor supplied via SCM_RIGHTS"
        # Fds that no command took are closed when the session ends.
        peer.send(b" ", fds=[w])
    finally:
        os.close(r)
        os.close(w)


def test_a_session_that_stops_reading_is_dropped(hub, caplog):
    sleeper = hub.connect()
    sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    reader = hub.connect()
    event = {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "X", "data": {"pad": "p" * 500}}
    for _ in range(400):
        hub.server.send(event)
        assert reader.read() == event
    assert len(hub) == 1
    assert "it stopped reading" in caplog.text
    assert sleeper.eof()


def test_upstream_eof_flushes_and_closes(hub):
    a = hub.connect()
    b = hub.connect(negotiate=False)
    a.send({"execute": "slow", "id": "s"})
    request = hub.server.expect("slow")
    hub.server.send_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    hub.server.reply(request)
    hub.server.close()
    assert a.read()["event"] == "SHUTDOWN"
    assert a.read() == {"return": {}, "id": "s"}
    assert a.eof()
    assert b.read()["QMP"]
    assert b.eof()
    assert hub.closed and len(hub) == 0
    # A late comer is closed at once.
    assert hub.connect(negotiate=False).eof()


def test_client_leaving_mid_command(hub, caplog):
    caplog.set_level(logging.INFO)
    a = hub.connect()
    a.send(b'{"execute": "slow"}\n{"execute": "never"}\n')
    request = hub.server.expect("slow")
    a.sock.close()
    gevent.sleep(0.05)
    assert len(hub) == 0
    hub.server.reply(request)                       # nobody to tell: dropped quietly
    b = hub.connect()
    b.send({"execute": "next"})
    hub.server.reply(hub.server.expect("next"))     # "never" was never sent
    assert b.read() == {"return": {}}
    assert "unknown id" not in caplog.text


def test_client_done_sending_gets_every_reply(hub):
    a = hub.connect()
    a.send(b'{"execute": "one", "id": 1}\n{"execute": "two", "id": 2}\n')
    a.sock.shutdown(socket.SHUT_WR)             # done sending, still reading
    for name in ("one", "two"):
        hub.server.reply(hub.server.expect(name), name)
    assert a.read() == {"return": "one", "id": 1}
    assert a.read() == {"return": "two", "id": 2}
    assert a.eof()
    gevent.sleep(0.01)
    assert len(hub) == 0


def test_client_done_sending_but_not_reading_is_closed(hub, monkeypatch):
    import vmbridge.machine.qmp_sessions as qmp_sessions
    monkeypatch.setattr(qmp_sessions, "FLUSH_TIMEOUT", 0.2)
    a = hub.connect()
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    a.send({"execute": "big"})
    a.sock.shutdown(socket.SHUT_WR)
    hub.server.reply(hub.server.expect("big"), "x" * 1_000_000)
    with gevent.Timeout(TIMEOUT):
        while len(hub):
            gevent.sleep(0.05)


def test_session_limit(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    sessions = QMPSessions(client, max_sessions=1)
    assert not sessions.full
    ours, theirs = socket.socketpair()
    g = gevent.spawn(sessions.serve, gevent.socket.socket(fileno=theirs.detach()))
    gevent.sleep(0.01)
    assert sessions.full
    ours.close()
    g.join(timeout=TIMEOUT)
    assert not sessions.full


def test_greeting_is_qemus_without_capabilities(hub):
    peer = hub.connect(negotiate=False)
    assert peer.read() == {"QMP": {"version": GREETING["QMP"]["version"], "capabilities": []}}


OWNED = {"devices": {"disk0"}, "nodes": {"disk0-fmt"}, "chardevs": {"qmp"}, "netdevs": {"net0"},
         "objects": {"mem"}, "fdnames": {"fd0"}, "fdsets": {3}, "jobs": {"job0"}}


@pytest.mark.parametrize("command,arguments,refused", [
    ("device_del", {"id": "mine"}, False),
    ("device_del", {"id": "disk0"}, True),
    ("device_del", {"id": "/machine/peripheral/disk0"}, True),
    ("device_del", {"id": "net0"}, False),            # a netdev of ours, not a device
    ("device_del", {"id": "vmb-later"}, True),        # vmbridged's namespace
    ("blockdev-del", {"node-name": "disk0-fmt"}, True),
    ("chardev-remove", {"id": "qmp"}, True),
    ("chardev-change", {"id": "qmp"}, True),
    ("netdev_del", {"id": "net0"}, True),
    ("object-del", {"id": "mem"}, True),
    ("closefd", {"fdname": "fd0"}, True),
    ("getfd", {"fdname": "fd0"}, True),
    ("getfd", {"fdname": "mine"}, False),
    ("remove-fd", {"fdset-id": 3}, True),
    ("remove-fd", {"fdset-id": 4}, False),
    ("remove-fd", {"fdset-id": True}, False),
    ("add-fd", {}, False),
    ("eject", {"device": "disk0"}, True),
    ("eject", {"id": "disk0"}, True),
    ("blockdev-change-medium", {"id": "disk0", "filename": "x"}, True),
    ("blockdev-mirror", {"device": "disk0-fmt", "target": "t", "sync": "full"}, True),
    ("blockdev-backup", {"device": "disk0-fmt", "target": "t", "sync": "full"}, False),
    ("blockdev-reopen", {"options": [{"node-name": "mine"}, {"node-name": "disk0-fmt"}]}, True),
    ("blockdev-reopen", {"options": [{"node-name": "mine"}]}, False),
    ("blockdev-reopen", {"options": "junk"}, False),
    ("job-cancel", {"id": "job0"}, True),
    ("device_add", {"driver": "virtio-rng-pci", "id": "vmb-rng"}, True),
    ("device_add", {"driver": "virtio-rng-pci", "id": "rng"}, False),
    ("blockdev-add", {"driver": "null-co", "node-name": "vmb-n"}, True),
    ("chardev-add", {"id": "qmp", "backend": {}}, True),
    ("object-add", {"qom-type": "iothread", "id": "mem"}, True),
    ("quit", None, False),
    ("human-monitor-command", {"command-line": "device_del disk0"}, True),
    ("human-monitor-command", {"command-line": "eject -f disk0"}, True),
    ("human-monitor-command", {"command-line": "drive_del disk0-fmt"}, True),
    ("human-monitor-command", {"command-line": "device_add virtio-rng-pci,id=vmb-x"}, True),
    ("human-monitor-command", {"command-line": "device_add virtio-rng-pci,id=x"}, False),
    ("human-monitor-command", {"command-line": "info chardev"}, False),
    ("human-monitor-command", {"command-line": "device_del"}, False),
    ("human-monitor-command", {"command-line": 5}, False),
])
def test_refusal_rule(command, arguments, refused):
    assert (refusal(command, arguments, owner(OWNED)) is not None) == refused


def test_oob_is_not_offered(hub):
    peer = hub.connect(negotiate=False)
    assert peer.read()["QMP"]["capabilities"] == []
    peer.send({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1})
    assert peer.read() == {"id": 1, "error": {"class": "GenericError", "desc": "Capability oob not available"}}
    peer.send({"execute": "query-status"})          # still negotiating
    assert peer.read()["error"]["class"] == "CommandNotFound"
    peer.send({"execute": "qmp_capabilities", "arguments": {"enable": []}})
    assert peer.read() == {"return": {}}
    peer.send({"exec-oob": "query-status", "id": 2})
    assert peer.read() == {"id": 2, "error": {"class": "GenericError",
                                              "desc": "QMP input member 'exec-oob' is unexpected"}}
