"""Byte fixtures for every MQTT packet type at levels 3.1, 3.1.1 and 5, hand-assembled from the specifications.

Each fixture is decoded three ways (whole, one byte at a time, and followed by the start of the next packet, in the
manner of h11's tests/test_io.py) and re-encoded to the same bytes.
"""

from __future__ import annotations

import pytest

from tidegate.adapters.mqtt.codec import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MqttCodec,
    Packet,
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
    TopicSubscription,
    Unsuback,
    Unsubscribe,
    Will,
)


def packet(first_byte: int, body: bytes) -> bytes:
    """A fixed header for a body shorter than 128 bytes (one remaining-length byte), then the body."""
    assert len(body) < 128
    return bytes((first_byte, len(body))) + body


def utf8(text: str) -> bytes:
    encoded = text.encode()
    return len(encoded).to_bytes(2, "big") + encoded


CONNECT_BY_LEVEL = {
    MQTT_3_1: packet(0x10, utf8("MQIsdp") + b"\x03\x02\x00\x3c" + utf8("x")),
    MQTT_3_1_1: packet(0x10, utf8("MQTT") + b"\x04\x02\x00\x3c" + utf8("x")),
    MQTT_5: packet(0x10, utf8("MQTT") + b"\x05\x02\x00\x3c\x00" + utf8("x")),
}


def server_codec(level: int | None) -> MqttCodec:
    """A server-side codec that has already read a CONNECT at `level` (None: a fresh one awaiting CONNECT)."""
    codec = MqttCodec()
    if level is not None:
        assert len(codec.receive_data(CONNECT_BY_LEVEL[level])) == 1
    return codec


def client_codec(level: int) -> MqttCodec:
    codec = MqttCodec(server_side=False)
    codec.protocol_level = level
    return codec


