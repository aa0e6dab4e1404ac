#!/usr/bin/env python3
"""A fake QEMU whose QMP monitor misbehaves, for vmbridged's fault tests.

vmbridged runs the QEMU binary named in a VM's config (``qemu``: an absolute
path), so a test points that at a symlink to this file named
``fake-qemu-MODE``; the name picks the misbehaviour (vmbridged's environment
is shared by all its VMs, the name is not). stdlib only.

It answers the probes like QEMU 7.2 (``-version``, ``-object help``);
otherwise it finds ``-chardev socket,id=qmp,fd=N`` in its argv and does, on
fd N, what MODE says. After misbehaving it stays alive (sleeping), as a hung
QEMU would: vmbridged has to kill it.

Modes, before the handshake completes (Create must fail with SetupFailed):
    garbage          a line that is not JSON instead of the greeting
    huge             100 MB without a newline instead of the greeting
    no-greeting      never says anything
    no-capabilities  greets, then never answers qmp_capabilities
    greeting-eof     greets, then closes the monitor
    unknown-ids      a proper handshake, then answers every command with an id
                     nobody asked for
    bad-greeting     a JSON object that is not a QMP greeting
Modes after a proper start-up (the VM runs; its first `stop` triggers it):
    late-garbage     answers `stop` with a line that is not JSON
    late-huge        answers `stop` with 100 MB without a newline
    late-eof         closes the monitor on `stop`
    late-deep        answers `stop` after events whose data nest ever deeper
                     (900 to 1000 levels: around Python's recursion limit)
Any other name behaves (a tiny well-behaved QMP server).
"""

import json
import os
import signal
import socket
import sys
import time

VERSION = "QEMU emulator version 7.2.22 (fake QEMU for vmbridge tests)\n" \
          "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"
OBJECTS = "List of user creatable objects:\n  authz-list\n  iothread\n  memory-backend-memfd\n"
GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "fake"},
                    "capabilities": ["oob"]}}
HUGE = 100 * 1024 * 1024


def linger():
    """What a hung QEMU does: nothing, until killed."""
    while True:
        time.sleep(3600)


def qmp_fd(argv):
    for i, arg in enumerate(argv[:-1]):
        if arg == "-chardev" and argv[i + 1].startswith("socket,id=qmp,"):
            for option in argv[i + 1].split(","):
                if option.startswith("fd="):
                    return int(option[3:])
    sys.exit("fake-qemu: no -chardev socket,id=qmp,fd=N in argv")


class Monitor:
    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        # vmbridged's socketpair() came from gevent: non-blocking, and QEMU's
        # end shares that flag with it. QEMU copes; so do we, by blocking.
        self.sock.setblocking(True)
        self.buffer = b""

    def send(self, message):
        self.sock.sendall(json.dumps(message).encode() + b"\r\n")

    def send_raw(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # vmbridged hung up on us, as it should

    def send_huge(self):
        chunk = b"x" * (1024 * 1024)
        try:
            for _ in range(HUGE // len(chunk)):
                self.sock.sendall(chunk)
        except OSError:
            pass

    def receive(self):
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def main():
    argv = sys.argv
    mode = os.path.basename(argv[0]).rpartition("fake-qemu-")[2]
    if "-version" in argv[1:]:
        sys.stdout.write(VERSION)
        return
    if argv[1:3] == ["-object", "help"]:
        sys.stdout.write(OBJECTS)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    monitor = Monitor(qmp_fd(argv))
    if mode == "garbage":
        monitor.send_raw(b"this is not QMP, not even JSON\r\n")
        linger()
    if mode == "huge":
        monitor.send_huge()
        linger()
    if mode == "no-greeting":
        linger()
    if mode == "bad-greeting":
        monitor.send({"hello": "world"})
        linger()
    monitor.send(GREETING)
    if mode == "greeting-eof":
        monitor.sock.close()
        linger()
    request = monitor.receive()
    if mode == "no-capabilities" or request is None:
        linger()
    monitor.send({"return": {}, "id": request.get("id")})
    running = False
    while True:
        request = monitor.receive()
        if request is None:
            linger()
        command, msg_id = request.get("execute"), request.get("id")
        if mode == "unknown-ids":
            monitor.send({"return": {}, "id": 100000 + (msg_id if isinstance(msg_id, int) else 0)})
            continue
        if command == "stop" and mode == "late-deep":
            for depth in range(900, 1001):
                monitor.send_raw(b'{"event":"DEEP","data":{"d":%s},"timestamp":{"seconds":0,"microseconds":0}}\r\n'
                                 % (b"[" * depth + b"]" * depth))
            monitor.send({"return": {}, "id": msg_id})
            continue
        if command == "stop" and mode.startswith("late-"):
            if mode == "late-garbage":
                monitor.send_raw(b"}}} garbage {{{\r\n")
            elif mode == "late-huge":
                monitor.send_huge()
            elif mode == "late-eof":
                monitor.sock.close()
            linger()
        if command == "query-status":
            result = {"status": "running" if running else "prelaunch", "running": running}
        elif command == "cont":
            running = True
            result = {}
            monitor.send({"event": "RESUME", "timestamp": {"seconds": int(time.time()), "microseconds": 0}})
        elif command == "stop":
            running = False
            result = {}
            monitor.send({"event": "STOP", "timestamp": {"seconds": int(time.time()), "microseconds": 0}})
        elif command == "quit":
            monitor.send({"return": {}, "id": msg_id})
            sys.exit(0)
        else:
            monitor.send({"error": {"class": "CommandNotFound", "desc": f"fake: {command}"}, "id": msg_id})
            continue
        monitor.send({"return": result, "id": msg_id})


if __name__ == "__main__":
    main()
