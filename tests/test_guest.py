"""The demo/test guest itself, on a bare QEMU (no vmbridge): it boots, reports
its disks, follows hotplug, answers on the serial shell, comes up again after
system_reset, powers off on system_powerdown, and runs its cmdline hooks.

One QEMU at a time, TCG, -m 256, one vCPU; each is killed by pid on every path.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time

import pytest

from guest import PREFIX, PROMPT, WRITE_PATTERN, parse_line, require_guest

QEMU = os.environ.get("VMBRIDGE_QEMU", "qemu-system-x86_64")
TIMEOUT = 60
VIRTIOFSD = next((p for p in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
                  if os.access(p, os.X_OK)), shutil.which("virtiofsd"))


class BareVM:
    """QEMU with its QMP monitor and serial port on unix sockets in tmp."""

    def __init__(self, tmp, guest, extra=(), append=""):
        self.qmp_path = os.path.join(tmp, "qmp.sock")
        serial_path = os.path.join(tmp, "serial.sock")
        argv = [QEMU, "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
                "-nodefaults", "-display", "none", "-S",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-chardev", f"socket,id=ser0,path={serial_path},server=on,wait=off",
                "-serial", "chardev:ser0",
                "-kernel", guest.kernel, "-initrd", guest.initrd,
                "-append", f"{guest.cmdline} {append}".strip(), *extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.out = b""
        self.events = []
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (os.path.exists(self.qmp_path) and os.path.exists(serial_path)):
                assert self.proc.poll() is None, f"QEMU exited with {self.proc.returncode}"
                assert time.monotonic() < deadline, "QEMU made no sockets"
                time.sleep(0.02)
            self.serial = socket.socket(socket.AF_UNIX)
            self.serial.connect(serial_path)
            self.qmp_sock = socket.socket(socket.AF_UNIX)
            self.qmp_sock.connect(self.qmp_path)
            self.qmp_file = self.qmp_sock.makefile("rwb")
            assert "QMP" in json.loads(self.qmp_file.readline())
            self.qmp("qmp_capabilities")
            self.qmp("cont")
        except BaseException:
            self.kill()
            raise

    def qmp(self, command, **arguments):
        self.qmp_file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.qmp_file.flush()
        while True:
            line = self.qmp_file.readline()
            assert line, f"QMP closed during {command}"
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            assert "return" in msg, f"{command}: {msg}"
            return msg["return"]

    def expect(self, pattern, start=0, timeout=TIMEOUT):
        """Wait for regex pattern in the console output from offset start."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.out, start)
            if m:
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in console output:\n{self.out[-3000:].decode(errors='replace')}"
            if select.select([self.serial], [], [], min(left, 0.2))[0]:
                data = self.serial.recv(65536)
                assert data or self.proc.poll() is None, "serial closed"
                self.out += data

    def lines(self, start=0):
        return [parse_line(line) for line in self.out[start:].splitlines() if PREFIX.encode() in line]

    def type(self, text):
        self.serial.sendall(text.encode())

    def wait_exit(self, timeout=TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def drain_events(self):
        self.qmp_sock.settimeout(1)
        try:
            for line in self.qmp_file:
                self.events.append(json.loads(line))
        except (OSError, ValueError):
            pass
        return self.events

    def kill(self):
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(TIMEOUT)
        for name in ("serial", "qmp_file", "qmp_sock"):
            if hasattr(self, name):
                getattr(self, name).close()


@pytest.fixture(scope="module")
def guest():
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    return require_guest()


def test_guest_lifecycle(guest, tmp_path):
    disk = tmp_path / "disk.img"
    hotdisk = tmp_path / "hot.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    with open(hotdisk, "wb") as f:
        f.truncate(4 << 20)
    vm = BareVM(str(tmp_path), guest, extra=[
        "-drive", f"file={disk},if=none,id=d0,format=raw",
        "-device", "virtio-blk-pci,drive=d0,serial=boot-disk",
        "-device", "pcie-root-port,id=rp1,chassis=1",
    ], append="vmbridge.write=/dev/vda vmbridge.read=/dev/vda")
    try:
        up = vm.expect(r"vmbridge-guest: up kernel=(\S+) ")
        assert up.group(1).decode() == guest.manifest["kernel"]["release"]
        vm.expect(r"vmbridge-guest: ready")
        lines = vm.lines()
        assert ("block", ["vda"], {"size": str(8 << 20), "ro": "0", "serial": "boot-disk"}) in lines
        assert ("write", ["/dev/vda", "ok"], {"bytes": "4096"}) in lines
        assert any(kind == "read" and f.get("pattern") == "yes" for kind, _w, f in lines)
        assert not any(kind == "modules" and "failed" in f for kind, _w, f in lines)
        with open(disk, "rb") as f:
            assert f.read(4096) == WRITE_PATTERN
        vm.expect(r"heartbeat \d+ blocks=vda ")

        # The serial console is a shell.
        vm.expect(re.escape(PROMPT))
        mark = len(vm.out)
        vm.type("echo hi $((6 * 7))\r")
        vm.expect(r"hi 42", mark)

        # Hotplug and unplug show in the heartbeat.
        mark = len(vm.out)
        vm.qmp("blockdev-add", driver="file", filename=str(hotdisk), **{"node-name": "hot0"})
        vm.qmp("device_add", driver="virtio-blk-pci", drive="hot0", id="hot", bus="rp1")
        vm.expect(r"block-added vdb size=4194304 ro=0", mark)
        vm.expect(r"heartbeat \d+ blocks=vda,vdb ", mark)
        mark = len(vm.out)
        vm.qmp("device_del", id="hot")
        vm.expect(r"block-removed vdb", mark)
        vm.expect(r"heartbeat \d+ blocks=vda ", mark)

        # system_reset: the guest boots again.
        mark = len(vm.out)
        vm.qmp("system_reset")
        vm.expect(r"vmbridge-guest: up ", mark)
        vm.expect(r"vmbridge-guest: heartbeat 0 ", mark)

        # system_powerdown: the ACPI power button powers it off.
        started = time.monotonic()
        vm.qmp("system_powerdown")
        assert vm.wait_exit() == 0, "guest did not power off"
        assert time.monotonic() - started < 20
        shutdowns = [e["data"] for e in vm.drain_events() if e["event"] == "SHUTDOWN"]
        assert shutdowns and shutdowns[-1]["reason"] == "guest-shutdown", vm.events
    finally:
        vm.kill()


@pytest.mark.skipif(VIRTIOFSD is None or os.geteuid() != 0, reason="needs virtiofsd, as root")
def test_guest_virtiofs_hooks(guest, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the host\nsecond line\n")
    (share / "empty").write_text("")
    sock = tmp_path / "vfs.sock"
    vfsd = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}",
                             "-o", "cache=none", "-o", "sandbox=chroot"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    vm = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            assert vfsd.poll() is None, vfsd.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline
            time.sleep(0.02)
        vm = BareVM(str(tmp_path), guest, extra=[
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine", "memory-backend=mem",
            "-chardev", f"socket,id=vfs,path={sock}",
            "-device", "vhost-user-fs-pci,chardev=vfs,tag=share0",
        ], append="vmbridge.mount=share0 vmbridge.cat=/mnt/share0/hello.txt "
                  "vmbridge.cat=/mnt/share0/missing vmbridge.heartbeat=0")
        vm.expect(r"vmbridge-guest: ready")
        time.sleep(2.5)  # heartbeat=0: no heartbeat lines in the meantime
        vm.expect(re.escape(PROMPT))
        vm.type("echo done-$((1 + 1))\r")
        vm.expect(r"done-2")
        text = vm.out.decode(errors="replace").replace("\r\n", "\n")
        assert "vmbridge-guest: mount share0 /mnt/share0 ok\n" in text
        assert "vmbridge-guest: ls /mnt/share0 empty\n" in text
        assert "vmbridge-guest: ls /mnt/share0 hello.txt\n" in text
        assert "vmbridge-guest: ls /mnt/share0 end entries=2\n" in text
        assert ("vmbridge-guest: cat /mnt/share0/hello.txt: hello from the host\n"
                "vmbridge-guest: cat /mnt/share0/hello.txt: second line\n"
                "vmbridge-guest: cat /mnt/share0/hello.txt end lines=2\n") in text
        assert "vmbridge-guest: cat /mnt/share0/missing missing\n" in text
        assert "heartbeat" not in text
    finally:
        if vm is not None:
            vm.kill()
        if vfsd.poll() is None:
            os.kill(vfsd.pid, signal.SIGKILL)
        vfsd.wait(TIMEOUT)
        vfsd.stderr.close()
