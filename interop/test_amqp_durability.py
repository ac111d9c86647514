"""Durable AMQP entities and persistent messages across broker restarts: a clean stop (SIGTERM) and kill -9.

With the default `sync` flush a publisher confirm means "on disk" (DESIGN.md section 4), so a durable queue's
confirmed persistent messages, durable exchanges and their bindings must be there after either kind of restart;
transient queues, exchanges and messages are gone, as on RabbitMQ. Every test owns its broker (ports change).
"""

from __future__ import annotations

import pika
import pytest

RESTARTS = ["clean-restart", "kill-9"]


def restart(process, how: str) -> None:
    if how == "kill-9":
        process.kill()
    else:
        assert process.stop() == 0, process.log()[-2000:]
    process.start()


def connect(process) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", process.host_port("amqp")[1]))


@pytest.mark.parametrize("how", RESTARTS)
def test_confirmed_persistent_messages_in_a_durable_queue_survive_and_transient_things_do_not(amqp_broker_factory,
                                                                                              how):
    process = amqp_broker_factory()
    connection = connect(process)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare("durable-x", "direct", durable=True)
    channel.exchange_declare("transient-x", "direct", durable=False)
    channel.queue_declare("durable-q", durable=True)
    channel.queue_declare("transient-q", durable=False)
    channel.queue_bind("durable-q", "durable-x", "k")
    for i in range(20):
        channel.basic_publish("durable-x", "k", b"persistent %d" % i, pika.BasicProperties(delivery_mode=2))
    channel.basic_publish("durable-x", "k", b"transient", pika.BasicProperties(delivery_mode=1))
    channel.basic_publish("", "transient-q", b"in a transient queue", pika.BasicProperties(delivery_mode=2))
    connection.close()

    restart(process, how)

    connection = connect(process)
    try:
        channel = connection.channel()
        bodies = []
        while True:
            method, _, body = channel.basic_get("durable-q", auto_ack=True)
            if method is None:
                break
            bodies.append(body)
        assert bodies == [b"persistent %d" % i for i in range(20)]
        # the durable binding survived: a new publish is routed
        channel.confirm_delivery()
        channel.basic_publish("durable-x", "k", b"after", pika.BasicProperties(delivery_mode=2), mandatory=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as error:
            connection.channel().queue_declare("transient-q", passive=True)
        assert error.value.reply_code == 404
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as error:
            connection.channel().exchange_declare("transient-x", passive=True)
        assert error.value.reply_code == 404
    finally:
        connection.close()


@pytest.mark.parametrize("how", RESTARTS)
def test_unacknowledged_messages_come_back_after_a_restart(amqp_broker_factory, how):
    process = amqp_broker_factory()
    connection = connect(process)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare("work", durable=True)
    channel.basic_publish("", "work", b"job", pika.BasicProperties(delivery_mode=2))
    method, _, body = channel.basic_get("work")
    assert body == b"job"
    restart(process, how)  # never acked
    connection = connect(process)
    try:
        method, _, body = connection.channel().basic_get("work", auto_ack=True)
        assert body == b"job"
    finally:
        connection.close()
