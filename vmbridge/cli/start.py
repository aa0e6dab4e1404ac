"""start: create a VM from options (manager Create), or start the defined VM (Start).

The options are io.vmbridge.Manager's MachineConfig fields (``--pcie-ports``
is ``pcie_ports``); vmbridged validates them and names the field it refuses.
File paths are made absolute here: vmbridged opens them, from its own
working directory.
"""

import os

from vmbridge.cli.context import MANAGER, CLIError

TIMEOUT = 90.0      # longer than vmbridged's own 60 s bound on a VM's set-up

# (option, MachineConfig field, add_argument keywords)
OPTIONS = (
    ("--qemu", "qemu", dict(metavar="PATH", help="QEMU binary: a path or a command in $PATH "
                            "(default qemu-system-x86_64)")),
    ("--machine", "machine", dict(metavar="TYPE", help="QEMU machine type (default q35; "
                                  "none: no guest)")),
    ("--accel", "accel", dict(choices=("auto", "kvm", "tcg"), help="accelerator (default auto)")),
    ("--cpus", "cpus", dict(metavar="N", type=int, help="virtual CPUs (default 1)")),
    ("--memory", "memory", dict(metavar="SIZE", help="guest memory, such as 512M or 2G (default 512M)")),
    ("--firmware", "firmware", dict(choices=("bios", "uefi"), help="firmware (default bios)")),
    ("--linux", "linux", dict(metavar="KERNEL", help="boot this kernel directly")),
    ("--initrd", "initrd", dict(metavar="INITRD", help="the initrd of --linux")),
    ("--append", "append", dict(metavar="CMDLINE", help="the kernel command line of --linux")),
    ("--drive", "drive", dict(metavar="SPEC", action="append",
                              help="PATH[,format=raw|qcow2][,readonly=on][,if=...][,serial=S]"
                              "[,ephemeral=on]; repeatable")),
    ("--network", "network", dict(metavar="SPEC", action="append",
                                  help="user or tap:IFNAME; repeatable")),
    ("--bind", "bind", dict(metavar="SRC:TAG", action="append",
                            help="share the host directory SRC over virtiofs as TAG; repeatable")),
    ("--vsock", "vsock", dict(choices=("off", "on", "auto"), help="vsock device (default off)")),
    ("--ephemeral", "ephemeral", dict(action="store_const", const=True,
                                      help="send all writes of all drives to anonymous overlays")),
    ("--pcie-ports", "pcie_ports", dict(metavar="N", type=int,
                                        help="free PCIe root ports for hot-plugging (q35)")),
)


def add_arguments(parser):
    parser.usage = "vmctl [OPTIONS...] start [-h] NAME [VM-OPTIONS...]"
    parser.add_argument("name", metavar="NAME", help="the VM")
    group = parser.add_argument_group(
        "VM options", "Given any of these, a new VM NAME is created with them; without, the "
        "defined VM NAME is started.")
    for option, field, kwargs in OPTIONS:
        group.add_argument(option, dest="config_" + field, **kwargs)
    group.add_argument("--persistent", action="store_true",
                       help="also write the VM's definition, so that it outlives its exit "
                       "and vmbridged restarts")
    group.add_argument("--autostart", action="store_const", const=True,
                       help="start the VM when vmbridged starts (needs --persistent)")


def _absolute(path):
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _absolute_head(spec, separator):
    """SPEC with the path before its first SEPARATOR made absolute."""
    head, sep, rest = spec.partition(separator)
    return _absolute(head) + sep + rest


def config_from(args):
    """The MachineConfig fields given on the command line, paths made absolute."""
    config = {}
    for _option, field, _kwargs in OPTIONS:
        value = getattr(args, "config_" + field)
        if value is not None:
            config[field] = value
    if config.get("qemu") and "/" in config["qemu"]:
        config["qemu"] = _absolute(config["qemu"])
    for field in ("linux", "initrd"):
        if field in config:
            config[field] = _absolute(config[field])
    if "drive" in config:
        config["drive"] = [_absolute_head(spec, ",") for spec in config["drive"]]
    if "bind" in config:
        config["bind"] = [_absolute_head(spec, ":") for spec in config["bind"]]
    if args.autostart:
        config["autostart"] = True
    return config


def run(args, ctx):
    ctx.require_manager()
    if args.autostart and not args.persistent:
        ctx.usage_error("--autostart needs --persistent (only a definition is started by vmbridged)")
    config = config_from(args)
    try:
        if config or args.persistent:
            params = {"config": {"name": args.name, **config}}
            if args.persistent:
                params["persistent"] = True
            machine = ctx.manager_call("Create", params)["machine"]
        else:
            machine = ctx.manager_call("Start", {"name": args.name})["machine"]
    except CLIError as e:
        if e.error == MANAGER + ".NoSuchMachine":
            e.message += " (to create it, give VM options such as --memory and --linux)"
        elif e.error == MANAGER + ".MachineExists":
            e.message += " (start it without VM options, or remove it first)"
        elif e.message.startswith("timed out"):
            e.message += " (it may still come up: see vmctl list)"
        if e.name is None and not e.named:
            e.name = args.name
        raise
    if ctx.json:
        ctx.print_json(machine)
    return 0
