"""MachineSampler and StatsSampler against a stand-in Machine: which QMP queries are
asked when, timeouts, helpers, restarts, vanished processes.

The "QEMU" and its "helpers" are `sleep` processes: psutil reads them like any
other; the stand-in Machine answers QMP from a script.
"""

from __future__ import annotations

import logging
import subprocess
import types

import pytest

from vmbridge.machine.machine import MachineCommandError, MachineState, MachineTimeout
from vmbridge.machine.stats import SLOW_ROUNDS, SUMMARY_KEYS, MachineSampler, StatsSampler


class FakeProcess:
    def __init__(self, popen):
        self.popen = popen
        self.pid = popen.pid
        self.exited = False


class FakeMachine:
    def __init__(self, name="vm"):
        self.name = name
        self.state = MachineState.RUNNING
        self.qemu_running = True
        self.qmp = object()
        self.process = None
        self.devices = types.SimpleNamespace(drives={"drive0": object()})  # what query-blockstats counts
        self.helpers = []
        self.calls = []
        self.answers = {
            "query-cpus-fast": lambda: [{"cpu-index": 1, "thread-id": self.process.pid},
                                        {"cpu-index": 0, "thread-id": self.process.pid}],
            "query-blockstats": lambda: [{"device": "", "qdev": "/machine/peripheral/drive0/virtio-backend",
                                          "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3,
                                                    "wr_operations": 4, "flush_operations": 5}}],
            "query-balloon": lambda: self._raise(MachineCommandError("query-balloon", "DeviceNotActive",
                                                                     "No balloon device has been activated")),
        }

    @staticmethod
    def _raise(error):
        raise error

    def execute(self, command, arguments=None, *, timeout=None):
        self.calls.append(command)
        assert timeout is not None and timeout <= 1.0  # the sampler never waits long
        return self.answers[command]()

    def helper_pids(self):
        return [p.pid for p in self.helpers]


@pytest.fixture
def procs():
    started = []

    def start():
        p = subprocess.Popen(["sleep", "600"])
        started.append(p)
        return FakeProcess(p)
    yield start
    for p in started:
        p.kill()
        p.wait()


def test_qmp_cadence_and_figures(procs):
    m = FakeMachine()
    m.process = procs()
    s = MachineSampler(m, qmp_timeout=0.5, interval=2.0)
    assert s.sample()
    assert m.calls == ["query-cpus-fast", "query-blockstats", "query-balloon"]
    first = s.figures(full=True)
    assert "cpuPercent" not in first and "intervalUSec" not in first  # one sample: no rate yet
    assert first["vcpuCount"] == 2 and [v["index"] for v in first["vcpus"]] == [0, 1]
    assert first["drives"] == [{"name": "drive0", "qdev": "/machine/peripheral/drive0/virtio-backend",
                                "readBytes": 1, "writeBytes": 2, "readOps": 3, "writeOps": 4, "flushOps": 5}]
    assert "balloonBytes" not in first
    m.calls.clear()
    for _ in range(SLOW_ROUNDS - 1):
        assert s.sample()
    # Between the slow rounds: blockstats only (no balloon to ask again, CPUs known).
    assert m.calls == ["query-blockstats"] * (SLOW_ROUNDS - 1)
    m.calls.clear()
    s.sample()
    assert m.calls == ["query-cpus-fast", "query-blockstats", "query-balloon"]
    figures = s.figures(full=True)
    assert figures["cpuPercent"] >= 0 and figures["intervalUSec"] > 0
    assert all("cpuPercent" in v for v in figures["vcpus"])
    summary = s.figures()
    assert set(summary) <= set(SUMMARY_KEYS) and "cpuPercent" in summary and "vcpus" not in summary


def test_no_blockstats_round_trip_without_drives(procs):
    """A VM without drives (-machine none, say) costs its QEMU no query-blockstats a round."""
    m = FakeMachine()
    m.process = procs()
    m.devices.drives.clear()
    s = MachineSampler(m, qmp_timeout=0.5, interval=2.0)
    assert s.sample() and s.sample()
    assert "query-blockstats" not in m.calls
    assert s.figures(full=True)["drives"] == []


def test_balloon_asked_every_round_while_present(procs):
    m = FakeMachine()
    m.process = procs()
    m.answers["query-balloon"] = lambda: {"actual": 256 << 20}
    s = MachineSampler(m)
    for _ in range(3):
        s.sample()
    assert m.calls.count("query-balloon") == 3
    assert s.figures()["balloonBytes"] == 256 << 20


