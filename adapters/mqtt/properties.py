"""MQTT 5 properties: one typed, frozen value per packet, with the wire table that decodes and encodes them.

Spec section 2.2.2: a property is a Variable Byte Integer identifier followed by a value of the identifier's fixed
type. Which identifiers a packet may carry is fixed per packet type (`ALLOWED_PROPERTIES`). A property outside that
set, or an unknown identifier, is a Malformed Packet (2.2.2.2); a second copy of a property that may appear once is a
Protocol Error. User Property may repeat everywhere (order preserved) and Subscription Identifier may repeat in
PUBLISH (a server forwarding a message that matched several subscriptions).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from enum import Enum, IntEnum
from typing import Any

from .reason_codes import MqttProtocolError, ReasonCode, malformed, protocol_error

UINT16 = struct.Struct("!H")
UINT32 = struct.Struct("!I")
MAX_VARIABLE_BYTE_INTEGER = 268_435_455
MAX_UINT16 = 0xFFFF
MAX_UINT32 = 0xFFFF_FFFF


class PropertyId(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class WireType(Enum):
    BYTE = "byte"
    BOOLEAN_BYTE = "boolean byte"  # a byte the spec allows to be only 0 or 1
    TWO_BYTE_INTEGER = "two byte integer"
    FOUR_BYTE_INTEGER = "four byte integer"
    VARIABLE_BYTE_INTEGER = "variable byte integer"
    UTF8_STRING = "UTF-8 encoded string"
    BINARY_DATA = "binary data"
    UTF8_STRING_PAIR = "UTF-8 string pair"


class PropertyContext(Enum):
    """Where a property block appears: a packet type, or the Will Properties inside CONNECT."""

    CONNECT = "CONNECT"
    WILL = "Will"
    CONNACK = "CONNACK"
    PUBLISH = "PUBLISH"
    PUBACK = "PUBACK"
    PUBREC = "PUBREC"
    PUBREL = "PUBREL"
    PUBCOMP = "PUBCOMP"
    SUBSCRIBE = "SUBSCRIBE"
    SUBACK = "SUBACK"
    UNSUBSCRIBE = "UNSUBSCRIBE"
    UNSUBACK = "UNSUBACK"
    DISCONNECT = "DISCONNECT"
    AUTH = "AUTH"


@dataclass(frozen=True, slots=True)
class PropertySpec:
    identifier: PropertyId
    attribute: str
    wire_type: WireType
    minimum: int = 0
    maximum: int | None = None  # None: the wire type's own limit


P = PropertyId
W = WireType
# Spec table 2-4, in identifier order (which is also the order we encode in).
PROPERTY_SPECS: tuple[PropertySpec, ...] = (
    PropertySpec(P.PAYLOAD_FORMAT_INDICATOR, "payload_format_indicator", W.BYTE, maximum=1),
    PropertySpec(P.MESSAGE_EXPIRY_INTERVAL, "message_expiry_interval", W.FOUR_BYTE_INTEGER),
    PropertySpec(P.CONTENT_TYPE, "content_type", W.UTF8_STRING),
    PropertySpec(P.RESPONSE_TOPIC, "response_topic", W.UTF8_STRING),
    PropertySpec(P.CORRELATION_DATA, "correlation_data", W.BINARY_DATA),
    # Subscription Identifier 0 is a Protocol Error (3.8.2.1.2).
    PropertySpec(P.SUBSCRIPTION_IDENTIFIER, "subscription_identifiers", W.VARIABLE_BYTE_INTEGER, minimum=1),
    PropertySpec(P.SESSION_EXPIRY_INTERVAL, "session_expiry_interval", W.FOUR_BYTE_INTEGER),
    PropertySpec(P.ASSIGNED_CLIENT_IDENTIFIER, "assigned_client_identifier", W.UTF8_STRING),
    PropertySpec(P.SERVER_KEEP_ALIVE, "server_keep_alive", W.TWO_BYTE_INTEGER),
    PropertySpec(P.AUTHENTICATION_METHOD, "authentication_method", W.UTF8_STRING),
    PropertySpec(P.AUTHENTICATION_DATA, "authentication_data", W.BINARY_DATA),
    PropertySpec(P.REQUEST_PROBLEM_INFORMATION, "request_problem_information", W.BOOLEAN_BYTE),
    PropertySpec(P.WILL_DELAY_INTERVAL, "will_delay_interval", W.FOUR_BYTE_INTEGER),
    PropertySpec(P.REQUEST_RESPONSE_INFORMATION, "request_response_information", W.BOOLEAN_BYTE),
    PropertySpec(P.RESPONSE_INFORMATION, "response_information", W.UTF8_STRING),
    PropertySpec(P.SERVER_REFERENCE, "server_reference", W.UTF8_STRING),
    PropertySpec(P.REASON_STRING, "reason_string", W.UTF8_STRING),
    # Receive Maximum, Maximum Packet Size and Topic Alias of 0 are Protocol Errors (3.1.2.11, 3.3.2.3.4).
    PropertySpec(P.RECEIVE_MAXIMUM, "receive_maximum", W.TWO_BYTE_INTEGER, minimum=1),
    PropertySpec(P.TOPIC_ALIAS_MAXIMUM, "topic_alias_maximum", W.TWO_BYTE_INTEGER),
    PropertySpec(P.TOPIC_ALIAS, "topic_alias", W.TWO_BYTE_INTEGER, minimum=1),
    PropertySpec(P.MAXIMUM_QOS, "maximum_qos", W.BYTE, maximum=1),
    PropertySpec(P.RETAIN_AVAILABLE, "retain_available", W.BOOLEAN_BYTE),
    PropertySpec(P.USER_PROPERTY, "user_properties", W.UTF8_STRING_PAIR),
    PropertySpec(P.MAXIMUM_PACKET_SIZE, "maximum_packet_size", W.FOUR_BYTE_INTEGER, minimum=1),
    PropertySpec(P.WILDCARD_SUBSCRIPTION_AVAILABLE, "wildcard_subscription_available", W.BOOLEAN_BYTE),
    PropertySpec(P.SUBSCRIPTION_IDENTIFIER_AVAILABLE, "subscription_identifier_available", W.BOOLEAN_BYTE),
    PropertySpec(P.SHARED_SUBSCRIPTION_AVAILABLE, "shared_subscription_available", W.BOOLEAN_BYTE),
)
SPEC_BY_ID: dict[int, PropertySpec] = {int(spec.identifier): spec for spec in PROPERTY_SPECS}

C = PropertyContext
_PROPERTY_CONTEXTS: dict[PropertyId, frozenset[PropertyContext]] = {
    P.PAYLOAD_FORMAT_INDICATOR: frozenset({C.PUBLISH, C.WILL}),
    P.MESSAGE_EXPIRY_INTERVAL: frozenset({C.PUBLISH, C.WILL}),
    P.CONTENT_TYPE: frozenset({C.PUBLISH, C.WILL}),
    P.RESPONSE_TOPIC: frozenset({C.PUBLISH, C.WILL}),
    P.CORRELATION_DATA: frozenset({C.PUBLISH, C.WILL}),
    P.SUBSCRIPTION_IDENTIFIER: frozenset({C.PUBLISH, C.SUBSCRIBE}),
    P.SESSION_EXPIRY_INTERVAL: frozenset({C.CONNECT, C.CONNACK, C.DISCONNECT}),
    P.ASSIGNED_CLIENT_IDENTIFIER: frozenset({C.CONNACK}),
    P.SERVER_KEEP_ALIVE: frozenset({C.CONNACK}),
    P.AUTHENTICATION_METHOD: frozenset({C.CONNECT, C.CONNACK, C.AUTH}),
    P.AUTHENTICATION_DATA: frozenset({C.CONNECT, C.CONNACK, C.AUTH}),
    P.REQUEST_PROBLEM_INFORMATION: frozenset({C.CONNECT}),
    P.WILL_DELAY_INTERVAL: frozenset({C.WILL}),
    P.REQUEST_RESPONSE_INFORMATION: frozenset({C.CONNECT}),
    P.RESPONSE_INFORMATION: frozenset({C.CONNACK}),
    P.SERVER_REFERENCE: frozenset({C.CONNACK, C.DISCONNECT}),
    P.REASON_STRING: frozenset(
        {C.CONNACK, C.PUBACK, C.PUBREC, C.PUBREL, C.PUBCOMP, C.SUBACK, C.UNSUBACK, C.DISCONNECT, C.AUTH}
    ),
    P.RECEIVE_MAXIMUM: frozenset({C.CONNECT, C.CONNACK}),
    P.TOPIC_ALIAS_MAXIMUM: frozenset({C.CONNECT, C.CONNACK}),
    P.TOPIC_ALIAS: frozenset({C.PUBLISH}),
    P.MAXIMUM_QOS: frozenset({C.CONNACK}),
    P.RETAIN_AVAILABLE: frozenset({C.CONNACK}),
    P.USER_PROPERTY: frozenset(C),
    P.MAXIMUM_PACKET_SIZE: frozenset({C.CONNECT, C.CONNACK}),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: frozenset({C.CONNACK}),
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: frozenset({C.CONNACK}),
    P.SHARED_SUBSCRIPTION_AVAILABLE: frozenset({C.CONNACK}),
}
ALLOWED_PROPERTIES: dict[PropertyContext, frozenset[int]] = {
    context: frozenset(int(pid) for pid, contexts in _PROPERTY_CONTEXTS.items() if context in contexts)
    for context in PropertyContext
}
del C, P, W


def _is_repeatable(identifier: int, context: PropertyContext) -> bool:
    if identifier == PropertyId.USER_PROPERTY:
        return True
    # One PUBLISH can match several of a client's subscriptions; the server then lists every identifier (3.3.2.3.8).
    return identifier == PropertyId.SUBSCRIPTION_IDENTIFIER and context is PropertyContext.PUBLISH


def check_utf8_text(text: str, what: str, reason: ReasonCode = ReasonCode.MALFORMED_PACKET) -> None:
    """Raise unless `text` is a valid MQTT UTF-8 string: no U+0000, no surrogates, at most 65535 bytes (1.5.4)."""
    if not isinstance(text, str):
        raise MqttProtocolError(f"{what} must be str, not {type(text).__name__}", reason)
    if "\x00" in text:
        raise MqttProtocolError(f"{what} contains U+0000", reason)
    if text.isascii():  # O(1) in CPython, and the common case: no surrogates, one byte per character
        encoded_length = len(text)
    else:
        try:
            encoded_length = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise MqttProtocolError(f"{what} contains a UTF-16 surrogate code point", reason) from None
    if encoded_length > MAX_UINT16:
        raise MqttProtocolError(f"{what} is {encoded_length} bytes, longer than 65535", reason)


def _check_value(spec: PropertySpec, value: Any) -> None:
    what = f"property {spec.attribute}"
    wire_type = spec.wire_type
    if wire_type is WireType.UTF8_STRING:
        check_utf8_text(value, what)
    elif wire_type is WireType.BINARY_DATA:
        if not isinstance(value, bytes):
            raise malformed(f"{what} must be bytes, not {type(value).__name__}")
        if len(value) > MAX_UINT16:
            raise malformed(f"{what} is {len(value)} bytes, longer than 65535")
    elif wire_type is WireType.BOOLEAN_BYTE:
        if not isinstance(value, bool):
            raise malformed(f"{what} must be bool, not {type(value).__name__}")
    elif wire_type is WireType.UTF8_STRING_PAIR:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise malformed(f"{what} entries must be (name, value) pairs")
        check_utf8_text(value[0], f"{what} name")
        check_utf8_text(value[1], f"{what} value")
    else:
        if not isinstance(value, int) or isinstance(value, bool):
            raise malformed(f"{what} must be int, not {type(value).__name__}")
        limit = {
            WireType.BYTE: 0xFF,
            WireType.TWO_BYTE_INTEGER: MAX_UINT16,
            WireType.FOUR_BYTE_INTEGER: MAX_UINT32,
            WireType.VARIABLE_BYTE_INTEGER: MAX_VARIABLE_BYTE_INTEGER,
        }[wire_type]
        maximum = limit if spec.maximum is None else spec.maximum
        if not spec.minimum <= value <= maximum:
            raise protocol_error(f"{what} is {value}, outside {spec.minimum}..{maximum}")


@dataclass(frozen=True, slots=True, repr=False)
class Properties:
    """The properties of one MQTT 5 packet (or of a CONNECT's will). Unset single properties are None.

    User properties keep wire order and may repeat; subscription identifiers are a tuple because PUBLISH may carry
    several. Construction checks types and value ranges; which properties a packet may carry is checked by
    `check_allowed` when the packet is built.
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: bool | None = None
    will_delay_interval: int | None = None
    request_response_information: bool | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: bool | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: bool | None = None
    subscription_identifier_available: bool | None = None
    shared_subscription_available: bool | None = None
    # Identifiers present, computed once so packets can check them against their allowed set cheaply.
    present: frozenset[int] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        present: set[int] = set()
        for spec in PROPERTY_SPECS:
            value = getattr(self, spec.attribute)
            if spec.identifier in (PropertyId.USER_PROPERTY, PropertyId.SUBSCRIPTION_IDENTIFIER):
                if not isinstance(value, tuple):
                    raise malformed(f"property {spec.attribute} must be a tuple")
                if not value:
                    continue
                for item in value:
                    _check_value(spec, item)
            elif value is None:
                continue
            else:
                _check_value(spec, value)
            present.add(int(spec.identifier))
        if self.response_topic is not None and ("+" in self.response_topic or "#" in self.response_topic):
            # 3.1.3.2.5 / 3.3.2.3.5: a response topic is a topic name, never a filter.
            raise protocol_error("property response_topic contains a wildcard")
        object.__setattr__(self, "present", frozenset(present))

    def __repr__(self) -> str:
        # Only the properties that are set: the other 25-odd fields would drown every packet's repr.
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in PROPERTY_ATTRIBUTES if getattr(self, name) not in (None, ())
        )
        return f"Properties({shown})"

    @property
    def is_empty(self) -> bool:
        return not self.present

    def check_allowed(self, context: PropertyContext) -> None:
        """Raise a Malformed Packet error if a property is not allowed in `context` (spec 2.2.2.2)."""
        extra = self.present - ALLOWED_PROPERTIES[context]
        if extra:
            names = ", ".join(PropertyId(identifier).name for identifier in sorted(extra))
            raise malformed(f"{context.value} may not carry {names}")
        if len(self.subscription_identifiers) > 1 and context is not PropertyContext.PUBLISH:
            raise protocol_error(f"{context.value} may carry only one subscription identifier")


