"""Queue length limits: x-max-length and x-max-length-bytes with x-overflow drop-head, reject-publish and
reject-publish-dlx, for AMQP publishers and for messages that reach the queue from native/MQTT publishers through
core bindings. Protocol tests with StringTransport on an in-memory broker."""

from __future__ import annotations

from pamqp import commands

from tidegate.adapters.amqp.codec import ContentEvent
from tidegate.core.model import Message

from .protocol_helpers import World

Basic, Queue, Confirm = commands.Basic, commands.Queue, commands.Confirm


def drain(client, queue: str) -> list[bytes]:
    bodies = []
    while True:
        client.send(1, Basic.Get(queue=queue, no_ack=True))
        events = client.received()
        got = [e.body for e in events if isinstance(e, ContentEvent)]
        if not got:
            return bodies
        bodies += got


def setup(arguments: dict, confirm: bool = False):
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="bounded", arguments=arguments), Queue.DeclareOk)
    if confirm:
        client.call(1, Confirm.Select(), Confirm.SelectOk)
    return world, client


def test_reject_publish_nacks_the_publishes_a_full_queue_refuses_and_keeps_the_first():
    world, client = setup({"x-max-length": 2, "x-overflow": "reject-publish"}, confirm=True)
    for i in range(4):
        client.publish(1, "", "bounded", b"%d" % i)
    world.turn()
    confirms = [(type(m).__name__, m.delivery_tag, m.multiple) for m in client.methods()]
    assert confirms == [("Ack", 1, True), ("Ack", 2, True), ("Nack", 3, False), ("Nack", 4, False)]
    assert drain(client, "bounded") == [b"0", b"1"]


def test_reject_publish_in_one_read_counts_what_is_not_visible_yet():
    world, client = setup({"x-max-length": 2, "x-overflow": "reject-publish"}, confirm=True)
    client.raw(b"".join(client.codec.send_content(1, Basic.Publish(exchange="", routing_key="bounded"),
                                                  commands.Basic.Properties(), b"%d" % i) for i in range(3)))
    world.turn()
    confirms = [(type(m).__name__, m.delivery_tag) for m in client.methods()]
    assert confirms == [("Ack", 2), ("Nack", 3)]
    assert drain(client, "bounded") == [b"0", b"1"]


def test_reject_publish_without_confirms_drops_silently_and_the_channel_stays_open():
    world, client = setup({"x-max-length": 1, "x-overflow": "reject-publish"})
    client.publish(1, "", "bounded", b"kept")
    client.publish(1, "", "bounded", b"dropped")
    assert client.methods() == []
    assert drain(client, "bounded") == [b"kept"]
    client.publish(1, "", "bounded", b"room again")
    assert drain(client, "bounded") == [b"room again"]


def test_reject_publish_dlx_dead_letters_what_the_full_queue_refuses():
    world, client = setup({"x-max-length": 1, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": "",
                           "x-dead-letter-routing-key": "dead"}, confirm=True)
    client.call(1, Queue.Declare(queue="dead"), Queue.DeclareOk)
    client.publish(1, "", "bounded", b"kept")
    client.publish(1, "", "bounded", b"refused")
    world.turn()
    assert [type(m).__name__ for m in client.methods()] == ["Ack", "Nack"]
    assert drain(client, "bounded") == [b"kept"]
    client.send(1, Basic.Get(queue="dead", no_ack=True))
    got = [e for e in client.received() if isinstance(e, ContentEvent)]
    assert [e.body for e in got] == [b"refused"]
    assert got[0].properties.headers["x-death"][0]["reason"] == "maxlen"


def test_max_length_bytes_with_drop_head_drops_the_oldest_until_the_bytes_fit():
    world, client = setup({"x-max-length-bytes": 10})
    for body in (b"aaaa", b"bbbb", b"cccc", b"dd"):
        client.publish(1, "", "bounded", body)
    world.turn()
    assert drain(client, "bounded") == [b"bbbb", b"cccc", b"dd"]  # 10 bytes


def test_max_length_bytes_with_reject_publish_nacks_what_does_not_fit():
    world, client = setup({"x-max-length-bytes": 10, "x-overflow": "reject-publish"}, confirm=True)
    for body in (b"aaaa", b"bbbb", b"cccc", b"dd"):
        client.publish(1, "", "bounded", body)
    world.turn()
    assert [(type(m).__name__, m.delivery_tag) for m in client.methods()] == \
        [("Ack", 1), ("Ack", 2), ("Nack", 3), ("Ack", 4)]
    assert drain(client, "bounded") == [b"aaaa", b"bbbb", b"dd"]


def test_max_length_bytes_counts_consumed_and_requeued_messages():
    world, client = setup({"x-max-length-bytes": 8, "x-overflow": "reject-publish"}, confirm=True)
    client.publish(1, "", "bounded", b"aaaa")
    client.publish(1, "", "bounded", b"bbbb")
    client.send(1, Basic.Get(queue="bounded"))  # taken, not acked: no longer ready
    client.received()
    client.publish(1, "", "bounded", b"cccc")  # fits: 8 bytes ready
    client.send(1, Basic.Recover(requeue=True))  # aaaa is ready again: 12 bytes
    client.received()
    client.publish(1, "", "bounded", b"dddd")
    world.turn()
    assert [type(m).__name__ for m in client.methods()] == ["Nack"]
    assert sorted(drain(client, "bounded")) == [b"aaaa", b"bbbb", b"cccc"]


def test_max_length_drop_head_holds_for_native_publishes_reaching_a_bound_queue():
    world, client = setup({"x-max-length": 2})
    client.call(1, Queue.Bind(queue="bounded", exchange="amq.topic", routing_key="sensors.#"), Queue.BindOk)
    world.broker.publish([Message(topic="sensors", subject="t", body=b"%d" % i) for i in range(5)])
    world.turn()
    world.turn()
    assert drain(client, "bounded") == [b"3", b"4"]


def test_reject_publish_holds_for_native_publishes_reaching_a_bound_queue():
    world, client = setup({"x-max-length": 2, "x-overflow": "reject-publish"})
    client.call(1, Queue.Bind(queue="bounded", exchange="amq.topic", routing_key="sensors.#"), Queue.BindOk)
    results = world.broker.publish([Message(topic="sensors", subject="t", body=b"%d" % i) for i in range(5)])
    assert [r.bound for r in results] == [1, 1, 0, 0, 0]
    world.turn()
    assert drain(client, "bounded") == [b"0", b"1"]
    # the messages the queue refused are still stored under their own topic for native consumers
    assert len(world.broker.list_by_time("sensors", 0, 2**62)) == 5


def test_a_deleted_limited_queue_unhooks_its_limits_from_the_core():
    world, client = setup({"x-max-length": 1, "x-overflow": "reject-publish"})
    client.call(1, Queue.Delete(queue="bounded"), Queue.DeleteOk)
    assert not world.broker._producer.admission and not world.broker._visibility.growth_listeners
