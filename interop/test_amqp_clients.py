"""Off-the-shelf AMQP 0-9-1 clients against a real `tidegate serve`: pika (blocking and asyncio), kombu, py-amqp,
aio-pika and Debian's amqp-tools, unchanged, as they would talk to RabbitMQ."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import uuid

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ProbableAuthenticationError, UnroutableError

from tidegate.gateway.testing import wait_until

TIMEOUT = 15.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pika_channel(amqp_broker, amqp_url):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url(amqp_broker)))
    yield connection.channel()
    if connection.is_open:
        connection.close()


def consume_n(channel, queue: str, count: int, auto_ack: bool = False) -> list:
    got = []
    for method, properties, body in channel.consume(queue, auto_ack=auto_ack, inactivity_timeout=TIMEOUT):
        assert method is not None, f"timed out after {len(got)} of {count} messages"
        got.append((method, properties, body))
        if not auto_ack:
            channel.basic_ack(method.delivery_tag)
        if len(got) == count:
            break
    channel.cancel()
    return got


# ------------------------------------------------------------------------------------------------ pika

def test_pika_publish_with_confirms_and_consume_with_manual_acks(pika_channel):
    """Durable queue, persistent messages with publisher confirms, then a consumer with prefetch 10 acking each."""
    ch = pika_channel
    queue = unique("pika-q")
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    for i in range(50):
        ch.basic_publish("", queue, b"m%d" % i, pika.BasicProperties(delivery_mode=2, content_type="text/plain",
                                                                    headers={"i": str(i)}))
    ch.basic_qos(prefetch_count=10)
    got = consume_n(ch, queue, 50)
    assert [body for _, _, body in got] == [b"m%d" % i for i in range(50)]
    assert got[7][1].headers == {"i": "7"} and got[7][1].content_type == "text/plain"
    assert ch.queue_declare(queue, passive=True).method.message_count == 0


def test_pika_topic_exchange_binding_and_routing_keys(pika_channel):
    ch = pika_channel
    exchange, queue = unique("pika-x"), unique("pika-q")
    ch.exchange_declare(exchange, "topic")
    ch.queue_declare(queue, exclusive=True)
    ch.queue_bind(queue, exchange, "orders.*.paris")
    ch.queue_bind(queue, exchange, "audit.#")
    for key in ("orders.eu.paris", "orders.eu.lyon", "audit", "audit.a.b.c"):
        ch.basic_publish(exchange, key, key.encode())
    got = consume_n(ch, queue, 3, auto_ack=True)
    assert sorted(body for _, _, body in got) == [b"audit", b"audit.a.b.c", b"orders.eu.paris"]
    assert {(m.exchange, m.routing_key) for m, _, _ in got} >= {(exchange, "orders.eu.paris")}


def test_pika_mandatory_unroutable_publish_is_returned(pika_channel):
    ch = pika_channel
    ch.confirm_delivery()
    with pytest.raises(UnroutableError):
        ch.basic_publish("amq.direct", unique("nobody"), b"x", mandatory=True)


def test_pika_basic_get_nack_requeue_redelivers(pika_channel):
    ch = pika_channel
    queue = unique("pika-get")
    ch.queue_declare(queue, auto_delete=False)
    ch.basic_publish("", queue, b"again")
    method, _, body = ch.basic_get(queue)
    assert body == b"again" and not method.redelivered
    ch.basic_nack(method.delivery_tag, requeue=True)
    method, _, body = ch.basic_get(queue)
    assert body == b"again" and method.redelivered
    ch.basic_ack(method.delivery_tag)
    assert ch.basic_get(queue) == (None, None, None)


def test_pika_transactions(pika_channel):
    ch = pika_channel
    queue = unique("pika-tx")
    ch.queue_declare(queue)
    ch.tx_select()
    ch.basic_publish("", queue, b"rolled back")
    ch.tx_rollback()
    ch.basic_publish("", queue, b"committed")
    ch.tx_commit()
    assert [body for _, _, body in consume_n(ch, queue, 1, auto_ack=True)] == [b"committed"]


def test_pika_errors_close_the_channel_with_rabbitmq_reply_codes(amqp_broker, amqp_url):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url(amqp_broker)))
    try:
        queue = unique("pika-err")
        connection.channel().queue_declare(queue, durable=True)
        with pytest.raises(ChannelClosedByBroker) as error:
            connection.channel().queue_declare(queue, durable=False)
        assert error.value.reply_code == 406
        with pytest.raises(ChannelClosedByBroker) as error:
            connection.channel().queue_declare(unique("missing"), passive=True)
        assert error.value.reply_code == 404
        channel = connection.channel()
        with pytest.raises(ChannelClosedByBroker) as error:
            channel.basic_publish(unique("no-exchange"), "k", b"x")
            channel.queue_declare(queue, passive=True)  # the close arrives asynchronously; a round trip sees it
        assert error.value.reply_code == 404
        # the connection survives channel errors
        assert connection.channel().queue_declare(queue, passive=True, durable=True).method.queue == queue
    finally:
        connection.close()


def test_pika_wrong_password_is_refused(amqp_broker):
    port = amqp_broker.host_port("amqp")[1]
    with pytest.raises(ProbableAuthenticationError):
        pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", port, credentials=pika.PlainCredentials("guest", "wrong"), connection_attempts=1))


def test_wrong_protocol_header_gets_the_amqp_header_back(amqp_broker):
    port = amqp_broker.host_port("amqp")[1]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        data = b""
        while chunk := sock.recv(64):
            data += chunk
    assert data == b"AMQP\x00\x00\x09\x01"


def test_pika_asyncio_connection_round_trip(amqp_broker, amqp_url):
    """pika's asyncio adapter: declare, consume, publish, receive, close."""
    from pika.adapters.asyncio_connection import AsyncioConnection

    loop = asyncio.new_event_loop()
    done: asyncio.Future = loop.create_future()
    queue = unique("pika-async")

    def on_open(connection):
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel):
        def on_message(ch, method, properties, body):
            ch.basic_ack(method.delivery_tag)
            if not done.done():
                done.set_result(body)

        def on_declared(_frame):
            channel.basic_consume(queue, on_message)
            channel.basic_publish("", queue, b"async hello")

        channel.queue_declare(queue, exclusive=True, callback=on_declared)

    connection = AsyncioConnection(pika.URLParameters(amqp_url(amqp_broker)), on_open_callback=on_open,
                                   on_open_error_callback=lambda c, e: done.set_exception(e), custom_ioloop=loop)
    try:
        assert loop.run_until_complete(asyncio.wait_for(done, TIMEOUT)) == b"async hello"
    finally:
        connection.close()
        loop.run_until_complete(asyncio.sleep(0.05))  # let the close handshake go out
        loop.close()


