"""top: the VMs sorted by what they cost, refreshed in the terminal until q or Ctrl-C.

Each refresh is one manager ``List`` (every Machine carries the summary of its
figures; vmbridged samples them, so asking costs QEMU nothing). The read and
write rates are computed here, between two samples of the same QEMU.

Plain ANSI escapes and the standard library (termios, tty, select): the
alternate screen, the cursor hidden, the terminal in cbreak mode so single
keys work. Whatever happens — q, Ctrl-C, SIGTERM, an error, a lost
vmbridged — the terminal is restored; Ctrl-Z restores it too and takes over
again on ``fg``; a resized terminal is redrawn at once. Keys: q quits;
c, m, n, i sort by CPU, memory, name, I/O; space refreshes now.

``--json`` prints one sample (a JSON array: each VM's name, state, pid and
figures, sorted) and exits. Without a terminal on stdout, top prints the
table ``--iterations`` times (default once) without escapes.
"""

import os
import select
import signal
import sys
import time

from vmbridge.cli.figures import format_bytes, format_cpu, format_duration, format_rate

SORT_KEYS = ("cpu", "mem", "name", "io")
KEYS = {"c": "cpu", "m": "mem", "n": "name", "i": "io"}
HEADER = ("NAME", "STATE", "PID", "CPU%", "MEMORY", "VCPUS", "THREADS", "READ/S", "WRITE/S", "UPTIME")
DEFAULT_DELAY = 2.0

# ANSI: alternate screen, cursor, home, erase to end of line / of screen, reverse video.
ENTER = "\x1b[?1049h\x1b[?25l"
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME, EOL, EOS = "\x1b[H", "\x1b[K", "\x1b[J"
REVERSE, NORMAL = "\x1b[7m", "\x1b[m"


def add_arguments(parser):
    parser.add_argument("--sort", choices=SORT_KEYS, default="cpu",
                        help="sort by CPU use (the default), resident memory, name, or read+write rate")
    parser.add_argument("-d", "--delay", type=_seconds, metavar="SECONDS",
                        help="refresh every SECONDS (default: vmbridged's sampling interval)")
    parser.add_argument("-n", "--iterations", type=int, metavar="N",
                        help="stop after N refreshes (without a terminal: default 1)")


def _seconds(value):
    import argparse
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds, such as 1 or 0.5, not %r" % value) from None
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be from 0.1 to 3600 seconds")
    return seconds


# ------------------------------------------------------------- the figures

class Rates:
    """Read and write rates of each QEMU, between this sample and its previous one."""

    def __init__(self):
        self._last = {}  # (name, pid) -> (sampledUSec, readBytes, writeBytes)
        self._rates = {}  # (name, pid) -> (read/s, write/s)

    def update(self, machine):
        """(read/s, write/s) of a List Machine, or (None, None) before there are two samples."""
        figures = machine.get("figures") or {}
        key = (machine.get("name"), machine.get("pid"))
        sampled, rd, wr = figures.get("sampledUSec"), figures.get("readBytes"), figures.get("writeBytes")
        if sampled is None or rd is None:
            return None, None
        last = self._last.get(key)
        if last is not None and sampled > last[0]:
            seconds = (sampled - last[0]) / 1e6
            self._rates[key] = (max(rd - last[1], 0) / seconds, max(wr - last[2], 0) / seconds)
        if last is None or sampled > last[0]:
            self._last[key] = (sampled, rd, wr)
        return self._rates.get(key, (None, None))

    def forget_others(self, machines):
        keep = {(m.get("name"), m.get("pid")) for m in machines}
        self._last = {k: v for k, v in self._last.items() if k in keep}
        self._rates = {k: v for k, v in self._rates.items() if k in keep}


