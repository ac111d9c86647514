"""The MQTT hot path works on whole reads: plain PUBLISHes staged without packet objects, the PUBACKs of one read
settled with one core call, 3.1.1 deliveries written in one pass. These check the behaviour stays that of handling
each packet on its own."""

from tidegate.adapters.mqtt.codec import (
    Disconnect,
    MqttCodec,
    Properties,
    Puback,
    Publish,
    ReasonCode,
    Subscribe,
    TopicSubscription,
)


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def test_pubacks_of_one_read_settle_in_the_core_and_return_credit(env):
    """Several windows' worth of QoS 1 messages, each window acked in one read: every message arrives once, in
    order, and a persistent session that reconnects afterwards gets nothing again (the core has them acked)."""
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub", clean=False)
    pub.connect("pub")
    sub.send(Subscribe(1, (TopicSubscription("w/#", 1),)))
    env.pump()
    sub.received()
    total = 3 * env.settings.receive_maximum + 5
    pub.send(*(Publish("w/x", str(i).encode(), 1, packet_id=i % 65535 + 1) for i in range(total)))
    got = []
    for _ in range(20):
        env.pump()
        batch = publishes(sub.received())
        got += batch
        if batch:
            sub.send(*(Puback(p.packet_id) for p in batch))
        if len(got) >= total:
            break
    env.pump()
    assert [p.payload for p in got] == [str(i).encode() for i in range(total)]
    assert not any(p.dup for p in got)
    session = env.factory.sessions.sessions["sub"]
    assert session.packets.inflight == {} and session.packets.sent == {}
    sub.send(Disconnect())
    again = env.client(4)
    again.connect("sub", clean=False)
    env.pump()
    assert publishes(again.received() + again.after_connack) == []


def test_unknown_and_repeated_pubacks_in_one_read_are_ignored(env):
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub")
    pub.connect("pub")
    sub.send(Subscribe(1, (TopicSubscription("d/#", 1),)))
    env.pump()
    sub.received()
    pub.send(Publish("d/x", b"1", 1, packet_id=1), Publish("d/x", b"2", 1, packet_id=2))
    env.pump()
    first, second = publishes(sub.received())
    sub.send(Puback(first.packet_id), Puback(first.packet_id), Puback(4000))
    env.pump()
    assert not sub.closed
    session = env.factory.sessions.sessions["sub"]
    assert list(session.packets.inflight) == [second.packet_id]
    sub.send(Puback(second.packet_id))
    env.pump()
    assert session.packets.inflight == {}


def test_one_read_mixing_publishes_pubacks_and_a_subscribe_keeps_packet_order(env):
    """A client that publishes and consumes: its plain PUBLISHes are stored before the PUBACK run and the
    SUBSCRIBE that follow them in the same read, and the PUBACKs of its publishes come out in order."""
    client, other = env.client(4), env.client(4)
    client.connect("both")
    other.connect("other")
    client.send(Subscribe(1, (TopicSubscription("m/#", 1),)))
    env.pump()
    client.received()
    other.send(Publish("m/in", b"for-both", 1, packet_id=1))
    env.pump()
    [delivery] = publishes(client.received())
    client.send(Publish("m/out", b"a", 1, packet_id=10), Publish("m/out", b"b", 0), Puback(delivery.packet_id),
                Publish("m/out", b"c", 1, packet_id=11), Subscribe(2, (TopicSubscription("n/#", 0),)))
    env.pump()
    packets = client.received()
    acks = [p.packet_id for p in packets if isinstance(p, Puback)]
    assert acks == [10, 11]
    assert [p.payload for p in publishes(packets)] == [b"a", b"b", b"c"]  # its own subscription to m/#
    assert env.factory.sessions.sessions["both"].packets.inflight.keys() == {
        p.packet_id for p in publishes(packets) if p.qos}


def test_plain_publish_in_the_connect_read_waits_for_the_login_and_is_stored(env):
    sub = env.client(4)
    sub.connect("sub")
    sub.send(Subscribe(1, (TopicSubscription("c/#", 0),)))
    env.pump()
    sub.received()
    pub = env.client(4)
    from tidegate.adapters.mqtt.codec import Connect
    codec = MqttCodec(server_side=False)
    pub.send_raw(codec.encode(Connect("pub", protocol_level=4)) + codec.encode(Publish("c/x", b"early", 1,
                                                                                      packet_id=3)))
    env.pump()
    assert [p.payload for p in publishes(sub.received())] == [b"early"]
    assert any(isinstance(p, Puback) and p.packet_id == 3 for p in pub.received())


