"""Conveniences built only on ``QMPClient.execute``: capability probes and
the file-descriptor commands.

Capability probes read QEMU's ``query-qmp-schema`` (fetched once per
connection, ~200 KB on QEMU 7.2) through :class:`.schema.SchemaIndex`; see
:mod:`.schema` for how types are named by paths, since the schema hides type
names.

The fd commands, and who owns what:

``getfd`` / ``closefd``
    QEMU keeps the fd that came with ``getfd`` under a name, for commands
    that take an fd name (``netdev_add`` tap ``fd=name``, ...), until
    ``closefd`` or a consumer takes it.
``add-fd`` / ``remove-fd``
    QEMU adds the fd to an fd set, usable as ``/dev/fdset/N`` wherever QEMU
    opens a path (``blockdev-add`` ``filename``).  QEMU 7.2 closes removed
    members only while the VM runs (not under ``-S`` or when paused).

In all of them the caller's fd stays the caller's: QEMU got a duplicate.
"""

from __future__ import annotations

import gevent.lock

from .schema import SchemaIndex


class CommandWrappers:
    """Mixed into QMPClient; needs only ``self.execute``."""

    def __init__(self):
        self._schema: SchemaIndex | None = None
        self._schema_lock = gevent.lock.Semaphore()

    def schema(self, *, timeout: float | None = None) -> list:
        """QEMU's ``query-qmp-schema``, fetched once and cached."""
        return self._schema_index(timeout).entries

    def _schema_index(self, timeout: float | None = None) -> SchemaIndex:
        if self._schema is None:
            with self._schema_lock:  # concurrent first callers share one fetch
                if self._schema is None:
                    self._schema = SchemaIndex(
                        self.execute("query-qmp-schema", timeout=timeout))
        return self._schema

    def has_command(self, name: str) -> bool:
        return self._schema_index().has(name, "command")

    def has_event(self, name: str) -> bool:
        return self._schema_index().has(name, "event")

    def schema_has_member(self, type_or_command: str, member: str) -> bool:
        """Whether a command's arguments, an event's data, or a type (a path
        or a name from ``schema.KNOWN_TYPES``) has ``member``: an object or
        union-branch member, an alternate branch's member or an enum value.
        E.g. ``("blockdev-add", "driver")``, ``("BlockdevAioOptions",
        "io_uring")``, ``("blockdev-add/driver=file", "aio")``."""
        return self._schema_index().has_member(type_or_command, member)

    def schema_lookup(self, path: str) -> dict | None:
        """The schema entry a path names, or None if this QEMU lacks it."""
        return self._schema_index().resolve(path)

    # -- file descriptor helpers --------------------------------------------

    def getfd(self, fd: int, fdname: str) -> None:
        """Give QEMU a duplicate of ``fd`` under ``fdname`` (for commands
        that take an fd name).  The caller still owns and closes ``fd``."""
        self.execute("getfd", {"fdname": fdname}, fds=(fd,))

    def closefd(self, fdname: str) -> None:
        """Make QEMU close its fd named ``fdname``."""
        self.execute("closefd", {"fdname": fdname})

    def add_fd(self, fd: int, *, fdset_id: int | None = None,
               opaque: str | None = None) -> dict:
        """Add a duplicate of ``fd`` to an fd set (``/dev/fdset/N`` paths).
        Returns ``{"fdset-id": N, "fd": M}`` (M is QEMU's fd number)."""
        arguments = {}
        if fdset_id is not None:
            arguments["fdset-id"] = fdset_id
        if opaque is not None:
            arguments["opaque"] = opaque
        return self.execute("add-fd", arguments, fds=(fd,))

    def remove_fd(self, fdset_id: int, fd: int | None = None) -> None:
        """Remove QEMU's fd ``fd`` (its number) or, without it, the whole set."""
        arguments = {"fdset-id": fdset_id}
        if fd is not None:
            arguments["fd"] = fd
        self.execute("remove-fd", arguments)
