"""The native hot-path pass of issue 10: the DELIVER decoder, the stored-shape message read, the open-state decoder
table, the SDK's plain SEND encoder, the PushConsumer's per-DELIVER hand-off and the bench's send window. Each
fast path gives exactly what the generic, declaration-driven codec gives (bytes, frames and errors)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.adapters.native import codec as codec_module
from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    HEADER_SIZE,
    MalformedFrame,
    NativeCodec,
    ProtocolError,
    Role,
    State,
    decode_body,
    encode_frame,
    encode_plain_send,
    encode_send,
)
from tidegate.adapters.native.errors import FrameValueError
from tidegate.adapters.native.fastpath import message_bytes, read_message
from tidegate.client import PushConsumer
from tidegate.client.blocking import _STOP
from tidegate.core.model import Message, MessageFlag, QueueRef
from tidegate.gateway.bench.native import SendWindow

from .test_native_fastpath import messages

records = st.builds(
    f.DeliveryRecord,
    topic=st.sampled_from(["orders", "orders", "%RETRY%g", "é"]),
    queue_id=st.integers(0, 2**32 - 1),
    queue_offset=st.integers(-(2**63), 2**63 - 1),
    receipt=st.sampled_from(["", "orders:3:17:1"]),
    attempt=st.integers(0, 0xFFFF),
    message=messages,
)


def open_codec(role: Role) -> NativeCodec:
    codec = NativeCodec(role)
    codec.state = State.OPEN
    return codec


def generic_decode(cls: type[f.Frame], view: memoryview, end: int) -> f.Frame:
    """decode_body through the frame's SPEC, with the hand-written decoder of `cls` set aside."""
    fast = codec_module.FAST_DECODERS.pop(cls)
    try:
        return decode_body(cls, view, HEADER_SIZE, end, 0, 0)
    finally:
        codec_module.FAST_DECODERS[cls] = fast


def outcome(decode: object, *args: object) -> object:
    try:
        return decode(*args)  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - the outcome compared is the exception's class and text
        return type(exc).__name__, str(exc)


@given(st.lists(records, max_size=5), st.integers(0, 2**32 - 1))
def test_fast_deliver_decoder_gives_the_generic_decoders_frame(batch: list[f.DeliveryRecord], sid: int) -> None:
    """A DELIVER decodes, through the codec, to the frame the SPEC-driven decoder builds (equal records)."""
    frame = f.Deliver(subscription_id=sid, messages=batch)
    data = encode_frame(frame)
    assert open_codec(Role.CLIENT).receive_data(data) == [frame]
    assert generic_decode(f.Deliver, memoryview(data), len(data)) == frame


@settings(deadline=None, max_examples=40)  # every cut of every example: slow on a shared machine
@given(st.lists(records, min_size=1, max_size=3))
def test_a_deliver_cut_anywhere_fails_exactly_like_the_generic_decoder(batch: list[f.DeliveryRecord]) -> None:
    """Every proper prefix of a DELIVER body raises the same error class with the same text on both paths."""
    data = encode_frame(f.Deliver(subscription_id=1, messages=batch))
    view = memoryview(data)
    for end in range(HEADER_SIZE, len(data)):
        fast = outcome(decode_body, f.Deliver, view, HEADER_SIZE, end, 0, 0)
        assert isinstance(fast, tuple), f"a DELIVER cut at {end} of {len(data)} decoded"
        assert fast == outcome(generic_decode, f.Deliver, view, end)


def test_a_deliver_with_a_bad_utf8_queue_topic_is_malformed() -> None:
    """The queue topic is checked as UTF-8 on the fast path too."""
    data = bytearray(encode_frame(f.Deliver(subscription_id=1, messages=[
        f.DeliveryRecord(topic="ab", queue_id=0, queue_offset=0, message=Message("ab", b"x"))])))
    topic_at = HEADER_SIZE + 8 + 2
    data[topic_at] = 0xFF
    with pytest.raises(MalformedFrame, match="UTF-8"):
        open_codec(Role.CLIENT).receive_data(bytes(data))


