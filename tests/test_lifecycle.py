"""A real guest's life through vmbridged: boot, reboot, power-off (busybox guest, TCG)."""

from __future__ import annotations

import os
import time

import pytest

from conftest import raw_call
from guest import PREFIX, require_guest
from test_control import Stream, call


def wait_console(daemon, name, text, count=1, timeout=90):
    """Wait until the VM's console log holds `text` `count` times; returns the log."""
    path = os.path.join(daemon.runtime_dir, "machines", name, "console.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                log = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            log = ""
        if log.count(text) >= count:
            return log
        time.sleep(0.1)
    pytest.fail(f"{name}: {text!r} did not appear {count}x on the console within {timeout}s:\n{log[-3000:]}")


@pytest.fixture
def guest_vm(daemon):
    g = require_guest()
    info = daemon.create("guest", machine="q35", accel="tcg", memory="256M", linux=g.kernel, initrd=g.initrd,
                         append=g.cmdline + " vmbridge.heartbeat=0")
    wait_console(daemon, "guest", PREFIX + "up")
    return info


def test_reboot_then_poweroff(daemon, guest_vm):
    ctl = daemon.control_socket("guest")
    stream = Stream(ctl, timeout=90)
    try:
        assert stream.next_event() == {"event": "READY"}
        assert call(ctl, "io.systemd.MachineInstance.Reboot") == {}
        first = stream.next_event()
        assert first == {"event": "RESET", "data": {"guest": False, "reason": "host-qmp-system-reset"}}
        wait_console(daemon, "guest", PREFIX + "up", count=2)  # the guest came up again
        assert call(ctl, "io.systemd.MachineInstance.Describe")["parameters"] == {"running": True,
                                                                                  "status": "running"}
        assert call(ctl, "io.systemd.MachineInstance.PowerOff") == {}
        events = []
        while True:
            event = stream.next_event()
            events.append(event)
            if event["event"] == "EXITED":
                break
        names = [e["event"] for e in events if e["event"] != "RESET"]  # firmware resets may trail
        assert names == ["POWERDOWN", "SHUTDOWN", "EXITED"], events
        shutdown = next(e for e in events if e["event"] == "SHUTDOWN")
        assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert events[-1]["data"] == {"reason": "guest-shutdown", "exitStatus": 0}
        with pytest.raises(EOFError):
            stream.next()
    finally:
        stream.close()
    assert not os.path.exists(ctl)
    assert daemon.call("List")["parameters"]["machines"] == []
    assert not daemon.qemu_processes()


def test_pause_freezes_the_guest(daemon, guest_vm):
    ctl = daemon.control_socket("guest")
    assert call(ctl, "io.systemd.MachineInstance.Pause") == {}
    assert raw_call(daemon.manager_socket, {"method": "io.vmbridge.Manager.List",
                                            "parameters": {"name": "guest"}}
                    )["parameters"]["machines"][0]["state"] == "paused"
    assert call(ctl, "io.systemd.MachineInstance.Resume") == {}
    assert call(ctl, "io.systemd.MachineInstance.Terminate") == {}
    assert not daemon.qemu_processes()
