"""Resource figures for people: the formatting vmctl list, status and top share.

The figures come from io.vmbridge.Manager (``List``: each Machine's
``figures`` summary; ``Stats``: a VM's whole set, or vmbridged's own); their
fields are documented in ``vmbridge/interfaces/io.vmbridge.Manager.varlink``.
Every formatter takes None (a figure the daemon did not send) and gives None,
which vmctl's tables print as ``-``.

``vmctl list`` gets its CPU% and MEMORY columns from here::

    from vmbridge.cli.figures import LIST_HEADER, list_columns
    HEADER = ("NAME", "STATE", "STATUS", "PID", *LIST_HEADER, "ADDRESS")
    rows = [(m.get("name"), ..., m.get("pid"), *list_columns(m), m.get("controlAddress"))
            for m in machines]

Standard library only, nothing done at import time (it is on vmctl's start-up
path).
"""

import time

LIST_HEADER = ("CPU%", "MEMORY")

_UNITS = ("K", "M", "G", "T", "P", "E")
_SPANS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def format_bytes(value):
    """1024-based, one decimal below 10 units, as systemd prints sizes: 512B, 4.0K, 31.7M, 256M, 1.5G."""
    if value is None:
        return None
    value = int(value)
    if value < 1024:
        return "%dB" % value
    size = float(value)
    for unit in _UNITS:
        size /= 1024.0
        if size < 1024 or unit == _UNITS[-1]:
            break
    if size < 10:
        return "%.1f%s" % (size, unit)
    return "%.0f%s" % (size, unit) if size >= 100 else "%.1f%s" % (size, unit)


def format_cpu(percent):
    """CPU % of one host CPU, one decimal: 0.0%, 12.5%, 198.0%."""
    if percent is None:
        return None
    return "%.1f%%" % percent


def format_rate(bytes_per_second):
    if bytes_per_second is None:
        return None
    return format_bytes(int(bytes_per_second)) + "/s"


def format_duration(usec):
    """A duration from µs, the two largest units, as systemd: 850ms, 3.2s, 2min 5s, 1h 2min, 3d 4h."""
    if usec is None:
        return None
    usec = int(usec)
    if usec < 1000:
        return "%dus" % usec
    if usec < 1_000_000:
        return "%dms" % (usec // 1000)
    seconds = usec / 1_000_000
    if seconds < 60:
        return "%.1fs" % seconds
    seconds = int(seconds)
    for i, (unit, size) in enumerate(_SPANS):
        if seconds >= size:
            count, rest = divmod(seconds, size)
            out = "%d%s" % (count, unit)
            if i + 1 < len(_SPANS) and rest >= _SPANS[i + 1][1]:
                out += " %d%s" % (rest // _SPANS[i + 1][1], _SPANS[i + 1][0])
            return out
    return "0s"


def format_timestamp(usec, now=None):
    """``Wed 2026-11-26 10:37:45 UTC; 2min 5s ago``, as machinectl status says Since."""
    if usec is None:
        return None
    seconds = usec / 1_000_000
    when = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))
    ago = (time.time() if now is None else now) - seconds
    if ago < 0:
        return when
    return "%s; %s ago" % (when, format_duration(int(ago * 1_000_000)))


def plural(count, word, words=None):
    return "%d %s" % (count, word if count == 1 else (words or word + "s"))


def list_columns(machine):
    """(CPU%, MEMORY) for a List Machine: its figures' cpuPercent and rssBytes, or Nones."""
    figures = machine.get("figures") or {}
    return format_cpu(figures.get("cpuPercent")), format_bytes(figures.get("rssBytes"))
