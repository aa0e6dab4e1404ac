"""The per-VM control socket against systemd 262's wire transcript, on real QEMU."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import gevent
import psutil
import pytest

from conftest import open_to_everyone, raw_call, read_message


def call(path, method, parameters=None, **flags):
    message = {"method": method, "parameters": parameters if parameters is not None else {}}
    message.update(flags)
    return raw_call(path, message)


class Stream:
    """A SubscribeEvents stream read message by message."""

    def __init__(self, path, parameters=None, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = bytearray()
        message = {"method": "io.systemd.MachineInstance.SubscribeEvents",
                   "parameters": parameters or {}, "more": True}
        self.sock.sendall(json.dumps(message).encode() + b"\0")

    def next(self) -> dict:
        return json.loads(read_message(self.sock, self.buf))

    def next_event(self) -> str:
        reply = self.next()
        assert reply.get("continues") is True, reply
        return reply["parameters"]

    def close(self):
        self.sock.close()


def test_transcript_describe_pause_resume(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    assert call(ctl, "io.systemd.MachineInstance.Describe") == {"parameters": {"running": True, "status": "running"}}
    assert call(ctl, "io.systemd.MachineInstance.Pause") == {}
    assert call(ctl, "io.systemd.MachineInstance.Describe") == {"parameters": {"running": False, "status": "paused"}}
    assert call(ctl, "io.systemd.MachineInstance.Pause") == {}
    assert call(ctl, "io.systemd.MachineInstance.Resume") == {}
    assert call(ctl, "io.systemd.MachineInstance.Resume") == {}
    assert call(ctl, "io.systemd.MachineInstance.Describe") == {"parameters": {"running": True, "status": "running"}}


def test_transcript_errors(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    cases = [
        ({"method": "io.systemd.MachineInstance.Nope", "parameters": {}},
         {"error": "org.varlink.service.MethodNotFound", "parameters": {"method": "io.systemd.MachineInstance.Nope"}}),
        ({"method": "io.systemd.MachineInstance.Describe", "parameters": {"x": 1}},
         {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "x"}}),
        ({"method": "io.systemd.MachineInstance.SubscribeEvents", "parameters": {}},
         {"error": "org.varlink.service.ExpectedMore"}),
        ({"method": "io.systemd.MachineInstance.SubscribeEvents", "parameters": {"filter": "STOP"}, "more": True},
         {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "filter"}}),
    ]
    for message, expected in cases:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(ctl)
            sock.sendall(json.dumps(message).encode() + b"\0")
            raw = read_message(sock)
        # Byte for byte as systemd sends it: compact JSON, keys in systemd's order.
        assert raw == json.dumps(expected, separators=(",", ":")).encode(), raw
    # Malformed JSON: that connection is closed; the socket keeps serving.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(ctl)
        sock.sendall(b'{"method":"io.systemd.MachineInstance.Describe","parameters":{}\0')
        assert sock.recv(4096) == b""
    assert call(ctl, "io.systemd.MachineInstance.Describe")["parameters"]["running"] is True


def test_getinfo_and_interface_descriptions(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    info = call(ctl, "org.varlink.service.GetInfo")["parameters"]
    assert info["interfaces"] == ["io.systemd", "io.systemd.MachineInstance", "io.systemd.QemuMachineInstance",
                                  "io.systemd.VirtualMachineInstance", "io.vmbridge.Console", "org.varlink.service"]
    assert info["product"].startswith("vmbridge")
    idl_dir = os.path.join(os.path.dirname(__file__), "..", "vmbridge", "interfaces")
    for name in info["interfaces"]:
        reply = call(ctl, "org.varlink.service.GetInterfaceDescription", {"interface": name})
        with open(os.path.join(idl_dir, name + ".varlink")) as f:
            assert reply["parameters"]["description"] == f.read()


def test_subscribe_events_stop_resume_and_filter(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    everything = Stream(ctl)
    only_stop = Stream(ctl, {"filter": ["STOP"]})
    try:
        assert everything.next_event() == {"event": "READY"}
        assert only_stop.next_event() == {"event": "READY"}
        call(ctl, "io.systemd.MachineInstance.Pause")
        call(ctl, "io.systemd.MachineInstance.Resume")
        assert everything.next_event() == {"event": "STOP"}
        assert everything.next_event() == {"event": "RESUME"}
        assert only_stop.next_event() == {"event": "STOP"}
        # Terminate: the stream ends with vmbridge's EXITED event, then the connection closes.
        call(ctl, "io.systemd.MachineInstance.Terminate")
        assert everything.next_event()["event"] == "SHUTDOWN"
        final = everything.next_event()
        assert final["event"] == "EXITED" and final["data"]["reason"] == "host-qmp-quit"
        with pytest.raises(EOFError):
            everything.next()
    finally:
        everything.close()
        only_stop.close()


def test_terminate_removes_socket_and_process(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    assert call(ctl, "io.systemd.MachineInstance.Terminate") == {}
    assert not os.path.exists(ctl)
    assert daemon.call("List")["parameters"]["machines"] == []
    assert not daemon.qemu_processes()


def test_socket_modes(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.manager_socket).st_mode) == 0o600
    for directory in (daemon.runtime_dir, os.path.dirname(ctl), os.path.dirname(os.path.dirname(ctl))):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")
def test_second_uid_is_refused(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    open_to_everyone(daemon, ctl)  # SO_PEERCRED alone must keep another UID out
    script = (
        "import json,os,socket,sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "for p in sys.argv[1:]:\n"
        "    s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(p)\n"
        "    s.sendall(json.dumps({'method':'org.varlink.service.GetInfo','parameters':{}}).encode()+b'\\0')\n"
        "    data=b''\n"
        "    while not data.endswith(b'\\0'):\n"
        "        c=s.recv(4096)\n"
        "        if not c: break\n"
        "        data+=c\n"
        "    print(data.rstrip(b'\\0').decode() or 'closed')\n")
    out = subprocess.run([sys.executable, "-c", script, ctl, daemon.manager_socket],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        assert "GetInfo" not in line and "vendor" not in line, line
        assert line == "closed" or json.loads(line)["error"] == "org.varlink.service.PermissionDenied"
    assert call(ctl, "io.systemd.MachineInstance.Describe")["parameters"]["running"] is True


def test_killed_qemu_leaves_other_vm_serving(daemon):
    daemon.create("a")
    b = daemon.create("b")
    stream = Stream(daemon.control_socket("b"))
    try:
        assert stream.next_event() == {"event": "READY"}
        os.kill(b["pid"], 9)
        final = stream.next_event()
        assert final["event"] == "EXITED"
        assert final["data"]["signal"] == "SIGKILL"
        with pytest.raises(EOFError):
            stream.next()
    finally:
        stream.close()
    deadline = time.monotonic() + 10
    while os.path.exists(daemon.control_socket("b")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(daemon.control_socket("b"))
    assert not psutil.pid_exists(b["pid"]) or psutil.Process(b["pid"]).status() != psutil.STATUS_ZOMBIE
    assert call(daemon.control_socket("a"), "io.systemd.MachineInstance.Describe")["parameters"]["running"]
    assert [m["name"] for m in daemon.call("List")["parameters"]["machines"]] == ["a"]


def test_fifty_concurrent_clients(daemon):
    daemon.create("t1")
    ctl = daemon.control_socket("t1")
    import gevent.socket as gsocket  # cooperative sockets: the 50 clients really overlap

    def client(i):
        replies = []
        with gsocket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(ctl)
            buf = bytearray()
            for _ in range(20):
                sock.sendall(b'{"method":"io.systemd.MachineInstance.Describe","parameters":{}}\0')
                replies.append(json.loads(read_message(sock, buf)))
        return replies

    jobs = [gevent.spawn(client, i) for i in range(50)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    for job in jobs:
        assert job.value == [{"parameters": {"running": True, "status": "running"}}] * 20
