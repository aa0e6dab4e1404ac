"""The device plane at run time: set-up between ``-S`` and ``cont``, storage hotplug,
and the one record of what vmbridged owns inside QEMU.

A VM's devices go in in two phases (DESIGN.md, "A VM's life"):

``prepare()`` - before QEMU starts
    Open every image (read-only where asked, and the base of an ephemeral
    drive), read its header (format, size; refuse what would make QEMU open
    a path), open TAP queues and /dev/vhost-vsock (claiming a guest CID),
    start one virtiofsd per share. Whatever fails here fails before QEMU
    exists. The command line gets only what QMP cannot add later: the PCIe
    root ports (pcie.0 does not take hotplugged devices) and, with shares,
    the shared memfd memory backend.

``setup()`` - over QMP, QEMU paused
    Per drive::

        add-fd {opaque}                      -> fdset N (our fd; closed here at once)
        blockdev-add {driver: file, node-name: D-file, filename: /dev/fdset/N,
                      read-only, aio: io_uring?}
        blockdev-add {driver: qcow2|raw, node-name: D, file: D-file, read-only,
                      backing: null}        (qcow2: never a backing file by name)
        device_add {driver: virtio-blk-pci|nvme, drive: D, bus: vmb-rpK, serial}
                   (scsi: virtio-scsi-pci vmb-scsi0 once, then scsi-hd on vmb-scsi0.0)

    An ephemeral drive: the base as above but read-only (D-base-file,
    D-base), then an anonymous overlay file (memfd or O_TMPFILE, see
    images.overlay_file) added the same way as D-ovl-file, formatted by the
    ``blockdev-create`` job ``vmb-create-D`` (qcow2, the base's virtual size,
    no backing name), set-up resuming on JOB_STATUS_CHANGE ``concluded``
    (listener registered before the command; never polled), ``query-jobs``
    for its error, ``job-dismiss``; then ``blockdev-add {driver: qcow2,
    node-name: D, file: D-ovl-file, backing: D-base}``.

    Network: ``netdev_add user`` or ``getfd`` + ``netdev_add tap fd=NAME``,
    then ``device_add virtio-net-pci`` (stable MAC, no option ROM).
    Share: ``getfd`` (our end of virtiofsd's socket) + ``chardev-add socket
    addr=fd:NAME`` + ``device_add vhost-user-fs-pci``. vsock: ``getfd`` +
    ``device_add vhost-vsock-pci vhostfd=NAME guest-cid=N``.

Any failure raises SetupError naming the device; Machine.start then kills
QEMU and closes ``Machine._resources``, which closes every fd still held
here and stops the virtiofsds.

Storage hotplug (io.systemd.MachineInstance.AddStorage/RemoveStorage/
ReplaceStorage) reuses the drive path on the client's fd, on a free root
port, rolling back whatever it added if a step fails. Removal is
``device_del`` and, on the DEVICE_DELETED event (also when the guest ejects
a device by itself), ``blockdev-del`` of the nodes and ``remove-fd`` of the
fdsets. Replacing swaps the file under the drive's format node:
``add-fd`` + ``blockdev-add file`` + ``blockdev-reopen`` (same format node
options, ``file`` = the new node) + ``blockdev-del`` of the old file node.

Ownership: :meth:`DeviceState.owned_ids` lists every id vmbridged created in
QEMU (device ids, block node names, fdset ids, fd names, netdevs, chardevs,
objects, jobs); :meth:`DeviceState.owns` answers one. Everything we create is
named ``vmb-...`` too, so a raw QMP session can be refused what is ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import time

import gevent
import gevent.event
import gevent.lock

from vmbridge.machine import devices as dev
from vmbridge.machine import hostdev, images
from vmbridge.machine.config import ConfigError
from vmbridge.machine.qemu import MEMORY_BACKEND_ID
from vmbridge.machine.machine import (MachineCommandError, MachineError, MachineNotConnected,
                                      MachineTimeout, SetupError)
from vmbridge.qmp import QMPDisconnectedError, QMPError, QMPTimeoutError

log = logging.getLogger("vmbridge.machine")

PREFIX = "vmb-"
SCSI_CONTROLLER_ID = "vmb-scsi0"
JOB_TIMEOUT = 30.0       # formatting an overlay takes milliseconds
REMOVE_TIMEOUT = 20.0    # the guest's part of an unplug (Linux pciehp: well under 1 s)
MAX_STORAGE_NAME = 255
#: What machine.py puts on every command line, listed so raw QMP cannot touch it.
COMMAND_LINE_CHARDEVS = ("qmp", "qmp-reattach")
OWNED_KINDS = ("devices", "nodes", "fdsets", "fdnames", "netdevs", "chardevs", "objects", "jobs")


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


class StepFailed(MachineError):
    """One set-up step of one device failed."""

    def __init__(self, device: str, message: str):
        super().__init__(f"{device}: {message}")
        self.device = device
        self.message = message


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


class _Undo:
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


class _NoUndo(_Undo):
    """At start-up nothing is taken back one by one: QEMU is killed instead."""

    def push(self, function, *args):
        pass


# ------------------------------------------------------------ the state

class DeviceState:
    """The devices of one run of a Machine (``machine.devices``)."""

    def __init__(self, machine):
        self.machine = machine
        self.name = machine.name
        self.plan = machine.config.devices()
        self.drives: dict[str, Drive] = {}
        self.ports: list[str] = []
        self.free_ports: list[str] = []
        self.port_users: dict[str, str] = {}          # port -> device id
        self.nics: list[dict] = []
        self.shares: list[dict] = []
        self.vsock_cid: int | None = None
        self.owned: dict[str, set] = {kind: set() for kind in OWNED_KINDS}
        self.timings: dict[str, float] = {}           # device label -> seconds of QMP set-up
        self._storage_counter = 0
        self._lock = gevent.lock.RLock()
        self._virtiofsds: list[hostdev.Virtiofsd] = []
        self._held_fds: dict[int, str] = {}            # our fds not yet handed over -> label
        self._prepared: list = []                      # per-device prepared items, in order
        self._aio: tuple[str | None, str] | None = None
        self._vsock_fd: int | None = None
        self.owned["chardevs"].update(COMMAND_LINE_CHARDEVS)
        if machine.config.machine != "none":
            self.owned["chardevs"].add("serial0")

    # ----------------------------------------------------------- ownership

    def owned_ids(self) -> dict[str, frozenset]:
        """Every id vmbridged owns in this QEMU, by kind: ``devices`` (device ids,
        root ports included), ``nodes`` (block node names), ``fdsets`` (ids),
        ``fdnames`` (getfd names not yet consumed), ``netdevs``, ``chardevs``,
        ``objects`` (QOM object ids), ``jobs``. A snapshot; safe from any greenlet."""
        return {kind: frozenset(ids) for kind, ids in self.owned.items()}

    def owns(self, kind: str, value) -> bool:
        """Whether vmbridged owns `value` of `kind` (see owned_ids); ids starting
        with ``vmb-`` count as ours even before they exist (a raw QMP session
        must not take them)."""
        if kind not in self.owned:
            raise ValueError(f"unknown kind {kind!r} (one of {', '.join(OWNED_KINDS)})")
        if value in self.owned[kind]:
            return True
        return isinstance(value, str) and value.startswith(PREFIX)

    def _own(self, kind: str, value, undo: _Undo | None = None) -> None:
        self.owned[kind].add(value)
        if undo is not None:
            undo.push(self.owned[kind].discard, value)

    def _disown(self, kind: str, value) -> None:
        self.owned[kind].discard(value)

    def describe(self) -> dict:
        """A JSON-ready summary (for logs, state.json and tests)."""
        return {
            "drives": {name: d.to_dict() for name, d in self.drives.items()},
            "ports": list(self.ports), "freePorts": list(self.free_ports),
            "nics": list(self.nics), "shares": list(self.shares),
            "vsockCid": self.vsock_cid,
            "owned": {kind: sorted(map(str, ids)) for kind, ids in self.owned.items()},
            "storageCounter": self._storage_counter,
        }

    def restore(self, saved: dict | None) -> None:
        """Rebuild from describe()'s output (a restarted vmbridged adopting the VM)."""
        if not saved:
            return
        for name, data in saved.get("drives", {}).items():
            self.drives[name] = Drive.from_dict(data)
        self.ports = list(saved.get("ports", ()))
        self.free_ports = list(saved.get("freePorts", ()))
        self.nics = list(saved.get("nics", ()))
        self.shares = list(saved.get("shares", ()))
        self.vsock_cid = saved.get("vsockCid")
        for kind, ids in saved.get("owned", {}).items():
            if kind in self.owned:
                self.owned[kind].update(int(i) if kind == "fdsets" else i for i in ids)
        self._storage_counter = saved.get("storageCounter", 0)
        for drive in self.drives.values():
            if drive.port:
                self.port_users[drive.port] = drive.device_id

    # ------------------------------------------------------ prepare phase

    def prepare(self) -> None:
        """Open and check everything on the host, before QEMU starts."""
        self.machine._resources.callback(self.release_host_resources)
        plan = self.plan
        for index, spec in enumerate(plan.drives):
            label = f"drive{index}: {spec.path}"
            ephemeral = spec.options.effective_ephemeral(plan.ephemeral)
            try:
                fd = images.open_image(spec.path, readonly=spec.readonly or ephemeral)
                self._hold(fd, label)
                info = images.inspect_image(fd, spec.format)
            except images.ImageError as e:
                raise SetupError(str(e).removeprefix(f"{spec.path}: "), device=label) from e
            self._prepared.append(("drive", index, spec, fd, info, ephemeral))
        for index, spec in enumerate(plan.networks):
            fd = None
            if spec.kind == "tap":
                try:
                    fd = self._hold(hostdev.open_tap(spec.ifname), f"network{index}")
                except hostdev.HostDeviceError as e:
                    raise SetupError(str(e), device=f"network{index}: tap:{spec.ifname}") from e
            self._prepared.append(("network", index, spec, fd))
        if plan.shares:
            binary = hostdev.find_vhost_user_backend("fs")
            if binary is None:
                raise SetupError("no virtiofsd found (no vhost-user descriptor of type \"fs\" in "
                                 f"{', '.join(hostdev.vhost_user_dirs())})", device="bind0")
        for index, spec in enumerate(plan.shares):
            label = f"bind{index}: {spec.source}:{spec.tag}"
            if not os.path.isdir(spec.source):
                raise SetupError(f"{spec.source}: no such directory", device=label)
            daemon = hostdev.Virtiofsd(binary, spec.source, f"vmb-fs{index}", self.machine.directory,
                                       os.path.join(self.machine.directory, "virtiofsd.log"))
            self._virtiofsds.append(daemon)
            try:
                sock = daemon.start()
            except OSError as e:
                raise SetupError(f"starting virtiofsd: {e}", device=label) from e
            fd = self._hold(sock.detach(), label)
            log.info("%s: bind%d: virtiofsd pid %d serves %s as %r", self.name, index, daemon.pid,
                     spec.source, spec.tag)
            self._prepared.append(("share", index, spec, fd))
        if plan.vsock != "off":
            try:
                fd = self._hold(hostdev.open_vhost_vsock(), "vsock")
                cid = hostdev.claim_guest_cid(fd, self.name)
                self._prepared.append(("vsock", 0, cid, fd))
            except hostdev.HostDeviceError as e:
                if plan.vsock == "on":
                    raise SetupError(str(e), device="vsock") from e
                log.info("%s: vsock=auto: no vsock device: %s", self.name, e)
        if plan.bus == "pcie":
            slots = dev.boot_slot_count(plan, vsock=any(p[0] == "vsock" for p in self._prepared))
            self.ports = [f"{PREFIX}rp{i}" for i in range(slots + plan.free_ports)]
            self.free_ports = list(self.ports)
            self.owned["devices"].update(self.ports)
        if plan.shares:
            self.owned["objects"].add(MEMORY_BACKEND_ID)

    def command_line(self) -> list[str]:
        """The root ports: pcie.0 is not hotpluggable, so QMP cannot add them."""
        args = []
        count = len(self.ports)
        for i, port_id in enumerate(self.ports):
            slot, function = dev.FIRST_PORT_SLOT + i // 8, i % 8
            multifunction = ",multifunction=on" if function == 0 and i + 1 < count else ""
            args += ["-device", f"pcie-root-port,id={port_id},bus=pcie.0,chassis={i + 1},"
                                f"port={i + 1},addr={slot:#x}.{function}{multifunction}"]
        return args

    def _hold(self, fd: int, label: str) -> int:
        self._held_fds[fd] = label
        return fd

    def _close(self, fd: int) -> None:
        if self._held_fds.pop(fd, None) is not None:
            os.close(fd)

    def close_held_fds(self) -> None:
        for fd in list(self._held_fds):
            self._close(fd)

    def release_host_resources(self) -> None:
        """QEMU is gone (or never got going): close our fds, stop the virtiofsds."""
        self.close_held_fds()
        for daemon in self._virtiofsds:
            daemon.stop()
        self._virtiofsds.clear()

    # --------------------------------------------------------- QMP phase

    def setup(self) -> None:
        """Add the prepared devices over QMP (QEMU paused); SetupError on the first failure."""
        try:
            for item in self._prepared:
                kind, label = item[0], self._label(item)
                started = time.monotonic()
                try:
                    if kind == "drive":
                        self._setup_drive(label, *item[1:])
                    elif kind == "network":
                        self._setup_network(label, *item[1:])
                    elif kind == "share":
                        self._setup_share(label, *item[1:])
                    else:
                        self._setup_vsock(label, *item[2:])
                except StepFailed as e:
                    raise SetupError(e.message, device=e.device) from e
                except (MachineError, QMPError) as e:
                    if isinstance(e, SetupError):
                        raise
                    raise SetupError(self.machine._explain_failure(e), device=label) from e
                self.timings[label] = time.monotonic() - started
        finally:
            self._prepared.clear()
            self.close_held_fds()
        if self.timings:
            log.info("%s: devices set up over QMP in %.1f ms (%s)", self.name,
                     sum(self.timings.values()) * 1000,
                     ", ".join(f"{label.split(':')[0]} {t * 1000:.1f} ms" for label, t in self.timings.items()))

    @staticmethod
    def _label(item) -> str:
        kind, index = item[0], item[1]
        if kind == "drive":
            return f"drive{index}: {item[2].path}"
        if kind == "network":
            spec = item[2]
            return f"network{index}: {spec.kind}" + (f":{spec.ifname}" if spec.ifname else "")
        if kind == "share":
            return f"bind{index}: {item[2].source}:{item[2].tag}"
        return "vsock"

    def _setup_drive(self, label, index, spec, fd, info, ephemeral) -> None:
        drive = Drive(name=f"drive{index}", key=f"{PREFIX}drive{index}", boot=True,
                      interface=spec.interface, format=info.format, readonly=spec.readonly,
                      ephemeral=ephemeral, virtual_size=info.virtual_size,
                      identity=list(info.identity), serial=spec.serial)
        self._attach_drive(drive, fd, label, _NoUndo())
        self._close(fd)
        self.drives[drive.name] = drive
        self._log_drive(drive, label)

    def _log_drive(self, drive: Drive, label: str) -> None:
        extra = f", ephemeral overlay in a {drive.overlay}" if drive.ephemeral else ""
        where = f"{SCSI_CONTROLLER_ID}.0" if drive.interface == "scsi" else drive.port or "the default bus"
        log.info("%s: %s: %s %s%s, %s on %s, aio=%s", self.name, label, drive.format,
                 "read-only" if drive.readonly else "read-write", extra, drive.interface, where, drive.aio)
        if drive.interface == "nvme" and drive.readonly:
            log.warning("%s: %s: QEMU's NVMe controller does not tell the guest a read-only "
                        "namespace is read-only: the guest's writes will fail with I/O errors",
                        self.name, label)

    def _setup_network(self, label, index, spec, fd) -> None:
        netdev, device = f"{PREFIX}net{index}", f"{PREFIX}nic{index}"
        if spec.kind == "user":
            self._qmp(label, "netdev_add", {"type": "user", "id": netdev})
        else:
            fdname = f"{PREFIX}tap{index}"
            self._getfd(label, fd, fdname)
            self._close(fd)
            self._qmp(label, "netdev_add", {"type": "tap", "id": netdev, "fd": fdname})
            self._disown("fdnames", fdname)  # netdev_add took it
        self._own("netdevs", netdev)
        mac = dev.stable_mac(self.name, index)
        args = {"driver": "virtio-net-pci", "id": device, "netdev": netdev, "mac": mac,
                "romfile": ""}  # no option ROM: no PXE, and no ROM file for QEMU to open
        port = self._take_port(label, device)
        self._device_add(label, args, port)
        self.nics.append({"index": index, "kind": spec.kind, "ifname": spec.ifname, "mac": mac,
                          "device": device, "netdev": netdev, "port": port})
        log.info("%s: %s: virtio-net mac=%s on %s", self.name, label, mac, port or "the default bus")

    def _setup_share(self, label, index, spec, fd) -> None:
        fdname, chardev, device = f"{PREFIX}fs{index}-fd", f"{PREFIX}fs{index}-chr", f"{PREFIX}fs{index}"
        self._getfd(label, fd, fdname)
        self._close(fd)
        self._qmp(label, "chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": fdname}}, "server": False}}})
        self._disown("fdnames", fdname)
        self._own("chardevs", chardev)
        port = self._take_port(label, device)
        try:
            self._device_add(label, {"driver": "vhost-user-fs-pci", "id": device, "chardev": chardev,
                                     "tag": spec.tag}, port)
        except StepFailed as e:
            tail = _log_tail(os.path.join(self.machine.directory, "virtiofsd.log"))
            raise StepFailed(label, e.message + (f" (virtiofsd: {tail})" if tail else "")) from e
        self.shares.append({"index": index, "source": spec.source, "tag": spec.tag, "device": device,
                            "chardev": chardev, "port": port,
                            "virtiofsdPid": self._virtiofsds[index].pid})

    def _setup_vsock(self, label, cid, fd) -> None:
        fdname, device = f"{PREFIX}vsock-fd", f"{PREFIX}vsock"
        self._getfd(label, fd, fdname)
        self._close(fd)
        port = self._take_port(label, device)
        self._device_add(label, {"driver": "vhost-vsock-pci", "id": device, "guest-cid": cid,
                                 "vhostfd": fdname}, port)
        self._disown("fdnames", fdname)
        self.vsock_cid = cid
        log.info("%s: vsock: guest CID %d on %s", self.name, cid, port or "the default bus")

    # ------------------------------------------------------- drive plumbing

    def _attach_drive(self, drive: Drive, fd: int, label: str, undo: _Undo) -> None:
        """Add one drive's nodes and device on `fd` (ours; the caller closes it)."""
        key, ro = drive.key, drive.readonly or drive.ephemeral
        if drive.ephemeral:
            base_file, base = f"{key}-base-file", f"{key}-base"
            fdset = self._add_fd(label, fd, f"vmbridge:{drive.name}:base", undo, drive)
            self._add_file_node(label, drive, base_file, fdset, True, undo)
            self._add_format_node(label, drive, base, base_file, True, undo)
            drive.target, drive.file_node, drive.file_fdset = base, base_file, fdset
            overlay_fd, drive.overlay = images.overlay_file(drive.virtual_size, key)
            try:
                overlay_fdset = self._add_fd(label, overlay_fd, f"vmbridge:{drive.name}:overlay", undo,
                                             drive)
            finally:
                os.close(overlay_fd)  # QEMU has its own duplicate in the fdset
            overlay_file = f"{key}-ovl-file"
            self._add_file_node(label, drive, overlay_file, overlay_fdset, False, undo)
            self._create_qcow2(label, f"vmb-create-{drive.key.removeprefix(PREFIX)}", overlay_file,
                               drive.virtual_size)
            self._blockdev_add(label, {"driver": "qcow2", "node-name": key, "file": overlay_file,
                                       "backing": base}, undo, drive)
        else:
            file_node = f"{key}-file"
            fdset = self._add_fd(label, fd, f"vmbridge:{drive.name}", undo, drive)
            self._add_file_node(label, drive, file_node, fdset, ro, undo)
            self._add_format_node(label, drive, key, file_node, ro, undo)
            drive.target, drive.file_node, drive.file_fdset = key, file_node, fdset
        drive.top = key
        drive.device_id = key
        if drive.interface == "scsi":
            self._ensure_scsi_controller(label, undo)
            args = {"driver": "scsi-hd", "id": key, "drive": key, "bus": f"{SCSI_CONTROLLER_ID}.0"}
            port = None
        else:
            args = {"driver": "virtio-blk-pci" if drive.interface == "virtio" else "nvme",
                    "id": key, "drive": key}
            port = self._take_port(label, key, undo)
        serial = drive.serial
        if serial is None and drive.interface == "nvme":  # NVMe needs one: "drive0", "stor1"
            serial = drive.key.removeprefix(PREFIX)
        if serial:
            args["serial"] = serial
        self._device_add(label, args, port, undo)
        drive.port = port

    def _add_fd(self, label: str, fd: int, opaque: str, undo: _Undo, drive: Drive | None = None) -> int:
        result = self._qmp(label, "add-fd", {"opaque": opaque}, fds=[fd])
        fdset = result["fdset-id"]
        self._own("fdsets", fdset, undo)
        undo.push(self._remove_fdset, fdset)
        if drive is not None:
            drive.fdsets.append(fdset)
        return fdset

    def _remove_fdset(self, fdset: int) -> None:
        """remove-fd the set: QEMU closes each fd once no node uses it."""
        try:
            self.machine.execute("remove-fd", {"fdset-id": fdset})
        finally:
            self._disown("fdsets", fdset)

    def _aio_choice(self) -> tuple[str | None, str]:
        if self._aio is None:
            client = self.machine.qmp
            if not client.schema_has_member("BlockdevAioOptions", "io_uring"):
                self._aio = (None, "threads (io_uring: not in this QEMU's schema)")
            elif not images.host_allows_io_uring():
                self._aio = (None, "threads (io_uring: refused by the host kernel)")
            else:
                self._aio = ("io_uring", "io_uring")
        return self._aio

    def _add_file_node(self, label: str, drive: Drive, node: str, fdset: int, readonly: bool,
                       undo: _Undo) -> None:
        args = {"driver": "file", "node-name": node, "filename": f"/dev/fdset/{fdset}",
                "read-only": readonly, "cache": {"direct": False}}
        aio, described = self._aio_choice()
        if aio is not None:
            try:
                self._blockdev_add(label, {**args, "aio": aio}, undo, drive)
                drive.aio = described
                return
            except StepFailed as e:
                if "io_uring" not in e.message:
                    raise
                # The probe said yes but QEMU could not set one up: believe QEMU.
                log.warning("%s: %s: io_uring refused (%s); using the default AIO from now on",
                            self.name, label, e.message)
                self._aio = (None, "threads (io_uring: QEMU could not set one up)")
        self._blockdev_add(label, args, undo, drive)
        drive.aio = self._aio_choice()[1]

    def _add_format_node(self, label: str, drive: Drive, node: str, file_node: str, readonly: bool,
                         undo: _Undo) -> None:
        args = {"driver": drive.format, "node-name": node, "file": file_node, "read-only": readonly}
        if drive.format == "qcow2":
            args["backing"] = None  # never a backing file by name (images.py refuses those too)
        self._blockdev_add(label, args, undo, drive)

    def _blockdev_add(self, label: str, args: dict, undo: _Undo, drive: Drive | None = None) -> None:
        self._qmp(label, "blockdev-add", args)
        node = args["node-name"]
        self._own("nodes", node, undo)
        undo.push(self._blockdev_del, node)
        if drive is not None:
            drive.nodes.append(node)

    def _blockdev_del(self, node: str) -> None:
        try:
            self.machine.execute("blockdev-del", {"node-name": node})
        finally:
            self._disown("nodes", node)

    def _create_qcow2(self, label: str, job_id: str, file_node: str, size: int) -> None:
        """Format `file_node` as qcow2 with the job `job_id`; return when it concluded."""
        client = self.machine.qmp
        if client is None:
            raise MachineNotConnected(f"{self.name}: not connected to QEMU")
        error = None
        with client.listen("JOB_STATUS_CHANGE") as listener:  # before the command: no event missed
            self._qmp(label, "blockdev-create", {"job-id": job_id, "options": {
                "driver": "qcow2", "file": file_node, "size": size}})
            self._own("jobs", job_id)
            try:
                deadline = time.monotonic() + JOB_TIMEOUT
                while True:
                    try:
                        event = listener.get(timeout=max(0.0, deadline - time.monotonic()))
                    except QMPTimeoutError:
                        raise StepFailed(label, f"formatting the overlay: job {job_id} did not "
                                                f"conclude within {JOB_TIMEOUT:g}s") from None
                    except QMPDisconnectedError as e:
                        raise MachineNotConnected(f"{self.name}: connection to QEMU lost ({e})") from e
                    data = event.data or {}
                    if data.get("id") == job_id and data.get("status") == "concluded":
                        break
                for job in self._qmp(label, "query-jobs"):
                    if job.get("id") == job_id:
                        error = job.get("error")
            finally:
                with contextlib.suppress(MachineError):
                    self.machine.execute("job-dismiss", {"id": job_id})
                self._disown("jobs", job_id)
        if error:
            raise StepFailed(label, f"formatting the overlay failed: {error}")

    def _ensure_scsi_controller(self, label: str, undo: _Undo) -> None:
        if SCSI_CONTROLLER_ID in self.owned["devices"]:
            return
        # Kept once added, also if the disk that needed it fails: it is harmless.
        port = self._take_port(label, SCSI_CONTROLLER_ID)
        try:
            self._device_add(label, {"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER_ID}, port)
        except BaseException:
            self._free_port(port)
            raise

    def _take_port(self, label: str, device_id: str, undo: _Undo | None = None) -> str | None:
        if self.plan.bus != "pcie":
            return None
        if not self.free_ports:
            raise NoFreePort(f"no free PCIe root port for {label} (pcie_ports={self.plan.free_ports})")
        port = self.free_ports.pop(0)
        self.port_users[port] = device_id
        if undo is not None:
            undo.push(self._free_port, port)
        return port

    def _free_port(self, port: str | None) -> None:
        if port is not None and self.port_users.pop(port, None) is not None:
            self.free_ports.append(port)
            self.free_ports.sort(key=lambda p: int(p.removeprefix(f"{PREFIX}rp")))

    def _device_add(self, label: str, args: dict, port: str | None, undo: _Undo | None = None) -> None:
        if port is not None:
            args = {**args, "bus": port}
        self._qmp(label, "device_add", args)
        self._own("devices", args["id"], undo)

    def _getfd(self, label: str, fd: int, fdname: str) -> None:
        self._qmp(label, "getfd", {"fdname": fdname}, fds=[fd])
        self._own("fdnames", fdname)

    def _qmp(self, label: str, command: str, args: dict | None = None, *, fds=()):
        """One QMP command of one device's set-up; StepFailed names the device."""
        try:
            return self.machine.execute(command, args, fds=fds)
        except MachineCommandError as e:
            raise StepFailed(label, f"QEMU refused {command}: {e.desc}") from e
        except MachineTimeout as e:
            raise StepFailed(label, str(e)) from e

    # ------------------------------------------------------------- events

    def on_event(self, event) -> None:
        """From the QMP pump (must not block): a device of ours went away."""
        if event.name != "DEVICE_DELETED":
            return
        device_id = (event.data or {}).get("device")
        if not device_id or device_id not in self.owned["devices"]:
            return
        self._disown("devices", device_id)
        for port, user in list(self.port_users.items()):
            if user == device_id:
                self._free_port(port)
        drive = next((d for d in self.drives.values() if d.device_id == device_id), None)
        if drive is not None and drive.state != "gone":
            if drive.state != "removing":
                log.info("%s: the guest released %s (%s)", self.name, drive.name, device_id)
            drive.state = "gone"
            gevent.spawn(self._release_drive, drive)

    def _release_drive(self, drive: Drive) -> None:
        """After DEVICE_DELETED: delete the nodes, remove the fdsets, forget it."""
        with self._lock:
            try:
                for node in reversed(drive.nodes):
                    try:
                        self._blockdev_del(node)
                    except MachineError as e:
                        log.warning("%s: %s: blockdev-del %s: %s", self.name, drive.name, node, e)
                for fdset in drive.fdsets:
                    try:
                        self._remove_fdset(fdset)
                    except MachineError as e:
                        log.warning("%s: %s: remove-fd %s: %s", self.name, drive.name, fdset, e)
            finally:
                if self.drives.get(drive.name) is drive:
                    del self.drives[drive.name]
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
        with self._lock:
            self._check_running()
            if self.plan.bus == "none":
                raise StorageNotSupported(f"machine type {self.machine.config.machine!r} has no bus for storage")
            if name in self.drives:
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
                ephemeral = options.ephemeral is None and self.plan.ephemeral and not readonly
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
            self._storage_counter += 1
            drive = Drive(name=name, key=f"{PREFIX}stor{self._storage_counter}", boot=False,
                          interface=options.interface, format=info.format, readonly=readonly,
                          ephemeral=ephemeral, virtual_size=info.virtual_size,
                          identity=list(info.identity), serial=options.serial)
            label = f"storage {name}"
            undo = _Undo()
            started = time.monotonic()
            try:
                self._attach_drive(drive, own_fd, label, undo)
            except BaseException:
                undo.rollback()
                raise
            finally:
                os.close(own_fd)
            self.timings[label] = time.monotonic() - started
            self.drives[name] = drive
            self._log_drive(drive, label)
            self._saved()
            return drive

    def remove_storage(self, name: str, timeout: float = REMOVE_TIMEOUT) -> None:
        """RemoveStorage: unplug, wait for the guest to let go, then delete the nodes."""
        with self._lock:
            self._check_running()
            drive = self.drives.get(name)
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
            drive = self.drives.get(name)
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
        undo = _Undo()
        drive.generation += 1
        new_file = f"{drive.key}-file{drive.generation}" if not drive.ephemeral \
            else f"{drive.key}-base-file{drive.generation}"
        readonly = drive.readonly or drive.ephemeral
        try:
            fdset = self._add_fd(label, fd, f"vmbridge:{drive.name}:{drive.generation}", undo)
            self._add_file_node(label, drive, new_file, fdset, readonly, undo)
            drive.nodes.remove(new_file)  # it takes the old file node's place, below
            # blockdev-reopen resets every option not given: give all we gave blockdev-add.
            options = {"driver": drive.format, "node-name": drive.target, "file": new_file,
                       "read-only": readonly}
            if drive.format == "qcow2":
                options["backing"] = None
            self._qmp(label, "blockdev-reopen", {"options": [options]})
        except BaseException:
            with contextlib.suppress(ValueError):
                drive.nodes.remove(new_file)
            undo.rollback()
            raise
        old_file, old_fdset = drive.file_node, drive.file_fdset
        drive.nodes[drive.nodes.index(old_file)] = new_file
        drive.fdsets[drive.fdsets.index(old_fdset)] = fdset
        drive.file_node, drive.file_fdset, drive.identity = new_file, fdset, list(info.identity)
        for step, args in ((self._blockdev_del, old_file), (self._remove_fdset, old_fdset)):
            try:
                step(args)
            except MachineError as e:
                log.warning("%s: %s: releasing the old backing: %s", self.name, label, e)
        log.info("%s: %s: backing replaced (%s)", self.name, label, new_file)

    def _saved(self) -> None:
        with contextlib.suppress(OSError):
            self.machine._write_state_file()


def _log_tail(path: str, lines: int = 2) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2048))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def setup_devices(machine) -> None:
    """Add every device of `machine`'s plan over QMP; raise SetupError on the first failure."""
    machine.devices.setup()
