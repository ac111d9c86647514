"""The MQTT hot path (issue 10): byte-level encoders equal the codec's packets, and the per-connection delivery
routes follow SUBSCRIBE/UNSUBSCRIBE exactly as re-matching every delivery did."""

import pytest

from tidegate.adapters.mqtt.codec import (
    MqttCodec,
    MqttProtocolError,
    Properties,
    Puback,
    Publish,
    Subscribe,
    TopicSubscription,
    Unsubscribe,
    encode_puback_success,
    encode_publish_v311,
    publish_topic_header,
)


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def server_codec(level):
    codec = MqttCodec(server_side=True)
    codec.protocol_level = level
    return codec


@pytest.mark.parametrize("level", [3, 4])
@pytest.mark.parametrize("qos,packet_id,dup", [(0, None, False), (1, 1, False), (1, 300, True), (2, 65535, False),
                                                (2, 2, True)])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("topic,payload", [("a", b""), ("a/b/c", b"x" * 100), ("é/ü", b"y" * 200),
                                           ("t" * 300, b"z" * 20_000)])
def test_v311_publish_from_topic_header_is_the_codec_packet(level, qos, packet_id, retain, dup, topic, payload):
    """Every remaining-length size class, QoS, flag and a non-ASCII name: the same bytes as Publish + encode."""
    expected = server_codec(level).encode(Publish(topic, payload, qos, retain, dup, packet_id))
    assert encode_publish_v311(publish_topic_header(topic), payload, qos, retain, dup, packet_id) == expected


def test_topic_header_refuses_what_a_publish_refuses():
    for name in ("", "a/+", "a/#", "a\x00b"):
        with pytest.raises(MqttProtocolError):
            Publish(name)
        with pytest.raises(MqttProtocolError):
            publish_topic_header(name)


def test_v311_publish_refuses_a_bad_packet_id():
    header = publish_topic_header("a")
    for bad in (None, 0, 65536):
        with pytest.raises(MqttProtocolError):
            encode_publish_v311(header, b"", 1, False, False, bad)


@pytest.mark.parametrize("level", [3, 4, 5])
def test_puback_bytes_are_the_codec_packet(level):
    for packet_id in (1, 255, 256, 65535):
        assert encode_puback_success(packet_id) == server_codec(level).encode(Puback(packet_id))
    with pytest.raises(MqttProtocolError):
        encode_puback_success(0)


def _subscribe(client, env, *subscriptions, packet_id=1, properties=None):
    packet = Subscribe(packet_id, tuple(subscriptions), properties or Properties())
    client.send(packet)
    env.pump()
    return client.received()


def _publish_and_receive(env, pub, sub, topic, payload, qos=1, packet_id=1):
    pub.send(Publish(topic, payload, qos, packet_id=packet_id if qos else None))
    env.pump()
    pub.received()
    got = publishes(sub.received())
    for p in got:
        if p.qos == 1:
            sub.send(Puback(p.packet_id))
    env.pump()
    return got


def test_resubscribing_with_another_qos_changes_the_next_delivery(env):
    """The cached route of a topic is dropped on SUBSCRIBE: a higher QoS applies from the next message on."""
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub")
    pub.connect("pub")
    _subscribe(sub, env, TopicSubscription("r/#", 0))
    [first] = _publish_and_receive(env, pub, sub, "r/x", b"1")
    assert first.qos == 0
    _subscribe(sub, env, TopicSubscription("r/#", 1), packet_id=2)
    [second] = _publish_and_receive(env, pub, sub, "r/x", b"2", packet_id=2)
    assert (second.qos, second.payload) == (1, b"2")


def test_a_second_matching_filter_adds_its_subscription_identifier(env):
    """v5: a new overlapping subscription's identifier appears on the next delivery of an already-routed topic."""
    sub, pub = env.client(5), env.client(5)
    sub.connect("sub")
    pub.connect("pub")
    _subscribe(sub, env, TopicSubscription("s/#", 1), properties=Properties(subscription_identifiers=(7,)))
    [first] = _publish_and_receive(env, pub, sub, "s/x", b"1")
    assert first.properties.subscription_identifiers == (7,)
    _subscribe(sub, env, TopicSubscription("s/x", 1), packet_id=2, properties=Properties(subscription_identifiers=(9,)))
    [second] = _publish_and_receive(env, pub, sub, "s/x", b"2", packet_id=2)
    assert second.properties.subscription_identifiers == (7, 9)


def test_unsubscribing_stops_deliveries_of_an_already_routed_topic(env):
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub")
    pub.connect("pub")
    _subscribe(sub, env, TopicSubscription("u/#", 1), TopicSubscription("other", 1))
    assert len(_publish_and_receive(env, pub, sub, "u/x", b"1")) == 1
    sub.send(Unsubscribe(3, ("u/#",)))
    env.pump()
    sub.received()
    assert _publish_and_receive(env, pub, sub, "u/x", b"2", packet_id=2) == []


def test_a_qos0_burst_larger_than_the_credit_is_delivered_whole(env):
    """QoS 0 deliveries return their credit once per batch: a burst bigger than the subscription's credit still
    arrives complete and in order."""
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub")
    pub.connect("pub")
    _subscribe(sub, env, TopicSubscription("b/#", 0))
    burst = 5 * env.settings.receive_maximum
    pub.send(*(Publish("b/x", str(i).encode(), 0) for i in range(burst)))
    got = []
    for _ in range(50):
        env.pump()
        got += publishes(sub.received())
        if len(got) == burst:
            break
    assert [p.payload for p in got] == [str(i).encode() for i in range(burst)]
