"""Native pass 3 of issue 10: offset-mode delivery as runs of one queue (core `DeliveryRun`, the optional
`DeliverySink.deliver_runs`) and the DELIVER encoded from them; SENDs decoded by the broker into `SendRequest`
tuples. A sink that takes runs gets the same messages, in the same order, with the same credit and metrics as one
that takes `Delivered` values, the native adapter writes the same bytes either way, and a SendRequest carries what
the Send frame carries (same errors when cut)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    HEADER_SIZE,
    SendRequest,
    decode_body,
    decode_send_request,
    encode_deliver,
    encode_deliver_runs,
    encode_frame,
    encode_send,
)
from tidegate.adapters.native.server import SubscriptionSink
from tidegate.core.api import Delivered, DeliveryRun, delivered_of
from tidegate.core.model import Message, QueueRef
from tidegate.core.testing import RecordingSink, make_broker

from .test_native_fastpath import messages
from .test_native_pass2 import TOPICS, generic_decode, outcome, stored_messages


@st.composite
def runs(draw: st.DrawFn) -> list[DeliveryRun]:
    """Runs of one queue each: messages of the stored shape from that queue's topic, or of any shape."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        queue = QueueRef(draw(st.sampled_from(TOPICS)), draw(st.integers(0, 2**32 - 1)))
        batch = draw(st.lists(st.one_of(messages, stored_messages.map(
            lambda m, topic=queue.topic: Message(topic, m.body, born_ts=m.born_ts, msg_id=m.msg_id,
                                                 store_ts=m.store_ts))), min_size=1, max_size=4))
        first = draw(st.integers(0, 2**62))
        out.append(DeliveryRun(queue, [first + i * 2 for i in range(len(batch))], batch))
    return out


@given(runs(), st.integers(0, 2**32 - 1))
def test_deliver_runs_encode_to_the_bytes_of_the_same_delivered_values(batch: list[DeliveryRun], sid: int) -> None:
    """encode_deliver_runs is byte for byte encode_deliver of delivered_of(runs), which is the generic
    encode_frame(Deliver(...)) of the same records (no receipt, attempt 1)."""
    delivered = delivered_of(batch)
    count = len(delivered)
    data = encode_deliver_runs(sid, batch, count)
    assert data == encode_deliver(sid, delivered)
    records = [f.DeliveryRecord(topic=d.queue.topic, queue_id=d.queue.queue_id, queue_offset=d.queue_offset,
                                receipt="", attempt=1, message=d.message) for d in delivered]
    assert data == encode_frame(f.Deliver(subscription_id=sid, messages=records))


def test_delivered_of_lists_each_run_in_order_as_first_deliveries_without_receipt() -> None:
    q0, q1 = QueueRef("t", 0), QueueRef("t", 1)
    a, b, c = Message("t", b"a"), Message("t", b"b"), Message("t", b"c")
    assert delivered_of([DeliveryRun(q1, [4, 5], [a, b]), DeliveryRun(q0, [9], [c])]) == [
        Delivered(a, q1, 4), Delivered(b, q1, 5), Delivered(c, q0, 9)]


