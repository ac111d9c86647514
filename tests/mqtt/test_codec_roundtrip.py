"""Hypothesis round-trips for every packet type at MQTT 3.1, 3.1.1 and 5, and fuzzing of the decoder.

Round-trip: a packet encoded by one side's codec decodes to an equal packet on the other side. Fuzz: no byte
string, random or a mutated valid packet, makes `receive_data` raise anything but `MqttProtocolError`.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.adapters.mqtt.codec import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MqttCodec,
    MqttProtocolError,
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
from tidegate.adapters.mqtt.properties import (
    ALLOWED_PROPERTIES,
    PROPERTY_SPECS,
    PropertyContext,
    PropertyId,
    WireType,
    encode_variable_byte_integer,
)
from tidegate.adapters.mqtt.reason_codes import (
    AUTH_REASON_CODES,
    CONNACK_REASON_CODES,
    DISCONNECT_REASON_CODES,
    PUBACK_REASON_CODES,
    PUBCOMP_REASON_CODES,
    PUBREC_REASON_CODES,
    PUBREL_REASON_CODES,
    SUBACK_REASON_CODES,
    UNSUBACK_REASON_CODES,
)

LEVELS = st.sampled_from([MQTT_3_1, MQTT_3_1_1, MQTT_5])
CONNECT_BY_LEVEL = {
    MQTT_3_1: b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01x",
    MQTT_3_1_1: b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01x",
    MQTT_5: b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01x",
}

# --- strategies -------------------------------------------------------------------------------------------------

mqtt_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
level_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/+#"), max_size=6)
topic_names = st.lists(level_text, min_size=1, max_size=4).map("/".join).filter(bool)
packet_ids = st.integers(1, 0xFFFF)
binary = st.binary(max_size=24)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(level_text, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    if not topic_filter:
        topic_filter = "#"
    if draw(st.integers(0, 4)) == 0:
        group = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/+#"),
                             min_size=1, max_size=5))  # fmt: skip
        topic_filter = f"$share/{group}/{topic_filter}"
    return topic_filter


def _value_strategy(wire_type: WireType, minimum: int, maximum: int | None) -> st.SearchStrategy[Any]:
    limits = {
        WireType.BYTE: 0xFF,
        WireType.TWO_BYTE_INTEGER: 0xFFFF,
        WireType.FOUR_BYTE_INTEGER: 0xFFFFFFFF,
        WireType.VARIABLE_BYTE_INTEGER: 268_435_455,
    }
    if wire_type in limits:
        return st.integers(minimum, limits[wire_type] if maximum is None else maximum)
    if wire_type is WireType.BOOLEAN_BYTE:
        return st.booleans()
    if wire_type is WireType.BINARY_DATA:
        return binary
    if wire_type is WireType.UTF8_STRING_PAIR:
        return st.tuples(mqtt_text, mqtt_text)
    return mqtt_text


@functools.cache
def properties_for(context: PropertyContext) -> st.SearchStrategy[Properties]:
    """Any valid set of the properties `context` allows, every value drawn from its wire type's range."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for spec in PROPERTY_SPECS:
        if spec.identifier not in ALLOWED_PROPERTIES[context]:
            continue
        value = _value_strategy(spec.wire_type, spec.minimum, spec.maximum)
        if spec.identifier == PropertyId.RESPONSE_TOPIC:
            value = topic_names
        if spec.identifier == PropertyId.USER_PROPERTY:
            value = st.lists(value, min_size=1, max_size=3).map(tuple)
        elif spec.identifier == PropertyId.SUBSCRIPTION_IDENTIFIER:
            most = 3 if context is PropertyContext.PUBLISH else 1
            value = st.lists(value, min_size=1, max_size=most).map(tuple)
        optional[spec.attribute] = value
    strategy = st.fixed_dictionaries({}, optional=optional)
    if context is PropertyContext.CONNECT:
        # Authentication data needs a method (3.1.2.11.10).
        strategy = strategy.filter(lambda kw: "authentication_data" not in kw or "authentication_method" in kw)
    return strategy.map(lambda kwargs: Properties(**kwargs))


def props(level: int, context: PropertyContext) -> st.SearchStrategy[Properties]:
    return properties_for(context) if level == MQTT_5 else st.just(Properties())


def reasons(allowed: frozenset[int]) -> st.SearchStrategy[ReasonCode]:
    return st.sampled_from(sorted(ReasonCode(code) for code in allowed))