# (id, protocol level, direction, wire bytes, packet). Direction "c2s" is decoded by a server-side codec.
# A level of None on a CONNECT means the server codec has not seen a CONNECT yet.
FIXTURES: list[tuple[str, int, str, bytes, Packet]] = [
    # --- MQTT 3.1.1 -------------------------------------------------------------------------------------------
    (
        # What paho-mqtt 1.x/2.x sends for Client(client_id="paho/34AAE54A75D839566E"), connect(keepalive=60).
        "v4-connect-paho",
        MQTT_3_1_1,
        "c2s",
        bytes.fromhex("102300044d5154540402003c0017") + b"paho/34AAE54A75D839566E",
        Connect("paho/34AAE54A75D839566E", MQTT_3_1_1, clean_start=True, keep_alive=60),
    ),
    (
        "v4-connect-will-username-password",
        MQTT_3_1_1,
        "c2s",
        # flags 0xEC: user name, password, will retain, will QoS 1, will flag; clean session 0.
        packet(0x10, utf8("MQTT") + b"\x04\xec\x00\x0a" + utf8("dev1") + utf8("dev/1/status") + utf8("offline")
               + utf8("alice") + utf8("s3cret")),
        Connect("dev1", MQTT_3_1_1, clean_start=False, keep_alive=10,
                will=Will("dev/1/status", b"offline", qos=1, retain=True), username="alice", password=b"s3cret"),
    ),
    ("v4-connack-accepted", MQTT_3_1_1, "s2c", b"\x20\x02\x00\x00", Connack()),
    ("v4-connack-session-present", MQTT_3_1_1, "s2c", b"\x20\x02\x01\x00", Connack(session_present=True)),
    (
        "v4-connack-not-authorized",
        MQTT_3_1_1,
        "s2c",
        b"\x20\x02\x00\x05",
        Connack(reason_code=ReasonCode.NOT_AUTHORIZED),
    ),
    ("v4-publish-qos0", MQTT_3_1_1, "c2s", packet(0x30, utf8("a/b") + b"hello"), Publish("a/b", b"hello")),
    ("v4-publish-qos0-empty-payload", MQTT_3_1_1, "s2c", packet(0x30, utf8("a")), Publish("a")),
    (
        "v4-publish-qos1-retain",
        MQTT_3_1_1,
        "c2s",
        packet(0x33, utf8("a/b") + b"\x00\x07hello"),
        Publish("a/b", b"hello", qos=1, retain=True, packet_id=7),
    ),
    (
        "v4-publish-qos2-dup",
        MQTT_3_1_1,
        "s2c",
        packet(0x3C, utf8("caf\u00e9/\u6e29\u5ea6") + b"\xff\xfe" + b"\x00\xff"),
        Publish("caf\u00e9/\u6e29\u5ea6", b"\x00\xff", qos=2, dup=True, packet_id=0xFFFE),
    ),
    ("v4-puback", MQTT_3_1_1, "c2s", b"\x40\x02\x00\x07", Puback(7)),
    ("v4-pubrec", MQTT_3_1_1, "s2c", b"\x50\x02\x01\x00", Pubrec(256)),
    ("v4-pubrel", MQTT_3_1_1, "c2s", b"\x62\x02\x00\x07", Pubrel(7)),
    ("v4-pubcomp", MQTT_3_1_1, "s2c", b"\x70\x02\x00\x07", Pubcomp(7)),
    (
        "v4-subscribe",
        MQTT_3_1_1,
        "c2s",
        packet(0x82, b"\x00\x0a" + utf8("a/b") + b"\x01" + utf8("c/#") + b"\x02" + utf8("$share/g/+/x") + b"\x00"),
        Subscribe(10, (TopicSubscription("a/b", 1), TopicSubscription("c/#", 2), TopicSubscription("$share/g/+/x", 0))),
    ),
    (
        "v4-suback",
        MQTT_3_1_1,
        "s2c",
        b"\x90\x05\x00\x0a\x01\x02\x80",
        Suback(10, (ReasonCode.GRANTED_QOS_1, ReasonCode.GRANTED_QOS_2, ReasonCode.UNSPECIFIED_ERROR)),
    ),
    (
        "v4-unsubscribe",
        MQTT_3_1_1,
        "c2s",
        packet(0xA2, b"\x00\x0b" + utf8("a/b") + utf8("#")),
        Unsubscribe(11, ("a/b", "#")),
    ),
    ("v4-unsuback", MQTT_3_1_1, "s2c", b"\xb0\x02\x00\x0b", Unsuback(11)),
    ("v4-pingreq", MQTT_3_1_1, "c2s", b"\xc0\x00", Pingreq()),
    ("v4-pingresp", MQTT_3_1_1, "s2c", b"\xd0\x00", Pingresp()),
    ("v4-disconnect", MQTT_3_1_1, "c2s", b"\xe0\x00", Disconnect()),
    # --- MQTT 3.1 -----------------------------------------------------------------------------------------------
    (
        "v3-connect",
        MQTT_3_1,
        "c2s",
        packet(0x10, utf8("MQIsdp") + b"\x03\xc2\x00\x3c" + utf8("legacy") + utf8("bob") + utf8("pw")),
        Connect("legacy", MQTT_3_1, keep_alive=60, username="bob", password=b"pw"),
    ),
    ("v3-publish-qos1", MQTT_3_1, "c2s", packet(0x32, utf8("t") + b"\x00\x01x"), Publish("t", b"x", 1, packet_id=1)),
    ("v3-subscribe", MQTT_3_1, "c2s", packet(0x82, b"\x00\x02" + utf8("t/+") + b"\x01"),
     Subscribe(2, (TopicSubscription("t/+", 1),))),
    ("v3-connack", MQTT_3_1, "s2c", b"\x20\x02\x00\x02", Connack(reason_code=ReasonCode.CLIENT_IDENTIFIER_NOT_VALID)),
    # --- MQTT 5 -------------------------------------------------------------------------------------------------
    (
        # paho-mqtt 2.x, protocol=MQTTv5, Properties(CONNECT) with SessionExpiryInterval=120, ReceiveMaximum=20.
        "v5-connect-paho",
        MQTT_5,
        "c2s",
        packet(0x10, utf8("MQTT") + b"\x05\x02\x00\x3c" + b"\x08\x11\x00\x00\x00\x78\x21\x00\x14"
               + utf8("paho/v5-client")),
        Connect("paho/v5-client", MQTT_5, keep_alive=60,
                properties=Properties(session_expiry_interval=120, receive_maximum=20)),
    ),
    (
        "v5-connect-will-properties-auth",
        MQTT_5,
        "c2s",
        packet(
            0x10,
            utf8("MQTT") + b"\x05\x44\x00\x00"  # password without user name is allowed in 5.0; will QoS 0
            + b"\x0c\x15" + utf8("SCRAM") + b"\x16\x00\x01\x01"  # authentication method + data
            + utf8("")  # empty client identifier: the server assigns one
            + b"\x07\x01\x01\x18\x00\x00\x00\x05"  # payload format UTF-8, will delay 5 s
            + utf8("bye") + utf8("gone") + utf8("tok"),
        ),
        Connect("", MQTT_5, clean_start=False, keep_alive=0, password=b"tok",
                will=Will("bye", b"gone", properties=Properties(payload_format_indicator=1, will_delay_interval=5)),
                properties=Properties(authentication_method="SCRAM", authentication_data=b"\x01")),
    ),
    ("v5-connack-minimal", MQTT_5, "s2c", b"\x20\x03\x00\x00\x00", Connack()),
    (
        "v5-connack-properties",
        MQTT_5,
        "s2c",
        packet(0x20, b"\x01\x00" + b"\x0d" + b"\x12" + utf8("cid") + b"\x22\x00\x0a" + b"\x24\x01" + b"\x2a\x00"),
        Connack(True, ReasonCode.SUCCESS, Properties(assigned_client_identifier="cid", topic_alias_maximum=10,
                                                     maximum_qos=1, shared_subscription_available=False)),
    ),
    ("v5-connack-refused", MQTT_5, "s2c", b"\x20\x03\x00\x9c\x00", Connack(reason_code=ReasonCode.USE_ANOTHER_SERVER)),
    (
        "v5-publish-properties",
        MQTT_5,
        "c2s",
        packet(
            0x32,
            utf8("req/1") + b"\x00\x05"
            + b"\x1f"  # 31 bytes of properties, in identifier order
            + b"\x01\x01" + b"\x02\x00\x00\x00\x3c" + b"\x03" + utf8("json") + b"\x08" + utf8("rsp")
            + b"\x09\x00\x01\x2a" + b"\x26" + utf8("k") + utf8("v")
            + b"{}",
        ),
        Publish("req/1", b"{}", qos=1, packet_id=5, properties=Properties(
            payload_format_indicator=1, message_expiry_interval=60, content_type="json", response_topic="rsp",
            correlation_data=b"\x2a", user_properties=(("k", "v"),))),
    ),
    (
        "v5-publish-subscription-identifiers-and-topic-alias",
        MQTT_5,
        "s2c",
        packet(0x30, utf8("") + b"\x08\x0b\x01\x0b\xff\x7f\x23\x00\x03" + b"data"),
        Publish("", b"data", properties=Properties(subscription_identifiers=(1, 16383), topic_alias=3)),
    ),
    ("v5-puback-short", MQTT_5, "c2s", b"\x40\x02\x00\x07", Puback(7)),
    ("v5-puback-reason-only", MQTT_5, "s2c", b"\x40\x03\x00\x07\x10", Puback(7, ReasonCode.NO_MATCHING_SUBSCRIBERS)),
    (
        "v5-pubrec-reason-string",
        MQTT_5,
        "s2c",
        packet(0x50, b"\x00\x07\x97\x07\x1f" + utf8("full")),
        Pubrec(7, ReasonCode.QUOTA_EXCEEDED, Properties(reason_string="full")),
    ),
    ("v5-pubrel-not-found", MQTT_5, "c2s", b"\x62\x03\x00\x07\x92", Pubrel(7, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)),
    (
        "v5-pubcomp-user-property",
        MQTT_5,
        "s2c",
        packet(0x70, b"\x00\x07\x00\x07\x26" + utf8("a") + utf8("b")),
        Pubcomp(7, properties=Properties(user_properties=(("a", "b"),))),
    ),
    (
        "v5-subscribe-options",
        MQTT_5,
        "c2s",
        # options 0x1D: retain handling 1, retain as published, no local, QoS 1; then 0x22: handling 2, QoS 2.
        packet(0x82, b"\x00\x01\x02\x0b\x2a" + utf8("a/+") + b"\x1d" + utf8("$share/grp/b/#") + b"\x22"),
        Subscribe(1, (
            TopicSubscription("a/+", 1, no_local=True, retain_as_published=True,
                         retain_handling=RetainHandling.SEND_ON_NEW_SUBSCRIBE),
            TopicSubscription("$share/grp/b/#", 2, retain_handling=RetainHandling.DO_NOT_SEND),
        ), Properties(subscription_identifiers=(42,))),
    ),
    (
        "v5-suback",
        MQTT_5,
        "s2c",
        b"\x90\x06\x00\x01\x00\x01\x9e\xa2",
        Suback(1, (ReasonCode.GRANTED_QOS_1, ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
                   ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)),
    ),
    ("v5-unsubscribe", MQTT_5, "c2s", packet(0xA2, b"\x00\x02\x00" + utf8("a/+")), Unsubscribe(2, ("a/+",))),
    (
        "v5-unsuback",
        MQTT_5,
        "s2c",
        b"\xb0\x05\x00\x02\x00\x00\x11",
        Unsuback(2, (ReasonCode.SUCCESS, ReasonCode.NO_SUBSCRIPTION_EXISTED)),
    ),
    ("v5-pingreq", MQTT_5, "c2s", b"\xc0\x00", Pingreq()),
    ("v5-pingresp", MQTT_5, "s2c", b"\xd0\x00", Pingresp()),
    ("v5-disconnect-normal", MQTT_5, "c2s", b"\xe0\x00", Disconnect()),
    ("v5-disconnect-with-will", MQTT_5, "c2s", b"\xe0\x01\x04",
     Disconnect(ReasonCode.DISCONNECT_WITH_WILL_MESSAGE)),
    (
        "v5-disconnect-session-expiry",
        MQTT_5,
        "c2s",
        b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00",
        Disconnect(properties=Properties(session_expiry_interval=0)),
    ),
    (
        "v5-disconnect-from-server",
        MQTT_5,
        "s2c",
        packet(0xE0, b"\x9c\x06\x1c" + utf8("b:1")),
        Disconnect(ReasonCode.USE_ANOTHER_SERVER, Properties(server_reference="b:1")),
    ),
    ("v5-auth-empty", MQTT_5, "c2s", b"\xf0\x00", Auth()),
    (
        "v5-auth-continue",
        MQTT_5,
        "s2c",
        packet(0xF0, b"\x18\x0e\x15" + utf8("SCRAM") + b"\x16\x00\x03abc"),
        Auth(ReasonCode.CONTINUE_AUTHENTICATION, Properties(authentication_method="SCRAM",
                                                             authentication_data=b"abc")),
    ),
]  # fmt: skip

