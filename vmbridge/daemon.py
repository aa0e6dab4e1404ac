"""vmbridged: one gevent process that owns many QEMU VMs.

Sockets (all 0600, in a 0700 runtime directory):
    RUNTIME_DIR/io.vmbridge.Manager           the manager (vmctl's entry point)
    RUNTIME_DIR/machines/NAME/control         each VM's io.systemd.MachineInstance

Signals: SIGTERM/SIGINT stop every VM cleanly and remove every socket - except
when systemd is restarting the service (or with --keep-vms): then the VMs are
left running and the next vmbridged adopts them (RUNTIME_DIR/machines/NAME/qmp).
SIGUSR1 logs one line of statistics (VMs, connections, greenlets, fds, RSS).
"""

from __future__ import annotations

# gevent first: everything below blocks only its own greenlet.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import greenlet  # noqa: E402  (gevent's own dependency)
import psutil  # noqa: E402

from vmbridge import __version__  # noqa: E402
from vmbridge import paths, systemd  # noqa: E402
from vmbridge.machine import ConfigError, MachineConfig  # noqa: E402
from vmbridge.manager import MANAGER_SOCKET, Manager, build_manager_service  # noqa: E402
from vmbridge.varlink import Server, VarlinkError  # noqa: E402

log = logging.getLogger("vmbridge.daemon")


def default_runtime_dir() -> str:
    if os.environ.get("RUNTIME_DIRECTORY"):  # systemd's RuntimeDirectory=
        return os.environ["RUNTIME_DIRECTORY"].split(":")[0]
    path = paths.default_runtime_dir()
    if path is None:
        raise SystemExit("vmbridged: $XDG_RUNTIME_DIR is not set; pass --runtime-dir")
    return path


