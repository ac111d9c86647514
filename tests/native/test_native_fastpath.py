"""The hand-written hot paths (the message and string helpers of adapters/native/fastpath.py,
SEND/SEND_OK/SEND_BATCH/SEND_BATCH_OK/DELIVER codecs, pipelined SENDs stored as one batch) produce exactly what the
generic, declaration-driven codec and the one-by-one server path produce."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    MalformedFrame,
    NativeCodec,
    Role,
    State,
    encode_deliver,
    encode_frame,
    encode_send,
    encode_send_batch,
    encode_send_batch_ok,
    encode_send_ok,
)
from tidegate.adapters.native.errors import FrameValueError, Truncated
from tidegate.adapters.native.fastpath import message_bytes, read_message, read_string, wire_name, wire_string
from tidegate.adapters.native.server import NativeServerFactory
from tidegate.core.api import Delivered, SendResult
from tidegate.core.errors import ErrorCode
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef
from tidegate.core.testing import make_broker  # noqa: E402

from .test_native_server import Peer

text = st.text(max_size=20)
messages = st.builds(
    Message,
    topic=st.from_regex(r"[A-Za-z0-9_.%-]{1,20}", fullmatch=True),
    body=st.binary(max_size=64),
    subject=st.sampled_from(["", "a/b"]),
    tag=st.sampled_from(["", "t"]),
    keys=st.lists(text, max_size=3).map(tuple),
    properties=st.dictionaries(text, text, max_size=3),
    born_ts=st.integers(0, 2**62),
    deliver_at=st.integers(0, 2**40),
    expires_at=st.integers(0, 2**40),
    group=st.sampled_from(["", "g"]),
    flags=st.sampled_from([1, 2]),
    msg_id=st.sampled_from(["", "0123456789ABCDEF01234567"]),
    store_ts=st.integers(0, 2**40),
)


def open_codec(role: Role) -> NativeCodec:
    codec = NativeCodec(role)
    codec.state = State.OPEN
    return codec


@given(messages)
def test_message_bytes_read_back_and_leave_trailing_data_alone(m: Message) -> None:
    """read_message(message_bytes(m)) is m, and it stops at the message's end, not the buffer's."""
    data = message_bytes(m)
    assert read_message(memoryview(data + b"next frame"), 0, len(data)) == (m, len(data))
    assert read_message(memoryview(b"prefix" + data), 6, 6 + len(data)) == (m, 6 + len(data))


@given(messages)
def test_a_message_cut_anywhere_is_truncated_never_misread(m: Message) -> None:
    """Every proper prefix of a message raises Truncated (bounds come from `end`, even with bytes beyond it)."""
    data = message_bytes(m)
    view = memoryview(data)
    for end in range(len(data)):
        with pytest.raises(Truncated):
            read_message(view, 0, end)


@given(messages)
def test_message_field_of_a_frame_is_the_fastpath_bytes(m: Message) -> None:
    """The typed frame table's MESSAGE field writes and reads exactly the fastpath bytes."""
    out = bytearray()
    f.MESSAGE.write(out, m)
    assert bytes(out) == message_bytes(m)
    reader = f.Reader(memoryview(bytes(out)), 0, len(out))
    assert f.MESSAGE.read(reader) == m and reader.pos == len(out)


def test_wire_strings_are_length_prefixed_utf8_and_checked() -> None:
    """wire_string/wire_name give u16 length + UTF-8 (names cached), read_string reads it back; too long or not
    UTF-8 is a FrameValueError."""
    assert wire_string("") == b"\x00\x00" and wire_string("é") == b"\x00\x02\xc3\xa9"
    assert wire_name("orders") == wire_name("orders") == b"\x00\x06orders"
    assert read_string(memoryview(b"\x00\x02\xc3\xa9rest"), 0, 8) == ("é", 4)
    with pytest.raises(FrameValueError, match="65535"):
        wire_string("x" * 65536)
    with pytest.raises(FrameValueError, match="UTF-8"):
        read_string(memoryview(b"\x00\x01\xff"), 0, 3)
    with pytest.raises(Truncated):
        read_string(memoryview(b"\x00\x05abc"), 0, 5)


@given(st.lists(st.tuples(messages, st.integers(0, 2**40), st.sampled_from(["", "r-1"]), st.integers(1, 9)),
                max_size=4))
def test_fast_deliver_encoding_matches_the_generic_encoder_and_decodes_back(
        deliveries: list[tuple[Message, int, str, int]]) -> None:
    """encode_deliver of core Delivered values gives the bytes of encode_frame(Deliver(...)) and decodes back."""
    delivered = [Delivered(m, QueueRef("Q.x", 3), offset, receipt, attempt)
                 for m, offset, receipt, attempt in deliveries]
    frame = f.Deliver(subscription_id=7, messages=[
        f.DeliveryRecord(topic="Q.x", queue_id=3, queue_offset=d.queue_offset, receipt=d.receipt,
                         attempt=d.attempt, message=d.message) for d in delivered])
    data = encode_deliver(7, delivered)
    assert data == encode_frame(frame)
    assert open_codec(Role.CLIENT).receive_data(data) == [frame]


