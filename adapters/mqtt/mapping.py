"""How MQTT names and messages map onto the core model (DESIGN.md section 3).

Topic names: the MQTT topic name `T/a/b` is the core message (topic=T', subject="a/b"), where T' is the first level
encoded into the core topic alphabet `[A-Za-z0-9_.-]`: every other UTF-8 byte becomes `%HH` (upper-case hex), so
`%` is `%25`, `$SYS` is `%24SYS`, and an empty first level (names starting with `/`) is `%00` (MQTT forbids U+0000,
so that spelling is free). The encoding is canonical: decoding accepts exactly the strings `encode_level` produces,
so two different MQTT names never share a core name, and core topics that are not canonical encodings
(`%MQTT%...`, `%DLQ%...`, `%RETRY%...`, `%41`) are unreachable from MQTT in both directions.

Known gap: the core cannot tell "no subject" from "empty subject", so a name that is exactly one level followed by
a single `/` (`T/`) has no core spelling and is rejected as Topic Name invalid (0x90).

Filters: the first level is encoded the same way unless it is `+` or `#`; the core router applies the MQTT `/`, `+`,
`#` rules. The `$` rule (a filter starting with a wildcard does not match a name starting with `$`) is applied by
the adapter when it re-matches a delivery against the session's filters, because the core does not know it.

Messages: see `message_from_publish` / `publish_fields` for the property table. QoS travels in the message flags:
QoS 0 is the core's TRANSIENT, QoS 1 PERSISTENT, QoS 2 PERSISTENT plus `QOS2_FLAG`, a flag bit the core stores but
never interprets (bit 4, the value the core's former `MessageFlag.EXACTLY_ONCE` had, so stored messages keep their
QoS).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass

from tidegate.adapters.reserved_properties import is_reserved_property
from tidegate.adapters.topic_names import EMPTY_LEVEL, encode_level
from tidegate.adapters.topic_names import decode_level as decode_core_level
from tidegate.core.model import Message, MessageFlag

from .properties import Properties

MAX_CORE_TOPIC = 127
MAX_CORE_SUBJECT_BYTES = 4096
SESSION_TOPIC_PREFIX = "%MQTT%"
SHARE_TOPIC_PREFIX = "%MQTTSHARE%"
SHARE_GROUP_PREFIX = "%MQTTSHAREGROUP%"
# An adapter-reserved message flag bit: "published at QoS 2, MQTT subscribers may receive it at QoS 2". The core
# carries flags through storage untouched; the bit's value must never change (stored messages carry it).
QOS2_FLAG = 4

# Properties the adapter owns: stripped from user properties on delivery to MQTT (other protocols see them).
PROP_CONTENT_TYPE = "content-type"
PROP_CORRELATION_ID = "correlation-id"
PROP_REPLY_TO = "reply-to"
PROP_PAYLOAD_FORMAT = "mqtt-payload-format"
PROP_CORRELATION_ENCODING = "mqtt-correlation-encoding"  # "base64" when correlation data was not UTF-8
PROP_PUBLISHER = "mqtt-publisher"  # publishing client id, set only when that client has a No Local subscription
PROP_RETAIN = "mqtt-retain"  # "1" when published with the RETAIN flag (for Retain As Published)
ADAPTER_PROPERTIES = frozenset({PROP_CONTENT_TYPE, PROP_CORRELATION_ID, PROP_REPLY_TO, PROP_PAYLOAD_FORMAT,
                                PROP_CORRELATION_ENCODING, PROP_PUBLISHER, PROP_RETAIN})


class UnmappableName(ValueError):
    """An MQTT name with no core spelling (reported to the client as Topic Name invalid, 0x90)."""


def decode_level(encoded: str) -> str | None:
    """The MQTT level a core topic name spells, or None if the name is not a canonical encoding (internal topics,
    hand-made names such as `%41`, or levels MQTT cannot hold)."""
    level = decode_core_level(encoded)
    if level is None or "/" in level or "+" in level or "#" in level or "\x00" in level:
        return None
    return level


def core_address(topic_name: str) -> tuple[str, str]:
    """(core topic, subject) for an MQTT topic name; raises UnmappableName."""
    first, sep, subject = topic_name.partition("/")
    topic = encode_level(first)
    if len(topic) > MAX_CORE_TOPIC:
        raise UnmappableName(f"first level of {topic_name!r} is longer than {MAX_CORE_TOPIC} characters once encoded")
    if sep and not subject:
        raise UnmappableName(f"topic name {topic_name!r} ends in its second, empty level: it has no core spelling")
    if len(subject.encode("utf-8")) > MAX_CORE_SUBJECT_BYTES:
        raise UnmappableName(f"topic name {topic_name!r} is longer than {MAX_CORE_SUBJECT_BYTES} bytes below its "
                             "first level")
    return topic, subject


def mqtt_topic_name(core_topic: str, subject: str) -> str | None:
    """The MQTT topic name of a core message, or None if MQTT cannot see it (internal or non-canonical topic)."""
    first = decode_level(core_topic)
    if first is None:
        return None
    return f"{first}/{subject}" if subject else first


def core_pattern(topic_filter: str) -> str:
    """The core routing pattern of a (non-shared) MQTT topic filter."""
    first, sep, rest = topic_filter.partition("/")
    head = first if first in ("+", "#") else encode_level(first)
    return f"{head}{sep}{rest}"


def is_sys_name(topic: str) -> bool:
    return topic == "$SYS" or topic.startswith("$SYS/")


def _bounded_name(prefix: str, encoded: str, original: str) -> str:
    """`prefix + encoded` when it fits the core's 127 characters, else a prefix of it plus a hash.

    `%%` never occurs in a canonical encoding, so the hashed form cannot equal any short name.
    """
    name = prefix + encoded
    if len(name) <= MAX_CORE_TOPIC:
        return name
    digest = hashlib.sha256(original.encode("utf-8")).hexdigest()[:32]
    return name[: MAX_CORE_TOPIC - len(digest) - 2] + "%%" + digest


def session_topic(client_id: str) -> str:
    """The internal core topic (and consumer group) holding one MQTT session's queue."""
    return _bounded_name(SESSION_TOPIC_PREFIX, encode_level(client_id) if client_id else EMPTY_LEVEL, client_id)


