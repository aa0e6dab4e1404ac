"""A scripted QMP peer, for what a real QEMU cannot be made to do.

The test drives the server end of a socketpair by hand (it runs in the
test's greenlet, or one it spawns) while the client under test uses the
other end::

    def test_x(mock_qmp):
        client, server = mock_qmp
        server.handshake()                       # greet, accept capabilities
        call = gevent.spawn(client.execute, "query-status")
        request = server.receive()
        server.send_event("STOP")
        server.reply(request, {"status": "paused"})
        assert call.get(timeout=5) == {"status": "paused"}

The fixture closes both ends; ``server.close()`` (EOF for the client) may
also be called by the test.
"""

from __future__ import annotations

import array
import json
import os
import socket
import time

import gevent
import gevent.socket
import pytest

from vmbridge.qmp import QMPClient

from qemu_helpers import TIMEOUT

#: How long the mock waits for the client before failing the test.
MOCK_TIMEOUT = 10

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                "package": "mock"},
                    "capabilities": ["oob"]}}


class MockQMPServer:
    """The QEMU side of one QMP connection, scripted step by step."""

    def __init__(self, sock: socket.socket):
        self.sock = gevent.socket.socket(fileno=sock.detach())
        # Bounded so a test whose client never answers fails, not hangs.
        self.sock.settimeout(MOCK_TIMEOUT)
        self._buffer = bytearray()
        self.received_fds: list[int] = []  # fds that came with messages; closed by close()

    # -- sending ----------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict) -> None:
        self.send_raw(json.dumps(message).encode() + b"\r\n")

    def send_event(self, name: str, data: dict | None = None) -> None:
        now = time.time()
        message = {"event": name, "timestamp": {
            "seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            message["data"] = data
        self.send(message)

    def reply(self, request: dict, value=None) -> None:
        self.send({"return": {} if value is None else value, "id": request["id"]})

    def error(self, request: dict, error_class: str, desc: str) -> None:
        self.send({"error": {"class": error_class, "desc": desc}, "id": request["id"]})

    # -- receiving --------------------------------------------------------

    def receive(self) -> dict:
        """The next message from the client; fds that came with it are
        appended to ``received_fds``."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                return json.loads(line)
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(16 * 4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    self.received_fds.extend(fds)
            if not data:
                raise EOFError("client closed the connection")
            self._buffer += data

    def expect(self, command: str) -> dict:
        request = self.receive()
        assert request.get("execute") == command, request
        return request

    def handshake(self, greeting: dict = GREETING) -> None:
        """Greet and accept ``qmp_capabilities`` (the client's pump must
        be running: see :func:`establish`)."""
        self.send(greeting)
        self.reply(self.expect("qmp_capabilities"))

    # -- cleanup ----------------------------------------------------------

    def close(self) -> None:
        for fd in self.received_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.received_fds.clear()
        self.sock.close()


@pytest.fixture
def mock_qmp(no_leaks):
    """``(client, server)``: a QMPClient (not yet started) and its peer."""
    client_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = MockQMPServer(server_end)
    client = QMPClient(client_end, name="mock")
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def establish(client: QMPClient, server: MockQMPServer) -> None:
    """Run the handshake on both ends; the client is RUNNING afterwards."""
    client.start()
    server.handshake()
    client.handshake(timeout=TIMEOUT)


def make_pair(**client_kwargs):
    """A second ``(client, server)`` for tests needing more than one;
    the caller closes both."""
    client_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return QMPClient(client_end, **client_kwargs), MockQMPServer(server_end)
