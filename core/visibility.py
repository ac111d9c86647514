"""What consumers may see of each queue, and who is waiting for it to grow.

An appended index entry becomes *visible* once its record is durable (sync flush) or at once (async flush), so a
consumer never sees, and never commits past, a message a crash could take back. Appends that are not durable yet
wait in `pending` until the durability listener reports an fsync that covers them; then the subscriptions
watching the grown queues are woken by the waker they were registered with, and pumped before the fsync's
completion returns (`run_woken`): at low rates the delivery goes out in the turn that learned of the fsync, not in
the next reactor iteration.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from tidegate.core.consumers import Subscription
from tidegate.core.errors import TidegateError
from tidegate.core.model import QueueRef
from tidegate.core.storage.api import MessageStore


class Visibility:
    def __init__(self, store: MessageStore) -> None:
        self._store = store
        # queue -> end offset consumers may read up to (exclusive); filled lazily from the store. The publish path
        # reads and fills this dict directly.
        self.visible: dict[QueueRef, int] = {}
        # (commit end, [(queue, new visible end)]) in commit order, waiting for an fsync to cover commit end
        self.pending: deque[tuple[int, list[tuple[QueueRef, int]]]] = deque()
        self._watchers: dict[QueueRef, set[Subscription]] = {}
        self._wake: Callable[[Subscription], None] = _no_waker
        self._run_woken: Callable[[Callable[[], None]], None] = _run_plain
        # queue -> listener(queue, new visible end) for queues whose length an adapter limits (AMQP x-max-length
        # drop-head trims them once new messages are visible, whichever protocol published them)
        self.growth_listeners: dict[QueueRef, Callable[[QueueRef, int], None]] = {}

    def set_waker(self, wake: Callable[[Subscription], None],
                  run_woken: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Who is told that a watched queue grew, for every watcher, whatever its credit (the delivery module, built
        after this: it pumps those with credit and notes the work for the others). `run_woken(work)` runs
        `work` (which wakes subscriptions) and then pumps what it woke at once, instead of in a later reactor
        iteration; without it the waker alone schedules the pumps."""
        self._wake = wake
        self._run_woken = run_woken or _run_plain

    def on_durable(self, durable: int) -> None:
        """Durability listener: everything below commit offset `durable` is on disk."""
        pending = self.pending
        if not pending or pending[0][0] > durable:
            return
        updates: list[tuple[QueueRef, int]] = []
        while pending and pending[0][0] <= durable:
            updates.extend(pending.popleft()[1])
        # The fsync's completion is the end of this piece of work: deliver now (one reactor iteration less per
        # message at low rates, where each iteration starts cold)
        self._run_woken(lambda: self.make_visible(updates))

    def make_visible(self, updates: Iterable[tuple[QueueRef, int]]) -> None:
        visible, watchers, wake, growth = self.visible, self._watchers, self._wake, self.growth_listeners
        for queue, end in updates:
            if end > visible.get(queue, 0):
                visible[queue] = end
                subs = watchers.get(queue)
                if subs:
                    for sub in subs:
                        wake(sub)  # with or without credit: the waker also notes that work arrived
                if growth:
                    listener = growth.get(queue)
                    if listener is not None:
                        listener(queue, end)

    def visible_max(self, queue: QueueRef) -> int:
        end = self.visible.get(queue)
        if end is None:
            end = self.visible[queue] = self._store.queue_bounds(queue).max_offset
        return end

    def forget(self, queue: QueueRef) -> None:
        """The queue was deleted."""
        self.visible.pop(queue, None)

    def position_for(self, queue: QueueRef, where: str | int) -> int:
        """The offset "earliest", "latest" or a timestamp in ms (first message stored at/after it) points at."""
        if where == "earliest":
            return self._store.queue_bounds(queue).min_offset
        if where == "latest":
            return self.visible_max(queue)
        if isinstance(where, int) or (isinstance(where, str) and where.isdigit()):
            return min(self._store.offset_for_time(queue, int(where)), self.visible_max(queue))
        raise TidegateError(f"start position must be 'earliest', 'latest' or a timestamp in ms, not {where!r}")

    def watch(self, sub: Subscription, queues: Iterable[QueueRef]) -> None:
        for q in queues:
            self._watchers.setdefault(q, set()).add(sub)

    def unwatch(self, sub: Subscription, queues: Iterable[QueueRef]) -> None:
        for q in queues:
            subs = self._watchers.get(q)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._watchers[q]


def _run_plain(work: Callable[[], None]) -> None:
    work()


def _no_waker(sub: Subscription) -> None:
    raise RuntimeError("Visibility.set_waker was not called")
