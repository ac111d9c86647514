"""The core broker: one protocol-free API over topics, queues, groups, routing, delivery and storage.

Adapters (native, MQTT, AMQP) call this and nothing below it. The broker is single-threaded: every call comes on
the reactor thread; only fsync runs elsewhere (see core/flush.py).

`Broker` is a facade: it checks arguments and hands each call to the module that does the job.

| module | job |
|---|---|
| core/topics.py | topic configurations (in memory, persisted) |
| core/bindings.py | persisted routes from `topic/subject` patterns to extra destination queues |
| core/produce.py | the publish path: choose a queue, match bindings, append once, hand over for visibility |
| core/visibility.py | what consumers may see of each queue (durable entries) and who watches it grow |
| core/reader.py | reading queues: index entries, tag filter, recent-message cache |
| core/offsets.py | committed offsets per group (or broadcasting member), batched writes to metadata |
| core/groups.py | consumer groups: states online, metadata rows, GroupInfo views |
| core/delivery.py | push delivery: queue assignment, wake-ups once per turn, the offset and message-mode pumps |
| core/acks.py | message mode: in flight, ack/nack, invisibility timeouts, redelivery, dead letters, `get` |
| core/consumers.py | the values delivery works on: Subscription, GroupState, PopQueue, receipts, timers |

Data flow of a send: validate → choose a queue of the topic → match bindings (fan-out destinations) → one commit-log
record with index entries in every destination queue → once durable (sync flush) the entries become *visible* and
the consumers watching those queues are woken, once per reactor turn, not once per message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IReactorTime

from tidegate.core.adapter_state import MetadataNamespace
from tidegate.core.alarms import ResourceAlarms
from tidegate.core.api import (
    AckMode,
    ConsumeMode,
    Delivered,
    DeliverySink,
    GroupInfo,
    PullResult,
    PullStatus,
    SendResult,
)
from tidegate.core.bindings import Bindings
from tidegate.core.config import BrokerConfig
from tidegate.core.consumers import GroupState, Subscription
from tidegate.core.delivery import Delivery
from tidegate.core.errors import InvalidReceipt, NoPermission, OffsetOutOfRange, TopicNotFound
from tidegate.core.filters import TagFilter, parse_tag_filter
from tidegate.core.groups import GroupRegistry
from tidegate.core.interfaces_storage import Durability
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef, TopicConfig, validate_group
from tidegate.core.offsets import OffsetBook
from tidegate.core.produce import Producer
from tidegate.core.reader import MAX_SCAN_PER_PUMP, READ_BATCH, QueueReader
from tidegate.core.schema import SchemaRegistry
from tidegate.core.storage.api import MessageStore, MetadataStore
from tidegate.core.topics import TopicRegistry
from tidegate.core.visibility import Visibility

__all__ = ["Broker", "BrokerConfig", "Subscription"]

log = logging.getLogger("tidegate.broker")

# Mode names and members to members, without an Enum call per subscribe (StrEnum members hash as their values).
_CONSUME_MODES: dict[str, ConsumeMode] = {m.value: m for m in ConsumeMode}
_ACK_MODES: dict[str, AckMode] = {m.value: m for m in AckMode}


class Broker:
    def __init__(self, store: MessageStore, metadata: MetadataStore, clock: IReactorTime, durability: Durability,
                 config: BrokerConfig | None = None, *, metrics: CoreMetrics | None = None) -> None:
        """`metrics` defaults to the durability's counters, so one CoreMetrics serves the whole process."""
        self.store = store
        self.meta = metadata
        self.clock = clock
        self.durability = durability
        self.config = config or BrokerConfig()
        self.metrics = metrics if metrics is not None else durability.metrics
        self._topics = TopicRegistry(metadata, lambda: self.config.default_queues, self.now_ms)
        self._bindings = Bindings(metadata, self._topics.check_queue)
        self._visibility = Visibility(store)
        self._reader = QueueReader(store, self.config.message_cache_bytes)
        self._offsets = OffsetBook(metadata, clock)
        self._groups = GroupRegistry(metadata, store, self._topics, self._offsets, self._visibility, self.now_ms)
        self.schemas = SchemaRegistry(metadata)  # per-topic JSON Schema / content-type rules (core/schema.py)
        self._producer = Producer(store, durability, self._topics, self._bindings, self._visibility, self._reader,
                                  self.metrics, self.config, self.now_ms, self.schemas)
        self._delivery = Delivery(store, clock, self.config, self.metrics, self._topics, self._visibility,
                                  self._reader, self._offsets, self._groups.states, self._producer.publish)
        # The method below documents publish; the instance calls the producer directly, one call less per send.
        self.publish = self._producer.publish
        self._closed = False
        durability.on_durable(self._visibility.on_durable)
        # Resource alarms (core/alarms.py): monitors started by the process raise them, adapters block publishers.
        self.alarms = ResourceAlarms()

    # ------------------------------------------------------------------ time
    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # ------------------------------------------------------------------ topics
    def create_topic(self, name: str, queues: int | None = None, perm: str = "rw", retention_ms: int = 0,
                     internal: bool = False) -> TopicConfig:
        return self._topics.create(name, queues, perm, retention_ms, internal)

    def ensure_topic(self, name: str, queues: int | None = None, internal: bool = False) -> TopicConfig:
        cfg = self._topics.configs.get(name)
        return cfg if cfg is not None else self.create_topic(name, queues, internal=internal)

    def update_topic(self, name: str, queues: int | None = None, perm: str | None = None,
                     retention_ms: int | None = None) -> TopicConfig:
        old = self._topics.get(name)
        new = self._topics.update(name, queues, perm, retention_ms)
        if new.queues != old.queues:
            self._delivery.topic_resized(name)
        return new

    def delete_topic(self, name: str) -> None:
        """Delete the topic, its queues, the bindings to them and every group's progress on it."""
        cfg = self._topics.get(name)
        self._delivery.drop_topic(name)
        for i in range(cfg.queues):
            q = QueueRef(name, i)
            self.store.delete_queue(q)
            self._visibility.forget(q)
        self._bindings.unbind_topic(name)
        self._producer.forget_topic(name)
        self._topics.forget(name)
        self.metrics.forget_topic(name)  # no counters kept under the names of deleted topics

    def get_topic(self, name: str) -> TopicConfig:
        return self._topics.get(name)

    def list_topics(self, include_internal: bool = False) -> list[TopicConfig]:
        return self._topics.list(include_internal)

    def queues_of(self, topic: str) -> list[QueueRef]:
        return self._topics.queues_of(topic)

    def queue_offsets(self, queue: QueueRef) -> tuple[int, int]:
        """(min, max) offsets of a queue as consumers see them."""
        self._topics.check_queue(queue)
        return self.store.queue_bounds(queue).min_offset, self._visibility.visible_max(queue)

    # ------------------------------------------------------------------ produce
    def publish(self, messages: Sequence[Message], queue_id: int | None = None) -> list[SendResult]:
        """Validate, route and append messages; raises TidegateError on bad input (then nothing is stored).

        Queue choice: `queue_id` if given; else a hash of message.group (FIFO order per group); else round-robin.
        Index entries are also appended to every queue bound by a matching binding (fan-out without copies;
        `SendResult.bound` counts those queues). Consumers see the messages once they are durable (sync flush) or
        at once (async flush).
        """
        return self._producer.publish(messages, queue_id)

    def when_durable(self, commit_end: int, callback: Callable[[], None]) -> None:
        """Call `callback` (on the reactor thread) once everything below `commit_end` is on disk."""
        self.durability.when_durable(commit_end, callback)

    # ------------------------------------------------------------------ routing
    def bind(self, pattern: str, destination: QueueRef) -> None:
        """Also route messages whose full name (`topic/subject`) matches `pattern` to `destination`.

        `+` matches one level, `#` the rest (including none). Persisted; idempotent.
        """
        self._bindings.bind(pattern, destination)

    def unbind(self, pattern: str, destination: QueueRef) -> None:
        self._bindings.unbind(pattern, destination)

    def bindings(self, destination_topic: str | None = None) -> list[tuple[str, QueueRef]]:
        return self._bindings.list(destination_topic)

    def limit_queue(self, queue: QueueRef, admission: Callable[[Message], bool] | None,
                    grown: Callable[[QueueRef, int], None] | None) -> None:
        """Hooks for a queue whose length an adapter limits (AMQP x-max-length, x-max-length-bytes, x-overflow):
        `admission(message)` is asked before a binding appends a message to the queue's topic (False: not appended
        there; the home queue of a publish is never asked), `grown(queue, visible_end)` is called when new
        messages become visible in it, whoever published them. None removes a hook."""
        if admission is None:
            self._producer.admission.pop(queue.topic, None)
        else:
            self._producer.admission[queue.topic] = admission
        if grown is None:
            self._visibility.growth_listeners.pop(queue, None)
        else:
            self._visibility.growth_listeners[queue] = grown

    def route(self, full_name: str) -> frozenset[QueueRef]:
        """Destinations bound to a full name (for tests and tools)."""
        return self._bindings.route(full_name)

    # ------------------------------------------------------------------ consume
    def subscribe(self, group: str, topic: str, sink: DeliverySink, *, client_id: str,
                  mode: ConsumeMode | str = ConsumeMode.CLUSTERING, ack: AckMode | str = AckMode.OFFSET,
                  filter_expr: str = "*", invisible_ms: int | None = None, max_attempts: int | None = None,
                  start: str | int | None = None) -> Subscription:
        """Attach a push consumer to `group` on `topic`. Delivery starts once credit is granted.

        `invisible_ms` = 0 in MESSAGE mode means in-flight messages never time out; they come back only when nacked
        or when the subscription closes (what MQTT sessions want).
        """
        groups = self._groups
        if not groups.known(group):  # a known group's name was validated when it was first stored
            validate_group(group)
        mode, ack = _CONSUME_MODES.get(mode) or ConsumeMode(mode), _ACK_MODES.get(ack) or AckMode(ack)
        tag_filter = parse_tag_filter(filter_expr)
        self._readable_topic(topic)
        state = groups.join(group, topic, mode, ack)
        return self._delivery.attach(
            state, topic, sink, client_id, tag_filter,
            self.config.invisible_ms if invisible_ms is None else max(0, int(invisible_ms)),
            self.config.max_attempts if max_attempts is None else max(1, int(max_attempts)),
            self.config.new_group_start if start is None else start)

    def get(self, group: str, topic: str, *, auto_ack: bool, invisible_ms: int | None = None) -> Delivered | None:
        """Take the next ready message of `group` on `topic` without a subscription (AMQP basic.get).

        The group consumes in MESSAGE mode (clustering), sharing messages with its push members: each message goes
        to exactly one of them or one get. Redeliveries come first. With `auto_ack` the message is settled at once
        (the returned receipt is empty); otherwise it is in flight under `Delivered.receipt` until `ack` or `nack`,
        or until `invisible_ms` pass (default BrokerConfig.invisible_ms; 0 = never time out, then it comes back only
        on nack). None when nothing is ready.
        """
        validate_group(group)
        self._readable_topic(topic)
        state = self._groups.join(group, topic, ConsumeMode.CLUSTERING, AckMode.MESSAGE)
        timeout = self.config.invisible_ms if invisible_ms is None else max(0, int(invisible_ms))
        return self._delivery.acks.get(state, topic, auto_ack, timeout)

    def ack(self, group: str, receipt: str) -> None:
        """Settle a message taken by `get` (or delivered to any push member of the group): done."""
        self._delivery.acks.ack_receipt(self._message_group(group, receipt), group, receipt)

    def nack(self, group: str, receipt: str, requeue: bool = True, delay_ms: int = 0) -> None:
        """Give a message taken by `get` (or delivered to a push member) back: ready again at once or after
        `delay_ms` with its attempt counted; with `requeue=False` it goes to the group's dead-letter topic."""
        self._delivery.acks.nack_receipt(self._message_group(group, receipt), group, receipt, requeue, delay_ms)

    def _message_group(self, group: str, receipt: str) -> GroupState:
        state = self._groups.states.get(group)
        if state is None:
            raise InvalidReceipt(f"receipt {receipt!r} is unknown: group {group!r} has nothing in flight")
        return state

    def _readable_topic(self, topic: str) -> None:
        if topic not in self._topics.configs:
            if not self.config.auto_create_topics:
                raise TopicNotFound(f"topic {topic!r} does not exist and auto-creation is off")
            self.create_topic(topic)
        if "r" not in self._topics.configs[topic].perm:
            raise NoPermission(f"topic {topic!r} is not readable")

    def pull(self, queue: QueueRef, offset: int, max_count: int = 32, filter_expr: str | TagFilter = "*") -> PullResult:
        cfg = self._topics.check_queue(queue)
        if "r" not in cfg.perm:
            raise NoPermission(f"topic {queue.topic!r} is not readable")
        tag_filter = filter_expr if isinstance(filter_expr, TagFilter) else parse_tag_filter(filter_expr)
        max_count = max(1, min(int(max_count), 1024))
        low = self.store.queue_bounds(queue).min_offset
        end = self._visibility.visible_max(queue)
        if offset < low:
            return PullResult(PullStatus.OFFSET_MOVED, [], low, low, end)
        if offset > end:
            raise OffsetOutOfRange(f"offset {offset} is past the end of {queue} (max {end})")
        out, pos, _ = self._reader.collect(queue, offset, end, max_count, tag_filter, self.now_ms(), MAX_SCAN_PER_PUMP)
        for d in out:
            self.metrics.messages_out[queue.topic] += 1
            self.metrics.bytes_out[queue.topic] += len(d.message.body)
        return PullResult(PullStatus.FOUND if out else PullStatus.NO_NEW, out, pos, low, end)

    # ------------------------------------------------------------------ offsets and groups
    def flush_offsets(self) -> None:
        """Write committed offsets to metadata in one batch (they are also flushed every second and on close)."""
        self._offsets.flush()

    def commit_offset(self, group: str, queue: QueueRef, offset: int) -> None:
        """Record that everything below `offset` in `queue` is consumed by `group` (never moves backwards;
        use reset_offsets to rewind). A group that only pulls and commits becomes known this way."""
        validate_group(group)
        self._delivery.commit_progress(group, queue, offset)
        self._groups.note_topic(group, queue.topic)

    def committed_offsets(self, group: str) -> dict[QueueRef, int]:
        return dict(self._offsets.of(group))

    def reset_offsets(self, group: str, topic: str, to: str | int) -> dict[QueueRef, int]:
        """Move a group's offsets on `topic` to "earliest", "latest" or the first message stored at/after a
        timestamp (ms). Active members continue from there."""
        validate_group(group)
        result = {q: self._visibility.position_for(q, to) for q in self.queues_of(topic)}
        state = self._groups.states.get(group)
        keys = {group}
        if state is not None and state.mode is ConsumeMode.BROADCASTING:
            keys.update(self._offsets.member_keys(group))
        self._delivery.reposition(state, topic, keys, result)
        self._offsets.flush()
        return result

    def group_info(self, group: str) -> GroupInfo:
        return self._groups.info(group)

    def list_groups(self) -> list[GroupInfo]:
        return [self._groups.info(name) for name in self._groups.names()]

    def delete_group(self, group: str) -> None:
        """Forget the group and its committed offsets; refused while members are online."""
        self._groups.forget(group)
        self._offsets.forget_group(group)

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
            end = self._visibility.visible_max(q)
            taken = 0
            while pos < end and taken < limit:
                window = min(READ_BATCH, end - pos)
                try:
                    entries = self.store.read_index(q, pos, window)
                except OffsetOutOfRange:
                    pos = self.store.queue_bounds(q).min_offset
                    continue
                if not entries:  # only holes (records lost in a crash recovery)
                    pos += window
                    continue
                stop = False
                for e in entries:
                    pos = e.queue_offset + 1
                    msg = self._reader.read(e)
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
        """Global retention (whole commit-log segments by age and size), then each topic's own `retention_ms`,
        which trims only that topic's queue indexes: the commit log is shared by every queue. Readers left below
        a new minimum take the fell-behind path. Returns the segments deleted."""
        now = self.now_ms()
        deleted = self.store.enforce_retention(now, self.config.retention_ms, self.config.retention_bytes)
        for cfg in self.list_topics(include_internal=True):
            if cfg.retention_ms > 0:
                for queue in self.queues_of(cfg.name):
                    expired = self.store.expire_queue_before(queue, now - cfg.retention_ms)
                    if expired:
                        log.info("topic %s retention dropped %d entries of queue %d", cfg.name, expired,
                                 queue.queue_id)
        return deleted

    # ------------------------------------------------------------------ delivery before ingest (adapters/base.py)
    def deliveries_due(self) -> bool:
        """Whether woken subscriptions with credit wait for their pump (core/delivery.py `wakes_pending`)."""
        return self._delivery.wakes_pending()

    def when_deliveries_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the due pumps have run, bounded in turns and time (`Delivery.when_drained`)."""
        self._delivery.when_drained(callback)

    def close(self) -> None:
        """Flush offsets and the log, then close the stores (writes the clean-shutdown marker)."""
        if self._closed:
            return
        self._closed = True
        self._delivery.close()
        self._offsets.close()
        self.durability.close()
        self.store.close()
        self.meta.close()

    # ------------------------------------------------------------------ adapter state
    def adapter_state(self, namespace: str) -> MetadataNamespace:
        """Durable rows of one adapter namespace (MQTT sessions, retained messages, AMQP exchanges)."""
        return MetadataNamespace(self.meta, namespace)