NO_PROPERTIES = Properties()
PROPERTY_ATTRIBUTES: tuple[str, ...] = tuple(f.name for f in fields(Properties) if f.name != "present")


# --- wire format -----------------------------------------------------------------------------------------------


def encode_variable_byte_integer(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if not 0 <= value <= MAX_VARIABLE_BYTE_INTEGER:
        raise malformed(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        digit = value & 0x7F
        value >>= 7
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def decode_variable_byte_integer(buffer: bytes | memoryview, position: int, end: int) -> tuple[int, int]:
    """Read a Variable Byte Integer at `position`; returns (value, position after it).

    Raises a Malformed Packet error if it runs past `end`, needs a fifth byte, or is not minimally encoded.
    """
    value = 0
    shift = 0
    for index in range(position, min(position + 4, end)):
        byte = buffer[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and index > position:
                raise malformed("variable byte integer is not minimally encoded")
            return value, index + 1
        shift += 7
    if end - position >= 4:
        raise malformed("variable byte integer longer than 4 bytes")
    raise malformed("variable byte integer runs past the end of the packet")


def _encode_utf8(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return UINT16.pack(len(encoded)) + encoded


def _encode_binary(data: bytes) -> bytes:
    return UINT16.pack(len(data)) + data


def _encode_value(spec: PropertySpec, value: Any) -> bytes:
    wire_type = spec.wire_type
    if wire_type is WireType.UTF8_STRING:
        return _encode_utf8(value)
    if wire_type is WireType.BINARY_DATA:
        return _encode_binary(value)
    if wire_type is WireType.BYTE or wire_type is WireType.BOOLEAN_BYTE:
        return bytes((int(value),))
    if wire_type is WireType.TWO_BYTE_INTEGER:
        return UINT16.pack(value)
    if wire_type is WireType.FOUR_BYTE_INTEGER:
        return UINT32.pack(value)
    if wire_type is WireType.VARIABLE_BYTE_INTEGER:
        return encode_variable_byte_integer(value)
    return _encode_utf8(value[0]) + _encode_utf8(value[1])


_EMPTY_PROPERTY_BLOCK = b"\x00"


def encode_properties(properties: Properties) -> bytes:
    """The property block: its length as a Variable Byte Integer, then each property in identifier order."""
    if not properties.present:
        return _EMPTY_PROPERTY_BLOCK
    parts: list[bytes] = []
    for spec in PROPERTY_SPECS:
        if spec.identifier not in properties.present:
            continue
        value = getattr(properties, spec.attribute)
        identifier = bytes((spec.identifier,))
        if spec.identifier in (PropertyId.USER_PROPERTY, PropertyId.SUBSCRIPTION_IDENTIFIER):
            for item in value:
                parts.append(identifier)
                parts.append(_encode_value(spec, item))
        else:
            parts.append(identifier)
            parts.append(_encode_value(spec, value))
    body = b"".join(parts)
    return encode_variable_byte_integer(len(body)) + body


def _read_utf8(buffer: bytes | memoryview, position: int, end: int, what: str) -> tuple[str, int]:
    if position + 2 > end:
        raise malformed(f"{what} length runs past the end of the packet")
    length = (buffer[position] << 8) | buffer[position + 1]
    start = position + 2
    stop = start + length
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    try:
        text = bytes(buffer[start:stop]).decode("utf-8")
    except UnicodeDecodeError:
        raise malformed(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise malformed(f"{what} contains U+0000")
    return text, stop


def _read_binary(buffer: bytes | memoryview, position: int, end: int, what: str) -> tuple[bytes, int]:
    if position + 2 > end:
        raise malformed(f"{what} length runs past the end of the packet")
    length = (buffer[position] << 8) | buffer[position + 1]
    start = position + 2
    stop = start + length
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    return bytes(buffer[start:stop]), stop


def decode_properties(
    buffer: bytes | memoryview, position: int, end: int, context: PropertyContext
) -> tuple[Properties, int]:
    """Decode a property block at `position` for a packet of kind `context`; returns (properties, position after)."""
    length, position = decode_variable_byte_integer(buffer, position, end)
    if length == 0:
        return NO_PROPERTIES, position
    stop = position + length
    if stop > end:
        raise malformed("property length runs past the end of the packet")
    allowed = ALLOWED_PROPERTIES[context]
    values: dict[str, Any] = {}
    user_properties: list[tuple[str, str]] = []
    subscription_identifiers: list[int] = []
    while position < stop:
        identifier = buffer[position]
        position += 1
        spec = SPEC_BY_ID.get(identifier)
        if spec is None:
            raise malformed(f"unknown property identifier 0x{identifier:02X} in {context.value}")
        if identifier not in allowed:
            raise malformed(f"{context.value} may not carry {spec.identifier.name}")
        what = f"property {spec.attribute}"
        wire_type = spec.wire_type
        value: Any
        if wire_type is WireType.BYTE or wire_type is WireType.BOOLEAN_BYTE:
            if position >= stop:
                raise malformed(f"{what} runs past the end of the properties")
            value = buffer[position]
            position += 1
            if wire_type is WireType.BOOLEAN_BYTE:
                if value > 1:
                    raise protocol_error(f"{what} is {value}, must be 0 or 1")
                value = bool(value)
        elif wire_type is WireType.TWO_BYTE_INTEGER:
            if position + 2 > stop:
                raise malformed(f"{what} runs past the end of the properties")
            value = (buffer[position] << 8) | buffer[position + 1]
            position += 2
        elif wire_type is WireType.FOUR_BYTE_INTEGER:
            if position + 4 > stop:
                raise malformed(f"{what} runs past the end of the properties")
            (value,) = UINT32.unpack_from(buffer, position)
            position += 4
        elif wire_type is WireType.VARIABLE_BYTE_INTEGER:
            value, position = decode_variable_byte_integer(buffer, position, stop)
        elif wire_type is WireType.UTF8_STRING:
            value, position = _read_utf8(buffer, position, stop, what)
        elif wire_type is WireType.BINARY_DATA:
            value, position = _read_binary(buffer, position, stop, what)
        else:
            name, position = _read_utf8(buffer, position, stop, f"{what} name")
            text, position = _read_utf8(buffer, position, stop, f"{what} value")
            user_properties.append((name, text))
            continue
        if identifier == PropertyId.SUBSCRIPTION_IDENTIFIER:
            if subscription_identifiers and not _is_repeatable(identifier, context):
                raise protocol_error(f"{context.value} carries {spec.identifier.name} more than once")
            subscription_identifiers.append(value)
            continue
        if spec.attribute in values:
            raise protocol_error(f"{context.value} carries {spec.identifier.name} more than once")
        values[spec.attribute] = value
    if user_properties:
        values["user_properties"] = tuple(user_properties)
    if subscription_identifiers:
        values["subscription_identifiers"] = tuple(subscription_identifiers)
    return Properties(**values), position