def rows(machines, rates=None):
    """One dict per VM: the figures top shows (rates None without a Rates or a second sample)."""
    out = []
    for m in machines:
        figures = m.get("figures") or {}
        read_rate, write_rate = rates.update(m) if rates is not None else (None, None)
        out.append({"name": m.get("name"), "state": m.get("state"), "pid": m.get("pid"),
                    "cpuPercent": figures.get("cpuPercent"), "rssBytes": figures.get("rssBytes"),
                    "vcpuCount": figures.get("vcpuCount"), "threads": figures.get("threads"),
                    "readBytes": figures.get("readBytes"), "writeBytes": figures.get("writeBytes"),
                    "readRate": read_rate, "writeRate": write_rate, "uptimeUSec": figures.get("uptimeUSec")})
    if rates is not None:
        rates.forget_others(machines)
    return out


def sort_rows(items, key):
    """Sorted for `key` (cpu, mem, io: largest first; name: A-Z); VMs without the figure last, by name."""
    def io(row):
        if row["readRate"] is not None:
            return row["readRate"] + row["writeRate"]
        if row["readBytes"] is not None:  # no rate yet: the totals
            return row["readBytes"] + row["writeBytes"]
        return None
    value = {"cpu": lambda r: r["cpuPercent"], "mem": lambda r: r["rssBytes"], "io": io,
             "name": lambda r: None}[key]
    return sorted(items, key=lambda r: (value(r) is None, -(value(r) or 0), r["name"] or ""))


def json_sample(machines, key="cpu"):
    """What --json prints: each VM's name, state, pid and figures, sorted like the table."""
    order = {row["name"]: i for i, row in enumerate(sort_rows(rows(machines), key))}
    out = []
    for m in sorted(machines, key=lambda m: order[m.get("name")]):
        entry = {"name": m.get("name"), "state": m.get("state")}
        if m.get("pid") is not None:
            entry["pid"] = m["pid"]
        if m.get("figures"):
            entry["figures"] = m["figures"]
        out.append(entry)
    return out