def test_a_plain_publish_to_sys_is_still_refused(env):
    """$SYS names never reach the cached fast path: a 3.1.1 publisher is closed, a v5 one gets PUBACK 0x87."""
    v5 = env.client(5)
    v5.connect("v5")
    v5.send(Publish("$SYS/x", b"1", 1, packet_id=1), Publish("$SYS/x", b"2", 1, packet_id=2))
    env.pump()
    assert [(p.packet_id, p.reason_code) for p in v5.received() if isinstance(p, Puback)] == [
        (1, ReasonCode.NOT_AUTHORIZED), (2, ReasonCode.NOT_AUTHORIZED)]
    v4 = env.client(4)
    v4.connect("v4")
    v4.send(Publish("$SYS/x", b"1", 1, packet_id=1))
    env.pump()
    assert v4.closed


def test_qos0_deliveries_in_one_pass_are_acked_in_the_core(env):
    """QoS 0 deliveries to a 3.1.1 client are acked to the core with the batch: a persistent session gets none
    of them again after reconnecting."""
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub0", clean=False)
    pub.connect("pub")
    sub.send(Subscribe(1, (TopicSubscription("z/#", 0),)))
    env.pump()
    sub.received()
    pub.send(*(Publish("z/x", str(i).encode(), 0) for i in range(50)))
    env.pump()
    assert [p.payload for p in publishes(sub.received())] == [str(i).encode() for i in range(50)]
    sub.send(Disconnect())
    again = env.client(4)
    again.connect("sub0", clean=False)
    env.pump()
    assert publishes(again.received() + again.after_connack) == []


def _subscriber_bytes(env, sizes):
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub")
    pub.connect("pub")
    sub.send(Subscribe(1, (TopicSubscription("f/#", 1), TopicSubscription("g", 0))))
    env.pump()
    sub.received()
    packets = []
    for i, size in enumerate(sizes):
        packets.append(Publish("f/x" if i % 3 else "g", bytes([i % 251]) * size, i % 2, packet_id=i + 1 if i % 2
                               else None))
    pub.send(*packets)
    env.pump()
    data = sub.transport.value()
    sub.transport.clear()
    return data


def test_one_pass_deliveries_are_byte_for_byte_the_general_path(make_env, monkeypatch):
    """The 3.1.1 one-pass writer against the general path (`_decide` + `_transmit`): the same bytes for QoS 0 and
    1, two names, payloads in every remaining-length size class up to past 16 KiB (where it hands over)."""
    from tidegate.adapters.mqtt.outbound import Outbound

    sizes = [0, 1, 100, 125, 126, 127, 200, 256, 16_370, 16_380, 16_400, 20_000, 3, 256]
    fast = _subscriber_bytes(make_env(), sizes)
    monkeypatch.setattr(Outbound, "_deliver_v311", lambda self, key, deliveries: 0)
    general = _subscriber_bytes(make_env(), sizes)
    assert fast == general and len(fast) > sum(sizes)


def test_no_local_holds_for_every_publish_of_a_read_whichever_path_staged_it(env):
    """A v5 client with a No Local subscription never gets its own messages back (MQTT-3.8.3-3), also when the
    read's batch was started by the general path: the first publish to a new name, or one with properties."""
    me, watcher = env.client(5), env.client(5)
    me.connect("me")
    watcher.connect("watcher")
    me.send(Subscribe(1, (TopicSubscription("nl/#", 1, no_local=True),)))
    watcher.send(Subscribe(1, (TopicSubscription("nl/#", 1),)))
    env.pump()
    me.received(), watcher.received()
    me.send(*(Publish("nl/new", f"m{i}".encode(), 1, packet_id=i + 1) for i in range(4)))  # a name not seen yet
    env.pump()
    me.send(Publish("nl/new", b"p", 1, packet_id=10, properties=Properties(content_type="text/plain")),
            Publish("nl/new", b"q", 1, packet_id=11))  # a publish with properties starts the batch
    env.pump()
    seen = publishes(watcher.received())
    assert [p.payload for p in seen] == [b"m0", b"m1", b"m2", b"m3", b"p", b"q"]
    assert publishes(me.received()) == []
