"""Per-message progress of MESSAGE-mode groups (RocketMQ 5 "pop"): what is in flight, and how it is settled.

A message handed out (to a push member or by `get`) is in flight under a receipt until it is acked; a nack gives it
back at once or after a delay, or dead-letters it; an invisibility timeout or its consumer leaving gives it back
too. Given-back offsets wait in `PopQueue.ready` and are handed out again before new ones, with the attempt
counted; past the group's `max_attempts` they go to the `%DLQ%<group>` topic. The committed offset of a progress
key is the lowest offset not yet acked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime

from tidegate.core.api import AckMode, Delivered, DeliverySink
from tidegate.core.config import BrokerConfig
from tidegate.core.consumers import (
    GroupState,
    Inflight,
    InvisibilityTimers,
    PopQueue,
    Subscription,
    make_receipt,
    parse_receipt,
)
from tidegate.core.errors import InvalidReceipt, OffsetOutOfRange
from tidegate.core.filters import parse_tag_filter
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef
from tidegate.core.offsets import OffsetBook
from tidegate.core.reader import MAX_SCAN_PER_PUMP, READ_BATCH, QueueReader
from tidegate.core.storage.api import MessageStore
from tidegate.core.topics import TopicRegistry, dead_letter_topic
from tidegate.core.visibility import Visibility

log = logging.getLogger("tidegate.broker")

MATCH_ALL = parse_tag_filter("*")  # get has no filter: it skips only expired messages


class MessageAcks:
    def __init__(self, store: MessageStore, clock: IReactorTime, config: BrokerConfig, metrics: CoreMetrics,
                 topics: TopicRegistry, visibility: Visibility, reader: QueueReader, offsets: OffsetBook,
                 groups: dict[str, GroupState], publish: Callable[..., object],
                 wake_group: Callable[[GroupState, str], None]) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._metrics = metrics
        self._topics = topics
        self._visibility = visibility
        self._reader = reader
        self._offsets = offsets
        self._groups = groups  # the GroupRegistry's live states, by name
        self._publish = publish  # Producer.publish, for dead letters
        self._wake_group = wake_group  # wake the members of a group on a topic with credit (messages came back)
        self._timers = InvisibilityTimers(clock, self._on_invisibility_expired)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def pop_queue(self, key: str, state: GroupState, q: QueueRef) -> PopQueue:
        """The per-message progress of `key` on `q`, started at its committed offset (or where a new group
        starts) the first time it is asked for."""
        pq = state.pop.get((key, q))
        if pq is None:
            committed = self._offsets.of(key).get(q)
            if committed is None:
                committed = self._visibility.position_for(q, self._config.new_group_start)
            pq = state.pop[(key, q)] = PopQueue(committed=committed, next_fetch=committed)
        return pq

    def next_redelivery(self, state: GroupState, key: str, pq: PopQueue, q: QueueRef,
                         max_attempts: int) -> tuple[Message, int, int] | None:
        """The next message of `pq.ready` to deliver again as (message, offset, attempt), or None when none is
        left. Offsets settled meanwhile are dropped, gone ones (retention) count as done, and one past
        `max_attempts` goes to the dead-letter topic."""
        while pq.ready:
            offset = pq.ready.pop(0)
            attempt = pq.attempts.pop(offset, 1) + 1
            if offset < pq.committed or offset in pq.acked or offset in pq.inflight:
                continue
            entry = self._reader.entry_at(q, offset)
            if entry is None:
                self.ack_offset(key, pq, q, offset)
                continue
            msg = self._reader.read(entry)
            if attempt > max_attempts:
                self._dead_letter(state, msg, attempt - 1)
                self.ack_offset(key, pq, q, offset)
                continue
            return msg, offset, attempt
        return None

    def skip_removed(self, group: str, sink: DeliverySink | None, key: str, pq: PopQueue, q: QueueRef) -> None:
        """Retention removed offsets at `pq.next_fetch`: go on from the first one kept."""
        new = self._reader.fell_behind(group, sink, q, pq.next_fetch)
        pq.next_fetch = max(pq.next_fetch, new)
        if pq.committed < new:
            pq.committed = new
            pq.acked = {o for o in pq.acked if o >= new}
            self._offsets.set(key, q, new)

    def take(self, owner: Subscription | None, group: str, key: str, pq: PopQueue, q: QueueRef, offset: int,
              attempt: int, deadline: float) -> None:
        """Put `offset` in flight, held by `owner` (None: taken by get), until `deadline` (0 = no timeout)."""
        pq.inflight[offset] = Inflight(attempt, deadline, owner)
        if deadline:
            self._timers.add(deadline, (group, key, q, offset, attempt))
        if attempt > 1:
            self._metrics.redeliveries += 1

    def release(self, sub: Subscription) -> bool:
        """`sub` left: everything it holds in flight is ready again (oldest first). True if there was any."""
        state = sub.state
        released = False
        for pq in state.pop.values():
            for offset, item in list(pq.inflight.items()):
                if item.owner is sub:
                    del pq.inflight[offset]
                    pq.attempts[offset] = item.attempt
                    pq.ready.append(offset)
                    released = True
        if released:
            for pq in state.pop.values():
                pq.ready.sort()
        return released

    def get(self, state: GroupState, topic: str, auto_ack: bool, invisible_ms: int) -> Delivered | None:
        """Take the next ready message of `state` (MESSAGE mode, clustering) on `topic`: redeliveries first, then
        new messages, starting at a queue that turns with every get. With `auto_ack` it is settled at once
        (empty receipt); otherwise it is in flight under its receipt until acked or nacked, or until
        `invisible_ms` pass (0 = no timeout). None when nothing is ready, or when MAX_SCAN_PER_PUMP expired
        messages were skipped without finding a live one (a later get goes on from there: a turn stays bounded)."""
        key = state.name
        queues = self._topics.queues_of(topic)
        n = len(queues)
        first = state.get_cursor % n
        state.get_cursor = (first + 1) % n
        order = [queues[(first + i) % n] for i in range(n)]
        max_attempts = self._config.max_attempts
        found: tuple[QueueRef, PopQueue, Message, int, int] | None = None
        for q in order:
            pq = self.pop_queue(key, state, q)
            again = self.next_redelivery(state, key, pq, q, max_attempts) if pq.ready else None
            if again is not None:
                found = (q, pq, *again)
                break
        if found is None:
            found = self._next_new(state, key, order)
        if found is None:
            return None
        q, pq, msg, offset, attempt = found
        if auto_ack:
            self.ack_offset(key, pq, q, offset)
            if attempt > 1:
                self._metrics.redeliveries += 1
            receipt = ""
        else:
            deadline = self._clock.seconds() + invisible_ms / 1000.0 if invisible_ms else 0.0
            self.take(None, state.name, key, pq, q, offset, attempt, deadline)
            receipt = make_receipt(q, offset, attempt)
        self._metrics.messages_out[q.topic] += 1
        self._metrics.bytes_out[q.topic] += len(msg.body)
        return Delivered(msg, q, offset, receipt, attempt)

    def _next_new(self, state: GroupState, key: str,
                  queues: list[QueueRef]) -> tuple[QueueRef, PopQueue, Message, int, int] | None:
        """The first message never handed out in `queues` (in that order), as (queue, progress, message,
        offset, attempt 1); expired ones on the way are settled as done."""
        now = self._now_ms()
        scanned = 0
        for q in queues:
            pq = self.pop_queue(key, state, q)
            end = self._visibility.visible_max(q)
            while pq.next_fetch < end and scanned < MAX_SCAN_PER_PUMP:
                window = min(READ_BATCH, end - pq.next_fetch)
                try:
                    entries = self._store.read_index(q, pq.next_fetch, window)
                except OffsetOutOfRange:
                    self.skip_removed(state.name, None, key, pq, q)
                    continue
                if not entries:  # only holes (records lost in a crash recovery): done for this group
                    self.skip_holes(key, pq, q, pq.next_fetch + window)
                    scanned += window
                    continue
                for e in entries:
                    if e.queue_offset >= end or scanned >= MAX_SCAN_PER_PUMP:
                        break
                    offset = e.queue_offset
                    if offset != pq.next_fetch:
                        self.skip_holes(key, pq, q, offset)
                    pq.next_fetch = offset + 1
                    scanned += 1
                    msg = self._reader.wanted(e, MATCH_ALL, now)
                    if msg is None:
                        self.ack_offset(key, pq, q, offset)  # expired: done for this group
                        continue
                    return q, pq, msg, offset, 1
        return None

    # ------------------------------------------------------------------ settling
    def ack_receipt(self, state: GroupState, key: str, receipt: str) -> None:
        pq, q, offset, _ = self._find_inflight(state, key, receipt)
        del pq.inflight[offset]
        if offset == pq.committed and not pq.acked:
            # the common case, acks in delivery order: what ack_offset does, without the set round trip
            pq.committed = offset + 1
            self._offsets.set(key, q, offset + 1)
            return
        self.ack_offset(key, pq, q, offset)

    def ack_delivered(self, state: GroupState, key: str, deliveries: Sequence[Delivered]) -> int:
        """Settle many deliveries at once (`Subscription.ack_delivered`): each one still in flight under its attempt
        is acked as `ack_receipt` would ack it, stale ones are skipped, and each queue's committed offset is
        written once at the end. Returns how many were settled."""
        if state.ack is not AckMode.MESSAGE:
            raise InvalidReceipt(f"group {state.name!r} commits offsets; it does not ack messages")
        pop = state.pop
        moved: dict[QueueRef, tuple[PopQueue, int]] = {}  # queue -> (its progress, committed before the batch)
        settled = 0
        last_queue: QueueRef | None = None
        pq: PopQueue | None = None
        inflight: dict[int, Inflight] = {}
        committed = 0  # pq.committed, kept here while its deliveries are acked in order; written back below
        for delivered in deliveries:
            queue = delivered.queue
            if queue is not last_queue:
                if pq is not None:
                    pq.committed = committed
                last_queue = queue
                pq = pop.get((key, queue))
                if pq is not None:
                    if queue not in moved:
                        moved[queue] = (pq, pq.committed)
                    inflight, committed = pq.inflight, pq.committed
            if pq is None:
                continue
            offset = delivered.queue_offset
            item = inflight.get(offset)
            if item is None or item.attempt != delivered.attempt:
                continue
            del inflight[offset]
            settled += 1
            if offset == committed and not pq.acked:
                committed = offset + 1  # acks in delivery order: no set round trip
            else:
                pq.committed = committed
                pq.acked.add(offset)
                pq.advance()
                committed = pq.committed
        if pq is not None:
            pq.committed = committed
        offsets = self._offsets
        for queue, (pq, before) in moved.items():
            if pq.committed != before:
                offsets.set(key, queue, pq.committed)
        return settled

    def nack_receipt(self, state: GroupState, key: str, receipt: str, requeue: bool, delay_ms: int) -> None:
        pq, q, offset, item = self._find_inflight(state, key, receipt)
        del pq.inflight[offset]
        if not requeue:
            entry = self._reader.entry_at(q, offset)
            if entry is not None:
                self._dead_letter(state, self._reader.read(entry), item.attempt)
            self.ack_offset(key, pq, q, offset)
            return
        pq.attempts[offset] = item.attempt
        if delay_ms > 0:
            # parked: neither in flight nor ready until the delay passes
            deadline = self._clock.seconds() + delay_ms / 1000.0
            pq.inflight[offset] = Inflight(item.attempt, deadline, None)
            self._timers.add(deadline, (state.name, key, q, offset, item.attempt))
            return
        pq.ready.insert(0, offset)
        self._wake_group(state, q.topic)

    def _find_inflight(self, state: GroupState, key: str, receipt: str) -> tuple[PopQueue, QueueRef, int, Inflight]:
        if state.ack is not AckMode.MESSAGE:
            raise InvalidReceipt(f"group {state.name!r} commits offsets; it does not ack messages")
        q, offset, attempt = parse_receipt(receipt)
        pq = state.pop.get((key, q))
        item = pq.inflight.get(offset) if pq is not None else None
        if item is None or item.attempt != attempt:
            raise InvalidReceipt(f"receipt {receipt!r} is unknown or expired (the message was redelivered)")
        return pq, q, offset, item

    def ack_offset(self, key: str, pq: PopQueue, q: QueueRef, offset: int) -> None:
        """`offset` is done for `key`; the committed offset follows when the acks below it are complete."""
        pq.acked.add(offset)
        if pq.advance():
            self._offsets.set(key, q, pq.committed)

    def skip_holes(self, key: str, pq: PopQueue, q: QueueRef, up_to: int) -> None:
        """Offsets `pq.next_fetch..up_to-1` hold no record (lost in a crash recovery): done for this group, so
        the committed offset does not stop at them forever."""
        acked = pq.acked
        acked.update(range(max(pq.next_fetch, pq.committed), up_to))
        pq.next_fetch = max(pq.next_fetch, up_to)
        if pq.advance():
            self._offsets.set(key, q, pq.committed)

    def _on_invisibility_expired(self, items: list[Any]) -> None:
        touched: set[tuple[str, str]] = set()
        for group, key, q, offset, attempt in items:
            state = self._groups.get(group)
            pq = state.pop.get((key, q)) if state is not None else None
            item = pq.inflight.get(offset) if pq is not None else None
            if item is None or item.attempt != attempt:
                continue  # acked or redelivered meanwhile
            del pq.inflight[offset]
            pq.attempts[offset] = attempt
            pq.ready.append(offset)
            touched.add((group, q.topic))
        for group, topic in touched:
            self._wake_group(self._groups[group], topic)

    def _dead_letter(self, state: GroupState, msg: Message, attempts: int) -> None:
        name = dead_letter_topic(state.name)
        if name not in self._topics.configs:
            self._topics.create(name, 1, "rw", 0, True)
        props = dict(msg.properties)
        props.update({"DLQ_ORIGIN_TOPIC": msg.topic, "DLQ_ORIGIN_MSG_ID": msg.msg_id,
                      "DLQ_DELIVERY_ATTEMPTS": str(attempts)})
        copy = Message(topic=name, body=msg.body, subject=msg.subject, tag=msg.tag, keys=msg.keys,
                       properties=props, born_ts=msg.born_ts, group=msg.group, flags=msg.flags)
        self._publish([copy], queue_id=0)
        self._metrics.dead_lettered += 1
        log.info("message %s of group %s dead-lettered after %d attempts", msg.msg_id, state.name, attempts)

    def close(self) -> None:
        self._timers.stop()
