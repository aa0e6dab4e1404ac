"""The device plane's QMP plumbing on a real QEMU without a guest (q35, no kernel: the
vCPUs only ever run SeaBIOS), with the Machine in this process so QMP can be watched
and the schema faked."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import pytest

from vmbridge.machine import Machine, MachineConfig, MachineError
from vmbridge.machine import devices as dev
from vmbridge.machine import setup, storage
from vmbridge.qmp.schema import SchemaIndex

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")


def tap_possible() -> bool:
    try:
        from vmbridge.machine.hostdev import open_tap
        os.close(open_tap("vmbprobe0"))
        return True
    except Exception:
        return False


@pytest.fixture
def warm_gevent():
    """Let gevent create its lazy fds (child watcher...) before the leak check's snapshot."""
    import gevent.subprocess
    gevent.subprocess.run(["true"], check=True)


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def test_plumbing_fallback_aio_hotplug_rollback(tmp_path, monkeypatch, caplog, warm_gevent, no_leaks):
    caplog.set_level(logging.INFO, logger="vmbridge.machine")
    # The fallback path: this QEMU "lacks" io_uring in its schema.
    real_has_member = SchemaIndex.has_member
    monkeypatch.setattr(SchemaIndex, "has_member", lambda self, path, member: False
                        if (path, member) == ("BlockdevAioOptions", "io_uring") else
                        real_has_member(self, path, member))
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    monkeypatch.setenv("VMBRIDGE_OVERLAY_DIR", str(overlays))
    small = sparse(tmp_path / "small.raw", 4 << 20)
    big = sparse(tmp_path / "big.raw", 1 << 30)  # above OVERLAY_MEMFD_MAX: an O_TMPFILE overlay
    name = f"vmbq{os.getpid() % 100000}"
    tap = f"vmbq{os.getpid() % 100000}"
    networks = ["user"] + ([f"tap:{tap}"] if tap_possible() else [])
    config = MachineConfig.from_dict({
        "name": name, "machine": "q35", "accel": "tcg", "memory": "64M", "pcie_ports": 2,
        "drive": [f"{small},serial=small", f"{big},ephemeral=on"], "network": networks,
        "vsock": "auto"})
    machine = Machine(config, str(tmp_path / "vm"), command_timeout=10)
    sent = []
    real_execute = machine.execute

    def spy(command, arguments=None, **kwargs):
        sent.append((command, arguments))
        return real_execute(command, arguments, **kwargs)

    monkeypatch.setattr(machine, "execute", spy)
    machine.start()
    try:
        devices = machine.devices
        # AIO: no io_uring anywhere, and the log says why, per drive
        file_nodes = [a for c, a in sent if c == "blockdev-add" and a["driver"] == "file"]
        assert len(file_nodes) == 3 and all("aio" not in a for a in file_nodes)
        assert all(d.aio == "threads (io_uring: not in this QEMU's schema)" for d in devices.drives.values())
        assert caplog.text.count("aio=threads (io_uring: not in this QEMU's schema)") == 2
        # QEMU got fdsets, never a path
        assert all(a["filename"].startswith("/dev/fdset/") for a in file_nodes)
        assert not any(small in str(a) or big in str(a) for _, a in sent)
        # the ephemeral overlay: an O_TMPFILE file that never had a name
        assert devices.drives["drive1"].overlay == "tmpfile"
        qemu_fds = [os.readlink(f"/proc/{machine.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{machine.pid}/fd")]
        assert any(t.startswith(str(overlays)) and t.endswith("(deleted)") for t in qemu_fds), qemu_fds
        assert os.listdir(overlays) == []
        creates = [a for c, a in sent if c == "blockdev-create"]
        assert creates == [{"job-id": "vmb-create-drive1", "options": {
            "driver": "qcow2", "file": "vmb-drive1-ovl-file", "size": 1 << 30}}]
        assert ("job-dismiss", {"id": "vmb-create-drive1"}) in sent
        # root ports: one per boot device, plus the free ones; vsock=auto skipped here
        slots = 2 + len(networks)
        assert devices.ports == [f"vmb-rp{i}" for i in range(slots + 2)]
        assert devices.free_ports == ["vmb-rp%d" % i for i in range(slots, slots + 2)]
        if not os.path.exists("/dev/vhost-vsock"):
            assert "vsock=auto: no vsock device" in caplog.text
        # NICs: the stable MAC, no option ROM; the TAP exists while QEMU holds it
        for index, nic in enumerate(devices.nics):
            assert machine.execute("qom-get", {"path": nic["device"], "property": "mac"}) == \
                dev.stable_mac(name, index)
        if len(networks) == 2:
            assert os.path.exists(f"/sys/class/net/{tap}")
        # ownership, for AcquireQMP
        owned = devices.owned_ids()
        assert {"vmb-drive0", "vmb-drive1", "vmb-nic0", "vmb-rp0"} <= owned["devices"]
        assert {"vmb-drive0", "vmb-drive0-file", "vmb-drive1", "vmb-drive1-base",
                "vmb-drive1-base-file", "vmb-drive1-ovl-file"} == owned["nodes"]
        assert len(owned["fdsets"]) == 3 and owned["fdnames"] == frozenset() and not owned["jobs"]
        assert {"qmp", "qmp-reattach", "serial0"} <= owned["chardevs"]
        assert devices.owns("nodes", "vmb-drive0-file") and devices.owns("devices", "vmb-future")
        assert not devices.owns("nodes", "guest-node") and not devices.owns("fdsets", 999)
        nodes_before = {n["node-name"] for n in machine.execute("query-named-block-nodes", {"flat": True})}
        fdsets_before = {s["fdset-id"] for s in machine.execute("query-fdsets")}

        # hotplug that fails half-way is rolled back: QEMU refuses the corrupt qcow2's format node
        corrupt = tmp_path / "corrupt.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(corrupt), "8M"], check=True)
        with open(corrupt, "r+b") as f:
            f.seek(20)
            f.write((99).to_bytes(4, "big"))  # cluster_bits
        fd = os.open(corrupt, os.O_RDWR | os.O_CLOEXEC)
        try:
            with pytest.raises(setup.StepFailed, match="storage bad: QEMU refused blockdev-add"):
                machine.storage.add_storage("bad", "format=qcow2", fd)
        finally:
            os.close(fd)
        assert devices.owned_ids() == owned and "bad" not in devices.drives
        assert {n["node-name"] for n in machine.execute("query-named-block-nodes", {"flat": True})} == nodes_before
        assert {s["fdset-id"] for s in machine.execute("query-fdsets")} == fdsets_before
        assert len(devices.free_ports) == 2

        # a good one, then its backing replaced by a copy; no guest: the unplug times out
        hot = sparse(tmp_path / "hot.raw", 2 << 20)
        shutil.copy(hot, tmp_path / "hot2.raw")
        fd = os.open(hot, os.O_RDWR | os.O_CLOEXEC)
        try:
            drive = machine.storage.add_storage("hot", "serial=hot", fd)
            with pytest.raises(storage.StorageExists):
                machine.storage.add_storage("hot", None, fd)
        finally:
            os.close(fd)
        assert drive.port == f"vmb-rp{slots}" and drive.aio.startswith("threads")
        with pytest.raises(storage.StorageImmutable):
            machine.storage.remove_storage("drive0")
        with pytest.raises(storage.NoSuchStorage):
            machine.storage.replace_storage("nope", 0)
        old_fdset = drive.file_fdset
        fd = os.open(tmp_path / "hot2.raw", os.O_RDWR | os.O_CLOEXEC)
        try:
            machine.storage.replace_storage("hot", fd)
        finally:
            os.close(fd)
        nodes = {n["node-name"]: n for n in machine.execute("query-named-block-nodes", {"flat": True})}
        key = drive.key
        assert f"{key}-file1" in nodes and f"{key}-file" not in nodes
        assert drive.nodes == [f"{key}-file1", key] and drive.file_fdset != old_fdset
        assert old_fdset not in {s["fdset-id"] for s in machine.execute("query-fdsets")}
        with pytest.raises(storage.UnplugTimeout):
            machine.storage.remove_storage("hot", timeout=0.5)
        assert drive.state == "removing"

        # a restarted vmbridged rebuilds the bookkeeping from state.json
        adopted = Machine.adopt(machine.directory, command_timeout=10)
        try:
            assert adopted.devices.owned_ids() == devices.owned_ids()
            assert adopted.devices.drives["hot"].to_dict() == drive.to_dict()
            assert adopted.devices.free_ports == devices.free_ports
        finally:
            adopted.detach()
    finally:
        machine.terminate()
    assert machine.devices.owned_ids()["devices"]  # the record stays readable after the end
    if len(networks) == 2:
        assert not os.path.exists(f"/sys/class/net/{tap}")  # transient TAP: gone with QEMU's fd


def test_setup_failure_leaves_nothing(tmp_path, warm_gevent, no_leaks):
    """A failing step after QEMU started: QEMU killed, fds closed, virtiofsd stopped."""
    if setup.hostdev.find_vhost_user_backend("fs") is None or os.geteuid() != 0:
        pytest.skip("needs virtiofsd, as root")
    share = tmp_path / "share"
    share.mkdir()
    good = sparse(tmp_path / "good.raw", 1 << 20)
    config = MachineConfig.from_dict({
        "name": "vmbfail", "machine": "q35", "accel": "tcg", "memory": "64M",
        "drive": [good, good],  # the same image twice: QEMU cannot take the write lock again
        "bind": [f"{share}:share"]})
    machine = Machine(config, str(tmp_path / "vm"), command_timeout=10)
    with pytest.raises(MachineError) as info:
        machine.start()
    assert info.value.device == f"drive1: {good}"
    assert "lock" in info.value.message
    assert machine.process.exited and not os.path.exists(tmp_path / "vm")
