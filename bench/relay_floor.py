"""The least a process between client and QEMU can cost: a blocking stdlib relay.

    python bench/relay_floor.py SOCKET QEMU_BINARY

Starts its own bare QEMU (as harness.RawQMP does), listens on SOCKET and
answers varlink ``io.systemd.MachineInstance.Pause``/``Resume`` on one
connection at a time by writing ``stop``/``cont`` to QMP and reading the
reply: no gevent, no JSON parsing, no state, no validation. Prints "ready"
when it listens; exits when its client hangs up.

``bench/run.py`` times Pause+Resume through it beside vmbridged: the gap
between the raw QMP floor and this relay is what any daemon in the middle
costs on this machine (two more process wake-ups per call), the gap between
the relay and vmbridged is what vmbridge's code costs.
"""

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import QemuInfo, RawQMP  # noqa: E402

COMMANDS = {b"io.systemd.MachineInstance.Pause": b"stop", b"io.systemd.MachineInstance.Resume": b"cont"}


def main() -> int:
    path, binary = sys.argv[1], sys.argv[2]
    qmp = RawQMP(QemuInfo(binary))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    buffer = b""
    try:
        while True:
            end = buffer.find(b"\0")
            if end < 0:
                chunk = conn.recv(65536)
                if not chunk:
                    return 0
                buffer += chunk
                continue
            message, buffer = buffer[:end], buffer[end + 1:]
            start = message.find(b'"method":"') + 10
            method = message[start:message.find(b'"', start)]
            command = COMMANDS.get(method)
            if command is None:
                conn.sendall(b'{"error":"org.varlink.service.MethodNotFound"}\0')
                continue
            qmp.roundtrip(qmp.command(command.decode()))
            conn.sendall(b"{}\0")
    finally:
        conn.close()
        listener.close()
        qmp.close()


if __name__ == "__main__":
    sys.exit(main())
