"""The per-VM control socket: systemd's machine interfaces, mapped onto a Machine.

Served exactly as systemd-vmspawn 262 serves them (see
shared/reference/systemd-262-wire.md): the same interface texts, replies and
errors, so systemd's varlinkctl and machinectl drive vmbridge VMs unchanged.

One deliberate addition: every SubscribeEvents stream ends with an
``EXITED`` event (``data``: ``reason``, and ``exitStatus`` or ``signal``)
right before the connection closes, so a subscriber learns why the VM went
away - also when QEMU was killed and could not say SHUTDOWN itself.

One deliberate difference: io.systemd.QemuMachineInstance.AcquireQMP (not in
systemd 262; one client at a time in systemd's development branch) gives
every caller a QMP session of its own, shared with vmbridged's own use of
QMP (vmbridge/machine/qmp_sessions.py, docs/acquireqmp.md).

vmbridge's own interface on the same socket: ``io.vmbridge.Console`` (the
serial console; see its IDL and docs/console.md).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os

import gevent

from vmbridge import __version__
from vmbridge.machine import (Machine, MachineCommandError, MachineError, MachineNotConnected,
                              MachineTimeout)
from vmbridge.machine.console import ConsoleClosed, ConsoleError, WriterPresent
from vmbridge.machine.qmp_sessions import QMPSessions
from vmbridge.qmp import State as QMPState
from vmbridge.varlink import Service, SharedReply, Upgrade, VarlinkError, interface_text

log = logging.getLogger("vmbridge.control")

MACHINE_INSTANCE = "io.systemd.MachineInstance"
CONSOLE = "io.vmbridge.Console"
CONSOLE_CLOSE_GRACE = 2.0   # how long a closed viewer's last bytes may take to leave
PRODUCT = "vmbridge (vmbridged)"
VENDOR = "The vmbridge Project"
URL = "https://github.com/vmbridge/vmbridge"


def system_error(errno: int) -> VarlinkError:
    """io.systemd.System, the way sd-varlink reports a failing errno."""
    return VarlinkError("io.systemd.System", {"origin": "linux", "errnoName": errno_mod.errorcode[errno],
                                              "errno": errno})


@contextlib.contextmanager
def machine_errors(machine: Machine):
    """Translate a Machine's failures into the varlink errors systemd's clients know."""
    try:
        yield
    except MachineNotConnected as e:
        log.info("%s: %s", machine.name, e)
        raise VarlinkError(f"{MACHINE_INSTANCE}.NotConnected") from e
    except MachineTimeout as e:
        log.warning("%s", e)
        raise system_error(errno_mod.ETIMEDOUT) from e
    except MachineCommandError as e:
        log.warning("%s: %s", machine.name, e)
        raise system_error(errno_mod.EIO) from e
    except MachineError as e:
        log.warning("%s: %s", machine.name, e)
        raise system_error(errno_mod.EIO) from e


@contextlib.contextmanager
def storage_errors(machine: Machine):
    """StorageErrors as io.systemd.MachineInstance errors (or io.systemd.System errnos);
    the rest as machine_errors does."""
    from vmbridge.machine.storage import StorageError

    with machine_errors(machine):
        try:
            yield
        except StorageError as e:
            log.warning("%s: %s", machine.name, e)
            if e.varlink_error is not None:
                raise VarlinkError(f"{MACHINE_INSTANCE}.{e.varlink_error}") from e
            raise system_error(e.errno or errno_mod.EIO) from e


class MachineInstance:
    """io.systemd.MachineInstance for one VM."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self._last_event_reply = (None, None)  # (MachineEvent, its SharedReply)

    def _run(self, operation) -> dict:
        with machine_errors(self.machine):
            operation()
        return {}

    def Terminate(self, call):
        return self._run(self.machine.terminate)

    def PowerOff(self, call):
        return self._run(self.machine.poweroff)

    def Reboot(self, call):
        return self._run(self.machine.reboot)

    def Pause(self, call):
        return self._run(self.machine.pause)

    def Resume(self, call):
        return self._run(self.machine.resume)

    def Describe(self, call):
        return self.machine.describe()

    def SubscribeEvents(self, call):
        # Subscribe now, before READY goes out, so no event falls in between.
        subscription = self.machine.events.subscribe(call.parameters.get("filter"),
                                                     on_drop=call.connection.close)
        return self._stream(subscription)

    def _stream(self, subscription):
        with subscription:
            yield {"event": "READY"}
            for event in subscription:
                yield self._event_reply(event)
        # The VM is gone: returning nothing closes the connection, as systemd does.

    def _event_reply(self, event) -> SharedReply:
        """The reply for `event`, shared by every subscriber of this VM.

        All subscribers get the same MachineEvent object from the hub, so
        one slot suffices: the reply is encoded once per event, not once per
        subscriber (1000 subscribers: 1000 encodings saved per event).
        """
        last_event, reply = self._last_event_reply
        if last_event is not event:
            parameters = {"event": event.name}
            if event.data is not None:
                parameters["data"] = event.data
            reply = SharedReply(parameters)
            self._last_event_reply = (event, reply)
        return reply

    # Storage hotplug (docs/storage.md). The fd comes with the call (SCM_RIGHTS);
    # the drive gets vmbridged's own duplicate, so the call's copy is closed here.

    def AddStorage(self, call):
        fd = call.take_fd(call.parameters["fileDescriptorIndex"], "fileDescriptorIndex")
        try:
            with storage_errors(self.machine):
                self.machine.storage.add_storage(call.parameters["name"], call.parameters.get("config"), fd)
        finally:
            os.close(fd)
        return {}

    def RemoveStorage(self, call):
        with storage_errors(self.machine):
            self.machine.storage.remove_storage(call.parameters["name"])
        return {}

    def ReplaceStorage(self, call):
        fd = call.take_fd(call.parameters["fileDescriptorIndex"], "fileDescriptorIndex")
        try:
            with storage_errors(self.machine):
                self.machine.storage.replace_storage(call.parameters["name"], fd)
        finally:
            os.close(fd)
        return {}


