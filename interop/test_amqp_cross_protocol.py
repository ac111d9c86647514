"""AMQP meets MQTT and the native SDK through the one core model (DESIGN.md section 3):

- amq.topic with routing key `T.a.b` = core topic `T`, subject `a/b` = MQTT topic name `T/a/b`;
- content_type, correlation_id, reply_to and string headers = MQTT 5 content type, correlation data, response topic
  and user properties = native properties `content-type`, `correlation-id`, `reply-to` and `k=v`.
"""

from __future__ import annotations

import threading
import uuid

import pika

from tidegate.client import Producer, PushConsumer
from tidegate.gateway.testing import wait_until

TIMEOUT = 15.0


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def pika_connection(broker) -> pika.BlockingConnection:
    port = broker.host_port("amqp")[1]
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))


def get_within(channel, queue: str, timeout: float = TIMEOUT):
    got: list = []

    def ready() -> bool:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            got.append((method, properties, body))
        return bool(got)

    wait_until(ready, timeout, f"a message in AMQP queue {queue}")
    return got[0]


def test_amqp_publish_to_amq_topic_reaches_mqtt_subscribers_of_matching_filters(amqp_broker, paho_client):
    from paho.mqtt.properties import Properties  # noqa: F401 - paho's MQTT 5 properties are read below

    topic = unique("sensors")
    mqtt_port = amqp_broker.host_port("mqtt")[1]
    subscribers = {flt: paho_client(unique("sub"), version=5).connect(mqtt_port)
                   for flt in (f"{topic}/kitchen/temp", f"{topic}/+/temp", f"{topic}/#")}
    for flt, client in subscribers.items():
        client.subscribe(flt, qos=1)
    connection = pika_connection(amqp_broker)
    try:
        connection.channel().basic_publish(
            "amq.topic", f"{topic}.kitchen.temp", b"21.5",
            pika.BasicProperties(delivery_mode=2, content_type="text/plain", correlation_id="c-1",
                                 reply_to="replies", headers={"unit": "C"}))
    finally:
        connection.close()
    for flt, client in subscribers.items():
        [message] = client.wait_messages(1)
        assert message.topic == f"{topic}/kitchen/temp", flt
        assert message.qos == 1, flt  # persistent AMQP message -> QoS 1 for a QoS 1 subscription
        props = message.properties
        assert props.ContentType == "text/plain"
        assert props.CorrelationData == b"c-1"
        assert props.ResponseTopic == "replies"
        assert ("unit", "C") in props.UserProperty


def test_mqtt_publish_reaches_an_amqp_queue_bound_to_amq_topic(amqp_broker, paho_client):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topic = unique("devices")
    connection = pika_connection(amqp_broker)
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, "amq.topic", f"{topic}.*.status")
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.UserProperty = [("site", "lyon")]
        client = paho_client(unique("pub"), version=5).connect(amqp_broker.host_port("mqtt")[1])
        client.publish(f"{topic}/door/status", b'{"open": true}', qos=1, properties=props)
        client.publish(f"{topic}/door/battery", b"ignored", qos=1)
        method, properties, body = get_within(channel, queue)
        assert body == b'{"open": true}'
        assert (method.exchange, method.routing_key) == ("amq.topic", f"{topic}.door.status")
        assert properties.content_type == "application/json"
        assert properties.headers == {"site": "lyon"}
        assert properties.delivery_mode == 2
    finally:
        connection.close()


def test_native_send_reaches_an_amqp_queue_bound_to_the_exchange_of_the_same_name(amqp_broker):
    """Native topic `E`, subject `x/y` = exchange `E`, routing key `x.y`."""
    exchange = unique("billing")
    connection = pika_connection(amqp_broker)
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, "topic")
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, exchange, "invoice.#")
        with Producer(address=amqp_broker.native) as producer:
            producer.send(exchange, b"native invoice", subject="invoice/2024",
                          properties={"content-type": "text/plain", "tenant": "acme"})
        method, properties, body = get_within(channel, queue)
        assert body == b"native invoice"
        assert (method.exchange, method.routing_key) == (exchange, "invoice.2024")
        assert properties.content_type == "text/plain" and properties.headers == {"tenant": "acme"}
    finally:
        connection.close()


def test_amqp_publish_reaches_a_native_consumer_of_the_topic(amqp_broker):
    topic = unique("orders")
    received: list = []
    lock = threading.Lock()

    def collect(delivered) -> None:
        with lock:
            received.append(delivered.message)

    consumer = PushConsumer(unique("native-group"), topic, collect, address=amqp_broker.native,
                            start="earliest").start()
    try:
        connection = pika_connection(amqp_broker)
        try:
            connection.channel().basic_publish(
                "amq.topic", f"{topic}.eu.paris", b"amqp order",
                pika.BasicProperties(delivery_mode=2, message_id="m-1", headers={"k": "v"}))
        finally:
            connection.close()
        wait_until(lambda: received, TIMEOUT, "the native consumer's delivery")
        message = received[0]
        assert (message.topic, message.subject, message.body) == (topic, "eu/paris", b"amqp order")
        assert message.properties == {"k": "v", "message-id": "m-1"}
    finally:
        consumer.close()
