"""The core's hot path (issue 10): cached fan-out destinations follow bindings, in-order acks take a shortcut that
commits exactly what the general path commits, and a batch's visibility and results are what one-by-one gives."""

import pytest

from tidegate.core.api import AckMode
from tidegate.core.model import Message, QueueRef
from tidegate.core.testing import RecordingSink, make_broker


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


def test_round_robin_goes_on_across_batches_and_topics_interleaved_in_one_batch(broker, clock):
    """The round-robin position is kept per run of a topic and written back: it continues from batch to batch and
    when one batch goes back and forth between topics, as publishing one message at a time would."""
    broker.create_topic("R", queues=3)
    broker.create_topic("S", queues=2)
    first = broker.publish([Message(topic="R", body=b"r")] * 2)
    mixed = broker.publish([Message(topic="R", body=b"r"), Message(topic="S", body=b"s"),
                            Message(topic="R", body=b"r"), Message(topic="S", body=b"s")])
    last = broker.publish([Message(topic="R", body=b"r")] * 2)
    assert [r.queue_id for r in first] == [0, 1]
    assert [(r.topic, r.queue_id) for r in mixed] == [("R", 2), ("S", 0), ("R", 0), ("S", 1)]
    assert [r.queue_id for r in last] == [1, 2]


def test_a_batch_makes_the_first_messages_of_new_queues_visible_from_their_first_offset(broker, clock):
    """A queue's first message ever sets where its visible range starts: found after the batch, it is the first
    offset the batch put there (here: queue 1 of T and the bound queue both start at 0)."""
    broker.create_topic("T", queues=2)
    broker.create_topic("%SESSION%v", queues=1, internal=True)
    broker.bind("T/#", QueueRef("%SESSION%v", 0))
    broker.publish([Message(topic="T", subject="x", body=bytes([i])) for i in range(4)])
    clock.advance(0)
    assert bodies(broker, QueueRef("T", 0)) == [b"\x00", b"\x02"]
    assert bodies(broker, QueueRef("T", 1)) == [b"\x01", b"\x03"]
    assert bodies(broker, QueueRef("%SESSION%v", 0)) == [bytes([i]) for i in range(4)]


def test_a_published_batch_is_cached_and_charged_within_the_budget(clock):
    """The publish path fills the message cache inline and charges it once per batch: afterwards the cache holds
    the newest messages and never more than its budget."""
    from tidegate.core.config import BrokerConfig
    from tidegate.core.reader import CACHE_ENTRY_OVERHEAD

    budget = 64 * 1024
    b = make_broker(clock, config=BrokerConfig(message_cache_bytes=budget))
    try:
        results = b.publish([Message(topic="C", body=b"m" * 1000) for _ in range(200)])
        reader = b._reader
        assert reader.cache_bytes <= budget
        kept = sorted(reader.cache)
        assert kept == [r.commit_offset for r in results][-len(kept):]  # the newest, oldest evicted first
        assert reader.cache_bytes == sum(r.commit_end - r.commit_offset + CACHE_ENTRY_OVERHEAD
                                         for r in results if r.commit_offset in reader.cache)
    finally:
        b.close()
