"""vmctl: the command-line client of vmbridged (a varlink client only).

Verbs live in modules of this package, imported only when used::

    VERBS["pause"] = ("vmbridge.cli.instance", "pause the VMs' CPUs")

A verb module has ``add_arguments(parser)`` (the verb's own arguments; the
global options are added for it) and ``run(args, ctx) -> int`` (the exit
status; ``args.verb`` is the verb, ``ctx`` a :class:`vmbridge.cli.context.Context`).
It may set ``TIMEOUT`` (seconds) when its calls take longer than the
default ``--timeout``. A verb that takes several VMs names its positional
argument ``names``: with more than one, the context talks through gevent's
sockets (no monkey-patching) so that ``ctx.for_each`` drives them all at once. A
one-VM command never imports gevent, which keeps vmctl's start-up close to
Python's own.
"""

import sys

from vmbridge import __version__

# verb: (module, one line for `vmctl --help`). Keep one line per verb.
VERBS = {
    "list": ("vmbridge.cli.machines", "list the VMs of vmbridged"),
    "start": ("vmbridge.cli.start", "create and start a VM, or start a defined one"),
    "describe": ("vmbridge.cli.instance", "show whether the VMs run, and QEMU's run state"),
    "pause": ("vmbridge.cli.instance", "pause the VMs' CPUs"),
    "resume": ("vmbridge.cli.instance", "resume paused VMs"),
    "poweroff": ("vmbridge.cli.instance", "press the VMs' ACPI power button"),
    "reboot": ("vmbridge.cli.instance", "reset the VMs"),
    "terminate": ("vmbridge.cli.instance", "stop the VMs' QEMU at once"),
    "remove": ("vmbridge.cli.remove", "forget VMs and delete their definitions"),
    "events": ("vmbridge.cli.events", "follow the VMs' events"),
    "storage": ("vmbridge.cli.storage", "attach, detach or replace a VM's storage (add|remove|replace)"),
    "console": ("vmbridge.cli.console", "attach to the VM's serial console (Ctrl-] detaches), or --tail it"),
    "qmp": ("vmbridge.cli.qmp", "a QMP prompt on the VM's QEMU, or one QMP command (AcquireQMP)"),
    "status": ("vmbridge.cli.status", "show a VM's state and what it costs, or vmbridged's own figures"),
    "top": ("vmbridge.cli.top", "show the VMs sorted by what they cost, refreshed until q"),
}
DEFAULT_VERB = "list"          # `vmctl` alone, as `machinectl` alone lists

# Global options that take a value (as --opt VALUE or --opt=VALUE), and the others.
_GLOBAL_VALUED = ("--runtime-dir", "--address", "--timeout")
_GLOBAL_FLAGS = ("-q", "--quiet", "--no-legend", "--json", "--version", "-h", "--help")
_JSON_MODES = ("short", "pretty")


def _timeout(value):
    import argparse
    try:
        seconds = float(value[:-1] if value.endswith("s") else value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds, such as 5 or 2.5, not %r" % value) from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def add_global_options(parser, *, in_verb=False):
    """The options every command understands, before or after its verb.

    After the verb they default to SUPPRESS, so that one given before the
    verb is not overwritten by the verb parser's default.
    """
    def default(value):
        import argparse
        return argparse.SUPPRESS if in_verb else value

    group = parser.add_argument_group("global options")
    group.add_argument("--runtime-dir", metavar="DIR", default=default(None),
                       help="vmbridged's runtime directory (default: $VMBRIDGE_RUNTIME_DIR, "
                       "/run/vmbridge for root, $XDG_RUNTIME_DIR/vmbridge otherwise)")
    group.add_argument("--address", metavar="SOCKET", default=default(None),
                       help="talk to this io.systemd.MachineInstance socket directly "
                       "(a vmbridge VM's or systemd-vmspawn's control socket); no NAME then")
    group.add_argument("--timeout", metavar="SECONDS", type=_timeout, default=default(None),
                       help="how long to wait for each VM (default: 30; start: 90)")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="print no informational messages")
    group.add_argument("--no-legend", dest="legend", action="store_false", default=default(True),
                       help="leave out column headers and footers")
    group.add_argument("--json", metavar="MODE", choices=_JSON_MODES, default=default(None),
                       help="print JSON: --json=short (one line, also --json alone) or --json=pretty")


