"""Sans-IO MQTT codec for protocol levels 3 (MQTT 3.1), 4 (3.1.1) and 5.

Bytes in, typed packets out (`MqttCodec.receive_data`), packets in, bytes out (`MqttCodec.encode`); no sockets, no
reactor, no broker imports. The adapter owns the connection and feeds this codec whatever arrives.

The stream's protocol level comes from CONNECT: a server-side codec reads it from the first packet, a client-side
codec from the CONNECT it encodes (or from `codec.protocol_level = 5` set by hand). It decides whether packets carry
properties and reason codes.

Encoding at levels 3 and 4 leaves out what 3.1.1 cannot carry (properties, acknowledgement reason codes, UNSUBACK
reason codes) and translates CONNACK and SUBACK codes to their 3.1.1 equivalents, so the adapter can build one
packet for every client. What would change meaning instead (AUTH, subscription options, a server DISCONNECT)
raises `MqttEncodeError`.

Every fault in received bytes raises `MqttProtocolError` carrying the MQTT 5 reason code to answer with; after
one, the codec refuses further input (the adapter must close the connection). Packets decoded before the fault in the
same `receive_data` call are on the error as `packets_before_error`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .packets import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    PACKET_TYPE_OF,
    PROTOCOL_NAMES,
    SHARED_SUBSCRIPTION_PREFIX,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    RetainHandling,
    Suback,
    Subscribe,
    TopicSubscription,
    Unsuback,
    Unsubscribe,
    Will,
    _PublishAcknowledgement,
    decoded_publish,
    parse_shared_subscription,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)
from .properties import (
    MAX_VARIABLE_BYTE_INTEGER,
    NO_PROPERTIES,
    UINT16,
    Properties,
    PropertyContext,
    PropertyId,
    decode_properties,
    decode_variable_byte_integer,
    encode_properties,
    encode_variable_byte_integer,
)
from .reason_codes import (
    SUBACK_FAILURE_V311,
    SUBACK_RETURN_CODES_V311,
    ConnackReturnCode,
    MqttEncodeError,
    MqttProtocolError,
    ReasonCode,
    connack_return_code,
    malformed,
    protocol_error,
    reason_for_connack_return_code,
)

__all__ = [
    "MQTT_3_1",
    "MQTT_3_1_1",
    "MQTT_5",
    "MAX_PACKET_SIZE",
    "Auth",
    "Connack",
    "ConnackReturnCode",
    "Connect",
    "Disconnect",
    "MqttCodec",
    "MqttEncodeError",
    "MqttProtocolError",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Properties",
    "PropertyId",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "ReasonCode",
    "RetainHandling",
    "SHARED_SUBSCRIPTION_PREFIX",
    "Suback",
    "Subscribe",
    "TopicSubscription",
    "Unsuback",
    "Unsubscribe",
    "PlainPublish",
    "Will",
    "connack_return_code",
    "parse_shared_subscription",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]

# Largest packet the wire format can express: 1 type byte + 4 length bytes + 268,435,455 bytes.
MAX_PACKET_SIZE = MAX_VARIABLE_BYTE_INTEGER + 5
# A PUBLISH at least this large that arrives over several reads has its payload joined straight from the received
# chunks (one copy), instead of the whole packet being joined and the payload then sliced out of it (two copies).
SPANNING_PUBLISH_MIN_BYTES = 4096

Buffer = bytes | memoryview
_Decoder = Callable[[int, int, Buffer, int, int], Packet]  # (level, flags, buffer, start, end)
_StateDecoder = Callable[[int, Buffer, int, int], Packet]  # (flags, buffer, start, end), level already bound
_SHARED_DISPATCH: dict[tuple[bool, int | None, bool], list[_StateDecoder]] = {}

_REASON_BY_VALUE: dict[int, ReasonCode] = {int(code): code for code in ReasonCode}

# Packets each side may receive (2.1.2 "Direction of flow"). DISCONNECT from a 3.1.1 server does not exist, but
# a client-side codec only learns that after the fact, so it is rejected in the DISCONNECT decoder instead.
_FROM_CLIENT = frozenset(
    {PacketType.CONNECT, PacketType.PUBLISH, PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL,
     PacketType.PUBCOMP, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE, PacketType.PINGREQ, PacketType.DISCONNECT,
     PacketType.AUTH}
)  # fmt: skip
_FROM_SERVER = frozenset(
    {PacketType.CONNACK, PacketType.PUBLISH, PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL,
     PacketType.PUBCOMP, PacketType.SUBACK, PacketType.UNSUBACK, PacketType.PINGRESP, PacketType.DISCONNECT,
     PacketType.AUTH}
)  # fmt: skip
# Fixed-header flag bits every packet but PUBLISH must carry (2.1.3); anything else is a Malformed Packet.
_REQUIRED_FLAGS = {packet_type: 0 for packet_type in PacketType}
_REQUIRED_FLAGS.update({PacketType.PUBREL: 0b0010, PacketType.SUBSCRIBE: 0b0010, PacketType.UNSUBSCRIBE: 0b0010})
_DUP_FLAG = 0b1000


# --- decoding: one function per packet type, each given (level, flags, buffer, start, end) ------------------------


def _read_uint16(buffer: Buffer, position: int, end: int, what: str) -> tuple[int, int]:
    if position + 2 > end:
        raise malformed(f"{what} runs past the end of the packet")
    return (buffer[position] << 8) | buffer[position + 1], position + 2


def _read_utf8(buffer: Buffer, position: int, end: int, what: str) -> tuple[str, int]:
    length, position = _read_uint16(buffer, position, end, f"{what} length")
    stop = position + length
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    try:
        text = str(buffer[position:stop], "utf-8")
    except UnicodeDecodeError:
        raise malformed(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise malformed(f"{what} contains U+0000")
    return text, stop


def _read_binary(buffer: Buffer, position: int, end: int, what: str) -> tuple[bytes, int]:
    length, position = _read_uint16(buffer, position, end, f"{what} length")
    stop = position + length
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    return bytes(buffer[position:stop]), stop


def _expect_end(position: int, end: int, packet: str) -> None:
    if position != end:
        raise malformed(f"{packet} has {end - position} bytes more than its contents")


def _reason(value: int, packet: str) -> ReasonCode:
    try:
        return _REASON_BY_VALUE[value]
    except KeyError:
        raise protocol_error(f"reason code 0x{value:02X} is not defined for {packet}") from None


def _decode_connect(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Connect:
    protocol_name, position = _read_utf8(buffer, start, end, "protocol name")
    if position + 4 > end:
        raise malformed("CONNECT variable header is truncated")
    announced_level = buffer[position]
    connect_flags = buffer[position + 1]
    keep_alive = (buffer[position + 2] << 8) | buffer[position + 3]
    position += 4
    if PROTOCOL_NAMES.get(announced_level) != protocol_name:
        raise MqttProtocolError(
            f"protocol name {protocol_name!r} with level {announced_level} is not MQTT 3.1, 3.1.1 or 5",
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
        )
    try:
        return _decode_connect_body(announced_level, connect_flags, keep_alive, buffer, position, end)
    except MqttProtocolError as error:
        # The level is known now: the adapter answers in that level's CONNACK format.
        error.protocol_level = announced_level
        raise


def _decode_connect_body(
    level: int, connect_flags: int, keep_alive: int, buffer: Buffer, position: int, end: int
) -> Connect:
    if connect_flags & 0x01:
        raise malformed("CONNECT reserved flag is set")  # [MQTT-3.1.2-3]
    has_will = connect_flags & 0x04
    will_qos = (connect_flags >> 3) & 0x03
    will_retain = bool(connect_flags & 0x20)
    has_password = connect_flags & 0x40
    has_username = connect_flags & 0x80
    if will_qos == 3:
        raise malformed("CONNECT will QoS is 3")
    if not has_will and (will_qos or will_retain):
        raise malformed("CONNECT will QoS or will retain set without the will flag")  # [MQTT-3.1.2-11, -13]
    if has_password and not has_username and level < MQTT_5:
        raise protocol_error("MQTT 3.1.1 does not allow a password without a user name")  # [MQTT-3.1.2-22]
    properties = NO_PROPERTIES
    if level == MQTT_5:
        properties, position = decode_properties(buffer, position, end, PropertyContext.CONNECT)
    client_id, position = _read_utf8(buffer, position, end, "client identifier")
    will = None
    if has_will:
        will_properties = NO_PROPERTIES
        if level == MQTT_5:
            will_properties, position = decode_properties(buffer, position, end, PropertyContext.WILL)
        will_topic, position = _read_utf8(buffer, position, end, "will topic")
        will_payload, position = _read_binary(buffer, position, end, "will payload")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = password = None
    if has_username:
        username, position = _read_utf8(buffer, position, end, "user name")
    if has_password:
        password, position = _read_binary(buffer, position, end, "password")
    _expect_end(position, end, "CONNECT")
    if properties.authentication_data is not None and properties.authentication_method is None:
        raise protocol_error("authentication data without an authentication method")  # 3.1.2.11.10
    return _decoded_connect(client_id, level, bool(connect_flags & 0x02), keep_alive, will, username, password,
                            properties)


_set_field = object.__setattr__  # how a frozen dataclass's own __init__ sets its fields


def _decoded_connect(client_id: str, level: int, clean_start: bool, keep_alive: int, will: Will | None,
                     username: str | None, password: bytes | None, properties: Properties) -> Connect:
    """The `Connect` of decoded fields, without `Connect.__post_init__`: every rule it checks the decoder has
    checked on the wire already (the level against the protocol name; client id and user name decoded as UTF-8
    without U+0000 from a 16-bit length, hence no surrogates and at most 65,535 bytes; keep alive from two bytes;
    the password from a 16-bit length and never without a user name before 5.0; properties only at 5.0, decoded
    for the CONNECT and will contexts; authentication data only with a method, just above). Re-checking them cost
    about as much as the rest of the CONNECT decode, once per connection of a reconnect storm. The result equals
    what `Connect(...)` builds from the same fields (tests/mqtt/test_connect_decode_fast.py)."""
    connect = object.__new__(Connect)
    _set_field(connect, "client_id", client_id)
    _set_field(connect, "protocol_level", level)
    _set_field(connect, "clean_start", clean_start)
    _set_field(connect, "keep_alive", keep_alive)
    _set_field(connect, "will", will)
    _set_field(connect, "username", username)
    _set_field(connect, "password", password)
    _set_field(connect, "properties", properties)
    _set_field(connect, "protocol_name", PROTOCOL_NAMES[level])
    return connect


def _decode_connack(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Connack:
    if end - start < 2:
        raise malformed("CONNACK is shorter than 2 bytes")
    acknowledge_flags = buffer[start]
    if acknowledge_flags & 0xFE:
        raise malformed("CONNACK reserved acknowledge flags are set")  # [MQTT-3.2.2-1]
    if level < MQTT_5:
        _expect_end(start + 2, end, "CONNACK")
        return Connack(bool(acknowledge_flags), reason_for_connack_return_code(buffer[start + 1]))
    reason_code = _reason(buffer[start + 1], "CONNACK")
    properties, position = decode_properties(buffer, start + 2, end, PropertyContext.CONNACK)
    _expect_end(position, end, "CONNACK")
    return Connack(bool(acknowledge_flags), reason_code, properties)


def _decode_publish(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise malformed("PUBLISH QoS is 3")  # [MQTT-3.3.1-4]
    if start + 2 > end:
        raise malformed("PUBLISH topic length runs past the end of the packet")
    position = start + 2
    stop = position + ((buffer[start] << 8) | buffer[start + 1])
    if stop > end:
        raise malformed("PUBLISH topic runs past the end of the packet")
    try:
        topic = str(buffer[position:stop], "utf-8")
    except UnicodeDecodeError:
        raise malformed("PUBLISH topic is not valid UTF-8") from None
    position = stop
    packet_id = None
    if qos:
        if position + 2 > end:
            raise malformed("PUBLISH packet identifier runs past the end of the packet")
        packet_id = (buffer[position] << 8) | buffer[position + 1]
        position += 2
    properties = NO_PROPERTIES
    if level == MQTT_5:
        if position < end and buffer[position] == 0:  # most messages carry no properties
            position += 1
        else:
            properties, position = decode_properties(buffer, position, end, PropertyContext.PUBLISH)
    # The one copy of the payload: slicing bytes (or bytes() of a memoryview slice) copies exactly once.
    payload = bytes(buffer[position:end])
    return decoded_publish(topic, payload, qos, bool(flags & 0x01), bool(flags & _DUP_FLAG), packet_id, properties)


def _acknowledgement_decoder(packet_class: type[_PublishAcknowledgement]) -> _Decoder:
    name = packet_class.packet_type.name
    context = packet_class.context

    def decode(level: int, flags: int, buffer: Buffer, start: int, end: int) -> _PublishAcknowledgement:
        length = end - start
        if length < 2:
            raise malformed(f"{name} is shorter than 2 bytes")
        packet_id = (buffer[start] << 8) | buffer[start + 1]
        if length == 2:
            return packet_class(packet_id)
        if level < MQTT_5:
            raise malformed(f"{name} remaining length is {length}, must be 2 before MQTT 5")
        reason_code = _reason(buffer[start + 2], name)
        if length == 3:  # 3.4.2.2: no Property Length when the remaining length is 3
            return packet_class(packet_id, reason_code)
        properties, position = decode_properties(buffer, start + 3, end, context)
        _expect_end(position, end, name)
        return packet_class(packet_id, reason_code, properties)

    return decode


def _decode_subscribe(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Subscribe:
    packet_id, position = _read_uint16(buffer, start, end, "SUBSCRIBE packet identifier")
    properties = NO_PROPERTIES
    if level == MQTT_5:
        properties, position = decode_properties(buffer, position, end, PropertyContext.SUBSCRIBE)
    subscriptions = []
    while position < end:
        topic_filter, position = _read_utf8(buffer, position, end, "SUBSCRIBE topic filter")
        if position >= end:
            raise malformed("SUBSCRIBE topic filter has no subscription options")
        options = buffer[position]
        position += 1
        if level == MQTT_5:
            if options & 0xC0:
                raise malformed("SUBSCRIBE reserved option bits are set")  # [MQTT-3.8.3-5]
            retain_handling = (options >> 4) & 0x03
            if retain_handling == 3:
                raise protocol_error("SUBSCRIBE retain handling is 3")
            subscription = TopicSubscription(
                topic_filter, options & 0x03, bool(options & 0x04), bool(options & 0x08),
                RetainHandling(retain_handling),
            )  # fmt: skip
        else:
            if options & 0xFC:
                raise malformed("SUBSCRIBE reserved QoS bits are set")  # [MQTT-3-8.3-4] in 3.1.1
            subscription = TopicSubscription(topic_filter, options & 0x03)
        subscriptions.append(subscription)
    return Subscribe(packet_id, tuple(subscriptions), properties)


def _decode_suback(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Suback:
    packet_id, position = _read_uint16(buffer, start, end, "SUBACK packet identifier")
    properties = NO_PROPERTIES
    if level == MQTT_5:
        properties, position = decode_properties(buffer, position, end, PropertyContext.SUBACK)
    reason_codes = []
    for index in range(position, end):
        value = buffer[index]
        if level < MQTT_5 and value not in SUBACK_RETURN_CODES_V311:
            raise protocol_error(f"SUBACK return code 0x{value:02X} is reserved in MQTT 3.1.1")
        reason_codes.append(_reason(value, "SUBACK"))
    return Suback(packet_id, tuple(reason_codes), properties)


def _decode_unsubscribe(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Unsubscribe:
    packet_id, position = _read_uint16(buffer, start, end, "UNSUBSCRIBE packet identifier")
    properties = NO_PROPERTIES
    if level == MQTT_5:
        properties, position = decode_properties(buffer, position, end, PropertyContext.UNSUBSCRIBE)
    topic_filters = []
    while position < end:
        topic_filter, position = _read_utf8(buffer, position, end, "UNSUBSCRIBE topic filter")
        topic_filters.append(topic_filter)
    return Unsubscribe(packet_id, tuple(topic_filters), properties)


def _decode_unsuback(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Unsuback:
    packet_id, position = _read_uint16(buffer, start, end, "UNSUBACK packet identifier")
    if level < MQTT_5:
        _expect_end(position, end, "UNSUBACK")
        return Unsuback(packet_id)
    properties, position = decode_properties(buffer, position, end, PropertyContext.UNSUBACK)
    if position == end:
        raise protocol_error("UNSUBACK carries no reason codes")  # 3.11.3: one per topic filter
    reason_codes = tuple(_reason(buffer[index], "UNSUBACK") for index in range(position, end))
    return Unsuback(packet_id, reason_codes, properties)


def _empty_packet_decoder(packet_class: type[Pingreq] | type[Pingresp]) -> _Decoder:
    instance = packet_class()
    name = packet_class.__name__.upper()

    def decode(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Packet:
        _expect_end(start, end, name)
        return instance

    return decode


def _decode_disconnect(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Disconnect:
    if level < MQTT_5:
        _expect_end(start, end, "DISCONNECT")
        return Disconnect()
    if start == end:  # 3.14.2.1: no reason code means Normal disconnection
        return Disconnect()
    reason_code = _reason(buffer[start], "DISCONNECT")
    if end - start == 1:
        return Disconnect(reason_code)
    properties, position = decode_properties(buffer, start + 1, end, PropertyContext.DISCONNECT)
    _expect_end(position, end, "DISCONNECT")
    return Disconnect(reason_code, properties)


def _decode_auth(level: int, flags: int, buffer: Buffer, start: int, end: int) -> Auth:
    if level < MQTT_5:
        raise malformed("AUTH is a reserved packet type before MQTT 5")
    if start == end:  # 3.15.2.1: Success with no properties may be sent as an empty packet
        return Auth()
    reason_code = _reason(buffer[start], "AUTH")
    if end - start == 1:
        return Auth(reason_code)
    properties, position = decode_properties(buffer, start + 1, end, PropertyContext.AUTH)
    _expect_end(position, end, "AUTH")
    return Auth(reason_code, properties)


_DECODERS: dict[int, _Decoder] = {
    PacketType.CONNECT: _decode_connect,
    PacketType.CONNACK: _decode_connack,
    PacketType.PUBLISH: _decode_publish,
    PacketType.PUBACK: _acknowledgement_decoder(Puback),
    PacketType.PUBREC: _acknowledgement_decoder(Pubrec),
    PacketType.PUBREL: _acknowledgement_decoder(Pubrel),
    PacketType.PUBCOMP: _acknowledgement_decoder(Pubcomp),
    PacketType.SUBSCRIBE: _decode_subscribe,
    PacketType.SUBACK: _decode_suback,
    PacketType.UNSUBSCRIBE: _decode_unsubscribe,
    PacketType.UNSUBACK: _decode_unsuback,
    PacketType.PINGREQ: _empty_packet_decoder(Pingreq),
    PacketType.PINGRESP: _empty_packet_decoder(Pingresp),
    PacketType.DISCONNECT: _decode_disconnect,
    PacketType.AUTH: _decode_auth,
}


# --- encoding ---------------------------------------------------------------------------------------------------

_SINGLE_BYTE = [bytes((value,)) for value in range(256)]


def _utf8(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return UINT16.pack(len(encoded)) + encoded


def _binary(data: bytes) -> bytes:
    return UINT16.pack(len(data)) + data


def _frame(first_byte: int, *parts: bytes) -> bytes:
    remaining = sum(map(len, parts))
    if remaining > MAX_VARIABLE_BYTE_INTEGER:
        raise MqttEncodeError(f"packet body of {remaining} bytes exceeds the MQTT maximum", ReasonCode.PACKET_TOO_LARGE)
    return b"".join((_SINGLE_BYTE[first_byte], encode_variable_byte_integer(remaining), *parts))


def _encode_connect(level: int, packet: Connect) -> bytes:
    will = packet.will
    connect_flags = 0x02 if packet.clean_start else 0
    if will is not None:
        connect_flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if packet.password is not None:
        connect_flags |= 0x40
    if packet.username is not None:
        connect_flags |= 0x80
    parts = [_utf8(packet.protocol_name or ""), bytes((packet.protocol_level, connect_flags)),
             UINT16.pack(packet.keep_alive)]  # fmt: skip
    if level == MQTT_5:
        parts.append(encode_properties(packet.properties))
    parts.append(_utf8(packet.client_id))
    if will is not None:
        if level == MQTT_5:
            parts.append(encode_properties(will.properties))
        parts.append(_utf8(will.topic))
        parts.append(_binary(will.payload))
    if packet.username is not None:
        parts.append(_utf8(packet.username))
    if packet.password is not None:
        parts.append(_binary(packet.password))
    return _frame(0x10, *parts)


def _encode_connack(level: int, packet: Connack) -> bytes:
    flags = 0x01 if packet.session_present else 0
    if level < MQTT_5:
        return _frame(0x20, bytes((flags, connack_return_code(packet.reason_code))))
    return _frame(0x20, bytes((flags, packet.reason_code)), encode_properties(packet.properties))


def _encode_publish(level: int, packet: Publish) -> bytes:
    qos = packet.qos
    first_byte = 0x30 | (qos << 1)
    if packet.retain:
        first_byte |= 0x01
    if packet.dup:
        first_byte |= _DUP_FLAG
    topic = packet.topic.encode("utf-8")
    variable_header = UINT16.pack(len(topic)) + topic
    if qos:
        variable_header += UINT16.pack(packet.packet_id)  # type: ignore[arg-type]
    if level == MQTT_5:
        variable_header += encode_properties(packet.properties)
    elif packet.properties.topic_alias is not None and not packet.topic:
        raise MqttEncodeError("a topic alias needs MQTT 5", ReasonCode.PROTOCOL_ERROR)
    payload = packet.payload
    remaining = len(variable_header) + len(payload)
    if remaining > MAX_VARIABLE_BYTE_INTEGER:
        raise MqttEncodeError(f"PUBLISH of {remaining} bytes exceeds the MQTT maximum", ReasonCode.PACKET_TOO_LARGE)
    header = (
        _SINGLE_BYTE[first_byte] + _SINGLE_BYTE[remaining]
        if remaining < 0x80
        else _SINGLE_BYTE[first_byte] + encode_variable_byte_integer(remaining)
    )
    return b"".join((header, variable_header, payload))


def publish_topic_header(topic_name: str) -> bytes:
    """The length-prefixed topic name of a PUBLISH variable header, checked as `Publish` checks it.

    Deliveries cache it per topic name, so a PUBLISH to a 3.1.1 client is built by `encode_publish_v311` without a
    `Publish` object or re-encoding the name. Raises what `Publish(topic_name)` raises for an invalid name.
    """
    Publish(topic_name)  # the same validation as a packet built one at a time
    topic = topic_name.encode("utf-8")
    return UINT16.pack(len(topic)) + topic


def encode_publish_v311(topic_header: bytes, payload: bytes, qos: int, retain: bool, dup: bool,
                        packet_id: int | None) -> bytes:
    """The bytes `MqttCodec.encode(Publish(...))` gives at protocol level 3.1/3.1.1 (no properties), from a topic
    header made by `publish_topic_header`; the payload is joined once, never re-encoded."""
    return publish_v311_head(topic_header, len(payload), qos, retain, dup, packet_id) + payload


def publish_v311_head(topic_header: bytes, payload_size: int, qos: int, retain: bool, dup: bool,
                      packet_id: int | None) -> bytes:
    """Everything of a 3.1/3.1.1 PUBLISH before its payload (fixed header, topic, packet id): `encode_publish_v311`
    is this + the payload. A large payload is written after it as a piece of its own (`write_chunks`, `sendmsg`),
    so the stored body reaches the socket without being copied into a packet first."""
    first_byte = 0x30 | (qos << 1)
    if retain:
        first_byte |= 0x01
    if dup:
        first_byte |= _DUP_FLAG
    if qos:
        if packet_id.__class__ is not int or not 0 < packet_id <= 0xFFFF:  # type: ignore[operator]
            raise MqttEncodeError(f"PUBLISH packet identifier {packet_id!r} is not 1..65535",
                                  ReasonCode.PROTOCOL_ERROR)
        remaining = len(topic_header) + 2 + payload_size
        variable = topic_header + UINT16.pack(packet_id)
    else:
        remaining = len(topic_header) + payload_size
        variable = topic_header
    if remaining < 0x80:
        return b"".join((_SINGLE_BYTE[first_byte], _SINGLE_BYTE[remaining], variable))
    if remaining > MAX_VARIABLE_BYTE_INTEGER:
        raise MqttEncodeError(f"PUBLISH of {remaining} bytes exceeds the MQTT maximum", ReasonCode.PACKET_TOO_LARGE)
    return b"".join((_SINGLE_BYTE[first_byte], encode_variable_byte_integer(remaining), variable))


_puback_id_pack = UINT16.pack


def encode_puback_success(packet_id: int) -> bytes:
    """The bytes of `Puback(packet_id)` (reason Success, no properties) at any protocol level: the 4 bytes both
    3.1.1 and v5 send for it, without a packet object (the durable acknowledgement of every QoS 1 publish)."""
    if packet_id.__class__ is not int or not 0 < packet_id <= 0xFFFF:
        raise MqttEncodeError(f"PUBACK packet identifier {packet_id!r} is not 1..65535", ReasonCode.PROTOCOL_ERROR)
    return b"\x40\x02" + _puback_id_pack(packet_id)


def _encode_acknowledgement(level: int, packet: _PublishAcknowledgement) -> bytes:
    first_byte = (packet.packet_type << 4) | (0b0010 if packet.packet_type == PacketType.PUBREL else 0)
    packet_id = UINT16.pack(packet.packet_id)
    if level < MQTT_5 or (not packet.reason_code and packet.properties.is_empty):
        return _SINGLE_BYTE[first_byte] + b"\x02" + packet_id
    if packet.properties.is_empty:
        return _SINGLE_BYTE[first_byte] + b"\x03" + packet_id + _SINGLE_BYTE[packet.reason_code]
    return _frame(first_byte, packet_id, _SINGLE_BYTE[packet.reason_code], encode_properties(packet.properties))


def _encode_subscribe(level: int, packet: Subscribe) -> bytes:
    parts = [UINT16.pack(packet.packet_id)]
    if level == MQTT_5:
        parts.append(encode_properties(packet.properties))
    for subscription in packet.subscriptions:
        options = subscription.qos
        if level == MQTT_5:
            options |= (
                (0x04 if subscription.no_local else 0)
                | (0x08 if subscription.retain_as_published else 0)
                | (subscription.retain_handling << 4)
            )
        elif subscription.no_local or subscription.retain_as_published or subscription.retain_handling:
            raise MqttEncodeError(
                f"subscription options other than QoS need MQTT 5, the stream is level {level}",
                ReasonCode.PROTOCOL_ERROR,
            )
        parts.append(_utf8(subscription.topic_filter))
        parts.append(_SINGLE_BYTE[options])
    return _frame(0x82, *parts)


def _encode_suback(level: int, packet: Suback) -> bytes:
    if level < MQTT_5:
        # 3.1.1 has one failure code; granted QoS 0..2 mean the same in both levels.
        codes = bytes(code if code < 0x80 else SUBACK_FAILURE_V311 for code in packet.reason_codes)
        return _frame(0x90, UINT16.pack(packet.packet_id), codes)
    return _frame(0x90, UINT16.pack(packet.packet_id), encode_properties(packet.properties),
                  bytes(packet.reason_codes))  # fmt: skip


def _encode_unsubscribe(level: int, packet: Unsubscribe) -> bytes:
    parts = [UINT16.pack(packet.packet_id)]
    if level == MQTT_5:
        parts.append(encode_properties(packet.properties))
    parts.extend(_utf8(topic_filter) for topic_filter in packet.topic_filters)
    return _frame(0xA2, *parts)


def _encode_unsuback(level: int, packet: Unsuback) -> bytes:
    if level < MQTT_5:
        return _frame(0xB0, UINT16.pack(packet.packet_id))
    if not packet.reason_codes:
        raise MqttEncodeError("an MQTT 5 UNSUBACK needs one reason code per topic filter", ReasonCode.PROTOCOL_ERROR)
    return _frame(0xB0, UINT16.pack(packet.packet_id), encode_properties(packet.properties),
                  bytes(packet.reason_codes))  # fmt: skip


def _encode_pingreq(level: int, packet: Pingreq) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(level: int, packet: Pingresp) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(level: int, packet: Disconnect) -> bytes:
    if level < MQTT_5 or (not packet.reason_code and packet.properties.is_empty):
        return b"\xe0\x00"
    if packet.properties.is_empty:
        return b"\xe0\x01" + _SINGLE_BYTE[packet.reason_code]
    return _frame(0xE0, _SINGLE_BYTE[packet.reason_code], encode_properties(packet.properties))


def _encode_auth(level: int, packet: Auth) -> bytes:
    if level < MQTT_5:
        raise MqttEncodeError("AUTH needs MQTT 5", ReasonCode.PROTOCOL_ERROR)
    if not packet.reason_code and packet.properties.is_empty:
        return b"\xf0\x00"
    return _frame(0xF0, _SINGLE_BYTE[packet.reason_code], encode_properties(packet.properties))


_ENCODERS: dict[type, Callable[[int, Packet], bytes]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _encode_acknowledgement,
    Pubrec: _encode_acknowledgement,
    Pubrel: _encode_acknowledgement,
    Pubcomp: _encode_acknowledgement,
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: _encode_pingreq,
    Pingresp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}  # type: ignore[dict-item]


def _packet_too_large(packet_size: int, maximum: int) -> MqttProtocolError:
    return MqttProtocolError(f"packet of {packet_size} bytes exceeds the maximum packet size {maximum}",
                             ReasonCode.PACKET_TOO_LARGE)


def _remaining_length(buffer: Buffer, position: int, available: int) -> tuple[int, int] | None:
    """(remaining length, fixed header length), or None if the length bytes have not all arrived yet."""
    value = 0
    for count in range(4):
        index = position + count
        if index >= available:
            return None
        byte = buffer[index]
        value |= (byte & 0x7F) << (7 * count)
        if not byte & 0x80:
            if byte == 0 and count:
                raise malformed("remaining length is not minimally encoded")  # [MQTT-1.5.5-1]
            return value, count + 2
    raise malformed("remaining length has a fifth byte")


# --- the hot path's plain PUBLISH (MqttCodec.receive_batch) -------------------------------------------------------

PlainPublish = tuple[str, int | None, bytes]  # (topic name, packet id or None at QoS 0, payload)
# topic name bytes -> the name, for names `Publish` accepts as they are (ASCII, no wildcard, no NUL, not empty):
# publishers repeat their names, so most PUBLISHes cost one dict lookup here. Bounded in entries and name length.
_PLAIN_TOPICS: dict[bytes, str] = {}
MAX_PLAIN_TOPICS = 4096
MAX_PLAIN_TOPIC_BYTES = 256


def _plain_topic(raw: bytes) -> str | None:
    """The name of a PUBLISH topic `raw` when the fast path may take it as it is; None: the general decoder
    decides (non-ASCII names, names `Publish` refuses, which then raise exactly as they always did)."""
    if not raw or not raw.isascii() or b"+" in raw or b"#" in raw or b"\x00" in raw:
        return None
    topic = raw.decode("ascii")
    if len(raw) <= MAX_PLAIN_TOPIC_BYTES:
        if len(_PLAIN_TOPICS) >= MAX_PLAIN_TOPICS:
            _PLAIN_TOPICS.clear()
        _PLAIN_TOPICS[raw] = topic
    return topic


# --- the codec --------------------------------------------------------------------------------------------------


def _connect_placeholder(flags: int, buffer: Buffer, start: int, end: int) -> Packet:
    """The CONNECT slot of a shared pre-CONNECT table; every codec replaces it with its own bound decoder."""
    raise AssertionError("the shared pre-CONNECT table is used only through a codec's copy")


def _leading_bytes(chunks: list[Buffer], count: int) -> bytes:
    """The first `count` bytes of `chunks` (fewer if they hold fewer), copying only those."""
    head = b""
    for chunk in chunks:
        head += bytes(chunk[:count - len(head)])
        if len(head) >= count:
            break
    return head


def _pieces_from(chunks: list[Buffer], offset: int) -> list[Buffer]:
    """The bytes of `chunks` from `offset` on, as the chunks themselves (views, no copies)."""
    pieces: list[Buffer] = []
    for chunk in chunks:
        size = len(chunk)
        if offset >= size:
            offset -= size
            continue
        pieces.append(memoryview(chunk)[offset:] if offset else chunk)
        offset = 0
    return pieces


def _decode_spanning_publish(chunks: list[Buffer], size: int, level: int | None, packets: list[Packet],
                             decode: Callable[[Buffer, list[Packet]], int]) -> bool:
    """Decode the complete packet held in `chunks` (`size` bytes, received over several reads) into `packets`
    when it is a PUBLISH, with its payload joined once from the chunks; False (nothing done) for any other packet
    or a PUBLISH whose header does not add up, which the caller then joins and decodes as always (and which
    raises there exactly as it always did).

    How: everything before the payload (fixed header, topic, packet id, MQTT 5 properties) is decoded by `decode`
    as a PUBLISH with an empty payload (the same header bytes under a fixed header re-encoded for that length), so
    every check and the fast path's choice are the ones the whole packet gets; the payload joined from the chunks
    then takes the empty one's place."""
    head = _leading_bytes(chunks, 7)  # fixed header (at most 5 bytes) and the topic length
    first_byte = head[0]
    if first_byte >> 4 != PacketType.PUBLISH or len(head) < 7:
        return False
    parsed = _remaining_length(head, 1, len(head))
    if parsed is None:
        return False
    fixed_header = parsed[1]
    payload_start = fixed_header + 2 + ((head[fixed_header] << 8) | head[fixed_header + 1])
    if first_byte & 0x06:  # QoS 1 or 2: a packet identifier
        payload_start += 2
    if level == MQTT_5:
        head = _leading_bytes(chunks, payload_start + 4)
        try:
            properties_length, after = decode_variable_byte_integer(head, payload_start, len(head))
        except MqttProtocolError:
            return False
        payload_start = after + properties_length
    if payload_start > size:
        return False
    variable_header = _leading_bytes(chunks, payload_start)[fixed_header:]
    stand_in = _SINGLE_BYTE[first_byte] + encode_variable_byte_integer(len(variable_header)) + variable_header
    decode(stand_in, packets)
    payload = b"".join(_pieces_from(chunks, payload_start))
    decoded = packets[-1]
    if decoded.__class__ is tuple:  # a PlainPublish of `receive_batch`: (topic, packet id, payload)
        packets[-1] = (decoded[0], decoded[1], payload)  # type: ignore[index]
    else:  # a Publish, made with the empty payload a moment ago and seen by no one yet
        object.__setattr__(decoded, "payload", payload)
    return True


