"""Disk images as vmbridged sees them: opened here, identified here, never probed by QEMU.

QEMU's format probing is a classic hole: a raw image whose guest writes a
qcow2 header naming ``/etc/shadow`` as its backing file becomes, at the next
probe, a qcow2 image that makes QEMU open that path. So vmbridged reads the
header itself, tells QEMU the format explicitly, and refuses qcow2 images
that would make QEMU open any path (a backing file name, an external data
file). Overlays get their backing as a block node, never as a name.

Also here: the anonymous files behind ephemeral overlays, and whether the
host kernel lets us use io_uring.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import stat
import struct

log = logging.getLogger("vmbridge.machine")

QCOW2_MAGIC = b"QFI\xfb"
#: Other formats' magic numbers: an image that starts like one of these is
#: refused rather than silently handed to the guest as raw bytes.
OTHER_MAGICS = (
    (b"KDMV", "VMDK"),
    (b"# Disk DescriptorFile", "VMDK descriptor"),
    (b"vhdxfile", "VHDX"),
    (b"conectix", "VHD"),
    (b"QED\x00", "QED"),
    (b"LUKS\xba\xbe", "LUKS"),
    (b"WithoutFreeSpace", "Parallels"),
    (b"WithouFreSpacExt", "Parallels"),
)
VDI_SIGNATURE_OFFSET, VDI_SIGNATURE = 0x40, struct.pack("<I", 0xBEDA107F)
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_EXT_DATA_FILE = 0x44415441

#: Ephemeral overlays of bases up to this virtual size live in a memfd (RAM or
#: swap; worst case the guest rewrites the whole disk and the memfd grows to
#: the virtual size plus qcow2 metadata). Larger ones go to an O_TMPFILE file.
OVERLAY_MEMFD_MAX = 256 * 1024 * 1024
#: Where O_TMPFILE overlays go: disk-backed (not /run, which is RAM), and
#: O_TMPFILE means the file never has a name. $VMBRIDGE_OVERLAY_DIR overrides.
OVERLAY_DIR = "/var/tmp"


class ImageError(Exception):
    """An image cannot be used; the message says why, in words for the user."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str          # "raw" | "qcow2"
    virtual_size: int    # bytes the guest sees
    file_size: int       # bytes of the file (or block device)
    block_device: bool
    identity: tuple      # (st_dev, st_ino): the same file, whatever the fd


