"""The audit log (core/security/audit.py): JSON lines, size rotation with 0600 files, rate-limited denials with a
count, secrets scrubbed; and the bounded security counters (core/metrics.py SecurityMetrics)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from tidegate.core.metrics import SECURITY_LABEL_PAIRS, SecurityMetrics
from tidegate.core.security.audit import AuditLog, scrub
from tidegate.core.security.gate import Action, Credentials, Principal, Resource
from tidegate.core.security.policy_gate import LoginThrottle, PolicyGate
from tidegate.core.security.users import SecurityDirectory
from tidegate.core.session import CoreSession
from tidegate.core.storage.memory import MemoryMetadataStore


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_no_file_means_no_audit(tmp_path):
    audit = AuditLog(None)
    assert not audit.enabled
    audit.login(ok=True, user="a", source="1.2.3.4", mechanism="password", listener="native")
    audit.close()
    assert list(tmp_path.iterdir()) == []


def test_login_lines_carry_outcome_source_mechanism_and_listener(tmp_path):
    path = tmp_path / "sub" / "audit.jsonl"
    old = os.umask(0o022)
    try:
        audit = AuditLog(path, clock=FakeTime())
        audit.login(ok=False, user="alice", source="10.0.0.1", mechanism="password", listener="mqtt",
                    client_id="dev1", reason="bad user name or password")
        audit.login(ok=True, user="alice", source="10.0.0.1", mechanism="token", listener="amqp")
        audit.close()
    finally:
        os.umask(old)
    first, second = lines(path)
    assert first == {"ts": 1000.0, "event": "login", "ok": False, "user": "alice", "source": "10.0.0.1",
                     "mechanism": "password", "listener": "mqtt", "client_id": "dev1",
                     "reason": "bad user name or password"}
    assert second["ok"] is True and "reason" not in second and second["mechanism"] == "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_files_rotate_by_size_and_stay_private(tmp_path):
    path = tmp_path / "audit.jsonl"
    old = os.umask(0o022)
    try:
        audit = AuditLog(path, max_bytes=4096, backup_count=2)
        for i in range(200):
            audit.login(ok=True, user=f"user{i}", source="127.0.0.1", mechanism="password", listener="native")
        audit.close()
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 4096
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert lines(path)[-1]["user"] == "user199"


def test_denials_are_rate_limited_per_principal_and_cause_with_a_count(tmp_path):
    path = tmp_path / "audit.jsonl"
    now = FakeTime()
    audit = AuditLog(path, clock=now, denial_interval_s=60)
    for _ in range(5):
        audit.denial(user="mallory", action="Sub", resource="Topic:secret/1", source="10.0.0.2", listener="mqtt",
                     reason="no policy")
    audit.denial(user="mallory", action="Pub", resource="Topic:x", source="10.0.0.2", listener="mqtt")
    audit.denial(user="eve", action="Sub", resource="Topic:secret/1", source="10.0.0.3", listener="mqtt")
    now.now += 61
    audit.denial(user="mallory", action="Sub", resource="Topic:secret/2", source="10.0.0.2", listener="mqtt")
    audit.denial(user="mallory", action="Sub", resource="Topic:secret/3", source="10.0.0.2", listener="mqtt")
    audit.close()  # writes what is still only counted
    events = lines(path)
    mallory_sub = [e for e in events if e["user"] == "mallory" and e["action"] == "Sub"]
    assert [e["repeats"] for e in mallory_sub] == [1, 5, 1]  # first; 4 counted + this one; 1 left at shutdown
    assert mallory_sub[1]["resource"] == "Topic:secret/2"
    assert [e["user"] for e in events if e["action"] != "Sub" or e["user"] != "mallory"] == ["mallory", "eve"]


def test_the_denial_table_is_bounded(tmp_path):
    audit = AuditLog(tmp_path / "a.jsonl", max_denial_keys=10)
    for i in range(100):
        audit.denial(user=f"u{i}", action="Pub", resource="Topic:t", source="", listener="native")
    assert len(audit._throttled) == 10
    audit.close()


def test_secret_fields_never_reach_the_file(tmp_path):
    assert scrub({"user": "a", "password": "p", "nested": [{"password_hash": "h", "token": "t", "ok": 1}]}) == \
        {"user": "a", "nested": [{"ok": 1}]}
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.admin_change(who="admin", source="127.0.0.1", operation="POST /api/security/users", target="user:bob",
                       before=None, after={"name": "bob", "password": "hunter2-secret", "payload": "body!"},
                       status=201)
    audit.close()
    text = path.read_text()
    assert "hunter2-secret" not in text and "body!" not in text
    assert lines(path)[0]["after"] == {"name": "bob"}


def test_gate_logins_and_session_denials_reach_audit_and_metrics(tmp_path):
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.bootstrap()
    directory.add_user("alice", b"s3cret")
    clock = Clock()
    path = tmp_path / "audit.jsonl"
    metrics = SecurityMetrics()
    gate = PolicyGate(directory, clock, throttle=LoginThrottle(clock, base_delay_s=0), audit=AuditLog(path),
                      metrics=metrics)
    gate.authenticate(Credentials("password", username="alice", password=b"nope", source="10.0.0.5",
                                  listener="amqp")).addErrback(lambda f: None)
    results: list[Principal] = []
    gate.authenticate(Credentials("password", username="alice", password=b"s3cret", source="10.0.0.5",
                                  listener="amqp")).addCallback(results.append)
    session = CoreSession(core=None, gate=gate, principal=results[0], source="10.0.0.5",  # type: ignore[arg-type]
                          listener="amqp")
    for _ in range(3):
        assert not session.may(Action.PUB, Resource.topic("orders"))
    gate.audit.close()
    events = lines(path)
    assert [(e["event"], e.get("ok")) for e in events] == [("login", False), ("login", True), ("denied", None),
                                                          ("denied", None)]
    assert (events[2]["repeats"], events[3]["repeats"]) == (1, 2)  # the two cached repeats: summed at close
    assert "s3cret" not in path.read_text() and "nope" not in path.read_text()
    assert metrics.failed_logins == {("amqp", "bad_password"): 1}
    assert metrics.denials == {("amqp", "Pub"): 3}  # every denial counts, cached decisions too


def test_security_metrics_labels_are_bounded():
    metrics = SecurityMetrics()
    for i in range(SECURITY_LABEL_PAIRS + 50):
        metrics.limit_hit("mqtt", f"cause{i}")
    assert len(metrics.limit_hits) == SECURITY_LABEL_PAIRS + 1
    assert metrics.limit_hits[("other", "other")] == 50
    metrics.login_failed("", "")
    assert metrics.failed_logins == {("unknown", "unknown"): 1}
