"""MQTT control packets as frozen, slotted dataclasses that validate themselves on construction, plus topic rules.

A packet never holds the protocol level it travels at (except CONNECT, which announces it): the codec applies the
level when encoding and decoding. Reason codes are always MQTT 5 `ReasonCode` values; at levels 3 and 4 the codec
translates CONNACK and SUBACK codes to their 3.1.1 equivalents and leaves out what 3.1.1 cannot carry.

Every rule a packet breaks raises `MqttProtocolError` with the reason code the spec assigns, so the same checks
serve decoding (peer's fault) and building packets locally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

# The one wildcard matcher and level rule, shared with the core router. tidegate.core.routing imports nothing but
# the standard library and tidegate.core.errors, so the codec stays free of sockets, reactor and broker.
from tidegate.core.routing import pattern_matches, pattern_problem

from .properties import MAX_UINT16, NO_PROPERTIES, Properties, PropertyContext, check_utf8_text
from .reason_codes import (
    AUTH_REASON_CODES,
    CONNACK_REASON_CODES,
    DISCONNECT_REASON_CODES,
    PUBACK_REASON_CODES,
    PUBCOMP_REASON_CODES,
    PUBREC_REASON_CODES,
    PUBREL_REASON_CODES,
    SUBACK_REASON_CODES,
    UNSUBACK_REASON_CODES,
    MqttProtocolError,
    ReasonCode,
    malformed,
    protocol_error,
)


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


MQTT_3_1 = 3
MQTT_3_1_1 = 4
MQTT_5 = 5
PROTOCOL_NAMES: dict[int, str] = {MQTT_3_1: "MQIsdp", MQTT_3_1_1: "MQTT", MQTT_5: "MQTT"}
SHARED_SUBSCRIPTION_PREFIX = "$share/"


# --- topic names and filters (spec 4.7) ---------------------------------------------------------------------


def validate_topic_name(name: str) -> None:
    """Raise `MqttProtocolError` (0x90 Topic Name invalid) unless `name` is a topic a message may be published to.

    A topic name is 1..65535 bytes of UTF-8 without U+0000 and without the wildcards `+` and `#` (4.7.1, 4.7.3).
    """
    check_utf8_text(name, "topic name", ReasonCode.TOPIC_NAME_INVALID)
    if not name:
        raise MqttProtocolError("topic name is empty", ReasonCode.TOPIC_NAME_INVALID)
    if "+" in name or "#" in name:
        raise MqttProtocolError(f"topic name {name!r} contains a wildcard", ReasonCode.TOPIC_NAME_INVALID)


def _validate_plain_filter(topic_filter: str, what: str) -> None:
    # The level rule is the core's (one rule for every protocol); MQTT adds that `#` is the last level (4.7.1.2).
    # `#` fills whole levels once the shared rule passed, so any `#` before the last character is a level before
    # the last one.
    problem = pattern_problem(topic_filter)
    if problem is not None:
        raise MqttProtocolError(f"{what} {topic_filter!r} {problem}", ReasonCode.TOPIC_FILTER_INVALID)
    if "#" in topic_filter[:-1]:
        raise MqttProtocolError(f"{what} {topic_filter!r}: '#' must be the last level",
                                ReasonCode.TOPIC_FILTER_INVALID)


def parse_shared_subscription(topic_filter: str) -> tuple[str, str] | None:
    """Split `$share/{group}/{filter}` into (group, filter); None if `topic_filter` is not a shared subscription.

    Raises `MqttProtocolError` (0x8F) if the share name is empty or holds `/`, `+` or `#`, or the filter after it is
    missing or invalid (4.8.2).
    """
    if not topic_filter.startswith(SHARED_SUBSCRIPTION_PREFIX):
        return None
    group, separator, inner_filter = topic_filter[len(SHARED_SUBSCRIPTION_PREFIX) :].partition("/")
    if not group:
        raise MqttProtocolError(f"shared subscription {topic_filter!r} has an empty share name",
                                ReasonCode.TOPIC_FILTER_INVALID)  # fmt: skip
    if "+" in group or "#" in group:
        raise MqttProtocolError(f"share name {group!r} contains a wildcard", ReasonCode.TOPIC_FILTER_INVALID)
    if not separator:
        raise MqttProtocolError(f"shared subscription {topic_filter!r} has no topic filter",
                                ReasonCode.TOPIC_FILTER_INVALID)  # fmt: skip
    _validate_plain_filter(inner_filter, "shared subscription topic filter")
    return group, inner_filter


def validate_topic_filter(topic_filter: str) -> None:
    """Raise `MqttProtocolError` (0x8F Topic Filter invalid) unless `topic_filter` is a valid subscription filter.

    Valid: 1..65535 bytes of UTF-8 without U+0000, where `+` is a whole level, `#` is a whole level and the last one
    (4.7.1), and a `$share/` prefix is followed by a share name and a valid filter (4.8.2).
    """
    check_utf8_text(topic_filter, "topic filter", ReasonCode.TOPIC_FILTER_INVALID)
    if parse_shared_subscription(topic_filter) is None:
        _validate_plain_filter(topic_filter, "topic filter")


def hidden_by_dollar_rule(topic_filter: str, topic_name: str) -> bool:
    """MQTT's `$` rule (4.7.2): a filter starting with a wildcard never matches a name starting with `$`, so `#`
    does not see `$SYS/...`. The core trie does not know the rule; every MQTT match applies it on top."""
    return topic_name.startswith("$") and topic_filter[:1] in ("+", "#")


def topic_matches(topic_filter: str, topic_name: str) -> bool:
    """Whether a (non-shared, valid) filter matches a topic name, per 4.7.

    `#` matches its parent level and any number of levels below, `+` exactly one level (which may be empty): the
    core routing trie's rules, applied by the core's own matcher so MQTT and the core router cannot disagree, plus
    the `$` rule (`hidden_by_dollar_rule`).
    """
    return not hidden_by_dollar_rule(topic_filter, topic_name) and pattern_matches(topic_filter, topic_name)


# --- field checks shared by the packets -----------------------------------------------------------------------


def _check_packet_id(packet_id: int) -> None:
    # 2.2.1: packets that carry an identifier need a non-zero one.
    if not isinstance(packet_id, int) or not 1 <= packet_id <= MAX_UINT16:
        raise protocol_error(f"packet identifier {packet_id!r} is not in 1..65535")


def _check_qos(qos: int, what: str) -> None:
    # QoS 3 has no meaning; both PUBLISH (3.3.1.2) and the Will QoS (3.1.2.6) call it a Malformed Packet.
    if qos not in (0, 1, 2):
        raise malformed(f"{what} QoS {qos!r} is not 0, 1 or 2")


def _check_reason(reason_code: int, allowed: frozenset[int], packet: str) -> None:
    if reason_code not in allowed:
        raise protocol_error(f"reason code {reason_code!r} is not allowed in {packet}")


def _check_properties(properties: Properties, context: PropertyContext) -> None:
    if not isinstance(properties, Properties):
        raise malformed(f"{context.value} properties must be a Properties value")
    if properties.present:
        properties.check_allowed(context)


def _check_binary(data: bytes, what: str) -> None:
    if not isinstance(data, bytes):
        raise malformed(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > MAX_UINT16:
        raise malformed(f"{what} is {len(data)} bytes, longer than 65535")


# --- packets --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    """The will message inside CONNECT; its presence is the Will Flag."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        validate_topic_name(self.topic)
        _check_binary(self.payload, "will payload")
        _check_qos(self.qos, "will")
        _check_properties(self.properties, PropertyContext.WILL)


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    protocol_level: int = MQTT_3_1_1
    clean_start: bool = True
    keep_alive: int = 60
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties = NO_PROPERTIES
    # None means the standard name for the level ("MQIsdp" for 3.1, "MQTT" for 3.1.1 and 5).
    protocol_name: str | None = None

    def __post_init__(self) -> None:
        level = self.protocol_level
        if level not in PROTOCOL_NAMES:
            raise MqttProtocolError(
                f"protocol level {level!r} is not supported", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
            )
        if self.protocol_name is None:
            object.__setattr__(self, "protocol_name", PROTOCOL_NAMES[level])
        elif self.protocol_name != PROTOCOL_NAMES[level]:
            raise MqttProtocolError(
                f"protocol name {self.protocol_name!r} does not match protocol level {level}",
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
            )
        check_utf8_text(self.client_id, "client identifier")
        if not isinstance(self.keep_alive, int) or not 0 <= self.keep_alive <= MAX_UINT16:
            raise malformed(f"keep alive {self.keep_alive!r} is not in 0..65535")
        if self.will is not None and not isinstance(self.will, Will):
            raise malformed("will must be a Will value")
        if self.username is not None:
            check_utf8_text(self.username, "user name")
        if self.password is not None:
            _check_binary(self.password, "password")
            if self.username is None and level < MQTT_5:
                # 3.1.1 [MQTT-3.1.2-22]: no password without a user name (5.0 lifted this).
                raise protocol_error("MQTT 3.1.1 does not allow a password without a user name")
        _check_properties(self.properties, PropertyContext.CONNECT)
        if level < MQTT_5 and (not self.properties.is_empty or (self.will and not self.will.properties.is_empty)):
            raise protocol_error(f"protocol level {level} has no properties")
        if self.properties.authentication_data is not None and self.properties.authentication_method is None:
            raise protocol_error("authentication data without an authentication method")  # 3.1.2.11.10


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        _check_reason(self.reason_code, CONNACK_REASON_CODES, "CONNACK")
        if self.session_present and self.reason_code != ReasonCode.SUCCESS:
            # 3.2.2.2: a refused connection has no session.
            raise protocol_error("CONNACK refusing a connection cannot have session present set")
        _check_properties(self.properties, PropertyContext.CONNACK)


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        # This runs for every message, so the common case (ASCII topic, no properties) avoids function calls.
        qos = self.qos
        if qos:
            packet_id = self.packet_id
            if qos != 1 and qos != 2:
                _check_qos(qos, "PUBLISH")
            if packet_id.__class__ is not int or not 0 < packet_id <= MAX_UINT16:  # type: ignore[operator]
                _check_packet_id(packet_id)  # type: ignore[arg-type]
        else:
            if self.dup:
                # 3.3.1.1: DUP must be 0 for QoS 0; a fixed-header flag violation is a Malformed Packet (2.1.3).
                raise malformed("PUBLISH with QoS 0 has the DUP flag set")
            if self.packet_id is not None:
                raise protocol_error("PUBLISH with QoS 0 cannot carry a packet identifier")
        if self.payload.__class__ is not bytes and not isinstance(self.payload, bytes):
            raise malformed(f"PUBLISH payload must be bytes, not {type(self.payload).__name__}")
        properties = self.properties
        if properties is not NO_PROPERTIES:
            _check_properties(properties, PropertyContext.PUBLISH)
        topic = self.topic
        if (
            topic.__class__ is not str
            or not topic
            or "+" in topic
            or "#" in topic
            or "\x00" in topic
            or not topic.isascii()
            or len(topic) > MAX_UINT16
        ):
            if topic == "":
                # 3.3.2.1: a zero-length topic name is only allowed together with a Topic Alias (MQTT 5).
                if properties.topic_alias is None:
                    raise protocol_error("PUBLISH has an empty topic name and no topic alias")
            else:
                validate_topic_name(topic)


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[object, object], None], ...]:
    return tuple(cls.__dict__[name].__set__ for name in names)


