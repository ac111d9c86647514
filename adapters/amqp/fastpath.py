"""Hand-tuned encoders and decoders for what every message passes through on the AMQP hot path.

Every other method goes through pamqp's generic, table-driven marshalling. Basic.Publish (decoded once per message a
client sends), Basic.Deliver (encoded once per message a consumer receives) and the Basic content-header properties
(both ways) are written out here with precompiled structs; they produce the same pamqp objects and the same bytes as
pamqp does, which tests/amqp/test_codec_roundtrip.py checks against pamqp itself. A compiled twin of this module, if
one is ever needed, replaces these functions and keeps the same tests.
"""

from __future__ import annotations

import struct

from pamqp import commands, decode, encode

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
FRAME_END_BYTE = b"\xce"
# type(1) channel(2) size(4); the frame-end octet follows the payload. Header plus end octet = 8 bytes of overhead.
FRAME_HEADER_STRUCT = struct.Struct(">BHI")
FRAME_HEADER_SIZE = FRAME_HEADER_STRUCT.size
FRAME_OVERHEAD = FRAME_HEADER_SIZE + 1
METHOD_ID_STRUCT = struct.Struct(">I")  # class id and method id read as one number, pamqp's INDEX_MAPPING key
# class-id(2) weight(2) body-size(8), then the property flags and the property list.
CONTENT_HEADER_STRUCT = struct.Struct(">HHQ")
BASIC_CLASS_ID = commands.Basic.frame_id

BASIC_PUBLISH_INDEX = commands.Basic.Publish.index
BASIC_DELIVER_INDEX = commands.Basic.Deliver.index
_BASIC_DELIVER_ID = METHOD_ID_STRUCT.pack(BASIC_DELIVER_INDEX)
_DELIVERY_TAG_AND_FLAGS = struct.Struct(">QB")
_Publish = commands.Basic.Publish
_Properties = commands.Basic.Properties
_new = object.__new__
_PROPERTY_FLAGS = struct.Struct(">H")
# (name, flag bit, AMQP type) of each Basic property in wire order, taken from pamqp's class.
_PROPERTY_ORDER = tuple((name, _Properties.flags[name], _Properties.amqp_type(name)) for name in _Properties.__slots__)
if {kind for _name, _flag, kind in _PROPERTY_ORDER} != {"shortstr", "table", "octet", "timestamp"}:
    raise ImportError("pamqp's Basic.Properties uses property types the AMQP fast path does not handle")


class FastPathError(ValueError):
    """Bytes or values the fast path cannot encode or decode; the codec turns it into its own error type."""


def decode_basic_publish(payload: bytes) -> commands.Basic.Publish:
    """Decode a whole Basic.Publish method payload (including its 4 method-id bytes) into a pamqp command.

    Stricter than pamqp's generic decoder: a truncated argument or trailing bytes are an error rather than silently
    shortened strings. Raises FastPathError.
    """
    try:
        # Arguments: ticket short (deprecated, ignored), exchange shortstr, routing-key shortstr, flags octet.
        position = 7
        end = position + payload[6]
        exchange = payload[position:end].decode()
        position = end + 1
        end = position + payload[end]
        routing_key = payload[position:end].decode()
        flags = payload[end]
    except (IndexError, UnicodeDecodeError) as error:
        raise FastPathError(f"malformed Basic.Publish arguments: {error}") from None
    if end + 1 != len(payload):
        raise FastPathError("malformed Basic.Publish arguments: length does not match the frame")
    # Build the command without running pamqp's validating constructor: decoding never validates (neither does pamqp's
    # own unmarshal), the adapter checks names where RabbitMQ does.
    method = _new(_Publish)
    method.ticket = payload[4] << 8 | payload[5]
    method.exchange = exchange
    method.routing_key = routing_key
    method.mandatory = bool(flags & 1)
    method.immediate = bool(flags & 2)
    return method


