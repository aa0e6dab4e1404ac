"""vmctl qmp: QEMU's QMP on a VM, through io.systemd.QemuMachineInstance.AcquireQMP.

    vmctl qmp NAME                       an interactive QMP prompt
    vmctl qmp NAME COMMAND [JSON-ARGS]   one command; prints the reply as
                                         JSON, exit status 1 if it is an error

At the prompt, a line is a command with optional JSON arguments
(``query-block {"flat": true}``) or a whole QMP request as raw JSON
(``{"execute": "query-status", "id": 1}``). Replies are pretty-printed,
events are printed (one line each) as they arrive, also while you type.
History is kept in ``$XDG_STATE_HOME/vmbridge/qmp_history``
(``~/.local/state/vmbridge/qmp_history``); Tab completes command names.
Ctrl-D leaves; so does the VM going away.

With ``--address SOCKET`` there is no NAME: ``vmctl --address SOCKET qmp
[COMMAND [JSON-ARGS]]``.

The pieces are usable without the CLI: :class:`QMPSession` (acquire,
negotiate, execute) and :func:`parse_input`. Only the standard library is
imported (vmctl starts fast, and never imports gevent), and everything runs
in one thread: while readline's ``input()`` waits for the user, the session
socket raises SIGIO (``O_ASYNC``) when the VM sends something, and the signal
handler - which Python runs in the main thread, also during ``input()`` -
prints the events above the line being typed.
"""

import fcntl
import json
import os
import select
import selectors
import signal
import socket
import sys

from vmbridge.cli.context import CLIError
from vmbridge.varlink.client import Connection, VarlinkError

ACQUIRE = "io.systemd.QemuMachineInstance.AcquireQMP"
HISTORY_LENGTH = 1000

_DEFAULT = object()


class QMPSessionError(Exception):
    """The session failed (not a QMP error reply: those are returned)."""


class QMPSessionClosed(QMPSessionError):
    """The VM's end closed the session."""


class _WouldBlock(Exception):
    """read_message(timeout=0) found no whole message."""


class QMPSession:
    """A QMP session over a connected socket; blocking, stdlib only.

    ``pending``: bytes already read from the socket (call_upgrade's).
    ``timeout``: default for reads (None: wait forever).
    """

    def __init__(self, sock, pending=b"", *, timeout=None):
        self.sock = sock
        self.timeout = timeout
        self._buf = bytearray(pending)
        self.greeting = None

    @classmethod
    def acquire(cls, address, *, timeout=None):
        """AcquireQMP on the VM control socket ``address``; the greeting is
        not read yet (see :meth:`negotiate`). Raises VarlinkError and the
        varlink client's connection errors."""
        with Connection(address, timeout=timeout) as connection:
            sock, pending = connection.call_upgrade(ACQUIRE)
        return cls(sock, pending, timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @property
    def version(self):
        """``"7.2.22"``, from the greeting."""
        qemu = (self.greeting or {}).get("version", {}).get("qemu", {})
        return "%s.%s.%s" % (qemu.get("major"), qemu.get("minor"), qemu.get("micro"))

    def send(self, message):
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as e:
            raise QMPSessionClosed("the QMP session is closed (%s)" % (e.strerror or e)) from None

    def read_message(self, timeout=_DEFAULT):
        """The next message (reply or event) as a dict."""
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[:newline + 1]
                if not line.strip():
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    raise QMPSessionError("not QMP: %r" % line[:80]) from None
            try:
                self.sock.settimeout(self.timeout if timeout is _DEFAULT else timeout)
                data = self.sock.recv(65536)
            except BlockingIOError:
                raise _WouldBlock() from None   # timeout=0: nothing there yet
            except socket.timeout:
                raise TimeoutError("no answer from the VM") from None
            except OSError as e:
                raise QMPSessionClosed("the QMP session is closed (%s)" % (e.strerror or e)) from None
            if not data:
                raise QMPSessionClosed("the VM closed the QMP session")
            self._buf += data

    def poll(self):
        """The messages that have arrived, without waiting (possibly none)."""
        messages = []
        while True:
            try:
                messages.append(self.read_message(timeout=0))
            except _WouldBlock:
                return messages

    def negotiate(self, timeout=_DEFAULT):
        """Read the greeting and leave capabilities negotiation; returns the greeting."""
        greeting = self.read_message(timeout)
        if not isinstance(greeting, dict) or not isinstance(greeting.get("QMP"), dict):
            raise QMPSessionError("expected a QMP greeting, got %s" % json.dumps(greeting)[:200])
        self.greeting = greeting["QMP"]
        self.send({"execute": "qmp_capabilities"})
        reply = self.reply(timeout=timeout)
        if "error" in reply:
            raise QMPSessionError("qmp_capabilities failed: %s" % reply["error"].get("desc"))
        return self.greeting

    def reply(self, *, on_event=None, timeout=_DEFAULT):
        """The next reply; events on the way go to ``on_event`` (or are dropped)."""
        while True:
            message = self.read_message(timeout)
            if isinstance(message, dict) and "event" in message:
                if on_event is not None:
                    on_event(message)
                continue
            return message

    def execute(self, message, *, on_event=None, timeout=_DEFAULT):
        """Send one request (a dict, see :func:`parse_input`) and return its
        reply: ``{"return": ...}`` or ``{"error": {...}}`` (plus ``id``)."""
        self.send(message)
        return self.reply(on_event=on_event, timeout=timeout)


def parse_input(text):
    """A QMP request from what a person types; None for a blank line.

    ``query-status``, ``query-block {"flat": true}`` or a raw request
    ``{"execute": ..., ...}`` (sent as it is). ValueError says what is wrong.
    """
    text = text.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            message = json.loads(text)
        except ValueError as e:
            raise ValueError("not valid JSON: %s" % e) from None
        if not isinstance(message.get("execute", message.get("exec-oob")), str):
            raise ValueError('a raw request needs "execute": "COMMAND"')
        return message
    command, _, rest = text.partition(" ")
    if command.startswith(("[", '"')) or not command.replace("-", "").replace("_", "").isalnum():
        raise ValueError("%r is not a command name" % command)
    message = {"execute": command}
    rest = rest.strip()
    if rest:
        try:
            arguments = json.loads(rest)
        except ValueError as e:
            raise ValueError("arguments are not valid JSON: %s" % e) from None
        if not isinstance(arguments, dict):
            raise ValueError("arguments must be a JSON object, like {\"flat\": true}")
        message["arguments"] = arguments
    return message


def format_reply(reply, pretty=True):
    return json.dumps(reply, indent=2 if pretty else None, ensure_ascii=False)


def format_event(event):
    return json.dumps(event, ensure_ascii=False)


def is_error(reply):
    return isinstance(reply, dict) and "error" in reply


def history_path():
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "vmbridge", "qmp_history")


