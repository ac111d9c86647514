"""Every validation rule of the MQTT codec, each asserting the reason code the adapter will send back."""

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
    MqttEncodeError,
    MqttProtocolError,
    Pingreq,
    Properties,
    Puback,
    Publish,
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

R = ReasonCode


def packet(first_byte: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((first_byte, len(body))) + body


def utf8(text: str) -> bytes:
    encoded = text.encode()
    return len(encoded).to_bytes(2, "big") + encoded


def raw_string(data: bytes) -> bytes:
    """A length-prefixed string made of arbitrary (possibly invalid UTF-8) bytes."""
    return len(data).to_bytes(2, "big") + data


CONNECT_BY_LEVEL = {
    MQTT_3_1: packet(0x10, utf8("MQIsdp") + b"\x03\x02\x00\x3c" + utf8("x")),
    MQTT_3_1_1: packet(0x10, utf8("MQTT") + b"\x04\x02\x00\x3c" + utf8("x")),
    MQTT_5: packet(0x10, utf8("MQTT") + b"\x05\x02\x00\x3c\x00" + utf8("x")),
}


def connected_server(level: int, **options: int) -> MqttCodec:
    codec = MqttCodec(**options)  # type: ignore[arg-type]
    codec.receive_data(CONNECT_BY_LEVEL[level])
    return codec


def client(level: int) -> MqttCodec:
    codec = MqttCodec(server_side=False)
    codec.protocol_level = level
    return codec


def rejected(codec: MqttCodec, wire: bytes) -> MqttProtocolError:
    with pytest.raises(MqttProtocolError) as caught:
        codec.receive_data(wire)
    return caught.value


def connect_v4(flags: int, payload: bytes, name: str = "MQTT", level: int = 4) -> bytes:
    return packet(0x10, utf8(name) + bytes((level, flags)) + b"\x00\x3c" + payload)


def connect_v5(properties: bytes, payload: bytes = utf8("x")) -> bytes:
    return packet(0x10, utf8("MQTT") + b"\x05\x02\x00\x3c" + properties + payload)


# --- fixed header ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "wire"),
    [
        (MQTT_3_1_1, packet(0x80, b"\x00\x01" + utf8("a") + b"\x00")),  # SUBSCRIBE flags 0000
        (MQTT_3_1_1, packet(0xA0, b"\x00\x01" + utf8("a"))),  # UNSUBSCRIBE flags 0000
        (MQTT_3_1_1, b"\x60\x02\x00\x01"),  # PUBREL flags 0000
        (MQTT_3_1_1, b"\x6a\x02\x00\x01"),  # PUBREL with DUP: only MQTT 3.1 did that
        (MQTT_3_1_1, b"\x41\x02\x00\x01"),  # PUBACK flags 0001
        (MQTT_3_1_1, b"\xc2\x00"),  # PINGREQ flags 0010
        (MQTT_5, b"\xe1\x00"),  # DISCONNECT flags 0001
        (MQTT_5, b"\xf8\x00"),  # AUTH flags 1000
    ],
)
def test_reserved_fixed_header_flags_are_malformed(level: int, wire: bytes) -> None:
    """2.1.3: SUBSCRIBE, UNSUBSCRIBE and PUBREL need flags 0010, every other non-PUBLISH packet 0000."""
    assert rejected(connected_server(level), wire).reason_code == R.MALFORMED_PACKET


def test_connect_with_fixed_header_flags_is_malformed() -> None:
    assert rejected(MqttCodec(), b"\x11" + CONNECT_BY_LEVEL[MQTT_3_1_1][1:]).reason_code == R.MALFORMED_PACKET


def test_mqtt_3_1_retransmission_may_set_dup_on_pubrel() -> None:
    """MQTT 3.1 set DUP on retried PUBREL/SUBSCRIBE; such a client is still understood at level 3."""
    assert connected_server(MQTT_3_1).receive_data(b"\x6a\x02\x00\x01") == [Pubrel(1)]


def test_packet_type_zero_is_malformed() -> None:
    assert rejected(connected_server(MQTT_3_1_1), b"\x00\x00").reason_code == R.MALFORMED_PACKET


