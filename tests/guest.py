"""The demo/test guest for tests: where it is, building it when needed, reading it.

The guest is Debian's kernel plus a busybox initramfs, built by
``contrib/guest/build-guest`` (see contrib/guest/README.md)::

    from guest import require_guest
    g = require_guest()
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256",
            "-kernel", g.kernel, "-initrd", g.initrd, "-append", g.cmdline, ...]

Everything the guest tells goes to its serial console as lines starting with
``vmbridge-guest: ``; :func:`parse_line` splits one.  Standard library only.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDER = os.path.join(REPO, "contrib", "guest", "build-guest")

#: The kernel command line to boot the guest with (build-guest records the
#: same in manifest.json).  Append ``vmbridge.*`` hooks to it as needed.
CMDLINE = "console=ttyS0 quiet panic=-1 cryptomgr.notests"

#: What starts every line the guest prints for programs.
PREFIX = "vmbridge-guest: "
#: The root shell's prompt on the console.  busybox's line editor may follow
#: it with ESC[6n (a cursor position query); it needs no answer.
PROMPT = "vmbridge-guest# "
#: What ``vmbridge.write=DEV`` puts in DEV's first 4096 bytes.
WRITE_PATTERN = b"VMBRIDGE-PATTERN" * 256

#: Boot to the "up" line under TCG with -m 256 and one vCPU takes about
#: 2 s with ``kernel`` (4 s with ``bzimage``); allow for a loaded machine.
BOOT_TIMEOUT = 60


class Guest(NamedTuple):
    dir: str
    #: Kernel to pass to -kernel: the uncompressed PVH ELF (``vmlinux``) when
    #: there is one, booting twice as fast under TCG; it needs QEMU's default
    #: BIOS firmware (SeaBIOS).  With OVMF (UEFI), use ``bzimage``.
    kernel: str
    #: Debian's compressed kernel (``vmlinuz``): boots with any firmware.
    bzimage: str
    initrd: str
    cmdline: str
    manifest: dict


def guest_dir() -> str:
    """``$VMBRIDGE_GUEST_DIR``, else the repository's ``.cache/guest``."""
    return os.environ.get("VMBRIDGE_GUEST_DIR") or os.path.join(REPO, ".cache", "guest")


_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _require(directory: str) -> Guest:
    # Fast path without apt: the guest there was built from this checkout's
    # build-guest and init.  Otherwise build (or rebuild) it; build-guest
    # locks the directory, so parallel test processes build it once.
    for extra in (["--offline"], []):
        proc = subprocess.run([sys.executable, BUILDER, "--out", directory, *extra],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode == 0:
            break
    else:
        raise RuntimeError(f"{BUILDER} --out {directory} failed:\n{proc.stderr}")
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    vmlinux = os.path.join(directory, "vmlinux")
    bzimage = os.path.join(directory, "vmlinuz")
    return Guest(
        dir=directory,
        kernel=vmlinux if "vmlinux" in manifest and os.path.exists(vmlinux) else bzimage,
        bzimage=bzimage,
        initrd=os.path.join(directory, "initramfs.img"),
        cmdline=manifest.get("cmdline", CMDLINE),
        manifest=manifest,
    )


def require_guest() -> Guest:
    """The guest in :func:`guest_dir`, built first if it is missing or stale.

    Raises RuntimeError (with build-guest's output) if it can't be built,
    e.g. with no network on a machine that never had it.
    """
    with _lock:
        return _require(os.path.abspath(guest_dir()))


def parse_line(line: str | bytes):
    """Split one console line of the guest's into ``(kind, words, fields)``.

    ``"vmbridge-guest: block vda size=1048576 ro=0"`` gives
    ``("block", ["vda"], {"size": "1048576", "ro": "0"})``; lines that aren't
    the guest's give None.  ``cat`` and ``ls`` lines carry text: use the raw
    line for those.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    start = line.find(PREFIX)
    if start < 0:
        return None
    parts = line[start + len(PREFIX):].strip().split()
    if not parts:
        return None
    words, fields = [], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key.isidentifier():
            fields[key] = value
        else:
            words.append(part)
    return parts[0], words, fields
