"""The MQTT adapter over the core broker, driven through StringTransport and MemoryReactorClock."""

from tidegate.adapters.mqtt.codec import (
    Auth,
    Connack,
    Disconnect,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    TopicSubscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from tidegate.core.model import Message, MessageFlag
from tidegate.core.testing import RecordingSink


def subscribe(client, env, *filters, qos=1, packet_id=1, **options):
    client.send(Subscribe(packet_id, tuple(TopicSubscription(f, qos, **options) for f in filters)))
    env.pump()
    return client.received()


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


# ---------------------------------------------------------------------------------------------- CONNECT


def test_connack_for_each_protocol_level(env):
    """MQTT 3.1 (level 3), 3.1.1 (4) and 5 clients are accepted with a CONNACK in their own format."""
    for level in (3, 4, 5):
        client = env.client(level)
        connack = client.connect(f"client-{level}")
        assert isinstance(connack, Connack) and connack.reason_code == ReasonCode.SUCCESS
        assert not connack.session_present
    assert env.broker.metrics.connections["mqtt"] == 3
    assert env.broker.metrics.connections_total["mqtt"] == 3


def test_v5_connack_announces_server_limits(env):
    connack = env.client(5).connect("c5")
    props = connack.properties
    assert props.receive_maximum == 32
    assert props.maximum_packet_size == env.settings.max_packet_size
    assert props.topic_alias_maximum == 16


def test_empty_client_id_is_assigned_with_clean_start(env):
    """v5 gets the assigned id back as Assigned Client Identifier; without clean start it is refused (0x85 / 2)."""
    connack = env.client(5).connect("")
    assert connack.properties.assigned_client_identifier.startswith("tidegate-")
    assert env.client(4).connect("", clean=True).reason_code == ReasonCode.SUCCESS
    refused = env.client(4)
    assert refused.connect("", clean=False).reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    assert refused.closed
    refused5 = env.client(5)
    assert refused5.connect("", clean=False).reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID


def test_unsupported_protocol_level_gets_return_code_1(env):
    client = env.client(4)
    client.send_raw(b"\x10\x0d\x00\x04MQTT\x07\x02\x00\x3c\x00\x01x")
    assert client.transport.value() == b"\x20\x02\x00\x01"
    assert client.closed


def test_enhanced_authentication_is_refused(env):
    client = env.client(5)
    connack = client.connect("c", properties=Properties(authentication_method="SCRAM-SHA-1"))
    assert connack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD
    other = env.client(5)
    other.connect("d")
    other.send(Auth(ReasonCode.RE_AUTHENTICATE, Properties(authentication_method="x")))
    # 0x8C is not allowed in DISCONNECT; an AUTH exchange nobody asked for is a Protocol Error (MQTT 5 4.12)
    assert [p.reason_code for p in other.received()] == [ReasonCode.PROTOCOL_ERROR]
    assert other.closed


def test_reserved_flags_close_the_connection_and_the_broker_keeps_serving(env):
    """A SUBSCRIBE with wrong fixed-header flags is malformed: v5 gets DISCONNECT 0x81, others are unaffected."""
    bad = env.client(5)
    bad.connect("bad")
    good = env.client(4)
    good.connect("good")
    subscribe(good, env, "t")
    bad.send_raw(b"\x80\x06\x00\x01\x00\x01t\x00")  # SUBSCRIBE with flags 0000 instead of 0010
    packets = bad.received()
    assert packets == [Disconnect(ReasonCode.MALFORMED_PACKET, packets[0].properties)]
    assert bad.closed
    bad311 = env.client(4)
    bad311.connect("bad311")
    bad311.send_raw(b"\x80\x06\x00\x01\x00\x01t\x00")
    assert bad311.transport.value() == b"" and bad311.closed
    good.send(Publish("t", b"still here", 1, packet_id=5))
    env.pump()
    packets = good.received()
    assert Puback(5) in packets
    assert [p.payload for p in publishes(packets)] == [b"still here"]


def test_packet_before_connect_is_a_protocol_error(env):
    client = env.client(4)
    client.send_raw(b"\xc0\x00")  # PINGREQ
    assert client.closed


def test_ping(env):
    client = env.client(4)
    client.connect()
    client.send(Pingreq())
    assert client.received() == [Pingresp()]


# ---------------------------------------------------------------------------------------------- publish / subscribe


def test_qos0_1_2_round_trip_and_acks_after_durable(env):
    """QoS 0/1/2 publishes reach a QoS 2 subscriber at their own QoS; PUBACK/PUBREC come once stored."""
    sub = env.client(4)
    sub.connect("sub")
    assert subscribe(sub, env, "a/#", qos=2) == [Suback(1, (ReasonCode.GRANTED_QOS_2,))]
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("a/0", b"zero", 0), Publish("a/1", b"one", 1, packet_id=1), Publish("a/2", b"two", 2, packet_id=2))
    assert pub.received() == []  # nothing acknowledged before the store is durable
    env.pump()
    assert pub.received() == [Puback(1), Pubrec(2)]
    pub.send(Pubrel(2))
    assert pub.received() == [Pubcomp(2)]
    got = publishes(sub.received())
    assert [(p.topic, p.payload, p.qos) for p in got] == [("a/0", b"zero", 0), ("a/1", b"one", 1), ("a/2", b"two", 2)]
    sub.send(Puback(got[1].packet_id), Pubrec(got[2].packet_id))
    assert sub.received() == [Pubrel(got[2].packet_id)]
    sub.send(Pubcomp(got[2].packet_id))
    env.pump()
    assert sub.received() == []


