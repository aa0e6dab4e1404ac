"""One VM: its QEMU process, its QMP connection, its state and its events.

A Machine's life (see DESIGN.md, "A VM's life"):

    defined ─► starting ─► running ⇄ paused ─► shutting-down ─► exited
                   │                                   (any) ─► exited
                   └─► failed   (set-up error: QEMU killed, nothing left behind)

QEMU is started paused (``-S``) with its monitor on one end of a socketpair;
the devices are set up over QMP, then ``cont`` lets the vCPUs run. The VM's
QMP client pump is the only reader of that socket; it calls
:meth:`Machine._on_qmp_event` for every event, which keeps the state current
(Describe and List are answered from memory, never by a QMP round trip) and
offers the event to the VM's subscribers.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import socket
import time

import gevent
import gevent.event
import gevent.socket

from vmbridge.machine import qemu as qemu_mod
from vmbridge.machine.config import MachineConfig
from vmbridge.machine.console import Console
from vmbridge.machine.events import EventHub, MachineEvent
from vmbridge.machine.process import AdoptedProcess, ChildProcess, ExitInfo, QemuProcess, log_tail
from vmbridge.qmp import (QMPClient, QMPCommandError, QMPDisconnectedError, QMPTimeoutError,
                          State as QMPState)

log = logging.getLogger("vmbridge.machine")

STATE_FILE = "state.json"
EXITED_EVENT = "EXITED"  # vmbridge's own last event of every stream; see control.py


class MachineState(str, enum.Enum):
    DEFINED = "defined"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    EXITED = "exited"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in (MachineState.STARTING, MachineState.RUNNING,
                        MachineState.PAUSED, MachineState.SHUTTING_DOWN)


_ROUTINE_TRANSITIONS = frozenset({(MachineState.RUNNING, MachineState.PAUSED),
                                  (MachineState.PAUSED, MachineState.RUNNING)})


class MachineError(Exception):
    """A control operation on a VM failed."""


class MachineNotConnected(MachineError):
    """The VM's QMP connection is gone (QEMU exited, or never started)."""


class MachineTimeout(MachineError):
    """QEMU did not answer in time (e.g. it is SIGSTOPped or hung)."""


class MachineCommandError(MachineError):
    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class SetupError(MachineError):
    """Starting the VM failed; nothing of it is left running."""

    def __init__(self, message: str, *, device: str | None = None):
        super().__init__(f"{device}: {message}" if device else message)
        self.message = message
        self.device = device


# QMP events that stop the vCPUs for a reason other than `stop`, and the
# run state QEMU enters when the STOP that follows them arrives.
_STOP_REASONS = {
    ("GUEST_PANICKED", "pause"): "guest-panicked",
    ("BLOCK_IO_ERROR", "stop"): "io-error",
    ("WATCHDOG", "pause"): "watchdog",
}