def share_topic(share_name: str, topic_filter: str) -> str:
    """The internal core topic one `$share/{share_name}/{topic_filter}` subscription is bound to."""
    digest = hashlib.sha256(f"{share_name}\x00{topic_filter}".encode()).hexdigest()[:40]
    return SHARE_TOPIC_PREFIX + digest


def share_group(share_name: str) -> str:
    """The core consumer group of a share name (clustering: each message to one member).

    A private `%MQTTSHAREGROUP%` name, never the share name itself: consumer groups of native and AMQP clients
    live in the public namespace, and an MQTT client must not be able to join, lock out or (on leaving) delete
    them by naming one in `$share/<name>/...`."""
    return _bounded_name(SHARE_GROUP_PREFIX, encode_level(share_name), share_name)


# --------------------------------------------------------------------------------------------- messages


_TRANSIENT = int(MessageFlag.TRANSIENT)
_QOS2 = int(QOS2_FLAG)


def message_qos(flags: int) -> int:
    """The QoS a message carries towards MQTT subscribers (capped later by each subscription's QoS)."""
    value = int(flags)  # on ints: IntFlag's `&` costs Python-level calls
    return 0 if value & _TRANSIENT else (2 if value & _QOS2 else 1)


def flags_for_qos(qos: int) -> int:
    if qos == 0:
        return MessageFlag.TRANSIENT
    if qos == 2:
        return MessageFlag.PERSISTENT | QOS2_FLAG
    return MessageFlag.PERSISTENT