(_set_topic, _set_payload, _set_qos, _set_retain, _set_dup, _set_packet_id, _set_properties) = _slot_setters(
    Publish, ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")
)
_new_object = object.__new__


def decoded_publish(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int | None, properties: Properties
) -> Publish:
    """Build a Publish as `Publish(...)` would, validation included, at about half the cost.

    A frozen dataclass's generated __init__ pays an `object.__setattr__` lookup per field; writing the slots through
    their descriptors skips that. Decoding PUBLISH is the broker's hottest path, so it is worth this one shortcut.
    """
    publish = _new_object(Publish)
    _set_topic(publish, topic)
    _set_payload(publish, payload)
    _set_qos(publish, qos)
    _set_retain(publish, retain)
    _set_dup(publish, dup)
    _set_packet_id(publish, packet_id)
    _set_properties(publish, properties)
    publish.__post_init__()
    return publish


@dataclass(frozen=True, slots=True)
class _PublishAcknowledgement:
    packet_id: int
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES

    packet_type = PacketType.PUBACK  # overridden per subclass (not a dataclass field: no annotation)
    context = PropertyContext.PUBACK
    allowed_reason_codes = PUBACK_REASON_CODES

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        if self.reason_code:
            _check_reason(self.reason_code, self.allowed_reason_codes, self.context.value)
        if self.properties is not NO_PROPERTIES:
            _check_properties(self.properties, self.context)


