"""Host-side ends of devices: TAP interfaces, vhost-vsock, virtiofsd.

Everything here runs in vmbridged and yields file descriptors (or, for
virtiofsd, a helper process and our end of its vhost-user socket) that are
handed to QEMU over QMP. QEMU opens none of these itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import struct

import gevent
import gevent.subprocess

log = logging.getLogger("vmbridge.machine")

# ------------------------------------------------------------------- TAP

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class HostDeviceError(Exception):
    """A host device could not be opened; the message is for the user."""


def open_tap(ifname: str) -> int:
    """Attach to (or create) the TAP interface `ifname`; returns the queue's fd.

    IFF_VNET_HDR lets QEMU's virtio-net pass offloads through. A TAP created
    here (none of that name existed) is transient: it goes away when the last
    fd - QEMU's - closes. A persistent one (``ip tuntap add``) stays.
    """
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise HostDeviceError(f"{TUN_DEVICE}: {e.strerror}") from e
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        hint = {
            errno.EPERM: " (creating a TAP needs CAP_NET_ADMIN; or create it persistent for this user "
                         "with `ip tuntap add`)",
            errno.EBUSY: " (another process has it open)",
            errno.EINVAL: " (is it a TUN device, or a TAP created with other flags?)",
        }.get(e.errno, "")
        raise HostDeviceError(f"tap {ifname}: {e.strerror}{hint}") from e
    return fd


# ----------------------------------------------------------------- vsock

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60  # _IOW(VHOST_VIRTIO=0xAF, 0x60, __u64)
FIRST_GUEST_CID = 3                     # 0, 1 and 2 are the hypervisor, local and host
LAST_GUEST_CID = 0xFFFFFFFE             # 0xFFFFFFFF is VMADDR_CID_ANY


def open_vhost_vsock(path: str = VHOST_VSOCK_DEVICE) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HostDeviceError(f"this host has no {path} (load the vhost_vsock kernel module)") from None
    except OSError as e:
        raise HostDeviceError(f"{path}: {e.strerror}") from e


def cid_candidates(vm_name: str, count: int):
    """Guest CIDs to try, the first one stable for a VM name."""
    span = LAST_GUEST_CID - FIRST_GUEST_CID + 1
    for attempt in range(count):
        digest = hashlib.sha256(f"vmbridge-cid\0{vm_name}\0{attempt}".encode()).digest()
        yield FIRST_GUEST_CID + int.from_bytes(digest[:4], "big") % span


def claim_guest_cid(fd: int, vm_name: str, *, attempts: int = 32, ioctl=fcntl.ioctl) -> int:
    """Set a free guest CID on the vhost-vsock fd; returns it.

    The kernel refuses a CID another vhost-vsock instance holds (EADDRINUSE):
    try the next candidate. QEMU sets the same CID again when it realizes the
    device on (a duplicate of) this fd, which the kernel accepts for the same
    instance.
    """
    for cid in cid_candidates(vm_name, attempts):
        try:
            ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
            return cid
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise HostDeviceError(f"vsock: setting guest CID {cid}: {e.strerror}") from e
            log.debug("%s: vsock CID %d in use, trying another", vm_name, cid)
    raise HostDeviceError(f"vsock: no free guest CID after {attempts} attempts")


# ------------------------------------------------------------- virtiofsd

def vhost_user_dirs() -> list[str]:
    """QEMU's vhost-user descriptor directories, lowest priority first
    (docs/interop/vhost-user.json in QEMU's tree)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return ["/usr/share/qemu/vhost-user", "/etc/qemu/vhost-user",
            os.path.join(config_home, "qemu", "vhost-user")]


def find_vhost_user_backend(backend_type: str = "fs", dirs=None) -> str | None:
    """The binary of the first vhost-user backend of `backend_type`, as QEMU documents:
    ``*.json`` descriptors from the directories above, a file in a later directory
    replacing (an empty one: hiding) the same name in an earlier one, then taken in
    name order; the first with that ``type`` and an executable ``binary`` wins."""
    files = {}
    for directory in dirs if dirs is not None else vhost_user_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.endswith(".json"):
                files[name] = os.path.join(directory, name)
    for name in sorted(files):
        path = files[name]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if not text.strip():
                continue  # masks a lower-priority descriptor of that name
            descriptor = json.loads(text)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable vhost-user descriptor: %s", path, e)
            continue
        binary = descriptor.get("binary") if isinstance(descriptor, dict) else None
        if descriptor.get("type") == backend_type and isinstance(binary, str) \
                and os.path.isabs(binary) and os.access(binary, os.X_OK):
            return binary
    return None


class Virtiofsd:
    """One virtiofsd serving one share of one VM, owned by vmbridged.

    The vhost-user socket never has a name anybody could connect to: we bind
    a listening socket in the VM's 0700 directory, connect our end to it and
    unlink the name at once, then start virtiofsd with ``--fd`` on the
    listening socket; it accepts the connection already queued - ours - and
    QEMU gets our end with ``getfd``. virtiofsd exits when that connection
    closes, i.e. when QEMU exits, also if vmbridged is gone by then (like
    QEMU, it runs in its own session so the daemon's death does not touch it).
    """

    def __init__(self, binary: str, source: str, label: str, directory: str, log_path: str):
        self.binary = binary
        self.source = source
        self.label = label
        self.directory = directory
        self.log_path = log_path
        self.process: gevent.subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> socket.socket:
        """Start it; returns our connected end of its vhost-user socket (ours to close)."""
        path = os.path.join(self.directory, f"{self.label}.vhost")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ours = None
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            listener.bind(path)
            try:
                listener.listen(1)
                ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                ours.connect(path)  # queued in the backlog: virtiofsd's accept() returns it
            finally:
                os.unlink(path)
            log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                argv = [self.binary, f"--fd={listener.fileno()}", "-o", f"source={self.source}"]
                log.debug("%s: exec %s", self.label, " ".join(argv))
                self.process = gevent.subprocess.Popen(
                    argv, pass_fds=(listener.fileno(),), stdin=gevent.subprocess.DEVNULL,
                    stdout=log_fd, stderr=log_fd, start_new_session=True, close_fds=True)
            finally:
                os.close(log_fd)
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            listener.close()
        return ours

    def stop(self, grace: float = 2.0) -> None:
        """Make sure it is gone: it ends by itself once QEMU closed the socket;
        SIGTERM, then SIGKILL, if it does not. Idempotent."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        if _wait(proc, 0.5):
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        if _wait(proc, grace):
            return
        log.warning("%s: virtiofsd (pid %d) ignored SIGTERM; killing it", self.label, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _wait(proc, 10)


def _wait(proc, timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except gevent.subprocess.TimeoutExpired:
        return False