V311_CONNACK_REASONS = [ReasonCode.SUCCESS, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                        ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, ReasonCode.SERVER_UNAVAILABLE,
                        ReasonCode.BAD_USER_NAME_OR_PASSWORD, ReasonCode.NOT_AUTHORIZED]  # fmt: skip
# 0x00 is Granted QoS 0 in SUBACK; 0x80 is the one 3.1.1 failure code.
V311_SUBACK_REASONS = [ReasonCode.SUCCESS, ReasonCode.GRANTED_QOS_1, ReasonCode.GRANTED_QOS_2,
                       ReasonCode.UNSPECIFIED_ERROR]  # fmt: skip


@st.composite
def connects(draw: st.DrawFn, level: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(draw(topic_names), draw(binary), draw(st.integers(0, 2)), draw(st.booleans()),
                    draw(props(level, PropertyContext.WILL)))  # fmt: skip
    username = draw(st.none() | mqtt_text)
    password = draw(st.none() | binary)
    if level < MQTT_5 and username is None:
        password = None
    return Connect(draw(mqtt_text), level, draw(st.booleans()), draw(st.integers(0, 0xFFFF)), will, username,
                   password, draw(props(level, PropertyContext.CONNECT)))  # fmt: skip


@st.composite
def publishes(draw: st.DrawFn, level: int, server_sends: bool) -> Publish:
    properties = draw(props(level, PropertyContext.PUBLISH))
    if not server_sends and len(properties.subscription_identifiers) > 0:
        # Clients never send subscription identifiers; keep the strategy honest about direction.
        properties = Properties(**{**_as_kwargs(properties), "subscription_identifiers": ()})
    topic = draw(topic_names)
    if properties.topic_alias is not None and draw(st.booleans()):
        topic = ""  # 3.3.2.1: an alias may stand in for the topic name
    qos = draw(st.integers(0, 2))
    return Publish(topic, draw(binary), qos, draw(st.booleans()), draw(st.booleans()) if qos else False,
                   draw(packet_ids) if qos else None, properties)  # fmt: skip


def _as_kwargs(properties: Properties) -> dict[str, Any]:
    return {spec.attribute: getattr(properties, spec.attribute) for spec in PROPERTY_SPECS}


@st.composite
def acknowledgements(draw: st.DrawFn, level: int) -> Packet:
    packet_class, allowed, context = draw(st.sampled_from([
        (Puback, PUBACK_REASON_CODES, PropertyContext.PUBACK),
        (Pubrec, PUBREC_REASON_CODES, PropertyContext.PUBREC),
        (Pubrel, PUBREL_REASON_CODES, PropertyContext.PUBREL),
        (Pubcomp, PUBCOMP_REASON_CODES, PropertyContext.PUBCOMP),
    ]))  # fmt: skip
    if level < MQTT_5:
        return packet_class(draw(packet_ids))
    return packet_class(draw(packet_ids), draw(reasons(allowed)), draw(props(level, context)))


@st.composite
def subscribes(draw: st.DrawFn, level: int) -> Subscribe:
    def subscription(topic_filter: str) -> TopicSubscription:
        qos = draw(st.integers(0, 2))
        if level < MQTT_5:
            return TopicSubscription(topic_filter, qos)
        shared = topic_filter.startswith("$share/")
        return TopicSubscription(topic_filter, qos, False if shared else draw(st.booleans()), draw(st.booleans()),
                            draw(st.sampled_from(list(RetainHandling))))  # fmt: skip

    filters = draw(st.lists(topic_filters(), min_size=1, max_size=4))
    return Subscribe(draw(packet_ids), tuple(subscription(f) for f in filters),
                     draw(props(level, PropertyContext.SUBSCRIBE)))  # fmt: skip


def v5_disconnect_and_auth() -> list[st.SearchStrategy[Packet]]:
    return [
        st.builds(Disconnect, reasons(DISCONNECT_REASON_CODES), props(MQTT_5, PropertyContext.DISCONNECT)),
        st.builds(Auth, reasons(AUTH_REASON_CODES), props(MQTT_5, PropertyContext.AUTH)),
    ]


@st.composite
def client_packets(draw: st.DrawFn, level: int) -> Packet:
    """Packets a client sends (other than CONNECT) that are valid at `level`."""
    choices: list[st.SearchStrategy[Packet]] = [
        publishes(level, server_sends=False),
        acknowledgements(level),
        subscribes(level),
        unsubscribes(level),
        st.just(Pingreq()),
    ]  # fmt: skip
    if level == MQTT_5:
        choices += v5_disconnect_and_auth()
    else:
        choices.append(st.just(Disconnect()))
    return draw(st.one_of(choices))


@st.composite
def server_packets(draw: st.DrawFn, level: int, only: int | None = None) -> Packet:
    """Packets a server sends that are valid at `level` (`only`: index of one kind in the list below)."""
    if level == MQTT_5:
        connack_reason = reasons(CONNACK_REASON_CODES)
        suback_reasons = reasons(SUBACK_REASON_CODES)
    else:
        connack_reason = st.sampled_from(V311_CONNACK_REASONS)
        suback_reasons = st.sampled_from(V311_SUBACK_REASONS)

    @st.composite
    def connacks(draw_connack: st.DrawFn) -> Connack:
        reason = draw_connack(connack_reason)
        session_present = draw_connack(st.booleans()) if reason == ReasonCode.SUCCESS else False
        return Connack(session_present, reason, draw_connack(props(level, PropertyContext.CONNACK)))

    choices: list[st.SearchStrategy[Packet]] = [
        connacks(),
        publishes(level, server_sends=True),
        acknowledgements(level),
        st.builds(Suback, packet_ids, st.lists(suback_reasons, min_size=1, max_size=4).map(tuple),
                  props(level, PropertyContext.SUBACK)),
        st.builds(Unsuback, packet_ids,
                  st.lists(reasons(UNSUBACK_REASON_CODES), min_size=1, max_size=4).map(tuple)
                  if level == MQTT_5 else st.just(()),
                  props(level, PropertyContext.UNSUBACK)),
        st.just(Pingresp()),
    ]  # fmt: skip
    if level == MQTT_5:
        choices += v5_disconnect_and_auth()
    return draw(st.one_of(choices) if only is None else choices[only])


# --- helpers ----------------------------------------------------------------------------------------------------


def connected_pair(level: int) -> tuple[MqttCodec, MqttCodec]:
    client = MqttCodec(server_side=False)
    client.protocol_level = level
    server = MqttCodec()
    server.receive_data(CONNECT_BY_LEVEL[level])
    return client, server


def feed_in_chunks(codec: MqttCodec, wire: bytes, chunk_size: int) -> list[Packet]:
    packets: list[Packet] = []
    for offset in range(0, len(wire), chunk_size):
        packets += codec.receive_data(wire[offset : offset + chunk_size])
    return packets


# --- round-trips ------------------------------------------------------------------------------------------------


@given(st.data(), LEVELS)
def test_connect_round_trips(data: st.DataObject, level: int) -> None:
    """CONNECT at every level, with any will, credentials and properties, decodes to an equal packet."""
    connect = data.draw(connects(level))
    client = MqttCodec(server_side=False)
    wire = client.encode(connect)
    assert client.protocol_level == level
    server = MqttCodec()
    assert server.receive_data(wire) == [connect]
    assert server.protocol_level == level


def unsubscribes(level: int) -> st.SearchStrategy[Unsubscribe]:
    return st.builds(Unsubscribe, packet_ids, st.lists(topic_filters(), min_size=1, max_size=4).map(tuple),
                     props(level, PropertyContext.UNSUBSCRIBE))  # fmt: skip


# Packet kinds by the side that sends them; CONNECT has its own test. Each kind is checked at each level it exists.
CLIENT_KINDS: dict[str, Any] = {
    "PUBLISH": lambda level: publishes(level, server_sends=False),
    "PUBACK/PUBREC/PUBREL/PUBCOMP": acknowledgements,
    "SUBSCRIBE": subscribes,
    "UNSUBSCRIBE": unsubscribes,
    "PINGREQ": lambda level: st.just(Pingreq()),
    "DISCONNECT": lambda level: v5_disconnect_and_auth()[0] if level == MQTT_5 else st.just(Disconnect()),
    "AUTH": lambda level: v5_disconnect_and_auth()[1] if level == MQTT_5 else None,
}
SERVER_KINDS: dict[str, Any] = {
    "CONNACK": lambda level: server_packets(level, only=0),
    "PUBLISH": lambda level: server_packets(level, only=1),
    "PUBACK/PUBREC/PUBREL/PUBCOMP": lambda level: server_packets(level, only=2),
    "SUBACK": lambda level: server_packets(level, only=3),
    "UNSUBACK": lambda level: server_packets(level, only=4),
    "PINGRESP": lambda level: server_packets(level, only=5),
    "DISCONNECT": lambda level: server_packets(level, only=6) if level == MQTT_5 else None,
    "AUTH": lambda level: server_packets(level, only=7) if level == MQTT_5 else None,
}
KIND_LEVELS = [(kind, level) for kind in CLIENT_KINDS for level in (MQTT_3_1, MQTT_3_1_1, MQTT_5)]
SERVER_KIND_LEVELS = [(kind, level) for kind in SERVER_KINDS for level in (MQTT_3_1, MQTT_3_1_1, MQTT_5)]


@pytest.mark.parametrize(("kind", "level"), KIND_LEVELS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), chunk_size=st.integers(1, 64))
def test_client_packet_round_trips(kind: str, level: int, data: st.DataObject, chunk_size: int) -> None:
    """Each client-to-server packet type decodes to an equal packet at each level, however the bytes are chunked."""
    strategy = CLIENT_KINDS[kind](level)
    if strategy is None:
        return  # the packet type does not exist at this level (AUTH before 5)
    client, server = connected_pair(level)
    sent = data.draw(st.lists(strategy, min_size=1, max_size=2))
    wire = b"".join(client.encode(packet) for packet in sent)
    assert feed_in_chunks(server, wire, chunk_size) == sent
    assert server.buffered == 0


