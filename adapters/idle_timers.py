"""Idle (keepalive / heartbeat) deadlines of every connection of a listener behind one reactor timer.

A Twisted `DelayedCall` per connection costs about 450 bytes (the object, its attribute dict, its args tuple and
kwargs dict) and a heap insertion among the reactor's other timers; 10,000 idle MQTT connections pay that 10,000
times. Here a deadline is one small tuple `(deadline, sequence, connection)` in this object's own heap, and a
single `DelayedCall` points at the earliest deadline. Deadlines are exact (the callback runs at the same reactor
time a per-connection `callLater` would), so keepalive (MQTT 1.5 x keep alive, native heartbeats, AMQP handshake
and heartbeat) behaves as before.

A cancelled deadline is left in the heap and skipped when it comes up (a connection holds the entry it armed, so
identity says which entry is live); when more than half the heap is stale it is rebuilt, and once no deadline is
live the heap is emptied and the reactor timer cancelled, so a stopped listener leaves no timer behind.
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import Any, Protocol

from twisted.logger import Logger

log = Logger(namespace="tidegate.adapters")

# A per-connection `callLater(delay)` runs once the reactor time reaches `now + delay`; the shared timer is scheduled
# for the earliest deadline the same way, but float rounding (about 2.4e-7 s at today's epoch) may make it run a hair
# before a deadline computed separately: count a deadline within this margin as reached.
DEADLINE_SLACK_S = 1e-6
# Rebuild the heap once cancelled entries are more than this many and more than half of it.
COMPACT_AFTER = 64


class IdleWatched(Protocol):
    """What a connection offers the timers: the entry it armed last (None: not armed) and the check to run."""

    _idle_timer: Any

    def _check_idle(self) -> None: ...


class IdleTimers:
    """`arm(connection, seconds)` calls `connection._check_idle()` once, `seconds` from now, unless `cancel`led or
    re-armed meanwhile. One per listener (`AdapterFactory.idle_timers`); `clock` is an `IReactorTime`."""

    __slots__ = ("_clock", "_heap", "_sequence", "_stale", "_call", "_call_at")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, IdleWatched]] = []
        self._sequence = count()  # breaks ties between equal deadlines: connections are never compared
        self._stale = 0  # cancelled entries still in the heap
        self._call: Any = None  # the reactor timer, due at `_call_at`
        self._call_at = 0.0

    def __len__(self) -> int:
        """Live deadlines."""
        return len(self._heap) - self._stale

    def arm(self, connection: IdleWatched, seconds: float) -> None:
        """(Re)arm `connection`'s deadline `seconds` from now, replacing the one it had."""
        if connection._idle_timer is not None:
            self.cancel(connection)
        deadline = self._clock.seconds() + seconds
        entry = (deadline, next(self._sequence), connection)
        connection._idle_timer = entry
        heapq.heappush(self._heap, entry)
        if self._call is None or deadline < self._call_at:
            self._schedule(deadline)

    def cancel(self, connection: IdleWatched) -> None:
        """Forget `connection`'s deadline (no-op if it has none)."""
        if connection._idle_timer is None:
            return
        connection._idle_timer = None
        self._stale += 1
        if self._stale == len(self._heap):  # nothing live is left: drop everything, stop the reactor timer
            self._heap.clear()
            self._stale = 0
            self._cancel_call()
        elif self._stale > COMPACT_AFTER and self._stale * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2]._idle_timer is entry]
            heapq.heapify(self._heap)
            self._stale = 0

    def stop(self) -> None:
        """Listener shutdown: forget every deadline and cancel the reactor timer."""
        for _, _, connection in self._heap:
            connection._idle_timer = None
        self._heap.clear()
        self._stale = 0
        self._cancel_call()

    def _schedule(self, deadline: float) -> None:
        self._cancel_call()
        self._call_at = deadline
        self._call = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self._fire)

    def _cancel_call(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        heap = self._heap
        reached = self._clock.seconds() + DEADLINE_SLACK_S
        due: list[IdleWatched] = []
        while heap and heap[0][0] <= reached:
            entry = heapq.heappop(heap)
            connection = entry[2]
            if connection._idle_timer is entry:
                connection._idle_timer = None
                due.append(connection)
            else:
                self._stale -= 1
        if heap and self._stale == len(heap):
            heap.clear()
            self._stale = 0
        # each check may re-arm its connection (or close it); the timer then points at the earliest deadline
        for connection in due:
            try:
                connection._check_idle()
            except Exception:  # one connection's failure must not skip the others' checks
                log.failure("idle check of {connection} failed", connection=connection)
        if heap and self._call is None:
            self._schedule(heap[0][0])
