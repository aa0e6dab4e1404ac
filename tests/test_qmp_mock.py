"""QMPClient against a scripted peer: what a real QEMU cannot be made to do."""

import array
import fcntl
import logging
import os
import termios

import gevent
import pytest

from vmbridge.qmp import (QMPCommandError, QMPDisconnectedError,
                          QMPListenerClosedError, QMPListenerOverflowError,
                          QMPProtocolError, QMPTimeoutError, State)

# Shared test modules: rewrite their asserts too (before importing them).
from mock_qmp import GREETING, establish, make_pair
from qemu_helpers import TIMEOUT

pytestmark = pytest.mark.usefixtures("no_leaks")


def spawn_execute(client, *args, **kwargs):
    kwargs.setdefault("timeout", TIMEOUT)
    return gevent.spawn(client.execute, *args, **kwargs)


def wait_disconnected(client):
    with gevent.Timeout(TIMEOUT):
        while client.state is not State.DISCONNECTED:
            gevent.sleep(0.001)


# -- handshake -------------------------------------------------------------------

def test_handshake_state_progression(mock_qmp):
    client, server = mock_qmp
    client.start()
    gevent.sleep(0)
    assert client.state is State.HANDSHAKE_INITIAL
    server.send(GREETING)
    request = server.expect("qmp_capabilities")
    assert client.state is State.CAPABILITIES_SENT
    assert client.version == GREETING["QMP"]["version"]
    assert client.capabilities == ["oob"]
    assert "arguments" not in request  # we enable no capability (no oob)
    server.reply(request)
    client.handshake(timeout=TIMEOUT)
    assert client.state is State.RUNNING


def test_commands_wait_for_the_handshake(mock_qmp):
    client, server = mock_qmp
    call = spawn_execute(client, "query-status")  # starts the pump
    gevent.sleep(0.01)
    server.send(GREETING)
    capabilities = server.receive()
    assert capabilities["execute"] == "qmp_capabilities"  # nothing else before it
    server.reply(capabilities)
    request = server.expect("query-status")
    server.reply(request, {"status": "running"})
    assert call.get(timeout=TIMEOUT) == {"status": "running"}


def test_stalled_handshake_times_out(mock_qmp):
    client, server = mock_qmp
    with pytest.raises(QMPTimeoutError):
        client.handshake(timeout=0.05)
    assert client.state is State.HANDSHAKE_INITIAL
    server.send(GREETING)
    server.expect("qmp_capabilities")  # and never answer it
    with pytest.raises(QMPTimeoutError):
        client.handshake(timeout=0.05)
    assert client.state is State.CAPABILITIES_SENT
    with pytest.raises(QMPTimeoutError):
        client.execute("query-status", timeout=0.05)


def test_refused_capabilities_is_a_protocol_error(mock_qmp):
    client, server = mock_qmp
    client.start()
    server.send(GREETING)
    server.error(server.expect("qmp_capabilities"), "GenericError", "no")
    with pytest.raises(QMPProtocolError, match="qmp_capabilities"):
        client.handshake(timeout=TIMEOUT)
    assert isinstance(client.disconnect_reason, QMPProtocolError)
    with pytest.raises(QMPDisconnectedError):
        client.execute("query-status")


def test_first_message_must_be_the_greeting(mock_qmp):
    client, server = mock_qmp
    client.start()
    server.send({"return": {}})
    with pytest.raises(QMPProtocolError, match="greeting"):
        client.handshake(timeout=TIMEOUT)


# -- replies and events ------------------------------------------------------------

