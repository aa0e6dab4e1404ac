"""Shared pieces for the varlink tests: fake services, a raw client, fixtures.

Everything runs in one process on gevent without monkey-patching: the
server's greenlets and the tests' gevent sockets share the hub; the test
body itself runs in the main greenlet.
"""

import json
import os
import shutil
import tempfile

import gevent
import gevent.event
import gevent.queue
import gevent.socket
import pytest

from vmbridge.varlink import Server, Service, Upgrade, VarlinkError, interface_text
from vmbridge.varlink import client as client_module

MACHINE = "io.systemd.MachineInstance"

# systemd-vmspawn's identity as printed in the 262 transcript, so GetInfo can
# be compared byte for byte.
VMSPAWN_IDENTITY = dict(vendor="The systemd Project",
                        product="systemd (systemd-vmspawn)",
                        version="262.1 (262.1-1)", url="https://systemd.io/")

TEST_IDL = """# An interface for exercising the varlink layer
interface org.example.test

type Point (x: int, y: int)

type Color (red, green, blue)

method Echo(value: ?object) -> (value: ?object)

method Types(
\ti: ?int,
\tf: ?float,
\ts: ?string,
\tb: ?bool,
\to: ?object,
\tstrings: ?[]string,
\tmap: ?[string]int,
\tpoint: ?Point,
\tcolor: ?Color,
\tpoints: ?[]Point,
\tnested: ?(a: int, b: ?[]?string),
\tset: ?[string]()
) -> (got: object)

method Required(name: string, count: int) -> ()

# Replies n times, then a final reply or (final=false) a hang-up
# [Supports 'more' flag]
method Count(n: int, final: bool) -> (i: int)

# Streams until the client goes away
# [Requires 'more' flag]
method Watch() -> (tick: int)

# Switches the connection to an echo protocol
# [Requires 'upgrade' flag]
method Raw() -> ()

method Fail(kind: string) -> ()

method Sleep(seconds: float) -> ()

method TakeFds(keep: []int) -> (kept: []int)

method GiveFd() -> (fileDescriptorIndex: int)

method Unimplemented() -> ()

error Failed(why: string)
"""


class FakeMachine:
    """io.systemd.MachineInstance as systemd-vmspawn answers it, minus QEMU."""

    def __init__(self):
        self.running = True
        self.events = gevent.queue.Queue()
        self.streams_closed = 0

    def Describe(self, call):
        return {"running": self.running,
                "status": "running" if self.running else "paused"}

    def Pause(self, call):
        if self.running:                    # QEMU sends STOP only on a change
            self.events.put({"event": "STOP"})
        self.running = False

    def Resume(self, call):
        if not self.running:
            self.events.put({"event": "RESUME"})
        self.running = True

    def SubscribeEvents(self, call):
        wanted = call.parameters["filter"]
        try:
            yield {"event": "READY"}
            while True:
                event = self.events.get()
                if event is None:          # the machine went away
                    return None
                if wanted is None or event["event"] in wanted:
                    yield event
        finally:
            self.streams_closed += 1

    def RemoveStorage(self, call):
        raise VarlinkError("io.systemd.MachineInstance.NoSuchStorage")


