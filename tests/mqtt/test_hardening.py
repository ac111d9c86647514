"""Hardening of the MQTT adapter (issue 7): what a client that does not read, floods SUBSCRIBE, or sends garbage can
make the broker hold in memory, write to its session store, or write to the log is bounded by settings."""

from __future__ import annotations

import logging

from twisted.internet.testing import StringTransport

from tidegate.adapters.mqtt.codec import (
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    TopicSubscription,
)
from tidegate.adapters.mqtt.reason_codes import ReasonCode
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.adapters.mqtt.websocket import MqttWebSocketFactory

from .test_protocol import publishes, subscribe


class CountingRows:
    """An adapter-state namespace that counts its writes (puts and deletes), passing them through."""

    def __init__(self, rows) -> None:
        self.rows = rows
        self.writes = 0

    def put(self, key, value) -> None:
        self.writes += 1
        self.rows.put(key, value)

    def delete(self, key) -> None:
        self.writes += 1
        self.rows.delete(key)

    def __getattr__(self, name):
        return getattr(self.rows, name)


def publish_qos1(env, publisher, topic: str, count: int, payload: bytes = b"x", qos: int = 1) -> None:
    for i in range(count):
        publisher.send(Publish(topic, payload, qos, False, False, i + 1))
        env.pump()
        if qos == 2:
            publisher.send(Pubrel(i + 1))
            env.pump()
    publisher.received()


