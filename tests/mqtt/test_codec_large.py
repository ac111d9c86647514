"""The MQTT codec's receive buffer with large packets (issue 10, large messages): a PUBLISH of 64 KiB or 1 MiB
arriving in many small TCP chunks costs linear work. The chunks are kept as they arrive (no concatenation per
chunk), the packet is joined once when its last byte is here, packets after it in the same read are decoded in
place, and a short tail is copied while a long one is kept as a view."""

from __future__ import annotations

import pytest

from tidegate.adapters.mqtt.codec import (
    MQTT_3_1_1,
    Connect,
    MqttCodec,
    MqttProtocolError,
    Puback,
    Publish,
    ReasonCode,
)


def connected(max_packet_size: int | None = None) -> MqttCodec:
    server = MqttCodec() if max_packet_size is None else MqttCodec(max_packet_size=max_packet_size)
    client = MqttCodec(server_side=False)
    assert server.receive_data(client.encode(Connect("c", protocol_level=MQTT_3_1_1)))
    return server


def publish_bytes(payload: bytes, packet_id: int = 1) -> bytes:
    client = MqttCodec(server_side=False)
    client.protocol_level = MQTT_3_1_1
    return client.encode(Publish("t/large", payload, 1, packet_id=packet_id))


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("payload_size", [64 * 1024, 1024 * 1024])
def test_a_large_publish_in_small_chunks_keeps_each_chunk_as_received_and_is_joined_once(payload_size):
    payload = bytes(range(256)) * (payload_size // 256)
    chunks = chunks_of(publish_bytes(payload), 1460)  # one TCP segment's worth at a time
    codec = connected()
    received = 0
    for chunk in chunks[:-1]:
        assert codec.receive_data(chunk) == []
        received += len(chunk)
        # linear: each chunk is appended by reference (the same object), nothing before it is copied again
        assert codec.buffered == received
        assert codec._pending[-1] is chunk
        assert len(codec._pending) == received // 1460 + (received % 1460 > 0)
    (packet,) = codec.receive_data(chunks[-1])
    assert packet.payload == payload and packet.packet_id == 1
    assert codec.buffered == 0 and codec._pending == []


def test_a_64_kib_publish_byte_by_byte_is_decoded_once_complete():
    payload = b"x" * (64 * 1024)
    data = publish_bytes(payload)
    codec = connected()
    for i in range(len(data) - 1):
        assert codec.receive_data(data[i:i + 1]) == []
    assert codec.buffered == len(data) - 1
    (packet,) = codec.receive_data(data[-1:])
    assert packet.payload == payload


def test_packets_after_a_completed_large_packet_in_the_same_read_are_decoded_from_that_read():
    first, second, third = (publish_bytes(bytes([n]) * 70_000, packet_id=n) for n in (1, 2, 3))
    ack = MqttCodec(server_side=False)
    ack.protocol_level = MQTT_3_1_1
    puback = ack.encode(Puback(9))
    stream = first + puback + second + third
    codec = connected()
    assert codec.receive_data(stream[:50_000]) == []
    # completes the first packet, carries the PUBACK, the whole second packet and half of the third
    cut = len(first) + len(puback) + len(second) + 35_000
    packets = codec.receive_data(stream[50_000:cut])
    assert [type(p) for p in packets] == [Publish, Puback, Publish]
    assert [p.packet_id for p in packets] == [1, 9, 2]
    assert packets[0].payload == b"\x01" * 70_000 and packets[2].payload == b"\x02" * 70_000
    assert codec.buffered == 35_000
    (last,) = codec.receive_data(stream[cut:])
    assert last.payload == b"\x03" * 70_000 and codec.buffered == 0


def test_a_long_tail_is_kept_as_a_view_of_the_read_and_a_short_one_is_copied():
    big = publish_bytes(b"b" * 100_000)
    small = publish_bytes(b"s" * 100)
    codec = connected()
    read = small + big[:90_000]  # the tail is nearly all of the read: a view, no copy
    assert len(codec.receive_data(read)) == 1
    (view,) = codec._pending
    assert isinstance(view, memoryview) and view.obj is read and len(view) == 90_000
    assert codec.receive_data(big[90_000:])[0].payload == b"b" * 100_000

    codec = connected()
    read = big + small[:10]  # a 10-byte tail would pin 100 KiB: copied
    assert len(codec.receive_data(read)) == 1
    (tail,) = codec._pending
    assert tail.__class__ is bytes and tail == small[:10]
    assert codec.receive_data(small[10:])[0].payload == b"s" * 100


def test_a_fixed_header_split_over_reads_is_read_across_the_pending_chunks():
    data = publish_bytes(b"h" * 300_000)  # a 4-byte remaining length
    codec = connected()
    for byte in data[:3]:
        assert codec.receive_data(bytes([byte])) == []
    assert codec.buffered == 3
    assert codec.receive_data(data[3:200_000]) == []
    assert codec._pending_needed == len(data)
    (packet,) = codec.receive_data(data[200_000:])
    assert packet.payload == b"h" * 300_000


def test_a_packet_over_the_maximum_size_is_refused_when_its_header_completes_across_reads():
    codec = connected(max_packet_size=64 * 1024)
    data = publish_bytes(b"z" * 100_000)
    assert codec.receive_data(data[:1]) == []  # the type byte alone says nothing yet
    with pytest.raises(MqttProtocolError) as refused:
        codec.receive_data(data[1:4])
    assert refused.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert codec.buffered == 1  # the body was never buffered


def test_a_fault_in_the_read_that_completes_a_packet_still_returns_that_packet_before_the_error():
    data = publish_bytes(b"e" * 80_000)
    codec = connected()
    assert codec.receive_data(data[:40_000]) == []
    with pytest.raises(MqttProtocolError) as fault:
        codec.receive_data(data[40_000:] + b"\x00\x00")  # packet type 0 is reserved
    assert [p.payload for p in fault.value.packets_before_error] == [b"e" * 80_000]
    with pytest.raises(MqttProtocolError):
        codec.receive_data(b"\xc0\x00")  # the codec stays failed
