"""The serial console without QEMU: vmbridge.machine.console and io.vmbridge.Console.

The test plays QEMU on the other end of the console's socketpair. Everything
runs in one process on gevent (no monkey-patching): the varlink server, the
console's reader and, through gevent sockets, the clients.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import sys
import types

import gevent
import gevent.socket
import pytest

from vmbridge.cli import console as cli
from vmbridge.control import build_service
from vmbridge.machine.console import (Console, ConsoleClosed, ConsoleViewer, WriterPresent, last_lines,
                                      notice)
from vmbridge.varlink import Server, VarlinkError

pytest_plugins = ["varlink_fixtures"]      # cooperative_client


def wait_for(predicate, timeout=5.0):
    with gevent.Timeout(timeout, AssertionError("timed out waiting")):
        while not predicate():
            gevent.sleep(0.005)


@pytest.fixture
def tmp():
    path = tempfile.mkdtemp(prefix="vmc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_console(tmp):
    """make_console(**options) -> (console, qemu): a started Console and QEMU's end."""
    made = []

    def make(**options):
        console = Console(tmp, "t", **options)
        qemu = gevent.socket.socket(fileno=console.open().detach())
        console.start()
        made.append((console, qemu))
        return console, qemu

    yield make
    for console, qemu in made:
        console.close()
        qemu.close()


def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


# ------------------------------------------------------------------ pieces

def test_last_lines_counts_like_tail():
    assert last_lines(b"a\nb\nc\n", 2) == (b"b\nc\n", True)
    assert last_lines(b"a\nb\nc", 2) == (b"b\nc", True)          # a last line without newline counts
    assert last_lines(b"a\nb\n", 2) == (b"a\nb\n", True)
    assert last_lines(b"a\nb\n", 3) == (b"a\nb\n", False)
    assert last_lines(b"", 1) == (b"", False)
    assert last_lines(b"a\n", 0) == (b"", True)


def test_viewer_buffer_is_bounded_and_says_what_it_lost():
    v = ConsoleViewer(read_only=True, limit=100)
    v.write(b"a" * 60)
    v.write(b"b" * 60)                      # 20 bytes too many: the oldest go
    assert v.pending == 100
    skipped = notice("20 bytes of console output skipped: this viewer fell behind")
    assert v.get() == skipped + b"a" * 40 + b"b" * 60
    assert v.get(timeout=0.01) is None      # nothing pending
    v.write(b"x" * 250)                     # one chunk bigger than the buffer
    v.close("bye")
    assert v.get() == notice("150 bytes of console output skipped: this viewer fell behind") + \
        b"x" * 100 + notice("bye")
    assert v.get() == b""                   # closed and drained
    v.write(b"late")                        # ignored once closed
    assert v.get() == b"" and v.skipped_total == 170


def test_viewer_close_discard_and_callback():
    v = ConsoleViewer(read_only=False)
    calls = []
    v.on_close = lambda: calls.append(1)
    v.write(b"pending")
    v.close(discard=True)
    v.close("again")                        # idempotent: no second callback, no notice
    assert v.get() == b"" and calls == [1]


# ------------------------------------------------------------------ Console

def test_ring_log_rotation_tail_and_replay(make_console, tmp):
    console, qemu = make_console(ring_size=1024, log_limit=4096)
    lines = [b"line %04d ........\r\n" % i for i in range(600)]    # 12 KB: rotates twice
    everything = b"".join(lines)
    for i in range(0, len(lines), 50):
        qemu.sendall(b"".join(lines[i:i + 50]))
    log_path = os.path.join(tmp, "console.log")
    wait_for(lambda: everything.endswith(read_file(log_path)) and read_file(log_path).endswith(lines[-1]))
    current, old = read_file(log_path), read_file(log_path + ".1")
    assert 0 < len(current) <= 4096 and 0 < len(old) <= 4096
    assert everything.endswith(old + current)       # nothing lost between the two files
    assert os.stat(log_path).st_mode & 0o777 == 0o600
    # tail: from the log files, across the rotation
    assert console.tail(3) == b"".join(lines[-3:])
    n = (old + current).count(b"\n")
    assert console.tail(n) == old + current
    assert console.tail(n + 100) == old + current
    assert console.tail(0) == b""
    # replay: from the ring (1 KiB), whole lines only
    assert console.replay(2) == b"".join(lines[-2:])
    replay = console.replay()
    assert len(replay) <= 1024 and replay.startswith(b"line ") and everything.endswith(replay)
    assert console.replay(0) == b""
    # A prompt followed by a cursor position query: live it goes out as it is,
    # a replay leaves the query out.
    viewer = console.attach(read_only=True, replay_lines=0)
    qemu.sendall(b"vmbridge-guest# \x1b[6n")
    wait_for(lambda: viewer.pending)
    assert viewer.get() == b"vmbridge-guest# \x1b[6n"
    assert console.replay(1) == b"vmbridge-guest# "
    assert console.tail(1) == b"vmbridge-guest# \x1b[6n"      # the log keeps everything