# ------------------------------------------------------------------------------------------------ kombu / py-amqp

def test_kombu_producer_and_simple_queue(amqp_broker, amqp_url):
    from kombu import Connection, Exchange, Queue

    exchange = Exchange(unique("kombu-x"), type="direct", durable=True)
    queue = Queue(unique("kombu-q"), exchange=exchange, routing_key="jobs", durable=True)
    with Connection(amqp_url(amqp_broker), connect_timeout=TIMEOUT) as connection:
        producer = connection.Producer(serializer="json")
        producer.publish({"job": 1}, exchange=exchange, routing_key="jobs", declare=[queue], retry=False)
        simple = connection.SimpleQueue(queue)
        message = simple.get(timeout=TIMEOUT)
        assert message.payload == {"job": 1}
        assert message.delivery_info["routing_key"] == "jobs"
        message.ack()
        simple.close()


def test_py_amqp_publish_get_and_confirm(amqp_broker):
    import amqp

    port = amqp_broker.host_port("amqp")[1]
    with amqp.Connection(f"127.0.0.1:{port}", userid="guest", password="guest", confirm_publish=True) as conn:
        channel = conn.channel()
        queue = unique("py-amqp")
        channel.queue_declare(queue, durable=True, auto_delete=False)
        channel.basic_publish(amqp.Message("hi", content_type="text/plain", application_headers={"a": "b"},
                                           delivery_mode=2), exchange="", routing_key=queue)
        message = channel.basic_get(queue, no_ack=True)
        assert message.body == "hi" and message.properties["application_headers"] == {"a": "b"}
        channel.queue_delete(queue)