class VirtualMachineInstance:
    """io.systemd.VirtualMachineInstance: no methods (yet) in systemd either."""


class QemuMachineInstance:
    """io.systemd.QemuMachineInstance: AcquireQMP, for any number of clients.

    systemd lets one client at a time hold the QMP connection
    (``AlreadyAcquired``); here each caller gets a QMP session of its own,
    multiplexed with the others and with vmbridged's own commands over the
    VM's one QMP connection (vmbridge/machine/qmp_sessions.py,
    docs/acquireqmp.md). The ``upgrade`` flag is checked by the varlink
    layer (ExpectedUpgrade), as sd-varlink does.
    """

    def __init__(self, machine: Machine):
        self.machine = machine
        self._sessions: QMPSessions | None = None

    def _hub(self) -> QMPSessions:
        client = self.machine.qmp
        if client is None or client.state != QMPState.RUNNING:
            log.info("%s: AcquireQMP: not connected to QEMU", self.machine.name)
            raise VarlinkError(f"{MACHINE_INSTANCE}.NotConnected")
        if self._sessions is None or self._sessions.client is not client:
            self._sessions = QMPSessions(client, owns=lambda kind, value: self.machine.devices.owns(kind, value),
                                         name=self.machine.name)
        return self._sessions

    def AcquireQMP(self, call):
        hub = self._hub()
        if hub.full:
            log.warning("%s: AcquireQMP refused: %d QMP sessions open", self.machine.name, len(hub))
            raise system_error(errno_mod.EMFILE)
        peer = f"pid={call.peer_pid} uid={call.peer_uid}"
        return Upgrade({}, lambda sock, pending: hub.serve(sock, pending, peer=peer))


