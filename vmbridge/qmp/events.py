"""QMP events and per-consumer event queues.

QEMU sends events unprompted, interleaved with command replies, one JSON
object per line::

    {"event": "STOP", "data": {...}, "timestamp": {"seconds": 1700000000,
                                                  "microseconds": 123456}}

``data`` is absent for events without payload.  The timestamp is QEMU's
wall clock when the event was emitted (not when we read it).

The client's pump greenlet hands each event, in arrival order, first to the
synchronous callbacks registered with ``QMPClient.on_event`` and then to every
:class:`EventListener`.  A listener is one consumer's bounded queue with an
optional name filter.  The pump never waits for a consumer: a listener that
is ``maxsize`` events behind is marked ``overflowed``, closed, and its
consumer gets :class:`QMPListenerOverflowError` once it has drained what was
queued.  Other listeners and the pump carry on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable, Iterable, Iterator

import gevent
import gevent.event

from .errors import (QMPDisconnectedError, QMPError, QMPListenerClosedError,
                     QMPListenerOverflowError, QMPProtocolError,
                     QMPTimeoutError)

logger = logging.getLogger("vmbridge.qmp")


@dataclasses.dataclass(frozen=True)
class Event:
    """One QMP event.

    ``timestamp`` is seconds since the epoch (float) from QMP's
    ``{"seconds", "microseconds"}``; ``raw`` is the whole message as received.
    """

    name: str
    data: dict | None
    timestamp: float
    raw: dict = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_message(cls, message: dict) -> "Event":
        """Build an Event from a decoded ``{"event": ...}`` message.

        Raises :class:`QMPProtocolError` if the message is not a well-formed
        event (QEMU always sends a string name, an object ``data`` if any, and
        an integer ``seconds``/``microseconds`` timestamp).
        """
        name = message.get("event")
        data = message.get("data")
        stamp = message.get("timestamp")
        if not isinstance(name, str):
            raise QMPProtocolError("event name is not a string")
        if data is not None and not isinstance(data, dict):
            raise QMPProtocolError(f"event {name}: data is not an object")
        try:
            timestamp = stamp["seconds"] + stamp["microseconds"] / 1e6
        except (TypeError, KeyError) as exc:
            raise QMPProtocolError(f"event {name}: bad timestamp {stamp!r}") from exc
        return cls(name, data, float(timestamp), message)


class EventListener:
    """A bounded queue of events for one consumer (see the module docstring).

    Create it with ``QMPClient.listen(names=None, maxsize=1024)``.  It is a
    context manager (unregistered on exit) and an iterator::

        with client.listen({"STOP", "RESUME"}) as listener:
            client.execute("stop")
            event = listener.get(timeout=5)

    ``get()`` blocks only the calling greenlet.  Ends of a listener:

    * closed by its owner (``close()``/``with`` exit): iteration stops,
      ``get()`` raises :class:`QMPListenerClosedError`;
    * the client disconnected: queued events are still delivered, then
      ``get()`` and iteration raise :class:`QMPDisconnectedError`;
    * overflow (``maxsize`` undelivered events): ``overflowed`` becomes True,
      no more events are queued, the queued ones are delivered, then ``get()``
      and iteration raise :class:`QMPListenerOverflowError`.
    """

    def __init__(self, names: Iterable[str] | str | None, maxsize: int,
                 unregister: Callable[["EventListener"], None]):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        if isinstance(names, str):  # a lone name, not an iterable of letters
            names = (names,)
        self.names: frozenset[str] | None = (
            frozenset(names) if names is not None else None)
        self.maxsize = maxsize
        self.overflowed = False
        self._queue: collections.deque[Event] = collections.deque()
        self._wakeup = gevent.event.Event()
        self._end: QMPError | None = None  # raised once the queue is drained
        self._unregister = unregister

    @property
    def closed(self) -> bool:
        """True once no further events will be queued."""
        return self._end is not None

    def __len__(self) -> int:
        return len(self._queue)

    # -- pump side: must never block -------------------------------------

    def _deliver(self, event: Event) -> None:
        if self._end is not None:
            return
        if self.names is not None and event.name not in self.names:
            return
        if len(self._queue) >= self.maxsize:
            self.overflowed = True
            logger.warning("event listener %r overflowed (%d events queued); dropping it",
                           self, len(self._queue))
            self._finish(QMPListenerOverflowError(
                f"event listener fell {self.maxsize} events behind and was dropped"))
            return
        self._queue.append(event)
        self._wakeup.set()

    def _finish(self, end: QMPError) -> None:
        """Stop queueing; ``end`` is raised to the consumer after draining."""
        if self._end is None:
            self._end = end
            self._unregister(self)
            self._wakeup.set()

    def _disconnected(self, reason: BaseException | None) -> None:
        error = QMPDisconnectedError("QMP connection closed", reason=reason)
        error.__cause__ = reason
        self._finish(error)

    # -- consumer side ---------------------------------------------------

    def get(self, timeout: float | None = None) -> Event:
        """Return the next event, blocking this greenlet up to ``timeout``
        seconds (``None``: forever).

        Raises :class:`QMPTimeoutError` on timeout, and the listener's end
        (see the class docstring) once it is closed and drained.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._end is not None:
                raise self._fresh_end()
            self._wakeup.clear()
            remaining = None
            if deadline is not None:
                remaining = max(0.0, deadline - time.monotonic())
            if not self._wakeup.wait(remaining):
                raise QMPTimeoutError(f"no event within {timeout} s")

    def get_nowait(self) -> Event | None:
        """The next queued event, or None if there is none yet.  Raises the
        listener's end once it is closed and drained."""
        if self._queue:
            return self._queue.popleft()
        if self._end is not None:
            raise self._fresh_end()
        return None

    def _fresh_end(self) -> QMPError:
        # A new instance per raise, so tracebacks don't pile up on one object.
        end = self._end
        if isinstance(end, QMPDisconnectedError):
            fresh = QMPDisconnectedError(str(end), reason=end.reason)
            fresh.__cause__ = end.reason
            return fresh
        return type(end)(*end.args)

    def __iter__(self) -> Iterator[Event]:
        """Yield events until the owner closes the listener; raise
        :class:`QMPDisconnectedError` or :class:`QMPListenerOverflowError`
        for the other two ends."""
        while True:
            try:
                yield self.get()
            except QMPListenerOverflowError:
                raise
            except QMPListenerClosedError:
                return

    def close(self) -> None:
        """Unregister; events already queued can still be read."""
        self._finish(QMPListenerClosedError("event listener closed"))

    def __enter__(self) -> "EventListener":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        names = "all" if self.names is None else ",".join(sorted(self.names))
        state = "overflowed" if self.overflowed else ("closed" if self.closed else "open")
        return f"<EventListener {names} {len(self._queue)}/{self.maxsize} {state}>"
