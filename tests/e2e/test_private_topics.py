"""End to end: an MQTT client's persistent session queue (a private `%MQTT%` topic) is invisible and unreachable
for native clients of the same `tidegate serve` process, the CLI included."""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tidegate.adapters.native.errors import ErrorCode
from tidegate.client import Admin, PullConsumer
from tidegate.core.errors import NotAuthorized
from tidegate.core.storage.layout import StoreLayout
from tidegate.core.storage.metadata import SqliteMetadataStore
from tidegate.gateway import cli
from tidegate.gateway.testing import BrokerProcess

TIMEOUT = 20.0
SESSION_TOPIC = "%MQTT%keeper"


def open_persistent_mqtt_session(host: str, port: int) -> None:
    """Connect as `keeper` with a persistent session, subscribe at QoS 1 (which gives the session its queue)."""
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="keeper", clean_session=False,
                         protocol=paho.MQTTv311)
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_connect = lambda c, userdata, flags, reason, properties: c.subscribe("news/#", qos=1)
    client.connect(host, port)
    client.loop_start()
    try:
        assert subscribed.wait(TIMEOUT), "no SUBACK from the broker"
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def broker_with_an_mqtt_session(tmp_path):
    with BrokerProcess(tmp_path / "data", listeners=("native", "admin", "mqtt")) as process:
        open_persistent_mqtt_session(*process.host_port("mqtt"))
        yield process
    # Proof that the hidden topic really existed: the broker's own metadata lists it.
    metadata = SqliteMetadataStore(StoreLayout(tmp_path / "data").meta_db_path)
    try:
        assert SESSION_TOPIC in [row["name"] for row in metadata.get_topics()]
    finally:
        metadata.close()


def test_topic_list_internal_does_not_show_private_topics_to_a_client(broker_with_an_mqtt_session, capsys) -> None:
    """`tidegate topic list --internal` (a native client) no longer lists MQTT session queues."""
    address = broker_with_an_mqtt_session.native
    with Admin(address=address) as admin:
        admin.create_topic("news", queues=1)
        assert SESSION_TOPIC not in [t.name for t in admin.list_topics(include_internal=True)]
    capsys.readouterr()
    assert cli.main(["topic", "list", "--internal", "--server", address]) == 0
    out = capsys.readouterr().out
    assert "news" in out and "%MQTT%" not in out


def test_a_native_client_cannot_pull_or_delete_an_mqtt_session_queue(broker_with_an_mqtt_session) -> None:
    address = broker_with_an_mqtt_session.native
    with PullConsumer("thief", address=address) as consumer, pytest.raises(NotAuthorized) as pulled:
        consumer.pull(SESSION_TOPIC, 0, 0)
    assert pulled.value.code == ErrorCode.NOT_AUTHORIZED == 21
    with Admin(address=address) as admin, pytest.raises(NotAuthorized) as deleted:
        admin.delete_topic(SESSION_TOPIC)
    assert deleted.value.code == 21