def raw_qos0_publish(topic: str) -> bytes:
    """A QoS 0 PUBLISH encoded by hand (the client codec refuses to encode invalid topic names)."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name
    length, size = b"", len(body)
    while True:
        digit, size = size % 128, size // 128
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            break
    return b"\x30" + length + body


# ---------------------------------------------------------------------------------------------- 1a WebSocket


def test_websocket_wrapper_takes_the_producer_slot_the_http_channel_left_behind(make_env):
    """Under twisted.web the HTTP channel registered itself as the transport's producer; the MQTT connection over
    WebSocket must still become the producer, so a full socket buffer pauses MQTT delivery."""
    env = make_env()
    ws_factory = MqttWebSocketFactory(env.factory, "ws://127.0.0.1/mqtt", reactor=env.clock)
    ws = ws_factory.buildProtocol(("127.0.0.1", 40000))
    transport = StringTransport()
    transport.registerProducer(object(), True)  # what HTTPChannel.connectionMade did on the TCP transport
    ws.transport = transport
    mqtt = ws._proto
    ws.registerProducer(mqtt, True)
    assert transport.producer is mqtt
    transport.producer.pauseProducing()
    assert mqtt.paused
    transport.producer.resumeProducing()
    assert not mqtt.paused
    ws.unregisterProducer()
    assert transport.producer is None


# ---------------------------------------------------------------------------------------------- 1b credit while paused


def test_puback_while_paused_does_not_return_core_credit(make_env):
    """A client that never reads but PUBACKs blindly gets at most its Receive Maximum while its socket is paused;
    the held credit comes back on resume and the rest arrives."""
    env = make_env()
    sub = env.client(5)
    sub.connect("sub", properties=Properties(receive_maximum=5))
    subscribe(sub, env, "t/#", qos=1)
    sub.protocol.pauseProducing()
    pub = env.client(5)
    pub.connect("pub")
    publish_qos1(env, pub, "t/a", 100)
    delivered = 0
    for _ in range(50):  # the client acknowledges everything it gets, without its socket draining
        got = publishes(sub.received())
        if not got:
            break
        delivered += len(got)
        sub.send(*[Puback(p.packet_id) for p in got])
        env.pump()
    assert delivered <= 5
    sub.protocol.resumeProducing()
    for _ in range(100):
        env.pump()
        got = publishes(sub.received())
        if not got:
            break
        delivered += len(got)
        sub.send(*[Puback(p.packet_id) for p in got])
    assert delivered == 100


def test_pubcomp_while_paused_does_not_return_core_credit(make_env):
    """The QoS 2 exchange (PUBREC, PUBCOMP) of a paused client returns no credit either."""
    env = make_env()
    sub = env.client(5)
    sub.connect("sub", properties=Properties(receive_maximum=3))
    subscribe(sub, env, "t/#", qos=2)
    sub.protocol.pauseProducing()
    pub = env.client(5)
    pub.connect("pub")
    publish_qos1(env, pub, "t/a", 30, qos=2)
    delivered = 0
    for _ in range(40):
        packets = sub.received()
        got = publishes(packets)
        delivered += len(got)
        replies = [Pubrec(p.packet_id) for p in got]
        replies += [Pubcomp(p.packet_id) for p in packets if isinstance(p, Pubrel)]
        if not replies:
            break
        sub.send(*replies)
        env.pump()
    assert delivered <= 3
    sub.protocol.resumeProducing()
    for _ in range(100):
        env.pump()
        packets = sub.received()
        got = publishes(packets)
        delivered += len(got)
        replies = [Pubrec(p.packet_id) for p in got] + [Pubcomp(p.packet_id) for p in packets if isinstance(p, Pubrel)]
        if not replies:
            break
        sub.send(*replies)
    assert delivered == 30


# ---------------------------------------------------------------------------------------------- 1c retained


def test_retained_messages_on_subscribe_wait_while_paused_and_stay_bounded(make_env):
    """40 re-SUBSCRIBEs of a paused client to 10 retained messages of 50 KB write nothing into the paused socket;
    what waits is bounded by `max_queued_retained_bytes`, and it is sent once the socket drains."""
    env = make_env(MqttSettings(sys_interval=0, max_queued_retained_bytes=600_000))
    pub = env.client(5)
    pub.connect("pub")
    for i in range(10):
        pub.send(Publish(f"r/{i}", bytes([i]) * 50_000, 0, True))
    env.pump()
    sub = env.client(5)
    sub.connect("sub")
    sub.protocol.pauseProducing()
    for packet_id in range(1, 41):
        sub.send(Subscribe(packet_id, (TopicSubscription("r/#", 0),)))
    env.pump()
    written = len(sub.transport.value())
    assert written < 10_000  # SUBACKs only
    assert not sub.closed
    queued = sum(len(o.message.body) for o in sub.protocol.outbound.pending)
    assert queued <= 600_000
    sub.transport.clear()
    sub.protocol.resumeProducing()
    env.pump()
    got = publishes(sub.received())
    assert 10 <= len(got) <= 12 and all(p.retain for p in got)


def test_retained_messages_go_out_at_once_when_not_paused(env):
    pub = env.client(5)
    pub.connect("pub")
    pub.send(Publish("r/1", b"v", 0, True))
    env.pump()
    sub = env.client(5)
    sub.connect("sub")
    got = publishes(subscribe(sub, env, "r/#", qos=0))
    assert [p.payload for p in got] == [b"v"]


# ---------------------------------------------------------------------------------------------- 2 SUBSCRIBE


def test_subscribe_with_many_filters_writes_the_session_row_once(make_env):
    env = make_env(MqttSettings(sys_interval=0, max_filters_per_subscribe=1000, max_subscriptions_per_session=1000))
    client = env.client(5)
    client.connect("many", clean=False, properties=Properties(session_expiry_interval=60))
    rows = CountingRows(env.factory.sessions.rows)
    env.factory.sessions.rows = rows
    client.send(Subscribe(1, tuple(TopicSubscription(f"t/{i}", 1) for i in range(200))))
    env.pump()
    suback = client.received()[0]
    assert isinstance(suback, Suback) and set(suback.reason_codes) == {ReasonCode.GRANTED_QOS_1}
    assert rows.writes <= 1
    assert len(env.factory.sessions.rows.rows.get("many")["subs"]) == 200


def test_unsubscribe_with_many_filters_writes_the_session_row_once(make_env):
    env = make_env()
    client = env.client(5)
    client.connect("many", clean=False, properties=Properties(session_expiry_interval=60))
    subscribe(client, env, *[f"t/{i}" for i in range(50)])
    rows = CountingRows(env.factory.sessions.rows)
    env.factory.sessions.rows = rows
    from tidegate.adapters.mqtt.codec import Unsubscribe
    client.send(Unsubscribe(2, tuple(f"t/{i}" for i in range(50))))
    env.pump()
    assert rows.writes <= 1


def test_filters_beyond_the_per_packet_limit_are_refused_with_quota_exceeded(make_env):
    env = make_env(MqttSettings(sys_interval=0, max_filters_per_subscribe=3))
    v5 = env.client(5)
    v5.connect("v5")
    suback = subscribe(v5, env, *[f"a/{i}" for i in range(5)], qos=1)[0]
    assert suback.reason_codes == (ReasonCode.GRANTED_QOS_1,) * 3 + (ReasonCode.QUOTA_EXCEEDED,) * 2
    assert len(env.factory.sessions.get("v5").subscriptions) == 3
    v311 = env.client(4)
    v311.connect("v311")
    suback = subscribe(v311, env, *[f"a/{i}" for i in range(5)], qos=1)[0]
    assert [int(c) for c in suback.reason_codes] == [1, 1, 1, 0x80, 0x80]


def test_subscriptions_beyond_the_per_session_limit_are_refused_but_existing_ones_can_change(make_env):
    env = make_env(MqttSettings(sys_interval=0, max_subscriptions_per_session=3))
    client = env.client(5)
    client.connect("c")
    assert subscribe(client, env, "a", "b", qos=0)[0].reason_codes == (ReasonCode.SUCCESS,) * 2  # granted QoS 0
    suback = subscribe(client, env, "c", "d", "a", qos=1, packet_id=2)[0]
    assert suback.reason_codes == (ReasonCode.GRANTED_QOS_1, ReasonCode.QUOTA_EXCEEDED, ReasonCode.GRANTED_QOS_1)
    assert sorted(env.factory.sessions.get("c").subscriptions) == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------- 3 logging


def test_a_thousand_dropped_qos0_publishes_with_a_huge_topic_log_a_couple_of_short_lines(env, caplog):
    client = env.client(5)
    client.connect("noisy")
    topic = "$SYS/" + "x" * 60_000
    with caplog.at_level(logging.INFO, logger="tidegate.mqtt"):
        for _ in range(10):
            client.send(*[Publish(topic, b"p", 0) for _ in range(100)])
        env.pump()
    lines = [r.getMessage() for r in caplog.records if r.name == "tidegate.mqtt"]
    assert 1 <= len(lines) <= 2
    assert all(len(line) < 1000 for line in lines)


def test_protocol_errors_of_many_connections_log_a_couple_of_short_lines(env, caplog):
    with caplog.at_level(logging.INFO, logger="tidegate.mqtt"):
        for i in range(200):
            client = env.client(4)
            client.connect("c" * 20_000 + str(i))
            client.send_raw(raw_qos0_publish("a/+" + "y" * 20_000))  # a wildcard in a topic name: protocol error
            assert client.closed
    lines = [r.getMessage() for r in caplog.records if r.name == "tidegate.mqtt"]
    assert 1 <= len(lines) <= 4
    assert all(len(line) < 1000 for line in lines)


def test_refused_logins_log_a_couple_of_short_lines(make_env, caplog):
    from tidegate.adapters.mqtt.codec import Connect
    env = make_env()
    with caplog.at_level(logging.INFO, logger="tidegate.mqtt"):
        for _ in range(200):
            client = env.client(5)
            client.send(Connect("", protocol_level=5, clean_start=False))  # empty id without clean start
            assert client.closed
    lines = [r.getMessage() for r in caplog.records if r.name == "tidegate.mqtt"]
    assert 1 <= len(lines) <= 2


# ---------------------------------------------------------------------------------------------- 4 other buffers


def test_a_311_client_cannot_leave_unbounded_unreleased_qos2_ids(make_env):
    """3.1.1 has no Receive Maximum: QoS 2 publishes never released are bounded by `max_inflight`, then closed."""
    env = make_env(MqttSettings(sys_interval=0, receive_maximum=4, max_inflight=8))
    client = env.client(4)
    client.connect("q2", clean=False)
    for packet_id in range(1, 20):
        client.send(Publish("t", b"x", 2, False, False, packet_id))
        env.pump()
        if client.closed:
            break
    assert client.closed
    assert len(env.factory.sessions.get("q2").packets.inbound_qos2) == 8


def test_a_v5_client_cannot_pile_up_unreleased_qos2_ids_across_reconnects(make_env):
    """The Receive Maximum window is per connection but unreleased QoS 2 ids stay with the session: a client that
    reconnects and sends new ones each time is stopped at `max_inflight` with DISCONNECT 0x97."""
    from tidegate.adapters.mqtt.codec import Disconnect
    env = make_env(MqttSettings(sys_interval=0, receive_maximum=4, max_inflight=8))
    packet_id = 0
    for _ in range(3):
        client = env.client(5)
        client.connect("q2", clean=False, properties=Properties(session_expiry_interval=60))
        for _ in range(4):
            packet_id += 1
            client.send(Publish("t", b"x", 2, False, False, packet_id))
            env.pump()
        packets = client.received()
        if client.closed:
            assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == ReasonCode.QUOTA_EXCEEDED
            break
        client.drop()
    assert client.closed
    assert len(env.factory.sessions.get("q2").packets.inbound_qos2) == 8


def test_a_311_client_within_the_qos2_bound_is_served(make_env):
    env = make_env(MqttSettings(sys_interval=0, receive_maximum=4, max_inflight=8))
    client = env.client(4)
    client.connect("q2")
    for packet_id in range(1, 30):  # released each time: never more than one open
        client.send(Publish("t", b"x", 2, False, False, packet_id))
        env.pump()
        client.send(Pubrel(packet_id))
        env.pump()
    assert not client.closed


def test_the_clients_topic_alias_maximum_is_capped_by_a_setting(make_env):
    """A v5 client may announce 65535 topic aliases; the broker remembers at most `max_outbound_topic_aliases`
    topic names for it."""
    env = make_env(MqttSettings(sys_interval=0, max_outbound_topic_aliases=4))
    sub = env.client(5)
    sub.connect("sub", properties=Properties(topic_alias_maximum=65535))
    subscribe(sub, env, "t/#", qos=0)
    pub = env.client(5)
    pub.connect("pub")
    for i in range(20):
        pub.send(Publish(f"t/{i}", b"x", 0))
    env.pump()
    got = publishes(sub.received())
    assert len(got) == 20
    aliases = {p.properties.topic_alias for p in got if p.properties.topic_alias is not None}
    assert aliases == {1, 2, 3, 4}
    assert len(sub.protocol.outbound.aliases._aliases) == 4


def test_periodic_sys_updates_skip_a_paused_connection(make_env):
    """$SYS updates are snapshots: while a subscriber's socket is paused they are not written (the next one after it
    drains carries the same values)."""
    env = make_env(MqttSettings(sys_interval=10))
    sub = env.client(4)
    sub.connect("sys")
    assert publishes(subscribe(sub, env, "$SYS/#", qos=0))  # the snapshot on SUBSCRIBE
    sub.protocol.pauseProducing()
    env.clock.advance(10)
    assert publishes(sub.received()) == []
    sub.protocol.resumeProducing()
    env.clock.advance(10)
    assert publishes(sub.received())
    env.factory.stop()
