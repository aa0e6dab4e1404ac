"""Capability probes answered from ``query-qmp-schema``.

``query-qmp-schema`` returns QEMU's whole QAPI schema as a list of entries,
each with a ``name`` and a ``meta-type``:

``command``   ``arg-type`` / ``ret-type`` name the argument and return types
``event``     ``arg-type`` names the type of ``data``
``object``    ``members`` ``[{"name", "type", "default"?}]``; a (flat) union
              also has ``tag`` (a member name) and ``variants``
              ``[{"case": tag value, "type": object with that branch's extra
              members}]``
``enum``      ``values`` (and ``members`` with features, QEMU 6.2+)
``alternate`` ``members`` ``[{"type"}]``: the value is one of those types
``array``     ``element-type``
``builtin``   ``str``, ``int``, ``bool``, ``number``, ``null``, ``any``

Only command and event names are stable: QEMU replaces every type name by a
number ("0", "49", "523"...) that changes between builds.  So a probe names a
type by a **path** from a command or event:

``"blockdev-add"``
    the argument type of the command ``blockdev-add`` (for an event, the type
    of its ``data``);
``"blockdev-add/driver=file"``
    ... in the union branch where the tag member ``driver`` is ``file``;
``"blockdev-add/driver=file/aio"``
    ... the type of that branch's member ``aio`` (arrays are unwrapped to
    their element type);
``"query-status:return"``
    the return type of a command.

:data:`KNOWN_TYPES` maps the QAPI type names this project probes (as spelt in
QEMU's ``qapi/*.json``) to such paths, so ``"BlockdevAioOptions"`` works as
a path root too.  A name that looks like a type (CamelCase) but is neither in
that table nor a number raises ValueError, because no schema could ever answer
it; an unknown command or event simply has no members (older QEMU).

Member tests: an object has a member if it is one of its members or of any
of its union branches; an enum if it is one of its values; an alternate if
any of its branch types has it; an array if its element type has it.
"""

from __future__ import annotations

#: QAPI type name -> path (see the module docstring).  Extend as needed.
KNOWN_TYPES: dict[str, str] = {
    "BlockdevOptions": "blockdev-add",
    "BlockdevDriver": "blockdev-add/driver",
    "BlockdevOptionsFile": "blockdev-add/driver=file",
    "BlockdevAioOptions": "blockdev-add/driver=file/aio",
    "BlockdevCreateOptions": "blockdev-create/options",
    "ObjectOptions": "object-add",
    "ObjectType": "object-add/qom-type",
    "Netdev": "netdev_add",
    "NetClientDriver": "netdev_add/type",
    "JobStatus": "JOB_STATUS_CHANGE/status",
    "StatusInfo": "query-status:return",
    "RunState": "query-status:return/status",
}


class SchemaIndex:
    """The schema list plus a name index and path resolution."""

    def __init__(self, entries: list):
        if not isinstance(entries, list):
            raise TypeError("query-qmp-schema did not return a list")
        self.entries = entries
        self.by_name: dict[str, dict] = {
            entry["name"]: entry for entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("name"), str)}

    def has(self, name: str, meta_type: str) -> bool:
        entry = self.by_name.get(name)
        return entry is not None and entry.get("meta-type") == meta_type

    # -- path resolution ----------------------------------------------------

    def resolve(self, path: str) -> dict | None:
        """The schema entry a path names, or None if this QEMU lacks any step
        of it.  Raises ValueError for a type name no schema can resolve."""
        root, *steps = path.split("/")
        entry = self._resolve_root(root)
        for step in steps:
            if entry is None:
                return None
            entry = self._step(entry, step)
        return entry

    def _resolve_root(self, root: str) -> dict | None:
        if root in KNOWN_TYPES:
            return self.resolve(KNOWN_TYPES[root])
        wants_return = root.endswith(":return")
        if wants_return:
            root = root[:-len(":return")]
        entry = self.by_name.get(root)
        if entry is None:
            if root[:1].isupper() and not root.isupper():
                raise ValueError(
                    f"{root!r} looks like a QAPI type name; query-qmp-schema hides "
                    f"type names, so name it by a path from a command or event "
                    f"(e.g. 'blockdev-add/driver=file') or add it to KNOWN_TYPES")
            return None
        meta = entry.get("meta-type")
        if meta == "command":
            return self._type(entry.get("ret-type" if wants_return else "arg-type"))
        if meta == "event":
            return self._type(entry.get("arg-type"))
        return entry

    def _type(self, name) -> dict | None:
        """The entry of a type name, arrays unwrapped to their element."""
        entry = self.by_name.get(name) if isinstance(name, str) else None
        seen = 0
        while entry is not None and entry.get("meta-type") == "array" and seen < 16:
            entry = self.by_name.get(entry.get("element-type"))
            seen += 1
        return entry

    def _step(self, entry: dict, step: str) -> dict | None:
        if "=" in step:
            tag, case = step.split("=", 1)
            if entry.get("meta-type") != "object" or entry.get("tag") != tag:
                return None
            for variant in entry.get("variants", ()):
                if variant.get("case") == case:
                    return self._type(variant.get("type"))
            return None
        for member in self._object_members(entry, set()):
            if member.get("name") == step:
                return self._type(member.get("type"))
        return None

    def _object_members(self, entry: dict, seen: set):
        """Members of an object, its union branches and, for an alternate,
        of its object branches, depth first."""
        if entry is None or entry["name"] in seen:
            return
        seen.add(entry["name"])
        meta = entry.get("meta-type")
        if meta == "object":
            yield from entry.get("members", ())
            for variant in entry.get("variants", ()):
                yield from self._object_members(self._type(variant.get("type")), seen)
        elif meta == "alternate":
            for branch in entry.get("members", ()):
                yield from self._object_members(self._type(branch.get("type")), seen)

    # -- member probes ------------------------------------------------------

    def has_member(self, path: str, member: str) -> bool:
        """Whether the type a path names has ``member`` (a member name of an
        object, union branch or alternate branch, or a value of an enum)."""
        return self._has_member(self.resolve(path), member, set())

    def _has_member(self, entry: dict | None, member: str, seen: set) -> bool:
        if entry is None or entry["name"] in seen:
            return False
        seen.add(entry["name"])
        meta = entry.get("meta-type")
        if meta == "enum":
            return member in entry.get("values", ())
        if meta == "object":
            if any(m.get("name") == member for m in entry.get("members", ())):
                return True
            return any(self._has_member(self._type(v.get("type")), member, seen)
                       for v in entry.get("variants", ()))
        if meta == "alternate":
            return any(self._has_member(self._type(b.get("type")), member, seen)
                       for b in entry.get("members", ()))
        return False
