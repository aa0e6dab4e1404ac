"""The device plane's specs: drives, network interfaces, shares, vsock.

The specs use the CLI's own syntax and are parsed into frozen values here,
before anything starts (``MachineConfig.from_dict`` calls
:func:`parse_devices`). What is checked here is everything that can be
checked without touching the host: syntax, allowed values, characters. What
needs the host (does the image exist, what is in its header, is there a
``/dev/vhost-vsock``) is checked when the VM starts, before QEMU is launched
(vmbridge.machine.setup), so a definition whose image is missing for a while
stays listed and its start fails with an error naming the device.

Syntax::

    drive   = PATH[,format=raw|qcow2][,readonly=on|off][,if=virtio|nvme|scsi]
                  [,serial=SERIAL][,ephemeral=on|off]
    network = user | tap:IFNAME
    bind    = SOURCE:TAG
    vsock   = off | on | auto

A drive's PATH runs up to the first comma: commas separate options, and a
path cannot contain one (there is no escape; rename or link the file). A
bind's SOURCE runs up to the last colon (a tag cannot contain one), and may
not contain commas or backslashes either: virtiofsd parses its ``-o
source=`` value as a comma-separated FUSE option list.

Nothing parsed here reaches QEMU as a path: PATH and SOURCE are opened by
vmbridged (or given to virtiofsd, our helper). Serials, tags and interface
names do reach QMP strings and are restricted to safe characters.

The same option syntax, less the path, is the ``config`` string of
io.systemd.MachineInstance.AddStorage (see docs/storage.md).
"""

from __future__ import annotations

import dataclasses
import os
import re

from vmbridge.machine.config import ConfigError, check_bool

DRIVE_FORMATS = ("raw", "qcow2")
DRIVE_INTERFACES = ("virtio", "nvme", "scsi")
# Recognised but not supported: asked for, they get a "not supported" answer
# (ConfigNotSupported over varlink) rather than "malformed" (BadConfig).
KNOWN_UNSUPPORTED_FORMATS = ("vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "luks", "parallels",
                             "dmg", "cloop", "bochs", "vvfat", "host_device", "file")
KNOWN_UNSUPPORTED_INTERFACES = ("ide", "sata", "ahci", "floppy", "usb", "sd", "pflash", "mtd",
                                "xen", "virtio-scsi", "none")
KNOWN_UNSUPPORTED_DRIVE_OPTIONS = ("cache", "aio", "discard", "detect-zeroes", "media", "snapshot",
                                   "werror", "rerror", "copy-on-read", "bootindex", "file",
                                   "backing", "throttling", "iothread", "index", "bus", "unit")
SERIAL_RE = re.compile(r"^[A-Za-z0-9._-]{1,20}$")      # virtio-blk and NVMe carry 20 bytes
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,35}$")  # virtiofs tags: 36 bytes
IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")  # IFNAMSIZ - 1
MAX_DRIVES = 64
MAX_NETWORKS = 16
MAX_SHARES = 16
#: Root ports go at pcie.0 slots 2..0x1e, eight functions each (slot 0 is the
#: host bridge, 1 is left for a display, 0x1f holds the ICH9 LPC/SATA/SMBus).
FIRST_PORT_SLOT = 2
MAX_ROOT_PORTS = (0x1e - FIRST_PORT_SLOT + 1) * 8


class DriveOptionError(ConfigError):
    """A drive option was refused; ``unsupported`` if it was understood but is not
    supported here (a known QEMU format, interface or option), else it was malformed."""

    def __init__(self, field: str, message: str, *, unsupported: bool = False):
        super().__init__(field, message)
        self.unsupported = unsupported


@dataclasses.dataclass(frozen=True)
class DriveOptions:
    """A drive's options, everything but its path (also AddStorage's ``config``)."""

    format: str | None = None  # None: read from the image's header (never probed by QEMU)
    readonly: bool | None = None  # None: not said (read-write for --drive; the fd decides for AddStorage)
    interface: str = "virtio"
    serial: str | None = None
    ephemeral: bool | None = None  # None: as the VM's `ephemeral`

    def effective_ephemeral(self, vm_ephemeral: bool) -> bool:
        """Whether writes go to an overlay: asked for, or VM-wide on a writable drive."""
        if self.ephemeral is not None:
            return self.ephemeral
        return vm_ephemeral and not self.readonly


@dataclasses.dataclass(frozen=True)
class DriveSpec:
    path: str
    options: DriveOptions = DriveOptions()

    # Shorthands
    @property
    def format(self):
        return self.options.format

    @property
    def readonly(self) -> bool:
        return bool(self.options.readonly)

    @property
    def interface(self) -> str:
        return self.options.interface

    @property
    def serial(self):
        return self.options.serial


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    kind: str  # "user" | "tap"
    ifname: str | None = None


