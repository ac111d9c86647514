"""Native pass 2 of issue 10: DELIVER decoded straight into core `Delivered` values (`core_deliveries`), stored-shape
DELIVER and SEND_BATCH_OK encoded with one cached struct per record, the plain SEND_BATCH encoder, the inline
SEND_BATCH / SEND_BATCH_OK decoders and the slot setters. Each fast path gives exactly what the generic,
declaration-driven codec gives (bytes, values and errors)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.adapters.native import codec as codec_module
from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    DELIVER_TYPE,
    HEADER_SIZE,
    NativeCodec,
    Role,
    State,
    decode_body,
    encode_deliver,
    encode_frame,
    encode_plain_send_batch,
    encode_send_batch,
    encode_send_batch_ok,
)
from tidegate.adapters.native.fastpath import slot_setter
from tidegate.client.common import SendResult, delivered
from tidegate.client.deliveries import DeliveredBatch, core_deliver_decoder
from tidegate.core.api import Delivered
from tidegate.core.model import Message, QueueRef

from .test_native_fastpath import messages

TOPICS = ["orders", "orders", "%RETRY%g", "é"]
MSG_ID = "0A0B0C0D0E0F00010002000300040005"

# A stored message as the broker delivers it most of the time: only topic, msg_id and body.
stored_messages = st.builds(
    Message,
    topic=st.sampled_from(TOPICS),
    body=st.binary(max_size=64),
    born_ts=st.integers(0, 2**62),
    deliver_at=st.sampled_from([0, 5]),
    expires_at=st.sampled_from([0, 7]),
    flags=st.sampled_from([1, 2]),
    msg_id=st.sampled_from([MSG_ID, "é", "x" * 300]),
    store_ts=st.integers(0, 2**40),
)


@st.composite
def records(draw: st.DrawFn) -> f.DeliveryRecord:
    """DeliveryRecords of every shape, half of them the stored shape delivered from the message's own queue."""
    if draw(st.booleans()):
        message = draw(stored_messages)
        topic, receipt = message.topic, draw(st.sampled_from(["", "", "orders:3:17:1"]))
    else:
        message = draw(st.one_of(messages, stored_messages))
        topic, receipt = draw(st.sampled_from(TOPICS)), draw(st.sampled_from(["", "orders:3:17:1"]))
    return f.DeliveryRecord(topic=topic, queue_id=draw(st.integers(0, 2**32 - 1)),
                            queue_offset=draw(st.integers(-(2**63), 2**63 - 1)), receipt=receipt,
                            attempt=draw(st.integers(0, 0xFFFF)), message=message)


def open_codec(role: Role, core_deliveries: bool = False) -> NativeCodec:
    codec = NativeCodec(role, open_decoders={DELIVER_TYPE: core_deliver_decoder()} if core_deliveries else None)
    codec.state = State.OPEN
    return codec


def outcome(decode: object, *args: object) -> object:
    try:
        return decode(*args)  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - the outcome compared is the exception's class and text
        return type(exc).__name__, str(exc)


def generic_decode(cls: type[f.Frame], view: memoryview, end: int) -> f.Frame:
    """decode_body through the frame's SPEC, with the hand-written decoder of `cls` set aside."""
    fast = codec_module.FAST_DECODERS.pop(cls)
    try:
        return decode_body(cls, view, HEADER_SIZE, end, 0, 0)
    finally:
        codec_module.FAST_DECODERS[cls] = fast


def as_core(record: f.DeliveryRecord) -> Delivered:
    return delivered(record)


@given(st.lists(records(), max_size=6), st.integers(0, 2**32 - 1))
def test_core_deliveries_decode_to_the_delivered_values_of_the_generic_frame(batch: list[f.DeliveryRecord],
                                                                            sid: int) -> None:
    """A client codec with core_deliveries turns a DELIVER into a DeliveredBatch whose values are the generic
    decoder's records converted one by one, and whose to_frame() is the frame itself."""
    frame = f.Deliver(subscription_id=sid, messages=batch)
    data = encode_frame(frame)
    [got] = open_codec(Role.CLIENT, core_deliveries=True).receive_data(data)
    assert type(got) is DeliveredBatch and got.subscription_id == sid
    assert got.deliveries == [as_core(r) for r in generic_decode(f.Deliver, memoryview(data), len(data)).messages]
    assert got.to_frame() == frame


