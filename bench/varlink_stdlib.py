"""A minimal varlink client in plain stdlib: the benchmark's measuring end.

Varlink is one JSON object per message, NUL-terminated, over a stream
socket.  This client does the least work a client can: the request bytes are
encoded once and reused, a reply is read up to its NUL and parsed only when
the caller asks.  It does not import vmbridge, gevent or python-varlink, so a
figure taken with it measures the server, not a client library.
"""

from __future__ import annotations

import json
import socket

_encode = json.JSONEncoder(separators=(",", ":")).encode


def request(method: str, parameters: dict | None = None, *, more: bool = False) -> bytes:
    """The wire bytes of one call, NUL included."""
    message = {"method": method, "parameters": parameters or {}}
    if more:
        message["more"] = True
    return _encode(message).encode() + b"\0"


class Connection:
    """One blocking AF_UNIX connection to a varlink socket."""

    def __init__(self, path: str, timeout: float | None = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.buffer = b""

    def read_raw(self) -> bytes:
        """The next message's bytes, without the NUL."""
        while True:
            end = self.buffer.find(b"\0")
            if end >= 0:
                message, self.buffer = self.buffer[:end], self.buffer[end + 1:]
                return message
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buffer += chunk

    def roundtrip_raw(self, data: bytes) -> bytes:
        """Send pre-encoded call bytes, return the reply's bytes unparsed."""
        self.sock.sendall(data)
        return self.read_raw()

    def call(self, method: str, parameters: dict | None = None) -> dict:
        """One call; returns the reply's parameters, raises on an error reply."""
        reply = json.loads(self.roundtrip_raw(request(method, parameters)))
        if "error" in reply:
            raise VarlinkCallError(reply["error"], reply.get("parameters"))
        return reply.get("parameters", {})

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VarlinkCallError(Exception):
    def __init__(self, error: str, parameters):
        super().__init__(f"{error} {parameters or ''}".strip())
        self.error = error
        self.parameters = parameters


def call(path: str, method: str, parameters: dict | None = None, *, timeout: float = 60.0) -> dict:
    """One call over a fresh connection."""
    with Connection(path, timeout) as conn:
        return conn.call(method, parameters)