def test_auth_before_mqtt_5_is_malformed() -> None:
    """Packet type 15 is reserved in 3.1.1."""
    assert rejected(connected_server(MQTT_3_1_1), b"\xf0\x00").reason_code == R.MALFORMED_PACKET


def test_remaining_length_with_a_fifth_byte_is_malformed() -> None:
    """1.5.5: a Variable Byte Integer has at most four bytes."""
    assert rejected(connected_server(MQTT_3_1_1), b"\x30\xff\xff\xff\xff\x01").reason_code == R.MALFORMED_PACKET


def test_remaining_length_not_minimally_encoded_is_malformed() -> None:
    """[MQTT-1.5.5-1]: 0x80 0x00 spells 0 in two bytes."""
    assert rejected(connected_server(MQTT_3_1_1), b"\xc0\x80\x00").reason_code == R.MALFORMED_PACKET


# --- bounded buffer ---------------------------------------------------------------------------------------------


def test_oversize_packet_is_rejected_from_its_fixed_header_alone() -> None:
    """The codec refuses a too-large packet as soon as the length is readable, before any body byte arrives."""
    codec = connected_server(MQTT_5, max_packet_size=1024)
    error = rejected(codec, b"\x30\x80\x08")  # remaining length 1024 -> 1027-byte packet
    assert error.reason_code == R.PACKET_TOO_LARGE
    assert codec.buffered == 0


def test_oversize_check_counts_the_whole_packet() -> None:
    """max_packet_size bounds the packet with its fixed header, like MQTT 5's Maximum Packet Size."""
    codec = connected_server(MQTT_3_1_1, max_packet_size=16)  # the CONNECT is 15 bytes
    fits = packet(0x30, utf8("t") + b"x" * 11)
    assert len(fits) == 16
    assert codec.receive_data(fits) == [Publish("t", b"x" * 11)]
    assert rejected(codec, packet(0x30, utf8("t") + b"x" * 12)).reason_code == R.PACKET_TOO_LARGE


def test_oversize_first_connect_is_rejected_before_buffering() -> None:
    codec = MqttCodec(max_packet_size=64)
    assert rejected(codec, b"\x10\xff\xff\x7f").reason_code == R.PACKET_TOO_LARGE


def test_largest_wire_length_is_rejected_under_a_small_limit() -> None:
    error = rejected(connected_server(MQTT_3_1_1, max_packet_size=1 << 20), b"\x30\xff\xff\xff\x7f")
    assert error.reason_code == R.PACKET_TOO_LARGE
    assert "268435460" in str(error)


# --- stream state and direction -------------------------------------------------------------------------------


def test_first_packet_must_be_connect() -> None:
    """[MQTT-3.1.0-1]"""
    assert rejected(MqttCodec(), b"\xc0\x00").reason_code == R.PROTOCOL_ERROR


def test_second_connect_is_a_protocol_error() -> None:
    """[MQTT-3.1.0-2]"""
    assert rejected(connected_server(MQTT_3_1_1), CONNECT_BY_LEVEL[MQTT_3_1_1]).reason_code == R.PROTOCOL_ERROR


