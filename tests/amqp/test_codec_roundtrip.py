"""Hypothesis round trips: content with random properties, bodies and frame-max survives encode and decode split at
any point; the hand-tuned Basic.Publish decoder and Basic.Deliver encoder agree with pamqp's generic marshalling."""

from __future__ import annotations

import datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header

from tidegate.adapters.amqp.codec import FRAME_MIN_SIZE, AmqpServerCodec, ContentEvent
from tidegate.adapters.amqp.fastpath import (
    decode_basic_properties,
    decode_basic_publish,
    encode_basic_deliver_frame,
    encode_basic_properties,
)

from .helpers import client_codec, method_fields, open_server_codec

SETTINGS = settings(max_examples=150, deadline=None)

# Short strings pamqp encodes: non-empty (an empty property is "absent" on the wire), at most 255 UTF-8 bytes.
short_text = st.text(min_size=1, max_size=40).filter(lambda text: len(text.encode()) <= 255)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.:", max_size=60)
table_keys = st.text(min_size=1, max_size=12).filter(lambda text: len(text.encode()) <= 128)
table_values = st.recursive(
    st.one_of(
        st.text(max_size=30), st.booleans(), st.integers(-(2**31), 2**31 - 1), st.none(),
    ),
    lambda children: st.dictionaries(table_keys, children, max_size=3) | st.lists(children, max_size=3),
    max_leaves=8,
)  # fmt: skip
timestamps = st.integers(0, 2**32 - 1).map(lambda seconds: datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC))


@st.composite
def basic_properties(draw: st.DrawFn) -> commands.Basic.Properties:
    maybe = lambda strategy: draw(st.none() | strategy)  # noqa: E731
    return commands.Basic.Properties(
        content_type=maybe(short_text),
        content_encoding=maybe(short_text),
        headers=maybe(st.dictionaries(table_keys, table_values, max_size=5)),
        delivery_mode=maybe(st.sampled_from([1, 2])),
        priority=maybe(st.integers(0, 9)),
        correlation_id=maybe(short_text),
        reply_to=maybe(short_text),
        expiration=maybe(st.integers(0, 10**9).map(str)),
        message_id=maybe(short_text),
        timestamp=maybe(timestamps),
        message_type=maybe(short_text),
        user_id=maybe(short_text),
        app_id=maybe(short_text),
    )


def shortstr(text: str) -> bytes:
    return bytes((len(text.encode()),)) + text.encode()


def frame_sizes(data: bytes) -> list[int]:
    """The total size (header, payload, frame-end) of each frame in `data`."""
    sizes, position = [], 0
    while position < len(data):
        size = int.from_bytes(data[position + 3 : position + 7], "big") + 8
        sizes.append(size)
        position += size
    return sizes


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in zip(points, points[1:], strict=False)]


@SETTINGS
@given(
    properties=basic_properties(),
    body=st.binary(max_size=20_000),
    frame_max=st.integers(FRAME_MIN_SIZE, 3 * FRAME_MIN_SIZE),
    channel=st.integers(1, 0xFFFF),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
    exchange=names,
    routing_key=st.text(max_size=50).filter(lambda text: len(text.encode()) <= 255),
    mandatory=st.booleans(),
)
def test_publish_with_random_properties_body_and_frame_max_round_trips(
    properties, body, frame_max, channel, cuts, exchange, routing_key, mandatory
):
    publish = commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    data = client_codec().send_content(channel, publish, properties, body, frame_max)
    server = open_server_codec(frame_max=frame_max)
    events = []
    for piece in split_at(data, cuts):
        events += server.receive_data(piece)
        assert server.buffered_bytes <= frame_max
    [event] = events
    assert isinstance(event, ContentEvent)
    assert (event.channel, event.body) == (channel, body)
    assert method_fields(event.method) == method_fields(publish)
    assert method_fields(event.properties) == method_fields(properties)
    # Every frame fits frame-max; the body frames are full ones of frame_max - 8 octets but the last.
    sizes = frame_sizes(data)
    assert max(sizes) <= frame_max
    body_sizes = sizes[2:]
    assert sum(body_sizes) - 8 * len(body_sizes) == len(body)
    assert all(size == frame_max for size in body_sizes[:-1])


