"""Messages delivered but not acknowledged when the broker stops come back with redelivered=true after the restart
(RabbitMQ's meaning of the flag: the message may have been delivered before), with pika against the real broker
process, for a clean stop (SIGTERM) and kill -9."""

from __future__ import annotations

import pika
import pytest

RESTARTS = ["clean-restart", "kill-9"]
TIMEOUT = 15.0


def restart(process, how: str) -> None:
    if how == "kill-9":
        process.kill()
    else:
        assert process.stop() == 0, process.log()[-2000:]
    process.start()


def connect(process) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", process.host_port("amqp")[1]))


def publish(channel, queue: str, bodies: list[bytes]) -> None:
    channel.confirm_delivery()
    for body in bodies:
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))


@pytest.mark.parametrize("how", RESTARTS)
def test_unacked_consumer_deliveries_come_back_redelivered_after_a_restart(amqp_broker_factory, how):
    process = amqp_broker_factory()
    connection = connect(process)
    channel = connection.channel()
    channel.queue_declare("work", durable=True)
    publish(channel, "work", [b"a", b"b", b"c"])
    consuming = connection.channel()
    consuming.basic_qos(prefetch_count=2)
    seen = []
    for method, _, body in consuming.consume("work", inactivity_timeout=TIMEOUT):
        assert method is not None, "no delivery"
        assert not method.redelivered
        seen.append(body)
        if len(seen) == 2:
            break  # two delivered, never acked; "c" never delivered
    restart(process, how)

    connection = connect(process)
    try:
        channel = connection.channel()
        got = {}
        for _ in range(3):
            method, _, body = channel.basic_get("work", auto_ack=True)
            got[body] = method.redelivered
        assert got[b"a"] is True and got[b"b"] is True
        if how == "clean-restart":
            assert got[b"c"] is False  # the exact mark is saved on a clean stop
    finally:
        connection.close()


@pytest.mark.parametrize("how", RESTARTS)
def test_an_unacked_basic_get_comes_back_redelivered_and_a_fresh_message_does_not(amqp_broker_factory, how):
    process = amqp_broker_factory()
    connection = connect(process)
    channel = connection.channel()
    channel.queue_declare("work", durable=True)
    publish(channel, "work", [b"taken"])
    method, _, body = channel.basic_get("work")
    assert body == b"taken" and not method.redelivered
    restart(process, how)

    connection = connect(process)
    try:
        channel = connection.channel()
        method, _, body = channel.basic_get("work")
        assert body == b"taken" and method.redelivered
        channel.basic_ack(method.delivery_tag)
        publish(channel, "work", [b"fresh"])
        method, _, body = channel.basic_get("work", auto_ack=True)
        assert body == b"fresh" and not method.redelivered  # stored after the restart: never delivered
    finally:
        connection.close()
