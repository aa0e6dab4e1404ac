"""vmbridged can die (kill -9) and come back without its VMs noticing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil

from conftest import raw_call
from test_control import Stream, call


def restart_after_sigkill(daemon):
    """SIGKILL the daemon, then start a new one on the same directories."""
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.start()


def test_sigkilled_daemon_adopts_running_and_paused_vms(daemon):
    names = [f"vm{i}" for i in range(5)]
    pids = {name: daemon.create(name)["pid"] for name in names}
    for name in names[3:]:
        assert call(daemon.control_socket(name), "io.systemd.MachineInstance.Pause") == {}
    restart_after_sigkill(daemon)
    for pid in pids.values():
        assert psutil.pid_exists(pid), "a QEMU died with the daemon"
    listed = {m["name"]: m for m in daemon.call("List")["parameters"]["machines"]}
    assert sorted(listed) == names
    for name in names:
        expected = ("paused", "paused") if name in names[3:] else ("running", "running")
        assert (listed[name]["state"], listed[name]["status"]) == expected, listed[name]
        assert listed[name]["pid"] == pids[name]
        describe = call(daemon.control_socket(name), "io.systemd.MachineInstance.Describe")["parameters"]
        assert describe == {"running": expected[1] == "running", "status": expected[1]}
    # Events flow again on an adopted VM.
    stream = Stream(daemon.control_socket("vm0"))
    try:
        assert stream.next_event() == {"event": "READY"}
        call(daemon.control_socket("vm0"), "io.systemd.MachineInstance.Pause")
        assert stream.next_event() == {"event": "STOP"}
        # The adopted QEMU is not our child, yet its end is seen at once.
        os.kill(pids["vm0"], signal.SIGKILL)
        final = stream.next_event()
        assert final["event"] == "EXITED"
    finally:
        stream.close()
    # A clean stop of the new daemon stops the adopted VMs too.
    daemon.stop()
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_gone_and_reused_pids_are_not_adopted(daemon):
    a = daemon.create("gone")
    daemon.create("reused")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    os.kill(a["pid"], signal.SIGKILL)
    # Point "reused" at another live process: same pid field, different start time.
    impostor = subprocess.Popen(["sleep", "60"])
    try:
        state_path = os.path.join(daemon.runtime_dir, "machines", "reused", "state.json")
        with open(state_path) as f:
            state = json.load(f)
        real_pid = state["pid"]
        state["pid"] = impostor.pid
        with open(state_path, "w") as f:
            json.dump(state, f)
        os.kill(real_pid, signal.SIGKILL)
        time.sleep(0.2)
        daemon.start()
        assert daemon.call("List")["parameters"]["machines"] == []
        assert impostor.poll() is None, "the impostor process must never be touched"
        log = daemon.log()
        assert "gone" in log and "reused" in log and "not adopted" in log
    finally:
        impostor.kill()
        impostor.wait()
    assert raw_call(daemon.manager_socket, {"method": "org.varlink.service.GetInfo", "parameters": {}})


def test_keep_vms_on_sigterm(daemon_factory):
    daemon = daemon_factory(extra_args=["--keep-vms"])
    pid = daemon.create("kept")["pid"]
    assert daemon.stop() == 0
    time.sleep(2.5)  # longer than the grace a lost QMP connection gets before QEMU is ended
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    daemon.start()
    assert daemon.call("List")["parameters"]["machines"][0]["pid"] == pid
    assert call(daemon.control_socket("kept"), "io.systemd.MachineInstance.Terminate") == {}


def test_restart_detection_reads_systemds_job():
    from vmbridge.systemd import restart_pending, unit_from_cgroup

    class Ran:
        def __init__(self, stdout):
            self.stdout = stdout

    cgroup = "0::/system.slice/vmbridged.service\n"
    assert unit_from_cgroup(cgroup) == ("vmbridged.service", False)
    assert unit_from_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/vmbridged.service\n") \
        == ("vmbridged.service", True)
    jobs = "1234 vmbridged.service restart running\n1235 other.service start waiting\n"
    seen = []

    def run(argv, **kwargs):
        seen.append(argv)
        return Ran(jobs)

    assert restart_pending(cgroup_text=cgroup, run=run)
    assert seen[0][:2] == ["systemctl", "list-jobs"]
    jobs = "1234 vmbridged.service stop running\n"
    assert not restart_pending(cgroup_text=cgroup, run=run)
    assert not restart_pending(cgroup_text="0::/\n", run=run)
