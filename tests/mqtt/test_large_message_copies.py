"""Copies of a large MQTT payload in the broker (issue 10, large messages): a PUBLISH that spans reads has its
payload joined once from the received chunks (not the whole packet joined, then the payload sliced out of it), and
a large delivery to a 3.1.1 client goes to the transport as its PUBLISH head and the stored body as two pieces
(never joined into one packet)."""

from __future__ import annotations

import tracemalloc

import pytest

from tidegate.adapters.mqtt.codec import (
    MQTT_3_1_1,
    MQTT_5,
    SPANNING_PUBLISH_MIN_BYTES,
    Connect,
    MqttCodec,
    MqttProtocolError,
    Properties,
    Puback,
    Publish,
    Subscribe,
    TopicSubscription,
    encode_publish_v311,
    publish_topic_header,
    publish_v311_head,
)


def connected(level: int) -> MqttCodec:
    server = MqttCodec()
    client = MqttCodec(server_side=False)
    assert server.receive_data(client.encode(Connect("c", protocol_level=level)))
    return server


def encoded(level: int, packet) -> bytes:
    client = MqttCodec(server_side=False)
    client.protocol_level = level
    return client.encode(packet)


LARGE_PUBLISHES = [
    (MQTT_3_1_1, Publish("t/large", b"a" * 70_000, 1, packet_id=7)),
    (MQTT_3_1_1, Publish("t/large", b"b" * 70_000, 0)),
    (MQTT_3_1_1, Publish("t/r", b"c" * 70_000, 2, retain=True, dup=True, packet_id=65535)),
    (MQTT_3_1_1, Publish("é/ü", b"d" * SPANNING_PUBLISH_MIN_BYTES, 1, packet_id=1)),  # not a fast-path name
    (MQTT_5, Publish("t/large", b"e" * 70_000, 1, packet_id=3)),
    (MQTT_5, Publish("t/p", b"f" * 70_000, 1, packet_id=4,
                     properties=Properties(content_type="x/y", user_properties=(("k", "v" * 300),)))),
]


@pytest.mark.parametrize("receive", ["receive_data", "receive_batch"])
@pytest.mark.parametrize("level,packet", LARGE_PUBLISHES)
def test_a_large_publish_split_anywhere_decodes_as_the_whole_packet(level, packet, receive):
    """Cut inside the fixed header, the topic, the packet id, the properties, at the payload's start and inside
    it: the result is what the unsplit packet gives (a Publish, or receive_batch's plain tuple)."""
    data = encoded(level, packet)
    whole = getattr(connected(level), receive)(data)
    payload_start = len(data) - len(packet.payload)
    for cut in sorted({1, 2, 3, 5, 9, payload_start - 1, payload_start, payload_start + 1, len(data) // 2,
                       len(data) - 1}):
        codec = connected(level)
        assert getattr(codec, receive)(data[:cut]) == []
        assert getattr(codec, receive)(data[cut:]) == whole, cut
        assert codec.buffered == 0


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
def test_a_spanning_publish_is_followed_by_the_packets_of_its_last_read(level):
    first = encoded(level, Publish("t/a", b"1" * 100_000, 1, packet_id=1))
    rest = encoded(level, Puback(9)) + encoded(level, Publish("t/a", b"2" * 10, 1, packet_id=2))
    codec = connected(level)
    assert codec.receive_data(first[:60_000]) == []
    packets = codec.receive_data(first[60_000:] + rest)
    assert [type(p) for p in packets] == [Publish, Puback, Publish]
    assert packets[0].payload == b"1" * 100_000 and packets[2].payload == b"2" * 10


def test_a_spanning_publish_payload_is_copied_once_not_joined_with_its_packet_first():
    """Receiving the last chunk of a 4 MiB PUBLISH allocates its payload once: the old way (join the packet, slice
    the payload out of it) held two copies at once."""
    payload = b"m" * (4 << 20)
    data = encoded(MQTT_3_1_1, Publish("t/big", payload, 1, packet_id=1))
    codec = connected(MQTT_3_1_1)
    codec.receive_data(data[:3_000_000])
    last = data[3_000_000:]
    tracemalloc.start()
    try:
        (packet,) = codec.receive_data(last)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert packet.payload == payload
    assert len(payload) <= peak < len(payload) + 64 * 1024


