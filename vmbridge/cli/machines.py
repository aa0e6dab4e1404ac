"""list: the VMs of vmbridged, from the manager's List."""

from vmbridge.cli.figures import LIST_HEADER, list_columns

HEADER = ("NAME", "STATE", "STATUS", "PID", *LIST_HEADER, "ADDRESS")


def add_arguments(parser):
    pass


def run(args, ctx):
    machines = ctx.manager_call("List")["machines"]
    if ctx.json:
        ctx.print_json(machines)
        return 0
    rows = [(m.get("name"), m.get("state"), m.get("status"), m.get("pid"), *list_columns(m),
             m.get("controlAddress")) for m in machines]
    count = len(rows)
    ctx.print_table(HEADER, rows, footer="%d VM%s listed." % (count, "" if count == 1 else "s"),
                    empty="No VMs.")
    return 0