def test_paused_and_starting_vms_are_not_asked(procs):
    m = FakeMachine()
    m.process = procs()
    m.state, m.qemu_running = MachineState.STARTING, False
    s = MachineSampler(m)
    assert s.sample() and m.calls == []  # set-up owns QMP; psutil figures still come
    assert s.figures()["rssBytes"] > 0
    m.state = MachineState.PAUSED
    s.sample()
    assert m.calls == ["query-cpus-fast", "query-blockstats", "query-balloon"]  # once, to know them
    m.calls.clear()
    for _ in range(3):
        s.sample()
    assert m.calls == []  # paused: nothing QEMU counts moves
    assert s.figures(full=True)["drives"][0]["readBytes"] == 1  # the last answers are kept
    m.state, m.qemu_running = MachineState.RUNNING, True
    s.sample()
    assert m.calls == ["query-blockstats"]


def test_timeout_leaves_qmp_alone_and_logs_once(procs, caplog):
    m = FakeMachine()
    m.process = procs()
    s = MachineSampler(m)
    s.sample()
    before = s.figures(full=True)["qmpSampledUSec"]
    m.answers["query-blockstats"] = lambda: FakeMachine._raise(MachineTimeout("vm: QEMU did not answer"))
    m.calls.clear()
    with caplog.at_level(logging.INFO, logger="vmbridge.stats"):
        for _ in range(SLOW_ROUNDS):
            assert s.sample()  # the process figures keep coming
    assert m.calls == ["query-blockstats"]  # asked once, then left alone
    assert len([r for r in caplog.records if "did not answer" in r.getMessage()]) == 1
    assert s.figures(full=True)["qmpSampledUSec"] == before
    m.answers["query-blockstats"] = FakeMachine().answers["query-blockstats"]
    s.sample()
    assert "query-blockstats" in m.calls[1:] and s.figures(full=True)["qmpSampledUSec"] > before


def test_helpers_count_and_may_vanish(procs):
    m = FakeMachine()
    m.process = procs()
    m.helpers = [procs().popen, procs().popen]
    s = MachineSampler(m)
    s.sample()
    s.sample()
    figures = s.figures(full=True)
    assert [p["role"] for p in figures["processes"]] == ["qemu", "sleep", "sleep"]
    assert figures["rssBytes"] == sum(p["rssBytes"] for p in figures["processes"])
    assert figures["threads"] == sum(p["threads"] for p in figures["processes"])
    assert all("pssBytes" in p for p in figures["processes"]) and figures["pssBytes"] > 0
    m.helpers[0].kill()
    m.helpers[0].wait()
    assert s.sample()
    assert [p["pid"] for p in s.figures(full=True)["processes"]] == [m.process.pid, m.helpers[1].pid]


def test_vanished_process_and_restart(procs):
    m = FakeMachine()
    m.process = procs()
    s = MachineSampler(m)
    s.sample()
    s.sample()
    assert "cpuPercent" in s.figures()
    m.process = procs()  # restarted: a new QEMU, figures from scratch
    assert s.sample()
    assert "cpuPercent" not in s.figures() and s.figures(full=True)["processes"][0]["pid"] == m.process.pid
    m.process.popen.kill()
    m.process.popen.wait()  # gone, and reaped, before vmbridged noticed
    assert not s.sample()
    m.process.exited = True
    assert not s.sample()


def test_stats_sampler_round(procs):
    a, b, c = FakeMachine("a"), FakeMachine("b"), FakeMachine("c")
    a.process, b.process = procs(), procs()
    c.state = MachineState.DEFINED  # never started: not sampled
    b.answers["query-blockstats"] = lambda: 1 / 0  # a bug in one VM's sampling...
    sampler = StatsSampler(lambda: [a, b, c], 2.0)
    sampler.sample_once()
    sampler.sample_once()
    assert sampler.figures(a)["cpuPercent"] >= 0
    assert sampler.figures(b) is None and sampler.figures(c) is None  # ...costs only that VM its figures
    assert sampler.self_cpu_percent is not None and sampler.rounds == 2
    a.state = MachineState.EXITED
    sampler.sample_once()
    assert sampler.figures(a) is None
