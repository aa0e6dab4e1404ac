"""The device plane as a guest sees it: one boot of the busybox test guest under a real
vmbridged, with six drives (virtio read-write raw and qcow2, read-only, ephemeral, NVMe,
SCSI), a user-mode NIC and a virtiofs share; then storage hotplug over the control
socket with a real fd. Everything is read from the guest's console report."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time

import pytest

from leak_checks import fd_table, settle, warm_up
from guest import BOOT_TIMEOUT, require_guest, parse_line
from vmbridge.machine import devices as dev
from vmbridge.machine import images
from vmbridge.machine.hostdev import find_vhost_user_backend
from vmbridge.varlink import VarlinkError
from vmbridge.varlink.client import Connection

MI = "io.systemd.MachineInstance"


class Console:
    def __init__(self, path):
        self.path = path

    def text(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def expect(self, pattern, start=0, timeout=BOOT_TIMEOUT):
        """The first match of `pattern` after offset `start`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = re.compile(pattern).search(text, start)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the console after {timeout}s:\n{text[start:][-3000:]}")
            time.sleep(0.1)

    def reports(self, kind, start=0, end=None):
        out = []
        for line in self.text()[start:end].splitlines():
            parsed = parse_line(line)
            if parsed and parsed[0] == kind:
                out.append(parsed)
        return out


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def image(path, size, head=b""):
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return str(path)


