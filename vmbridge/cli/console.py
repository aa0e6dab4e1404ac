"""console: the VM's serial console on this terminal (io.vmbridge.Console).

    vmctl console NAME                 attach: type into the guest, see what it prints
    vmctl console NAME --read-only     watch only (any number of viewers at once)
    vmctl console NAME --force         take over from the writer attached already
    vmctl console NAME --tail N        print the last N lines and exit

Attaching calls ``io.vmbridge.Console.Attach`` with the ``upgrade`` flag;
after the reply the connection carries the console's raw bytes both ways.
The terminal is put in raw mode (every key goes to the guest, Ctrl-C
included) and always restored: on detach, on errors, and on SIGTERM, SIGHUP
and SIGINT. ``Ctrl-]`` detaches, as in virsh and machinectl; the VM keeps
running.

The pieces are usable without the CLI: :class:`RawTerminal` (raw mode and
its restoration), :func:`console_loop` (stdin and the socket, with stdlib
selectors: no gevent needed) and :func:`attach`. ``python -m
vmbridge.cli.console`` runs the verb on its own (for tests, and until vmctl
has the verb).
"""

import os
import selectors
import signal
import sys
import termios
import tty

from vmbridge.varlink.client import Connection, VarlinkError

INTERFACE = "io.vmbridge.Console"
ESCAPE = b"\x1d"            # Ctrl-]
DETACHED = "detached"       # console_loop's results: the user pressed Ctrl-]
CLOSED = "closed"           # vmbridged closed the connection
_TO_GUEST_MAX = 64 * 1024   # typed-ahead bytes kept before stdin is left unread


def _count(value):
    import argparse
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of lines, not %r" % value) from None
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def add_arguments(parser):
    parser.add_argument("name", nargs="?", metavar="NAME", help="the VM (none with --address)")
    parser.add_argument("-r", "--read-only", action="store_true",
                        help="watch the console without typing into it")
    parser.add_argument("-f", "--force", action="store_true",
                        help="become the console's writer even if another client is: "
                        "that one is disconnected")
    parser.add_argument("-n", "--tail", type=_count, metavar="N",
                        help="print the last N lines the console printed (from its log) and exit")


# ------------------------------------------------------------------ terminal

class Signalled(Exception):
    """A terminating signal arrived while the terminal was raw."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RawTerminal:
    """Raw mode on the terminal ``fd`` for the duration of a ``with`` block.

    The old settings come back on leaving the block, whatever ends it, and at
    once when SIGTERM, SIGHUP or SIGINT arrives (which then raises
    :class:`Signalled` in the block). Not a terminal: nothing to do, but the
    signals still raise Signalled. :meth:`restore` is idempotent.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self, fd):
        self.fd = fd
        self.saved = None
        self._handlers = {}

    def __enter__(self):
        # Handlers first: no moment where a signal could leave the terminal raw.
        for signum in self.SIGNALS:
            self._handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            if self.fd is not None and os.isatty(self.fd):
                self.saved = termios.tcgetattr(self.fd)
                tty.setraw(self.fd, termios.TCSANOW)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _on_signal(self, signum, frame):
        self.restore()
        raise Signalled(signum)

    def restore(self):
        """Put the saved settings back (errors ignored: a hung-up terminal)."""
        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except (termios.error, OSError):
                pass

    def __exit__(self, *exc_info):
        self.restore()
        handlers, self._handlers = self._handlers, {}
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


# ------------------------------------------------------------------ I/O loop

def _write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:             # someone made our stdout non-blocking
            selectors.DefaultSelector().select(1)
        except InterruptedError:
            pass


def console_loop(sock, in_fd, out_fd, *, writable=True, pending=b"", escape=ESCAPE):
    """Copy the console to ``out_fd`` and ``in_fd`` to the console until one ends.

    Returns DETACHED when ``escape`` is read from ``in_fd`` (what came before it
    is still sent), CLOSED when the peer closes ``sock``. Without ``writable``
    what is read from ``in_fd`` is dropped, except the escape. ``in_fd`` at
    end-of-file (or None) is no longer read; the output goes on. ``in_fd`` and
    ``out_fd`` are used as they are (never made non-blocking: they are shared
    with the shell); ``sock`` is made non-blocking.
    """
    if pending:
        _write_all(out_fd, pending)
    sock.setblocking(False)
    to_guest = bytearray()
    stdin_open = in_fd is not None
    selector = selectors.DefaultSelector()
    registered = {}

    def want(fileobj, events):
        if registered.get(fileobj, 0) == events:
            return
        if not events:
            selector.unregister(fileobj)
            del registered[fileobj]
        elif fileobj in registered:
            selector.modify(fileobj, events)
            registered[fileobj] = events
        else:
            selector.register(fileobj, events)
            registered[fileobj] = events

    try:
        while True:
            want(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if to_guest else 0))
            if in_fd is not None:
                want(in_fd, selectors.EVENT_READ
                     if stdin_open and len(to_guest) < _TO_GUEST_MAX else 0)
            for key, events in selector.select():
                if key.fileobj is sock:
                    if events & selectors.EVENT_READ:
                        try:
                            data = sock.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            data = None
                        except ConnectionResetError:
                            data = b""
                        if data == b"":
                            return CLOSED
                        if data:
                            _write_all(out_fd, data)
                    if events & selectors.EVENT_WRITE and to_guest:
                        try:
                            del to_guest[:sock.send(to_guest)]
                        except (BlockingIOError, InterruptedError):
                            pass
                        except (BrokenPipeError, ConnectionResetError):
                            return CLOSED
                else:
                    data = os.read(in_fd, 4096)
                    if not data:
                        stdin_open = False
                        continue
                    cut = data.find(escape)
                    if writable:
                        to_guest += data if cut < 0 else data[:cut]
                    if cut >= 0:
                        _flush(sock, to_guest)
                        return DETACHED
    finally:
        selector.close()