class TestHandler:
    """org.example.test."""

    __test__ = False            # not a pytest test class

    def __init__(self):
        self.watch_closed = gevent.event.Event()
        self.watch_started = gevent.event.Event()
        self.upgraded = gevent.queue.Queue()
        self.calls = []

    def Echo(self, call):
        self.calls.append(call)
        return {"value": call.parameters["value"]}

    def Types(self, call):
        return {"got": call.parameters}

    def Required(self, call):
        return {}

    def Count(self, call):
        n, final = call.parameters["n"], call.parameters["final"]
        if not call.more:
            return {"i": n}
        return self._count(n, final)

    def _count(self, n, final):
        for i in range(n):
            yield {"i": i}
        if final:
            return {"i": n}
        return None

    def Watch(self, call):
        tick = 0
        self.watch_started.set()
        try:
            while True:
                yield {"tick": tick}
                tick += 1
                gevent.sleep(0.01)
        except GeneratorExit:
            self.watch_closed.set()
            raise

    def Raw(self, call):
        def takeover(sock, pending):
            self.upgraded.put(pending)
            with sock:
                sock.sendall(b"upgraded:" + pending)
                while True:
                    data = sock.recv(4096)
                    if not data:
                        break
                    sock.sendall(data.upper())
        return Upgrade({}, takeover)

    def Fail(self, call):
        kind = call.parameters["kind"]
        if kind == "error":
            raise VarlinkError("org.example.test.Failed", {"why": "asked to"})
        if kind == "oserror":
            raise FileNotFoundError(2, "No such file or directory")
        if kind == "bug":
            raise RuntimeError("a bug in a handler")
        if kind == "close":
            call.connection.close()
            return {}
        if kind == "badreturn":
            return 42
        raise AssertionError(kind)

    def Sleep(self, call):
        gevent.sleep(call.parameters["seconds"])

    def TakeFds(self, call):
        kept = []
        for index in call.parameters["keep"]:
            fd = call.take_fd(index, "keep")
            kept.append(fd)
        self.calls.append(kept)
        return {"kept": kept}

    def GiveFd(self, call):
        read_end, write_end = os.pipe()
        os.write(write_end, b"from the server")
        os.close(write_end)
        return {"fileDescriptorIndex": call.push_fd(read_end)}


def machine_service(machine=None, **identity):
    service = Service(**(identity or VMSPAWN_IDENTITY))
    service.add_interface(interface_text(MACHINE), machine or FakeMachine())
    service.add_interface(interface_text("io.systemd.VirtualMachineInstance"), None)
    return service


def make_test_service(handler=None):
    service = Service(vendor="vmbridge", product="test", version="1",
                      url="https://example.org/")
    service.add_interface(TEST_IDL, handler or TestHandler())
    return service


class RawClient:
    """A bare varlink peer on a gevent socket: bytes in, bytes out."""

    def __init__(self, path):
        self.sock = gevent.socket.socket(gevent.socket.AF_UNIX,
                                         gevent.socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def send_message(self, text):
        self.send(text.encode() + b"\0")

    def receive(self, timeout=5):
        """The next message as text, or None if the server closed."""
        with gevent.Timeout(timeout):
            while b"\0" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.buffer += data
        message, _, self.buffer = self.buffer.partition(b"\0")
        return message.decode()

    def transact(self, text, timeout=5):
        self.send_message(text)
        return self.receive(timeout)

    def call(self, method, parameters=None, **flags):
        message = {"method": method, "parameters": parameters or {}, **flags}
        return json.loads(self.transact(json.dumps(message)))

    def closed_by_server(self, timeout=5):
        """True once the server has closed (EOF, or reset)."""
        try:
            return self.receive(timeout) is None
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


@pytest.fixture
def socket_dir():
    # Short path: AF_UNIX addresses are limited to 108 bytes.
    path = tempfile.mkdtemp(prefix="vl-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(socket_dir):
    """serve(service, **server_options) -> started Server; stopped afterwards."""
    servers = []

    def start(service, name="s.sock", **options):
        server = Server(service, path=os.path.join(socket_dir, name), **options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def raw_clients():
    clients = []

    def connect(server):
        client = RawClient(server.address)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def cooperative_client(monkeypatch):
    """Make vmbridge.varlink.client use gevent sockets, as patch_all() would."""
    monkeypatch.setattr(client_module, "socket", gevent.socket)
    return client_module


def open_fds():
    """This process's open fds, as strings (without listdir's own fd)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue            # the directory fd listdir used, closed by now
        fds.add(name)
    return fds


def wait_for(predicate, timeout=5.0, interval=0.01):
    with gevent.Timeout(timeout, AssertionError("condition not met in time")):
        while not predicate():
            gevent.sleep(interval)
