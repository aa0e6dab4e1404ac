"""Method dispatch: interfaces, handlers, the built-in org.varlink.service.

A :class:`Service` holds the interfaces a socket serves and, for each, a
handler object whose methods are named exactly like the IDL methods
(``handler.Describe(call)``). :meth:`Service.handle` does for one call what
sd-varlink's ``varlink_dispatch_method()`` does, in the same order:

1. find the method — unknown interface, unknown method, or a method the
   handler does not implement all answer ``org.varlink.service.MethodNotFound``
   with the full method name (sd-varlink never answers InterfaceNotFound to a
   call; that error belongs to GetInterfaceDescription);
2. ``# [Requires 'more' flag]`` without ``more`` → ``ExpectedMore``;
   ``# [Requires 'upgrade' flag]`` without ``upgrade`` → ``ExpectedUpgrade``;
3. validate the parameters against the IDL → ``InvalidParameter``;
4. call the handler and return what it returned (the server turns that into
   replies; see :class:`vmbridge.varlink.server.Server`).

The handler contract (what ``handler.Method(call)`` may do):

* return a dict, or None for ``{}``: the reply (``{}`` is sent when empty);
* return an iterator/generator — only for a call with ``more`` (else the
  client gets ExpectedMore): each item goes out at once as a ``continues``
  reply; a final dict given by ``return {...}`` ends the stream with a last
  reply, a bare ``return`` ends it by closing the connection (as systemd
  ends SubscribeEvents). If the client hangs up, or someone calls
  ``call.connection.close()`` from another greenlet, the generator gets a
  GeneratorExit (a :class:`~.connection.ConnectionClosed`) wherever it is
  blocked, and should clean up in ``finally`` / ``except GeneratorExit``.
  Never ``close()`` the generator from another greenlet (it may be running);
  close the connection instead;
* return or yield a :class:`SharedReply` where many connections send the
  same reply (an event fanned out): it is validated and encoded once;
* return :class:`Upgrade` to take the socket over after the reply;
* raise :class:`VarlinkError` for an error reply (also mid-stream, which
  ends the stream but not the connection);
* raise anything else: logged with its traceback and answered with
  ``io.systemd.System`` (``errno`` of an OSError, else EIO) like an
  sd-varlink callback returning -errno; connection and server carry on.

For ``oneway`` calls the handler runs and nothing is sent back.

No sockets here, so services can be unit-tested with a bare :class:`Call`.
"""

import errno
import logging

from vmbridge.fds import close_fds

from . import protocol
from .idl import parse_interface
from .protocol import VarlinkError

log = logging.getLogger("vmbridge.varlink")


class Upgrade:
    """Handler return value: reply, then hand the raw socket to ``takeover``.

    The server sends ``parameters`` as the (final) reply, stops reading the
    socket, and calls ``takeover(sock, pending)`` in the connection's
    greenlet, where ``sock`` is the connected gevent socket and ``pending``
    the bytes the client sent after the call's NUL terminator. From then on
    ``takeover`` owns the socket and must close it; the connection no longer
    counts against the server's limits and ``Server.stop()`` leaves it alone.
    """

    def __init__(self, parameters=None, takeover=None):
        if not callable(takeover):
            raise TypeError("Upgrade needs a callable takeover(sock, pending)")
        self.parameters = parameters
        self.takeover = takeover


class SharedReply:
    """One reply that many connections send alike, encoded once.

    A handler (typically a stream fanning one event out to many subscribers)
    may return or yield a SharedReply instead of a dict. Every connection
    sends the same bytes: the parameters are checked against the method's
    IDL (a mismatch is logged once) and encoded the first time a connection
    sends it (once for ``continues`` and once without), not once per
    connection. The parameters must not change after construction; fds
    pushed with :meth:`Call.push_fd` still go with the connection's own copy.
    """

    __slots__ = ("parameters", "_encoded")

    def __init__(self, parameters):
        self.parameters = dict(parameters or {})
        self._encoded = {}

    def encoded(self, definition, continues):
        """(wire bytes with the NUL, the first field not fitting the IDL or None).

        The field is reported by the call that encodes, not by those reusing
        the bytes: a mismatch is logged once, not once per connection.
        """
        key = (definition, continues)
        data = self._encoded.get(key)
        if data is not None:
            return data, None
        bad = definition.reply_mismatch(self.parameters) if definition is not None else None
        data = self._encoded[key] = protocol.encode_message(
            protocol.reply_message(self.parameters, continues))
        return data, bad


