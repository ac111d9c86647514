"""The AMQP 0-9-1 listener: `AmqpServerFactory(core, gate, clock, settings, *, metrics, listener)`.

The factory owns what every connection of the listener shares: the registry of exchanges, queues and bindings
(adapters/amqp/registry.py), the login rule that holds until the gate issue (user `guest`, password `guest`, from
loopback only, as RabbitMQ), and the housekeeping done as the broker itself (queue deletion, dead-lettering).
Connections are `AmqpConnection` (adapters/amqp/connection.py); channels `Channel` (adapters/amqp/channel.py).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, ClassVar

from pamqp import commands

from tidegate.adapters.amqp.codec import _marshal_properties
from tidegate.adapters.amqp.connection import AmqpConnection
from tidegate.adapters.amqp.model import PROP_RAW, delivery_address, properties_for_delivery, publish_address
from tidegate.adapters.amqp.registry import QueueDecl, Registry
from tidegate.adapters.base import AdapterFactory, ConnectionLimits
from tidegate.core.errors import TidegateError
from tidegate.core.interfaces import Core
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message
from tidegate.core.ratelimit import ClientLog
from tidegate.core.security.gate import Gate

log = logging.getLogger("tidegate.amqp")


@dataclass(slots=True, frozen=True)
class AmqpSettings:
    """What the listener needs of its configuration section (gateway/config.py AmqpListener has these fields)."""

    frame_max: int = 131072
    channel_max: int = 2047
    heartbeat: int = 60
    max_message_bytes: int = 16 * 1024 * 1024
    handshake_timeout_s: float = 10.0


class AmqpServerFactory(AdapterFactory):
    protocol = AmqpConnection
    protocol_label: ClassVar[str] = "amqp"

    def __init__(self, core: Core, gate: Gate, clock: Any, settings: Any = None, *,
                 metrics: CoreMetrics | None = None, listener: str = "",
                 limits: ConnectionLimits | None = None) -> None:
        super().__init__(core, gate, clock, _complete(settings), metrics=metrics, listener=listener,
                         limits=limits)
        self.registry = Registry(self.system)
        self._trim_scheduled = False
        self._to_trim: set[str] = set()
        self.rejected: list[Message] | None = None  # messages admit() refused while a channel publishes
        # deliveries AMQP cannot carry (a routing key over 255 bytes from a long MQTT/native subject) are logged
        # at most once per interval
        self.client_log = ClientLog(log, clock.seconds)
        for queue in self.registry.queues.values():
            self.queue_used(queue)  # x-expires counts from the start of this run
            self.watch_limits(queue)
        # Transient messages stored before this moment belong to an earlier run: not delivered (see channel._gone).
        self.started_ms = core.now_ms()
        try:
            self.version = package_version("tidegate")
        except PackageNotFoundError:
            self.version = "0"

    def stop(self) -> None:
        """Broker shutdown: cancel the x-expires timers (the queues' countdowns restart with the next run)."""
        super().stop()  # stops following the resource alarms
        self.registry.save_delivered_marks()
        for queue in self.registry.queues.values():
            timer = queue.expiry_timer
            if timer is not None and timer.active():
                timer.cancel()
            queue.expiry_timer = None

    def ready_count(self, queue: QueueDecl) -> int:
        """Messages ready in `queue` (stored, not in flight); an estimate when acks came out of order."""
        try:
            info = self.system.group_info(queue.topic)
        except TidegateError:
            info = None
        if info is not None and info.progress:
            return max(0, info.lag - info.inflight)
        try:
            low, high = self.system.queue_offsets(queue.ref)
        except TidegateError:
            return 0
        return max(0, high - low)

    def queue_used(self, queue: QueueDecl) -> None:
        """x-expires: the queue was declared, consumed from or read; it expires that long after its last use once
        it has no consumers (RabbitMQ's queue TTL)."""
        expires = queue.arguments.get("x-expires")
        if not expires:
            return
        timer = queue.expiry_timer
        if timer is not None and timer.active():
            timer.cancel()
        queue.expiry_timer = None
        if not queue.consumers:
            queue.expiry_timer = self.clock.callLater(expires / 1000.0, self._expire, queue)

    def _expire(self, queue: QueueDecl) -> None:
        queue.expiry_timer = None
        if not queue.consumers and self.registry.queues.get(queue.name) is queue:
            log.info("amqp queue %s expired (x-expires %s ms)", queue.name, queue.arguments.get("x-expires"))
            self.delete_queue(queue)

    # ------------------------------------------------------------------ length limits
    def watch_limits(self, queue: QueueDecl) -> None:
        """x-max-length / x-max-length-bytes: hook the queue into the core (Broker.limit_queue), so the limits
        hold for messages of every protocol. drop-head trims the oldest once new messages are visible;
        reject-publish(-dlx) refuses a message before it is appended (`admit`)."""
        if queue.max_length is None and queue.max_bytes is None:
            return
        limit_queue = getattr(self.core, "limit_queue", None)
        if limit_queue is None:
            return
        try:
            low, end = self.system.queue_offsets(queue.ref)
        except TidegateError:
            low = end = 0
        queue.visible_end, queue.pending = end, 0
        if queue.max_bytes is not None:
            queue.ready_bytes = self._ready_bytes(queue, low, end)
        needs_admission = queue.overflow != "drop-head" or queue.max_bytes is not None
        limit_queue(queue.ref, (lambda message: self.admit(queue, message)) if needs_admission else None,
                    lambda ref, visible_end: self._grown(queue, visible_end))
        if queue.overflow == "drop-head":
            self._schedule_trim(queue)  # a lowered limit after a restart, messages from an earlier run

    def unwatch_limits(self, queue: QueueDecl) -> None:
        limit_queue = getattr(self.core, "limit_queue", None)
        if limit_queue is not None and (queue.max_length is not None or queue.max_bytes is not None):
            limit_queue(queue.ref, None, None)

    def _ready_bytes(self, queue: QueueDecl, low: int, end: int) -> int:
        """Body bytes of the messages ready in `queue` (start-up and declaration: read once from the log)."""
        try:
            committed = self.core.committed_offsets(queue.topic).get(queue.ref, low)
        except (TidegateError, AttributeError):
            committed = low
        total, offset = 0, max(low, committed)
        while offset < end:
            try:
                result = self.core.pull(queue.ref, offset, 1024)
            except TidegateError:
                break
            if not result.messages:
                break
            total += sum(len(d.message.body) for d in result.messages)
            offset = result.next_offset
        return total

    def is_full(self, queue: QueueDecl, size: int) -> bool:
        """Would a message of `size` body bytes overflow `queue` (counting what is stored but not visible yet)?"""
        max_length, max_bytes = queue.max_length, queue.max_bytes
        if max_length is not None and self.ready_count(queue) + queue.pending >= max_length:
            return True
        return max_bytes is not None and queue.ready_bytes + size > max_bytes

    def admit(self, queue: QueueDecl, message: Message) -> bool:
        """May `message` be appended to `queue`? reject-publish(-dlx) says no when the queue is full (the AMQP
        publisher gets basic.nack with confirms, others lose it silently, as on RabbitMQ; -dlx dead-letters it);
        drop-head always says yes (the oldest go later). Counts what it admits."""
        size = len(message.body)
        if queue.overflow != "drop-head" and self.is_full(queue, size):
            if self.rejected is not None:
                self.rejected.append(message)
            if queue.overflow == "reject-publish-dlx":
                # not from inside the core's publish that asked: dead-lettering publishes
                self.clock.callLater(0, self.dead_letter, queue, message, "maxlen")
            return False
        queue.pending += 1
        if queue.max_bytes is not None:
            queue.ready_bytes += size
        return True

    def _grown(self, queue: QueueDecl, visible_end: int) -> None:
        queue.pending = max(0, queue.pending - (visible_end - queue.visible_end))
        queue.visible_end = visible_end
        if queue.overflow == "drop-head":
            self._schedule_trim(queue)

    def _schedule_trim(self, queue: QueueDecl) -> None:
        self._to_trim.add(queue.name)
        if not self._trim_scheduled:
            self._trim_scheduled = True
            self.clock.callLater(0, self._trim_all)

    def _trim_all(self) -> None:
        self._trim_scheduled = False
        names, self._to_trim = self._to_trim, set()
        for name in sorted(names):
            queue = self.registry.queues.get(name)
            if queue is not None:
                self.trim(queue)

    def trim(self, queue: QueueDecl) -> None:
        """x-overflow drop-head (the default): the oldest ready messages are dropped (dead-lettered with reason
        maxlen when the queue has a dead-letter exchange) until the queue fits x-max-length and
        x-max-length-bytes."""
        max_length, max_bytes = queue.max_length, queue.max_bytes
        if queue.overflow != "drop-head":
            return
        while ((max_length is not None and self.ready_count(queue) > max_length)
               or (max_bytes is not None and queue.ready_bytes > max_bytes)):
            try:
                taken = self.system.get(queue.topic, queue.topic, auto_ack=False, invisible_ms=0)
            except TidegateError:
                return
            if taken is None:
                queue.ready_bytes = 0
                return
            self.taken(queue, taken.message)
            self.dead_letter(queue, taken.message, "maxlen")
            self.system.ack(queue.topic, taken.receipt)

    def taken(self, queue: QueueDecl, message: Message) -> None:
        """A ready message left the queue (delivered, got, dropped): x-max-length-bytes counts it out."""
        if queue.max_bytes is not None:
            queue.ready_bytes = max(0, queue.ready_bytes - len(message.body))

    def returned(self, queue: QueueDecl, message: Message) -> None:
        """An unacknowledged message went back to the queue (requeue, recover, its channel closed)."""
        if queue.max_bytes is not None:
            queue.ready_bytes += len(message.body)

    def delete_queue(self, queue: QueueDecl) -> None:
        """Delete a queue: its consumers are cancelled (basic.cancel to clients that asked for it), its bindings
        and its core topic and group go."""
        if self.registry.queues.get(queue.name) is not queue:
            return
        self.unwatch_limits(queue)
        self.registry.delete_queue(queue.name)

    def dead_letter(self, queue: QueueDecl, message: Message, reason: str) -> None:
        """A message rejected without requeue: republished to the queue's x-dead-letter-exchange with an x-death
        header (RabbitMQ's format, count 1), else dropped."""
        exchange_name = queue.arguments.get("x-dead-letter-exchange")
        if exchange_name is None:
            return
        exchange = self.registry.exchanges.get(str(exchange_name))
        if exchange is None:
            return
        now = self.core.now_ms()
        original_exchange, original_key = delivery_address(message, self.registry.exchange_of_topic,
                                                           self.registry.queue_of_topic)
        key = str(queue.arguments.get("x-dead-letter-routing-key", original_key))
        properties = properties_for_delivery(message, now)
        if isinstance(properties, bytes):
            properties = _unmarshal_properties(properties)
        headers = dict(properties.headers or {})
        headers["x-death"] = [{"count": 1, "reason": reason, "queue": queue.name, "exchange": original_exchange,
                               "routing-keys": [original_key]}]
        headers["x-first-death-reason"] = reason
        headers["x-first-death-queue"] = queue.name
        headers["x-first-death-exchange"] = original_exchange
        properties.headers = headers
        raw = _marshal_properties(properties)
        if exchange.name == "":
            target = self.registry.queues.get(key)
            if target is None or not self.admit(target, message):
                return
            topic, subject = target.topic, ""
        else:
            topic, subject = publish_address(exchange.name, key)
        props = {k: v for k, v in message.properties.items() if k != PROP_RAW}
        props[PROP_RAW] = base64.b64encode(raw).decode("ascii")
        copy = Message(topic=topic, subject=subject, body=message.body, properties=props,
                       expires_at=message.expires_at, flags=message.flags)
        try:
            self.system.publish([copy])
        except TidegateError as exc:
            log.warning("amqp: dead-lettering from queue %s failed: %s", queue.name, exc)


def _unmarshal_properties(raw: bytes) -> commands.Basic.Properties:
    properties = commands.Basic.Properties()
    properties.unmarshal(int.from_bytes(raw[:2], "big"), raw[2:])
    return properties


def _complete(settings: Any) -> Any:
    """Settings with every field the adapter reads (a config section may predate some)."""
    if settings is None:
        return AmqpSettings()
    if isinstance(settings, AmqpSettings):
        return settings
    defaults = AmqpSettings()
    values = {name: getattr(settings, name, getattr(defaults, name)) for name in AmqpSettings.__slots__}
    return AmqpSettings(**values)
