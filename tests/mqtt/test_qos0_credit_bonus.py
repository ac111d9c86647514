"""QoS 0 credit bonus (adapters/mqtt/outbound.py): while a subscription's deliveries all leave at QoS 0, its core
credit grows past the receive maximum so the core hands out fewer, larger batches; it is taken back for QoS 1/2
deliveries and large messages, never grows while the transport is paused, and nothing is lost or reordered."""

from tidegate.adapters.mqtt.codec import Puback, Publish, Subscribe, TopicSubscription
from tidegate.adapters.mqtt.outbound import QOS0_CREDIT_BONUS, QOS0_CREDIT_BONUS_BYTES


def _publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def _subscriber(env, *subscriptions):
    sub, pub = env.client(4), env.client(4)
    sub.connect("sub")
    pub.connect("pub")
    sub.send(Subscribe(1, tuple(subscriptions)))
    env.pump()
    sub.received()
    return sub, pub


def _core_subscription(client):
    outbound = client.protocol.outbound
    [core_sub] = outbound.subs.values()
    return outbound, core_sub


def _receive_all(env, sub, expected, ack=False):
    got = []
    for _ in range(100):
        env.pump()
        batch = _publishes(sub.received())
        got += batch
        if ack:
            acks = [Puback(p.packet_id) for p in batch if p.qos == 1]
            if acks:
                sub.send(*acks)
        if len(got) >= expected:
            break
    return got


def test_qos0_deliveries_raise_the_core_credit_by_the_bonus_and_arrive_whole_in_order(env):
    sub, pub = _subscriber(env, TopicSubscription("q/#", 0))
    outbound, core_sub = _core_subscription(sub)
    maximum = env.settings.receive_maximum
    assert core_sub.credit == maximum
    count = 3 * (maximum + QOS0_CREDIT_BONUS)
    pub.send(*(Publish("q/x", str(i).encode(), 0) for i in range(count)))
    got = _receive_all(env, sub, count)
    assert [p.payload for p in got] == [str(i).encode() for i in range(count)]
    assert core_sub.credit == maximum + QOS0_CREDIT_BONUS
    assert outbound.credit_bonus == {next(iter(outbound.subs)): QOS0_CREDIT_BONUS}


def test_qos1_deliveries_take_the_bonus_back_and_keep_the_client_window(env):
    """Once QoS 1 deliveries are in flight the credit returns to the receive maximum (the PUBACKs pay the bonus
    back; what the core handed out beyond the window waits in `pending`): the window on the wire never exceeds it
    and every message arrives once, in order."""
    sub, pub = _subscriber(env, TopicSubscription("q/#", 1))
    outbound, core_sub = _core_subscription(sub)
    maximum = env.settings.receive_maximum
    pub.send(*(Publish("q/zero", b"%d" % i, 0) for i in range(2 * maximum)))
    assert len(_receive_all(env, sub, 2 * maximum)) == 2 * maximum
    assert core_sub.credit == maximum + QOS0_CREDIT_BONUS
    count = 2 * (maximum + QOS0_CREDIT_BONUS)  # the first core batch still has the bonus: paid back by PUBACKs
    pub.send(*(Publish("q/one", b"%d" % i, 1, packet_id=i + 1) for i in range(count)))
    env.pump()
    pub.received()
    got, most_unacked = [], 0
    for _ in range(200):
        env.pump()
        batch = _publishes(sub.received())
        most_unacked = max(most_unacked, len(batch))
        got += batch
        if batch:
            sub.send(*(Puback(p.packet_id) for p in batch))
        if len(got) >= count:
            break
    assert [p.payload for p in got] == [b"%d" % i for i in range(count)]
    assert all(p.qos == 1 for p in got)
    assert most_unacked <= maximum
    env.pump()
    assert not outbound.credit_bonus or not any(outbound.credit_bonus.values())
    assert core_sub.credit == maximum


def test_the_bonus_is_bounded_by_payload_bytes(env):
    sub, pub = _subscriber(env, TopicSubscription("q/#", 0))
    outbound, core_sub = _core_subscription(sub)
    maximum = env.settings.receive_maximum
    size = 64 * 1024
    pub.send(*(Publish("q/big", bytes([i]) * size, 0) for i in range(maximum)))
    assert len(_receive_all(env, sub, maximum)) == maximum
    assert core_sub.credit == maximum + QOS0_CREDIT_BONUS_BYTES // size


def test_no_bonus_while_the_transport_is_paused_and_pending_stays_bounded(env):
    sub, pub = _subscriber(env, TopicSubscription("q/#", 0))
    outbound, core_sub = _core_subscription(sub)
    maximum = env.settings.receive_maximum
    sub.protocol.pauseProducing()  # the client does not read
    pub.send(*(Publish("q/x", b"%d" % i, 0) for i in range(4 * maximum)))
    env.pump(20)
    assert len(outbound.pending) == maximum
    assert core_sub.credit == 0
    assert not outbound.credit_bonus
    sub.protocol.resumeProducing()
    got = _receive_all(env, sub, 4 * maximum)
    assert [p.payload for p in got] == [b"%d" % i for i in range(4 * maximum)]


def test_a_client_that_stops_reading_gets_no_more_than_its_receive_maximum_of_large_messages(env):
    """The bonus was sized for the small messages that earned it: when the transport pauses, what the core has not
    used of it is taken back, so large messages that follow cannot fill `pending` beyond the receive maximum."""
    sub, pub = _subscriber(env, TopicSubscription("q/#", 0))
    outbound, core_sub = _core_subscription(sub)
    maximum = env.settings.receive_maximum
    pub.send(*(Publish("q/small", b"s", 0) for _ in range(2 * maximum)))
    assert len(_receive_all(env, sub, 2 * maximum)) == 2 * maximum
    assert core_sub.credit == maximum + QOS0_CREDIT_BONUS

    sub.protocol.pauseProducing()  # the client stopped reading
    assert core_sub.credit == maximum
    size = 256 * 1024
    for i in range(maximum + QOS0_CREDIT_BONUS):
        pub.send(Publish("q/big", bytes([i % 256]) * size, 0))
        env.pump(1)
    env.pump(20)
    assert sum(len(waiting.message.body) for waiting in outbound.pending) <= maximum * size

    sub.protocol.resumeProducing()  # reading again: everything arrives, in order
    got = _receive_all(env, sub, maximum + QOS0_CREDIT_BONUS)
    assert [p.payload[0] for p in got] == [i % 256 for i in range(maximum + QOS0_CREDIT_BONUS)]
