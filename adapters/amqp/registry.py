"""Exchanges, queues and bindings of the AMQP adapter: adapter concepts stored with core primitives.

Declarations are rows in three adapter-state namespaces (`amqp.exchanges`, `amqp.queues`, `amqp.bindings`), written
when declared, durable or not; at broker start the transient ones are deleted with their core topics and bindings
(RabbitMQ drops transient entities on restart). A queue's messages live in its private core topic
(`model.queue_topic`); bindings of direct, fanout and topic exchanges to queues are core bindings (the core routes
every publish, whatever its protocol); headers-exchange and exchange-to-exchange bindings are routed by the adapter
(`Registry.extra_routes`).

The registry only keeps state and talks to the core through the system session; whether a client may do something
(authorization, exclusivity, equivalence) is checked by the channel before it calls in here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidegate.adapters.amqp.fastpath import short_string
from tidegate.adapters.amqp.model import (
    DEFAULT_EXCHANGES,
    binding_pattern,
    delivery_address,
    exchange_topic,
    headers_match,
    queue_topic,
    topic_match,
)
from tidegate.core.errors import TidegateError
from tidegate.core.interfaces import AdapterStateStore
from tidegate.core.model import QueueRef
from tidegate.core.session import CoreSession

log = logging.getLogger("tidegate.amqp")

EXCHANGES_NAMESPACE = "amqp.exchanges"
QUEUES_NAMESPACE = "amqp.queues"
BINDINGS_NAMESPACE = "amqp.bindings"
# Per queue, a queue offset below which every message may have been delivered already: after a restart such a
# message comes back with redelivered=true (RabbitMQ's promise: redelivered=false means "never delivered").
DELIVERED_NAMESPACE = "amqp.delivered"
# The mark is written ahead of deliveries by this many offsets, so one metadata write covers many deliveries; a
# clean shutdown writes the exact mark (after kill -9 up to this many never-delivered messages say redelivered).
DELIVERED_MARK_LEAD = 1024
ADDRESS_CACHE_SIZE = 4096  # delivery addresses kept encoded (a cache, cleared when full)


class QueueOwner(Protocol):
    """A connection, as far as exclusive queues care."""

    connection_id: int


class ConsumerHandle(Protocol):
    def cancelled_by_server(self) -> None:
        """The queue went away: tell the client (basic.cancel) and stop."""


@dataclass(slots=True)
class ExchangeDecl:
    name: str
    type: str
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    topic: str = ""

    def row(self) -> dict[str, Any]:
        return {"type": self.type, "durable": self.durable, "auto_delete": self.auto_delete,
                "internal": self.internal, "arguments": self.arguments}


@dataclass(slots=True, eq=False)
class QueueDecl:
    name: str
    durable: bool
    exclusive_owner: QueueOwner | None = None
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    topic: str = ""
    consumers: dict[ConsumerHandle, None] = field(default_factory=dict)  # in arrival order (single active consumer)
    had_consumer: bool = False
    expiry_timer: Any = None  # x-expires: deletes the queue once unused for that long
    redelivered_below: int = 0  # queue offsets below this may have been delivered by an earlier run
    delivered_mark: int = 0  # persisted: every offset delivered in this run is below it
    delivered_end: int = 0  # one past the highest offset delivered in this run
    # length limits (x-max-length, x-max-length-bytes, x-overflow), see AmqpServerFactory.admit
    max_length: int | None = None
    max_bytes: int | None = None
    overflow: str = "drop-head"
    ready_bytes: int = 0  # body bytes of the ready messages (kept only with x-max-length-bytes)
    pending: int = 0  # admitted messages not visible yet (counted against x-max-length by reject-publish)
    visible_end: int = 0
    max_priority: int = 0  # x-max-priority (0: not a priority queue)

    @property
    def single_active(self) -> bool:
        return bool(self.arguments.get("x-single-active-consumer"))

    @property
    def active_consumer(self) -> ConsumerHandle | None:
        """The consumer that gets messages under x-single-active-consumer: the oldest one."""
        return next(iter(self.consumers), None)

    def row(self) -> dict[str, Any]:
        return {"durable": self.durable, "exclusive": self.exclusive_owner is not None,
                "auto_delete": self.auto_delete, "arguments": self.arguments}

    @property
    def ref(self) -> QueueRef:
        return QueueRef(self.topic, 0)


@dataclass(frozen=True, slots=True)
class BindingDecl:
    source: str  # exchange
    destination: str  # queue or exchange name
    to_queue: bool
    routing_key: str
    arguments_json: str  # canonical JSON of the binding arguments (part of a binding's identity)
    durable: bool
    pattern: str = ""  # the core routing pattern, when the core routes this binding ("" = adapter-routed)

    @property
    def key(self) -> str:
        return json.dumps([self.source, self.destination, "q" if self.to_queue else "e", self.routing_key,
                           self.arguments_json])

    @property
    def arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments_json)

    def row(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "to_queue": self.to_queue,
                "routing_key": self.routing_key, "arguments": self.arguments_json, "durable": self.durable,
                "pattern": self.pattern}


def canonical_arguments(arguments: dict[str, Any] | None) -> str:
    return json.dumps(arguments or {}, sort_keys=True, default=str)


class Registry:
    """Every exchange, queue and binding of the (single, `/`) virtual host."""

    def __init__(self, system: CoreSession) -> None:
        self.system = system
        self._exchange_rows: AdapterStateStore = system.adapter_state(EXCHANGES_NAMESPACE)
        self._queue_rows: AdapterStateStore = system.adapter_state(QUEUES_NAMESPACE)
        self._binding_rows: AdapterStateStore = system.adapter_state(BINDINGS_NAMESPACE)
        self._delivered_rows: AdapterStateStore = system.adapter_state(DELIVERED_NAMESPACE)
        self.exchanges: dict[str, ExchangeDecl] = {}
        self.queues: dict[str, QueueDecl] = {}
        self.bindings: dict[str, BindingDecl] = {}
        self.exchange_of_topic: dict[str, str] = {}  # core topic -> declared exchange stored there
        self.queue_of_topic: dict[str, str] = {}  # core topic -> AMQP queue
        self.bounded: set[str] = set()  # queues with x-max-length (trimmed after publishes)
        # adapter-routed bindings by source exchange (headers exchanges, exchange-to-exchange)
        self._adapter_routed: dict[str, set[str]] = {}
        self._pattern_refs: dict[tuple[str, QueueRef], int] = {}  # one core binding may serve several AMQP ones
        # (topic, subject) -> exchange and routing key of a delivery as encoded short strings; cleared whenever an
        # exchange or queue comes or goes (the address depends on them)
        self.address_cache: dict[tuple[str, str], bytes] = {}
        for name, kind in DEFAULT_EXCHANGES.items():
            self._add_exchange(ExchangeDecl(name, kind))
        self._load()

    # ------------------------------------------------------------------ start-up
    def _load(self) -> None:
        for name, row in self._exchange_rows.items():
            if not row.get("durable"):
                self._exchange_rows.delete(name)
                continue
            self._add_exchange(ExchangeDecl(name, row["type"], True, bool(row.get("auto_delete")),
                                            bool(row.get("internal")), dict(row.get("arguments") or {})))
        for name, row in self._queue_rows.items():
            topic = queue_topic(name)
            if not row.get("durable") or row.get("exclusive"):
                self._queue_rows.delete(name)
                self._drop_topic(topic)
                continue
            decl = QueueDecl(name, True, None, bool(row.get("auto_delete")), dict(row.get("arguments") or {}),
                             topic)
            self._add_queue(decl)
            self._start_at_earliest(decl)
        for name, mark in self._delivered_rows.items():
            decl = self.queues.get(name)
            if decl is None or not isinstance(mark, int):
                self._delivered_rows.delete(name)
                continue
            try:
                _, end = self.system.queue_offsets(decl.ref)
            except TidegateError:
                end = mark
            # messages stored from now on were never delivered, whatever lead the mark of a crashed run had
            decl.redelivered_below = decl.delivered_mark = decl.delivered_end = min(mark, end)
        for key, row in self._binding_rows.items():
            binding = BindingDecl(row["source"], row["destination"], bool(row["to_queue"]), row["routing_key"],
                                  row["arguments"], bool(row.get("durable")), row.get("pattern", ""))
            alive = (binding.durable and binding.source in self.exchanges
                     and (binding.destination in self.queues if binding.to_queue
                          else binding.destination in self.exchanges))
            if not alive:
                self._binding_rows.delete(key)
                if binding.pattern and binding.to_queue:
                    self._core_unbind(binding.pattern, QueueRef(queue_topic(binding.destination), 0))
                continue
            self._add_binding(binding)
        for cfg in self.system.list_topics(include_internal=True):
            # transient queues of a run that crashed before writing their row (or were dropped above)
            if cfg.name.startswith("%AMQP%") and cfg.name not in self.queue_of_topic:
                self._drop_topic(cfg.name)

    def _drop_topic(self, topic: str) -> None:
        try:
            self.system.delete_topic(topic)
        except TidegateError:
            pass
        try:
            self.system.delete_group(topic)
        except TidegateError:
            pass

    def _start_at_earliest(self, decl: QueueDecl) -> None:
        """A queue keeps every message it was given: its group starts at the first stored offset, also for
        basic.get (which would otherwise start a group with no committed offset at the broker's default)."""
        try:
            low, _ = self.system.queue_offsets(decl.ref)
            self.system.commit_offset(decl.topic, decl.ref, low)
        except TidegateError as exc:
            log.warning("amqp queue %s: cannot set its start offset: %s", decl.name, exc)

    # ------------------------------------------------------------------ exchanges
    def delivery_address_bytes(self, message: Any) -> bytes:
        """`model.delivery_address` of `message` as the two short strings Basic.Deliver carries, cached."""
        key = (message.topic, message.subject)
        cache = self.address_cache
        encoded = cache.get(key)
        if encoded is None:
            exchange, routing_key = delivery_address(message, self.exchange_of_topic, self.queue_of_topic)
            encoded = short_string(exchange) + short_string(routing_key)
            if len(cache) >= ADDRESS_CACHE_SIZE:
                cache.clear()
            cache[key] = encoded
        return encoded

    def _add_exchange(self, decl: ExchangeDecl) -> None:
        self.address_cache.clear()
        decl.topic = exchange_topic(decl.name) if decl.name else ""
        self.exchanges[decl.name] = decl
        if decl.name and decl.name != "amq.topic":
            self.exchange_of_topic[decl.topic] = decl.name

    def declare_exchange(self, decl: ExchangeDecl) -> None:
        self._add_exchange(decl)
        self._exchange_rows.put(decl.name, decl.row())

    def delete_exchange(self, name: str) -> None:
        self.address_cache.clear()
        decl = self.exchanges.pop(name)
        if self.exchange_of_topic.get(decl.topic) == name:
            del self.exchange_of_topic[decl.topic]
        for binding in [b for b in self.bindings.values()
                        if b.source == name or (not b.to_queue and b.destination == name)]:
            self.remove_binding(binding)
        self._exchange_rows.delete(name)

    def has_bindings_from(self, exchange: str) -> bool:
        return any(b.source == exchange for b in self.bindings.values())

    # ------------------------------------------------------------------ queues
    def _add_queue(self, decl: QueueDecl) -> None:
        self.address_cache.clear()
        decl.topic = decl.topic or queue_topic(decl.name)
        self.queues[decl.name] = decl
        self.queue_of_topic[decl.topic] = decl.name
        arguments = decl.arguments
        decl.max_length = arguments.get("x-max-length")
        decl.max_bytes = arguments.get("x-max-length-bytes")
        decl.overflow = str(arguments.get("x-overflow", "drop-head"))
        decl.max_priority = int(arguments.get("x-max-priority") or 0)
        if decl.max_length is not None or decl.max_bytes is not None:
            self.bounded.add(decl.name)

    def declare_queue(self, decl: QueueDecl) -> None:
        decl.topic = queue_topic(decl.name)
        self.system.claim_private(decl.topic, 1)
        self._add_queue(decl)
        self._start_at_earliest(decl)
        self._queue_rows.put(decl.name, decl.row())

    def delete_queue(self, name: str) -> None:
        self.address_cache.clear()
        decl = self.queues.pop(name)
        self.queue_of_topic.pop(decl.topic, None)
        self.bounded.discard(name)
        if decl.expiry_timer is not None and decl.expiry_timer.active():
            decl.expiry_timer.cancel()
        for consumer in list(decl.consumers):
            consumer.cancelled_by_server()
        decl.consumers.clear()
        for binding in [b for b in self.bindings.values() if b.to_queue and b.destination == name]:
            self.remove_binding(binding)
        self._queue_rows.delete(name)
        if decl.delivered_mark:
            self._delivered_rows.delete(name)
        self._drop_topic(decl.topic)

    def delivered(self, decl: QueueDecl, offset: int) -> None:
        """A delivery of `offset` is about to go out and is at or past the persisted mark: move the mark ahead
        (written before the delivery is, so a crash never forgets that it may have been delivered)."""
        decl.delivered_mark = offset + 1 + DELIVERED_MARK_LEAD
        if decl.durable and decl.exclusive_owner is None:
            self._delivered_rows.put(decl.name, decl.delivered_mark)

    def save_delivered_marks(self) -> None:
        """Clean shutdown: the exact marks, so that only messages really handed out say redelivered."""
        for decl in self.queues.values():
            if decl.delivered_mark and decl.durable and decl.exclusive_owner is None:
                decl.delivered_mark = max(decl.redelivered_below, decl.delivered_end)
                self._delivered_rows.put(decl.name, decl.delivered_mark)

    # ------------------------------------------------------------------ bindings
    def make_binding(self, source: ExchangeDecl, destination: str, to_queue: bool, routing_key: str,
                     arguments: dict[str, Any] | None, durable: bool) -> BindingDecl:
        core_routed = to_queue and source.type in ("direct", "fanout", "topic") and source.name != ""
        pattern = binding_pattern(source.name, source.type, routing_key) if core_routed else ""
        return BindingDecl(source.name, destination, to_queue, routing_key, canonical_arguments(arguments),
                           durable, pattern)

    def add_binding(self, binding: BindingDecl, session: CoreSession) -> None:
        """Record `binding`; a core-routed one is bound through `session` (which authorizes Sub on the pattern)."""
        if binding.key in self.bindings:
            return
        if binding.pattern:
            ref = QueueRef(queue_topic(binding.destination), 0)
            session.bind(binding.pattern, ref)
        self._add_binding(binding)
        self._binding_rows.put(binding.key, binding.row())

    def _add_binding(self, binding: BindingDecl) -> None:
        self.bindings[binding.key] = binding
        if binding.pattern:
            ref = QueueRef(queue_topic(binding.destination), 0)
            self._pattern_refs[(binding.pattern, ref)] = self._pattern_refs.get((binding.pattern, ref), 0) + 1
        else:
            self._adapter_routed.setdefault(binding.source, set()).add(binding.key)

    def remove_binding(self, binding: BindingDecl) -> None:
        if self.bindings.pop(binding.key, None) is None:
            return
        self._binding_rows.delete(binding.key)
        if binding.pattern:
            ref = QueueRef(queue_topic(binding.destination), 0)
            left = self._pattern_refs.get((binding.pattern, ref), 1) - 1
            if left > 0:
                self._pattern_refs[(binding.pattern, ref)] = left
            else:
                self._pattern_refs.pop((binding.pattern, ref), None)
                self._core_unbind(binding.pattern, ref)
        else:
            keys = self._adapter_routed.get(binding.source)
            if keys is not None:
                keys.discard(binding.key)
                if not keys:
                    del self._adapter_routed[binding.source]
        source = self.exchanges.get(binding.source)
        if source is not None and source.auto_delete and not self.has_bindings_from(source.name):
            self.delete_exchange(source.name)  # RabbitMQ: an auto-delete exchange goes with its last binding

    def _core_unbind(self, pattern: str, ref: QueueRef) -> None:
        try:
            self.system.unbind(pattern, ref)
        except TidegateError:
            pass

    def has_adapter_routes(self, exchange: str) -> bool:
        return exchange in self._adapter_routed

    def extra_routes(self, exchange: ExchangeDecl, routing_key: str, headers: dict[str, Any] | None
                     ) -> tuple[list[QueueDecl], list[ExchangeDecl]]:
        """Adapter-routed destinations of a publish to `exchange`: queues bound to a headers exchange whose
        arguments match, and exchanges bound to it (exchange-to-exchange) whose binding matches."""
        queues: list[QueueDecl] = []
        exchanges: list[ExchangeDecl] = []
        for key in self._adapter_routed.get(exchange.name, ()):
            binding = self.bindings[key]
            if exchange.type == "headers":
                matched = headers_match(binding.arguments, headers)
            elif exchange.type == "fanout":
                matched = True
            elif exchange.type == "topic":
                matched = topic_match(binding.routing_key, routing_key)
            else:
                matched = binding.routing_key == routing_key
            if not matched:
                continue
            if binding.to_queue:
                queue = self.queues.get(binding.destination)
                if queue is not None:
                    queues.append(queue)
            else:
                target = self.exchanges.get(binding.destination)
                if target is not None:
                    exchanges.append(target)
        return queues, exchanges

    def bindings_of_queue(self, name: str) -> list[BindingDecl]:
        return [b for b in self.bindings.values() if b.to_queue and b.destination == name]
