"""What goes from the core to a client: deliveries become PUBLISH packets; PUBACK/PUBREC/PUBCOMP end them; credit.

Delivery: the session queue (and each shared-subscription queue) is consumed through a core Subscription in
per-message ack mode, opened through the connection's `CoreSession`. Each delivery is re-matched against the
session's filters for QoS (min of message and subscription), subscription identifiers, No Local, Retain As
Published and the `$` rule. QoS 0 deliveries are acked to the core at once; QoS 1 on PUBACK; QoS 2 on PUBREC (from
then on the client owns the message and only the PUBREL/PUBCOMP exchange remains, which the session keeps and
resends on reconnect: acking on PUBCOMP instead would redeliver a message the client already released).

Flow control and memory (slow subscribers):
- Core credit of each subscription = the client's Receive Maximum (v5, capped by `max_inflight`) or
  `settings.receive_maximum` (3.1.1). Credit comes back when a message leaves the connection's hands (PUBACK,
  PUBCOMP, a QoS 0 write, a drop), so at most that many messages per subscription are in memory; the rest wait on
  disk in the session queue. While a subscription's deliveries all leave at once (QoS 0 writes) its credit grows by
  `QOS0_CREDIT_BONUS` (224; fewer when payloads average over 1,170 bytes: `QOS0_CREDIT_BONUS_BYTES`), so the core hands
  out batches of up to 256 instead of 32; the bonus is paid back out of the next credit returned otherwise (PUBACKs,
  a paused transport, larger payloads), so QoS 1/2 windows are unchanged on the wire. When the transport pauses, the
  part of the bonus the core has not used yet is taken back at once.
- While the transport is paused (its write buffer is full: the client does not read) nothing is written: deliveries
  and retained messages wait in `pending`, and every credit that would go back to the core (a PUBACK, a PUBCOMP, a
  QoS 0 write, a drop) is held in `held_credit` instead, so a slow reader stops the core instead of growing the
  buffer, even if it acknowledges blindly. On resume the pending messages go out and the held credit is returned.
  `pending` holds at most the core credit of the connection's subscriptions plus the retained messages below.
- Retained messages sent on SUBSCRIBE take the same path (queued while paused or while the QoS 1/2 window is full,
  never written into a paused socket). Their payload bytes waiting per connection are bounded by
  `max_queued_retained_bytes`: a retained message that would go beyond is not sent (one rate-limited log line), so
  re-SUBSCRIBEs of a client that does not read cannot multiply the retained set in memory.
- Clean sessions (expiry 0): when more than `max_queued_messages` wait in the session queue, QoS 0 messages are
  dropped instead of delivered (QoS 1/2 stay queued on disk; the backlog never grows memory).
- A message bigger than the client's Maximum Packet Size is dropped (acked to the core), as MQTT 5 requires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidegate.core.api import Delivered
from tidegate.core.errors import TidegateError
from tidegate.core.interfaces import Subscription
from tidegate.core.model import Message, QueueRef

from .codec import encode_publish_v311, publish_topic_header, publish_v311_head
from .mapping import (
    PROP_PUBLISHER,
    PROP_RETAIN,
    PublishFields,
    message_qos,
    mqtt_topic_name,
    publish_fields,
)
from .packets import MQTT_5, Puback, Pubcomp, Publish, Pubrec, Pubrel, topic_matches
from .properties import MAX_VARIABLE_BYTE_INTEGER, UINT16, Properties, encode_variable_byte_integer
from .reason_codes import MqttProtocolError, ReasonCode
from .sessions import SubscriptionEntry
from .state import Inflight, OutboundAliases

if TYPE_CHECKING:
    from .server import MqttProtocol

log = logging.getLogger("tidegate.mqtt")

# flags -> the QoS a message carries (mapping.message_qos): one dict lookup per delivery instead of a call;
# messages carry few distinct flag values, and at most 256 are remembered
_QOS_OF_FLAGS: dict[int, int] = {}


def _message_qos(flags: int) -> int:
    qos = message_qos(flags)
    if len(_QOS_OF_FLAGS) < 256:
        _QOS_OF_FLAGS[int(flags)] = qos
    return qos
_pack_packet_id = UINT16.pack
# (first byte << 28 | remaining length) -> the PUBLISH fixed header: a subscriber's messages come in few sizes.
# At most 1,024 are kept. The shift is 28 because a remaining length has up to 28 bits: with a smaller one a large
# delivery's length would overlap the first byte and find another packet's header.
_FIXED_HEADERS: dict[int, bytes] = {}


def _fixed_header(first_byte: int, remaining: int) -> bytes:
    if remaining < 0x80:
        header = bytes((first_byte, remaining))
    elif remaining < 0x4000:
        header = bytes((first_byte, (remaining & 0x7F) | 0x80, remaining >> 7))
    else:  # a large payload (its body goes out as a piece of its own)
        header = bytes((first_byte,)) + encode_variable_byte_integer(remaining)
    if len(_FIXED_HEADERS) < 1024:
        _FIXED_HEADERS[(first_byte << 28) | remaining] = header
    return header
# A 3.1.1 delivery whose payload is at least this large is written as two pieces, PUBLISH head and stored body
# (the socket gets them with one sendmsg): joining them would copy the payload once per delivery.
SEPARATE_PAYLOAD_BYTES = 16 * 1024
MAX_CACHED_ROUTES = 64  # per connection: (queue key, core topic, subject) -> how this client's subscriptions take it
# QoS 0 credit bonus: core credit a subscription gets on top of the receive maximum while its deliveries are all
# written at QoS 0 (their credit comes back at the write, so the window bounds only memory while the transport is
# paused). Larger batches per pump: the core's and this adapter's per-batch work (pump, index read, one write, one
# batch ack) is shared by up to receive maximum + bonus messages instead of 32. Bounded by count and by the payload
# bytes it may add to `pending` while paused.
QOS0_CREDIT_BONUS = 224
QOS0_CREDIT_BONUS_BYTES = 256 * 1024


@dataclass(slots=True)
class Route:
    """What a client's subscriptions make of every message of one core topic and subject, from one queue key:
    computed once and reused while the session's subscriptions stay the same (`Outbound.subscriptions_changed`)."""

    name: str | None  # the MQTT topic name; None if MQTT cannot see the topic
    matches: list[SubscriptionEntry]  # the subscriptions of this key that match it (before No Local)
    qos: int  # the highest QoS among them
    retain_as_published: bool
    subscription_ids: tuple[int, ...]
    no_local: bool  # some match is No Local: check the publisher per message
    topic_header: bytes | None  # the PUBLISH topic header for 3.1.1 clients; None: encode through the codec


