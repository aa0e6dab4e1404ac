"""storage add|remove|replace: io.systemd.MachineInstance's storage calls.

    vmctl storage add NAME BINDING FILE [--config CONFIG]
    vmctl storage remove NAME BINDING
    vmctl storage replace NAME BINDING FILE

FILE is opened here, with the caller's rights, and its descriptor sent with
the call (SCM_RIGHTS, fileDescriptorIndex 0): the VM never opens a path.
With --address, leave out NAME.
"""

import os

from vmbridge.cli.context import CLIError

ACTIONS = {  # action: (method, positional arguments after NAME)
    "add": ("AddStorage", ("BINDING", "FILE")),
    "remove": ("RemoveStorage", ("BINDING",)),
    "replace": ("ReplaceStorage", ("BINDING", "FILE")),
}


def add_arguments(parser):
    parser.usage = ("vmctl storage add [NAME] BINDING FILE [--config CONFIG]\n"
                    "       vmctl storage remove [NAME] BINDING\n"
                    "       vmctl storage replace [NAME] BINDING FILE")
    parser.add_argument("action", choices=ACTIONS, metavar="ACTION",
                        help="add (attach FILE as BINDING), remove (detach BINDING) or "
                        "replace (BINDING's backing by FILE)")
    parser.add_argument("words", nargs="*", metavar="NAME BINDING FILE",
                        help="the VM (none with --address), the binding's name, the file or "
                        "block device")
    parser.add_argument("--config", metavar="CONFIG",
                        help="backend-specific configuration of the new storage (add)")


def run(args, ctx):
    method, wanted = ACTIONS[args.action]
    words = list(args.words)
    if not ctx.address:
        wanted = ("NAME",) + wanted
    if len(words) != len(wanted):
        ctx.usage_error("storage %s takes %s" % (args.action, " ".join(wanted)))
    if args.config is not None and args.action != "add":
        ctx.usage_error("--config is for storage add")
    target = ctx.targets([] if ctx.address else [words.pop(0)])[0]
    params = {"name": words[0]}
    if args.config is not None:
        params["config"] = args.config

    def call(target):
        if len(words) < 2:
            return ctx.call(target, method, params)
        path = words[1]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise CLIError("cannot open %s: %s" % (path, e.strerror)) from None
        try:
            return ctx.call(target, method, {"fileDescriptorIndex": 0, **params}, fds=[fd])
        finally:
            os.close(fd)

    def explained(target):
        try:
            return call(target)
        except CLIError as e:
            e.message = "storage %s %s: %s" % (args.action, params["name"], e.message)
            raise

    ctx.for_each([target], explained)
    return ctx.status()