@pytest.mark.parametrize("wire", [b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x00", b"\xb0\x02\x00\x01", b"\xd0\x00"])
def test_server_rejects_packets_only_a_server_sends(wire: bytes) -> None:
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.PROTOCOL_ERROR


@pytest.mark.parametrize("wire", [CONNECT_BY_LEVEL[MQTT_3_1_1], b"\x82\x06\x00\x01\x00\x01a\x00", b"\xc0\x00"])
def test_client_rejects_packets_only_a_client_sends(wire: bytes) -> None:
    assert rejected(client(MQTT_3_1_1), wire).reason_code == R.PROTOCOL_ERROR


def test_client_rejects_disconnect_from_a_3_1_1_server() -> None:
    assert rejected(client(MQTT_3_1_1), b"\xe0\x00").reason_code == R.PROTOCOL_ERROR


def test_client_codec_without_a_level_refuses_to_guess() -> None:
    assert rejected(MqttCodec(server_side=False), b"\x20\x02\x00\x00").reason_code == R.PROTOCOL_ERROR


def test_codec_stays_failed_and_reports_packets_decoded_before_the_fault() -> None:
    """After a fault nothing more is decoded; packets before the fault in the same chunk travel on the error."""
    codec = connected_server(MQTT_3_1_1)
    error = rejected(codec, b"\xc0\x00" + b"\x00\x00")
    assert error.packets_before_error == [Pingreq()]
    assert rejected(codec, b"\xc0\x00").reason_code == R.MALFORMED_PACKET


# --- CONNECT ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "level"),
    [("MQTT", 3), ("MQIsdp", 4), ("MQIsdp", 5), ("MQTT", 6), ("MQTT", 0), ("HTTP", 4), ("mqtt", 4)],
)
def test_protocol_name_and_level_must_match_a_supported_version(name: str, level: int) -> None:
    """An unknown level, or a name that does not belong to the level, is 0x84 Unsupported Protocol Version."""
    error = rejected(MqttCodec(), connect_v4(0x02, utf8("x"), name=name, level=level))
    assert error.reason_code == R.UNSUPPORTED_PROTOCOL_VERSION
    # No supported level was announced: the adapter answers in the 3.1.1 format (return code 1).
    assert error.protocol_level is None


def test_connect_error_after_the_level_carries_the_level() -> None:
    """A bad 5.0 CONNECT reports level 5 so the adapter replies with a 5.0 CONNACK carrying the reason code."""
    error = rejected(MqttCodec(), packet(0x10, utf8("MQTT") + b"\x05\x03\x00\x3c\x00" + utf8("x")))
    assert error.reason_code == R.MALFORMED_PACKET
    assert error.protocol_level == MQTT_5


def test_connect_reserved_flag_is_malformed() -> None:
    """[MQTT-3.1.2-3]"""
    assert rejected(MqttCodec(), connect_v4(0x03, utf8("x"))).reason_code == R.MALFORMED_PACKET


@pytest.mark.parametrize("flags", [0x0A, 0x12, 0x22, 0x32])
def test_will_qos_or_retain_without_will_flag_is_malformed(flags: int) -> None:
    """[MQTT-3.1.2-11], [MQTT-3.1.2-13]: will QoS and will retain must be 0 when the will flag is 0."""
    assert rejected(MqttCodec(), connect_v4(flags, utf8("x"))).reason_code == R.MALFORMED_PACKET


def test_will_qos_3_is_malformed() -> None:
    payload = utf8("x") + utf8("w") + utf8("bye")
    assert rejected(MqttCodec(), connect_v4(0x1E, payload)).reason_code == R.MALFORMED_PACKET


def test_will_topic_with_wildcard_is_an_invalid_topic_name() -> None:
    payload = utf8("x") + utf8("w/#") + utf8("bye")
    assert rejected(MqttCodec(), connect_v4(0x06, payload)).reason_code == R.TOPIC_NAME_INVALID


def test_password_without_user_name_is_a_protocol_error_in_3_1_1() -> None:
    """[MQTT-3.1.2-22]"""
    assert rejected(MqttCodec(), connect_v4(0x42, utf8("x") + utf8("pw"))).reason_code == R.PROTOCOL_ERROR


def test_password_without_user_name_is_allowed_in_5() -> None:
    wire = packet(0x10, utf8("MQTT") + b"\x05\x42\x00\x3c\x00" + utf8("x") + utf8("pw"))
    assert MqttCodec().receive_data(wire)[0].password == b"pw"


def test_user_name_flag_without_user_name_bytes_is_malformed() -> None:
    assert rejected(MqttCodec(), connect_v4(0x82, utf8("x"))).reason_code == R.MALFORMED_PACKET


def test_connect_with_bytes_after_its_payload_is_malformed() -> None:
    """The remaining length must match the contents exactly."""
    assert rejected(MqttCodec(), connect_v4(0x02, utf8("x") + b"\x00")).reason_code == R.MALFORMED_PACKET


def test_client_identifier_with_nul_is_malformed() -> None:
    """1.5.4: a UTF-8 string must not contain U+0000."""
    assert rejected(MqttCodec(), connect_v4(0x02, utf8("a\x00b"))).reason_code == R.MALFORMED_PACKET


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_client_identifier_with_invalid_utf8_is_malformed(bad: bytes) -> None:
    """1.5.4: ill-formed UTF-8, including encoded surrogates and overlong forms, is a Malformed Packet."""
    assert rejected(MqttCodec(), connect_v4(0x02, raw_string(bad))).reason_code == R.MALFORMED_PACKET


def test_authentication_data_without_method_is_a_protocol_error() -> None:
    assert rejected(MqttCodec(), connect_v5(b"\x04\x16\x00\x01\x00")).reason_code == R.PROTOCOL_ERROR


# --- PUBLISH ------------------------------------------------------------------------------------------------------


def test_publish_qos_3_is_malformed() -> None:
    """[MQTT-3.3.1-4]"""
    assert rejected(connected_server(MQTT_3_1_1), packet(0x36, utf8("t") + b"\x00\x01")).reason_code == (
        R.MALFORMED_PACKET
    )


def test_publish_dup_with_qos_0_is_malformed() -> None:
    """[MQTT-3.3.1-2]"""
    assert rejected(connected_server(MQTT_3_1_1), packet(0x38, utf8("t"))).reason_code == R.MALFORMED_PACKET


@pytest.mark.parametrize("first_byte", [0x32, 0x34])
def test_publish_packet_id_zero_is_a_protocol_error(first_byte: int) -> None:
    """[MQTT-2.2.1-3]: QoS 1 and 2 need a non-zero packet identifier."""
    wire = packet(first_byte, utf8("t") + b"\x00\x00")
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.PROTOCOL_ERROR


@pytest.mark.parametrize("topic", ["a/+", "a/#", "+", "#", "a+b", "sport/#/x"])
def test_publish_topic_with_wildcard_is_an_invalid_topic_name(topic: str) -> None:
    """[MQTT-3.3.2-2]"""
    wire = packet(0x30, utf8(topic))
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.TOPIC_NAME_INVALID


def test_publish_topic_with_invalid_utf8_is_malformed() -> None:
    wire = packet(0x30, raw_string(b"a/\xff"))
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.MALFORMED_PACKET


def test_publish_topic_with_nul_is_rejected() -> None:
    error = rejected(connected_server(MQTT_3_1_1), packet(0x30, utf8("a\x00b")))
    assert error.reason_code in (R.MALFORMED_PACKET, R.TOPIC_NAME_INVALID)


def test_publish_empty_topic_without_alias_is_a_protocol_error() -> None:
    """3.3.2.1: only a Topic Alias makes a zero-length topic name legal."""
    assert rejected(connected_server(MQTT_5), packet(0x30, utf8("") + b"\x00")).reason_code == R.PROTOCOL_ERROR
    assert rejected(connected_server(MQTT_3_1_1), packet(0x30, utf8(""))).reason_code == R.PROTOCOL_ERROR


def test_publish_topic_running_past_the_packet_is_malformed() -> None:
    assert rejected(connected_server(MQTT_3_1_1), b"\x30\x03\x00\x05a").reason_code == R.MALFORMED_PACKET


def test_publish_qos_1_without_room_for_a_packet_id_is_malformed() -> None:
    assert rejected(connected_server(MQTT_3_1_1), packet(0x32, utf8("t") + b"\x00")).reason_code == (R.MALFORMED_PACKET)


# --- acknowledgements -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_byte", [0x40, 0x50, 0x62, 0x70])
def test_acknowledgement_packet_id_zero_is_a_protocol_error(first_byte: int) -> None:
    wire = bytes((first_byte, 2, 0, 0))
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.PROTOCOL_ERROR


def test_3_1_1_acknowledgement_longer_than_2_bytes_is_malformed() -> None:
    assert rejected(connected_server(MQTT_3_1_1), b"\x40\x03\x00\x01\x00").reason_code == R.MALFORMED_PACKET


def test_acknowledgement_shorter_than_a_packet_id_is_malformed() -> None:
    assert rejected(connected_server(MQTT_5), b"\x40\x01\x00").reason_code == R.MALFORMED_PACKET


def test_reason_code_not_allowed_in_the_packet_is_a_protocol_error() -> None:
    """0x04 exists (DISCONNECT with will) but is not a PUBACK reason; 0x03 is not defined at all."""
    assert rejected(connected_server(MQTT_5), b"\x40\x03\x00\x01\x04").reason_code == R.PROTOCOL_ERROR
    assert rejected(connected_server(MQTT_5), b"\x62\x03\x00\x01\x10").reason_code == R.PROTOCOL_ERROR
    assert rejected(connected_server(MQTT_5), b"\xe0\x01\x03").reason_code == R.PROTOCOL_ERROR


def test_3_1_1_connack_reserved_return_code_is_malformed() -> None:
    assert rejected(client(MQTT_3_1_1), b"\x20\x02\x00\x06").reason_code == R.MALFORMED_PACKET


def test_connack_reserved_acknowledge_flags_are_malformed() -> None:
    """[MQTT-3.2.2-1]"""
    assert rejected(client(MQTT_3_1_1), b"\x20\x02\x02\x00").reason_code == R.MALFORMED_PACKET


def test_connack_session_present_with_refusal_is_a_protocol_error() -> None:
    assert rejected(client(MQTT_5), b"\x20\x03\x01\x87\x00").reason_code == R.PROTOCOL_ERROR


def test_3_1_1_suback_reserved_return_code_is_a_protocol_error() -> None:
    assert rejected(client(MQTT_3_1_1), b"\x90\x03\x00\x01\x87").reason_code == R.PROTOCOL_ERROR


def test_5_unsuback_without_reason_codes_is_a_protocol_error() -> None:
    assert rejected(client(MQTT_5), b"\xb0\x03\x00\x01\x00").reason_code == R.PROTOCOL_ERROR


@pytest.mark.parametrize("wire", [b"\xc0\x01\x00", b"\xd0\x01\x00"])
def test_ping_with_a_body_is_malformed(wire: bytes) -> None:
    codec = connected_server(MQTT_3_1_1) if wire[0] == 0xC0 else client(MQTT_3_1_1)
    assert rejected(codec, wire).reason_code == R.MALFORMED_PACKET


def test_3_1_1_disconnect_with_a_body_is_malformed() -> None:
    assert rejected(connected_server(MQTT_3_1_1), b"\xe0\x01\x00").reason_code == R.MALFORMED_PACKET


# --- SUBSCRIBE / UNSUBSCRIBE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
def test_subscribe_without_filters_is_a_protocol_error(level: int) -> None:
    """[MQTT-3.8.3-3]"""
    body = b"\x00\x01" + (b"\x00" if level == MQTT_5 else b"")
    assert rejected(connected_server(level), packet(0x82, body)).reason_code == R.PROTOCOL_ERROR


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
def test_unsubscribe_without_filters_is_a_protocol_error(level: int) -> None:
    """[MQTT-3.10.3-2]"""
    body = b"\x00\x01" + (b"\x00" if level == MQTT_5 else b"")
    assert rejected(connected_server(level), packet(0xA2, body)).reason_code == R.PROTOCOL_ERROR


@pytest.mark.parametrize("packet_id", [b"\x00\x00"])
def test_subscribe_packet_id_zero_is_a_protocol_error(packet_id: bytes) -> None:
    wire = packet(0x82, packet_id + utf8("a") + b"\x00")
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.PROTOCOL_ERROR
    wire = packet(0xA2, packet_id + utf8("a"))
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "topic_filter", ["", "a/#/b", "a#", "a/b#", "a/+b", "+a/b", "#/", "$share//a", "$share/g", "$share/g+/a",
                     "$share/g#/a", "$share/g/", "$share/g/a/#/b"]
)  # fmt: skip
def test_subscribe_with_malformed_filter_is_topic_filter_invalid(topic_filter: str) -> None:
    """4.7.1 wildcards must be whole levels, '#' last; 4.8.2 a share name is non-empty, wildcard-free, then a filter."""
    wire = packet(0x82, b"\x00\x01" + utf8(topic_filter) + b"\x00")
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.TOPIC_FILTER_INVALID
    wire = packet(0xA2, b"\x00\x01" + utf8(topic_filter))
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.TOPIC_FILTER_INVALID