@pytest.mark.parametrize("level,bad,reason", [
    (MQTT_3_1_1, bytes((0x36,)), "PUBLISH QoS is 3"),  # flags: QoS 3
    (MQTT_3_1_1, b"topic", "PUBLISH topic is not valid UTF-8"),  # the topic made invalid below
    (MQTT_5, b"props", "properties"),  # a property length running past the packet
])
def test_a_faulty_spanning_publish_fails_as_the_whole_packet_does(level, bad, reason):
    data = bytearray(encoded(level, Publish("t/x", b"z" * 50_000, 1, packet_id=1)))
    header = 4  # fixed header of a 50 KiB packet: type byte and a 3-byte remaining length
    if bad == b"topic":
        data[header + 2] = 0xFF
    elif bad == b"props":
        data[header + 2 + 3 + 2] = 0xFF  # property length: a continuation byte...
        data[header + 2 + 3 + 3] = 0xFF  # ...and another, announcing far more than the packet holds
    else:
        data[0] = bad[0]
    data = bytes(data)
    with pytest.raises(MqttProtocolError) as whole:
        connected(level).receive_data(data)
    codec = connected(level)
    assert codec.receive_data(data[:20_000]) == []
    with pytest.raises(MqttProtocolError) as split:
        codec.receive_data(data[20_000:])
    assert (split.value.message, split.value.reason_code) == (whole.value.message, whole.value.reason_code)
    assert reason in whole.value.message or whole.value.reason_code


@pytest.mark.parametrize("qos,packet_id,retain,dup", [(0, None, False, False), (1, 1, True, True),
                                                       (2, 65535, False, False)])
@pytest.mark.parametrize("size", [0, 100, 20_000, 3_000_000])
def test_v311_publish_head_and_payload_are_the_whole_packet(qos, packet_id, retain, dup, size):
    header = publish_topic_header("t/h")
    payload = b"p" * size
    head = publish_v311_head(header, size, qos, retain, dup, packet_id)
    assert head + payload == encode_publish_v311(header, payload, qos, retain, dup, packet_id)
    assert head + payload == encoded(MQTT_3_1_1, Publish("t/h", payload, qos, retain, dup, packet_id))


def _record_writes(client) -> list[bytes]:
    """The chunks the broker hands to `client`'s transport, one list entry per chunk."""
    writes: list[bytes] = []
    transport = client.transport
    write, write_sequence = transport.write, transport.writeSequence

    def record_write(data):
        writes.append(data)
        write(data)

    def record_sequence(chunks):
        writes.extend(chunks)
        write_sequence(chunks)

    transport.write, transport.writeSequence = record_write, record_sequence
    return writes


@pytest.mark.parametrize("publisher_level,properties", [
    (4, None),  # the 3.1.1 fast delivery path (`_deliver_v311`)
    (5, Properties(message_expiry_interval=600)),  # an expiry: the general path (`_transmit`)
])
def test_a_large_delivery_to_a_3_1_1_client_writes_the_payload_as_a_piece_of_its_own(env, publisher_level,
                                                                                         properties):
    sub, pub = env.client(4), env.client(publisher_level)
    sub.connect("sub")
    pub.connect("pub")
    sub.send(Subscribe(1, (TopicSubscription("big/#", 1),)))
    env.pump()
    sub.received()
    payload = bytes(range(256)) * 256  # 64 KiB
    writes = _record_writes(sub)
    pub.send(Publish("big/x", payload, 1, packet_id=5, properties=properties or Properties()))
    env.pump()
    assert [p.packet_id for p in pub.received()] == [5]
    (delivery,) = sub.received()
    assert (delivery.topic, delivery.payload, delivery.qos) == ("big/x", payload, 1)
    assert payload in writes  # the body itself, not a packet holding it
    assert max(map(len, writes)) == len(payload)


def test_fixed_headers_of_large_and_small_deliveries_never_share_a_cache_entry(env):
    """The 3.1.1 batch path caches fixed headers by (first byte, remaining length): a QoS 0 delivery whose remaining
    length is 128 KiB + 20 must not get the cached header of a QoS 1 delivery of remaining length 20."""
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub")
    pub.connect("pub")
    sub.send(Subscribe(1, (TopicSubscription("c/#", 1),)))
    env.pump()
    sub.received()
    small = b"s" * 13  # topic header 5 + packet id 2 + 13 = remaining length 20
    large = b"L" * (0x20014 - 5)  # QoS 0: topic header 5 + payload = 0x20014
    pub.send(Publish("c/x", small, 1, packet_id=1))
    env.pump()
    (first,) = sub.received()
    assert (first.qos, first.payload) == (1, small)
    sub.send(Puback(first.packet_id))
    pub.send(Publish("c/x", large, 0))
    env.pump()
    (second,) = sub.received()
    assert (second.qos, second.payload) == (0, large)
