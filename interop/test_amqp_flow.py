"""Flow control with real clients against the real broker process: connection.blocked when a resource alarm is
raised (a memory watermark or a free-disk limit the machine cannot meet), and channel.flow (py-amqp)."""

from __future__ import annotations

import time

import amqp
import pika
import pytest

from tidegate.gateway.testing import wait_until

TIMEOUT = 15.0


def pika_connection(process) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", process.host_port("amqp")[1]))


@pytest.mark.parametrize(("setting", "alarm"), [
    ("alarms.memory_high_watermark_bytes=1", "memory"),  # any process is over a 1-byte watermark
    ("alarms.disk_free_limit_bytes=1000000000000000000", "storage"),  # no disk here has an exabyte free
])
def test_pika_hears_connection_blocked_and_its_connection_is_no_longer_read(amqp_broker_factory, setting, alarm):
    process = amqp_broker_factory("data", "--set", setting)
    connection = pika_connection(process)
    blocked: list[str] = []
    connection.add_on_connection_blocked_callback(lambda conn, frame: blocked.append(frame.method.reason))
    channel = connection.channel()
    channel.queue_declare("jobs")
    channel.basic_publish("", "jobs", b"first")
    deadline = time.monotonic() + TIMEOUT
    while not blocked and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.1)
    assert blocked and alarm in blocked[0], blocked
    # a connection that does not publish is still served: the first publish was read and stored, later ones wait
    other = pika_connection(process)
    try:
        other_channel = other.channel()
        wait_until(lambda: other_channel.queue_declare("jobs", passive=True).method.message_count == 1, TIMEOUT,
                   "the publish read before the block is stored")
        channel.basic_publish("", "jobs", b"second")  # written to the socket, not read by the broker
        method, _, body = other_channel.basic_get("jobs", auto_ack=True)
        assert body == b"first"
        assert other_channel.queue_declare("jobs", passive=True).method.message_count == 0
    finally:
        other.close()
    assert "blocked" in process.log() or alarm in process.log()


def test_channel_flow_off_stops_deliveries_to_a_py_amqp_consumer_and_on_resumes_them(amqp_broker):
    host, port = amqp_broker.host_port("amqp")
    consumer = amqp.Connection(f"{host}:{port}")
    consumer.connect()
    publisher = amqp.Connection(f"{host}:{port}")
    publisher.connect()
    try:
        channel = consumer.channel()
        channel.queue_declare("flowed", auto_delete=False)
        received: list[bytes] = []
        channel.basic_consume("flowed", callback=lambda message: received.append(message.body), no_ack=True)
        channel.flow(False)
        publishing = publisher.channel()
        for i in range(3):
            publishing.basic_publish(amqp.Message(b"m%d" % i), exchange="", routing_key="flowed")
        wait_until(lambda: publishing.queue_declare("flowed", passive=True).message_count == 3, TIMEOUT,
                   "three messages ready, none delivered while the channel is flowed off")
        assert received == []
        channel.flow(True)
        deadline = time.monotonic() + TIMEOUT
        while len(received) < 3 and time.monotonic() < deadline:
            try:
                consumer.drain_events(timeout=0.2)
            except TimeoutError:
                pass
        assert received == [b"m0", b"m1", b"m2"]
    finally:
        consumer.close()
        publisher.close()
