"""Queue arguments with pika against the real broker process: x-overflow reject-publish (basic.nack to a confirming
publisher), x-max-length-bytes, x-max-priority, and x-max-length holding for MQTT publishers of a bound topic."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pika
import pytest

from tidegate.gateway.testing import wait_until

TIMEOUT = 15.0


@pytest.fixture
def channel(amqp_broker):
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", amqp_broker.host_port("amqp")[1]))
    yield connection.channel()
    connection.close()


def drain(channel, queue: str) -> list[bytes]:
    bodies = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def test_reject_publish_nacks_a_confirming_pika_publisher_once_the_queue_is_full(channel):
    channel.queue_declare("full", arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    channel.confirm_delivery()
    channel.basic_publish("", "full", b"1")
    channel.basic_publish("", "full", b"2")
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish("", "full", b"3")
    assert drain(channel, "full") == [b"1", b"2"]
    channel.basic_publish("", "full", b"4")  # room again: acked
    assert drain(channel, "full") == [b"4"]


def test_max_length_bytes_drops_the_oldest(channel):
    channel.queue_declare("bytes", arguments={"x-max-length-bytes": 6})
    channel.confirm_delivery()
    for body in (b"aaa", b"bbb", b"ccc"):
        channel.basic_publish("", "bytes", body)
    wait_until(lambda: channel.queue_declare("bytes", passive=True).method.message_count == 2, TIMEOUT,
               "the oldest message dropped")
    assert drain(channel, "bytes") == [b"bbb", b"ccc"]


def test_a_priority_queue_delivers_its_backlog_highest_priority_first(channel):
    channel.queue_declare("prio", arguments={"x-max-priority": 10})
    channel.confirm_delivery()
    for index, priority in enumerate([1, 8, 3, 8, 20]):
        channel.basic_publish("", "prio", b"%d:%d" % (priority, index), pika.BasicProperties(priority=priority))
    channel.basic_qos(prefetch_count=1)
    order = []
    for method, _, body in channel.consume("prio", inactivity_timeout=TIMEOUT):
        assert method is not None, order
        order.append(body)
        channel.basic_ack(method.delivery_tag)
        if len(order) == 5:
            break
    channel.cancel()
    assert order == [b"20:4", b"8:1", b"8:3", b"3:2", b"1:0"]


def test_x_max_length_holds_for_mqtt_publishers_of_a_bound_topic(channel, amqp_broker):
    channel.queue_declare("mqtt-bounded", arguments={"x-max-length": 3})
    channel.queue_bind("mqtt-bounded", "amq.topic", "plant.#")
    host, port = amqp_broker.host_port("mqtt")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="limits-publisher")
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish("plant/line1", b"%d" % i, qos=1) for i in range(10)]
        deadline = time.monotonic() + TIMEOUT
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    finally:
        client.loop_stop()
        client.disconnect()
    wait_until(lambda: channel.queue_declare("mqtt-bounded", passive=True).method.message_count == 3, TIMEOUT,
               "three newest kept")
    assert drain(channel, "mqtt-bounded") == [b"7", b"8", b"9"]