# ------------------------------------------------------------ interactive

class _Ended(Exception):
    pass


class Prompt:
    """The interactive loop, in one thread.

    A line read is sent as one command; then the loop reads until its reply,
    printing the events that come first. While waiting for the next line,
    events are printed as they arrive: on a terminal through SIGIO (see the
    module's docstring), without one by watching stdin and the socket with
    select.
    """

    def __init__(self, session, *, name="", stdin=None, stdout=None, stderr=None, history=None):
        self.session = session
        self.name = name
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.tty = self.stdin.isatty() and self.stdout.isatty()
        self.history = history if history is not None else (history_path() if self.tty else None)
        self.prompt = "%s(qmp)> " % (name + " " if name else "") if self.tty else ""
        self._ended = None          # why the session ended, once it has
        self._at_prompt = False     # input() is waiting: SIGIO may print
        self._reading = False       # someone is reading the socket: SIGIO must not
        self._readline = None
        self._stdin_buffer = b""

    def run(self):
        """Returns the exit status: 0 at end of input or after ``quit``."""
        if self.tty:
            self._setup_readline()
        restore = self._watch_socket() if self.tty else None
        last = None
        try:
            while True:
                try:
                    line = self._input()
                except EOFError:
                    if self.tty:
                        self.stdout.write("\n")
                    return 0
                except KeyboardInterrupt:
                    if not self.tty:
                        return 130
                    self.stdout.write("\n")
                    continue
                except _Ended:
                    return 0 if last == "quit" else 1
                try:
                    message = parse_input(line)
                except ValueError as e:
                    self._print_err("vmctl: %s" % e)
                    continue
                if message is None:
                    continue
                last = message.get("execute")
                if not self._execute(message):
                    return 0 if last == "quit" else 1
        finally:
            if restore is not None:
                restore()
            self._save_history()

    # -- the socket --------------------------------------------------------

    def _watch_socket(self):
        """SIGIO when the socket becomes readable; returns what undoes it."""
        fd = self.session.sock.fileno()
        previous = signal.signal(signal.SIGIO, self._on_sigio)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC)

        def restore():
            if self.session.sock is not None:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            signal.signal(signal.SIGIO, previous)
        return restore

    def _on_sigio(self, signum, frame):
        if self._at_prompt and not self._reading:
            self._print_arrivals()
            if self._ended is not None:
                raise _Ended()      # out of input(): the session is over

    def _print_arrivals(self):
        """Print whatever the VM sent meanwhile (never blocks)."""
        self._reading = True
        try:
            while True:
                try:
                    messages = self.session.poll()
                except QMPSessionError as e:
                    self._end(str(e))
                    return
                for message in messages:
                    is_event = isinstance(message, dict) and "event" in message
                    self._print_async(format_event(message) if is_event else format_reply(message))
                # Bytes that came while we read raised no SIGIO we acted on: look again.
                if not select.select([self.session.sock], [], [], 0)[0]:
                    return
        finally:
            self._reading = False

    def _execute(self, message):
        """Send `message` and print what comes up to its reply; False once the session ended."""
        self._reading = True
        try:
            self.session.send(message)
            reply = self.session.reply(on_event=lambda event: self._print(format_event(event)))
        except KeyboardInterrupt:
            self._print_err("vmctl: not waiting; the reply will be printed when it comes")
            return True
        except (QMPSessionError, TimeoutError) as e:
            self._end(str(e))
            return False
        finally:
            self._reading = False
        self._print(format_reply(reply))
        return True

    def _end(self, why):
        if self._ended is None:
            self._ended = why
            self._print_async("vmctl: %s%s" % (self.name + ": " if self.name else "", why), err=True)

    # -- input ---------------------------------------------------------------

    def _input(self):
        if self._ended is not None:
            raise _Ended()
        if not self.tty:
            return self._read_line()
        self._at_prompt = True
        try:
            self._print_arrivals()      # what came before SIGIO was armed, or between prompts
            if self._ended is not None:
                raise _Ended()
            return input(self.prompt)
        finally:
            self._at_prompt = False

    def _read_line(self):
        """The next line of a non-terminal stdin, printing events while it does not come."""
        fd = self.stdin.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ, "stdin")
            selector.register(self.session.sock, selectors.EVENT_READ, "vm")
            while b"\n" not in self._stdin_buffer:
                for key, _ in selector.select():
                    if key.data == "vm":
                        self._print_arrivals()
                        if self._ended is not None:
                            raise _Ended()
                    else:
                        data = os.read(fd, 65536)
                        if not data:
                            if not self._stdin_buffer:
                                raise EOFError
                            self._stdin_buffer += b"\n"
                        self._stdin_buffer += data
        line, _, self._stdin_buffer = self._stdin_buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    # -- output --------------------------------------------------------------

    def _print(self, text):
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def _print_err(self, text):
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def _print_async(self, text, err=False):
        """Print while the user may be typing: redraw the prompt and their line."""
        stream = self.stderr if err else self.stdout
        if self.tty and self._at_prompt and self._readline is not None:
            stream.write("\r\x1b[K" + text + "\n")
            stream.flush()
            if self._ended is None:
                self.stdout.write(self.prompt + self._readline.get_line_buffer())
                self.stdout.flush()
        else:
            stream.write(text + "\n")
            stream.flush()

    def _setup_readline(self):
        try:
            import readline
        except ImportError:
            return
        self._readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        if self.history and os.path.exists(self.history):
            try:
                readline.read_history_file(self.history)
            except OSError:
                pass
        commands = self._command_names()
        if commands:
            def complete(text, state):
                matches = [c for c in commands if c.startswith(text)]
                return matches[state] if state < len(matches) else None
            readline.set_completer(complete)
            readline.set_completer_delims(" \t\n{")
            readline.parse_and_bind("tab: complete")

    def _command_names(self):
        try:
            reply = self.session.execute({"execute": "query-commands"})
        except (QMPSessionError, TimeoutError):
            return []
        return sorted(c["name"] for c in reply.get("return", ()) if isinstance(c, dict) and "name" in c)

    def _save_history(self):
        if self._readline is None or not self.history:
            return
        try:
            os.makedirs(os.path.dirname(self.history), mode=0o700, exist_ok=True)
            self._readline.write_history_file(self.history)
        except OSError as e:
            self._print_err("vmctl: cannot save the QMP history to %s: %s" % (self.history, e.strerror))


