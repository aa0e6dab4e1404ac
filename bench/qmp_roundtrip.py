"""QMP round-trip latency: QMPClient.execute against the raw floor.

One guest-less QEMU (``-machine none -S``) with three QMP monitors, each on
a socketpair, timing the same ``query-status`` round trip three ways:

raw      a blocking stdlib loop: write the line, read to the newline, parse
         nothing.  The floor: what QEMU and the kernel cost.
gevent   the least code with vmbridge's architecture (DESIGN.md, concurrency
         model): a pump greenlet reads and decodes, the caller waits on a
         ``gevent.event.AsyncResult``.  What the event loop and the greenlet
         hand-off cost on top of the floor.
client   ``QMPClient.execute``: the same, plus ids, states, logging checks,
         errors.  client/gevent is what our code costs.

All three send the same bytes, ``{"execute":"query-status","id":N}``.  QEMU
7.2 reads QMP input one byte per recvmsg and main-loop turn (strace shows
it), so each byte of a command costs a few microseconds of QEMU's time: an
id-less raw loop (``raw_noid``, shown for reference) is ~30 us faster only
because its command is 10 bytes shorter, and a client that matches replies
needs ids.  The ways alternate in rounds so background load hits them alike.

    python bench/qmp_roundtrip.py [--iterations 2000] [--qemu qemu-system-x86_64]

``run(qemu_binary, iterations)`` returns the figures as a dict for
``bench/run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

ROUNDS = 4
WARMUP = 200
QUERY_NOID = b'{"execute":"query-status"}\n'


def query(msg_id: int) -> bytes:
    """The bytes QMPClient sends for query-status (compact JSON, int id)."""
    return b'{"execute":"query-status","id":%d}\n' % msg_id


def _monitor_args(binary: str, chardev_id: str) -> list[str]:
    """The probed form of "this chardev is a QMP monitor"."""
    objects = subprocess.run([binary, "-object", "help"], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=60).stdout
    if re.search(r"^\s*monitor-qmp\s*$", objects, re.MULTILINE):
        return ["-object", f"monitor-qmp,id=mon-{chardev_id},chardev={chardev_id}"]
    return ["-mon", f"chardev={chardev_id},mode=control"]


def _start_qemu(binary: str, monitors: int):
    """QEMU with ``monitors`` QMP monitors; returns (proc, [our sockets])."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
             for _ in range(monitors)]
    argv = [binary, "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    for index, (_ours, theirs) in enumerate(pairs):
        argv += ["-chardev", f"socket,id=qmp{index},fd={theirs.fileno()}"]
        argv += _monitor_args(binary, f"qmp{index}")
    try:
        proc = subprocess.Popen(argv, pass_fds=[theirs.fileno() for _, theirs in pairs],
                                stdin=subprocess.DEVNULL)
    except BaseException:
        for ours, _theirs in pairs:
            ours.close()
        raise
    finally:
        for _ours, theirs in pairs:
            theirs.close()
    return proc, [ours for ours, _ in pairs]


class RawLoop:
    """The floor: blocking stdlib socket, write a line, read to newline."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.next_id = 1
        self.read_line()  # greeting
        self.roundtrip_bytes(b'{"execute":"qmp_capabilities"}\n')

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def roundtrip_bytes(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        return self.read_line()

    def roundtrip(self) -> bytes:
        self.next_id += 1
        return self.roundtrip_bytes(query(self.next_id))

    def roundtrip_noid(self) -> bytes:
        return self.roundtrip_bytes(QUERY_NOID)


class MinimalPump:
    """The design's floor: a pump greenlet and an AsyncResult per call."""

    def __init__(self, sock: socket.socket):
        import gevent
        import gevent.event
        import gevent.socket
        RawLoop(sock)  # handshake, blocking
        self.sock = gevent.socket.socket(fileno=sock.detach())
        self.sock.settimeout(None)
        self.waiter = None
        self.next_id = 1
        self.new_waiter = gevent.event.AsyncResult
        self.pump = gevent.spawn(self._pump)

    def _pump(self) -> None:
        buffer = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                self.waiter.set(json.loads(line))

    def roundtrip(self):
        self.waiter = waiter = self.new_waiter()
        self.next_id += 1
        self.sock.sendall(query(self.next_id))
        return waiter.get()

    def close(self) -> None:
        self.pump.kill()
        self.sock.close()


def interleaved(ways: dict, iterations: int, *, warmup: int = WARMUP, rounds: int = ROUNDS) -> dict:
    """Time each way (a callable) `iterations` times after `warmup` calls, the ways
    alternating in `rounds` so that a noisy moment hits them all; seconds per call."""
    clock = time.perf_counter
    samples = {name: [] for name in ways}
    for way in ways.values():
        for _ in range(warmup):
            way()
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for name, way in ways.items():
            record = samples[name].append
            for _ in range(per_round):
                start = clock()
                way()
                record(clock() - start)
    return samples


def _percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_us": pick(0.50) * 1e6, "p99_us": pick(0.99) * 1e6,
            "mean_us": statistics.fmean(ordered) * 1e6, "n": len(ordered)}