@pytest.mark.parametrize(("kind", "level"), SERVER_KIND_LEVELS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), chunk_size=st.integers(1, 64))
def test_server_packet_round_trips(kind: str, level: int, data: st.DataObject, chunk_size: int) -> None:
    """Each server-to-client packet type decodes to an equal packet at each level, however the bytes are chunked."""
    strategy = SERVER_KINDS[kind](level)
    if strategy is None:
        return  # DISCONNECT and AUTH from a server exist only in MQTT 5
    client, server = connected_pair(level)
    sent = data.draw(st.lists(strategy, min_size=1, max_size=2))
    wire = b"".join(server.encode(packet) for packet in sent)
    assert feed_in_chunks(client, wire, chunk_size) == sent
    assert client.buffered == 0


@given(st.binary(max_size=70_000), LEVELS)
def test_large_publish_payload_round_trips(payload: bytes, level: int) -> None:
    client, server = connected_pair(level)
    message = Publish("big/payload", payload, 1, packet_id=1)
    assert server.receive_data(client.encode(message)) == [message]


# --- fuzzing ----------------------------------------------------------------------------------------------------


def decode_or_protocol_error(codec: MqttCodec, wire: bytes, chunk_size: int) -> None:
    try:
        feed_in_chunks(codec, wire, chunk_size)
    except MqttProtocolError as error:
        assert isinstance(error.reason_code, ReasonCode)
        assert error.reason_code >= 0x80


