"""x-max-priority: with a backlog, a consumer gets the highest priorities first (a reorder window of the adapter
over the log-ordered core queue); priorities above the maximum count as the maximum."""

from __future__ import annotations

from pamqp import commands

from tidegate.adapters.amqp.codec import ContentEvent
from tidegate.adapters.amqp.model import message_priority
from tidegate.core.model import Message

from .protocol_helpers import World

Basic, Queue = commands.Basic, commands.Queue


def publish_priorities(client, priorities, queue="prio"):
    for index, priority in enumerate(priorities):
        properties = commands.Basic.Properties(priority=priority, headers={"n": index},
                                               content_type="text/plain")
        client.publish(1, "", queue, b"p%s-%d" % (str(priority).encode(), index), properties)


def test_a_consumer_gets_the_backlog_highest_priority_first_one_prefetch_at_a_time():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="prio", arguments={"x-max-priority": 10}), Queue.DeclareOk)
    publish_priorities(client, [1, 5, None, 9, 5, 3])
    world.turn()
    client.call(1, Basic.Qos(prefetch_count=1), Basic.QosOk)
    order = [e.body for e in client.consume(1, queue="prio", consumer_tag="c")]
    while True:
        assert len(order) <= 6
        client.send(1, Basic.Ack(delivery_tag=0, multiple=True))
        got = [e.body for e in client.received() if isinstance(e, ContentEvent)]
        if not got:
            break
        order += got
    # highest first; equal priorities in publish order; no priority counts as 0
    assert order == [b"p9-3", b"p5-1", b"p5-4", b"p3-5", b"p1-0", b"pNone-2"]


def test_priorities_above_the_maximum_count_as_the_maximum():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="prio", arguments={"x-max-priority": 5}), Queue.DeclareOk)
    publish_priorities(client, [200, 5, 7])  # all three are priority 5: publish order
    publish_priorities(client, [9])
    world.turn()
    client.call(1, Basic.Qos(prefetch_count=1), Basic.QosOk)
    first = client.consume(1, queue="prio", consumer_tag="c")
    assert [e.body for e in first] == [b"p200-0"]
    assert first[0].properties.priority == 200  # the property itself is delivered as published


def test_held_deliveries_go_back_to_the_queue_when_the_consumer_is_cancelled():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="prio", arguments={"x-max-priority": 10}), Queue.DeclareOk)
    publish_priorities(client, [1, 2, 3])
    world.turn()
    client.call(1, Basic.Qos(prefetch_count=1), Basic.QosOk)
    assert [e.body for e in client.consume(1, queue="prio", consumer_tag="c")] == [b"p3-2"]
    client.call(1, Basic.Cancel(consumer_tag="c"), Basic.CancelOk)
    client.send(1, Basic.Ack(delivery_tag=1))
    client.received()
    bodies = []
    for _ in range(3):
        client.send(1, Basic.Get(queue="prio", no_ack=True))
        bodies += [e.body for e in client.received() if isinstance(e, ContentEvent)]
    assert sorted(bodies) == [b"p1-0", b"p2-1"]


def test_message_priority_reads_the_raw_property_list_and_defaults_to_zero():
    assert message_priority(Message(topic="t", body=b"")) == 0
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.publish(1, "", "q", b"x", commands.Basic.Properties(content_type="a", content_encoding="gzip",
                                                               headers={"k": "v", "n": 1}, delivery_mode=2,
                                                               priority=7))
    stored = world.broker.list_by_time("%AMQP%q", 0, 2**62)
    assert [message_priority(m) for m in stored] == [7]