@given(messages, st.integers(-1, 2**31 - 1), st.integers(1, 2**32 - 1), st.sampled_from([0, 1]))
def test_fast_send_encoding_matches_the_generic_encoder_and_decodes_back(m: Message, queue_id: int, rid: int,
                                                                          flags: int) -> None:
    """encode_send gives the bytes of encode_frame(Send(...)); the fast decoder rebuilds the same frame."""
    frame = f.Send(request_id=rid, flags=flags, queue_id=queue_id, message=m)
    data = encode_send(rid, flags, queue_id, m)
    assert data == encode_frame(frame)
    assert open_codec(Role.SERVER).receive_data(data) == [frame]


@given(st.lists(messages, max_size=4))
def test_fast_batch_encoding_matches_the_generic_encoder_and_decodes_back(batch: list[Message]) -> None:
    """encode_send_batch gives the bytes of encode_frame(SendBatch(...)) and decodes back to the same frame."""
    frame = f.SendBatch(request_id=9, queue_id=-1, messages=batch)
    data = encode_send_batch(9, 0, -1, batch)
    assert data == encode_frame(frame)
    assert open_codec(Role.SERVER).receive_data(data) == [frame]


def test_fast_acknowledgements_match_the_generic_encoder() -> None:
    """SEND_OK and SEND_BATCH_OK built from core results equal the frame-object encoding and decode back."""
    results = [SendResult("0123456789ABCDEF01234567", "T", 3, 2**40, 0, 10), SendResult("AB", "topic.x", 0, 0, 10, 20)]
    ok = f.SendOk(request_id=4, msg_id="AB", topic="T", queue_id=1, queue_offset=7)
    assert encode_send_ok(4, "AB", "T", 1, 7) == encode_frame(ok)
    batch_ok = f.SendBatchOk(request_id=5, results=[
        f.SendReceipt(msg_id=r.msg_id, topic=r.topic, queue_id=r.queue_id, queue_offset=r.queue_offset)
        for r in results])
    assert encode_send_batch_ok(5, results) == encode_frame(batch_ok)
    client = open_codec(Role.CLIENT)
    assert client.receive_data(encode_send_ok(4, "AB", "T", 1, 7) + encode_send_batch_ok(5, results)) == \
        [ok, batch_ok]


@pytest.mark.parametrize("cut", [1, 5, 20, 40, 50, 60])
def test_truncated_send_is_malformed_with_its_request_id(cut: int) -> None:
    """A SEND whose body is cut anywhere (length adjusted) is MALFORMED_FRAME for that request only."""
    data = encode_send(8, 0, -1, Message(topic="T", body=b"hello", keys=("k",), properties={"a": "b"}))
    body = data[10:-cut]
    codec = open_codec(Role.SERVER)
    with pytest.raises(MalformedFrame) as info:
        codec.receive_data(struct.pack(">IBBI", 6 + len(body), 0x20, 0, 8) + body)
    assert info.value.request_id == 8 and not info.value.fatal


def test_send_with_bad_utf8_topic_is_malformed() -> None:
    """The fast message decoder still rejects a topic that is not UTF-8."""
    data = bytearray(encode_send(8, 0, -1, Message(topic="TT", body=b"x")))
    data[10 + 4 + 36 + 2] = 0xFF
    with pytest.raises(MalformedFrame, match="UTF-8"):
        open_codec(Role.SERVER).receive_data(bytes(data))


@pytest.fixture
def factory() -> NativeServerFactory:
    clock = MemoryReactorClock()
    return NativeServerFactory(make_broker(clock), clock, max_frame=64 * 1024, heartbeat_s=10.0,
                               metrics=CoreMetrics())


def test_pipelined_sends_are_stored_as_one_batch_and_acknowledged_in_order(factory: NativeServerFactory) -> None:
    """Several SENDs in one read are one publish call; each still gets its own SEND_OK, in request order."""
    broker = factory.broker
    broker.create_topic("T", queues=2)
    calls = []
    publish = broker.publish

    def counting(batch, queue_id=None):
        calls.append(len(batch))
        return publish(batch, queue_id=queue_id)

    broker.publish = counting
    peer = Peer(factory)
    peer.send(*[f.Send(request_id=10 + i, message=Message(topic="T", body=b"m%d" % i)) for i in range(5)])
    factory.clock.advance(0)
    acks = peer.read()
    assert calls == [5]
    assert [a.request_id for a in acks] == [10, 11, 12, 13, 14]
    assert all(isinstance(a, f.SendOk) for a in acks)
    assert len({a.msg_id for a in acks}) == 5
    assert [a.queue_id for a in acks] == [0, 1, 0, 1, 0]


def test_a_bad_message_in_a_pipelined_run_gets_its_own_error(factory: NativeServerFactory) -> None:
    """If the batch is refused, the run is retried one by one: good messages stored, the bad one answered ERROR."""
    factory.broker.create_topic("T", queues=1)
    peer = Peer(factory)
    peer.send(f.Send(request_id=20, message=Message(topic="T", body=b"a")),
              f.Send(request_id=21, message=Message(topic="T", body=b"b", subject="a/+")),  # wildcard: invalid
              f.Send(request_id=22, message=Message(topic="T", body=b"c")),
              f.Send(request_id=23, flags=f.FrameFlag.ONEWAY, message=Message(topic="T", body=b"d")))
    factory.clock.advance(0)
    answers = {a.request_id: a for a in peer.read()}
    assert isinstance(answers[20], f.SendOk) and isinstance(answers[22], f.SendOk)
    assert isinstance(answers[21], f.Error) and answers[21].code == ErrorCode.INVALID_NAME
    assert 23 not in answers  # one-way: no answer on success
    assert answers[22].queue_offset == answers[20].queue_offset + 1