def _short_string(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise FastPathError(f"short string over 255 bytes: {value[:40]!r}…")
    return bytes((len(encoded),)) + encoded


def short_string(value: str) -> bytes:
    """An AMQP short string (length octet + UTF-8), for callers that encode a value once and reuse it.
    Raises FastPathError over 255 bytes."""
    return _short_string(value)


def encode_deliver_frame(channel: int, consumer_tag: bytes, delivery_tag: int, redelivered: bool,
                         address: bytes) -> bytes:
    """A Basic.Deliver method frame from pre-encoded parts: `consumer_tag` and `address` (exchange + routing key)
    are short strings already, so a delivery builds no pamqp object and encodes no string."""
    return b"".join((FRAME_HEADER_STRUCT.pack(FRAME_METHOD, channel, 13 + len(consumer_tag) + len(address)),
                     _BASIC_DELIVER_ID, consumer_tag, _DELIVERY_TAG_AND_FLAGS.pack(delivery_tag, redelivered),
                     address, FRAME_END_BYTE))


def encode_basic_deliver_frame(channel: int, method: commands.Basic.Deliver) -> bytes:
    """The complete method frame (header, payload, frame-end) for one Basic.Deliver. Raises FastPathError."""
    try:
        consumer_tag = _short_string(method.consumer_tag)
        exchange = _short_string(method.exchange)
        routing_key = _short_string(method.routing_key)
        tag_and_flags = _DELIVERY_TAG_AND_FLAGS.pack(method.delivery_tag, 1 if method.redelivered else 0)
        size = 4 + len(consumer_tag) + 9 + len(exchange) + len(routing_key)
        header = FRAME_HEADER_STRUCT.pack(FRAME_METHOD, channel, size)
    except (AttributeError, TypeError, UnicodeEncodeError, struct.error) as error:
        raise FastPathError(f"cannot encode Basic.Deliver: {error}") from None
    return b"".join((header, _BASIC_DELIVER_ID, consumer_tag, tag_and_flags, exchange, routing_key, FRAME_END_BYTE))


def decode_basic_properties(raw: bytes) -> commands.Basic.Properties:
    """Decode the property flags and property list of a Basic content header (everything after its 12 fixed octets).

    Same result as pamqp's ContentHeader.unmarshal, which walks all 14 properties through its generic type table;
    this touches only the properties present and decodes short strings inline (tables and timestamps still go
    through pamqp's decoders). Raises FastPathError; pamqp's own decoders may raise ValueError.
    """
    try:
        (flags,) = _PROPERTY_FLAGS.unpack_from(raw)
    except struct.error:
        raise FastPathError("content header flags are truncated") from None
    if flags & 1:
        raise FastPathError("content header with continued property flags")  # Basic has 14 flags, one word
    properties = _new(_Properties)
    position = 2
    for name, flag, kind in _PROPERTY_ORDER:
        if not flags & flag:
            value = "" if name == "cluster_id" else None  # what pamqp's constructor leaves in an absent property
        elif kind == "shortstr":
            try:
                end = position + 1 + raw[position]
                if end > len(raw):
                    raise FastPathError(f"property {name} runs past the content header")
                value = raw[position + 1 : end].decode()
            except (IndexError, UnicodeDecodeError) as error:
                raise FastPathError(f"malformed property {name}: {error}") from None
            position = end
        elif kind == "octet":
            if position >= len(raw):
                raise FastPathError(f"property {name} runs past the content header")
            value = raw[position]
            position += 1
        else:
            consumed, value = decode.by_type(raw[position:], kind)
            position += consumed
            if position > len(raw):
                raise FastPathError(f"property {name} runs past the content header")
        setattr(properties, name, value)
    return properties


def encode_basic_properties(properties: commands.Basic.Properties) -> bytes:
    """The property flags and property list for a content header; the same bytes as pamqp's Properties.marshal.

    A property that is None or the empty string is absent, as in pamqp. Raises FastPathError; pamqp's encoders (used
    for tables and timestamps) raise TypeError or ValueError.
    """
    properties.validate()  # pamqp's rules: cluster_id empty, delivery_mode 1 or 2
    flags = 0
    parts = [b""]  # the flags word goes first, once it is known
    for name, flag, kind in _PROPERTY_ORDER:
        value = getattr(properties, name)
        if value is None or value == "":
            continue
        flags |= flag
        if kind == "shortstr":
            if value.__class__ is not str:
                raise FastPathError(f"property {name} must be a str, not {type(value).__name__}")
            parts.append(_short_string(value))
        elif kind == "octet":
            if value.__class__ is not int or not 0 <= value <= 255:
                raise FastPathError(f"property {name} must be an octet, not {value!r}")
            parts.append(bytes((value,)))
        else:
            parts.append(encode.by_type(value, kind))
    parts[0] = _PROPERTY_FLAGS.pack(flags)
    return b"".join(parts)