@settings(max_examples=500)
@given(st.binary(max_size=300), st.sampled_from([None, MQTT_3_1, MQTT_3_1_1, MQTT_5]), st.booleans(),
       st.integers(1, 300))  # fmt: skip
def test_arbitrary_bytes_raise_only_protocol_errors(
    wire: bytes, level: int | None, server_side: bool, chunk_size: int
) -> None:
    """Random input never escapes as IndexError, UnicodeError, struct.error, ValueError or anything else."""
    codec = MqttCodec(server_side=server_side, max_packet_size=1024)
    if level is not None:
        if server_side:
            codec.receive_data(CONNECT_BY_LEVEL[level])
        else:
            codec.protocol_level = level
    decode_or_protocol_error(codec, wire, chunk_size)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), LEVELS, st.booleans())
def test_mutated_valid_packets_raise_only_protocol_errors(data: st.DataObject, level: int, from_client: bool) -> None:
    """Valid packets with a few bytes changed, cut or appended reach the deep decoding paths; still only MQTT errors."""
    client, server = connected_pair(level)
    if from_client:
        wire = bytearray(client.encode(data.draw(client_packets(level))))
        receiver = server
    else:
        wire = bytearray(server.encode(data.draw(server_packets(level))))
        receiver = client
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    wire = wire[: data.draw(st.integers(0, len(wire)))] + data.draw(st.binary(max_size=8))
    decode_or_protocol_error(receiver, bytes(wire), data.draw(st.integers(1, 64)))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_a_connect_header_raise_only_protocol_errors(tail: bytes) -> None:
    """Random bytes inside a CONNECT of each level exercise the flag and payload checks."""
    for prefix in (b"\x00\x04MQTT\x05", b"\x00\x04MQTT\x04", b"\x00\x06MQIsdp\x03"):
        body = prefix + tail
        decode_or_protocol_error(MqttCodec(), b"\x10" + encode_variable_byte_integer(len(body)) + body, 512)
