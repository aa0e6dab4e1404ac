"""The QMP client's exceptions.

Every exception the client raises on purpose is a :class:`QMPError`.  Which
one tells the caller what it can still rely on:

``QMPCommandError``
    QEMU received the command, ran it (or refused it) and answered
    ``{"error": {"class": ..., "desc": ...}}``.  The connection is fine.
``QMPTimeoutError``
    The caller stopped waiting.  The connection is fine; if the command was
    already sent QEMU may still run it, and its late reply is dropped.
``QMPDisconnectedError``
    The transport is gone (EOF, socket error, protocol error, ``close()``).
    ``reason`` holds what ended it.  Nothing more can be sent.
``QMPProtocolError``
    The peer sent something that is not QMP.  Used as the disconnect reason
    (the client drops a connection it can no longer parse) and raised by
    :meth:`QMPClient.handshake` when that is why the handshake failed.
``QMPListenerClosedError`` / ``QMPListenerOverflowError``
    An :class:`EventListener` ended: closed by its owner, or dropped by the
    pump because its queue filled up.

``fds_sent`` answers the one question about file descriptors a failed call
leaves open: did the fds given to ``execute(..., fds=...)`` reach QEMU?
SCM_RIGHTS travels with the first byte of the command, so it is all of them
or none.  ``True`` means QEMU holds duplicates (and may have stored them, e.g.
``getfd``), ``False`` means they never left this process.  Either way the
caller still owns (and must close) its own copies.
"""


class QMPError(Exception):
    """Base class of every error raised by :mod:`vmbridge.qmp`."""

    #: Whether the fds passed to the failed call were handed to QEMU.
    fds_sent: bool = False


class QMPCommandError(QMPError):
    """QEMU answered a command with ``{"error": {"class", "desc"}}``.

    ``error_class`` is QMP's ``class`` (``"GenericError"``,
    ``"CommandNotFound"``, ``"DeviceNotFound"``...), ``desc`` the human
    readable text, ``command`` the command name that failed, ``error`` the
    raw error object.
    """

    def __init__(self, command: str, error: dict, *, fds_sent: bool = False):
        self.command = command
        self.error = error
        self.error_class = error.get("class", "GenericError")
        self.desc = error.get("desc", "")
        self.fds_sent = fds_sent
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QMPDisconnectedError(QMPError):
    """The QMP connection is (or became) unusable.

    ``reason`` is the exception that ended the connection (also chained as
    ``__cause__`` when raised from a pending command).
    """

    def __init__(self, message: str, *, reason: BaseException | None = None,
                 fds_sent: bool = False):
        super().__init__(message)
        self.reason = reason
        self.fds_sent = fds_sent


class QMPTimeoutError(QMPError):
    """A wait (handshake, command reply, listener ``get``) timed out."""

    def __init__(self, message: str, *, fds_sent: bool = False):
        super().__init__(message)
        self.fds_sent = fds_sent


class QMPProtocolError(QMPError):
    """The peer violated the protocol: bad JSON, an unknown message shape, an
    oversized line, a refused ``qmp_capabilities``.

    ``excerpt`` holds the first bytes of the offending data (may be empty).
    """

    def __init__(self, message: str, *, excerpt: bytes = b""):
        if excerpt:
            message = f"{message}: {excerpt!r}"
        super().__init__(message)
        self.excerpt = excerpt


class QMPListenerClosedError(QMPError):
    """The :class:`EventListener` was closed by its owner."""


class QMPListenerOverflowError(QMPListenerClosedError):
    """The :class:`EventListener` fell ``maxsize`` events behind and was
    dropped by the pump (which never waits for a slow consumer)."""
