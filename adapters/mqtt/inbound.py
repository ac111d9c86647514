"""What a client sends towards the core: PUBLISH (stored in batches), PUBREL, SUBSCRIBE and UNSUBSCRIBE.

Everything goes through the connection's `CoreSession`, so the gate decides each publish (a refusal is PUBACK/
PUBREC 0x87 on v5, a closed connection on 3.1.1) and each subscription filter (SUBACK 0x87 on v5, 0x80 on 3.1.1).

PUBLISH batching (the hot path): consecutive PUBLISH packets of one read are checked one by one as they come
(aliases, Receive Maximum, refusals) but stored together: one `publish` call for the batch and one `when_durable`
whose callback sends all their PUBACK/PUBREC in order. Any other packet, any refusal or error, and the end of the
read store the pending batch first, so everything a client sees happens in the order it would one publish at a
time. A batch the core refuses (then nothing of it was stored) is published again one message at a time, so each
bad message gets its own refusal. PUBACK and PUBREC are sent only once the core says the message is durable; QoS 2
packet ids are remembered until PUBREL, so a resent PUBLISH is acknowledged, not published again; a session holds
at most `max_inflight` of them (a client past it is disconnected, v5 with 0x97 Quota exceeded).

SUBSCRIBE: at most `max_filters_per_subscribe` filters per packet and `max_subscriptions_per_session` per session
are taken (the others get 0x97 Quota exceeded, 0x80 on 3.1.1); the session row is written once per packet.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tidegate.core.errors import NotAuthorized, QuotaExceeded, TidegateError
from tidegate.core.model import Message
from tidegate.core.security.gate import Action, Resource

from .errors import reason_for_core_error
from .mapping import (
    PROP_PUBLISHER,
    PublishFields,
    UnmappableName,
    core_address,
    flags_for_qos,
    is_sys_name,
    message_from_publish,
    message_qos,
    stamp_publish,
)
from .packets import (
    MQTT_5,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    RetainHandling,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from .properties import NO_PROPERTIES, UINT16, Properties
from .reason_codes import MqttProtocolError, ReasonCode
from .sessions import Session, SubscriptionEntry
from .state import InboundAliases, ReceiveWindow

if TYPE_CHECKING:
    from .server import MqttProtocol

log = logging.getLogger("tidegate.mqtt")

# (packet, topic name, core message, QoS, packet id); packet None for a plain publish taken by `stage_plain`
# (QoS 0/1, no retain, no properties), whose Publish is only built if it has to be refused
Staged = tuple[Publish | None, str, Message, int, int | None]

_FLAGS_FOR_QOS = (flags_for_qos(0), flags_for_qos(1), flags_for_qos(2))
_TRANSIENT, _PERSISTENT = _FLAGS_FOR_QOS[0], _FLAGS_FOR_QOS[1]
_pack_packet_id = UINT16.pack
# MQTT topic name -> (core topic, subject): publishers repeat their names, and the level encoding is a loop per
# character. Bounded in entries and in the length of the names kept, so it cannot grow with hostile names.
_ADDRESSES: dict[str, tuple[str, str]] = {}
MAX_CACHED_ADDRESSES = 4096
MAX_CACHED_NAME = 256


def plain_message(topic_name: str, payload: bytes, qos: int, retain: bool, publisher: str | None) -> Message:
    """`message_from_publish` for a PUBLISH without properties (every 3.1.1 publish, most v5 ones), with the
    name's core address cached; raises UnmappableName as it does."""
    address = _ADDRESSES.get(topic_name)
    if address is None:
        address = core_address(topic_name)
        if len(topic_name) <= MAX_CACHED_NAME:
            if len(_ADDRESSES) >= MAX_CACHED_ADDRESSES:
                _ADDRESSES.clear()
            _ADDRESSES[topic_name] = address
    return Message(topic=address[0], subject=address[1], body=payload, properties=stamp_publish({}, retain, publisher),
                   flags=_FLAGS_FOR_QOS[qos])