FIXTURE_IDS = [fixture[0] for fixture in FIXTURES]


def receiving_codec(level: int, direction: str, packet_to_decode: Packet) -> MqttCodec:
    if direction == "s2c":
        return client_codec(level)
    # A CONNECT is the first thing a server codec reads; anything else needs a CONNECT before it.
    return server_codec(None if isinstance(packet_to_decode, Connect) else level)


def next_packet_bytes(direction: str) -> tuple[bytes, Packet]:
    return (b"\xc0\x00", Pingreq()) if direction == "c2s" else (b"\xd0\x00", Pingresp())


@pytest.mark.parametrize(("name", "level", "direction", "wire", "expected"), FIXTURES, ids=FIXTURE_IDS)
def test_fixture_decodes_whole(name: str, level: int, direction: str, wire: bytes, expected: Packet) -> None:
    """A whole packet in one chunk decodes to exactly the expected packet and leaves nothing buffered."""
    codec = receiving_codec(level, direction, expected)
    assert codec.receive_data(wire) == [expected]
    assert codec.buffered == 0


@pytest.mark.parametrize(("name", "level", "direction", "wire", "expected"), FIXTURES, ids=FIXTURE_IDS)
def test_fixture_decodes_byte_by_byte(name: str, level: int, direction: str, wire: bytes, expected: Packet) -> None:
    """Fed one byte at a time, nothing comes out until the last byte, which yields the packet."""
    codec = receiving_codec(level, direction, expected)
    for index in range(len(wire) - 1):
        assert codec.receive_data(wire[index : index + 1]) == []
    assert codec.receive_data(wire[-1:]) == [expected]
    assert codec.buffered == 0


