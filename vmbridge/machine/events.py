"""Fan-out of one VM's events to any number of subscribers.

The publisher is the VM's QMP pump greenlet, which must never block: every
subscriber has its own bounded queue, and a subscriber that falls behind
(its queue is full) is dropped on the spot - its `on_drop` callback runs so
its owner can close the connection that stopped reading. Nothing a
subscriber does can slow the pump or the other subscribers.

When the VM goes away the hub is closed: each subscription yields what it
already holds, then its iteration ends.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import gevent.event

log = logging.getLogger("vmbridge.machine")

DEFAULT_QUEUE_SIZE = 512


@dataclasses.dataclass(frozen=True)
class MachineEvent:
    name: str
    data: dict | None = None
    timestamp: float = dataclasses.field(default_factory=time.time)


class SubscriberDropped(Exception):
    """This subscriber fell behind by more than its queue holds and was dropped."""


class Subscription:
    """One subscriber's bounded queue; iterate it from the subscriber's own greenlet."""

    def __init__(self, hub: "EventHub", names, maxsize: int, on_drop):
        self._hub = hub
        self.names = frozenset(names) if names is not None else None
        self._maxsize = maxsize
        self._queue: collections.deque = collections.deque()
        self._ready = gevent.event.Event()
        self._on_drop = on_drop
        self.ended = False
        self.dropped = False

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names

    def _offer(self, event: MachineEvent) -> None:
        # Called by the publisher: never blocks.
        if self.ended:
            return
        if len(self._queue) >= self._maxsize:
            self._drop()
            return
        self._queue.append(event)
        self._ready.set()

    def _drop(self) -> None:
        log.warning("event subscriber fell %d events behind; dropping it", self._maxsize)
        self.dropped = True
        self._end()
        if self._on_drop is not None:
            try:
                self._on_drop()
            except Exception:  # the owner's cleanup must not break the publisher
                log.exception("on_drop callback failed")

    def _end(self) -> None:
        self.ended = True
        self._ready.set()
        self._hub._subscribers.discard(self)

    def get(self, timeout: float | None = None) -> MachineEvent | None:
        """The next event; None once the hub closed and the queue is drained.

        Raises SubscriberDropped if this subscriber was dropped for falling
        behind, TimeoutError if nothing arrived within `timeout` seconds.
        """
        while True:
            if self.dropped:
                raise SubscriberDropped()
            if self._queue:
                return self._queue.popleft()
            if self.ended:
                return None
            self._ready.clear()
            if not self._ready.wait(timeout):
                raise TimeoutError("no event within the timeout")

    def __iter__(self):
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Unsubscribe (idempotent). Queued events are discarded."""
        self._queue.clear()
        self._end()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EventHub:
    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE):
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size
        self.closed = False

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, names=None, *, on_drop=None, maxsize: int | None = None) -> Subscription:
        sub = Subscription(self, names, maxsize or self._queue_size, on_drop)
        if self.closed:
            sub._end()
        else:
            self._subscribers.add(sub)
        return sub

    def publish(self, event: MachineEvent) -> None:
        """Offer `event` to every interested subscriber. Never blocks."""
        for sub in tuple(self._subscribers):
            if sub.wants(event.name):
                sub._offer(event)

    def close(self) -> None:
        """No more events: every subscription ends once drained."""
        self.closed = True
        for sub in tuple(self._subscribers):
            sub._end()
