"""vmctl qmp: one command, and the interactive prompt through a pipe and a pty."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from conftest import ROOT, VMCTL, raw_call
from vmbridge.cli.qmp import QMPSession, parse_input

TIMEOUT = 30


def vmctl(*args, env=None, timeout=TIMEOUT, input=None):
    return subprocess.run([sys.executable, VMCTL, *args],
                          input=input, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.fixture
def vm(daemon):
    daemon.create("t1")
    return daemon.control_socket("t1")


@pytest.mark.parametrize("text,message", [
    ("query-status", {"execute": "query-status"}),
    ("  query-block   {\"flat\": true} ", {"execute": "query-block", "arguments": {"flat": True}}),
    ('{"execute": "query-status", "id": 1}', {"execute": "query-status", "id": 1}),
    ("", None),
    ("   ", None),
])
def test_parse_input(text, message):
    assert parse_input(text) == message


@pytest.mark.parametrize("text,complaint", [
    ("query-block {flat}", "arguments are not valid JSON"),
    ("query-block [1]", "arguments must be a JSON object"),
    ('{"execute": 1}', 'needs "execute"'),
    ("{nope", "not valid JSON"),
    ('"x"', "not a command name"),
])
def test_parse_input_complaints(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_input(text)


def test_session_api(vm):
    with QMPSession.acquire(vm, timeout=TIMEOUT) as session:
        greeting = session.negotiate()
        assert greeting["capabilities"] == [] and session.version.startswith("7.")
        events = []
        assert session.execute({"execute": "stop", "id": "s"}, on_event=events.append) == {"return": {}, "id": "s"}
        assert [e["event"] for e in events] == ["STOP"]
        assert session.execute({"execute": "cont"}) == {"return": {}}
        reply = session.execute({"execute": "nope"})
        assert reply["error"]["class"] == "CommandNotFound"


def test_one_command(vm, daemon):
    out = vmctl("--address", vm, "qmp", "query-status")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"return": {"status": "running", "singlestep": False, "running": True}}
    assert out.stdout.startswith("{\n  ")                       # pretty by default
    out = vmctl("--runtime-dir", daemon.runtime_dir, "--json=short", "qmp", "t1", "query-named-block-nodes", '{"flat": true}')
    assert out.returncode == 0, out.stderr
    assert out.stdout == '{"return": []}\n'
    # Arguments may come in shell words, and raw requests work too.
    out = vmctl("--address", vm, "qmp", "qom-list", "{\"path\":", '"/machine"}')
    assert out.returncode == 0 and any(p["name"] == "type" for p in json.loads(out.stdout)["return"])
    out = vmctl("--address", vm, "qmp", '{"execute": "query-name", "id": "n"}')
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == "n"


def test_one_command_errors(vm, daemon):
    out = vmctl("--address", vm, "qmp", "x-nope")
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"error": {"class": "CommandNotFound",
                                                "desc": "The command x-nope has not been found"}}
    out = vmctl("--address", vm, "qmp", "chardev-remove", '{"id": "qmp"}')
    assert out.returncode == 1 and "vmbridge: chardev 'qmp' belongs to vmbridged" in out.stdout
    out = vmctl("--address", vm, "qmp", "query-block", "{flat}")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("vmctl: ") and "not valid JSON" in out.stderr
    out = vmctl("--runtime-dir", daemon.runtime_dir, "qmp", "nosuchvm", "query-status")
    assert out.returncode == 1 and out.stderr == "vmctl: no such VM 'nosuchvm'\n"
    out = vmctl("--runtime-dir", daemon.runtime_dir, "qmp")
    assert out.returncode == 2 and "no VM NAME given" in out.stderr
    assert describe(vm)["running"] is True


def describe(control):
    return raw_call(control, {"method": "io.systemd.MachineInstance.Describe", "parameters": {}})["parameters"]


def test_interactive_through_a_pipe(vm):
    script = "\n".join([
        "query-status",
        "stop",
        '{"execute": "cont", "id": 7}',
        "query-block {oops",
        "",
        "x-nope",
        "query-name",
    ]) + "\n"
    out = vmctl("--address", vm, "qmp", input=script)
    assert out.returncode == 0, out.stderr
    # Replies pretty-printed, events one line each, in the order they came.
    lines = out.stdout.splitlines()
    events = [json.loads(line)["event"] for line in lines if line.startswith('{"timestamp"')]
    assert events == ["STOP", "RESUME"]
    replies = split_pretty(line for line in lines if not line.startswith('{"timestamp"'))
    assert replies[0]["return"]["status"] == "running"
    assert replies[1] == {"return": {}}
    assert replies[2] == {"return": {}, "id": 7}
    assert replies[3]["error"]["class"] == "CommandNotFound"
    assert replies[4] == {"return": {"name": "t1"}}
    assert len(replies) == 5
    assert "arguments are not valid JSON" in out.stderr
    assert out.stdout.index('"event": "STOP"') < out.stdout.index('"id": 7')


def split_pretty(lines):
    replies, current = [], []
    for line in lines:
        current.append(line)
        if line == "}":
            replies.append(json.loads("\n".join(current)))
            current = []
    assert not current
    return replies


def test_interactive_vm_going_away(vm, daemon):
    proc = subprocess.Popen([sys.executable, VMCTL, "--address", vm, "qmp"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        proc.stdin.write("query-status\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "{\n"
        # Waiting for its next line, it learns that the VM went away.
        assert raw_call(vm, {"method": "io.systemd.MachineInstance.Terminate", "parameters": {}}) == {}
        assert proc.wait(TIMEOUT) == 1
        assert "the VM closed the QMP session" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


class Pty:
    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(ROOT)
            os.execve(argv[0], argv, env)
        self.out = b""

    def expect(self, what: bytes, timeout=TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while what not in self.out:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what!r} in {self.out[-2000:]!r}"
            if select.select([self.fd], [], [], remaining)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"EOF; no {what!r} in {self.out[-2000:]!r}"
                self.out += chunk
        head, _, self.out = self.out.partition(what)
        return head

    def send(self, text: str):
        os.write(self.fd, text.encode())

    def wait(self, timeout=TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.05)[0]:
                    self.out += os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.05)
        raise AssertionError("vmctl qmp did not exit")

    def close(self):
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_interactive_on_a_terminal(vm, daemon, short_tmp):
    state = os.path.join(short_tmp, "state")
    env = {**os.environ, "XDG_STATE_HOME": state, "TERM": "xterm"}
    argv = [sys.executable, VMCTL, "--runtime-dir", daemon.runtime_dir, "qmp", "t1"]
    term = Pty(argv, env)
    try:
        term.expect(b"t1 (qmp)> ")
        term.send("query-statu\t")                # Tab completes the command name
        term.expect(b"query-status")
        term.send("\r")
        assert b'"status": "running"' in term.expect(b"t1 (qmp)> ")
        # An event while the prompt waits: printed, and the prompt comes back.
        term.send("query-ver")
        assert raw_call(vm, {"method": "io.systemd.MachineInstance.Pause", "parameters": {}}) == {}
        term.expect(b'"event": "STOP"')
        term.expect(b"t1 (qmp)> query-ver")          # redrawn, with what was typed so far
        term.send("sion\r")
        assert b'"major": 7' in term.expect(b"t1 (qmp)> ")
        term.send("quit\r")
        assert term.wait() == 0
    finally:
        term.close()
    with open(os.path.join(state, "vmbridge", "qmp_history")) as f:
        history = f.read().split("\n")
    assert "query-status" in history and "query-version" in history and "quit" in history
