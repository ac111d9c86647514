"""End to end against a real `tidegate serve`: limits and topic schemas set through the CLI (admin API) and answered
the protocol's way to paho (MQTT 3.1.1 and 5), pika (AMQP 0-9-1) and the native SDK; hits show up in /metrics."""

from __future__ import annotations

import io
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator

import paho.mqtt.client as paho
import pika
import pytest
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker, ConnectionClosedByBroker

from tidegate.adapters.native.client.blocking import Producer
from tidegate.core.errors import QuotaExceeded, SchemaViolation
from tidegate.gateway import cli
from tidegate.gateway.testing import BrokerProcess

from .mqtt_helpers import Mqtt

TIMEOUT = 10.0
ADMIN_PASSWORD = "adminpw-limits"
ORDER_SCHEMA = {"type": "object", "required": ["id", "qty"],
                "properties": {"id": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("limits")
    process = BrokerProcess(root / "data", "--log-level", "warning", "--set", "security.login_delay_ms=0",
                            listeners=("native", "admin", "mqtt", "amqp"),
                            env={"TIDEGATE_ADMIN_PASSWORD": ADMIN_PASSWORD})
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


def run_cli(broker: BrokerProcess, *argv: str, stdin: str = "") -> int:
    env = {"TIDEGATE_ADMIN": broker.address("admin"), "TIDEGATE_USER": "admin", "TIDEGATE_PASSWORD": ADMIN_PASSWORD,
           "TIDEGATE_SERVER": broker.address("native")}
    saved = {k: os.environ.get(k) for k in env}
    saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    os.environ.update(env)
    try:
        return cli.main(list(argv))
    finally:
        sys.stdin = saved_stdin
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def users(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Users with the allow-all role and their limits, and the topic `orders` with a schema, all through the CLI."""
    passwords = {name: f"{name}-pw" for name in ("nat", "mq", "am", "mqconn", "amconn", "maker")}
    for name, password in passwords.items():
        assert run_cli(broker, "user", "add", name, "--password-stdin", "--role", "allow-all", stdin=password) == 0
    assert run_cli(broker, "user", "limits", "nat", "--publish-rate", "2") == 0
    assert run_cli(broker, "user", "limits", "mq", "--publish-rate", "2") == 0
    assert run_cli(broker, "user", "limits", "am", "--publish-rate", "20") == 0
    assert run_cli(broker, "user", "limits", "mqconn", "--max-connections", "1") == 0
    assert run_cli(broker, "user", "limits", "amconn", "--max-connections", "1") == 0
    assert run_cli(broker, "user", "limits", "maker", "--max-topics-created", "2") == 0
    assert run_cli(broker, "topic", "create", "orders") == 0
    schema_file = tmp_path_factory.mktemp("schema") / "order.json"
    schema_file.write_text(json.dumps(ORDER_SCHEMA))
    assert run_cli(broker, "topic", "schema", "set", "orders", "--file", str(schema_file), "--content-type",
                   "application/json") == 0
    return passwords


def metrics(broker: BrokerProcess) -> str:
    with urllib.request.urlopen(f"http://{broker.address('admin')}/metrics", timeout=TIMEOUT) as response:
        return response.read().decode()


def limit_hits(broker: BrokerProcess, listener: str, cause: str) -> float:
    wanted = f'tidegate_security_limit_hits_total{{cause="{cause}",listener="{listener}"}} '
    for line in metrics(broker).splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------------------------------------- CLI and API
def test_user_limits_and_topic_schema_are_shown_by_the_cli(broker, users, capsys):
    capsys.readouterr()
    assert run_cli(broker, "user", "limits", "nat", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["limits"] == {"publish_rate": 2} and shown["effective"]["publish_rate"] == 2
    assert run_cli(broker, "topic", "schema", "show", "orders", "--json") == 0
    rule = json.loads(capsys.readouterr().out)
    assert rule["schema"] == ORDER_SCHEMA and rule["content_type"] == "application/json" and rule["version"] == 1
    assert run_cli(broker, "topic", "schema", "set", "no-such-topic", "--content-type", "text/plain") == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert run_cli(broker, "user", "limits", "nobody", "--publish-rate", "1") == 1
    assert "HTTP 404" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- native
def test_native_publish_rate_is_refused_with_quota_exceeded(broker, users):
    with Producer(broker.address("native"), username="nat", password=users["nat"]) as producer:
        producer.send("native-rate", b"1")
        producer.send("native-rate", b"2")
        with pytest.raises(QuotaExceeded, match="publish rate of user 'nat'"):
            producer.send("native-rate", b"3")
    assert limit_hits(broker, "native", "publish_rate") >= 1


def test_native_schema_violation_carries_the_validators_reason(broker, users):
    with Producer(broker.address("native")) as producer:
        producer.send("orders", b'{"id": "o1", "qty": 2}')
        with pytest.raises(SchemaViolation, match="qty must be bigger than or equal to 1"):
            producer.send("orders", b'{"id": "o2", "qty": 0}')
        with pytest.raises(SchemaViolation, match="content type application/json"):
            producer.send("orders", b'{"id": "o3", "qty": 1}', properties={"content-type": "text/csv"})
    assert limit_hits(broker, "native", "schema") >= 2


# ---------------------------------------------------------------------------------------------- MQTT


def test_mqtt5_connection_limit_per_user_is_connack_quota_exceeded(broker, users):
    port = broker.host_port("mqtt")[1]
    first, second, v3 = Mqtt(paho.MQTTv5, "mqconn-1"), Mqtt(paho.MQTTv5, "mqconn-2"), Mqtt(paho.MQTTv311, "mqconn-3")
    try:
        assert first.connect(port, "mqconn", users["mqconn"]).value == 0
        assert second.connect(port, "mqconn", users["mqconn"]).value == 0x97  # Quota exceeded
        assert v3.connect(port, "mqconn", users["mqconn"]).value in (3, 0x88)  # 3.1.1: server unavailable
    finally:
        for client in (first, second, v3):
            client.close()
    assert limit_hits(broker, "mqtt", "connections_per_user") >= 2


def test_mqtt5_publish_rate_is_puback_quota_exceeded(broker, users):
    client = Mqtt(paho.MQTTv5, "mq-rate")
    try:
        assert client.connect(broker.host_port("mqtt")[1], "mq", users["mq"]).value == 0
        codes = [client.publish("mqtt-rate").value for _ in range(4)]
        assert codes[:2] == [0, 0] and 0x97 in codes[2:]
        assert not client.disconnected.is_set()  # refused, not disconnected
    finally:
        client.close()


def test_mqtt5_schema_violation_is_puback_payload_format_invalid(broker, users):
    client = Mqtt(paho.MQTTv5, "mq-schema")
    try:
        assert client.connect(broker.host_port("mqtt")[1]).value == 0
        assert client.publish("orders", b'{"id": "m1", "qty": 1}').value == 0
        assert client.publish("orders", b'{"id": "m2"}').value == 0x99  # Payload format invalid
        assert client.publish("orders", b"not json").value == 0x99
    finally:
        client.close()


def test_mqtt311_schema_violation_closes_the_connection(broker, users):
    client = Mqtt(paho.MQTTv311, "mq3-schema")
    try:
        assert client.connect(broker.host_port("mqtt")[1]).value == 0
        client.client.publish("orders", b"[]", qos=1)
        assert client.disconnected.wait(TIMEOUT), "3.1.1 has no PUBACK reason: the connection must be closed"
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- AMQP
def amqp_parameters(broker: BrokerProcess, user: str = "guest", password: str = "guest") -> pika.ConnectionParameters:
    host, port = broker.host_port("amqp")
    return pika.ConnectionParameters(host=host, port=port, credentials=pika.PlainCredentials(user, password),
                                     blocked_connection_timeout=TIMEOUT, socket_timeout=TIMEOUT,
                                     connection_attempts=1)


def test_amqp_publish_rate_throttles_instead_of_closing(broker, users):
    """60 confirmed publishes at 20/s (burst 20): the broker stops reading until the debt is paid, so the last
    confirm arrives after about two seconds, and nothing is refused or closed."""
    connection = pika.BlockingConnection(amqp_parameters(broker, "am", users["am"]))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("amqp-rate")
        started = time.monotonic()
        for i in range(60):
            channel.basic_publish("", "amqp-rate", str(i).encode())  # raises if nacked or closed
        elapsed = time.monotonic() - started
        assert elapsed >= 1.5, f"60 publishes at 20/s took only {elapsed:.2f}s: not throttled"
        assert channel.queue_declare("amqp-rate", passive=True).method.message_count == 60
        assert connection.is_open
    finally:
        connection.close()


def test_amqp_connection_limit_is_connection_close_not_allowed(broker, users):
    first = pika.BlockingConnection(amqp_parameters(broker, "amconn", users["amconn"]))
    try:
        with pytest.raises((ConnectionClosedByBroker, AMQPConnectionError)) as refused:
            pika.BlockingConnection(amqp_parameters(broker, "amconn", users["amconn"]))
        assert "530" in repr(refused.value) or "NOT_ALLOWED" in repr(refused.value)
    finally:
        first.close()
    assert limit_hits(broker, "amqp", "connections_per_user") >= 1


def test_amqp_schema_violation_closes_the_channel_406_with_the_reason(broker, users):
    connection = pika.BlockingConnection(amqp_parameters(broker))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("amq.topic", "orders", b'{"id": "a1", "qty": 3}',
                              pika.BasicProperties(content_type="application/json"))
        with pytest.raises(ChannelClosedByBroker) as closed:
            channel.basic_publish("amq.topic", "orders", b'{"id": "a2", "qty": "three"}')
        assert closed.value.reply_code == 406
        assert "qty must be integer" in closed.value.reply_text
        assert connection.is_open  # only the channel closed
    finally:
        connection.close()
    assert limit_hits(broker, "amqp", "schema") >= 1


# ---------------------------------------------------------------------------------------------- topic creation
def test_topic_creation_limit_is_shared_by_native_amqp_and_mqtt(broker, users):
    """maker may have created 2 topics, over every protocol together: native publishes create two, then the native
    publish, an AMQP queue.declare and an MQTT 5 publish that would create a third are each refused their way
    (QUOTA_EXCEEDED, channel close 406 as RabbitMQ answers a queue limit, PUBACK 0x97)."""
    with Producer(broker.address("native"), username="maker", password=users["maker"]) as producer:
        producer.send("made-1", b"x")
        producer.send("made-2", b"x")
        producer.send("made-1", b"an existing topic is fine")
        with pytest.raises(QuotaExceeded, match="user 'maker' has created 2 topics"):
            producer.send("made-3", b"x")
    connection = pika.BlockingConnection(amqp_parameters(broker, "maker", users["maker"]))
    try:
        with pytest.raises(ChannelClosedByBroker) as closed:
            connection.channel().queue_declare("made-queue")
        assert closed.value.reply_code == 406 and "has created 2 topics" in closed.value.reply_text
        assert connection.is_open  # the channel is closed, not the connection
    finally:
        connection.close()
    client = Mqtt(paho.MQTTv5, "maker-mqtt")
    try:
        assert client.connect(broker.host_port("mqtt")[1], "maker", users["maker"]).value == 0
        assert client.publish("made-4/x").value == 0x97
        assert client.publish("made-2/x").value == 0
    finally:
        client.close()
    assert limit_hits(broker, "native", "topics_created") >= 1
    assert limit_hits(broker, "amqp", "topics_created") >= 1
    assert limit_hits(broker, "mqtt", "topics_created") >= 1