@dataclass(slots=True)
class PublishFields:
    """What an MQTT PUBLISH carries besides topic, QoS and flags (MQTT 5 properties; empty for 3.1.1)."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_properties(cls, props: Properties) -> PublishFields:
        """The fields of a PUBLISH (or will) as the client sent them."""
        return cls(props.payload_format_indicator, props.message_expiry_interval, props.content_type,
                   props.response_topic, props.correlation_data, props.user_properties)

    def to_properties(self, topic_alias: int | None = None,
                      subscription_identifiers: tuple[int, ...] = ()) -> Properties:
        """The MQTT 5 properties of a PUBLISH sent to a client with these fields."""
        return Properties(payload_format_indicator=self.payload_format_indicator,
                          message_expiry_interval=self.message_expiry_interval,
                          content_type=self.content_type, response_topic=self.response_topic,
                          correlation_data=self.correlation_data,
                          subscription_identifiers=subscription_identifiers, topic_alias=topic_alias,
                          user_properties=self.user_properties)


def stamp_publish(props: dict[str, str], retain: bool, publisher: str | None) -> dict[str, str]:
    """The properties the MQTT adapter itself puts on every published message (after the client's own)."""
    if retain:
        props[PROP_RETAIN] = "1"
    if publisher is not None:
        props[PROP_PUBLISHER] = publisher
    return props


def message_from_publish(topic_name: str, payload: bytes, qos: int, retain: bool, fields: PublishFields, now_ms: int,
                  publisher: str | None = None) -> Message:
    """The core message for an MQTT publish; raises UnmappableName.

    User properties become properties; a repeated name keeps its last value (core properties are a map); names the
    adapters own (`ADAPTER_PROPERTIES`, `mqtt-*`, `amqp-properties`) are dropped, and `publisher` (the client id, set
    by the server) is stamped after that.
    Correlation data that is not UTF-8 is stored base64-encoded with `mqtt-correlation-encoding=base64`.
    """
    topic, subject = core_address(topic_name)
    props: dict[str, str] = {}
    for key, value in fields.user_properties:
        if key in ADAPTER_PROPERTIES or is_reserved_property(key):
            continue  # adapter bookkeeping is never the client's to set (a forged mqtt-publisher hid messages)
        props[key] = value
    if fields.content_type is not None:
        props[PROP_CONTENT_TYPE] = fields.content_type
    if fields.response_topic is not None:
        props[PROP_REPLY_TO] = fields.response_topic
    if fields.correlation_data is not None:
        try:
            props[PROP_CORRELATION_ID] = fields.correlation_data.decode("utf-8")
            props.pop(PROP_CORRELATION_ENCODING, None)
        except UnicodeDecodeError:
            props[PROP_CORRELATION_ID] = base64.b64encode(fields.correlation_data).decode("ascii")
            props[PROP_CORRELATION_ENCODING] = "base64"
    if fields.payload_format_indicator is not None:
        props[PROP_PAYLOAD_FORMAT] = str(fields.payload_format_indicator)
    stamp_publish(props, retain, publisher)
    expires_at = 0
    if fields.message_expiry_interval is not None:
        expires_at = now_ms + fields.message_expiry_interval * 1000
    return Message(topic=topic, subject=subject, body=payload, properties=props, expires_at=expires_at,
                   flags=flags_for_qos(qos))


def publish_fields(message: Message, now_ms: int) -> PublishFields | None:
    """The MQTT 5 fields of a core message, or None if it has expired.

    The Message Expiry Interval is the remaining lifetime, rounded up so a message still alive is never sent
    with interval 0 (which would mean "does not expire").
    """
    fields = PublishFields()
    if message.expires_at:
        remaining_ms = message.expires_at - now_ms
        if remaining_ms <= 0:
            return None
        fields.message_expiry_interval = min(0xFFFFFFFF, math.ceil(remaining_ms / 1000))
    props = message.properties
    if not props:
        return fields
    user: list[tuple[str, str]] = []
    for key, value in props.items():
        if key in ADAPTER_PROPERTIES:
            continue
        user.append((key, value))
    fields.user_properties = tuple(user)
    fields.content_type = props.get(PROP_CONTENT_TYPE)
    fields.response_topic = props.get(PROP_REPLY_TO)
    correlation = props.get(PROP_CORRELATION_ID)
    if correlation is not None:
        if props.get(PROP_CORRELATION_ENCODING) == "base64":
            try:
                fields.correlation_data = base64.b64decode(correlation, validate=True)
            except (binascii.Error, ValueError):
                fields.correlation_data = correlation.encode("utf-8")
        else:
            fields.correlation_data = correlation.encode("utf-8")
    indicator = props.get(PROP_PAYLOAD_FORMAT)
    if indicator in ("0", "1"):
        fields.payload_format_indicator = int(indicator)
    return fields