def test_delivered_qos_is_the_minimum_of_message_and_subscription(env):
    sub = env.client(4)
    sub.connect("sub")
    subscribe(sub, env, "q/#", qos=1)
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("q/x", b"two", 2, packet_id=9))
    env.pump()
    [p] = publishes(sub.received())
    assert p.qos == 1


def test_exactly_once_duplicate_publish_is_not_stored_twice(env):
    """A resent QoS 2 PUBLISH with the same id (DUP) is acknowledged again but not published again."""
    sub = env.client(4)
    sub.connect("sub")
    subscribe(sub, env, "x", qos=2)
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("x", b"once", 2, packet_id=7))
    env.pump()
    assert pub.received() == [Pubrec(7)]
    pub.send(Publish("x", b"once", 2, dup=True, packet_id=7))
    env.pump()
    assert pub.received() == [Pubrec(7)]
    pub.send(Pubrel(7))
    assert pub.received() == [Pubcomp(7)]
    env.pump()
    assert [p.payload for p in publishes(sub.received())] == [b"once"]
    # after PUBREL the id is free again: a new message with id 7 is a new message
    pub.send(Publish("x", b"again", 2, packet_id=7))
    env.pump()
    assert [p.payload for p in publishes(sub.received())] == [b"again"]


def _stored_bodies(env, topic):
    from tidegate.core.model import QueueRef

    bodies = []
    for queue_id in range(env.broker.get_topic(topic).queues):
        bodies += [d.message.body for d in env.broker.pull(QueueRef(topic, queue_id), 0, max_count=100).messages]
    return sorted(bodies)