@settings(deadline=None, max_examples=40)  # every cut of every example: slow on a shared machine
@given(st.lists(records(), min_size=1, max_size=3))
def test_core_deliveries_cut_anywhere_fail_exactly_like_the_generic_decoder(batch: list[f.DeliveryRecord]) -> None:
    """Every proper prefix of a DELIVER body raises the same error class with the same text on both paths."""
    data = encode_frame(f.Deliver(subscription_id=1, messages=batch))
    view = memoryview(data)
    decode = core_deliver_decoder()
    for end in range(HEADER_SIZE, len(data)):
        fast = outcome(decode, view, HEADER_SIZE, end, 0, 0)
        assert isinstance(fast, tuple), f"a DELIVER cut at {end} of {len(data)} decoded"
        assert fast == outcome(generic_decode, f.Deliver, view, end)


def test_core_deliveries_share_one_queue_ref_per_queue_and_only_clients_take_them() -> None:
    """Messages of one queue carry the same QueueRef object (commits key on it); a server codec refuses a DELIVER
    decoder (DELIVER is a server push: open_decoders only replaces decoders of frames the peer may send)."""
    batch = [f.DeliveryRecord(topic="orders", queue_id=q, queue_offset=o, message=Message("orders", b"x",
                                                                                          msg_id=MSG_ID))
             for q, o in ((0, 1), (1, 1), (0, 2))]
    [got] = open_codec(Role.CLIENT, core_deliveries=True).receive_data(
        encode_frame(f.Deliver(subscription_id=1, messages=batch)))
    first, second, third = got.deliveries
    assert first.queue is third.queue and first.queue == QueueRef("orders", 0) and second.queue.queue_id == 1
    with pytest.raises(ValueError, match="not frames a client sends"):
        NativeCodec(Role.SERVER, open_decoders={DELIVER_TYPE: core_deliver_decoder()})


@given(st.lists(records(), max_size=6), st.integers(0, 2**32 - 1))
def test_deliver_encoder_with_the_stored_shape_gives_the_generic_bytes(batch: list[f.DeliveryRecord],
                                                                       sid: int) -> None:
    """encode_deliver of core Delivered values (struct-per-record path or not) is encode_frame(Deliver(...))."""
    assert encode_deliver(sid, [as_core(r) for r in batch]) == encode_frame(f.Deliver(subscription_id=sid,
                                                                                      messages=batch))


receipts = st.builds(f.SendReceipt, msg_id=st.sampled_from(["", MSG_ID, "é"]), topic=st.sampled_from(TOPICS),
                     queue_id=st.integers(0, 2**32 - 1), queue_offset=st.integers(-(2**63), 2**63 - 1))


@given(st.lists(receipts, max_size=6), st.integers(0, 2**32 - 1))
def test_send_batch_ok_encodes_like_the_generic_encoder_and_decodes_back(results: list[f.SendReceipt],
                                                                        rid: int) -> None:
    """encode_send_batch_ok gives encode_frame(SendBatchOk(...)); the fast decoder rebuilds the same frame, and
    every cut of it fails like the generic decoder."""
    frame = f.SendBatchOk(request_id=rid, results=results)
    data = encode_send_batch_ok(rid, results)
    assert data == encode_frame(frame)
    assert open_codec(Role.CLIENT).receive_data(data) == [frame]
    view = memoryview(data)
    for end in range(HEADER_SIZE, len(data)):
        fast = outcome(decode_body, f.SendBatchOk, view, HEADER_SIZE, end, 0, 0)
        assert isinstance(fast, tuple)
        assert fast == outcome(generic_decode, f.SendBatchOk, view, end)


@settings(deadline=None, max_examples=60)
@given(st.lists(st.one_of(messages, stored_messages.map(lambda m: Message(m.topic, m.body, born_ts=m.born_ts))),
                max_size=4), st.integers(-1, 7))
def test_send_batch_decodes_like_the_generic_decoder_whole_and_cut(batch: list[Message], queue_id: int) -> None:
    """The inline SEND_BATCH decoder (producer shape) gives the generic frame, and the same error at every cut."""
    data = encode_send_batch(5, 0, queue_id, batch)
    frame = f.SendBatch(request_id=5, queue_id=queue_id, messages=batch)
    assert data == encode_frame(frame)
    assert open_codec(Role.SERVER).receive_data(data) == [frame]
    view = memoryview(data)
    for end in range(HEADER_SIZE, len(data)):
        fast = outcome(decode_body, f.SendBatch, view, HEADER_SIZE, end, 0, 0)
        assert isinstance(fast, tuple)
        assert fast == outcome(generic_decode, f.SendBatch, view, end)


