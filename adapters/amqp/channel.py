"""One AMQP channel: exchanges, queues, bindings, publishing, consumers, acknowledgements, confirms, transactions.

Every client action goes through the connection's `CoreSession`, which asks the gate before the core acts; the
registry (adapters/amqp/registry.py) keeps the declarations. A consumer is one core subscription on the queue's
private topic in MESSAGE ack mode with no invisibility timeout: unacknowledged messages come back (redelivered) on
nack/reject with requeue, on basic.recover, and when the consumer's channel or connection closes.

Credit: a consumer's subscription holds credit = its prefetch minus what it has unacknowledged (prefetch 0 means a
server-side cap, `UNLIMITED_PREFETCH`); a channel-wide prefetch (basic.qos global) bounds the sum over the channel's
consumers. Credit is returned on ack, never while the transport is paused or the channel is flowed off, and is taken
back when that happens, so delivery stops.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pamqp import commands

from tidegate.adapters.amqp.errors import (
    VHOST,
    ChannelError,
    ConnectionError_,
    inequivalent,
    locked,
    not_found,
)
from tidegate.adapters.amqp.fastpath import FastPathError, short_string
from tidegate.adapters.amqp.model import (
    EXCHANGE_TYPES,
    delivery_address,
    exchange_topic,
    invalid_expiration,
    message_from_publish,
    message_priority,
    properties_for_delivery,
    publish_address,
    queue_topic,
)
from tidegate.adapters.amqp.registry import (
    ExchangeDecl,
    QueueDecl,
    canonical_arguments,
)
from tidegate.adapters.amqp.reply_codes import AmqpEncodeError, ReplyCode
from tidegate.core.api import Delivered, SendResult
from tidegate.core.errors import InvalidReceipt, MessageTooLarge, NotAuthorized, TidegateError
from tidegate.core.interfaces import Subscription
from tidegate.core.model import Message, MessageFlag
from tidegate.core.security.gate import Action, Resource

if TYPE_CHECKING:
    from tidegate.adapters.amqp.connection import AmqpConnection

log = logging.getLogger("tidegate.amqp")

UNLIMITED_PREFETCH = 1000  # in-flight limit of a consumer without a prefetch limit
# Credit is handed out in chunks of about this many bytes (by the consumer's average message size, at most
# MAX_CREDIT_CHUNK messages): one core pump writes at most one chunk, so a client that stops reading makes the
# transport pause (and delivery stop) after about one chunk beyond the socket buffers, whatever its prefetch.
CREDIT_CHUNK_BYTES = 1024 * 1024
MAX_CREDIT_CHUNK = 256
# AMQP queues redeliver for ever (RabbitMQ classic queues have no delivery limit); the core's dead-letter limit is
# set out of reach.
MAX_ATTEMPTS = 2**31 - 1
# x-max-priority: a consumer of a priority queue takes up to this many messages beyond its prefetch from the core
# and holds them, sending the highest priority first (a reorder window over the log-ordered queue)
PRIORITY_WINDOW = 64
MAX_ALTERNATE_HOPS = 8  # exchange-to-exchange and alternate-exchange routing depth (a cycle stops here)
_TRANSIENT = int(MessageFlag.TRANSIENT)  # a plain int: IntFlag's & costs an enum call per message


@dataclass(slots=True)
class _PendingPublish:
    exchange: ExchangeDecl
    method: commands.Basic.Publish
    properties: commands.Basic.Properties
    raw: bytes
    body: bytes
    messages: list[Message]
    sure: int  # queues reached for sure (default exchange, adapter-routed copies)
    seq: int  # publisher-confirm sequence number (0 without confirms)
    rejected: bool = False  # a queue with x-overflow reject-publish refused it: basic.nack with confirms


@dataclass(slots=True)
class Unacked:
    consumer: Consumer | None  # None: taken by basic.get
    queue: QueueDecl
    receipt: str
    message: Message


class Consumer:
    """A basic.consume: the DeliverySink of its core subscription."""

    __slots__ = ("channel", "tag", "queue", "no_ack", "exclusive", "prefetch", "sub", "unacked", "cancelled",
                 "average_size", "held", "held_order", "tag_bytes")

    def __init__(self, channel: Channel, tag: str, queue: QueueDecl, no_ack: bool, exclusive: bool,
                 prefetch: int) -> None:
        self.channel = channel
        self.tag = tag
        self.queue = queue
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.prefetch = prefetch
        self.sub: Subscription | None = None
        self.unacked = 0
        self.cancelled = False
        # bytes per delivery, a running estimate for sizing credit chunks; starts high so that the first chunk
        # of large messages is small too (it halves towards the real size with every delivery)
        self.average_size = 64 * 1024
        # x-max-priority: deliveries taken from the core but not sent yet, a heap by (-priority, arrival)
        self.held: list[tuple[int, int, Delivered]] | None = [] if queue.max_priority else None
        self.held_order = itertools.count()
        self.tag_bytes = short_string(tag)  # encoded once for every Basic.Deliver

    @property
    def chunk(self) -> int:
        return max(1, min(MAX_CREDIT_CHUNK, CREDIT_CHUNK_BYTES // max(1, self.average_size)))

    @property
    def limit(self) -> int:
        if self.no_ack or not self.prefetch:
            return UNLIMITED_PREFETCH
        return min(self.prefetch, UNLIMITED_PREFETCH)

    def deliver(self, deliveries: list[Delivered]) -> None:
        self.channel.deliver(self, deliveries)

    def assignment_changed(self, queues: list[Any]) -> None:
        pass

    def offset_moved(self, queue: Any, old: int, new: int) -> None:
        pass

    def cancelled_by_server(self) -> None:
        self.channel.consumer_cancelled_by_server(self)


def class_and_method_ids(method: Any) -> tuple[int, int]:
    """The class and method ids of a pamqp method (0, 0 for None), as channel.close and connection.close name it."""
    index = getattr(method, "index", 0) or 0
    return index >> 16, index & 0xFFFF


class Channel:
    def __init__(self, connection: AmqpConnection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.closing = False  # we sent channel.close and wait for close-ok
        self.consumers: dict[str, Consumer] = {}
        self.unacked: dict[int, Unacked] = {}
        self.next_tag = 1
        self.prefetch_count = 0  # for consumers created from now on (basic.qos global=false)
        self.channel_prefetch = 0  # shared by the channel's consumers (basic.qos global=true)
        self.flow_active = True
        self.held: list[Any] | None = None  # events waiting behind a basic.get that waits for an fsync
        self.last_queue = ""
        self.confirm = False
        self.publish_seq = 0
        self._confirm_pending_seq = 0  # last publish seq of this read, to be confirmed once durable
        self._confirm_pending_end = 0
        self._confirm_nacks: list[int] = []  # sequence numbers of this read refused by a full queue
        self._confirmed_through = 0  # highest sequence number acked or nacked
        self._rejected_now = False  # set by _messages_for when a full reject-publish queue refused the message
        self.tx = False
        self._tx_publishes: list[tuple[commands.Basic.Publish, commands.Basic.Properties, bytes, bytes]] = []
        self._tx_acks: list[tuple[str, Any]] = []
        self._batch: list[_PendingPublish] = []  # this read's publishes, stored together by flush_publishes
        self._batch_now = 0
        self._handlers: dict[type, Callable[[Any], None]] = {
            commands.Exchange.Declare: self.exchange_declare,
            commands.Exchange.Delete: self.exchange_delete,
            commands.Exchange.Bind: self.exchange_bind,
            commands.Exchange.Unbind: self.exchange_unbind,
            commands.Queue.Declare: self.queue_declare,
            commands.Queue.Bind: self.queue_bind,
            commands.Queue.Unbind: self.queue_unbind,
            commands.Queue.Purge: self.queue_purge,
            commands.Queue.Delete: self.queue_delete,
            commands.Basic.Qos: self.basic_qos,
            commands.Basic.Consume: self.basic_consume,
            commands.Basic.Cancel: self.basic_cancel,
            commands.Basic.Get: self.basic_get,
            commands.Basic.Ack: self.basic_ack,
            commands.Basic.Nack: self.basic_nack,
            commands.Basic.Reject: self.basic_reject,
            commands.Basic.Recover: self.basic_recover,
            commands.Basic.RecoverAsync: self.basic_recover,
            commands.Confirm.Select: self.confirm_select,
            commands.Tx.Select: self.tx_select,
            commands.Tx.Commit: self.tx_commit,
            commands.Tx.Rollback: self.tx_rollback,
            commands.Channel.Flow: self.channel_flow,
        }

    # ------------------------------------------------------------------ plumbing
    @property
    def session(self) -> Any:
        return self.connection.session

    @property
    def registry(self) -> Any:
        return self.connection.factory.registry

    def send(self, method: Any) -> None:
        self.connection.write(self.connection.codec.send_method(self.number, method))

    def handle_method(self, method: Any) -> None:
        handler = self._handlers.get(type(method))
        if handler is None:
            raise ConnectionError_(ReplyCode.COMMAND_INVALID, f"method {method.name} is not allowed here")
        handler(method)

    def _now_ms(self) -> int:
        return self.session.now_ms()

    def _queue(self, name: str) -> QueueDecl:
        if not name:
            name = self.last_queue
            if not name:
                raise ChannelError(ReplyCode.NOT_FOUND, f"no previously declared queue in vhost '{VHOST}'")
        queue = self.registry.queues.get(name)
        if queue is None:
            raise not_found("queue", name)
        owner = queue.exclusive_owner
        if owner is not None and owner is not self.connection:
            raise locked(name)
        self.session.own(queue.topic)
        return queue

    def _exchange(self, name: str) -> ExchangeDecl:
        exchange = self.registry.exchanges.get(name)
        if exchange is None:
            raise not_found("exchange", name)
        return exchange

    def _authorize(self, action: Action, resource: Resource) -> None:
        try:
            self.session.authorize(action, resource)
        except NotAuthorized as exc:
            raise ChannelError(ReplyCode.ACCESS_REFUSED, str(exc)) from None

    # ------------------------------------------------------------------ exchanges
    def exchange_declare(self, m: commands.Exchange.Declare) -> None:
        name = m.exchange
        if name == "":
            raise ChannelError(ReplyCode.ACCESS_REFUSED, "operation not permitted on the default exchange")
        existing = self.registry.exchanges.get(name)
        if m.passive:
            if existing is None:
                raise not_found("exchange", name)
        else:
            if m.exchange_type not in EXCHANGE_TYPES:
                raise ConnectionError_(ReplyCode.COMMAND_INVALID, f"unknown exchange type '{m.exchange_type}'")
            arguments = dict(m.arguments or {})
            if existing is None:
                if name.startswith("amq."):
                    raise ChannelError(ReplyCode.ACCESS_REFUSED,
                                       f"exchange name '{name}' contains reserved prefix 'amq.*'")
                self._authorize(Action.CREATE, Resource.topic(exchange_topic(name)))
                self.registry.declare_exchange(ExchangeDecl(name, m.exchange_type, m.durable, m.auto_delete,
                                                            m.internal, _jsonable(arguments)))
            else:
                for arg, received, current in (("type", m.exchange_type, existing.type),
                                               ("durable", m.durable, existing.durable),
                                               ("auto_delete", m.auto_delete, existing.auto_delete),
                                               ("internal", m.internal, existing.internal)):
                    if received != current:
                        raise inequivalent(arg, "exchange", name, received, current)
                received_ae = arguments.get("alternate-exchange")
                current_ae = existing.arguments.get("alternate-exchange")
                if received_ae != current_ae:
                    raise inequivalent("alternate-exchange", "exchange", name, received_ae, current_ae)
        if not m.nowait:
            self.send(commands.Exchange.DeclareOk())

    def exchange_delete(self, m: commands.Exchange.Delete) -> None:
        name = m.exchange
        if name == "" or name.startswith("amq."):
            raise ChannelError(ReplyCode.ACCESS_REFUSED, f"operation not permitted on exchange '{name}'")
        if name in self.registry.exchanges:
            self._authorize(Action.DELETE, Resource.topic(exchange_topic(name)))
            if m.if_unused and self.registry.has_bindings_from(name):
                raise ChannelError(ReplyCode.PRECONDITION_FAILED, f"exchange '{name}' in vhost '{VHOST}' in use")
            self.registry.delete_exchange(name)
        if not m.nowait:
            self.send(commands.Exchange.DeleteOk())

    def exchange_bind(self, m: commands.Exchange.Bind) -> None:
        source, destination = self._exchange(m.source), self._exchange(m.destination)
        if source.name == "" or destination.name == "":
            raise ChannelError(ReplyCode.ACCESS_REFUSED, "operation not permitted on the default exchange")
        self._authorize(Action.SUB, Resource.topic_filter((source.topic or source.name) + "/#"))
        binding = self.registry.make_binding(source, destination.name, False, m.routing_key, m.arguments,
                                             source.durable and destination.durable)
        self.registry.add_binding(binding, self.session)
        if not m.nowait:
            self.send(commands.Exchange.BindOk())

    def exchange_unbind(self, m: commands.Exchange.Unbind) -> None:
        source = self.registry.exchanges.get(m.source)
        if source is not None and m.destination in self.registry.exchanges:
            binding = self.registry.make_binding(source, m.destination, False, m.routing_key, m.arguments, True)
            existing = self.registry.bindings.get(binding.key)
            if existing is not None:
                self.registry.remove_binding(existing)
        if not m.nowait:
            self.send(commands.Exchange.UnbindOk())

    # ------------------------------------------------------------------ queues
    def queue_declare(self, m: commands.Queue.Declare) -> None:
        name = m.queue
        registry = self.registry
        if m.passive:
            queue = self._queue(name)
        else:
            if not name:
                name = "amq.gen-" + secrets.token_urlsafe(16)
            elif name.startswith("amq.") and name not in registry.queues:
                raise ChannelError(ReplyCode.ACCESS_REFUSED, f"queue name '{name}' contains reserved prefix 'amq.*'")
            arguments = _jsonable(dict(m.arguments or {}))
            _check_queue_arguments(arguments)
            queue = registry.queues.get(name)
            if queue is None:
                self._authorize(Action.CREATE, Resource.topic(queue_topic(name)))
                self.session.admit_new_topic(queue_topic(name))  # max_topics_created_per_user: 406 when over
                queue = QueueDecl(name, bool(m.durable), self.connection if m.exclusive else None,
                                  bool(m.auto_delete), arguments)
                registry.declare_queue(queue)
                self.connection.factory.watch_limits(queue)
                if m.exclusive:
                    self.connection.exclusive_queues.add(name)
            else:
                owner = queue.exclusive_owner
                if owner is not None and owner is not self.connection:
                    raise locked(name)
                for arg, received, current in (("durable", bool(m.durable), queue.durable),
                                               ("exclusive", bool(m.exclusive), owner is not None),
                                               ("auto_delete", bool(m.auto_delete), queue.auto_delete)):
                    if received != current:
                        raise inequivalent(arg, "queue", name, received, current)
                if canonical_arguments(arguments) != canonical_arguments(queue.arguments):
                    for key in sorted(set(arguments) | set(queue.arguments)):
                        if arguments.get(key) != queue.arguments.get(key):
                            raise inequivalent(key, "queue", name, arguments.get(key), queue.arguments.get(key))
            self.session.own(queue.topic)
        self.last_queue = queue.name
        self.connection.factory.queue_used(queue)
        if not m.nowait:
            self.send(commands.Queue.DeclareOk(queue.name, self.connection.factory.ready_count(queue),
                                               len(queue.consumers)))

    def queue_bind(self, m: commands.Queue.Bind) -> None:
        queue = self._queue(m.queue)
        exchange = self._exchange(m.exchange)
        if exchange.name == "":
            raise ChannelError(ReplyCode.ACCESS_REFUSED, "operation not permitted on the default exchange")
        routing_key = m.routing_key if (m.routing_key or m.queue) else queue.name
        binding = self.registry.make_binding(exchange, queue.name, True, routing_key, m.arguments,
                                             queue.durable and exchange.durable)
        if not binding.pattern:
            self._authorize(Action.SUB, Resource.topic_filter(exchange.topic + "/#"))
        try:
            self.registry.add_binding(binding, self.session)
        except NotAuthorized as exc:
            raise ChannelError(ReplyCode.ACCESS_REFUSED, str(exc)) from None
        if not m.nowait:
            self.send(commands.Queue.BindOk())

    def queue_unbind(self, m: commands.Queue.Unbind) -> None:
        queue = self._queue(m.queue)
        exchange = self._exchange(m.exchange)
        binding = self.registry.make_binding(exchange, queue.name, True, m.routing_key, m.arguments, True)
        existing = self.registry.bindings.get(binding.key)
        if existing is not None:
            self.registry.remove_binding(existing)
        self.send(commands.Queue.UnbindOk())

    def queue_purge(self, m: commands.Queue.Purge) -> None:
        queue = self._queue(m.queue)
        self._authorize(Action.DELETE, Resource.topic(queue.topic))
        purged = 0
        while self.session.get(queue.topic, queue.topic, auto_ack=True, invisible_ms=0) is not None:
            purged += 1
        queue.ready_bytes = 0
        if not m.nowait:
            self.send(commands.Queue.PurgeOk(purged))

    def queue_delete(self, m: commands.Queue.Delete) -> None:
        name = m.queue or self.last_queue
        count = 0
        if name in self.registry.queues:
            queue = self._queue(name)
            self._authorize(Action.DELETE, Resource.topic(queue.topic))
            if m.if_unused and queue.consumers:
                raise ChannelError(ReplyCode.PRECONDITION_FAILED, f"queue '{name}' in vhost '{VHOST}' in use")
            count = self.connection.factory.ready_count(queue)
            if m.if_empty and count:
                raise ChannelError(ReplyCode.PRECONDITION_FAILED, f"queue '{name}' in vhost '{VHOST}' is not empty")
            self.connection.factory.delete_queue(queue)
        if not m.nowait:
            self.send(commands.Queue.DeleteOk(count))

    # ------------------------------------------------------------------ publishing
    def basic_publish(self, m: commands.Basic.Publish, properties: commands.Basic.Properties, raw: bytes,
                      body: bytes) -> None:
        """Check and route a publish now; store it with the rest of this read's publishes (`flush_publishes`)."""
        exchange = self._exchange(m.exchange)
        if exchange.internal:
            raise ChannelError(ReplyCode.ACCESS_REFUSED,
                               f"cannot publish to internal exchange '{exchange.name}' in vhost '{VHOST}'")
        problem = invalid_expiration(properties)
        if problem is not None:
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, problem.split(" - ", 1)[1])
        if self.confirm:
            self.publish_seq += 1
        if self.tx:
            self._tx_publishes.append((m, properties, raw, body))
            return
        self._rejected_now = False
        if not self._batch:
            self.connection.publish_batches.append(self)
            self._batch_now = self._now_ms()  # one clock reading for the publishes of one read
        messages, sure = self._messages_for(exchange, m.routing_key, properties, raw, body, self._batch_now)
        self._batch.append(_PendingPublish(exchange, m, properties, raw, body, messages, sure, self.publish_seq,
                                           self._rejected_now))

    def flush_publishes(self) -> None:
        """Store this read's publishes in one core call (one append batch, one write), then answer each: returns,
        alternate exchanges, confirms. If the core refuses the batch, they are stored one by one so that those
        before the faulty one are kept (as RabbitMQ would) and the channel closes at the faulty one."""
        batch, self._batch = self._batch, []
        if not batch or self.closing:
            return
        messages = [message for p in batch for message in p.messages]
        factory = self.connection.factory
        factory.rejected = rejected = []  # filled by admit() while the core appends to full queues
        try:
            results = self.session.publish(messages) if messages else []
        except TidegateError:
            for p in batch:
                self._finish(p, self._store(p.messages))
            return
        finally:
            factory.rejected = None
        refused = {id(message) for message in rejected} if rejected else None
        position = 0
        for p in batch:
            count = len(p.messages)
            if refused is not None and any(id(message) in refused for message in p.messages):
                p.rejected = True
            self._finish(p, results[position:position + count])
            position += count

    def _publish(self, exchange: ExchangeDecl, m: commands.Basic.Publish, properties: commands.Basic.Properties,
                 raw: bytes, body: bytes) -> int:
        """Route and store one publish at once (transactions); returns the commit-log end it waits for."""
        messages, sure = self._messages_for(exchange, m.routing_key, properties, raw, body, self._now_ms())
        pending = _PendingPublish(exchange, m, properties, raw, body, messages, sure, self.publish_seq)
        return self._finish(pending, self._store(messages))

    def _finish(self, p: _PendingPublish, results: list[SendResult]) -> int:
        if len(results) == 1:  # the common case: one message, routed by the core
            result = results[0]
            end, routed = result.commit_end, p.sure + result.bound
        else:
            end = max((r.commit_end for r in results), default=0)
            routed = p.sure + sum(r.bound for r in results)
        current, hops = p.exchange, 0
        while not routed and hops < MAX_ALTERNATE_HOPS:
            alternate = current.arguments.get("alternate-exchange")
            following = self.registry.exchanges.get(str(alternate)) if alternate else None
            if following is None:
                break
            current, hops = following, hops + 1
            messages, sure = self._messages_for(current, p.method.routing_key, p.properties, p.raw, p.body,
                                                self._now_ms())
            results = self._store(messages)
            end = max(end, *(r.commit_end for r in results)) if results else end
            routed = sure + sum(r.bound for r in results)
        if end > self.connection.last_publish_end:
            self.connection.last_publish_end = end
        m = p.method
        if not routed and m.mandatory:
            self.connection.write(self.connection.codec.send_content(
                self.number, commands.Basic.Return(ReplyCode.NO_ROUTE, "NO_ROUTE", m.exchange, m.routing_key),
                p.raw, p.body))
        if self.confirm:
            self._confirm_pending_seq = p.seq
            self._confirm_pending_end = max(self._confirm_pending_end, end)
            if p.rejected:
                self._confirm_nacks.append(p.seq)
            self.connection.confirms_waiting.add(self)
        return end

    def _messages_for(self, exchange: ExchangeDecl, key: str, properties: commands.Basic.Properties, raw: bytes,
                      body: bytes, now: int) -> tuple[list[Message], int]:
        """The core messages one publish becomes, and how many queues are reached for sure (default exchange and
        adapter-routed copies; core bindings are counted from the send results)."""
        registry = self.registry
        if exchange.name == "":
            queue = registry.queues.get(key)
            if queue is None:
                return [], 0
            self.session.own(queue.topic)
            message = message_from_publish(queue.topic, "", properties, raw, body, now)
            if queue.name in registry.bounded and not self.connection.factory.admit(queue, message):
                self._rejected_now = True
                return [], 1  # routed, then refused: basic.nack, not basic.return
            return [message], 1
        topic, subject = publish_address(exchange.name, key, exchange.topic)
        messages = [message_from_publish(topic, subject, properties, raw, body, now)]
        sure = 0
        if registry.has_adapter_routes(exchange.name):
            seen: set[str] = {exchange.name}
            pending = [exchange]
            while pending:
                source = pending.pop()
                queues, exchanges = registry.extra_routes(source, key, properties.headers)
                for queue in queues:
                    self.session.own(queue.topic)
                    copy = message_from_publish(queue.topic, "", properties, raw, body, now)
                    sure += 1
                    if queue.name in registry.bounded and not self.connection.factory.admit(queue, copy):
                        self._rejected_now = True
                        continue
                    messages.append(copy)
                for target in exchanges:
                    if target.name in seen or len(seen) > MAX_ALTERNATE_HOPS:
                        continue
                    seen.add(target.name)
                    if target.type != "headers":
                        t_topic, t_subject = publish_address(target.name, key)
                        messages.append(message_from_publish(t_topic, t_subject, properties, raw, body, now))
                    if registry.has_adapter_routes(target.name):
                        pending.append(target)
        return messages, sure

    def _store(self, messages: list[Message]) -> list[SendResult]:
        if not messages:
            return []
        try:
            return self.session.publish(messages)
        except NotAuthorized as exc:
            raise ChannelError(ReplyCode.ACCESS_REFUSED, str(exc)) from None
        except MessageTooLarge as exc:
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, str(exc)) from None
        except TidegateError as exc:
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, str(exc)) from None

    def register_confirms(self) -> None:
        """End of a read: confirm this read's publishes once everything they wrote is on disk (one callback per
        channel per read, acknowledging them all with `multiple`)."""
        seq, end = self._confirm_pending_seq, self._confirm_pending_end
        if not seq:
            return
        nacks, self._confirm_nacks = self._confirm_nacks, []
        self._confirm_pending_seq, self._confirm_pending_end = 0, 0
        self.session.when_durable(end, lambda: self._confirm_through(seq, nacks))

    def _confirm_through(self, seq: int, nacks: list[int]) -> None:
        if self.closing or self.number not in self.connection.channels or not self.connection.connected_:
            return
        # acks with `multiple` never cover a nacked sequence number (RabbitMQ's order: ack up to it, nack it)
        for nacked in nacks:
            if nacked - 1 > self._confirmed_through:
                self.send(commands.Basic.Ack(delivery_tag=nacked - 1, multiple=True))
            self.send(commands.Basic.Nack(delivery_tag=nacked, multiple=False, requeue=False))
            self._confirmed_through = nacked
        if seq > self._confirmed_through:
            self.send(commands.Basic.Ack(delivery_tag=seq, multiple=True))
            self._confirmed_through = seq

    # ------------------------------------------------------------------ consuming
    def basic_qos(self, m: commands.Basic.Qos) -> None:
        if m.prefetch_size:
            raise ConnectionError_(ReplyCode.NOT_IMPLEMENTED, f"prefetch_size!=0 ({m.prefetch_size})")
        if m.global_:
            self.channel_prefetch = m.prefetch_count
        else:
            self.prefetch_count = m.prefetch_count
        self.send(commands.Basic.QosOk())
        self.replenish()

    def basic_consume(self, m: commands.Basic.Consume) -> None:
        queue = self._queue(m.queue)
        tag = m.consumer_tag or "amq.ctag-" + secrets.token_urlsafe(16)
        if tag in self.consumers:
            raise ConnectionError_(ReplyCode.NOT_ALLOWED, f"attempt to reuse consumer tag '{tag}'")
        if any(c.exclusive for c in queue.consumers) or (m.exclusive and queue.consumers):
            raise ChannelError(ReplyCode.ACCESS_REFUSED, f"queue '{queue.name}' in vhost '{VHOST}' in exclusive use")
        consumer = Consumer(self, tag, queue, bool(m.no_ack), bool(m.exclusive), self.prefetch_count)
        try:
            consumer.sub = self.session.subscribe(
                queue.topic, queue.topic, consumer, client_id=f"{self.connection.connection_id}/{self.number}/{tag}",
                mode="clustering", ack="message", invisible_ms=0, start="earliest", max_attempts=MAX_ATTEMPTS)
        except NotAuthorized as exc:
            raise ChannelError(ReplyCode.ACCESS_REFUSED, str(exc)) from None
        self.consumers[tag] = consumer
        queue.consumers[consumer] = None
        queue.had_consumer = True
        self.connection.factory.queue_used(queue)
        if not m.nowait:
            self.send(commands.Basic.ConsumeOk(tag))
        self.replenish()

    def basic_cancel(self, m: commands.Basic.Cancel) -> None:
        consumer = self.consumers.get(m.consumer_tag)
        if consumer is not None:
            self._end_consumer(consumer)
        if not m.nowait:
            self.send(commands.Basic.CancelOk(m.consumer_tag))

    def _end_consumer(self, consumer: Consumer, release: bool = False) -> None:
        """Stop delivering to `consumer`; its subscription stays open until its unacked messages are settled (the
        client may still ack them), or closes now with `release` (they come back to the queue)."""
        consumer.cancelled = True
        self.consumers.pop(consumer.tag, None)
        self._return_held(consumer)
        queue = consumer.queue
        was_active = queue.active_consumer is consumer
        queue.consumers.pop(consumer, None)
        sub = consumer.sub
        if sub is not None and not sub.closed:
            if release or consumer.unacked == 0:
                sub.close()
            else:
                sub.credit = 0
        if queue.auto_delete and not queue.consumers and queue.had_consumer \
                and self.registry.queues.get(queue.name) is queue:
            self.connection.factory.delete_queue(queue)
            return
        if was_active and queue.single_active and queue.consumers:
            successor = queue.active_consumer
            successor.channel.replenish()  # type: ignore[union-attr]  # the next consumer takes over
        self.connection.factory.queue_used(queue)

    def _return_held(self, consumer: Consumer) -> None:
        """x-max-priority: deliveries held in the reorder window and never sent go back to the queue."""
        held, sub = consumer.held, consumer.sub
        if not held:
            return
        consumer.held = []
        if sub is not None and not sub.closed:
            for _, _, d in held:
                try:
                    sub.nack(d.receipt, True)
                except InvalidReceipt:
                    pass

    def consumer_cancelled_by_server(self, consumer: Consumer) -> None:
        """The queue was deleted: the consumer ends and the client is told (consumer_cancel_notify)."""
        if consumer.sub is not None and not consumer.sub.closed:
            consumer.sub.close()  # also a cancelled consumer still holding unacked messages: the queue is gone
        if consumer.cancelled:
            return
        consumer.cancelled = True
        self.consumers.pop(consumer.tag, None)
        for tag in [t for t, u in self.unacked.items() if u.consumer is consumer]:
            del self.unacked[tag]
        if self.connection.cancel_notify and not self.closing:
            self.send(commands.Basic.Cancel(consumer.tag, nowait=True))

    def deliver(self, consumer: Consumer, deliveries: list[Delivered]) -> None:
        if consumer.cancelled or self.closing:
            return  # still in flight on the subscription: released when it closes
        held = consumer.held
        if held is not None:
            # x-max-priority: everything the core handed over joins the window; the highest priorities go out
            limit, order = consumer.queue.max_priority, consumer.held_order
            for d in deliveries:
                heapq.heappush(held, (-min(message_priority(d.message), limit), next(order), d))
            deliveries = self._pop_held(consumer)
        self._write_deliveries(consumer, deliveries)
        self.replenish()  # the next chunk, unless the write just paused the transport or the prefetch is used up

    def _pop_held(self, consumer: Consumer) -> list[Delivered]:
        """The held deliveries there is room for now, highest priority first."""
        held = consumer.held
        assert held is not None
        room = len(held) if consumer.no_ack else consumer.limit - consumer.unacked
        out = []
        while held and room > 0:
            out.append(heapq.heappop(held)[2])
            room -= 1
        return out

    def _write_deliveries(self, consumer: Consumer, deliveries: list[Delivered]) -> None:
        connection = self.connection
        codec = connection.codec
        queue = consumer.queue
        registry = self.registry
        now = self._now_ms()
        ttl = queue.arguments.get("x-message-ttl")
        started = connection.factory.started_ms
        chunks: list[bytes] = []
        send_deliver, address_of = codec.send_deliver, registry.delivery_address_bytes
        number, tag_bytes = self.number, consumer.tag_bytes
        sub = consumer.sub
        assert sub is not None
        limited = queue.max_bytes is not None
        for d in deliveries:
            message = d.message
            if limited:
                connection.factory.taken(queue, message)
            gone = _gone(message, ttl, now, started)
            if gone:
                if gone == "expired":
                    connection.factory.dead_letter(queue, message, "expired")
                sub.ack(d.receipt)
                continue
            tag = self.next_tag
            offset = d.queue_offset
            try:
                frame = send_deliver(number, tag_bytes, tag, d.attempt > 1 or offset < queue.redelivered_below,
                                     address_of(message), properties_for_delivery(message, now), message.body)
            except (FastPathError, AmqpEncodeError) as exc:
                self._undeliverable(queue, message, exc)
                sub.ack(d.receipt)
                continue
            self.next_tag = tag + 1
            if offset >= queue.delivered_mark:
                registry.delivered(queue, offset)
            if offset >= queue.delivered_end:
                queue.delivered_end = offset + 1
            chunks.append(frame)
            if consumer.no_ack:
                sub.ack(d.receipt)
            else:
                self.unacked[tag] = Unacked(consumer, queue, d.receipt, message)
                consumer.unacked += 1
        if chunks:
            size = sum(map(len, chunks))
            consumer.average_size = (consumer.average_size + size // len(chunks)) // 2
        connection.write_chunks(chunks)

    def _undeliverable(self, queue: QueueDecl, message: Message, exc: Exception) -> None:
        """A message AMQP cannot carry to this client (a routing key over 255 bytes, from a long MQTT or native
        subject; a frame over frame-max): dropped for this queue like MQTT drops what a client's Maximum Packet
        Size refuses, with a rate-limited log line instead of a broken channel."""
        self.connection.factory.client_log.info(
            "undeliverable", "amqp %s: dropped a message of topic %s from queue %s: %s", self.connection.source,
            message.topic, queue.name, exc)

    def replenish(self) -> None:
        """Give each consumer the credit its prefetch (and the channel's) allows, unless delivery is stopped."""
        if self.connection.paused or not self.flow_active or self.closing:
            return
        budget = -1
        if self.channel_prefetch:
            # basic.get deliveries do not count against prefetch (RabbitMQ); cancelled consumers' unacked do
            outstanding = sum(c.unacked + (c.sub.credit if c.sub else 0) + (len(c.held) if c.held else 0)
                              for c in self.consumers.values())
            outstanding += sum(1 for u in self.unacked.values() if u.consumer is not None and u.consumer.cancelled)
            budget = max(0, self.channel_prefetch - outstanding)
        for consumer in list(self.consumers.values()):
            sub = consumer.sub
            if sub is None or sub.closed:
                continue
            queue = consumer.queue
            if queue.single_active and queue.active_consumer is not consumer:
                continue  # x-single-active-consumer: only the oldest consumer of the queue gets messages
            held = consumer.held
            if held is not None:
                if held:
                    self._write_deliveries(consumer, self._pop_held(consumer))
                    if self.connection.paused or consumer.cancelled:
                        continue
                # the reorder window: more than the prefetch allows, held until there is room
                want = min(consumer.limit - consumer.unacked + PRIORITY_WINDOW - len(held),
                           consumer.chunk) - sub.credit
            else:
                want = min(consumer.limit - consumer.unacked, consumer.chunk) - sub.credit
            if budget >= 0:
                want = min(want, budget)
            if want > 0:
                sub.grant(want)
                if budget >= 0:
                    budget -= want

    def stop_delivery(self) -> None:
        """Take back unused credit: nothing more is delivered until `replenish`."""
        for consumer in self.consumers.values():
            if consumer.sub is not None and not consumer.sub.closed:
                consumer.sub.credit = 0

    def basic_get(self, m: commands.Basic.Get, retried: bool = False) -> None:
        queue = self._queue(m.queue)
        self.connection.factory.queue_used(queue)
        if not retried and self._get_after_own_publish(m, queue):
            return
        ttl = queue.arguments.get("x-message-ttl")
        now = self._now_ms()
        while True:
            try:
                d = self.session.get(queue.topic, queue.topic, auto_ack=bool(m.no_ack), invisible_ms=0)
            except NotAuthorized as exc:
                raise ChannelError(ReplyCode.ACCESS_REFUSED, str(exc)) from None
            if d is None:
                self.send(commands.Basic.GetEmpty())
                return
            gone = _gone(d.message, ttl, now, self.connection.factory.started_ms)
            if gone:
                if gone == "expired":
                    self.connection.factory.dead_letter(queue, d.message, "expired")
                if not m.no_ack:
                    self.session.ack(queue.topic, d.receipt)
                continue
            break
        tag = self.next_tag
        self.connection.factory.taken(queue, d.message)
        offset = d.queue_offset
        exchange, key = delivery_address(d.message, self.registry.exchange_of_topic, self.registry.queue_of_topic)
        redelivered = d.attempt > 1 or offset < queue.redelivered_below
        try:
            frame = self.connection.codec.send_content(
                self.number,
                commands.Basic.GetOk(tag, redelivered, exchange, key, self.connection.factory.ready_count(queue)),
                properties_for_delivery(d.message, now), d.message.body)
        except AmqpEncodeError as exc:
            self._undeliverable(queue, d.message, exc)
            if not m.no_ack:
                self.session.ack(queue.topic, d.receipt)
            self.send(commands.Basic.GetEmpty())
            return
        self.next_tag = tag + 1
        if not m.no_ack:
            self.unacked[tag] = Unacked(None, queue, d.receipt, d.message)
        if offset >= queue.delivered_mark:
            self.registry.delivered(queue, offset)
        queue.delivered_end = max(queue.delivered_end, offset + 1)
        self.connection.write(frame)

    def _get_after_own_publish(self, m: commands.Basic.Get, queue: QueueDecl) -> bool:
        """A get right after this connection published may find the queue empty only because the publish is not
        durable (hence not visible) yet; RabbitMQ would find it. Then the get waits for that fsync, and the
        channel's later methods wait behind it (held), so replies keep their order. Returns True when waiting."""
        end = self.connection.last_publish_end
        if not end or self.connection.factory.ready_count(queue):
            return False
        registered: list[bool] = []
        fired_at_once: list[bool] = []

        def durable() -> None:
            if not registered:
                fired_at_once.append(True)  # already durable and visible: answer now
                return
            self.connection.factory.clock.callLater(0, self._retry_get, m)  # after the core made it visible

        self.session.when_durable(end, durable)
        if fired_at_once:
            return False
        registered.append(True)
        self.held = []
        return True

    def _retry_get(self, m: commands.Basic.Get) -> None:
        held, self.held = self.held or [], None
        connection = self.connection
        if self.closing or not connection.connected_ or connection.channels.get(self.number) is not self:
            return

        def resume(_: object) -> None:
            try:
                self.basic_get(m, retried=True)
            except ChannelError as error:
                connection.channel_exception(self.number, error, m)
                return
            connection.dispatch(held)

        connection.run_batched(resume)

    # ------------------------------------------------------------------ acknowledgements
    def _take(self, delivery_tag: int, multiple: bool) -> list[Unacked]:
        if multiple:
            tags = [t for t in self.unacked if delivery_tag == 0 or t <= delivery_tag]
            if delivery_tag and not tags and delivery_tag >= self.next_tag:
                raise ChannelError(ReplyCode.PRECONDITION_FAILED, f"unknown delivery tag {delivery_tag}")
        else:
            if delivery_tag not in self.unacked:
                raise ChannelError(ReplyCode.PRECONDITION_FAILED, f"unknown delivery tag {delivery_tag}")
            tags = [delivery_tag]
        return [self.unacked.pop(t) for t in tags]

    def basic_ack(self, m: commands.Basic.Ack) -> None:
        taken = self._take(m.delivery_tag, m.multiple)
        if self.tx:
            self._tx_acks.extend(("ack", u) for u in taken)
            return
        for u in taken:
            self._settle(u, "ack")
        self._after_settle(taken)

    def basic_nack(self, m: commands.Basic.Nack) -> None:
        taken = self._take(m.delivery_tag, m.multiple)
        self._reject(taken, m.requeue)

    def basic_reject(self, m: commands.Basic.Reject) -> None:
        taken = self._take(m.delivery_tag, False)
        self._reject(taken, m.requeue)

    def _reject(self, taken: list[Unacked], requeue: bool) -> None:
        verdict = "requeue" if requeue else "drop"
        if self.tx:
            self._tx_acks.extend((verdict, u) for u in taken)
            return
        for u in taken:
            self._settle(u, verdict)
        self._after_settle(taken)

    def basic_recover(self, m: Any) -> None:
        taken = list(self.unacked.values())
        self.unacked.clear()
        for u in taken:
            self._settle(u, "requeue")
        self._after_settle(taken)
        if isinstance(m, commands.Basic.Recover):
            self.send(commands.Basic.RecoverOk())

    def _settle(self, u: Unacked, verdict: str) -> None:
        """ack, requeue (redelivered later) or drop (dead-lettered through x-dead-letter-exchange, else gone)."""
        consumer = u.consumer
        if verdict == "drop":
            self.connection.factory.dead_letter(u.queue, u.message, "rejected")
        elif verdict == "requeue":
            self.connection.factory.returned(u.queue, u.message)
        try:
            if consumer is not None:
                consumer.unacked -= 1
                sub = consumer.sub
                if sub is None or sub.closed:
                    return
                if verdict == "requeue":
                    sub.nack(u.receipt, True)
                else:
                    sub.ack(u.receipt)
            elif verdict == "requeue":
                self.session.nack(u.queue.topic, u.receipt, True)
            else:
                self.session.ack(u.queue.topic, u.receipt)
        except InvalidReceipt:
            pass  # the queue was deleted meanwhile

    def _after_settle(self, taken: list[Unacked]) -> None:
        for u in taken:
            consumer = u.consumer
            if consumer is not None and consumer.cancelled and consumer.unacked <= 0:
                if consumer.sub is not None and not consumer.sub.closed:
                    consumer.sub.close()
        self.replenish()

    # ------------------------------------------------------------------ confirms and transactions
    def confirm_select(self, m: commands.Confirm.Select) -> None:
        if self.tx:
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, "cannot switch from tx to confirm mode")
        self.confirm = True
        if not m.nowait:
            self.send(commands.Confirm.SelectOk())

    def tx_select(self, m: commands.Tx.Select) -> None:
        if self.confirm:
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, "cannot switch from confirm to tx mode")
        self.tx = True
        self.send(commands.Tx.SelectOk())

    def tx_commit(self, m: commands.Tx.Commit) -> None:
        if not self.tx:
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, "channel is not transactional")
        publishes, self._tx_publishes = self._tx_publishes, []
        acks, self._tx_acks = self._tx_acks, []
        end = 0
        for method, properties, raw, body in publishes:
            exchange = self.registry.exchanges.get(method.exchange)
            if exchange is None:
                raise not_found("exchange", method.exchange)
            end = max(end, self._publish(exchange, method, properties, raw, body))
        for verdict, u in acks:
            self._settle(u, verdict)
        self._after_settle([u for _, u in acks])
        # The commit is answered once what it published is on disk (DESIGN.md section 4: safe by default).
        self.session.when_durable(end, self._commit_ok)

    def _commit_ok(self) -> None:
        if not self.closing and self.number in self.connection.channels and self.connection.connected_:
            self.send(commands.Tx.CommitOk())

    def tx_rollback(self, m: commands.Tx.Rollback) -> None:
        if not self.tx:
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, "channel is not transactional")
        self._tx_publishes = []
        self._tx_acks = []  # the messages stay unacknowledged on the channel (AMQP 0-9-1 tx semantics)
        self.send(commands.Tx.RollbackOk())

    def channel_flow(self, m: commands.Channel.Flow) -> None:
        self.flow_active = bool(m.active)
        if self.flow_active:
            self.replenish()
        else:
            self.stop_delivery()
        self.send(commands.Channel.FlowOk(self.flow_active))

    # ------------------------------------------------------------------ closing
    def release(self) -> None:
        """The channel is closing or its connection is gone: consumers end and every unacknowledged message
        returns to its queue (redelivered)."""
        for consumer in list(self.consumers.values()):
            self._end_consumer(consumer, release=True)
        taken = list(self.unacked.values())
        self.unacked.clear()
        for u in taken:
            consumer = u.consumer
            if consumer is None:
                self._settle(u, "requeue")
                continue
            self.connection.factory.returned(u.queue, u.message)
            if consumer.sub is not None and not consumer.sub.closed:
                consumer.sub.close()  # a cancelled consumer still holding messages: they come back
        self._tx_publishes, self._tx_acks = [], []
        self._batch = []


