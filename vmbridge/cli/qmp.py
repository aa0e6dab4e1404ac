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
imported (vmctl starts fast, and never imports gevent); the interactive
prompt reads the socket in one helper thread, because Python's ``input()``
with readline cannot wait for a socket at the same time.
"""

import json
import os
import signal
import socket
import sys
import threading

from vmbridge.varlink.client import Connection, VarlinkError

ACQUIRE = "io.systemd.QemuMachineInstance.AcquireQMP"
HISTORY_LENGTH = 1000

_DEFAULT = object()


class QMPSessionError(Exception):
    """The session failed (not a QMP error reply: those are returned)."""


class QMPSessionClosed(QMPSessionError):
    """The VM's end closed the session."""


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
            except socket.timeout:
                raise TimeoutError("no answer from the VM") from None
            except OSError as e:
                raise QMPSessionClosed("the QMP session is closed (%s)" % (e.strerror or e)) from None
            if not data:
                raise QMPSessionClosed("the VM closed the QMP session")
            self._buf += data

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
    """The interactive loop: the main thread reads lines and sends them, one
    command at a time; a reader thread prints every reply and event in the
    order they arrive and hands replies back."""

    def __init__(self, session, *, name="", stdin=None, stdout=None, stderr=None, history=None):
        self.session = session
        self.name = name
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.tty = self.stdin.isatty() and self.stdout.isatty()
        self.history = history if history is not None else (history_path() if self.tty else None)
        self.prompt = "%s(qmp)> " % (name + " " if name else "") if self.tty else ""
        self._lock = threading.Lock()
        self._replies = []
        self._reply_ready = threading.Condition(self._lock)
        self._ended = None              # why the session ended, once it has
        self._at_prompt = False
        self._readline = None
        self._main = threading.main_thread().ident

    def run(self):
        """Returns the exit status: 0 at end of input or after ``quit``."""
        if self.tty:
            self._setup_readline()
        previous = signal.signal(signal.SIGUSR1, self._wake) if _in_main_thread() else None
        reader = threading.Thread(target=self._read_loop, name="qmp-reader", daemon=True)
        reader.start()
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
                try:
                    self.session.send(message)
                except QMPSessionClosed:
                    pass  # the reader reports it
                if self._wait_reply() is None:
                    return 0 if last == "quit" else 1
        finally:
            self._save_history()
            if previous is not None:
                signal.signal(signal.SIGUSR1, previous)

    def _input(self):
        with self._lock:
            if self._ended is not None:
                raise _Ended()
            self._at_prompt = True
        try:
            if self.tty:
                return input(self.prompt)
            line = self.stdin.readline()
            if not line:
                raise EOFError
            return line
        finally:
            self._at_prompt = False

    def _wait_reply(self):
        """The reply to what was just sent (the reader printed it), or None
        once the session has ended."""
        with self._reply_ready:
            while not self._replies and self._ended is None:
                try:
                    self._reply_ready.wait()
                except KeyboardInterrupt:
                    self._print_err("vmctl: not waiting; the reply will be printed when it comes")
                    return {}
            return self._replies.pop(0) if self._replies else None

    def _read_loop(self):
        try:
            while True:
                message = self.session.read_message(timeout=None)
                if isinstance(message, dict) and "event" in message:
                    self._print_async(format_event(message))
                else:
                    self._print(format_reply(message))
                    with self._reply_ready:
                        self._replies.append(message)
                        self._reply_ready.notify()
        except (QMPSessionError, TimeoutError) as e:
            why = str(e)
        except Exception as e:   # noqa: BLE001 - the prompt must learn of it
            why = "QMP session failed: %r" % e
        with self._reply_ready:
            self._ended = why
            self._reply_ready.notify()
            at_prompt = self._at_prompt
        self._print_async("vmctl: %s%s" % (self.name + ": " if self.name else "", why), err=True)
        if at_prompt and _in_main_thread_available():
            signal.pthread_kill(self._main, signal.SIGUSR1)

    def _wake(self, signum, frame):
        if self._at_prompt and self._ended is not None:
            raise _Ended()

    def _print(self, text):
        with self._lock:
            self.stdout.write(text + "\n")
            self.stdout.flush()

    def _print_err(self, text):
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def _print_async(self, text, err=False):
        """Print while the user may be typing: redraw the prompt and their line."""
        stream = self.stderr if err else self.stdout
        with self._lock:
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


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


