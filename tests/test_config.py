"""The VM config model and definition files: every bad value is refused by name."""

from __future__ import annotations

import os

import pytest

from vmbridge.machine.config import ConfigError, MachineConfig, parse_size_mib
from vmbridge.machine.definitions import Definitions, format_definition, parse_definition


def test_defaults_and_round_trip():
    config = MachineConfig.from_dict({"name": "web-1", "memory": "2G", "cpus": 2})
    assert config.memory == 2048 and config.cpus == 2 and config.machine == "q35"
    assert config.qemu.startswith("/") and os.access(config.qemu, os.X_OK)
    assert MachineConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["", "-x", "../x", "a/b", ".hidden", "x" * 65, "a,b", "a b", "a\0b", "é", 5, None])
def test_bad_names(name):
    with pytest.raises(ConfigError) as info:
        MachineConfig.from_dict({"name": name})
    assert info.value.field == "name"


@pytest.mark.parametrize("field,value", [
    ("cpus", 0), ("cpus", "two"), ("cpus", True), ("cpus", 10_000),
    ("memory", "lots"), ("memory", "0"), ("memory", "1.5G"), ("memory", True),
    ("machine", "q35,accel=kvm"), ("machine", "-q35"), ("machine", ""),
    ("firmware", "coreboot"), ("accel", "hvf"),
    ("linux", "relative/vmlinuz"), ("linux", "/nonexistent/vmlinuz"),
    ("qemu", "/nonexistent/qemu"), ("qemu", "-x"), ("qemu", "bin/qemu"),
    ("append", "a\nb"), ("append", "x" * 5000),
    ("autostart", "maybe"), ("vsock", "sometimes"), ("pcie_ports", 99),
    ("bogus", 1),
])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ConfigError) as info:
        MachineConfig.from_dict({"name": "vm", field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_initrd_needs_kernel(tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        MachineConfig.from_dict({"name": "vm", "initrd": str(initrd)})
    assert info.value.field == "initrd"


def test_sizes():
    assert parse_size_mib("512M") == 512
    assert parse_size_mib("1GiB") == 1024
    assert parse_size_mib(256) == 256
    assert parse_size_mib("2048K") == 2


def test_definition_files(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    text = f"""
# a comment
memory = 1G
cpus=2
linux = {kernel}
append = console=ttyS0 quiet
pcie-ports = 2
autostart = yes
"""
    config = parse_definition("web", text)
    assert (config.name, config.memory, config.cpus, config.autostart, config.pcie_ports) == ("web", 1024, 2, True, 2)
    assert config.append == "console=ttyS0 quiet"
    assert parse_definition("web", format_definition(config)) == config

    with pytest.raises(ConfigError) as info:
        parse_definition("web", "memory = 1G\nmemory = 2G\n")
    assert info.value.field == "memory"
    with pytest.raises(ConfigError):
        parse_definition("web", "just words\n")

    defs = Definitions(str(tmp_path / "etc"))
    defs.save(config)
    (tmp_path / "etc" / "machines" / "broken.conf").write_text("cpus = many\n")
    (tmp_path / "etc" / "machines" / "..bad.conf").write_text("")
    assert list(defs.load_all()) == ["web"]  # broken files are skipped, never fatal
    defs.delete("web")
    assert defs.load_all() == {}
