"""Limit refusals reach the audit log (core/security/limits.py -> core/security/audit.py): one line per listener
and cause per interval, carrying the user and source of the first refusal and a repeat count, like denials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.errors import QuotaExceeded, SchemaViolation
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message
from tidegate.core.security.audit import AuditLog
from tidegate.core.security.gate import AllowAllGate, Principal
from tidegate.core.security.limits import Limiter, LimitSettings
from tidegate.core.session import CoreSession
from tidegate.core.testing import make_broker


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def seconds(self) -> float:
        return self.now


@pytest.fixture
def broker():
    b = make_broker(MemoryReactorClock())
    yield b
    b.close()


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_limit_refusals_write_one_line_per_listener_and_cause_with_repeats(broker, tmp_path):
    time = FakeTime()
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, clock=time, denial_interval_s=60)
    metrics = CoreMetrics()
    limiter = Limiter(LimitSettings(publish_rate=1, max_message_bytes=4), time, metrics=metrics, audit=audit)
    session = CoreSession(broker, AllowAllGate(), Principal("alice"), source="10.0.0.7", listener="mqtt",
                          quota=limiter.session_quota("mqtt", "alice"))
    session.publish([Message("t", b"ok")])
    for _ in range(5):
        with pytest.raises(QuotaExceeded):
            session.publish([Message("t", b"ok")])
    with pytest.raises(QuotaExceeded):
        session.publish([Message("t", b"too long")])
    time.now += 61
    session.publish([Message("t", b"ok")])
    with pytest.raises(QuotaExceeded):
        session.publish([Message("t", b"ok")])  # the interval is over: a line with the 4 counted since
    audit.close()
    lines = events(path)
    assert [(e["event"], e["cause"], e["repeats"]) for e in lines] == [
        ("limit", "publish_rate", 1), ("limit", "message_size", 1), ("limit", "publish_rate", 5)]
    first = lines[0]
    assert first["listener"] == "mqtt" and first["user"] == "alice" and first["source"] == "10.0.0.7"
    assert "publish rate of user 'alice'" in first["reason"]
    assert "body" not in first and "payload" not in first
    assert metrics.security.limit_hits[("mqtt", "publish_rate")] == 6  # the metric counts every refusal


def test_admission_refusals_name_the_source_or_user(tmp_path):
    time = FakeTime()
    path = tmp_path / "audit.jsonl"
    limiter = Limiter(LimitSettings(max_connections_per_source=1, max_connections_per_user=1), time,
                      audit=AuditLog(path, clock=time))
    limiter.admit_source("amqp", "192.0.2.1")
    with pytest.raises(QuotaExceeded):
        limiter.admit_source("amqp", "192.0.2.1")
    limiter.admit_user("native", "bob")
    with pytest.raises(QuotaExceeded):
        limiter.admit_user("native", "bob")
    assert limiter.audit is not None
    limiter.audit.close()
    lines = events(path)
    assert [(e["listener"], e["cause"], e.get("source"), e.get("user")) for e in lines] == [
        ("amqp", "connections_per_source", "192.0.2.1", None), ("native", "connections_per_user", None, "bob")]


def test_schema_refusals_are_audited_with_the_validator_reason(broker, tmp_path):
    time = FakeTime()
    path = tmp_path / "audit.jsonl"
    limiter = Limiter(LimitSettings(publish_rate=100), time, audit=AuditLog(path, clock=time))
    session = CoreSession(broker, AllowAllGate(), Principal("carol"), source="::1", listener="native",
                          quota=limiter.session_quota("native", "carol"))
    broker.create_topic("orders")
    broker.schemas.set("orders", {"type": "object"})
    with pytest.raises(SchemaViolation):
        session.publish([Message("orders", b"[1]")])
    assert limiter.audit is not None
    limiter.audit.close()
    (line,) = events(path)
    assert line["cause"] == "schema" and line["user"] == "carol" and "schema of topic 'orders'" in line["reason"]