class RunsSink(RecordingSink):
    """A RecordingSink that takes runs; keeps the runs and what they stand for."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[list[DeliveryRun]] = []

    def deliver_runs(self, runs: list[DeliveryRun]) -> None:
        self.runs.append(runs)
        self.delivered.extend(delivered_of(runs))


def _consume(sink: RecordingSink, filter_expr: str = "*", credit: int = 7) -> tuple[Any, int, int]:
    """Publish to 4 queues (one message expired by the time it is read, several tags), consume it all in
    pumps of `credit` with `sink`; returns (the broker's metrics of topic t, messages out, bytes out)."""
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()
    clock.advance(1_700_000_000.0)
    broker = make_broker(clock)
    try:
        broker.create_topic("t", queues=4)
        now_ms = int(clock.seconds() * 1000)
        batch = [Message("t", f"m{i}".encode(), tag="a" if i % 3 else "b",
                         expires_at=now_ms + 1 if i == 5 else 0) for i in range(30)]
        broker.publish(batch[:20])
        broker.publish(batch[20:], queue_id=2)
        clock.advance(0.5)
        sub = broker.subscribe("g", "t", sink, client_id="c", start="earliest", filter_expr=filter_expr)
        for _ in range(12):
            sub.grant(credit)
            clock.advance(0)
        metrics = broker.metrics
        return sub, metrics.messages_out["t"], metrics.bytes_out["t"]
    finally:
        broker.close()


def test_a_sink_that_takes_runs_gets_what_a_delivered_sink_gets_with_the_same_credit_and_metrics() -> None:
    """Offset mode, no filter: the same messages in the same order (the expired one skipped by both), the same
    remaining credit and the same messages_out/bytes_out; every pump came as runs of one queue each."""
    plain, runs_sink = RecordingSink(), RunsSink()
    sub_a, out_a, bytes_a = _consume(plain)
    sub_b, out_b, bytes_b = _consume(runs_sink)
    assert [(d.queue, d.queue_offset, d.message.body, d.receipt, d.attempt) for d in runs_sink.delivered] == [
        (d.queue, d.queue_offset, d.message.body, d.receipt, d.attempt) for d in plain.delivered]
    assert len(plain.delivered) == 29 and b"m5" not in plain.bodies
    assert (sub_a.credit, out_a, bytes_a) == (sub_b.credit, out_b, bytes_b) and out_a == 29
    assert runs_sink.runs and all(len({run.queue for run in pump}) == len(pump) for pump in runs_sink.runs)
    assert all(len(run.offsets) == len(run.messages) > 0 for pump in runs_sink.runs for run in pump)


def test_a_tag_filter_delivers_through_deliver_even_to_a_sink_that_takes_runs() -> None:
    plain, runs_sink = RecordingSink(), RunsSink()
    _consume(plain, filter_expr="b")
    _consume(runs_sink, filter_expr="b")
    assert runs_sink.runs == [] and runs_sink.bodies == plain.bodies and plain.bodies
    assert all(d.message.tag == "b" for d in runs_sink.delivered)


class _Protocol:
    """What SubscriptionSink uses of a NativeProtocol: the max frame and the write point."""

    def __init__(self, max_frame: int) -> None:
        self.factory = type("Factory", (), {"settings": type("Settings", (), {"max_frame": max_frame})()})()
        self.written: list[bytes] = []

    def write_chunks(self, chunks: list[bytes]) -> None:
        self.written.extend(chunks)


def test_native_sink_writes_the_same_deliver_frames_for_runs_as_for_delivered_values_also_when_split() -> None:
    """SubscriptionSink.deliver_runs writes what deliver writes for the same messages: one DELIVER when it fits,
    the same halves when it exceeds the client's max frame, and holds them until SUBSCRIBE_OK like deliver."""
    q0, q1 = QueueRef("t", 0), QueueRef("t", 1)
    batch = [DeliveryRun(q0, list(range(10)), [Message("t", bytes(200), msg_id="A" * 24) for _ in range(10)]),
             DeliveryRun(q1, [3, 4], [Message("t", b"x", subject="s/1", msg_id="B" * 24), Message("t", b"y")])]
    for max_frame in (1 << 20, 700, 256):
        by_runs, by_values = _Protocol(max_frame), _Protocol(max_frame)
        runs_sink, values_sink = SubscriptionSink(by_runs, 9), SubscriptionSink(by_values, 9)  # type: ignore[arg-type]
        runs_sink.deliver_runs(batch)
        values_sink.deliver(delivered_of(batch))
        assert by_runs.written == [] and by_values.written == []  # held until released (after SUBSCRIBE_OK)
        runs_sink.release()
        values_sink.release()
        runs_sink.deliver_runs(batch[1:])
        values_sink.deliver(delivered_of(batch[1:]))
        assert by_runs.written == by_values.written
        assert (len(by_runs.written) > 2) == (max_frame < 1 << 20)


@settings(deadline=None, max_examples=60)
@given(st.one_of(messages, stored_messages.map(lambda m: Message(m.topic, m.body, born_ts=m.born_ts))),
       st.integers(-1, 2**31 - 1), st.sampled_from([0, 1]))
def test_send_request_decodes_to_the_send_frames_fields_whole_and_cut(message: Message, queue_id: int,
                                                                      flags: int) -> None:
    """decode_send_request (the broker's SEND decoder) gives the generic decoder's request id, flags, queue id
    and message for every message shape, and for every cut the same error class and text."""
    data = encode_send(7, flags, queue_id, message)
    view = memoryview(data)
    got = decode_send_request(view, HEADER_SIZE, len(data), flags, 7)
    frame = generic_decode(f.Send, view, len(data))
    assert type(got) is SendRequest
    assert got == SendRequest(7, flags, frame.queue_id, frame.message) and frame.queue_id == queue_id
    assert decode_body(f.Send, view, HEADER_SIZE, len(data), flags, 7) == f.Send(
        request_id=7, flags=flags, queue_id=queue_id, message=got.message)
    for end in range(HEADER_SIZE, len(data)):
        fast = outcome(decode_send_request, view, HEADER_SIZE, end, 0, 0)
        assert isinstance(fast, tuple) and fast == outcome(generic_decode, f.Send, view, end)


def test_the_broker_answers_pipelined_and_refused_sends_as_before() -> None:
    """Through a real NativeProtocol (whose codec gives SendRequests): a run of SENDs is answered with one
    SEND_OK each (none for ONEWAY), and a SEND the core refuses gets its ERROR naming it as before."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from tidegate.adapters.native.codec import NativeCodec, Role
    from tidegate.adapters.native.server import NativeServerFactory
    from tidegate.core.security import AllowAllGate

    clock = MemoryReactorClock()
    clock.advance(1_700_000_000.0)
    broker = make_broker(clock)
    try:
        protocol = NativeServerFactory(broker, AllowAllGate(), clock).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        client = NativeCodec(Role.CLIENT)
        protocol.dataReceived(encode_frame(f.Hello(request_id=1, client_id="p")))
        clock.advance(0)
        client.receive_data(transport.value())
        transport.clear()
        broker.create_topic("t", queues=2)
        sends = [encode_send(10 + i, 1 if i == 2 else 0, -1, Message("t", b"x%d" % i)) for i in range(4)]
        sends.append(encode_send(20, 0, -1, Message("no-such", b"y", subject="a+b")))
        protocol.dataReceived(b"".join(sends))
        clock.advance(0)
        answers = client.receive_data(transport.value())
        assert [type(a).__name__ for a in answers] == ["Error", "SendOk", "SendOk", "SendOk"]
        assert answers[0].request_id == 20 and "a+b" in answers[0].message
        assert [a.request_id for a in answers[1:]] == [10, 11, 13]
        assert [a.queue_offset for a in answers[1:]] == [0, 0, 1]
    finally:
        broker.close()
