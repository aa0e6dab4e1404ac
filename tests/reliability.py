"""Helpers of the fault, hostile-client and fuzz tests (issue 10).

Measurements are recorded, never asserted on timing: `record()` merges
figures into bench/results/reliability.json (git-ignored) and prints them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import psutil

from conftest import ROOT, read_message

RESULTS = os.path.join(ROOT, "bench", "results", "reliability.json")
DESCRIBE = b'{"method":"io.systemd.MachineInstance.Describe","parameters":{}}\0'


def record(section: str, figures: dict) -> None:
    """Print `figures` and merge them into bench/results/reliability.json."""
    print(f"\n[{section}] " + json.dumps(figures, sort_keys=True))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    try:
        with open(RESULTS) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    results[section] = {**figures, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, RESULTS)


def settled_fds(proc: psutil.Process, quiet: float = 0.3, timeout: float = 10.0) -> int:
    """The fd count once it has not changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    count, since = proc.num_fds(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = proc.num_fds()
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return count


def fds_back_to(proc: psutil.Process, baseline: int, timeout: float = 10.0) -> int:
    """Wait (bounded) until the fd count is down to `baseline`; returns the last count.

    Closing is asynchronous in the daemon (a connection notices EOF on its
    next loop turn, gevent defers os.close of non-files by one turn), so a
    leak is a count that stays above the baseline, not one seen in passing.
    """
    deadline = time.monotonic() + timeout
    while True:
        count = proc.num_fds()
        if count <= baseline or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def open_fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def rss_mib(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def hwm_mib(pid: int) -> float:
    """Peak RSS (VmHWM) of the process so far."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reset_hwm(pid: int) -> None:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs), so a peak is measured from now."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class DescribeLoop:
    """A well-behaved client in a thread: Describe (or `message`) on one connection, again and again.

    Every reply must be exactly `expected`; a reconnect every `per_connection`
    calls also proves new connections are accepted all along. `stop()` returns
    the figures; `failures` lists anything wrong (bad reply, error, timeout).
    """

    def __init__(self, path: str, expected: dict, *, message: bytes = DESCRIBE, per_connection: int = 50,
                 timeout: float = 30.0):
        self.path = path
        self.expected = expected
        self.message = message
        self.per_connection = per_connection
        self.timeout = timeout
        self.calls = 0
        self.connections = 0
        self.max_latency = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "DescribeLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.failures) < 10:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(self.timeout)
                    sock.connect(self.path)
                    self.connections += 1
                    buf = bytearray()
                    for _ in range(self.per_connection):
                        if self._stop.is_set():
                            return
                        start = time.monotonic()
                        sock.sendall(self.message)
                        reply = json.loads(read_message(sock, buf))
                        self.max_latency = max(self.max_latency, time.monotonic() - start)
                        self.calls += 1
                        if reply != self.expected:
                            self.failures.append(f"call {self.calls}: {reply!r}")
                        time.sleep(0.002)
            except (OSError, EOFError, ValueError) as e:
                self.failures.append(f"after {self.calls} calls: {e!r}")

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(self.timeout + 5)
        return {"describe_calls": self.calls, "describe_connections": self.connections,
                "describe_max_latency_ms": round(self.max_latency * 1000, 2)}
