"""events: follow io.systemd.MachineInstance.SubscribeEvents of one or more VMs.

One line per event, ``TIME VM EVENT [DATA]`` (DATA as compact JSON), or with
--json one object per event: ``{"timeUSec":..., "name":..., "event":...,
"data":...}``. Each stream starts with READY (the subscription is in place)
and vmbridged ends it with EXITED (why QEMU went away) before the VM's socket
closes; systemd-vmspawn just closes it. vmctl ends when every stream has
ended, or on Ctrl-C (exit status 0, unless a VM could not be followed).
"""

import json
import time

from vmbridge.cli.context import INSTANCE
from vmbridge.varlink.client import VarlinkDisconnected, VarlinkError

EXITED = "EXITED"     # vmbridge's last event of a stream: the VM is gone, and why
METHOD = INSTANCE + ".SubscribeEvents"


def add_arguments(parser):
    parser.add_argument("names", nargs="*", metavar="NAME", help="the VMs (one merged stream)")
    parser.add_argument("--filter", action="append", metavar="EVENT",
                        help="show only events named EVENT (QEMU's names: STOP, RESUME, RESET, "
                        "POWERDOWN, SHUTDOWN, ...; and EXITED); repeatable")


def run(args, ctx):
    targets = ctx.targets(args.names)
    shown = wire_filter = None
    if args.filter:
        shown = set(args.filter) | {"READY"}            # READY always comes first
        # EXITED too, even if not shown: it says why the stream ends.
        wire_filter = list(dict.fromkeys(args.filter + [EXITED]))

    def emit(target, reply):
        now = time.time()
        event, data = reply.get("event"), reply.get("data")
        if ctx.json:
            line = ctx.dumps({"timeUSec": int(now * 1_000_000), "name": target.name,
                              "event": event, **({"data": data} if data is not None else {})})
        else:
            clock = time.strftime("%H:%M:%S", time.localtime(now)) + ".%03d" % (now % 1 * 1000)
            line = "%s %s %s" % (clock, target.name, event)
            if data is not None:
                line += " " + json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        ctx.stdout.write(line + "\n")
        ctx.stdout.flush()

    def follow(target):
        ready = False
        exited = None
        with ctx.connect(target) as conn:
            try:
                for reply in conn.call_more(METHOD, {"filter": wire_filter} if wire_filter else None):
                    if not ready:
                        ready = True
                        conn.timeout = None             # from now on, wait as long as it takes
                    if reply.get("event") == EXITED:
                        exited = reply.get("data") or {}
                    if shown is None or reply.get("event") in shown:
                        emit(target, reply)
            except VarlinkDisconnected as e:            # the VM went away: the stream's end
                if not ready:
                    raise ctx.translate(e, target.address, method=METHOD) from None
            except (OSError, VarlinkError) as e:
                raise ctx.translate(e, target.address, method=METHOD) from None
        if exited is None:
            ctx.note("%s: the event stream ended (the VM is gone)" % target.name)
        elif shown is not None and EXITED not in shown:
            ctx.note("%s: exited (%s)" % (target.name, exited.get("reason", "unknown reason")))

    try:
        ctx.for_each(targets, follow, ordered=False)
    except KeyboardInterrupt:                           # the usual way to stop following
        return ctx.status()
    except BrokenPipeError:                             # `vmctl events ... | head`
        ctx.stdout_gone()
        return 0
    return ctx.status()