@pytest.mark.parametrize("msg_id", ["0A0B0C0D0E0F00010002000300040005", "é", "\x00" * 12, "x" * 300])
def test_a_stored_message_with_only_a_msg_id_reads_back_whole_and_cut(msg_id: str) -> None:
    """The stored shape (topic, msg_id, body: what DELIVER carries) reads back exactly, even when the msg_id's bytes
    look like empty counts, and every prefix is Truncated."""
    m = Message("orders", b"body" * 8, msg_id=msg_id, store_ts=5, born_ts=7, flags=int(MessageFlag.PERSISTENT))
    data = message_bytes(m)
    assert read_message(memoryview(data + b"more"), 0, len(data)) == (m, len(data))
    for end in range(len(data)):
        with pytest.raises(Exception) as info:
            read_message(memoryview(data), 0, end)
        assert type(info.value).__name__ == "Truncated"


@given(st.from_regex(r"[A-Za-zé0-9/_.-]{1,30}", fullmatch=True), st.binary(max_size=600),
       st.integers(0, 2**62), st.integers(-1, 2**31 - 1), st.integers(1, 2**32 - 1), st.sampled_from([0, 1]))
def test_plain_send_is_byte_for_byte_the_send_of_the_same_message(topic: str, body: bytes, born_ts: int,
                                                                  queue_id: int, rid: int, flags: int) -> None:
    """encode_plain_send(topic, body, born_ts) is encode_send of Message(topic, body, born_ts=born_ts)."""
    expected = encode_send(rid, flags, queue_id, Message(topic, body, born_ts=born_ts))
    assert encode_plain_send(rid, flags, queue_id, topic, body, born_ts) == expected


def test_plain_send_refuses_what_the_wire_cannot_carry() -> None:
    """Too long a topic, a request id past u32 or a born_ts past i64 is a FrameValueError, as for encode_send."""
    with pytest.raises(FrameValueError):
        encode_plain_send(1, 0, -1, "x" * 70_000, b"", 0)
    with pytest.raises(FrameValueError):
        encode_plain_send(2**32, 0, -1, "t", b"", 0)
    with pytest.raises(FrameValueError):
        encode_plain_send(1, 0, -1, "t", b"", 2**63)


def test_open_state_still_refuses_frames_the_peer_may_not_send() -> None:
    """The open-state decoder table admits only the peer's frames: a client-only frame sent to a client, or a
    second HELLO, is still a protocol error."""
    client = open_codec(Role.CLIENT)
    with pytest.raises(ProtocolError, match="only the client sends"):
        client.receive_data(encode_frame(f.Credit(request_id=4, subscription_id=1, credit=1)))
    server = open_codec(Role.SERVER)
    with pytest.raises(ProtocolError, match="second Hello"):
        server.receive_data(encode_frame(f.Hello(request_id=5)))
    with pytest.raises(ProtocolError, match="only the server sends"):
        server.receive_data(encode_frame(f.Deliver(subscription_id=1)))


