"""What a raw QMP session (AcquireQMP) may not do: the refusal rules.

vmbridged owns what it created inside QEMU - devices, block nodes, fd sets
and fd names, netdevs, chardevs, objects, jobs - and keeps the books on them
(vmbridge.machine.setup.DeviceState.owns). A session's command that would
remove, replace or re-point one of those, or create something under one of
its names (any ``vmb-`` id included), is refused before it reaches QEMU,
also when it comes as HMP through ``human-monitor-command``. The table of
commands and the arguments that name an owned id is below;
docs/acquireqmp.md explains each.
"""

from __future__ import annotations

def _device_id(value):
    # device_del also takes the QOM path of a device with an id.
    if isinstance(value, str) and value.startswith("/machine/peripheral/"):
        return value[len("/machine/peripheral/"):]
    return value


_DEVICE = (("devices",), "device")
_NODE = (("nodes",), "block node")
_DEVICE_OR_NODE = (("devices", "nodes"), "block device")
_CHARDEV = (("chardevs",), "chardev")
_NETDEV = (("netdevs",), "netdev")
_OBJECT = (("objects",), "object")
_FDNAME = (("fdnames",), "file descriptor")
_FDSET = (("fdsets",), "fd set")
_JOB = (("jobs",), "job")

#: command -> ((argument, (kinds, what it names)), ...): refused when vmbridged
#: owns the argument's value as one of those kinds (``DeviceState.owns``).
_OWNED_ARGUMENTS = {
    # removing, replacing or re-pointing what is ours
    "device_del": (("id", _DEVICE),),
    "blockdev-del": (("node-name", _NODE),),
    "chardev-remove": (("id", _CHARDEV),),
    "chardev-change": (("id", _CHARDEV),),
    "netdev_del": (("id", _NETDEV),),
    "object-del": (("id", _OBJECT),),
    "closefd": (("fdname", _FDNAME),),
    "getfd": (("fdname", _FDNAME),),
    "remove-fd": (("fdset-id", _FDSET),),
    "add-fd": (("fdset-id", _FDSET),),
    "eject": (("device", _DEVICE_OR_NODE), ("id", _DEVICE)),
    "blockdev-open-tray": (("device", _DEVICE_OR_NODE), ("id", _DEVICE)),
    "blockdev-remove-medium": (("id", _DEVICE),),
    "blockdev-insert-medium": (("id", _DEVICE),),
    "blockdev-change-medium": (("device", _DEVICE_OR_NODE), ("id", _DEVICE)),
    "x-blockdev-change": (("parent", _NODE),),
    # jobs that rebuild the block graph under our nodes
    "block-stream": (("device", _NODE),),
    "block-commit": (("device", _NODE),),
    "drive-mirror": (("device", _NODE),),
    "blockdev-mirror": (("device", _NODE),),
    "blockdev-snapshot": (("node", _NODE),),
    "blockdev-snapshot-sync": (("device", _NODE), ("node-name", _NODE)),
    # our jobs
    "job-cancel": (("id", _JOB),),
    "job-dismiss": (("id", _JOB),),
    "job-finalize": (("id", _JOB),),
    "job-complete": (("id", _JOB),),
    "job-pause": (("id", _JOB),),
    "block-job-cancel": (("device", _JOB),),
    "block-job-complete": (("device", _JOB),),
    "block-job-pause": (("device", _JOB),),
    "block-job-dismiss": (("id", _JOB),),
    "block-job-finalize": (("id", _JOB),),
    # creating something under one of our names (vmbridged's own are vmb-...)
    "device_add": (("id", _DEVICE),),
    "blockdev-add": (("node-name", _NODE),),
    "blockdev-create": (("job-id", _JOB),),
    "chardev-add": (("id", _CHARDEV),),
    "netdev_add": (("id", _NETDEV),),
    "object-add": (("id", _OBJECT),),
}

#: HMP commands (through human-monitor-command) that do the same: name ->
#: (kinds, what) of their first operand, or of their ``id=`` option for
#: the ``*_add`` ones.
_HMP_OWNED = {
    "device_del": _DEVICE,
    "drive_del": _DEVICE_OR_NODE,
    "chardev-remove": _CHARDEV,
    "chardev-change": _CHARDEV,
    "netdev_del": _NETDEV,
    "object_del": _OBJECT,
    "closefd": _FDNAME,
    "getfd": _FDNAME,
    "eject": _DEVICE_OR_NODE,
    "change": _DEVICE_OR_NODE,
    "block_job_cancel": _JOB,
    "block_job_complete": _JOB,
    "block_stream": _NODE,
    "drive_mirror": _NODE,
    "snapshot_blkdev": _NODE,
}
_HMP_CREATE = {
    "device_add": _DEVICE,
    "chardev-add": _CHARDEV,
    "netdev_add": _NETDEV,
    "object_add": _OBJECT,
}

REFUSED_COMMANDS = sorted(_OWNED_ARGUMENTS) + ["blockdev-reopen", "human-monitor-command"]


def _owned(owns, value, kinds) -> bool:
    return any(owns(kind, value) for kind in kinds)


def refusal(command: str, arguments: dict | None, owns) -> str | None:
    """Why vmbridge refuses ``command``, or None to pass it to QEMU.

    The rule: nothing may remove, replace or re-point an object vmbridged
    created, nor take one of its names, through QMP or through HMP
    (``human-monitor-command``), because vmbridged's model of the VM (its
    monitors, its console, its devices, its fds) would silently stop being
    true. ``owns(kind, value)`` is ``DeviceState.owns``: kinds are devices,
    nodes, fdsets, fdnames, netdevs, chardevs, objects and jobs. Everything
    else - ``quit``, ``stop``, migration, the client's own devices - is the
    user's business and goes through; vmbridged's state follows QEMU's events.
    """
    arguments = arguments or {}
    if command == "human-monitor-command":
        return _hmp_refusal(arguments.get("command-line"), owns)
    if command == "blockdev-reopen":
        for options in arguments.get("options") or ():
            node = options.get("node-name") if isinstance(options, dict) else None
            if _owned(owns, node, _NODE[0]):
                return _refused(_NODE[1], node, command)
        return None
    for name, (kinds, what) in _OWNED_ARGUMENTS.get(command, ()):
        value = arguments.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
            continue  # absent, or QEMU will say what is wrong with it
        key = _device_id(value) if "devices" in kinds else value
        if _owned(owns, key, kinds):
            return _refused(what, value, command)
    return None


def _refused(what, value, command) -> str:
    return (f"vmbridge: {what} '{value}' belongs to vmbridged; "
            f"{command} would break vmbridged's bookkeeping")


def _hmp_refusal(command_line, owns) -> str | None:
    if not isinstance(command_line, str):
        return None  # QEMU will say what is wrong with it
    words = command_line.split()
    if not words:
        return None
    name = words[0]
    if name in _HMP_CREATE:
        kinds, what = _HMP_CREATE[name]
        for word in words[1:]:
            for option in word.split(","):
                key, _, value = option.partition("=")
                if key == "id" and _owned(owns, value, kinds):
                    return _refused(what, value, f"HMP {name}")
        return None
    if name not in _HMP_OWNED:
        return None
    operands = [w for w in words[1:] if not w.startswith("-")]
    if not operands:
        return None
    kinds, what = _HMP_OWNED[name]
    target = _device_id(operands[0]) if "devices" in kinds else operands[0]
    if _owned(owns, target, kinds):
        return _refused(what, operands[0], f"HMP {name}")
    return None


# ------------------------------------------------------------------- the hub