def _flush(sock, data, timeout=2.0):
    """Send what was typed before the detach key, if the console takes it soon."""
    if not data:
        return
    try:
        sock.settimeout(timeout)
        sock.sendall(data)
    except OSError:
        pass


# ------------------------------------------------------------------ calls

def explain(exc):
    """A message for a varlink error of io.vmbridge.Console, or None."""
    parameters = exc.parameters if isinstance(exc.parameters, dict) else {}
    if exc.error == INTERFACE + ".WriterPresent":
        holder = " (pid %s)" % parameters["pid"] if parameters.get("pid") is not None else ""
        return ("the console already has a writer%s; --read-only watches, --force takes over"
                % holder)
    if exc.error == INTERFACE + ".NoConsole":
        return "it has no serial console (or it is not connected)"
    if exc.error == "org.varlink.service.MethodNotFound":
        return "its control socket offers no console (%s)" % INTERFACE
    return None


def attach(address, *, read_only=False, force=False, replay_lines=None, timeout=30.0):
    """``io.vmbridge.Console.Attach``: returns ``(sock, pending, reply)``.

    ``sock`` carries the console from here on (``pending``: its first bytes,
    already read). A varlink error reply raises VarlinkError.
    """
    parameters = {}
    if read_only:
        parameters["readOnly"] = True
    if force:
        parameters["force"] = True
    if replay_lines is not None:
        parameters["replayLines"] = replay_lines
    conn = Connection(address, timeout=timeout)
    try:
        return conn.call_upgrade(INTERFACE + ".Attach", parameters, return_reply=True)
    finally:
        conn.close()


def tail(address, lines, *, timeout=30.0):
    """``io.vmbridge.Console.Tail``: the text of the last ``lines`` lines."""
    with Connection(address, timeout=timeout) as conn:
        return conn.call(INTERFACE + ".Tail", {"lines": lines})["text"]


def printable(text):
    """``text`` safe for a terminal: control characters other than tab, CR and
    LF shown as ``^X`` (as ``cat -v``), so that no escape sequence in the log
    (say, a cursor position query) acts on the terminal printing it."""
    out = []
    for ch in text:
        code = ord(ch)
        if (code < 32 and ch not in "\t\r\n") or code == 127:
            out.append("^" + chr(code ^ 0x40))
        else:
            out.append(ch)
    return "".join(out)


def replay_lines_for(fd):
    """On attach, replay about a screenful."""
    try:
        rows = os.get_terminal_size(fd).lines
    except OSError:
        rows = 0
    return rows - 1 if rows > 1 else 24     # a pty nobody sized says 0


# ------------------------------------------------------------------ the verb

def _fail(ctx, label, message):
    ctx.report("%s: %s" % (label, message))
    return 1


def _explained(ctx, exc, address, method):
    if isinstance(exc, VarlinkError):
        message = explain(exc)
        if message is not None:
            return message
    return str(ctx.translate(exc, address, method=method))


def run(args, ctx, *, stdin_fd=None, stdout_fd=None):
    target = ctx.targets([args.name] if args.name else [])[0]
    if target.error is not None:
        ctx.report(target.error)
        return 1
    label, address = target.name, target.address
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    if args.tail is not None:
        if args.read_only or args.force:
            return _fail(ctx, label, "--tail does not attach: no --read-only or --force with it")
        try:
            text = tail(address, args.tail, timeout=ctx.timeout)
        except (OSError, VarlinkError) as e:
            return _fail(ctx, label, _explained(ctx, e, address, INTERFACE + ".Tail"))
        if os.isatty(stdout_fd):
            text = printable(text)
        _write_all(stdout_fd, text.encode("utf-8", "surrogateescape"))
        return 0
    try:
        sock, pending, reply = attach(address, read_only=args.read_only, force=args.force,
                                      replay_lines=replay_lines_for(stdout_fd), timeout=ctx.timeout)
    except (OSError, VarlinkError) as e:
        return _fail(ctx, label, _explained(ctx, e, address, INTERFACE + ".Attach"))
    with sock:
        if reply.get("previousWriterPid") is not None:
            ctx.note("took the console over from pid %s" % reply["previousWriterPid"])
        ctx.note("connected to the console of %s%s; press Ctrl-] to detach"
              % (label, "" if reply.get("writable") else " (read-only)"))
        try:
            with RawTerminal(stdin_fd):
                result = console_loop(sock, stdin_fd, stdout_fd, writable=bool(reply.get("writable")),
                                      pending=pending)
        except Signalled as e:
            return 128 + e.signum
        except OSError as e:
            return _fail(ctx, label, "console: %s" % (e.strerror or e))
    ctx.stderr.write("\n")  # the guest's cursor may be anywhere on the line
    if result == DETACHED:
        ctx.note("detached from the console of %s (the VM keeps running)" % label)
        return 0
    return _fail(ctx, label, "the console connection was closed")
