"""Push delivery: getting messages from queues to the subscriptions that have credit.

- Assignment: which queues each member of a group reads (offset-mode clustering splits them; every other mode
  gives every member all of them), and which queues each subscription watches for growth.
- Wake-ups: a subscription with credit whose queues grew is pumped at the end of the reactor turn, once per turn
  however many messages arrived (a bounded number of extra rounds for consumers that hand credit straight back);
  woken by an fsync's completion (`run_woken`), it is pumped right there, in the turn that learned of the fsync.
- Pumps: offset mode reads owned queues in order from each member's position; message mode ("pop") hands out
  redeliveries first, then new messages, each in flight under a receipt until acked.

What is in flight in message mode, and how it is settled (ack, nack, timeouts, dead letters, `get`), is
core/acks.py, which `Delivery` owns as `acks`. `Delivery` is the `SubscriptionOwner` of every Subscription
(core/consumers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from tidegate.core.acks import MessageAcks
from tidegate.core.api import AckMode, ConsumeMode, Delivered, DeliveryRun, DeliverySink
from tidegate.core.config import BrokerConfig
from tidegate.core.consumers import (
    GroupState,
    Inflight,
    PopQueue,
    Subscription,
    allocate_averagely,
    make_receipt,
)
from tidegate.core.errors import OffsetOutOfRange, TidegateError
from tidegate.core.filters import TagFilter
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef
from tidegate.core.offsets import OffsetBook
from tidegate.core.reader import MAX_SCAN_PER_PUMP, READ_BATCH, QueueReader
from tidegate.core.storage.api import MessageStore
from tidegate.core.topics import TopicRegistry
from tidegate.core.visibility import Visibility

log = logging.getLogger("tidegate.broker")


def _member_id(sub: Subscription) -> str:
    return sub.member_id

WAKE_ROUNDS_PER_TURN = 16  # pump rounds per reactor turn before yielding to the network
# Delivery before ingest (`when_drained`): a publisher that stopped reading while deliveries were due is let go
# once no woken subscription with credit is left, and at the latest after this many turns of wake rounds or this
# many seconds, so a pump that keeps waking itself (a consumer that never catches up) cannot starve publishers.
MAX_YIELD_TURNS = 32
MAX_YIELD_SECONDS = 0.05


class Delivery:
    def __init__(self, store: MessageStore, clock: IReactorTime, config: BrokerConfig, metrics: CoreMetrics,
                 topics: TopicRegistry, visibility: Visibility, reader: QueueReader, offsets: OffsetBook,
                 groups: dict[str, GroupState], publish: Callable[..., object]) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._metrics = metrics
        self._topics = topics
        self._visibility = visibility
        self._reader = reader
        self._offsets = offsets
        self._groups = groups  # the GroupRegistry's live states, by name
        self.acks = MessageAcks(store, clock, config, metrics, topics, visibility, reader, offsets, groups, publish,
                                self.wake_group)
        self._wake_pending: dict[Subscription, None] = {}
        # MESSAGE-mode members not pumped yet: their first pump is skipped when nothing waits for them (every
        # resumed session with an empty queue in a reconnect storm), see `_nothing_to_pop`
        self._first_pump: dict[Subscription, None] = {}
        self._wake_call: IDelayedCall | None = None
        self._holding_wakes = False  # inside run_woken: wakes are pumped at its end, no zero-delay call
        # MESSAGE-mode members whose last pump ended with budget left: everything visible was handed out and no
        # redelivery was ready, so credit coming back (a PUBACK, a basic.ack) finds nothing to do; their wake-ups
        # by credit alone are skipped until new work (`new_work`) arrives for them
        self._drained: dict[Subscription, None] = {}
        # Who waits for the wake set to drain (`when_drained`), since when, and for how many turns of wake rounds
        self._drain_waiters: list[Callable[[], None]] = []
        self._drain_since = 0.0
        self._drain_turns = 0
        self.max_yield_turns = MAX_YIELD_TURNS
        self.max_yield_seconds = MAX_YIELD_SECONDS
        self._member_seq = 0
        self._closed = False
        visibility.set_waker(self.new_work, self.run_woken)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # ------------------------------------------------------------------ members and assignment
    def attach(self, state: GroupState, topic: str, sink: DeliverySink, client_id: str, tag_filter: TagFilter,
               invisible_ms: int, max_attempts: int, start: str | int) -> Subscription:
        """A new member of `state` on `topic`; its progress key starts at `start` on queues it has no offset for."""
        self._member_seq += 1
        sub = Subscription(self, state, topic, sink, client_id, f"{client_id}#{self._member_seq:08d}", tag_filter,
                           invisible_ms, max_attempts)
        offsets = self._offsets.of(sub.progress_key)
        queues = self._topics.queues_of(topic)
        for q in queues:
            if q not in offsets:
                self._offsets.init(sub.progress_key, q, self._visibility.position_for(q, start))
        self._offsets.schedule_flush()
        state.members.setdefault(topic, []).append(sub)
        if state.ack is AckMode.MESSAGE:
            self._first_pump[sub] = None
        self.assign(state, topic, queues)
        return sub

    def assign(self, state: GroupState, topic: str, queues: list[QueueRef] | None = None) -> None:
        """(Re)compute which queues each member of `state` on `topic` reads, and tell the members that changed;
        `queues` are the topic's queues when the caller has them already."""
        subs = state.members.get(topic, [])
        if len(subs) > 1:
            subs = sorted(subs, key=_member_id)
        if queues is None:
            queues = self._topics.queues_of(topic)
        if len(subs) == 1:
            plan = {subs[0].member_id: queues}  # a sole member reads every queue, whatever the mode
        elif state.ack is AckMode.OFFSET and state.mode is ConsumeMode.CLUSTERING:
            plan = allocate_averagely(queues, [s.member_id for s in subs])
        else:
            plan = {s.member_id: list(queues) for s in subs}
        visible_max = self._visibility.visible_max
        for sub in subs:
            new = plan[sub.member_id]
            if new == sub.assigned:
                continue
            if sub.assigned:
                old = set(sub.assigned)
                self._visibility.unwatch(sub, [q for q in sub.assigned if q not in new])
                self._visibility.watch(sub, [q for q in new if q not in old])
            else:  # a new member (every resumed session): nothing to unwatch
                old = set()
                self._visibility.watch(sub, new)
            if state.ack is AckMode.OFFSET:
                committed = self._offsets.of(sub.progress_key)
                sub.positions = {q: sub.positions[q] if q in old else committed.get(q, visible_max(q))
                                 for q in new}
            sub.assigned = new
            sub.sink.assignment_changed(list(new))
            self.new_work(sub)

    def topic_resized(self, topic: str) -> None:
        for state in self._groups.values():
            if topic in state.members:
                self.assign(state, topic)

    def drop_topic(self, topic: str) -> None:
        """The topic is being deleted: its members lose their queues, groups forget its per-message progress."""
        for state in self._groups.values():
            for sub in state.members.pop(topic, []):
                self._visibility.unwatch(sub, sub.assigned)
                sub.assigned = []
                sub.sink.assignment_changed([])
            state.topics.discard(topic)
            for key in [k for k in state.pop if k[1].topic == topic]:
                del state.pop[key]

    def detach(self, sub: Subscription) -> None:
        state = sub.state
        members = state.members.get(sub.topic, [])
        if sub in members:
            members.remove(sub)
        if not members:
            state.members.pop(sub.topic, None)
        self._visibility.unwatch(sub, sub.assigned)
        self._wake_pending.pop(sub, None)
        self._first_pump.pop(sub, None)
        self._drained.pop(sub, None)
        released = self.acks.release(sub)
        sub.assigned = []
        if state.ack is AckMode.OFFSET and state.mode is ConsumeMode.CLUSTERING:
            self.assign(state, sub.topic)
        elif released:
            for other in members:
                self.new_work(other)
        self._offsets.schedule_flush()

    def reposition(self, state: GroupState | None, topic: str, keys: set[str], to: dict[QueueRef, int]) -> None:
        """Offsets of `keys` on `topic` were reset to `to`: restart per-message progress there and move the
        positions of members online."""
        for key in keys:
            for q, off in to.items():
                self._offsets.set(key, q, off)
                if state is not None and (key, q) in state.pop:
                    state.pop[(key, q)] = PopQueue(committed=off, next_fetch=off)
        if state is not None:
            for sub in state.members.get(topic, []):
                for q in sub.assigned:
                    if q in sub.positions:
                        sub.positions[q] = to[q]
                self.new_work(sub)

    # ------------------------------------------------------------------ offsets
    def commit(self, sub: Subscription, queue: QueueRef, offset: int) -> None:
        self.commit_progress(sub.progress_key, queue, offset)

    def commit_progress(self, key: str, queue: QueueRef, offset: int) -> None:
        """Everything below `offset` in `queue` is consumed by progress key `key` (never moves backwards)."""
        self._topics.check_queue(queue)
        end = self._visibility.visible_max(queue)
        if offset < 0 or offset > end:
            raise OffsetOutOfRange(f"cannot commit offset {offset} on {queue}: valid offsets are 0..{end}")
        if offset > self._offsets.of(key).get(queue, -1):
            self._offsets.set(key, queue, offset)

    # ------------------------------------------------------------------ wake-ups and pumps
    def wake(self, sub: Subscription) -> None:
        """Pump `sub` at the end of this turn (SubscriptionOwner: its credit grew). A MESSAGE-mode member whose
        last pump handed out everything it could with budget to spare is not pumped for credit alone: at low rates that
        was one empty pump and one more reactor iteration per acknowledged message."""
        if sub in self._drained:
            return
        self._wake_pending[sub] = None
        if self._wake_call is None and not self._closed and not self._holding_wakes:
            self._wake_call = self._clock.callLater(0, self._run_wakes)

    def new_work(self, sub: Subscription) -> None:
        """Something `sub` may deliver appeared (its queues grew, messages came back, its assignment or position
        changed): it is no longer drained, and is pumped at the end of the turn if it has credit."""
        self._drained.pop(sub, None)
        if sub.credit > 0:
            self.wake(sub)

    def run_woken(self, work: Callable[[], None]) -> None:
        """Run `work`, then pump the subscriptions it woke right away instead of in a zero-delay call.

        For work at the end of a piece of the turn, such as an fsync's completion making messages visible: at
        1,000 msg/s every reactor iteration starts with cold caches, and the zero-delay call cost one more
        iteration (a poll, the timed-call heap, the pump) per message, and its delay, between the fsync and the
        delivery. When a zero-delay call is already scheduled (wakes from earlier in the turn) the pumps are left
        to it, as before. A pump that fails unexpectedly is logged here, so that the caller (the flush's
        bookkeeping) carries on."""
        if self._holding_wakes:  # nested: the outer call pumps
            work()
            return
        self._holding_wakes = True
        try:
            work()
        except BaseException:
            self._holding_wakes = False
            if self._wake_pending and self._wake_call is None and not self._closed:
                self._wake_call = self._clock.callLater(0, self._run_wakes)  # what it woke is not lost
            raise
        self._holding_wakes = False
        if self._wake_pending and self._wake_call is None and not self._closed:
            try:
                self._run_wakes()
            except Exception:  # noqa: BLE001 - a timed call's failure would only have been logged too
                log.exception("delivery pump after an fsync failed")

    def _run_wakes(self) -> None:
        # A consumer that hands credit straight back while it is being delivered to (MQTT QoS 0, auto-acking
        # sinks) is pumped again in the same turn, a bounded number of times: otherwise it would get one credit's
        # worth per reactor turn while a publisher fills the queue much faster.
        self._wake_call = None
        first_pump = self._first_pump
        try:
            for _ in range(WAKE_ROUNDS_PER_TURN):
                pending, self._wake_pending = self._wake_pending, {}
                if not pending:
                    break
                for sub in pending:
                    if not sub.closed and sub.credit > 0:
                        try:
                            if sub.state.ack is AckMode.OFFSET:
                                self._pump_offset(sub)
                            elif not first_pump or sub not in first_pump or not self._nothing_to_pop(sub):
                                self._pump_pop(sub)
                        except TidegateError as exc:
                            log.warning("delivery to %s stopped: %s", sub, exc)
            if not self._wake_pending and self._wake_call is not None and self._wake_call.active():
                self._wake_call.cancel()  # everything was handled in this turn
                self._wake_call = None
        finally:
            if self._drain_waiters:
                self._drain_turns += 1
                # no next turn scheduled (drained, or a pump failed unexpectedly), a due pump's bound reached
                if (self._wake_call is None or not self.wakes_pending() or self._drain_turns >= self.max_yield_turns
                        or self._clock.seconds() - self._drain_since >= self.max_yield_seconds):
                    self._release_drain_waiters()

    def wakes_pending(self) -> bool:
        """Whether a pump that will hand out messages is due: a woken subscription that has credit. (One without
        credit, e.g. whose transport is paused, is skipped by the wake rounds, so it does not count.)"""
        for sub in self._wake_pending:
            if sub.credit > 0 and not sub.closed:
                return True
        return False

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the wake rounds have left no due pump (`wakes_pending` is false), and at the latest
        after `max_yield_turns` turns of wake rounds or `max_yield_seconds` since the first waiter; at once when
        nothing is due or delivery is closed. Publishers stop reading until then (adapters/base.py), so ingest does
        not outrun what live subscribers take from the recent-message cache."""
        if self._closed or self._wake_call is None or not self.wakes_pending():
            callback()
            return
        if not self._drain_waiters:
            self._drain_since = self._clock.seconds()
            self._drain_turns = 0
        self._drain_waiters.append(callback)

    def _release_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for callback in waiters:
            try:
                callback()
            except Exception:  # one waiter's failure must not keep the others paused
                log.exception("delivery drain callback failed")

    def _deliver(self, sub: Subscription, out: list[Delivered], size: int = -1) -> None:
        """Hand `out` to the sink and count it; `size`: the bodies' total when the caller added it up and every
        delivery is of one topic's queues (-1: count here, per topic)."""
        if not out:
            return
        if size >= 0:
            sub.credit -= len(out)
            topic = out[0].queue.topic
            self._metrics.messages_out[topic] += len(out)
            self._metrics.bytes_out[topic] += size
            sub.sink.deliver(out)
            return
        sub.credit -= len(out)
        metrics = self._metrics
        topic = out[0].queue.topic
        size = 0
        for d in out:
            if d.queue.topic != topic:  # several topics (a wildcard subscription): count each on its own
                for each in out:
                    metrics.messages_out[each.queue.topic] += 1
                    metrics.bytes_out[each.queue.topic] += len(each.message.body)
                break
            size += len(d.message.body)
        else:
            metrics.messages_out[topic] += len(out)
            metrics.bytes_out[topic] += size
        sub.sink.deliver(out)

    def _deliver_runs(self, sub: Subscription, runs: list[DeliveryRun], count: int, sizes: list[int]) -> None:
        """`_deliver` for a sink that takes runs: `count` messages in `runs`, `sizes[i]` the bodies' total of
        `runs[i]`; credit and metrics counted as `_deliver` counts them."""
        sub.credit -= count
        messages_out, bytes_out = self._metrics.messages_out, self._metrics.bytes_out
        for run, size in zip(runs, sizes, strict=True):
            topic = run.queue.topic
            messages_out[topic] += len(run.offsets)
            bytes_out[topic] += size
        sub.sink.deliver_runs(runs)  # type: ignore[attr-defined]  # optional DeliverySink method (core/api.py)

    def _pump_offset(self, sub: Subscription) -> None:
        out: list[Delivered] = []
        budget, scanned = sub.credit, 0
        queues = sub.assigned
        n = len(queues)
        now = self._now_ms()
        tag_filter = sub.filter
        collect, visible_max = self._reader.collect, self._visibility.visible_max
        # A sink that takes runs (the native adapter) and no tag filter: no `Delivered` per message.
        plain = hasattr(sub.sink, "deliver_runs") and tag_filter.tags is None and tag_filter.hashes is None
        runs: list[DeliveryRun] = []
        run_sizes: list[int] = []
        more = False
        for i in range(n):
            if budget <= 0 or scanned >= MAX_SCAN_PER_PUMP:
                more = budget > 0
                break
            q = queues[(sub.cursor + i) % n]
            pos = sub.positions.get(q, 0)
            end = visible_max(q)
            while True:
                try:
                    if plain:
                        offsets: list[int] = []
                        messages: list[Message] = []
                        pos, looked, size = self._reader.collect_plain(q, pos, end, budget, now,
                                                                       MAX_SCAN_PER_PUMP - scanned, offsets, messages)
                    else:
                        got, pos, looked = collect(q, pos, end, budget, tag_filter, now, MAX_SCAN_PER_PUMP - scanned)
                except OffsetOutOfRange:
                    pos = self._reader.fell_behind(sub.group, sub.sink, q, pos)
                    continue
                break
            if plain:
                if offsets:
                    runs.append(DeliveryRun(q, offsets, messages))
                    run_sizes.append(size)
                    budget -= len(offsets)
                    sub.last_delivered[q] = offsets[-1]
            elif got:
                out.extend(got)
                budget -= len(got)
                sub.last_delivered[q] = got[-1].queue_offset
            scanned += looked
            sub.positions[q] = pos
        more = more or (budget > 0 and scanned >= MAX_SCAN_PER_PUMP)
        sub.cursor = (sub.cursor + 1) % max(1, n)
        if not out and not runs and not more:
            # everything scanned was filtered out: let the committed offset follow so lag does not grow forever
            committed = self._offsets.of(sub.progress_key)
            for q in queues:
                if committed.get(q, 0) < sub.positions.get(q, 0) and not self._has_undelivered_commit(sub, q):
                    self._offsets.set(sub.progress_key, q, sub.positions[q])
        if runs:
            self._deliver_runs(sub, runs, sum([len(run.offsets) for run in runs]), run_sizes)
        else:
            self._deliver(sub, out)
        if more:
            self.wake(sub)

    def _has_undelivered_commit(self, sub: Subscription, q: QueueRef) -> bool:
        # An offset-mode consumer owns the gap between its commit and its position only while it has deliveries
        # outstanding; the last delivery it received is remembered to decide that.
        last = sub.last_delivered.get(q)
        return last is not None and self._offsets.of(sub.progress_key).get(q, 0) <= last

    def _fair_share(self, sub: Subscription) -> int:
        """In MESSAGE mode members compete for the same messages: when several have credit, each wake-up takes
        only its share of what is waiting, so a burst is spread over the members instead of filling the first
        one woken (the others are woken in the same turn and take the rest)."""
        if sub.state.mode is ConsumeMode.BROADCASTING:
            return sub.credit
        rivals = sum(1 for other in sub.state.members.get(sub.topic, ()) if other.credit > 0)
        if rivals <= 1:
            return sub.credit
        waiting = 0
        for q in sub.assigned:
            pq = sub.state.pop.get((sub.progress_key, q))
            if pq is None:
                return sub.credit  # not started yet: no estimate, take what credit allows
            waiting += len(pq.ready) + max(0, self._visibility.visible_max(q) - pq.next_fetch)
        return min(sub.credit, max(1, -(-waiting // rivals)))

    def _nothing_to_pop(self, sub: Subscription) -> bool:
        """The first wake-up of a new MESSAGE-mode member (taken off `_first_pump`): whether its pump would hand
        out nothing and change nothing but its cursor, because no redelivery waits and every queue is consumed up
        to its visible end. Then only the cursor moves, as the pump would move it."""
        del self._first_pump[sub]
        state, key = sub.state, sub.progress_key
        pop_queue, visible_max = self.acks.pop_queue, self._visibility.visible_max
        for q in sub.assigned:
            pq = pop_queue(key, state, q)  # made here as the pump would make it (`_fair_share` reads it)
            if pq.ready or pq.next_fetch < visible_max(q):
                return False
        sub.cursor = (sub.cursor + 1) % max(1, len(sub.assigned))
        return True

    def _pump_pop(self, sub: Subscription) -> None:
        self._drained.pop(sub, None)  # while it pumps, credit handed back inside `deliver` wakes it again
        out: list[Delivered] = []
        budget, scanned = self._fair_share(sub), 0
        limited = budget < sub.credit
        state, key = sub.state, sub.progress_key
        queues = sub.assigned
        n = len(queues)
        now = self._now_ms()
        deadline = self._clock.seconds() + sub.invisible_ms / 1000.0 if sub.invisible_ms else 0.0
        tag_filter = sub.filter
        read_index, wanted, reader = self._store.read_index, self._reader.wanted, self._reader
        # No tag filter (the common case): the message cache is asked here, without two calls per entry.
        cache = reader.cache if tag_filter.tags is None and tag_filter.hashes is None else None
        cache_get = cache.get if cache is not None else None
        append = out.append
        first: Inflight | None = None
        size = 0  # of the delivered bodies
        acks = self.acks
        take, ack_offset = acks.take, acks.ack_offset
        more = False
        for i in range(n):
            if budget <= 0:
                break
            q = queues[(sub.cursor + i) % n]
            pq = acks.pop_queue(key, state, q)
            while pq.ready and budget > 0:  # redeliveries first, oldest offset first
                again = acks.next_redelivery(state, key, pq, q, sub.max_attempts)
                if again is None:
                    break
                msg, offset, attempt = again
                take(sub, state.name, key, pq, q, offset, attempt, deadline)
                out.append(Delivered(msg, q, offset, make_receipt(q, offset, attempt), attempt))
                size += len(msg.body)
                budget -= 1
            end = self._visibility.visible_max(q)
            inflight = pq.inflight
            receipt_head = f"{q.topic}|{q.queue_id}|"  # make_receipt(q, offset, 1) == f"{receipt_head}{offset}|1"
            while pq.next_fetch < end and budget > 0:
                if scanned >= MAX_SCAN_PER_PUMP:
                    more = True
                    break
                window = min(READ_BATCH, end - pq.next_fetch)
                try:
                    entries = read_index(q, pq.next_fetch, window)
                except OffsetOutOfRange:
                    acks.skip_removed(state.name, sub.sink, key, pq, q)
                    continue
                if not entries:  # only holes (records lost in a crash recovery): done for this group
                    acks.skip_holes(key, pq, q, pq.next_fetch + window)
                    scanned += window
                    continue
                next_fetch = pq.next_fetch  # kept in a local, written back before anything else reads it
                try:
                    for e in entries:
                        offset = e.queue_offset
                        if offset >= end or budget <= 0:
                            break
                        if offset != next_fetch:
                            pq.next_fetch = next_fetch
                            acks.skip_holes(key, pq, q, offset)
                        next_fetch = offset + 1
                        scanned += 1
                        if cache is not None:
                            msg = cache_get(e.commit_offset) or reader.read(e)
                            if msg.expires_at and msg.expires_at <= now:
                                msg = None
                        else:
                            msg = wanted(e, tag_filter, now)
                        if msg is None:
                            pq.next_fetch = next_fetch
                            ack_offset(key, pq, q, offset)  # filtered or expired: done for this group
                            continue
                        if deadline:
                            pq.next_fetch = next_fetch
                            take(sub, state.name, key, pq, q, offset, 1, deadline)
                        else:
                            # take() without a timer or a redelivery; an Inflight is never changed once stored,
                            # so the first deliveries of one pump share one
                            if first is None:
                                first = Inflight(1, 0.0, sub)
                            inflight[offset] = first
                        append(Delivered(msg, q, offset, f"{receipt_head}{offset}|1", 1))
                        size += len(msg.body)
                        budget -= 1
                finally:  # also when a read fails: that offset counts as fetched, as before
                    pq.next_fetch = next_fetch
        sub.cursor = (sub.cursor + 1) % max(1, n)
        self._deliver(sub, out, size)  # `assigned` is always queues of sub.topic (assign)
        if more or (limited and out and sub.credit > 0):
            self.wake(sub)  # took only a share: come back for what the other members leave
        elif budget > 0 and not limited:
            # budget to spare at the end: every queue was read to its visible end and no redelivery was ready
            # (the budget, not `sub.credit`, which a sink may have topped up inside `deliver`)
            self._drained[sub] = None

    # ------------------------------------------------------------------ settling (core/acks.py does the work)
    def ack(self, sub: Subscription, receipt: str) -> None:
        self.acks.ack_receipt(sub.state, sub.progress_key, receipt)

    def ack_delivered(self, sub: Subscription, deliveries: Sequence[Delivered]) -> int:
        return self.acks.ack_delivered(sub.state, sub.progress_key, deliveries)

    def nack(self, sub: Subscription, receipt: str, requeue: bool, delay_ms: int) -> None:
        self.acks.nack_receipt(sub.state, sub.progress_key, receipt, requeue, delay_ms)

    def wake_group(self, state: GroupState, topic: str) -> None:
        """Wake the members of `state` on `topic` that have credit (messages came back for them)."""
        for sub in state.members.get(topic, []):
            self.new_work(sub)

    def close(self) -> None:
        self._closed = True
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._release_drain_waiters()
        self.acks.close()
