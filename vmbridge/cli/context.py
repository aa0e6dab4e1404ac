"""What every vmctl verb uses: finding VMs, talking to them, reporting, printing.

A verb's ``run(args, ctx)`` gets one :class:`Context`. The usual shape::

    def run(args, ctx):
        targets = ctx.targets(args.names)          # NAME... -> control sockets (one List call)
        ctx.for_each(targets, lambda t: ctx.call(t, "Pause"))   # failures reported
        return ctx.status()                        # 0 if all succeeded, else 1

``for_each`` runs the calls concurrently when there are several targets (in
greenlets, over gevent's sockets) and reports each failure as
``vmctl: NAME: message`` on stderr, in argument order. Every failure a verb
should report is a :class:`CLIError`; ``ctx.call`` and ``ctx.manager_call``
turn connection errors, timeouts and varlink errors into messages people
understand, keeping the varlink error name where it helps.

This module is on the start-up path of every vmctl command: stdlib and the
stdlib varlink client only, nothing done at import time.
"""

import errno
import json
import os
import sys
import time

from vmbridge import paths
from vmbridge.varlink.client import (Connection, VarlinkConnectError, VarlinkDisconnected,
                                     VarlinkError, VarlinkProtocolError)

MANAGER = "io.vmbridge.Manager"
INSTANCE = "io.systemd.MachineInstance"
DEFAULT_TIMEOUT = 30.0


class CLIError(Exception):
    """A failure to report as ``vmctl: NAME: message`` (exit status 1).

    ``name`` None: ``for_each`` fills in the VM the failure belongs to;
    ``named=True``: the message already names it (``no such VM 'x'``) and is
    printed without the prefix. ``error`` is the varlink error name, if the
    failure was a varlink error reply, for verbs that explain some better.
    """

    def __init__(self, message, *, name=None, named=False, error=None, parameters=None):
        super().__init__(message)
        self.message = message
        self.name = name
        self.named = named
        self.error = error
        self.parameters = parameters or {}

    def __str__(self):
        if self.name is None or self.named:
            return self.message
        return "%s: %s" % (self.name, self.message)


class Target:
    """One VM a command acts on.

    ``name``: how messages and output name it (the VM name, or for
    ``--address`` the NAME of ``.../NAME/control``, else the socket's file name).
    ``address``: its io.systemd.MachineInstance socket, when resolved.
    ``machine``: the manager's Machine object (None with ``--address``).
    ``error``: a CLIError if it could not be resolved; the verb is not run on it.
    """

    __slots__ = ("name", "address", "machine", "error")

    def __init__(self, name, address=None, machine=None, error=None):
        self.name = name
        self.address = address
        self.machine = machine
        self.error = error

    def __repr__(self):
        return "<Target %s %s>" % (self.name, self.address or "")


class Result:
    """What for_each did for one target: ``value`` if ``ok``, else ``error``."""

    __slots__ = ("target", "value", "error", "reported")

    def __init__(self, target, value=None, error=None):
        self.target = target
        self.value = value
        self.error = error
        self.reported = False

    @property
    def ok(self):
        return self.error is None


def address_label(address):
    """What to call the VM behind ADDRESS: ``web`` for
    ``/run/vmbridge/machines/web/control`` or ``/run/systemd/vmspawn/web/control``,
    else the socket's file name."""
    path = address[len("unix:"):] if address.startswith("unix:") else address
    head, tail = os.path.split(path.rstrip("/"))
    if tail == "control" and os.path.basename(head):
        return os.path.basename(head)
    return tail or address


def default_runtime_dir():
    """Where vmbridged puts its sockets ($VMBRIDGE_RUNTIME_DIR, else as the daemon chooses), or None."""
    return os.environ.get("VMBRIDGE_RUNTIME_DIR") or paths.default_runtime_dir()