# ------------------------------------------------------------------- the verb

def add_arguments(parser):
    parser.add_argument("name", nargs="?", metavar="NAME", help="the VM (none with --address)")
    parser.add_argument("command", nargs="?", metavar="COMMAND",
                        help="a QMP command (query-status), or a whole request as JSON; "
                             "without one, an interactive QMP prompt")
    parser.add_argument("arguments", nargs="*", metavar="JSON-ARGS",
                        help='the command\'s arguments, a JSON object ({"flat": true}); '
                             "it may span several words")


def run(args, ctx):
    words = [w for w in (args.name, args.command) if w is not None] + list(args.arguments)
    names = [] if ctx.address else words[:1]
    words = words if ctx.address else words[1:]
    target = ctx.targets(names)[0]          # usage error (exit 2) without a NAME or --address
    if target.error is not None:
        ctx.report(target.error)
        return 1
    try:
        session = QMPSession.acquire(target.address, timeout=ctx.timeout)
    except (OSError, VarlinkError) as e:
        return _fail(ctx, target, ctx.translate(e, target.address, method=ACQUIRE))
    with session:
        try:
            session.negotiate()
            if not words:
                session.timeout = None
                return Prompt(session, name=target.name).run()
            try:
                message = parse_input(" ".join(words))
            except ValueError as e:
                return _fail(ctx, target, e)
            reply = session.execute(message, timeout=ctx.timeout)
            ctx.stdout.write(format_reply(reply, pretty=ctx.json != "short") + "\n")
            ctx.stdout.flush()
            return 1 if is_error(reply) else 0
        except (QMPSessionError, TimeoutError) as e:
            return _fail(ctx, target, e)


def _fail(ctx, target, error):
    """``vmctl: NAME: message``; the exit status 1."""
    if isinstance(error, CLIError):
        if error.name is None and not error.named:
            error.name = target.name
    else:
        error = CLIError(str(error), name=target.name)
    ctx.report(error)
    return 1
