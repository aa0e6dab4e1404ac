"""status: one VM at a glance, as machinectl status shows a machine; or vmbridged's own footprint.

``vmctl status NAME`` asks the manager's ``Stats`` for the VM (its Machine
object with the whole set of its figures) and prints a block::

    ● web - running
            State: running (QEMU: running)
            Since: Wed 2026-11-26 10:37:45 UTC; 2min 5s ago
             QEMU: pid 19424, 7.2.22, q35, tcg
          Control: /run/vmbridge/machines/web/control
           Config: 2 vCPUs, 1G memory, bios firmware
           Drives: /srv/web.qcow2,format=qcow2
          Network: user
              CPU: 12.3% (over 2.0s), 1min 3s in all
            vCPUs: #0 thread 19431 10.1%, #1 thread 19432 2.2%
           Memory: 237M resident, 231M proportional
              ...

``vmctl status`` without NAME prints vmbridged's own figures (``Stats``
without a name). ``--json`` prints the reply's ``machine`` or ``daemon``
object instead.
"""

from vmbridge.cli.figures import (format_bytes, format_cpu, format_duration, format_timestamp,
                                  plural)

LABEL_WIDTH = 16


def add_arguments(parser):
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="the VM (without: vmbridged's own figures)")


def run(args, ctx):
    if args.name is None:
        daemon = ctx.manager_call("Stats")["daemon"]
        if ctx.json:
            ctx.print_json(daemon)
        else:
            write(ctx, daemon_lines(daemon))
        return 0
    machine = ctx.manager_call("Stats", {"name": args.name})["machine"]
    if ctx.json:
        ctx.print_json(machine)
    else:
        write(ctx, machine_lines(machine))
    return 0


def write(ctx, lines):
    ctx.stdout.write("\n".join(lines) + "\n")
    ctx.stdout.flush()


def block(title, fields):
    """``title`` and then ``Label: value`` lines, labels right-aligned;
    a value that is a list continues on lines of its own; None values are left out."""
    lines = [title]
    for label, value in fields:
        if value is None or value == []:
            continue
        values = value if isinstance(value, list) else [value]
        lines.append("%*s: %s" % (LABEL_WIDTH, label, values[0]))
        lines += ["%*s  %s" % (LABEL_WIDTH, "", v) for v in values[1:]]
    return lines


def _with(text, suffix=None, prefix=None):
    """``prefix + text + suffix``, or None if text is None."""
    if text is None:
        return None
    return (prefix or "") + text + (suffix or "")


def _join(*parts):
    parts = [p for p in parts if p]
    return ", ".join(parts) if parts else None


def machine_lines(machine):
    config = machine.get("config") or {}
    figures = machine.get("figures") or {}
    state = machine.get("state", "unknown")
    dot = {"running": "●", "paused": "◌", "failed": "×"}.get(state, "○")
    title = "%s %s - %s" % (dot, machine.get("name"), state)
    qemu = None
    if machine.get("pid") is not None:
        qemu = _join("pid %d" % machine["pid"], machine.get("qemuVersion"),
                     config.get("machine", "q35"), config.get("accel"))  # q35: the IDL's default
    fields = [
        ("State", state + (" (QEMU: %s)" % machine["status"] if machine.get("status") else "")),
        ("Since", format_timestamp(machine.get("sinceUSec"))),
        ("Error", machine.get("error")),
        ("Exit", _exit(machine)),
        ("QEMU", qemu),
        ("Control", machine.get("controlAddress")),
        ("Config", _join(plural(config["cpus"], "vCPU") if config.get("cpus") else None,
                         "%s memory" % config["memory"] if config.get("memory") else None,
                         "%s firmware" % config["firmware"] if config.get("firmware") else None,
                         "persistent" if machine.get("persistent") else None,
                         "autostart" if machine.get("autostart") else None)),
        ("Kernel", config.get("linux")),
        ("Drives", list(config.get("drive") or ()) or ("none" if state in ("running", "paused") else None)),
        ("Network", list(config.get("network") or ()) or ("none" if state in ("running", "paused") else None)),
        ("Shares", list(config.get("bind") or ())),
    ]
    fields += figure_fields(figures, active=machine.get("pid") is not None)
    return block(title, fields)


def _exit(machine):
    parts = []
    if machine.get("shutdownReason"):
        parts.append("shutdown: %s" % machine["shutdownReason"])
    if machine.get("exitStatus") is not None:
        parts.append("status %d" % machine["exitStatus"])
    if machine.get("signal"):
        parts.append("signal %s" % machine["signal"])
    return ", ".join(parts) or None


