"""Server behaviour over real sockets: streams, oneway, pipelining, upgrade,
fd passing, limits, credentials, socket files and shutdown."""

import array
import errno
import gc
import json
import os
import socket
import stat
import subprocess

import gevent
import gevent.socket
import pytest

from varlink_fixtures import (
    RawClient, TestHandler, machine_service, make_test_service, open_fds, wait_for)
from vmbridge.varlink import Server, SharedReply


T = "org.example.test."


def call_text(method, parameters=None, **flags):
    return json.dumps({"method": T + method, "parameters": parameters or {}, **flags},
                      separators=(",", ":"))


# -- replies, streams, oneway, pipelining ------------------------------------------

def test_streaming_with_continues_and_final_reply(serve, raw_clients):
    client = raw_clients(serve(make_test_service()))
    client.send_message(call_text("Count", {"n": 3, "final": True}, more=True))
    assert [client.receive() for _ in range(4)] == [
        '{"parameters":{"i":0},"continues":true}',
        '{"parameters":{"i":1},"continues":true}',
        '{"parameters":{"i":2},"continues":true}',
        '{"parameters":{"i":3}}']
    # The connection serves further calls after the stream.
    assert client.transact(call_text("Echo", {"value": {"a": 1}})) == \
        '{"parameters":{"value":{"a":1}}}'


def test_stream_ending_without_final_reply_closes(serve, raw_clients):
    client = raw_clients(serve(make_test_service()))
    client.send_message(call_text("Count", {"n": 1, "final": False}, more=True))
    assert client.receive() == '{"parameters":{"i":0},"continues":true}'
    assert client.closed_by_server()


def test_supports_more_method_without_more_gets_a_single_reply(serve, raw_clients):
    client = raw_clients(serve(make_test_service()))
    assert client.transact(call_text("Count", {"n": 2, "final": True})) == \
        '{"parameters":{"i":2}}'


def test_generator_returned_without_more_is_expected_more(serve, raw_clients):
    handler = TestHandler()
    handler.Echo = lambda call: iter([{"value": None}])
    client = raw_clients(serve(make_test_service(handler)))
    assert client.transact(call_text("Echo")) == '{"error":"org.varlink.service.ExpectedMore"}'


def test_empty_continues_reply_has_no_parameters(serve, raw_clients):
    handler = TestHandler()
    handler.Count = lambda call: iter([{}, None])
    client = raw_clients(serve(make_test_service(handler)))
    client.send_message(call_text("Count", {"n": 0, "final": True}, more=True))
    assert client.receive() == '{"continues":true}'
    assert client.receive() == '{"continues":true}'
    assert client.closed_by_server()


def test_error_inside_stream_ends_the_stream_not_the_connection(serve, raw_clients):
    from vmbridge.varlink import VarlinkError

    def failing(call):
        yield {"i": 0}
        raise VarlinkError("org.example.test.Failed", {"why": "midway"})
    handler = TestHandler()
    handler.Count = failing
    client = raw_clients(serve(make_test_service(handler)))
    client.send_message(call_text("Count", {"n": 0, "final": True}, more=True))
    assert client.receive() == '{"parameters":{"i":0},"continues":true}'
    assert client.receive() == \
        '{"error":"org.example.test.Failed","parameters":{"why":"midway"}}'
    assert client.transact(call_text("Echo")) == '{"parameters":{"value":null}}'


def test_client_disconnect_closes_the_handlers_generator(serve, raw_clients):
    handler = TestHandler()
    server = serve(make_test_service(handler))
    client = raw_clients(server)
    client.send_message(call_text("Watch", more=True))
    assert json.loads(client.receive()) == {"parameters": {"tick": 0}, "continues": True}
    client.close()
    assert handler.watch_closed.wait(5)
    wait_for(lambda: server.connections == 0)


def test_client_disconnect_while_generator_blocks(serve, raw_clients):
    from varlink_fixtures import FakeMachine
    machine = FakeMachine()
    server = serve(machine_service(machine))
    client = raw_clients(server)
    client.send_message('{"method":"io.systemd.MachineInstance.SubscribeEvents",'
                        '"parameters":{},"more":true}')
    assert client.receive() == '{"parameters":{"event":"READY"},"continues":true}'
    client.close()              # the generator is blocked in events.get()
    wait_for(lambda: machine.streams_closed == 1)
    wait_for(lambda: server.connections == 0)


