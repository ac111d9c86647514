"""The MQTT adapter on the gate: asynchronous login at CONNECT, and denials reported as MQTT reason codes."""

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from tidegate.adapters.mqtt.codec import (
    Connack,
    Connect,
    Properties,
    Puback,
    Publish,
    Pubrec,
    ReasonCode,
    Suback,
    Subscribe,
    TopicSubscription,
    Will,
)
from tidegate.core.errors import NotAuthenticated
from tidegate.core.model import QueueRef
from tidegate.core.security import AllowAllGate, Decision, Principal
from tidegate.core.security.gate import ALLOW


class SlowGate(AllowAllGate):
    """Answers logins only when the test says so; remembers the credentials it was given."""

    def __init__(self) -> None:
        self.pending: list[tuple[object, Deferred]] = []

    def authenticate(self, credentials):
        d: Deferred = Deferred()
        self.pending.append((credentials, d))
        return d


class RefusingGate(AllowAllGate):
    def authenticate(self, credentials):
        return fail(NotAuthenticated("wrong password"))


class DenyingGate(AllowAllGate):
    """Denies every action whose resource name starts with `secret`."""

    def check(self, principal, action, resource, source):
        return Decision(False, "secret") if resource.name.startswith("secret") else ALLOW


def stored_bodies(env, topic):
    try:
        queues = env.broker.get_topic(topic).queues
    except Exception:
        return []
    return [d.message.body for q in range(queues) for d in env.broker.pull(QueueRef(topic, q), 0, 100).messages]


def test_packets_after_connect_wait_for_the_login_decision(make_env):
    """CONNECT, PUBLISH and SUBSCRIBE in one read: nothing is answered or stored until the gate decides; then
    CONNACK comes first and the held packets are handled in order (bytes arriving meanwhile too)."""
    gate = SlowGate()
    env = make_env(gate=gate)
    client = env.client(5)
    client.send(Connect("held", protocol_level=5, username="alice", password=b"pw"),
                Publish("held/t", b"early", 1, packet_id=1), Subscribe(2, (TopicSubscription("held/#", 1),)))
    client.send(Publish("held/t", b"later", 1, packet_id=3))
    env.pump()
    assert client.received() == []
    assert stored_bodies(env, "held") == []
    credentials, decision = gate.pending[0]
    assert (credentials.mechanism, credentials.username, credentials.password) == ("password", "alice", b"pw")
    peer = client.transport.getPeer().host
    assert (credentials.client_id, credentials.source, credentials.listener) == ("held", peer, "mqtt")
    decision.callback(Principal("alice"))
    env.pump()
    packets = client.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == ReasonCode.SUCCESS
    # SUBACK goes out at once, PUBACKs once the publishes are durable (as without a login in between)
    assert [p.packet_id for p in packets if isinstance(p, Puback)] == [1, 3]
    assert [p.packet_id for p in packets if isinstance(p, Suback)] == [2]
    assert stored_bodies(env, "held") == [b"early", b"later"]
    assert client.protocol.session.principal == Principal("alice")


def test_anonymous_login_has_the_anonymous_mechanism(make_env):
    gate = SlowGate()
    env = make_env(gate=gate)
    env.client(4).send(Connect("anon", protocol_level=4))
    assert gate.pending[0][0].mechanism == "anonymous"


def test_failed_login_is_connack_0x86_on_v5_and_return_code_4_on_v311(make_env):
    env = make_env(gate=RefusingGate())
    for level in (5, 4):
        client = env.client(level)
        client.send(Connect(f"bad-{level}", protocol_level=level, username="u", password=b"x"),
                    Publish("leak/t", b"never", 1, packet_id=1))
        packets = client.received()
        assert len(packets) == 1 and isinstance(packets[0], Connack)
        assert packets[0].reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD  # return code 4 on 3.1.1
        assert client.closed
    assert stored_bodies(env, "leak") == []
    assert env.factory.sessions.sessions == {}


def test_raw_v311_refusal_byte_is_return_code_4(make_env):
    env = make_env(gate=RefusingGate())
    client = env.client(4)
    client.send(Connect("raw", protocol_level=4, username="u", password=b"x"))
    assert client.transport.value() == b"\x20\x02\x00\x04"


def test_a_gate_error_is_server_unavailable_not_a_traceback(make_env):
    class BrokenGate(AllowAllGate):
        def authenticate(self, credentials):
            return fail(Failure(RuntimeError("ldap down")))

    env = make_env(gate=BrokenGate())
    client = env.client(5)
    connack = client.connect("x")
    assert connack.reason_code == ReasonCode.SERVER_UNAVAILABLE and client.closed


