"""vmctl console against a real guest (busybox, TCG) through vmbridged: one boot, every check.

The CLI runs as a process on a pty, as a person would use it (``vmctl
--address SOCKET console``); other viewers attach over the varlink upgrade
directly.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import uuid

import pytest

from conftest import ROOT, VMCTL
from guest import PREFIX, PROMPT, require_guest
from test_control import call
from test_lifecycle import wait_console
from vmbridge.cli import console as cli

LOG_SIZE = 32 * 1024


class PtyConsole:
    """`vmctl console` on a pty of its own; everything it prints is collected."""

    def __init__(self, address, *args):
        self.master, self.slave = os.openpty()
        self.initial = termios.tcgetattr(self.slave)
        self.out = b""
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, VMCTL, "--address", address, "console", *args],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=ROOT, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=ROOT))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.out += data

    def wait_for(self, pattern, start=0, timeout=60) -> re.Match:
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        exited = None
        while True:
            with self._lock:
                m = rx.search(self.out, start)
            if m:
                return m
            now = time.monotonic()
            if exited is None and self.proc.poll() is not None:
                exited = now        # what it printed last may still be on its way
            assert now < deadline and (exited is None or now - exited < 1), \
                f"no {rx.pattern!r} on the pty (vmctl status {self.proc.returncode}); got:\n" \
                f"{self.out[-2000:].decode(errors='replace')}"
            time.sleep(0.05)

    def type(self, data: bytes):
        os.write(self.master, data)

    def wait_exit(self, timeout=15) -> int:
        return self.proc.wait(timeout)

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.initial

    def raw(self) -> bool:
        return not termios.tcgetattr(self.slave)[3] & termios.ICANON

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.slave)
        os.close(self.master)
        self._thread.join(2)


def vmctl_console(address, *args, timeout=30):
    return subprocess.run([sys.executable, VMCTL, "--address", address, "console", *args],
                          capture_output=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          stdin=subprocess.DEVNULL, timeout=timeout)


def heartbeats(data: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"vmbridge-guest: heartbeat (\d+) ", data)]


def read_until(sock, pattern, data=b"", timeout=30):
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while not rx.search(data):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([sock], [], [], left)[0], f"no {pattern!r}; got {data[-1000:]!r}"
        chunk = sock.recv(65536)
        assert chunk, f"EOF before {pattern!r}; got {data[-1000:]!r}"
        data += chunk
    return data


def read_log(daemon, name="guest"):
    path = os.path.join(daemon.runtime_dir, "machines", name, "console.log")
    with open(path, "rb") as f:
        current = f.read()
    try:
        with open(path + ".1", "rb") as f:
            old = f.read()
    except FileNotFoundError:
        old = None
    return current, old


def wait_heartbeat(daemon, at_least, timeout=60) -> int:
    """Wait for a heartbeat numbered at_least or more in console.log; returns its number."""
    deadline = time.monotonic() + timeout
    while True:
        beats = heartbeats(read_log(daemon)[0])
        if beats and max(beats) >= at_least:
            return max(beats)
        assert time.monotonic() < deadline, f"no heartbeat {at_least} in console.log"
        time.sleep(0.1)


@pytest.fixture
def consoles():
    made = []

    def make(*args, **kwargs):
        made.append(PtyConsole(*args, **kwargs))
        return made[-1]
    yield make
    for c in made:
        c.close()


def test_console_end_to_end(daemon_factory, consoles):
    g = require_guest()
    daemon = daemon_factory(extra_args=["--console-log-size", str(LOG_SIZE)])
    daemon.create("guest", machine="q35", accel="tcg", memory="256M", linux=g.kernel, initrd=g.initrd,
                  append=g.cmdline)
    ctl = daemon.control_socket("guest")
    wait_console(daemon, "guest", PREFIX + "shell on")
    wait_console(daemon, "guest", PREFIX + "heartbeat 1 ")
    token = uuid.uuid4().hex[:12]

    # --tail while nobody is attached: the last N lines, and out.
    tail = vmctl_console(ctl, "--tail", "3")
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout.count(b"\n") == 3 and PREFIX.encode() in tail.stdout, tail.stdout

    # Viewer A (read-only, on a pty) sees the guest's heartbeats.
    t0 = time.monotonic()
    a = consoles(ctl, "--read-only")
    a.wait_for(r"connected to the console of guest \(read-only\)")
    first = a.wait_for(r"heartbeat \d+ ")          # the replay has some, then live ones
    attach_to_first_heartbeat = time.monotonic() - t0
    assert a.raw()
    a.wait_for(r"heartbeat \d+ ", first.end())
    # Viewer B attaches over varlink and then stops reading.
    b_sock, _, reply = cli.attach(ctl, read_only=True)
    assert reply == {"writable": False}

    # The writer W (on a pty) types into the guest's shell; everyone sees the answer.
    w = consoles(ctl)
    w.wait_for("connected to the console of guest; press Ctrl-]")
    w.wait_for(r"heartbeat \d+ ")
    w.type(b"\r")
    start = w.wait_for(PROMPT).end()
    w.type(f'echo hello-"{token}"\r'.encode())
    w.wait_for(f"\r\nhello-{token}\r\n", start)
    a.wait_for(f"\r\nhello-{token}\r\n")
    a.type(b"echo typed-by-a-read-only-viewer\r")      # dropped: A is read-only

    # A second writer is refused, and told how to get in.
    refused = vmctl_console(ctl)
    assert refused.returncode == 1
    assert b"the console already has a writer (pid %d); --read-only watches, --force takes over" \
        % w.proc.pid in refused.stderr, refused.stderr

    # --force takes over: W is told, disconnected, and gets its terminal back.
    w2 = consoles(ctl, "--force")
    w2.wait_for(f"took the console over from pid {w.proc.pid}")
    w.wait_for(r"\[vmbridged: another writer \(pid=%d uid=%d\) took over the console\]"
               % (w2.proc.pid, os.getuid()))
    assert w.wait_exit() == 1
    w.wait_for("the console connection was closed")
    assert w.restored()
    w2.wait_for(r"heartbeat \d+ ")
    start = len(w2.out)
    w2.type(f'echo forced-"{token}"\r'.encode())
    w2.wait_for(f"\r\nforced-{token}\r\n", start)
    log, _ = read_log(daemon)
    assert f"hello-{token}".encode() in log and b"typed-by-a-read-only-viewer" not in log

    # Much output (~1 MB) while B reads nothing: the guest, A, W2 and the log keep going.
    beat_before = max(heartbeats(read_log(daemon)[0]))
    assert a.proc.poll() is None
    start = len(w2.out)
    w2.type(b"seq 1 150000; echo seq-done-$((6 * 7))\r")
    w2.wait_for(r"\r\n150000\r\nseq-done-42\r\n", start, timeout=120)
    a.wait_for(r"\r\n150000\r\nseq-done-42\r\n", timeout=30)
    beat_after = wait_heartbeat(daemon, beat_before + 2)
    a.wait_for(f"heartbeat {beat_after} ")
    # The log holds the output and rotated at its limit, keeping one old file.
    current, old = read_log(daemon)
    assert old is not None and 0 < len(current) <= LOG_SIZE and len(old) == LOG_SIZE
    assert re.search(rb"\r\n149\d\d\d\r\n", old + current) or b"seq-done-42" in current
    # B reads at last: what it missed is announced, the newest output follows; its
    # connection was not dropped.
    data = read_until(b_sock, rb"heartbeat %d " % beat_after, timeout=30)
    m = re.search(rb"\[vmbridged: (\d+) bytes of console output skipped: this viewer fell behind\]", data)
    assert m and int(m.group(1)) > 100_000, data[:300]
    b_sock.close()

    # Ctrl-] detaches W2 (exit 0, terminal restored); the VM runs on and A still watches.
    w2.type(b"\x1d")
    assert w2.wait_exit() == 0
    w2.wait_for("detached from the console of guest")
    assert w2.restored()
    assert call(ctl, "io.systemd.MachineInstance.Describe")["parameters"] == {"running": True,
                                                                              "status": "running"}
    after_detach = len(a.out)
    a.wait_for(r"heartbeat \d+ ", after_detach)
    # SIGTERM to A: its terminal comes back too.
    assert a.raw()
    a.proc.send_signal(signal.SIGTERM)
    assert a.wait_exit() == 128 + signal.SIGTERM
    assert a.restored()

    # --tail after all that: the rotated log's last lines.
    tail = vmctl_console(ctl, "--tail", "2")
    assert tail.returncode == 0 and tail.stdout.count(b"\n") == 2, tail

    # vmbridged dies (kill -9) and comes back: the console is plumbed in again,
    # the replay shows what came before, and typing works.
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.start()
    sock, pending, reply = cli.attach(ctl, replay_lines=5)
    data = read_until(sock, rb"heartbeat \d+ ", pending)
    replayed = max(heartbeats(data))
    data = read_until(sock, rb"heartbeat %d " % (replayed + 1), data)   # live again
    sock.sendall(f'echo after-restart-"{token}"\r'.encode())
    data = read_until(sock, f"\r\nafter-restart-{token}\r\n".encode(), data)
    # The VM goes away: the viewer is told, then disconnected.
    assert call(ctl, "io.systemd.MachineInstance.Terminate") == {}
    data = read_until(sock, rb"\[vmbridged: the VM exited\]\r\n$", data)
    sock.settimeout(5)
    assert sock.recv(100) == b""
    sock.close()
    print(f"\nattach -> first heartbeat on a pty: {attach_to_first_heartbeat:.2f}s")