def test_server_side_close_ends_a_blocked_generator(serve, raw_clients):
    from varlink_fixtures import FakeMachine
    machine = FakeMachine()
    server = serve(machine_service(machine))
    client = raw_clients(server)
    client.send_message('{"method":"io.systemd.MachineInstance.SubscribeEvents",'
                        '"parameters":{},"more":true}')
    assert client.receive() == '{"parameters":{"event":"READY"},"continues":true}'
    (connection,) = server._connections
    connection.close()          # as an event hub dropping a slow subscriber would
    assert client.closed_by_server()
    assert machine.streams_closed == 1
    assert server.connections == 0


def test_oneway_gets_no_reply(serve, raw_clients):
    handler = TestHandler()
    client = raw_clients(serve(make_test_service(handler)))
    client.send_message(call_text("Echo", {"value": {"n": 1}}, oneway=True))
    client.send_message(call_text("Fail", {"kind": "error"}, oneway=True))
    client.send_message(call_text("Nope", oneway=True))
    client.send_message(call_text("Watch", oneway=True))
    assert client.transact(call_text("Echo", {"value": {"n": 2}})) == \
        '{"parameters":{"value":{"n":2}}}'
    assert [c.parameters["value"] for c in handler.calls] == [{"n": 1}, {"n": 2}]
    assert handler.calls[0].oneway


def test_pipelined_calls_are_answered_in_order(serve, raw_clients):
    client = raw_clients(serve(make_test_service()))
    calls = [call_text("Sleep", {"seconds": 0.05}),
             call_text("Echo", {"value": {"n": 1}}),
             call_text("Nope"),
             call_text("Count", {"n": 1, "final": True}, more=True),
             call_text("Echo", {"value": {"n": 2}})]
    client.send(b"".join(c.encode() + b"\0" for c in calls))
    assert [client.receive() for _ in range(6)] == [
        '{}',
        '{"parameters":{"value":{"n":1}}}',
        '{"error":"org.varlink.service.MethodNotFound","parameters":{"method":"org.example.test.Nope"}}',
        '{"parameters":{"i":0},"continues":true}',
        '{"parameters":{"i":1}}',
        '{"parameters":{"value":{"n":2}}}']


def test_message_split_across_many_writes(serve, raw_clients):
    client = raw_clients(serve(make_test_service()))
    text = call_text("Echo", {"value": {"k": "x" * 100000}}).encode() + b"\0"
    for i in range(0, len(text), 7000):
        client.send(text[i:i + 7000])
        gevent.sleep(0)
    assert json.loads(client.receive())["parameters"]["value"]["k"] == "x" * 100000


def test_a_slow_handler_blocks_only_its_own_connection(serve, raw_clients):
    server = serve(make_test_service())
    slow, fast = raw_clients(server), raw_clients(server)
    slow.send_message(call_text("Sleep", {"seconds": 0.5}))
    started = gevent.get_hub().loop.now()
    assert fast.transact(call_text("Echo")) == '{"parameters":{"value":null}}'
    assert gevent.get_hub().loop.now() - started < 0.25
    assert slow.receive() == "{}"


# -- handler failures --------------------------------------------------------------

def test_handler_exceptions_become_io_systemd_system(serve, raw_clients):
    client = raw_clients(serve(make_test_service()))
    assert client.transact(call_text("Fail", {"kind": "oserror"})) == (
        '{"error":"io.systemd.System","parameters":'
        '{"origin":"linux","errno":2,"errnoName":"ENOENT"}}')
    assert client.transact(call_text("Fail", {"kind": "bug"})) == (
        '{"error":"io.systemd.System","parameters":'
        '{"origin":"linux","errno":5,"errnoName":"EIO"}}')
    assert client.transact(call_text("Fail", {"kind": "badreturn"})) == (
        '{"error":"io.systemd.System","parameters":'
        '{"origin":"linux","errno":5,"errnoName":"EIO"}}')
    assert client.transact(call_text("Fail", {"kind": "error"})) == \
        '{"error":"org.example.test.Failed","parameters":{"why":"asked to"}}'


def test_stream_item_that_is_not_a_dict_ends_the_stream_with_eio(serve, raw_clients):
    handler = TestHandler()
    handler.Count = lambda call: iter([{"i": 0}, ["not", "a", "dict"]])
    client = raw_clients(serve(make_test_service(handler)))
    client.send_message(call_text("Count", {"n": 0, "final": True}, more=True))
    assert client.receive() == '{"parameters":{"i":0},"continues":true}'
    assert json.loads(client.receive())["parameters"]["errnoName"] == "EIO"
    assert client.transact(call_text("Echo")) == '{"parameters":{"value":null}}'


