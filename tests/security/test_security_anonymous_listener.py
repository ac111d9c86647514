"""Anonymous clients are decided per listener: with `allow_anonymous = "loopback"` a listener bound to a
non-loopback address refuses them (even from 127.0.0.1), `true` admits them everywhere with a warning at start."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from tidegate.core.metrics import SecurityMetrics
from tidegate.core.security.gate import Credentials
from tidegate.core.security.policy_gate import LoginThrottle, PolicyGate, is_loopback_bind, open_policy_gate
from tidegate.core.security.users import SecurityDirectory
from tidegate.core.storage.memory import MemoryMetadataStore

HOSTS = {"native": "127.0.0.1", "mqtt": "0.0.0.0", "amqp": "::", "ws": "10.1.2.3", "local6": "::1",
         "named": "localhost"}


def anonymous(gate: PolicyGate, listener: str, source: str = "127.0.0.1") -> Any:
    out: list[Any] = []
    gate.authenticate(Credentials("anonymous", client_id="c", source=source, listener=listener)).addBoth(out.append)
    return out[0]


def gate_with(policy: Any, metrics: SecurityMetrics | None = None) -> PolicyGate:
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.bootstrap()
    clock = Clock()
    return PolicyGate(directory, clock, allow_anonymous=policy, throttle=LoginThrottle(clock, base_delay_s=0),
                      listener_hosts=HOSTS, metrics=metrics)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("broker.example", False), ("", False),
])
def test_is_loopback_bind(host, loopback):
    assert is_loopback_bind(host) is loopback


@pytest.mark.parametrize("listener, source, allowed", [
    ("native", "127.0.0.1", True),  # loopback listener, loopback client
    ("local6", "::1", True),
    ("named", "127.0.0.1", True),
    ("mqtt", "127.0.0.1", False),  # a wildcard bind is reachable from the network: refused even from loopback
    ("amqp", "::1", False),
    ("ws", "10.1.2.9", False),
    ("native", "10.0.0.7", False),  # source check kept too (a proxy or port forward onto a loopback listener)
    ("unlisted", "127.0.0.1", True),  # a listener the gate was not told about: the source decides
    ("unlisted", "10.0.0.7", False),
])
def test_loopback_policy_decides_by_the_listeners_bind_address(listener, source, allowed):
    metrics = SecurityMetrics()
    result = anonymous(gate_with("loopback", metrics), listener, source)
    assert (not isinstance(result, Failure)) is allowed
    if not allowed:
        assert metrics.failed_logins == {(listener, "anonymous_refused"): 1}


def test_true_admits_anonymous_clients_on_every_listener_and_false_on_none():
    for listener in HOSTS:
        assert anonymous(gate_with(True), listener, "10.9.9.9").name == "anonymous"
        assert isinstance(anonymous(gate_with(False), listener), Failure)


def capture_log() -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: globalLogPublisher.removeObserver(events.append)


def test_true_with_a_non_loopback_listener_is_a_warning_at_start():
    events, stop = capture_log()
    try:
        open_policy_gate(MemoryMetadataStore(), Clock(), allow_anonymous="true", listener_hosts=HOSTS)
    finally:
        stop()
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn and "allow_anonymous" in e["log_format"]]
    assert warnings and "mqtt" in warnings[0]["on"] and "native" not in warnings[0]["on"]


def test_loopback_default_says_which_listeners_refuse_anonymous_clients():
    events, stop = capture_log()
    try:
        gate = open_policy_gate(MemoryMetadataStore(), Clock(), listener_hosts=HOSTS)
    finally:
        stop()
    assert gate.listener_hosts == HOSTS
    notes = [e for e in events if "anonymous clients are refused" in e.get("log_format", "")]
    assert notes and notes[0]["names"] == "amqp, mqtt, ws"
    assert not [e for e in events if e.get("log_level") == LogLevel.warn]
