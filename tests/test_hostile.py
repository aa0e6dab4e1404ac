"""Hostile clients (issue 10): idle floods, connection caps, subscribers that
never read, other users, and names or options aimed at argv, QMP or paths.

The fuzzer of the varlink sockets is tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import open_to_everyone, read_message
from reliability import fds_back_to, open_fds, record, rss_mib, settled_fds
from test_control import Stream, call

MI = "io.systemd.MachineInstance"
RUNNING = {"parameters": {"running": True, "status": "running"}}
DESCRIBE = b'{"method":"io.systemd.MachineInstance.Describe","parameters":{}}\0'
EUSERS = {"error": "io.systemd.System", "parameters": {"origin": "linux", "errno": 87, "errnoName": "EUSERS"}}


def full_log(daemon) -> str:
    """The whole daemon log (Daemon.log() keeps only the tail)."""
    with open(daemon.log_path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def daemon_stats(daemon) -> dict:
    """The daemon's SIGUSR1 statistics line, parsed."""
    before = full_log(daemon).count("stats: ")
    daemon.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in full_log(daemon).splitlines() if "stats: " in line]
        if len(lines) > before:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("stats: ")[1])}
        time.sleep(0.02)
    raise AssertionError("no stats line after SIGUSR1")


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def describe_on(sock: socket.socket) -> dict:
    sock.sendall(DESCRIBE)
    return json.loads(read_message(sock))


# ------------------------------------------------------- idle connections


