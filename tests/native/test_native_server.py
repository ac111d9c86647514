"""The native server adapter over StringTransport and MemoryReactorClock, backed by a real in-memory Broker,
reached through a per-connection CoreSession opened after HELLO logs in through the gate."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import NativeCodec, Role, encode_frame
from tidegate.adapters.native.errors import ErrorCode
from tidegate.adapters.native.server import NativeProtocol, NativeServerFactory, NativeSettings
from tidegate.core.api import Delivered
from tidegate.core.errors import NotAuthenticated
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef
from tidegate.core.security.gate import ALLOW, Action, AllowAllGate, Credentials, Decision, Principal, Resource
from tidegate.core.testing import RecordingSink, make_broker


class CountingTransport(StringTransport):
    """Counts write calls, so tests can check that one dataReceived produces one write."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.write_calls = 0

    def write(self, data: bytes) -> None:
        self.write_calls += 1
        super().write(data)

    def writeSequence(self, seq) -> None:  # noqa: N802 - Twisted's name
        self.write_calls += 1
        super().writeSequence(seq)


class Peer:
    """One simulated client connection: send frames in, read decoded frames out."""

    def __init__(self, factory: NativeServerFactory, hello: bool = True) -> None:
        self.factory = factory
        self.protocol: NativeProtocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = CountingTransport()
        self.protocol.makeConnection(self.transport)
        self.codec = NativeCodec(Role.CLIENT)
        self.next_id = 100
        self.pushes: list[f.Frame] = []  # server pushes seen while waiting for responses
        if hello:
            self.send(f.Hello(request_id=1, client_id="peer"))
            (ok,) = self.read()
            assert isinstance(ok, f.HelloOk)

    def send(self, *frames: f.Frame) -> None:
        self.protocol.dataReceived(b"".join(encode_frame(x) for x in frames))

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def read(self) -> list[f.Frame]:
        data = self.transport.value()
        self.transport.clear()
        return self.codec.receive_data(data)

    def request(self, cls: type[f.Frame], **fields) -> f.Frame:
        self.next_id += 1
        self.send(cls(request_id=self.next_id, **fields))
        self.factory.clock.advance(0)
        frames = self.read()
        answers = [x for x in frames if x.request_id == self.next_id]
        self.pushes += [x for x in frames if x.request_id != self.next_id]
        assert len(answers) == 1, frames
        return answers[0]

    def deliveries(self) -> list[f.DeliveryRecord]:
        """Every DELIVER record pushed so far (during requests or since), consumed once."""
        frames, self.pushes = self.pushes + self.read(), []
        return [m for x in frames if isinstance(x, f.Deliver) for m in x.messages]

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def factory(clock: MemoryReactorClock) -> NativeServerFactory:
    return NativeServerFactory(make_broker(clock), AllowAllGate(), clock,
                               NativeSettings(max_frame=64 * 1024, heartbeat_s=10.0), metrics=CoreMetrics())


def test_handshake_announces_limits_and_counts_the_connection(factory: NativeServerFactory) -> None:
    """HELLO gets HELLO_OK with max frame and heartbeat; the connection gauge goes up and back down."""
    peer = Peer(factory, hello=False)
    assert factory.metrics.connections["native"] == 1
    peer.send(f.Hello(request_id=7, client_id="c1", client_name="test"))
    (ok,) = peer.read()
    assert ok == f.HelloOk(request_id=7, version=1, server_version=ok.server_version, max_frame=64 * 1024,
                           heartbeat_ms=10_000)
    assert peer.protocol.client_id == "c1"
    peer.protocol.connectionLost(None)
    assert factory.metrics.connections["native"] == 0
    assert factory.metrics.connections_total["native"] == 1


def test_unknown_version_gets_unsupported_version_then_close(factory: NativeServerFactory) -> None:
    """A HELLO with version 9 is answered by ERROR UNSUPPORTED_VERSION and the connection is closed."""
    peer = Peer(factory, hello=False)
    peer.send(f.Hello(request_id=3, version=9))
    (err,) = peer.read()
    assert isinstance(err, f.Error) and err.code == ErrorCode.UNSUPPORTED_VERSION and err.request_id == 3
    assert peer.closing


