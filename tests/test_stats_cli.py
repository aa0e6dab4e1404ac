"""The client side of resource figures: formatting, vmctl status/top logic, top in a terminal.

The verb modules run through tests/stats_cli.py's MiniContext until vmctl's
entry point and Context are merged in (see that module).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from stats_cli import MiniContext, run_verb
from vmbridge.cli import figures as fig
from vmbridge.cli import status, top
from vmbridge.machine.stats import SUMMARY_KEYS, drive_name, parse_blockstats

HERE = os.path.dirname(os.path.abspath(__file__))


def machine(name, state="running", pid=100, **figures):
    m = {"name": name, "state": state, "config": {"name": name, "machine": "none"}, "sinceUSec": 0,
         "persistent": False, "autostart": False}
    if pid is not None:
        m["pid"] = pid
    if figures:
        m["figures"] = {"sampledUSec": 1_000_000, **figures}
    return m


# ------------------------------------------------------------ formatting

def test_formatters():
    assert fig.format_bytes(None) is None and fig.format_cpu(None) is None
    assert [fig.format_bytes(v) for v in (0, 1023, 1024, 4096, 33267712, 256 << 20, 1536 << 20)] == \
        ["0B", "1023B", "1.0K", "4.0K", "31.7M", "256M", "1.5G"]
    assert [fig.format_cpu(v) for v in (0, 12.34, 198.0)] == ["0.0%", "12.3%", "198.0%"]
    assert [fig.format_duration(u) for u in (5, 1500, 850_000, 3_200_000, 60_000_000, 125_000_000,
                                             3_605_000_000, 3_720_000_000, 90_000_000_000)] == \
        ["5us", "1ms", "850ms", "3.2s", "1min", "2min 5s", "1h", "1h 2min", "1d 1h"]
    assert fig.format_rate(2048.7) == "2.0K/s"
    assert fig.format_timestamp(int((time.time() - 125) * 1e6)).endswith("; 2min 5s ago")


def test_list_columns():
    assert fig.LIST_HEADER == ("CPU%", "MEMORY")
    assert fig.list_columns(machine("a", cpuPercent=12.5, rssBytes=256 << 20)) == ("12.5%", "256M")
    assert fig.list_columns(machine("b", state="defined", pid=None)) == (None, None)
    assert fig.list_columns(machine("c", rssBytes=1 << 30)) == (None, "1.0G")  # first sample: no CPU% yet


# ------------------------------------------------------------ blockstats

def test_parse_blockstats():
    reply = [
        {"device": "", "qdev": "/machine/peripheral/drive0/virtio-backend", "node-name": "drive0",
         "stats": {"rd_bytes": 512, "wr_bytes": 4096, "rd_operations": 1, "wr_operations": 1,
                   "flush_operations": 2, "rd_total_time_ns": 5}},
        {"device": "ide0-hd0", "qdev": "", "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0,
                                                      "wr_operations": 0, "flush_operations": 0}},
        {"device": "", "node-name": "n1", "stats": {}},
    ]
    assert parse_blockstats(reply) == [
        {"name": "drive0", "qdev": "/machine/peripheral/drive0/virtio-backend", "nodeName": "drive0",
         "readBytes": 512, "writeBytes": 4096, "readOps": 1, "writeOps": 1, "flushOps": 2},
        {"name": "ide0-hd0", "readBytes": 0, "writeBytes": 0, "readOps": 0, "writeOps": 0, "flushOps": 0},
        {"name": "n1", "nodeName": "n1", "readBytes": 0, "writeBytes": 0, "readOps": 0, "writeOps": 0,
         "flushOps": 0},
    ]
    assert parse_blockstats([]) == []
    assert drive_name({"qdev": "/machine/unattached/device[3]"}) == "/machine/unattached/device[3]"


# ------------------------------------------------------------ top

def test_top_sorting_and_json_sample():
    machines = [machine("b", cpuPercent=5.0, rssBytes=300, readBytes=0, writeBytes=0),
                machine("a", cpuPercent=50.0, rssBytes=100, readBytes=10, writeBytes=0),
                machine("c", state="defined", pid=None),
                machine("d", cpuPercent=5.0, rssBytes=200, readBytes=5, writeBytes=100)]
    order = lambda key: [r["name"] for r in top.sort_rows(top.rows(machines), key)]  # noqa: E731
    assert order("cpu") == ["a", "b", "d", "c"]  # ties by name; no figures last
    assert order("mem") == ["b", "d", "a", "c"]
    assert order("name") == ["a", "b", "c", "d"]
    assert order("io") == ["d", "a", "b", "c"]  # no rates yet: the totals
    sample = json.loads(json.dumps(top.json_sample(machines, "cpu")))
    assert [s["name"] for s in sample] == ["a", "b", "d", "c"]
    assert sample[0] == {"name": "a", "state": "running", "pid": 100, "figures": machines[1]["figures"]}
    assert sample[3] == {"name": "c", "state": "defined"}


def test_top_rates_between_samples():
    rates = top.Rates()
    first = machine("a", sampledUSec=1_000_000, readBytes=0, writeBytes=1000)
    assert rates.update(first) == (None, None)
    assert rates.update(first) == (None, None)  # the same sample again: still nothing
    second = machine("a", sampledUSec=3_000_000, readBytes=4096, writeBytes=3000)
    assert rates.update(second) == (2048.0, 1000.0)
    assert rates.update(second) == (2048.0, 1000.0)  # refreshed faster than sampled: kept
    restarted = machine("a", pid=200, sampledUSec=4_000_000, readBytes=0, writeBytes=0)
    assert rates.update(restarted) == (None, None)  # another QEMU: from scratch


def test_top_frame_and_render():
    machines = [machine("web", cpuPercent=99.5, rssBytes=256 << 20, vcpuCount=1, threads=5,
                        readBytes=0, writeBytes=0, uptimeUSec=65_000_000),
                machine("idle", cpuPercent=0.0, rssBytes=31 << 20, vcpuCount=0, threads=3,
                        readBytes=0, writeBytes=0, uptimeUSec=5_000_000)]
    lines = top.frame(machines, "cpu", 2.0, top.Rates())
    assert re.match(r"vmctl top - \d\d:\d\d:\d\d - 2 VMs \(2 running\) - sorted by cpu, every 2.0s", lines[0])
    assert lines[2].split() == list(top.HEADER)
    assert lines[3].split() == ["web", "running", "100", "99.5%", "256M", "1", "5", "-", "-", "1min", "5s"]
    assert lines[4].split()[:5] == ["idle", "running", "100", "0.0%", "31.0M"]
    screen = top.render(lines, 40, 4)
    assert screen.startswith(top.HOME) and screen.endswith(top.EOL + top.EOS)
    shown = screen[len(top.HOME):].split(top.EOL + "\r\n")
    assert len(shown) == 4  # cut to the height...
    assert all(len(re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", line.replace(top.EOL, ""))) <= 40 for line in shown)
    assert shown[2].startswith(top.REVERSE) and top.NORMAL in shown[2]  # ...and width; header reversed


# ------------------------------------------------------------ status

FULL = {"sampledUSec": 1_000_000, "intervalUSec": 2_000_000, "cpuPercent": 101.3, "cpuUSec": 63_000_000,
        "rssBytes": 256 << 20, "pssBytes": 250 << 20, "threads": 6, "fds": 40, "readBytes": 1 << 20,
        "writeBytes": 4096, "uptimeUSec": 125_000_000, "vcpuCount": 2, "balloonBytes": 1 << 30,
        "vcpus": [{"index": 0, "threadId": 11, "cpuPercent": 99.0, "cpuUSec": 1},
                  {"index": 1, "threadId": 12, "cpuPercent": 2.0, "cpuUSec": 1}],
        "drives": [{"name": "drive0", "readBytes": 1 << 20, "writeBytes": 4096, "readOps": 30, "writeOps": 1,
                    "flushOps": 2}],
        "processes": [{"pid": 100, "role": "qemu", "cpuPercent": 100.0, "cpuUSec": 1, "rssBytes": 200 << 20,
                       "threads": 5},
                      {"pid": 101, "role": "virtiofsd", "cpuPercent": 1.3, "cpuUSec": 1, "rssBytes": 56 << 20,
                       "threads": 1}],
        "qmpSampledUSec": 1_000_000}


def test_status_machine_block():
    m = machine("web")
    m.update({"status": "running", "qemuVersion": "7.2.22", "controlAddress": "/run/vmbridge/machines/web/control",
              "config": {"name": "web", "machine": "q35", "accel": "tcg", "cpus": 2, "memory": "1G",
                         "drive": ["/srv/web.qcow2,format=qcow2"], "network": ["user"]},
              "figures": FULL})
    text = "\n".join(status.machine_lines(m))
    expected = [
        "● web - running",
        "           State: running (QEMU: running)",
        "            QEMU: pid 100, 7.2.22, q35, tcg",
        "         Control: /run/vmbridge/machines/web/control",
        "          Config: 2 vCPUs, 1G memory",
        "          Drives: /srv/web.qcow2,format=qcow2",
        "         Network: user",
        "             CPU: 101.3% (over 2.0s), 1min 3s in all",
        "           vCPUs: #0 thread 11 99.0%, #1 thread 12 2.0%",
        "          Memory: 256M resident, 250M proportional, balloon 1.0G",
        "             I/O: 1.0M read, 4.0K written (host storage)",
        "       Drive I/O: drive0: 1.0M read (30 ops), 4.0K written (1 op), 2 flushes",
        "           Tasks: 6 threads, 40 open fds",
        "          Uptime: 2min 5s",
        "       Processes: 100 qemu: 100.0%, 200M, 5 threads",
        "                  101 virtiofsd: 1.3%, 56.0M, 1 thread",
    ]
    for line in expected:
        assert line + "\n" in text + "\n", f"{line!r} not in:\n{text}"
    assert "Since: " in text
    # Not running: no figures, no complaint about them either.
    gone = machine("old", state="exited", pid=None)
    gone.update({"shutdownReason": "guest-shutdown", "exitStatus": 0})
    text = "\n".join(status.machine_lines(gone))
    assert "Exit: shutdown: guest-shutdown, status 0" in text and "CPU" not in text and "Figures" not in text
    # Running but not sampled (yet, or --stats-interval 0).
    assert "Figures: none yet" in "\n".join(status.machine_lines(machine("new")))


def test_status_daemon_block():
    daemon = {"pid": 42, "version": "0.1.0", "uptimeUSec": 3_600_000_000, "cpuPercent": 0.4, "cpuUSec": 1_500_000,
              "rssBytes": 33 << 20, "pssBytes": 20 << 20, "threads": 1, "fds": 12, "fdLimit": 1024,
              "greenlets": 9, "managerConnections": 1, "machineConnections": 3, "machines": 2,
              "activeMachines": 1, "statsIntervalUSec": 2_000_000, "statsRoundUSec": 1600}
    text = "\n".join(status.daemon_lines(daemon))
    for line in ["vmbridged 0.1.0 (pid 42)", "  Uptime: 1h", "     CPU: 0.4% (over 2.0s), 1.5s in all",
                 "  Memory: 33.0M resident, 20.0M proportional", "   Tasks: 1 thread, 9 greenlets",
                 "Open fds: 12 (limit 1024)", "Connections: 1 on the manager socket, 3 on VMs' control sockets",
                 "     VMs: 2 (1 with a QEMU)", " Figures: sampled every 2.0s, last round took 1ms"]:
        assert line in text, f"{line!r} not in:\n{text}"
    daemon.update(statsIntervalUSec=0)
    del daemon["cpuPercent"], daemon["statsRoundUSec"]
    assert "Figures: not sampled (--stats-interval 0)" in "\n".join(status.daemon_lines(daemon))


# ------------------------------------------------------------ against vmbridged

@pytest.fixture
def sampled(daemon_factory):
    d = daemon_factory(extra_args=["--stats-interval", "0.3"])
    d.create("idle1")
    d.create("idle2")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        machines = d.call("List")["parameters"]["machines"]
        if all("cpuPercent" in m.get("figures", {}) for m in machines):
            return d
        time.sleep(0.1)
    pytest.fail(f"no figures in List: {machines}")


def test_status_and_top_json_against_vmbridged(sampled):
    out = io.StringIO()
    assert run_verb("top", ["--sort", "name"], MiniContext(sampled.manager_socket, json_mode="short", stdout=out)) == 0
    sample = json.loads(out.getvalue())
    assert [s["name"] for s in sample] == ["idle1", "idle2"]
    assert set(sample[0]["figures"]) <= set(SUMMARY_KEYS) and "cpuPercent" in sample[0]["figures"]

    out = io.StringIO()
    assert run_verb("status", ["idle1"], MiniContext(sampled.manager_socket, stdout=out)) == 0
    text = out.getvalue()
    assert text.startswith("● idle1 - running\n") and "Control: " + sampled.control_socket("idle1") in text
    assert re.search(r"\n +CPU: \d+\.\d% \(over \d+ms\), ", text) and "resident, " in text and "proportional" in text
    assert "Drives: none" in text and "Network: none" in text and "vCPUs: 0" in text

    out = io.StringIO()
    assert run_verb("status", [], MiniContext(sampled.manager_socket, stdout=out)) == 0
    assert out.getvalue().startswith(f"vmbridged 0.1.0 (pid {sampled.proc.pid})\n")
    assert "VMs: 2 (2 with a QEMU)" in out.getvalue()

    out = io.StringIO()
    assert run_verb("status", ["idle2"], MiniContext(sampled.manager_socket, json_mode="short", stdout=out)) == 0
    assert json.loads(out.getvalue())["figures"]["processes"][0]["role"] == "qemu"

    out = io.StringIO()  # not a terminal: one plain table
    assert run_verb("top", [], MiniContext(sampled.manager_socket, stdout=out)) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("vmctl top - ") and lines[2].split() == list(top.HEADER)
    assert sorted(line.split()[0] for line in lines[3:]) == ["idle1", "idle2"] and "\x1b" not in out.getvalue()


def _pty_top(daemon, steps):
    """Run top on a pty (120x30) as a session leader; for each (text, keys) of
    `steps`, wait until the output shows text, then type keys.

    Returns (exit status, output, termios attributes before, after, stderr).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "stats_cli.py"), daemon.manager_socket,
                             "top", "-d", "0.3"], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            start_new_session=True,  # then the pty becomes its controlling terminal:
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    output = b""

    def read(timeout):
        nonlocal output
        if select.select([master], [], [], timeout)[0]:
            try:
                output += os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return False
            return True
        return False

    try:
        for text, keys in steps:
            mark = len(output)
            deadline = time.monotonic() + 30
            while text not in output[mark:] and time.monotonic() < deadline and proc.poll() is None:
                read(0.2)
            assert text in output[mark:], (output[-2000:], proc.poll())
            if isinstance(keys, int):
                proc.send_signal(keys)
            else:
                os.write(master, keys)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            read(0.1)
        while read(0.1):
            pass
        after = termios.tcgetattr(slave)
        return proc.wait(10), output, before, after, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("steps", [
    [(b"idle1", b"m"), (b"sorted by mem", b"q")],
    [(b"idle1", b"\x03")],
    [(b"idle1", signal.SIGTERM)],
    # Ctrl-Z: the terminal is given back, then taken again. (top runs as an orphaned
    # process group here, where the kernel ignores the stop: it continues at once.)
    [(b"idle1", b"\x1a"), (top.LEAVE.encode() + top.ENTER.encode(), b""), (b"idle1", b"q")],
], ids=["m-then-q", "ctrl-c", "sigterm", "ctrl-z"])
def test_top_in_a_terminal_restores_it(sampled, steps):
    status_, output, before, after, stderr = _pty_top(sampled, steps)
    assert status_ == 0, stderr
    assert output.startswith(top.ENTER.encode()) and output.rstrip().endswith(top.LEAVE.encode()), output[-200:]
    assert output.count(top.ENTER.encode()) == output.count(top.LEAVE.encode())
    assert after == before  # cbreak mode undone
    assert b"sorted by cpu" in output and b"idle2" in output
