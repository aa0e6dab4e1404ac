"""vmctl end to end: the real bin/vmctl in subprocesses against a real vmbridged and QEMU.

VMs are `-machine none` (no guest: cheap, and QMP answers all the same).
Timeouts here only keep a broken build from hanging; nothing asserts how
long something took.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import VMCTL

EXITED_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (\S+) EXITED (\{.*\})$")


def run_vmctl(*args, runtime_dir=None, timeout=60, env=None, cwd=None) -> subprocess.CompletedProcess:
    environment = dict(os.environ if env is None else env)
    environment.pop("VMBRIDGE_RUNTIME_DIR", None)
    if runtime_dir is not None:
        environment["VMBRIDGE_RUNTIME_DIR"] = runtime_dir
    return subprocess.run([sys.executable, VMCTL, *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=cwd)


class Ctl:
    """vmctl bound to one daemon (through $VMBRIDGE_RUNTIME_DIR)."""

    def __init__(self, daemon):
        self.daemon = daemon

    def __call__(self, *args, **kw) -> subprocess.CompletedProcess:
        return run_vmctl(*args, runtime_dir=self.daemon.runtime_dir, **kw)

    def ok(self, *args, **kw) -> str:
        """Run; it must succeed silently on stderr. Returns stdout."""
        out = self(*args, **kw)
        assert out.returncode == 0 and out.stderr == "", (args, out.returncode, out.stderr)
        return out.stdout

    def json(self, *args):
        return [json.loads(line) for line in self.ok(*args, "--json").splitlines()]

    def popen(self, *args) -> subprocess.Popen:
        env = dict(os.environ, VMBRIDGE_RUNTIME_DIR=self.daemon.runtime_dir)
        return subprocess.Popen([sys.executable, VMCTL, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    def events(self, *args):
        """`vmctl events ARGS`, running: ``with ctl.events(...) as (proc, lines)``."""
        return running(self.popen("events", *args))

    def states(self) -> dict:
        return {m["name"]: m["state"] for m in self.daemon.call("List")["parameters"]["machines"]}


@pytest.fixture
def ctl(daemon) -> Ctl:
    return Ctl(daemon)


class Lines:
    """Lines of a running process's stdout, read with a deadline (no threads)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.seen: list[str] = []

    def next(self, timeout: float = 30.0) -> str | None:
        """The next line, or None at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"no line from {self.proc.args} after {self.seen}"
            if select.select([self.fd], [], [], left)[0]:
                data = os.read(self.fd, 65536)
                if not data:
                    return None
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.seen.append(line.decode())
        return self.seen[-1]

    def take(self, n: int) -> list[str]:
        return [self.next() for _ in range(n)]


@contextlib.contextmanager
def running(proc: subprocess.Popen):
    """(proc, Lines of its stdout); killed at the end if it still runs."""
    try:
        yield proc, Lines(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pid_of(daemon, name: str) -> int:
    return daemon.call("List", {"name": name})["parameters"]["machines"][0]["pid"]


# ------------------------------------------------------------------ list

def test_list_empty_table_and_json(ctl, daemon):
    assert ctl.ok("list") == "No VMs.\n"
    assert ctl.ok("list", "--no-legend") == ""
    assert ctl.ok("list", "--json") == "[]\n"
    daemon.create("web")
    daemon.create("db")
    ctl.ok("pause", "db")
    lines = ctl.ok("list").splitlines()
    assert lines[0].split() == ["NAME", "STATE", "STATUS", "PID", "CPU%", "MEMORY", "ADDRESS"]
    # CPU% and MEMORY come from the sampler: "-" until the first sample, then figures.
    rows = [line.split() for line in lines[1:3]]
    assert [row[:4] + row[6:] for row in rows] == [
        ["db", "paused", "paused", str(pid_of(daemon, "db")), daemon.control_socket("db")],
        ["web", "running", "running", str(pid_of(daemon, "web")), daemon.control_socket("web")]]
    assert lines[3:] == ["", "2 VMs listed."]
    # Scripts: no legend, NAME first (the bash completion reads column 1), STATE second.
    assert [line.split()[:2] for line in ctl.ok("list", "--no-legend").splitlines()] == \
        [["db", "paused"], ["web", "running"]]
    # `vmctl` alone lists, like `machinectl` alone.
    assert ctl.ok() == ctl.ok("list")
    machines = json.loads(ctl.ok("--json", "list"))
    assert [m["name"] for m in machines] == ["db", "web"]
    for m in machines:
        assert {"name", "state", "pid", "controlAddress"} <= set(m)
        assert m["controlAddress"] == daemon.control_socket(m["name"])
    pretty = ctl.ok("list", "--json=pretty")
    assert json.loads(pretty) == json.loads(ctl.ok("list", "--json=short")) and "\n  " in pretty
    assert len(ctl.ok("list", "--json=short").splitlines()) == 1


def test_list_says_one_vm(ctl, daemon):
    daemon.create("solo")
    assert ctl.ok("list").splitlines()[-1] == "1 VM listed."


# ------------------------------------------------- pause/resume/describe

def test_pause_resume_describe_text_and_json(ctl, daemon):
    daemon.create("a")
    daemon.create("b")
    assert ctl.ok("describe", "a", "b") == (
        "NAME  RUNNING  STATUS\n"
        "a     yes      running\n"
        "b     yes      running\n")
    assert ctl.ok("pause", "a") == ""                       # silent on success, as machinectl
    assert ctl.json("describe", "a") == [{"name": "a", "running": False, "status": "paused"}]
    assert ctl.ok("pause", "a") == ""                       # pausing a paused VM succeeds
    assert ctl.states() == {"a": "paused", "b": "running"}
    assert ctl.ok("describe", "--no-legend", "b", "a").splitlines() == \
        ["b  yes  running", "a  no   paused"]               # argument order
    ctl.ok("resume", "a", "b")
    assert ctl.json("describe", "b", "a") == [{"name": "b", "running": True, "status": "running"},
                                              {"name": "a", "running": True, "status": "running"}]
    pretty = ctl.ok("describe", "a", "--json=pretty")
    assert json.loads(pretty) == {"name": "a", "running": True, "status": "running"}
    assert ctl.states() == {"a": "running", "b": "running"}


def test_reboot_and_poweroff_reach_qemu(ctl, daemon):
    daemon.create("r")
    with ctl.events("r") as (proc, lines):
        assert lines.next().endswith(" r READY")
        ctl.ok("reboot", "r")
        assert re.fullmatch(r"\S+ r RESET \{.*\"reason\":\"host-qmp-system-reset\".*\}", lines.next())
        ctl.ok("poweroff", "r")                              # -machine none: QEMU says POWERDOWN only
        assert lines.next().endswith(" r POWERDOWN")


# ---------------------------------------------------------- terminate

def test_terminate(ctl, daemon):
    daemon.create("t1")
    daemon.create("t2")
    daemon.create("t3")
    assert ctl.ok("terminate", "t1") == ""
    assert ctl.states() == {"t2": "running", "t3": "running"}   # transient: forgotten on exit
    assert len(daemon.qemu_processes()) == 2
    ctl.ok("terminate", "t2", "t3")
    assert ctl.states() == {} and daemon.qemu_processes() == []  # returns when QEMU is gone
    out = ctl("terminate", "t1")
    assert out.returncode == 1 and out.stderr == "vmctl: no such VM 't1'\n"


# --------------------------------------------------------------- start

def test_start_creates_and_returns_when_running(ctl, daemon):
    assert ctl.ok("start", "s1", "--machine", "none", "--memory", "128M") == ""
    machine = daemon.call("List", {"name": "s1"})["parameters"]["machines"][0]
    assert machine["state"] == "running" and machine["config"]["memory"] == "128M"
    assert ctl.json("describe", "s1") == [{"name": "s1", "running": True, "status": "running"}]
    [created] = ctl.json("start", "s2", "--machine=none", "--cpus=2")
    assert created["name"] == "s2" and created["state"] == "running" and created["pid"] > 0
    assert created["controlAddress"] == daemon.control_socket("s2") and created["config"]["cpus"] == 2
    # Starting a VM that runs succeeds (it runs).
    ctl.ok("start", "s1")
    out = ctl("start", "s1", "--machine", "none")
    assert out.returncode == 1
    assert out.stderr == "vmctl: VM 's1' already exists (start it without VM options, or remove it first)\n"


def test_start_defined_and_persistent(ctl, daemon):
    # Defined (not running): `start NAME` without options starts it.
    reply = daemon.call("Define", {"config": {"name": "def", "machine": "none"}})
    assert "error" not in reply, reply
    assert ctl.states() == {"def": "defined"}
    ctl.ok("start", "def")
    assert ctl.states() == {"def": "running"}
    # --persistent: the definition outlives the VM's exit; start brings it back.
    ctl.ok("start", "keep", "--machine", "none", "--persistent")
    assert os.path.exists(os.path.join(daemon.config_dir, "machines", "keep.conf"))
    ctl.ok("terminate", "keep")
    assert ctl.states()["keep"] == "exited"
    ctl.ok("start", "keep")
    assert ctl.states()["keep"] == "running"
    out = ctl("start", "nope")
    assert out.returncode == 1
    assert out.stderr == ("vmctl: no such VM 'nope' (to create it, give VM options such as "
                          "--memory and --linux)\n")


def test_start_bad_values_name_the_option(ctl, daemon, short_tmp):
    cases = [
        (["--memory", "lots"], "vmctl: bad: invalid --memory: expected a size such as 512M or 2G, got 'lots'"),
        (["--cpus", "0"], "vmctl: bad: invalid --cpus: 0 is out of range (1..512)"),
        (["--pcie-ports", "99"], "vmctl: bad: invalid --pcie-ports: 99 is out of range (0..32)"),
        (["--qemu", "no-such-qemu"], "vmctl: bad: invalid --qemu: 'no-such-qemu' not found in $PATH"),
        # Relative paths are made absolute by vmctl (vmbridged runs elsewhere).
        (["--linux", "kernel"], f"vmctl: bad: invalid --linux: {short_tmp}/kernel: no such file"),
    ]
    for options, message in cases:
        out = ctl("start", "bad", "--machine", "none", *options, cwd=short_tmp)
        assert (out.returncode, out.stderr, out.stdout) == (1, message + "\n", ""), options
    out = ctl("start", "-bad", "--machine", "none")
    assert out.returncode == 2                                   # argparse: an option, not a NAME
    out = ctl("start", "bad.", "--machine", "none", "--memory", "1G", "--name-is-fine")
    assert out.returncode == 2 and "unrecognized arguments: --name-is-fine" in out.stderr
    out = ctl("start", "b@d", "--machine", "none")
    assert out.returncode == 1 and out.stderr.startswith("vmctl: b@d: invalid VM name: 'b@d' is not a valid VM name")
    assert ctl.states() == {}                                     # nothing half-made


def test_start_setup_failure_is_reported_and_nothing_remains(ctl, daemon, short_tmp):
    kernel = os.path.join(short_tmp, "vmlinuz")
    open(kernel, "wb").close()
    out = ctl("start", "k", "--machine", "none", "--linux", "vmlinuz", cwd=short_tmp)
    assert out.returncode == 1
    assert out.stderr.startswith("vmctl: k: failed to start: QEMU exited during start-up: ")
    assert "-kernel" in out.stderr
    assert ctl.states() == {} and daemon.qemu_processes() == []


def test_start_absolutizes_device_paths(ctl, daemon, short_tmp, monkeypatch):
    # This vmbridged refuses devices; its error shows the spec vmctl sent.
    out = ctl("start", "d", "--machine", "none", "--drive", "img.qcow2,format=qcow2", cwd=short_tmp)
    assert out.returncode == 1 and out.stderr.startswith("vmctl: d: invalid --drive: ")
    from vmbridge.cli.start import config_from
    from vmbridge.cli import _parser
    parser = _parser("start")[0]
    monkeypatch.chdir(short_tmp)
    args = parser.parse_args(["start", "x", "--drive", "a.img,format=raw", "--drive", "/abs.img",
                              "--bind", "share:tag", "--linux", "k", "--initrd", "../i",
                              "--qemu", "./qemu", "--network", "tap:tap0", "--ephemeral"])
    assert config_from(args) == {
        "drive": [f"{short_tmp}/a.img,format=raw", "/abs.img"], "bind": [f"{short_tmp}/share:tag"],
        "linux": f"{short_tmp}/k", "initrd": os.path.join(os.path.dirname(short_tmp), "i"),
        "qemu": f"{short_tmp}/qemu", "network": ["tap:tap0"], "ephemeral": True}


def test_start_usage_errors(ctl):
    for args, message in [
        (["start", "x", "--cpus", "two"], "argument --cpus: invalid int value: 'two'"),
        (["start", "x", "--firmware", "efi"], "argument --firmware: invalid choice: 'efi'"),
        (["start", "x", "--machine", "none", "--autostart"], "--autostart needs --persistent"),
        (["start"], "the following arguments are required: NAME"),
    ]:
        out = ctl(*args)
        assert out.returncode == 2 and message in out.stderr and out.stdout == "", (args, out.stderr)


# -------------------------------------------------------------- remove

def test_remove(ctl, daemon):
    daemon.create("run")
    daemon.call("Define", {"config": {"name": "def", "machine": "none"}})
    out = ctl("remove", "run")
    assert out.returncode == 1
    assert out.stderr == "vmctl: run: it is running (terminate it first, or remove --force)\n"
    ctl.ok("remove", "def")
    assert ctl.states() == {"run": "running"}
    assert not os.path.exists(os.path.join(daemon.config_dir, "machines", "def.conf"))
    ctl.ok("remove", "--force", "run")
    assert ctl.states() == {} and daemon.qemu_processes() == []
    out = ctl("remove", "run", "def")
    assert out.returncode == 1
    assert out.stderr == "vmctl: no such VM 'run'\nvmctl: no such VM 'def'\n"


# ----------------------------------------------------------- bad names

def test_unknown_vm(ctl, daemon):
    out = ctl("describe", "nope")
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "vmctl: no such VM 'nope'\n")
    daemon.create("real")
    out = ctl("pause", "nope", "real", "gone")                 # the others are still done
    assert out.returncode == 1
    assert out.stderr == "vmctl: no such VM 'nope'\nvmctl: no such VM 'gone'\n"
    assert ctl.states() == {"real": "paused"}
    out = ctl("describe", "real", "nope")
    assert out.returncode == 1 and out.stdout.splitlines()[1:] == ["real  no       paused"]


def test_vm_that_does_not_run(ctl, daemon):
    daemon.call("Define", {"config": {"name": "idle", "machine": "none"}})
    out = ctl("pause", "idle")
    assert (out.returncode, out.stderr) == (1, "vmctl: idle: not running (state: defined)\n")


# ----------------------------------------------------- daemon not there

def test_daemon_not_running(short_tmp):
    out = run_vmctl("list", runtime_dir=short_tmp)
    manager = os.path.join(short_tmp, "io.vmbridge.Manager")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == f"vmctl: vmbridged is not running (no manager socket at {manager})\n"
    out = run_vmctl("--runtime-dir", short_tmp, "pause", "a", "b", runtime_dir="/nonexistent")
    assert out.returncode == 1 and out.stderr.count("vmbridged is not running") == 1
    # A socket file nobody listens on (vmbridged was killed).
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(manager)
    stale.close()
    out = run_vmctl("describe", "a", runtime_dir=short_tmp)
    assert out.returncode == 1
    assert out.stderr == f"vmctl: vmbridged is not running (nothing listens on {manager})\n"


def test_no_runtime_dir_known():
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "VMBRIDGE_RUNTIME_DIR")}
    if os.getuid() == 0:
        pytest.skip("root uses /run/vmbridge")
    out = run_vmctl("list", env=env)
    assert out.returncode == 1 and "$XDG_RUNTIME_DIR is not set" in out.stderr


def test_manager_that_does_not_answer_times_out(short_tmp):
    # Listening, never accepting: connect() succeeds, no answer ever comes.
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.path.join(short_tmp, "io.vmbridge.Manager"))
    server.listen(8)
    try:
        out = run_vmctl("--timeout", "0.5", "list", runtime_dir=short_tmp)
        assert (out.returncode, out.stderr) == (1, "vmctl: timed out after 0.5s waiting for vmbridged\n")
        out = run_vmctl("start", "late", "--machine", "none", "--timeout=0.5s", runtime_dir=short_tmp)
        assert (out.returncode, out.stderr) == (1, "vmctl: late: timed out after 0.5s waiting for vmbridged "
                                                   "(it may still come up: see vmctl list)\n")
    finally:
        server.close()


def test_permission_denied_is_said_plainly(short_tmp):
    # Root passes any file mode; the varlink server's own refusal says it the same way.
    from vmbridge.cli.context import CLIError, explain_connect, explain_varlink
    from vmbridge.varlink.client import VarlinkConnectError, VarlinkError
    import errno
    path = "/run/vmbridge/io.vmbridge.Manager"
    e = explain_connect(VarlinkConnectError(errno.EACCES, "x", path), path, True)
    assert str(e) == f"permission denied on {path}"
    e = explain_varlink(VarlinkError("org.varlink.service.PermissionDenied"), path, "io.vmbridge.Manager.List")
    assert isinstance(e, CLIError)
    assert e.message == f"permission denied on {path} (org.varlink.service.PermissionDenied)"
    e = explain_varlink(VarlinkError("io.systemd.System", {"origin": "linux", "errno": 110,
                                                           "errnoName": "ETIMEDOUT"}), path, "x.Pause")
    assert e.message == "QEMU did not answer in time (io.systemd.System ETIMEDOUT)"
    e = explain_varlink(VarlinkError("org.example.Odd", {"why": 1}), path, "x.Pause")
    assert e.message == 'org.example.Odd {"why":1}'


# -------------------------------------------------------- usage errors

@pytest.mark.parametrize("args, message", [
    (["frob"], "argument COMMAND: invalid choice: 'frob'"),
    (["pause"], "no VM NAME given (or use --address SOCKET)"),
    (["--timeout", "soon", "list"], "argument --timeout: expected seconds"),
    (["--timeout", "0", "list"], "argument --timeout: must be more than 0 seconds"),
    (["list", "--json=ugly"], "argument --json: invalid choice: 'ugly'"),
    (["--address", "/x/control", "list"], "list needs vmbridged; --address talks to one VM"),
    (["--address", "/x/control", "pause", "web"], "--address talks to one VM: give no NAME"),
    (["--address", "/x/control", "remove", "web"], "remove needs vmbridged"),
    (["list", "extra"], "unrecognized arguments: extra"),
    (["--runtime-dir"], "argument --runtime-dir: expected one argument"),
    (["--qemu", "x", "start", "a"], "unrecognized option --qemu before the command"),
    (["--memory=1G", "start", "a"], "unrecognized option --memory before the command"),
    (["events", "a", "--filter"], "argument --filter: expected one argument"),
    (["storage", "add", "a", "b"], "storage add takes NAME BINDING FILE"),
    (["storage", "grow", "a"], "argument ACTION: invalid choice: 'grow'"),
])
def test_usage_errors_exit_2(args, message, short_tmp):
    out = run_vmctl(*args, runtime_dir=short_tmp)
    assert out.returncode == 2, out
    assert message in out.stderr and out.stderr.startswith("usage: vmctl") and out.stdout == ""


def test_help_and_version():
    out = run_vmctl("--help")
    assert out.returncode == 0 and out.stderr == ""
    for verb in ("list", "start", "describe", "pause", "resume", "poweroff", "reboot",
                 "terminate", "remove", "events", "storage"):
        assert re.search(rf"^    {verb} ", out.stdout, re.M), verb
    out = run_vmctl("--version")
    from vmbridge import __version__
    assert (out.returncode, out.stdout) == (0, f"vmctl {__version__}\n")
    out = run_vmctl("pause", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: vmctl [OPTIONS...] pause")


def test_global_options_before_or_after_the_verb(ctl, daemon):
    daemon.create("g")
    assert ctl.ok("--no-legend", "describe", "g") == ctl.ok("describe", "g", "--no-legend") == \
        "g  yes  running\n"
    assert ctl.ok("--json", "describe", "g") == ctl.ok("describe", "--json", "g") == \
        '{"name":"g","running":true,"status":"running"}\n'
    # --json takes its mode only as --json=MODE: here "list" is the verb.
    assert json.loads(ctl.ok("--json", "list"))[0]["name"] == "g"
    # --runtime-dir beats $VMBRIDGE_RUNTIME_DIR.
    out = run_vmctl("--runtime-dir", daemon.runtime_dir, "describe", "g", runtime_dir="/nonexistent")
    assert out.returncode == 0


# -------------------------------------------------------------- events

def test_events_one_vm_text_until_it_exits(ctl, daemon):
    daemon.create("e")
    with ctl.events("e") as (proc, lines):
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} e READY", lines.next())
        ctl.ok("pause", "e")
        assert lines.next().endswith(" e STOP")
        ctl.ok("resume", "e")
        assert lines.next().endswith(" e RESUME")
        ctl.ok("terminate", "e")
        assert lines.next().endswith(' e SHUTDOWN {"guest":false,"reason":"host-qmp-quit"}')
        match = EXITED_LINE.match(lines.next())
        assert match and match.group(1) == "e"
        assert json.loads(match.group(2)) == {"reason": "host-qmp-quit", "exitStatus": 0}
        assert lines.next() is None                          # the VM is gone: the stream ends
        assert proc.wait(30) == 0 and proc.stderr.read() == ""


def test_events_json(ctl, daemon):
    daemon.create("j")
    with ctl.events("--json", "j") as (proc, lines):
        ready = json.loads(lines.next())
        assert set(ready) == {"timeUSec", "name", "event"} and (ready["name"], ready["event"]) == ("j", "READY")
        assert abs(ready["timeUSec"] / 1e6 - time.time()) < 3600
        ctl.ok("pause", "j")
        assert {k: v for k, v in json.loads(lines.next()).items() if k != "timeUSec"} == \
            {"name": "j", "event": "STOP"}
        ctl.ok("terminate", "j")
        shutdown, exited = json.loads(lines.next()), json.loads(lines.next())
        assert shutdown["event"] == "SHUTDOWN" and shutdown["data"]["reason"] == "host-qmp-quit"
        assert exited["event"] == "EXITED" and exited["data"]["exitStatus"] == 0
        assert proc.wait(30) == 0


def test_events_two_vms_merged_with_filter(ctl, daemon):
    daemon.create("m1")
    daemon.create("m2")
    with ctl.events("m1", "m2", "--filter", "STOP", "--filter=RESET") as (proc, lines):
        assert sorted(line.split()[1:] for line in lines.take(2)) == [["m1", "READY"], ["m2", "READY"]]
        ctl.ok("pause", "m2")
        assert lines.next().split()[1:] == ["m2", "STOP"]
        ctl.ok("resume", "m2")                               # RESUME: filtered out
        ctl.ok("reboot", "m1")
        assert lines.next().split()[1:3] == ["m1", "RESET"]
        ctl.ok("pause", "m1")
        assert lines.next().split()[1:] == ["m1", "STOP"]
        ctl.ok("terminate", "m1", "m2")
        assert lines.next() is None                          # EXITED was not asked for ...
        assert proc.wait(30) == 0
        notes = sorted(proc.stderr.read().splitlines())       # ... but why it ended is said
        assert notes == ["vmctl: m1: exited (host-qmp-quit)", "vmctl: m2: exited (host-qmp-quit)"]


def test_events_two_vms_unfiltered_end_with_exited(ctl, daemon):
    daemon.create("u1")
    daemon.create("u2")
    with ctl.events("u1", "u2") as (proc, lines):
        lines.take(2)
        ctl.ok("terminate", "u1")
        assert [line.split()[1:3] for line in lines.take(2)] == [["u1", "SHUTDOWN"], ["u1", "EXITED"]]
        assert proc.poll() is None                           # u2's stream goes on
        ctl.ok("pause", "u2")
        assert lines.next().split()[1:] == ["u2", "STOP"]
        ctl.ok("terminate", "u2")
        assert [line.split()[1:3] for line in lines.take(2)] == [["u2", "SHUTDOWN"], ["u2", "EXITED"]]
        assert lines.next() is None and proc.wait(30) == 0


@pytest.mark.parametrize("names", [["i1"], ["i1", "i2"]], ids=["one", "several"])
def test_events_ctrl_c_exits_0(ctl, daemon, names):
    for name in names:
        daemon.create(name)
    with ctl.events(*names) as (proc, lines):
        lines.take(len(names))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stderr.read() == ""                      # no traceback


def test_events_of_a_missing_vm_is_reported_at_once(ctl, daemon):
    daemon.create("here")
    with ctl.events("here", "missing") as (proc, lines):
        assert lines.next().split()[1:] == ["here", "READY"]
        assert proc.stderr.readline() == "vmctl: no such VM 'missing'\n"   # while "here" streams
        ctl.ok("terminate", "here")
        lines.take(2)
        assert proc.wait(30) == 1


# ---------------------------------------------------------------- bulk

def test_bulk_pause_with_one_qemu_stopped(ctl, daemon):
    names = [f"v{i}" for i in range(10)]
    for name in names:
        daemon.create(name)
    stopped = pid_of(daemon, "v4")
    argv = ["--timeout", "3", "pause", "v0", "v1", "v2", "v3", "zz", "v4", "v5", "v6", "v7", "v8", "v9", "aa"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        proc = ctl.popen(*argv)
        # The other nine are paused while vmctl still waits for v4.
        others = set(names) - {"v4"}
        deadline = time.monotonic() + 60
        while {n for n, s in ctl.states().items() if s == "paused"} != others:
            assert proc.poll() is None, "vmctl ended before the nine others were paused"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert proc.poll() is None
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and out == ""
        # Argument order, although v4 finished last.
        assert err == ("vmctl: no such VM 'zz'\n"
                       "vmctl: v4: timed out after 3s waiting for the VM\n"
                       "vmctl: no such VM 'aa'\n")
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert ctl.states()["v4"] in ("running", "paused")       # QEMU goes on after SIGCONT
    # describe of all ten: answered from vmbridged's memory, in argument order.
    rows = ctl.ok("describe", "--no-legend", *reversed(names)).splitlines()
    assert [row.split()[0] for row in rows] == list(reversed(names))


# ------------------------------------------------- the reference's stress

def test_stress_start_pause_resume_terminate(ctl, daemon):
    """5 × (start → 3 × (pause, describe, resume, describe) → terminate), every state checked."""
    for cycle in range(5):
        ctl.ok("start", "stress", "--machine", "none", "--memory", "64M")
        assert ctl.states() == {"stress": "running"}, cycle
        assert ctl.json("describe", "stress") == [{"name": "stress", "running": True, "status": "running"}]
        for _ in range(3):
            ctl.ok("pause", "stress")
            assert ctl.json("describe", "stress") == [{"name": "stress", "running": False, "status": "paused"}]
            assert ctl.states() == {"stress": "paused"}
            ctl.ok("resume", "stress")
            assert ctl.json("describe", "stress") == [{"name": "stress", "running": True, "status": "running"}]
            assert ctl.states() == {"stress": "running"}
        ctl.ok("terminate", "stress")
        assert ctl.states() == {}
        assert ctl("describe", "stress").stderr == "vmctl: no such VM 'stress'\n"
        assert daemon.qemu_processes() == []


# ------------------------------------------------------------ --address

def test_address_talks_to_the_control_socket_without_a_manager(daemon, short_tmp):
    daemon.create("direct")
    address = daemon.control_socket("direct")
    nowhere = os.path.join(short_tmp, "empty")          # no manager socket here
    os.mkdir(nowhere)

    def vmctl(*args):
        return run_vmctl("--address", address, *args, runtime_dir=nowhere)

    assert vmctl("describe").stdout == "NAME    RUNNING  STATUS\ndirect  yes      running\n"
    assert vmctl("pause").returncode == 0
    assert json.loads(vmctl("describe", "--json").stdout) == {"name": "direct", "running": False,
                                                              "status": "paused"}
    assert vmctl("resume").returncode == 0
    events = subprocess.Popen([sys.executable, VMCTL, "--address", address, "events"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, VMBRIDGE_RUNTIME_DIR=nowhere))
    with running(events) as (proc, lines):
        assert lines.next().endswith(" direct READY")
        out = vmctl("terminate")                             # MachineInstance.Terminate
        assert (out.returncode, out.stderr) == (0, "")
        assert lines.next().endswith(" direct SHUTDOWN {\"guest\":false,\"reason\":\"host-qmp-quit\"}")
        assert EXITED_LINE.match(lines.next())
        assert proc.wait(30) == 0
    out = vmctl("describe")
    assert out.returncode == 1
    assert out.stderr == f"vmctl: direct: no control socket at {address} (is the VM running?)\n"


# ------------------------------------------------------------- storage

def test_storage_add_replace_and_errors(ctl, daemon, short_tmp):
    """vmctl opens the file and passes it; the daemon attaches it (q35, no guest needed to add)."""
    daemon.create("st", machine="q35", accel="tcg", memory="64M")
    image = os.path.join(short_tmp, "disk.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    assert ctl.ok("storage", "add", "st", "data", image, "--config", "readonly=on") == ""
    out = ctl("storage", "add", "st", "data", image)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.startswith("vmctl: st: storage add data: ") and "StorageExists" in out.stderr
    assert ctl.ok("storage", "replace", "st", "data", image) == ""
    out = ctl("--address", daemon.control_socket("st"), "storage", "remove", "nope")
    assert out.returncode == 1 and "NoSuchStorage" in out.stderr
    out = ctl("storage", "add", "st", "data2", image, "--config", "format=vmdk")
    assert out.returncode == 1 and "ConfigNotSupported" in out.stderr
    out = ctl("storage", "add", "st", "data", os.path.join(short_tmp, "nope.img"))
    assert out.returncode == 1
    assert out.stderr == f"vmctl: st: storage add data: cannot open {short_tmp}/nope.img: No such file or directory\n"
    out = ctl("storage", "remove", "st", "data", "--config", "x")
    assert out.returncode == 2 and "--config is for storage add" in out.stderr
    # A machine without a bus says so plainly.
    daemon.create("bare")
    out = ctl("storage", "add", "bare", "data", image)
    assert out.returncode == 1
    assert out.stderr == ("vmctl: bare: storage add data: not supported by this VM "
                          "(io.systemd.MachineInstance.NotSupported)\n")


# ------------------------------------------------------------- start-up

def imported_modules(*args, runtime_dir) -> set[str]:
    env = dict(os.environ, VMBRIDGE_RUNTIME_DIR=runtime_dir)
    out = subprocess.run([sys.executable, "-v", VMCTL, *args], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(re.findall(r"^import '([\w.]+)'", out.stderr, re.M))


def test_one_vm_commands_do_not_import_gevent(daemon):
    daemon.create("fast")
    daemon.create("fast2")
    one = imported_modules("pause", "fast", runtime_dir=daemon.runtime_dir)
    assert "vmbridge.cli.instance" in one
    assert not {m for m in one if m.split(".")[0] in ("gevent", "varlink", "psutil", "shutil")}
    assert not {m for m in one if m.startswith(("vmbridge.machine", "vmbridge.qmp", "vmbridge.varlink.server",
                                                "vmbridge.cli.events", "vmbridge.cli.start"))}
    several = imported_modules("pause", "fast", "fast2", runtime_dir=daemon.runtime_dir)
    assert "gevent.socket" in several
    assert "gevent.monkey" not in several  # gevent's sockets, used directly: no patching cost