def test_publishes_of_one_read_are_stored_in_one_call_once_each_and_acked_in_order(env):
    """Consecutive PUBLISHes of one read are stored with one core publish; a QoS 2 resend in the same read is not
    stored again; a message the core refuses (too big) is refused alone while the others are stored; the
    acknowledgements come in publish order, only once durable."""
    calls = []
    publish = env.broker.publish

    def counting_publish(messages, queue_id=None):
        calls.append(len(messages))
        return publish(messages, queue_id)

    env.broker.publish = counting_publish
    env.broker.config.max_body = 64
    pub = env.client(5)
    pub.connect("pub")
    pub.send(Publish("b/1", b"one", 1, packet_id=1), Publish("b/2", b"two", 2, packet_id=2),
             Publish("b/3", b"three", 1, packet_id=3))
    assert calls == [3]
    assert pub.received() == []
    env.pump()
    assert pub.received() == [Puback(1), Pubrec(2), Puback(3)]
    assert _stored_bodies(env, "b") == sorted([b"one", b"two", b"three"])

    calls.clear()
    pub.send(Pubrel(2),
             Publish("b/4", b"four", 1, packet_id=4), Publish("b/5", b"five", 2, packet_id=5),
             Publish("b/5", b"five", 2, dup=True, packet_id=5),  # resent in the same read: stored once
             Publish("b/6", b"x" * 100, 1, packet_id=6),  # over max_body: refused on its own
             Publish("b/0", b"zero", 0), Publish("b/7", b"seven", 2, packet_id=7),
             Publish("b/8", b"eight", 1, packet_id=8))
    # [4, 5] stored before the resend of 5 is looked at; [6, 0, 7, 8] refused as a batch, then one by one
    assert calls == [2, 4, 1, 1, 1, 1]
    [pubcomp, refused] = pub.received()
    assert pubcomp == Pubcomp(2)
    assert isinstance(refused, Puback) and refused.packet_id == 6 and refused.reason_code == ReasonCode.QUOTA_EXCEEDED
    env.pump()
    assert pub.received() == [Puback(4), Pubrec(5), Pubrec(7), Puback(8)]
    assert _stored_bodies(env, "b") == sorted([b"one", b"two", b"three", b"four", b"five", b"zero", b"seven",
                                               b"eight"])
    pub.send(Publish("b/5", b"five", 2, dup=True, packet_id=5), Pubrel(5), Pubrel(7))
    assert pub.received() == [Pubrec(5), Pubcomp(5), Pubcomp(7)]
    env.pump()
    assert len(_stored_bodies(env, "b")) == 8


def test_publish_then_subscribe_in_one_read_sees_the_retained_message(env):
    """Packets after a PUBLISH in the same read see it stored: the retained message reaches the new subscription,
    and a publish before DISCONNECT is stored."""
    client = env.client(4)
    client.connect("c")
    client.send(Publish("r/1", b"kept", 1, retain=True, packet_id=1),
                Subscribe(2, (TopicSubscription("r/#", 1),)),
                Publish("r/2", b"last", 0), Disconnect())
    got = client.received()
    assert got[0] == Suback(2, (ReasonCode.GRANTED_QOS_1,))
    assert [(p.topic, p.payload, p.retain) for p in publishes(got)] == [("r/1", b"kept", True)]
    assert client.closed
    assert env.factory.retained.get("r/1").body == b"kept"
    env.pump()
    assert _stored_bodies(env, "r") == [b"kept", b"last"]


def test_unsubscribe_stops_delivery(env):
    sub = env.client(5)
    sub.connect("sub")
    subscribe(sub, env, "u/1")
    sub.send(Unsubscribe(2, ("u/1", "never")))
    assert sub.received() == [Unsuback(2, (ReasonCode.SUCCESS, ReasonCode.NO_SUBSCRIPTION_EXISTED))]
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("u/1", b"x", 1, packet_id=1))
    env.pump()
    assert publishes(sub.received()) == []


def test_dollar_topics_are_not_matched_by_leading_wildcards(env):
    sub = env.client(4)
    sub.connect("sub")
    subscribe(sub, env, "#", "+/x")
    dollar = env.client(4)
    dollar.connect("dollar")
    subscribe(dollar, env, "$app/x")
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("$app/x", b"d", 1, packet_id=1), Publish("n/x", b"n", 1, packet_id=2))
    env.pump()
    assert [p.topic for p in publishes(sub.received())] == ["n/x"]
    assert [p.topic for p in publishes(dollar.received())] == ["$app/x"]


def test_publishing_to_sys_is_refused(env):
    client = env.client(5)
    client.connect("c")
    client.send(Publish("$SYS/broker/x", b"no", 1, packet_id=3))
    [ack] = client.received()
    assert ack.packet_id == 3 and ack.reason_code == ReasonCode.NOT_AUTHORIZED


def test_unmappable_topic_name_is_refused_with_0x90(env):
    client = env.client(5)
    client.connect("c")
    client.send(Publish("trailing/", b"x", 1, packet_id=4))
    [ack] = client.received()
    assert ack.reason_code == ReasonCode.TOPIC_NAME_INVALID


