"""MQTT clients and the native SDK on one broker (DESIGN.md section 3): MQTT topic `T/a/b` is core topic `T` with
subject `a/b`; MQTT 5 user properties are message properties; content type is property `content-type`."""

from __future__ import annotations

import threading

import pytest

from tidegate.client import Producer, PullConsumer, PushConsumer
from tidegate.gateway.testing import wait_until

TIMEOUT = 15.0


def port_of(broker) -> int:
    return broker.host_port("mqtt")[1]


class Collector:
    def __init__(self) -> None:
        self.messages: list = []
        self.lock = threading.Lock()

    def __call__(self, delivered) -> None:
        with self.lock:
            self.messages.append(delivered.message)

    def matching(self, body: bytes) -> list:
        with self.lock:
            return [m for m in self.messages if m.body == body]

    def wait_for(self, body: bytes) -> object:
        wait_until(lambda: self.matching(body), TIMEOUT, f"native delivery of {body!r}")
        [message] = self.matching(body)
        return message


@pytest.fixture
def orders_consumer(broker):
    collector = Collector()
    consumer = PushConsumer("mqtt-interop", "orders", collector, address=broker.native, start="earliest").start()
    yield collector
    consumer.close()


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub_to_orders_eu_paris_reaches_a_native_consumer_with_subject_eu_paris(broker, mosquitto,
                                                                                         orders_consumer, version):
    """`mosquitto_pub -t orders/eu/paris` is a message on native topic `orders` with subject `eu/paris`."""
    body = f"order from mosquitto {version}".encode()
    mosquitto.pub(port_of(broker), "orders/eu/paris", body.decode(), qos=1, version=version)
    message = orders_consumer.wait_for(body)
    assert message.subject == "eu/paris"


def test_mosquitto_pub_to_the_bare_topic_has_no_subject(broker, mosquitto, orders_consumer):
    """`mosquitto_pub -t orders` is a message on native topic `orders` without a subject."""
    mosquitto.pub(port_of(broker), "orders", "bare order", qos=1)
    message = orders_consumer.wait_for(b"bare order")
    assert not message.subject


def test_mqtt5_user_properties_and_content_type_become_native_properties(broker, mosquitto, orders_consumer):
    """MQTT 5 user properties arrive as message properties; the content type as property `content-type`."""
    mosquitto.pub(port_of(broker), "orders/eu/lyon", '{"id": 7}', qos=1, version="mqttv5", extra=[
        "-D", "publish", "user-property", "region", "eu",
        "-D", "publish", "user-property", "priority", "high",
        "-D", "publish", "content-type", "application/json"])
    message = orders_consumer.wait_for(b'{"id": 7}')
    assert message.subject == "eu/lyon"
    assert message.properties["region"] == "eu"
    assert message.properties["priority"] == "high"
    assert message.properties["content-type"] == "application/json"


def test_mqtt_qos1_publish_is_stored_in_the_topic_for_a_native_pull_consumer(broker, mosquitto):
    """A QoS 1 publish acknowledged to mosquitto_pub is readable with the native PullConsumer from offset 0."""
    mosquitto.pub(port_of(broker), "pulled/device/7", "reading 42", qos=1)
    found = []
    with PullConsumer("mqtt-interop-pull", address=broker.native) as puller:
        for queue_id in range(4):  # broker.default_queues of an auto-created topic
            result = puller.pull("pulled", queue_id, 0, max=32)
            found += [d.message for d in result.messages]
    assert [(m.body, m.subject) for m in found] == [(b"reading 42", "device/7")]


def test_native_send_reaches_mqtt_subscribers_of_matching_filters(broker, mosquitto):
    """`Producer.send("orders", subject="eu/paris", properties={"k": "v"})` reaches mosquitto_sub on
    `orders/eu/paris`, `orders/+/paris`, `orders/#` and `#` (MQTT 5: user property k=v), not `orders/us/+`."""
    port = port_of(broker)
    matching = ["orders/eu/paris", "orders/+/paris", "orders/#", "#"]
    subs = {flt: mosquitto.sub(port, flt, qos=1, version="mqttv5") for flt in matching}
    legacy = mosquitto.sub(port, "orders/eu/paris", qos=1)  # an MQTT 3.1.1 subscriber: payload only
    other = mosquitto.sub(port, "orders/us/+", qos=1, version="mqttv5")
    with Producer(address=broker.native) as producer:
        producer.send("orders", b"native order", subject="eu/paris", properties={"k": "v"})
        producer.send("orders", b"end", subject="us/end")  # seen by `other`: everything before was routed
    for flt, sub in subs.items():
        [got] = sub.wait_messages(1, lambda m: m.payload == b"native order")
        assert got.topic == "orders/eu/paris", flt
        assert got.qos == 1, flt
        assert ("k", "v") in got.user_properties, (flt, got.user_properties)
    [got] = legacy.wait_messages(1, lambda m: m.payload == b"native order")
    assert got.topic == "orders/eu/paris"
    other.wait_messages(1, lambda m: m.payload == b"end")
    assert not other.received(lambda m: m.payload == b"native order")


def test_native_content_type_property_is_the_mqtt5_content_type(broker, mosquitto):
    """Native property `content-type` is delivered as the MQTT 5 content type, not as a user property."""
    port = port_of(broker)
    sub = mosquitto.sub(port, "invoices/#", qos=1, version="mqttv5")
    with Producer(address=broker.native) as producer:
        producer.send("invoices", b"{}", subject="2024/1",
                      properties={"content-type": "application/json", "tenant": "acme"})
    [got] = sub.wait_messages(1)
    assert got.topic == "invoices/2024/1"
    assert got.content_type == "application/json"
    assert got.user_properties == [("tenant", "acme")]
