"""Persistent VM definitions: one hand-editable file per VM.

``<config-dir>/machines/NAME.conf`` holds ``key = value`` lines whose keys
are vmctl's option names (``memory``, ``pcie-ports``, ``drive``...); a key
that takes several values (drive, network, bind) is simply repeated. Blank
lines and lines starting with ``#`` are ignored. The file name gives the
VM's name. Example::

    # /etc/vmbridge/machines/web.conf
    memory = 2G
    cpus = 2
    drive = /var/lib/vmbridge/web.qcow2,format=qcow2
    network = user
    autostart = yes
"""

from __future__ import annotations

import dataclasses
import logging
import os

from vmbridge.machine.config import NAME_RE, ConfigError, MachineConfig

log = logging.getLogger("vmbridge.machine")

SUFFIX = ".conf"
LIST_FIELDS = ("drive", "network", "bind")
HEADER = "# vmbridge VM definition; keys are vmctl's option names (see vmbridge.conf(5)).\n"


def parse_definition(name: str, text: str) -> MachineConfig:
    """Parse one definition file's text; ConfigError names the line on a syntax error."""
    values: dict = {"name": name}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"line {lineno}", f"expected 'key = value', got {raw!r}")
        field = key.strip().replace("-", "_")
        value = value.strip()
        if field == "name":
            raise ConfigError(f"line {lineno}", "the name is the file's name, not a key")
        if field in LIST_FIELDS:
            values.setdefault(field, []).append(value)
        elif field in values:
            raise ConfigError(field, f"line {lineno}: set twice")
        else:
            values[field] = value
    return MachineConfig.from_dict(values)


def format_definition(config: MachineConfig) -> str:
    lines = [HEADER]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "name" or value == field.default:
            continue
        key = field.name.replace("_", "-")
        if field.name in LIST_FIELDS:
            lines += [f"{key} = {v}\n" for v in value]
        elif isinstance(value, bool):
            lines.append(f"{key} = {'yes' if value else 'no'}\n")
        elif field.name == "memory":
            lines.append(f"{key} = {value}M\n")
        else:
            lines.append(f"{key} = {value}\n")
    return "".join(lines)


class Definitions:
    """The definition files of one configuration directory."""

    def __init__(self, config_dir: str):
        self.directory = os.path.join(config_dir, "machines")

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name + SUFFIX)

    def load_all(self) -> dict[str, MachineConfig]:
        """Every valid definition; a broken file is logged and skipped, never fatal."""
        out = {}
        try:
            entries = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return out
        for entry in entries:
            if not entry.endswith(SUFFIX):
                continue
            name = entry[: -len(SUFFIX)]
            if not NAME_RE.match(name):
                log.error("%s: not a valid VM name; definition ignored", os.path.join(self.directory, entry))
                continue
            try:
                with open(self.path(name), encoding="utf-8") as f:
                    out[name] = parse_definition(name, f.read())
            except (OSError, UnicodeDecodeError, ConfigError) as e:
                log.error("%s: definition ignored: %s", self.path(name), e)
        return out

    def save(self, config: MachineConfig) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        path = self.path(config.name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(format_definition(config))
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass
