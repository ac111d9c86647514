"""MQTT 5 properties: wire types, where each may appear, repetition, value ranges."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidegate.adapters.mqtt.codec import MqttCodec, MqttProtocolError, Publish, ReasonCode
from tidegate.adapters.mqtt.properties import (
    ALLOWED_PROPERTIES,
    NO_PROPERTIES,
    PROPERTY_SPECS,
    Properties,
    PropertyContext,
    PropertyId,
    decode_properties,
    encode_properties,
)

P = PropertyId
C = PropertyContext


def utf8(text: str) -> bytes:
    encoded = text.encode()
    return len(encoded).to_bytes(2, "big") + encoded


# One sample per property: (value as Properties holds it, the value's bytes on the wire).
SAMPLES: dict[PropertyId, tuple[Any, bytes]] = {
    P.PAYLOAD_FORMAT_INDICATOR: (1, b"\x01"),
    P.MESSAGE_EXPIRY_INTERVAL: (0x01020304, b"\x01\x02\x03\x04"),
    P.CONTENT_TYPE: ("text/plain", utf8("text/plain")),
    P.RESPONSE_TOPIC: ("reply/to", utf8("reply/to")),
    P.CORRELATION_DATA: (b"\x00\xff", b"\x00\x02\x00\xff"),
    P.SUBSCRIPTION_IDENTIFIER: ((200,), b"\xc8\x01"),
    P.SESSION_EXPIRY_INTERVAL: (0xFFFFFFFF, b"\xff\xff\xff\xff"),
    P.ASSIGNED_CLIENT_IDENTIFIER: ("auto-1", utf8("auto-1")),
    P.SERVER_KEEP_ALIVE: (30, b"\x00\x1e"),
    P.AUTHENTICATION_METHOD: ("PLAIN", utf8("PLAIN")),
    P.AUTHENTICATION_DATA: (b"secret", b"\x00\x06secret"),
    P.REQUEST_PROBLEM_INFORMATION: (False, b"\x00"),
    P.WILL_DELAY_INTERVAL: (60, b"\x00\x00\x00\x3c"),
    P.REQUEST_RESPONSE_INFORMATION: (True, b"\x01"),
    P.RESPONSE_INFORMATION: ("resp/", utf8("resp/")),
    P.SERVER_REFERENCE: ("other:1883", utf8("other:1883")),
    P.REASON_STRING: ("because", utf8("because")),
    P.RECEIVE_MAXIMUM: (65535, b"\xff\xff"),
    P.TOPIC_ALIAS_MAXIMUM: (0, b"\x00\x00"),
    P.TOPIC_ALIAS: (1, b"\x00\x01"),
    P.MAXIMUM_QOS: (0, b"\x00"),
    P.RETAIN_AVAILABLE: (True, b"\x01"),
    P.USER_PROPERTY: ((("name", "value"),), utf8("name") + utf8("value")),
    P.MAXIMUM_PACKET_SIZE: (1024, b"\x00\x00\x04\x00"),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: (False, b"\x00"),
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (True, b"\x01"),
    P.SHARED_SUBSCRIPTION_AVAILABLE: (True, b"\x01"),
}
SPEC_OF = {spec.identifier: spec for spec in PROPERTY_SPECS}


def block(body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((len(body),)) + body


def a_context_allowing(identifier: PropertyId) -> PropertyContext:
    return next(context for context in PropertyContext if identifier in ALLOWED_PROPERTIES[context])


def decode(wire: bytes, context: PropertyContext) -> Properties:
    properties, position = decode_properties(wire, 0, len(wire), context)
    assert position == len(wire)
    return properties


def test_every_property_identifier_of_the_spec_is_covered() -> None:
    """Spec table 2-4 lists 27 properties, 0x01..0x2A."""
    assert len(PROPERTY_SPECS) == 27 == len(SAMPLES)
    assert [int(spec.identifier) for spec in PROPERTY_SPECS] == sorted(int(pid) for pid in PropertyId)


@pytest.mark.parametrize("identifier", list(PropertyId), ids=lambda pid: pid.name)
def test_each_property_has_its_wire_type(identifier: PropertyId) -> None:
    """Each property decodes from identifier + value bytes of its type, and encodes back to the same bytes."""
    value, value_bytes = SAMPLES[identifier]
    wire = block(bytes((identifier,)) + value_bytes)
    context = a_context_allowing(identifier)
    properties = decode(wire, context)
    assert getattr(properties, SPEC_OF[identifier].attribute) == value
    assert properties.present == {int(identifier)}
    assert encode_properties(properties) == wire


# Spec 2.2.2.2 table: the packets (and Will) each property may appear in.
EXPECTED_CONTEXTS: dict[PropertyId, set[PropertyContext]] = {
    P.PAYLOAD_FORMAT_INDICATOR: {C.PUBLISH, C.WILL},
    P.MESSAGE_EXPIRY_INTERVAL: {C.PUBLISH, C.WILL},
    P.CONTENT_TYPE: {C.PUBLISH, C.WILL},
    P.RESPONSE_TOPIC: {C.PUBLISH, C.WILL},
    P.CORRELATION_DATA: {C.PUBLISH, C.WILL},
    P.SUBSCRIPTION_IDENTIFIER: {C.PUBLISH, C.SUBSCRIBE},
    P.SESSION_EXPIRY_INTERVAL: {C.CONNECT, C.CONNACK, C.DISCONNECT},
    P.ASSIGNED_CLIENT_IDENTIFIER: {C.CONNACK},
    P.SERVER_KEEP_ALIVE: {C.CONNACK},
    P.AUTHENTICATION_METHOD: {C.CONNECT, C.CONNACK, C.AUTH},
    P.AUTHENTICATION_DATA: {C.CONNECT, C.CONNACK, C.AUTH},
    P.REQUEST_PROBLEM_INFORMATION: {C.CONNECT},
    P.WILL_DELAY_INTERVAL: {C.WILL},
    P.REQUEST_RESPONSE_INFORMATION: {C.CONNECT},
    P.RESPONSE_INFORMATION: {C.CONNACK},
    P.SERVER_REFERENCE: {C.CONNACK, C.DISCONNECT},
    P.REASON_STRING: {C.CONNACK, C.PUBACK, C.PUBREC, C.PUBREL, C.PUBCOMP, C.SUBACK, C.UNSUBACK, C.DISCONNECT, C.AUTH},
    P.RECEIVE_MAXIMUM: {C.CONNECT, C.CONNACK},
    P.TOPIC_ALIAS_MAXIMUM: {C.CONNECT, C.CONNACK},
    P.TOPIC_ALIAS: {C.PUBLISH},
    P.MAXIMUM_QOS: {C.CONNACK},
    P.RETAIN_AVAILABLE: {C.CONNACK},
    P.USER_PROPERTY: set(PropertyContext),
    P.MAXIMUM_PACKET_SIZE: {C.CONNECT, C.CONNACK},
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: {C.CONNACK},
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: {C.CONNACK},
    P.SHARED_SUBSCRIPTION_AVAILABLE: {C.CONNACK},
}

DISALLOWED = [
    (identifier, context)
    for identifier in PropertyId
    for context in PropertyContext
    if context not in EXPECTED_CONTEXTS[identifier]
]


@pytest.mark.parametrize(("identifier", "context"), DISALLOWED, ids=lambda x: getattr(x, "name", None))
def test_property_outside_its_packets_is_malformed(identifier: PropertyId, context: PropertyContext) -> None:
    """2.2.2.2: an identifier not valid for the packet type is a Malformed Packet."""
    _, value_bytes = SAMPLES[identifier]
    with pytest.raises(MqttProtocolError) as caught:
        decode(block(bytes((identifier,)) + value_bytes), context)
    assert caught.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("context", list(PropertyContext), ids=lambda c: c.name)
def test_allowed_property_table_matches_the_spec(context: PropertyContext) -> None:
    expected = {int(pid) for pid, contexts in EXPECTED_CONTEXTS.items() if context in contexts}
    assert ALLOWED_PROPERTIES[context] == expected


@pytest.mark.parametrize("identifier", [0x00, 0x04, 0x0A, 0x2B, 0x7F], ids=hex)
def test_unknown_property_identifier_is_malformed(identifier: int) -> None:
    with pytest.raises(MqttProtocolError) as caught:
        decode(block(bytes((identifier, 0))), C.PUBLISH)
    assert caught.value.reason_code == ReasonCode.MALFORMED_PACKET


NON_REPEATABLE = [
    (identifier, a_context_allowing(identifier))
    for identifier in PropertyId
    if identifier not in (P.USER_PROPERTY, P.SUBSCRIPTION_IDENTIFIER)
] + [(P.SUBSCRIPTION_IDENTIFIER, C.SUBSCRIBE)]


@pytest.mark.parametrize(("identifier", "context"), NON_REPEATABLE, ids=lambda x: getattr(x, "name", None))
def test_property_given_twice_is_a_protocol_error(identifier: PropertyId, context: PropertyContext) -> None:
    """Every property but User Property (and Subscription Identifier in PUBLISH) may appear at most once."""
    _, value_bytes = SAMPLES[identifier]
    once = bytes((identifier,)) + value_bytes
    with pytest.raises(MqttProtocolError) as caught:
        decode(block(once + once), context)
    assert caught.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_user_properties_repeat_and_keep_their_order() -> None:
    """3.3.2.3.7: the same name may appear more than once and order is preserved."""
    wire = block(b"\x26" + utf8("k") + utf8("2") + b"\x26" + utf8("a") + utf8("1") + b"\x26" + utf8("k") + utf8("0"))
    properties = decode(wire, C.PUBLISH)
    assert properties.user_properties == (("k", "2"), ("a", "1"), ("k", "0"))
    assert encode_properties(properties) == wire


def test_subscription_identifiers_repeat_in_publish() -> None:
    """3.3.2.3.8: a server forwarding one message for several subscriptions lists each identifier."""
    wire = block(b"\x0b\x01\x0b\x80\x01\x0b\xff\xff\xff\x7f")
    properties = decode(wire, C.PUBLISH)
    assert properties.subscription_identifiers == (1, 128, 268_435_455)
    assert encode_properties(properties) == wire


@pytest.mark.parametrize(
    ("wire", "context"),
    [
        (b"\x0b\x00", C.SUBSCRIBE),  # subscription identifier 0
        (b"\x21\x00\x00", C.CONNECT),  # receive maximum 0
        (b"\x27\x00\x00\x00\x00", C.CONNECT),  # maximum packet size 0
        (b"\x23\x00\x00", C.PUBLISH),  # topic alias 0
        (b"\x24\x02", C.CONNACK),  # maximum QoS 2
        (b"\x01\x02", C.PUBLISH),  # payload format indicator 2
        (b"\x17\x02", C.CONNECT),  # request problem information 2
        (b"\x19\x05", C.CONNECT),  # request response information 5
        (b"\x25\x02", C.CONNACK),  # retain available 2
        (b"\x28\xff", C.CONNACK),  # wildcard subscription available 255
        (b"\x08" + utf8("a/+"), C.PUBLISH),  # response topic with a wildcard
    ],
)
def test_property_value_out_of_range_is_a_protocol_error(wire: bytes, context: PropertyContext) -> None:
    with pytest.raises(MqttProtocolError) as caught:
        decode(block(wire), context)
    assert caught.value.reason_code == ReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "wire",
    [
        b"\x05\x02\x00\x00",  # property length 5 but only 3 bytes follow
        b"\x02\x02\x00",  # four-byte integer cut short
        b"\x03\x03\x00\x05a",  # string longer than the properties
        b"\x02\x0b\x80",  # variable byte integer cut short
        b"\x03\x0b\x80\x00",  # variable byte integer not minimally encoded
        b"\x04\x03\x00\x01\xff",  # invalid UTF-8
        b"\x04\x03\x00\x01\x00",  # U+0000
        b"\x06\x26\x00\x01k\x00\x05",  # user property value cut short
        b"\x80\x80\x80\x80\x01",  # property length with a fifth byte
    ],
)
def test_truncated_or_ill_formed_property_is_malformed(wire: bytes) -> None:
    with pytest.raises(MqttProtocolError) as caught:
        decode_properties(wire, 0, len(wire), C.PUBLISH)
    assert caught.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_empty_property_block_is_the_shared_empty_value() -> None:
    assert decode(b"\x00", C.PUBLISH) is NO_PROPERTIES
    assert encode_properties(NO_PROPERTIES) == b"\x00"
    assert NO_PROPERTIES.is_empty


def test_properties_repr_shows_only_what_is_set() -> None:
    assert repr(Properties(reason_string="x")) == "Properties(reason_string='x')"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content_type": b"bytes"},
        {"correlation_data": "text"},
        {"receive_maximum": 70000},
        {"message_expiry_interval": -1},
        {"retain_available": 1},
        {"user_properties": (("only-name",),)},
        {"user_properties": [("k", "v")]},
        {"subscription_identifiers": (268_435_456,)},
        {"reason_string": "nul\x00"},
    ],
)
def test_properties_check_types_and_ranges_on_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(MqttProtocolError):
        Properties(**kwargs)


def test_property_length_spanning_beyond_the_packet_is_malformed_inside_a_packet() -> None:
    """A PUBLISH whose property length claims more than the packet holds is Malformed."""
    codec = MqttCodec(server_side=False)
    codec.protocol_level = 5
    with pytest.raises(MqttProtocolError) as caught:
        codec.receive_data(b"\x30\x05\x00\x01t\x09\x01")
    assert caught.value.reason_code == ReasonCode.MALFORMED_PACKET


@given(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=5))
def test_user_properties_round_trip_through_a_publish(pairs: list[tuple[str, str]]) -> None:
    pairs = [(name, value) for name, value in pairs if "\x00" not in name + value]
    try:
        message = Publish("t", b"", properties=Properties(user_properties=tuple(pairs)))
    except MqttProtocolError:
        return  # hypothesis produced a lone surrogate: not a valid MQTT string
    client = MqttCodec(server_side=False)
    client.protocol_level = 5
    server = MqttCodec(server_side=True)
    server.receive_data(b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01x")
    assert server.receive_data(client.encode(message)) == [message]
