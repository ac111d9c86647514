"""Connection admission against the limits in the shared adapter base (adapters/base.py), and the answer each
protocol gives: per-source connections and rate counted at connect, per-user connections at login, slots given
back when connections end."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.base import AdapterConnection, AdapterFactory, ConnectionLimits
from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import NativeCodec, Role
from tidegate.adapters.native.errors import ErrorCode
from tidegate.adapters.native.server import NativeServerFactory, NativeSettings
from tidegate.core.errors import QuotaExceeded
from tidegate.core.metrics import CoreMetrics
from tidegate.core.security import AllowAllGate, Credentials
from tidegate.core.security.limits import Limiter, LimitSettings
from tidegate.core.testing import make_broker


class LoginConnection(AdapterConnection):
    """A toy protocol: any bytes log in as the user they spell."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[object] = []

    def bytes_received(self, data):
        self.authenticate(Credentials("password", username=data.decode(), source=self.source))

    def on_authenticated(self, principal):
        self.session = self.factory.open_session(principal, self.source)
        self.answers.append("welcome")

    def on_authentication_failed(self, failure):
        self.answers.append(failure.value)
        self.close()


class LoginFactory(AdapterFactory):
    protocol = LoginConnection
    protocol_label = "line"


def setup(**settings):
    clock = MemoryReactorClock()
    broker = make_broker(clock)
    metrics = CoreMetrics()
    limiter = Limiter(LimitSettings(**settings), clock, metrics=metrics)
    factory = LoginFactory(broker, AllowAllGate(), clock, None, listener="line",
                           limits=ConnectionLimits(limiter=limiter))
    return factory, clock, metrics


def open_from(factory, host):
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 40000)))
    return proto


def test_a_source_over_its_connection_limit_is_refused_when_it_first_speaks():
    factory, _, metrics = setup(max_connections_per_source=1)
    first = open_from(factory, "10.0.0.1")
    second = open_from(factory, "10.0.0.1")
    first.dataReceived(b"alice")
    second.dataReceived(b"alice")
    assert first.answers == ["welcome"]
    [refusal] = second.answers
    assert isinstance(refusal, QuotaExceeded) and refusal.cause == "connections_per_source"
    assert second.transport.disconnecting
    assert metrics.security.limit_hits == {("line", "connections_per_source"): 1}
    other = open_from(factory, "10.0.0.2")
    other.dataReceived(b"bob")
    assert other.answers == ["welcome"]


def test_a_closed_connection_gives_its_source_and_user_slots_back():
    factory, _, _ = setup(max_connections_per_source=1, max_connections_per_user=1)
    first = open_from(factory, "10.0.0.1")
    first.dataReceived(b"alice")
    first.connectionLost()
    again = open_from(factory, "10.0.0.1")
    again.dataReceived(b"alice")
    assert again.answers == ["welcome"]


def test_the_user_limit_is_checked_after_login_across_sources():
    factory, _, metrics = setup(max_connections_per_user=1)
    open_from(factory, "10.0.0.1").dataReceived(b"alice")
    late = open_from(factory, "10.0.0.2")
    late.dataReceived(b"alice")
    [refusal] = late.answers
    assert isinstance(refusal, QuotaExceeded) and "already has 1 connections" in refusal.message
    assert late.session is None
    assert metrics.security.limit_hits == {("line", "connections_per_user"): 1}


def test_connection_rate_per_source_refills_with_time():
    factory, clock, _ = setup(connection_rate_per_source=1)
    open_from(factory, "10.0.0.1").dataReceived(b"a")
    refused = open_from(factory, "10.0.0.1")
    refused.dataReceived(b"a")
    assert isinstance(refused.answers[0], QuotaExceeded)
    clock.advance(1.0)
    later = open_from(factory, "10.0.0.1")
    later.dataReceived(b"a")
    assert later.answers == ["welcome"]


def test_native_answers_a_refused_connection_with_error_quota_exceeded():
    clock = MemoryReactorClock()
    limiter = Limiter(LimitSettings(max_connections_per_source=1), clock)
    factory = NativeServerFactory(make_broker(clock), AllowAllGate(), clock, NativeSettings(),
                                  limits=ConnectionLimits(limiter=limiter))
    client = NativeCodec(Role.CLIENT)
    answers = []
    for _ in range(2):
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
        proto.makeConnection(transport)
        proto.dataReceived(client.encode(f.Hello(request_id=1, client_id="c", client_name="t")))
        answers.append(client.receive_data(transport.value()))
    assert isinstance(answers[0][0], f.HelloOk)
    [error] = answers[1]
    assert isinstance(error, f.Error) and error.code == ErrorCode.QUOTA_EXCEEDED
    assert "10.0.0.9 already has 1 connections" in error.message