def _summarise(name: str | None, matches: list[SubscriptionEntry], v311: bool) -> Route:
    header = None
    if name is not None and matches and v311:
        try:
            header = publish_topic_header(name)
        except MqttProtocolError:
            header = None  # not a valid PUBLISH name: the codec path raises for it as it always did
    return Route(name, matches, max((e.qos for e in matches), default=0), any(e.retain_as_published for e in matches),
                 tuple(sorted({e.identifier for e in matches if e.identifier})), any(e.no_local for e in matches),
                 header)


@dataclass(slots=True)
class Outgoing:
    """A message decided for this client, waiting for (or going through) transmission."""

    topic_name: str
    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...]
    sub_key: str | None  # queue topic of the core subscription it came from; None for retained messages
    delivered: Delivered | None
    topic_header: bytes | None = None  # cached PUBLISH topic header (3.1.1 deliveries); None: encode the name


class CoreSink:
    """The DeliverySink of one core subscription of a connection (the session queue or one shared queue)."""

    __slots__ = ("conn", "key")

    def __init__(self, conn: MqttProtocol, key: str) -> None:
        self.conn = conn
        self.key = key

    def deliver(self, deliveries: list[Delivered]) -> None:
        self.conn.batched(self.conn.outbound.on_deliveries, (self.key, deliveries))

    def assignment_changed(self, queues: list[QueueRef]) -> None:
        pass

    def offset_moved(self, queue: QueueRef, old: int, new: int) -> None:
        pass  # MQTT sessions are consumed by message; retention moving past them is just loss, logged by the core


