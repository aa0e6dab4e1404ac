"""The stdlib client: against our server (made cooperative with gevent
sockets, as patch_all() would in the CLI), against python-varlink's server,
and python-varlink's client against our server."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import gevent
import gevent.socket
import gevent.subprocess
import pytest

from varlink_fixtures import (
    MACHINE, FakeMachine, TestHandler, machine_service, make_test_service,
    open_fds, wait_for)
from vmbridge.varlink import VarlinkError


T = "org.example.test."
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def connect(cooperative_client):
    connections = []

    def open_connection(address, **options):
        connection = cooperative_client.Connection(address, **options)
        connections.append(connection)
        return connection

    yield open_connection
    for connection in connections:
        connection.close()


def test_call_returns_parameters(serve, connect):
    server = serve(machine_service())
    c = connect(server.address)
    assert c.call(MACHINE + ".Describe") == {"running": True, "status": "running"}
    assert c.call(MACHINE + ".Pause") == {}
    assert c.call(MACHINE + ".Describe", {}) == {"running": False, "status": "paused"}
    info = c.call("org.varlink.service.GetInfo")
    assert info["interfaces"] == ["io.systemd", MACHINE, "io.systemd.VirtualMachineInstance",
                                  "org.varlink.service"]


def test_error_replies_raise_varlink_error(serve, connect):
    c = connect(serve(machine_service()).address)
    with pytest.raises(VarlinkError) as e:
        c.call(MACHINE + ".RemoveStorage", {"name": "nope"})
    assert (e.value.error, e.value.parameters) == ("io.systemd.MachineInstance.NoSuchStorage", None)
    with pytest.raises(VarlinkError) as e:
        c.call(MACHINE + ".Describe", {"x": 1})
    assert e.value.parameters == {"parameter": "x"}
    assert str(e.value) == 'org.varlink.service.InvalidParameter {"parameter":"x"}'
    # The connection stays usable after error replies.
    assert c.call(MACHINE + ".Describe")["running"] is True


def test_client_varlink_error_is_the_servers_class():
    from vmbridge.varlink import client
    assert client.VarlinkError is VarlinkError


def test_call_more_stream_with_final_reply(serve, connect):
    c = connect(serve(make_test_service()).address)
    assert list(c.call_more(T + "Count", {"n": 2, "final": True})) == [
        {"i": 0}, {"i": 1}, {"i": 2}]
    assert c.call(T + "Echo", {"value": {"a": 1}}) == {"value": {"a": 1}}
    # A method that answers a 'more' call with one plain reply: the iterator
    # yields it, and the connection is free again at once.
    single = c.call_more(MACHINE.replace("MachineInstance", "Nope") + ".X")
    with pytest.raises(VarlinkError):
        next(single)
    replies = c.call_more(T + "Echo", {"value": None})
    assert next(replies) == {"value": None}
    assert c.call(T + "Echo") == {"value": None}


def test_call_more_stream_ended_by_close_raises_disconnected(serve, connect, cooperative_client):
    machine = FakeMachine()
    c = connect(serve(machine_service(machine)).address)
    events = c.call_more(MACHINE + ".SubscribeEvents", timeout=None)
    assert next(events) == {"event": "READY"}
    machine.events.put({"event": "STOP"})
    assert next(events) == {"event": "STOP"}
    machine.events.put(None)
    with pytest.raises(cooperative_client.VarlinkDisconnected):
        next(events)
    assert c.closed


def test_call_more_error(serve, connect):
    c = connect(serve(machine_service()).address)
    with pytest.raises(VarlinkError) as e:
        list(c.call_more(MACHINE + ".SubscribeEvents", {"filter": "STOP"}))
    assert e.value.parameters == {"parameter": "filter"}
    assert not c.closed


def test_abandoned_stream_closes_connection_and_server_generator(serve, connect):
    handler = TestHandler()
    server = serve(make_test_service(handler))
    c = connect(server.address)
    ticks = c.call_more(T + "Watch")
    assert next(ticks) == {"tick": 0}
    with pytest.raises(RuntimeError):
        c.call(T + "Echo")              # busy while streaming
    ticks.close()
    assert c.closed
    assert handler.watch_closed.wait(5)
    wait_for(lambda: server.connections == 0)


def test_call_oneway(serve, connect):
    handler = TestHandler()
    c = connect(serve(make_test_service(handler)).address)
    assert c.call_oneway(T + "Echo", {"value": {"n": 1}}) is None
    assert c.call(T + "Echo", {"value": {"n": 2}}) == {"value": {"n": 2}}
    assert [call.parameters["value"]["n"] for call in handler.calls] == [1, 2]


def test_call_upgrade_hands_over_the_socket(serve, connect):
    handler = TestHandler()
    c = connect(serve(make_test_service(handler)).address)
    with pytest.raises(VarlinkError):
        c.call(T + "Raw")                # ExpectedUpgrade; connection still usable
    sock, pending = c.call_upgrade(T + "Raw")
    assert c.closed
    with sock:
        data = pending
        while len(data) < len(b"upgraded:"):
            data += sock.recv(100)
        assert data == b"upgraded:"
        sock.sendall(b"shout")
        assert sock.recv(100) == b"SHOUT"
    # return_reply: the reply's parameters as well.
    c = connect(c.address)
    sock, pending, reply = c.call_upgrade(T + "Raw", return_reply=True)
    sock.close()
    assert reply == {}


def test_fds_both_ways(serve, connect):
    handler = TestHandler()
    server = serve(make_test_service(handler), allow_fd_passing=True)
    c = connect(server.address)
    r, w = os.pipe()
    assert len(c.call(T + "TakeFds", {"keep": [0]}, fds=[r])["kept"]) == 1
    (kept,) = handler.calls[-1]
    os.write(w, b"ping")
    assert os.read(kept, 4) == b"ping"
    for fd in (kept, r, w):
        os.close(fd)
    before = open_fds()
    parameters, fds = c.call(T + "GiveFd", return_fds=True)
    assert os.read(fds[parameters["fileDescriptorIndex"]], 100) == b"from the server"
    os.close(fds[0])
    c.call(T + "GiveFd")                # not asked for: the client closes it
    assert open_fds() <= before          # nothing leaked


def test_connect_errors_keep_errno(socket_dir, cooperative_client):
    missing = os.path.join(socket_dir, "missing.sock")
    with pytest.raises(cooperative_client.VarlinkConnectError) as e:
        cooperative_client.Connection(missing)
    assert e.value.errno == errno.ENOENT
    assert isinstance(e.value, OSError) and e.value.filename == missing
    stale = os.path.join(socket_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    with pytest.raises(cooperative_client.VarlinkConnectError) as e:
        cooperative_client.Connection("unix:" + stale)
    assert e.value.errno == errno.ECONNREFUSED


def test_addresses():
    from vmbridge.varlink.client import parse_address
    assert parse_address("/run/x") == "/run/x"
    assert parse_address("unix:/run/x") == "/run/x"
    assert parse_address("unix:@abstract") == "\0abstract"
    for bad in ("tcp:127.0.0.1:1", "unix:/run/x;mode=0600", "", "exec:/bin/x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_timeout_closes_the_connection(serve, connect):
    c = connect(serve(make_test_service()).address, timeout=5)
    with pytest.raises(TimeoutError):
        c.call(T + "Sleep", {"seconds": 1}, timeout=0.05)
    assert c.closed


def test_permission_denied_reaches_the_client(serve, connect):
    server = serve(make_test_service(), allowed_uids=set())
    c = connect(server.address)
    with pytest.raises(VarlinkError) as e:
        c.call(T + "Echo")
    assert e.value.error == "org.varlink.service.PermissionDenied"


def test_garbage_from_server_is_a_protocol_error(socket_dir, cooperative_client):
    path = os.path.join(socket_dir, "bad.sock")
    listener = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def answer(reply):
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(reply)
            conn.recv(4096)
    try:
        for reply in (b"[1]\0", b'{"parameters":[]}\0', b'{"error":"x","continues":true}\0'):
            server = gevent.spawn(answer, reply)
            c = cooperative_client.Connection(path)
            with pytest.raises(cooperative_client.VarlinkProtocolError):
                c.call("a.b.C")
            assert c.closed
            server.join(5)
    finally:
        listener.close()


def test_client_import_is_light():
    code = ("import sys, vmbridge.varlink.client, vmbridge.varlink; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('gevent', 'varlink')]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"


PYTHON_VARLINK_CLIENT = textwrap.dedent("""
    import json, sys, varlink
    out = []
    with varlink.Client.new_with_address("unix:" + sys.argv[1]) as client:
        with client.open("io.systemd.MachineInstance") as m:
            out.append(m.Describe())
            out.append(m.Pause())
            out.append(m.Describe())
            try:
                m.RemoveStorage("nope")
            except varlink.VarlinkError as e:
                out.append(e.error())
        with client.open("io.systemd.MachineInstance") as m:
            events = m.SubscribeEvents(None, _more=True)
            out.append(next(events))
        with client.open("org.varlink.service") as s:
            out.append(s.GetInfo()["interfaces"])
    print(json.dumps(out))