# ---------------------------------------------------------------------------------------------- cross-protocol


def test_mqtt_publish_is_pulled_by_a_core_consumer_of_topic_and_subject(env):
    client = env.client(5)
    client.connect("pub")
    client.send(Publish("T/a/b", b"hello", 1, packet_id=1,
                        properties=Properties(user_properties=(("k", "v"),), content_type="text/plain")))
    env.pump()
    sink = RecordingSink()
    core_sub = env.broker.subscribe("native-group", "T", sink, client_id="n1", start="earliest")
    core_sub.grant(10)
    env.pump()
    [d] = sink.delivered
    assert (d.message.topic, d.message.subject, d.message.body) == ("T", "a/b", b"hello")
    assert d.message.properties["k"] == "v" and d.message.properties["content-type"] == "text/plain"
    assert d.message.flags & MessageFlag.PERSISTENT


def test_core_publish_reaches_mqtt_subscribers_of_every_matching_filter(env):
    clients = {}
    for f in ("T/a/b", "T/+/b", "T/#", "#", "T/a", "U/#"):
        c = env.client(4)
        c.connect(f"sub-{len(clients)}")
        subscribe(c, env, f)
        clients[f] = c
    env.broker.publish([Message(topic="T", subject="a/b", body=b"native", properties={"reply-to": "r"})])
    env.pump()
    for f, c in clients.items():
        got = publishes(c.received())
        if f in ("T/a", "U/#"):
            assert got == [], f
        else:
            assert [(p.topic, p.payload, p.qos) for p in got] == [("T/a/b", b"native", 1)], f


def test_transient_core_message_arrives_at_qos0(env):
    c = env.client(4)
    c.connect("s")
    subscribe(c, env, "T/#", qos=2)
    env.broker.publish([Message(topic="T", subject="x", body=b"t", flags=MessageFlag.TRANSIENT)])
    env.pump()
    [p] = publishes(c.received())
    assert p.qos == 0


# ---------------------------------------------------------------------------------------------- sessions


def test_session_resume_redelivers_unacknowledged_with_dup_and_same_packet_id(env):
    sub = env.client(4)
    sub.connect("durable", clean=False)
    subscribe(sub, env, "r/#", qos=1)
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("r/1", b"m1", 1, packet_id=1), Publish("r/2", b"m2", 1, packet_id=2))
    env.pump()
    first = publishes(sub.received())
    assert [p.payload for p in first] == [b"m1", b"m2"] and not any(p.dup for p in first)
    sub.send(Puback(first[0].packet_id))
    sub.drop()
    pub.send(Publish("r/3", b"m3", 1, packet_id=3))  # queued while the client is away
    env.pump()
    again = env.client(4)
    connack = again.connect("durable", clean=False)
    assert connack.session_present
    env.pump()
    got = publishes(again.received())
    assert [(p.payload, p.dup) for p in got] == [(b"m2", True), (b"m3", False)]
    assert got[0].packet_id == first[1].packet_id


def test_clean_session_drops_old_state(env):
    sub = env.client(4)
    sub.connect("c", clean=False)
    subscribe(sub, env, "z")
    sub.drop()
    again = env.client(4)
    assert not again.connect("c", clean=True).session_present
    assert env.broker.bindings() == []
    pub = env.client(4)
    pub.connect("p")
    pub.send(Publish("z", b"x", 1, packet_id=1))
    env.pump()
    assert publishes(again.received()) == []


def test_clean_session_removes_core_topic_on_close(env):
    c = env.client(4)
    c.connect("temp")
    subscribe(c, env, "a")
    assert any(t.name == "%MQTT%temp" for t in env.broker.list_topics(include_internal=True))
    c.send(Disconnect())
    assert not any(t.name == "%MQTT%temp" for t in env.broker.list_topics(include_internal=True))
    assert env.broker.bindings() == []