def test_reply_not_matching_the_idl_is_logged_and_sent(serve, raw_clients, caplog):
    handler = TestHandler()
    handler.Echo = lambda call: {"value": "not an object"}
    client = raw_clients(serve(make_test_service(handler)))
    with caplog.at_level("WARNING", logger="vmbridge.varlink"):
        assert client.transact(call_text("Echo")) == '{"parameters":{"value":"not an object"}}'
    assert "reply to org.example.test.Echo does not match its IDL on field 'value'" in caplog.text


def test_shared_reply_is_sent_like_a_dict_and_encoded_once(serve, raw_clients, caplog):
    shared = SharedReply({"i": 7})
    mismatched = SharedReply({"i": "seven"})
    handler = TestHandler()
    handler.Count = lambda call: iter([shared, mismatched]) if call.more else shared
    server = serve(make_test_service(handler))
    first, second = raw_clients(server), raw_clients(server)
    with caplog.at_level("WARNING", logger="vmbridge.varlink"):
        for client in (first, second):
            client.send_message(call_text("Count", {"n": 0, "final": True}, more=True))
            assert client.receive() == '{"parameters":{"i":7},"continues":true}'
            assert client.receive() == '{"parameters":{"i":"seven"},"continues":true}'
            assert client.closed_by_server()     # the stream ended without a final reply
    # Checked against the IDL once, however many connections sent it.
    assert caplog.text.count("reply to org.example.test.Count does not match its IDL on field 'i'") == 1
    # Returned as a single reply it is encoded without "continues".
    assert raw_clients(server).transact(call_text("Count", {"n": 0, "final": True})) == \
        '{"parameters":{"i":7}}'


def test_handler_closing_its_connection(serve, raw_clients):
    server = serve(make_test_service())
    client = raw_clients(server)
    client.send_message(call_text("Fail", {"kind": "close"}))
    assert client.closed_by_server()
    wait_for(lambda: server.connections == 0)


# -- isolation and limits ----------------------------------------------------------

def test_malformed_json_closes_only_that_connection(serve, raw_clients):
    server = serve(make_test_service())
    good, bad = raw_clients(server), raw_clients(server)
    assert good.transact(call_text("Echo")) == '{"parameters":{"value":null}}'
    bad.send_message('{"method": oops')
    assert bad.closed_by_server()
    assert good.transact(call_text("Echo")) == '{"parameters":{"value":null}}'


def test_oversized_message_without_nul_closes_the_connection(serve, raw_clients):
    server = serve(make_test_service(), max_message_size=256 * 1024)
    good, flood = raw_clients(server), raw_clients(server)
    chunk = b"x" * 65536
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        with gevent.Timeout(10):
            for _ in range(64):             # 4 MiB: far past the limit
                flood.send(chunk)
    assert flood.closed_by_server()
    assert good.transact(call_text("Echo")) == '{"parameters":{"value":null}}'


def flooding_handler():
    """A Watch that sends 64 KiB replies as fast as the socket takes them."""
    handler = TestHandler()
    handler.sent = 0

    def flood(call):
        try:
            while True:
                handler.watch_started.set()
                yield {"tick": handler.sent, "padding": "x" * 65536}
                handler.sent += 1
        except GeneratorExit:
            handler.watch_closed.set()
            raise
    handler.Watch = flood
    return handler


def test_close_from_another_greenlet_interrupts_a_blocked_send(serve, raw_clients):
    handler = flooding_handler()
    server = serve(make_test_service(handler))
    client = raw_clients(server)
    # Never read: the server's sends fill the socket buffer and block.
    client.send_message(call_text("Watch", more=True))
    assert handler.watch_started.wait(5)
    sent = -1
    while sent != handler.sent:         # until the stream stops making progress
        sent = handler.sent
        gevent.sleep(0.05)
    (connection,) = server._connections
    connection.close()
    assert handler.watch_closed.wait(5)
    wait_for(lambda: server.connections == 0)


def test_send_timeout_drops_a_client_that_never_reads(serve, raw_clients):
    handler = flooding_handler()
    server = serve(make_test_service(handler), send_timeout=0.2)
    client = raw_clients(server)
    client.send_message(call_text("Watch", more=True))
    assert handler.watch_closed.wait(5)
    wait_for(lambda: server.connections == 0)