@given(st.sampled_from(TOPICS), st.lists(st.binary(max_size=300), max_size=5), st.integers(0, 2**62),
       st.integers(-1, 7))
def test_plain_send_batch_is_byte_for_byte_the_send_batch_of_the_same_messages(
        topic: str, bodies: list[bytes], born_ts: int, queue_id: int) -> None:
    """encode_plain_send_batch(topic, bodies) is encode_send_batch of Message(topic, body, born_ts) per body."""
    assert encode_plain_send_batch(9, 0, queue_id, topic, bodies, born_ts) == encode_send_batch(
        9, 0, queue_id, [Message(topic, body, born_ts=born_ts) for body in bodies])


def test_a_deliver_with_a_bad_utf8_queue_topic_is_malformed_with_core_deliveries() -> None:
    """The queue topic is checked as UTF-8 on the core_deliveries path too."""
    data = bytearray(encode_frame(f.Deliver(subscription_id=1, messages=[
        f.DeliveryRecord(topic="ab", queue_id=0, queue_offset=0, message=Message("ab", b"x", msg_id=MSG_ID))])))
    data[HEADER_SIZE + 8 + 2] = 0xFF
    with pytest.raises(codec_module.MalformedFrame, match="UTF-8"):
        open_codec(Role.CLIENT, core_deliveries=True).receive_data(bytes(data))


def test_slot_setter_writes_a_frozen_field_and_refuses_what_is_not_a_slot() -> None:
    """slot_setter gives the field's slot descriptor setter (frozen dataclasses included, base-class slots found
    along the MRO); anything else is an error."""
    result = object.__new__(SendResult)
    for name, value in (("msg_id", "m"), ("topic", "t"), ("queue_id", 1), ("queue_offset", 2)):
        slot_setter(SendResult, name)(result, value)
    assert result == SendResult("m", "t", 1, 2)
    frame = object.__new__(f.Ping)
    slot_setter(f.Ping, "request_id")(frame, 7)
    assert frame.request_id == 7
    with pytest.raises(AttributeError):
        slot_setter(SendResult, "nope")
    with pytest.raises(TypeError):
        slot_setter(f.Ping, "SPEC")


@settings(deadline=None, max_examples=60)
@given(st.sampled_from(["", MSG_ID, "é"]), st.sampled_from(TOPICS + [""]), st.integers(0, 2**32 - 1),
       st.integers(-(2**63), 2**63 - 1))
def test_send_ok_decodes_like_the_generic_decoder_whole_and_cut(msg_id: str, topic: str, queue_id: int,
                                                               offset: int) -> None:
    """The inline SEND_OK decoder (topic names cached) gives the generic frame; every cut fails as a Truncated
    error, never a misread."""
    frame = f.SendOk(request_id=3, msg_id=msg_id, topic=topic, queue_id=queue_id, queue_offset=offset)
    data = encode_frame(frame)
    for _ in range(2):  # the second time the topic comes from the cache
        assert open_codec(Role.CLIENT).receive_data(data) == [frame]
    view = memoryview(data)
    for end in range(HEADER_SIZE, len(data)):
        fast = outcome(decode_body, f.SendOk, view, HEADER_SIZE, end, 0, 0)
        assert isinstance(fast, tuple) and fast[0] == "Truncated"
    assert outcome(decode_body, f.SendOk, memoryview(data + b"\x00"), HEADER_SIZE, len(data) + 1, 0, 0)[0] == \
        "Truncated"


def test_send_ok_with_a_bad_utf8_topic_is_malformed() -> None:
    """A topic that is not UTF-8 is refused by the inline SEND_OK path too (and never cached)."""
    data = bytearray(encode_frame(f.SendOk(request_id=3, msg_id="m", topic="ab", queue_id=0, queue_offset=0)))
    data[HEADER_SIZE + 3 + 2] = 0xFF
    with pytest.raises(codec_module.MalformedFrame, match="UTF-8"):
        open_codec(Role.CLIENT).receive_data(bytes(data))
