"""The varlink server on gevent: an accept loop and one greenlet per connection.

Ownership, written down once:

* the listening socket belongs to the :class:`Server` (closed by ``stop()``;
  the path is unlinked only if this server created it);
* an accepted socket belongs to its :class:`_Connection` until the connection
  ends (closed on every path) or an :class:`~.service.Upgrade` hands it to the
  takeover callable;
* fds received with a call belong to the :class:`~.service.Call` until a
  handler takes one; the rest are closed when the call (or its stream) ends;
* fds a handler pushes for a reply belong to the connection until sent.

A connection's greenlet reads messages, dispatches each in order (so
pipelined calls are answered in order) and writes the replies; it blocks only
itself. While a ``more`` stream is being produced, a small watcher greenlet
reads the socket instead, so that a client hanging up ends the stream at once:
the connection greenlet is thrown a :class:`ConnectionClosed` (a
``GeneratorExit``) wherever it is blocked — inside the handler's generator or
in a send — and the generator is closed so its handler can unsubscribe.
``connection.close()`` from any other greenlet does the same.

Protocol violations (malformed JSON, a call object with unknown keys or
wrongly typed flags, ``more`` with ``oneway``, a message growing past
``max_message_size`` without its NUL, fds not on a message's first byte)
close that connection only, like sd-varlink.
"""

import collections
import errno
import logging
import os
import resource
import socket as _socket
import stat

import gevent
import gevent.socket

from . import protocol
from .connection import _Connection, peer_credentials
from .protocol import VarlinkError

log = logging.getLogger("vmbridge.varlink")

_REFUSALS_MAX = 64          # refusal greenlets in flight; past it we just close
_REFUSAL_LINGER = 2.0       # how long a refused client gets to send its call