class RecordingConnection:
    """What PushConsumer._flush needs of a Connection: records the one-way frames it would send."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[tuple[type[f.Frame], dict[str, object]]] = []
        self.credited = threading.Event()

    def send_oneway(self, cls: type[f.Frame], **fields: object) -> None:
        self.sent.append((cls, fields))
        if cls is f.Credit:
            self.credited.set()


def test_push_consumer_runs_a_whole_deliver_in_order_then_commits_and_credits_once() -> None:
    """A DELIVER is handed to the worker as one item: the handler sees every message in order (a failing one does
    not stop the rest), then one COMMIT carries the next offset per queue and one CREDIT returns the credit."""
    seen: list[tuple[QueueRef, int]] = []

    def handler(d: object) -> None:
        seen.append((d.queue, d.queue_offset))  # type: ignore[attr-defined]
        if d.queue_offset == 11:  # type: ignore[attr-defined]
            raise ValueError("handler failure")

    consumer = PushConsumer("g", "orders", handler, credit=8)
    conn = RecordingConnection()
    consumer._conn = conn  # type: ignore[assignment]
    consumer.subscription_id = 3
    batch = [f.DeliveryRecord(topic="orders", queue_id=q, queue_offset=o, message=Message("orders", b"x"))
             for q, o in ((0, 10), (1, 11), (0, 12))]
    consumer._on_push(f.Deliver(subscription_id=3, messages=batch))
    consumer._on_push(f.Deliver(subscription_id=3, messages=()))  # nothing to hand off
    worker = threading.Thread(target=consumer._work)
    worker.start()
    assert conn.credited.wait(10)  # the inbox ran empty after the batch: commit and credit went out
    consumer._inbox.put(_STOP)
    worker.join(10)
    assert not worker.is_alive()
    assert seen == [(QueueRef("orders", 0), 10), (QueueRef("orders", 1), 11), (QueueRef("orders", 0), 12)]
    assert seen[0][0] is seen[2][0]  # one QueueRef per queue
    assert consumer.processed == 3
    assert [cls for cls, _ in conn.sent] == [f.Commit, f.Credit]
    commit = conn.sent[0][1]["offsets"]
    assert sorted((o.queue_id, o.offset) for o in commit) == [(0, 13), (1, 12)]  # type: ignore[attr-defined]
    assert conn.sent[1][1] == {"subscription_id": 3, "credit": 3}


def test_send_window_admits_size_requests_and_waits_for_an_answer() -> None:
    """SendWindow(n) lets n requests out, times out on the next, and wakes a waiting producer when an answer
    (on another thread) gives a slot back."""
    window = SendWindow(2)
    assert window.acquire(1) and window.acquire(1)
    assert not window.acquire(0.01)
    answered = threading.Timer(0.05, window.release)
    answered.start()
    assert window.acquire(10)
    answered.join()
    assert (window.taken, window.returned) == (3, 1)


def test_push_consumer_commits_a_large_deliver_in_slices_of_commit_every() -> None:
    """A DELIVER larger than COMMIT_EVERY is committed and credited slice by slice, so a slow handler still makes
    progress visible to the broker while it works through the frame."""
    consumer = PushConsumer("g", "orders", lambda d: None, credit=100)
    consumer.COMMIT_EVERY = 2
    conn = RecordingConnection()
    consumer._conn = conn  # type: ignore[assignment]
    consumer.subscription_id = 3
    consumer._on_push(f.Deliver(subscription_id=3, messages=[
        f.DeliveryRecord(topic="orders", queue_id=0, queue_offset=o, message=Message("orders", b"x"))
        for o in range(5)]))
    consumer._inbox.put(_STOP)
    consumer._work()
    commits = [fields["offsets"][0].offset for cls, fields in conn.sent if cls is f.Commit]  # type: ignore[index]
    assert commits == [2, 4]  # after each full slice; the last message waits for the next flush (or close)
    assert consumer.processed == 5


@settings(deadline=None, max_examples=40)
@given(st.from_regex(r"[A-Za-zé0-9/_.-]{1,30}", fullmatch=True), st.binary(max_size=300), st.integers(0, 2**62),
       st.integers(-1, 2**31 - 1))
def test_plain_send_decodes_like_the_generic_decoder_whole_and_cut(topic: str, body: bytes, born_ts: int,
                                                                   queue_id: int) -> None:
    """The SEND decoder's shortcut for the producer's shape (topic and body only) gives the generic decoder's frame,
    and for every cut the same error."""
    data = encode_plain_send(5, 0, queue_id, topic, body, born_ts)
    view = memoryview(data)
    frame = decode_body(f.Send, view, HEADER_SIZE, len(data), 0, 5)
    assert frame == f.Send(request_id=5, queue_id=queue_id, message=Message(topic, body, born_ts=born_ts))
    assert generic_decode(f.Send, view, len(data)) == f.Send(request_id=0, queue_id=queue_id,
                                                             message=frame.message)
    for end in range(HEADER_SIZE, len(data)):
        fast = outcome(decode_body, f.Send, view, HEADER_SIZE, end, 0, 0)
        assert isinstance(fast, tuple) and fast == outcome(generic_decode, f.Send, view, end)
