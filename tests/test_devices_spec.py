"""The device plane without QEMU: spec parsing, image headers, overlays, host helpers."""

from __future__ import annotations

import errno
import os
import struct
import subprocess

import pytest

from vmbridge.machine import devices as dev
from vmbridge.machine import hostdev, images
from vmbridge.machine.config import ConfigError, MachineConfig


def config(**fields):
    return MachineConfig.from_dict({"name": "vm", **fields})


# ------------------------------------------------------------------ specs

def test_drive_specs_parse():
    plan = config(drive=["/img/a.raw", "/img/b.qcow2,format=qcow2,readonly=on,if=nvme,serial=B-1",
                         "/img//c,ephemeral=on,if=scsi"]).devices()
    a, b, c = plan.drives
    assert a == dev.DriveSpec("/img/a.raw") and a.interface == "virtio" and not a.readonly
    assert b.path == "/img/b.qcow2" and b.format == "qcow2" and b.readonly and b.interface == "nvme"
    assert b.serial == "B-1"
    assert c.path == "/img/c" and c.options.ephemeral and c.interface == "scsi"
    assert plan.bus == "pcie" and plan.free_ports == 4
    # one slot per drive, one for the SCSI controller
    assert dev.boot_slot_count(plan) == 3


def test_vm_wide_ephemeral_spares_read_only_and_opted_out_drives():
    plan = config(ephemeral=True, drive=["/a", "/b,readonly=on", "/c,ephemeral=off"]).devices()
    assert [d.options.effective_ephemeral(plan.ephemeral) for d in plan.drives] == [True, False, False]


@pytest.mark.parametrize("spec, words", [
    ("relative.img", "absolute"),
    (",format=raw", "starts with the image's path"),
    ("/a,b/c", "a path cannot contain ','"),
    ("/a,format=vmdk", "not supported"),
    ("/a,format=qcow3", "expected raw or qcow2"),
    ("/a,if=ide", "not supported"),
    ("/a,if=virtio-blk", "expected virtio, nvme or scsi"),
    ("/a,readonly=perhaps", "readonly"),
    ("/a,serial=has space", "serial"),
    ("/a,serial=x\"y", "serial"),
    ("/a,serial=" + "s" * 21, "serial"),
    ("/a,cache=none", "not supported"),
    ("/a,bogus=1", "unknown option"),
    ("/a,format=raw,format=qcow2", "given twice"),
    ("/a,ephemeral=on,readonly=on", "contradict"),
])
def test_bad_drive_specs(spec, words):
    with pytest.raises(ConfigError) as info:
        config(drive=[spec])
    assert info.value.field == "drive" and words in info.value.message


@pytest.mark.parametrize("field, value, words", [
    ("network", "bridge", "expected user or tap:IFNAME"),
    ("network", "tap:", "interface name"),
    ("network", "tap:" + "x" * 16, "interface name"),
    ("network", "tap:a/b", "interface name"),
    ("network", ["tap:t0", "tap:t0"], "used twice"),
    ("bind", "/srv", "expected SOURCE:TAG"),
    ("bind", "srv:tag", "absolute"),
    ("bind", "/srv/a,b:tag", "cannot contain ','"),
    ("bind", "/srv/a\\b:tag", "cannot contain"),
    ("bind", "/srv:bad tag", "tag"),
    ("bind", "/srv:" + "t" * 37, "tag"),
    ("bind", ["/a:t", "/b:t"], "used twice"),
    ("drive", ["/a,serial=s", "/b,serial=s"], "used twice"),
])
def test_bad_device_specs_name_their_field(field, value, words):
    with pytest.raises(ConfigError) as info:
        config(**{field: value})
    assert info.value.field == field and words in info.value.message


def test_share_and_network_specs():
    plan = config(network=["user", "tap:vmtap0"], bind=["/srv/with:colon:data"]).devices()
    assert plan.networks == (dev.NetworkSpec("user"), dev.NetworkSpec("tap", "vmtap0"))
    assert plan.shares == (dev.ShareSpec("/srv/with:colon", "data"),)