def test_subscription_qos_3_is_malformed() -> None:
    wire = packet(0x82, b"\x00\x01" + utf8("a") + b"\x03")
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.MALFORMED_PACKET


@pytest.mark.parametrize("options", [0x04, 0x08, 0x10, 0x80])
def test_3_1_1_subscription_option_bits_above_qos_are_malformed(options: int) -> None:
    """[MQTT-3.8.3-4] (3.1.1): the upper six bits of the requested QoS byte are reserved."""
    wire = packet(0x82, b"\x00\x01" + utf8("a") + bytes((options,)))
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.MALFORMED_PACKET


@pytest.mark.parametrize("options", [0x40, 0x80])
def test_5_reserved_subscription_option_bits_are_malformed(options: int) -> None:
    """[MQTT-3.8.3-5]"""
    wire = packet(0x82, b"\x00\x01\x00" + utf8("a") + bytes((options,)))
    assert rejected(connected_server(MQTT_5), wire).reason_code == R.MALFORMED_PACKET


def test_5_retain_handling_3_is_a_protocol_error() -> None:
    wire = packet(0x82, b"\x00\x01\x00" + utf8("a") + b"\x30")
    assert rejected(connected_server(MQTT_5), wire).reason_code == R.PROTOCOL_ERROR


def test_no_local_on_a_shared_subscription_is_a_protocol_error() -> None:
    """[MQTT-3.8.3-4] (5.0)"""
    wire = packet(0x82, b"\x00\x01\x00" + utf8("$share/g/a") + b"\x04")
    assert rejected(connected_server(MQTT_5), wire).reason_code == R.PROTOCOL_ERROR


