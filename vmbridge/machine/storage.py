"""Storage at run time: the Drive record, hotplug (io.systemd.MachineInstance.
AddStorage/RemoveStorage/ReplaceStorage) and its errors.

Hotplug reuses set-up's drive path (vmbridge.machine.setup) on the client's
fd, on a free root port, rolling back whatever it added if a step fails.
Removal is ``device_del`` and, on the DEVICE_DELETED event (also when the
guest ejects a device by itself), ``blockdev-del`` of the nodes and
``remove-fd`` of the fdsets. Replacing swaps the file under the drive's
format node: ``add-fd`` + ``blockdev-add file`` + ``blockdev-reopen`` (same
format node options, ``file`` = the new node) + ``blockdev-del`` of the old
file node.

The seam: composition. A :class:`StorageHotplug` holds one run's
:class:`~vmbridge.machine.setup.DeviceState` (``machine.storage`` next to
``machine.devices``; Machine makes both afresh per run) and goes through
DeviceState's public methods only: ``attach_drive`` and the rest of the drive
path, ``new_storage_key`` (the persisted counter behind vmb-storN),
``forget_device`` (the ownership record's side of DEVICE_DELETED). The device
record, its ownership and persistence stay DeviceState's alone; what is
hotplug's alone (name and descriptor checks, the unplug wait, the file swap,
the lock that serializes hotplug calls with DEVICE_DELETED's clean-up) lives
here. A mixin would have split one class's ``self`` over two files, each
reaching into the other's private attributes with nothing to show which.

What set-up and hotplug share as data is defined here: :class:`Drive` (the
record of a drive, boot or hot-plugged: the storage name varlink callers
see), :class:`Undo` (the rollback log the drive path writes to) and
:class:`NoFreePort` (raised by set-up's port allocator). setup.py imports
them; this module imports nothing from setup.py at run time, so there is no
import cycle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event
import gevent.lock

from vmbridge.machine import devices as dev
from vmbridge.machine import images
from vmbridge.machine.config import ConfigError
from vmbridge.machine.machine import MachineCommandError, MachineError, MachineNotConnected
from vmbridge.qmp import QMPError

if TYPE_CHECKING:
    from vmbridge.machine.setup import DeviceState

log = logging.getLogger("vmbridge.machine")

REMOVE_TIMEOUT = 20.0    # the guest's part of an unplug (Linux pciehp: well under 1 s)
MAX_STORAGE_NAME = 255


# ------------------------------------------------------------------ errors

class StorageError(MachineError):
    """A storage hotplug call was refused; ``varlink_error`` is the
    io.systemd.MachineInstance error (or None for io.systemd.System ``errno``)."""

    varlink_error: str | None = None
    errno: int | None = None


class NoSuchStorage(StorageError):
    varlink_error = "NoSuchStorage"


class StorageExists(StorageError):
    varlink_error = "StorageExists"


class StorageImmutable(StorageError):
    varlink_error = "StorageImmutable"


class BadConfig(StorageError):
    varlink_error = "BadConfig"


class ConfigNotSupported(StorageError):
    varlink_error = "ConfigNotSupported"


class StorageNotSupported(StorageError):
    """This machine cannot take storage at all (e.g. -machine none: no bus)."""

    varlink_error = "NotSupported"


class StorageUnusable(StorageError):
    """The descriptor's image cannot be used (wrong format, unsupported header...)."""

    errno = errno.EMEDIUMTYPE


class NoFreePort(StorageError):
    errno = errno.ENOSPC


class StorageBusy(StorageError):
    errno = errno.EBUSY


class UnplugTimeout(StorageError):
    errno = errno.ETIMEDOUT


# --------------------------------------------------------------- records

@dataclasses.dataclass
class Drive:
    """A drive vmbridged attached: what QEMU holds for it, by name."""

    name: str                  # storage name: "drive0"... for boot drives, else AddStorage's
    key: str                   # base of its QEMU ids: vmb-drive0, vmb-stor1
    boot: bool                 # attached at start: immutable over varlink
    interface: str
    format: str
    readonly: bool
    ephemeral: bool
    virtual_size: int
    identity: list             # (st_dev, st_ino) of the image file
    device_id: str = ""
    port: str | None = None
    top: str = ""              # the node the device uses
    target: str = ""           # the format node whose file ReplaceStorage swaps
    file_node: str = ""        # target's current file node
    file_fdset: int | None = None
    aio: str = "threads"
    overlay: str | None = None  # "memfd" | "tmpfile" for ephemeral drives
    serial: str | None = None
    nodes: list = dataclasses.field(default_factory=list)   # creation order
    fdsets: list = dataclasses.field(default_factory=list)
    generation: int = 0
    state: str = "attached"    # attached | removing | gone

    def __post_init__(self):
        self.removed = gevent.event.Event()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Drive":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Undo:
    """What to take back, newest first, if a hotplug fails half-way."""

    def __init__(self):
        self.actions = []

    def push(self, function, *args):
        self.actions.append((function, args))

    def rollback(self):
        for function, args in reversed(self.actions):
            try:
                function(*args)
            except (MachineError, QMPError, OSError) as e:
                log.warning("rollback step %s%r failed: %s", getattr(function, "__name__", function), args, e)
        self.actions.clear()