def figure_fields(figures, *, active=True):
    """The figure lines of a VM's status block (MachineFigures, whole set)."""
    if not figures:
        return [("Figures", "none yet (or vmbridged samples none: --stats-interval 0)")] if active else []
    cpu = format_cpu(figures.get("cpuPercent"))
    if cpu is not None and figures.get("intervalUSec"):
        cpu += " (over %s)" % format_duration(figures["intervalUSec"])
    vcpus = []
    for v in figures.get("vcpus") or ():
        vcpus.append("#%d thread %d%s" % (v["index"], v["threadId"],
                                          " " + format_cpu(v["cpuPercent"]) if v.get("cpuPercent") is not None else ""))
    if len(vcpus) > 4:  # one line each: many vCPUs
        vcpus = [", ".join(vcpus[i:i + 4]) for i in range(0, len(vcpus), 4)]
    else:
        vcpus = ", ".join(vcpus) or None
    memory = _join(_with(format_bytes(figures.get("rssBytes")), " resident"),
                   _with(format_bytes(figures.get("pssBytes")), " proportional"),
                   _with(format_bytes(figures.get("balloonBytes")), prefix="balloon "))
    io = None
    if figures.get("readBytes") is not None:
        io = "%s read, %s written (host storage)" % (format_bytes(figures["readBytes"]),
                                                      format_bytes(figures["writeBytes"]))
    drives = [drive_line(d) for d in figures.get("drives") or ()]
    processes = ["%d %s: %s, %s%s" % (p["pid"], p["role"], format_cpu(p.get("cpuPercent")) or "-",
                                      format_bytes(p["rssBytes"]),
                                      ", %s" % plural(p["threads"], "thread"))
                 for p in figures.get("processes") or ()]
    tasks = _join(plural(figures["threads"], "thread") if figures.get("threads") is not None else None,
                  plural(figures["fds"], "open fd") if figures.get("fds") is not None else None)
    return [
        ("CPU", _join(cpu, _with(format_duration(figures.get("cpuUSec")), " in all"))),
        ("vCPUs", vcpus if vcpus else (str(figures["vcpuCount"]) if figures.get("vcpuCount") is not None else None)),
        ("Memory", memory),
        ("I/O", io),
        ("Drive I/O", drives),
        ("Tasks", tasks),
        ("Uptime", format_duration(figures.get("uptimeUSec"))),
        ("Processes", processes if len(processes) > 1 else None),
    ]


def drive_line(drive):
    return "%s: %s read (%s), %s written (%s), %s" % (
        drive["name"], format_bytes(drive["readBytes"]), plural(drive["readOps"], "op"),
        format_bytes(drive["writeBytes"]), plural(drive["writeOps"], "op"), plural(drive["flushOps"], "flush", "flushes"))


def daemon_lines(daemon):
    cpu = format_cpu(daemon.get("cpuPercent"))
    interval = daemon.get("statsIntervalUSec") or 0
    if cpu is not None and interval:
        cpu += " (over %s)" % format_duration(interval)
    if interval:
        stats = "sampled every %s" % format_duration(interval)
        if daemon.get("statsRoundUSec") is not None:
            stats += ", last round took %s" % format_duration(daemon["statsRoundUSec"])
    else:
        stats = "not sampled (--stats-interval 0)"
    fields = [
        ("Uptime", format_duration(daemon.get("uptimeUSec"))),
        ("CPU", _join(cpu, _with(format_duration(daemon.get("cpuUSec")), " in all"))),
        ("Memory", _join(_with(format_bytes(daemon.get("rssBytes")), " resident"),
                         _with(format_bytes(daemon.get("pssBytes")), " proportional"))),
        ("Tasks", "%s, %s" % (plural(daemon["threads"], "thread"), plural(daemon["greenlets"], "greenlet"))),
        ("Open fds", "%d (limit %d)" % (daemon["fds"], daemon["fdLimit"])),
        ("Connections", "%d on the manager socket, %d on VMs' control sockets"
         % (daemon["managerConnections"], daemon["machineConnections"])),
        ("VMs", "%d (%d with a QEMU)" % (daemon["machines"], daemon["activeMachines"])),
        ("Figures", stats),
    ]
    return block("vmbridged %s (pid %d)" % (daemon.get("version", "?"), daemon["pid"]), fields)