def test_takeover_closes_the_first_connection_with_0x8e(env):
    first = env.client(5)
    first.connect("same", clean=False, properties=Properties(session_expiry_interval=60))
    subscribe(first, env, "tk")
    second = env.client(5)
    connack = second.connect("same", clean=False, properties=Properties(session_expiry_interval=60))
    assert connack.session_present
    assert [p.reason_code for p in first.received()] == [ReasonCode.SESSION_TAKEN_OVER]
    assert first.closed
    first.drop()  # the transport then reports the loss; the session stays with the second connection
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("tk", b"x", 1, packet_id=1))
    env.pump()
    assert [p.payload for p in publishes(second.received())] == [b"x"]


def test_v5_session_expiry_removes_the_session(env):
    c = env.client(5)
    c.connect("exp", clean=False, properties=Properties(session_expiry_interval=30))
    subscribe(c, env, "e")
    c.drop()
    env.clock.advance(29)
    assert "exp" in env.factory.sessions.sessions
    env.clock.advance(2)
    assert "exp" not in env.factory.sessions.sessions
    assert env.broker.bindings() == []


def test_keep_alive_timeout_at_one_and_a_half_times(env):
    c = env.client(5)
    c.connect("ka", keep_alive=10)
    env.clock.advance(10)
    c.send(Pingreq())
    c.received()
    env.clock.advance(14.9)
    assert not c.closed
    env.clock.advance(0.2)
    assert [p.reason_code for p in c.received()] == [ReasonCode.KEEP_ALIVE_TIMEOUT]
    assert c.closed


def test_server_keep_alive_caps_the_client_value(env):
    env.settings.max_keep_alive = 100
    connack = env.client(5).connect("k", keep_alive=0)
    assert connack.properties.server_keep_alive == 100


def test_no_connect_within_timeout_closes(env):
    c = env.client(4)
    env.clock.advance(env.settings.connect_timeout + 1)
    assert c.closed


def test_connect_timeout_counts_from_each_connections_own_arrival_with_one_timer(env):
    """The connect timeout is watched by one timer per listener (not one per connection): each connection still
    gets exactly `connect_timeout` from its own arrival, and one that CONNECTed in time is never closed."""
    timeout = env.settings.connect_timeout
    early = env.client(4)
    env.clock.advance(timeout / 2)
    answered = env.client(4)
    late = env.client(4)
    timers_before = len(env.clock.getDelayedCalls())
    more = [env.client(4) for _ in range(20)]
    assert len(env.clock.getDelayedCalls()) == timers_before  # no timer per new connection
    assert answered.connect("in-time").reason_code == ReasonCode.SUCCESS
    env.clock.advance(timeout / 2 - 0.001)
    assert not early.closed
    env.clock.advance(0.002)
    assert early.closed and not late.closed
    env.clock.advance(timeout / 2)
    assert late.closed and all(c.closed for c in more)
    assert not answered.closed
    assert len(env.factory.connect_deadlines) == 0


# ---------------------------------------------------------------------------------------------- will


def _will_watcher(env):
    w = env.client(4)
    w.connect("watcher")
    subscribe(w, env, "will/#")
    return w


def test_will_is_published_on_abrupt_close(env):
    watcher = _will_watcher(env)
    c = env.client(4)
    c.connect("dying", will=Will("will/dying", b"gone", 1))
    c.drop()
    env.pump()
    assert [p.payload for p in publishes(watcher.received())] == [b"gone"]


def test_will_is_not_published_on_clean_disconnect_but_is_for_reason_0x04(env):
    watcher = _will_watcher(env)
    c = env.client(5)
    c.connect("polite", will=Will("will/polite", b"no", 0))
    c.send(Disconnect())
    env.pump()
    assert publishes(watcher.received()) == []
    d = env.client(5)
    d.connect("asks", will=Will("will/asks", b"yes", 0))
    d.send(Disconnect(ReasonCode.DISCONNECT_WITH_WILL_MESSAGE))
    env.pump()
    assert [p.payload for p in publishes(watcher.received())] == [b"yes"]