# ----------------------------------------------------------------- hotplug

class StorageHotplug:
    """Storage hotplug for one run of a Machine (``machine.storage``)."""

    def __init__(self, devices: DeviceState):
        self.devices = devices
        self.machine = devices.machine
        self.name = devices.name
        self._lock = gevent.lock.RLock()

    # ------------------------------------------------------------- events

    def on_event(self, event) -> None:
        """From the QMP pump (must not block): a device of ours went away."""
        if event.name != "DEVICE_DELETED":
            return
        device_id = (event.data or {}).get("device")
        if not device_id or not self.devices.forget_device(device_id):
            return
        drive = next((d for d in self.devices.drives.values() if d.device_id == device_id), None)
        if drive is not None and drive.state != "gone":
            if drive.state != "removing":
                log.info("%s: the guest released %s (%s)", self.name, drive.name, device_id)
            drive.state = "gone"
            gevent.spawn(self._release_drive, drive)

    def _release_drive(self, drive: Drive) -> None:
        """After DEVICE_DELETED: delete the nodes, remove the fdsets, forget it."""
        drives = self.devices.drives
        with self._lock:
            try:
                for node in reversed(drive.nodes):
                    try:
                        self.devices.blockdev_del(node)
                    except MachineError as e:
                        log.warning("%s: %s: blockdev-del %s: %s", self.name, drive.name, node, e)
                for fdset in drive.fdsets:
                    try:
                        self.devices.remove_fdset(fdset)
                    except MachineError as e:
                        log.warning("%s: %s: remove-fd %s: %s", self.name, drive.name, fdset, e)
            finally:
                if drives.get(drive.name) is drive:
                    del drives[drive.name]
                drive.removed.set()
                self._saved()
        log.info("%s: storage %s removed", self.name, drive.name)

    # ---------------------------------------------------------- hotplug

    def _check_running(self) -> None:
        if not self.machine.state.active or self.machine.qmp is None:
            raise MachineNotConnected(f"{self.name}: not running")

    def add_storage(self, name: str, config: str | None, fd: int) -> Drive:
        """AddStorage: attach the image on `fd` (the caller keeps and closes `fd`)."""
        if not isinstance(name, str) or not name or len(name) > MAX_STORAGE_NAME \
                or any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise BadConfig(f"storage name {name!r}: 1-{MAX_STORAGE_NAME} printable characters")
        try:
            options = dev.parse_storage_config(config)
        except dev.DriveOptionError as e:
            raise (ConfigNotSupported if e.unsupported else BadConfig)(e.message) from e
        except ConfigError as e:
            raise BadConfig(e.message) from e
        devices, plan = self.devices, self.devices.plan
        with self._lock:
            self._check_running()
            if plan.bus == "none":
                raise StorageNotSupported(f"machine type {self.machine.config.machine!r} has no bus for storage")
            if name in devices.drives:
                raise StorageExists(f"storage {name!r} exists")
            try:
                mode = images.fd_access_mode(fd)
            except OSError as e:
                raise StorageUnusable(f"storage {name!r}: bad descriptor: {e.strerror}") from e
            # Unsaid, the descriptor decides: a read-only fd makes a read-only drive.
            # Ephemeral drives only read their base, whatever the fd allows.
            if options.ephemeral:
                readonly, ephemeral = False, True
            else:
                readonly = options.readonly if options.readonly is not None else mode == os.O_RDONLY
                ephemeral = options.ephemeral is None and plan.ephemeral and not readonly
            if not readonly and not ephemeral and mode != os.O_RDWR:
                raise BadConfig(f"storage {name!r}: writable, but the descriptor is not open "
                                "for reading and writing (say readonly=on or ephemeral=on)")
            own_fd = None
            try:
                own_fd = images.reopen_readonly(fd) if readonly or ephemeral else os.dup(fd)
                images.check_image_fd(own_fd, readonly or ephemeral)
                info = images.inspect_image(own_fd, options.format)
            except images.ImageError as e:
                if own_fd is not None:
                    os.close(own_fd)
                raise StorageUnusable(f"storage {name!r}: {e}") from e
            except OSError as e:
                if own_fd is not None:
                    os.close(own_fd)
                raise StorageUnusable(f"storage {name!r}: {e.strerror}") from e
            drive = Drive(name=name, key=devices.new_storage_key(), boot=False,
                          interface=options.interface, format=info.format, readonly=readonly,
                          ephemeral=ephemeral, virtual_size=info.virtual_size,
                          identity=list(info.identity), serial=options.serial)
            label = f"storage {name}"
            undo = Undo()
            started = time.monotonic()
            try:
                devices.attach_drive(drive, own_fd, label, undo)
            except BaseException:
                undo.rollback()
                raise
            finally:
                os.close(own_fd)
            devices.timings[label] = time.monotonic() - started
            devices.drives[name] = drive
            devices.log_drive(drive, label)
            self._saved()
            return drive

    def remove_storage(self, name: str, timeout: float = REMOVE_TIMEOUT) -> None:
        """RemoveStorage: unplug, wait for the guest to let go, then delete the nodes."""
        with self._lock:
            self._check_running()
            drive = self.devices.drives.get(name)
            if drive is None:
                raise NoSuchStorage(f"no storage {name!r}")
            if drive.boot:
                raise StorageImmutable(f"storage {name!r} was attached at start-up")
            if drive.state == "attached":
                try:
                    self.machine.execute("device_del", {"id": drive.device_id})
                except MachineCommandError as e:
                    raise StorageBusy(f"storage {name!r}: QEMU refused device_del: {e.desc}") from e
                drive.state = "removing"
                self._saved()
                log.info("%s: storage %s: unplug requested", self.name, name)
        if not drive.removed.wait(timeout):
            raise UnplugTimeout(f"storage {name!r}: the guest did not release the disk within "
                                f"{timeout:g}s; the unplug request stays pending")

    def replace_storage(self, name: str, fd: int) -> None:
        """ReplaceStorage: the drive's data now comes from `fd` (same format and size)."""
        with self._lock:
            self._check_running()
            drive = self.devices.drives.get(name)
            if drive is None:
                raise NoSuchStorage(f"no storage {name!r}")
            if drive.boot:
                raise StorageImmutable(f"storage {name!r} was attached at start-up")
            if drive.state != "attached":
                raise StorageBusy(f"storage {name!r} is being removed")
            readonly = drive.readonly or drive.ephemeral
            own_fd = None
            try:
                own_fd = images.reopen_readonly(fd) if readonly else os.dup(fd)
                images.check_image_fd(own_fd, readonly)
                info = images.inspect_image(own_fd, drive.format)
                if info.format != drive.format or info.virtual_size != drive.virtual_size:
                    raise images.ImageError(
                        f"the new image is {info.format} of {info.virtual_size} bytes; the drive is "
                        f"{drive.format} of {drive.virtual_size} bytes")
            except (images.ImageError, OSError) as e:
                if own_fd is not None:
                    os.close(own_fd)
                raise StorageUnusable(f"storage {name!r}: {getattr(e, 'strerror', None) or e}") from e
            try:
                if list(info.identity) == list(drive.identity):
                    # QEMU could not lock the same file twice; there is nothing to swap.
                    log.info("%s: storage %s: the new descriptor is the image already in use",
                             self.name, name)
                    return
                self._swap_file(drive, own_fd, f"storage {name}", info)
            finally:
                os.close(own_fd)
            self._saved()

    def _swap_file(self, drive: Drive, fd: int, label: str, info) -> None:
        devices = self.devices
        undo = Undo()
        drive.generation += 1
        new_file = f"{drive.key}-file{drive.generation}" if not drive.ephemeral \
            else f"{drive.key}-base-file{drive.generation}"
        readonly = drive.readonly or drive.ephemeral
        try:
            fdset = devices.add_fd(label, fd, f"vmbridge:{drive.name}:{drive.generation}", undo)
            devices.add_file_node(label, drive, new_file, fdset, readonly, undo)
            drive.nodes.remove(new_file)  # it takes the old file node's place, below
            # blockdev-reopen resets every option not given: give all we gave blockdev-add.
            options = {"driver": drive.format, "node-name": drive.target, "file": new_file,
                       "read-only": readonly}
            if drive.format == "qcow2":
                options["backing"] = None
            devices.execute_step(label, "blockdev-reopen", {"options": [options]})
        except BaseException:
            with contextlib.suppress(ValueError):
                drive.nodes.remove(new_file)
            undo.rollback()
            raise
        old_file, old_fdset = drive.file_node, drive.file_fdset
        drive.nodes[drive.nodes.index(old_file)] = new_file
        drive.fdsets[drive.fdsets.index(old_fdset)] = fdset
        drive.file_node, drive.file_fdset, drive.identity = new_file, fdset, list(info.identity)
        for step, args in ((devices.blockdev_del, old_file), (devices.remove_fdset, old_fdset)):
            try:
                step(args)
            except MachineError as e:
                log.warning("%s: %s: releasing the old backing: %s", self.name, label, e)
        log.info("%s: %s: backing replaced (%s)", self.name, label, new_file)

    def _saved(self) -> None:
        with contextlib.suppress(OSError):
            self.machine._write_state_file()