@pytest.mark.parametrize(("name", "level", "direction", "wire", "expected"), FIXTURES, ids=FIXTURE_IDS)
def test_fixture_decodes_with_trailing_data(
    name: str, level: int, direction: str, wire: bytes, expected: Packet
) -> None:
    """Bytes of the next packet after this one stay buffered until complete, then decode at the level just set."""
    codec = receiving_codec(level, direction, expected)
    following, following_packet = next_packet_bytes(direction)
    assert codec.receive_data(wire + following[:1]) == [expected]
    assert codec.buffered == 1
    assert codec.receive_data(following[1:]) == [following_packet]
    if not isinstance(expected, Connect):  # a second CONNECT would be a protocol error
        assert codec.receive_data(wire + following) == [expected, following_packet]


@pytest.mark.parametrize(("name", "level", "direction", "wire", "expected"), FIXTURES, ids=FIXTURE_IDS)
def test_fixture_encodes_to_the_same_bytes(
    name: str, level: int, direction: str, wire: bytes, expected: Packet
) -> None:
    """Encoding the expected packet at the fixture's level gives back the hand-assembled bytes."""
    codec = MqttCodec(server_side=direction == "s2c")
    if not isinstance(expected, Connect):
        codec.protocol_level = level
    assert codec.encode(expected) == wire