def test_tail_limit_and_ring_fallback(make_console, tmp):
    console, qemu = make_console()
    qemu.sendall(b"one\ntwo\nthree")
    wait_for(lambda: console.recent() == b"one\ntwo\nthree")
    assert console.tail(2, limit=9) == b"three"     # cut at 9 bytes: the partial first line goes
    os.unlink(os.path.join(tmp, "console.log"))
    assert console.tail(2) == b"two\nthree"        # the log is gone: the ring still knows


def test_resume_starts_the_ring_with_the_log(tmp):
    with open(os.path.join(tmp, "console.log.1"), "wb") as f:
        f.write(b"older\n")
    with open(os.path.join(tmp, "console.log"), "wb") as f:
        f.write(b"before the restart\nprompt# \x1b[6n")
    console = Console(tmp, "t")
    qemu = console.open(resume=True)
    try:
        # console.log.1 may start mid-line (the rotation split a line): not replayed
        assert console.replay() == console.replay(5) == b"before the restart\nprompt# "
    finally:
        console.close()
        qemu.close()
    os.unlink(os.path.join(tmp, "console.log.1"))
    console = Console(tmp, "t")
    qemu = console.open(resume=True)
    try:
        assert console.replay() == b"before the restart\nprompt# "   # all of it
    finally:
        console.close()
        qemu.close()


def test_writer_slot_force_and_send(make_console):
    console, qemu = make_console()
    w1 = console.attach(owner="pid=1", pid=1)
    r1 = console.attach(read_only=True)
    r2 = console.attach(read_only=True)
    assert console.writer is w1 and len(console.viewers) == 3
    with pytest.raises(WriterPresent) as e:
        console.attach(owner="pid=2", pid=2)
    assert e.value.writer is w1
    assert console.send(b"typed", w1) is True
    assert qemu.recv(100) == b"typed"
    assert console.send(b"nope", r1) is False       # a read-only viewer is not the writer
    w2 = console.attach(force=True, owner="pid=2", pid=2)
    assert console.writer is w2 and w1.closed and w1 not in console.viewers
    assert w1.get() == notice("another writer (pid=2) took over the console")
    assert console.send(b"x", w1) is False
    qemu.sendall(b"out")
    wait_for(lambda: r2.pending == 3)
    assert r1.get() == r2.get() == w2.get() == b"out"
    console.detach(w2)
    assert console.writer is None
    console.attach(owner="pid=3")                   # the slot is free again
    console.close("the VM exited")
    assert r1.get() == notice("the VM exited") and r1.get() == b""
    with pytest.raises(ConsoleClosed):
        console.attach(read_only=True)


def test_reader_never_waits_for_a_viewer(make_console, tmp):
    console, qemu = make_console(viewer_buffer=4096, log_limit=64 << 20)
    stuck = console.attach(read_only=True)          # never drained
    data = os.urandom(1 << 20)
    qemu.sendall(data)
    wait_for(lambda: os.path.getsize(os.path.join(tmp, "console.log")) == len(data))
    assert stuck.pending == 4096
    out = stuck.get()
    assert out.startswith(b"\r\n[vmbridged: %d bytes of console output skipped" % (len(data) - 4096))
    assert out.endswith(data[-4096:])


# ------------------------------------------------------------------ io.vmbridge.Console

@pytest.fixture
def control(tmp, cooperative_client, make_console):
    """(console, qemu, address): a console served on a control socket as vmbridged does."""
    servers = []

    def start(**options):
        console, qemu = make_console(**options)
        server = Server(build_service(types.SimpleNamespace(name="t", console=console)),
                        path=os.path.join(tmp, "control"))
        server.start()
        servers.append(server)
        return console, qemu, server.address

    yield start
    for server in servers:
        server.stop()


def recv_until(sock, needle, buffer=b"", timeout=5.0):
    data = buffer
    with gevent.Timeout(timeout, AssertionError(f"{needle!r} not received; got {data[-500:]!r}")):
        while needle not in data:
            chunk = sock.recv(65536)
            assert chunk, f"EOF before {needle!r}; got {data[-500:]!r}"
            data += chunk
    return data


