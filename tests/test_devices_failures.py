"""Every failing device step, through a real vmbridged: the start fails naming the device,
and nothing is left behind - no QEMU, no virtiofsd, no TAP, no fd in the daemon."""

from __future__ import annotations

import os
import subprocess

from leak_checks import fd_table, settle, warm_up
from vmbridge.machine.hostdev import find_vhost_user_backend


def test_failures_leave_nothing_behind(daemon, tmp_path):
    base = {"machine": "q35", "accel": "tcg", "memory": "64M"}
    baseline = warm_up(daemon)
    good = tmp_path / "good.raw"
    with open(good, "wb") as f:
        f.truncate(1 << 20)
    backed, corrupt = tmp_path / "backed.qcow2", tmp_path / "corrupt.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(good), str(backed)],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(corrupt), "8M"], check=True)
    with open(corrupt, "r+b") as f:
        f.seek(20)
        f.write((99).to_bytes(4, "big"))  # cluster_bits: QEMU refuses the image
    share = tmp_path / "share"
    share.mkdir()
    can_share = find_vhost_user_backend("fs") is not None and os.geteuid() == 0
    tap = f"vmbf{os.getpid() % 100000}"

    cases = [
        ("missing image", {"drive": [str(good), str(tmp_path / "missing.raw")]},
         "drive1: " + str(tmp_path / "missing.raw"), "No such file"),
        ("backing file", {"drive": [str(backed)]}, f"drive0: {backed}", "backing file"),
        ("format contradicts header", {"drive": [f"{good},format=qcow2"]}, f"drive0: {good}",
         "no qcow2 header"),
        ("share source missing", {"bind": [f"{tmp_path}/nodir:tag"]}, f"bind0: {tmp_path}/nodir:tag",
         "no such directory"),
        # QEMU refusing a command, after a virtiofsd and a TAP were started and two drives added
        ("corrupt qcow2", {"drive": [str(good), str(corrupt)], "network": [f"tap:{tap}", "user"],
                           **({"bind": [f"{share}:share"]} if can_share else {})},
         f"drive1: {corrupt}", "QEMU refused blockdev-add"),
    ]
    if not os.path.exists("/dev/vhost-vsock"):
        cases.append(("vsock=on without /dev/vhost-vsock", {"vsock": "on"}, "vsock", "/dev/vhost-vsock"))
    for index, (what, config, device, words) in enumerate(cases):
        name = f"fail{index}"
        reply = daemon.call("Create", {"config": {"name": name, **base, **config}})
        assert reply.get("error") == "io.vmbridge.Manager.SetupFailed", (what, reply)
        assert reply["parameters"]["device"] == device, (what, reply)
        assert words in reply["parameters"]["message"], (what, reply)
        children, fds = settle(daemon, baseline)
        assert not children, f"{what}: processes left: {children}"
        assert fds == baseline, f"{what}: daemon fds {fds}, was {baseline}: {fd_table(daemon)}"
        assert not daemon.qemu_processes(), what
        assert not os.path.exists(os.path.join(daemon.runtime_dir, "machines", name)), what
        assert daemon.call("List", {"name": name}).get("error") == "io.vmbridge.Manager.NoSuchMachine"
    assert not os.path.exists(f"/sys/class/net/{tap}")
    if can_share:  # the corrupt-qcow2 case did start one
        with open(daemon.log_path, encoding="utf-8", errors="replace") as f:
            assert "bind0: virtiofsd pid" in f.read()
