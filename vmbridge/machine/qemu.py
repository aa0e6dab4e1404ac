"""The QEMU binary: what it supports, and the command line vmbridged gives it.

The command line carries only what QMP cannot do after start-up: the machine
itself, its memory backend (shared memfd when the VM has virtiofs shares),
the PCIe root ports (pcie.0 takes no hotplugged devices; see
vmbridge.machine.setup), firmware, direct kernel boot, the serial port and
the QMP monitors. Everything else is set up over QMP between ``-S`` and
``cont`` (vmbridge.machine.setup).

QEMU never receives a path to open: every file is opened by vmbridged and
handed over as an inherited descriptor. Where an option only takes a file
name (``-kernel``, ``-initrd``), QEMU is given ``/proc/self/fd/N`` - its own
inherited descriptor - which it can reopen but which names no host path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess

log = logging.getLogger("vmbridge.machine")

_probe_cache: dict[tuple, "QemuBinary"] = {}
MEMORY_BACKEND_ID = "vmb-mem"

# Whole-image OVMF builds (code and variables in one file), usable with -bios.
OVMF_CANDIDATES = (
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/OVMF/OVMF.fd",
    "/usr/share/qemu/OVMF.fd",
    "/usr/share/edk2/ovmf/OVMF.fd",
)


class QemuProbeError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class QemuBinary:
    """Facts about one QEMU binary, learned by running it once (then cached)."""

    path: str
    version: tuple[int, int, int]
    version_text: str
    has_monitor_qmp_object: bool  # -object monitor-qmp (QEMU 10+ prefers it to -mon)

    @classmethod
    def probe(cls, path: str) -> "QemuBinary":
        """Probe `path`, cached by (path, size, mtime) so an upgraded binary is re-probed."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise QemuProbeError(f"{path}: {e.strerror}") from e
        key = (path, st.st_size, st.st_mtime_ns)
        cached = _probe_cache.get(key)
        if cached is not None:
            return cached
        version_text = (_run(path, "-version").splitlines() or [""])[0]
        m = re.search(r"version (\d+)\.(\d+)\.(\d+)", version_text)
        if not m:
            raise QemuProbeError(f"{path}: cannot read a version from {version_text!r}")
        version = tuple(int(x) for x in m.groups())
        # `-object help` lists the user-creatable types; monitor-qmp appears
        # there only in QEMUs that accept it (11+), 7.2 needs -mon.
        objects = _run(path, "-object", "help")
        binary = cls(
            path=path,
            version=version,
            version_text=version_text.strip(),
            has_monitor_qmp_object=bool(re.search(r"^\s*monitor-qmp\s*$", objects, re.M)),
        )
        log.debug("probed %s: version %s, monitor-qmp object: %s",
                  path, ".".join(map(str, version)), binary.has_monitor_qmp_object)
        _probe_cache[key] = binary
        return binary

    def monitor_args(self, chardev_id: str) -> list[str]:
        if self.has_monitor_qmp_object:
            return ["-object", f"monitor-qmp,id=mon-{chardev_id},chardev={chardev_id}"]
        return ["-mon", f"chardev={chardev_id},mode=control"]


def _run(path: str, *args: str) -> str:
    try:
        proc = subprocess.run([path, *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuProbeError(f"{path} {' '.join(args)}: {e}") from e
    if proc.returncode != 0:
        raise QemuProbeError(f"{path} {' '.join(args)} failed: {proc.stderr.strip()[:500]}")
    return proc.stdout


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def find_ovmf() -> str | None:
    return next((p for p in OVMF_CANDIDATES if os.path.isfile(p)), None)


def machine_args(config, binary: QemuBinary) -> list[str]:
    """The machine-shaping part of the command line (no descriptors yet)."""
    machine = config.machine
    memory_backend = []
    if config.bind and machine != "none":
        # virtiofs (vhost-user) needs guest RAM QEMU can share with virtiofsd.
        memory_backend = ["-object", f"memory-backend-memfd,id={MEMORY_BACKEND_ID},"
                                     f"size={config.memory}M,share=on"]
        machine += f",memory-backend={MEMORY_BACKEND_ID}"
    args = ["-name", f"guest={config.name},debug-threads=on",
            "-S", "-nodefaults", "-no-user-config", "-display", "none",
            *memory_backend, "-machine", machine]
    if config.machine != "none":
        accel = config.accel
        if accel == "auto":
            accel = "kvm" if kvm_usable() else "tcg"
        args += ["-accel", accel]
        args += ["-smp", str(config.cpus), "-m", f"{config.memory}M"]
    return args