def test_events_interleave_with_replies(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    names = []
    client.on_event(lambda event: names.append(event.name))
    listener = client.listen()
    first = spawn_execute(client, "stop")
    request = server.expect("stop")
    server.send_event("STOP", {"reason": "test"})
    second = spawn_execute(client, "query-status")
    other = server.expect("query-status")
    server.send_event("A")
    server.reply(request)
    server.send_event("B")
    server.reply(other, {"status": "paused"})
    assert first.get(timeout=TIMEOUT) == {}
    assert second.get(timeout=TIMEOUT) == {"status": "paused"}
    assert names == ["STOP", "A", "B"]
    stop = listener.get(timeout=TIMEOUT)
    assert stop.data == {"reason": "test"} and stop.timestamp > 0
    assert [listener.get(timeout=TIMEOUT).name for _ in range(2)] == ["A", "B"]
    listener.close()
    with pytest.raises(QMPListenerClosedError):
        listener.get()
    assert list(listener) == []  # an owner-closed listener just ends


def test_out_of_order_replies(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    calls = [spawn_execute(client, "echo", {"n": n}) for n in range(5)]
    requests = [server.receive() for _ in range(5)]
    for request in reversed(requests):
        server.reply(request, request["arguments"]["n"])
    assert [call.get(timeout=TIMEOUT) for call in calls] == list(range(5))


def unread_bytes(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (SIOCINQ)."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


class CountingSocket:
    """Wraps the client's socket to count its reads and writes."""

    def __init__(self, sock):
        self.sock = sock
        self.reads = 0
        self.sends = 0

    def recv(self, size):
        self.reads += 1
        return self.sock.recv(size)

    def send(self, data):
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_reply_one_byte_per_write(mock_qmp):
    client, server = mock_qmp
    counting = client._transport.sock = CountingSocket(client._transport.sock)
    establish(client, server)
    call = spawn_execute(client, "query-name")
    request = server.expect("query-name")
    data = b'{"return": {"name": "sl\\u00f6w"}, "id": %d}\r\n' % request["id"]
    reads_before = counting.reads
    client_fd = client._transport.fileno()
    for i in range(len(data)):
        server.send_raw(data[i:i + 1])
        with gevent.Timeout(TIMEOUT):
            while unread_bytes(client_fd):  # until the pump took this byte
                gevent.sleep(0.0005)
    assert call.get(timeout=TIMEOUT) == {"name": "slöw"}
    assert counting.reads - reads_before >= len(data)  # one read per byte


def test_five_megabyte_reply(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    call = spawn_execute(client, "big")
    blob = "x" * (5 * 1024 * 1024)
    server.reply(server.expect("big"), {"blob": blob})
    assert call.get(timeout=TIMEOUT)["blob"] == blob


def test_error_reply_raises_command_error(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    call = spawn_execute(client, "device_del", {"id": "x"})
    server.error(server.expect("device_del"), "DeviceNotFound", "Device 'x' not found")
    with pytest.raises(QMPCommandError) as caught:
        call.get(timeout=TIMEOUT)
    assert (caught.value.error_class, caught.value.desc, caught.value.command) == (
        "DeviceNotFound", "Device 'x' not found", "device_del")


def test_execute_raw_replaces_the_id_and_returns_errors(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    call = gevent.spawn(client.execute_raw, {"execute": "x", "arguments": {"a": 1},
                                             "id": "theirs"}, timeout=TIMEOUT)
    request = server.expect("x")
    assert request["id"] != "theirs" and request["arguments"] == {"a": 1}
    server.error(request, "GenericError", "nope")
    assert call.get(timeout=TIMEOUT) == {"error": {"class": "GenericError", "desc": "nope"}}


def test_unmatchable_replies_are_ignored(mock_qmp, caplog):
    client, server = mock_qmp
    establish(client, server)
    call = spawn_execute(client, "query-status")
    request = server.expect("query-status")
    with caplog.at_level(logging.WARNING, logger="vmbridge.qmp"):
        server.send({"error": {"class": "GenericError", "desc": "JSON parse error"}})
        server.send({"return": {}, "id": 999})
        server.send({"return": {}, "id": {"not": "ours"}})
        server.reply(request, {"status": "running"})
        assert call.get(timeout=TIMEOUT) == {"status": "running"}
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "without id" in messages and "unknown id 999" in messages
    assert "foreign id" in messages
    assert client.state is State.RUNNING


def test_fds_travel_with_the_command(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    counting = client._transport.sock = CountingSocket(client._transport.sock)
    read_end, write_end = os.pipe()
    try:
        # 2 MB cannot fit the socket buffer: sendmsg writes part of it (with
        # the fds), plain sends the rest once the peer reads.
        call = spawn_execute(client, "getfd", {"fdname": "p" * 2_000_000}, fds=[read_end])
        request = server.expect("getfd")
        assert counting.sends >= 1
        assert len(server.received_fds) == 1
        assert os.fstat(server.received_fds[0]).st_ino == os.fstat(read_end).st_ino
        server.reply(request)
        assert call.get(timeout=TIMEOUT) == {}
        os.fstat(read_end)  # still ours, still open
    finally:
        os.close(read_end)
        os.close(write_end)


# -- failures ------------------------------------------------------------------------

def test_malformed_json_disconnects_only_that_client(mock_qmp):
    client, server = mock_qmp
    other_client, other_server = make_pair(name="other")
    try:
        establish(client, server)
        establish(other_client, other_server)
        reasons = []
        client.on_disconnect(reasons.append)
        pending = spawn_execute(client, "query-status")
        server.expect("query-status")
        server.send_raw(b'{"return": nope}\r\n')
        with pytest.raises(QMPDisconnectedError) as caught:
            pending.get(timeout=TIMEOUT)
        assert isinstance(caught.value.reason, QMPProtocolError)
        assert b"nope" in caught.value.reason.excerpt
        assert len(reasons) == 1 and "malformed JSON" in str(reasons[0])
        assert client.state is State.DISCONNECTED
        # The other connection never noticed.
        call = spawn_execute(other_client, "query-status")
        other_server.reply(other_server.expect("query-status"), {"status": "running"})
        assert call.get(timeout=TIMEOUT) == {"status": "running"}
    finally:
        other_client.close()
        other_server.close()


@pytest.mark.parametrize("message", [[1, 2], {"neither": "reply nor event"},
                                     {"event": 5}, {"error": "not an object", "id": 1}])
def test_non_qmp_messages_are_protocol_errors(mock_qmp, message):
    client, server = mock_qmp
    establish(client, server)
    server.send(message)
    wait_disconnected(client)
    assert isinstance(client.disconnect_reason, QMPProtocolError)


def test_eof_in_the_middle_of_a_reply(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    reasons = []
    client.on_disconnect(reasons.append)
    call = spawn_execute(client, "query-status")
    server.expect("query-status")
    server.send_raw(b'{"return": {"status": "runn')
    server.close()
    with pytest.raises(QMPDisconnectedError, match="EOF"):
        call.get(timeout=TIMEOUT)
    assert len(reasons) == 1 and "unfinished message" in str(reasons[0])


def test_stalled_server_times_out_and_late_reply_is_dropped(mock_qmp, caplog):
    client, server = mock_qmp
    establish(client, server)
    with caplog.at_level(logging.WARNING, logger="vmbridge.qmp"):
        with pytest.raises(QMPTimeoutError) as caught:
            client.execute("slow", timeout=0.05)
        assert caught.value.fds_sent is False
        slow = server.expect("slow")
        call = spawn_execute(client, "fast")
        fast = server.expect("fast")
        server.reply(slow, "late")  # nobody waits for it any more
        server.reply(fast, "quick")
        assert call.get(timeout=TIMEOUT) == "quick"
    assert not caplog.records  # dropped silently
    assert client.state is State.RUNNING


def test_killed_caller_leaves_no_trace(mock_qmp, caplog):
    client, server = mock_qmp
    establish(client, server)
    call = spawn_execute(client, "slow")
    slow = server.expect("slow")
    call.kill()
    with caplog.at_level(logging.WARNING, logger="vmbridge.qmp"):
        server.reply(slow, "late")
        other = spawn_execute(client, "fast")
        server.reply(server.expect("fast"), "quick")
        assert other.get(timeout=TIMEOUT) == "quick"
    assert not caplog.records and client.state is State.RUNNING


def test_deeply_nested_json_is_a_protocol_error(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    server.send_raw(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    wait_disconnected(client)
    assert isinstance(client.disconnect_reason, QMPProtocolError)


def test_oversized_line_is_a_protocol_error_with_bounded_memory():
    client, server = make_pair(name="small", max_message_size=64 * 1024)
    try:
        establish(client, server)
        sent = 0
        chunk = b"x" * 16384
        with pytest.raises(OSError):  # the client hangs up long before 64 MB
            while sent < 64 * 1024 * 1024:
                server.send_raw(chunk)
                sent += len(chunk)
        wait_disconnected(client)
        assert isinstance(client.disconnect_reason, QMPProtocolError)
        assert "max_message_size" in str(client.disconnect_reason)
        assert client.disconnect_reason.excerpt.startswith(b"xxxx")
        # It stopped reading at the limit (plus one read and socket buffers),
        # instead of buffering whatever the peer sends.
        assert sent < 4 * 1024 * 1024
    finally:
        client.close()
        server.close()


def test_send_failure_reports_whether_fds_left(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    server.close()
    wait_disconnected(client)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(QMPDisconnectedError) as caught:
            client.execute("getfd", {"fdname": "x"}, fds=[read_end])
        assert caught.value.fds_sent is False
    finally:
        os.close(read_end)
        os.close(write_end)


# -- listeners and callbacks -------------------------------------------------------

def test_overflowing_listener_is_dropped_without_stalling_anyone(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    seen = []
    client.on_event(seen.append)
    sleeper = client.listen(maxsize=5)           # never reads
    reader = client.listen(maxsize=100)
    only_b = client.listen("B", maxsize=5)       # filtered: never fills
    call = spawn_execute(client, "query-status")
    request = server.expect("query-status")
    for i in range(50):
        server.send_event("A", {"i": i})
    server.send_event("B")
    server.reply(request, {"status": "running"})
    assert call.get(timeout=TIMEOUT) == {"status": "running"}
    assert len(seen) == 51
    assert [reader.get(timeout=TIMEOUT).data["i"] for _ in range(50)] == list(range(50))
    assert only_b.get(timeout=TIMEOUT).name == "B" and not only_b.overflowed
    assert sleeper.overflowed and sleeper.closed
    assert [event.data["i"] for event in [sleeper.get() for _ in range(5)]] == list(range(5))
    with pytest.raises(QMPListenerOverflowError):
        sleeper.get(timeout=TIMEOUT)
    with pytest.raises(QMPListenerOverflowError):
        list(sleeper)
    reader.close()
    only_b.close()


def test_listener_timeout_and_disconnect(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    with client.listen() as listener:
        with pytest.raises(QMPTimeoutError):
            listener.get(timeout=0.01)
        server.send_event("SHUTDOWN")
        server.close()
        wait_disconnected(client)
        assert listener.get(timeout=TIMEOUT).name == "SHUTDOWN"  # drained first
        with pytest.raises(QMPDisconnectedError):
            listener.get(timeout=TIMEOUT)
    with pytest.raises(QMPDisconnectedError):
        client.listen().get()


def test_callbacks_cannot_break_the_pump(mock_qmp, caplog):
    client, server = mock_qmp
    establish(client, server)
    errors = []

    def broken(event):
        raise ValueError("callback bug")

    def reentrant(event):
        try:
            client.execute("query-status")
        except RuntimeError as exc:
            errors.append(exc)

    client.on_event(broken)
    client.on_event(reentrant)
    call = spawn_execute(client, "x")
    request = server.expect("x")
    with caplog.at_level(logging.ERROR, logger="vmbridge.qmp"):
        server.send_event("E")
        server.reply(request)
        assert call.get(timeout=TIMEOUT) == {}
    assert "callback bug" in caplog.text
    assert len(errors) == 1 and "would wait for itself" in str(errors[0])


def test_close_from_an_event_callback(mock_qmp):
    client, server = mock_qmp
    establish(client, server)
    reasons = []
    client.on_disconnect(reasons.append)
    client.on_event(lambda event: client.close())
    call = spawn_execute(client, "x")
    server.expect("x")
    server.send_event("BYE")
    with pytest.raises(QMPDisconnectedError):
        call.get(timeout=TIMEOUT)
    assert len(reasons) == 1 and "closed by the client" in str(reasons[0])
    client.close()
    assert len(reasons) == 1


def test_close_before_start_and_stdlib_socket_adoption(mock_qmp):
    client, server = mock_qmp
    assert client._transport.fileno() >= 0
    client.close()
    client.start()  # no-op once closed
    assert client._transport.fileno() == -1
    with pytest.raises(QMPDisconnectedError):
        client.handshake(timeout=TIMEOUT)
    with pytest.raises(QMPDisconnectedError):
        client.execute("x")
