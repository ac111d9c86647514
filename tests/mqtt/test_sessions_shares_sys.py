"""Sessions across restarts, shared subscriptions, $SYS and flow control of the MQTT adapter."""

from tidegate.adapters.mqtt.codec import (
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Subscribe,
    TopicSubscription,
)
from tidegate.adapters.mqtt.settings import MqttSettings


def subscribe(client, env, *filters, qos=1, packet_id=1):
    client.send(Subscribe(packet_id, tuple(TopicSubscription(f, qos) for f in filters)))
    env.pump()
    return client.received()


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def test_subscriptions_and_queued_messages_survive_a_broker_restart(env):
    sub = env.client(4)
    sub.connect("keeper", clean=False)
    subscribe(sub, env, "persist/#")
    sub.drop()
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("persist/1", b"while away", 1, packet_id=1))
    env.pump()
    env2 = env.restart()
    back = env2.client(4)
    assert back.connect("keeper", clean=False).session_present
    env2.pump()
    assert [p.payload for p in publishes(back.received())] == [b"while away"]
    pub2 = env2.client(4)
    pub2.connect("pub")
    pub2.send(Publish("persist/2", b"after restart", 1, packet_id=1))
    env2.pump()
    assert [p.payload for p in publishes(back.received())] == [b"after restart"]


def test_sessions_expired_while_down_are_removed_on_startup(env):
    c = env.client(5)
    c.connect("short", clean=False, properties=Properties(session_expiry_interval=60))
    subscribe(c, env, "gone/#")
    c.drop()
    env.clock.advance(1)
    env.broker.flush_offsets()
    later = env.restart()
    later.clock.advance(0)
    env3 = later.restart()  # still within 60 s: kept
    assert "short" in env3.factory.sessions.sessions
    env3.clock.advance(120)
    env4 = env3.restart()
    assert "short" not in env4.factory.sessions.sessions
    assert env4.broker.bindings() == []


def test_clean_session_left_by_a_crash_is_removed_on_startup(env):
    c = env.client(4)
    c.connect("crashy", clean=True)
    subscribe(c, env, "x")
    env2 = env.restart()  # the connection never closed: the broker died
    assert "crashy" not in env2.factory.sessions.sessions
    assert env2.broker.bindings() == []


def test_inbound_qos2_ids_survive_reconnect(env):
    """A QoS 2 PUBLISH resent after reconnecting (PUBREL not yet received) is not published twice."""
    watcher = env.client(4)
    watcher.connect("w")
    subscribe(watcher, env, "eo")
    pub = env.client(4)
    pub.connect("pub2", clean=False)
    pub.send(Publish("eo", b"x", 2, packet_id=11))
    env.pump()
    assert pub.received() == [Pubrec(11)]
    pub.drop()
    again = env.client(4)
    again.connect("pub2", clean=False)
    again.send(Publish("eo", b"x", 2, dup=True, packet_id=11))
    env.pump()
    assert again.received() == [Pubrec(11)]
    again.send(Pubrel(11))
    assert again.received() == [Pubcomp(11)]
    env.pump()
    assert [p.payload for p in publishes(watcher.received())] == [b"x"]


def test_outbound_pubrel_is_resent_after_reconnect(env):
    sub = env.client(4)
    sub.connect("q2", clean=False)
    subscribe(sub, env, "q2", qos=2)
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("q2", b"m", 2, packet_id=1))
    env.pump()
    [p] = publishes(sub.received())
    sub.send(Pubrec(p.packet_id))
    assert sub.received() == [Pubrel(p.packet_id)]
    sub.drop()
    back = env.client(4)
    back.connect("q2", clean=False)
    env.pump()
    assert back.after_connack + back.received() == [Pubrel(p.packet_id)]  # the client already has the message
    back.send(Pubcomp(p.packet_id))
    env.pump()
    assert back.received() == []


