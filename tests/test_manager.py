"""The manager socket: registry, definitions, lifecycle events, set-up failures."""

from __future__ import annotations

import json
import os
import socket
import time

import psutil

from conftest import read_message
from leak_checks import stable_fd_count


def lifecycle_stream(daemon, name=None):
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(daemon.manager_socket)
    params = {"name": name} if name else {}
    sock.sendall(json.dumps({"method": "io.vmbridge.Manager.SubscribeEvents", "parameters": params,
                             "more": True}).encode() + b"\0")
    buf = bytearray()

    def next_event():
        reply = json.loads(read_message(sock, buf))
        return reply["parameters"]["event"], reply["parameters"].get("machine")

    assert next_event() == ("READY", None)
    return sock, next_event


def test_list_and_lifecycle_events(daemon):
    sock, next_event = lifecycle_stream(daemon)
    try:
        info = daemon.create("vm1")
        assert info["state"] == "running" and info["class"] == "vm" and info["pid"] > 0
        assert info["controlAddress"] == daemon.control_socket("vm1")
        assert os.path.isabs(info["controlAddress"])
        assert [next_event()[0] for _ in range(3)] == ["added", "starting", "running"]
        listed = daemon.call("List")["parameters"]["machines"]
        assert [m["name"] for m in listed] == ["vm1"]
        assert listed[0]["status"] == "running" and listed[0]["qemuVersion"]
        assert daemon.call("Terminate", {"name": "vm1"}) == {}
        events = [next_event() for _ in range(3)]
        assert [e[0] for e in events] == ["shutting-down", "exited", "removed"]
        assert events[1][1]["shutdownReason"] == "host-qmp-quit"
        assert daemon.call("List")["parameters"]["machines"] == []
    finally:
        sock.close()


def test_errors(daemon):
    daemon.create("vm1")
    assert daemon.call("Create", {"config": {"name": "vm1", "machine": "none"}}) == {
        "error": "io.vmbridge.Manager.MachineExists", "parameters": {"name": "vm1"}}
    reply = daemon.call("Create", {"config": {"name": "../etc", "machine": "none"}})
    assert reply["error"] == "io.vmbridge.Manager.InvalidConfig"
    assert reply["parameters"]["field"] == "name"
    reply = daemon.call("Create", {"config": {"name": "vm2", "cpus": 0}})
    assert reply["error"] == "io.vmbridge.Manager.InvalidConfig" and reply["parameters"]["field"] == "cpus"
    assert daemon.call("Start", {"name": "nope"}) == {
        "error": "io.vmbridge.Manager.NoSuchMachine", "parameters": {"name": "nope"}}
    assert daemon.call("Remove", {"name": "vm1"}) == {
        "error": "io.vmbridge.Manager.MachineActive", "parameters": {"name": "vm1", "state": "running"}}
    assert daemon.call("Remove", {"name": "vm1", "force": True}) == {}
    assert daemon.call("List")["parameters"]["machines"] == []


def test_setup_failure_leaves_nothing_behind(daemon):
    daemon_proc = psutil.Process(daemon.proc.pid)
    daemon.create("warmup")  # the first VM pays for one-time work (QEMU probe, imports)
    daemon.call("Terminate", {"name": "warmup"})
    fds_before = stable_fd_count(daemon)
    reply = daemon.call("Create", {"config": {"name": "bad", "machine": "no-such-machine-type"}})
    assert reply["error"] == "io.vmbridge.Manager.SetupFailed"
    assert reply["parameters"]["name"] == "bad"
    assert "unsupported machine type" in reply["parameters"]["message"]  # QEMU's own complaint
    assert not os.path.exists(os.path.join(daemon.runtime_dir, "machines", "bad"))
    assert daemon.call("List")["parameters"]["machines"] == []
    assert stable_fd_count(daemon) == fds_before
    assert not daemon.qemu_processes()
    assert not [c for c in daemon_proc.children() if c.status() == psutil.STATUS_ZOMBIE]


def test_persistent_definitions_and_autostart(daemon_factory):
    first = daemon_factory()
    reply = first.call("Define", {"config": {"name": "keep", "machine": "none", "autostart": True}})
    assert reply["parameters"]["machine"]["state"] == "defined"
    path = os.path.join(first.config_dir, "machines", "keep.conf")
    with open(path) as f:
        text = f.read()
    assert "machine = none" in text and "autostart = yes" in text
    started = first.call("Start", {"name": "keep"})["parameters"]["machine"]
    assert started["state"] == "running" and started["persistent"]
    first.call("Terminate", {"name": "keep"})
    # A persistent VM stays listed after it exited, with why.
    exited = first.call("List", {"name": "keep"})["parameters"]["machines"][0]
    assert exited["state"] == "exited" and exited["shutdownReason"] == "host-qmp-quit"
    assert "controlAddress" not in exited and "pid" not in exited
    first.stop()

    # A new daemon with the same configuration directory autostarts it.
    second = daemon_factory(start=False)
    second.config_dir = first.config_dir
    second.start()
    for _ in range(400):
        listed = second.call("List", {"name": "keep"})["parameters"]["machines"][0]
        if listed["state"] == "running":
            break
        time.sleep(0.05)
    assert listed["state"] == "running"
    assert second.call("Remove", {"name": "keep", "force": True}) == {}
    assert not os.path.exists(path)


def test_hand_edited_definition(daemon_factory):
    d = daemon_factory(start=False)
    os.makedirs(os.path.join(d.config_dir, "machines"))
    with open(os.path.join(d.config_dir, "machines", "hand.conf"), "w") as f:
        f.write("# written by hand\nmachine = none\nmemory = 64M\n")
    with open(os.path.join(d.config_dir, "machines", "broken.conf"), "w") as f:
        f.write("cpus = lots\n")
    d.start()
    machines = d.call("List")["parameters"]["machines"]
    assert [(m["name"], m["state"]) for m in machines] == [("hand", "defined")]
    assert "broken.conf" in d.log() and "cpus" in d.log()
    assert d.call("Start", {"name": "hand"})["parameters"]["machine"]["state"] == "running"