def test_subscribe_filter_without_options_byte_is_malformed() -> None:
    wire = packet(0x82, b"\x00\x01" + utf8("a"))
    assert rejected(connected_server(MQTT_3_1_1), wire).reason_code == R.MALFORMED_PACKET


# --- construction-time validation and encoding limits -------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: Publish("a/+"), R.TOPIC_NAME_INVALID),
        (lambda: Publish("a", qos=1), R.PROTOCOL_ERROR),
        (lambda: Publish("a", qos=0, packet_id=1), R.PROTOCOL_ERROR),
        (lambda: Publish("a", qos=0, dup=True), R.MALFORMED_PACKET),
        (lambda: Publish("a", qos=3, packet_id=1), R.MALFORMED_PACKET),
        (lambda: Publish("a", properties=Properties(session_expiry_interval=1)), R.MALFORMED_PACKET),
        (lambda: Puback(0), R.PROTOCOL_ERROR),
        (lambda: Puback(70000), R.PROTOCOL_ERROR),
        (lambda: Puback(1, R.PACKET_IDENTIFIER_NOT_FOUND), R.PROTOCOL_ERROR),
        (lambda: Subscribe(1, ()), R.PROTOCOL_ERROR),
        (lambda: TopicSubscription("a/#/b"), R.TOPIC_FILTER_INVALID),
        (lambda: TopicSubscription("a", retain_handling=3), R.PROTOCOL_ERROR),  # type: ignore[arg-type]
        (lambda: Unsubscribe(1, ()), R.PROTOCOL_ERROR),
        (lambda: Suback(1, ()), R.PROTOCOL_ERROR),
        (lambda: Suback(1, (R.NO_SUBSCRIPTION_EXISTED,)), R.PROTOCOL_ERROR),
        (lambda: Unsuback(1, (R.GRANTED_QOS_1,)), R.PROTOCOL_ERROR),
        (lambda: Connack(True, R.NOT_AUTHORIZED), R.PROTOCOL_ERROR),
        (lambda: Connect("c", protocol_level=6), R.UNSUPPORTED_PROTOCOL_VERSION),
        (lambda: Connect("c", protocol_level=4, protocol_name="MQIsdp"), R.UNSUPPORTED_PROTOCOL_VERSION),
        (lambda: Connect("c", password=b"p"), R.PROTOCOL_ERROR),
        (lambda: Connect("c", properties=Properties(receive_maximum=5)), R.PROTOCOL_ERROR),
        (lambda: Connect("c\x00"), R.MALFORMED_PACKET),
        (lambda: Connect("\ud800"), R.MALFORMED_PACKET),
        (lambda: Will("t", properties=Properties(topic_alias=1)), R.MALFORMED_PACKET),
        (lambda: Disconnect(R.GRANTED_QOS_1), R.PROTOCOL_ERROR),
        (lambda: Auth(R.NOT_AUTHORIZED), R.PROTOCOL_ERROR),
    ],
)
def test_invalid_packets_cannot_be_built(build: object, reason: ReasonCode) -> None:
    """Packets validate on construction with the same reason codes decoding uses."""
    with pytest.raises(MqttProtocolError) as caught:
        build()  # type: ignore[operator]
    assert caught.value.reason_code == reason


