"""describe, pause, resume, poweroff, reboot, terminate: io.systemd.MachineInstance calls.

They go to each VM's control socket (found with the manager's List, or given
with --address), so they drive systemd-vmspawn's VMs just as vmbridged's.
terminate by NAME asks the manager instead, which also stops a VM that is
still starting and has no control socket yet.
"""

METHODS = {
    "describe": "Describe",
    "pause": "Pause",
    "resume": "Resume",
    "poweroff": "PowerOff",
    "reboot": "Reboot",
    "terminate": "Terminate",
}


def add_arguments(parser):
    parser.add_argument("names", nargs="*", metavar="NAME", help="the VMs (several at once)")


def run(args, ctx):
    if args.verb == "terminate" and not ctx.address:
        targets = ctx.targets(args.names, resolve=False)
        ctx.for_each(targets, lambda t: ctx.manager_call("Terminate", {"name": t.name}))
        return ctx.status()
    method = METHODS[args.verb]
    results = ctx.for_each(ctx.targets(args.names), lambda t: ctx.call(t, method))
    if args.verb == "describe":
        show(ctx, [r for r in results if r.ok])
    return ctx.status()


def show(ctx, results):
    if ctx.json:
        for r in results:
            ctx.print_json({"name": r.target.name, **r.value})
        return
    rows = [(r.target.name, "yes" if r.value.get("running") else "no", r.value.get("status"))
            for r in results]
    ctx.print_table(("NAME", "RUNNING", "STATUS"), rows)
