"""A VM's configuration: one validated, immutable value.

Everything a client sends (over the manager socket or in a definition file)
passes through :meth:`MachineConfig.from_dict` before anything is started.
A bad value raises :class:`ConfigError` naming the field; nothing of the
config ever reaches QEMU's command line or a QMP string unvalidated.

Field names are the same everywhere: the manager's ``Create`` parameters,
the definition files (see :mod:`vmbridge.machine.definitions`) and vmctl's
options (``--memory`` ↔ ``memory``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MACHINE_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SIZE_RE = re.compile(r"^([0-9]+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
DEFAULT_QEMU = "qemu-system-x86_64"
MAX_CPUS = 512
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_APPEND = 4096
FIRMWARES = ("bios", "uefi")
ACCELS = ("auto", "kvm", "tcg")


class ConfigError(ValueError):
    """A configuration value was refused. ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_size_mib(value, field="memory") -> int:
    """Parse a memory size ("512M", "2G", "1GiB", 512) into MiB; bare numbers are MiB."""
    if isinstance(value, bool):
        raise ConfigError(field, f"expected a size such as 512M or 2G, got {value!r}")
    if isinstance(value, int):
        mib = value
    elif isinstance(value, str):
        m = SIZE_RE.match(value.strip())
        if not m:
            raise ConfigError(field, f"expected a size such as 512M or 2G, got {value!r}")
        number, unit = int(m.group(1)), m.group(2).upper()
        scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
        mib = number * scale
        if mib != int(mib):
            raise ConfigError(field, f"{value!r} is not a whole number of MiB")
        mib = int(mib)
    else:
        raise ConfigError(field, f"expected a size such as 512M or 2G, got {value!r}")
    if not 1 <= mib <= MAX_MEMORY_MIB:
        raise ConfigError(field, f"{value!r} is out of range (1M..{MAX_MEMORY_MIB // 1024 // 1024}T)")
    return mib


def check_text(field: str, value, *, max_len=4096, allow_empty=False) -> str:
    """A string that may travel as one argv element or a JSON string: no NUL, no newline."""
    if not isinstance(value, str):
        raise ConfigError(field, f"expected a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ConfigError(field, "must not be empty")
    if len(value) > max_len:
        raise ConfigError(field, f"longer than {max_len} characters")
    if any(c in value for c in "\0\n\r"):
        raise ConfigError(field, "must not contain NUL or line breaks")
    return value


def check_host_path(field: str, value, *, must_exist=True, kind="file") -> str:
    """An absolute host path. vmbridged opens it itself; QEMU only ever gets a descriptor."""
    value = check_text(field, value)
    if not os.path.isabs(value):
        raise ConfigError(field, f"{value!r} is not an absolute path")
    value = os.path.normpath(value)
    if must_exist:
        if kind == "file" and not os.path.isfile(value):
            raise ConfigError(field, f"{value}: no such file")
        if kind == "dir" and not os.path.isdir(value):
            raise ConfigError(field, f"{value}: no such directory")
    return value


def check_int(field: str, value, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(field, f"{value} is out of range ({lo}..{hi})")
    return value


def check_bool(field: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "true", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("no", "false", "off", "0"):
        return False
    raise ConfigError(field, f"expected yes or no, got {value!r}")


def check_choice(field: str, value, choices) -> str:
    if value not in choices:
        raise ConfigError(field, f"{value!r} is not one of {', '.join(choices)}")
    return value


def check_name(value, field="name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(
            field,
            f"{value!r} is not a valid VM name (1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit)",
        )
    return value


def resolve_qemu(value) -> str:
    """The QEMU binary: an absolute path, or a command name looked up in $PATH now."""
    value = check_text("qemu", value)
    if os.path.isabs(value):
        path = os.path.normpath(value)
    elif "/" in value or value.startswith("-"):
        raise ConfigError("qemu", f"{value!r} must be an absolute path or a command name")
    else:
        path = shutil.which(value)
        if path is None:
            raise ConfigError("qemu", f"{value!r} not found in $PATH")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ConfigError("qemu", f"{path} is not an executable file")
    return path


@dataclasses.dataclass(frozen=True)
class MachineConfig:
    name: str
    qemu: str = DEFAULT_QEMU
    machine: str = "q35"
    accel: str = "auto"
    cpus: int = 1
    memory: int = 512  # MiB
    firmware: str = "bios"
    linux: str | None = None
    initrd: str | None = None
    append: str | None = None
    autostart: bool = False
    # The device plane: lists of spec strings in the CLI's own syntax
    # (``--drive PATH,format=qcow2``), parsed by vmbridge.machine.devices.
    drive: tuple[str, ...] = ()
    network: tuple[str, ...] = ()
    bind: tuple[str, ...] = ()
    vsock: str = "off"
    ephemeral: bool = False
    pcie_ports: int = 4

    @classmethod
    def from_dict(cls, data: dict) -> "MachineConfig":
        """Validate a dict of field → value (unknown fields are refused)."""
        if not isinstance(data, dict):
            raise ConfigError("config", "expected an object")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(str(key), "unknown field")
        values = {k: v for k, v in data.items() if v is not None}
        if "name" not in values:
            raise ConfigError("name", "is required")
        out = {"name": check_name(values["name"])}
        out["qemu"] = resolve_qemu(values.get("qemu", DEFAULT_QEMU))
        if "machine" in values:
            machine = check_text("machine", values["machine"], max_len=64)
            if not MACHINE_TYPE_RE.match(machine):
                raise ConfigError("machine", f"{machine!r} is not a machine type name")
            out["machine"] = machine
        if "accel" in values:
            out["accel"] = check_choice("accel", values["accel"], ACCELS)
        if "cpus" in values:
            out["cpus"] = check_int("cpus", values["cpus"], 1, MAX_CPUS)
        if "memory" in values:
            out["memory"] = parse_size_mib(values["memory"])
        if "firmware" in values:
            out["firmware"] = check_choice("firmware", values["firmware"], FIRMWARES)
        for field in ("linux", "initrd"):
            if field in values:
                out[field] = check_host_path(field, values[field])
        if "append" in values:
            out["append"] = check_text("append", values["append"], max_len=MAX_APPEND, allow_empty=True)
        if "initrd" in out and "linux" not in out:
            raise ConfigError("initrd", "needs a kernel (linux)")
        if "append" in out and "linux" not in out:
            raise ConfigError("append", "needs a kernel (linux)")
        for field in ("autostart", "ephemeral"):
            if field in values:
                out[field] = check_bool(field, values[field])
        if "pcie_ports" in values:
            out["pcie_ports"] = check_int("pcie_ports", values["pcie_ports"], 0, 32)
        if "vsock" in values:
            out["vsock"] = check_choice("vsock", values["vsock"], ("off", "on", "auto"))
        for field in ("drive", "network", "bind"):
            if field in values:
                specs = values[field]
                if isinstance(specs, str):
                    specs = [specs]
                if not isinstance(specs, (list, tuple)):
                    raise ConfigError(field, "expected a list of strings")
                out[field] = tuple(check_text(field, s) for s in specs)
        config = cls(**out)
        config.devices()  # device specs are validated up front, before anything starts
        return config

    def to_dict(self) -> dict:
        """Fields that differ from the defaults, JSON-ready (lists, not tuples)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "name" or value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        if "memory" in out:
            out["memory"] = f"{self.memory}M"  # a size string, as the IDL and the CLI spell it
        return out

    def devices(self):
        """The parsed device plane (drives, network, shares, vsock)."""
        from vmbridge.machine.devices import parse_devices

        return parse_devices(self)