def recv_to_eof(sock, timeout=5.0):
    data = b""
    with gevent.Timeout(timeout, AssertionError("no EOF")):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_service_viewers_writer_takeover(control):
    console, qemu, address = control()
    qemu.sendall(b"booted\r\nlogin: ")
    wait_for(lambda: console.recent().endswith(b"login: "))
    r1, pending1, reply = cli.attach(address, read_only=True)
    assert reply == {"writable": False}
    r2, pending2, _ = cli.attach(address, read_only=True, replay_lines=1)
    w1, pending_w, reply = cli.attach(address)
    assert reply == {"writable": True}
    # The replay: everything, or the last line only.
    assert recv_until(r1, b"login: ", pending1) == b"booted\r\nlogin: "
    assert recv_until(r2, b"login: ", pending2) == b"login: "
    recv_until(w1, b"login: ", pending_w)
    # The writer types, QEMU gets it; what a read-only viewer sends is dropped.
    r1.sendall(b"ignored")
    w1.sendall(b"root\r")
    assert qemu.recv(100) == b"root\r"
    qemu.sendall(b"root\r\n# ")
    for sock in (r1, r2, w1):
        recv_until(sock, b"root\r\n# ")
    # A second writer is refused, naming the first.
    with pytest.raises(VarlinkError) as e:
        cli.attach(address)
    assert e.value.error == "io.vmbridge.Console.WriterPresent"
    assert e.value.parameters == {"pid": os.getpid()}
    assert "--force takes over" in cli.explain(e.value)
    # --force: the old writer is told and disconnected; the new one types.
    w2, pending, reply = cli.attach(address, force=True, replay_lines=0)
    assert reply == {"writable": True, "previousWriterPid": os.getpid()}
    assert recv_to_eof(w1).endswith(notice("another writer (pid=%d uid=%d) took over the console"
                                           % (os.getpid(), os.getuid())))
    w2.sendall(b"ls\r")
    assert qemu.recv(100) == b"ls\r"
    # The VM goes away: everyone is told, and disconnected.
    console.close("the VM exited")
    for sock in (r1, r2, w2):
        assert recv_to_eof(sock).endswith(notice("the VM exited"))
        sock.close()
    w1.close()


def test_service_hang_up_detaches_and_input_before_the_reply(control):
    console, qemu, address = control()
    w1, _, _ = cli.attach(address)
    wait_for(lambda: console.writer is not None)
    w1.close()
    wait_for(lambda: console.writer is None and not console.viewers)
    # Bytes sent right behind the call (before the reply came) are typed too.
    sock = gevent.socket.socket(gevent.socket.AF_UNIX)
    sock.connect(address)
    sock.sendall(json.dumps({"method": "io.vmbridge.Console.Attach", "parameters": {}, "upgrade": True}).encode()
                 + b"\0typed-ahead")
    assert qemu.recv(100) == b"typed-ahead"
    sock.close()
    wait_for(lambda: console.writer is None)


