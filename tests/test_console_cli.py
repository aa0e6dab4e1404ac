"""vmctl console's terminal side, without a VM: raw mode and its restoration, the I/O loop.

Plain stdlib (threads, ptys, socketpairs); no gevent, as in vmctl.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import termios
import threading

import pytest

from vmbridge.cli import console as cli


@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def read_some(fd, want, timeout=5.0):
    """Read from fd until `want` is in what was read."""
    data = b""
    while want not in data:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"{want!r} did not arrive; got {data!r}"
        data += os.read(fd, 4096)
    return data


def is_raw(attrs):
    lflag = attrs[3]
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


def test_raw_terminal_restored_on_exit_error_and_signal(pty_pair):
    _, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert not is_raw(before)
    handler_before = signal.getsignal(signal.SIGTERM)
    with cli.RawTerminal(slave):
        assert is_raw(termios.tcgetattr(slave))
    assert termios.tcgetattr(slave) == before
    # An exception in the block.
    with pytest.raises(ZeroDivisionError):
        with cli.RawTerminal(slave):
            1 / 0
    assert termios.tcgetattr(slave) == before
    # Each signal: the terminal is back before Signalled even leaves the handler.
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        seen = []
        with pytest.raises(cli.Signalled) as e:
            with cli.RawTerminal(slave) as term:
                original = term.restore

                def spy():
                    original()
                    seen.append(termios.tcgetattr(slave) == before)
                term.restore = spy
                os.kill(os.getpid(), signum)
                select.select([], [], [], 5)    # the handler raises here
        assert e.value.signum == signum and seen[0] is True
        assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signal.SIGTERM) is handler_before
    # Not a terminal: nothing to change, nothing to break.
    r, w = os.pipe()
    with cli.RawTerminal(r) as term:
        assert term.saved is None
    os.close(r)
    os.close(w)


def test_raw_terminal_survives_a_hung_up_terminal(pty_pair):
    master, slave = pty_pair
    with cli.RawTerminal(slave):
        os.close(master)    # the terminal went away (SIGHUP's usual cause): restoring must not raise


def run_loop(sock, in_fd, out_fd, **kwargs):
    result = {}

    def target():
        try:
            result["value"] = cli.console_loop(sock, in_fd, out_fd, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_console_loop_copies_both_ways_and_detaches_on_ctrl_bracket(pty_pair):
    master, slave = pty_pair
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    with cli.RawTerminal(slave):
        thread, result = run_loop(ours, slave, slave, pending=b"replayed\r\n")
        assert b"replayed" in read_some(master, b"replayed")
        theirs.sendall(b"guest says hi\r\n")
        read_some(master, b"guest says hi")
        os.write(master, b"ls\r\x03")               # Ctrl-C too: raw mode hands it to the guest
        assert theirs.recv(100) == b"ls\r\x03"
        os.write(master, b"last\x1dnot sent")       # Ctrl-]: what came before goes, then detach
        thread.join(5)
        assert result == {"value": cli.DETACHED}
        assert theirs.recv(100) == b"last"
    ours.close()
    assert theirs.recv(100) == b""                  # the caller closes the socket; the VM is not told more


def test_console_loop_read_only_and_closed_by_the_peer(pty_pair):
    master, slave = pty_pair
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    with cli.RawTerminal(slave):
        thread, result = run_loop(ours, slave, slave, writable=False)
        os.write(master, b"typed")                  # dropped: read-only
        theirs.sendall(b"output\r\n[vmbridged: the VM exited]\r\n")
        read_some(master, b"the VM exited")
        assert select.select([theirs], [], [], 0.2)[0] == []     # nothing was sent
        theirs.close()
        thread.join(5)
        assert result == {"value": cli.CLOSED}
    ours.close()


def test_console_loop_stdin_at_eof_keeps_the_output_flowing():
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(stdin_w, b"echo hi\r")
    os.close(stdin_w)                               # e.g. vmctl console NAME < script
    thread, result = run_loop(ours, stdin_r, out_w)
    assert theirs.recv(100) == b"echo hi\r"
    theirs.sendall(b"hi\r\n")
    assert read_some(out_r, b"hi\r\n") == b"hi\r\n"
    theirs.close()
    thread.join(5)
    assert result == {"value": cli.CLOSED}
    for fd in (stdin_r, out_r, out_w):
        os.close(fd)
    ours.close()


def test_printable_defuses_escape_sequences():
    assert cli.printable("prompt# \x1b[6n\r\n\ttab\x7f") == "prompt# ^[[6n\r\n\ttab^?"