def test_will_delay_and_cancellation_on_resume(env):
    watcher = _will_watcher(env)
    props = Properties(session_expiry_interval=300)
    will = Will("will/late", b"late", 0, properties=Properties(will_delay_interval=10))
    c = env.client(5)
    c.connect("late", clean=False, properties=props, will=will)
    c.drop()
    env.clock.advance(5)
    env.pump()
    assert publishes(watcher.received()) == []
    back = env.client(5)
    back.connect("late", clean=False, properties=props)  # resumes within the delay: no will
    env.clock.advance(20)
    env.pump()
    assert publishes(watcher.received()) == []
    back.drop()  # no will on this connection
    c2 = env.client(5)
    c2.connect("late2", clean=False, properties=props, will=will)
    c2.drop()
    env.clock.advance(10)
    env.pump()
    assert [p.payload for p in publishes(watcher.received())] == [b"late"]


# ---------------------------------------------------------------------------------------------- retained


def test_retained_set_replace_clear_and_wildcard_delivery(env):
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("ret/a", b"1", 1, retain=True, packet_id=1), Publish("ret/b", b"2", 0, retain=True),
             Publish("ret/a", b"3", 1, retain=True, packet_id=2))
    env.pump()
    sub = env.client(4)
    sub.connect("sub")
    got = publishes(subscribe(sub, env, "ret/+"))
    assert sorted((p.topic, p.payload, p.retain) for p in got) == [("ret/a", b"3", True), ("ret/b", b"2", True)]
    pub.send(Publish("ret/a", b"", 0, retain=True))  # clears
    env.pump()
    later = env.client(4)
    later.connect("later")
    assert [(p.topic, p.payload) for p in publishes(subscribe(later, env, "ret/#"))] == [("ret/b", b"2")]


def test_retain_handling_and_retain_as_published(env):
    pub = env.client(5)
    pub.connect("pub")
    pub.send(Publish("rh/x", b"kept", 1, retain=True, packet_id=1))
    env.pump()
    sub = env.client(5)
    sub.connect("sub")
    assert publishes(subscribe(sub, env, "rh/x", retain_handling=2)) == []
    assert len(publishes(subscribe(sub, env, "rh/+", retain_handling=1, packet_id=2))) == 1
    assert publishes(subscribe(sub, env, "rh/+", retain_handling=1, packet_id=3)) == []
    rap = env.client(5)
    rap.connect("rap")
    subscribe(rap, env, "rh/#", retain_as_published=True, retain_handling=2)
    pub.send(Publish("rh/x", b"live", 1, retain=True, packet_id=2))
    env.pump()
    [live] = publishes(rap.received())
    assert live.retain
    [plain] = [p for p in publishes(sub.received()) if p.payload == b"live"]
    assert not plain.retain


def test_retained_messages_survive_a_restart(env):
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("keep/me", b"v", 1, retain=True, packet_id=1))
    env.pump()
    env2 = env.restart()
    sub = env2.client(4)
    sub.connect("sub")
    assert [p.payload for p in publishes(subscribe(sub, env2, "keep/#"))] == [b"v"]


# ---------------------------------------------------------------------------------------------- MQTT 5 features


def test_subscription_identifiers_and_no_local(env):
    c = env.client(5)
    c.connect("me")
    c.send(Subscribe(1, (TopicSubscription("n/#", 1),), Properties(subscription_identifiers=(7,))))
    c.send(Subscribe(2, (TopicSubscription("n/x", 1, no_local=True),)))
    env.pump()
    c.received()
    c.send(Publish("n/x", b"mine", 1, packet_id=1))
    env.pump()
    [p] = publishes(c.received())
    assert p.properties.subscription_identifiers == (7,)  # only the non-No-Local subscription matched
    c.send(Unsubscribe(3, ("n/#",)))
    c.send(Publish("n/x", b"mine2", 1, packet_id=2))
    env.pump()
    assert publishes(c.received()) == []