def test_several_packets_in_one_chunk_decode_in_order() -> None:
    """A chunk holding many packets (as after a network stall) yields all of them, in wire order."""
    codec = server_codec(MQTT_3_1_1)
    chunk = b"\x40\x02\x00\x01" + packet(0x30, utf8("t") + b"1") + b"\xc0\x00" + b"\x40\x02\x00\x02"
    assert codec.receive_data(chunk) == [Puback(1), Publish("t", b"1"), Pingreq(), Puback(2)]


def test_connect_then_packets_in_the_same_chunk_use_the_announced_level() -> None:
    """Bytes after CONNECT in the same read are decoded at the level that CONNECT announced (here: with properties)."""
    codec = server_codec(None)
    publish_v5 = packet(0x30, utf8("t") + b"\x00" + b"x")
    packets = codec.receive_data(CONNECT_BY_LEVEL[MQTT_5] + publish_v5)
    assert packets[1] == Publish("t", b"x")
    assert codec.protocol_level == MQTT_5


def test_split_inside_the_remaining_length_bytes() -> None:
    """A packet split between the bytes of a multi-byte remaining length is reassembled."""
    body = utf8("t") + bytes(200)
    wire = b"\x30" + bytes((0x80 | (len(body) & 0x7F), len(body) >> 7)) + body
    codec = server_codec(MQTT_3_1_1)
    assert codec.receive_data(wire[:2]) == []
    assert codec.receive_data(wire[2:3]) == []
    assert codec.receive_data(wire[3:]) == [Publish("t", bytes(200))]


def test_client_codec_learns_the_level_from_the_connect_it_encodes() -> None:
    """A client codec that encodes a 5.0 CONNECT decodes the CONNACK that follows as 5.0 (with properties)."""
    codec = MqttCodec(server_side=False)
    codec.encode(Connect("c", MQTT_5))
    assert codec.protocol_level == MQTT_5
    assert codec.receive_data(b"\x20\x03\x00\x00\x00") == [Connack()]


# --- remaining length -----------------------------------------------------------------------------------------

REMAINING_LENGTH_ENCODINGS = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("length", "encoded"), REMAINING_LENGTH_ENCODINGS)
def test_remaining_length_encoding_matches_the_spec_table(length: int, encoded: bytes) -> None:
    """Spec table 1.5.5: the boundaries of the 1-, 2-, 3- and 4-byte Variable Byte Integer encodings."""
    from tidegate.adapters.mqtt.properties import decode_variable_byte_integer, encode_variable_byte_integer

    assert encode_variable_byte_integer(length) == encoded
    assert decode_variable_byte_integer(encoded, 0, len(encoded)) == (length, len(encoded))


@pytest.mark.parametrize("length", [length for length, _ in REMAINING_LENGTH_ENCODINGS if length <= 2_097_152])
def test_publish_with_remaining_length_at_a_boundary_round_trips(length: int) -> None:
    """A PUBLISH whose remaining length sits on an encoding boundary encodes with that header and decodes back."""
    if length == 0:
        # The smallest possible packets have no body at all.
        assert server_codec(MQTT_3_1_1).receive_data(b"\xc0\x00") == [Pingreq()]
        return
    message = Publish("t", bytes(length - 3))
    client = client_codec(MQTT_3_1_1)
    wire = client.encode(message)
    header = dict(REMAINING_LENGTH_ENCODINGS)[length]
    assert wire[1 : 1 + len(header)] == header
    server = server_codec(MQTT_3_1_1)
    received: list[Packet] = []
    for offset in range(0, len(wire), 65_536):
        received += server.receive_data(wire[offset : offset + 65_536])
    assert received == [message]


def test_largest_remaining_length_is_read_from_the_header() -> None:
    """268,435,455 (ff ff ff 7f) is a legal remaining length; the codec waits for it when the limit allows it."""
    codec = server_codec(MQTT_3_1_1)
    assert codec.receive_data(b"\x30\xff\xff\xff\x7f" + utf8("t")) == []
    assert codec.buffered == 8


def test_bytearray_and_memoryview_input_give_bytes_payloads() -> None:
    """Transports may hand over mutable buffers; decoded payloads are still immutable bytes."""
    wire = packet(0x30, utf8("t") + b"abc")
    for chunk in (bytearray(wire), memoryview(wire)):
        (message,) = server_codec(MQTT_3_1_1).receive_data(chunk)  # type: ignore[arg-type]
        assert type(message.payload) is bytes and message.payload == b"abc"
