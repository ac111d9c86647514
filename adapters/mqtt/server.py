"""The MQTT 3.1 / 3.1.1 / 5.0 adapter: one thin Twisted protocol per connection over the core broker.

`dataReceived` feeds the sans-IO codec; each packet goes to one handler that makes core calls; every packet the
server sends goes through `_send` into one buffer written with `transport.writeSequence` once per batch.

Mapping onto the core (see mapping.py for names, sessions.py for sessions and shares, retained.py):
- A publish becomes one core message (QoS 0 TRANSIENT, QoS 1 PERSISTENT, QoS 2 PERSISTENT|EXACTLY_ONCE); PUBACK and
  PUBREC are sent only once the core says the message is durable (`broker.when_durable`). QoS 2 packet ids are
  remembered until PUBREL, so a duplicate PUBLISH is acknowledged, not published again.
- Consecutive PUBLISH packets of one `dataReceived` are checked one by one as they come (aliases, Receive Maximum,
  refusals) but stored together: one `broker.publish` per run of the same core topic and one `when_durable` whose
  callback sends all their PUBACK/PUBREC in order. Any other packet, any refusal or error, and the end of the read
  store the pending batch first, so everything a client sees happens in the order it would one publish at a time.
  A batch the core refuses is published again one message at a time, so each bad message gets its own refusal.
- Delivery: the session queue (and each shared-subscription queue) is consumed through a core Subscription in
  per-message ack mode. Each delivery is re-matched against the session's filters for QoS (min of message and
  subscription), subscription identifiers, No Local, Retain As Published and the `$` rule. QoS 0 deliveries are
  acked to the core at once; QoS 1 on PUBACK; QoS 2 on PUBREC (from then on the client owns the message and only the
  PUBREL/PUBCOMP exchange remains, which the session keeps and resends on reconnect: acking on PUBCOMP instead would
  redeliver a message the client already released).

Flow control and memory (slow subscribers):
- Core credit of each subscription = the client's Receive Maximum (v5, capped by `max_inflight`) or
  `settings.receive_maximum` (3.1.1). Credit comes back when a message leaves the connection's hands (PUBACK,
  PUBCOMP, a QoS 0 write, a drop), so at most that many messages per subscription are in memory; the rest wait on
  disk in the session queue.
- The connection is a push producer of its transport: while the socket's write buffer is full, credit of QoS 0
  writes is held back, so a slow reader stops the core instead of growing the buffer.
- Clean sessions (expiry 0): when more than `max_queued_messages` wait in the session queue, QoS 0 messages are
  dropped instead of delivered (QoS 1/2 stay queued on disk; the backlog never grows memory).
- A message bigger than the client's Maximum Packet Size is dropped (acked to the core), as MQTT 5 requires.

Errors: an `MqttProtocolError` from the codec or a handler closes the connection: v5 gets DISCONNECT (or CONNACK
before the connection is accepted) with the reason code, 3.1.1 gets CONNACK where 3.1.1 has a code, else just the
close. One log line per closed connection; never a traceback to the client.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tidegate.adapters.transport import disable_nagle
from tidegate.core.api import Delivered
from tidegate.core.errors import ErrorCode, TidegateError
from tidegate.core.model import Message

from .codec import (
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MqttCodec,
    MqttProtocolError,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    RetainHandling,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    topic_matches,
)
from .mapping import (
    PROP_PUBLISHER,
    PROP_RETAIN,
    PublishFields,
    UnmappableName,
    build_message,
    is_sys_name,
    message_qos,
    mqtt_topic_name,
    publish_fields,
)
from .reason_codes import CONNACK_REASON_CODES, DISCONNECT_REASON_CODES
from .retained import RetainedStore
from .sessions import PendingWill, Session, SessionManager, SubscriptionEntry
from .settings import MqttSettings
from .sys_topics import SysTopics

log = logging.getLogger("tidegate.mqtt")

__all__ = ["MqttProtocol", "MqttServerFactory", "MqttSettings"]

_PROTOCOL_LABEL = "mqtt"
_UNLIMITED = 1 << 30

_REASON_FOR_CORE_ERROR = {
    ErrorCode.NO_PERMISSION: ReasonCode.NOT_AUTHORIZED,
    ErrorCode.NOT_AUTHORIZED: ReasonCode.NOT_AUTHORIZED,
    ErrorCode.INVALID_NAME: ReasonCode.TOPIC_NAME_INVALID,
    ErrorCode.TOPIC_NOT_FOUND: ReasonCode.TOPIC_NAME_INVALID,
    ErrorCode.MESSAGE_TOO_LARGE: ReasonCode.QUOTA_EXCEEDED,
    ErrorCode.STORE_FULL: ReasonCode.QUOTA_EXCEEDED,
}


@dataclass(slots=True)
class _Outgoing:
    """A message decided for this client, waiting for (or going through) transmission."""

    topic_name: str
    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...]
    sub_key: str | None  # queue topic of the core subscription it came from; None for retained messages
    delivered: Delivered | None


@dataclass(slots=True)
class _Inflight:
    sub_key: str | None
    receipt: str
    qos: int
    sent_key: tuple[str, int] | None


class _CoreSink:
    """The DeliverySink of one core subscription of a connection (the session queue or one shared queue)."""

    __slots__ = ("protocol", "key")

    def __init__(self, protocol: MqttProtocol, key: str) -> None:
        self.protocol = protocol
        self.key = key

    def deliver(self, deliveries: list[Delivered]) -> None:
        self.protocol._on_deliveries(self.key, deliveries)

    def assignment_changed(self, queues: list[Any]) -> None:
        pass


@implementer(IPushProducer)
class MqttProtocol(Protocol):
    def __init__(self, factory: MqttServerFactory, addr: Any = None) -> None:
        self.factory = factory
        self.broker = factory.broker
        self.clock = factory.clock
        self.settings = factory.settings
        self.peer = str(addr) if addr is not None else "?"
        self.codec = MqttCodec(max_packet_size=self.settings.max_packet_size)
        self.state = "new"  # new -> connected -> closed
        self.level = 4
        self.client_id = ""
        self.session: Session | None = None
        self._out: list[bytes] = []
        self._counted = False
        self._will: PendingWill | None = None
        self._will_delay = 0
        self._keep_alive = 0
        self._last_seen = 0.0
        self._keep_alive_call: Any = None
        self._connect_timer: Any = None
        self._client_receive_max = self.settings.receive_maximum
        self._client_max_packet = _UNLIMITED
        self._client_alias_max = 0
        self._problem_info = True
        self._inbound_aliases: dict[int, str] = {}
        self._outbound_aliases: dict[str, int] = {}
        self._inbound_open: set[int] = set()  # QoS 1/2 publishes not fully acknowledged (our Receive Maximum)
        self._awaiting_durable: set[int] = set()  # QoS 2 ids whose PUBREC waits for the disk
        self._core_subs: dict[str, Any] = {}
        self._inflight: dict[int, _Inflight] = {}
        self._pending: list[_Outgoing] = []  # a list: an idle connection should not carry a deque's block
        self._next_packet_id = 1
        self._paused = False
        self._held_credit: dict[str, int] = {}
        self._sys_filters: list[SubscriptionEntry] = []
        # PUBLISHes of the current read checked but not stored yet: (packet, topic name, message); None when empty
        self._batch: list[tuple[Publish, str, Message]] | None = None
        self._batch_ids: set[int] | None = None  # their QoS 1/2 packet ids

    # ------------------------------------------------------------------------------------------ transport
    def connectionMade(self) -> None:
        metrics = self.broker.metrics
        metrics.connections[_PROTOCOL_LABEL] += 1
        metrics.connections_total[_PROTOCOL_LABEL] += 1
        self._counted = True
        disable_nagle(self.transport)
        self.factory.connections.add(self)
        self._last_seen = self.clock.seconds()
        if self.settings.connect_timeout > 0:
            self._connect_timer = self.clock.callLater(self.settings.connect_timeout, self._connect_timed_out)
        try:
            self.transport.registerProducer(self, True)
        except (AttributeError, RuntimeError):
            pass  # a transport without producer support (some wrappers): no back-pressure on QoS 0

    def dataReceived(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self._last_seen = self.clock.seconds()
        try:
            try:
                packets = self.codec.receive_data(data)
            except MqttProtocolError as error:
                if self._handle_all(error.packets_before_error):
                    return
                self._fail(error)
                return
            self._handle_all(packets)
        finally:
            self._flush()

    def _handle_all(self, packets: list[Any]) -> bool:
        """Handle the packets of one read in order, storing staged PUBLISHes before any other packet and at the end;
        True if the connection was closed."""
        publish = Publish
        for packet in packets:
            if self._batch is not None and type(packet) is not publish:
                self._publish_batch()
                if self.state == "closed":
                    return True
            self._handle(packet)
            if self.state == "closed":
                self._batch = self._batch_ids = None  # packets after a close are not acted on
                return True
        if self._batch is not None:
            self._publish_batch()
            return self.state == "closed"
        return False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted:
            self.broker.metrics.connections[_PROTOCOL_LABEL] -= 1
            self._counted = False
        self.factory.connections.discard(self)
        if self.state != "closed":
            self._end(send_will=True)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        held, self._held_credit = self._held_credit, {}
        for key, credit in held.items():
            sub = self._core_subs.get(key)
            if sub is not None and not sub.closed:
                sub.grant(credit)

    def stopProducing(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------ output
    def _send(self, packet: Any) -> None:
        self._out.append(self.codec.encode(packet))

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            if self.transport is not None:
                self.transport.writeSequence(out)

    def _close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.loseConnection()

    def _who(self) -> str:
        return f"client {self.client_id!r} ({self.peer})" if self.client_id else f"connection {self.peer}"

    # ------------------------------------------------------------------------------------------ errors
    def _fail(self, error: MqttProtocolError) -> None:
        """Close the connection for a protocol fault, telling the client why where its protocol level can."""
        if self.state == "closed":
            return
        log.info("mqtt %s: closing: %s", self._who(), error)
        if self.state == "new":
            self._refuse(error.reason_code, error.protocol_level, error.message)
            return
        self._disconnect(error.reason_code, error.message)

    def _refuse(self, reason: ReasonCode, level: int | None, text: str = "") -> None:
        """Answer a CONNECT that cannot be accepted, then close (no session, no will)."""
        self.state = "closed"
        self._cancel_timers()
        if level == MQTT_5:
            code = reason if reason in CONNACK_REASON_CODES else ReasonCode.UNSPECIFIED_ERROR
            self.codec.protocol_level = MQTT_5
            props = Properties(reason_string=text[:200]) if text and self._problem_info else Properties()
            self._send(Connack(False, code, props))
        elif level in (3, 4) or reason == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            # 3.1.1 has return codes only for these; other faults just close (MQTT-3.2.2-6)
            if reason in (ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                          ReasonCode.SERVER_UNAVAILABLE, ReasonCode.SERVER_SHUTTING_DOWN,
                          ReasonCode.BAD_USER_NAME_OR_PASSWORD, ReasonCode.BAD_AUTHENTICATION_METHOD,
                          ReasonCode.NOT_AUTHORIZED):
                self.codec.protocol_level = level if level in (3, 4) else 4
                self._send(Connack(False, reason))
        self._close()

    def _disconnect(self, reason: ReasonCode, text: str = "", send_will: bool = True) -> None:
        """Server-side close of an accepted connection (DISCONNECT with a reason for v5)."""
        if self.state == "closed":
            return
        if self.level == MQTT_5:
            code = reason if reason in DISCONNECT_REASON_CODES else ReasonCode.UNSPECIFIED_ERROR
            props = Properties(reason_string=text[:200]) if text and self._problem_info else Properties()
            try:
                self._send(Disconnect(code, props))
            except MqttProtocolError:
                self._send(Disconnect(code))
        self._end(send_will=send_will)
        self._close()

    # ------------------------------------------------------------------------------------------ dispatch
    def _handle(self, packet: Any) -> None:
        handler = self._HANDLERS.get(type(packet))
        try:
            if handler is None:
                raise MqttProtocolError(f"unexpected {type(packet).__name__}", ReasonCode.PROTOCOL_ERROR)
            handler(self, packet)
        except Exception as error:
            self._handle_error(error)

    def _handle_error(self, error: Exception) -> None:
        """A handler failed (called inside its `except` block): close the connection as its kind of error asks."""
        if isinstance(error, MqttProtocolError):
            self._fail(error)
        elif isinstance(error, TidegateError):
            log.info("mqtt %s: closing: core refused: %s", self._who(), error)
            self._fail_code(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, error.message)
        else:
            log.exception("mqtt %s: internal error; closing the connection", self._who())
            self._fail_code(ReasonCode.UNSPECIFIED_ERROR, "internal error")

    def _fail_code(self, reason: ReasonCode, text: str) -> None:
        if self.state == "new":
            self._refuse(reason, self.level, text)
        else:
            self._disconnect(reason, text)

    # ------------------------------------------------------------------------------------------ CONNECT
    def _on_connect(self, packet: Connect) -> None:
        settings = self.settings
        self.level = level = packet.protocol_level
        props = packet.properties
        if props.request_problem_information is False:
            self._problem_info = False
        if props.authentication_method is not None:
            self._refuse(ReasonCode.BAD_AUTHENTICATION_METHOD, level, "enhanced authentication is not configured")
            log.info("mqtt connection %s: refused: authentication method %r not supported", self.peer,
                     props.authentication_method)
            return
        will = packet.will
        if will is not None:
            if will.qos > settings.maximum_qos:
                self._refuse(ReasonCode.QOS_NOT_SUPPORTED, level, "will QoS above the server maximum")
                return
            if will.retain and not settings.retain_available:
                self._refuse(ReasonCode.RETAIN_NOT_SUPPORTED, level, "retained messages are not available")
                return
        client_id = packet.client_id
        assigned = None
        if not client_id:
            if not settings.allow_empty_client_id or (not packet.clean_start and level < MQTT_5) \
                    or (not packet.clean_start and level == MQTT_5) or level == 3:
                self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, level, "empty client identifier")
                log.info("mqtt connection %s: refused: empty client identifier", self.peer)
                return
            client_id = assigned = self.factory.assign_client_id()
        self.client_id = client_id
        if level == MQTT_5:
            expiry = props.session_expiry_interval or 0
        else:
            expiry = 0 if packet.clean_start else settings.persistent_session_expiry
        granted_expiry = min(expiry, settings.session_expiry_max)

        sessions = self.factory.sessions
        existing = sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            existing.connection.take_over()
            existing = sessions.get(client_id)  # ended if its expiry was 0
        if existing is not None and packet.clean_start:
            sessions.destroy(existing)
            existing = None
        session_present = existing is not None
        session = existing if existing is not None else sessions.create(client_id, level, granted_expiry)
        sessions.attach(session, self)
        session.protocol_level = level
        session.expiry_interval = granted_expiry
        sessions.save(session)
        self.session = session

        if level == MQTT_5:
            self._client_receive_max = min(props.receive_maximum or 65535, settings.max_inflight)
            self._client_max_packet = props.maximum_packet_size or _UNLIMITED
            self._client_alias_max = props.topic_alias_maximum or 0
        keep_alive = packet.keep_alive
        server_keep_alive = None
        if level == MQTT_5:
            if settings.server_keep_alive is not None:
                server_keep_alive = keep_alive = settings.server_keep_alive
            elif keep_alive == 0 or keep_alive > settings.max_keep_alive:
                server_keep_alive = keep_alive = settings.max_keep_alive
        self._keep_alive = keep_alive
        if will is not None:
            self._will = PendingWill(will, level)
            self._will_delay = will.properties.will_delay_interval or 0

        connack_props = Properties()
        if level == MQTT_5:
            connack_props = Properties(
                session_expiry_interval=granted_expiry if granted_expiry != expiry else None,
                receive_maximum=settings.receive_maximum,
                maximum_qos=settings.maximum_qos if settings.maximum_qos < 2 else None,
                retain_available=None if settings.retain_available else False,
                maximum_packet_size=settings.max_packet_size,
                assigned_client_identifier=assigned,
                topic_alias_maximum=settings.topic_alias_maximum or None,
                wildcard_subscription_available=None if settings.wildcard_subscription_available else False,
                subscription_identifier_available=None if settings.subscription_identifiers_available else False,
                shared_subscription_available=None if settings.shared_subscription_available else False,
                server_keep_alive=server_keep_alive,
            )
        self._send(Connack(session_present, ReasonCode.SUCCESS, connack_props))
        self.state = "connected"
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        if keep_alive:
            self._keep_alive_call = self.clock.callLater(keep_alive * 1.5, self._check_keep_alive)
        self.factory.stats.clients_total += 1

        for packet_id in sorted(session.released):
            self._send(Pubrel(packet_id))
        if session_present or session.subscriptions:
            # a fresh session has nothing queued until its first SUBSCRIBE binds a filter: attach to the core
            # then, so idle connections (sensors that only publish) hold no consumer state
            self._open_session_queue()
        for entry in session.subscriptions.values():
            if entry.share:
                self._open_share(entry)
            elif is_sys_name(entry.topic_filter):
                self._sys_filters.append(entry)
        if self._sys_filters:
            self.factory.sys.listeners.add(self)
        log.debug("mqtt %s connected (level %d, session present %s)", self._who(), level, session_present)

    def _open_session_queue(self) -> None:
        session = self.session
        assert session is not None
        self._open_core_subscription(session.topic, session.topic, session.topic,
                                     max(0, self._client_receive_max - len(session.released)))

    def _open_core_subscription(self, key: str, group: str, topic: str, credit: int) -> None:
        if key in self._core_subs:
            return
        sub = self.broker.subscribe(group, topic, _CoreSink(self, key), client_id=self.client_id,
                                    mode="clustering", ack="message", invisible_ms=0, start="earliest",
                                    max_attempts=self.settings.max_delivery_attempts)
        self._core_subs[key] = sub
        if credit:
            sub.grant(credit)

    def _open_share(self, entry: SubscriptionEntry) -> None:
        topic = entry.share_topic
        assert topic is not None
        self._open_core_subscription(topic, self.factory.sessions.share_group_of(entry), topic,
                                     self._client_receive_max)

    def take_over(self) -> None:
        """Another connection uses this client id: close this one (v5: DISCONNECT 0x8E) and release the session."""
        log.info("mqtt %s: session taken over by a new connection", self._who())
        self._disconnect(ReasonCode.SESSION_TAKEN_OVER, "another connection uses this client identifier")
        self._flush()

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if self.state == "new":
            log.info("mqtt connection %s: no CONNECT within %ss; closing", self.peer, self.settings.connect_timeout)
            self.state = "closed"
            self._close()

    def _check_keep_alive(self) -> None:
        self._keep_alive_call = None
        if self.state != "connected":
            return
        limit = self._keep_alive * 1.5
        idle = self.clock.seconds() - self._last_seen
        if idle >= limit:
            log.info("mqtt %s: keep alive timeout (%.1fs without a packet)", self._who(), idle)
            try:
                self._disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
            finally:
                self._flush()
            return
        self._keep_alive_call = self.clock.callLater(limit - idle, self._check_keep_alive)

    def _cancel_timers(self) -> None:
        for name in ("_keep_alive_call", "_connect_timer"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def _end(self, send_will: bool) -> None:
        """Leave the session: close core subscriptions (releasing in-flight messages) and hand it back."""
        was_connected = self.state == "connected"
        self.state = "closed"
        self._cancel_timers()
        self.factory.sys.listeners.discard(self)
        subs, self._core_subs = self._core_subs, {}
        for sub in subs.values():
            sub.close()
        self._pending.clear()
        self._inflight.clear()
        session = self.session
        if not was_connected or session is None or session.connection is not self:
            return
        will = self._will if send_will else None
        self.factory.sessions.detach(session, will, self._will_delay)

    # ------------------------------------------------------------------------------------------ inbound PUBLISH
    def _on_publish(self, packet: Publish) -> None:
        try:
            self._stage_publish(packet)
        except Exception:
            if self._batch is not None:
                self._publish_batch()  # what came before the fault is stored before the connection closes
            raise

    def _stage_publish(self, packet: Publish) -> None:
        """Check one PUBLISH and add it to the batch of this read (stored by `_publish_batch`).

        Every path that answers or refuses the packet at once stores the pending batch first, so the order of
        everything the client sees is that of publishing one packet at a time.
        """
        session = self.session
        assert session is not None
        qos, packet_id = packet.qos, packet.packet_id
        if qos > self.settings.maximum_qos:
            raise MqttProtocolError(f"PUBLISH QoS {qos} above the server maximum", ReasonCode.QOS_NOT_SUPPORTED)
        if packet.retain and not self.settings.retain_available:
            raise MqttProtocolError("retained messages are not available", ReasonCode.RETAIN_NOT_SUPPORTED)
        topic = packet.topic
        props = packet.properties
        alias = props.topic_alias
        if alias is not None:
            if alias > self.settings.topic_alias_maximum:
                raise MqttProtocolError(f"topic alias {alias} above the maximum", ReasonCode.TOPIC_ALIAS_INVALID)
            if topic:
                self._inbound_aliases[alias] = topic
            else:
                known = self._inbound_aliases.get(alias)
                if known is None:
                    raise MqttProtocolError(f"topic alias {alias} is not set", ReasonCode.PROTOCOL_ERROR)
                topic = known
        batch = self._batch
        if batch is not None and qos and packet_id in self._batch_ids:  # type: ignore[operator]
            # the same packet id is already staged (a QoS 2 resend, or an id reused): store the batch first so this
            # packet meets the state it would meet one publish at a time (e.g. known QoS 2 id: not stored again)
            if self._publish_batch_now():
                return
            batch = None
        if qos == 2 and packet_id in session.inbound_qos2:
            # a resent PUBLISH: already stored; acknowledge again unless the first PUBREC still waits for the disk
            if packet_id not in self._awaiting_durable:
                if batch is not None and self._publish_batch_now():
                    return
                self._send(Pubrec(packet_id))
            return
        if qos:
            inbound_open = self._inbound_open
            if batch is not None and self.level == MQTT_5 and packet_id not in inbound_open \
                    and len(inbound_open) >= self.settings.receive_maximum:
                # storing the batch may free ids first (refusals; acknowledgements when the flush is async)
                if self._publish_batch_now():
                    return
                batch = None
            inbound_open.add(packet_id)  # type: ignore[arg-type]
            if len(inbound_open) > self.settings.receive_maximum and self.level == MQTT_5:
                raise MqttProtocolError("more unacknowledged QoS 1/2 publishes than Receive Maximum",
                                        ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
        self.factory.stats.messages_received += 1
        if is_sys_name(topic):
            if batch is not None and self._publish_batch_now():
                return
            self._reject_publish(packet, ReasonCode.NOT_AUTHORIZED, "$SYS topics are written by the broker only")
            return
        fields = PublishFields(props.payload_format_indicator, props.message_expiry_interval, props.content_type,
                               props.response_topic, props.correlation_data, props.user_properties)
        try:
            message = build_message(topic, packet.payload, qos, packet.retain, fields, self.broker.now_ms(),
                                    publisher=self.client_id if session.has_no_local else None)
        except UnmappableName as exc:
            if batch is not None and self._publish_batch_now():
                return
            self._reject_publish(packet, ReasonCode.TOPIC_NAME_INVALID, str(exc))
            return
        if batch is None:
            self._batch = batch = []
            self._batch_ids = set()
        batch.append((packet, topic, message))
        if qos:
            self._batch_ids.add(packet_id)  # type: ignore[union-attr, arg-type]

    def _publish_batch_now(self) -> bool:
        """Store the pending batch in the middle of checking a packet; True if that closed the connection."""
        self._publish_batch()
        return self.state != "connected"

    def _publish_batch(self) -> None:
        """Store the staged PUBLISHes; errors close the connection as they would in the packet's own handler."""
        batch = self._batch
        self._batch = self._batch_ids = None
        if not batch:
            return
        try:
            self._store_batch(batch)
        except Exception as error:
            self._handle_error(error)

    def _store_batch(self, batch: list[tuple[Publish, str, Message]]) -> None:
        """One `broker.publish` for the whole batch, then one `when_durable` for all the acknowledgements. A batch
        the core refuses (then nothing of it was stored) is published again one message at a time, so each bad
        message is refused exactly as on its own."""
        broker = self.broker
        acks: list[tuple[int, int]] = []  # (packet id, QoS) to acknowledge once durable, in publish order
        commit_end = 0
        qos2 = False

        def settle() -> None:
            # register what is acknowledged so far: before a refusal goes out (order) and at the end
            nonlocal acks, qos2
            session = self.session
            if qos2 and session is not None and session.expiry_interval:
                self.factory.sessions.save(session)
            qos2 = False
            if acks:
                pending, acks = acks, []
                broker.when_durable(commit_end, lambda: self._acknowledge_publishes(pending))

        def stored(item: tuple[Publish, str, Message], result: Any) -> None:
            nonlocal commit_end, qos2
            packet = item[0]
            if self._stored(item):
                acks.append((packet.packet_id, packet.qos))  # type: ignore[arg-type]
                qos2 = qos2 or packet.qos == 2
                commit_end = max(commit_end, result.commit_end)

        try:
            if self.state != "connected":
                return
            try:
                results = broker.publish([item[2] for item in batch])
            except TidegateError:
                # refused: nothing of the batch was stored; one by one, each failure refused on its own
                for item in batch:
                    if self.state != "connected":
                        return
                    try:
                        result = broker.publish([item[2]])[0]
                    except TidegateError as exc:
                        settle()
                        self._refuse_stored(item[0], exc)
                        continue
                    stored(item, result)
                return
            for item, result in zip(batch, results, strict=True):
                stored(item, result)
        finally:
            settle()

    def _refuse_stored(self, packet: Publish, exc: TidegateError) -> None:
        self._reject_publish(packet, _REASON_FOR_CORE_ERROR.get(exc.code, ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR),
                             exc.message)

    def _stored(self, item: tuple[Publish, str, Message]) -> bool:
        """Bookkeeping of one stored publish; True if it is to be acknowledged once durable."""
        packet, topic, message = item
        if packet.retain:
            self.factory.retained.set(topic, message)
        qos = packet.qos
        if qos == 0:
            return False
        if qos == 2:
            packet_id = packet.packet_id
            self.session.inbound_qos2.add(packet_id)  # type: ignore[union-attr, arg-type]
            self._awaiting_durable.add(packet_id)  # type: ignore[arg-type]
        return True

    def _acknowledge_publishes(self, acks: list[tuple[int, int]]) -> None:
        if self.state != "connected":
            return  # the client resends after reconnecting; a QoS 2 resend is recognised by its packet id
        try:
            for packet_id, qos in acks:
                if qos == 1:
                    self._inbound_open.discard(packet_id)
                    self._send(Puback(packet_id))
                else:
                    self._awaiting_durable.discard(packet_id)
                    self._send(Pubrec(packet_id))
        finally:
            self._flush()

    def _reject_publish(self, packet: Publish, reason: ReasonCode, text: str) -> None:
        """A publish the broker will not take: v5 says why in PUBACK/PUBREC; 3.1.1 cannot, so it is closed."""
        if packet.qos == 0:
            log.info("mqtt %s: dropped QoS 0 publish to %r: %s", self._who(), packet.topic, text)
            return
        if self.level != MQTT_5:
            raise MqttProtocolError(f"publish to {packet.topic!r} refused: {text}", reason)
        packet_id = packet.packet_id
        assert packet_id is not None
        self._inbound_open.discard(packet_id)
        props = Properties(reason_string=text[:200]) if self._problem_info else Properties()
        ack = Puback if packet.qos == 1 else Pubrec
        self._send(ack(packet_id, reason, props))

    def _on_pubrel(self, packet: Pubrel) -> None:
        session = self.session
        assert session is not None
        packet_id = packet.packet_id
        self._inbound_open.discard(packet_id)
        if packet_id in session.inbound_qos2:
            session.inbound_qos2.discard(packet_id)
            if session.expiry_interval:
                self.factory.sessions.save(session)
            self._send(Pubcomp(packet_id))
        else:
            self._send(Pubcomp(packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.level == MQTT_5
                               else ReasonCode.SUCCESS))

    # ------------------------------------------------------------------------------------------ outbound
    def _on_deliveries(self, key: str, deliveries: list[Delivered]) -> None:
        try:
            for delivered in deliveries:
                if self.state != "connected":
                    return  # the core subscription was closed; the core redelivers unacked messages
                outgoing = self._decide(key, delivered)
                if outgoing is not None:
                    self._offer(outgoing)
        finally:
            self._flush()

    def _decide(self, key: str, delivered: Delivered) -> _Outgoing | None:
        """Which of this client's subscriptions want the message and how; None (and acked) if none does."""
        session = self.session
        assert session is not None
        message = delivered.message
        name = mqtt_topic_name(message.topic, message.subject)
        matches: list[SubscriptionEntry] = []
        if name is not None:
            candidates = session.matching_subscriptions(name)
            if key == session.topic:
                matches = [e for e in candidates if e.share is None]
            else:
                matches = [e for e in candidates if e.share is not None and e.share_topic == key]
            publisher = message.properties.get(PROP_PUBLISHER) if message.properties else None
            if publisher is not None and publisher == self.client_id:
                matches = [e for e in matches if not e.no_local]
        if not matches:
            self._finish(key, delivered)
            return None
        qos = min(message_qos(message.flags), max(e.qos for e in matches))
        if qos == 0 and session.expiry_interval == 0 and self.settings.max_queued_messages:
            backlog = self.broker.queue_offsets(delivered.queue)[1] - delivered.queue_offset - 1
            if backlog > self.settings.max_queued_messages:
                self._finish(key, delivered)
                return None
        retain = bool(message.properties) and PROP_RETAIN in message.properties \
            and any(e.retain_as_published for e in matches)
        ids = tuple(sorted({e.identifier for e in matches if e.identifier}))
        return _Outgoing(name, message, qos, retain, ids, key, delivered)  # type: ignore[arg-type]

    def _offer(self, outgoing: _Outgoing) -> None:
        if self._pending or (outgoing.qos and self._in_flight_count() >= self._client_receive_max):
            self._pending.append(outgoing)
            return
        self._transmit(outgoing)

    def _in_flight_count(self) -> int:
        return len(self._inflight) + len(self.session.released) if self.session is not None else 0

    def _drain_pending(self) -> None:
        pending = self._pending
        sent = 0
        while sent < len(pending) and self.state == "connected":
            if pending[sent].qos and self._in_flight_count() >= self._client_receive_max:
                break
            sent += 1
            self._transmit(pending[sent - 1])
        del pending[:sent]

    def _transmit(self, outgoing: _Outgoing) -> None:
        session = self.session
        assert session is not None
        fields = publish_fields(outgoing.message, self.broker.now_ms())
        if fields is None:  # expired while queued
            self._release(outgoing)
            return
        qos = outgoing.qos
        packet_id = None
        dup = False
        sent_key = None
        delivered = outgoing.delivered
        if qos:
            if delivered is not None:
                sent_key = (delivered.queue.topic, delivered.queue_offset)
                packet_id = session.sent.get(sent_key)
                dup = packet_id is not None or delivered.attempt > 1
            if packet_id is None:
                packet_id = self._allocate_packet_id()
        data = self._encode_publish(outgoing, fields, packet_id, dup)
        if data is None:
            log.info("mqtt %s: dropped a %d-byte message on %r: larger than the client's Maximum Packet Size",
                     self._who(), len(outgoing.message.body), outgoing.topic_name)
            self._release(outgoing)
            return
        self._out.append(data)
        self.factory.stats.messages_sent += 1
        if not qos:
            self._release(outgoing)
            return
        assert packet_id is not None
        self._inflight[packet_id] = _Inflight(outgoing.sub_key, delivered.receipt if delivered else "", qos,
                                              sent_key)
        if sent_key is not None:
            session.sent[sent_key] = packet_id
            session.sent_ids.add(packet_id)

    def _encode_publish(self, outgoing: _Outgoing, fields: PublishFields, packet_id: int | None,
                        dup: bool) -> bytes | None:
        topic = outgoing.topic_name
        payload = outgoing.message.body
        if self.level != MQTT_5:
            return self.codec.encode(Publish(topic, payload, outgoing.qos, outgoing.retain, dup, packet_id))
        alias = self._outbound_aliases.get(topic)
        new_alias = None
        send_topic = topic
        if alias is not None:
            send_topic = ""
        elif len(self._outbound_aliases) < self._client_alias_max:
            alias = new_alias = len(self._outbound_aliases) + 1
        try:
            props = self._publish_properties(fields, alias, outgoing.subscription_ids)
        except MqttProtocolError:
            # a property another protocol set that MQTT cannot carry (e.g. U+0000): send the message without them
            props = Properties(topic_alias=alias, subscription_identifiers=outgoing.subscription_ids,
                               message_expiry_interval=fields.message_expiry_interval)
        data = self.codec.encode(Publish(send_topic, payload, outgoing.qos, outgoing.retain, dup, packet_id, props))
        if len(data) > self._client_max_packet:
            return None
        if new_alias is not None:
            self._outbound_aliases[topic] = new_alias
        return data

    @staticmethod
    def _publish_properties(fields: PublishFields, alias: int | None, ids: tuple[int, ...]) -> Properties:
        return Properties(payload_format_indicator=fields.payload_format_indicator,
                          message_expiry_interval=fields.message_expiry_interval,
                          content_type=fields.content_type, response_topic=fields.response_topic,
                          correlation_data=fields.correlation_data, subscription_identifiers=ids,
                          topic_alias=alias, user_properties=fields.user_properties)

    def _allocate_packet_id(self) -> int:
        session = self.session
        assert session is not None
        for _ in range(65535):
            packet_id = self._next_packet_id
            self._next_packet_id = packet_id % 65535 + 1
            if packet_id not in self._inflight and packet_id not in session.released \
                    and packet_id not in session.sent_ids:
                return packet_id
        raise MqttProtocolError("no free packet identifier", ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR)

    def _release(self, outgoing: _Outgoing) -> None:
        """The message is done with (written at QoS 0, dropped, or too big): ack it and take the next one."""
        if outgoing.delivered is not None and outgoing.sub_key is not None:
            self._finish(outgoing.sub_key, outgoing.delivered, hold=outgoing.qos == 0 and self._paused)

    def _finish(self, key: str, delivered: Delivered, hold: bool = False) -> None:
        sub = self._core_subs.get(key)
        if sub is None or sub.closed:
            return
        try:
            sub.ack(delivered.receipt)
        except TidegateError:
            pass  # already released (subscription closed meanwhile): the core redelivers it
        self._regrant(key, hold)

    def _regrant(self, key: str | None, hold: bool = False) -> None:
        if key is None:
            return
        sub = self._core_subs.get(key)
        if sub is None or sub.closed:
            return
        if hold:
            self._held_credit[key] = self._held_credit.get(key, 0) + 1
        else:
            sub.grant(1)

    def _on_puback(self, packet: Puback) -> None:
        item = self._inflight.get(packet.packet_id)
        if item is None or item.qos != 1:
            return  # unknown or duplicate acknowledgement: nothing to do
        del self._inflight[packet.packet_id]
        self._forget_sent(item, packet.packet_id)
        self._ack_core(item)
        self._regrant(item.sub_key)
        self._drain_pending()

    def _on_pubrec(self, packet: Pubrec) -> None:
        session = self.session
        assert session is not None
        packet_id = packet.packet_id
        item = self._inflight.get(packet_id)
        if item is None or item.qos != 2:
            if packet_id in session.released:
                self._send(Pubrel(packet_id))
            elif self.level == MQTT_5:
                self._send(Pubrel(packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
            return
        del self._inflight[packet_id]
        self._forget_sent(item, packet_id)
        self._ack_core(item)
        if packet.reason_code.is_error:  # the client refused the message: the exchange ends here
            self._regrant(item.sub_key)
            self._drain_pending()
            return
        session.released[packet_id] = item.sub_key or ""
        if session.expiry_interval:
            self.factory.sessions.save(session)
        self._send(Pubrel(packet_id))

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        session = self.session
        assert session is not None
        key = session.released.pop(packet.packet_id, None)
        if key is None:
            return
        if session.expiry_interval:
            self.factory.sessions.save(session)
        self._regrant(key or None)
        self._drain_pending()

    def _forget_sent(self, item: _Inflight, packet_id: int) -> None:
        session = self.session
        if session is not None and item.sent_key is not None:
            session.sent.pop(item.sent_key, None)
            session.sent_ids.discard(packet_id)

    def _ack_core(self, item: _Inflight) -> None:
        if item.sub_key is None:
            return
        sub = self._core_subs.get(item.sub_key)
        if sub is not None and not sub.closed:
            try:
                sub.ack(item.receipt)
            except TidegateError:
                pass

    # ------------------------------------------------------------------------------------------ SUBSCRIBE
    def _on_subscribe(self, packet: Subscribe) -> None:
        session = self.session
        assert session is not None
        identifier = packet.properties.subscription_identifiers[0] if packet.properties.subscription_identifiers \
            else None
        codes: list[ReasonCode] = []
        retained: list[tuple[SubscriptionEntry, bool]] = []
        for wanted in packet.subscriptions:
            code, entry, existed = self._subscribe_one(session, wanted, identifier)
            codes.append(code)
            if entry is not None:
                retained.append((entry, existed))
        self._send(Suback(packet.packet_id, tuple(codes)))
        now = self.broker.now_ms()
        for entry, existed in retained:
            if is_sys_name(entry.topic_filter):
                self.factory.sys.send_snapshot(self, entry)
                continue
            if entry.share or not self.settings.retain_available:
                continue  # retained messages are not sent for shared subscriptions (MQTT-3.8.4 / 4.8.2)
            if entry.retain_handling == RetainHandling.DO_NOT_SEND or (
                    entry.retain_handling == RetainHandling.SEND_ON_NEW_SUBSCRIBE and existed):
                continue
            for name, message in self.factory.retained.matching(entry.topic_filter, now):
                qos = min(message_qos(message.flags), entry.qos)
                ids = (entry.identifier,) if entry.identifier else ()
                self._offer(_Outgoing(name, message, qos, True, ids, None, None))

    def _subscribe_one(self, session: Session, wanted: Any,
                       identifier: int | None) -> tuple[ReasonCode, SubscriptionEntry | None, bool]:
        settings = self.settings
        share = wanted.shared
        inner = share[1] if share else wanted.topic_filter
        if share and not settings.shared_subscription_available:
            return ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, None, False
        if ("+" in inner or "#" in inner) and not settings.wildcard_subscription_available:
            return ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED, None, False
        if identifier is not None and not settings.subscription_identifiers_available:
            return ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, None, False
        granted = min(wanted.qos, settings.maximum_qos)
        entry = SubscriptionEntry(wanted.topic_filter, granted, wanted.no_local, wanted.retain_as_published,
                                  int(wanted.retain_handling), identifier, share)
        try:
            existed = self.factory.sessions.add_subscription(session, entry)
            if share:
                self._open_share(entry)
            else:
                self._open_session_queue()
        except TidegateError as exc:
            log.info("mqtt %s: subscription to %r refused: %s", self._who(), wanted.topic_filter, exc)
            self.factory.sessions.remove_subscription(session, wanted.topic_filter)
            return ReasonCode.UNSPECIFIED_ERROR, None, False
        if is_sys_name(entry.topic_filter):
            self._sys_filters = [e for e in self._sys_filters if e.topic_filter != entry.topic_filter] + [entry]
            self.factory.sys.listeners.add(self)
        return ReasonCode(granted), entry, existed

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes: list[ReasonCode] = []
        for topic_filter in packet.topic_filters:
            entry = self.factory.sessions.remove_subscription(session, topic_filter)
            if entry is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            codes.append(ReasonCode.SUCCESS)
            if entry.share_topic is not None and not any(
                    e.share_topic == entry.share_topic for e in session.subscriptions.values()):
                sub = self._core_subs.pop(entry.share_topic, None)
                if sub is not None:
                    sub.close()
            if is_sys_name(topic_filter):
                self._sys_filters = [e for e in self._sys_filters if e.topic_filter != topic_filter]
                if not self._sys_filters:
                    self.factory.sys.listeners.discard(self)
        self._send(Unsuback(packet.packet_id, tuple(codes) if self.level == MQTT_5 else ()))

    def send_sys(self, values: dict[str, str], retain: bool, only: SubscriptionEntry | None = None) -> None:
        """Deliver $SYS values (QoS 0) to this client's $SYS subscriptions."""
        if self.state != "connected":
            return
        filters = [only] if only is not None else self._sys_filters
        try:
            for name, value in values.items():
                matching = [e for e in filters if topic_matches(e.topic_filter, name)]
                if not matching:
                    continue
                ids = tuple(sorted({e.identifier for e in matching if e.identifier}))
                message = Message(topic="%24SYS", body=value.encode("utf-8"), flags=0)
                data = self._encode_publish(_Outgoing(name, message, 0, retain, ids, None, None), PublishFields(),
                                            None, False)
                if data is not None:
                    self._out.append(data)
        finally:
            self._flush()

    # ------------------------------------------------------------------------------------------ the rest
    def _on_pingreq(self, packet: Pingreq) -> None:
        self._send(Pingresp())

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.session
        assert session is not None
        new_expiry = packet.properties.session_expiry_interval
        if new_expiry is not None and self.level == MQTT_5:
            if session.expiry_interval == 0 and new_expiry != 0:
                raise MqttProtocolError("DISCONNECT sets a session expiry after CONNECT set 0",
                                        ReasonCode.PROTOCOL_ERROR)  # MQTT-3.14.2-2
            session.expiry_interval = min(new_expiry, self.settings.session_expiry_max)
        send_will = packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL_MESSAGE
        self._end(send_will=send_will)
        self._close()

    def _on_auth(self, packet: Auth) -> None:
        # 0x8C Bad authentication method is not a DISCONNECT reason code (spec 3.14.2.1); AUTH without an
        # authentication method agreed in CONNECT is a Protocol Error (4.12).
        raise MqttProtocolError("AUTH without enhanced authentication (none is configured)",
                                ReasonCode.PROTOCOL_ERROR)

    def _on_second_connect(self, packet: Connect) -> None:
        raise MqttProtocolError("second CONNECT", ReasonCode.PROTOCOL_ERROR)

    def _dispatch_connect(self, packet: Connect) -> None:
        if self.state == "new":
            self._on_connect(packet)
        else:
            self._on_second_connect(packet)

    def _require_connected(handler: Any) -> Any:  # noqa: N805 - decorator used inside the class body
        def guarded(self: MqttProtocol, packet: Any) -> None:
            if self.state != "connected":
                raise MqttProtocolError(f"{type(packet).__name__} before CONNACK", ReasonCode.PROTOCOL_ERROR)
            handler(self, packet)

        return guarded

    _HANDLERS: dict[type, Any] = {
        Connect: _dispatch_connect,
        Publish: _require_connected(_on_publish),
        Puback: _require_connected(_on_puback),
        Pubrec: _require_connected(_on_pubrec),
        Pubrel: _require_connected(_on_pubrel),
        Pubcomp: _require_connected(_on_pubcomp),
        Subscribe: _require_connected(_on_subscribe),
        Unsubscribe: _require_connected(_on_unsubscribe),
        Pingreq: _require_connected(_on_pingreq),
        Disconnect: _require_connected(_on_disconnect),
        Auth: _on_auth,
    }


class MqttServerFactory(Factory):
    """Builds one `MqttProtocol` per connection; owns the adapter state shared by all connections.

    `broker` is the core `Broker`; `clock` an `IReactorTime` (the reactor, or a `MemoryReactorClock` in tests).
    Persisted sessions and retained messages are loaded here, and sessions whose expiry passed while the broker
    was down are removed. Call `stop()` on shutdown.
    """

    protocol = MqttProtocol

    def __init__(self, broker: Any, clock: Any, settings: MqttSettings | None = None) -> None:
        self.broker = broker
        self.clock = clock
        self.settings = settings or MqttSettings()
        self.connections: set[MqttProtocol] = set()
        self.retained = RetainedStore(broker.meta)
        self.sessions = SessionManager(broker, clock, self.settings, self._publish_will)
        self.sys = SysTopics(self)
        self.stats = self.sys.stats
        self.sessions.load()
        self.sys.start()

    def buildProtocol(self, addr: Any) -> MqttProtocol:
        return MqttProtocol(self, addr)

    def assign_client_id(self) -> str:
        while True:
            client_id = "tidegate-" + os.urandom(8).hex()
            if client_id not in self.sessions.sessions:
                return client_id

    def _publish_will(self, session: Session, pending: PendingWill) -> None:
        will = pending.will
        props = will.properties
        fields = PublishFields(props.payload_format_indicator, props.message_expiry_interval, props.content_type,
                               props.response_topic, props.correlation_data, props.user_properties)
        try:
            message = build_message(will.topic, will.payload, will.qos, will.retain, fields, self.broker.now_ms())
            self.broker.publish([message])
        except (UnmappableName, TidegateError) as exc:
            log.info("mqtt client %r: will message to %r not published: %s", session.client_id, will.topic, exc)
            return
        if will.retain:
            self.retained.set(will.topic, message)
        log.debug("mqtt client %r: will published to %r", session.client_id, will.topic)

    def stop(self) -> None:
        """Shutdown: tell v5 clients (DISCONNECT 0x8B), close every connection, stop timers."""
        self.sys.stop()
        for connection in list(self.connections):
            if connection.state == "connected":
                connection._disconnect(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down", send_will=False)
                connection._flush()
            elif connection.state == "new":
                connection.state = "closed"
                connection._close()
        self.sessions.stop()