class Context:
    """The global options, resolved; connections; reporting and output."""

    def __init__(self, args, parser, *, default_timeout=DEFAULT_TIMEOUT, parallel=False,
                 stdout=None, stderr=None):
        self.args = args
        self.parser = parser                      # the verb's parser, for usage errors
        self.timeout = args.timeout if args.timeout is not None else default_timeout
        self.quiet = args.quiet
        self.legend = args.legend
        self.json = args.json                     # None, "short" or "pretty"
        self.address = args.address               # --address: one MachineInstance socket
        self.parallel = parallel                  # several targets at once, in greenlets
        # Cooperative sockets for them: gevent's, used directly (no monkey-patching,
        # which would cost vmctl more start-up time than the whole call).
        self.socket_class = None
        if parallel:
            import gevent.socket
            self.socket_class = gevent.socket.socket
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.failed = False                       # something was reported

    # ------------------------------------------------------------ addresses

    @property
    def runtime_dir(self):
        path = self.args.runtime_dir or default_runtime_dir()
        if not path:
            raise CLIError("cannot find vmbridged: $XDG_RUNTIME_DIR is not set "
                           "(use --runtime-dir or $VMBRIDGE_RUNTIME_DIR)")
        return path

    @property
    def manager_address(self):
        return os.path.join(self.runtime_dir, MANAGER)

    def usage_error(self, message):
        """Exit with status 2 and the verb's usage, as argparse does."""
        self.parser.error(message)

    def require_manager(self):
        """For verbs that only vmbridged's manager can do (list, start, remove)."""
        if self.address:
            self.usage_error("%s needs vmbridged; --address talks to one VM's control socket only"
                             % self.args.verb)

    # ---------------------------------------------------------------- calls

    def manager_call(self, method, parameters=None, *, timeout=None):
        """Call io.vmbridge.Manager.METHOD; returns the reply's parameters."""
        self.require_manager()
        return self._call(self.manager_address, "%s.%s" % (MANAGER, method), parameters,
                          manager=True, timeout=timeout)

    def call(self, target, method, parameters=None, *, fds=(), timeout=None):
        """Call METHOD (io.systemd.MachineInstance's, unless qualified) on the VM."""
        if "." not in method:
            method = "%s.%s" % (INSTANCE, method)
        return self._call(target.address, method, parameters, fds=fds, timeout=timeout)

    def connect(self, target, *, timeout=None):
        """A Connection to the VM's control socket (for streams and upgrades);
        use ``ctx.translate`` for the errors of what follows."""
        return self._connect(target.address, timeout=self.timeout if timeout is None else timeout)

    def _connect(self, address, *, manager=False, timeout):
        try:
            return Connection(address, timeout=timeout, socket_class=self.socket_class)
        except (OSError, ValueError) as e:
            raise self.translate(e, address, manager=manager, timeout=timeout) from None

    def _call(self, address, method, parameters, *, manager=False, fds=(), timeout=None):
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._connect(address, manager=manager, timeout=timeout) as conn:
            try:
                return conn.call(method, parameters, fds=fds,
                                 timeout=max(deadline - time.monotonic(), 0.001))
            except (OSError, VarlinkError) as e:
                raise self.translate(e, address, manager=manager, method=method,
                                     timeout=timeout) from None

    def translate(self, exc, address, *, manager=False, method=None, timeout=None):
        """A CLIError people understand for what went wrong talking to ADDRESS."""
        peer = "vmbridged" if manager else "the VM"
        timeout = self.timeout if timeout is None else timeout
        if isinstance(exc, VarlinkError):
            return explain_varlink(exc, address, method)
        if isinstance(exc, TimeoutError):
            return CLIError("timed out after %gs waiting for %s" % (timeout, peer))
        if isinstance(exc, VarlinkConnectError):
            return explain_connect(exc, address, manager)
        if isinstance(exc, VarlinkDisconnected):
            if manager:
                return CLIError("vmbridged closed the connection before answering")
            return CLIError("the VM's control socket closed the connection before answering "
                            "(did the VM exit?)")
        if isinstance(exc, VarlinkProtocolError):
            return CLIError("bad reply from %s: %s" % (address, str(exc).split(": ", 1)[-1]))
        if isinstance(exc, ValueError):                     # parse_address
            return CLIError(str(exc))
        return CLIError("%s: %s" % (address, exc.strerror or exc))

    # ------------------------------------------------------------- targets

    def targets(self, names, *, resolve=True):
        """The Targets of NAME... in argument order; with --address, that one socket.

        ``resolve``: look each VM's control socket up with one manager List
        (a VM that does not exist or does not run gets ``error``); without,
        targets carry only their names (verbs that go through the manager).
        Failing to reach vmbridged at all raises CLIError.
        """
        if self.address:
            if names:
                self.usage_error("--address talks to one VM: give no NAME")
            return [Target(address_label(self.address), self.address)]
        if not names:
            self.usage_error("no VM NAME given (or use --address SOCKET)")
        if not resolve:
            return [Target(name) for name in names]
        if len(names) == 1:
            try:
                machines = self.manager_call("List", {"name": names[0]})["machines"]
            except CLIError as e:
                if e.error != MANAGER + ".NoSuchMachine":
                    raise
                machines = []
        else:
            machines = self.manager_call("List")["machines"]
        by_name = {m.get("name"): m for m in machines}
        return [self._target(name, by_name.get(name)) for name in names]

    @staticmethod
    def _target(name, machine):
        if machine is None:
            return Target(name, error=CLIError("no such VM '%s'" % name, name=name, named=True))
        address = machine.get("controlAddress")
        if not address:
            state = machine.get("state", "unknown")
            why = "it is starting" if state == "starting" else "state: %s" % state
            return Target(name, machine=machine,
                          error=CLIError("not running (%s)" % why, name=name))
        return Target(name, address, machine)

    def for_each(self, targets, fn, *, ordered=True):
        """``fn(target)`` for every target (concurrently if several); failures
        reported in argument order once all are done, or with ``ordered=False``
        as they happen (for streams, which may never be done). Returns one
        Result per target, in argument order.

        Only CLIError is a failure of one VM; anything else (a bug, Ctrl-C, a
        closed stdout) is re-raised here once every target is done.
        """
        def attempt(target):
            result = run(target)
            if not ordered and isinstance(result.error, CLIError):
                self.report(result.error)
                result.reported = True
            return result

        def run(target):
            if target.error is not None:
                return Result(target, error=target.error)
            try:
                return Result(target, fn(target))
            except CLIError as e:
                if e.name is None:
                    e.name = target.name
                return Result(target, error=e)
            except Exception as e:                 # re-raised below, after the others
                return Result(target, error=e)

        if len(targets) > 1:
            if not self.parallel:
                raise RuntimeError("several targets, but the entry point did not set up gevent")
            import gevent
            greenlets = [gevent.spawn(attempt, t) for t in targets]
            gevent.joinall(greenlets)
            results = [g.value for g in greenlets]
        else:
            results = [attempt(t) for t in targets]
        for r in results:
            if r.error is not None and not isinstance(r.error, CLIError):
                raise r.error
        for r in results:
            if r.error is not None and not r.reported:
                self.report(r.error)
        return results

    def status(self):
        """The exit status: 1 once any failure was reported, else 0."""
        return 1 if self.failed else 0

    # ------------------------------------------------------------- output

    def report(self, error):
        """``vmctl: [NAME: ]message`` on stderr; the command will exit 1."""
        self.failed = True
        self.stderr.write("vmctl: %s\n" % error)
        self.stderr.flush()

    def note(self, message):
        """Information for people, on stderr; -q silences it."""
        if not self.quiet:
            self.stderr.write("vmctl: %s\n" % message)
            self.stderr.flush()

    def stdout_gone(self):
        """stdout's reader went away: send what is left (and Python's final
        flush) to /dev/null instead of a BrokenPipeError at exit."""
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stdout.fileno())
        except (OSError, ValueError):
            pass

    def dumps(self, obj):
        if self.json == "pretty":
            return json.dumps(obj, indent=2, ensure_ascii=False)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)

    def print_json(self, obj):
        self.stdout.write(self.dumps(obj) + "\n")
        self.stdout.flush()

    def print_table(self, header, rows, *, footer=None, empty=None):
        """Columns padded to their widest cell; the header line, and the
        footer after a blank line (or ``empty`` when there are no rows),
        only with the legend (--no-legend leaves them out)."""
        rows = [["-" if cell is None or cell == "" else str(cell) for cell in row] for row in rows]
        lines = []
        if rows:
            table = ([list(header)] if self.legend else []) + rows
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            for row in table:
                cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths)]
                lines.append("  ".join(cells + [row[-1]]))
            if self.legend and footer:
                lines += ["", footer]
        elif self.legend and empty:
            lines.append(empty)
        if lines:
            self.stdout.write("\n".join(lines) + "\n")
            self.stdout.flush()