class Machine:
    def __init__(self, config: MachineConfig, directory: str, *,
                 command_timeout: float = 30.0, on_change=None, console_log_size: int | None = None):
        self.config = config
        self.name = config.name
        self.directory = directory
        self.command_timeout = command_timeout
        self.console_log_size = console_log_size  # console.log's rotation size (None: the default)
        self._on_change = on_change
        self.state = MachineState.DEFINED
        self.since = time.time()
        # QEMU's own run state as query-status would report it, kept from events.
        self.qemu_status = "unknown"
        self.qemu_running = False
        self.qemu_version: str | None = None
        self.error: str | None = None
        self.shutdown_reason: str | None = None
        self.exit_info: ExitInfo | None = None
        self.events = EventHub()
        self.qmp: QMPClient | None = None
        self.process: QemuProcess | None = None
        self.console: Console | None = None
        self._pending_stop_status: str | None = None
        self._detached = False  # let go of for the next vmbridged: QMP loss is expected
        self._gone = gevent.event.Event()
        self._gone.set()  # nothing running yet
        self._settled = gevent.event.Event()  # set whenever the state is not `starting`
        self._settled.set()
        self._resources = contextlib.ExitStack()  # what lives exactly as long as QEMU
        # The device plane's bookkeeping (machine/setup.py) and storage hotplug on it (machine/storage.py)
        self.devices, self.storage = self._new_devices()

    def _new_devices(self):
        """A fresh device record and storage hotplug for one run."""
        from vmbridge.machine.setup import DeviceState
        from vmbridge.machine.storage import StorageHotplug

        devices = DeviceState(self)
        return devices, StorageHotplug(devices)

    # ------------------------------------------------------------------ state

    def _set_state(self, new: MachineState, *, error: str | None = None) -> None:
        old = self.state
        if error is not None:
            self.error = error
        if new == old:
            return
        self.state = new
        self.since = time.time()
        if new == MachineState.STARTING:
            self._settled.clear()
        else:
            self._settled.set()
        # Pause and resume are routine control calls, answered and announced
        # to subscribers anyway: logged at DEBUG, as they sit on the path of
        # the Pause/Resume reply (a log record costs about as much as the
        # rest of the event's handling). The VM's life is logged at INFO.
        level = logging.DEBUG if (old, new) in _ROUTINE_TRANSITIONS else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s: %s → %s%s", self.name, old.value, new.value, f" ({error})" if error else "")
        if self._on_change is not None:
            try:
                self._on_change(self, old, new)
            except Exception:
                log.exception("%s: state-change callback failed", self.name)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and not self.process.exited else None

    def helper_pids(self) -> list[int]:
        """The pids of this VM's helper processes (e.g. virtiofsd), for its resource figures.

        Their CPU, memory and I/O count towards the VM's (see vmbridge/machine/stats.py).
        None yet: the device plane adds its helpers here.
        """
        return []

    def describe(self) -> dict:
        """io.systemd.MachineInstance.Describe's answer, from memory."""
        return {"running": self.qemu_running, "status": self.qemu_status}

    # --------------------------------------------------------------- commands

    def execute(self, command: str, arguments: dict | None = None, *, fds=(), timeout=None):
        """Run one QMP command on this VM, mapping QMP failures to MachineErrors."""
        client = self.qmp
        if client is None or client.state == QMPState.DISCONNECTED:
            raise MachineNotConnected(f"{self.name}: not connected to QEMU")
        try:
            return client.execute(command, arguments, fds=fds,
                                  timeout=self.command_timeout if timeout is None else timeout)
        except QMPCommandError as e:
            raise MachineCommandError(command, e.error_class, e.desc) from e
        except QMPTimeoutError as e:
            raise MachineTimeout(f"{self.name}: QEMU did not answer {command!r} within "
                                 f"{self.command_timeout if timeout is None else timeout:g}s") from e
        except QMPDisconnectedError as e:
            raise MachineNotConnected(f"{self.name}: connection to QEMU lost ({e})") from e

    def pause(self) -> None:
        self.execute("stop")

    def resume(self) -> None:
        self.execute("cont")

    def poweroff(self) -> None:
        """Press the ACPI power button; the guest decides what to do."""
        self.execute("system_powerdown")

    def reboot(self) -> None:
        self.execute("system_reset")

    def terminate(self, grace: float = 10.0) -> None:
        """Stop QEMU now: `quit`, SIGKILL after `grace` seconds. Returns when it is gone."""
        if self.process is None or self.process.exited:
            self._gone.wait()
            return
        if self.state in (MachineState.RUNNING, MachineState.PAUSED):
            self._set_state(MachineState.SHUTTING_DOWN)
        try:
            self.execute("quit", timeout=grace)
        except MachineError as e:
            log.info("%s: quit: %s", self.name, e)
        if not self.process.wait(grace):
            log.warning("%s: QEMU still running %gs after quit; sending SIGKILL", self.name, grace)
            self.process.kill()
        self._gone.wait()

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Wait until a start in progress has ended (running, or failed)."""
        return self._settled.wait(timeout)

    def wait_gone(self, timeout: float | None = None) -> bool:
        """Wait until QEMU has exited and everything of it is cleaned up."""
        return self._gone.wait(timeout)

    # ----------------------------------------------------------------- start

    def start(self, *, startup_timeout: float = 60.0) -> None:
        """Launch QEMU, set the VM up over QMP, and let it run.

        Returns once the VM is running; raises SetupError (with QEMU killed
        and every descriptor closed) otherwise.
        """
        if self.state.active:
            raise MachineError(f"{self.name} is already {self.state.value}")
        self.error = self.shutdown_reason = self.exit_info = None
        self.qemu_status, self.qemu_running = "unknown", False
        self.events = EventHub()
        self.devices, self.storage = self._new_devices()
        self._gone.clear()
        self._set_state(MachineState.STARTING)
        try:
            with gevent.Timeout(startup_timeout, SetupError(f"start-up took longer than {startup_timeout:g}s")):
                self._launch()
                self._setup()
                self.execute("cont")
        except Exception as e:
            error = e if isinstance(e, SetupError) else SetupError(self._explain_failure(e))
            self._abort_start(error)
            raise error from (None if e is error else e)
        self._set_state(MachineState.RUNNING)

    def _launch(self) -> None:
        config = self.config
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        binary = qemu_mod.QemuBinary.probe(config.qemu)
        self.qemu_version = ".".join(map(str, binary.version))
        # Images, TAPs, vsock, virtiofsd: opened and checked before QEMU exists.
        self.devices.prepare()
        argv = [binary.path] + qemu_mod.machine_args(config, binary) + self.devices.command_line()
        pass_fds = []
        ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # QEMU's ends of everything: closed here once QEMU has inherited them.
            with contextlib.ExitStack() as qemu_ends:
                def hand_over(fd_or_sock) -> int:
                    if isinstance(fd_or_sock, int):
                        qemu_ends.callback(os.close, fd_or_sock)
                        fd = fd_or_sock
                    else:
                        qemu_ends.callback(fd_or_sock.close)
                        fd = fd_or_sock.fileno()
                    pass_fds.append(fd)
                    return fd

                argv += ["-chardev", f"socket,id=qmp,fd={hand_over(qemus)}"] + binary.monitor_args("qmp")
                # A second monitor, listening: how a restarted vmbridged reaches this QEMU again.
                argv += ["-chardev", f"socket,id=qmp-reattach,fd={hand_over(self._bind_reattach_socket())},"
                         "server=on,wait=off"] + binary.monitor_args("qmp-reattach")
                if config.machine != "none":
                    self.console = self._new_console()
                    self._resources.callback(self._close_console, "the VM exited")
                    argv += ["-chardev", f"socket,id=serial0,fd={hand_over(self.console.open())}",
                             "-serial", "chardev:serial0"]
                if config.firmware == "uefi":
                    ovmf = qemu_mod.find_ovmf()
                    if ovmf is None:
                        raise SetupError("no OVMF firmware found (install the ovmf package)", device="firmware")
                    argv += ["-bios", f"/proc/self/fd/{hand_over(_open_readonly(ovmf, 'firmware'))}"]
                if config.linux:
                    argv += ["-kernel", f"/proc/self/fd/{hand_over(_open_readonly(config.linux, 'linux'))}"]
                    if config.initrd:
                        argv += ["-initrd", f"/proc/self/fd/{hand_over(_open_readonly(config.initrd, 'initrd'))}"]
                    if config.append is not None:
                        argv += ["-append", config.append]
                log_fd = os.open(os.path.join(self.directory, "qemu.log"),
                                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                qemu_ends.callback(os.close, log_fd)
                log.debug("%s: exec %s", self.name, " ".join(argv))
                self.process = ChildProcess(argv, pass_fds=pass_fds, stderr_fd=log_fd)
        except BaseException:
            ours.close()
            raise
        self.process.on_exit(self._on_process_exit)
        self.qmp = QMPClient(ours, name=self.name)  # owns `ours` from here on
        self.qmp.on_event(self._on_qmp_event)
        self.qmp.on_disconnect(self._on_qmp_disconnect)
        if self.console is not None:
            self.console.start()
        # Bounded like any command: a QEMU that never greets (or never
        # answers qmp_capabilities) must not hold Create for the whole
        # start-up timeout.
        try:
            self.qmp.handshake(timeout=self.command_timeout)
        except QMPTimeoutError as e:
            raise SetupError(f"QEMU did not complete the QMP handshake within {self.command_timeout:g}s "
                             f"(QMP state: {self.qmp.state.value})") from e
        self._write_state_file()

    def _bind_reattach_socket(self) -> socket.socket:
        path = os.path.join(self.directory, "qmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born 0600: no window where others could connect
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(1)
        return sock

    def _setup(self) -> None:
        """Device set-up over QMP, between -S and cont."""
        from vmbridge.machine.setup import setup_devices

        setup_devices(self)
        status = self.execute("query-status")
        self.qemu_status, self.qemu_running = status["status"], status["running"]
        self._write_state_file()  # now with the devices, for a restarted vmbridged

    def _explain_failure(self, error: BaseException) -> str:
        """A set-up failure in words, with QEMU's own last complaint when it has one."""
        if isinstance(error, (QMPDisconnectedError, MachineNotConnected)) or \
                (self.process is not None and self.process.wait(0.5)):
            tail = log_tail(os.path.join(self.directory, "qemu.log"))
            if tail:
                return f"QEMU exited during start-up: {tail}"
            if self.process is not None and self.process.exit_info is not None:
                return f"QEMU {self.process.exit_info.describe()} during start-up"
        return str(error) or type(error).__name__

    def _abort_start(self, error: SetupError) -> None:
        log.error("%s: start failed: %s", self.name, error)
        if self.process is not None and not self.process.exited:
            self.process.kill()
        if self.qmp is not None:
            self.qmp.close()
        self._resources.close()
        self._set_state(MachineState.FAILED, error=str(error))
        self.events.close()
        self._remove_runtime_files(everything=True)
        self._gone.set()

    # ------------------------------------------------------- adoption (restart)

    @classmethod
    def adopt(cls, directory: str, *, command_timeout: float = 30.0, on_change=None,
              console_log_size: int | None = None) -> "Machine":
        """Re-attach to a QEMU left running by an earlier vmbridged."""
        with open(os.path.join(directory, STATE_FILE)) as f:
            saved = json.load(f)
        config = MachineConfig.from_dict(saved["config"])
        machine = cls(config, directory, command_timeout=command_timeout, on_change=on_change,
                      console_log_size=console_log_size)
        machine.qemu_version = saved.get("qemuVersion")
        machine.devices.restore(saved.get("devices"))
        machine.process = AdoptedProcess(saved["pid"], saved["startTime"])
        machine._gone.clear()
        machine.state = MachineState.STARTING
        try:
            client = QMPClient.connect_unix(os.path.join(directory, "qmp"), name=config.name, timeout=5)
            machine.qmp = client
            client.on_event(machine._on_qmp_event)
            client.on_disconnect(machine._on_qmp_disconnect)
            client.handshake(timeout=10)
            status = machine.execute("query-status")
        except Exception:
            if machine.qmp is not None:
                machine.qmp.close()
            machine.process.close()
            raise
        machine.qemu_status, machine.qemu_running = status["status"], status["running"]
        machine.process.on_exit(machine._on_process_exit)
        machine._reattach_console()
        machine._set_state(MachineState.RUNNING if status["running"] else MachineState.PAUSED)
        return machine

    def _new_console(self) -> Console:
        if self.console_log_size is None:
            return Console(self.directory, self.name)
        return Console(self.directory, self.name, log_limit=self.console_log_size)

    def _reattach_console(self) -> None:
        """Plumb the serial port into a fresh socketpair (the old one died with the daemon).

        QEMU's serial0 chardev lost its peer when the old vmbridged went away
        (it drops output since); ``chardev-change`` gives it a new socket
        backend on the descriptor passed with ``getfd``. The ring buffer
        starts with the end of the log, so a replay still shows what came
        before the restart.
        """
        if self.config.machine == "none":
            return
        self.console = self._new_console()
        qemus = self.console.open(resume=True)
        self._resources.callback(self._close_console, "the VM exited")
        try:
            self.execute("getfd", {"fdname": "serial0-reattach"}, fds=[qemus.fileno()])
            self.execute("chardev-change", {"id": "serial0", "backend": {
                "type": "socket", "data": {"addr": {"type": "fd", "data": {"str": "serial0-reattach"}},
                                           "server": False}}})
        except MachineError as e:
            log.warning("%s: console not re-attached: %s", self.name, e)
            self.console.close(f"console not re-attached after a vmbridged restart: {e}")
            return
        finally:
            qemus.close()
        self.console.start()

    def _write_state_file(self) -> None:
        state = {"config": self.config.to_dict(), "pid": self.process.pid,
                 "startTime": self.process.start_time, "qemuVersion": self.qemu_version,
                 "devices": self.devices.describe()}
        path = os.path.join(self.directory, STATE_FILE)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)

    # ---------------------------------------------------------- QMP events

    def _on_qmp_event(self, event) -> None:
        """Runs in the QMP pump for every event, in order: keep state, fan out."""
        name, data = event.name, event.data or {}
        if name == "RESUME":
            self.qemu_status, self.qemu_running = "running", True
            self._pending_stop_status = None
            if self.state == MachineState.PAUSED:
                self._set_state(MachineState.RUNNING)
        elif name == "STOP":
            self.qemu_status = self._pending_stop_status or "paused"
            self.qemu_running = False
            self._pending_stop_status = None
            if self.state == MachineState.RUNNING:
                self._set_state(MachineState.PAUSED)
        elif name == "SHUTDOWN":
            self.qemu_status, self.qemu_running = "shutdown", False
            self.shutdown_reason = data.get("reason")
            if self.state in (MachineState.RUNNING, MachineState.PAUSED):
                self._set_state(MachineState.SHUTTING_DOWN)
        elif name == "SUSPEND":
            self.qemu_status, self.qemu_running = "suspended", False
        elif name == "WAKEUP":
            self.qemu_status, self.qemu_running = "running", True
        elif (name, data.get("action")) in _STOP_REASONS:
            self._pending_stop_status = _STOP_REASONS[(name, data.get("action"))]
        elif name == "DEVICE_DELETED":
            self.storage.on_event(event)
        if len(self.events):
            self.events.publish(MachineEvent(event.name, event.data, event.timestamp))

    def _on_qmp_disconnect(self, reason) -> None:
        if self.process is None or self.process.exited or self._detached:
            return
        # QMP gone but QEMU alive: a VM nobody can control. Give a dying QEMU
        # a moment to exit by itself, then end it.
        def reap():
            if not self.process.wait(2.0):
                log.error("%s: QMP connection lost (%s) while QEMU runs; killing it", self.name, reason)
                self.error = f"QMP connection lost: {reason}"
                self.process.kill()
        gevent.spawn(reap)

    def _on_process_exit(self, info: ExitInfo) -> None:
        """QEMU is gone: terminal state, tell subscribers, release everything."""
        self.exit_info = info
        if self.state == MachineState.STARTING:
            return  # start() reports it and cleans up
        reason = self.shutdown_reason or info.describe()
        log.info("%s: QEMU %s%s", self.name, info.describe(),
                 f" (shutdown reason: {self.shutdown_reason})" if self.shutdown_reason else "")
        self.qemu_status, self.qemu_running = "shutdown", False
        final = {"reason": reason, **info.to_dict()}
        if self.error:
            final["error"] = self.error
        self.events.publish(MachineEvent(EXITED_EVENT, final))
        self.events.close()
        if self.qmp is not None:
            self.qmp.close()
        self._resources.close()
        self._remove_runtime_files()
        self._set_state(MachineState.EXITED)
        self._gone.set()

    def _close_console(self, reason: str) -> None:
        if self.console is not None:
            self.console.close(reason)

    def _remove_runtime_files(self, everything: bool = False) -> None:
        names = ("qmp", STATE_FILE)
        if everything:
            names += ("qemu.log", "console.log", "console.log.1", "virtiofsd.log")
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, name))
        if everything:
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)

    def detach(self) -> None:
        """Let go of a running QEMU without stopping it (daemon exiting, VMs kept)."""
        self._detached = True
        if self.qmp is not None:
            self.qmp.close()
        if isinstance(self.process, AdoptedProcess):
            self.process.close()
        self._close_console("vmbridged is stopping; the VM keeps running")


def _open_readonly(path: str, field: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError(f"{path}: {e.strerror}", device=field) from e
