"""Broker.get / Broker.ack / Broker.nack: taking messages without a subscription (AMQP basic.get)."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.broker import BrokerConfig
from tidegate.core.errors import InvalidReceipt, TidegateError
from tidegate.core.model import Message, QueueRef
from tidegate.core.testing import RecordingSink, make_broker

T0 = 1_700_000_000.0


@pytest.fixture
def clock():
    c = MemoryReactorClock()
    c.advance(T0)
    return c


@pytest.fixture
def broker(clock):
    b = make_broker(clock, config=BrokerConfig(new_group_start="earliest"))
    yield b
    b.close()


def send(broker, clock, topic, *bodies):
    results = broker.publish([Message(topic=topic, body=b) for b in bodies])
    clock.advance(0)
    return results


def test_get_on_an_empty_queue_returns_none(broker):
    broker.create_topic("q", queues=1)
    assert broker.get("g", "q", auto_ack=True) is None
    assert broker.get("g", "q", auto_ack=False) is None


def test_get_with_auto_ack_settles_at_once_and_moves_the_committed_offset(broker, clock):
    broker.create_topic("q", queues=1)
    send(broker, clock, "q", b"a", b"b")
    first = broker.get("g", "q", auto_ack=True)
    assert (first.message.body, first.attempt, first.receipt) == (b"a", 1, "")
    assert broker.get("g", "q", auto_ack=True).message.body == b"b"
    assert broker.get("g", "q", auto_ack=True) is None
    assert broker.committed_offsets("g") == {QueueRef("q", 0): 2}
    assert broker.group_info("g").inflight == 0


def test_get_then_ack_settles_the_receipt_once(broker, clock):
    broker.create_topic("q", queues=1)
    send(broker, clock, "q", b"a")
    got = broker.get("g", "q", auto_ack=False)
    assert got.message.body == b"a" and got.receipt
    assert broker.group_info("g").inflight == 1
    assert broker.get("g", "q", auto_ack=False) is None  # in flight: not handed out twice
    broker.ack("g", got.receipt)
    assert broker.committed_offsets("g") == {QueueRef("q", 0): 1}
    with pytest.raises(InvalidReceipt):
        broker.ack("g", got.receipt)
    with pytest.raises(InvalidReceipt):
        broker.ack("unknown-group", got.receipt)


def test_get_then_nack_with_requeue_returns_the_message_first_with_attempt_2(broker, clock):
    broker.create_topic("q", queues=1)
    send(broker, clock, "q", b"a", b"b")
    got = broker.get("g", "q", auto_ack=False)
    broker.nack("g", got.receipt, requeue=True)
    again = broker.get("g", "q", auto_ack=False)
    assert (again.message.body, again.attempt) == (b"a", 2)
    assert broker.metrics.redeliveries == 1
    with pytest.raises(InvalidReceipt):
        broker.ack("g", got.receipt)  # the first receipt is stale now
    broker.ack("g", again.receipt)


def test_nack_without_requeue_dead_letters(broker, clock):
    broker.create_topic("q", queues=1)
    send(broker, clock, "q", b"poison")
    got = broker.get("g", "q", auto_ack=False)
    broker.nack("g", got.receipt, requeue=False)
    clock.advance(0)
    assert [d.message.body for d in broker.pull(QueueRef("%DLQ%g", 0), 0).messages] == [b"poison"]
    assert broker.get("g", "q", auto_ack=False) is None


def test_unacked_get_comes_back_after_invisible_ms(broker, clock):
    broker.create_topic("q", queues=1)
    send(broker, clock, "q", b"a")
    broker.get("g", "q", auto_ack=False, invisible_ms=1000)
    clock.advance(0.9)
    assert broker.get("g", "q", auto_ack=False) is None
    clock.advance(0.2)
    again = broker.get("g", "q", auto_ack=False)
    assert (again.message.body, again.attempt) == (b"a", 2)


def test_unacked_get_with_invisible_ms_0_comes_back_only_on_nack(broker, clock):
    broker.create_topic("q", queues=1)
    send(broker, clock, "q", b"a")
    got = broker.get("g", "q", auto_ack=False, invisible_ms=0)
    clock.advance(24 * 3600)
    assert broker.get("g", "q", auto_ack=False) is None
    broker.nack("g", got.receipt)
    assert broker.get("g", "q", auto_ack=True).message.body == b"a"


def test_nack_with_delay_parks_the_message_until_the_delay_passes(broker, clock):
    broker.create_topic("q", queues=1)
    send(broker, clock, "q", b"a")
    got = broker.get("g", "q", auto_ack=False, invisible_ms=0)
    broker.nack("g", got.receipt, delay_ms=500)
    assert broker.get("g", "q", auto_ack=False) is None
    clock.advance(0.6)
    assert broker.get("g", "q", auto_ack=False).attempt == 2


def test_get_takes_from_every_queue_of_the_topic(broker, clock):
    broker.create_topic("q", queues=3)
    send(broker, clock, "q", *[b"%d" % i for i in range(6)])
    got = [broker.get("g", "q", auto_ack=True) for _ in range(6)]
    assert sorted(d.message.body for d in got) == [b"%d" % i for i in range(6)]
    assert broker.get("g", "q", auto_ack=True) is None


def test_get_and_a_push_member_of_the_same_group_share_messages_exactly_once(broker, clock):
    broker.create_topic("q", queues=2)
    sink = RecordingSink()
    sub = broker.subscribe("g", "q", sink, client_id="pusher", ack="message", invisible_ms=0)
    send(broker, clock, "q", *[b"%d" % i for i in range(20)])
    got = []
    for _ in range(7):
        got.append(broker.get("g", "q", auto_ack=False, invisible_ms=0))
    sub.grant(5)
    clock.advance(0)
    while (d := broker.get("g", "q", auto_ack=True)) is not None:
        got.append(d)
    pushed = sink.bodies
    assert len(pushed) == 5
    taken = [d.message.body for d in got]
    assert sorted(pushed + taken, key=int) == [b"%d" % i for i in range(20)]  # each exactly once
    # receipts of the push member can be settled at broker level too, and get's receipts by the broker
    broker.ack("g", sink.delivered[0].receipt)
    for d in got[:7]:
        broker.ack("g", d.receipt)
    sub.grant(5)
    clock.advance(0)
    assert len(sink.delivered) == 5  # nothing left for the push member


def test_get_on_a_group_consuming_offsets_online_is_refused(broker, clock):
    broker.create_topic("q", queues=1)
    broker.subscribe("g", "q", RecordingSink(), client_id="c")
    with pytest.raises(TidegateError):
        broker.get("g", "q", auto_ack=True)


def test_get_skips_expired_messages(broker, clock):
    broker.create_topic("q", queues=1)
    now = broker.now_ms()
    broker.publish([Message("q", b"old", expires_at=now + 10), Message("q", b"fresh")])
    clock.advance(1)
    assert broker.get("g", "q", auto_ack=True).message.body == b"fresh"
