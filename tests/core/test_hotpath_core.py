"""The core's hot path (issue 10): cached fan-out destinations follow bindings, in-order acks take a shortcut that
commits exactly what the general path commits, and a batch's visibility and results are what one-by-one gives."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.api import AckMode
from tidegate.core.model import Message, QueueRef
from tidegate.core.testing import RecordingSink, make_broker


@pytest.fixture
def clock():
    c = MemoryReactorClock()
    c.advance(1_700_000_000.0)
    return c


@pytest.fixture
def broker(clock):
    b = make_broker(clock)
    yield b
    b.close()


def bodies(broker, queue):
    return [d.message.body for d in broker.pull(queue, 0, 100).messages]


def test_cached_destinations_follow_bind_and_unbind(broker, clock):
    """The destinations of a name are cached per (home queue, matched queues): binding and unbinding between
    publishes of the same name still changes where the next one goes."""
    broker.create_topic("T", queues=1)
    broker.create_topic("%SESSION%a", queues=1, internal=True)
    session = QueueRef("%SESSION%a", 0)
    broker.publish([Message(topic="T", subject="x", body=b"before")])
    broker.bind("T/#", session)
    broker.publish([Message(topic="T", subject="x", body=b"bound")])
    broker.unbind("T/#", session)
    broker.publish([Message(topic="T", subject="x", body=b"after")])
    clock.advance(0)
    assert bodies(broker, QueueRef("T", 0)) == [b"before", b"bound", b"after"]
    assert bodies(broker, session) == [b"bound"]


def test_a_batch_gives_the_results_and_visibility_of_single_publishes(broker, clock):
    broker.create_topic("B", queues=2)
    broker.create_topic("%SESSION%s", queues=1, internal=True)
    broker.bind("B/#", QueueRef("%SESSION%s", 0))
    results = broker.publish([Message(topic="B", subject="k", body=bytes([i])) for i in range(5)])
    assert [(r.queue_id, r.queue_offset, r.bound) for r in results] == [(0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1),
                                                                        (0, 2, 1)]
    assert all(r.commit_end > r.commit_offset for r in results)
    clock.advance(0)
    assert bodies(broker, QueueRef("B", 0)) == [b"\x00", b"\x02", b"\x04"]
    assert bodies(broker, QueueRef("%SESSION%s", 0)) == [bytes([i]) for i in range(5)]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0], [0, 2, 1, 3]])
def test_acks_in_any_order_commit_the_same_offset(broker, clock, order):
    broker.create_topic("t", queues=1)
    sink = RecordingSink()
    sub = broker.subscribe("g", "t", sink, client_id="c", ack=AckMode.MESSAGE, invisible_ms=0, start="earliest")
    sub.grant(10)
    broker.publish([Message(topic="t", body=bytes([i])) for i in range(4)])
    clock.advance(0)
    committed = []
    for index in order:
        sub.ack(sink.delivered[index].receipt)
        committed.append(broker.committed_offsets("g").get(QueueRef("t", 0), 0))
    expected, acked = [], set()
    for index in order:  # the committed offset is the first offset not acked yet
        acked.add(index)
        first_gap = 0
        while first_gap in acked:
            first_gap += 1
        expected.append(first_gap)
    assert committed == expected