def test_guest_sees_devices_and_hotplug(daemon, tmp_path):
    g = require_guest()
    img = tmp_path / "img"
    img.mkdir()
    eph = image(img / "eph.raw", 24 << 20, os.urandom(4096))
    eph_sum = sha256(eph)
    qcow = str(img / "d2.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "32M"], check=True)
    drives = [f"{image(img / 'd1.raw', 16 << 20)},serial=d1", f"{qcow},serial=d2",
              f"{image(img / 'ro.raw', 8 << 20)},readonly=on,serial=ro", f"{eph},ephemeral=on,serial=eph",
              f"{image(img / 'nv.raw', 4 << 20)},if=nvme,serial=nv", f"{image(img / 'sc.raw', 6 << 20)},if=scsi"]
    share = tmp_path / "share"
    share.mkdir()
    token = os.urandom(8).hex()
    (share / "hello.txt").write_text(f"hello {token}\n")
    can_share = find_vhost_user_backend("fs") is not None and os.geteuid() == 0
    hooks = " vmbridge.write=/dev/vdd" + (" vmbridge.mount=share vmbridge.cat=/mnt/share/hello.txt"
                                          if can_share else "")
    baseline = warm_up(daemon)
    started = time.monotonic()
    daemon.create("devs", machine="q35", accel="tcg", memory="256M", linux=g.kernel, initrd=g.initrd,
                  append=g.cmdline + hooks, drive=drives, network=["user"],
                  bind=[f"{share}:share"] if can_share else [])
    created = time.monotonic() - started
    console = Console(os.path.join(daemon.runtime_dir, "machines", "devs", "console.log"))
    console.expect(r"vmbridge-guest: heartbeat 0 ")
    booted = time.monotonic() - started
    print(f"\nCreate (QEMU start + set-up of 6 drives, NIC, share): {created:.2f}s; "
          f"to the guest's first heartbeat: {booted:.2f}s")

    blocks = {words[0]: fields for _, words, fields in console.reports("block")}
    assert blocks["vda"] == {"size": str(16 << 20), "ro": "0", "serial": "d1"}
    assert blocks["vdb"] == {"size": str(32 << 20), "ro": "0", "serial": "d2"}
    assert blocks["vdc"] == {"size": str(8 << 20), "ro": "1", "serial": "ro"}
    assert blocks["vdd"] == {"size": str(24 << 20), "ro": "0", "serial": "eph"}
    assert blocks["nvme0n1"]["size"] == str(4 << 20) and blocks["nvme0n1"]["serial"] == "nv"
    assert blocks["sda"]["size"] == str(6 << 20)
    nets = {words[0]: fields for _, words, fields in console.reports("net")}
    assert nets["eth0"]["mac"] == dev.stable_mac("devs", 0)
    assert console.expect(r"vmbridge-guest: write /dev/vdd ok bytes=4096")
    if can_share:
        console.expect(r"vmbridge-guest: mount share /mnt/share ok")
        console.expect(rf"vmbridge-guest: cat /mnt/share/hello.txt: hello {token}")

    with open(daemon.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    expected_aio = "aio=io_uring" if images.host_allows_io_uring() else "aio=threads"
    assert log.count(expected_aio) == 6, log[-3000:]

    info = daemon.call("List", {"name": "devs"})["parameters"]["machines"][0]
    qemu_pid = info["pid"]
    targets = [os.readlink(f"/proc/{qemu_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu_pid}/fd")]
    assert any(t.startswith("/memfd:vmbridge-overlay-vmb-drive3") for t in targets), targets
    # No named overlay: every plain file QEMU holds is one of our images or its log.
    ours = {str(img / n) for n in os.listdir(img)} | {os.path.realpath(g.kernel), os.path.realpath(g.initrd),
                                                      os.path.join(daemon.runtime_dir, "machines", "devs", "qemu.log")}
    files = {t for t in targets if t.startswith("/") and not t.startswith(("/dev/", "/memfd:"))}
    assert files <= ours, files - ours

    # -- storage hotplug over the control socket, with real fds ------------------------
    ctl = daemon.control_socket("devs")
    hot = image(img / "hot.raw", 8 << 20)
    shutil.copy(hot, img / "hot-copy.raw")
    small = image(img / "small.raw", 1 << 20)

    def call(method, parameters, path=None, mode=os.O_RDWR):
        with Connection(ctl, timeout=60) as conn:
            if path is None:
                return conn.call(f"{MI}.{method}", parameters)
            fd = os.open(path, mode | os.O_CLOEXEC)
            try:
                return conn.call(f"{MI}.{method}", {"fileDescriptorIndex": 0, **parameters}, fds=[fd])
            finally:
                os.close(fd)

    def error(method, parameters, path=None, mode=os.O_RDWR):
        with pytest.raises(VarlinkError) as e:
            call(method, parameters, path, mode)
        return e.value.error, (e.value.parameters or {}).get("errnoName")

    mark = len(console.text())
    t0 = time.monotonic()
    assert call("AddStorage", {"name": "pool:hot", "config": "serial=hot"}, hot) == {}
    added = time.monotonic() - t0
    console.expect(r"vmbridge-guest: block-added vde size=8388608 ro=0 serial=hot", mark)
    seen_added = time.monotonic() - t0
    assert error("AddStorage", {"name": "pool:hot", "config": None}, small) == (f"{MI}.StorageExists", None)
    assert error("AddStorage", {"name": "x", "config": "if=ide"}, small) == (f"{MI}.ConfigNotSupported", None)
    assert error("AddStorage", {"name": "x", "config": "bogus"}, small) == (f"{MI}.BadConfig", None)
    assert error("AddStorage", {"name": "x", "config": "readonly=off"}, small, os.O_RDONLY) == \
        (f"{MI}.BadConfig", None)
    assert error("AddStorage", {"name": "x", "config": None}) == ("org.varlink.service.InvalidParameter", None)
    assert error("RemoveStorage", {"name": "drive0"}) == (f"{MI}.StorageImmutable", None)
    assert error("RemoveStorage", {"name": "nope"}) == (f"{MI}.NoSuchStorage", None)
    assert error("ReplaceStorage", {"name": "nope"}, small) == (f"{MI}.NoSuchStorage", None)
    assert error("ReplaceStorage", {"name": "drive1"}, small) == (f"{MI}.StorageImmutable", None)
    assert error("ReplaceStorage", {"name": "pool:hot"}, small) == ("io.systemd.System", "EMEDIUMTYPE")
    assert call("ReplaceStorage", {"name": "pool:hot"}, str(img / "hot-copy.raw")) == {}
    # a read-only fd and no config: a read-only disk
    assert call("AddStorage", {"name": "pool:ro", "config": None}, small, os.O_RDONLY) == {}
    console.expect(r"vmbridge-guest: block-added vdf size=1048576 ro=1", mark)
    # SCSI (on the controller made at start) and NVMe (a controller per disk, on a root port)
    assert call("AddStorage", {"name": "pool:sd", "config": "if=scsi"}, image(img / "sd.raw", 3 << 20)) == {}
    assert call("AddStorage", {"name": "pool:nv", "config": "if=nvme,serial=hotnv"},
                image(img / "hnv.raw", 5 << 20)) == {}
    console.expect(r"vmbridge-guest: block-added sdb size=3145728 ro=0", mark)
    console.expect(r"vmbridge-guest: block-added nvme1n1 size=5242880 ro=0 serial=hotnv", mark)
    mark = len(console.text())
    assert call("RemoveStorage", {"name": "pool:sd"}) == {}
    assert call("RemoveStorage", {"name": "pool:nv"}) == {}
    console.expect(r"vmbridge-guest: block-removed sdb", mark)
    console.expect(r"vmbridge-guest: block-removed nvme1n1", mark)
    mark = len(console.text())
    t0 = time.monotonic()
    assert call("RemoveStorage", {"name": "pool:hot"}) == {}
    removed = time.monotonic() - t0
    console.expect(r"vmbridge-guest: block-removed vde", mark)
    assert call("RemoveStorage", {"name": "pool:ro"}) == {}
    console.expect(r"vmbridge-guest: block-removed vdf", mark)
    print(f"AddStorage {added * 1000:.0f} ms (guest's block-added after {seen_added:.2f}s), "
          f"RemoveStorage {removed:.2f}s")
    targets = [os.readlink(f"/proc/{qemu_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu_pid}/fd")]
    assert not any(name in t for t in targets for name in ("hot", "small", "sd.raw", "hnv.raw")), targets

    # -- the end: base image untouched, nothing left ---------------------------------
    assert daemon.call("Terminate", {"name": "devs"}) == {}
    assert sha256(eph) == eph_sum
    children, fds = settle(daemon, baseline)
    assert not children, f"processes left: {children}"
    assert fds == baseline, f"daemon fds {fds}, was {baseline}: {fd_table(daemon)}"
    assert not daemon.qemu_processes()
