"""Limits against abuse (core/security/limits.py): token buckets, admission, per-user overrides and the session
hooks, all on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.errors import QuotaExceeded, SchemaViolation
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef
from tidegate.core.security.gate import SYSTEM, AllowAllGate, Principal
from tidegate.core.security.limits import (
    CONNECTION_RATE,
    CONNECTIONS_PER_SOURCE,
    CONNECTIONS_PER_USER,
    MESSAGE_SIZE,
    PROPERTY_SIZE,
    PUBLISH_BANDWIDTH,
    PUBLISH_RATE,
    SCHEMA,
    SUBSCRIPTIONS,
    Limiter,
    LimitSettings,
    TokenBucket,
)
from tidegate.core.session import CoreSession
from tidegate.core.testing import make_broker

from .limit_helpers import FakeClock, MemoryKV


@pytest.fixture
def clock():
    return FakeClock()


def limiter_with(clock, metrics=None, **settings):
    return Limiter(LimitSettings(**settings), clock, metrics=metrics)


# ------------------------------------------------------------------ token bucket
def test_bucket_starts_full_refills_at_its_rate_and_never_above_its_burst():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.try_take(1, 0.0) for _ in range(5))
    assert not bucket.try_take(1, 0.0)
    assert bucket.try_take(1, 0.1)  # 0.1 s at 10/s = 1 token
    assert not bucket.try_take(1, 0.1)
    assert bucket.try_take(5, 100.0)  # refilled to the burst only
    assert not bucket.try_take(1, 100.0)


def test_bucket_lets_an_amount_above_its_burst_through_only_when_full_and_then_owes_it():
    bucket = TokenBucket(rate=100, burst=100, now=0.0)
    assert bucket.try_take(1000, 0.0)  # a message larger than the burst is not refused forever
    assert bucket.wait(0.0) == pytest.approx(9.0)  # 900 tokens of debt at 100/s
    assert not bucket.try_take(1, 5.0)
    assert bucket.try_take(1, 9.01)


def test_bucket_take_goes_into_debt_and_says_how_long_to_wait():
    bucket = TokenBucket(rate=2, burst=2, now=0.0)
    assert bucket.take(2, 0.0) == 0.0
    assert bucket.take(4, 0.0) == pytest.approx(2.0)
    assert bucket.wait(1.0) == pytest.approx(1.0)
    assert bucket.wait(2.0) == 0.0


# ------------------------------------------------------------------ admission
def test_connections_per_source_are_counted_and_released(clock):
    metrics = CoreMetrics()
    limiter = limiter_with(clock, metrics, max_connections_per_source=2)
    first = limiter.admit_source("mqtt", "10.0.0.1")
    limiter.admit_source("mqtt", "10.0.0.1")
    with pytest.raises(QuotaExceeded, match="already has 2 connections") as refused:
        limiter.admit_source("mqtt", "10.0.0.1")
    assert refused.value.cause == CONNECTIONS_PER_SOURCE
    assert limiter.admit_source("mqtt", "10.0.0.2") is not None  # another address is not affected
    limiter.release_source(first)
    limiter.release_source(first)  # releasing twice gives back one slot only
    limiter.admit_source("mqtt", "10.0.0.1")
    with pytest.raises(QuotaExceeded):
        limiter.admit_source("mqtt", "10.0.0.1")
    assert metrics.security.limit_hits[("mqtt", CONNECTIONS_PER_SOURCE)] == 2


def test_connection_rate_per_source_is_a_token_bucket(clock):
    limiter = limiter_with(clock, connection_rate_per_source=2, connection_burst_per_source=3)
    for _ in range(3):
        limiter.admit_source("native", "10.0.0.1")
    with pytest.raises(QuotaExceeded) as refused:
        limiter.admit_source("native", "10.0.0.1")
    assert refused.value.cause == CONNECTION_RATE
    clock.now += 0.5  # one more connection's worth at 2/s
    limiter.admit_source("native", "10.0.0.1")
    with pytest.raises(QuotaExceeded):
        limiter.admit_source("native", "10.0.0.1")


def test_nothing_is_tracked_when_no_source_limit_is_set(clock):
    limiter = limiter_with(clock)
    assert limiter.admit_source("native", "10.0.0.1") is None
    assert limiter.snapshot()["sources"] == 0


def test_the_source_table_is_bounded(clock):
    limiter = Limiter(LimitSettings(connection_rate_per_source=1), clock, max_tracked_sources=10)
    for i in range(100):
        limiter.admit_source("native", f"10.0.{i}.1")
    assert limiter.snapshot()["sources"] == 10


def test_connections_per_user_count_every_listener_together(clock):
    limiter = limiter_with(clock, max_connections_per_user=2)
    limiter.admit_user("mqtt", "alice")
    ticket = limiter.admit_user("amqp", "alice")
    with pytest.raises(QuotaExceeded) as refused:
        limiter.admit_user("native", "alice")
    assert refused.value.cause == CONNECTIONS_PER_USER
    limiter.admit_user("native", "bob")
    limiter.release_user(ticket)
    limiter.admit_user("native", "alice")


def test_a_listener_may_have_its_own_limits(clock):
    limiter = Limiter(LimitSettings(max_connections_per_source=5), clock,
                      listeners={"mqtt": {"max_connections_per_source": 1, "publish_rate": -1}})
    limiter.admit_source("mqtt", "10.0.0.1")
    with pytest.raises(QuotaExceeded):
        limiter.admit_source("mqtt", "10.0.0.1")
    limiter.admit_source("native", "10.0.0.1")  # the same address, another listener's limit of 5
    assert limiter.for_listener("mqtt").publish_rate == 0  # -1 = as [limits]


# ------------------------------------------------------------------ per-user overrides
def test_user_overrides_are_stored_merged_validated_and_cleared(clock):
    store = MemoryKV()
    limiter = Limiter(LimitSettings(publish_rate=10), clock, overrides=store)
    assert limiter.set_user_limits("alice", {"publish_rate": 100, "max_connections_per_user": 3}) == {
        "publish_rate": 100, "max_connections_per_user": 3}
    assert limiter.effective("mqtt", "alice").publish_rate == 100
    assert limiter.effective("mqtt", "bob").publish_rate == 10
    assert store.rows["alice"] == {"publish_rate": 100, "max_connections_per_user": 3}
    limiter.set_user_limits("alice", {"publish_rate": None})
    assert limiter.user_limits("alice") == {"max_connections_per_user": 3}
    with pytest.raises(Exception, match="unknown per-user limit"):
        limiter.set_user_limits("alice", {"max_connections_per_source": 1})
    with pytest.raises(Exception, match="must be an integer"):
        limiter.set_user_limits("alice", {"publish_rate": "fast"})
    reloaded = Limiter(LimitSettings(), clock, overrides=store)  # a restart reads them back
    assert reloaded.user_limits("alice") == {"max_connections_per_user": 3}
    limiter.clear_user_limits("alice")
    assert store.rows == {}


# ------------------------------------------------------------------ sessions
@pytest.fixture
def broker():
    b = make_broker(MemoryReactorClock())
    yield b
    b.close()


def session_for(broker, limiter, user="alice", listener="native"):
    return CoreSession(broker, AllowAllGate(), Principal(user), listener=listener,
                       quota=limiter.session_quota(listener, user))


def test_publish_rate_is_shared_by_all_connections_of_a_user(broker, clock):
    metrics = CoreMetrics()
    limiter = limiter_with(clock, metrics, publish_rate=3)
    mqtt, amqp = session_for(broker, limiter, listener="mqtt"), session_for(broker, limiter, listener="amqp")
    other = session_for(broker, limiter, user="bob")
    mqtt.publish([Message("t", b"1"), Message("t", b"2")])
    amqp.publish([Message("t", b"3")])
    with pytest.raises(QuotaExceeded, match="publish rate of user 'alice'") as refused:
        mqtt.publish([Message("t", b"4")])
    assert refused.value.cause == PUBLISH_RATE
    other.publish([Message("t", b"bob is not alice")])
    clock.now += 1.0
    mqtt.publish([Message("t", b"5")])
    assert metrics.security.limit_hits == {("mqtt", PUBLISH_RATE): 1}


def test_a_refused_batch_stores_nothing_and_costs_nothing(broker, clock):
    limiter = limiter_with(clock, publish_rate=3)
    session = session_for(broker, limiter)
    session.publish([Message("first", b"x")])
    with pytest.raises(QuotaExceeded):
        session.publish([Message("t", b"x")] * 3)
    assert [t.name for t in broker.list_topics()] == ["first"]
    session.publish([Message("t", b"x")] * 2)  # the refused batch took no tokens


def test_publish_bandwidth_counts_body_bytes(broker, clock):
    limiter = limiter_with(clock, publish_bytes_rate=100)
    session = session_for(broker, limiter)
    session.publish([Message("t", b"x" * 60)])
    with pytest.raises(QuotaExceeded) as refused:
        session.publish([Message("t", b"x" * 60)])
    assert refused.value.cause == PUBLISH_BANDWIDTH
    clock.now += 0.6
    session.publish([Message("t", b"x" * 60)])


def test_throttled_sessions_go_into_debt_and_report_the_wait(broker, clock):
    limiter = limiter_with(clock, publish_rate=10)
    session = session_for(broker, limiter, listener="amqp")
    session.throttle_publishes()
    session.publish([Message("t", b"x")] * 30)  # never refused
    assert session.publish_wait() == pytest.approx(2.0)
    clock.now += 2.0
    assert session.publish_wait() == 0.0


def test_message_and_property_sizes(broker, clock):
    metrics = CoreMetrics()
    limiter = limiter_with(clock, metrics, max_message_bytes=10, max_property_bytes=8)
    session = session_for(broker, limiter)
    session.publish([Message("t", b"x" * 10, properties={"k": "v" * 7})])
    with pytest.raises(QuotaExceeded, match="body is 11 bytes; the limit is 10"):
        session.publish([Message("t", b"x" * 11)])
    with pytest.raises(QuotaExceeded, match="properties are 9 bytes"):
        session.publish([Message("t", b"x", properties={"k": "v" * 8})])
    assert metrics.security.limit_hits == {("native", MESSAGE_SIZE): 1, ("native", PROPERTY_SIZE): 1}


def test_user_override_applies_to_a_live_session(broker, clock):
    limiter = limiter_with(clock, publish_rate=1)
    session = session_for(broker, limiter)
    session.publish([Message("t", b"x")])
    with pytest.raises(QuotaExceeded):
        session.publish([Message("t", b"x")])
    limiter.set_user_limits("alice", {"publish_rate": 0})  # 0 = unlimited for alice, from now on
    for _ in range(50):
        session.publish([Message("t", b"x")])


def test_subscriptions_per_session_count_bindings_and_consumers(broker, clock):
    limiter = limiter_with(clock, max_subscriptions_per_session=2)
    session = session_for(broker, limiter)
    queue = session.claim_private("%MQTT%c1")
    ref = QueueRef(queue.name, 0)
    session.bind("a/#", ref)
    session.bind("a/#", ref)  # the same binding again is not a new subscription
    sub = session.subscribe("g", "topic-b", _Sink())
    with pytest.raises(QuotaExceeded) as refused:
        session.bind("c/#", ref)
    assert refused.value.cause == SUBSCRIPTIONS
    sub.close()  # a closed consumer stops counting
    session.bind("c/#", ref)
    session.unbind("a/#", ref)
    session.subscribe("g", "topic-d", _Sink())
    own = session.subscribe(queue.name, queue.name, _Sink())  # the session's own queue: its filters count
    assert not own.closed


def test_schema_refusals_are_counted_as_limit_hits(broker, clock):
    metrics = CoreMetrics()
    limiter = limiter_with(clock, metrics, publish_rate=5)
    session = session_for(broker, limiter)
    broker.create_topic("orders")
    broker.schemas.set("orders", {"type": "object"})
    with pytest.raises(SchemaViolation):
        session.publish([Message("orders", b"[1]")])
    assert metrics.security.limit_hits == {("native", SCHEMA): 1}
    session.publish([Message("orders", b"{}")] * 5)  # the refused message gave its token back


def test_system_sessions_are_never_limited(broker, clock):
    limiter = limiter_with(clock, publish_rate=1, max_message_bytes=1)
    session = CoreSession(broker, AllowAllGate(), SYSTEM, quota=limiter.session_quota("mqtt", SYSTEM.name))
    session.publish([Message("t", b"a will message")] * 10)


class _Sink:
    def deliver(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