def table_lines(items):
    """The table: header and one line per row, columns padded to their widest cell."""
    cells = [HEADER] + [(r["name"], r["state"], r["pid"], format_cpu(r["cpuPercent"]), format_bytes(r["rssBytes"]),
                         r["vcpuCount"], r["threads"], format_rate(r["readRate"]), format_rate(r["writeRate"]),
                         format_duration(r["uptimeUSec"])) for r in items]
    cells = [["-" if c is None else str(c) for c in row] for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    numeric = {2, 3, 4, 5, 6, 7, 8}  # right-aligned: figures compare at a glance
    return ["  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


def summary_line(machines, key, delay):
    states = {}
    for m in machines:
        states[m.get("state")] = states.get(m.get("state"), 0) + 1
    counts = ", ".join("%d %s" % (n, s) for s, n in sorted(states.items()))
    return "vmctl top - %s - %d VM%s%s - sorted by %s, every %s - q quits, c m n i sort" % (
        time.strftime("%H:%M:%S"), len(machines), "" if len(machines) == 1 else "s",
        " (%s)" % counts if counts else "", key, format_duration(int(delay * 1e6)))


def frame(machines, key, delay, rates, *, note=None):
    """The lines of one refresh: a summary line, a blank line or a note, the table."""
    lines = [summary_line(machines, key, delay), note or ""]
    return lines + table_lines(sort_rows(rows(machines, rates), key))


def render(lines, width, height):
    """One frame as ANSI: from the top left, every line cut to the width and
    cleared to its end, the header reversed, the rest of the screen cleared."""
    lines = [line[:width] for line in lines[:height]]
    if len(lines) > 2:
        lines[2] = REVERSE + lines[2].ljust(width) + NORMAL
    return HOME + (EOL + "\r\n").join(lines) + EOL + EOS


# ------------------------------------------------------------- the terminal

class _Quit(Exception):
    pass


class Terminal:
    """The terminal in top's mode for the ``with`` block: cbreak, alternate
    screen, no cursor; restored on the way out, also on errors and signals."""

    def __init__(self, stdin_fd, stdout):
        self.fd = stdin_fd
        self.out = stdout
        self.keys = os.isatty(stdin_fd)
        self._saved = None
        self._old_handlers = {}
        self._wake_r = self._wake_w = -1
        self._old_wakeup = -1
        self.redraw = True

    def __enter__(self):
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w)
        for sig, handler in ((signal.SIGWINCH, self._on_winch), (signal.SIGTERM, self._on_term),
                             (signal.SIGTSTP, self._on_tstp), (signal.SIGCONT, self._on_winch)):
            self._old_handlers[sig] = signal.signal(sig, handler)
        self._enter()
        return self

    def __exit__(self, *exc_info):
        self._leave()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return False

    def _enter(self):
        if self.keys:
            import termios
            import tty
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)  # keys one by one, no echo; Ctrl-C still raises SIGINT
        self.out.write(ENTER)
        self.out.flush()
        self.redraw = True

    def _leave(self):
        try:
            self.out.write(LEAVE)
            self.out.flush()
        finally:
            if self._saved is not None:
                import termios
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
                self._saved = None

    def _on_winch(self, signum, frame):
        self.redraw = True

    def _on_term(self, signum, frame):
        raise _Quit()

    def _on_tstp(self, signum, frame):
        # Ctrl-Z: give the shell its terminal back, stop, and take over again on SIGCONT.
        self._leave()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, self._on_tstp)  # continued
        self._enter()

    def size(self):
        """(columns, lines); 80x24 where the terminal does not say (a fresh pty says 0x0)."""
        try:
            size = os.get_terminal_size(self.out.fileno())
        except (OSError, ValueError):
            return 80, 24
        return size.columns or 80, size.lines or 24

    def wait_key(self, timeout):
        """A key pressed within `timeout` seconds, or None (time up, or a signal asks to redraw)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            fds = [self._wake_r] + ([self.fd] if self.keys else [])
            ready, _, _ = select.select(fds, [], [], left)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
                if self.redraw:
                    return None
            if self.fd in ready and self.keys:
                data = os.read(self.fd, 64)
                if not data:
                    self.keys = False  # stdin closed: refresh on the clock only
                    continue
                return data.decode("utf-8", "replace")


# ------------------------------------------------------------------ the verb

def run(args, ctx):
    key = args.sort
    if ctx.json:
        ctx.print_json(json_sample(ctx.manager_call("List")["machines"], key))
        return 0
    delay, note = args.delay, None
    if delay is None:
        interval = ctx.manager_call("Stats")["daemon"].get("statsIntervalUSec") or 0
        delay = interval / 1e6 if interval else DEFAULT_DELAY
        if not interval:
            note = "vmbridged samples no figures (--stats-interval 0): only states are shown"
    out = ctx.stdout
    if not (hasattr(out, "fileno") and _isatty(out)):
        return _batch(ctx, key, delay, args.iterations or 1, note)
    rates = Rates()
    count = 0
    try:
        with Terminal(sys.stdin.fileno() if _isatty(sys.stdin) else -1, out) as term:
            while args.iterations is None or count < args.iterations:
                machines = ctx.manager_call("List")["machines"]
                width, height = term.size()
                term.redraw = False
                out.write(render(frame(machines, key, delay, rates, note=note), width, height))
                out.flush()
                count += 1
                if args.iterations is not None and count >= args.iterations:
                    break
                pressed = term.wait_key(delay)
                if pressed:
                    for ch in pressed:
                        if ch in "qQ":
                            return 0
                        key = KEYS.get(ch.lower(), key)
    except (KeyboardInterrupt, _Quit):
        return 0
    return 0


def _isatty(stream):
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False


def _batch(ctx, key, delay, iterations, note):
    """No terminal: the table `iterations` times, a blank line between, no escapes."""
    rates = Rates()
    for i in range(iterations):
        if i:
            time.sleep(delay)
            ctx.stdout.write("\n")
        lines = frame(ctx.manager_call("List")["machines"], key, delay, rates, note=note)
        ctx.stdout.write("\n".join(lines) + "\n")
        ctx.stdout.flush()
    return 0
