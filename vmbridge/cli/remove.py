"""remove: the manager forgets VMs and deletes their definitions."""

from vmbridge.cli.context import MANAGER, CLIError


def add_arguments(parser):
    parser.add_argument("names", nargs="*", metavar="NAME", help="the VMs (several at once)")
    parser.add_argument("--force", action="store_true",
                        help="terminate a VM that runs before removing it")


def run(args, ctx):
    ctx.require_manager()
    targets = ctx.targets(args.names, resolve=False)
    params = {"force": True} if args.force else {}

    def remove(target):
        try:
            ctx.manager_call("Remove", {"name": target.name, **params})
        except CLIError as e:
            if e.error == MANAGER + ".MachineActive":
                e.message += " (terminate it first, or remove --force)"
            raise

    ctx.for_each(targets, remove)
    return ctx.status()
