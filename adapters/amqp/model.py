"""How AMQP 0-9-1 names and messages map onto the core model (DESIGN.md section 3; docs/amqp.md "Mapping").

Names:
- an AMQP queue `Q` is the private core topic `%AMQP%<Q encoded>` with one queue, consumed by the core group of
  the same name in MESSAGE ack mode (`queue_topic`);
- publishing to `amq.topic` with routing key `T.a.b` is the core message (topic `T`, subject `a/b`); to any other
  exchange `E` with key `x.y` it is (topic `E`, subject `x/y`) (`publish_address`); the default exchange `""` with
  key `Q` goes straight into Q's topic;
- the binding key of a topic exchange becomes a core routing pattern (`T.*.b` -> `T/+/b`, `#` stays `#`), a direct
  binding the literal name, a fanout binding `E/#` (`binding_pattern`), so MQTT and native publishes reach AMQP queues
  and AMQP publishes reach MQTT subscribers and native consumers.

Topic levels are encoded the way the MQTT adapter encodes the first level of a name (bytes outside
`[A-Za-z0-9_.-]` become `%HH`, the empty level is `%00`), so an MQTT name and an AMQP routing key that mean the same
thing land on the same core topic. Inside the subject, `/` and `.` swap (as RabbitMQ's MQTT plugin does) and the three
characters a core subject cannot hold (`+`, `#`, NUL) are written `%2B`, `%23`, `%00`.

Messages: `message_from_publish` / `properties_for_delivery`; see the property table in docs/amqp.md.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from pamqp import commands

from tidegate.adapters.reserved_properties import is_reserved_property
from tidegate.adapters.topic_names import decode_level, encode_level
from tidegate.core.model import Message, MessageFlag

QUEUE_TOPIC_PREFIX = "%AMQP%"
MAX_CORE_TOPIC = 127

# Core properties the AMQP adapter reads and writes itself (the rest are user headers).
PROP_CONTENT_TYPE = "content-type"
PROP_CORRELATION_ID = "correlation-id"
PROP_REPLY_TO = "reply-to"
PROP_MESSAGE_ID = "message-id"
# The AMQP content-header property list exactly as published (base64), kept only when the mapped properties cannot
# rebuild it (timestamps, priorities, non-string header values, ...): AMQP consumers get it back byte for byte.
PROP_RAW = "amqp-properties"
MAPPED_PROPERTIES = {
    "content_type": PROP_CONTENT_TYPE,
    "correlation_id": PROP_CORRELATION_ID,
    "reply_to": PROP_REPLY_TO,
    "message_id": PROP_MESSAGE_ID,
}
_ADAPTER_PROPERTIES = frozenset({PROP_CONTENT_TYPE, PROP_CORRELATION_ID, PROP_REPLY_TO, PROP_MESSAGE_ID, PROP_RAW})
# Properties of other adapters that are not headers of the message (the MQTT adapter's bookkeeping).
_FOREIGN_PREFIXES = ("mqtt-",)

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
# Exchanges every virtual host has (RabbitMQ's defaults); "" is the default exchange.
DEFAULT_EXCHANGES = {
    "": "direct",
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.topic": "topic",
    "amq.headers": "headers",
    "amq.match": "headers",
}
TOPIC_EXCHANGE = "amq.topic"
_TRANSIENT = int(MessageFlag.TRANSIENT)  # plain ints: IntFlag operations cost an enum call per message
_PERSISTENT = int(MessageFlag.PERSISTENT)


class UnmappableKey(ValueError):
    """A routing key or binding key with no core spelling."""




def _bounded(prefix: str, encoded: str, original: str) -> str:
    """`prefix + encoded` when it fits the core's 127 characters, else a prefix of it and a hash (`%%` never occurs
    in a canonical encoding, so a hashed name never equals a short one)."""
    name = prefix + encoded
    if len(name) <= MAX_CORE_TOPIC:
        return name
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return name[: MAX_CORE_TOPIC - len(digest) - 2] + "%%" + digest


def queue_topic(queue: str) -> str:
    """The private core topic (and consumer group) of AMQP queue `queue`."""
    return _bounded(QUEUE_TOPIC_PREFIX, encode_level(queue), queue)


def exchange_topic(exchange: str) -> str:
    """The core topic messages published to `exchange` (not amq.topic, not "") are stored under."""
    return _bounded("", encode_level(exchange), exchange)


def _subject_word(word: str) -> str:
    if "/" in word:
        word = word.replace("/", ".")
    if "+" in word or "#" in word or "\x00" in word:
        word = word.replace("+", "%2B").replace("#", "%23").replace("\x00", "%00")
    return word


def key_subject(key: str) -> str:
    """The core subject of a routing key: `x.y` -> `x/y`."""
    if not key:
        return ""
    return "/".join(_subject_word(w) for w in key.split("."))


def subject_key(subject: str) -> str:
    """The routing key of a core subject (inverse of `key_subject` for keys without escapes)."""
    return ".".join(w.replace(".", "/") for w in subject.split("/")) if subject else ""


def publish_address(exchange: str, routing_key: str, topic: str = "") -> tuple[str, str]:
    """(core topic, subject) of a message published to `exchange` (not the default exchange) with `routing_key`;
    `topic` is the exchange's core topic when the caller knows it already."""
    if exchange == TOPIC_EXCHANGE:
        first, _, rest = routing_key.partition(".")
        return encode_level(first.replace("/", ".")), key_subject(rest)
    return topic or exchange_topic(exchange), key_subject(routing_key)