def test_topic_alias_inbound_and_outbound(env):
    sub = env.client(5)
    sub.connect("sub", properties=Properties(topic_alias_maximum=4))
    subscribe(sub, env, "alias/#")
    pub = env.client(5)
    pub.connect("pub")
    pub.send(Publish("alias/long/name", b"1", 1, packet_id=1, properties=Properties(topic_alias=3)),
             Publish("", b"2", 1, packet_id=2, properties=Properties(topic_alias=3)))
    env.pump()
    assert pub.received() == [Puback(1), Puback(2)]
    got = publishes(sub.received())
    assert [(p.topic, p.properties.topic_alias) for p in got] == [("alias/long/name", 1), ("", 1)]
    pub.send(Publish("", b"3", 1, packet_id=3, properties=Properties(topic_alias=2)))  # never set
    assert [p.reason_code for p in pub.received()] == [ReasonCode.PROTOCOL_ERROR]
    bad = env.client(5)
    bad.connect("bad")
    bad.send(Publish("x", b"", 0, properties=Properties(topic_alias=17)))
    assert [p.reason_code for p in bad.received()] == [ReasonCode.TOPIC_ALIAS_INVALID]


def test_receive_maximum_limits_in_flight_messages(env):
    sub = env.client(5)
    sub.connect("slow", properties=Properties(receive_maximum=2))
    subscribe(sub, env, "rm")
    pub = env.client(4)
    pub.connect("pub")
    for i in range(5):
        pub.send(Publish("rm", str(i).encode(), 1, packet_id=i + 1))
    env.pump()
    got = publishes(sub.received())
    assert [p.payload for p in got] == [b"0", b"1"]
    sub.send(Puback(got[0].packet_id))
    env.pump()
    assert [p.payload for p in publishes(sub.received())] == [b"2"]


def test_client_maximum_packet_size_drops_big_messages(env):
    sub = env.client(5)
    sub.connect("small", properties=Properties(maximum_packet_size=100))
    subscribe(sub, env, "big")
    pub = env.client(4)
    pub.connect("pub")
    pub.send(Publish("big", b"x" * 500, 1, packet_id=1), Publish("big", b"ok", 1, packet_id=2))
    env.pump()
    assert [p.payload for p in publishes(sub.received())] == [b"ok"]


def test_message_expiry_passes_remaining_lifetime_and_drops_expired(env):
    sub = env.client(5)
    sub.connect("s", clean=False, properties=Properties(session_expiry_interval=600))
    subscribe(sub, env, "exp/#")
    sub.drop()
    pub = env.client(5)
    pub.connect("p")
    pub.send(Publish("exp/short", b"s", 1, packet_id=1, properties=Properties(message_expiry_interval=5)),
             Publish("exp/long", b"l", 1, packet_id=2, properties=Properties(message_expiry_interval=60)))
    env.pump()
    env.clock.advance(10)
    back = env.client(5)
    back.connect("s", clean=False, properties=Properties(session_expiry_interval=600))
    env.pump()
    [p] = publishes(back.received())
    assert p.payload == b"l" and p.properties.message_expiry_interval == 50


def test_request_response_properties_are_carried(env):
    responder = env.client(5)
    responder.connect("responder")
    subscribe(responder, env, "req")
    requester = env.client(5)
    requester.connect("requester")
    requester.send(Publish("req", b"q", 1, packet_id=1,
                           properties=Properties(response_topic="resp/requester", correlation_data=b"\x01\x02")))
    env.pump()
    [p] = publishes(responder.received())
    assert p.properties.response_topic == "resp/requester" and p.properties.correlation_data == b"\x01\x02"




def test_a_client_without_subscriptions_holds_no_core_consumer_until_it_subscribes(env):
    """Publish-only devices stay cheap: the session queue is attached on the first SUBSCRIBE, and from then on
    messages flow as usual."""
    device = env.client()
    device.connect("sensor-1")
    assert env.broker.list_groups() == []  # no consumer group, no subscription in the core
    device.send(Subscribe(1, (TopicSubscription("cmd/sensor-1", qos=1),)))
    assert device.received()[0].reason_codes == (ReasonCode.GRANTED_QOS_1,)
    publisher = env.client()
    publisher.connect("controller")
    publisher.send(Publish("cmd/sensor-1", b"reboot", qos=1, packet_id=1))
    env.pump()
    [delivered] = [p for p in device.received() if isinstance(p, Publish)]
    assert (delivered.topic, delivered.payload, delivered.qos) == ("cmd/sensor-1", b"reboot", 1)
