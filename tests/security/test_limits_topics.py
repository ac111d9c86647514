"""Topic creation per user is a core limit (`max_topics_created_per_user`, core/security/limits.py): every
protocol's auto-creation and explicit creation counts against one per-user number, kept in the metadata store so
a restart does not reset it; topics deleted since no longer count. Formerly MQTT-only and in memory per process
(issue 9: "200 random first levels = 200 persistent topics")."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.adapters.base import ConnectionLimits
from tidegate.adapters.mqtt.codec import Publish, ReasonCode
from tidegate.adapters.mqtt.server import MqttServerFactory
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.core.errors import QuotaExceeded, TopicExists
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message
from tidegate.core.security.gate import AllowAllGate, Principal
from tidegate.core.security.limits import TOPICS_CREATED, Limiter, LimitSettings
from tidegate.core.session import CoreSession
from tidegate.core.testing import RecordingSink, make_broker
from tidegate.gateway.app import build_limiter
from tidegate.gateway.config import load_config, parse_set_option

from ..mqtt.conftest import FakeClient


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now


class MemoryKV:
    def __init__(self) -> None:
        self.rows: dict[str, object] = {}

    def items(self):
        return list(self.rows.items())

    def put(self, key, value):
        self.rows[key] = value

    def delete(self, key):
        self.rows.pop(key, None)


@pytest.fixture
def broker():
    b = make_broker(MemoryReactorClock())
    yield b
    b.close()


def session_for(broker, limiter, user="alice", listener="native"):
    return CoreSession(broker, AllowAllGate(), Principal(user), listener=listener,
                       quota=limiter.session_quota(listener, user))


def test_publishes_that_would_create_a_topic_past_the_limit_are_refused(broker):
    metrics = CoreMetrics()
    limiter = Limiter(LimitSettings(max_topics_created_per_user=2), FakeClock(), metrics=metrics)
    alice, bob = session_for(broker, limiter), session_for(broker, limiter, "bob")
    alice.publish([Message("a1", b"x")])
    alice.publish([Message("a2", b"x"), Message("a2", b"y")])
    with pytest.raises(QuotaExceeded, match="user 'alice' has created 2 topics") as refused:
        alice.publish([Message("a3", b"x")])
    assert refused.value.cause == TOPICS_CREATED
    alice.publish([Message("a1", b"existing topics are fine")])
    broker.create_topic("made-by-admin")
    alice.publish([Message("made-by-admin", b"so are topics others created")])
    bob.publish([Message("b1", b"bob has his own count")])
    assert sorted(t.name for t in broker.list_topics()) == ["a1", "a2", "b1", "made-by-admin"]
    assert metrics.security.limit_hits == {("native", TOPICS_CREATED): 1}


def test_explicit_creates_subscribes_and_gets_count_too(broker):
    limiter = Limiter(LimitSettings(max_topics_created_per_user=3), FakeClock())
    session = session_for(broker, limiter)
    session.create_topic("c1")
    with pytest.raises(TopicExists):
        session.create_topic("c1")  # no second count for a topic that exists
    session.ensure_topic("c2")
    session.subscribe("g", "c3", RecordingSink())  # subscribing auto-creates
    assert limiter.topics_created("alice") == 3
    for attempt in (lambda: session.create_topic("c4"), lambda: session.ensure_topic("c4"),
                    lambda: session.subscribe("g", "c4", RecordingSink()),
                    lambda: session.get("g", "c4", auto_ack=True), lambda: session.admit_new_topic("c4")):
        with pytest.raises(QuotaExceeded):
            attempt()
    assert "c4" not in {t.name for t in broker.list_topics()}


def test_deleted_topics_stop_counting_and_the_count_survives_a_restart(broker):
    creators = MemoryKV()
    limiter = Limiter(LimitSettings(max_topics_created_per_user=2), FakeClock(), creators=creators)
    session = session_for(broker, limiter)
    session.publish([Message("d1", b"x")])
    session.publish([Message("d2", b"x")])
    assert creators.rows == {"d1": "alice", "d2": "alice"}
    restarted = Limiter(LimitSettings(max_topics_created_per_user=2), FakeClock(), creators=creators)
    again = session_for(broker, restarted)
    with pytest.raises(QuotaExceeded):
        again.publish([Message("d3", b"x")])
    broker.delete_topic("d1")
    again.publish([Message("d3", b"a deleted topic frees its place")])
    assert creators.rows == {"d2": "alice", "d3": "alice"}
    broker.delete_topic("d3")
    with pytest.raises(QuotaExceeded):  # admitted moments ago: it might still be on its way into the store
        again.publish([Message("d4", b"x")])
    restarted.clock.now += 11
    again.publish([Message("d4", b"x")])
    assert creators.rows == {"d2": "alice", "d4": "alice"}


def test_a_user_override_and_zero_mean_what_they_say(broker):
    limiter = Limiter(LimitSettings(max_topics_created_per_user=1), FakeClock())
    limiter.set_user_limits("svc", {"max_topics_created_per_user": 0})  # 0 = unlimited for svc
    service = session_for(broker, limiter, "svc")
    service.publish([Message(f"s{n}", b"x") for n in range(5)])
    assert limiter.topics_created("svc") == 0  # nothing is recorded without a limit


def test_the_old_mqtt_key_is_the_mqtt_listener_value_unless_limits_mqtt_sets_one():
    def limiter_for(*settings: str) -> Limiter:
        config = load_config(environ={}, overrides=[parse_set_option(s) for s in settings]).config
        return build_limiter(config, MemoryReactorClock(), None, CoreMetrics())

    default = limiter_for()
    assert default.for_listener("mqtt").max_topics_created_per_user == 10_000
    assert default.for_listener("native").max_topics_created_per_user == 0
    assert limiter_for("listeners.mqtt.max_topics_created_per_user=3").for_listener(
        "mqtt").max_topics_created_per_user == 3
    both = limiter_for("listeners.mqtt.max_topics_created_per_user=3", "limits.mqtt.max_topics_created_per_user=5",
                       "limits.max_topics_created_per_user=7")
    assert both.for_listener("mqtt").max_topics_created_per_user == 5
    assert both.for_listener("amqp").max_topics_created_per_user == 7


class MqttEnv:
    def __init__(self, limiter: Limiter) -> None:
        self.clock = MemoryReactorClock()
        self.broker = make_broker(self.clock)
        self.factory = MqttServerFactory(self.broker, AllowAllGate(), self.clock, MqttSettings(sys_interval=0),
                                         limits=ConnectionLimits(limiter=limiter))
        self._port = 41000

    def login(self, level: int, client_id: str, user: str) -> FakeClient:
        self._port += 1
        client = FakeClient(self.factory, level, self._port)
        client.connect(client_id, username=user, password=b"pw")
        return client

    def pump(self) -> None:
        for _ in range(5):
            self.clock.advance(0)


def test_mqtt_publishes_creating_topics_past_the_limit_get_quota_exceeded():
    """Moved from tests/mqtt/test_security_findings.py: past the limit a publish creating one more topic is refused
    (v5 PUBACK 0x97, 3.1.1 closes); existing topics and other users are not affected."""
    limiter = Limiter(LimitSettings(), FakeClock(), listeners={"mqtt": {"max_topics_created_per_user": 3}})
    env = MqttEnv(limiter)
    client = env.login(5, "spray", "mallory")
    client.send(*[Publish(f"r{n}/x", b"x", 1, packet_id=n + 1) for n in range(5)])
    client.send(Publish("r0/again", b"x", 1, packet_id=10))
    env.pump()
    codes = {p.packet_id: p.reason_code for p in client.received() if hasattr(p, "reason_code")}
    assert [codes[n] for n in (1, 2, 3, 4, 5, 10)] == [ReasonCode.SUCCESS] * 3 + [ReasonCode.QUOTA_EXCEEDED] * 2 + [
        ReasonCode.SUCCESS]
    assert sorted(t.name for t in env.broker.list_topics()) == ["r0", "r1", "r2"]
    old = env.login(4, "spray311", "mallory")
    old.send(Publish("r9/x", b"x", 1, packet_id=1))
    assert old.closed
    other = env.login(5, "fine", "alice")
    other.send(Publish("r9/x", b"x", 1, packet_id=1))
    env.pump()
    assert [p.reason_code for p in other.received() if hasattr(p, "reason_code")] == [ReasonCode.SUCCESS]