def _gone(message: Message, ttl: Any, now: int, started_ms: int) -> str:
    """Why a queue no longer holds a message it would deliver ("" = it does): "expired" by the queue's
    x-message-ttl (dead-lettered when the queue has a dead-letter exchange), or "lost", transient (delivery mode 1)
    and stored before this broker started (RabbitMQ loses those on restart; the commit log keeps them, so the
    adapter skips them)."""
    stored = message.store_ts or message.born_ts  # a message served from the core's cache may lack store_ts
    if ttl is not None and stored and now - stored >= ttl:
        return "expired"
    if message.flags & _TRANSIENT and 0 < stored < started_ms:
        return "lost"
    return ""


def _jsonable(value: Any) -> Any:
    """Declaration arguments as JSON can store them (AMQP tables may hold bytes, decimals, timestamps)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_INTEGER_ARGUMENTS = ("x-message-ttl", "x-expires", "x-max-length", "x-max-length-bytes", "x-max-priority")


def _check_queue_arguments(arguments: dict[str, Any]) -> None:
    for name in _INTEGER_ARGUMENTS:
        value = arguments.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (name == "x-expires" and value == 0):
            raise ChannelError(ReplyCode.PRECONDITION_FAILED, f"invalid arg '{name}' for queue: {value!r}")
    overflow = arguments.get("x-overflow")
    if overflow is not None and overflow not in ("drop-head", "reject-publish", "reject-publish-dlx"):
        raise ChannelError(ReplyCode.PRECONDITION_FAILED, f"invalid arg 'x-overflow' for queue: {overflow!r}")