def explain_connect(exc, address, manager):
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return CLIError("permission denied on %s" % address)
    if manager:
        if code in (errno.ENOENT, errno.ENOTDIR):
            return CLIError("vmbridged is not running (no manager socket at %s)" % address)
        if code == errno.ECONNREFUSED:
            return CLIError("vmbridged is not running (nothing listens on %s)" % address)
    else:
        if code in (errno.ENOENT, errno.ENOTDIR):
            return CLIError("no control socket at %s (is the VM running?)" % address)
        if code == errno.ECONNREFUSED:
            return CLIError("nothing listens on %s (the VM is gone?)" % address)
    return CLIError("cannot connect to %s: %s" % (address, os.strerror(code) if code else exc))


def _system_error(parameters):
    name = parameters.get("errnoName") or ""
    number = parameters.get("errno")
    if name == "ETIMEDOUT":
        return "QEMU did not answer in time"
    if isinstance(number, int) and number > 0:
        return os.strerror(number)
    return "system error"


_EXPLAIN = {
    MANAGER + ".NoSuchMachine": lambda p, a, m: "no such VM '%s'" % p.get("name"),
    MANAGER + ".MachineExists": lambda p, a, m: "VM '%s' already exists" % p.get("name"),
    MANAGER + ".MachineActive": lambda p, a, m: "it is %s" % p.get("state", "active"),
    MANAGER + ".InvalidConfig": lambda p, a, m: "invalid %s: %s" % (
        "VM name" if p.get("field") == "name" else "--" + str(p.get("field")).replace("_", "-"),
        p.get("message")),
    MANAGER + ".SetupFailed": lambda p, a, m: "failed to start: %s%s" % (
        p["device"] + ": " if p.get("device") else "", p.get("message")),
    INSTANCE + ".NotConnected": lambda p, a, m: "not connected to its QEMU (it is going away)",
    INSTANCE + ".NotSupported": lambda p, a, m: "not supported by this VM",
    INSTANCE + ".NoSuchStorage": lambda p, a, m: "no such storage binding",
    INSTANCE + ".StorageExists": lambda p, a, m: "a storage binding of that name exists already",
    INSTANCE + ".StorageImmutable": lambda p, a, m: "this storage cannot be detached while the VM runs",
    INSTANCE + ".BadConfig": lambda p, a, m: "the storage configuration is not valid for this VM",
    INSTANCE + ".ConfigNotSupported": lambda p, a, m: "this VM does not support that storage configuration",
    "io.systemd.System": lambda p, a, m: _system_error(p),
    "org.varlink.service.PermissionDenied": lambda p, a, m: "permission denied on %s" % a,
    "org.varlink.service.MethodNotFound": lambda p, a, m: "%s does not offer %s" % (a, p.get("method") or m),
    "org.varlink.service.InterfaceNotFound": lambda p, a, m: "%s does not speak %s" % (
        a, p.get("interface") or (m or "").rpartition(".")[0]),
    "org.varlink.service.InvalidParameter": lambda p, a, m: "%s refused parameter '%s'" % (
        _method(m), p.get("parameter")),
}
# Names people need not see: the message says it all.
_PLAIN = {MANAGER + ".NoSuchMachine", MANAGER + ".MachineExists", MANAGER + ".MachineActive",
          MANAGER + ".InvalidConfig", MANAGER + ".SetupFailed"}


def _method(method):
    return (method or "the call").rpartition(".")[2]


def explain_varlink(exc, address, method):
    parameters = exc.parameters if isinstance(exc.parameters, dict) else {}
    explain = _EXPLAIN.get(exc.error)
    if explain is None:
        message = str(exc)                      # "io.foo.Error {"param":1}"
    else:
        message = explain(parameters, address, method)
        if exc.error == "io.systemd.System" and parameters.get("errnoName"):
            message += " (%s %s)" % (exc.error, parameters["errnoName"])
        elif exc.error not in _PLAIN:
            message += " (%s)" % exc.error
    named = exc.error in (MANAGER + ".NoSuchMachine", MANAGER + ".MachineExists")
    return CLIError(message, named=named, error=exc.error, parameters=parameters)