@dataclasses.dataclass(frozen=True)
class ShareSpec:
    source: str
    tag: str


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    drives: tuple = ()
    networks: tuple = ()
    shares: tuple = ()
    vsock: str = "off"
    ephemeral: bool = False
    bus: str = "pcie"  # "pcie": root ports on pcie.0 (q35, virt); "pci": flat (pc); "none"
    free_ports: int = 0

    @property
    def empty(self) -> bool:
        return not (self.drives or self.networks or self.shares) and self.vsock == "off"


def machine_bus(machine: str) -> str:
    """How devices attach on a machine type: "pcie" (q35, arm virt: behind root
    ports we pre-allocate), "pci" (i440fx "pc": straight on pci.0), "none"."""
    if machine == "none":
        return "none"
    if machine == "q35" or machine.startswith("pc-q35-") or machine == "virt" or machine.startswith("virt-"):
        return "pcie"
    return "pci"


def _split_options(field: str, text: str, *, first_is_path: bool):
    """("PATH", {key: value}) of a comma-separated spec; keys lower-case, once each."""
    parts = text.split(",")
    head = parts.pop(0) if first_is_path else None
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            hint = (" (a path cannot contain ',': it separates options)" if first_is_path
                    else "")
            raise DriveOptionError(field, f"expected KEY=VALUE, got {part!r}{hint}")
        if not key:
            raise DriveOptionError(field, f"empty option name in {part!r}")
        if key in options:
            raise DriveOptionError(field, f"option {key!r} given twice")
        options[key] = value
    return head, options


def parse_drive_options(options: dict, field: str = "drive") -> DriveOptions:
    """DriveOptions from {key: value}; DriveOptionError (with ``unsupported``) otherwise."""
    out = {}
    for key, value in options.items():
        if key == "format":
            value = value.strip().lower()
            if value in KNOWN_UNSUPPORTED_FORMATS:
                raise DriveOptionError(field, f"format={value} is not supported (raw or qcow2)",
                                       unsupported=True)
            if value not in DRIVE_FORMATS:
                raise DriveOptionError(field, f"format={value!r}: expected raw or qcow2")
            out["format"] = value
        elif key in ("readonly", "read-only", "ro"):
            try:
                out["readonly"] = check_bool(field, value)
            except ConfigError as e:
                raise DriveOptionError(field, f"readonly: {e.message}") from None
        elif key in ("if", "interface"):
            value = value.strip().lower()
            if value in KNOWN_UNSUPPORTED_INTERFACES:
                raise DriveOptionError(field, f"if={value} is not supported (virtio, nvme or scsi)",
                                       unsupported=True)
            if value not in DRIVE_INTERFACES:
                raise DriveOptionError(field, f"if={value!r}: expected virtio, nvme or scsi")
            out["interface"] = value
        elif key == "serial":
            if not SERIAL_RE.match(value):
                raise DriveOptionError(field, f"serial={value!r}: 1-20 letters, digits, '.', '_', '-'")
            out["serial"] = value
        elif key == "ephemeral":
            try:
                out["ephemeral"] = check_bool(field, value)
            except ConfigError as e:
                raise DriveOptionError(field, f"ephemeral: {e.message}") from None
        elif key in KNOWN_UNSUPPORTED_DRIVE_OPTIONS:
            raise DriveOptionError(field, f"option {key!r} is not supported", unsupported=True)
        else:
            raise DriveOptionError(field, f"unknown option {key!r}")
    result = DriveOptions(**out)
    if result.ephemeral and result.readonly:
        raise DriveOptionError(field, "ephemeral=on and readonly=on contradict each other "
                                      "(a read-only drive has no writes to send to an overlay)")
    return result


def parse_drive(text: str) -> DriveSpec:
    path, options = _split_options("drive", text, first_is_path=True)
    if not path:
        raise ConfigError("drive", f"{text!r}: the spec starts with the image's path")
    if "\0" in path or not os.path.isabs(path):
        raise ConfigError("drive", f"{path!r} is not an absolute path")
    return DriveSpec(os.path.normpath(path), parse_drive_options(options))


def parse_storage_config(config: str | None) -> DriveOptions:
    """AddStorage's ``config``: the drive options without a path ("" or None: defaults)."""
    if config is None or not config.strip():
        return DriveOptions()
    if any(c in config for c in "\0\n\r") or len(config) > 1024:
        raise DriveOptionError("config", "must be one line of at most 1024 characters")
    _, options = _split_options("config", config.strip(), first_is_path=False)
    return parse_drive_options(options, field="config")


