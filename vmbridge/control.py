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
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os

from vmbridge import __version__
from vmbridge.machine import (Machine, MachineCommandError, MachineError, MachineNotConnected,
                              MachineTimeout)
from vmbridge.machine.qmp_sessions import QMPSessions
from vmbridge.qmp import State as QMPState
from vmbridge.varlink import Service, Upgrade, VarlinkError, interface_text

log = logging.getLogger("vmbridge.control")

MACHINE_INSTANCE = "io.systemd.MachineInstance"
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
    from vmbridge.machine.setup import StorageError

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

    @staticmethod
    def _stream(subscription):
        with subscription:
            yield {"event": "READY"}
            for event in subscription:
                reply = {"event": event.name}
                if event.data is not None:
                    reply["data"] = event.data
                yield reply
        # The VM is gone: returning nothing closes the connection, as systemd does.

    # Storage hotplug (docs/storage.md). The fd comes with the call (SCM_RIGHTS);
    # the drive gets vmbridged's own duplicate, so the call's copy is closed here.

    def AddStorage(self, call):
        fd = call.take_fd(call.parameters["fileDescriptorIndex"], "fileDescriptorIndex")
        try:
            with storage_errors(self.machine):
                self.machine.devices.add_storage(call.parameters["name"], call.parameters.get("config"), fd)
        finally:
            os.close(fd)
        return {}

    def RemoveStorage(self, call):
        with storage_errors(self.machine):
            self.machine.devices.remove_storage(call.parameters["name"])
        return {}

    def ReplaceStorage(self, call):
        fd = call.take_fd(call.parameters["fileDescriptorIndex"], "fileDescriptorIndex")
        try:
            with storage_errors(self.machine):
                self.machine.devices.replace_storage(call.parameters["name"], fd)
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


def build_service(machine: Machine) -> Service:
    service = Service(vendor=VENDOR, product=PRODUCT, version=__version__, url=URL)
    service.add_interface(interface_text(MACHINE_INSTANCE), MachineInstance(machine))
    service.add_interface(interface_text("io.systemd.VirtualMachineInstance"), VirtualMachineInstance())
    service.add_interface(interface_text("io.systemd.QemuMachineInstance"), QemuMachineInstance(machine))
    return service