def test_aio_pika_round_trip_with_headers_exchange(amqp_broker, amqp_url):
    import aio_pika

    async def scenario() -> list[bytes]:
        connection = await aio_pika.connect_robust(amqp_url(amqp_broker), timeout=TIMEOUT)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(unique("aio-h"), aio_pika.ExchangeType.HEADERS)
            queue = await channel.declare_queue(unique("aio-q"), exclusive=True)
            await queue.bind(exchange, arguments={"x-match": "any", "kind": "a", "tier": "gold"})
            await exchange.publish(aio_pika.Message(b"match", headers={"kind": "a"}), routing_key="")
            await exchange.publish(aio_pika.Message(b"skip", headers={"kind": "b"}), routing_key="")
            got = []
            async with queue.iterator(timeout=TIMEOUT) as messages:
                async for message in messages:
                    async with message.process():
                        got.append(message.body)
                    break
            return got

    assert asyncio.run(asyncio.wait_for(scenario(), TIMEOUT * 2)) == [b"match"]


# ------------------------------------------------------------------------------------------------ amqp-tools

def test_amqp_publish_and_amqp_consume(amqp_broker, amqp_tools, pika_channel):
    port = amqp_broker.host_port("amqp")[1]
    queue = unique("tools")
    pika_channel.queue_declare(queue, durable=True)
    url = f"amqp://guest:guest@127.0.0.1:{port}"
    subprocess.run(["amqp-publish", "--url", url, "-r", queue, "-p", "-C", "text/plain", "-b", "from amqp-tools"],
                   check=True, timeout=TIMEOUT)
    out = subprocess.run(["amqp-consume", "--url", url, "-q", queue, "-c", "1", "cat"], check=True,
                         capture_output=True, timeout=TIMEOUT)
    assert out.stdout == b"from amqp-tools"


def test_pika_with_one_second_heartbeats_stays_connected_while_idle(amqp_broker):
    """Heartbeats both ways: pika (heartbeat 1 s) and the broker (tune-ok wins) keep an idle connection alive."""
    port = amqp_broker.host_port("amqp")[1]
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port, heartbeat=1))
    try:
        connection.process_data_events(time_limit=3.5)  # idle for 3.5 heartbeat intervals, pumping I/O
        assert connection.is_open
        channel = connection.channel()
        assert channel.queue_declare("", exclusive=True).method.queue.startswith("amq.gen-")
    finally:
        connection.close()


def test_pika_consumer_is_cancelled_by_the_server_when_its_queue_is_deleted(amqp_broker, amqp_url):
    """consumer_cancel_notify: deleting the queue from another connection sends basic.cancel to the consumer."""
    consumer_connection = pika.BlockingConnection(pika.URLParameters(amqp_url(amqp_broker)))
    admin_connection = pika.BlockingConnection(pika.URLParameters(amqp_url(amqp_broker)))
    try:
        channel = consumer_connection.channel()
        queue = unique("doomed")
        channel.queue_declare(queue)
        cancelled: list = []
        channel.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
        tag = channel.basic_consume(queue, lambda *args: None)
        admin_connection.channel().queue_delete(queue)
        def cancel_arrived() -> bool:
            consumer_connection.process_data_events(time_limit=0.1)
            return bool(cancelled)

        wait_until(cancel_arrived, TIMEOUT, "basic.cancel from the broker")
        assert cancelled == [tag]
    finally:
        admin_connection.close()
        consumer_connection.close()


def test_exclusive_queue_is_locked_for_other_connections(amqp_broker, amqp_url):
    owner = pika.BlockingConnection(pika.URLParameters(amqp_url(amqp_broker)))
    other = pika.BlockingConnection(pika.URLParameters(amqp_url(amqp_broker)))
    try:
        queue = owner.channel().queue_declare("", exclusive=True).method.queue
        with pytest.raises(ChannelClosedByBroker) as error:
            other.channel().basic_consume(queue, lambda *args: None)
        assert error.value.reply_code == 405
    finally:
        other.close()
        owner.close()