@SETTINGS
@given(
    properties=basic_properties(),
    body=st.binary(max_size=20_000),
    frame_max=st.integers(FRAME_MIN_SIZE, 3 * FRAME_MIN_SIZE),
    delivery_tag=st.integers(0, 2**63 - 1),
    redelivered=st.booleans(),
    consumer_tag=st.text(max_size=60).filter(lambda text: len(text.encode()) <= 255),
    exchange=names,
    routing_key=st.text(max_size=50).filter(lambda text: len(text.encode()) <= 255),
)
def test_deliver_with_random_properties_body_and_frame_max_round_trips_to_a_client(
    properties, body, frame_max, delivery_tag, redelivered, consumer_tag, exchange, routing_key
):
    deliver = commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    data = AmqpServerCodec().send_content(7, deliver, properties, body, frame_max)
    client = client_codec(frame_max=frame_max)
    [event] = client.receive_data(data)
    assert method_fields(event.method) == method_fields(deliver)
    assert method_fields(event.properties) == method_fields(properties)
    assert event.body == body


@SETTINGS
@given(
    exchange=st.text(max_size=80).filter(lambda text: len(text.encode()) <= 255),
    routing_key=st.text(max_size=80).filter(lambda text: len(text.encode()) <= 255),
    mandatory=st.booleans(),
    immediate=st.booleans(),
)
def test_fast_publish_decoder_agrees_with_pamqp(exchange, routing_key, mandatory, immediate):
    # Built by hand: pamqp's encoder would refuse exchange names RabbitMQ refuses, the decoder must not care.
    payload = (b"\x00\x3c\x00\x28\x00\x00" + shortstr(exchange) + shortstr(routing_key)
               + bytes((mandatory | immediate << 1,)))  # fmt: skip
    generic = commands.Basic.Publish()
    generic.unmarshal(payload[4:])
    assert method_fields(decode_basic_publish(payload)) == method_fields(generic)


@SETTINGS
@given(
    delivery_tag=st.integers(0, 2**63 - 1),
    redelivered=st.booleans(),
    consumer_tag=st.text(max_size=80).filter(lambda text: len(text.encode()) <= 255),
    exchange=names,
    routing_key=st.text(max_size=80).filter(lambda text: len(text.encode()) <= 255),
    channel=st.integers(0, 0xFFFF),
)
def test_fast_deliver_encoder_agrees_with_pamqp(
    delivery_tag, redelivered, consumer_tag, exchange, routing_key, channel
):
    deliver = commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    assert encode_basic_deliver_frame(channel, deliver) == frame.marshal(deliver, channel)


@SETTINGS
@given(properties=basic_properties(), body=st.binary(max_size=5000))
def test_raw_properties_from_a_publish_are_delivered_byte_for_byte(properties, body):
    """The property bytes a publisher sent reach the consumer unchanged, without being re-marshalled."""
    publish_data = client_codec().send_content(1, commands.Basic.Publish(routing_key="q"), properties, body)
    [published] = open_server_codec().receive_data(publish_data)
    deliver = commands.Basic.Deliver("ctag", 1, False, "", "q")
    delivered = AmqpServerCodec().send_content(2, deliver, published.raw_properties, published.body)
    [received] = client_codec().receive_data(delivered)
    assert received.raw_properties == published.raw_properties == properties.marshal()
    assert received.body == body


@SETTINGS
@given(properties=basic_properties())
def test_fast_properties_encoder_agrees_with_pamqp(properties):
    assert encode_basic_properties(properties) == properties.marshal()


@SETTINGS
@given(properties=basic_properties())
def test_fast_properties_decoder_agrees_with_pamqp(properties):
    raw = properties.marshal()
    generic = header.ContentHeader()
    generic.unmarshal(b"\x00\x3c\x00\x00" + bytes(8) + raw)
    assert method_fields(decode_basic_properties(raw)) == method_fields(generic.properties)