@pytest.mark.parametrize(
    ("server_side", "level", "packet_to_send"),
    [
        (True, MQTT_3_1_1, Connect("c")),
        (False, MQTT_3_1_1, Suback(1, (R.SUCCESS,))),
        (False, MQTT_3_1_1, Auth()),
        (False, MQTT_3_1_1, Subscribe(1, (TopicSubscription("a", no_local=True),))),
        (False, MQTT_3_1_1, Subscribe(1, (TopicSubscription("a", retain_handling=RetainHandling.DO_NOT_SEND),))),
        (True, MQTT_3_1_1, Disconnect()),
        (True, MQTT_5, Unsuback(1)),
    ],
)
def test_encoding_what_the_side_or_level_cannot_send_raises(
    server_side: bool, level: int, packet_to_send: object
) -> None:
    codec = MqttCodec(server_side=server_side)
    codec.protocol_level = level
    with pytest.raises(MqttEncodeError):
        codec.encode(packet_to_send)  # type: ignore[arg-type]


def test_encoding_before_the_level_is_known_raises() -> None:
    with pytest.raises(MqttEncodeError):
        MqttCodec().encode(Connack())


def test_encoding_at_3_1_1_translates_reason_codes_and_drops_what_it_cannot_carry() -> None:
    """One packet serves every client: 3.1.1 gets the closest return code and no properties or ack reasons."""
    server = MqttCodec()
    server.protocol_level = MQTT_3_1_1
    assert server.encode(Connack(reason_code=R.BANNED)) == b"\x20\x02\x00\x05"
    assert server.encode(Connack(reason_code=R.SERVER_BUSY)) == b"\x20\x02\x00\x03"
    assert server.encode(Connack(reason_code=R.BAD_USER_NAME_OR_PASSWORD)) == b"\x20\x02\x00\x04"
    assert server.encode(Connack(reason_code=R.UNSUPPORTED_PROTOCOL_VERSION)) == b"\x20\x02\x00\x01"
    assert server.encode(Suback(1, (R.GRANTED_QOS_1, R.NOT_AUTHORIZED))) == b"\x90\x04\x00\x01\x01\x80"
    assert server.encode(Puback(1, R.NO_MATCHING_SUBSCRIBERS, Properties(reason_string="x"))) == b"\x40\x02\x00\x01"
    assert server.encode(Unsuback(1, (R.SUCCESS,))) == b"\xb0\x02\x00\x01"
    user_property = Properties(user_properties=(("k", "v"),))
    assert server.encode(Publish("t", b"x", properties=user_property)) == b"\x30\x04\x00\x01tx"


def test_setting_an_unknown_protocol_level_by_hand_is_refused() -> None:
    with pytest.raises(ValueError):
        MqttCodec(server_side=False).protocol_level = 6