def test_per_uid_connection_cap(serve, raw_clients):
    server = serve(make_test_service(), max_connections_per_uid=2)
    first, second = raw_clients(server), raw_clients(server)
    wait_for(lambda: server.connections == 2)
    third = raw_clients(server)
    assert third.transact(call_text("Echo")) == (
        '{"error":"io.systemd.System","parameters":'
        '{"origin":"linux","errno":87,"errnoName":"EUSERS"}}')
    assert third.closed_by_server()
    assert first.transact(call_text("Echo")) == '{"parameters":{"value":null}}'
    second.close()
    wait_for(lambda: server.connections == 1)
    fourth = raw_clients(server)
    assert fourth.transact(call_text("Echo")) == '{"parameters":{"value":null}}'


def test_global_connection_cap(serve, raw_clients):
    server = serve(make_test_service(), max_connections=1)
    first = raw_clients(server)
    wait_for(lambda: server.connections == 1)
    second = raw_clients(server)
    assert json.loads(second.transact(call_text("Echo")))["parameters"]["errnoName"] == "EMFILE"
    assert first.transact(call_text("Echo")) == '{"parameters":{"value":null}}'


def test_default_limits_follow_sd_varlink():
    from vmbridge.varlink import default_connection_limits
    total, per_uid = default_connection_limits()
    assert total <= 4096 and per_uid <= 1024 and per_uid <= total


def test_disallowed_uid_gets_permission_denied(serve, raw_clients, caplog):
    server = serve(make_test_service(), allowed_uids={os.getuid() + 4242})
    client = raw_clients(server)
    with caplog.at_level("WARNING", logger="vmbridge.varlink"):
        assert client.transact(call_text("Echo")) == \
            '{"error":"org.varlink.service.PermissionDenied"}'
        assert client.closed_by_server()
    assert "UID %d is not allowed" % os.getuid() in caplog.text
    assert server.connections == 0


SYSTEM_PYTHON = "/usr/bin/python3"
needs_root = pytest.mark.skipif(os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                                reason="needs root (to switch UID) and /usr/bin/python3")

