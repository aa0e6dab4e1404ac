"""list: the VMs of vmbridged, from the manager's List."""

HEADER = ("NAME", "STATE", "STATUS", "PID", "ADDRESS")


def add_arguments(parser):
    pass


def run(args, ctx):
    machines = ctx.manager_call("List")["machines"]
    if ctx.json:
        ctx.print_json(machines)
        return 0
    rows = [(m.get("name"), m.get("state"), m.get("status"), m.get("pid"), m.get("controlAddress"))
            for m in machines]
    count = len(rows)
    ctx.print_table(HEADER, rows, footer="%d VM%s listed." % (count, "" if count == 1 else "s"),
                    empty="No VMs.")
    return 0