def test_session_is_not_taken_over_before_the_new_login_succeeds(make_env):
    gate = SlowGate()
    env = make_env(gate=gate)
    first = env.client(5)
    first.send(Connect("same", protocol_level=5))
    gate.pending[0][1].callback(Principal("owner"))
    assert first.received()[0].reason_code == ReasonCode.SUCCESS
    intruder = env.client(5)
    intruder.send(Connect("same", protocol_level=5, username="mallory", password=b"guess"))
    assert not first.closed and first.received() == []
    gate.pending[1][1].errback(NotAuthenticated("no"))
    assert intruder.received()[0].reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert not first.closed
    assert env.factory.sessions.get("same").connection is first.protocol


def test_denied_publish_is_puback_0x87_on_v5_and_closes_v311(make_env):
    env = make_env(gate=DenyingGate())
    v5 = env.client(5)
    v5.connect("p5")
    v5.send(Publish("secret/a", b"no", 1, packet_id=1), Publish("open/a", b"yes", 1, packet_id=2),
            Publish("secret/b", b"no", 2, packet_id=3))
    env.pump()
    acks = {p.packet_id: p for p in v5.received() if isinstance(p, Puback | Pubrec)}
    assert acks[1].reason_code == ReasonCode.NOT_AUTHORIZED
    assert acks[2].reason_code == ReasonCode.SUCCESS
    assert isinstance(acks[3], Pubrec) and acks[3].reason_code == ReasonCode.NOT_AUTHORIZED
    assert stored_bodies(env, "secret") == [] and stored_bodies(env, "open") == [b"yes"]
    v311 = env.client(4)
    v311.connect("p4")
    v311.send(Publish("secret/a", b"no", 1, packet_id=1))
    assert v311.closed


def test_denied_qos0_publish_is_dropped_and_the_connection_stays(make_env):
    env = make_env(gate=DenyingGate())
    client = env.client(4)
    client.connect("q0")
    client.send(Publish("secret/a", b"no", 0))
    env.pump()
    assert not client.closed and stored_bodies(env, "secret") == []


def test_denied_subscription_is_suback_0x87_on_v5_and_0x80_on_v311(make_env):
    env = make_env(gate=DenyingGate())
    for level, client_id in ((5, "s5"), (4, "s4")):
        client = env.client(level)
        client.connect(client_id)
        client.send(Subscribe(1, (TopicSubscription("secret/#", 1), TopicSubscription("open/#", 1),
                                  TopicSubscription("$share/g/secret/x", 1))))
        env.pump()
        suback = next(p for p in client.received() if isinstance(p, Suback))
        denied = ReasonCode.NOT_AUTHORIZED if level == 5 else ReasonCode.UNSPECIFIED_ERROR
        assert suback.reason_codes == (denied, ReasonCode.GRANTED_QOS_1, denied)
        session = env.factory.sessions.get(client_id)
        assert set(session.subscriptions) == {"open/#"}
    patterns = {pattern for pattern, _ in env.broker.bindings()}
    assert patterns == {"open/#"}


def test_raw_v311_suback_failure_byte_is_0x80(make_env):
    env = make_env(gate=DenyingGate())
    client = env.client(4)
    client.connect("raw")
    client.send(Subscribe(9, (TopicSubscription("secret/#", 0),)))
    assert client.transport.value() == b"\x90\x03\x00\x09\x80"


def test_will_is_published_as_the_client_and_the_gate_decides(make_env):
    env = make_env(gate=DenyingGate())
    watcher = env.client(4)
    watcher.connect("watcher")
    watcher.send(Subscribe(1, (TopicSubscription("open/#", 0),)))
    env.pump()
    watcher.received()
    for topic in ("secret/will", "open/will"):
        client = env.client(5)
        client.connect(f"w-{topic}", will=Will(topic, b"bye", properties=Properties()))
        client.drop()
    env.pump()
    assert [p.topic for p in watcher.received() if isinstance(p, Publish)] == ["open/will"]
    assert stored_bodies(env, "secret") == []


def test_client_cannot_reach_another_sessions_queue_through_its_core_session(env):
    """The session queue is private to its owner: another connection's core session is refused."""
    a = env.client(4)
    a.connect("a")
    a.send(Subscribe(1, (TopicSubscription("t", 1),)))
    b = env.client(4)
    b.connect("b")
    session_a = env.factory.sessions.get("a")
    core_b = b.protocol.session
    try:
        core_b.pull(session_a.queue, 0)
    except Exception as exc:
        assert type(exc).__name__ == "NotAuthorized"
    else:
        raise AssertionError("b read a's session queue")


def test_malformed_bytes_after_connect_are_answered_after_the_login(make_env):
    """A codec fault behind a CONNECT waiting for the gate is reported once the connection is accepted."""
    gate = SlowGate()
    env = make_env(gate=gate)
    client = env.client(5)
    client.send_raw(client.codec.encode(Connect("bad-tail", protocol_level=5)) + b"\x00\x00")  # packet type 0
    assert client.received() == [] and not client.closed
    gate.pending[0][1].callback(Principal("p"))
    packets = client.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == ReasonCode.SUCCESS
    assert packets[1].reason_code == ReasonCode.MALFORMED_PACKET
    assert client.closed