@pytest.fixture
def many_fds():
    """Room for a few thousand descriptors in the test process (and the daemons it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if want < 2100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_thousand_idle_connections(many_fds, daemon_factory):
    daemon = daemon_factory()  # started after the rlimit is raised: it inherits it
    daemon_proc = psutil.Process(daemon.proc.pid)
    daemon.create("idle")
    ctl = daemon.control_socket("idle")
    baseline = settled_fds(daemon_proc)
    idle = []
    try:
        for _ in range(1000):
            idle.append(connect(ctl))
        # All 1000 admitted (none refused), each holding an fd in the daemon.
        deadline = time.monotonic() + 10
        while daemon_stats(daemon)["connections"] < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = daemon_stats(daemon)
        assert stats["connections"] == 1000, stats
        assert "refusing connection" not in full_log(daemon)
        # A normal client is still served, on this socket and the manager's.
        start = time.monotonic()
        assert call(ctl, f"{MI}.Describe") == RUNNING
        latency = time.monotonic() - start
        assert daemon.call("List")["parameters"]["machines"][0]["name"] == "idle"
        # The idle ones were only idle: the first and the last answer too.
        assert describe_on(idle[0]) == RUNNING and describe_on(idle[-1]) == RUNNING
        rss = rss_mib(daemon_proc)
    finally:
        for sock in idle:
            sock.close()
    fds = fds_back_to(daemon_proc, baseline)
    assert fds <= baseline, f"fds {baseline} -> {fds}: {open_fds(daemon_proc.pid)}"
    record("idle_connections", {"idle": 1000, "describe_with_1000_idle_ms": round(latency * 1000, 2),
                                "daemon_rss_with_1000_idle_mib": round(rss, 1), "fds_baseline": baseline,
                                "fds_after_close": fds})


def test_per_uid_connection_cap(daemon_factory):
    daemon = daemon_factory(extra_args=["--max-connections-per-uid", "4"])
    daemon.create("capped")
    ctl = daemon.control_socket("capped")
    for path, probe, expected in [
        (ctl, DESCRIBE, RUNNING),
        (daemon.manager_socket, b'{"method":"org.varlink.service.GetInfo","parameters":{}}\0', None),
    ]:
        held = [connect(path) for _ in range(4)]
        try:
            for sock in held:  # admitted: each one answers
                sock.sendall(probe)
                reply = json.loads(read_message(sock))
                assert "error" not in reply and (expected is None or reply == expected), reply
            # The fifth: told why, then closed.
            with connect(path) as extra:
                assert json.loads(read_message(extra)) == EUSERS
                extra.sendall(probe)  # the call of a client that did not read first: not served
                assert extra.recv(4096) == b""
            # The four are unaffected.
            for sock in held:
                sock.sendall(probe)
                assert "error" not in json.loads(read_message(sock))
            # One leaves: room for one more.
            held.pop().close()
            deadline = time.monotonic() + 10
            while True:
                sock = connect(path)
                sock.sendall(probe)
                reply = json.loads(read_message(sock))
                if reply != EUSERS or time.monotonic() > deadline:
                    break
                sock.close()  # the daemon had not seen the close yet
                time.sleep(0.02)
            held.append(sock)
            assert "error" not in reply, reply
        finally:
            for sock in held:
                sock.close()
    assert "per-UID connection limit of 4 reached" in full_log(daemon)


# ------------------------------------------------- a subscriber that never reads


def test_subscriber_that_never_reads(daemon):
    daemon_proc = psutil.Process(daemon.proc.pid)
    daemon.create("ev")
    ctl = daemon.control_socket("ev")
    control = connect(ctl)
    buf = bytearray()

    def cycle():
        for method in ("Pause", "Resume"):
            control.sendall(b'{"method":"io.systemd.MachineInstance.%s","parameters":{}}\0' % method.encode())
            assert json.loads(read_message(control, buf)) == {}

    # The well-behaved subscriber reads everything, in a thread of its own.
    good = Stream(ctl, timeout=60)
    assert good.next_event() == {"event": "READY"}
    received = []

    def read_good():
        try:
            while True:
                received.append(good.next_event()["event"])
        except (EOFError, OSError):
            pass
    reader = threading.Thread(target=read_good, daemon=True)
    reader.start()

    def timed_cycles(n):
        start = time.monotonic()
        for _ in range(n):
            cycle()
        return (time.monotonic() - start) / n

    try:
        cycle_alone = timed_cycles(300)
        rss_before = rss_mib(daemon_proc)
        # The one that never reads.
        slow = connect(ctl, timeout=30)
        slow.sendall(b'{"method":"io.systemd.MachineInstance.SubscribeEvents","parameters":{},"more":true}\0')
        cycles = 300
        start = time.monotonic()
        while "dropping it" not in full_log(daemon):
            for _ in range(100):
                cycle()
            cycles += 100
            assert cycles < 20000, "the subscriber that never reads was never dropped"
        cycles_until_drop = cycles - 300
        cycle_with_slow = (time.monotonic() - start) / cycles_until_drop
        cycle_after = timed_cycles(300)
        cycles += 300
        rss_after = rss_mib(daemon_proc)
        # The slow one got what fitted into its socket, then the daemon hung up.
        data = bytearray()
        while True:
            chunk = slow.recv(65536)
            if not chunk:
                break
            data += chunk
        slow.close()
        messages = [json.loads(m) for m in bytes(data).split(b"\0") if m]
        assert messages[0] == {"parameters": {"event": "READY"}, "continues": True}
        assert len(messages) < 2 * cycles
        # The good one missed nothing, in order.
        deadline = time.monotonic() + 30
        while len(received) < 2 * cycles and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == ["STOP", "RESUME"] * cycles
        assert call(ctl, f"{MI}.Describe") == RUNNING
    finally:
        control.close()
        good.close()
    assert rss_after - rss_before < 16, f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB"
    assert full_log(daemon).count("dropping it") == 1  # only the slow one
    record("slow_subscriber", {"events_until_drop": 2 * cycles_until_drop, "slow_got_messages": len(messages),
                               "cycle_ms_alone": round(cycle_alone * 1000, 3),
                               "cycle_ms_with_slow": round(cycle_with_slow * 1000, 3),
                               "cycle_ms_after_drop": round(cycle_after * 1000, 3),
                               "rss_delta_mib": round(rss_after - rss_before, 1),
                               "good_subscriber_events": len(received)})


# ------------------------------------------------------------ another UID


OTHER_UID_SCRIPT = r"""
import json, os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
calls = json.loads(sys.argv[1])
for path, message in calls:
    s = socket.socket(socket.AF_UNIX); s.settimeout(10)
    try:
        s.connect(path)
        s.sendall(json.dumps(message).encode() + b"\0")
        data = b""
        while not data.endswith(b"\0"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print(json.dumps([path, message["method"], data.rstrip(b"\0").decode() or "closed"]))
    except OSError as e:
        print(json.dumps([path, message["method"], "oserror " + str(e)]))
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")
def test_other_uid_is_refused_everywhere(daemon, short_tmp):
    info = daemon.create("mine")
    ctl = daemon.control_socket("mine")
    open_to_everyone(daemon, ctl)  # SO_PEERCRED alone must keep the other UID out
    mgr = "io.vmbridge.Manager"
    evil = {"name": "evil", "machine": "none"}
    calls = [
        (daemon.manager_socket, {"method": f"{mgr}.List", "parameters": {}}),
        (daemon.manager_socket, {"method": f"{mgr}.Create", "parameters": {"config": evil}}),
        (daemon.manager_socket, {"method": f"{mgr}.Define", "parameters": {"config": evil}}),
        (daemon.manager_socket, {"method": f"{mgr}.Terminate", "parameters": {"name": "mine"}}),
        (daemon.manager_socket, {"method": f"{mgr}.Remove", "parameters": {"name": "mine", "force": True}}),
        (daemon.manager_socket, {"method": f"{mgr}.SubscribeEvents", "parameters": {}, "more": True}),
        (daemon.manager_socket, {"method": "org.varlink.service.GetInfo", "parameters": {}}),
        (ctl, {"method": f"{MI}.Describe", "parameters": {}}),
        (ctl, {"method": f"{MI}.Pause", "parameters": {}}),
        (ctl, {"method": f"{MI}.Terminate", "parameters": {}, "oneway": True}),
        (ctl, {"method": f"{MI}.SubscribeEvents", "parameters": {}, "more": True}),
        (ctl, {"method": "org.varlink.service.GetInfo", "parameters": {}}),
    ]
    out = subprocess.run([sys.executable, "-c", OTHER_UID_SCRIPT, json.dumps(calls)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == len(calls)
    for path, method, answer in results:
        # Refused before the call is even read: PermissionDenied, or the socket closed.
        assert answer in ("closed", '{"error":"org.varlink.service.PermissionDenied"}') \
            or answer.startswith("oserror"), (method, answer)
    assert full_log(daemon).count("UID 65534 is not allowed") == len(calls)
    # Nothing happened: the VM runs as before, nothing was created or defined.
    listed = daemon.call("List")["parameters"]["machines"]
    assert [(m["name"], m["state"], m["pid"]) for m in listed] == [("mine", "running", info["pid"])]
    assert call(ctl, f"{MI}.Describe") == RUNNING
    assert not os.path.exists(os.path.join(daemon.config_dir, "machines", "evil.conf"))


# ------------------------------------------- names and options aimed at argv/QMP/paths


LONG = "a" * 5000
# (config, the field the InvalidConfig error must name; None: a value of the
# wrong JSON type, which the IDL check refuses first as InvalidParameter "config")
HOSTILE_CONFIGS = [
    ({"name": "../x"}, "name"),
    ({"name": ".."}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": "-x"}, "name"),
    ({"name": "-machine"}, "name"),
    ({"name": "a,b"}, "name"),
    ({"name": "a,debug-threads=off"}, "name"),
    ({"name": "a\0b"}, "name"),
    ({"name": "a\nb"}, "name"),
    ({"name": "a b"}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"name": LONG}, "name"),
    ({"name": "vm\u00e9"}, "name"),
    ({"name": "ok", "machine": "none,accel=kvm"}, "machine"),
    ({"name": "ok", "machine": "-x"}, "machine"),
    ({"name": "ok", "machine": "none\n"}, "machine"),
    ({"name": "ok", "machine": "../x"}, "machine"),
    ({"name": "ok", "machine": "none", "qemu": "-x"}, "qemu"),
    ({"name": "ok", "machine": "none", "qemu": "../x"}, "qemu"),
    ({"name": "ok", "machine": "none", "qemu": "bin/qemu"}, "qemu"),
    ({"name": "ok", "machine": "none", "qemu": "/no/such/qemu"}, "qemu"),
    ({"name": "ok", "machine": "none", "qemu": "/usr/bin/qemu-system-x86_64\0-x"}, "qemu"),
    ({"name": "ok", "machine": "none", "qemu": "/" + LONG}, "qemu"),
    ({"name": "ok", "machine": "none", "accel": "kvm,thread=multi"}, "accel"),
    ({"name": "ok", "machine": "none", "cpus": "1,maxcpus=4"}, None),  # not an int: the IDL refuses it
    ({"name": "ok", "machine": "none", "cpus": -1}, "cpus"),
    ({"name": "ok", "machine": "none", "memory": "1G,slots=2"}, "memory"),
    ({"name": "ok", "machine": "none", "memory": "-1M"}, "memory"),
    ({"name": "ok", "machine": "none", "firmware": "/etc/passwd"}, "firmware"),
    ({"name": "ok", "machine": "none", "linux": "../x"}, "linux"),
    ({"name": "ok", "machine": "none", "linux": "vmlinuz"}, "linux"),
    ({"name": "ok", "machine": "none", "linux": "/boot/\0x"}, "linux"),
    ({"name": "ok", "machine": "none", "linux": "/no/such/kernel"}, "linux"),
    ({"name": "ok", "machine": "none", "linux": "/etc/passwd", "initrd": "-x"}, "initrd"),
    ({"name": "ok", "machine": "none", "linux": "/etc/passwd", "append": "a\nb"}, "append"),
    ({"name": "ok", "machine": "none", "linux": "/etc/passwd", "append": "a\0b"}, "append"),
    ({"name": "ok", "machine": "none", "linux": "/etc/passwd", "append": LONG}, "append"),
    ({"name": "ok", "machine": "none", "append": "console=ttyS0"}, "append"),
    ({"name": "ok", "machine": "none", "drive": ["/tmp/a,b.img"]}, "drive"),
    ({"name": "ok", "machine": "none", "drive": ["/tmp/x,file.driver=ssh"]}, "drive"),
    ({"name": "ok", "machine": "none", "network": ["tap:x,script=/bin/sh"]}, "network"),
    ({"name": "ok", "machine": "none", "bind": ["../x:tag"]}, "bind"),
    ({"name": "ok", "machine": "none", "vsock": "on,cid=3"}, "vsock"),
    ({"name": "ok", "machine": "none", "pcie_ports": 1000}, "pcie_ports"),
    ({"name": "ok", "machine": "none", "autostart": "maybe"}, None),  # not a bool: the IDL refuses it
    ({"name": "ok", "machine": "none", "memory": 512}, None),  # memory is a size string
    ({"name": "ok", "machine": "none", "drive": "/tmp/a,b.img"}, None),  # not a list
]


def test_hostile_names_and_options_are_rejected(daemon):
    """Each is refused by the manager with InvalidConfig naming the field; nothing starts."""
    machines_dir = os.path.join(daemon.runtime_dir, "machines")
    for config, field in HOSTILE_CONFIGS:
        for method in ("Create", "Define"):
            reply = daemon.call(method, {"config": config})
            if field is None:
                assert reply == {"error": "org.varlink.service.InvalidParameter",
                                 "parameters": {"parameter": "config"}}, (method, config, reply)
                continue
            assert reply.get("error") == "io.vmbridge.Manager.InvalidConfig", (method, config, reply)
            assert reply["parameters"]["field"] == field, (method, config, reply)
            assert reply["parameters"]["message"], reply
    # Names only ever look up the registry: never a path, never a process.
    for name in ("../x", "-x", "a,b", "a\0b", "a\nb", LONG):
        for method, params in [("Start", {}), ("Terminate", {}), ("Remove", {"force": True}), ("List", {})]:
            reply = daemon.call(method, {"name": name, **params})
            assert reply == {"error": "io.vmbridge.Manager.NoSuchMachine", "parameters": {"name": name}}, reply
    assert daemon.call("List")["parameters"]["machines"] == []
    assert os.listdir(machines_dir) == []
    # No file was written anywhere under the daemon's directories (no definition, no state).
    written = [os.path.join(d, f) for d, _, files in os.walk(daemon.base) for f in files]
    assert sorted(written) == sorted([daemon.log_path, daemon.manager_socket]), written
    assert sorted(os.listdir(daemon.runtime_dir)) == ["io.vmbridge.Manager", "machines"]
    assert not daemon.qemu_processes()
    assert "Traceback" not in full_log(daemon)