""")


def test_python_varlink_client_talks_to_our_server(serve):
    server = serve(machine_service())
    output = gevent.subprocess.check_output(
        [sys.executable, "-c", PYTHON_VARLINK_CLIENT, server.address], timeout=60)
    assert json.loads(output) == [
        {"running": True, "status": "running"},
        {},
        {"running": False, "status": "paused"},
        "io.systemd.MachineInstance.NoSuchStorage",
        {"event": "READY"},
        ["io.systemd", MACHINE, "io.systemd.VirtualMachineInstance", "org.varlink.service"],
    ]


PYTHON_VARLINK_SERVER = textwrap.dedent("""
    import os, sys, varlink
    directory = sys.argv[2]
    with open(os.path.join(directory, "org.example.pv.varlink"), "w") as f:
        f.write('''interface org.example.pv
    method Echo(value: ?string) -> (value: ?string)
    method Count(n: int) -> (i: int)
    method Boom() -> ()
    error Failed(why: string)
    ''')
    service = varlink.Service(vendor="pv", product="pv", version="1", url="u",
                              interface_dir=directory)

    @service.interface("org.example.pv")
    class PV:
        def Echo(self, value):
            return {"value": value}

        def Count(self, n, _more=False):
            for i in range(n):
                yield {"i": i, "_continues": i < n - 1}

        def Boom(self):
            raise varlink.VarlinkError({"error": "org.example.pv.Failed",
                                        "parameters": {"why": "boom"}})

    class Handler(varlink.RequestHandler):
        service = service

    with varlink.ThreadingServer("unix:" + sys.argv[1], Handler) as server:
        print("ready", flush=True)
        server.serve_forever()
