"""A gevent client for QEMU's QMP (QEMU Machine Protocol).

QMP is JSON over a stream socket, one object per line.  QEMU greets, the
client negotiates capabilities with ``qmp_capabilities``, and from then on
the client sends ``{"execute": name, "arguments": {...}, "id": n}`` and QEMU
answers ``{"return": value, "id": n}`` or ``{"error": {"class", "desc"},
"id": n}``, and sends ``{"event": NAME, "data": {...}, "timestamp": {...}}``
whenever something happens.  File descriptors travel with a command as
SCM_RIGHTS ancillary data.

Typical use (each call blocks only its own greenlet)::

    client = QMPClient(sock, name="vm1")     # takes ownership of sock
    client.on_disconnect(lambda reason: ...)
    client.handshake(timeout=10)
    status = client.execute("query-status")["status"]
    with client.listen({"STOP"}) as listener:
        client.execute("stop")
        listener.get(timeout=5)
    client.close()

Modules: :mod:`.client` (state machine, pump, commands), :mod:`.transport`
(framing, fd passing), :mod:`.events` (events and listeners),
:mod:`.schema` (capability probes), :mod:`.errors`.  This package never
monkey-patches; it uses gevent's cooperative socket explicitly, so it works
whether or not the program monkey-patched with gevent.
"""

from .client import QMPClient, State
from .errors import (QMPCommandError, QMPDisconnectedError, QMPError,
                     QMPListenerClosedError, QMPListenerOverflowError,
                     QMPProtocolError, QMPTimeoutError)
from .events import Event, EventListener

__all__ = [
    "QMPClient", "State", "Event", "EventListener",
    "QMPError", "QMPCommandError", "QMPDisconnectedError", "QMPTimeoutError",
    "QMPProtocolError", "QMPListenerClosedError", "QMPListenerOverflowError",
]
