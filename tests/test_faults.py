"""Faults of a VM's QEMU (issue 10): killed, stopped, or speaking broken QMP.

Each fault hits one VM only: the daemon keeps serving the others, keeps no
descriptor or memory of the failed one, and leaves no process behind.
Latencies are recorded (bench/results/reliability.json), never asserted.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time

import psutil
import pytest

from conftest import raw_call
from reliability import (DescribeLoop, fds_back_to, hwm_mib, open_fds, record, reset_hwm, rss_mib,
                         settled_fds)
from test_control import Stream, call

FAKE_QEMU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_qemu.py")
RUNNING = {"parameters": {"running": True, "status": "running"}}
MI = "io.systemd.MachineInstance"


def wait_gone(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_reaped(pid: int, daemon_proc: psutil.Process) -> None:
    """`pid` is gone for good: not running, not a zombie, and no zombie child of the daemon."""
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).ppid() != daemon_proc.pid:
                break  # the pid was reused by someone else's process
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    if psutil.pid_exists(pid):
        try:
            proc = psutil.Process(pid)
            assert proc.ppid() != daemon_proc.pid, f"pid {pid} still a child of the daemon ({proc.status()})"
        except psutil.NoSuchProcess:
            pass
    zombies = [c.pid for c in daemon_proc.children() if c.status() == psutil.STATUS_ZOMBIE]
    assert not zombies, f"zombie children of vmbridged: {zombies}"


# ------------------------------------------------------------------ SIGKILL


def test_sigkilled_qemu(daemon):
    """Subscribers get EXITED naming SIGKILL; socket, process and fds all go; others carry on."""
    daemon_proc = psutil.Process(daemon.proc.pid)
    daemon.create("other")
    other_ctl = daemon.control_socket("other")
    baseline = settled_fds(daemon_proc)
    other_stream = Stream(other_ctl)
    assert other_stream.next_event() == {"event": "READY"}
    latencies = []
    with DescribeLoop(other_ctl, RUNNING) as watcher:
        for i in range(5):
            name = f"victim{i}"
            pid = daemon.create(name)["pid"]
            ctl = daemon.control_socket(name)
            streams = [Stream(ctl), Stream(ctl, {"filter": ["EXITED"]})]
            try:
                for stream in streams:
                    assert stream.next_event() == {"event": "READY"}
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                final = streams[0].next_event()
                latencies.append(time.monotonic() - killed)
                assert final["event"] == "EXITED", final
                assert final["data"]["signal"] == "SIGKILL"
                assert "SIGKILL" in final["data"]["reason"]  # "killed by SIGKILL"
                assert streams[1].next_event() == final  # a filtered subscriber gets it too
                for stream in streams:  # EXITED is the last message: then the connection closes
                    with pytest.raises(EOFError):
                        stream.next()
            finally:
                for stream in streams:
                    stream.close()
            assert wait_gone(ctl), "the control socket outlived its QEMU"
            assert not os.path.exists(os.path.dirname(ctl)), "the VM's runtime directory is left"
            assert_reaped(pid, daemon_proc)
            assert [m["name"] for m in daemon.call("List")["parameters"]["machines"]] == ["other"]
        figures = watcher.stop()
    assert not watcher.failures, watcher.failures
    # The other VM noticed nothing: no event on its stream, same answers.
    assert call(other_ctl, f"{MI}.Pause") == {}
    assert other_stream.next_event() == {"event": "STOP"}
    assert call(other_ctl, f"{MI}.Resume") == {}
    assert other_stream.next_event() == {"event": "RESUME"}
    other_stream.close()
    fds = fds_back_to(daemon_proc, baseline)
    assert fds <= baseline, f"fds {baseline} -> {fds}: {open_fds(daemon_proc.pid)}"
    ms = [round(x * 1000, 2) for x in latencies]
    record("qemu_sigkill", {"kill_to_exited_ms": ms, "kill_to_exited_median_ms": round(statistics.median(ms), 2),
                            "fds_baseline": baseline, "fds_after": fds, **figures})


# ------------------------------------------------------------------ SIGSTOP


def test_sigstopped_qemu(daemon_factory):
    """Commands on a stopped QEMU time out with ETIMEDOUT; the other VM answers meanwhile."""
    daemon = daemon_factory(extra_args=["--qmp-timeout", "2"])
    daemon.create("other")
    stuck = daemon.create("stuck")
    other_ctl, stuck_ctl = daemon.control_socket("other"), daemon.control_socket("stuck")
    os.kill(stuck["pid"], signal.SIGSTOP)
    try:
        for _ in range(500):  # until the stop has landed
            if psutil.Process(stuck["pid"]).status() == psutil.STATUS_STOPPED:
                break
            time.sleep(0.01)
        result = {}

        def pause_stuck():
            start = time.monotonic()
            result["reply"] = raw_call(stuck_ctl, {"method": f"{MI}.Pause", "parameters": {}}, timeout=30)
            result["seconds"] = time.monotonic() - start

        pauser = threading.Thread(target=pause_stuck)
        pauser.start()
        # Meanwhile the other VM is served as usual.
        other_latencies = []
        for method, expected in [("Describe", RUNNING), ("Pause", {}), ("Describe",
                                 {"parameters": {"running": False, "status": "paused"}}),
                                 ("Resume", {}), ("Describe", RUNNING)]:
            start = time.monotonic()
            assert call(other_ctl, f"{MI}.{method}") == expected
            other_latencies.append(time.monotonic() - start)
        # Describe on the stopped VM itself is answered from memory, no QMP round trip.
        assert call(stuck_ctl, f"{MI}.Describe") == RUNNING
        still_waiting = pauser.is_alive()
        pauser.join(30)
        assert not pauser.is_alive()
        assert result["reply"] == {"error": "io.systemd.System", "parameters": {
            "origin": "linux", "errnoName": "ETIMEDOUT", "errno": 110}}
        assert "stuck: QEMU did not answer 'stop' within 2s" in daemon.log()
        # The manager answers too, with the stuck VM's last known state.
        listed = {m["name"]: m for m in daemon.call("List")["parameters"]["machines"]}
        assert listed["stuck"]["state"] == "running" and listed["other"]["state"] == "running"
    finally:
        os.kill(stuck["pid"], signal.SIGCONT)
    # Once QEMU runs again it catches up with the `stop` it was sent, and obeys the next commands.
    assert call(stuck_ctl, f"{MI}.Resume") == {}
    assert call(stuck_ctl, f"{MI}.Describe") == RUNNING
    record("qemu_sigstop", {"qmp_timeout_s": 2, "pause_on_stopped_reply_s": round(result["seconds"], 3),
                            "other_vm_calls_ms": [round(x * 1000, 2) for x in other_latencies],
                            "other_vm_answered_while_pause_pending": still_waiting})


# --------------------------------------------------------- misbehaving QMP


@pytest.fixture
def fake_qemu(short_tmp):
    """fake_qemu(mode) -> path of a fake QEMU binary misbehaving in that mode."""
    def make(mode: str) -> str:
        path = os.path.join(short_tmp, f"fake-qemu-{mode}")
        if not os.path.exists(path):
            os.symlink(FAKE_QEMU, path)
        return path
    return make


def fake_processes(daemon, mode):
    out = []
    for proc in daemon.qemu_processes():
        try:
            if any(f"fake-qemu-{mode}" in arg for arg in proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            pass
    return out


# mode -> what the SetupFailed message must say
HANDSHAKE_FAULTS = {
    "garbage": "malformed JSON",
    "huge": "longer than max_message_size",
    "no-greeting": "QMP handshake",
    "no-capabilities": "QMP handshake",
    "greeting-eof": "QMP disconnected",
    "bad-greeting": "expected the QMP greeting",
    "unknown-ids": "did not answer 'query-status'",
}


@pytest.mark.parametrize("mode", sorted(HANDSHAKE_FAULTS))
def test_misbehaving_qmp_at_start(daemon_factory, fake_qemu, mode):
    """A QEMU speaking broken QMP fails its own Create, nothing else."""
    daemon = daemon_factory(extra_args=["--qmp-timeout", "1"])
    daemon_proc = psutil.Process(daemon.proc.pid)
    daemon.create("real")
    real_ctl = daemon.control_socket("real")
    qemu = fake_qemu(mode)
    fds_before = settled_fds(daemon_proc)
    rss_before = rss_mib(daemon_proc)
    reset_hwm(daemon_proc.pid)
    hwm_before = hwm_mib(daemon_proc.pid)
    with DescribeLoop(real_ctl, RUNNING) as watcher:
        start = time.monotonic()
        reply = daemon.call("Create", {"config": {"name": "fake", "machine": "none", "qemu": qemu}})
        seconds = time.monotonic() - start
        describes = watcher.stop()
    assert not watcher.failures, watcher.failures
    assert reply["error"] == "io.vmbridge.Manager.SetupFailed", reply
    assert reply["parameters"]["name"] == "fake"
    assert HANDSHAKE_FAULTS[mode] in reply["parameters"]["message"], reply
    assert not fake_processes(daemon, mode), "the fake QEMU was left running"
    assert not os.path.exists(os.path.join(daemon.runtime_dir, "machines", "fake"))
    assert [m["name"] for m in daemon.call("List")["parameters"]["machines"]] == ["real"]
    assert call(real_ctl, f"{MI}.Describe") == RUNNING
    hwm_delta = hwm_mib(daemon_proc.pid) - hwm_before
    rss_delta = rss_mib(daemon_proc) - rss_before
    assert hwm_delta < 64, f"peak RSS grew by {hwm_delta:.1f} MiB"
    assert rss_delta < 64, f"RSS grew by {rss_delta:.1f} MiB"
    fds = fds_back_to(daemon_proc, fds_before)
    assert fds <= fds_before, f"fds {fds_before} -> {fds}: {open_fds(daemon_proc.pid)}"
    assert "Traceback" not in daemon.log()
    record(f"qmp_fault_{mode}", {"create_to_setupfailed_s": round(seconds, 3),
                                 "message": reply["parameters"]["message"],
                                 "rss_delta_mib": round(rss_delta, 1), "peak_rss_delta_mib": round(hwm_delta, 1),
                                 **describes})


LATE_FAULTS = ["late-garbage", "late-huge", "late-eof"]


@pytest.mark.parametrize("mode", LATE_FAULTS)
def test_misbehaving_qmp_while_running(daemon_factory, fake_qemu, mode):
    """QMP breaking under a running VM: that VM goes to exited with why; the other is untouched."""
    daemon = daemon_factory(extra_args=["--qmp-timeout", "2"])
    daemon_proc = psutil.Process(daemon.proc.pid)
    daemon.create("real")
    real_ctl = daemon.control_socket("real")
    reset_hwm(daemon_proc.pid)
    hwm_before = hwm_mib(daemon_proc.pid)
    rss_before = rss_mib(daemon_proc)
    fake = daemon.create("fake", qemu=fake_qemu(mode))
    assert fake["state"] == "running" and fake["qemuVersion"] == "7.2.22"
    ctl = daemon.control_socket("fake")
    stream = Stream(ctl, timeout=30)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2000)  # pytest's stack is deeper than the daemon's: room to parse them here
    try:
        assert stream.next_event() == {"event": "READY"}
        with DescribeLoop(real_ctl, RUNNING) as watcher:
            reply = call(ctl, f"{MI}.Pause")
            final = stream.next_event()
            describes = watcher.stop()
        assert not watcher.failures, watcher.failures
        # The QMP connection broke under the call: NotConnected, as systemd says it.
        assert reply == {"error": f"{MI}.NotConnected"}, reply
        assert final["event"] == "EXITED", final
        assert "QMP connection lost" in final["data"]["error"], final
        assert final["data"]["signal"] == "SIGKILL"  # QEMU did not exit by itself: vmbridged ended it
        with pytest.raises(EOFError):
            stream.next()
    finally:
        stream.close()
    assert wait_gone(ctl)
    assert not fake_processes(daemon, mode)
    assert [m["name"] for m in daemon.call("List")["parameters"]["machines"]] == ["real"]
    assert call(real_ctl, f"{MI}.Describe") == RUNNING
    hwm_delta = hwm_mib(daemon_proc.pid) - hwm_before
    rss_delta = rss_mib(daemon_proc) - rss_before
    assert hwm_delta < 64 and rss_delta < 64, (hwm_delta, rss_delta)
    assert "Traceback" not in daemon.log()
    record(f"qmp_fault_{mode}", {"exit_error": final["data"]["error"][:200], "rss_delta_mib": round(rss_delta, 1),
                                 "peak_rss_delta_mib": round(hwm_delta, 1), **describes})


def test_qmp_events_nested_too_deep(daemon_factory, fake_qemu):
    """QMP events nesting ~1000 deep (past what can be re-encoded): no traceback, subscribers see valid varlink."""
    daemon = daemon_factory(extra_args=["--qmp-timeout", "2"])
    daemon.create("real")
    real_ctl = daemon.control_socket("real")
    daemon.create("fake", qemu=fake_qemu("late-deep"))
    ctl = daemon.control_socket("fake")
    stream = Stream(ctl, timeout=30)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2000)  # pytest's stack is deeper than the daemon's: room to parse them here
    try:
        assert stream.next_event() == {"event": "READY"}
        with DescribeLoop(real_ctl, RUNNING) as watcher:
            reply = call(ctl, f"{MI}.Pause")
            messages = []
            while True:  # every message valid varlink, until the VM is gone and the socket closes
                try:
                    messages.append(stream.next())
                except EOFError:
                    break
            watcher.stop()
        assert not watcher.failures, watcher.failures
    finally:
        sys.setrecursionlimit(limit)
        stream.close()
    # The events that still decode reach the subscriber; the first one too deep to
    # encode for it ends its stream with EIO (an error is a call's last reply);
    # deeper ones break QMP itself, and the VM is ended as for any broken QMP.
    assert reply == {"error": f"{MI}.NotConnected"}, reply
    deep = [m for m in messages if m.get("parameters", {}).get("event") == "DEEP"]
    assert deep and all(m["continues"] is True for m in deep)
    last = messages[-1]
    assert last == {"error": "io.systemd.System", "parameters": {"origin": "linux", "errno": 5, "errnoName": "EIO"}} \
        or last["parameters"]["event"] == "EXITED", last
    assert wait_gone(ctl)
    assert not fake_processes(daemon, "late-deep")
    assert call(real_ctl, f"{MI}.Describe") == RUNNING
    with open(daemon.log_path, "rb") as f:
        assert b"Traceback" not in f.read()
    record("qmp_fault_late-deep", {"deep_events_delivered": len(deep), "stream_ended_with": last})