def _in_main_thread_available():
    return threading.main_thread().is_alive() and hasattr(signal, "pthread_kill")


# ------------------------------------------------------------------- the verb

def add_arguments(parser):
    parser.add_argument("name", nargs="?", metavar="NAME", help="the VM (none with --address)")
    parser.add_argument("command", nargs="?", metavar="COMMAND",
                        help="a QMP command (query-status), or a whole request as JSON; "
                             "without one, an interactive QMP prompt")
    parser.add_argument("arguments", nargs="*", metavar="JSON-ARGS",
                        help='the command\'s arguments, a JSON object ({"flat": true}); '
                             "it may span several words")


def _address(ctx, name):
    address = getattr(ctx, "address", None)
    if address:
        return address
    resolve = getattr(ctx, "resolve", None)
    if callable(resolve):
        return resolve(name)
    target = ctx.targets([name])[0]      # vmctl's Context
    if target.error is not None:
        raise target.error
    return target.address


def _report(ctx, name, error):
    """``vmctl: NAME: message`` on stderr (through vmctl's ctx.report when
    there is one); returns the exit status 1."""
    if type(error).__name__ == "CLIError":       # vmctl's own: it knows how to name the VM
        if error.name is None and not error.named:
            error.name = name
        message = error
    else:
        message = "%s%s" % (name + ": " if name else "", error)
    report = getattr(ctx, "report", None)
    if callable(report):
        report(message)
    else:
        sys.stderr.write("vmctl: %s\n" % message)
        sys.stderr.flush()
    return 1


def run(args, ctx):
    words = [w for w in (args.name, args.command) if w is not None] + list(args.arguments)
    if getattr(ctx, "address", None):
        name = None
    elif not words:
        usage = getattr(ctx, "usage_error", None)
        if callable(usage):
            usage("no VM NAME given (or use --address SOCKET)")
        sys.stderr.write("vmctl qmp: no VM NAME given\n")
        return 2
    else:
        name = words.pop(0)
    timeout = getattr(ctx, "timeout", None)
    address = None
    try:
        address = _address(ctx, name)
        session = QMPSession.acquire(address, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - reported as vmctl reports the others
        return _report(ctx, name, _translate(ctx, e, address))
    with session:
        try:
            session.negotiate()
            if words:
                try:
                    message = parse_input(" ".join(words))
                except ValueError as e:
                    return _report(ctx, name, e)
                reply = session.execute(message, timeout=timeout)
                pretty = getattr(ctx, "json", None) != "short"
                stdout = getattr(ctx, "stdout", None) or sys.stdout
                stdout.write(format_reply(reply, pretty) + "\n")
                stdout.flush()
                return 1 if is_error(reply) else 0
            session.timeout = None
            return Prompt(session, name=name or "").run()
        except (QMPSessionError, TimeoutError) as e:
            return _report(ctx, name, e)


def _translate(ctx, error, address):
    """vmctl's wording for connection and varlink errors, when it has one."""
    translate = getattr(ctx, "translate", None)
    if callable(translate) and isinstance(error, (OSError, VarlinkError)) and address:
        return translate(error, address, method=ACQUIRE)
    if isinstance(error, VarlinkError):
        return "cannot acquire QMP: %s" % error
    if isinstance(error, OSError) and error.strerror:
        return "%s: %s" % (address or "cannot connect", error.strerror)
    return error