def open_image(path: str, readonly: bool) -> int:
    """Open an image for QEMU: O_RDONLY or O_RDWR, O_CLOEXEC, never following
    into a FIFO or a directory. Raises ImageError."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from e
    try:
        check_image_fd(fd, readonly)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_image_fd(fd: int, readonly: bool) -> os.stat_result:
    """The fd is a regular file or block device opened with the access the drive needs."""
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError("not a regular file or block device")
    mode = fd_access_mode(fd)
    if mode == os.O_WRONLY:
        raise ImageError("opened write-only; an image needs read access")
    if not readonly and mode != os.O_RDWR:
        raise ImageError("opened read-only, but the drive is writable")
    return st


def fd_access_mode(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def reopen_readonly(fd: int) -> int:
    """A read-only fd for the file `fd` has open (QEMU's fdsets match access modes
    exactly, and a read-only drive should not hand QEMU write access)."""
    if fd_access_mode(fd) == os.O_RDONLY:
        return os.dup(fd)
    # Our own /proc entry: reopening the same open file, not a path anybody names.
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)


def _size(fd: int, st: os.stat_result) -> int:
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def inspect_image(fd: int, asked_format: str | None) -> ImageInfo:
    """Identify the image on `fd` from its header (pread: the offset is untouched).

    Raises ImageError for: a format= the header contradicts (qcow2 asked, no
    qcow2 header), a header of a format we don't support, a qcow2 that would
    make QEMU open a path (backing file name, external data file) or is
    encrypted.
    """
    st = os.fstat(fd)
    size = _size(fd, st)
    try:
        head = os.pread(fd, 4096, 0)
    except OSError as e:
        raise ImageError(f"cannot read the header: {e.strerror}") from e
    is_qcow2 = head.startswith(QCOW2_MAGIC)
    if asked_format == "qcow2" and not is_qcow2:
        raise ImageError("format=qcow2, but the image has no qcow2 header")
    if asked_format == "raw":
        if is_qcow2:
            log.warning("image has a qcow2 header but format=raw: the guest gets its bytes as they are")
        fmt, virtual = "raw", size
    elif is_qcow2:
        fmt, virtual = "qcow2", _inspect_qcow2(fd, head)
    else:
        other = _other_format(head)
        if other is not None:
            raise ImageError(f"looks like a {other} image; vmbridge supports raw and qcow2 "
                             "(say format=raw to give the guest these bytes as they are)")
        fmt, virtual = "raw", size
    return ImageInfo(format=fmt, virtual_size=virtual, file_size=size,
                     block_device=stat.S_ISBLK(st.st_mode), identity=(st.st_dev, st.st_ino))


def _other_format(head: bytes) -> str | None:
    for magic, name in OTHER_MAGICS:
        if head.startswith(magic):
            return name
    if head[VDI_SIGNATURE_OFFSET:VDI_SIGNATURE_OFFSET + 4] == VDI_SIGNATURE:
        return "VDI"
    return None


def _inspect_qcow2(fd: int, head: bytes) -> int:
    if len(head) < 72:
        raise ImageError("truncated qcow2 header")
    (version, backing_offset, backing_size, _cluster_bits, virtual_size,
     crypt_method) = struct.unpack_from(">IQIIQI", head, 4)
    if version not in (2, 3):
        raise ImageError(f"qcow2 version {version} is not supported (corrupt header?)")
    if backing_offset:
        name = os.pread(fd, min(backing_size, 1023), backing_offset).decode("utf-8", "replace") \
            if 0 < backing_size else "?"
        raise ImageError(
            f"qcow2 image has a backing file ({name!r}); QEMU would open it by name, which "
            "vmbridge never allows: flatten it (qemu-img convert) or use ephemeral=on on its base")
    if crypt_method:
        raise ImageError("encrypted qcow2 images are not supported")
    if version == 3:
        if len(head) < 104:
            raise ImageError("truncated qcow2 v3 header")
        incompatible, = struct.unpack_from(">Q", head, 72)
        header_length, = struct.unpack_from(">I", head, 100)
        if incompatible & QCOW2_INCOMPAT_DATA_FILE or _has_extension(head, header_length, QCOW2_EXT_DATA_FILE):
            raise ImageError("qcow2 image has an external data file; QEMU would open it by name, "
                             "which vmbridge never allows")
    return virtual_size


def _has_extension(head: bytes, offset: int, wanted: int) -> bool:
    """Walk the qcow2 header extensions that fit in the first 4 KiB."""
    while 0 < offset <= len(head) - 8:
        ext_type, length = struct.unpack_from(">II", head, offset)
        if ext_type == 0:
            return False
        if ext_type == wanted:
            return True
        offset += 8 + ((length + 7) & ~7)
    return False


# -------------------------------------------------------------- overlays

def overlay_file(virtual_size: int, label: str) -> tuple[int, str]:
    """An anonymous read-write file for an ephemeral overlay: (fd, "memfd"|"tmpfile").

    A memfd up to OVERLAY_MEMFD_MAX of base virtual size, else an O_TMPFILE
    file in $VMBRIDGE_OVERLAY_DIR or /var/tmp. Neither ever has a name in the
    file system; both vanish when the last descriptor (QEMU's) closes. Where
    the file system has no O_TMPFILE, the overlay goes to a memfd (logged).
    """
    if virtual_size > OVERLAY_MEMFD_MAX:
        directory = os.environ.get("VMBRIDGE_OVERLAY_DIR") or OVERLAY_DIR
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), "tmpfile"
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.ENOENT, errno.EACCES, errno.EROFS):
                raise
            log.warning("%s: no O_TMPFILE in %s (%s): the overlay goes to a memfd (RAM)",
                        label, directory, e.strerror)
    return os.memfd_create(f"vmbridge-overlay-{label}", os.MFD_CLOEXEC), "memfd"


# -------------------------------------------------------------- io_uring

_SYS_IO_URING_SETUP = {"x86_64": 425, "aarch64": 425, "riscv64": 425, "ppc64le": 425, "s390x": 425}
_io_uring_allowed: bool | None = None


def host_allows_io_uring() -> bool:
    """Whether this kernel lets a process set up an io_uring (cached).

    One io_uring_setup(1) syscall, its ring closed at once: it fails with
    ENOSYS (old kernel, or seccomp), EPERM (kernel.io_uring_disabled=2, or =1
    without the io_uring_group) or EACCES (LSM). QEMU runs with the same
    kernel and, launched by us, under the same seccomp and credentials.
    """
    global _io_uring_allowed
    if _io_uring_allowed is None:
        _io_uring_allowed = _probe_io_uring()
    return _io_uring_allowed


def _probe_io_uring() -> bool:
    number = _SYS_IO_URING_SETUP.get(os.uname().machine)
    if number is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        fd = libc.syscall(ctypes.c_long(number), ctypes.c_uint(1), params)
    except (OSError, AttributeError):
        return False
    if fd < 0:
        log.info("io_uring not available on this host: %s", os.strerror(ctypes.get_errno()))
        return False
    os.close(fd)
    return True
