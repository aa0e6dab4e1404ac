"""The device plane: parsing device specs (drives, network, shares, vsock).

The specs use the CLI's own syntax (``--drive PATH,format=qcow2``); they are
parsed and validated here, before anything starts.
"""

from __future__ import annotations

import dataclasses

from vmbridge.machine.config import ConfigError


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    drives: tuple = ()
    networks: tuple = ()
    shares: tuple = ()
    vsock: str = "off"


def parse_devices(config) -> DevicePlan:
    for field in ("drive", "network", "bind"):
        if getattr(config, field):
            raise ConfigError(field, "devices are not supported by this vmbridged yet")
    if config.vsock != "off":
        raise ConfigError("vsock", "vsock is not supported by this vmbridged yet")
    return DevicePlan()
