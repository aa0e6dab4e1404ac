"""One VM: configuration, QEMU process, QMP set-up, state and events."""

from vmbridge.machine.config import ConfigError, MachineConfig
from vmbridge.machine.events import EventHub, MachineEvent, Subscription, SubscriberDropped
from vmbridge.machine.machine import (EXITED_EVENT, Machine, MachineCommandError, MachineError,
                                      MachineNotConnected, MachineState, MachineTimeout, SetupError)

__all__ = [
    "ConfigError", "MachineConfig", "EventHub", "MachineEvent", "Subscription", "SubscriberDropped",
    "EXITED_EVENT", "Machine", "MachineCommandError", "MachineError", "MachineNotConnected",
    "MachineState", "MachineTimeout", "SetupError",
]