def test_machine_none_has_no_bus():
    with pytest.raises(ConfigError) as info:
        config(machine="none", drive=["/a"])
    assert info.value.field == "drive"
    assert config(machine="none", vsock="auto").devices().bus == "none"
    assert config(machine="pc", drive=["/a"]).devices().free_ports == 0


def test_the_largest_config_fits_on_pcie0():
    plan = config(pcie_ports=32, drive=[f"/d{i}" for i in range(dev.MAX_DRIVES)],
                  network=["user"] * dev.MAX_NETWORKS, bind=[f"/s:t{i}" for i in range(dev.MAX_SHARES)],
                  vsock="on").devices()
    assert plan.free_ports + dev.boot_slot_count(plan) <= dev.MAX_ROOT_PORTS
    with pytest.raises(ConfigError) as info:
        config(drive=[f"/d{i}" for i in range(dev.MAX_DRIVES + 1)])
    assert info.value.field == "drive"


def test_storage_config_syntax():
    assert dev.parse_storage_config(None) == dev.DriveOptions()
    assert dev.parse_storage_config("") == dev.DriveOptions()
    assert dev.parse_storage_config("format=qcow2,readonly=on,if=scsi,serial=s1") == \
        dev.DriveOptions(format="qcow2", readonly=True, interface="scsi", serial="s1")
    for text in ("if=usb", "format=vdi", "discard=unmap"):
        with pytest.raises(dev.DriveOptionError) as info:
            dev.parse_storage_config(text)
        assert info.value.unsupported, text
    for text in ("nonsense", "format=", "x=1", "readonly=maybe", "a\nb", "serial=a b"):
        with pytest.raises(dev.DriveOptionError) as info:
            dev.parse_storage_config(text)
        assert not info.value.unsupported, text


def test_config_round_trips_with_devices():
    c = config(drive=["/a,format=raw"], network=["user"], bind=["/srv:s"], vsock="auto", pcie_ports=2)
    assert MachineConfig.from_dict(c.to_dict()) == c


def test_stable_mac():
    mac = dev.stable_mac("web", 0)
    assert mac == dev.stable_mac("web", 0) != dev.stable_mac("web", 1) != dev.stable_mac("db", 0)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert len(mac.split(":")) == 6


# ------------------------------------------------------------------ images

def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def inspect(path, fmt=None):
    fd = os.open(path, os.O_RDONLY)
    try:
        return images.inspect_image(fd, fmt)
    finally:
        os.close(fd)


def test_image_headers(tmp_path):
    raw, q = str(tmp_path / "a.raw"), str(tmp_path / "b.qcow2")
    with open(raw, "wb") as f:
        f.truncate(3 << 20)
    qemu_img("create", "-q", "-f", "qcow2", q, "64M")
    assert inspect(raw).format == "raw" and inspect(raw).virtual_size == 3 << 20
    info = inspect(q)
    assert info.format == "qcow2" and info.virtual_size == 64 << 20 and info.file_size < 1 << 20
    assert inspect(q, "raw").format == "raw"  # said explicitly: the bytes as they are
    with pytest.raises(images.ImageError, match="no qcow2 header"):
        inspect(raw, "qcow2")


def test_images_that_would_make_qemu_open_a_path(tmp_path):
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
    with pytest.raises(images.ImageError, match="backing file .*base.qcow2"):
        inspect(top)
    data = str(tmp_path / "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/d.data", data, "16M")
    with pytest.raises(images.ImageError, match="external data file"):
        inspect(data)


@pytest.mark.parametrize("head, name", [(b"KDMV", "VMDK"), (b"vhdxfile", "VHDX"), (b"QED\0", "QED"),
                                        (b"LUKS\xba\xbe", "LUKS")])
def test_other_formats_are_refused(tmp_path, head, name):
    path = tmp_path / "x.img"
    path.write_bytes(head + bytes(8192))
    with pytest.raises(images.ImageError, match=name):
        inspect(str(path))
    assert inspect(str(path), "raw").format == "raw"


