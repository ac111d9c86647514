"""Bad input: every fault raises a typed codec error carrying the AMQP reply code, before bytes pile up; hypothesis
fuzzing finds no other exception."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands

from tidegate.adapters.amqp.codec import (
    FRAME_MIN_SIZE,
    PROTOCOL_HEADER,
    AmqpClientCodec,
    AmqpEncodeError,
    AmqpProtocolError,
    AmqpServerCodec,
    ContentEvent,
    ContentRejectedEvent,
    HeartbeatEvent,
    MethodEvent,
    ProtocolHeaderMismatch,
    ReplyCode,
)

from .helpers import client_codec, open_server_codec


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


HEARTBEAT = frame(8, 0, b"")
CLIENT = AmqpClientCodec()
PUBLISH_FRAMES = CLIENT.send_content(1, commands.Basic.Publish(routing_key="q"), commands.Basic.Properties(), b"abc")
PUBLISH_METHOD = frame(1, 1, b"\x00\x3c\x00\x28\x00\x00\x00\x01q\x00")
PUBLISH_HEADER = frame(2, 1, struct.pack(">HHQ", 60, 0, 3) + b"\x00\x00")
PUBLISH_BODY = frame(3, 1, b"abc")
assert PUBLISH_FRAMES == PUBLISH_METHOD + PUBLISH_HEADER + PUBLISH_BODY


def receive_error(data: bytes, codec: AmqpServerCodec | None = None) -> AmqpProtocolError:
    codec = codec or open_server_codec()
    with pytest.raises(AmqpProtocolError) as caught:
        codec.receive_data(data)
    assert caught.value.blame == "peer"
    return caught.value


# ---------------------------------------------------------------- protocol header


@pytest.mark.parametrize(
    "opening",
    [b"AMQP\x01\x01\x00\x09", b"AMQP\x00\x00\x09\x00", b"GET / HTTP/1.1\r\n", b"\x01\x00\x00"],
    ids=["amqp-0-9", "amqp-0-9-0", "http", "frame-without-header"],
)
def test_wrong_protocol_header_asks_for_the_0_9_1_header_back_and_a_close(opening):
    codec = AmqpServerCodec()
    with pytest.raises(ProtocolHeaderMismatch) as caught:
        codec.receive_data(opening)
    assert caught.value.reply_header == PROTOCOL_HEADER == b"AMQP\x00\x00\x09\x01"


def test_wrong_protocol_header_is_detected_at_its_first_wrong_byte_without_waiting_for_eight():
    codec = AmqpServerCodec()
    assert codec.receive_data(b"AM") == []
    with pytest.raises(ProtocolHeaderMismatch):
        codec.receive_data(b"X")


def test_codec_refuses_input_after_a_wrong_protocol_header():
    codec = AmqpServerCodec()
    with pytest.raises(ProtocolHeaderMismatch):
        codec.receive_data(b"HTTP")
    with pytest.raises(ProtocolHeaderMismatch):
        codec.receive_data(PROTOCOL_HEADER)


# ---------------------------------------------------------------- framing (501 FRAME_ERROR)


def test_frame_over_frame_max_is_frame_error_from_its_header_alone():
    """Only the 7-byte header of an oversized frame is read: the error comes before any of its payload arrives."""
    header = struct.pack(">BHI", 3, 1, FRAME_MIN_SIZE - 7)  # one octet over frame-max 4096 with header and end
    error = receive_error(header)
    assert error.reply_code == ReplyCode.FRAME_ERROR
    assert "frame-max" in error.reply_text


def test_frame_exactly_at_frame_max_is_accepted():
    codec = open_server_codec()
    codec.receive_data(PUBLISH_METHOD + frame(2, 1, struct.pack(">HHQ", 60, 0, FRAME_MIN_SIZE - 8) + b"\x00\x00"))
    [event] = codec.receive_data(frame(3, 1, b"x" * (FRAME_MIN_SIZE - 8)))
    assert len(event.body) == FRAME_MIN_SIZE - 8


def test_buffer_never_holds_more_than_one_frame_max():
    """A frame arriving in pieces is buffered up to its own size (checked against frame-max), never beyond."""
    codec = open_server_codec()
    codec.receive_data(PUBLISH_METHOD + frame(2, 1, struct.pack(">HHQ", 60, 0, 100_000) + b"\x00\x00"))
    body_frame = frame(3, 1, b"y" * (FRAME_MIN_SIZE - 8))
    for _ in range(3):
        for start in range(0, len(body_frame), 1000):
            codec.receive_data(body_frame[start : start + 1000])
            assert codec.buffered_bytes <= FRAME_MIN_SIZE


def test_wrong_frame_end_octet_is_frame_error():
    error = receive_error(HEARTBEAT[:-1] + b"\x00")
    assert error.reply_code == ReplyCode.FRAME_ERROR
    assert "frame-end" in error.reply_text


def test_unknown_frame_type_is_frame_error_from_its_header_alone():
    error = receive_error(struct.pack(">BHI", 4, 0, 10))
    assert error.reply_code == ReplyCode.FRAME_ERROR
    assert "unknown frame type 4" in error.reply_text


def test_heartbeat_on_a_channel_other_than_zero_is_frame_error():
    """Spec 4.2.7: heartbeat frames use channel 0; an invalid heartbeat is a 501 connection exception."""
    error = receive_error(frame(8, 1, b""))
    assert error.reply_code == ReplyCode.FRAME_ERROR
    assert error.channel == 1


def test_heartbeat_with_a_payload_is_frame_error():
    assert receive_error(frame(8, 0, b"x")).reply_code == ReplyCode.FRAME_ERROR


# ---------------------------------------------------------------- methods (502, 540)


def test_unknown_class_is_not_implemented():
    error = receive_error(frame(1, 1, b"\x00\x63\x00\x0a"))
    assert (error.reply_code, error.class_id, error.method_id) == (ReplyCode.NOT_IMPLEMENTED, 99, 10)


def test_unknown_method_of_a_known_class_is_not_implemented():
    error = receive_error(frame(1, 1, b"\x00\x3c\x00\x63"))
    assert (error.reply_code, error.class_id, error.method_id) == (ReplyCode.NOT_IMPLEMENTED, 60, 99)


def test_method_frame_shorter_than_its_ids_is_syntax_error():
    assert receive_error(frame(1, 1, b"\x00\x3c")).reply_code == ReplyCode.SYNTAX_ERROR


@pytest.mark.parametrize(
    "arguments",
    [b"\x00\x00\x05ab", b"\x00\x00\x00\x01q", b"\x00\x00\x00\x01q\x00extra", b"\x00\x00\x02\xff\xfe\x00\x00"],
    ids=["truncated-exchange", "missing-flags", "trailing-bytes", "invalid-utf8"],
)
def test_malformed_publish_arguments_are_syntax_error(arguments):
    error = receive_error(frame(1, 1, b"\x00\x3c\x00\x28" + arguments))
    assert (error.reply_code, error.class_id, error.method_id) == (ReplyCode.SYNTAX_ERROR, 60, 40)


def test_malformed_table_in_generic_method_is_syntax_error():
    """Queue.Declare whose arguments table announces more bytes than the frame holds."""
    payload = b"\x00\x32\x00\x0a\x00\x00\x01q\x00" + struct.pack(">I", 500) + b"\x01k"
    error = receive_error(frame(1, 1, payload))
    assert (error.reply_code, error.class_id, error.method_id) == (ReplyCode.SYNTAX_ERROR, 50, 10)


def test_malformed_content_header_properties_are_syntax_error():
    # content-type flag set but the short string is missing
    error = receive_error(PUBLISH_METHOD + frame(2, 1, struct.pack(">HHQ", 60, 0, 3) + b"\x80\x00"))
    assert error.reply_code == ReplyCode.SYNTAX_ERROR


def test_content_header_with_continued_property_flags_is_syntax_error():
    """Basic has 14 properties, one flag word; a continuation bit announces properties that do not exist."""
    error = receive_error(PUBLISH_METHOD + frame(2, 1, struct.pack(">HHQ", 60, 0, 3) + b"\x00\x01\x00\x00"))
    assert (error.reply_code, error.class_id, error.method_id) == (ReplyCode.SYNTAX_ERROR, 60, 40)


# ---------------------------------------------------------------- content assembly (505)


def test_content_header_without_a_content_method_is_unexpected_frame():
    assert receive_error(PUBLISH_HEADER).reply_code == ReplyCode.UNEXPECTED_FRAME


def test_body_frame_without_a_content_method_is_unexpected_frame():
    assert receive_error(PUBLISH_BODY).reply_code == ReplyCode.UNEXPECTED_FRAME


def test_body_frame_before_the_content_header_is_unexpected_frame():
    error = receive_error(PUBLISH_METHOD + PUBLISH_BODY)
    assert (error.reply_code, error.channel, error.class_id, error.method_id) == (ReplyCode.UNEXPECTED_FRAME, 1, 0, 0)


def test_method_frame_before_content_is_complete_is_unexpected_frame():
    error = receive_error(PUBLISH_METHOD + PUBLISH_HEADER + CLIENT.send_method(1, commands.Basic.Ack(1)))
    assert (error.reply_code, error.class_id, error.method_id) == (ReplyCode.UNEXPECTED_FRAME, 60, 40)


def test_second_content_header_is_unexpected_frame():
    assert receive_error(PUBLISH_METHOD + PUBLISH_HEADER + PUBLISH_HEADER).reply_code == ReplyCode.UNEXPECTED_FRAME


def test_body_frames_beyond_the_announced_size_are_unexpected_frame():
    error = receive_error(PUBLISH_METHOD + PUBLISH_HEADER + frame(3, 1, b"abcd"))
    assert error.reply_code == ReplyCode.UNEXPECTED_FRAME


def test_content_header_of_another_class_is_unexpected_frame():
    error = receive_error(PUBLISH_METHOD + frame(2, 1, struct.pack(">HHQ", 50, 0, 3) + b"\x00\x00"))
    assert error.reply_code == ReplyCode.UNEXPECTED_FRAME


def test_content_of_another_channel_does_not_complete_a_pending_one():
    error = receive_error(PUBLISH_METHOD + PUBLISH_HEADER + frame(3, 2, b"abc"))
    assert (error.reply_code, error.channel) == (ReplyCode.UNEXPECTED_FRAME, 2)


# ---------------------------------------------------------------- after an error


def test_events_before_the_fault_in_the_same_read_travel_on_the_error():
    error = receive_error(HEARTBEAT + PUBLISH_FRAMES + PUBLISH_BODY)
    assert [type(event) for event in error.events_before_error] == [HeartbeatEvent, ContentEvent]


def test_codec_refuses_further_input_after_a_protocol_error():
    codec = open_server_codec()
    receive_error(HEARTBEAT[:-1] + b"\x00", codec)
    error = receive_error(HEARTBEAT, codec)
    assert error.reply_code == ReplyCode.FRAME_ERROR
    assert "already failed" in error.reply_text


# ---------------------------------------------------------------- bodies over max_body_size (406, channel-level)


def test_body_over_max_body_size_is_rejected_at_the_header_and_its_frames_dropped():
    codec = open_server_codec(max_body_size=4)
    big_header = frame(2, 1, struct.pack(">HHQ", 60, 0, 10) + b"\x00\x00")
    [rejected] = codec.receive_data(PUBLISH_METHOD + big_header)
    assert isinstance(rejected, ContentRejectedEvent)
    assert (rejected.channel, rejected.body_size, rejected.reply_code) == (1, 10, ReplyCode.PRECONDITION_FAILED)
    # The body frames that follow are consumed without being kept, and the channel carries on afterwards.
    assert codec.receive_data(frame(3, 1, b"x" * 6)) == []
    events = codec.receive_data(frame(3, 1, b"x" * 4) + PUBLISH_FRAMES)
    assert [event.body for event in events] == [b"abc"]


def test_method_after_rejected_content_abandons_the_rest_of_its_body():
    """A client told to close the channel may stop sending the rejected body and answer Channel.CloseOk."""
    codec = open_server_codec(max_body_size=4)
    codec.receive_data(PUBLISH_METHOD + frame(2, 1, struct.pack(">HHQ", 60, 0, 10) + b"\x00\x00") + frame(3, 1, b"x"))
    [event] = codec.receive_data(CLIENT.send_method(1, commands.Channel.CloseOk()))
    assert isinstance(event, MethodEvent)
    assert event.method.name == "Channel.CloseOk"


# ---------------------------------------------------------------- frame-max negotiation


def test_tune_ok_raises_the_frame_limit_for_frames_later_in_the_same_read():
    server = open_server_codec()
    server.send_method(0, commands.Connection.Tune(channel_max=10, frame_max=131072, heartbeat=60))
    big_body = frame(3, 1, b"z" * 100_000)
    data = (
        CLIENT.send_method(0, commands.Connection.TuneOk(channel_max=10, frame_max=131072, heartbeat=60))
        + PUBLISH_METHOD + frame(2, 1, struct.pack(">HHQ", 60, 0, 100_000) + b"\x00\x00") + big_body
    )  # fmt: skip
    events = server.receive_data(data)
    assert isinstance(events[0], MethodEvent)
    assert len(events[1].body) == 100_000
    assert server.frame_max == 131072


def test_tune_ok_with_a_larger_frame_max_than_offered_keeps_the_offer():
    server = open_server_codec()
    server.send_method(0, commands.Connection.Tune(frame_max=8192))
    server.receive_data(CLIENT.send_method(0, commands.Connection.TuneOk(frame_max=1 << 20)))
    assert server.frame_max == 8192


def test_tune_ok_with_zero_frame_max_accepts_the_offer():
    server = open_server_codec()
    server.send_method(0, commands.Connection.Tune(frame_max=65536))
    # Built by hand: our client codec never settles on unbounded frames, other clients may.
    server.receive_data(frame(1, 0, b"\x00\x0a\x00\x1f" + struct.pack(">HIH", 0, 0, 0)))
    assert server.frame_max == 65536


def test_server_never_offers_unbounded_frames():
    with pytest.raises(AmqpEncodeError) as caught:
        AmqpServerCodec().send_method(0, commands.Connection.Tune(frame_max=0))
    assert caught.value.blame == "local"


def test_frame_max_below_the_protocol_minimum_is_refused():
    with pytest.raises(ValueError):
        AmqpServerCodec(frame_max=1024)


# ---------------------------------------------------------------- encoding errors are ours


def altered(value, **attributes):
    """A pamqp object changed after construction, past the checks its constructor runs."""
    for name, attribute in attributes.items():
        setattr(value, name, attribute)
    return value


@pytest.mark.parametrize(
    "action",
    [
        lambda codec: codec.send_method(1, commands.Basic.Publish()),
        lambda codec: codec.send_content(1, commands.Basic.Ack(), commands.Basic.Properties(), b""),
        lambda codec: codec.send_method(70000, commands.Basic.Ack()),
        lambda codec: codec.send_content(0, commands.Basic.Publish(), commands.Basic.Properties(), b""),
        lambda codec: codec.send_content(1, commands.Basic.Publish(), commands.Basic.Properties(), b"", 100),
        lambda codec: codec.send_content(1, commands.Basic.Deliver("t" * 300, 1), commands.Basic.Properties(), b""),
        lambda codec: codec.send_content(1, commands.Basic.Deliver("t", -1), commands.Basic.Properties(), b""),
        lambda codec: codec.send_content(
            1, commands.Basic.Publish(), commands.Basic.Properties(headers={"h": "v" * 5000}), b""
        ),
        lambda codec: codec.send_method(1, altered(commands.Queue.Declare(), queue="q" * 300)),
        lambda codec: codec.send_content(
            1, commands.Basic.Publish(), altered(commands.Basic.Properties(), delivery_mode=7), b""
        ),
    ],
    ids=[
        "content-method-without-content", "content-for-plain-method", "channel-out-of-range", "content-on-channel-0",
        "frame-max-below-minimum", "consumer-tag-over-255", "negative-delivery-tag", "header-over-frame-max",
        "queue-name-over-255", "invalid-delivery-mode",
    ],
)  # fmt: skip
def test_what_amqp_cannot_carry_is_an_encode_error_blaming_our_side(action):
    with pytest.raises(AmqpEncodeError) as caught:
        action(AmqpServerCodec())
    assert caught.value.blame == "local"


# ---------------------------------------------------------------- fuzzing


FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_only_codec_errors(codec: AmqpServerCodec, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            codec.receive_data(chunk)
        except AmqpProtocolError:
            return
        assert codec.buffered_bytes <= codec.frame_max


@FUZZ_SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes_after_a_valid_header_raise_only_codec_errors(chunks):
    assert_only_codec_errors(open_server_codec(), chunks)


METHOD_IDS = st.sampled_from(sorted(commands.INDEX_MAPPING)).map(lambda index: struct.pack(">I", index))
FRAMES = st.one_of(
    # method frames with a real class and method id and random arguments: pamqp's argument decoders see garbage
    st.tuples(st.integers(0, 3), METHOD_IDS, st.binary(max_size=200)).map(
        lambda parts: frame(1, parts[0], parts[1] + parts[2])
    ),
    # content headers with a real Basic class id and random flags and property bytes
    st.tuples(st.integers(0, 3), st.integers(0, 50), st.binary(max_size=200)).map(
        lambda parts: frame(2, parts[0], struct.pack(">HHQ", 60, 0, parts[1]) + parts[2])
    ),
    st.tuples(st.integers(0, 3), st.binary(max_size=60)).map(lambda parts: frame(3, parts[0], parts[1])),
    st.just(HEARTBEAT),
    st.just(PUBLISH_METHOD),
    st.binary(max_size=20),
)


@FUZZ_SETTINGS
@given(st.lists(FRAMES, max_size=8), st.integers(1, 64))
def test_well_framed_random_payloads_raise_only_codec_errors(frames, chunk_size):
    data = b"".join(frames)
    assert_only_codec_errors(open_server_codec(), [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)])


@FUZZ_SETTINGS
@given(st.lists(FRAMES, max_size=8))
def test_client_codec_also_raises_only_codec_errors(frames):
    codec = client_codec()
    try:
        codec.receive_data(b"".join(frames))
    except AmqpProtocolError:
        pass


def test_deeply_nested_table_is_a_syntax_error_not_a_recursion_crash():
    """Nested field tables, each one level deeper, until pamqp's recursive decoder would overflow the stack."""
    table = b""
    for _ in range(2000):
        table = struct.pack(">I", len(table) + 3) + b"\x01kF" + table if table else struct.pack(">I", 0)
    payload = b"\x00\x32\x00\x0a\x00\x00\x01q\x00" + table
    codec = open_server_codec()
    codec.set_frame_max(1 << 20)
    assert receive_error(frame(1, 1, payload), codec).reply_code == ReplyCode.SYNTAX_ERROR
