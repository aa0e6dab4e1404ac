"""Resource figures through the manager socket: List's summary, Stats, sampling off,
VMs that vanish or stop answering. Guest-less QEMUs only (-machine none).

The daemon samples every 0.3 s here; nothing below depends on how long
anything takes (waits are for a condition, with a generous deadline).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import VMBRIDGED
from stats_cli import MiniContext, run_verb
from vmbridge.machine.stats import SUMMARY_KEYS

INTERVAL = "0.3"
MANAGER = "io.vmbridge.Manager"


def wait_for(fn, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def listed(daemon, name=None):
    machines = daemon.call("List", {"name": name} if name else {})["parameters"]["machines"]
    return {m["name"]: m for m in machines}


def stats(daemon, name=None):
    reply = daemon.call("Stats", {"name": name} if name else {})
    assert "error" not in reply, reply
    return reply["parameters"]["machine" if name else "daemon"]


def sampled_figures(daemon, name, *, after_usec=0):
    """The VM's full figures once a sample newer than `after_usec` has a CPU %."""
    def ready():
        figures = stats(daemon, name).get("figures", {})
        return figures if "cpuPercent" in figures and figures["sampledUSec"] > after_usec else None
    return wait_for(ready, f"{name}'s figures")


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory(extra_args=["--stats-interval", INTERVAL])


def test_list_summary_and_stats_full_set(daemon):
    a = daemon.create("a")
    daemon.create("b")
    figures = sampled_figures(daemon, "a")

    # List: the summary only.
    machines = wait_for(lambda: (m := listed(daemon)) and all("figures" in x for x in m.values()) and m, "List figures")
    summary = machines["a"]["figures"]
    assert set(summary) <= set(SUMMARY_KEYS)
    assert {"sampledUSec", "cpuUSec", "rssBytes", "threads", "uptimeUSec"} <= set(summary)
    assert listed(daemon, "b")["b"]["figures"]["rssBytes"] > 0

    # Stats: the whole set, for one guest-less QEMU.
    pid = a["pid"]
    assert figures["intervalUSec"] > 0 and figures["cpuPercent"] >= 0
    assert figures["threads"] >= 2  # QEMU's main loop and RCU threads at least
    assert figures["fds"] > 0 and figures["readBytes"] >= 0 and figures["writeBytes"] >= 0
    assert figures["vcpuCount"] == 0 and figures["vcpus"] == []  # -machine none: no CPUs
    assert figures["drives"] == []  # query-blockstats answered: no drives
    assert "balloonBytes" not in figures  # no balloon: no figure (and nothing logged)
    assert figures["qmpSampledUSec"] >= figures["sampledUSec"] - 5_000_000
    assert 0 < figures["uptimeUSec"] < (time.time() - psutil.Process(pid).create_time() + 5) * 1e6
    assert figures["cpuUSec"] <= sum(psutil.Process(pid).cpu_times()[:2]) * 1e6 + 20_000
    [qemu] = figures["processes"]
    assert qemu["pid"] == pid and qemu["role"] == "qemu" and qemu["rssBytes"] == figures["rssBytes"]
    assert 0 < figures["pssBytes"] <= figures["rssBytes"] and qemu["pssBytes"] == figures["pssBytes"]

    # RSS within 10 % of what the kernel says (the sample is at most an interval old).
    assert abs(figures["rssBytes"] - vm_rss(pid)) <= 0.1 * vm_rss(pid), (figures["rssBytes"], vm_rss(pid))

    assert daemon.call("Stats", {"name": "nope"}) == {
        "error": f"{MANAGER}.NoSuchMachine", "parameters": {"name": "nope"}}
    assert "no balloon" not in daemon.log().lower() and "DeviceNotActive" not in daemon.log()


def test_daemon_figures(daemon):
    daemon.create("a")
    wait_for(lambda: "cpuPercent" in stats(daemon), "the daemon's CPU %")
    d = stats(daemon)
    assert d["pid"] == daemon.proc.pid and d["version"]
    assert d["statsIntervalUSec"] == 300_000 and d["statsRoundUSec"] > 0
    assert abs(d["rssBytes"] - vm_rss(daemon.proc.pid)) <= 0.1 * vm_rss(daemon.proc.pid)
    assert 0 < d["pssBytes"] and d["threads"] >= 1 and d["fds"] > 0
    assert d["fdLimit"] > 0 and d["greenlets"] > 2
    assert d["managerConnections"] >= 1  # this call's
    assert d["machines"] == 1 and d["activeMachines"] == 1
    # A connection held open to a VM's control socket is counted.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(daemon.control_socket("a"))
        wait_for(lambda: stats(daemon)["machineConnections"] == 1, "the control connection to be counted")
    wait_for(lambda: stats(daemon)["machineConnections"] == 0, "the control connection to be gone")


def test_sampling_off(daemon_factory):
    daemon = daemon_factory(extra_args=["--stats-interval", "0"])
    daemon.create("a")
    time.sleep(0.5)  # (were anything sampled, it would be by now; nothing may be)
    assert "figures" not in listed(daemon)["a"]
    assert "figures" not in stats(daemon, "a")
    d = stats(daemon)
    assert d["statsIntervalUSec"] == 0 and "cpuPercent" not in d and "statsRoundUSec" not in d
    # vmctl top says so, and shows the states.
    out = io.StringIO()
    assert run_verb("top", [], MiniContext(daemon.manager_socket, stdout=out)) == 0
    lines = out.getvalue().splitlines()
    assert "samples no figures (--stats-interval 0)" in lines[1]
    assert lines[3].split()[:4] == ["a", "running", str(listed(daemon)["a"]["pid"]), "-"]


def test_stats_interval_option():
    for bad in ("-1", "0.01", "nan", "inf", "x"):
        proc = subprocess.run([sys.executable, VMBRIDGED, "--stats-interval", bad, "--runtime-dir", "/nonexistent"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--stats-interval" in proc.stderr, (bad, proc.stderr)


def test_vanished_and_stopped_qemu(daemon):
    gone = daemon.create("gone")
    stopped = daemon.create("stopped")
    daemon.create("fine")
    for name in ("gone", "stopped", "fine"):
        sampled_figures(daemon, name)

    # A QEMU SIGSTOPped: its process figures go on, QMP is not asked (it could not answer).
    os.kill(stopped["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: psutil.Process(stopped["pid"]).status() == psutil.STATUS_STOPPED, "SIGSTOP to land")
        now = int(time.time() * 1e6)
        before = sampled_figures(daemon, "stopped", after_usec=now)
        after = sampled_figures(daemon, "stopped", after_usec=before["sampledUSec"])
        assert after["qmpSampledUSec"] == before["qmpSampledUSec"] < now
        assert after["cpuPercent"] == 0.0
    finally:
        os.kill(stopped["pid"], signal.SIGCONT)
    wait_for(lambda: stats(daemon, "stopped")["figures"]["qmpSampledUSec"] > now, "QMP figures again")

    # A QEMU killed behind vmbridged's back: skipped, the others carry on.
    os.kill(gone["pid"], signal.SIGKILL)
    wait_for(lambda: "gone" not in listed(daemon), "the killed VM to go")
    fine = sampled_figures(daemon, "fine", after_usec=int(time.time() * 1e6))
    assert fine["processes"][0]["role"] == "qemu"
    assert "Traceback" not in daemon.log() and "sampling failed" not in daemon.log()