def _window_exceeded() -> MqttProtocolError:
    return MqttProtocolError("more unacknowledged QoS 1/2 publishes than Receive Maximum",
                             ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)


def _packet_of(item: Staged) -> Publish:
    """The PUBLISH a staged item came from (built for a plain publish, which has none, only when refused)."""
    packet, topic, message, qos, packet_id = item
    return packet if packet is not None else Publish(topic, message.body, qos, packet_id=packet_id)


class Inbound:
    """The client-to-core half of one accepted connection."""

    __slots__ = ("conn", "settings", "window", "aliases", "batch", "batch_ids", "known_topic")

    def __init__(self, conn: MqttProtocol) -> None:
        self.conn = conn
        self.settings = settings = conn.settings
        self.window = ReceiveWindow(settings.receive_maximum, enforced=conn.level == MQTT_5)
        self.aliases = InboundAliases(settings.topic_alias_maximum)
        # PUBLISHes of the current read checked but not stored yet; None when empty
        self.batch: list[Staged] | None = None
        self.batch_ids: set[int] | None = None  # their QoS 1/2 packet ids
        self.known_topic = ""  # the core topic of the last publish that passed the topic creation quota
        # the adapter's properties of a plain publish while this batch lasts (the publisher when the session has a
        # No Local subscription): subscriptions change only through a SUBSCRIBE, which stores the batch first

    # ------------------------------------------------------------------------------------------ PUBLISH
    def on_publish(self, packet: Publish) -> None:
        try:
            self._stage(packet)
        except Exception:
            if self.batch is not None:
                self.publish_batch()  # what came before the fault is stored before the connection closes
            raise

    def stage_plain(self, items: list[Any], start: int, stop: int) -> None:
        """The plain PUBLISHes `items[start:stop]` from `MqttCodec.receive_batch` (QoS 0/1, no retain, no DUP, no
        properties), each as `on_publish` would take its `Publish`, without building one: for a name whose core
        address is cached and whose topic passed the topic quota last time. Anything else one of them would meet
        (a packet id already staged, a full window, the server's maximum QoS, a name not seen yet) goes through
        `on_publish` unchanged. A failure is handled as the connection handles a packet's (`handle_error`); the
        rest of the run is dropped once the connection is closed."""
        conn = self.conn
        stats = conn.factory.stats
        window = self.window
        open_ids = window.open_ids()
        limit = window.limit if window.enforced else 0
        maximum_qos = self.settings.maximum_qos
        addresses = _ADDRESSES
        # No Local needs the publisher on every message of this run, whichever path started the batch
        properties = {PROP_PUBLISHER: conn.client_id} if conn.mqtt_session.has_no_local else None  # type: ignore[union-attr]
        for index in range(start, stop):
            topic, packet_id, payload = items[index]
            batch = self.batch
            address = addresses.get(topic)
            try:
                if address is None or address[0] != self.known_topic or (packet_id is not None and (
                        maximum_qos == 0 or (batch is not None and (
                            packet_id in self.batch_ids  # type: ignore[operator]
                            or (limit and packet_id not in open_ids and len(open_ids) >= limit))))):  # full_for
                    self.on_publish(Publish(topic, payload, 0 if packet_id is None else 1, packet_id=packet_id))
                else:
                    if packet_id is not None:
                        open_ids.add(packet_id)  # ReceiveWindow.admit
                        if limit and len(open_ids) > limit:
                            if batch is not None:
                                self.publish_batch()
                            raise _window_exceeded()
                    stats.messages_received += 1
                    if batch is None:
                        self.batch = batch = []
                        self.batch_ids = set()
                    if packet_id is None:
                        batch.append((None, topic, Message(
                            topic=address[0], subject=address[1], body=payload,
                            properties={} if properties is None else properties.copy(), flags=_TRANSIENT), 0, None))
                    else:
                        batch.append((None, topic, Message(
                            topic=address[0], subject=address[1], body=payload,
                            properties={} if properties is None else properties.copy(), flags=_PERSISTENT), 1,
                            packet_id))
                        self.batch_ids.add(packet_id)  # type: ignore[union-attr]
            except Exception as error:
                conn.handle_error(error)
            if conn.state == "closed":
                return

    def _stage(self, packet: Publish) -> None:
        """Check one PUBLISH and add it to the batch of this read (stored by `publish_batch`).

        Every path that answers or refuses the packet at once stores the pending batch first, so the order of
        everything the client sees is that of publishing one packet at a time.
        """
        conn = self.conn
        qos, packet_id = packet.qos, packet.packet_id
        if qos > self.settings.maximum_qos:
            raise MqttProtocolError(f"PUBLISH QoS {qos} above the server maximum", ReasonCode.QOS_NOT_SUPPORTED)
        if packet.retain and not self.settings.retain_available:
            raise MqttProtocolError("retained messages are not available", ReasonCode.RETAIN_NOT_SUPPORTED)
        props = packet.properties
        topic = self.aliases.resolve(packet.topic, props.topic_alias)
        batch = self.batch
        if batch is not None and qos and packet_id in self.batch_ids:  # type: ignore[operator]
            # the same packet id is already staged (a QoS 2 resend, or an id reused): store the batch first so this
            # packet meets the state it would meet one publish at a time (e.g. known QoS 2 id: not stored again)
            if self._publish_batch_now():
                return
            batch = None
        packets = conn.mqtt_session.packets  # type: ignore[union-attr]
        if qos == 2 and packets.qos2_received(packet_id):  # type: ignore[arg-type]
            # a resent PUBLISH: already stored; acknowledge again unless the first PUBREC still waits for the disk
            if packet_id not in self.window.awaiting_durable:
                if batch is not None and self._publish_batch_now():
                    return
                conn.send(Pubrec(packet_id))  # type: ignore[arg-type]
            return
        staged = len(self.batch_ids) if batch is not None and self.batch_ids is not None else 0
        if qos == 2 and len(packets.inbound_qos2) + staged >= self.settings.max_inflight:
            # QoS 2 ids stay until PUBREL and survive reconnects: 3.1.1 has no Receive Maximum and a v5 client can
            # leave up to its window behind at each connection, so the session's unreleased ids are bounded here
            raise MqttProtocolError(f"more than {self.settings.max_inflight} QoS 2 publishes without PUBREL "
                                    "(max_inflight)", ReasonCode.QUOTA_EXCEEDED)
        if qos:
            window = self.window
            if batch is not None and window.full_for(packet_id):  # type: ignore[arg-type]
                # storing the batch may free ids first (refusals; acknowledgements when the flush is async)
                if self._publish_batch_now():
                    return
                batch = None
            window.admit(packet_id)  # type: ignore[arg-type]
        conn.factory.stats.messages_received += 1
        if is_sys_name(topic):
            if batch is not None and self._publish_batch_now():
                return
            self.reject(packet, ReasonCode.NOT_AUTHORIZED, "$SYS topics are written by the broker only")
            return
        try:
            publisher = conn.client_id if conn.mqtt_session.has_no_local else None  # type: ignore[union-attr]
            if props is NO_PROPERTIES:
                message = plain_message(topic, packet.payload, qos, packet.retain, publisher)
            else:
                message = message_from_publish(topic, packet.payload, qos, packet.retain,
                                               PublishFields.from_properties(props),
                                               conn.session.now_ms(), publisher=publisher)  # type: ignore[union-attr]
        except UnmappableName as exc:
            if batch is not None and self._publish_batch_now():
                return
            self.reject(packet, ReasonCode.TOPIC_NAME_INVALID, str(exc))
            return
        if message.topic != self.known_topic and not self._may_create(message.topic):
            if batch is not None and self._publish_batch_now():
                return
            self.reject(packet, ReasonCode.QUOTA_EXCEEDED, "this user may not create more topics")
            return
        if batch is None:
            self.batch = batch = []
            self.batch_ids = set()
        batch.append((packet, topic, message, qos, packet_id))
        if qos:
            self.batch_ids.add(packet_id)  # type: ignore[union-attr, arg-type]

    def _may_create(self, topic: str) -> bool:
        """Whether publishing to core topic `topic` stays within the user's topic creation limit (the core's
        max_topics_created_per_user, shared with every protocol; an existing topic always does). Remembered for
        the next publish, which usually goes to the same topic."""
        core = self.conn.session
        assert core is not None
        try:
            core.admit_new_topic(topic)
        except QuotaExceeded as refused:
            self.conn.factory.client_log.info("topics-quota", "mqtt %s: publish to new topic %s refused: %s",
                                              self.conn.who(), topic, refused.message)
            return False
        self.known_topic = topic
        return True

    def _publish_batch_now(self) -> bool:
        """Store the pending batch in the middle of checking a packet; True if that closed the connection."""
        self.publish_batch()
        return self.conn.state != "connected"

    def drop_batch(self) -> None:
        """The connection closed: packets staged after the fault are not acted on."""
        self.batch = self.batch_ids = None

    def publish_batch(self) -> None:
        """Store the staged PUBLISHes; errors close the connection as they would in the packet's own handler."""
        batch = self.batch
        self.batch = self.batch_ids = None
        if not batch:
            return
        try:
            self._store(batch)
        except Exception as error:
            self.conn.handle_error(error)

    def _store(self, batch: list[Staged]) -> None:
        """One `publish` for the whole batch, then one `when_durable` for all the acknowledgements. A batch the core
        refuses (then nothing of it was stored) is published again one message at a time, so each bad message is
        refused exactly as on its own."""
        conn = self.conn
        core = conn.session
        assert core is not None
        acks: list[tuple[int, int]] = []  # (packet id, QoS) to acknowledge once durable, in publish order
        commit_end = 0
        qos2 = False

        def settle() -> None:
            # register what is acknowledged so far: before a refusal goes out (order) and at the end
            nonlocal acks, qos2
            session = conn.mqtt_session
            if qos2 and session is not None and session.expiry_interval:
                conn.factory.sessions.save(session)
            qos2 = False
            if acks:
                pending, acks = acks, []
                core.when_durable(commit_end, lambda: conn.batched(self.acknowledge, pending))

        def stored(item: Staged, result: Any) -> None:
            nonlocal commit_end, qos2
            if self._stored(item):
                qos = item[3]
                acks.append((item[4], qos))  # type: ignore[arg-type]
                qos2 = qos2 or qos == 2
                commit_end = max(commit_end, result.commit_end)

        try:
            if conn.state != "connected":
                return
            try:
                results = core.publish([item[2] for item in batch])
            except TidegateError:
                # refused: nothing of the batch was stored; one by one, each failure refused on its own
                for item in batch:
                    if conn.state != "connected":
                        return
                    try:
                        result = core.publish([item[2]])[0]
                    except TidegateError as exc:
                        settle()
                        self.reject(_packet_of(item), reason_for_core_error(exc), exc.message)
                        continue
                    stored(item, result)
                return
            for item, result in zip(batch, results, strict=True):
                if item[0] is None:  # plain publish (stage_plain): QoS 0 needs nothing more, QoS 1 a PUBACK
                    if item[3]:
                        acks.append((item[4], 1))  # type: ignore[arg-type]
                        end = result[5]  # SendResult.commit_end
                        if end > commit_end:
                            commit_end = end
                else:
                    stored(item, result)
        finally:
            settle()

    def _stored(self, item: Staged) -> bool:
        """Bookkeeping of one stored publish; True if it is to be acknowledged once durable."""
        packet, topic, message, qos, packet_id = item
        if packet is not None and packet.retain:
            self.conn.factory.retained.set(topic, message)
        if qos == 0:
            return False
        if qos == 2:
            self.conn.mqtt_session.packets.qos2_stored(packet_id)  # type: ignore[union-attr, arg-type]
            self.window.awaiting_durable.add(packet_id)  # type: ignore[arg-type]
        return True

    def acknowledge(self, acks: list[tuple[int, int]]) -> None:
        """The publishes are durable: PUBACK / PUBREC them, in order."""
        conn = self.conn
        if conn.state != "connected":
            return  # the client resends after reconnecting; a QoS 2 resend is recognised by its packet id
        window = self.window
        done = window.open.discard  # ReceiveWindow.done
        chunks: list[bytes] = []
        for packet_id, qos in acks:
            if qos == 1:
                done(packet_id)
                chunks.append(b"\x40\x02" + _pack_packet_id(packet_id))  # encode_puback_success(packet_id)
            else:
                window.awaiting_durable.discard(packet_id)
                chunks.append(conn.codec.encode(Pubrec(packet_id)))
        conn.write_chunks(chunks)  # one write for the batch

    def reject(self, packet: Publish, reason: ReasonCode, text: str) -> None:
        """A publish the broker will not take: v5 says why in PUBACK/PUBREC; 3.1.1 cannot, so it is closed."""
        conn = self.conn
        if packet.qos == 0:
            conn.factory.client_log.info("dropped-qos0", "mqtt %s: dropped QoS 0 publish to %s: %s", conn.who(),
                                         packet.topic, text)
            return
        if conn.level != MQTT_5:
            raise MqttProtocolError(f"publish to {packet.topic!r} refused: {text}", reason)
        packet_id = packet.packet_id
        assert packet_id is not None
        self.window.done(packet_id)
        props = Properties(reason_string=text[:200]) if conn.problem_information else Properties()
        ack = Puback if packet.qos == 1 else Pubrec
        conn.send(ack(packet_id, reason, props))

    def on_pubrel(self, packet: Pubrel) -> None:
        conn = self.conn
        session = conn.mqtt_session
        assert session is not None
        packet_id = packet.packet_id
        self.window.done(packet_id)
        if session.packets.qos2_released(packet_id):
            if session.expiry_interval:
                conn.factory.sessions.save(session)
            conn.send(Pubcomp(packet_id))
        else:
            conn.send(Pubcomp(packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if conn.level == MQTT_5
                              else ReasonCode.SUCCESS))

    # ------------------------------------------------------------------------------------------ SUBSCRIBE
    def on_subscribe(self, packet: Subscribe) -> None:
        conn = self.conn
        session = conn.mqtt_session
        assert session is not None
        identifiers = packet.properties.subscription_identifiers
        identifier = identifiers[0] if identifiers else None
        codes: list[ReasonCode] = []
        added: list[tuple[SubscriptionEntry, bool]] = []
        limit = self.settings.max_filters_per_subscribe
        for index, wanted in enumerate(packet.subscriptions):
            if index >= limit:
                code, entry, existed = ReasonCode.QUOTA_EXCEEDED, None, False
            else:
                code, entry, existed = self._subscribe_one(session, wanted, identifier)
            codes.append(code)
            if entry is not None:
                added.append((entry, existed))
        conn.outbound.subscriptions_changed()
        if len(packet.subscriptions) > limit:
            conn.factory.client_log.info(
                "subscribe-filters-quota", "mqtt %s: %d filters in one SUBSCRIBE; the %d beyond "
                "max_filters_per_subscribe=%d refused", conn.who(), len(packet.subscriptions),
                len(packet.subscriptions) - limit, limit)
        factory = conn.factory
        factory.sessions.save(session)  # once for the packet, however many filters it carried
        conn.send(Suback(packet.packet_id, tuple(codes)))
        core = conn.session
        assert core is not None
        now = core.now_ms()
        for entry, existed in added:
            if is_sys_name(entry.topic_filter):
                factory.sys.send_snapshot(conn, entry)
                continue
            if entry.share or not self.settings.retain_available:
                continue  # retained messages are not sent for shared subscriptions (MQTT-3.8.4 / 4.8.2)
            if entry.retain_handling == RetainHandling.DO_NOT_SEND or (
                    entry.retain_handling == RetainHandling.SEND_ON_NEW_SUBSCRIBE and existed):
                continue
            for name, message in factory.retained.matching(entry.topic_filter, now):
                if not core.may(Action.SUB, Resource.topic(name)):
                    continue  # retained messages do not pass the core: each is read-checked like a live one
                conn.outbound.offer_retained(name, message, min(message_qos(message.flags), entry.qos),
                                             (entry.identifier,) if entry.identifier else ())

    def _subscribe_one(self, session: Session, wanted: Any,
                       identifier: int | None) -> tuple[ReasonCode, SubscriptionEntry | None, bool]:
        conn = self.conn
        settings = self.settings
        share = wanted.shared
        inner = share[1] if share else wanted.topic_filter
        if share and not settings.shared_subscription_available:
            return ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, None, False
        if ("+" in inner or "#" in inner) and not settings.wildcard_subscription_available:
            return ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED, None, False
        if identifier is not None and not settings.subscription_identifiers_available:
            return ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, None, False
        if wanted.topic_filter not in session.subscriptions \
                and len(session.subscriptions) >= settings.max_subscriptions_per_session:
            conn.factory.client_log.info(
                "subscriptions-quota", "mqtt %s: subscription to %s refused: the session has %d subscriptions "
                "(max_subscriptions_per_session)", conn.who(), wanted.topic_filter, len(session.subscriptions))
            return ReasonCode.QUOTA_EXCEEDED, None, False
        granted = min(wanted.qos, settings.maximum_qos)
        entry = SubscriptionEntry(wanted.topic_filter, granted, wanted.no_local, wanted.retain_as_published,
                                  int(wanted.retain_handling), identifier, share)
        sessions = conn.factory.sessions
        core = conn.session
        assert core is not None
        try:
            existed = sessions.add_subscription(session, entry, core, save=False)
            if share:
                conn.outbound.open_share(entry)
            else:
                conn.outbound.open_session_queue()
        except TidegateError as exc:
            conn.factory.client_log.info("subscription-refused", "mqtt %s: subscription to %s refused: %s",
                                         conn.who(), wanted.topic_filter, str(exc))
            sessions.remove_subscription(session, wanted.topic_filter, core, save=False)
            if isinstance(exc, NotAuthorized):
                return ReasonCode.NOT_AUTHORIZED, None, False  # 3.1.1: the codec sends 0x80
            if isinstance(exc, QuotaExceeded):
                return ReasonCode.QUOTA_EXCEEDED, None, False  # subscriptions per session (core limits)
            return ReasonCode.UNSPECIFIED_ERROR, None, False
        if is_sys_name(entry.topic_filter):
            conn.outbound.add_sys_filter(entry)
        return ReasonCode(granted), entry, existed

    def on_unsubscribe(self, packet: Unsubscribe) -> None:
        conn = self.conn
        session = conn.mqtt_session
        assert session is not None
        codes: list[ReasonCode] = []
        removed = False
        for topic_filter in packet.topic_filters:
            entry = conn.factory.sessions.remove_subscription(session, topic_filter, conn.session, save=False)
            if entry is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            removed = True
            codes.append(ReasonCode.SUCCESS)
            if entry.share_topic is not None and not any(
                    e.share_topic == entry.share_topic for e in session.subscriptions.values()):
                conn.outbound.close_subscription(entry.share_topic)
            if is_sys_name(topic_filter):
                conn.outbound.remove_sys_filter(topic_filter)
        conn.outbound.subscriptions_changed()
        if removed:
            conn.factory.sessions.save(session)  # once for the packet
        conn.send(Unsuback(packet.packet_id, tuple(codes) if conn.level == MQTT_5 else ()))