def test_service_slow_viewer_stalls_nobody(control, tmp):
    console, qemu, address = control(log_limit=64 << 20)
    stuck, _, _ = cli.attach(address, read_only=True)       # never reads until the end
    live, _, _ = cli.attach(address, read_only=True)
    received = []

    def drain():
        while True:
            chunk = live.recv(65536)
            if not chunk:
                return
            received.append(chunk)
    reader = gevent.spawn(drain)
    sent = []
    for i in range(256):            # 4 MiB at a pace `live` keeps up with; far past what `stuck` buffers
        block = (b"%06d" % i) * (16384 // 6) + b"\n"
        qemu.sendall(block)
        sent.append(block)
        gevent.sleep(0.001)
    wait_for(lambda: sum(map(len, received)) == sum(map(len, sent)), timeout=20)
    assert b"".join(received) == b"".join(sent)
    assert read_file(os.path.join(tmp, "console.log")) == b"".join(sent)
    # It reads at last: a notice of what it missed, then the newest output.
    data = recv_until(stuck, sent[-1], timeout=20)
    assert b" bytes of console output skipped: this viewer fell behind]" in data
    # Still connected: a slow viewer loses output, not its connection.
    console.close("bye")
    assert recv_to_eof(stuck).endswith(notice("bye"))
    reader.join(5)
    stuck.close()
    live.close()


def test_service_tail_and_errors(control):
    console, qemu, address = control()
    qemu.sendall(b"a\r\nb\r\nc \xff\r\n")
    wait_for(lambda: console.recent().endswith(b"\xff\r\n"))
    assert cli.tail(address, 2) == "b\r\nc \ufffd\r\n"
    from vmbridge.varlink.client import Connection
    with Connection(address, timeout=5) as c:
        assert c.call("io.vmbridge.Console.Tail") == {"text": "a\r\nb\r\nc \ufffd\r\n"}   # default 10 lines
        for method, parameters, name in (("Tail", {"lines": -1}, "lines"),
                                         ("Attach", {"replayLines": -1}, "replayLines")):
            with pytest.raises(VarlinkError) as e:
                c.call("io.vmbridge.Console." + method, parameters) if method == "Tail" else \
                    c.call_upgrade("io.vmbridge.Console." + method, parameters)
            assert (e.value.error, e.value.parameters) == ("org.varlink.service.InvalidParameter",
                                                           {"parameter": name})
        with pytest.raises(VarlinkError) as e:
            c.call("io.vmbridge.Console.Attach")
        assert e.value.error == "org.varlink.service.ExpectedUpgrade"
    # A VM without a console (machine 'none'), or with its console closed.
    console.close()
    with pytest.raises(VarlinkError) as e:
        cli.attach(address)
    assert e.value.error == "io.vmbridge.Console.NoConsole"


def test_service_no_console(tmp, cooperative_client):
    server = Server(build_service(types.SimpleNamespace(name="none", console=None)),
                    path=os.path.join(tmp, "control"))
    server.start()
    try:
        for call in (lambda: cli.attach(server.address), lambda: cli.tail(server.address, 1)):
            with pytest.raises(VarlinkError) as e:
                call()
            assert e.value.error == "io.vmbridge.Console.NoConsole"
            assert cli.explain(e.value).startswith("it has no serial console")
    finally:
        server.stop()


def test_verb_run_with_a_vmctl_context(control):
    """run(args, ctx) as vmctl calls it: ctx.targets() resolves, ctx.report() reports."""
    console, qemu, address = control()
    qemu.sendall(b"one\r\ntwo\r\nprompt# \x1b[6n")
    wait_for(lambda: console.recent().endswith(b"\x1b[6n"))
    reported = []
    ctx = types.SimpleNamespace(
        timeout=5, quiet=True, report=reported.append, note=lambda message: None, stderr=sys.stderr,
        targets=lambda names: [types.SimpleNamespace(name=names[0], address=address, error=None)])
    args = types.SimpleNamespace(name="t", tail=2, read_only=False, force=False)
    r, w = os.pipe()
    try:
        assert cli.run(args, ctx, stdin_fd=0, stdout_fd=w) == 0
        assert os.read(r, 1000) == b"two\r\nprompt# \x1b[6n"          # not a terminal: as it is
        # A second writer: refused before anything touches the terminal.
        holder = console.attach(pid=4242, owner="pid=4242")
        args.tail = None
        assert cli.run(args, ctx, stdin_fd=0, stdout_fd=w) == 1
        assert reported == ["t: the console already has a writer (pid 4242); --read-only watches, "
                            "--force takes over"]
        console.detach(holder)
    finally:
        os.close(r)
        os.close(w)


def test_service_closed_viewer_that_never_reads_is_cut_off(control, monkeypatch):
    """The VM exits while a viewer's socket is full: its socket is closed after the grace period."""
    import vmbridge.control
    monkeypatch.setattr(vmbridge.control, "CONSOLE_CLOSE_GRACE", 0.2)
    console, qemu, address = control()
    stuck, _, _ = cli.attach(address, read_only=True)
    writer, _, _ = cli.attach(address)
    wait_for(lambda: len(console.viewers) == 2)
    writer_got = gevent.spawn(recv_to_eof, writer)  # the writer keeps up
    for _ in range(32):                             # 2 MiB: the stuck one's socket and buffer are full
        qemu.sendall(b"y" * 65536)
    wait_for(lambda: console.viewers[0].pending > 0)
    console.close("the VM exited")
    writer.sendall(b"typed after the console closed")   # dropped quietly, the writer is closed
    assert writer_got.get(timeout=5).endswith(notice("the VM exited"))
    gevent.sleep(0.5)                               # past the grace period, without reading
    data = recv_to_eof(stuck)                       # what the kernel holds, then EOF: cut off
    assert not data.endswith(notice("the VM exited"))
    stuck.close()
    writer.close()
