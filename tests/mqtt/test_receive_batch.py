"""`MqttCodec.receive_batch`, the broker's read path: plain PUBLISHes and Success PUBACKs come out as tuples and
ints, and everything else, faults included, exactly as `receive_data` gives it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.adapters.mqtt.codec import (
    Connect,
    MqttCodec,
    MqttProtocolError,
    Pingreq,
    Properties,
    Puback,
    Publish,
    Pubrec,
    ReasonCode,
    Subscribe,
    TopicSubscription,
)
from tidegate.adapters.mqtt.properties import encode_variable_byte_integer


def as_packets(items):
    """What `receive_data` gives for the items of `receive_batch`."""
    out = []
    for item in items:
        if item.__class__ is int:
            out.append(Puback(item))
        elif item.__class__ is tuple:
            topic, packet_id, payload = item
            out.append(Publish(topic, payload, 0 if packet_id is None else 1, packet_id=packet_id))
        else:
            out.append(item)
    return out


def connected_pair(level):
    """Two server-side codecs after the same CONNECT: one read with receive_data, the other with receive_batch."""
    client = MqttCodec(server_side=False)
    connect = client.encode(Connect("c", protocol_level=level))
    codecs = []
    for _ in range(2):
        codec = MqttCodec()
        codec.receive_data(connect)
        codecs.append(codec)
    return client, codecs


def feed(codec, method, chunks):
    """Packets of all chunks; a fault ends the stream as (message, reason code, packets before it)."""
    got = []
    for chunk in chunks:
        try:
            got += as_packets(getattr(codec, method)(chunk))
        except MqttProtocolError as error:
            return got + as_packets(error.packets_before_error), (error.message, error.reason_code)
    return got, None


_topics = st.sampled_from(["a", "a/b", "sensors/x/temp", "é/ü", "a/+", "#", "", "t" * 300, "x\x00y"])
_publish = st.builds(lambda topic, qos, packet_id, retain, dup, payload: (topic, qos, packet_id, retain, dup, payload),
                     _topics, st.integers(0, 2), st.integers(1, 65535), st.booleans(), st.booleans(),
                     st.binary(max_size=300))


def _encode_packet(client, spec):
    kind = spec[0]
    if kind == "publish":
        topic, qos, packet_id, retain, dup, payload = spec[1]
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            # a name Publish refuses: hand-made bytes (with a packet id at QoS 1/2)
            raw = topic.encode()
            variable = len(raw).to_bytes(2, "big") + raw + (packet_id.to_bytes(2, "big") if qos else b"")
            if client.protocol_level == 5:
                variable += b"\x00"
            body = variable + payload
            return bytes([0x30 | qos << 1]) + encode_variable_byte_integer(len(body)) + body
        return client.encode(Publish(topic, payload, qos, retain, dup and qos > 0, packet_id if qos else None))
    if kind == "puback":
        return client.encode(Puback(spec[1]))
    if kind == "puback_v5_reason":
        return client.encode(Puback(spec[1], ReasonCode.NO_MATCHING_SUBSCRIBERS))
    if kind == "pubrec":
        return client.encode(Pubrec(spec[1]))
    if kind == "ping":
        return client.encode(Pingreq())
    if kind == "subscribe":
        return client.encode(Subscribe(spec[1], (TopicSubscription("a/#", 1),)))
    return spec[1]  # raw bytes



_raw_faults = st.sampled_from([
    b"\x32\x05\x00\x01a\x00\x00",  # QoS 1 PUBLISH with packet id 0
    b"\x40\x02\x00\x00",  # PUBACK with packet id 0
    b"\x32\x03\x00\x05a",  # topic runs past the end
    b"\x30\x01\x00",  # topic length runs past the end
    b"\x30\x04\x00\x02\xff\xfe",  # topic is not UTF-8
    b"\x36\x04\x00\x01a\x00",  # QoS 3
    b"\x41\x02\x00\x01",  # PUBACK with flags
    b"\x40\x03\x00\x01\x00",  # PUBACK with a reason code (3.1.1: malformed)
])
_specs = st.one_of(
    st.tuples(st.just("publish"), _publish),
    st.tuples(st.just("puback"), st.integers(1, 65535)),
    st.tuples(st.just("pubrec"), st.integers(1, 65535)),
    st.tuples(st.just("ping"), st.none()),
    st.tuples(st.just("subscribe"), st.integers(1, 65535)),
    st.tuples(st.just("raw"), _raw_faults),
)


@settings(max_examples=300, deadline=None)
@given(level=st.sampled_from([3, 4, 5]), specs=st.lists(_specs, max_size=12), cuts=st.lists(st.integers(0, 5000),
                                                                                         max_size=4))
def test_receive_batch_is_receive_data_for_any_stream_and_any_split(level, specs, cuts):
    """Random packet streams (plain and non-plain PUBLISHes, PUBACKs, other packets, malformed bytes) cut into
    random reads: the same packets, the same fault with the same reason code, the same packets before it."""
    client, (general, batch) = connected_pair(level)
    data = b"".join(_encode_packet(client, spec) for spec in specs)
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert feed(batch, "receive_batch", chunks) == feed(general, "receive_data", chunks)


@pytest.mark.parametrize("level", [3, 4, 5])
def test_plain_publishes_and_pubacks_come_out_as_tuples_and_ints(level):
    client, (_, codec) = connected_pair(level)
    data = b"".join([
        client.encode(Publish("a/b", b"x", 1, packet_id=7)),
        client.encode(Publish("a/b", b"y", 0)),
        client.encode(Puback(9)),
        client.encode(Publish("a/b", b"r", 1, retain=True, packet_id=8)),  # retained: the general decoder
        client.encode(Publish("é", b"u", 0)),  # non-ASCII name: the general decoder
    ])
    items = codec.receive_batch(data)
    assert items[:3] == [("a/b", 7, b"x"), ("a/b", None, b"y"), 9]
    assert [type(p) for p in items[3:]] == [Publish, Publish]


def test_v5_publish_with_properties_takes_the_general_decoder():
    client, (_, codec) = connected_pair(5)
    [packet] = codec.receive_batch(client.encode(Publish("a", b"x", 1, packet_id=1,
                                                         properties=Properties(content_type="text/plain"))))
    assert isinstance(packet, Publish) and packet.properties.content_type == "text/plain"


def test_before_connect_it_is_receive_data():
    client = MqttCodec(server_side=False)
    codec = MqttCodec()
    data = client.encode(Connect("c", protocol_level=4)) + client.encode(Publish("a", b"x", 1, packet_id=1))
    packets = codec.receive_batch(data)
    assert isinstance(packets[0], Connect) and isinstance(packets[1], Publish)


def test_a_plain_publish_before_connect_is_refused_as_before():
    with pytest.raises(MqttProtocolError) as error:
        MqttCodec().receive_batch(b"\x30\x04\x00\x01ax")
    assert error.value.reason_code == ReasonCode.PROTOCOL_ERROR
