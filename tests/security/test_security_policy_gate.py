"""PolicyGate: passwords, anonymous by source, guest on loopback, login throttling, live re-decisions."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tidegate.core.errors import NotAuthenticated, NotAuthorized
from tidegate.core.security.gate import SYSTEM, Action, Credentials, Principal, Resource
from tidegate.core.security.policy import PolicyEntry
from tidegate.core.security.policy_gate import LoginThrottle, PolicyGate, is_loopback
from tidegate.core.security.users import SecurityDirectory
from tidegate.core.session import CoreSession
from tidegate.core.storage.memory import MemoryMetadataStore


def result_of(deferred: Deferred) -> Any:
    out: list[Any] = []
    deferred.addBoth(out.append)
    assert out, "the Deferred has not fired"
    value = out[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


def fired(deferred: Deferred) -> list[Any]:
    out: list[Any] = []
    deferred.addBoth(out.append)
    return out


@pytest.fixture
def directory() -> SecurityDirectory:
    d = SecurityDirectory(MemoryMetadataStore())
    d.bootstrap("adminpw")
    d.add_user("alice", b"s3cret")
    d.grant("user:alice", PolicyEntry.create("Topic:telemetry/${username}/#", "Pub", "Allow"))
    d.grant("user:alice", PolicyEntry.create("Topic:commands/${username}/#", "Sub", "Allow"))
    return d


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_gate(directory, clock, **kwargs) -> PolicyGate:
    kwargs.setdefault("throttle", LoginThrottle(clock, base_delay_s=0))
    return PolicyGate(directory, clock, **kwargs)


def password(user: str, pw: bytes, source: str = "10.0.0.5", client_id: str = "c1") -> Credentials:
    return Credentials("password", username=user, password=pw, client_id=client_id, source=source, listener="t")


def anonymous(source: str) -> Credentials:
    return Credentials("anonymous", client_id="c", source=source, listener="t")


def test_right_password_gives_the_user_with_its_client_id(directory, clock):
    principal = result_of(make_gate(directory, clock).authenticate(password("alice", b"s3cret", client_id="dev1")))
    assert principal.name == "alice" and principal.client_id == "dev1" and not principal.anonymous


@pytest.mark.parametrize(("user", "pw"), [("alice", b"wrong"), ("nobody", b"s3cret"), ("anonymous", b"")])
def test_wrong_password_or_unknown_user_is_not_authenticated(directory, clock, user, pw):
    with pytest.raises(NotAuthenticated):
        result_of(make_gate(directory, clock).authenticate(password(user, pw)))


def test_disabled_user_cannot_log_in(directory, clock):
    directory.set_enabled("alice", False)
    with pytest.raises(NotAuthenticated):
        result_of(make_gate(directory, clock).authenticate(password("alice", b"s3cret")))


@pytest.mark.parametrize(("policy", "source", "ok"), [
    ("loopback", "127.0.0.1", True), ("loopback", "127.8.9.1", True), ("loopback", "::1", True),
    ("loopback", "::ffff:127.0.0.1", True), ("loopback", "10.0.0.1", False), ("loopback", "", False),
    (True, "10.0.0.1", True), (False, "127.0.0.1", False),
])
def test_anonymous_clients_follow_allow_anonymous(directory, clock, policy, source, ok):
    deferred = make_gate(directory, clock, allow_anonymous=policy).authenticate(anonymous(source))
    if ok:
        principal = result_of(deferred)
        assert principal.name == "anonymous" and principal.anonymous
    else:
        with pytest.raises(NotAuthenticated):
            result_of(deferred)


def test_anonymous_is_refused_when_its_user_is_disabled(directory, clock):
    directory.set_enabled("anonymous", False)
    with pytest.raises(NotAuthenticated):
        result_of(make_gate(directory, clock).authenticate(anonymous("127.0.0.1")))


def test_unknown_allow_anonymous_value_is_refused(directory, clock):
    with pytest.raises(ValueError):
        make_gate(directory, clock, allow_anonymous="sometimes")


def test_guest_guest_works_from_loopback_only(directory, clock):
    gate = make_gate(directory, clock)
    assert result_of(gate.authenticate(password("guest", b"guest", source="127.0.0.1"))).name == "anonymous"
    with pytest.raises(NotAuthenticated):
        result_of(gate.authenticate(password("guest", b"guest", source="10.0.0.1")))
    with pytest.raises(NotAuthenticated):
        result_of(make_gate(directory, clock, allow_anonymous=False).authenticate(
            password("guest", b"guest", source="127.0.0.1")))


def test_unsupported_mechanisms_are_refused(directory, clock):
    credentials = Credentials("token", username="alice", password=b"jwt", source="127.0.0.1")
    with pytest.raises(NotAuthenticated):
        result_of(make_gate(directory, clock).authenticate(credentials))


def test_password_checks_run_through_run_in_thread(directory, clock):
    calls = []

    def runner(function, *args):
        calls.append(function.__name__)
        pending: Deferred = Deferred()
        pending.callback(function(*args))
        return pending

    result_of(make_gate(directory, clock, run_in_thread=runner).authenticate(password("alice", b"s3cret")))
    assert calls == ["authenticate"]


def test_failed_logins_slow_down_that_source_exponentially(directory, clock):
    gate = PolicyGate(directory, clock, throttle=LoginThrottle(clock, base_delay_s=1, max_delay_s=4))
    attacker = "10.6.6.6"
    with pytest.raises(NotAuthenticated):
        result_of(gate.authenticate(password("alice", b"x", source=attacker)))
    delays = []
    for _ in range(4):
        answer = fired(gate.authenticate(password("alice", b"x", source=attacker)))
        waited = 0.0
        while not answer:
            clock.advance(0.25)
            waited += 0.25
        delays.append(waited)
        assert isinstance(answer[0], Failure) and answer[0].check(NotAuthenticated)
    assert delays == [1.0, 2.0, 4.0, 4.0]
    # another source is not slowed down; the right password (after the wait) resets the counter
    assert result_of(gate.authenticate(password("alice", b"s3cret", source="10.0.0.9"))).name == "alice"
    answer = fired(gate.authenticate(password("alice", b"s3cret", source=attacker)))
    clock.advance(4)
    assert answer[0].name == "alice"
    assert result_of(gate.authenticate(password("alice", b"s3cret", source=attacker))).name == "alice"


def test_the_throttle_table_is_bounded_and_forgets(clock):
    throttle = LoginThrottle(clock, base_delay_s=1, max_sources=3, forget_after_s=60)
    for n in range(5):
        throttle.failed(f"10.0.0.{n}")
    assert len(throttle) == 3 and throttle.delay("10.0.0.0") == 0 and throttle.delay("10.0.0.4") == 1
    clock.advance(61)
    assert throttle.delay("10.0.0.4") == 0


def test_check_applies_policies_and_super_user(directory, clock):
    gate = make_gate(directory, clock)
    alice = Principal("alice", client_id="c1")
    assert gate.check(alice, Action.PUB, Resource.topic("telemetry/alice/t"), "10.0.0.1")
    assert not gate.check(alice, Action.PUB, Resource.topic("telemetry/bob/x"), "10.0.0.1")
    assert not gate.check(alice, Action.SUB, Resource.topic_filter("#"), "10.0.0.1")
    assert gate.check(alice, Action.SUB, Resource.topic_filter("commands/alice/#"), "10.0.0.1")
    assert gate.check(Principal("admin"), Action.DELETE, Resource.topic("x"), "10.0.0.1")
    assert gate.check(SYSTEM, Action.DELETE, Resource.topic("x"), "")
    assert not gate.check(Principal("ghost"), Action.PUB, Resource.topic("telemetry/ghost/x"), "")


def test_session_cache_follows_the_gate_version(directory, clock):
    gate = make_gate(directory, clock)
    alice = result_of(gate.authenticate(password("alice", b"s3cret")))
    session = CoreSession(core=None, gate=gate, principal=alice, source="10.0.0.5")  # type: ignore[arg-type]
    topic = Resource.topic("telemetry/alice/t")
    session.authorize(Action.PUB, topic)
    directory.set_enabled("alice", False)
    with pytest.raises(NotAuthorized):
        session.authorize(Action.PUB, topic)
    directory.set_enabled("alice", True)
    session.authorize(Action.PUB, topic)
    directory.revoke("user:alice", PolicyEntry.create("Topic:telemetry/${username}/#", "Pub", "Allow"))
    with pytest.raises(NotAuthorized):
        session.authorize(Action.PUB, topic)
    directory.add_role("pub")
    directory.grant("role:pub", PolicyEntry.create("Topic:telemetry/#", "Pub", "Allow"))
    directory.assign_role("alice", "pub")
    session.authorize(Action.PUB, topic)
    directory.delete_role("pub")
    with pytest.raises(NotAuthorized):
        session.authorize(Action.PUB, topic)


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("10.0.0.1")
    assert not is_loopback("localhost") and not is_loopback("")


def test_is_loopback_remembers_sources_within_a_bound():
    """Anonymous logins ask `is_loopback` per CONNECT: answers are cached per source address, and the cache is
    bounded so a flood of distinct addresses cannot grow it."""
    from tidegate.core.security.policy_gate import SOURCE_CACHE_SIZE

    is_loopback.cache_clear()
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.1")
    assert is_loopback.cache_info().hits == 1
    for index in range(SOURCE_CACHE_SIZE + 10):
        is_loopback(f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}")
    assert is_loopback.cache_info().currsize == SOURCE_CACHE_SIZE
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("10.0.0.1")