class Console:
    """io.vmbridge.Console: the VM's serial console on an upgraded connection."""

    def __init__(self, machine: Machine):
        self.machine = machine

    def _console(self):
        console = self.machine.console
        if console is None:
            raise VarlinkError(f"{CONSOLE}.NoConsole")
        return console

    def Attach(self, call):
        replay = call.parameters.get("replayLines")
        if replay is not None and replay < 0:
            raise VarlinkError.invalid_parameter("replayLines")
        console = self._console()
        read_only = bool(call.parameters.get("readOnly"))
        previous = console.writer
        try:
            viewer = console.attach(read_only=read_only, force=bool(call.parameters.get("force")),
                                    replay_lines=replay, pid=call.peer_pid,
                                    owner=f"pid={call.peer_pid} uid={call.peer_uid}")
        except WriterPresent as e:
            raise VarlinkError(f"{CONSOLE}.WriterPresent",
                               {"pid": e.writer.pid} if e.writer.pid is not None else {}) from e
        except ConsoleClosed as e:
            raise VarlinkError(f"{CONSOLE}.NoConsole") from e
        # Should the reply never go out (the client hung up), takeover is not
        # called: the connection's greenlet ending detaches the viewer then.
        current = gevent.getcurrent()
        if isinstance(current, gevent.Greenlet):
            current.link(lambda _: console.detach(viewer))
        reply = {"writable": not read_only}
        if not read_only and previous is not None and previous.pid is not None:
            reply["previousWriterPid"] = previous.pid
        return Upgrade(reply, lambda sock, pending: serve_viewer(console, viewer, sock, pending))

    def Tail(self, call):
        lines = call.parameters.get("lines")
        lines = 10 if lines is None else lines
        if lines < 0:
            raise VarlinkError.invalid_parameter("lines")
        console = self._console()
        return {"text": console.tail(lines).decode("utf-8", "replace")}


def serve_viewer(console, viewer, sock, pending: bytes) -> None:
    """One attached client, after the upgrade (runs in its connection's greenlet).

    This greenlet drains the viewer's buffer into the socket; a second one
    reads the socket: a writer's bytes go to the guest, a read-only viewer's
    are dropped, and end-of-file detaches. A viewer closed by someone else
    (takeover, the VM exiting) gets its last bytes out, or the socket is
    closed under it after CONSOLE_CLOSE_GRACE seconds if it does not read.
    """
    def read_input():
        try:
            if pending and not viewer.read_only:
                console.send(pending, viewer)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                if not viewer.read_only and not console.send(data, viewer):
                    break       # no longer the writer: it is being closed
        except (OSError, ConsoleError) as e:    # the client's socket, or the console, went away
            log.debug("%s: console client: %s", console.name, e)
        viewer.close(discard=True)  # the client is gone: nothing more to send it

    viewer.on_close = lambda: gevent.spawn_later(CONSOLE_CLOSE_GRACE, sock.close)
    if viewer.closed:           # closed before we got here
        viewer.on_close()
    reader = gevent.spawn(read_input)
    try:
        while True:
            data = viewer.get()
            if not data:
                break
            sock.sendall(data)
    except OSError as e:
        log.debug("%s: console client: %s", console.name, e)
    finally:
        reader.kill(block=False)
        console.detach(viewer)
        sock.close()


def build_service(machine: Machine) -> Service:
    service = Service(vendor=VENDOR, product=PRODUCT, version=__version__, url=URL)
    service.add_interface(interface_text(MACHINE_INSTANCE), MachineInstance(machine))
    service.add_interface(interface_text("io.systemd.VirtualMachineInstance"), VirtualMachineInstance())
    service.add_interface(interface_text("io.systemd.QemuMachineInstance"), QemuMachineInstance(machine))
    service.add_interface(interface_text(CONSOLE), Console(machine))
    return service