""")


def test_our_client_talks_to_python_varlink_server(socket_dir):
    from vmbridge.varlink.client import Connection
    path = os.path.join(socket_dir, "pv.sock")
    # No gevent server in this test: the plain blocking client is fine.
    child = subprocess.Popen([sys.executable, "-c", PYTHON_VARLINK_SERVER, path, socket_dir],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with Connection(path, timeout=20) as c:
            assert c.call("org.example.pv.Echo", {"value": "hi"}) == {"value": "hi"}
            assert list(c.call_more("org.example.pv.Count", {"n": 3})) == [
                {"i": 0}, {"i": 1}, {"i": 2}]
            with pytest.raises(VarlinkError) as e:
                c.call("org.example.pv.Boom")
            assert (e.value.error, e.value.parameters) == ("org.example.pv.Failed",
                                                           {"why": "boom"})
            assert "org.example.pv" in c.call("org.varlink.service.GetInfo")["interfaces"]
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


CLI_LIKE_CLIENT = textwrap.dedent("""
    import json, sys
    if sys.argv[2] == "patched":
        from gevent import monkey
        monkey.patch_all()
    from vmbridge.varlink.client import Connection, VarlinkDisconnected
    out = []
    with Connection("unix:" + sys.argv[1], timeout=10) as c:
        out.append(c.call("io.systemd.MachineInstance.Describe"))
        events = c.call_more("io.systemd.MachineInstance.SubscribeEvents",
                             {"filter": ["STOP"]}, timeout=None)
        out.append(next(events))
        c2 = Connection(sys.argv[1])        # a second client pauses the machine
        c2.call("io.systemd.MachineInstance.Pause")
        c2.close()
        out.append(next(events))
    print(json.dumps(out))
""")


@pytest.mark.parametrize("mode", ["plain", "patched"])
def test_client_in_a_cli_process(serve, mode):
    """Our client in its own process, as vmctl uses it: plain, and after
    gevent's patch_all() (then it is cooperative without knowing it)."""
    server = serve(machine_service())
    output = gevent.subprocess.check_output(
        [sys.executable, "-c", CLI_LIKE_CLIENT, server.address, mode],
        env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert json.loads(output) == [{"running": True, "status": "running"},
                                  {"event": "READY"}, {"event": "STOP"}]
