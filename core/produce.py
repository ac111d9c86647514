"""The publish path: validate, choose the home queue, match bindings, append once, make visible when durable.

This is the hottest code of the broker: it works on plain dicts shared with the modules that own them (topic
configurations, the routing trie, the visible ends, the message cache) and does no per-message call beyond
validation, the routing match and the metrics counters.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from time import perf_counter

from tidegate.core.api import SendResult
from tidegate.core.bindings import Bindings
from tidegate.core.config import BrokerConfig
from tidegate.core.errors import NoPermission, QueueNotFound, TopicNotFound
from tidegate.core.interfaces_storage import Durability
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import AppendResult, Message, QueueRef
from tidegate.core.reader import CACHE_ENTRY_OVERHEAD, QueueReader
from tidegate.core.schema import SchemaRegistry
from tidegate.core.storage.accelerator import RECORD_SPEEDUPS, RECORD_SPEEDUPS_NAMES, load_extension
from tidegate.core.storage.api import MessageStore
from tidegate.core.topics import TopicRegistry
from tidegate.core.visibility import Visibility

MAX_CACHED_FANOUTS = 4096


def _send_results(items: Sequence[tuple[Message, tuple[QueueRef, ...]]], results: Sequence[AppendResult],
                  ends: dict[QueueRef, int], cached: dict[int, Message],
                  cached_order: Callable[[tuple[int, int]], None], largest_cached: int, entry_overhead: int,
                  result_type: type) -> tuple[list[SendResult], int, int]:
    """After a batch is appended: each destination queue's new end into `ends` (offsets grow within a batch, so
    the last one counts), every message the cache may hold into `cached` with its `(offset, charge)` handed to
    `cached_order` (QueueReader.remember, inline: the caller charges the sum once), and a `result_type`
    (SendResult) per message. Returns the results, the cache charge and the bodies' total size. A compiled twin
    (core/storage/_record_speedups.pyx `send_results`) replaces it unless TIDEGATE_NO_EXTENSIONS is set."""
    out: list[SendResult] = []
    add = out.append
    new_result = tuple.__new__  # SendResult(...) without NamedTuple's Python-level __new__
    cached_bytes = 0
    body_bytes = 0
    for (m, dests), (msg_id, commit_offset, size, _, offsets) in zip(items, results, strict=True):
        n = len(dests)
        if n == 1:
            ends[dests[0]] = offsets[0] + 1
        elif n == 2:  # a home queue and one bound queue (an MQTT subscriber's, say)
            d0, d1 = dests
            o0, o1 = offsets
            ends[d0] = o0 + 1
            ends[d1] = o1 + 1
        else:
            for dest, qoff in zip(dests, offsets, strict=True):
                ends[dest] = qoff + 1
        charge = size + entry_overhead
        if charge <= largest_cached:
            cached[commit_offset] = m
            cached_order((commit_offset, charge))
            cached_bytes += charge
        body_bytes += len(m.body)
        add(new_result(result_type, (msg_id, m.topic, dests[0].queue_id, offsets[0], commit_offset,
                                     commit_offset + size, n - 1)))
    return out, cached_bytes, body_bytes


py_send_results = _send_results
_speedups = load_extension(RECORD_SPEEDUPS, RECORD_SPEEDUPS_NAMES)
send_results = _speedups.send_results if _speedups is not None else _send_results


class Producer:
    def __init__(self, store: MessageStore, durability: Durability, topics: TopicRegistry, bindings: Bindings,
                 visibility: Visibility, reader: QueueReader, metrics: CoreMetrics, config: BrokerConfig,
                 now_ms: Callable[[], int], schemas: SchemaRegistry | None = None) -> None:
        self._store = store
        self._durability = durability
        self._topics = topics
        self._router = bindings.trie
        self._visibility = visibility
        self._reader = reader  # its byte-bounded cache of recent messages gets every published one
        self._metrics = metrics
        self._config = config
        self._now_ms = now_ms
        # topic -> check of its JSON Schema / content-type rule (core/schema.py); read in place, never replaced
        self._schemas = schemas
        self._validators: dict[str, Callable[[Message], None]] = schemas.validators if schemas is not None else {}
        self._next_queue: dict[str, int] = {}  # topic -> queue id the next round-robin publish goes to
        self._queue_refs: dict[str, list[QueueRef]] = {}  # topic -> its QueueRefs, built once per queue count
        self._alone: dict[str, list[tuple[QueueRef]]] = {}  # topic -> `(ref,)` of each of its QueueRefs
        # topic -> admission check of a length-limited destination (AMQP x-max-length with x-overflow
        # reject-publish): asked before a binding appends a message there; False = not appended to that queue.
        # The home queue is never asked (whoever publishes into a queue directly checks its limit first).
        self.admission: dict[str, Callable[[Message], bool]] = {}
        # (home queue, queues the bindings matched) -> destinations in append order: the router returns the same
        # frozenset for a name until the bindings change, so most publishes find their destinations here (not
        # while an admission check is registered: that one is asked per message)
        self._fanouts: dict[tuple[QueueRef, frozenset[QueueRef]], tuple[QueueRef, ...]] = {}

    def _fanout(self, home: QueueRef, extra: frozenset[QueueRef]) -> tuple[QueueRef, ...]:
        dests = (home, *sorted(d for d in extra if d != home))
        if len(self._fanouts) >= MAX_CACHED_FANOUTS:
            self._fanouts.clear()
        self._fanouts[(home, extra)] = dests
        return dests

    def publish(self, messages: Sequence[Message], queue_id: int | None = None) -> list[SendResult]:
        """See Broker.publish."""
        now = self._now_ms()
        items: list[tuple[Message, tuple[QueueRef, ...]]] = []
        add_item = items.append
        fanouts = self._fanouts
        router = self._router if len(self._router) else None
        topics, refs, rr, max_body = self._topics.configs, self._queue_refs, self._next_queue, self._config.max_body
        validators = self._validators
        # A batch is usually one topic and one name (an MQTT read, a native SEND_BATCH): what depends only on
        # them (topic config, queues, the subject's validity, the router's match) is looked up once per run.
        prev_topic: str | None = None
        prev_subject: str | None = None
        cfg = queues = extra = only = None  # of prev_topic / prev_subject
        alone = self._alone
        n_queues = 0
        next_qid = -1  # round robin of prev_topic, kept here and written back to `rr` when the topic changes
        run_dests: list[tuple[QueueRef, ...] | None] = []  # destinations by home queue id, for `extra`
        admission = self.admission
        topic_runs = 0  # 1 at the end: every message has the same topic
        for m in messages:
            topic = m.topic
            if topic != prev_topic:
                if next_qid >= 0:
                    rr[prev_topic] = next_qid  # type: ignore[index]
                topic_runs += 1
                cfg = topics.get(topic)
                m.validate(max_body, check_topic=cfg is None)
                if validators:
                    check = validators.get(topic)
                    if check is not None:
                        check(m)  # SchemaViolation: the whole batch is refused, nothing is stored
                if cfg is None:
                    if not self._config.auto_create_topics:
                        raise TopicNotFound(f"topic {topic!r} does not exist and auto-creation is off")
                    cfg = self._topics.create(topic, None, "rw", 0, False)
                if "w" not in cfg.perm:
                    raise NoPermission(f"topic {topic!r} is not writable")
                n_queues = cfg.queues
                queues = refs.get(topic)
                if queues is None or len(queues) != n_queues:
                    queues = refs[topic] = [QueueRef(topic, i) for i in range(n_queues)]
                    alone[topic] = [(q,) for q in queues]
                only = alone[topic]  # the one-queue destination tuple of each queue, made once per topic
                next_qid = rr.get(topic, 0) if queue_id is None else -1
                if next_qid >= n_queues:
                    next_qid = 0
                prev_topic, prev_subject, extra = topic, m.subject, None
            else:
                body = m.body
                if (m.subject != prev_subject or m.properties or m.tag or m.keys or body.__class__ is not bytes
                        or len(body) > max_body):
                    m.validate(max_body, check_topic=False)  # else: what validate checks is known to pass
                    prev_subject, extra = m.subject, None
                if validators:
                    check = validators.get(topic)
                    if check is not None:
                        check(m)
            if queue_id is not None:
                if not 0 <= queue_id < n_queues:
                    raise QueueNotFound(f"topic {topic!r} has no queue {queue_id} (it has {n_queues})")
                qid = queue_id
            elif m.group:
                qid = zlib.crc32(m.group.encode()) % n_queues
            else:
                qid = next_qid
                next_qid += 1
                if next_qid == n_queues:
                    next_qid = 0
            if router is not None:
                if extra is None:  # the first message of this topic and subject
                    subject = m.subject
                    extra = router.match(f"{topic}/{subject}" if subject else topic)  # Message.full_name
                    run_dests = [None] * n_queues
                if not extra:
                    dests = only[qid]  # type: ignore[index]
                elif admission:
                    home = queues[qid]  # type: ignore[index]
                    kept = [d for d in extra if d.topic not in admission or d == home or admission[d.topic](m)]
                    dests = (home, *sorted(d for d in kept if d != home))
                else:
                    dests = run_dests[qid]  # type: ignore[assignment]
                    if dests is None:
                        home = queues[qid]  # type: ignore[index]
                        dests = run_dests[qid] = fanouts.get((home, extra)) or self._fanout(home, extra)
            else:
                dests = only[qid]  # type: ignore[index]
            if not m.born_ts:
                m.born_ts = now
            add_item((m, dests))
        if next_qid >= 0:
            rr[prev_topic] = next_qid  # type: ignore[index]
        if not items:
            return []
        store = self._store
        started = perf_counter()
        results = store.append_batch(items) if len(items) > 1 else [store.append(*items[0])]
        self._metrics.append_latency.observe(perf_counter() - started)
        # the new visible end of each destination queue: offsets grow within a batch, so the last one counts
        ends: dict[QueueRef, int] = {}
        cached, cached_order = self._reader.remember_with()
        out, cached_bytes, body_bytes = send_results(items, results, ends, cached, cached_order,
                                                     self._reader.largest_cached, CACHE_ENTRY_OVERHEAD, SendResult)
        if cached_bytes:
            self._reader.charge(cached_bytes)
        visible = self._visibility.visible
        for dest in ends:
            if dest not in visible:  # a queue's first message ever: everything before this append is visible
                visible[dest] = self._first_offset(dest, items, results)
        updates = list(ends.items())
        messages_in, bytes_in = self._metrics.messages_in, self._metrics.bytes_in
        topic = items[0][0].topic
        if topic_runs == 1:  # every message has this topic
            messages_in[topic] += len(items)
            bytes_in[topic] += body_bytes
        else:
            for m, _ in items:
                messages_in[m.topic] += 1
                bytes_in[m.topic] += len(m.body)
        if self._durability.visible_offset >= out[-1].commit_end:
            self._visibility.make_visible(updates)
        else:
            self._visibility.pending.append((out[-1].commit_end, updates))
            self._durability.request_flush()
        return out

    @staticmethod
    def _first_offset(dest: QueueRef, items: list[tuple[Message, tuple[QueueRef, ...]]],
                      results: Sequence[AppendResult]) -> int:
        """`dest`'s offset of the first message of this append that went there."""
        for (_, dests), result in zip(items, results, strict=True):
            for each, qoff in zip(dests, result.queue_offsets, strict=True):
                if each == dest:
                    return qoff
        raise AssertionError(f"{dest} received nothing in this append")

    def forget_topic(self, topic: str) -> None:
        self._next_queue.pop(topic, None)
        self._queue_refs.pop(topic, None)
        self._alone.pop(topic, None)
        self._fanouts.clear()
        if self._schemas is not None:
            self._schemas.clear(topic)  # a deleted topic's rule goes with it