def test_request_before_hello_is_refused_and_closed(factory: NativeServerFactory) -> None:
    """Anything but HELLO first gets ERROR BAD_REQUEST and a close."""
    peer = Peer(factory, hello=False)
    peer.send(f.TopicList(request_id=2))
    (err,) = peer.read()
    assert err.code == ErrorCode.BAD_REQUEST and peer.closing


def test_oversize_frame_is_refused_before_buffering_and_closed(factory: NativeServerFactory) -> None:
    """A length prefix above max_frame yields ERROR FRAME_TOO_LARGE and a close, without waiting for the body."""
    peer = Peer(factory)
    peer.send_raw(struct.pack(">I", 10 * 1024 * 1024) + b"\x20\x00")
    (err,) = peer.read()
    assert err.code == ErrorCode.FRAME_TOO_LARGE and peer.closing
    assert peer.protocol.codec.buffered == 0


def test_malformed_frame_is_reported_and_the_connection_stays_up(factory: NativeServerFactory) -> None:
    """A bad body gets ERROR MALFORMED_FRAME for its request id; the next request is served normally."""
    peer = Peer(factory)
    bad = struct.pack(">IBBI", 6 + 3, 0x12, 0, 55) + b"\x00\x09a"  # TOPIC_DELETE with a truncated name
    peer.send_raw(bad + encode_frame(f.Ping(request_id=56)))
    err, pong = peer.read()
    assert err.code == ErrorCode.MALFORMED_FRAME and err.request_id == 55
    assert pong == f.Pong(request_id=56) and not peer.closing


def test_broker_errors_come_back_as_error_frames_with_their_code(factory: NativeServerFactory) -> None:
    """A TidegateError from the broker (unknown topic) becomes ERROR with its wire code."""
    peer = Peer(factory)
    err = peer.request(f.TopicDelete, name="nope")
    assert isinstance(err, f.Error) and err.code == ErrorCode.TOPIC_NOT_FOUND
    err = peer.request(f.TopicCreate, name="bad name!")
    assert err.code == ErrorCode.INVALID_NAME and not peer.closing


def test_unexpected_exception_is_internal_error_and_connection_survives(factory: NativeServerFactory) -> None:
    """A non-Tidegate exception becomes ERROR INTERNAL (no traceback on the wire); the connection stays up."""
    peer = Peer(factory)

    def broken(include_internal: bool = False):
        raise RuntimeError("secret detail")

    factory.core.list_topics = broken
    err = peer.request(f.TopicList)
    assert err.code == ErrorCode.INTERNAL and "secret" not in err.message
    assert isinstance(peer.request(f.Ping), f.Pong)


