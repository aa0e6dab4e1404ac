"""AcquireQMP on real QEMU (-machine none) VMs run by a real vmbridged.

Clients here are plain sockets (gevent ones where several must overlap), one
raw QEMU is the reference for what a QMP monitor answers, and QEMU's own
``qemu.qmp`` library, in a subprocess, is the third-party client.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import subprocess
import sys
import time

import gevent
import gevent.socket
import psutil
import pytest

from conftest import ROOT, raw_call, read_message
from qemu_helpers import kill_qemu, spawn_qemu_socketpair
from vmbridge.varlink.client import Connection, VarlinkError

ACQUIRE = "io.systemd.QemuMachineInstance.AcquireQMP"
TIMEOUT = 30


class QMP:
    """A blocking QMP client on any connected socket (stdlib or gevent)."""

    def __init__(self, sock, pending: bytes = b""):
        self.sock = sock
        self.buf = bytearray(pending)
        self.events: list[dict] = []

    @classmethod
    def acquire(cls, control: str, *, cooperative: bool = False) -> "QMP":
        conn = Connection(control, timeout=TIMEOUT)
        sock, pending = conn.call_upgrade(ACQUIRE)
        if cooperative:
            sock = gevent.socket.socket(sock.family, sock.type, fileno=sock.detach())
        sock.settimeout(TIMEOUT)
        return cls(sock, pending)

    def send(self, data) -> None:
        if not isinstance(data, bytes):
            data = json.dumps(data).encode() + b"\n"
        self.sock.sendall(data)

    def read_raw(self) -> bytes:
        """The next line as sent (with its CRLF); EOFError when closed."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP session closed")
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf[:] = rest
        return line + b"\n"

    def read(self) -> dict:
        return json.loads(self.read_raw())

    def reply(self) -> dict:
        """The next reply; events met on the way are kept in ``events``."""
        while True:
            message = self.read()
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def cmd(self, command: str, arguments=None, **extra) -> dict:
        message = {"execute": command, **extra}
        if arguments is not None:
            message["arguments"] = arguments
        self.send(message)
        return self.reply()

    def negotiate(self) -> dict:
        greeting = self.read()
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return greeting

    def event(self, name: str) -> dict:
        for i, event in enumerate(self.events):
            if event["event"] == name:
                return self.events.pop(i)
        while True:
            message = self.read()
            if message.get("event") == name:
                return message
            if "event" in message:
                self.events.append(message)
            else:
                raise AssertionError(f"reply while waiting for {name}: {message}")

    def closed(self, timeout: float = TIMEOUT) -> bool:
        """Read until EOF (True) or timeout (False); events are dropped."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


class Stream:
    """A varlink SubscribeEvents stream."""

    def __init__(self, control: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(control)
        self.buf = bytearray()
        self.sock.sendall(b'{"method":"io.systemd.MachineInstance.SubscribeEvents","parameters":{},"more":true}\0')
        assert self.next() == {"event": "READY"}

    def next(self) -> dict:
        return json.loads(read_message(self.sock, self.buf))["parameters"]

    def close(self):
        self.sock.close()


def full_log(daemon) -> str:
    with open(daemon.log_path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def describe(control: str) -> dict:
    return raw_call(control, {"method": "io.systemd.MachineInstance.Describe", "parameters": {}})["parameters"]


@pytest.fixture
def vm(daemon):
    daemon.create("t1")
    return daemon.control_socket("t1")


# --------------------------------------------------------------- the protocol

def test_call_without_upgrade_gets_expected_upgrade(vm):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(vm)
        sock.sendall(json.dumps({"method": ACQUIRE, "parameters": {}}).encode() + b"\0")
        assert read_message(sock) == b'{"error":"org.varlink.service.ExpectedUpgrade"}'
    with Connection(vm, timeout=TIMEOUT) as conn:
        with pytest.raises(VarlinkError) as info:
            conn.call(ACQUIRE)
        assert info.value.error == "org.varlink.service.ExpectedUpgrade"


# Each input is followed by a command with a unique id: everything QEMU says
# up to that id's reply is what it said to the input.
PRE_NEGOTIATION = [
    b'{"execute": "query-version"}\n',
    b'{"execute": "nope", "id": 1}\n',
    b'{"id": 3}\n',
    b'{"execute": 3, "id": 4}\n',
    b'{"exec-oob": "query-version", "id": 5}\n',
    b'{"execute": "query-version", "arguments": []}\n',
    b'{"execute": "query-version", "foo": 1}\n',
    b'{"execute": "qmp_capabilities", "arguments": {"foo": 1}, "id": 2}\n',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}\n',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}\n',
    b"garbage\n",
    b"foo bar\n",
    b"42\n",
    b"[1, 2]\n",
    b"}\n",
    b'{"a":}\n',
    b'"\n',
    b'{"execute": "query-version", "id": 1, "id": 2}\n',
    b'{"execute": "qmp_capabilities", "id": "negotiated"}\n',
]
POST_NEGOTIATION = [
    b'{"execute": "qmp_capabilities", "id": [1, 2]}\n',
    b'{"execute": "qmp_capabilities"}\n',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}, "id": 7}\n',
    b'{"execute": "query-version", "id": {"a": null, "b": [true, 1.5]}}\n',
    b'{"execute": "query-version", "id": null}\n',
    b'{"execute": "nope", "id": true}\n',
    b'{"execute": "stop", "arguments": {"x": 1}, "id": 1}\n',
    b'{"exec-oob": "stop", "id": 5}\n',
    b'{"execute": "stop", "exec-oob": "stop"}\n',
    b"{'execute': 'query-version', 'id': 'single\\'quoted'}\n",
    b'{"execute":\n"query-version"}{"execute": "query-version", "id": "two"}\n',
    b'{"execute": "human-monitor-command", "arguments": {"command-line": "info version"}, "id": "hmp"}\n',
    b"\xff\n",
]


def converse(sock, buf: bytearray, inputs) -> list[list[bytes]]:
    out = []
    for n, data in enumerate(inputs):
        sync = f"sync-{n}"
        sock.sendall(data + json.dumps({"execute": "query-version", "id": sync}).encode() + b"\n")
        said = []
        while True:
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                assert chunk, f"closed after {data!r}"
                buf += chunk
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            message = json.loads(line)
            if message.get("id") == sync:
                break
            said.append(line + b"\n")
        out.append(said)
    return out


def test_session_answers_like_qemu(vm):
    """The same input to a bare QEMU 7.2 monitor and to a session: the same answers."""
    proc, qemu = spawn_qemu_socketpair()
    try:
        qemu.settimeout(TIMEOUT)
        qemu_buf = bytearray()
        qemu_greeting = read_line(qemu, qemu_buf)
        session = QMP.acquire(vm)
        greeting = session.read_raw()
        # QEMU's own greeting, but no capabilities (oob is not offered).
        assert json.loads(greeting) == {"QMP": {**json.loads(qemu_greeting)["QMP"], "capabilities": []}}
        assert greeting.endswith(b"}}\r\n") and greeting.startswith(b'{"QMP": {"version": {"qemu": {')
        for inputs in (PRE_NEGOTIATION, POST_NEGOTIATION):
            ours = converse(session.sock, session.buf, inputs)
            theirs = converse(qemu, qemu_buf, inputs)
            for data, a, b in zip(inputs, ours, theirs):
                assert [json.loads(x) for x in a] == [json.loads(x) for x in b], data
                assert a, data
        # Byte for byte, too, where no escaping is involved.
        assert ours[1] == theirs[1] and ours[4] == theirs[4]
        session.close()
    finally:
        qemu.close()
        kill_qemu(proc)


def read_line(sock, buf) -> bytes:
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line + b"\n"


def test_no_events_before_negotiation(vm):
    early = QMP.acquire(vm)
    early.read()                       # greeting
    late = QMP.acquire(vm)
    late.negotiate()
    assert late.cmd("stop") == {"return": {}}
    assert late.cmd("cont") == {"return": {}}
    assert [e["event"] for e in late.events] == ["STOP", "RESUME"]
    assert early.cmd("qmp_capabilities", id=1) == {"return": {}, "id": 1}
    assert early.cmd("query-status") == {"return": {"status": "running", "singlestep": False, "running": True}}
    assert early.events == []          # STOP and RESUME happened before it negotiated
    early.close()
    late.close()


# ------------------------------------------------------------- concurrency

IDS = [1, "two", [3, "three"], {"four": 4}, None, True, 6.5, "", -7, {"nested": [{"x": None}]}]


def test_sessions_interleave_with_each_other_and_the_daemon(vm):
    """Two sessions and varlink callers at once: each reply reaches its sender, in order."""
    a = QMP.acquire(vm, cooperative=True)
    b = QMP.acquire(vm, cooperative=True)
    a.negotiate()
    b.negotiate()

    def pipelined(session, tag, rounds):
        """Batches of 8 without waiting; unknown commands name themselves in the error."""
        got = []
        for r in range(rounds):
            batch = []
            for i in range(8):
                n = r * 8 + i
                if n % 3 == 0:
                    message = {"execute": f"x-nope-{tag}-{n}"}                  # no id at all
                elif n % 3 == 1:
                    message = {"execute": f"x-nope-{tag}-{n}", "id": IDS[n % len(IDS)]}
                else:
                    message = {"execute": "query-version", "id": [tag, n]}
                batch.append(message)
            session.send(b"".join(json.dumps(m).encode() + b"\n" for m in batch))
            for message in batch:
                got.append((message, session.reply()))
        return got

    def one_by_one(session, tag, count):
        got = []
        for n in range(count):
            message = {"execute": f"x-nope-{tag}-{n}", "id": IDS[n % len(IDS)]}
            session.send(message)
            got.append((message, session.reply()))
        return got

    def pause_resume():
        for _ in range(30):
            assert varlink(vm, "Pause") == {}
            assert describe_cooperative(vm) == {"running": False, "status": "paused"}
            assert varlink(vm, "Resume") == {}
            assert describe_cooperative(vm) == {"running": True, "status": "running"}

    def describer():
        for _ in range(100):
            assert describe_cooperative(vm)["status"] in ("running", "paused")

    jobs = [gevent.spawn(pipelined, a, "a", 25), gevent.spawn(one_by_one, b, "b", 150),
            gevent.spawn(pause_resume), gevent.spawn(describer)]
    gevent.joinall(jobs, timeout=120, raise_error=True)
    assert all(job.successful() for job in jobs)
    for job in jobs[:2]:
        for message, reply in job.value:
            if message["execute"] == "query-version":
                assert set(reply) == {"return", "id"} and reply["id"] == message["id"]
                assert reply["return"]["qemu"]["major"] >= 7
            else:
                expected = {"error": {"class": "CommandNotFound",
                                      "desc": f"The command {message['execute']} has not been found"}}
                if "id" in message:
                    expected = {"id": message["id"], **expected}
                assert reply == expected
                assert list(reply) == list(expected)     # QEMU's key order: id first in errors
    # Both sessions saw every STOP/RESUME of the varlink callers (they were
    # queued before Resume's varlink reply went out, so before this reply).
    for session in (a, b):
        assert session.cmd("query-version", id="sync")["id"] == "sync"
        names = [e["event"] for e in session.events]
        assert names.count("STOP") == 30 and names.count("RESUME") == 30, names
    a.close()
    b.close()


def varlink(control, method):
    sock = gevent.socket.socket(socket.AF_UNIX)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(control)
        sock.sendall(json.dumps({"method": f"io.systemd.MachineInstance.{method}",
                                 "parameters": {}}).encode() + b"\0")
        reply = json.loads(read_message(sock))
    finally:
        sock.close()
    assert "error" not in reply, reply
    return reply.get("parameters", {})


def describe_cooperative(control):
    return varlink(control, "Describe")


def test_stop_and_cont_from_a_session_reach_varlink(vm):
    stream = Stream(vm)
    a = QMP.acquire(vm)
    b = QMP.acquire(vm)
    a.negotiate()
    b.negotiate()
    try:
        a.send({"execute": "stop", "id": "s"})
        # QEMU's order: STOP, then the reply to stop.
        assert a.read()["event"] == "STOP"
        assert a.read() == {"return": {}, "id": "s"}
        # The Machine handles each event before the sessions see it.
        assert describe(vm) == {"running": False, "status": "paused"}
        assert stream.next() == {"event": "STOP"}
        assert b.event("STOP")["event"] == "STOP"
        assert a.cmd("cont") == {"return": {}}
        assert stream.next() == {"event": "RESUME"}
        assert describe(vm) == {"running": True, "status": "running"}
        assert b.event("RESUME")["event"] == "RESUME"
        # And the other way round: varlink's Pause reaches the sessions.
        assert raw_call(vm, {"method": "io.systemd.MachineInstance.Pause", "parameters": {}}) == {}
        assert a.event("STOP") and b.event("STOP") and stream.next() == {"event": "STOP"}
        assert b.cmd("query-status")["return"]["status"] == "paused"
        assert b.cmd("system_powerdown") == {"return": {}}
        assert stream.next() == {"event": "POWERDOWN"}
        assert a.event("POWERDOWN")["event"] == "POWERDOWN"
    finally:
        a.close()
        b.close()
        stream.close()


# ---------------------------------------------------------- misbehaviour

def test_garbage_closes_only_that_session(vm, daemon):
    good = QMP.acquire(vm)
    good.negotiate()
    bad = QMP.acquire(vm)
    bad.negotiate()
    # A few mistakes are answered, as QEMU does, and the session goes on.
    bad.send(b"oops\n")
    assert bad.reply() == {"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'oops'"}}
    assert bad.cmd("query-status", id=1)["id"] == 1
    # A stream of garbage is not.
    bad.send(b"\x00garbage\xff\n" * 40)
    assert bad.closed()
    assert good.cmd("query-status", id=2)["return"]["running"] is True
    # Nor is a line that never ends.
    long = QMP.acquire(vm)
    long.negotiate()
    try:
        long.send(b'{"execute": "query-status", "id": "' + b"x" * (2 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert long.closed()
    assert good.cmd("query-status", id=3)["id"] == 3
    assert describe(vm)["running"] is True
    log = full_log(daemon)
    assert "malformed inputs in a row" in log and "without the end of a message" in log
    good.close()


def test_a_session_that_never_reads_is_dropped(vm, daemon):
    sleeper = QMP.acquire(vm)
    sleeper.negotiate()
    sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    worker = QMP.acquire(vm)
    worker.negotiate()
    stream = Stream(vm)
    poller = select.poll()
    poller.register(sleeper.sock, select.POLLRDHUP)
    pairs = 0
    slowest = 0.0
    started = time.monotonic()
    while not poller.poll(0):
        assert pairs < 3000, "the session that never reads was never dropped"
        t = time.monotonic()
        worker.send(b'{"execute":"stop"}\n{"execute":"cont"}\n' * 10)
        for _ in range(20):
            assert worker.reply() == {"return": {}}
        worker.events.clear()
        for _ in range(20):
            assert stream.next()["event"] in ("STOP", "RESUME")   # the daemon's subscribers keep up too
        slowest = max(slowest, time.monotonic() - t)
        pairs += 10
    assert slowest < 5, f"a batch of 20 commands took {slowest:.1f}s"
    assert "it stopped reading" in full_log(daemon)
    assert worker.cmd("query-status")["return"]["status"] == "running"
    print(f"dropped after {pairs} stop/cont pairs in {time.monotonic() - started:.1f}s")
    worker.close()
    sleeper.close()
    stream.close()


def test_client_leaving_with_commands_pending(vm, daemon):
    for _ in range(3):
        quitter = QMP.acquire(vm)
        quitter.negotiate()
        quitter.send(b'{"execute": "query-qmp-schema"}\n' * 8 + b'{"execute": "stop"}\n')
        quitter.close()
    time.sleep(0.5)
    after = QMP.acquire(vm)
    after.negotiate()
    assert after.cmd("query-version", id="v")["id"] == "v"
    assert describe(vm)["status"] in ("running", "paused")
    assert "QMP reply with unknown id" not in full_log(daemon)
    after.close()


def test_client_done_sending_gets_every_reply(vm):
    """As from QEMU: commands sent before a half-close are all answered."""
    session = QMP.acquire(vm)
    session.send(b'{"execute": "qmp_capabilities"}\n' + b"".join(
        b'{"execute": "query-version", "id": %d}\n' % i for i in range(20)))
    session.sock.shutdown(socket.SHUT_WR)
    session.read()                                   # greeting
    assert session.reply() == {"return": {}}
    assert [session.reply()["id"] for _ in range(20)] == list(range(20))
    assert session.closed()


def test_many_sessions_and_the_limit(vm):
    sessions = [QMP.acquire(vm) for _ in range(64)]
    with Connection(vm, timeout=TIMEOUT) as conn:
        with pytest.raises(VarlinkError) as info:
            conn.call_upgrade(ACQUIRE)
        assert info.value.error == "io.systemd.System"
        assert info.value.parameters["errnoName"] == "EMFILE"
    for s in sessions:
        s.close()
    time.sleep(0.3)
    s = QMP.acquire(vm)
    s.negotiate()
    s.close()


# ------------------------------------------------------------- refusals, fds

REFUSED = [
    ("chardev-remove", {"id": "qmp"}),
    ("chardev-remove", {"id": "qmp-reattach"}),
    ("chardev-change", {"id": "qmp-reattach", "backend": {"type": "null", "data": {}}}),
    ("chardev-add", {"id": "vmb-mine", "backend": {"type": "null", "data": {}}}),
    ("device_del", {"id": "/machine/peripheral/vmb-port0"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "vmb-node"}),
    ("object-add", {"qom-type": "iothread", "id": "vmb-io"}),
    ("human-monitor-command", {"command-line": "chardev-remove qmp"}),
    ("human-monitor-command", {"command-line": "  chardev-add   null,id=vmb-x"}),
]


def test_refused_commands(vm):
    session = QMP.acquire(vm)
    session.negotiate()
    for command, arguments in REFUSED:
        reply = session.cmd(command, arguments, id="r")
        assert list(reply) == ["id", "error"] and reply["id"] == "r", command
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"].startswith("vmbridge: ") and "belongs to vmbridged" in reply["error"]["desc"]
    # Nothing happened: the monitor chardevs are still there, nothing vmb-* was made.
    labels = {c["label"] for c in session.cmd("query-chardev")["return"]}
    assert {"qmp", "qmp-reattach"} <= labels and "vmb-mine" not in labels and "vmb-x" not in labels
    assert session.cmd("query-named-block-nodes")["return"] == []
    assert session.cmd("query-iothreads")["return"] == []
    session.close()
    assert describe(vm)["running"] is True


def test_clients_own_objects_are_theirs(vm):
    session = QMP.acquire(vm)
    session.negotiate()
    assert session.cmd("chardev-add", {"id": "mine", "backend": {"type": "null", "data": {}}}) == {"return": {}}
    assert session.cmd("human-monitor-command", {"command-line": "chardev-remove mine"}) == {"return": ""}
    assert session.cmd("chardev-add", {"id": "mine", "backend": {"type": "null", "data": {}}}) == {"return": {}}
    assert session.cmd("chardev-remove", {"id": "mine"}) == {"return": {}}
    session.close()


def send_with_fds(session, data: bytes, fds):
    session.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_file_descriptors(vm, daemon):
    session = QMP.acquire(vm)
    session.negotiate()
    # Without SCM_RIGHTS, QEMU's own answer.
    no_fd = {"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}
    assert session.cmd("getfd", {"fdname": "x"}) == no_fd
    assert session.cmd("add-fd") == no_fd
    r, w = os.pipe()
    try:
        # With the command, as libvirt does...
        send_with_fds(session, b'{"execute": "getfd", "arguments": {"fdname": "mine"}, "id": 1}\n', [r])
        assert session.reply() == {"return": {}, "id": 1}
        assert session.cmd("closefd", {"fdname": "mine"}) == {"return": {}}
        # ...or ahead of it, as qemu.qmp does (one space carries the fds); the
        # first fd is used, the others closed, as QEMU does.
        send_with_fds(session, b" ", [w, r])
        reply = session.cmd("add-fd", {"opaque": "test"})
        assert reply["return"]["fdset-id"] >= 0
        fdset = reply["return"]["fdset-id"]
        sets = session.cmd("query-fdsets")["return"]
        assert [s["fds"][0]["opaque"] for s in sets if s["fdset-id"] == fdset] == ["test"]
        assert session.cmd("remove-fd", {"fdset-id": fdset}) == {"return": {}}
        # Used up: the next getfd has none.
        assert session.cmd("getfd", {"fdname": "again"}) == no_fd
    finally:
        os.close(r)
        os.close(w)
    session.close()
    daemon_pid = daemon.proc.pid
    time.sleep(0.2)
    leaked = [f for f in psutil.Process(daemon_pid).open_files() if "pipe" in f.path]
    assert not leaked


# ------------------------------------------------------------------ quit

def test_quit_from_a_session_ends_the_vm(vm, daemon):
    stream = Stream(vm)
    quitter = QMP.acquire(vm)
    quitter.negotiate()
    other = QMP.acquire(vm)
    other.negotiate()
    waiting = QMP.acquire(vm)           # not even negotiated
    waiting.read()
    pid = daemon.call("List")["parameters"]["machines"][0]["pid"]
    quitter.send({"execute": "quit", "id": "bye"})
    said = []
    try:
        while True:
            said.append(quitter.read())
    except EOFError:
        pass
    # In QEMU 7.2's order: SHUTDOWN, then the reply, then EOF.
    assert said[0]["event"] == "SHUTDOWN"
    assert said[1:] == [{"return": {}, "id": "bye"}]
    assert other.event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert other.closed()
    assert waiting.closed()
    assert stream.next()["event"] == "SHUTDOWN"
    final = stream.next()
    assert final["event"] == "EXITED" and final["data"]["reason"] == "host-qmp-quit"
    deadline = time.monotonic() + TIMEOUT
    while os.path.exists(vm) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(vm)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert daemon.call("List")["parameters"]["machines"] == []
    for s in (quitter, other, waiting):
        s.close()
    stream.close()


def test_terminate_through_varlink_closes_sessions(vm):
    session = QMP.acquire(vm)
    session.negotiate()
    assert raw_call(vm, {"method": "io.systemd.MachineInstance.Terminate", "parameters": {}}) == {}
    assert session.event("SHUTDOWN")
    assert session.closed()
    with pytest.raises(OSError):
        Connection(vm, timeout=5)


# ------------------------------------------------------------ qemu.qmp

QEMU_QMP_CLIENT = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[2])
from qemu.qmp import EventListener, QMPClient
from vmbridge.varlink.client import Connection

async def main():
    sock, pending = Connection(sys.argv[1], timeout=10).call_upgrade(
        "io.systemd.QemuMachineInstance.AcquireQMP")
    assert not pending
    qmp = QMPClient("vmbridge-test")
    await qmp.connect(sock)
    out = {"capabilities": list(qmp.greeting.QMP.capabilities),
           "qemu": qmp.greeting.QMP.version["qemu"]["major"]}
    out["status"] = await qmp.execute("query-status")
    listener = EventListener()
    with qmp.listen(listener):
        await qmp.execute("stop")
        out["event"] = (await asyncio.wait_for(listener.get(), 10))["event"]
        await qmp.execute("cont")
    try:
        await qmp.execute("chardev-remove", {"id": "qmp"})
    except Exception as e:
        out["refused"] = str(e)
    await qmp.disconnect()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_qemu_qmp_library(vm):
    """QEMU's own Python QMP library, over an upgraded connection."""
    pytest.importorskip("qemu.qmp", reason="qemu.qmp is a test dependency (pip install qemu.qmp)")
    out = subprocess.run([sys.executable, "-c", QEMU_QMP_CLIENT, vm, ROOT],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["capabilities"] == [] and result["qemu"] >= 7
    assert result["status"] == {"status": "running", "singlestep": False, "running": True}
    assert result["event"] == "STOP"
    assert "vmbridge: chardev 'qmp' belongs to vmbridged" in result["refused"]
    assert describe(vm)["running"] is True