class Call:
    """One method call as a handler sees it.

    ``parameters`` are validated against the IDL before the handler runs:
    every declared parameter is present (absent optional ones as None).

    ``fds`` are the file descriptors that came with the call (SCM_RIGHTS).
    They belong to the server, which closes every one still in the list when
    the call is over (for a stream: when the stream ends). A handler that
    keeps one calls :meth:`take_fd` and from then on owns (and must close)
    it.
    """

    def __init__(self, method, parameters=None, *, more=False, oneway=False,
                 upgrade=False, fds=(), peer_pid=None, peer_uid=None,
                 peer_gid=None, connection=None, allow_fd_passing=True):
        self.method = method
        self.parameters = parameters if parameters is not None else {}
        self.more = more
        self.oneway = oneway
        self.upgrade = upgrade
        self.fds = list(fds)
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.peer_gid = peer_gid
        self.connection = connection
        self._allow_fd_passing = allow_fd_passing
        self._reply_fds = []
        self.definition = None      # the MethodDefinition, once dispatched

    def __repr__(self):
        return "<Call %s more=%s oneway=%s upgrade=%s fds=%d>" % (
            self.method, self.more, self.oneway, self.upgrade, len(self.fds))

    def take_fd(self, index, parameter=None):
        """Take ownership of received fd number ``index``; returns the fd.

        A bad index (out of range, negative, not an int, or already taken)
        raises InvalidParameter naming ``parameter`` when given (handlers pass
        e.g. "fileDescriptorIndex"), else IndexError.
        """
        fd = None
        if isinstance(index, int) and not isinstance(index, bool) \
                and 0 <= index < len(self.fds):
            fd = self.fds[index]
        if fd is None:
            if parameter is not None:
                raise VarlinkError.invalid_parameter(parameter)
            raise IndexError("no file descriptor #%r with this call" % (index,))
        self.fds[index] = None          # a taken fd leaves a hole: indices stay stable
        return fd

    def push_fd(self, fd):
        """Send ``fd`` along with the next reply; the server takes ownership.

        Returns its index in that reply. Needs a server with
        ``allow_fd_passing=True`` (like sd_varlink_push_fd(), else EPERM).
        """
        if not self._allow_fd_passing:
            raise PermissionError(1, "fd passing is not enabled on this server")
        self._reply_fds.append(fd)
        return len(self._reply_fds) - 1

    def take_reply_fds(self):
        """The fds pushed for the next reply (the server calls this)."""
        fds, self._reply_fds = self._reply_fds, []
        return fds

    def close_fds(self):
        """Close every received fd not taken and every pushed fd not sent."""
        close_fds(self.fds)
        self.fds = [None] * len(self.fds)
        close_fds(self.take_reply_fds())


class _ServiceInterface:
    """org.varlink.service, which every varlink socket serves."""

    def __init__(self, service):
        self._service = service

    def GetInfo(self, call):
        s = self._service
        return {
            "vendor": s.vendor,
            "product": s.product,
            "version": s.version,
            "url": s.url,
            "interfaces": sorted(s.interfaces),
        }

    def GetInterfaceDescription(self, call):
        name = call.parameters["interface"]
        entry = self._service._interfaces.get(name)
        if entry is None:
            raise VarlinkError(protocol.INTERFACE_NOT_FOUND, {"interface": name})
        return {"description": entry[0].text}


class Service:
    """The interfaces served on one socket and their handlers."""

    def __init__(self, *, vendor, product, version, url):
        self.vendor = vendor
        self.product = product
        self.version = version
        self.url = url
        # name -> (InterfaceDefinition, handler object or None)
        self._interfaces = {}
        self._add(protocol.interface_text(protocol.SERVICE_INTERFACE),
                  _ServiceInterface(self))
        # sd-varlink registers io.systemd (its generic errors) on every
        # server, so GetInfo lists it; ours does the same.
        self._add(protocol.interface_text(protocol.SYSTEMD_INTERFACE), None)

    @property
    def interfaces(self):
        """Names of the registered interfaces (GetInfo lists them sorted)."""
        return list(self._interfaces)

    def interface(self, name):
        """The InterfaceDefinition registered under ``name`` (KeyError if none)."""
        return self._interfaces[name][0]

    def add_interface(self, idl_text, handler=None):
        """Serve the interface described by ``idl_text`` with ``handler``.

        ``handler`` has one method per IDL method, named like it, taking a
        :class:`Call`; IDL methods it lacks answer MethodNotFound (logged
        here, once). ``handler`` may be None for an interface of errors
        only. Re-adding io.systemd replaces the built-in copy; any other
        duplicate, and org.varlink.service, raise ValueError.
        """
        definition = parse_interface(idl_text)
        if definition.name == protocol.SERVICE_INTERFACE:
            raise ValueError("org.varlink.service is built in")
        if definition.name in self._interfaces \
                and definition.name != protocol.SYSTEMD_INTERFACE:
            raise ValueError("interface %s added twice" % definition.name)
        self._add(idl_text, handler, definition)
        return definition

    def _add(self, idl_text, handler, definition=None):
        definition = definition or parse_interface(idl_text)
        missing = [m for m in definition.methods
                   if not callable(getattr(handler, m, None))]
        if missing:
            log.warning("interface %s: no handler for %s; calls will get "
                        "MethodNotFound", definition.name, ", ".join(missing))
        self._interfaces[definition.name] = (definition, handler)

    def lookup(self, method):
        """(MethodDefinition, bound handler) for a full method name, or None."""
        interface_name, dot, member = method.rpartition(".")
        if not dot:
            return None
        entry = self._interfaces.get(interface_name)
        if entry is None:
            return None
        definition, handler = entry
        method_definition = definition.methods.get(member)
        function = getattr(handler, member, None)
        if method_definition is None or not callable(function):
            return None
        return method_definition, function

    def handle(self, call):
        """Dispatch ``call``; returns the handler's result, raises VarlinkError.

        Exceptions from the handler propagate unchanged.
        """
        found = self.lookup(call.method)
        if found is None:
            raise VarlinkError(protocol.METHOD_NOT_FOUND, {"method": call.method})
        definition, function = found
        if definition.requires_more and not call.more:
            raise VarlinkError(protocol.EXPECTED_MORE)
        if definition.requires_upgrade and not call.upgrade:
            raise VarlinkError(protocol.EXPECTED_UPGRADE)
        call.parameters = definition.validate_parameters(call.parameters)
        call.definition = definition
        return function(call)


def errno_error(exc):
    """io.systemd.System for an exception: its errno if it has one, else EIO."""
    number = getattr(exc, "errno", None)
    if not isinstance(number, int) or number <= 0:
        number = errno.EIO
    return VarlinkError.from_errno(number)