def test_corrupt_qcow2_header(tmp_path):
    path = tmp_path / "bad.qcow2"
    path.write_bytes(b"QFI\xfb" + struct.pack(">I", 7) + bytes(200))
    with pytest.raises(images.ImageError, match="version 7"):
        inspect(str(path))


def test_image_fd_access_checks(tmp_path):
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        images.check_image_fd(fd, readonly=True)
        with pytest.raises(images.ImageError, match="read-only"):
            images.check_image_fd(fd, readonly=False)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        ro = images.reopen_readonly(fd)
        assert images.fd_access_mode(ro) == os.O_RDONLY
        assert os.fstat(ro).st_ino == os.fstat(fd).st_ino
        os.close(ro)
    finally:
        os.close(fd)
    with pytest.raises(images.ImageError, match="not a regular file"):
        images.open_image(str(tmp_path), readonly=True)
    with pytest.raises(images.ImageError, match="No such file"):
        images.open_image(str(tmp_path / "missing"), readonly=True)


def test_overlay_files(tmp_path, monkeypatch):
    monkeypatch.setenv("VMBRIDGE_OVERLAY_DIR", str(tmp_path))
    fd, kind = images.overlay_file(1 << 20, "t")
    assert kind == "memfd" and os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:vmbridge-overlay-t")
    os.close(fd)
    fd, kind = images.overlay_file(images.OVERLAY_MEMFD_MAX + 1, "t")
    try:
        assert kind == "tmpfile"
        assert os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
        assert os.listdir(tmp_path) == []  # never had a name
    finally:
        os.close(fd)


def test_io_uring_probe_is_a_cached_bool():
    assert images.host_allows_io_uring() in (True, False)
    assert images.host_allows_io_uring() is images.host_allows_io_uring()


# ------------------------------------------------------------- host helpers

def test_vhost_user_descriptors(tmp_path):
    low, high = tmp_path / "usr", tmp_path / "etc"
    low.mkdir()
    high.mkdir()
    exe = tmp_path / "fsd"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (low / "50-gpu.json").write_text('{"type": "gpu", "binary": "/bin/true"}')
    (low / "60-fs.json").write_text(f'{{"type": "fs", "binary": "{exe}"}}')
    (low / "40-fs.json").write_text('{"type": "fs", "binary": "/nonexistent/virtiofsd"}')
    assert hostdev.find_vhost_user_backend("fs", [str(low), str(high)]) == str(exe)
    (high / "60-fs.json").write_text("")  # an empty file masks it
    assert hostdev.find_vhost_user_backend("fs", [str(low), str(high)]) is None
    assert hostdev.find_vhost_user_backend("fs", []) is None


def test_debian_virtiofsd_is_found():
    if not os.path.exists("/usr/share/qemu/vhost-user/50-qemu-virtiofsd.json"):
        pytest.skip("no virtiofsd descriptor on this host")
    assert hostdev.find_vhost_user_backend("fs") == "/usr/lib/qemu/virtiofsd"


def test_guest_cid_retries_when_in_use():
    taken = set(list(hostdev.cid_candidates("vm", 3))[:2])
    tried = []

    def fake_ioctl(fd, request, arg):
        assert request == hostdev.VHOST_VSOCK_SET_GUEST_CID
        cid, = struct.unpack("=Q", arg)
        tried.append(cid)
        if cid in taken:
            raise OSError(errno.EADDRINUSE, "in use")

    cid = hostdev.claim_guest_cid(-1, "vm", ioctl=fake_ioctl)
    assert cid == tried[-1] and len(tried) == 3 and cid not in taken
    assert all(hostdev.FIRST_GUEST_CID <= c <= hostdev.LAST_GUEST_CID for c in tried)
    assert next(hostdev.cid_candidates("vm", 1)) == tried[0]  # stable per name
    with pytest.raises(hostdev.HostDeviceError, match="no free guest CID"):
        hostdev.claim_guest_cid(-1, "vm", attempts=2, ioctl=fake_ioctl)


def test_vsock_device_missing_is_a_clear_error(tmp_path):
    with pytest.raises(hostdev.HostDeviceError, match="has no .*vhost_vsock"):
        hostdev.open_vhost_vsock(str(tmp_path / "vhost-vsock"))
