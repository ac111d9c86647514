"""Byte fixtures hand-assembled from the AMQP 0-9-1 specification, decoded by the server codec three ways (whole, one
byte at a time, and followed by the start of the next frame, in the manner of h11's tests/test_io.py) and re-encoded
by a client codec to the same bytes."""

from __future__ import annotations

import datetime
import struct

import pytest
from pamqp import commands

from tidegate.adapters.amqp.codec import (
    PROTOCOL_HEADER,
    AmqpServerCodec,
    ContentEvent,
    HeartbeatEvent,
    ProtocolHeaderEvent,
)

from .helpers import client_codec, describe_all, method_fields, open_server_codec


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def shortstr(text: str) -> bytes:
    return bytes((len(text),)) + text.encode()


def longstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


# Connection.StartOk: class 10 method 11, empty client-properties table, mechanism, SASL PLAIN response, locale.
START_OK = frame(1, 0, b"\x00\x0a\x00\x0b" + longstr(b"") + shortstr("PLAIN") + longstr(b"\x00guest\x00guest")
                 + shortstr("en_US"))  # fmt: skip
# Connection.TuneOk: channel-max 2047, frame-max 131072, heartbeat 60.
TUNE_OK = frame(1, 0, b"\x00\x0a\x00\x1f" + struct.pack(">HIH", 2047, 131072, 60))
# Channel.Open on channel 1 with its reserved (empty) out-of-band short string.
CHANNEL_OPEN = frame(1, 1, b"\x00\x14\x00\x0a" + shortstr(""))
# Basic.Ack of delivery tag 8 with multiple set.
BASIC_ACK = frame(1, 1, b"\x00\x3c\x00\x50" + struct.pack(">QB", 8, 1))
HEARTBEAT = frame(8, 0, b"")
# Basic.Publish to amq.topic, routing key a.b, mandatory; a content header with content-type and delivery-mode
# (flags 0x9000); then the body in two frames.
PUBLISH = frame(1, 1, b"\x00\x3c\x00\x28\x00\x00" + shortstr("amq.topic") + shortstr("a.b") + b"\x01")
PUBLISH_PROPERTIES = b"\x90\x00" + shortstr("text/plain") + b"\x02"
PUBLISH_HEADER = frame(2, 1, struct.pack(">HHQ", 60, 0, 11) + PUBLISH_PROPERTIES)
PUBLISH_BODY = frame(3, 1, b"hello") + frame(3, 1, b" world")
PUBLISH_CONTENT = PUBLISH + PUBLISH_HEADER + PUBLISH_BODY
# A content header with timestamp and a headers table holding a long string, a signed 32-bit int and a boolean.
HEADERS_TABLE = (
    shortstr("s") + b"S" + longstr(b"v") + shortstr("i") + b"I" + struct.pack(">i", -5) + shortstr("t") + b"t\x01"
)
PUBLISH_WITH_HEADERS = (
    frame(1, 2, b"\x00\x3c\x00\x28\x00\x00" + shortstr("") + shortstr("q") + b"\x00")
    + frame(2, 2, struct.pack(">HHQ", 60, 0, 0) + b"\x20\x40" + longstr(HEADERS_TABLE)
            + struct.pack(">Q", 1_700_000_000))
)  # fmt: skip

FIXTURES = {
    "connection.start-ok": (START_OK, [("method", 0, ("Connection.StartOk", {
        "client_properties": {}, "mechanism": "PLAIN", "response": "\x00guest\x00guest", "locale": "en_US"}))]),
    "connection.tune-ok": (TUNE_OK, [("method", 0, ("Connection.TuneOk", {
        "channel_max": 2047, "frame_max": 131072, "heartbeat": 60}))]),
    "channel.open": (CHANNEL_OPEN, [("method", 1, ("Channel.Open", {"out_of_band": ""}))]),
    "basic.ack": (BASIC_ACK, [("method", 1, ("Basic.Ack", {"delivery_tag": 8, "multiple": True}))]),
    "heartbeat": (HEARTBEAT, [("HeartbeatEvent",)]),
}  # fmt: skip


def expected(name: str) -> list[tuple[object, ...]]:
    return FIXTURES[name][1]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_decodes_whole(name):
    codec = open_server_codec()
    assert describe_all(codec.receive_data(FIXTURES[name][0])) == expected(name)
    assert codec.buffered_bytes == 0


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_decodes_one_byte_at_a_time(name):
    codec = open_server_codec()
    data = FIXTURES[name][0]
    events = []
    for index in range(len(data)):
        events += codec.receive_data(data[index : index + 1])
    assert describe_all(events) == expected(name)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_decodes_with_trailing_data_kept_for_the_next_call(name):
    """The start of the next frame after a fixture stays buffered and completes on the next call."""
    codec = open_server_codec()
    data = FIXTURES[name][0]
    assert describe_all(codec.receive_data(data + HEARTBEAT[:5])) == expected(name)
    assert codec.buffered_bytes == 5
    assert codec.receive_data(HEARTBEAT[5:]) == [HeartbeatEvent()]