@dataclass(frozen=True, slots=True)
class Puback(_PublishAcknowledgement):
    packet_type = PacketType.PUBACK
    context = PropertyContext.PUBACK
    allowed_reason_codes = PUBACK_REASON_CODES


@dataclass(frozen=True, slots=True)
class Pubrec(_PublishAcknowledgement):
    packet_type = PacketType.PUBREC
    context = PropertyContext.PUBREC
    allowed_reason_codes = PUBREC_REASON_CODES


@dataclass(frozen=True, slots=True)
class Pubrel(_PublishAcknowledgement):
    packet_type = PacketType.PUBREL
    context = PropertyContext.PUBREL
    allowed_reason_codes = PUBREL_REASON_CODES


@dataclass(frozen=True, slots=True)
class Pubcomp(_PublishAcknowledgement):
    packet_type = PacketType.PUBCOMP
    context = PropertyContext.PUBCOMP
    allowed_reason_codes = PUBCOMP_REASON_CODES


class RetainHandling(IntEnum):
    SEND_ON_SUBSCRIBE = 0
    SEND_ON_NEW_SUBSCRIBE = 1
    DO_NOT_SEND = 2


@dataclass(frozen=True, slots=True)
class TopicSubscription:
    """One topic filter of a SUBSCRIBE with its options (3.8.3.1). The last three options exist only in MQTT 5."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: RetainHandling = RetainHandling.SEND_ON_SUBSCRIBE

    def __post_init__(self) -> None:
        validate_topic_filter(self.topic_filter)
        _check_qos(self.qos, "subscription")
        if self.retain_handling not in (0, 1, 2):
            raise protocol_error(f"retain handling {self.retain_handling!r} is not 0, 1 or 2")  # 3.8.3.1
        if self.no_local and self.topic_filter.startswith(SHARED_SUBSCRIPTION_PREFIX):
            raise protocol_error("No Local cannot be set on a shared subscription")  # [MQTT-3.8.3-4]

    @property
    def shared(self) -> tuple[str, str] | None:
        """(share name, filter) for a `$share/...` subscription, else None."""
        return parse_shared_subscription(self.topic_filter)


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[TopicSubscription, ...]
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        if not isinstance(self.subscriptions, tuple) or not self.subscriptions:
            raise protocol_error("SUBSCRIBE must carry at least one topic filter")  # [MQTT-3.8.3-3]
        for subscription in self.subscriptions:
            if not isinstance(subscription, TopicSubscription):
                raise malformed("SUBSCRIBE entries must be TopicSubscription values")
        _check_properties(self.properties, PropertyContext.SUBSCRIBE)


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    reason_codes: tuple[ReasonCode, ...]
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        if not isinstance(self.reason_codes, tuple) or not self.reason_codes:
            raise protocol_error("SUBACK must carry one reason code per topic filter")
        for reason_code in self.reason_codes:
            _check_reason(reason_code, SUBACK_REASON_CODES, "SUBACK")
        _check_properties(self.properties, PropertyContext.SUBACK)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        if not isinstance(self.topic_filters, tuple) or not self.topic_filters:
            raise protocol_error("UNSUBSCRIBE must carry at least one topic filter")  # [MQTT-3.10.3-2]
        for topic_filter in self.topic_filters:
            validate_topic_filter(topic_filter)
        _check_properties(self.properties, PropertyContext.UNSUBSCRIBE)


@dataclass(frozen=True, slots=True)
class Unsuback:
    """UNSUBACK; `reason_codes` (one per filter) exist only in MQTT 5 and are left out at levels 3 and 4."""

    packet_id: int
    reason_codes: tuple[ReasonCode, ...] = ()
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        if not isinstance(self.reason_codes, tuple):
            raise malformed("UNSUBACK reason codes must be a tuple")
        for reason_code in self.reason_codes:
            _check_reason(reason_code, UNSUBACK_REASON_CODES, "UNSUBACK")
        _check_properties(self.properties, PropertyContext.UNSUBACK)


@dataclass(frozen=True, slots=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        _check_reason(self.reason_code, DISCONNECT_REASON_CODES, "DISCONNECT")
        _check_properties(self.properties, PropertyContext.DISCONNECT)


@dataclass(frozen=True, slots=True)
class Auth:
    """MQTT 5 enhanced authentication exchange (3.15)."""

    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = field(default=NO_PROPERTIES)

    def __post_init__(self) -> None:
        _check_reason(self.reason_code, AUTH_REASON_CODES, "AUTH")
        _check_properties(self.properties, PropertyContext.AUTH)


Packet = (
    Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Suback | Unsubscribe | Unsuback
    | Pingreq | Pingresp | Disconnect | Auth
)  # fmt: skip

PACKET_TYPE_OF: dict[type, PacketType] = {
    Connect: PacketType.CONNECT,
    Connack: PacketType.CONNACK,
    Publish: PacketType.PUBLISH,
    Puback: PacketType.PUBACK,
    Pubrec: PacketType.PUBREC,
    Pubrel: PacketType.PUBREL,
    Pubcomp: PacketType.PUBCOMP,
    Subscribe: PacketType.SUBSCRIBE,
    Suback: PacketType.SUBACK,
    Unsubscribe: PacketType.UNSUBSCRIBE,
    Unsuback: PacketType.UNSUBACK,
    Pingreq: PacketType.PINGREQ,
    Pingresp: PacketType.PINGRESP,
    Disconnect: PacketType.DISCONNECT,
    Auth: PacketType.AUTH,
}
