"""The core broker: one protocol-free API over topics, queues, groups, routing, delivery and storage.

Adapters (native, MQTT, AMQP) call this and nothing below it. The broker is single-threaded: every call comes on
the reactor thread; only fsync runs elsewhere (see core/flush.py).

Data flow of a send: validate → choose a queue of the topic → match bindings (fan-out destinations) → one commit-log
record with index entries in every destination queue → once durable (sync flush) the entries become *visible* and
the consumers watching those queues are woken, once per reactor turn, not once per message.
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any

from tidegate.core.adapter_state import MetadataNamespace
from tidegate.core.api import (
    AckMode,
    ConsumeMode,
    Delivered,
    DeliverySink,
    GroupInfo,
    PullResult,
    PullStatus,
    QueueProgress,
    SendResult,
)
from tidegate.core.consumers import (
    GroupState,
    Inflight,
    InvisibilityTimers,
    PopQueue,
    Subscription,
    allocate_averagely,
    make_receipt,
    parse_receipt,
)
from tidegate.core.errors import (
    GroupNotFound,
    InvalidReceipt,
    NoPermission,
    OffsetOutOfRange,
    QueueNotFound,
    TidegateError,
    TopicExists,
    TopicNotFound,
)
from tidegate.core.filters import TagFilter, parse_tag_filter
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import (
    DLQ_PREFIX,
    IndexEntry,
    Message,
    QueueRef,
    TopicConfig,
    validate_group,
    validate_topic,
)
from tidegate.core.routing import SubscriptionTrie, validate_pattern

log = logging.getLogger("tidegate.broker")

BINDINGS_NS = "core.bindings"
MAX_QUEUES = 1024
READ_BATCH = 64
MAX_SCAN_PER_PUMP = 4096  # index entries one pump may skip over (filters) before yielding the reactor
MESSAGE_CACHE = 8192
WAKE_ROUNDS_PER_TURN = 16  # pump rounds per reactor turn before yielding to the network
OFFSET_FLUSH_S = 1.0

__all__ = ["Broker", "BrokerConfig", "Subscription"]


@dataclass(slots=True)
class BrokerConfig:
    auto_create_topics: bool = True
    default_queues: int = 4
    max_body: int = 4 * 1024 * 1024
    new_group_start: str = "latest"  # "earliest" | "latest": where a group with no committed offset begins
    invisible_ms: int = 30_000  # default invisibility timeout in MESSAGE mode
    max_attempts: int = 16  # deliveries before a message goes to %DLQ%group
    retention_ms: int = 72 * 3600 * 1000
    retention_bytes: int = 0  # 0 = no size limit


class Broker:
    def __init__(self, store: Any, metadata: Any, clock: Any, durability: Any,
                 config: BrokerConfig | None = None) -> None:
        self.store = store
        self.meta = metadata
        self.clock = clock
        self.durability = durability
        self.config = config or BrokerConfig()
        self.metrics: CoreMetrics = getattr(durability, "metrics", None) or CoreMetrics()
        self._topics: dict[str, TopicConfig] = {}
        for row in metadata.get_topics():
            cfg = TopicConfig(name=row["name"], queues=int(row["queues"]), perm=row["perm"],
                              retention_ms=int(row.get("retention_ms") or 0), internal=bool(row.get("internal")),
                              created_ts=int(row.get("created_ts") or 0))
            self._topics[cfg.name] = cfg
        self._rr: dict[str, int] = {}
        self._queue_refs: dict[str, list[QueueRef]] = {}
        self._router: SubscriptionTrie[QueueRef] = SubscriptionTrie()
        for _, value in metadata.kv_items(BINDINGS_NS):
            pattern, topic, qid = value
            self._router.add(pattern, QueueRef(topic, int(qid)))
        self._visible: dict[QueueRef, int] = {}
        self._pending: deque[tuple[int, list[tuple[QueueRef, int]]]] = deque()
        self._watchers: dict[QueueRef, set[Subscription]] = {}
        self._groups: dict[str, GroupState] = {}
        self._offsets: dict[str, dict[QueueRef, int]] = {}
        self._dirty_offsets: set[tuple[str, QueueRef]] = set()
        self._offset_flush = None
        self._msg_cache: dict[int, Message] = {}
        self._wake_pending: dict[Subscription, None] = {}
        self._wake_call = None
        self._member_seq = 0
        self._timers = InvisibilityTimers(clock, self._on_invisibility_expired)
        self._closed = False
        if hasattr(durability, "on_durable"):
            durability.on_durable(self._on_durable)

    # ------------------------------------------------------------------ time
    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # ------------------------------------------------------------------ topics
    def create_topic(self, name: str, queues: int | None = None, perm: str = "rw", retention_ms: int = 0,
                     internal: bool = False) -> TopicConfig:
        validate_topic(name)
        if name in self._topics:
            raise TopicExists(f"topic {name!r} already exists")
        cfg = TopicConfig(name=name, queues=self._check_queues(queues), perm=self._check_perm(perm),
                          retention_ms=max(0, int(retention_ms)), internal=internal, created_ts=self.now_ms())
        self._save_topic(cfg)
        return cfg

    def ensure_topic(self, name: str, queues: int | None = None, internal: bool = False) -> TopicConfig:
        cfg = self._topics.get(name)
        return cfg if cfg is not None else self.create_topic(name, queues, internal=internal)

    def update_topic(self, name: str, queues: int | None = None, perm: str | None = None,
                     retention_ms: int | None = None) -> TopicConfig:
        cfg = self.get_topic(name)
        new = replace(
            cfg,
            queues=cfg.queues if queues is None else self._check_queues(queues),
            perm=cfg.perm if perm is None else self._check_perm(perm),
            retention_ms=cfg.retention_ms if retention_ms is None else max(0, int(retention_ms)),
        )
        self._save_topic(new)
        if new.queues != cfg.queues:
            for state in self._groups.values():
                if name in state.members:
                    self._assign(state, name)
        return new

    def delete_topic(self, name: str) -> None:
        cfg = self.get_topic(name)
        for state in self._groups.values():
            for sub in state.members.pop(name, []):
                self._unwatch(sub, sub.assigned)
                sub.assigned = []
                sub.sink.assignment_changed([])
            state.topics.discard(name)
            for key in [k for k in state.pop if k[1].topic == name]:
                del state.pop[key]
        for i in range(cfg.queues):
            q = QueueRef(name, i)
            self.store.delete_queue(q)
            self._visible.pop(q, None)
        for pattern, dest in list(self._router.items()):
            if dest.topic == name:
                self.unbind(pattern, dest)
        del self._topics[name]
        self.meta.delete_topic(name)

    def get_topic(self, name: str) -> TopicConfig:
        cfg = self._topics.get(name)
        if cfg is None:
            raise TopicNotFound(f"topic {name!r} does not exist")
        return cfg

    def list_topics(self, include_internal: bool = False) -> list[TopicConfig]:
        return sorted((t for t in self._topics.values() if include_internal or not t.internal), key=lambda t: t.name)

    def queues_of(self, topic: str) -> list[QueueRef]:
        return [QueueRef(topic, i) for i in range(self.get_topic(topic).queues)]

    def queue_offsets(self, queue: QueueRef) -> tuple[int, int]:
        """(min, max) offsets of a queue as consumers see them."""
        self._check_queue(queue)
        return self.store.queue_bounds(queue).min_offset, self._visible_max(queue)

    def _check_queues(self, queues: int | None) -> int:
        n = self.config.default_queues if queues is None else int(queues)
        if not 1 <= n <= MAX_QUEUES:
            raise TidegateError(f"a topic has 1 to {MAX_QUEUES} queues, not {n}")
        return n

    @staticmethod
    def _check_perm(perm: str) -> str:
        if perm not in ("r", "w", "rw"):
            raise TidegateError(f"topic permission must be 'r', 'w' or 'rw', not {perm!r}")
        return perm

    def _save_topic(self, cfg: TopicConfig) -> None:
        self._topics[cfg.name] = cfg
        self.meta.put_topic({"name": cfg.name, "queues": cfg.queues, "perm": cfg.perm,
                             "retention_ms": cfg.retention_ms, "internal": int(cfg.internal),
                             "created_ts": cfg.created_ts})

    def _check_queue(self, queue: QueueRef) -> TopicConfig:
        cfg = self.get_topic(queue.topic)
        if not 0 <= queue.queue_id < cfg.queues:
            raise QueueNotFound(f"topic {queue.topic!r} has no queue {queue.queue_id} (it has {cfg.queues})")
        return cfg

    # ------------------------------------------------------------------ produce
    def publish(self, messages: Sequence[Message], queue_id: int | None = None) -> list[SendResult]:
        """Validate, route and append messages; raises TidegateError on bad input (then nothing is stored).

        Queue choice: `queue_id` if given; else a hash of message.group (FIFO order per group); else round-robin.
        Index entries are also appended to every queue bound by a matching binding (fan-out without copies).
        Consumers see the messages once they are durable (sync flush) or at once (async flush).
        """
        now = self.now_ms()
        items: list[tuple[Message, list[QueueRef]]] = []
        router = self._router if len(self._router) else None
        topics, refs, rr, max_body = self._topics, self._queue_refs, self._rr, self.config.max_body
        for m in messages:
            cfg = topics.get(m.topic)
            m.validate(max_body, check_topic=cfg is None)
            if cfg is None:
                if not self.config.auto_create_topics:
                    raise TopicNotFound(f"topic {m.topic!r} does not exist and auto-creation is off")
                cfg = self.create_topic(m.topic)
            if "w" not in cfg.perm:
                raise NoPermission(f"topic {m.topic!r} is not writable")
            queues = refs.get(m.topic)
            if queues is None or len(queues) != cfg.queues:
                queues = refs[m.topic] = [QueueRef(m.topic, i) for i in range(cfg.queues)]
            if queue_id is not None:
                if not 0 <= queue_id < cfg.queues:
                    raise QueueNotFound(f"topic {m.topic!r} has no queue {queue_id} (it has {cfg.queues})")
                home = queues[queue_id]
            elif m.group:
                home = queues[zlib.crc32(m.group.encode()) % cfg.queues]
            else:
                qid = rr.get(m.topic, 0)
                rr[m.topic] = (qid + 1) % cfg.queues
                home = queues[qid]
            if router is not None:
                extra = router.match(m.full_name)
                dests = [home, *sorted(d for d in extra if d != home)] if extra else [home]
            else:
                dests = [home]
            if not m.born_ts:
                m.born_ts = now
            items.append((m, dests))
        if not items:
            return []
        store = self.store
        started = perf_counter()
        results = store.append_batch(items) if len(items) > 1 else [store.append(*items[0])]
        self.metrics.append_latency.observe(perf_counter() - started)
        updates: list[tuple[QueueRef, int]] = []
        out: list[SendResult] = []
        cache, visible = self._msg_cache, self._visible
        body_bytes = 0
        for (m, dests), r in zip(items, results, strict=True):
            offsets = r.queue_offsets
            if len(dests) == 1:
                dest = dests[0]
                if dest not in visible:
                    visible[dest] = offsets[0]  # everything before this append is already visible
                updates.append((dest, offsets[0] + 1))
            else:
                for dest, qoff in zip(dests, offsets, strict=True):
                    if dest not in visible:
                        visible[dest] = qoff
                    updates.append((dest, qoff + 1))
            cache[r.commit_offset] = m
            body_bytes += len(m.body)
            out.append(SendResult(r.msg_id, m.topic, dests[0].queue_id, offsets[0], r.commit_offset,
                                  r.commit_offset + r.size))
        messages_in, bytes_in = self.metrics.messages_in, self.metrics.bytes_in
        topic = items[0][0].topic
        if all(m.topic == topic for m, _ in items):
            messages_in[topic] += len(items)
            bytes_in[topic] += body_bytes
        else:
            for m, _ in items:
                messages_in[m.topic] += 1
                bytes_in[m.topic] += len(m.body)
        if len(cache) > MESSAGE_CACHE:
            cache.clear()  # cheaper than evicting one by one; the cache only saves decoding recent records
        if self.durability.visible_offset >= out[-1].commit_end:
            self._make_visible(updates)
        else:
            self._pending.append((out[-1].commit_end, updates))
            self.durability.request_flush()
        return out

    def when_durable(self, commit_end: int, callback: Callable[[], None]) -> None:
        """Call `callback` (on the reactor thread) once everything below `commit_end` is on disk."""
        self.durability.when_durable(commit_end, callback)

    def _on_durable(self, durable: int) -> None:
        pending = self._pending
        if not pending or pending[0][0] > durable:
            return
        updates: list[tuple[QueueRef, int]] = []
        while pending and pending[0][0] <= durable:
            updates.extend(pending.popleft()[1])
        self._make_visible(updates)

    def _make_visible(self, updates: Iterable[tuple[QueueRef, int]]) -> None:
        visible, watchers = self._visible, self._watchers
        for queue, end in updates:
            if end > visible.get(queue, 0):
                visible[queue] = end
                subs = watchers.get(queue)
                if subs:
                    for sub in subs:
                        if sub.credit > 0:
                            self._wake(sub)

    def _visible_max(self, queue: QueueRef) -> int:
        end = self._visible.get(queue)
        if end is None:
            end = self._visible[queue] = self.store.queue_bounds(queue).max_offset
        return end

    # ------------------------------------------------------------------ routing
    def bind(self, pattern: str, destination: QueueRef) -> None:
        """Also route messages whose full name (`topic/subject`) matches `pattern` to `destination`.

        `+` matches one level, `#` the rest (including none). Persisted; idempotent.
        """
        validate_pattern(pattern)
        self._check_queue(destination)
        if self._router.add(pattern, destination):
            self.meta.kv_put(BINDINGS_NS, self._binding_key(pattern, destination),
                             [pattern, destination.topic, destination.queue_id])

    def unbind(self, pattern: str, destination: QueueRef) -> None:
        if self._router.remove(pattern, destination):
            self.meta.kv_delete(BINDINGS_NS, self._binding_key(pattern, destination))

    def bindings(self, destination_topic: str | None = None) -> list[tuple[str, QueueRef]]:
        return sorted(((p, d) for p, d in self._router.items()
                       if destination_topic is None or d.topic == destination_topic), key=lambda x: (x[0], str(x[1])))

    def route(self, full_name: str) -> frozenset[QueueRef]:
        """Destinations bound to a full name (for tests and tools)."""
        return self._router.match(full_name)

    @staticmethod
    def _binding_key(pattern: str, destination: QueueRef) -> str:
        return f"{pattern}\x00{destination.topic}\x00{destination.queue_id}"

    # ------------------------------------------------------------------ subscribe / push
    def subscribe(self, group: str, topic: str, sink: DeliverySink, *, client_id: str,
                  mode: ConsumeMode | str = ConsumeMode.CLUSTERING, ack: AckMode | str = AckMode.OFFSET,
                  filter_expr: str = "*", invisible_ms: int | None = None, max_attempts: int | None = None,
                  start: str | int | None = None) -> Subscription:
        """Attach a push consumer to `group` on `topic`. Delivery starts once credit is granted.

        `invisible_ms` = 0 in MESSAGE mode means in-flight messages never time out; they come back only when nacked
        or when the subscription closes (what MQTT sessions want).
        """
        validate_group(group)
        mode, ack = ConsumeMode(mode), AckMode(ack)
        tag_filter = parse_tag_filter(filter_expr)
        if topic not in self._topics:
            if not self.config.auto_create_topics:
                raise TopicNotFound(f"topic {topic!r} does not exist and auto-creation is off")
            self.create_topic(topic)
        if "r" not in self._topics[topic].perm:
            raise NoPermission(f"topic {topic!r} is not readable")
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = GroupState(group, mode, ack)
        elif state.subscriptions() and (state.mode, state.ack) != (mode, ack):
            raise TidegateError(f"group {group!r} is consuming in {state.mode.value}/{state.ack.value} mode; "
                                f"a member cannot join in {mode.value}/{ack.value} mode")
        else:
            state.mode, state.ack = mode, ack
        state.topics.add(topic)
        self._persist_group(state)
        self._member_seq += 1
        sub = Subscription(self, state, topic, sink, client_id, f"{client_id}#{self._member_seq:08d}", tag_filter,
                           self.config.invisible_ms if invisible_ms is None else max(0, int(invisible_ms)),
                           self.config.max_attempts if max_attempts is None else max(1, int(max_attempts)))
        self._init_start_offsets(sub.progress_key, topic, start)
        state.members.setdefault(topic, []).append(sub)
        self._assign(state, topic)
        return sub

    def _persist_group(self, state: GroupState) -> None:
        self.meta.put_group({"name": state.name, "mode": state.mode.value, "ack": state.ack.value,
                             "created_ts": self.now_ms(), "extra": {"topics": sorted(state.topics)}})

    def _init_start_offsets(self, key: str, topic: str, start: str | int | None) -> None:
        offsets = self._group_offsets(key)
        start = self.config.new_group_start if start is None else start
        for q in self.queues_of(topic):
            if q not in offsets:
                offsets[q] = self._position_for(q, start)
                self._dirty_offsets.add((key, q))
        self._schedule_offset_flush()

    def _position_for(self, queue: QueueRef, where: str | int) -> int:
        if where == "earliest":
            return self.store.queue_bounds(queue).min_offset
        if where == "latest":
            return self._visible_max(queue)
        if isinstance(where, int) or (isinstance(where, str) and where.isdigit()):
            return min(self.store.offset_for_time(queue, int(where)), self._visible_max(queue))
        raise TidegateError(f"start position must be 'earliest', 'latest' or a timestamp in ms, not {where!r}")

    def _assign(self, state: GroupState, topic: str) -> None:
        """(Re)compute which queues each member of `state` on `topic` reads, and tell the members that changed."""
        subs = sorted(state.members.get(topic, []), key=lambda s: s.member_id)
        queues = self.queues_of(topic)
        if state.ack is AckMode.OFFSET and state.mode is ConsumeMode.CLUSTERING:
            plan = allocate_averagely(queues, [s.member_id for s in subs])
        else:
            plan = {s.member_id: list(queues) for s in subs}
        for sub in subs:
            new = plan[sub.member_id]
            if new == sub.assigned:
                continue
            old = set(sub.assigned)
            self._unwatch(sub, [q for q in sub.assigned if q not in new])
            self._watch(sub, [q for q in new if q not in old])
            if state.ack is AckMode.OFFSET:
                committed = self._group_offsets(sub.progress_key)
                sub.positions = {q: sub.positions[q] if q in old else committed.get(q, self._visible_max(q))
                                 for q in new}
            sub.assigned = new
            sub.sink.assignment_changed(list(new))
            if sub.credit > 0:
                self._wake(sub)

    def _watch(self, sub: Subscription, queues: Iterable[QueueRef]) -> None:
        for q in queues:
            self._watchers.setdefault(q, set()).add(sub)

    def _unwatch(self, sub: Subscription, queues: Iterable[QueueRef]) -> None:
        for q in queues:
            subs = self._watchers.get(q)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._watchers[q]

    def _detach(self, sub: Subscription) -> None:
        state = sub.state
        members = state.members.get(sub.topic, [])
        if sub in members:
            members.remove(sub)
        if not members:
            state.members.pop(sub.topic, None)
        self._unwatch(sub, sub.assigned)
        self._wake_pending.pop(sub, None)
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
        sub.assigned = []
        if state.ack is AckMode.OFFSET and state.mode is ConsumeMode.CLUSTERING:
            self._assign(state, sub.topic)
        elif released:
            for other in members:
                self._wake(other)
        self._schedule_offset_flush()

    def _wake(self, sub: Subscription) -> None:
        self._wake_pending[sub] = None
        if self._wake_call is None and not self._closed:
            self._wake_call = self.clock.callLater(0, self._run_wakes)

    def _run_wakes(self) -> None:
        # A consumer that hands credit straight back while it is being delivered to (MQTT QoS 0, auto-acking
        # sinks) is pumped again in the same turn, a bounded number of times: otherwise it would get one credit's
        # worth per reactor turn while a publisher fills the queue much faster.
        self._wake_call = None
        for _ in range(WAKE_ROUNDS_PER_TURN):
            pending, self._wake_pending = self._wake_pending, {}
            if not pending:
                break
            for sub in pending:
                if not sub.closed and sub.credit > 0:
                    try:
                        if sub.state.ack is AckMode.OFFSET:
                            self._pump_offset(sub)
                        else:
                            self._pump_pop(sub)
                    except TidegateError as exc:
                        log.warning("delivery to %s stopped: %s", sub, exc)
        if not self._wake_pending and self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()  # everything was handled in this turn
            self._wake_call = None

    def _read(self, entry: IndexEntry) -> Message:
        msg = self._msg_cache.get(entry.commit_offset)
        if msg is None:
            msg = self.store.read_message(entry.commit_offset, entry.size)
            cache = self._msg_cache
            if len(cache) >= MESSAGE_CACHE:
                cache.clear()
            cache[entry.commit_offset] = msg
        return msg

    def _deliver(self, sub: Subscription, out: list[Delivered]) -> None:
        if not out:
            return
        sub.credit -= len(out)
        metrics = self.metrics
        for d in out:
            metrics.messages_out[d.queue.topic] += 1
            metrics.bytes_out[d.queue.topic] += len(d.message.body)
        sub.sink.deliver(out)

    def _pump_offset(self, sub: Subscription) -> None:
        out: list[Delivered] = []
        budget, scanned = sub.credit, 0
        queues = sub.assigned
        n = len(queues)
        now = self.now_ms()
        tag_filter = sub.filter
        more = False
        for i in range(n):
            if budget <= 0 or scanned >= MAX_SCAN_PER_PUMP:
                more = budget > 0
                break
            q = queues[(sub._rr + i) % n]
            pos = sub.positions.get(q, 0)
            end = self._visible_max(q)
            while True:
                try:
                    got, pos, looked = self._collect(q, pos, end, budget, tag_filter, now, MAX_SCAN_PER_PUMP - scanned)
                except OffsetOutOfRange:
                    pos = self._fell_behind(sub, q, pos)
                    continue
                break
            if got:
                out.extend(got)
                budget -= len(got)
                sub.last_delivered[q] = got[-1].queue_offset
            scanned += looked
            sub.positions[q] = pos
        more = more or (budget > 0 and scanned >= MAX_SCAN_PER_PUMP)
        sub._rr = (sub._rr + 1) % max(1, n)
        if not out and not more:
            # everything scanned was filtered out: let the committed offset follow so lag does not grow forever
            committed = self._group_offsets(sub.progress_key)
            for q in queues:
                if committed.get(q, 0) < sub.positions.get(q, 0) and not self._has_undelivered_commit(sub, q):
                    self._set_offset(sub.progress_key, q, sub.positions[q])
        self._deliver(sub, out)
        if more:
            self._wake(sub)

    def _collect(self, q: QueueRef, pos: int, end: int, want: int, tag_filter: TagFilter, now_ms: int,
                 scan_limit: int) -> tuple[list[Delivered], int, int]:
        """Read `q` from `pos` up to `end` until `want` messages pass the filter or `scan_limit` index entries were
        looked at. Returns (deliveries, next position, entries looked at); raises OffsetOutOfRange when `pos` is
        below what retention kept."""
        out: list[Delivered] = []
        looked = 0
        while pos < end and len(out) < want and looked < scan_limit:
            entries = self.store.read_index(q, pos, min(READ_BATCH, end - pos))
            if not entries:
                break
            for e in entries:
                if e.queue_offset >= end or len(out) >= want:
                    break
                pos = e.queue_offset + 1
                looked += 1
                msg = self._wanted(e, tag_filter, now_ms)
                if msg is not None:
                    out.append(Delivered(msg, q, e.queue_offset))
        return out, pos, looked

    def _has_undelivered_commit(self, sub: Subscription, q: QueueRef) -> bool:
        # An offset-mode consumer owns the gap between its commit and its position only while it has deliveries
        # outstanding; the last delivery it received is remembered to decide that.
        last = sub.last_delivered.get(q)
        return last is not None and self._group_offsets(sub.progress_key).get(q, 0) <= last

    def _fell_behind(self, sub: Subscription, q: QueueRef, pos: int) -> int:
        """Retention removed offsets this member had not read: say so (log + sink), return where to go on."""
        new = self.store.queue_bounds(q).min_offset
        log.warning("group %s fell behind retention on %s: skipping offsets %d..%d", sub.group, q, pos, new)
        notify = getattr(sub.sink, "offset_moved", None)
        if notify is not None:
            notify(q, pos, new)
        return new

    def _wanted(self, entry: IndexEntry, tag_filter: TagFilter, now_ms: int) -> Message | None:
        """The message of `entry` if the filter takes it and it has not expired (the tag hash decides most
        cases without reading the log)."""
        if not tag_filter.may_match_hash(entry.tag_hash):
            return None
        msg = self._read(entry)
        if (tag_filter.tags is not None and msg.tag not in tag_filter.tags) or (
                msg.expires_at and msg.expires_at <= now_ms):
            return None
        return msg

    def _pop_queue(self, key: str, state: GroupState, q: QueueRef) -> PopQueue:
        pq = state.pop.get((key, q))
        if pq is None:
            committed = self._group_offsets(key).get(q)
            if committed is None:
                committed = self._position_for(q, self.config.new_group_start)
            pq = state.pop[(key, q)] = PopQueue(committed=committed, next_fetch=committed)
        return pq

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
            waiting += len(pq.ready) + max(0, self._visible_max(q) - pq.next_fetch)
        return min(sub.credit, max(1, -(-waiting // rivals)))

    def _pump_pop(self, sub: Subscription) -> None:
        out: list[Delivered] = []
        budget, scanned = self._fair_share(sub), 0
        limited = budget < sub.credit
        state, key = sub.state, sub.progress_key
        queues = sub.assigned
        n = len(queues)
        now = self.now_ms()
        deadline = self.clock.seconds() + sub.invisible_ms / 1000.0 if sub.invisible_ms else 0.0
        tag_filter = sub.filter
        more = False
        for i in range(n):
            if budget <= 0:
                break
            q = queues[(sub._rr + i) % n]
            pq = self._pop_queue(key, state, q)
            # redeliveries first, oldest offset first
            while pq.ready and budget > 0:
                offset = pq.ready.pop(0)
                attempt = pq.attempts.pop(offset, 1) + 1
                if offset < pq.committed or offset in pq.acked or offset in pq.inflight:
                    continue
                entry = self._entry_at(q, offset)
                if entry is None:
                    self._ack_offset(key, pq, q, offset)
                    continue
                msg = self._read(entry)
                if attempt > sub.max_attempts:
                    self._dead_letter(state, msg, attempt - 1)
                    self._ack_offset(key, pq, q, offset)
                    continue
                self._take(sub, pq, q, offset, attempt, deadline, key)
                out.append(Delivered(msg, q, offset, make_receipt(q, offset, attempt), attempt))
                budget -= 1
            end = self._visible_max(q)
            while pq.next_fetch < end and budget > 0:
                if scanned >= MAX_SCAN_PER_PUMP:
                    more = True
                    break
                try:
                    entries = self.store.read_index(q, pq.next_fetch, min(READ_BATCH, end - pq.next_fetch))
                except OffsetOutOfRange:
                    new = self._fell_behind(sub, q, pq.next_fetch)
                    pq.next_fetch = max(pq.next_fetch, new)
                    if pq.committed < new:
                        pq.committed = new
                        pq.acked = {o for o in pq.acked if o >= new}
                        self._set_offset(key, q, new)
                    continue
                if not entries:
                    break
                for e in entries:
                    if e.queue_offset >= end or budget <= 0:
                        break
                    offset = e.queue_offset
                    pq.next_fetch = offset + 1
                    scanned += 1
                    msg = self._wanted(e, tag_filter, now)
                    if msg is None:
                        self._ack_offset(key, pq, q, offset)  # filtered or expired: done for this group
                        continue
                    self._take(sub, pq, q, offset, 1, deadline, key)
                    out.append(Delivered(msg, q, offset, make_receipt(q, offset, 1), 1))
                    budget -= 1
        sub._rr = (sub._rr + 1) % max(1, n)
        self._deliver(sub, out)
        if more or (limited and out and sub.credit > 0):
            self._wake(sub)  # took only a share: come back for what the other members leave

    def _take(self, sub: Subscription, pq: PopQueue, q: QueueRef, offset: int, attempt: int, deadline: float,
              key: str) -> None:
        pq.inflight[offset] = Inflight(attempt, deadline, sub)
        if deadline:
            self._timers.add(deadline, (sub.state.name, key, q, offset, attempt))
        if attempt > 1:
            self.metrics.redeliveries += 1

    def _entry_at(self, q: QueueRef, offset: int) -> IndexEntry | None:
        try:
            entries = self.store.read_index(q, offset, 1)
        except OffsetOutOfRange:
            return None
        return entries[0] if entries else None

    def _ack_offset(self, key: str, pq: PopQueue, q: QueueRef, offset: int) -> None:
        pq.acked.add(offset)
        if pq.advance():
            self._set_offset(key, q, pq.committed)

    def _find_inflight(self, sub: Subscription, receipt: str) -> tuple[PopQueue, QueueRef, int, Inflight]:
        if sub.state.ack is not AckMode.MESSAGE:
            raise InvalidReceipt(f"group {sub.group!r} commits offsets; it does not ack messages")
        q, offset, attempt = parse_receipt(receipt)
        pq = sub.state.pop.get((sub.progress_key, q))
        item = pq.inflight.get(offset) if pq is not None else None
        if item is None or item.attempt != attempt:
            raise InvalidReceipt(f"receipt {receipt!r} is unknown or expired (the message was redelivered)")
        return pq, q, offset, item

    def _ack(self, sub: Subscription, receipt: str) -> None:
        pq, q, offset, _ = self._find_inflight(sub, receipt)
        del pq.inflight[offset]
        self._ack_offset(sub.progress_key, pq, q, offset)

    def _nack(self, sub: Subscription, receipt: str, requeue: bool, delay_ms: int) -> None:
        pq, q, offset, item = self._find_inflight(sub, receipt)
        del pq.inflight[offset]
        if not requeue:
            entry = self._entry_at(q, offset)
            if entry is not None:
                self._dead_letter(sub.state, self._read(entry), item.attempt)
            self._ack_offset(sub.progress_key, pq, q, offset)
            return
        pq.attempts[offset] = item.attempt
        if delay_ms > 0:
            # parked: neither in flight nor ready until the delay passes
            pq.inflight[offset] = Inflight(item.attempt, self.clock.seconds() + delay_ms / 1000.0, None)
            self._timers.add(pq.inflight[offset].deadline, (sub.state.name, sub.progress_key, q, offset, item.attempt))
            return
        pq.ready.insert(0, offset)
        self._wake_group(sub.state, sub.topic)

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

    def _wake_group(self, state: GroupState, topic: str) -> None:
        for sub in state.members.get(topic, []):
            if sub.credit > 0:
                self._wake(sub)

    def _dead_letter(self, state: GroupState, msg: Message, attempts: int) -> None:
        dlq = self.ensure_topic(f"{DLQ_PREFIX}{state.name}"[:127], queues=1, internal=True)
        props = dict(msg.properties)
        props.update({"DLQ_ORIGIN_TOPIC": msg.topic, "DLQ_ORIGIN_MSG_ID": msg.msg_id,
                      "DLQ_DELIVERY_ATTEMPTS": str(attempts)})
        copy = Message(topic=dlq.name, body=msg.body, subject=msg.subject, tag=msg.tag, keys=msg.keys,
                       properties=props, born_ts=msg.born_ts, group=msg.group, flags=msg.flags)
        self.publish([copy], queue_id=0)
        self.metrics.dead_lettered += 1
        log.info("message %s of group %s dead-lettered after %d attempts", msg.msg_id, state.name, attempts)

    # ------------------------------------------------------------------ pull
    def pull(self, queue: QueueRef, offset: int, max_count: int = 32, filter_expr: str | TagFilter = "*") -> PullResult:
        cfg = self._check_queue(queue)
        if "r" not in cfg.perm:
            raise NoPermission(f"topic {queue.topic!r} is not readable")
        tag_filter = filter_expr if isinstance(filter_expr, TagFilter) else parse_tag_filter(filter_expr)
        max_count = max(1, min(int(max_count), 1024))
        low = self.store.queue_bounds(queue).min_offset
        end = self._visible_max(queue)
        if offset < low:
            return PullResult(PullStatus.OFFSET_MOVED, [], low, low, end)
        if offset > end:
            raise OffsetOutOfRange(f"offset {offset} is past the end of {queue} (max {end})")
        out, pos, _ = self._collect(queue, offset, end, max_count, tag_filter, self.now_ms(), MAX_SCAN_PER_PUMP)
        for d in out:
            self.metrics.messages_out[queue.topic] += 1
            self.metrics.bytes_out[queue.topic] += len(d.message.body)
        return PullResult(PullStatus.FOUND if out else PullStatus.NO_NEW, out, pos, low, end)

    # ------------------------------------------------------------------ offsets and groups
    def _group_offsets(self, key: str) -> dict[QueueRef, int]:
        offsets = self._offsets.get(key)
        if offsets is None:
            offsets = self._offsets[key] = {QueueRef(t, q): o for (t, q), o in self.meta.get_offsets(key).items()}
        return offsets

    def _set_offset(self, key: str, queue: QueueRef, offset: int) -> None:
        self._group_offsets(key)[queue] = offset
        self._dirty_offsets.add((key, queue))
        self._schedule_offset_flush()

    def _schedule_offset_flush(self) -> None:
        if self._offset_flush is None and self._dirty_offsets and not self._closed:
            self._offset_flush = self.clock.callLater(OFFSET_FLUSH_S, self.flush_offsets)

    def flush_offsets(self) -> None:
        """Write committed offsets to metadata in one batch (they are also flushed on close)."""
        self._offset_flush = None
        if not self._dirty_offsets:
            return
        dirty, self._dirty_offsets = self._dirty_offsets, set()
        rows = [(key, q.topic, q.queue_id, self._offsets[key][q]) for key, q in dirty]
        self.meta.put_offsets(rows)

    def commit_offset(self, group: str, queue: QueueRef, offset: int) -> None:
        """Record that everything below `offset` in `queue` is consumed by `group` (never moves backwards;
        use reset_offsets to rewind). A group that only pulls and commits becomes known this way."""
        validate_group(group)
        self._commit_progress(group, queue, offset)
        if group not in self._groups:
            rows = {row["name"]: row for row in self.meta.get_groups()}
            row = rows.get(group)
            topics = set((row.get("extra") or {}).get("topics", [])) if row else set()
            if queue.topic not in topics:
                self.meta.put_group({"name": group, "mode": row["mode"] if row else ConsumeMode.CLUSTERING.value,
                                     "ack": row["ack"] if row else AckMode.OFFSET.value,
                                     "created_ts": row["created_ts"] if row else self.now_ms(),
                                     "extra": {"topics": sorted(topics | {queue.topic})}})
        elif queue.topic not in self._groups[group].topics:
            self._groups[group].topics.add(queue.topic)
            self._persist_group(self._groups[group])

    def _commit_progress(self, key: str, queue: QueueRef, offset: int) -> None:
        self._check_queue(queue)
        end = self._visible_max(queue)
        if offset < 0 or offset > end:
            raise OffsetOutOfRange(f"cannot commit offset {offset} on {queue}: valid offsets are 0..{end}")
        if offset > self._group_offsets(key).get(queue, -1):
            self._set_offset(key, queue, offset)

    def committed_offsets(self, group: str) -> dict[QueueRef, int]:
        return dict(self._group_offsets(group))

    def reset_offsets(self, group: str, topic: str, to: str | int) -> dict[QueueRef, int]:
        """Move a group's offsets on `topic` to "earliest", "latest" or the first message stored at/after a
        timestamp (ms). Active members continue from there."""
        validate_group(group)
        queues = self.queues_of(topic)
        result = {q: self._position_for(q, to) for q in queues}
        state = self._groups.get(group)
        keys = {group}
        if state is not None and state.mode is ConsumeMode.BROADCASTING:
            keys.update(k for k in self._offsets if k.startswith(group + "@"))
        for key in keys:
            for q, off in result.items():
                self._set_offset(key, q, off)
                if state is not None and (key, q) in state.pop:
                    state.pop[(key, q)] = PopQueue(committed=off, next_fetch=off)
        if state is not None:
            for sub in state.members.get(topic, []):
                for q in sub.assigned:
                    if q in sub.positions:
                        sub.positions[q] = result[q]
                if sub.credit > 0:
                    self._wake(sub)
        self.flush_offsets()
        return result

    def _known_group(self, group: str) -> tuple[ConsumeMode, AckMode, list[str]]:
        state = self._groups.get(group)
        if state is not None:
            return state.mode, state.ack, sorted(state.topics)
        for row in self.meta.get_groups():
            if row["name"] == group:
                extra = row.get("extra") or {}
                return ConsumeMode(row["mode"]), AckMode(row["ack"]), list(extra.get("topics", []))
        raise GroupNotFound(f"consumer group {group!r} does not exist")

    def group_info(self, group: str) -> GroupInfo:
        mode, ack, topics = self._known_group(group)
        state = self._groups.get(group)
        members = sorted({s.client_id for s in state.subscriptions()}) if state else []
        info = GroupInfo(name=group, mode=mode, ack=ack, topics=topics, members=members)
        owners: dict[QueueRef, str] = {}
        if state is not None:
            for sub in state.subscriptions():
                if mode is ConsumeMode.CLUSTERING and ack is AckMode.OFFSET:
                    for q in sub.assigned:
                        owners[q] = sub.client_id
            info.inflight = sum(len(pq.inflight) for pq in state.pop.values())
        keys = [group] if mode is ConsumeMode.CLUSTERING else sorted(
            k for k in self._offsets if k.startswith(group + "@")) or [group]
        for topic in topics:
            if topic not in self._topics:
                continue
            for q in self.queues_of(topic):
                low, high = self.store.queue_bounds(q).min_offset, self._visible_max(q)
                for key in keys:
                    committed = self._group_offsets(key).get(q, high)
                    owner = owners.get(q, key.split("@", 1)[1] if "@" in key else "")
                    info.progress.append(QueueProgress(q, committed, high, low, owner))
        return info

    def list_groups(self) -> list[GroupInfo]:
        names = {row["name"] for row in self.meta.get_groups()} | set(self._groups)
        return [self.group_info(n) for n in sorted(names)]

    def delete_group(self, group: str) -> None:
        self._known_group(group)
        state = self._groups.get(group)
        if state is not None and state.subscriptions():
            raise TidegateError(f"group {group!r} has online members; stop them first")
        self._groups.pop(group, None)
        for key in [k for k in self._offsets if k == group or k.startswith(group + "@")]:
            del self._offsets[key]
            self.meta.delete_offsets(key)
        self._dirty_offsets = {(k, q) for k, q in self._dirty_offsets if k != group and not k.startswith(group + "@")}
        self.meta.delete_offsets(group)
        self.meta.delete_group(group)

    # ------------------------------------------------------------------ query
    def query_by_id(self, msg_id: str) -> Message:
        return self.store.lookup_id(msg_id)

    def query_by_key(self, topic: str, key: str, limit: int = 64) -> list[Message]:
        self.get_topic(topic)
        return self.store.lookup_key(topic, key, limit)

    def list_by_time(self, topic: str, start_ms: int, end_ms: int, limit: int = 100) -> list[Message]:
        found: list[Message] = []
        for q in self.queues_of(topic):
            pos = self.store.offset_for_time(q, start_ms)
            end = self._visible_max(q)
            taken = 0
            while pos < end and taken < limit:
                try:
                    entries = self.store.read_index(q, pos, min(READ_BATCH, end - pos))
                except OffsetOutOfRange:
                    pos = self.store.queue_bounds(q).min_offset
                    continue
                if not entries:
                    break
                stop = False
                for e in entries:
                    pos = e.queue_offset + 1
                    msg = self._read(e)
                    if msg.store_ts > end_ms:
                        stop = True
                        break
                    if msg.store_ts >= start_ms:
                        found.append(msg)
                        taken += 1
                if stop:
                    break
        found.sort(key=lambda m: (m.store_ts, m.msg_id))
        return found[:limit]

    # ------------------------------------------------------------------ lifecycle
    def enforce_retention(self) -> int:
        return self.store.enforce_retention(self.now_ms(), self.config.retention_ms, self.config.retention_bytes)

    def close(self) -> None:
        """Flush offsets and the log, then close the stores (writes the clean-shutdown marker)."""
        if self._closed:
            return
        self._closed = True
        for call in (self._wake_call, self._offset_flush):
            if call is not None and call.active():
                call.cancel()
        self._timers.stop()
        self.flush_offsets()
        self.durability.close()
        self.store.close()
        self.meta.close()

    # ------------------------------------------------------------------ adapter state
    def adapter_state(self, namespace: str) -> MetadataNamespace:
        """Durable rows of one adapter namespace (MQTT sessions, retained messages, AMQP exchanges)."""
        return MetadataNamespace(self.meta, namespace)