# pika sends Channel.Open's reserved argument empty; pamqp's encoder insists on "0", so only decoding is checked for it
# (the server never sends Channel.Open).
@pytest.mark.parametrize("name", sorted(set(FIXTURES) - {"channel.open"}))
def test_fixture_reencodes_to_the_same_bytes(name):
    if name == "heartbeat":
        assert client_codec().send_heartbeat() == HEARTBEAT
        return
    [event] = open_server_codec().receive_data(FIXTURES[name][0])
    assert client_codec().send_method(event.channel, event.method) == FIXTURES[name][0]


def publish_events(events):
    [event] = events
    assert isinstance(event, ContentEvent)
    assert method_fields(event.method) == ("Basic.Publish", {
        "ticket": 0, "exchange": "amq.topic", "routing_key": "a.b", "mandatory": True, "immediate": False})  # fmt: skip
    assert event.properties.content_type == "text/plain"
    assert event.properties.delivery_mode == 2
    assert event.body == b"hello world"
    assert event.raw_properties == PUBLISH_PROPERTIES
    return event


def test_publish_content_decodes_whole_into_one_event():
    publish_events(open_server_codec().receive_data(PUBLISH_CONTENT))


def test_publish_content_decodes_one_byte_at_a_time():
    codec = open_server_codec()
    events = []
    for index in range(len(PUBLISH_CONTENT)):
        events += codec.receive_data(PUBLISH_CONTENT[index : index + 1])
    publish_events(events)


def test_publish_content_completes_only_with_its_last_body_frame():
    codec = open_server_codec()
    assert codec.receive_data(PUBLISH + PUBLISH_HEADER + frame(3, 1, b"hello")) == []
    publish_events(codec.receive_data(frame(3, 1, b" world") + HEARTBEAT[:3]))
    assert codec.buffered_bytes == 3


def test_publish_content_reencodes_to_the_same_frames_with_a_small_enough_frame_max():
    """Split at frame_max - 8 octets per body frame: a 5-octet first chunk needs frame-max 13, below the protocol
    minimum, so the re-encoding is checked with one body frame instead."""
    event = publish_events(open_server_codec().receive_data(PUBLISH_CONTENT))
    encoded = client_codec().send_content(1, event.method, event.properties, event.body, 4096)
    assert encoded == PUBLISH + PUBLISH_HEADER + frame(3, 1, b"hello world")
    # The raw properties of the event go out byte for byte.
    assert client_codec().send_content(1, event.method, event.raw_properties, event.body, 4096) == encoded


def test_content_with_headers_table_and_timestamp_and_empty_body_decodes():
    """A content header announcing body-size 0 completes the content at once, with no body frame."""
    [event] = open_server_codec().receive_data(PUBLISH_WITH_HEADERS)
    assert isinstance(event, ContentEvent)
    assert event.channel == 2
    assert event.body == b""
    assert event.properties.headers == {"s": "v", "i": -5, "t": True}
    assert event.properties.timestamp == datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC)


def test_protocol_header_is_the_first_event_whole_or_byte_by_byte():
    assert AmqpServerCodec().receive_data(PROTOCOL_HEADER + HEARTBEAT) == [ProtocolHeaderEvent(), HeartbeatEvent()]
    codec = AmqpServerCodec()
    events = []
    for index in range(len(PROTOCOL_HEADER + HEARTBEAT)):
        events += codec.receive_data((PROTOCOL_HEADER + HEARTBEAT)[index : index + 1])
    assert events == [ProtocolHeaderEvent(), HeartbeatEvent()]


def test_several_frames_in_one_read_come_out_in_order():
    codec = AmqpServerCodec()
    data = PROTOCOL_HEADER + START_OK + TUNE_OK + CHANNEL_OPEN + PUBLISH_CONTENT + BASIC_ACK + HEARTBEAT
    events = codec.receive_data(data)
    assert [type(event).__name__ for event in events] == [
        "ProtocolHeaderEvent", "MethodEvent", "MethodEvent", "MethodEvent", "ContentEvent", "MethodEvent",
        "HeartbeatEvent",
    ]  # fmt: skip


def test_content_on_two_channels_may_interleave():
    """Content frames of one channel must not be interleaved with other frames of that channel, but channels are
    independent (spec 4.2.6)."""
    other_publish = PUBLISH.replace(b"\x01\x00\x01", b"\x01\x00\x03", 1)
    other_header = PUBLISH_HEADER.replace(b"\x02\x00\x01", b"\x02\x00\x03", 1)
    codec = open_server_codec()
    events = codec.receive_data(
        PUBLISH + other_publish + PUBLISH_HEADER + other_header + frame(3, 3, b"hello world") + PUBLISH_BODY
    )
    assert [(event.channel, event.body) for event in events] == [(3, b"hello world"), (1, b"hello world")]


def test_deliver_encodes_as_pamqp_frames_and_decodes_on_the_client_side():
    deliver = commands.Basic.Deliver("ctag", 42, True, "amq.topic", "a.b")
    properties = commands.Basic.Properties(content_type="text/plain", delivery_mode=2)
    encoded = AmqpServerCodec().send_content(1, deliver, properties, b"x" * 10_000, 4096)
    # Body split into frames of frame_max - 8 = 4088 octets.
    [event] = client_codec().receive_data(encoded)
    assert event.body == b"x" * 10_000
    assert method_fields(event.method) == method_fields(deliver)
    assert encoded.count(b"\x03\x00\x01\x00\x00\x0f\xf8") == 2  # two full 4088-octet body frames, then the rest