def test_send_is_acknowledged_only_once_durable(factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """SEND_OK is withheld until the group-commit fsync (run on the next reactor turn) covers the message."""
    peer = Peer(factory)
    peer.send(f.Send(request_id=9, message=Message(topic="orders", body=b"x")))
    assert peer.read() == []
    durable_before = factory.core.store.durable_offset
    clock.advance(0)
    (ok,) = peer.read()
    assert isinstance(ok, f.SendOk) and ok.request_id == 9 and ok.topic == "orders" and ok.msg_id
    assert factory.core.store.durable_offset > durable_before


def test_oneway_send_gets_no_response_but_is_stored(factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """A SEND flagged ONEWAY stores the message and answers nothing."""
    peer = Peer(factory)
    peer.send(f.Send(request_id=4, flags=f.FrameFlag.ONEWAY, message=Message(topic="t1", body=b"a")))
    clock.advance(0)
    assert peer.read() == []
    described = peer.request(f.TopicDescribe, name="t1")
    assert sum(q.max_offset for q in described.queues) == 1


def test_pipelined_requests_are_answered_in_one_write(factory: NativeServerFactory) -> None:
    """Several requests in one dataReceived produce one writeSequence with all responses, in order."""
    peer = Peer(factory)
    writes = peer.transport.write_calls
    peer.send(f.Ping(request_id=1), f.TopicCreate(request_id=2, name="a", queues=2), f.TopicList(request_id=3))
    frames = peer.read()
    assert [type(x) for x in frames] == [f.Pong, f.TopicOk, f.TopicListOk]
    assert peer.transport.write_calls == writes + 1


def test_send_batch_answers_every_receipt(factory: NativeServerFactory) -> None:
    """SEND_BATCH stores all messages and returns one receipt each, in order."""
    peer = Peer(factory)
    peer.request(f.TopicCreate, name="b", queues=1)
    ok = peer.request(f.SendBatch, messages=[Message(topic="b", body=bytes([i])) for i in range(3)])
    assert [r.queue_offset for r in ok.results] == [0, 1, 2]


def test_topic_admin_round_trip(factory: NativeServerFactory) -> None:
    """Create, update, list, describe (per-queue min/max) and delete a topic."""
    peer = Peer(factory)
    created = peer.request(f.TopicCreate, name="adm", queues=3)
    assert created.topic.name == "adm" and created.topic.queues == 3
    updated = peer.request(f.TopicUpdate, name="adm", perm="r")
    assert updated.topic.perm == "r" and updated.topic.queues == 3
    names = [t.name for t in peer.request(f.TopicList).topics]
    assert "adm" in names
    described = peer.request(f.TopicDescribe, name="adm")
    assert [q.queue_id for q in described.queues] == [0, 1, 2]
    assert all(q.min_offset == 0 and q.max_offset == 0 for q in described.queues)
    assert isinstance(peer.request(f.TopicDelete, name="adm"), f.Ok)


def _send_all(peer: Peer, topic: str, bodies: list[bytes]) -> None:
    for body in bodies:
        assert isinstance(peer.request(f.Send, queue_id=0, message=Message(topic=topic, body=body)), f.SendOk)


def test_push_respects_credit_and_commit_is_recorded(factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """SUBSCRIBE_OK precedes pushes; DELIVER never exceeds the credit; CREDIT releases more; COMMIT sticks."""
    peer = Peer(factory)
    peer.request(f.TopicCreate, name="p", queues=1)
    peer.send(f.Subscribe(request_id=20, group="g1", topic="p", client_id="c", credit=2, start="earliest"))
    clock.advance(0)
    frames = peer.read()
    assert isinstance(frames[0], f.SubscribeOk)
    sub_id = frames[0].subscription_id
    assert any(isinstance(x, f.Assignment) and [q.queue_id for q in x.queues] == [0] for x in frames[1:])
    _send_all(peer, "p", [b"1", b"2", b"3"])
    clock.advance(0)
    delivered = peer.deliveries()
    assert [m.message.body for m in delivered] == [b"1", b"2"]
    peer.send(f.Credit(request_id=0, flags=f.FrameFlag.ONEWAY, subscription_id=sub_id, credit=5))
    clock.advance(0)
    delivered = peer.deliveries()
    assert [(m.message.body, m.queue_offset) for m in delivered] == [(b"3", 2)]
    ok = peer.request(f.Commit, subscription_id=sub_id, offsets=[f.QueueOffset(topic="p", queue_id=0, offset=3)])
    assert isinstance(ok, f.Ok)
    info = peer.request(f.GroupDescribe, group="g1")
    assert info.group.name == "g1" and [p.committed for p in info.progress] == [3]
    assert info.progress[0].lag == 0


def test_message_mode_ack_and_bad_receipt(factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """In message mode deliveries carry receipts; acking them succeeds, an unknown receipt is INVALID_RECEIPT."""
    peer = Peer(factory)
    peer.request(f.TopicCreate, name="m", queues=1)
    sub = peer.request(f.Subscribe, group="gm", topic="m", ack=f.Ack.MESSAGE, credit=10, start="earliest")
    _send_all(peer, "m", [b"a"])
    clock.advance(0)
    (record,) = peer.deliveries()
    assert record.receipt and record.attempt == 1
    assert isinstance(peer.request(f.AckMessages, subscription_id=sub.subscription_id, receipts=[record.receipt]),
                      f.Ok)
    err = peer.request(f.AckMessages, subscription_id=sub.subscription_id, receipts=["bogus"])
    assert err.code == ErrorCode.INVALID_RECEIPT


def test_unknown_subscription_is_bad_request(factory: NativeServerFactory) -> None:
    """CREDIT/ACK/UNSUBSCRIBE for a subscription this connection does not hold is BAD_REQUEST."""
    peer = Peer(factory)
    assert peer.request(f.Unsubscribe, subscription_id=42).code == ErrorCode.BAD_REQUEST


def test_pull_reset_and_queries(factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """PULL returns stored messages and offsets; RESET_OFFSETS and the three queries answer from the broker."""
    peer = Peer(factory)
    peer.request(f.TopicCreate, name="q", queues=1)
    peer.request(f.Send, queue_id=0, message=Message(topic="q", body=b"k1", keys=("key-1",)))
    pulled = peer.request(f.Pull, topic="q", queue_id=0, offset=0, max_count=10)
    assert pulled.status is f.Status.FOUND and pulled.next_offset == 1 and pulled.max_offset == 1
    (record,) = pulled.messages
    assert record.message.body == b"k1" and record.message.keys == ("key-1",)
    by_id = peer.request(f.QueryById, msg_id=record.message.msg_id)
    assert [m.body for m in by_id.messages] == [b"k1"]
    by_key = peer.request(f.QueryByKey, topic="q", key="key-1")
    assert [m.body for m in by_key.messages] == [b"k1"]
    by_time = peer.request(f.QueryByTime, topic="q", start_ms=0, end_ms=2**62)
    assert [m.body for m in by_time.messages] == [b"k1"]
    assert isinstance(peer.request(f.Commit, group="pg", offsets=[f.QueueOffset(topic="q", queue_id=0, offset=1)]),
                      f.Ok)
    reset = peer.request(f.ResetOffsets, group="pg", topic="q", to=f.ResetTo.EARLIEST)
    assert [(o.queue_id, o.offset) for o in reset.offsets] == [(0, 0)]
    assert peer.request(f.QueryById, msg_id="nope").code in (ErrorCode.MESSAGE_NOT_FOUND, ErrorCode.BAD_REQUEST)


def test_idle_connection_is_closed_after_three_heartbeats(factory: NativeServerFactory,
                                                           clock: MemoryReactorClock) -> None:
    """Traffic keeps a connection alive; 3 heartbeat intervals of silence close it with an ERROR first."""
    peer = Peer(factory)  # heartbeat 10s: the limit is 30s of silence
    clock.advance(25)
    peer.send(f.Ping(request_id=1))  # any frame resets the idle clock
    assert peer.read() == [f.Pong(request_id=1)]
    clock.advance(29)  # silent for 29s
    assert not peer.closing and peer.read() == []
    clock.advance(1)  # silent for 30s
    (err,) = peer.read()
    assert err.request_id == 0 and err.code == ErrorCode.BAD_REQUEST and "heartbeat" in err.message
    assert peer.closing


def test_bye_is_answered_then_closed(factory: NativeServerFactory) -> None:
    """BYE gets OK and the server closes the connection."""
    peer = Peer(factory)
    assert isinstance(peer.request(f.Bye), f.Ok)
    assert peer.closing


def test_connection_loss_detaches_subscriptions(factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """When the connection drops, its subscriptions leave the group."""
    peer = Peer(factory)
    peer.request(f.Subscribe, group="gl", topic="lost", credit=1)
    assert factory.core.group_info("gl").members
    peer.protocol.connectionLost(None)
    clock.advance(0)
    assert not factory.core.group_info("gl").members


# ======================================================================================================
# The seams: HELLO logs in through the gate (asynchronously), frames behind it wait for the decision, every
# request goes through the connection's CoreSession (gate checks, private names).
# ======================================================================================================
PRIVATE = "%MQTT%victim"


class PendingGate(AllowAllGate):
    """Answers each login only when the test fires its Deferred; remembers the credentials it was shown."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Principal]] = []
        self.credentials: list[Credentials] = []

    def authenticate(self, credentials: Credentials) -> Deferred[Principal]:
        self.credentials.append(credentials)
        decision: Deferred[Principal] = Deferred()
        self.pending.append(decision)
        return decision


class RefusingGate(AllowAllGate):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def authenticate(self, credentials: Credentials) -> Deferred[Principal]:
        return fail(self.error)


class DenyingGate(AllowAllGate):
    """Denies one (action, resource) pair, allows everything else."""

    def __init__(self, action: Action, resource: str) -> None:
        self.denied = (action, resource)

    def check(self, principal: Principal, action: Action, resource: Resource, source: str) -> Decision:
        return Decision(False, "denied by test") if (action, str(resource)) == self.denied else ALLOW


def make_factory(gate: Any, clock: MemoryReactorClock) -> NativeServerFactory:
    return NativeServerFactory(make_broker(clock), gate, clock, NativeSettings(max_frame=64 * 1024, heartbeat_s=10.0),
                               metrics=CoreMetrics())


def send(request_id: int, body: bytes, topic: str = "orders") -> f.Send:
    return f.Send(request_id=request_id, queue_id=0, message=Message(topic=topic, body=body))


def stored_bodies(factory: NativeServerFactory, topic: str = "orders") -> list[bytes]:
    return [d.message.body for d in factory.core.pull(QueueRef(topic, 0), 0, 100).messages]


# ------------------------------------------------------------------------------------------ authenticating state
def test_sends_pipelined_behind_hello_are_stored_only_after_the_login_in_order(clock: MemoryReactorClock) -> None:
    """HELLO + SENDs in one read (and more SENDs in a later read) wait for the gate; once it answers, HELLO_OK goes
    out first and the SENDs are stored and acknowledged in the order they were sent."""
    gate = PendingGate()
    factory = make_factory(gate, clock)
    peer = Peer(factory, hello=False)
    peer.send(f.Hello(request_id=1, client_id="pipelined"), send(2, b"a"), send(3, b"b"), f.Ping(request_id=4))
    peer.send(send(5, b"c"))  # bytes arriving while the login is still being decided
    clock.advance(0)
    assert peer.read() == [] and factory.core.list_topics() == []
    assert gate.credentials == [Credentials(mechanism="anonymous", client_id="pipelined", source="127.0.0.1",
                                            listener="native")]

    gate.pending[0].callback(Principal("alice"))
    clock.advance(0)
    frames = peer.read()
    assert isinstance(frames[0], f.HelloOk) and frames[0].request_id == 1
    assert [(type(x).__name__, x.request_id) for x in frames[1:]] == [
        ("Pong", 4), ("SendOk", 2), ("SendOk", 3), ("SendOk", 5)]
    assert [x.queue_offset for x in frames[1:] if isinstance(x, f.SendOk)] == [0, 1, 2]
    assert stored_bodies(factory) == [b"a", b"b", b"c"]
    assert peer.protocol.session.principal == Principal("alice")
    assert peer.protocol.session.client_id == "pipelined"


def test_a_malformed_frame_behind_a_pending_hello_is_reported_in_its_place(clock: MemoryReactorClock) -> None:
    """A protocol error in the bytes held behind HELLO is answered after HELLO_OK, between the frames around it."""
    gate = PendingGate()
    factory = make_factory(gate, clock)
    peer = Peer(factory, hello=False)
    bad = b"\x00\x00\x00\x09\x12\x00\x00\x00\x00\x37\x00\x09a"  # TOPIC_DELETE (id 55) with a truncated name
    peer.send_raw(encode_frame(f.Hello(request_id=1)) + encode_frame(f.Ping(request_id=2)) + bad
                  + encode_frame(f.Ping(request_id=3)))
    assert peer.read() == []
    gate.pending[0].callback(Principal("bob"))
    frames = peer.read()
    assert [(type(x).__name__, x.request_id) for x in frames] == [
        ("HelloOk", 1), ("Pong", 2), ("Error", 55), ("Pong", 3)]
    assert frames[2].code == ErrorCode.MALFORMED_FRAME and not peer.closing


def test_a_refused_login_gets_not_authenticated_and_a_close_and_stores_nothing(clock: MemoryReactorClock) -> None:
    """The gate refusing HELLO: ERROR NOT_AUTHENTICATED (code 22) for HELLO's request id, then close; the SENDs
    pipelined behind it are dropped unanswered."""
    factory = make_factory(RefusingGate(NotAuthenticated("unknown client")), clock)
    peer = Peer(factory, hello=False)
    peer.send(f.Hello(request_id=9, client_id="intruder"), send(10, b"x"))
    clock.advance(0)
    (error,) = peer.read()
    assert error == f.Error(request_id=9, code=int(ErrorCode.NOT_AUTHENTICATED), message="unknown client")
    assert error.code == 22 and peer.closing
    assert factory.core.list_topics() == [] and peer.protocol.session is None


def test_a_pending_login_refused_later_closes_without_running_the_held_frames(clock: MemoryReactorClock) -> None:
    gate = PendingGate()
    factory = make_factory(gate, clock)
    peer = Peer(factory, hello=False)
    peer.send(f.Hello(request_id=1), send(2, b"x"))
    gate.pending[0].errback(NotAuthenticated("token expired"))
    clock.advance(0)
    (error,) = peer.read()
    assert (error.request_id, error.code, error.message) == (1, ErrorCode.NOT_AUTHENTICATED, "token expired")
    assert peer.closing and factory.core.list_topics() == []


def test_a_gate_that_breaks_is_reported_as_not_authenticated_without_details(clock: MemoryReactorClock) -> None:
    """An unexpected exception from the gate is our fault: logged, and the client only hears it was refused."""
    factory = make_factory(RefusingGate(RuntimeError("ldap password is hunter2")), clock)
    peer = Peer(factory, hello=False)
    peer.send(f.Hello(request_id=1))
    (error,) = peer.read()
    assert error.code == ErrorCode.NOT_AUTHENTICATED and "hunter2" not in error.message and peer.closing


# --------------------------------------------------------------------------------------------------- the gate
def test_a_denied_publish_is_not_authorized_for_single_and_pipelined_sends(clock: MemoryReactorClock) -> None:
    """Every SEND of a refused pipelined run gets its own ERROR NOT_AUTHORIZED (21); nothing is stored."""
    factory = make_factory(DenyingGate(Action.PUB, "Topic:secret"), clock)
    peer = Peer(factory)
    peer.send(send(2, b"a", "secret"), send(3, b"b", "secret"), send(4, b"c", "open"))
    clock.advance(0)
    answers = {x.request_id: x for x in peer.read()}
    assert answers[2].code == answers[3].code == ErrorCode.NOT_AUTHORIZED == 21
    assert isinstance(answers[4], f.SendOk)
    assert [t.name for t in factory.core.list_topics()] == ["open"]


# ------------------------------------------------------------------------------------------------ private names
@pytest.fixture
def private_factory(clock: MemoryReactorClock) -> NativeServerFactory:
    """A broker with an MQTT-style private topic and group made by the adapter's system session."""
    factory = make_factory(AllowAllGate(), clock)
    factory.system.claim_private(PRIVATE)
    factory.system.publish([Message(topic=PRIVATE, body=b"someone else's mail")])
    factory.system.subscribe(PRIVATE, PRIVATE, RecordingSink(), client_id="victim").close()
    clock.advance(0)
    return factory


@pytest.mark.parametrize(("request_type", "fields"), [
    (f.Pull, {"topic": PRIVATE, "queue_id": 0, "offset": 0, "max_count": 10}),
    (f.Subscribe, {"group": "thief", "topic": PRIVATE, "credit": 10}),
    (f.Subscribe, {"group": PRIVATE, "topic": "public", "credit": 10}),
    (f.TopicDelete, {"name": PRIVATE}),
    (f.TopicDescribe, {"name": PRIVATE}),
    (f.TopicUpdate, {"name": PRIVATE, "queues": 4}),
    (f.ResetOffsets, {"group": PRIVATE, "topic": PRIVATE, "to": f.ResetTo.EARLIEST}),
    (f.GroupDelete, {"group": PRIVATE}),
    (f.GroupDescribe, {"group": PRIVATE}),
    (f.Commit, {"group": PRIVATE, "offsets": [f.QueueOffset(topic=PRIVATE, queue_id=0, offset=1)]}),
    (f.QueryByKey, {"topic": PRIVATE, "key": "k"}),
    (f.Send, {"queue_id": -1, "message": Message(topic=PRIVATE, body=b"forged")}),
])
def test_a_native_client_is_refused_a_private_topic_or_group(private_factory: NativeServerFactory,
                                                            request_type: type[f.Frame],
                                                            fields: dict[str, Any]) -> None:
    """Pulling, subscribing, deleting, resetting, describing or writing an adapter-private `%MQTT%` name made by the
    system session is NOT_AUTHORIZED (21) for a native client, and the private topic and group are left as they were."""
    private_factory.core.create_topic("public", queues=1)
    peer = Peer(private_factory)
    answer = peer.request(request_type, **fields)
    assert isinstance(answer, f.Error) and answer.code == ErrorCode.NOT_AUTHORIZED == 21, answer
    assert PRIVATE in [t.name for t in private_factory.core.list_topics(include_internal=True)]
    assert PRIVATE in [g.name for g in private_factory.core.list_groups()]
    assert private_factory.core.queue_offsets(QueueRef(PRIVATE, 0)) == (0, 1)


def test_topic_and_group_lists_never_show_private_names_to_a_client(private_factory: NativeServerFactory) -> None:
    """TOPIC_LIST with include_internal (what `tidegate topic list --internal` sends) and GROUP_LIST leave out other
    sessions' private topics and groups, while still listing the client's own topics."""
    private_factory.core.create_topic("public", queues=1)
    peer = Peer(private_factory)
    listed = peer.request(f.TopicList, include_internal=True)
    assert [t.name for t in listed.topics] == ["public"]
    groups = peer.request(f.GroupList)
    assert PRIVATE not in [g.name for g in groups.groups]


def test_native_settings_refuse_limits_that_cannot_work() -> None:
    """A max_frame too small for HELLO_OK and an ERROR, or a negative heartbeat, is refused when the listener is
    configured, not when the first client connects."""
    with pytest.raises(ValueError, match="max_frame"):
        NativeSettings(max_frame=100)
    with pytest.raises(ValueError, match="heartbeat_s"):
        NativeSettings(heartbeat_s=-1)


def test_heartbeat_zero_never_closes_an_idle_connection(clock: MemoryReactorClock) -> None:
    factory = NativeServerFactory(make_broker(clock), AllowAllGate(), clock, NativeSettings(heartbeat_s=0))
    peer = Peer(factory)
    clock.advance(3600)
    assert not peer.closing and isinstance(peer.request(f.Ping), f.Pong)


def test_a_client_that_does_not_read_gets_an_error_and_is_dropped_at_its_output_budget(
        factory: NativeServerFactory) -> None:
    """Replies pile up only while the socket is paused; past the budget the connection ends with a reason."""
    peer = Peer(factory)
    peer.protocol.output_budget = 64
    peer.protocol.pauseProducing()
    for n in range(20):
        peer.send(f.Ping(request_id=200 + n))
    frames = peer.read()
    assert isinstance(frames[-1], f.Error) and "does not read" in frames[-1].message
    assert peer.protocol.closing


# ---------------------------------------------------------------------------------------------- flow control
def _subscribe(peer: Peer, clock: MemoryReactorClock, topic: str, credit: int) -> int:
    peer.send(f.Subscribe(request_id=30, group="g", topic=topic, client_id="c", credit=credit, start="earliest"))
    clock.advance(0)
    frames = peer.read()
    assert isinstance(frames[0], f.SubscribeOk)
    return frames[0].subscription_id


def test_credit_asked_beyond_max_credit_is_clamped_per_subscription(clock: MemoryReactorClock) -> None:
    """A u32 credit in SUBSCRIBE or CREDIT never lets more than `max_credit` messages be outstanding."""
    factory = NativeServerFactory(make_broker(clock), AllowAllGate(), clock, NativeSettings(max_credit=5),
                                  metrics=CoreMetrics())
    consumer, producer = Peer(factory), Peer(factory)
    producer.request(f.TopicCreate, name="cap", queues=1)
    sub_id = _subscribe(consumer, clock, "cap", credit=2**32 - 1)
    assert consumer.protocol.subscriptions[sub_id].subscription.credit == 5
    _send_all(producer, "cap", [b"%d" % i for i in range(12)])
    clock.advance(0)
    assert [m.message.body for m in consumer.deliveries()] == [b"%d" % i for i in range(5)]
    consumer.send(f.Credit(request_id=0, flags=f.FrameFlag.ONEWAY, subscription_id=sub_id, credit=3))
    consumer.send(f.Credit(request_id=0, flags=f.FrameFlag.ONEWAY, subscription_id=sub_id, credit=1_000_000))
    clock.advance(0)
    assert [m.message.body for m in consumer.deliveries()] == [b"%d" % i for i in range(5, 10)]


def test_native_settings_refuse_a_max_credit_below_one() -> None:
    with pytest.raises(ValueError, match="max_credit"):
        NativeSettings(max_credit=0)


def test_nothing_is_delivered_while_paused_and_credit_granted_meanwhile_waits_for_resume(
        factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """pauseProducing takes the subscription's credit back from the core and holds CREDIT frames' credit; after
    resumeProducing delivery continues where it stopped, within the credit the client gave."""
    consumer, producer = Peer(factory), Peer(factory)
    producer.request(f.TopicCreate, name="slow", queues=1)
    sub_id = _subscribe(consumer, clock, "slow", credit=4)
    subscription = consumer.protocol.subscriptions[sub_id].subscription
    consumer.protocol.pauseProducing()
    assert subscription.credit == 0
    _send_all(producer, "slow", [b"a", b"b", b"c", b"d", b"e", b"f"])
    consumer.send(f.Credit(request_id=0, flags=f.FrameFlag.ONEWAY, subscription_id=sub_id, credit=1))
    clock.advance(0)
    assert consumer.deliveries() == []
    assert subscription.credit == 0  # CREDIT while paused is held, not granted
    consumer.protocol.resumeProducing()
    clock.advance(0)
    assert [m.message.body for m in consumer.deliveries()] == [b"a", b"b", b"c", b"d", b"e"]


def test_deliveries_the_core_already_handed_out_are_written_while_paused(
        factory: NativeServerFactory, clock: MemoryReactorClock) -> None:
    """A pause in the middle of a delivery round does not lose what the core already took from the queue: it is
    written (the output budget of the base bounds it), only further credit is held."""
    consumer = Peer(factory)
    consumer.request(f.TopicCreate, name="mid", queues=1)
    sub_id = _subscribe(consumer, clock, "mid", credit=3)
    consumer.protocol.pauseProducing()
    consumer.protocol.subscriptions[sub_id].deliver([Delivered(Message(topic="mid", body=b"x"), QueueRef("mid", 0), 0)])
    assert [m.message.body for m in consumer.deliveries()] == [b"x"]
    assert consumer.protocol.subscriptions[sub_id].held_credit == 3