def default_config_dir() -> str:
    if os.environ.get("CONFIGURATION_DIRECTORY"):
        return os.environ["CONFIGURATION_DIRECTORY"].split(":")[0]
    if os.getuid() == 0:
        return "/etc/vmbridge"
    return os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "vmbridge")


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if systemd.stderr_is_journal():
        handler.setFormatter(systemd.JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def byte_size(value: str) -> int:
    """A size in bytes: 4096, 64K, 4M, 1G (also 4MiB); at least 1 KiB."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        size = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4M or 512K, not {value!r}") from None
    if size < 1024:
        raise argparse.ArgumentTypeError(f"{value!r} is too small (at least 1K)")
    return size


def stats_interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, such as 2 or 0.5, not {value!r}") from None
    if seconds != 0 and not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be 0 (off) or from 0.1 to 3600 seconds")
    return seconds


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="vmbridged", description="Runtime-control plane for QEMU VMs.")
    parser.add_argument("--runtime-dir", help="sockets and VM state (default: $RUNTIME_DIRECTORY, "
                        "/run/vmbridge for root, $XDG_RUNTIME_DIR/vmbridge otherwise)")
    parser.add_argument("--config-dir", help="VM definitions in CONFIG_DIR/machines/NAME.conf (default: "
                        "$CONFIGURATION_DIRECTORY, /etc/vmbridge for root, ~/.config/vmbridge otherwise)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log QMP and varlink traffic")
    parser.add_argument("--qmp-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long a VM's QEMU may take to answer a command (default 30)")
    parser.add_argument("--console-log-size", type=byte_size, metavar="SIZE",
                        help="rotate each VM's console.log to console.log.1 past SIZE bytes "
                        "(K, M, G suffixes; default 4M)")
    parser.add_argument("--stats-interval", type=stats_interval, default=2.0, metavar="SECONDS",
                        help="sample each VM's resource figures (CPU, memory, I/O) every SECONDS "
                        "(default 2; 0 turns sampling off)")
    parser.add_argument("--keep-vms", action="store_true",
                        help="on SIGTERM, leave the VMs running for the next vmbridged to adopt "
                        "(the default when systemd is restarting the service)")
    parser.add_argument("--max-connections-per-uid", type=positive_int, default=None, metavar="N",
                        help="connections one user may hold open on each socket; past it a new one is "
                        "refused with EUSERS (default: 1024, less when RLIMIT_NOFILE is low)")
    parser.add_argument("--demo", metavar="GUEST_DIR",
                        help="also start a VM named 'demo' from GUEST_DIR/vmlinuz and GUEST_DIR/initramfs.img")
    parser.add_argument("--version", action="version", version=f"vmbridged {__version__}")
    return parser.parse_args(argv)


def prepare_runtime_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def manager_listen_socket():
    """The manager socket systemd passed us (vmbridged.socket), if any."""
    fds = systemd.listen_fds()
    candidates = fds.get(MANAGER_SOCKET) or fds.get("unknown") or next(iter(fds.values()), [])
    for extra in [fd for fdlist in fds.values() for fd in fdlist if fd not in candidates[:1]]:
        os.close(extra)
    if not candidates:
        return None
    return socket.socket(fileno=candidates[0])


class Daemon:
    def __init__(self, args):
        self.args = args
        self.runtime_dir = prepare_runtime_dir(args.runtime_dir or default_runtime_dir())
        self.notifier = systemd.Notifier()
        self.stopping = gevent.event.Event()
        self._last_status = None
        self.manager = Manager(self.runtime_dir, args.config_dir or default_config_dir(),
                               command_timeout=args.qmp_timeout, on_change=self.report_status,
                               console_log_size=args.console_log_size,
                               stats_interval=args.stats_interval,
                               max_connections_per_uid=args.max_connections_per_uid)
        listen = manager_listen_socket()
        self.server = Server(build_manager_service(self.manager), listen_socket=listen,
                             path=None if listen else os.path.join(self.runtime_dir, MANAGER_SOCKET),
                             mode=0o600, max_connections_per_uid=args.max_connections_per_uid)
        self.manager.server = self.server

    def report_status(self) -> None:
        # Called on every state change of every VM (each Pause and Resume):
        # count only when systemd listens, and tell it only what changed.
        if self.stopping.is_set() or not self.notifier.enabled:
            return
        running = sum(1 for e in self.manager.entries.values() if e.machine.state.active)
        status = f"STATUS={running} VM{'s' if running != 1 else ''} running"
        if status != self._last_status:
            self._last_status = status
            self.notifier.notify(status)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, self._on_signal, sig)
        gevent.signal_handler(signal.SIGUSR1, self.log_stats)
        # Adopt first: a client must never see a half-rebuilt registry (systemd's
        # socket, if any, queues connections meanwhile).
        self.manager.load()
        self.server.start()
        log.info("vmbridged %s serving %s", __version__, self.server.address)
        self.notifier.notify("READY=1")
        self.report_status()
        interval = systemd.watchdog_interval()
        watchdog = gevent.spawn(self._watchdog, interval) if interval else None
        if self.args.demo:
            gevent.spawn(self._start_demo, self.args.demo)
        self.stopping.wait()
        self.notifier.notify("STOPPING=1", "STATUS=Stopping VMs")
        if watchdog is not None:
            watchdog.kill()
        self.server.stop()
        keep = self.args.keep_vms or systemd.restart_pending()
        if keep:
            log.info("leaving the VMs running for the next vmbridged (%s)",
                     "--keep-vms" if self.args.keep_vms else "systemd is restarting the service")
        self.manager.shutdown(keep_vms=keep)
        log.info("vmbridged stopped")
        self.notifier.close()
        return 0

    def _on_signal(self, sig) -> None:
        log.info("%s received; stopping every VM", signal.Signals(sig).name)
        self.stopping.set()

    def log_stats(self) -> None:
        """One line for soak tests and debugging (SIGUSR1). Walks the heap: on demand only."""
        greenlets = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)
        entries = list(self.manager.entries.values())
        connections = self.server.connections + sum(e.server.connections for e in entries if e.server)
        proc = psutil.Process()
        log.info("stats: vms=%d active=%d connections=%d greenlets=%d fds=%d rss_kib=%d",
                 len(entries), sum(1 for e in entries if e.machine.state.active), connections,
                 greenlets, proc.num_fds(), proc.memory_info().rss // 1024)

    def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            gevent.sleep(interval)

    def _start_demo(self, guest_dir: str) -> None:
        guest_dir = os.path.abspath(guest_dir)
        # The uncompressed kernel boots ~2 s faster under TCG than Debian's xz'd vmlinuz.
        kernel = next(p for p in (os.path.join(guest_dir, "vmlinux"), os.path.join(guest_dir, "vmlinuz"))
                      if os.path.exists(p) or p.endswith("vmlinuz"))
        try:
            config = MachineConfig.from_dict({
                # TCG: the demo must boot the same everywhere, also where /dev/kvm
                # exists but cannot run a guest (nested virtualisation).
                "name": "demo", "memory": "256M", "accel": "tcg",
                "linux": kernel,
                "initrd": os.path.join(guest_dir, "initramfs.img"),
                "append": "console=ttyS0 quiet panic=-1 cryptomgr.notests",
            })
            entry = self.manager.create(config)
        except (ConfigError, VarlinkError) as e:
            log.error("demo VM not started: %s", e)
            return
        rt = self.runtime_dir
        log.info("demo VM running; its control socket is %s", entry.server.address)
        print(f"""
The demo VM is running. In another terminal, try:
    .venv/bin/vmctl --runtime-dir {rt} list
    .venv/bin/vmctl --runtime-dir {rt} describe demo
    .venv/bin/vmctl --runtime-dir {rt} console demo        (a root shell; Ctrl-] detaches)
    .venv/bin/vmctl --runtime-dir {rt} events demo        (then pause/resume from a third terminal)
    .venv/bin/vmctl --runtime-dir {rt} pause demo
    .venv/bin/vmctl --runtime-dir {rt} resume demo
    .venv/bin/vmctl --runtime-dir {rt} reboot demo
    .venv/bin/vmctl --runtime-dir {rt} poweroff demo
    varlinkctl call {entry.server.address} io.systemd.MachineInstance.Describe '{{}}'
Stop vmbridged with Ctrl-C (it stops its VMs first).
""", file=sys.stderr, flush=True)


# Garbage collection, tuned for a daemon holding thousands of connections.
# Profile (bench/run.py fanout, 1000 SubscribeEvents clients): with CPython's
# default threshold of 700, a young collection ran every ~230 delivered events
# (~2 us per delivery), and every few dozen fan-outs a full collection walked
# every object for 15-30 ms, stalling every VM's sockets meanwhile. What exists
# once start-up is done (modules, classes, parsed interfaces) lives as long as
# the process: frozen out of every collection. Reference counting frees
# nearly all garbage at once; only cycles wait for the collector, and they
# can wait for 10,000 allocations instead of 700.
GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    tune_gc()  # after the imports, before any VM or connection exists
    try:
        return Daemon(args).run()
    except OSError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