def default_connection_limits():
    """(total, per UID) connection caps, computed like sd-varlink's defaults.

    4096 connections and 1024 per UID, but never more than 3/4 of
    RLIMIT_NOFILE in total, and never more than 3/4 of that for one UID.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    total = min(4096, soft // 4 * 3)
    per_uid = 1024 if 1024 <= total else total // 4 * 3
    return max(total, 1), max(per_uid, 1)


class Server:
    """Serve a :class:`~.service.Service` on an AF_UNIX stream socket.

    Give either ``path`` (we create the socket with ``mode`` — the umask is
    set for the bind() so there is no moment with wider permissions — after
    replacing a stale socket there; we unlink it at ``stop()``) or
    ``listen_socket`` (already listening, e.g. socket activation: a socket
    object or an fd; the server takes ownership and closes it at ``stop()``
    but never unlinks anything).

    ``allowed_uids`` (default: our own UID and root) are checked with
    SO_PEERCRED on accept; other peers get ``org.varlink.service.
    PermissionDenied`` and are closed. Past ``max_connections`` in total or
    ``max_connections_per_uid`` for one UID (defaults as sd-varlink, see
    :func:`default_connection_limits`) a new connection gets
    ``io.systemd.System`` with errnoName ``EMFILE`` (total) or ``EUSERS``
    (per UID) and is closed; existing connections are unaffected.
    """

    def __init__(self, service, *, listen_socket=None, path=None, mode=0o600,
                 allowed_uids=None, max_connections=None,
                 max_connections_per_uid=None,
                 max_message_size=protocol.BUFFER_MAX,
                 send_timeout=protocol.DEFAULT_TIMEOUT,
                 allow_fd_passing=False):
        if (listen_socket is None) == (path is None):
            raise ValueError("give exactly one of path and listen_socket")
        default_total, default_per_uid = default_connection_limits()
        self.service = service
        self.mode = mode
        self.allowed_uids = frozenset(
            allowed_uids if allowed_uids is not None else {os.getuid(), 0})
        self.max_connections = max_connections or default_total
        self.max_connections_per_uid = max_connections_per_uid or default_per_uid
        self.max_message_size = max_message_size
        self.send_timeout = send_timeout
        self.allow_fd_passing = allow_fd_passing
        self._path = path
        self._address = path
        self._given_socket = listen_socket
        self._listener = None
        self._created_inode = None     # (st_dev, st_ino) of the socket we bound
        self._accept_greenlet = None
        self._connections = set()
        self._per_uid = collections.Counter()
        self._refusals = set()
        self._started = False
        self._stopped = False

    # -- public ------------------------------------------------------------

    @property
    def address(self):
        """The socket's path (for a listen_socket: its name, once started)."""
        return self._address

    @property
    def connections(self):
        """Number of live varlink connections (not refused, not upgraded)."""
        return len(self._connections)

    def start(self):
        if self._started or self._stopped:
            raise RuntimeError("a varlink server starts once")
        self._started = True
        if self._path is not None:
            self._listener = self._bind(self._path)
        else:
            self._listener = self._adopt(self._given_socket)
            self._given_socket = None
            name = self._listener.getsockname()
            self._address = (name.decode("utf-8", "replace")
                             if isinstance(name, bytes) else name)
        self._accept_greenlet = gevent.spawn(self._accept_loop)
        log.info("varlink: listening on %s", self.address)

    def stop(self, timeout=5.0, *, graceful=False):
        """Stop accepting, end every connection, remove our socket. Idempotent.

        With `graceful`, idle connections close at once and a connection in
        the middle of a call (or stream) closes once that call has ended;
        any still open after `timeout` seconds are closed regardless.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._accept_greenlet is not None:
            self._accept_greenlet.kill(block=True)
        if self._listener is not None:
            self._listener.close()
        self._unlink_created_path()
        connections = list(self._connections)
        current = gevent.getcurrent()
        for connection in connections:
            if connection.greenlet is current:
                # stop() called by a handler: answer its call, then close.
                connection.close_after_call()
            elif graceful:
                connection.close_gracefully()
            else:
                connection.close()
        others = [c.greenlet for c in connections if c.greenlet is not None and c.greenlet is not current]
        gevent.joinall(others, timeout=timeout)
        for connection in connections:
            if connection.greenlet is not current:
                connection.close()
        gevent.joinall(others, timeout=timeout)
        for connection in connections:
            if connection.greenlet is not current:
                connection.release()
        gevent.killall(list(self._refusals), block=True, timeout=timeout)
        log.info("varlink: stopped serving %s", self.address)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    # -- listening socket ----------------------------------------------------

    def _bind(self, path):
        _remove_stale_socket(path)
        sock = gevent.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            # The socket file gets 0777 & ~umask: setting the umask for the
            # bind() means it is never wider than `mode`, not even briefly.
            # No other thread can be affected: we have none.
            old_umask = os.umask(0o777 & ~self.mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            st = os.stat(path)
            self._created_inode = (st.st_dev, st.st_ino)
            sock.listen(_socket.SOMAXCONN)
        except BaseException:
            sock.close()
            self._unlink_created_path()
            raise
        return sock

    def _adopt(self, listen_socket):
        fd = listen_socket if isinstance(listen_socket, int) else listen_socket.detach()
        return gevent.socket.socket(fileno=fd)

    def _unlink_created_path(self):
        # Only remove the very socket we bound: a newer server may have
        # replaced it at the same path since.
        if self._created_inode is None:
            return
        try:
            st = os.lstat(self._path)
            if (st.st_dev, st.st_ino) == self._created_inode:
                os.unlink(self._path)
        except FileNotFoundError:
            pass
        self._created_inode = None

    # -- accepting -------------------------------------------------------------

    def _accept_loop(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                               errno.ENOMEM):
                    # Out of fds or memory: the pending connection stays in
                    # the backlog; retrying at once would only spin.
                    log.error("varlink: accept on %s failed: %s", self.address, e)
                    gevent.sleep(0.1)
                elif e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    pass
                else:
                    log.exception("varlink: accept on %s failed", self.address)
                    gevent.sleep(0.1)
                continue
            try:
                self._admit(sock)
            except Exception:
                # A bug here must not stop the server accepting others.
                log.exception("varlink: admitting a connection on %s failed",
                              self.address)
                sock.close()

    def _admit(self, sock):
        try:
            peer = peer_credentials(sock)
        except OSError as e:
            log.warning("varlink: cannot read peer credentials: %s", e)
            sock.close()
            return
        if peer.uid not in self.allowed_uids:
            self._refuse(sock, peer, VarlinkError(protocol.PERMISSION_DENIED),
                         "UID %d is not allowed" % peer.uid)
        elif len(self._connections) >= self.max_connections:
            self._refuse(sock, peer, VarlinkError.from_errno(errno.EMFILE),
                         "connection limit of %d reached" % self.max_connections)
        elif self._per_uid[peer.uid] >= self.max_connections_per_uid:
            self._refuse(sock, peer, VarlinkError.from_errno(errno.EUSERS),
                         "per-UID connection limit of %d reached"
                         % self.max_connections_per_uid)
        else:
            connection = _Connection(self, sock, peer)
            self._connections.add(connection)
            self._per_uid[peer.uid] += 1
            log.debug("varlink: new connection from %s", connection.description)
            connection.start()

    def _forget(self, connection):
        if connection in self._connections:
            self._connections.discard(connection)
            uid = connection.peer.uid
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]

    def _refuse(self, sock, peer, error, why):
        log.warning("varlink: refusing connection from pid=%d uid=%d on %s: %s",
                    peer.pid, peer.uid, self.address, why)
        if len(self._refusals) >= _REFUSALS_MAX:
            sock.close()
            return
        greenlet = gevent.spawn(_answer_refused, sock, error)

        def forget(g, sock=sock):
            self._refusals.discard(g)
            sock.close()        # also when killed before it ever ran
        self._refusals.add(greenlet)
        greenlet.link(forget)


def _remove_stale_socket(path):
    """Unlink a socket nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass                    # stale: its server is gone
    except BlockingIOError:
        raise OSError(errno.EADDRINUSE, "a server is listening there", path)
    else:
        raise OSError(errno.EADDRINUSE, "a server is listening there", path)
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _answer_refused(sock, error):
    """Tell a refused client why, then close.

    We answer at once and then wait briefly for its first call (or its
    hang-up) before closing, so that a client which writes its call and then
    reads gets our error rather than EPIPE.
    """
    try:
        with gevent.Timeout(1.0, False):
            sock.sendall(protocol.encode_message(error.to_message()))
        received = 0
        with gevent.Timeout(_REFUSAL_LINGER, False):
            while received < protocol.READ_SIZE:
                data = sock.recv(protocol.READ_SIZE)
                if not data or b"\0" in data:
                    break
                received += len(data)
    except OSError:
        pass
    finally:
        sock.close()