class Outbound:
    """The core-to-client half of one accepted connection."""

    __slots__ = ("conn", "settings", "subs", "pending", "held_credit", "aliases", "receive_maximum",
                 "maximum_packet_size", "sys_filters", "queued_retained_bytes", "routes", "routes_session",
                 "routes_count", "credit_back", "acks_back", "credit_bonus")

    def __init__(self, conn: MqttProtocol, receive_maximum: int, maximum_packet_size: int,
                 topic_alias_maximum: int) -> None:
        self.conn = conn
        self.settings = conn.settings
        self.subs: dict[str, Subscription] = {}  # by key: the queue topic consumed
        self.pending: list[Outgoing] = []  # a list: an idle connection should not carry a deque's block
        self.held_credit: dict[str, int] = {}  # credit not returned while the transport is paused
        self.aliases = OutboundAliases(topic_alias_maximum)
        self.receive_maximum = receive_maximum  # the client's
        self.maximum_packet_size = maximum_packet_size  # the client's
        self.sys_filters: list[SubscriptionEntry] = []
        self.queued_retained_bytes = 0  # payload bytes of retained messages waiting in `pending`
        # Route per (queue key, core topic, subject); None until the first delivery (idle connections stay small).
        # Valid for `routes_session` while its subscriptions do not change.
        self.routes: dict[tuple[str, str, str], Route] | None = None
        self.routes_session: object = None
        self.routes_count = 0  # len(session.subscriptions) when the routes were cached: a safety net
        # While a batch of deliveries is handled: credit to return per key at its end (one grant, one wake-up)
        self.credit_back: dict[str, int] | None = None
        # ... and the deliveries of its key done with at once (QoS 0 writes, drops): acked to the core in one call
        self.acks_back: list[Delivered] | None = None
        # QoS 0 credit bonus granted per key (QOS0_CREDIT_BONUS); None until the first one (idle connections)
        self.credit_bonus: dict[str, int] | None = None

    def subscriptions_changed(self) -> None:
        """The session's subscriptions changed (SUBSCRIBE, UNSUBSCRIBE): forget the cached routes."""
        self.routes = None

    # ------------------------------------------------------------------------------------------ core subscriptions
    def open_session_queue(self) -> None:
        session = self.conn.mqtt_session
        assert session is not None
        self._open(session.topic, session.topic, session.topic,
                   max(0, self.receive_maximum - len(session.packets.released)))

    def open_share(self, entry: SubscriptionEntry) -> None:
        topic = entry.share_topic
        assert topic is not None
        group = self.conn.factory.sessions.share_group_of(entry)
        core = self.conn.session
        assert core is not None
        # the share's queue and its group are private to the adapter: only its members consume them
        core.own(topic, own_queue=True)
        core.own(group, own_queue=True)
        self._open(topic, group, topic, self.receive_maximum)

    def _open(self, key: str, group: str, topic: str, credit: int) -> None:
        if key in self.subs:
            return
        conn = self.conn
        sub = conn.session.subscribe(group, topic, CoreSink(conn, key),  # type: ignore[union-attr]
                                     client_id=conn.client_id, mode="clustering", ack="message", invisible_ms=0,
                                     start="earliest", max_attempts=self.settings.max_delivery_attempts)
        self.subs[key] = sub
        if credit:
            sub.grant(credit)

    def close_subscription(self, key: str) -> None:
        if self.credit_bonus is not None:
            self.credit_bonus.pop(key, None)
        sub = self.subs.pop(key, None)
        if sub is not None:
            sub.close()

    def close(self) -> None:
        """The connection ends: close core subscriptions (the core releases what was in flight)."""
        self._settle_acks_back()  # what was written before the close (in this batch of deliveries) is done
        subs, self.subs = self.subs, {}
        for sub in subs.values():
            sub.close()
        self.pending.clear()
        self.queued_retained_bytes = 0
        self.credit_bonus = None

    def pause(self) -> None:
        """The transport's buffer is full: take the unused QoS 0 credit bonus back from the core at once, so a
        client that stops reading can get at most its receive maximum more into `pending`, whatever the size of the
        messages that come next (the bonus was sized for the payloads of the batch that earned it)."""
        bonuses = self.credit_bonus
        if not bonuses:
            return
        for key, bonus in bonuses.items():
            sub = self.subs.get(key)
            if sub is None or not bonus:
                continue
            taken = min(bonus, sub.credit)
            if taken > 0:
                sub.credit -= taken
                bonuses[key] = bonus - taken

    def resume(self) -> None:
        """The transport drained: send what waited, then return the credit held while it was paused."""
        self._drain_pending()
        if self.conn.paused:
            return  # the queued messages filled the buffer again: the credit waits for the next resume
        held, self.held_credit = self.held_credit, {}
        for key, credit in held.items():
            sub = self.subs.get(key)
            if sub is not None and not sub.closed:
                sub.grant(credit)

    # ------------------------------------------------------------------------------------------ $SYS
    def add_sys_filter(self, entry: SubscriptionEntry) -> None:
        self.sys_filters = [e for e in self.sys_filters if e.topic_filter != entry.topic_filter] + [entry]
        self.conn.factory.sys.listeners.add(self.conn)

    def remove_sys_filter(self, topic_filter: str) -> None:
        self.sys_filters = [e for e in self.sys_filters if e.topic_filter != topic_filter]
        if not self.sys_filters:
            self.conn.factory.sys.listeners.discard(self.conn)

    def send_sys(self, values: dict[str, str], retain: bool, only: SubscriptionEntry | None = None) -> None:
        """Deliver $SYS values (QoS 0) to this client's $SYS subscriptions. A periodic update is skipped while the
        socket is paused (the next one carries the same values); a snapshot for a new subscription is sent."""
        if only is None and self.conn.paused:
            return
        filters = [only] if only is not None else self.sys_filters
        for name, value in values.items():
            matching = [e for e in filters if topic_matches(e.topic_filter, name)]
            if not matching:
                continue
            ids = tuple(sorted({e.identifier for e in matching if e.identifier}))
            message = Message(topic="%24SYS", body=value.encode("utf-8"), flags=0)
            data = self._encode(Outgoing(name, message, 0, retain, ids, None, None), PublishFields(), None, False)
            if data is not None:
                self.conn.write(data)

    # ------------------------------------------------------------------------------------------ deliveries
    def on_deliveries(self, batch: tuple[str, list[Delivered]]) -> None:
        key, deliveries = batch
        conn = self.conn
        self.credit_back = back = {}
        self.acks_back = (key, [])
        try:
            # 3.1.1 clients: the common deliveries in one pass; from the first one it does not take, one at a time
            start = self._deliver_v311(key, deliveries) if conn.level != MQTT_5 else 0
            for index in range(start, len(deliveries)):
                if conn.state != "connected":
                    return  # the core subscription was closed; the core redelivers unacked messages
                outgoing = self._decide(key, deliveries[index])
                if outgoing is not None:
                    self.offer(outgoing)
        finally:
            self.credit_back = None
            self._settle_acks_back()
            if back.get(key) == len(deliveries) or self.credit_bonus:
                self._adjust_credit_bonus(key, deliveries, back)
            for back_key, credit in back.items():
                if credit:
                    self._grant(back_key, credit)

    def _adjust_credit_bonus(self, key: str, deliveries: list[Delivered], back: dict[str, int]) -> None:
        """After a batch of `key`: while every delivery of it left the connection at once (QoS 0 writes, drops)
        and the transport takes more, raise the subscription's core credit to receive maximum + QOS0_CREDIT_BONUS
        (fewer payload bytes for large messages); otherwise (a QoS 1/2 delivery in flight, paused, larger messages)
        take the bonus back out of the credit this batch returns. The credit outstanding is never more than receive
        maximum + bonus, so `pending` stays bounded by it."""
        returned = back.get(key, 0)
        bonuses = self.credit_bonus
        bonus = bonuses.get(key, 0) if bonuses is not None else 0
        target = 0
        if returned == len(deliveries) and not self.conn.paused:
            size = 0
            for delivered in deliveries:
                size += len(delivered.message.body)
            target = min(QOS0_CREDIT_BONUS, QOS0_CREDIT_BONUS_BYTES * len(deliveries) // max(1, size))
        if target > bonus:
            back[key] = returned + target - bonus
        elif target < bonus:
            taken = min(bonus - target, returned)
            if not taken:
                return
            back[key] = returned - taken
            target = bonus - taken
        else:
            return
        if bonuses is None:
            bonuses = self.credit_bonus = {}
        bonuses[key] = target

    def _settle_acks_back(self) -> None:
        """Ack the deliveries a batch was done with (one core call for all of them)."""
        back, self.acks_back = self.acks_back, None
        if back is None or not back[1]:
            return
        sub = self.subs.get(back[0])
        if sub is None or sub.closed:
            return
        try:
            sub.ack_delivered(back[1])
        except TidegateError:
            pass  # not a per-message group (cannot happen for MQTT's own subscriptions): the core keeps them

    def _deliver_v311(self, key: str, deliveries: list[Delivered]) -> int:
        """Write the leading deliveries of a batch that need nothing but a cached 3.1.1 route (no No Local, no
        expiry, the window open), as one write; returns how many it
        took. Byte for byte what `_decide` + `_transmit` + `encode_publish_v311` send for each, with the same
        packet ids, in-flight entries, credit and acks."""
        conn = self.conn
        if self.pending or conn.paused or conn.state != "connected" or not deliveries:
            return 0
        session = conn.mqtt_session
        assert session is not None
        packets = session.packets
        inflight, sent, sent_ids = packets.outbound_tables()
        released = packets.released
        receive_maximum = self.receive_maximum
        max_queued = self.settings.max_queued_messages if session.expiry_interval == 0 else 0
        queue_ends: dict[QueueRef, int] = {}
        settled = self.acks_back[1] if self.acks_back is not None else None
        back = self.credit_back
        first = deliveries[0].message
        route = self._route(key, first)
        routes = self.routes
        assert routes is not None
        route_topic, route_subject = first.topic, first.subject  # of `route`: most batches are one name
        chunks: list[bytes] = []
        append = chunks.append
        qos_of_flags = _QOS_OF_FLAGS
        fixed_headers = _FIXED_HEADERS
        taken = 0
        released_count = 0
        for delivered in deliveries:
            message = delivered.message
            if message.topic != route_topic or message.subject != route_subject:
                route = routes.get((key, message.topic, message.subject)) or self._route(key, message)
                route_topic, route_subject = message.topic, message.subject
            header = route.topic_header
            if header is None or route.no_local or message.expires_at:
                break
            qos = qos_of_flags.get(message.flags)
            if qos is None:
                qos = _message_qos(message.flags)
            if route.qos < qos:
                qos = route.qos
            body = message.body
            remaining = len(header) + len(body)
            if qos:
                remaining += 2
                if len(inflight) + len(released) >= receive_maximum:
                    break  # the general path queues it in `pending`
            else:
                if max_queued:
                    queue = delivered.queue
                    end = queue_ends.get(queue)
                    if end is None:
                        end = queue_ends[queue] = conn.session.queue_offsets(queue)[1]  # type: ignore[union-attr]
                    if end - delivered.queue_offset - 1 > max_queued:
                        break  # dropped by the general path
            if remaining > MAX_VARIABLE_BYTE_INTEGER:
                break  # the general path refuses it
            props = message.properties
            first_byte = 0x30 | (qos << 1)
            if route.retain_as_published and props and PROP_RETAIN in props:
                first_byte |= 0x01
            if qos:
                sent_key = (delivered.queue.topic, delivered.queue_offset)
                packet_id = sent.get(sent_key)
                if packet_id is not None or delivered.attempt > 1:
                    first_byte |= 0x08  # DUP
                if packet_id is None:
                    packet_id = packets.allocate()
                inflight[packet_id] = Inflight(key, delivered.receipt, qos, sent_key, delivered)
                sent[sent_key] = packet_id
                sent_ids.add(packet_id)
                append(fixed_headers.get((first_byte << 28) | remaining) or _fixed_header(first_byte, remaining))
                append(header)
                append(_pack_packet_id(packet_id))
            else:
                append(fixed_headers.get((first_byte << 28) | remaining) or _fixed_header(first_byte, remaining))
                append(header)
                if settled is not None:
                    settled.append(delivered)
                released_count += 1
            append(body)
            taken += 1
        if chunks:
            conn.write_chunks(chunks)
            conn.factory.stats.messages_sent += taken
        if released_count and back is not None:
            back[key] = back.get(key, 0) + released_count
        return taken

    def _route(self, key: str, message: Message) -> Route:
        """How this client's subscriptions of queue `key` take messages of the message's topic and subject."""
        session = self.conn.mqtt_session
        assert session is not None
        routes = self.routes
        if routes is None or self.routes_session is not session or self.routes_count != len(session.subscriptions):
            routes = self.routes = {}
            self.routes_session = session
            self.routes_count = len(session.subscriptions)
        cache_key = (key, message.topic, message.subject)
        route = routes.get(cache_key)
        if route is not None:
            return route
        name = mqtt_topic_name(message.topic, message.subject)
        matches: list[SubscriptionEntry] = []
        if name is not None:
            candidates = session.matching_subscriptions(name)
            if key == session.topic:
                matches = [e for e in candidates if e.share is None]
            else:
                matches = [e for e in candidates if e.share is not None and e.share_topic == key]
        route = _summarise(name, matches, self.conn.level != MQTT_5)
        if len(routes) >= MAX_CACHED_ROUTES:
            routes.clear()
        routes[cache_key] = route
        return route

    def _decide(self, key: str, delivered: Delivered) -> Outgoing | None:
        """Which of this client's subscriptions want the message and how; None (and acked) if none does."""
        conn = self.conn
        message = delivered.message
        route = self._route(key, message)
        if not route.matches:
            self._finish(key, delivered)
            return None
        props = message.properties
        if route.no_local and props and props.get(PROP_PUBLISHER) == conn.client_id:
            route = _summarise(route.name, [e for e in route.matches if not e.no_local], False)
            if not route.matches:
                self._finish(key, delivered)
                return None
        qos = _QOS_OF_FLAGS.get(message.flags)  # the message's QoS (mapping.message_qos)
        if qos is None:
            qos = _message_qos(message.flags)
        if route.qos < qos:
            qos = route.qos
        if qos == 0 and self.settings.max_queued_messages and conn.mqtt_session.expiry_interval == 0:  # type: ignore[union-attr]
            backlog = conn.session.queue_offsets(delivered.queue)[1] - delivered.queue_offset - 1  # type: ignore[union-attr]
            if backlog > self.settings.max_queued_messages:
                self._finish(key, delivered)
                return None
        retain = route.retain_as_published and bool(props) and PROP_RETAIN in props
        return Outgoing(route.name, message, qos, retain, route.subscription_ids, key, delivered,  # type: ignore[arg-type]
                        route.topic_header)

    def offer_retained(self, name: str, message: Message, qos: int, ids: tuple[int, ...]) -> None:
        """A retained message for a new subscription: sent now, or queued like a delivery within
        `max_queued_retained_bytes`; beyond that it is not sent."""
        outgoing = Outgoing(name, message, qos, True, ids, None, None)
        if not self._must_wait(outgoing):
            self._transmit(outgoing)
            return
        size = len(message.body)
        if self.queued_retained_bytes + size > self.settings.max_queued_retained_bytes:
            conn = self.conn
            conn.factory.client_log.info(
                "retained-not-queued", "mqtt %s: retained message on %s not sent: %d bytes of retained messages "
                "already wait for this client (max_queued_retained_bytes)", conn.who(), outgoing.topic_name,
                self.queued_retained_bytes)
            return
        self.queued_retained_bytes += size
        self.pending.append(outgoing)

    def offer(self, outgoing: Outgoing) -> None:
        if self._must_wait(outgoing):
            self.pending.append(outgoing)
            return
        self._transmit(outgoing)

    def _must_wait(self, outgoing: Outgoing) -> bool:
        return bool(self.pending) or self.conn.paused or bool(outgoing.qos and self._window_full())

    def _window_full(self) -> bool:
        session = self.conn.mqtt_session
        return session is not None and session.packets.in_flight_count() >= self.receive_maximum

    def _drain_pending(self) -> None:
        pending = self.pending
        sent = 0
        conn = self.conn
        while sent < len(pending) and conn.state == "connected" and not conn.paused:
            outgoing = pending[sent]
            if outgoing.qos and self._window_full():
                break
            sent += 1
            if outgoing.delivered is None:
                self.queued_retained_bytes -= len(outgoing.message.body)
            self._transmit(outgoing)
        del pending[:sent]

    def _transmit(self, outgoing: Outgoing) -> None:
        conn = self.conn
        session = conn.mqtt_session
        assert session is not None
        message = outgoing.message
        header = outgoing.topic_header
        if header is not None:
            # 3.1.1 delivery with a cached topic header: only the expiry matters of the message's fields
            fields = None
            if message.expires_at and message.expires_at - conn.session.now_ms() <= 0:  # type: ignore[union-attr]
                self._release(outgoing)  # expired while queued
                return
        else:
            fields = publish_fields(message, conn.session.now_ms())  # type: ignore[union-attr]
            if fields is None:  # expired while queued
                self._release(outgoing)
                return
        qos = outgoing.qos
        packets = session.packets
        packet_id = None
        dup = False
        sent_key = None
        delivered = outgoing.delivered
        if qos:
            if delivered is not None:
                sent_key = (delivered.queue.topic, delivered.queue_offset)
                packet_id = packets.id_sent_for(sent_key)
                dup = packet_id is not None or delivered.attempt > 1
            if packet_id is None:
                packet_id = packets.allocate()
        if header is not None:
            body = message.body
            if len(body) >= SEPARATE_PAYLOAD_BYTES:
                # the stored body goes out as a piece of its own behind its PUBLISH head: never copied into a packet
                conn.write_chunks([publish_v311_head(header, len(body), qos, outgoing.retain, dup, packet_id), body])
                data = None
            else:
                data = encode_publish_v311(header, body, qos, outgoing.retain, dup, packet_id)
        else:
            data = self._encode(outgoing, fields, packet_id, dup)  # type: ignore[arg-type]
        if data is not None:
            conn.write(data)
        elif header is None:
            conn.factory.client_log.info(
                "too-large-for-client", "mqtt %s: dropped a %d-byte message on %s: larger than the client's Maximum "
                "Packet Size", conn.who(), len(outgoing.message.body), outgoing.topic_name)
            self._release(outgoing)
            return
        conn.factory.stats.messages_sent += 1
        if not qos:
            self._release(outgoing)
            return
        assert packet_id is not None
        packets.sent_out(packet_id, Inflight(outgoing.sub_key, delivered.receipt if delivered else "", qos, sent_key,
                                             delivered))

    def _encode(self, outgoing: Outgoing, fields: PublishFields, packet_id: int | None, dup: bool) -> bytes | None:
        """The PUBLISH bytes, or None if they exceed the client's Maximum Packet Size."""
        codec = self.conn.codec
        topic = outgoing.topic_name
        payload = outgoing.message.body
        if self.conn.level != MQTT_5:
            return codec.encode(Publish(topic, payload, outgoing.qos, outgoing.retain, dup, packet_id))
        alias, new_alias = self.aliases.choose(topic)
        send_topic = "" if alias is not None and not new_alias else topic
        try:
            props = fields.to_properties(alias, outgoing.subscription_ids)
        except MqttProtocolError:
            # a property another protocol set that MQTT cannot carry (e.g. U+0000): send the message without them
            props = Properties(topic_alias=alias, subscription_identifiers=outgoing.subscription_ids,
                               message_expiry_interval=fields.message_expiry_interval)
        data = codec.encode(Publish(send_topic, payload, outgoing.qos, outgoing.retain, dup, packet_id, props))
        if len(data) > self.maximum_packet_size:
            return None
        if new_alias:
            self.aliases.confirm(topic, alias)  # type: ignore[arg-type]
        return data

    # ------------------------------------------------------------------------------------------ credit
    def _release(self, outgoing: Outgoing) -> None:
        """The message is done with (written at QoS 0, dropped, or too big): ack it and take the next one."""
        if outgoing.delivered is not None and outgoing.sub_key is not None:
            self._finish(outgoing.sub_key, outgoing.delivered)

    def _finish(self, key: str, delivered: Delivered) -> None:
        sub = self.subs.get(key)
        if sub is None or sub.closed:
            return
        back = self.acks_back
        if back is not None and back[0] == key:
            back[1].append(delivered)  # acked with the rest of the batch (on_deliveries)
            self._regrant(key)
            return
        try:
            sub.ack(delivered.receipt)
        except TidegateError:
            pass  # already released (subscription closed meanwhile): the core redelivers it
        self._regrant(key)

    def _regrant(self, key: str | None, credit: int = 1) -> None:
        """Messages of subscription `key` left the connection's hands: their credit goes back to the core, or is
        held while the transport is paused (returned by `resume`; never more than was granted). Inside a batch of
        deliveries (QoS 0 writes, drops) it is summed and returned once at the end of the batch; outside one it
        first pays back a QoS 0 credit bonus (`_adjust_credit_bonus`)."""
        if key is None:
            return
        back = self.credit_back
        if back is not None:
            back[key] = back.get(key, 0) + credit
            return
        bonuses = self.credit_bonus
        if bonuses:  # credit outside a batch of QoS 0 writes (a PUBACK, a drained `pending`) pays the bonus back
            bonus = bonuses.get(key)
            if bonus:
                taken = min(bonus, credit)
                bonuses[key] = bonus - taken
                credit -= taken
                if not credit:
                    return
        self._grant(key, credit)

    def _grant(self, key: str, credit: int) -> None:
        """Return `credit` to subscription `key` now, or hold it while the transport is paused."""
        sub = self.subs.get(key)
        if sub is None or sub.closed:
            return
        if self.conn.paused:
            self.held_credit[key] = self.held_credit.get(key, 0) + credit
        else:
            sub.grant(credit)

    def _ack_core(self, item: Inflight) -> None:
        if item.sub_key is None:
            return
        sub = self.subs.get(item.sub_key)
        if sub is not None and not sub.closed:
            try:
                sub.ack(item.receipt)
            except TidegateError:
                pass

    # ------------------------------------------------------------------------------------------ acknowledgements
    def on_puback(self, packet: Puback) -> None:
        item = self.conn.mqtt_session.packets.acknowledged(packet.packet_id, 1)  # type: ignore[union-attr]
        if item is None:
            return  # unknown or duplicate acknowledgement: nothing to do
        self._ack_core(item)
        self._regrant(item.sub_key)
        self._drain_pending()

    def on_pubacks(self, packet_ids: list[int]) -> None:
        """The PUBACKs (reason Success) of one read: what `on_puback` does for each, with one core ack per
        subscription, one credit grant per subscription and one drain of `pending` for all of them."""
        packets = self.conn.mqtt_session.packets  # type: ignore[union-attr]
        inflight, sent, sent_ids = packets.inflight, packets.sent, packets.sent_ids
        done: dict[str, list[Inflight]] = {}
        for packet_id in packet_ids:
            item = inflight.get(packet_id)
            if item is None or item.qos != 1:
                continue  # unknown or duplicate acknowledgement: nothing to do (PacketIds.acknowledged)
            del inflight[packet_id]
            if item.sent_key is not None:
                sent.pop(item.sent_key, None)
                sent_ids.discard(packet_id)
            key = item.sub_key
            if key is not None:
                items = done.get(key)
                if items is None:
                    done[key] = [item]
                else:
                    items.append(item)
        for key, items in done.items():
            sub = self.subs.get(key)
            if sub is not None and not sub.closed:
                deliveries = [item.delivered for item in items if item.delivered is not None]
                try:
                    sub.ack_delivered(deliveries)  # type: ignore[arg-type]
                except TidegateError:
                    pass
                for item in items:
                    if item.delivered is None:
                        self._ack_core(item)
            self._regrant(key, len(items))
        self._drain_pending()

    def on_pubrec(self, packet: Pubrec) -> None:
        conn = self.conn
        session = conn.mqtt_session
        assert session is not None
        packets = session.packets
        packet_id = packet.packet_id
        item = packets.acknowledged(packet_id, 2)
        if item is None:
            if packet_id in packets.released:
                conn.send(Pubrel(packet_id))
            elif conn.level == MQTT_5:
                conn.send(Pubrel(packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
            return
        self._ack_core(item)
        if packet.reason_code.is_error:  # the client refused the message: the exchange ends here
            self._regrant(item.sub_key)
            self._drain_pending()
            return
        packets.release(packet_id, item.sub_key)
        if session.expiry_interval:
            conn.factory.sessions.save(session)
        conn.send(Pubrel(packet_id))

    def on_pubcomp(self, packet: Pubcomp) -> None:
        conn = self.conn
        session = conn.mqtt_session
        assert session is not None
        key = session.packets.completed(packet.packet_id)
        if key is None:
            return
        if session.expiry_interval:
            conn.factory.sessions.save(session)
        self._regrant(key or None)
        self._drain_pending()

    def resend_releases(self) -> None:
        """A resumed session: PUBREL again every message the client had received but not completed."""
        session = self.conn.mqtt_session
        assert session is not None
        for packet_id in sorted(session.packets.released):
            self.conn.send(Pubrel(packet_id))
