"""The per-VM control socket: systemd's machine interfaces, mapped onto a Machine.

Served exactly as systemd-vmspawn 262 serves them (see
shared/reference/systemd-262-wire.md): the same interface texts, replies and
errors, so systemd's varlinkctl and machinectl drive vmbridge VMs unchanged.

One deliberate addition: every SubscribeEvents stream ends with an
``EXITED`` event (``data``: ``reason``, and ``exitStatus`` or ``signal``)
right before the connection closes, so a subscriber learns why the VM went
away - also when QEMU was killed and could not say SHUTDOWN itself.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging

from vmbridge import __version__
from vmbridge.machine import (Machine, MachineCommandError, MachineError, MachineNotConnected,
                              MachineTimeout)
from vmbridge.varlink import Service, SharedReply, VarlinkError, interface_text

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

    def AddStorage(self, call):
        raise VarlinkError(f"{MACHINE_INSTANCE}.NotSupported")

    def RemoveStorage(self, call):
        raise VarlinkError(f"{MACHINE_INSTANCE}.NotSupported")

    def ReplaceStorage(self, call):
        raise VarlinkError(f"{MACHINE_INSTANCE}.NotSupported")


class VirtualMachineInstance:
    """io.systemd.VirtualMachineInstance: no methods (yet) in systemd either."""


class QemuMachineInstance:
    def __init__(self, machine: Machine):
        self.machine = machine

    def AcquireQMP(self, call):
        raise VarlinkError(f"{MACHINE_INSTANCE}.NotSupported")


def build_service(machine: Machine) -> Service:
    service = Service(vendor=VENDOR, product=PRODUCT, version=__version__, url=URL)
    service.add_interface(interface_text(MACHINE_INSTANCE), MachineInstance(machine))
    service.add_interface(interface_text("io.systemd.VirtualMachineInstance"), VirtualMachineInstance())
    service.add_interface(interface_text("io.systemd.QemuMachineInstance"), QemuMachineInstance(machine))
    return service
