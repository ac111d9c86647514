"""amqtt (asyncio MQTT 3.1.1 client) against one `tidegate serve` process."""

from __future__ import annotations

import asyncio

import amqtt.client as amqtt_client
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2  # noqa: E402

TIMEOUT = 15.0


def uri(broker) -> str:
    host, port = broker.host_port("mqtt")
    return f"mqtt://{host}:{port}/"


def client(client_id: str):
    return amqtt_client.MQTTClient(client_id=client_id, config={"auto_reconnect": False, "keep_alive": 30})


async def receive(c, count: int) -> list:
    out = []
    for _ in range(count):
        message = await c.deliver_message(timeout_duration=TIMEOUT)
        assert message is not None, f"amqtt: got {len(out)} of {count} messages within {TIMEOUT}s"
        out.append(message)
    return out


def test_amqtt_subscribes_at_qos_1_and_2_and_receives_qos_0_1_2_publishes(broker):
    """amqtt connects, subscribes at QoS 1 and QoS 2, publishes at QoS 0, 1 and 2 and receives each message with
    QoS min(publish, subscription)."""

    async def scenario():
        sub, pub = client("amqtt-sub"), client("amqtt-pub")
        await sub.connect(uri(broker), cleansession=True)
        await pub.connect(uri(broker), cleansession=True)
        try:
            granted = await sub.subscribe([("amqtt/q1/#", QOS_1), ("amqtt/q2/#", QOS_2)])
            assert granted == [QOS_1, QOS_2]
            for qos in (QOS_0, QOS_1, QOS_2):
                await pub.publish(f"amqtt/q1/{qos}", b"to q1 sub at %d" % qos, qos=qos)
                await pub.publish(f"amqtt/q2/{qos}", b"to q2 sub at %d" % qos, qos=qos)
            got = await receive(sub, 6)
        finally:
            await sub.disconnect()
            await pub.disconnect()
        return sorted((m.topic, m.data, m.qos) for m in got)

    assert asyncio.run(scenario()) == sorted(
        [(f"amqtt/q1/{q}", b"to q1 sub at %d" % q, min(q, 1)) for q in (0, 1, 2)]
        + [(f"amqtt/q2/{q}", b"to q2 sub at %d" % q, q) for q in (0, 1, 2)])


def test_amqtt_persistent_session_gets_messages_published_while_offline(broker):
    """clean_session=False: QoS 1/2 messages published while the amqtt client was disconnected arrive when it
    reconnects with the same client id."""

    async def scenario():
        sub = client("amqtt-persistent")
        await sub.connect(uri(broker), cleansession=False)
        await sub.subscribe([("amqtt/offline/#", QOS_2)])
        await sub.disconnect()

        pub = client("amqtt-offline-pub")
        await pub.connect(uri(broker), cleansession=True)
        await pub.publish("amqtt/offline/a", b"while away 1", qos=QOS_1)
        await pub.publish("amqtt/offline/b", b"while away 2", qos=QOS_2)
        await pub.disconnect()

        back = client("amqtt-persistent")
        await back.connect(uri(broker), cleansession=False)
        try:
            got = await receive(back, 2)
        finally:
            await back.disconnect()
        return [(m.topic, m.data, m.qos) for m in got]

    assert asyncio.run(scenario()) == [("amqtt/offline/a", b"while away 1", 1),
                                       ("amqtt/offline/b", b"while away 2", 2)]