def test_shared_subscription_balances_between_members(env):
    """Each message goes to one member; a member gets more only as it acknowledges (credit = Receive Maximum)."""
    members = []
    for i in range(2):
        c = env.client(5)
        c.connect(f"worker-{i}", properties=Properties(receive_maximum=3))
        assert subscribe(c, env, "$share/workers/jobs/#") [0].reason_codes == (ReasonCode.GRANTED_QOS_1,)
        members.append(c)
    plain = env.client(5)
    plain.connect("observer")
    subscribe(plain, env, "jobs/#")
    pub = env.client(4)
    pub.connect("pub")
    for i in range(10):
        pub.send(Publish(f"jobs/{i}", str(i).encode(), 1, packet_id=i + 1))
    env.pump(10)
    got: list[list[bytes]] = [[], []]
    for _ in range(10):
        for index, member in enumerate(members):
            for p in publishes(member.received()):
                got[index].append(p.payload)
                member.send(Puback(p.packet_id))
        env.pump()
    bodies = sorted(got[0] + got[1])
    assert bodies == sorted(str(i).encode() for i in range(10))  # each job exactly once across the group
    assert got[0] and got[1]  # and both members got some
    assert len(publishes(plain.received())) == 10  # a plain subscriber still sees every message


def test_shared_subscription_topic_removed_with_its_last_member(env):
    c = env.client(5)
    c.connect("only")
    subscribe(c, env, "$share/g/s")
    assert any(t.name.startswith("%MQTTSHARE%") for t in env.broker.list_topics(include_internal=True))
    c.drop()
    assert not any(t.name.startswith("%MQTTSHARE%") for t in env.broker.list_topics(include_internal=True))


def test_sys_topics_are_published_to_sys_subscribers_only(env):
    env.settings.sys_interval = 5
    env.factory.sys.start()
    sys_sub = env.client(4)
    sys_sub.connect("sys")
    snapshot = publishes(subscribe(sys_sub, env, "$SYS/broker/#", qos=0))
    assert "$SYS/broker/version" in {p.topic for p in snapshot} and all(p.retain for p in snapshot)
    everything = env.client(4)
    everything.connect("all")
    subscribe(everything, env, "#")
    env.clock.advance(5)
    periodic = {p.topic: p.payload for p in publishes(sys_sub.received())}
    assert periodic["$SYS/broker/clients/connected"] == b"2"
    assert publishes(everything.received()) == []
    assert env.broker.bindings() == [("#", env.factory.sessions.get("all").queue)]


def test_inbound_receive_maximum_exceeded_disconnects(make_env):
    env = make_env(MqttSettings(receive_maximum=2, sys_interval=0))
    c = env.client(5)
    c.connect("flood")
    c.send(*(Publish("f", b"", 1, packet_id=i) for i in range(1, 4)))
    assert [p.reason_code for p in c.received()] == [ReasonCode.RECEIVE_MAXIMUM_EXCEEDED]


def test_clean_session_drops_qos0_beyond_max_queued(make_env):
    env = make_env(MqttSettings(max_queued_messages=3, receive_maximum=32, sys_interval=0))
    sub = env.client(4)
    sub.connect("slow")
    subscribe(sub, env, "flood", qos=0)
    pub = env.client(4)
    pub.connect("pub")
    pub.send(*(Publish("flood", str(i).encode(), 0) for i in range(10)))
    env.pump()
    got = [p.payload for p in publishes(sub.received())]
    assert got[-3:] == [b"7", b"8", b"9"] and len(got) < 10


def test_paused_transport_holds_qos0_credit(make_env):
    """While the socket buffer is full, nothing is written and QoS 0 credit is held, so the core stops pushing into
    memory: at most the credit (4) waits in the connection; on resume everything arrives."""
    env = make_env(MqttSettings(receive_maximum=4, sys_interval=0))
    sub = env.client(4)
    sub.connect("paused")
    subscribe(sub, env, "p", qos=0)
    sub.protocol.pauseProducing()
    pub = env.client(4)
    pub.connect("pub")
    pub.send(*(Publish("p", str(i).encode(), 0) for i in range(10)))
    env.pump()
    assert publishes(sub.received()) == []
    assert len(sub.protocol.outbound.pending) <= 4
    sub.protocol.resumeProducing()
    env.pump()
    assert [p.payload for p in publishes(sub.received())] == [str(i).encode() for i in range(10)]
