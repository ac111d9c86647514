"""What MQTT sessions cost the metadata store (SQLite), the reconnect-storm rules of adapters/mqtt/sessions.py:
a session that ends with its connection writes nothing, rows of persistent sessions are committed once per reactor
turn, and a failed commit never leaves a CONNACK behind it."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from tidegate.adapters.mqtt.codec import Connect, Disconnect, MqttCodec, PacketType, Subscribe, TopicSubscription
from tidegate.adapters.mqtt.properties import Properties
from tidegate.adapters.mqtt.server import MqttServerFactory
from tidegate.adapters.mqtt.sessions import ROW_RETRY_FIRST_S, SESSIONS_NAMESPACE
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.core.errors import StoreError
from tidegate.core.security import AllowAllGate
from tidegate.core.storage.metadata import SqliteMetadataStore
from tidegate.core.testing import make_broker

from .conftest import T0, FakeClient

WRITES = ("put_", "delete_", "kv_put", "kv_delete", "kv_apply", "add_policy")


class CountingMetadata:
    """A SQLite metadata store that counts its write calls by method name (and can fail `kv_apply`)."""

    def __init__(self, path) -> None:
        self.meta = SqliteMetadataStore(path)
        self.writes: list[str] = []
        self.fail_kv_apply = 0

    def __getattr__(self, name):
        attribute = getattr(self.meta, name)
        if not name.startswith(WRITES):
            return attribute

        def counted(*args, **kwargs):
            self.writes.append(name)
            if name == "kv_apply" and self.fail_kv_apply:
                self.fail_kv_apply -= 1
                raise StoreError("database or disk is full")
            return attribute(*args, **kwargs)

        return counted


class StorageEnv:
    def __init__(self, tmp_path) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.meta = CountingMetadata(tmp_path / "meta.db")
        self.broker = make_broker(self.clock, metadata=self.meta)
        self.factory = MqttServerFactory(self.broker, AllowAllGate(), self.clock, MqttSettings(sys_interval=0))
        self.port = 40000
        self.pump()
        self.meta.writes.clear()

    def client(self, level: int = 4) -> FakeClient:
        self.port += 1
        return FakeClient(self.factory, level, self.port)

    def pump(self) -> None:
        for _ in range(5):
            self.clock.advance(0)

    def stored_sessions(self) -> dict:
        return dict(self.meta.meta.kv_items(SESSIONS_NAMESPACE))


def test_sessions_that_end_with_their_connection_write_nothing_to_the_metadata_store(tmp_path) -> None:
    """3.1.1 CleanSession=1 and v5 Session Expiry 0: connect, DISCONNECT or drop, without one metadata write."""
    env = StorageEnv(tmp_path)
    clients = []
    for i in range(10):
        client = env.client(4 if i % 2 else 5)
        assert client.connect(f"clean-{i}", clean=True).reason_code == 0
        clients.append(client)
    env.pump()
    for i, client in enumerate(clients):
        if i % 3:
            client.send(Disconnect())
        client.drop()
    env.pump()
    assert env.meta.writes == []
    assert env.stored_sessions() == {}
    assert env.factory.sessions.sessions == {}


def test_a_clean_session_gets_its_queue_at_its_first_subscribe_and_leaves_nothing_behind(tmp_path) -> None:
    env = StorageEnv(tmp_path)
    client = env.client(4)
    client.connect("subscriber", clean=True)
    session = env.factory.sessions.get("subscriber")
    assert not session.has_queue
    assert session.topic not in [t.name for t in env.broker.list_topics(include_internal=True)]
    client.send(Subscribe(1, (TopicSubscription("news/#", 1),)))
    env.pump()
    assert session.has_queue
    assert session.topic in [t.name for t in env.broker.list_topics(include_internal=True)]
    client.drop()
    env.pump()
    assert session.topic not in [t.name for t in env.broker.list_topics(include_internal=True)]
    assert env.stored_sessions() == {}


def test_a_new_persistent_session_is_committed_before_its_connack(tmp_path) -> None:
    env = StorageEnv(tmp_path)
    for i in range(3):
        client = env.client(5)
        connack = client.connect(f"keeper-{i}", clean=False, properties=Properties(session_expiry_interval=300))
        assert connack.reason_code == 0
        assert f"keeper-{i}" in env.stored_sessions()  # on disk by the time the CONNACK was written


def test_rows_of_sessions_resuming_in_one_turn_are_committed_in_one_transaction(tmp_path) -> None:
    env = StorageEnv(tmp_path)
    clients = [env.client(4) for _ in range(25)]
    for i, client in enumerate(clients):
        client.connect(f"keeper-{i}", clean=False)
        client.send(Subscribe(1, (TopicSubscription(f"news/{i}", 1),)))
        env.pump()
        client.drop()
    env.pump()
    env.meta.writes.clear()
    for i in range(25):
        assert env.client(4).connect(f"keeper-{i}", clean=False).session_present
    assert env.meta.writes == []  # written behind: nothing committed inside the turn
    env.clock.advance(0)  # the end of the reactor turn
    assert env.meta.writes == ["kv_apply"]
    assert all(row["disconnected_at"] == 0 for row in env.stored_sessions().values())


def test_a_new_persistent_session_whose_row_cannot_be_committed_is_refused_and_retried(tmp_path) -> None:
    """Disk full under the metadata database: the CONNECT is refused (v5 CONNACK with an error code), nothing of
    the session stays; the client's next CONNECT works."""
    env = StorageEnv(tmp_path)
    env.meta.fail_kv_apply = 1
    client = env.client(5)
    connack = client.connect("late", clean=False, properties=Properties(session_expiry_interval=300))
    assert connack.reason_code >= 0x80 and client.closed
    assert env.factory.sessions.get("late") is None and "late" not in env.stored_sessions()
    assert "%MQTT%late" not in [t.name for t in env.broker.list_topics(include_internal=True)]
    again = env.client(5)
    assert again.connect("late", clean=False, properties=Properties(session_expiry_interval=300)).reason_code == 0
    assert "late" in env.stored_sessions()


def test_a_failed_write_behind_commit_is_retried_with_backoff(tmp_path) -> None:
    env = StorageEnv(tmp_path)
    client = env.client(4)
    client.connect("keeper", clean=False)
    env.meta.fail_kv_apply = 2
    client.drop()  # the disconnect time is written behind
    env.clock.advance(0)
    env.clock.advance(ROW_RETRY_FIRST_S)
    assert env.stored_sessions()["keeper"]["disconnected_at"] == 0  # two failures so far
    env.clock.advance(ROW_RETRY_FIRST_S * 2)
    assert env.stored_sessions()["keeper"]["disconnected_at"] > 0


def test_shutdown_commits_pending_rows(tmp_path) -> None:
    env = StorageEnv(tmp_path)
    env.client(4).connect("keeper", clean=False)
    env.factory.stop()
    assert "keeper" in env.stored_sessions()


def test_every_codec_shares_the_pre_connect_table_except_its_own_connect_entry() -> None:
    """A reconnect storm built sixteen closures per connection; now only the CONNECT slot is per codec."""
    first, second = MqttCodec(), MqttCodec()
    for packet_type in range(16):
        if packet_type == PacketType.CONNECT:
            assert first._dispatch[packet_type] != second._dispatch[packet_type]
        else:
            assert first._dispatch[packet_type] is second._dispatch[packet_type]
    connect = MqttCodec(server_side=False).encode(Connect("x", protocol_level=4))
    assert first.receive_data(connect)[0].client_id == "x"
    assert first.protocol_level == 4 and second.protocol_level is None