def parse_network(text: str) -> NetworkSpec:
    text = text.strip()
    if text == "user":
        return NetworkSpec("user")
    kind, sep, ifname = text.partition(":")
    if kind == "tap" and sep:
        if not IFNAME_RE.match(ifname) or ifname in (".", ".."):
            raise ConfigError("network", f"tap:{ifname!r}: an interface name is 1-15 letters, "
                                         "digits, '_', '.', '-'")
        return NetworkSpec("tap", ifname)
    raise ConfigError("network", f"{text!r}: expected user or tap:IFNAME")


def parse_share(text: str) -> ShareSpec:
    source, sep, tag = text.rpartition(":")
    if not sep or not source:
        raise ConfigError("bind", f"{text!r}: expected SOURCE:TAG")
    if not TAG_RE.match(tag):
        raise ConfigError("bind", f"tag {tag!r}: 1-36 letters, digits, '.', '_', '-', "
                                  "starting with a letter or digit")
    if not os.path.isabs(source):
        raise ConfigError("bind", f"{source!r} is not an absolute path")
    if any(c in source for c in ",\\\0"):
        raise ConfigError("bind", f"{source!r}: a shared directory's path cannot contain ',' or '\\' "
                                  "(virtiofsd reads it from a comma-separated option list)")
    return ShareSpec(os.path.normpath(source), tag)


def parse_devices(config) -> DevicePlan:
    """Validate the device fields of a MachineConfig; ConfigError names the field."""
    drives = tuple(parse_drive(s) for s in config.drive)
    networks = tuple(parse_network(s) for s in config.network)
    shares = tuple(parse_share(s) for s in config.bind)
    if len(drives) > MAX_DRIVES:
        raise ConfigError("drive", f"at most {MAX_DRIVES} drives")
    if len(networks) > MAX_NETWORKS:
        raise ConfigError("network", f"at most {MAX_NETWORKS} network interfaces")
    if len(shares) > MAX_SHARES:
        raise ConfigError("bind", f"at most {MAX_SHARES} shares")
    tags = [s.tag for s in shares]
    for tag in tags:
        if tags.count(tag) > 1:
            raise ConfigError("bind", f"tag {tag!r} is used twice")
    serials = [d.serial for d in drives if d.serial]
    for serial in serials:
        if serials.count(serial) > 1:
            raise ConfigError("drive", f"serial {serial!r} is used twice")
    ifnames = [n.ifname for n in networks if n.kind == "tap"]
    for ifname in ifnames:
        if ifnames.count(ifname) > 1:
            raise ConfigError("network", f"tap:{ifname} is used twice")
    bus = machine_bus(config.machine)
    if bus == "none":
        for field, used in (("drive", drives), ("network", networks), ("bind", shares),
                            ("vsock", config.vsock == "on")):
            if used:
                raise ConfigError(field, "machine type 'none' has no bus to attach devices to")
    plan = DevicePlan(drives=drives, networks=networks, shares=shares, vsock=config.vsock,
                      ephemeral=config.ephemeral, bus=bus,
                      free_ports=config.pcie_ports if bus == "pcie" else 0)
    if bus == "pcie" and plan.free_ports + boot_slot_count(plan) > MAX_ROOT_PORTS:
        raise ConfigError("pcie_ports", f"more than {MAX_ROOT_PORTS} PCIe root ports needed")
    return plan


def boot_slot_count(plan: DevicePlan, *, vsock: bool | None = None) -> int:
    """PCI slots the boot devices take: one per drive (SCSI drives share one
    controller), NIC, share and the vsock device."""
    drives = sum(1 for d in plan.drives if d.interface != "scsi")
    if any(d.interface == "scsi" for d in plan.drives):
        drives += 1
    if vsock is None:
        vsock = plan.vsock != "off"
    return drives + len(plan.networks) + len(plan.shares) + int(vsock)


def stable_mac(vm_name: str, index: int) -> str:
    """A MAC address that stays the same for a VM's Nth NIC across starts.

    46 bits of SHA-256 over the VM name and the NIC's index; the first octet
    has the locally-administered bit set and the group bit clear (a unicast
    address nobody's OUI owns). Two VMs on one L2 segment collide with
    probability ~n²/2⁴⁷.
    """
    import hashlib

    digest = hashlib.sha256(f"vmbridge-mac\0{vm_name}\0{index}".encode()).digest()
    first = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))
