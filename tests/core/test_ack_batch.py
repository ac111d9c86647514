"""`Subscription.ack_delivered`: many deliveries settled in one call, exactly as acking each receipt would."""

import pytest

from tidegate.core.errors import InvalidReceipt
from tidegate.core.model import Message, QueueRef
from tidegate.core.testing import RecordingSink


def send(broker, clock, topic, *bodies):
    broker.publish([Message(topic=topic, body=b) for b in bodies])
    clock.advance(0)


def subscribe(broker, client_id="c1", ack="message"):
    sink = RecordingSink()
    sub = broker.subscribe("g", "t", sink, client_id=client_id, ack=ack, invisible_ms=0, start="earliest")
    sub.grant(100)
    return sub, sink


def test_in_order_batch_moves_the_committed_offset_once_to_the_end(broker, clock):
    broker.create_topic("t", queues=1)
    sub, sink = subscribe(broker)
    send(broker, clock, "t", b"a", b"b", b"c", b"d")
    assert sub.ack_delivered(sink.delivered[:3]) == 3
    assert broker.committed_offsets("g")[QueueRef("t", 0)] == 3
    assert sub.ack_delivered(sink.delivered[3:]) == 1
    assert broker.committed_offsets("g")[QueueRef("t", 0)] == 4


def test_out_of_order_batch_commits_only_below_the_first_gap(broker, clock):
    broker.create_topic("t", queues=1)
    sub, sink = subscribe(broker)
    send(broker, clock, "t", b"a", b"b", b"c", b"d")
    d = sink.delivered
    assert sub.ack_delivered([d[3], d[1]]) == 2
    assert broker.committed_offsets("g")[QueueRef("t", 0)] == 0
    assert sub.ack_delivered([d[0]]) == 1
    assert broker.committed_offsets("g")[QueueRef("t", 0)] == 2
    sub.ack(d[2].receipt)  # the per-message ack and the batch share one progress
    assert broker.committed_offsets("g")[QueueRef("t", 0)] == 4


def test_a_batch_over_several_queues_settles_each(broker, clock):
    broker.create_topic("t", queues=3)
    sub, sink = subscribe(broker)
    send(broker, clock, "t", *(str(i).encode() for i in range(9)))
    assert sub.ack_delivered(sink.delivered) == 9
    assert broker.committed_offsets("g") == {QueueRef("t", q): 3 for q in range(3)}


def test_stale_and_repeated_deliveries_are_skipped_not_refused(broker, clock):
    """A delivery acked twice, or redelivered meanwhile (its attempt changed), is not settled again: a
    per-message ack of it would raise InvalidReceipt, the batch skips it and counts only what it settled."""
    broker.create_topic("t", queues=1)
    sub, sink = subscribe(broker)
    send(broker, clock, "t", b"a", b"b")
    first = list(sink.delivered)
    assert sub.ack_delivered(first[:1]) == 1
    assert sub.ack_delivered(first) == 1  # only b: a is already settled
    with pytest.raises(InvalidReceipt):
        sub.ack(first[0].receipt)
    send(broker, clock, "t", b"c")
    other, other_sink = subscribe(broker, client_id="c2")
    sub.close()  # c is released and redelivered to the other member with attempt 2
    clock.advance(0)
    [again] = other_sink.delivered
    assert again.attempt == 2
    assert other.ack_delivered([sink.delivered[-1]]) == 0  # the attempt-1 delivery is stale
    assert other.ack_delivered([again]) == 1
    assert broker.committed_offsets("g")[QueueRef("t", 0)] == 3


def test_offset_mode_groups_refuse_it_as_they_refuse_ack(broker, clock):
    broker.create_topic("t", queues=1)
    sub, sink = subscribe(broker, ack="offset")
    send(broker, clock, "t", b"a")
    with pytest.raises(InvalidReceipt):
        sub.ack_delivered(sink.delivered)