def _scan(argv):
    """(verb, argv, unknown) without argparse: the verb picks the one module to import.

    Bare ``--json`` becomes ``--json=short``, so that ``--json list`` is a
    flag and a verb, never a JSON mode. Without a verb, ``list`` (unless
    asking for help or the version). ``unknown``: an option before the verb
    that is not a global one (argparse would take its value for the verb).
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    argv[:end] = ["--json=short" if arg == "--json" else arg for arg in argv[:end]]
    verb = unknown = None
    i = 0
    while i < end:
        arg = argv[i]
        if arg in _GLOBAL_VALUED:
            if i + 1 >= len(argv):
                return None, argv, None                 # argparse says what is missing
            i += 1
        elif not arg.startswith("-") or arg == "-":
            verb = arg
            break
        elif arg.split("=", 1)[0] not in _GLOBAL_VALUED + _GLOBAL_FLAGS and unknown is None:
            unknown = arg
        i += 1
    if verb is None and not {"-h", "--help", "--version"} & set(argv):
        argv.append(DEFAULT_VERB)
        verb = DEFAULT_VERB
    return verb, argv, unknown


def _formatter(prog):
    """argparse's HelpFormatter, sized as shutil would size it, without
    importing shutil (and its bz2, lzma, zlib) on every start."""
    import argparse
    import os
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return argparse.HelpFormatter(prog, width=max(columns, 40) - 2)


def _parser(verb):
    """The top-level parser, with VERB's own parser fully built (others as stubs)."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="vmctl", allow_abbrev=False, formatter_class=_formatter,
        description="Control the virtual machines of vmbridged, or any "
                    "io.systemd.MachineInstance socket.",
        epilog="`vmctl COMMAND --help` shows a command's options. Without a command: list.")
    add_global_options(parser)
    parser.add_argument("--version", action="version", version="vmctl %s" % __version__)
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", title="commands")
    module = verb_parser = None
    for name, (module_name, help_text) in VERBS.items():
        if name != verb:
            verbs.add_parser(name, help=help_text, add_help=False, formatter_class=_formatter)
            continue
        import importlib
        module = importlib.import_module(module_name)
        verb_parser = verbs.add_parser(name, help=help_text, description=help_text[0].upper()
                                       + help_text[1:] + ".", allow_abbrev=False,
                                       formatter_class=_formatter)
        module.add_arguments(verb_parser)
        if verb_parser.usage is None:       # the verb's own arguments; global ones are OPTIONS
            usage = verb_parser.format_usage().split(" ", 1)[1].strip()
            verb_parser.usage = usage.replace("vmctl %s" % name, "vmctl [OPTIONS...] %s" % name, 1)
        add_global_options(verb_parser, in_verb=True)
    return parser, verb_parser, module


def _go_parallel():
    """gevent for a command on several VMs (the context uses gevent's sockets),
    and Ctrl-C raised in the main greenlet (not printed by the hub as an error)."""
    import signal

    import gevent
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # not ignored (`cmd &`)
        hub = gevent.get_hub()
        gevent.signal_handler(signal.SIGINT, lambda: hub.parent.throw(KeyboardInterrupt))


def main(argv=None) -> int:
    verb, argv, unknown = _scan(sys.argv[1:] if argv is None else argv)
    parser, verb_parser, module = _parser(verb if verb in VERBS else None)
    try:
        if unknown is not None:
            parser.error("unrecognized option %s before the command (a command's own options "
                         "go after it: vmctl COMMAND --help)" % unknown.split("=", 1)[0])
        args = parser.parse_args(argv)
    except SystemExit as e:                             # --help, --version, usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    from vmbridge.cli.context import DEFAULT_TIMEOUT, CLIError, Context
    parallel = len(getattr(args, "names", None) or ()) > 1
    if parallel:
        try:
            _go_parallel()
        except ImportError as e:
            sys.stderr.write("vmctl: several VMs at once need gevent (%s)\n" % e)
            return 1
    ctx = Context(args, verb_parser, parallel=parallel,
                  default_timeout=getattr(module, "TIMEOUT", DEFAULT_TIMEOUT))
    try:
        return module.run(args, ctx)
    except SystemExit as e:                             # ctx.usage_error
        return e.code if isinstance(e.code, int) else 2
    except CLIError as e:
        ctx.report(e)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                             # stdout's reader went away
        ctx.stdout_gone()
        return 1