class MqttCodec:
    """One connection's MQTT byte stream, as seen from the server (default) or the client side.

    `max_packet_size` bounds a whole packet (fixed header included), like MQTT 5's Maximum Packet Size: a packet
    announcing more is rejected with 0x95 Packet too large as soon as its fixed header is readable, before its body
    is buffered.
    """

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE, server_side: bool = True) -> None:
        if max_packet_size < 2:
            raise ValueError("max_packet_size must allow at least a 2-byte packet")
        self.max_packet_size = max_packet_size
        self.server_side = server_side
        # The start of a packet that has not fully arrived: the received chunks as they came (bytes, or a view of
        # the end of a larger read), their total, and the packet's full size once its fixed header is readable.
        self._pending: list[Buffer] = []
        self._pending_size = 0
        self._pending_needed = 0
        self._receivable = _FROM_CLIENT if server_side else _FROM_SERVER
        self._sendable = _FROM_SERVER if server_side else _FROM_CLIENT
        self._connect_received = False
        self._error: MqttProtocolError | None = None
        self._protocol_level: int | None = None
        # Index = packet type; each entry decodes that type in the current state or raises why it may not arrive.
        self._dispatch: list[_StateDecoder] = []
        self._rebuild_dispatch()

    @property
    def protocol_level(self) -> int | None:
        """3, 4 or 5 once known: read from CONNECT, or set by hand on a client-side codec."""
        return self._protocol_level

    @protocol_level.setter
    def protocol_level(self, level: int) -> None:
        if level not in PROTOCOL_NAMES:
            raise ValueError(f"protocol level must be 3, 4 or 5, not {level!r}")
        self._protocol_level = level
        self._rebuild_dispatch()

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a packet."""
        return self._pending_size

    def _rebuild_dispatch(self) -> None:
        # Every table depends only on (side, level, CONNECT seen): one per state is shared by all connections, since
        # building sixteen closures per connection was a visible share of a reconnect storm's CPU and thousands of
        # idle connections would each hold them (about 6 KiB).
        key = (self.server_side, self._protocol_level, self._connect_received)
        table = _SHARED_DISPATCH.get(key)
        if table is None:
            table = [self._dispatch_entry(packet_type) for packet_type in range(16)]
            if self.server_side and not self._connect_received:
                table[PacketType.CONNECT] = _connect_placeholder  # never shared bound to one codec
            table = _SHARED_DISPATCH[key] = table
        if self.server_side and not self._connect_received:
            # the CONNECT entry is bound to this codec (it records the level): a copy of the shared table with it
            table = table.copy()
            table[PacketType.CONNECT] = self._receive_connect
        self._dispatch = table

    def _dispatch_entry(self, packet_type: int) -> _StateDecoder:
        level = self._protocol_level
        side = "server" if self.server_side else "client"

        def reject(message: str, reason_code: ReasonCode = ReasonCode.PROTOCOL_ERROR) -> _StateDecoder:
            def raise_error(flags: int, buffer: Buffer, start: int, end: int) -> Packet:
                raise MqttProtocolError(message, reason_code)

            return raise_error

        if packet_type == 0:
            return reject("packet type 0 is reserved", ReasonCode.MALFORMED_PACKET)
        name = PacketType(packet_type).name
        if packet_type not in self._receivable:
            return reject(f"a {side} does not receive {name}")
        if self.server_side:
            if packet_type == PacketType.CONNECT:
                if self._connect_received:
                    return reject("second CONNECT on one connection")  # [MQTT-3.1.0-2]
                return self._receive_connect
            if not self._connect_received:
                return reject(f"first packet is {name}, not CONNECT")  # [MQTT-3.1.0-1]
        if level is None:
            return reject("client-side codec has no protocol level: encode a CONNECT or set one")
        if packet_type == PacketType.DISCONNECT and not self.server_side and level < MQTT_5:
            return reject("a 3.1.1 server does not send DISCONNECT")
        decoder = _DECODERS[packet_type]
        if packet_type == PacketType.PUBLISH:
            return functools.partial(decoder, level)  # PUBLISH validates its own flags
        required = _REQUIRED_FLAGS[packet_type]
        # MQTT 3.1 sets DUP on retransmitted PUBREL, SUBSCRIBE and UNSUBSCRIBE; 3.1.1 made those bits reserved.
        tolerated = required | _DUP_FLAG if level == MQTT_3_1 and required else required

        def decode(flags: int, buffer: Buffer, start: int, end: int) -> Packet:
            if flags != required and flags != tolerated:
                raise malformed(f"{name} has fixed header flags {flags:04b}")  # 2.1.3
            return decoder(level, flags, buffer, start, end)  # type: ignore[arg-type]

        return decode

    def _receive_connect(self, flags: int, buffer: Buffer, start: int, end: int) -> Packet:
        if flags:
            raise malformed(f"CONNECT has fixed header flags {flags:04b}")
        connect = _decode_connect(0, flags, buffer, start, end)
        self._connect_received = True
        self.protocol_level = connect.protocol_level
        return connect

    def receive_data(self, data: bytes) -> list[Packet]:
        """Feed received bytes; return every packet they complete, in order.

        Raises `MqttProtocolError` on the first fault; the codec then stays failed.

        Cost is linear in the bytes received, however a packet is split: the chunks of a packet that spans reads
        are kept as they arrive (no re-concatenation per chunk) and joined once, when its last byte is here, into
        exactly that packet; the packets after it are decoded from the read in place. A payload is therefore copied
        once: when its packet arrived within one read, by the slice the PUBLISH decoder takes; when a PUBLISH of
        at least SPANNING_PUBLISH_MIN_BYTES spanned reads, by joining its payload from the chunks (smaller or other
        packets that spanned reads are joined whole, then decoded: a payload copied twice, at most 4 KiB).
        """
        return self._receive(data, self._decode_all)

    def receive_batch(self, data: bytes) -> list[Packet | PlainPublish | int]:
        """`receive_data` for the broker's hot path: the same packets, except that a PUBLISH at QoS 0 or 1 without
        retain, DUP or properties, whose topic is an ASCII name, comes out as a `PlainPublish` tuple
        `(topic, packet_id, payload)` (packet id None at QoS 0), and a 2-byte PUBACK (reason Success) as its packet
        id (an int). Those are exactly the packets `receive_data` would return as `Publish(topic, payload, qos,
        packet_id=...)` and `Puback(packet_id)`; everything else (and every fault, with the same error and reason
        code) goes through the general decoders. Only after CONNECT on a server-side codec; before, it is
        `receive_data`.
        """
        if not self._connect_received:
            return self._receive(data, self._decode_all)  # type: ignore[return-value]
        return self._receive(data, self._decode_fast)  # type: ignore[return-value]

    def _receive(self, data: bytes, decode: Callable[[Buffer, list[Packet]], int]) -> list[Packet]:
        if self._error is not None:
            raise MqttProtocolError(f"stream already failed: {self._error.message}", self._error.reason_code,
                                    protocol_level=self._protocol_level)  # fmt: skip
        if data.__class__ is not bytes:
            data = bytes(data)  # payloads are sliced from the input and must come out as immutable bytes
        packets: list[Packet] = []
        buffer: Buffer = data
        position = 0
        try:
            if self._pending_size:
                start = self._complete_pending(data, packets, decode)
                if start < 0:
                    return packets  # the pending packet is still incomplete: the chunk was only kept
                if start:
                    buffer = memoryview(data)[start:]
            if buffer:
                position = decode(buffer, packets)
        except MqttProtocolError as error:
            if error.protocol_level is None:
                error.protocol_level = self._protocol_level
            error.packets_before_error = list(packets)
            self._error = error
            raise
        if position < len(buffer):
            self._keep_tail(data, len(data) - len(buffer) + position)
        return packets

    def _complete_pending(self, data: bytes, packets: list[Packet],
                          decode: Callable[[Buffer, list[Packet]], int]) -> int:
        """Add `data` to the pending packet. Once it is complete, decode it (joined once) into `packets` and return
        where the rest of `data` starts; while it is not, return -1."""
        pending = self._pending
        needed = self._pending_needed
        if not needed:
            needed = self._pending_needed = self._pending_packet_size(data)
            if not needed:  # its fixed header is still incomplete (at most 4 bytes are pending)
                pending.append(data)
                self._pending_size += len(data)
                return -1
        missing = needed - self._pending_size
        if missing > len(data):
            pending.append(data)
            self._pending_size += len(data)
            return -1
        pending.append(data if missing == len(data) else memoryview(data)[:missing])
        if needed < SPANNING_PUBLISH_MIN_BYTES or not _decode_spanning_publish(pending, needed, self._protocol_level,
                                                                                packets, decode):
            decode(b"".join(pending), packets)  # exactly one packet: it consumes all of the joined bytes
        pending.clear()
        self._pending_size = self._pending_needed = 0
        return missing

    def _pending_packet_size(self, data: bytes) -> int:
        """The whole size of the pending packet once its fixed header is readable from the pending bytes and `data`
        (0 before that); raises as `_decode_all` would for a bad length or a packet over the maximum size."""
        head = b""
        for chunk in self._pending:  # the fixed header is at most 5 bytes: never join more than those
            head += bytes(chunk[:5 - len(head)])
            if len(head) >= 5:
                break
        else:
            head += data[:5 - len(head)]
        parsed = _remaining_length(head, 1, len(head))
        if parsed is None:
            return 0
        remaining, header_length = parsed
        packet_size = header_length + remaining
        if packet_size > self.max_packet_size:
            raise MqttProtocolError(
                f"packet of {packet_size} bytes exceeds the maximum packet size {self.max_packet_size}",
                ReasonCode.PACKET_TOO_LARGE,
            )
        return packet_size

    def _keep_tail(self, data: bytes, position: int) -> None:
        """Keep `data[position:]`, the start of a packet still arriving. A view keeps all of `data` alive, so it is
        taken only when the tail is at least half of `data`; a shorter tail is copied (each byte at most once)."""
        tail_size = len(data) - position
        if not position:
            tail: Buffer = data
        elif tail_size * 2 >= len(data):
            tail = memoryview(data)[position:]
        else:
            tail = data[position:]
        self._pending.append(tail)
        self._pending_size = tail_size  # its size is read from its fixed header when the next chunk comes

    def _decode_all(self, buffer: Buffer, packets: list[Packet]) -> int:
        available = len(buffer)
        position = 0
        max_packet_size = self.max_packet_size
        dispatch = self._dispatch
        while available - position >= 2:
            first_byte = buffer[position]
            length_byte = buffer[position + 1]
            if length_byte < 0x80:
                remaining = length_byte
                header_length = 2
            else:
                parsed = _remaining_length(buffer, position + 1, available)
                if parsed is None:
                    break
                remaining, header_length = parsed
            packet_size = header_length + remaining
            if packet_size > max_packet_size:
                raise MqttProtocolError(
                    f"packet of {packet_size} bytes exceeds the maximum packet size {max_packet_size}",
                    ReasonCode.PACKET_TOO_LARGE,
                )
            end = position + packet_size
            if end > available:
                break
            packets.append(dispatch[first_byte >> 4](first_byte & 0x0F, buffer, position + header_length, end))
            position = end
            # CONNECT changes the state; later packets in this chunk must use the new table.
            dispatch = self._dispatch
        return position

    def _decode_fast(self, buffer: Buffer, packets: list[Packet]) -> int:
        """`_decode_all` with the plain PUBLISH and PUBACK fast paths of `receive_batch` (after CONNECT)."""
        available = len(buffer)
        position = 0
        max_packet_size = self.max_packet_size
        dispatch = self._dispatch
        append = packets.append
        topics = _PLAIN_TOPICS
        v5 = self._protocol_level == MQTT_5
        while available - position >= 2:
            first_byte = buffer[position]
            length_byte = buffer[position + 1]
            if length_byte < 0x80:
                remaining = length_byte
                header_length = 2
            elif position + 2 < available and 0 < buffer[position + 2] < 0x80:  # two length bytes (most payloads)
                remaining = (length_byte & 0x7F) | (buffer[position + 2] << 7)
                header_length = 3
            else:
                parsed = _remaining_length(buffer, position + 1, available)  # longer, incomplete or malformed
                if parsed is None:
                    break
                remaining, header_length = parsed
            packet_size = header_length + remaining
            if packet_size > max_packet_size:
                raise _packet_too_large(packet_size, max_packet_size)
            end = position + packet_size
            if end > available:
                break
            start = position + header_length
            if first_byte == 0x32 or first_byte == 0x30:  # PUBLISH QoS 1 / QoS 0, no DUP, no retain
                topic_end = start + 2 + ((buffer[start] << 8) | buffer[start + 1]) if remaining >= 2 else end + 1
                body = topic_end + 2 if first_byte == 0x32 else topic_end
                if body + v5 <= end and (not v5 or buffer[body] == 0):
                    raw = buffer[start + 2:topic_end]
                    if raw.__class__ is not bytes:
                        raw = bytes(raw)
                    topic = topics.get(raw)
                    if topic is None:
                        topic = _plain_topic(raw)
                    packet_id = (buffer[topic_end] << 8) | buffer[topic_end + 1] if first_byte == 0x32 else None
                    if topic is not None and packet_id != 0:
                        payload = buffer[body + v5:end]
                        if payload.__class__ is not bytes:
                            payload = bytes(payload)
                        append((topic, packet_id, payload))
                        position = end
                        continue
            elif first_byte == 0x40 and remaining == 2:  # PUBACK, reason Success
                packet_id = (buffer[start] << 8) | buffer[start + 1]
                if packet_id:
                    append(packet_id)
                    position = end
                    continue
            append(dispatch[first_byte >> 4](first_byte & 0x0F, buffer, start, end))
            position = end
            dispatch = self._dispatch
        return position

    def encode(self, packet: Packet) -> bytes:
        """The bytes of `packet` at this stream's protocol level.

        Raises `MqttEncodeError` if this side may not send the packet or the level cannot express it.
        """
        packet_type = PACKET_TYPE_OF.get(type(packet))
        if packet_type is None:
            raise TypeError(f"not an MQTT packet: {packet!r}")
        if packet_type not in self._sendable:
            side = "server" if self.server_side else "client"
            raise MqttEncodeError(f"a {side} does not send {packet_type.name}", ReasonCode.PROTOCOL_ERROR)
        if packet_type == PacketType.CONNECT:
            self.protocol_level = packet.protocol_level  # type: ignore[union-attr]
        level = self._protocol_level
        if level is None:
            raise MqttEncodeError("protocol level unknown: no CONNECT yet", ReasonCode.PROTOCOL_ERROR)
        if packet_type == PacketType.DISCONNECT and self.server_side and level < MQTT_5:
            raise MqttEncodeError("a 3.1.1 server closes the connection instead of sending DISCONNECT",
                                  ReasonCode.PROTOCOL_ERROR)  # fmt: skip
        return _ENCODERS[type(packet)](level, packet)