def run(qemu_binary: str = "qemu-system-x86_64", iterations: int = 2000) -> dict:
    """Measure ``iterations`` query-status round trips each way; return
    ``{"raw": {...}, "gevent": {...}, "client": {...}, "ratio_p50": x,
    "ratio_p99": y, "client_vs_gevent_p50": z}`` (ratios are client/raw
    unless named otherwise; stats in microseconds)."""
    from vmbridge.qmp import QMPClient  # after the caller set up sys.path

    proc, (raw_sock, pump_sock, client_sock) = _start_qemu(qemu_binary, 3)
    minimal = client = None
    try:
        raw = RawLoop(raw_sock)
        minimal = MinimalPump(pump_sock)
        client = QMPClient(client_sock, name="bench")
        client.handshake(timeout=30)
        ways = {"raw_noid": raw.roundtrip_noid, "raw": raw.roundtrip,
                "gevent": minimal.roundtrip,
                "client": lambda: client.execute("query-status")}
        samples = interleaved(ways, iterations)
        per_round = max(1, iterations // ROUNDS)
        assert client.execute("query-status")["status"] == "prelaunch"
    finally:
        if client is not None:
            client.close()
        if minimal is not None:
            minimal.close()
        for sock in (raw_sock, pump_sock, client_sock):
            sock.close()  # no-op for the ones adopted above
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    stats = {name: _percentiles(values) for name, values in samples.items()}
    return {
        "benchmark": "qmp_roundtrip", "command": "query-status",
        "iterations": per_round * ROUNDS, **stats,
        "ratio_p50": stats["client"]["p50_us"] / stats["raw"]["p50_us"],
        "ratio_p99": stats["client"]["p99_us"] / stats["raw"]["p99_us"],
        "client_vs_gevent_p50": stats["client"]["p50_us"] / stats["gevent"]["p50_us"],
    }


def _print(result: dict) -> None:
    print(f"QMP query-status round trip, {result['iterations']} iterations each")
    for label, key in (("raw, id-less command", "raw_noid"),
                       ("raw blocking loop (floor)", "raw"),
                       ("gevent pump + AsyncResult", "gevent"),
                       ("QMPClient.execute", "client")):
        stats = result[key]
        print(f"  {label:26} p50 {stats['p50_us']:7.1f} us   p99 {stats['p99_us']:7.1f} us"
              f"   mean {stats['mean_us']:7.1f} us")
    print(f"  client/raw   p50 {result['ratio_p50']:.2f}x   p99 {result['ratio_p99']:.2f}x"
          f"   (target <= 1.3x)")
    print(f"  client/gevent p50 {result['client_vs_gevent_p50']:.2f}x   (what our code adds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run(args.qemu, args.iterations)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