def binding_pattern(exchange: str, exchange_type: str, binding_key: str) -> str:
    """The core routing pattern of a binding of a direct, fanout or topic exchange."""
    if exchange_type == "fanout":
        return exchange_topic(exchange) + "/#"
    if exchange_type == "direct":
        topic, subject = publish_address(exchange, binding_key)
        return f"{topic}/{subject}" if subject else topic
    words = binding_key.split(".")
    if exchange == TOPIC_EXCHANGE:
        first, rest = words[0], words[1:]
        head = {"*": "+", "#": "#"}.get(first) or encode_level(first.replace("/", "."))
    else:
        head, rest = exchange_topic(exchange), words if binding_key else []
    parts = [head]
    for word in rest:
        parts.append("+" if word == "*" else "#" if word == "#" else _subject_word(word))
    return "/".join(parts)


def topic_match(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching (`*` one word, `#` zero or more), for adapter-side routing (exchange-to-exchange)."""
    pattern, words = binding_key.split("."), routing_key.split(".")

    def match(i: int, j: int) -> bool:
        while i < len(pattern):
            p = pattern[i]
            if p == "#":
                return any(match(i + 1, k) for k in range(j, len(words) + 1))
            if j >= len(words) or (p != "*" and p != words[j]):
                return False
            i, j = i + 1, j + 1
        return j == len(words)

    return match(0, 0)


def headers_match(binding_args: Mapping[str, Any], headers: Mapping[str, Any] | None) -> bool:
    """Headers exchange matching: `x-match` all (default) or any; `x-`-prefixed binding arguments are ignored;
    an argument with a void value only needs the header to be present."""
    headers = headers or {}
    mode = str(binding_args.get("x-match", "all"))
    checks = [(k, v) for k, v in binding_args.items() if not k.startswith("x-")]
    if not checks:
        return mode.startswith("all")
    results = (k in headers and (v is None or headers[k] == v) for k, v in checks)
    return any(results) if mode.startswith("any") else all(results)


# --------------------------------------------------------------------------------------------- messages

def _rebuildable(properties: commands.Basic.Properties) -> bool:
    """Whether `properties_for_delivery` rebuilds these properties from core properties and flags alone."""
    p = properties
    if (p.content_encoding is not None or p.priority is not None or p.expiration is not None
            or p.timestamp is not None or p.message_type is not None or p.user_id is not None
            or p.app_id is not None or p.cluster_id):
        return False
    if p.delivery_mode is None:
        return False  # "absent" cannot be told from 1 once mapped to TRANSIENT
    headers = p.headers
    if headers:
        for key, value in headers.items():
            if value.__class__ is not str or key in _ADAPTER_PROPERTIES or key.startswith(_FOREIGN_PREFIXES):
                return False
    return True


def message_from_publish(topic: str, subject: str, properties: commands.Basic.Properties, raw_properties: bytes,
                         body: bytes, now_ms: int) -> Message:
    """The core message of a basic.publish: string headers become properties, the mapped properties their core
    names, delivery mode 2 PERSISTENT (anything else TRANSIENT), `expiration` (milliseconds) the expiry."""
    props: dict[str, str] = {}
    headers = properties.headers
    if headers:
        for key, value in headers.items():
            if is_reserved_property(key):
                continue  # adapter bookkeeping (mqtt-publisher, amqp-properties) is never a publisher's to set
            if value.__class__ is str:
                props[key] = value
            elif value.__class__ is bytes:
                try:
                    props[key] = value.decode("utf-8")
                except UnicodeDecodeError:
                    pass
    if properties.content_type is not None:
        props[PROP_CONTENT_TYPE] = properties.content_type
    if properties.correlation_id is not None:
        props[PROP_CORRELATION_ID] = properties.correlation_id
    if properties.reply_to is not None:
        props[PROP_REPLY_TO] = properties.reply_to
    if properties.message_id is not None:
        props[PROP_MESSAGE_ID] = properties.message_id
    if not _rebuildable(properties):
        props[PROP_RAW] = base64.b64encode(raw_properties).decode("ascii")
    expires_at = 0
    if properties.expiration is not None:
        try:
            ttl = int(properties.expiration)
        except ValueError:
            ttl = -1
        if ttl >= 0:
            expires_at = now_ms + ttl if ttl > 0 else now_ms + 1
    flags = _PERSISTENT if properties.delivery_mode == 2 else _TRANSIENT
    return Message(topic=topic, subject=subject, body=body, properties=props, expires_at=expires_at, flags=flags)


def invalid_expiration(properties: commands.Basic.Properties) -> str | None:
    """RabbitMQ's complaint about an `expiration` that is not a non-negative integer, or None."""
    value = properties.expiration
    if value is None:
        return None
    if not value.isdigit():
        return f"PRECONDITION_FAILED - invalid expiration '{value}'"
    return None


def properties_for_delivery(message: Message, now_ms: int) -> commands.Basic.Properties | bytes:
    """The content-header properties of a core message for an AMQP consumer: the publisher's bytes when the message
    came from AMQP with properties the core cannot hold, else rebuilt from core properties and flags."""
    props = message.properties
    if not props and not message.expires_at:
        # the common case of a bare message: two precomputed property lists instead of an encode per delivery
        return _BARE_TRANSIENT if message.flags & _TRANSIENT else _BARE_PERSISTENT
    raw = props.get(PROP_RAW) if props else None
    if raw is not None:
        try:
            return base64.b64decode(raw)
        except ValueError:
            pass
    headers: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    if props:
        for key, value in props.items():
            if key in _ADAPTER_PROPERTIES:
                continue
            if key.startswith(_FOREIGN_PREFIXES):
                continue
            headers[key] = value
        fields = {name: props[core] for name, core in MAPPED_PROPERTIES.items() if core in props}
    expiration = None
    if message.expires_at:
        expiration = str(max(0, message.expires_at - now_ms))
    return commands.Basic.Properties(
        headers=headers or None,
        delivery_mode=1 if message.flags & MessageFlag.TRANSIENT else 2,
        expiration=expiration, **fields)


# Property flags and list of a message with nothing but its delivery mode: 0x1000 is the delivery-mode flag.
_BARE_TRANSIENT = b"\x10\x00\x01"
_BARE_PERSISTENT = b"\x10\x00\x02"


def delivery_address(message: Message, exchange_of_topic: Mapping[str, str], queue_topics: Mapping[str, str]
                     ) -> tuple[str, str]:
    """(exchange, routing key) a delivery reports: the default exchange for a message published into a queue's own
    topic, the declared exchange whose topic the message is stored under, else amq.topic (`T` + subject)."""
    topic = message.topic
    queue = queue_topics.get(topic)
    if queue is not None:
        return "", queue
    exchange = exchange_of_topic.get(topic)
    if exchange is not None:
        return exchange, subject_key(message.subject)
    first = decode_level(topic)
    if first is None:
        first = topic
    first = first.replace(".", "/")
    return TOPIC_EXCHANGE, f"{first}.{subject_key(message.subject)}" if message.subject else first


def message_priority(message: Message) -> int:
    """The AMQP priority of a stored message (0 when it has none, e.g. from MQTT or native publishers). Read from
    the publisher's raw property list (priorities always keep it, see `_rebuildable`) without decoding the rest:
    flags, then content-type and content-encoding (short strings), headers (a table), delivery-mode, priority."""
    props = message.properties
    raw = props.get(PROP_RAW) if props else None
    if raw is None:
        return 0
    try:
        data = base64.b64decode(raw)
        flags = int.from_bytes(data[:2], "big")
        if not flags & 0x0800:
            return 0
        position = 2
        for bit in (0x8000, 0x4000):  # content-type, content-encoding
            if flags & bit:
                position += 1 + data[position]
        if flags & 0x2000:  # headers
            position += 4 + int.from_bytes(data[position:position + 4], "big")
        if flags & 0x1000:  # delivery-mode
            position += 1
        return data[position]
    except (ValueError, IndexError):
        return 0
