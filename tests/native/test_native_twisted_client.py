"""The Twisted SDK client against the server adapter, connected in memory (iosim) on a MemoryReactorClock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from tidegate.adapters.native.errors import ErrorCode
from tidegate.adapters.native.server import NativeServerFactory, NativeSettings
from tidegate.client import ConnectionClosed, Delivered, PullStatus, SendResult
from tidegate.client.twisted_client import TwistedClient, connect
from tidegate.core.errors import InvalidName
from tidegate.core.model import Message, QueueRef
from tidegate.core.security.gate import AllowAllGate
from tidegate.core.testing import make_broker  # noqa: E402


class Link:
    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.factory = NativeServerFactory(make_broker(self.clock), AllowAllGate(), self.clock,
                                           NativeSettings(heartbeat_s=10.0))
        self.client: TwistedClient
        self.pump: IOPump
        self.client, _, self.pump = connectedServerAndClient(
            lambda: self.factory.buildProtocol(None), lambda: TwistedClient(self.clock, "tw-1"), clock=self.clock)
        self.settle()

    def settle(self) -> None:
        # Alternate network pumping and reactor turns until both are quiet (durability runs on a reactor turn).
        for _ in range(20):
            self.clock.advance(0)
            if not self.pump.pump():
                self.clock.advance(0)
                if not self.pump.pump():
                    return

    def result(self, d: Deferred[Any]) -> Any:
        self.settle()
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        assert outcome, "the Deferred did not fire"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]


@pytest.fixture
def link() -> Link:
    return Link()


def test_handshake_completes_and_send_is_acknowledged(link: Link) -> None:
    """The client's ready Deferred fires after HELLO_OK; send() fires with a SendResult once durable."""
    assert link.client.ready.called and link.client.server_version
    result = link.result(link.client.send("tw", b"body", tag="t", keys=("k",)))
    assert isinstance(result, SendResult) and result.topic == "tw" and result.msg_id


def test_send_batch_and_pull(link: Link) -> None:
    """send_batch returns one result per message; pull returns them with offsets."""
    link.result(link.client.create_topic("twb", queues=1))
    results = link.result(link.client.send_batch([Message(topic="twb", body=b"1"), Message(topic="twb", body=b"2")]))
    assert [r.queue_offset for r in results] == [0, 1]
    pulled = link.result(link.client.pull("twb", 0, 0))
    assert pulled.status is PullStatus.FOUND and [d.message.body for d in pulled.messages] == [b"1", b"2"]


def test_subscribe_delivers_to_the_handler_and_commit_works(link: Link) -> None:
    """subscribe() fires with an id; pushed messages reach the handler; commit and unsubscribe succeed."""
    link.result(link.client.create_topic("tws", queues=1))
    got: list[Delivered] = []
    assignments: list[list[QueueRef]] = []
    sub_id = link.result(link.client.subscribe("twg", "tws", got.append, credit=8, start="earliest",
                                               on_assignment=assignments.append))
    link.result(link.client.send("tws", b"pushed"))
    link.settle()
    assert [d.message.body for d in got] == [b"pushed"] and assignments == [[QueueRef("tws", 0)]]
    link.result(link.client.commit({QueueRef("tws", 0): 1}, subscription_id=sub_id))
    link.result(link.client.unsubscribe(sub_id))


def test_errors_errback_with_typed_exceptions(link: Link) -> None:
    """A rejected request errbacks with the TidegateError subclass of the server's code."""
    with pytest.raises(InvalidName) as info:
        link.result(link.client.send("bad name!", b"x"))
    assert info.value.code == ErrorCode.INVALID_NAME


def test_pending_requests_fail_when_the_connection_drops(link: Link) -> None:
    """Requests still waiting when the connection is lost errback with ConnectionClosed."""
    d = link.client.send("tw", b"never acked")
    link.client.connectionLost(Failure(ConnectionDone()))  # before any answer could arrive
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert isinstance(outcome[0], Failure) and outcome[0].check(ConnectionClosed)
    later: list[Any] = []
    link.client.send("tw", b"after").addErrback(later.append)
    assert later and later[0].check(ConnectionClosed)


def test_connect_fails_cleanly_when_nothing_listens() -> None:
    """connect() errbacks when the TCP connection cannot be made."""
    clock = MemoryReactorClock()
    d = connect(clock, "127.0.0.1", 1)
    host, port, factory, timeout, _ = clock.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 1)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionRefusedError)


def test_close_says_bye_and_disconnects(link: Link) -> None:
    """close() sends BYE, fires once the server answers, and the connection ends."""
    link.result(link.client.close())
    link.settle()
    assert not link.client._connected
    assert link.result(link.client.close()) is None  # closing twice is harmless
