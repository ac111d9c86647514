"""The MQTT connection's protocol state, sans-IO: no Twisted, no core, only values and rules.

- `negotiate(connect, settings, assigned_client_id)`: CONNECT as a pure function, to a `Negotiated` result (what
  the connection runs with, and the CONNACK to send) or a `Refusal` (the reason code that CONNACK carries);
- `PacketIds`: a session's packet identifiers in both directions, in one place: QoS 2 ids received and not
  released, ids released and not completed, the outbound in-flight table, which stored message went out under
  which id (so a resumed session resends with the original id), and the allocation of free ids;
- `ReceiveWindow`: our Receive Maximum, i.e. QoS 1/2 publishes from the client not fully acknowledged yet;
- `InboundAliases` / `OutboundAliases`: topic aliases the client set, and those we set towards the client.

inbound.py and outbound.py drive these; server.py owns one of each per connection (`PacketIds` per session).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from .packets import MQTT_5, Connack, Connect, Will
from .properties import Properties
from .reason_codes import MqttProtocolError, ReasonCode
from .settings import MqttSettings

UNLIMITED_PACKET_SIZE = 1 << 30  # a client that announces no Maximum Packet Size
MAX_PACKET_ID = 65535
# The packet-id sets of a session or connection that has none (an idle one): shared and read-only, replaced by a set
# of its own on the first id, since every empty set costs 216 bytes.
NO_IDS: frozenset[int] = frozenset()
# The same for the tables of packet ids and topic aliases (an empty dict costs 64 bytes): read-only until the first
# entry, then a dict of its own.
NO_ENTRIES: Mapping[object, object] = MappingProxyType({})


# --------------------------------------------------------------------------------------------- CONNECT


@dataclass(frozen=True, slots=True)
class Refusal:
    """A CONNECT the server will not accept: CONNACK with `reason` (where the level has a code), then close."""

    reason: ReasonCode
    level: int
    text: str
    problem_information: bool = True  # the client did not ask to leave reason strings out


class Negotiated(NamedTuple):
    """What an accepted CONNECT settles for the life of the connection.

    A NamedTuple, not a frozen dataclass: it is made once per CONNECT, and a frozen dataclass sets each of its 14
    fields through `object.__setattr__`, several times the cost of building a tuple (a visible share of a
    reconnect storm's CPU). Immutable all the same."""

    level: int
    client_id: str
    assigned_client_id: str | None  # set when the server chose the id (empty client id in CONNECT)
    clean_start: bool
    requested_expiry: int  # session expiry the client asked for (seconds)
    session_expiry: int  # granted: capped by settings.session_expiry_max
    keep_alive: int  # seconds the server enforces (x 1.5); 0 = none
    server_keep_alive: int | None  # v5: told to the client when the server chose `keep_alive`
    client_receive_maximum: int  # QoS 1/2 messages the client takes in flight from us
    client_maximum_packet_size: int
    client_topic_alias_maximum: int
    problem_information: bool
    will: Will | None
    will_delay: int

    def connack(self, settings: MqttSettings, session_present: bool) -> Connack:
        """The CONNACK accepting this connection (v5 properties announce the server's limits)."""
        if self.level != MQTT_5:
            return Connack(session_present, ReasonCode.SUCCESS)
        granted = self.session_expiry
        return Connack(session_present, ReasonCode.SUCCESS, Properties(
            session_expiry_interval=granted if granted != self.requested_expiry else None,
            receive_maximum=settings.receive_maximum,
            maximum_qos=settings.maximum_qos if settings.maximum_qos < 2 else None,
            retain_available=None if settings.retain_available else False,
            maximum_packet_size=settings.max_packet_size,
            assigned_client_identifier=self.assigned_client_id,
            topic_alias_maximum=settings.topic_alias_maximum or None,
            wildcard_subscription_available=None if settings.wildcard_subscription_available else False,
            subscription_identifier_available=None if settings.subscription_identifiers_available else False,
            shared_subscription_available=None if settings.shared_subscription_available else False,
            server_keep_alive=self.server_keep_alive,
        ))


def negotiate(connect: Connect, settings: MqttSettings, assigned_client_id: str | None) -> Negotiated | Refusal:
    """Accept or refuse one CONNECT under `settings`.

    `assigned_client_id` is the id the server gives a client that sent an empty one (used only then, and only
    when an empty id is allowed: clean start, 3.1.1 or 5, `allow_empty_client_id`).
    """
    level = connect.protocol_level
    props = connect.properties
    problem_information = props.request_problem_information is not False
    if props.authentication_method is not None:
        return Refusal(ReasonCode.BAD_AUTHENTICATION_METHOD, level,
                       f"authentication method {props.authentication_method!r}: enhanced authentication is not "
                       "configured", problem_information)
    will = connect.will
    if will is not None:
        if will.qos > settings.maximum_qos:
            return Refusal(ReasonCode.QOS_NOT_SUPPORTED, level, "will QoS above the server maximum",
                           problem_information)
        if will.retain and not settings.retain_available:
            return Refusal(ReasonCode.RETAIN_NOT_SUPPORTED, level, "retained messages are not available",
                           problem_information)
    client_id = connect.client_id
    assigned = None
    if not client_id:
        if not settings.allow_empty_client_id or not connect.clean_start or level == 3 or not assigned_client_id:
            return Refusal(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, level, "empty client identifier",
                           problem_information)
        client_id = assigned = assigned_client_id
    if level == MQTT_5:
        requested_expiry = props.session_expiry_interval or 0
    else:
        requested_expiry = 0 if connect.clean_start else settings.persistent_session_expiry
    keep_alive = connect.keep_alive
    server_keep_alive = None
    if level == MQTT_5:
        if settings.server_keep_alive is not None:
            server_keep_alive = keep_alive = settings.server_keep_alive
        elif keep_alive == 0 or keep_alive > settings.max_keep_alive:
            server_keep_alive = keep_alive = settings.max_keep_alive
        receive_maximum = min(props.receive_maximum or 65535, settings.max_inflight)
        maximum_packet_size = props.maximum_packet_size or UNLIMITED_PACKET_SIZE
        alias_maximum = min(props.topic_alias_maximum or 0, settings.max_outbound_topic_aliases)
    else:
        receive_maximum, maximum_packet_size, alias_maximum = settings.receive_maximum, UNLIMITED_PACKET_SIZE, 0
    return Negotiated(
        level=level, client_id=client_id, assigned_client_id=assigned, clean_start=connect.clean_start,
        requested_expiry=requested_expiry, session_expiry=min(requested_expiry, settings.session_expiry_max),
        keep_alive=keep_alive, server_keep_alive=server_keep_alive, client_receive_maximum=receive_maximum,
        client_maximum_packet_size=maximum_packet_size, client_topic_alias_maximum=alias_maximum,
        problem_information=problem_information, will=will,
        will_delay=(will.properties.will_delay_interval or 0) if will is not None else 0,
    )


# --------------------------------------------------------------------------------------------- packet ids


@dataclass(slots=True)
class Inflight:
    """A QoS 1/2 PUBLISH sent to the client and not acknowledged (PUBACK, or PUBREC for QoS 2)."""

    sub_key: str | None  # the core subscription it came from (None: a retained message)
    receipt: str  # the core receipt to ack once the client has it
    qos: int
    sent_key: tuple[str, int] | None  # (queue topic, queue offset) of the stored message
    # the core's Delivered it came from (opaque here): PUBACKs of one read settle in one core call with it
    delivered: object = None


class PacketIds:
    """A session's packet identifier state, both directions; survives reconnects (the two persisted sets are saved
    with the session, see sessions.py; the rest lives as long as the broker process)."""

    __slots__ = ("inbound_qos2", "released", "sent", "sent_ids", "inflight", "_next")

    def __init__(self, inbound_qos2: set[int] | None = None, released: dict[int, str] | None = None) -> None:
        self.inbound_qos2: Set[int] = inbound_qos2 if inbound_qos2 else NO_IDS  # PUBLISH in, no PUBREL
        # PUBREL out, no PUBCOMP: id -> key
        self.released: Mapping[int, str] = released if released else NO_ENTRIES  # type: ignore[assignment]
        # (queue topic, queue offset) -> id of QoS 1/2 messages sent and not acknowledged, so a resumed connection
        # redelivers with the original packet id (MQTT-4.4.0-1); `sent_ids` keeps those ids reserved.
        self.sent: Mapping[tuple[str, int], int] = NO_ENTRIES  # type: ignore[assignment]
        self.sent_ids: Set[int] = NO_IDS
        self.inflight: Mapping[int, Inflight] = NO_ENTRIES  # type: ignore[assignment]  (of the current connection)
        self._next = 1

    # inbound QoS 2 ------------------------------------------------------------------------------------------
    def qos2_received(self, packet_id: int) -> bool:
        """Whether a QoS 2 PUBLISH with this id was stored and not released yet (a resend is not stored again)."""
        return packet_id in self.inbound_qos2

    def qos2_stored(self, packet_id: int) -> None:
        if self.inbound_qos2 is NO_IDS:
            self.inbound_qos2 = set()
        self.inbound_qos2.add(packet_id)  # type: ignore[attr-defined]

    def qos2_released(self, packet_id: int) -> bool:
        """PUBREL: forget the id; False if it was unknown (v5 answers PUBCOMP 0x92)."""
        if packet_id in self.inbound_qos2:
            self.inbound_qos2.discard(packet_id)  # type: ignore[attr-defined]  (holding an id: a set)
            return True
        return False

    # outbound -----------------------------------------------------------------------------------------------
    def in_flight_count(self) -> int:
        """Messages counted against the client's Receive Maximum: sent unacknowledged, and released uncompleted."""
        return len(self.inflight) + len(self.released)

    def id_sent_for(self, sent_key: tuple[str, int]) -> int | None:
        """The id a stored message went out under before (it is being sent again), or None."""
        return self.sent.get(sent_key)

    def allocate(self) -> int:
        """A packet id no message in flight, released or remembered as sent is using."""
        for _ in range(MAX_PACKET_ID):
            packet_id = self._next
            self._next = packet_id % MAX_PACKET_ID + 1
            if packet_id not in self.inflight and packet_id not in self.released and packet_id not in self.sent_ids:
                return packet_id
        raise MqttProtocolError("no free packet identifier", ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR)

    def outbound_tables(self) -> tuple[dict[int, Inflight], dict[tuple[str, int], int], set[int]]:
        """`inflight`, `sent` and `sent_ids` as tables of their own (placeholders replaced), for a writer that fills
        them for a whole batch of deliveries in one pass (`Outbound` on 3.1.1 connections)."""
        if self.inflight is NO_ENTRIES:
            self.inflight = {}
        if self.sent is NO_ENTRIES:
            self.sent = {}
        if self.sent_ids is NO_IDS:
            self.sent_ids = set()
        return self.inflight, self.sent, self.sent_ids  # type: ignore[return-value]

    def sent_out(self, packet_id: int, item: Inflight) -> None:
        if self.inflight is NO_ENTRIES:
            self.inflight = {}
        self.inflight[packet_id] = item  # type: ignore[index]
        if item.sent_key is not None:
            if self.sent is NO_ENTRIES:
                self.sent = {}
            self.sent[item.sent_key] = packet_id  # type: ignore[index]
            if self.sent_ids is NO_IDS:
                self.sent_ids = set()
            self.sent_ids.add(packet_id)  # type: ignore[attr-defined]

    def acknowledged(self, packet_id: int, qos: int) -> Inflight | None:
        """PUBACK (qos 1) or PUBREC (qos 2) of a message in flight: remove and return it; None if unknown."""
        item = self.inflight.get(packet_id)
        if item is None or item.qos != qos:
            return None
        del self.inflight[packet_id]  # type: ignore[attr-defined]  (holding an item: a dict)
        if item.sent_key is not None:
            self.sent.pop(item.sent_key, None)  # type: ignore[attr-defined]  (sent_out made it a dict)
            if self.sent_ids:
                self.sent_ids.discard(packet_id)  # type: ignore[attr-defined]  (holding an id: a set)
        return item

    def release(self, packet_id: int, sub_key: str | None) -> None:
        """PUBREL sent: the id stays in use (and counts as in flight) until PUBCOMP."""
        if self.released is NO_ENTRIES:
            self.released = {}
        self.released[packet_id] = sub_key or ""  # type: ignore[index]

    def completed(self, packet_id: int) -> str | None:
        """PUBCOMP: the subscription key of the released message ('' for none), or None if the id is unknown."""
        if not self.released:
            return None
        return self.released.pop(packet_id, None)  # type: ignore[attr-defined]  (holding an id: a dict)

    def connection_ended(self) -> None:
        """The connection's core subscriptions closed: the core redelivers what was in flight."""
        if self.inflight:
            self.inflight.clear()  # type: ignore[attr-defined]  (holding an item: a dict)


# --------------------------------------------------------------------------------------------- Receive Maximum


class ReceiveWindow:
    """Our Receive Maximum: QoS 1/2 publishes of the client not fully acknowledged (PUBACK, or PUBCOMP)."""

    __slots__ = ("limit", "enforced", "open", "_awaiting_durable")

    def __init__(self, limit: int, enforced: bool) -> None:
        self.limit = limit
        self.enforced = enforced  # MQTT 5 (3.1.1 has no Receive Maximum to exceed)
        self.open: Set[int] = NO_IDS  # a set of its own from the first QoS 1/2 publish
        self._awaiting_durable: set[int] | None = None  # made on first use: only QoS 2 publishes need it

    @property
    def awaiting_durable(self) -> set[int]:
        """QoS 2 ids whose PUBREC waits for the disk."""
        waiting = self._awaiting_durable
        if waiting is None:
            waiting = self._awaiting_durable = set()
        return waiting

    def full_for(self, packet_id: int) -> bool:
        """Whether admitting `packet_id` would exceed the limit (a v5 client over it is disconnected)."""
        return self.enforced and packet_id not in self.open and len(self.open) >= self.limit

    def open_ids(self) -> set[int]:
        """`open` as a set of its own (the placeholder replaced), for a reader that admits a whole run of
        publishes in one pass (`Inbound.stage_plain`)."""
        if self.open is NO_IDS:
            self.open = set()
        return self.open  # type: ignore[return-value]

    def admit(self, packet_id: int) -> None:
        if self.open is NO_IDS:
            self.open = set()
        self.open.add(packet_id)  # type: ignore[attr-defined]
        if self.enforced and len(self.open) > self.limit:
            raise MqttProtocolError("more unacknowledged QoS 1/2 publishes than Receive Maximum",
                                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)

    def done(self, packet_id: int) -> None:
        if self.open:
            self.open.discard(packet_id)  # type: ignore[attr-defined]  (holding an id: a set)


# --------------------------------------------------------------------------------------------- topic aliases


class InboundAliases:
    """Topic aliases the client sets in its PUBLISH packets (up to our Topic Alias Maximum)."""

    __slots__ = ("maximum", "_topics")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._topics: Mapping[int, str] = NO_ENTRIES  # type: ignore[assignment]  (a dict from the first alias)

    def resolve(self, topic: str, alias: int | None) -> str:
        """The topic name of a PUBLISH: sets the alias when both are given, looks it up when the topic is empty."""
        if alias is None:
            return topic
        if alias > self.maximum:
            raise MqttProtocolError(f"topic alias {alias} above the maximum", ReasonCode.TOPIC_ALIAS_INVALID)
        if topic:
            if self._topics is NO_ENTRIES:
                self._topics = {}
            self._topics[alias] = topic  # type: ignore[index]
            return topic
        known = self._topics.get(alias)
        if known is None:
            raise MqttProtocolError(f"topic alias {alias} is not set", ReasonCode.PROTOCOL_ERROR)
        return known


class OutboundAliases:
    """Topic aliases we set towards the client (up to its Topic Alias Maximum), one per topic name, never reused."""

    __slots__ = ("maximum", "_aliases")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._aliases: Mapping[str, int] = NO_ENTRIES  # type: ignore[assignment]  (a dict from the first alias)

    def choose(self, topic: str) -> tuple[int | None, bool]:
        """(alias, new): the alias to send `topic` with, and whether it is new (then the topic name goes along and
        `confirm` records it once the packet is really sent)."""
        alias = self._aliases.get(topic)
        if alias is not None:
            return alias, False
        if len(self._aliases) < self.maximum:
            return len(self._aliases) + 1, True
        return None, False

    def confirm(self, topic: str, alias: int) -> None:
        if self._aliases is NO_ENTRIES:
            self._aliases = {}
        self._aliases[topic] = alias  # type: ignore[index]
