"""Flow control of the AMQP adapter: connection.blocked/unblocked under resource alarms (core/alarms.py), and
channel.flow. Protocol tests with StringTransport and MemoryReactorClock on an in-memory broker."""

from __future__ import annotations

from pamqp import commands

from tidegate.adapters.amqp.codec import ContentEvent

from .protocol_helpers import World

Basic, Queue, Channel, Connection, Confirm = (commands.Basic, commands.Queue, commands.Channel, commands.Connection,
                                              commands.Confirm)


def _publisher(world: World, capable: bool = True):
    client = world.client(capabilities={"connection.blocked": capable})
    client.open_channel(1)
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    return client


def test_a_publish_during_an_alarm_blocks_the_connection_and_the_clear_unblocks_it():
    world = World()
    client = _publisher(world)
    client.publish(1, "", "q", b"before")
    assert client.methods() == []
    world.broker.alarms.set("memory", True, "resident memory over the watermark")
    blocked = client.methods()
    assert [type(m) for m in blocked] == [Connection.Blocked]  # it published before: told at once
    assert "memory" in blocked[0].reason
    assert client.transport.producerState == "producing"  # still read until it publishes
    client.publish(1, "", "q", b"during")
    assert client.transport.producerState == "paused"  # no longer read
    assert client.methods() == []  # connection.blocked is not repeated
    world.broker.alarms.set("memory", False)
    assert [type(m) for m in client.methods()] == [Connection.Unblocked]
    assert client.transport.producerState == "producing"
    client.call(1, Basic.Get(queue="q", no_ack=True), Basic.GetOk)


def test_a_client_without_the_capability_is_blocked_but_not_told():
    world = World()
    client = _publisher(world, capable=False)
    world.broker.alarms.set("storage", True, "fsync failed")
    client.publish(1, "", "q", b"x")
    assert client.methods() == []
    assert client.transport.producerState == "paused"
    world.broker.alarms.set("storage", False)
    assert client.methods() == []
    assert client.transport.producerState == "producing"


def test_consumers_are_neither_blocked_nor_told_during_an_alarm():
    world = World()
    consumer = world.client(capabilities={"connection.blocked": True})
    consumer.open_channel(1)
    consumer.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    world.broker.alarms.set("memory", True, "high")
    assert consumer.methods() == []
    consumer.call(1, Basic.Get(queue="q"), Basic.GetEmpty)  # still read and answered
    assert consumer.transport.producerState == "producing"


def test_a_blocked_connection_is_not_dropped_by_the_heartbeat_check():
    world = World()
    client = world.client(capabilities={"connection.blocked": True}, heartbeat=10)
    client.open_channel(1)
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    world.broker.alarms.set("memory", True, "high")
    client.publish(1, "", "q", b"x")
    world.clock.advance(60)  # its heartbeats are not read meanwhile
    assert client.protocol.connected_ and not client.transport.disconnecting
    world.broker.alarms.set("memory", False)
    world.clock.advance(15)  # read again: the heartbeat check runs from the unblocking on
    assert not client.transport.disconnecting


def test_publishes_read_before_the_block_are_stored_and_confirmed():
    world = World()
    client = _publisher(world)
    client.call(1, Confirm.Select(), Confirm.SelectOk)
    world.broker.alarms.set("storage", True, "disk full")
    client.publish(1, "", "q", b"one")
    world.turn()
    methods = client.methods()
    assert [type(m) for m in methods] == [Connection.Blocked, Basic.Ack]


def test_channel_flow_off_stops_deliveries_on_that_channel_and_on_resumes_them():
    world = World()
    consumer = world.client()
    consumer.open_channel(1)
    consumer.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    assert consumer.consume(1, queue="q", consumer_tag="c") == []
    assert consumer.call(1, Channel.Flow(active=False), Channel.FlowOk).active is False
    publisher = world.client()
    publisher.open_channel(1)
    for i in range(3):
        publisher.publish(1, "", "q", b"m%d" % i)
    world.turn()
    assert consumer.received() == []
    assert consumer.call(1, Queue.Declare(queue="q", passive=True), Queue.DeclareOk).message_count == 3
    consumer.send(1, Channel.Flow(active=True))
    events = consumer.received()
    assert isinstance(events[0].method, Channel.FlowOk) and events[0].method.active is True
    deliveries = [e for e in events[1:] if isinstance(e, ContentEvent)]
    assert [d.body for d in deliveries] == [b"m0", b"m1", b"m2"]