PEER_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", e.errno); sys.exit(0)
s.sendall(b'{"method":"org.varlink.service.GetInfo","parameters":{}}\\0')
data = b""
while not data.endswith(b"\\0"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.rstrip(b"\\0").decode())
"""


def run_as_nobody(path):
    def drop():
        os.setgid(65534)
        os.setgroups([])
        os.setuid(65534)
    # The child runs a script of its own, no gevent needed; wait for it
    # cooperatively so the server keeps serving meanwhile.
    # The system interpreter: the venv's may live where nobody cannot read.
    child = subprocess.Popen([SYSTEM_PYTHON, "-c", PEER_SCRIPT, path],
                             stdout=subprocess.PIPE, preexec_fn=drop,
                             cwd="/", env={"PATH": "/usr/bin:/bin"})
    os.set_blocking(child.stdout.fileno(), False)
    output = b""
    with gevent.Timeout(20):
        while True:
            gevent.socket.wait_read(child.stdout.fileno())
            chunk = child.stdout.read()
            if not chunk:
                break
            output += chunk
    child.stdout.close()
    while child.poll() is None:
        gevent.sleep(0.01)
    return output.decode().strip()


@needs_root
def test_real_other_uid_is_refused_by_mode_0600(serve, socket_dir):
    os.chmod(socket_dir, 0o755)
    server = serve(make_test_service())
    assert run_as_nobody(server.address) == "connect-error %d" % errno.EACCES


@needs_root
def test_real_other_uid_gets_permission_denied(serve, socket_dir):
    os.chmod(socket_dir, 0o755)
    server = serve(make_test_service(), mode=0o666)
    assert run_as_nobody(server.address) == \
        '{"error":"org.varlink.service.PermissionDenied"}'
    server_allowing = serve(make_test_service(), name="t.sock", mode=0o666,
                            allowed_uids={0, 65534})
    assert '"product":"test"' in run_as_nobody(server_allowing.address)


# -- upgrade -----------------------------------------------------------------------

def test_upgrade_hands_over_socket_and_pending_bytes(serve, raw_clients):
    handler = TestHandler()
    server = serve(make_test_service(handler))
    client = raw_clients(server)
    client.send(call_text("Raw", upgrade=True).encode() + b"\0hello ")
    assert client.receive() == "{}"
    assert handler.upgraded.get(timeout=5) == b"hello "
    wait_for(lambda: server.connections == 0)       # no longer a varlink connection
    with gevent.Timeout(5):
        data = client.buffer
        while len(data) < len(b"upgraded:hello "):
            data += client.sock.recv(100)
        assert data == b"upgraded:hello "
        client.send(b"raw bytes\0not varlink")
        data = b""
        while len(data) < len(b"RAW BYTES\0NOT VARLINK"):
            data += client.sock.recv(100)
    assert data == b"RAW BYTES\0NOT VARLINK"


def test_upgrade_flag_required(serve, raw_clients):
    client = raw_clients(serve(make_test_service()))
    assert client.transact(call_text("Raw")) == '{"error":"org.varlink.service.ExpectedUpgrade"}'


def test_upgrade_survives_server_stop(serve, raw_clients):
    handler = TestHandler()
    server = serve(make_test_service(handler))
    client = raw_clients(server)
    client.send_message(call_text("Raw", upgrade=True))
    assert client.receive() == "{}"
    handler.upgraded.get(timeout=5)
    server.stop()
    with gevent.Timeout(5):
        data = client.buffer
        while len(data) < len(b"upgraded:"):
            data += client.sock.recv(100)
        client.send(b"still here")
        assert client.sock.recv(100) == b"STILL HERE"


# -- fd passing --------------------------------------------------------------------

def send_with_fds(client, text, fds):
    client.sock.sendmsg([text.encode() + b"\0"],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_fds_received_taken_and_untaken_closed(serve, raw_clients):
    handler = TestHandler()
    server = serve(make_test_service(handler), allow_fd_passing=True)
    client = raw_clients(server)
    wait_for(lambda: server.connections == 1)
    pipes = [os.pipe() for _ in range(3)]
    before = open_fds()
    send_with_fds(client, call_text("TakeFds", {"keep": [1]}), [r for r, _ in pipes])
    reply = json.loads(client.receive())
    (kept,) = reply["parameters"]["kept"]
    # Only the taken fd is still open in this process; the two others were closed.
    assert open_fds() - before == {str(kept)}
    os.write(pipes[1][1], b"through the taken fd")
    assert os.read(kept, 100) == b"through the taken fd"
    os.close(kept)
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_bad_fd_index_is_invalid_parameter(serve, raw_clients):
    server = serve(make_test_service(), allow_fd_passing=True)
    client = raw_clients(server)
    wait_for(lambda: server.connections == 1)
    r, w = os.pipe()
    before = open_fds()
    send_with_fds(client, call_text("TakeFds", {"keep": [0, 1]}), [r])
    assert client.receive() == \
        '{"error":"org.varlink.service.InvalidParameter","parameters":{"parameter":"keep"}}'
    # fd #0 was taken by the handler before #1 failed: the handler owns it
    # (and leaks it here, deliberately); nothing else stays open.
    (taken,) = open_fds() - before
    os.close(int(taken))
    os.close(r)
    os.close(w)


def test_fds_refused_when_fd_passing_is_off(serve, raw_clients):
    handler = TestHandler()
    server = serve(make_test_service(handler))
    client = raw_clients(server)
    wait_for(lambda: server.connections == 1)
    r, w = os.pipe()
    before = open_fds()
    send_with_fds(client, call_text("TakeFds", {"keep": [0]}), [r])
    assert client.receive() == \
        '{"error":"org.varlink.service.InvalidParameter","parameters":{"parameter":"keep"}}'
    assert open_fds() <= before
    os.close(r)
    os.close(w)


def test_fds_not_at_message_start_close_the_connection(serve, raw_clients):
    server = serve(make_test_service(), allow_fd_passing=True)
    client = raw_clients(server)
    wait_for(lambda: server.connections == 1)
    r, w = os.pipe()
    before = open_fds()
    client.send(b'{"method":')
    gevent.sleep(0.05)
    send_with_fds(client, '"org.example.test.Echo"}', [r])
    assert client.closed_by_server()
    wait_for(lambda: open_fds() <= before)
    os.close(r)
    os.close(w)


def test_server_sends_fds_with_a_reply(serve, raw_clients):
    server = serve(make_test_service(), allow_fd_passing=True)
    client = raw_clients(server)
    client.send_message(call_text("GiveFd"))
    with gevent.Timeout(5):
        data, ancdata, _, _ = client.sock.recvmsg(4096, socket.CMSG_SPACE(16))
    assert data == b'{"parameters":{"fileDescriptorIndex":0}}\0'
    fds = array.array("i")
    fds.frombytes(ancdata[0][2])
    assert os.read(fds[0], 100) == b"from the server"
    os.close(fds[0])


# -- socket file, stop -------------------------------------------------------------

def test_socket_mode_and_stale_socket_replaced(serve, socket_dir):
    path = os.path.join(socket_dir, "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                       # a socket file nobody listens on
    serve(make_test_service())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    client = RawClient(path)
    assert client.transact(call_text("Echo")) == '{"parameters":{"value":null}}'
    client.close()
    other = serve(make_test_service(), name="o.sock", mode=0o660)
    assert stat.S_IMODE(os.stat(other.address).st_mode) == 0o660


def test_live_socket_and_non_socket_are_not_replaced(serve, socket_dir):
    server = serve(make_test_service())
    with pytest.raises(OSError) as e:
        Server(make_test_service(), path=server.address).start()
    assert e.value.errno == errno.EADDRINUSE
    plain = os.path.join(socket_dir, "file")
    open(plain, "w").close()
    with pytest.raises(FileExistsError):
        Server(make_test_service(), path=plain).start()
    assert os.path.isfile(plain)


def test_listen_socket_is_used_and_never_unlinked(socket_dir):
    path = os.path.join(socket_dir, "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    server = Server(make_test_service(), listen_socket=listener)
    server.start()
    assert server.address == path
    client = RawClient(path)
    assert client.transact(call_text("Echo")) == '{"parameters":{"value":null}}'
    client.close()
    server.stop()
    assert os.path.exists(path)
    assert listener.fileno() == -1          # ownership moved to the server


def live_greenlets():
    gc.collect()
    return [g for g in gc.get_objects() if isinstance(g, gevent.Greenlet) and not g.dead]


def test_stop_closes_everything_and_is_idempotent(socket_dir):
    handler = TestHandler()
    before = open_fds()
    greenlets_before = set(live_greenlets())
    server = Server(make_test_service(handler), path=os.path.join(socket_dir, "s.sock"))
    server.start()
    clients = [RawClient(server.address) for _ in range(3)]
    clients[0].send_message(call_text("Watch", more=True))
    clients[1].send_message(call_text("Sleep", {"seconds": 30}))
    clients[2].send(b'{"method":"half a message')
    refused = Server(make_test_service(), path=os.path.join(socket_dir, "r.sock"),
                     allowed_uids=set())
    refused.start()
    lingering = RawClient(refused.address)
    assert handler.watch_started.wait(5)
    wait_for(lambda: server.connections == 3)
    server.stop()
    refused.stop()
    server.stop()
    assert not os.path.exists(server.address)
    assert not os.path.exists(refused.address)
    assert server.connections == 0
    assert handler.watch_closed.is_set()
    for client in clients:
        with gevent.Timeout(5):
            while client.sock.recv(65536):
                pass                    # the rest of the stream, then EOF
        client.close()
    lingering.close()
    assert set(live_greenlets()) - greenlets_before == set()
    assert open_fds() <= before          # nothing leaked


def test_stop_from_inside_a_handler(serve, raw_clients):
    handler = TestHandler()
    service = make_test_service(handler)
    server = serve(service)
    handler.Required = lambda call: server.stop()
    other = raw_clients(server)
    assert other.transact(call_text("Echo")) == '{"parameters":{"value":null}}'
    client = raw_clients(server)
    assert client.transact(call_text("Required", {"name": "a", "count": 1})) == "{}"
    assert client.closed_by_server()
    assert other.closed_by_server()
    assert not os.path.exists(server.address)


def test_debug_log_shows_messages_with_peer(serve, raw_clients, caplog):
    client = raw_clients(serve(make_test_service()))
    with caplog.at_level("DEBUG", logger="vmbridge.varlink"):
        client.transact(call_text("Echo", {"value": {"k": 1}}))
    pid = "pid=%d uid=%d" % (os.getpid(), os.getuid())
    assert "received from %s: %s" % (pid, call_text("Echo", {"value": {"k": 1}})) in caplog.text
    assert 'sending to %s: {"parameters":{"value":{"k":1}}}' % pid in caplog.text
