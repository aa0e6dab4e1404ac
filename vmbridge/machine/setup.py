"""The device plane of one run: set-up between ``-S`` and ``cont``, the QMP
machinery that attaches a drive, and the one record of what vmbridged owns
inside QEMU. Storage hotplug at run time is vmbridge.machine.storage.

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

The drive path is shared with storage hotplug: storage.StorageHotplug holds
this DeviceState and uses only its public methods (attach_drive, add_fd,
add_file_node, execute_step, blockdev_del, remove_fdset, log_drive,
new_storage_key, forget_device). Hotplug passes a storage.Undo to roll back
a half-done attach; set-up passes _NoUndo (a failed start kills QEMU). The
Drive record, Undo and NoFreePort (the port allocator's error) come from
storage.py, which imports nothing from here: no import cycle.

Ownership: :meth:`DeviceState.owned_ids` lists every id vmbridged created in
QEMU (device ids, block node names, fdset ids, fd names, netdevs, chardevs,
objects, jobs); :meth:`DeviceState.owns` answers one. Everything we create is
named ``vmb-...`` too, so a raw QMP session can be refused what is ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from vmbridge.machine import devices as dev
from vmbridge.machine import hostdev, images
from vmbridge.machine.process import log_tail
from vmbridge.machine.qemu import MEMORY_BACKEND_ID
from vmbridge.machine.machine import (MachineCommandError, MachineError, MachineNotConnected,
                                      MachineTimeout, SetupError)
from vmbridge.machine.storage import Drive, NoFreePort, Undo
from vmbridge.qmp import QMPDisconnectedError, QMPError, QMPTimeoutError

log = logging.getLogger("vmbridge.machine")

PREFIX = "vmb-"
SCSI_CONTROLLER_ID = "vmb-scsi0"
JOB_TIMEOUT = 30.0       # formatting an overlay takes milliseconds
#: What machine.py puts on every command line, listed so raw QMP cannot touch it.
COMMAND_LINE_CHARDEVS = ("qmp", "qmp-reattach")
OWNED_KINDS = ("devices", "nodes", "fdsets", "fdnames", "netdevs", "chardevs", "objects", "jobs")


# ------------------------------------------------------------------ errors

class StepFailed(MachineError):
    """One set-up step of one device failed."""

    def __init__(self, device: str, message: str):
        super().__init__(f"{device}: {message}")
        self.device = device
        self.message = message


# -------------------------------------------------------------- rollback

class _NoUndo(Undo):
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
        self._storage_counter = 0                     # hot-plugged drives so far (their ids)
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

    def _own(self, kind: str, value, undo: Undo | None = None) -> None:
        self.owned[kind].add(value)
        if undo is not None:
            undo.push(self.owned[kind].discard, value)

    def _disown(self, kind: str, value) -> None:
        self.owned[kind].discard(value)

    def forget_device(self, device_id: str) -> bool:
        """QEMU deleted `device_id` (DEVICE_DELETED): if it was ours, drop it from the
        record and free its root port. Whether it was ours."""
        if device_id not in self.owned["devices"]:
            return False
        self._disown("devices", device_id)
        for port, user in list(self.port_users.items()):
            if user == device_id:
                self._free_port(port)
        return True

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
        self.attach_drive(drive, fd, label, _NoUndo())
        self._close(fd)
        self.drives[drive.name] = drive
        self.log_drive(drive, label)

    def log_drive(self, drive: Drive, label: str) -> None:
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
            self.execute_step(label, "netdev_add", {"type": "user", "id": netdev})
        else:
            fdname = f"{PREFIX}tap{index}"
            self._getfd(label, fd, fdname)
            self._close(fd)
            self.execute_step(label, "netdev_add", {"type": "tap", "id": netdev, "fd": fdname})
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
        self.execute_step(label, "chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": fdname}}, "server": False}}})
        self._disown("fdnames", fdname)
        self._own("chardevs", chardev)
        port = self._take_port(label, device)
        try:
            self._device_add(label, {"driver": "vhost-user-fs-pci", "id": device, "chardev": chardev,
                                     "tag": spec.tag}, port)
        except StepFailed as e:
            tail = log_tail(os.path.join(self.machine.directory, "virtiofsd.log"), lines=2)
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

    def new_storage_key(self) -> str:
        """The base of the QEMU ids of the next hot-plugged drive: vmb-stor1, vmb-stor2..."""
        self._storage_counter += 1
        return f"{PREFIX}stor{self._storage_counter}"

    def attach_drive(self, drive: Drive, fd: int, label: str, undo: Undo) -> None:
        """Add one drive's nodes and device on `fd` (ours; the caller closes it)."""
        key, ro = drive.key, drive.readonly or drive.ephemeral
        if drive.ephemeral:
            base_file, base = f"{key}-base-file", f"{key}-base"
            fdset = self.add_fd(label, fd, f"vmbridge:{drive.name}:base", undo, drive)
            self.add_file_node(label, drive, base_file, fdset, True, undo)
            self._add_format_node(label, drive, base, base_file, True, undo)
            drive.target, drive.file_node, drive.file_fdset = base, base_file, fdset
            overlay_fd, drive.overlay = images.overlay_file(drive.virtual_size, key)
            try:
                overlay_fdset = self.add_fd(label, overlay_fd, f"vmbridge:{drive.name}:overlay", undo,
                                             drive)
            finally:
                os.close(overlay_fd)  # QEMU has its own duplicate in the fdset
            overlay_file = f"{key}-ovl-file"
            self.add_file_node(label, drive, overlay_file, overlay_fdset, False, undo)
            self._create_qcow2(label, f"vmb-create-{drive.key.removeprefix(PREFIX)}", overlay_file,
                               drive.virtual_size)
            self._blockdev_add(label, {"driver": "qcow2", "node-name": key, "file": overlay_file,
                                       "backing": base}, undo, drive)
        else:
            file_node = f"{key}-file"
            fdset = self.add_fd(label, fd, f"vmbridge:{drive.name}", undo, drive)
            self.add_file_node(label, drive, file_node, fdset, ro, undo)
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

    def add_fd(self, label: str, fd: int, opaque: str, undo: Undo, drive: Drive | None = None) -> int:
        result = self.execute_step(label, "add-fd", {"opaque": opaque}, fds=[fd])
        fdset = result["fdset-id"]
        self._own("fdsets", fdset, undo)
        undo.push(self.remove_fdset, fdset)
        if drive is not None:
            drive.fdsets.append(fdset)
        return fdset

    def remove_fdset(self, fdset: int) -> None:
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

    def add_file_node(self, label: str, drive: Drive, node: str, fdset: int, readonly: bool,
                       undo: Undo) -> None:
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
                         undo: Undo) -> None:
        args = {"driver": drive.format, "node-name": node, "file": file_node, "read-only": readonly}
        if drive.format == "qcow2":
            args["backing"] = None  # never a backing file by name (images.py refuses those too)
        self._blockdev_add(label, args, undo, drive)

    def _blockdev_add(self, label: str, args: dict, undo: Undo, drive: Drive | None = None) -> None:
        self.execute_step(label, "blockdev-add", args)
        node = args["node-name"]
        self._own("nodes", node, undo)
        undo.push(self.blockdev_del, node)
        if drive is not None:
            drive.nodes.append(node)

    def blockdev_del(self, node: str) -> None:
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
            self.execute_step(label, "blockdev-create", {"job-id": job_id, "options": {
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
                for job in self.execute_step(label, "query-jobs"):
                    if job.get("id") == job_id:
                        error = job.get("error")
            finally:
                with contextlib.suppress(MachineError):
                    self.machine.execute("job-dismiss", {"id": job_id})
                self._disown("jobs", job_id)
        if error:
            raise StepFailed(label, f"formatting the overlay failed: {error}")

    def _ensure_scsi_controller(self, label: str, undo: Undo) -> None:
        if SCSI_CONTROLLER_ID in self.owned["devices"]:
            return
        # Kept once added, also if the disk that needed it fails: it is harmless.
        port = self._take_port(label, SCSI_CONTROLLER_ID)
        try:
            self._device_add(label, {"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER_ID}, port)
        except BaseException:
            self._free_port(port)
            raise

    def _take_port(self, label: str, device_id: str, undo: Undo | None = None) -> str | None:
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

    def _device_add(self, label: str, args: dict, port: str | None, undo: Undo | None = None) -> None:
        if port is not None:
            args = {**args, "bus": port}
        self.execute_step(label, "device_add", args)
        self._own("devices", args["id"], undo)

    def _getfd(self, label: str, fd: int, fdname: str) -> None:
        self.execute_step(label, "getfd", {"fdname": fdname}, fds=[fd])
        self._own("fdnames", fdname)

    def execute_step(self, label: str, command: str, args: dict | None = None, *, fds=()):
        """One QMP command of one device's set-up; StepFailed names the device."""
        try:
            return self.machine.execute(command, args, fds=fds)
        except MachineCommandError as e:
            raise StepFailed(label, f"QEMU refused {command}: {e.desc}") from e
        except MachineTimeout as e:
            raise StepFailed(label, str(e)) from e


def setup_devices(machine) -> None:
    """Add every device of `machine`'s plan over QMP; raise SetupError on the first failure."""
    machine.devices.setup()
