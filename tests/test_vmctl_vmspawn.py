"""vmctl --address against a socket that answers as systemd-vmspawn 262 does.

The peer is varlink_fixtures.FakeMachine on our server with vmspawn's
identity: no manager anywhere, no EXITED event (the stream just closes, as
systemd's does). It runs in this process on gevent, so vmctl runs through
gevent.subprocess and the test never blocks the server.
"""

from __future__ import annotations

import os
import sys

import gevent
import gevent.subprocess
import pytest

pytest.register_assert_rewrite("varlink_fixtures")
from varlink_fixtures import FakeMachine, machine_service  # noqa: E402

from conftest import VMCTL  # noqa: E402

pytest_plugins = ["varlink_fixtures"]    # serve, socket_dir


@pytest.fixture
def vmspawn(serve, socket_dir):
    """(machine, address): /…/fedora/control, like /run/systemd/vmspawn/fedora/control."""
    machine = FakeMachine()
    os.mkdir(os.path.join(socket_dir, "fedora"))
    server = serve(machine_service(machine), name="fedora/control")
    return machine, server.address


def env():
    return dict(os.environ, VMBRIDGE_RUNTIME_DIR="/nonexistent/vmbridge")   # no manager anywhere


def vmctl(address, *args):
    return gevent.subprocess.run([sys.executable, VMCTL, "--address", address, *args],
                                 capture_output=True, text=True, timeout=60, env=env())


def test_describe_pause_resume(vmspawn):
    machine, address = vmspawn
    out = vmctl(address, "describe")
    assert (out.returncode, out.stdout, out.stderr) == (0, "NAME    RUNNING  STATUS\nfedora  yes      running\n", "")
    assert vmctl(address, "pause").returncode == 0 and not machine.running
    assert vmctl(address, "pause").returncode == 0            # pausing a paused VM succeeds
    assert vmctl(address, "describe", "--json").stdout == '{"name":"fedora","running":false,"status":"paused"}\n'
    assert vmctl(address, "resume").returncode == 0 and machine.running


def test_events_end_when_the_socket_closes(vmspawn):
    machine, address = vmspawn
    proc = gevent.subprocess.Popen([sys.executable, VMCTL, "--address", address, "events", "--filter", "STOP"],
                                   stdout=gevent.subprocess.PIPE, stderr=gevent.subprocess.PIPE,
                                   text=True, env=env())
    try:
        with gevent.Timeout(30):
            assert proc.stdout.readline().split()[1:] == ["fedora", "READY"]
            assert vmctl(address, "pause").returncode == 0
            assert proc.stdout.readline().split()[1:] == ["fedora", "STOP"]
            assert vmctl(address, "resume").returncode == 0       # RESUME: filtered out
            machine.events.put(None)                                # the VM goes away
            assert proc.stdout.read() == ""
            assert proc.wait() == 0
            assert proc.stderr.read() == "vmctl: fedora: the event stream ended (the VM is gone)\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_errors_of_the_machine_interface(vmspawn):
    machine, address = vmspawn
    out = vmctl(address, "storage", "remove", "disk0")
    assert out.returncode == 1
    assert out.stderr == ("vmctl: fedora: storage remove disk0: no such storage binding "
                          "(io.systemd.MachineInstance.NoSuchStorage)\n")
    out = vmctl(address, "reboot")                                  # FakeMachine has no Reboot
    assert out.returncode == 1
    assert out.stderr == (f"vmctl: fedora: {address} does not offer io.systemd.MachineInstance.Reboot "
                          "(org.varlink.service.MethodNotFound)\n")
