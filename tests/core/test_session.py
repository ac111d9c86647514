"""The per-connection core session: one gate decision per action, private names reachable only by their owner."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.adapters.native.errors import wire_code
from tidegate.core.errors import MessageNotFound, NotAuthorized
from tidegate.core.model import Message, QueueRef
from tidegate.core.security import ANONYMOUS, SYSTEM, Action, AllowAllGate, Decision, Principal, Resource
from tidegate.core.session import CoreSession, system_session
from tidegate.core.testing import RecordingSink, make_broker


class PolicyGate(AllowAllGate):
    """Denies what `denied` lists and records every question it was asked."""

    def __init__(self, *denied: tuple[Action, str]) -> None:
        self.denied = set(denied)
        self.asked: list[tuple[str, Action, str, str]] = []
        self.version = 0

    def check(self, principal, action, resource, source):
        self.asked.append((principal.name, action, str(resource), source))
        return Decision((action, str(resource)) not in self.denied, "test policy")


@pytest.fixture
def broker():
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    b = make_broker(clock)
    b.clock_for_tests = clock
    yield b
    b.close()


def session(broker, gate=None, principal=ANONYMOUS):
    return CoreSession(broker, gate or AllowAllGate(), principal, source="127.0.0.1", listener="native")


def test_publish_asks_the_gate_with_principal_full_name_and_source(broker):
    gate = PolicyGate()
    s = session(broker, gate, Principal("alice"))
    s.publish([Message(topic="telemetry", subject="d1/temp", body=b"1")])
    assert ("alice", Action.PUB, "Topic:telemetry/d1/temp", "127.0.0.1") in gate.asked


def test_denied_publish_raises_not_authorized_and_stores_nothing(broker):
    gate = PolicyGate((Action.PUB, "Topic:secret"))
    s = session(broker, gate)
    with pytest.raises(NotAuthorized) as err:
        s.publish([Message(topic="open", body=b"a"), Message(topic="secret", body=b"b")])
    assert wire_code(err.value) == 21  # the native adapter reports it as code 21
    assert broker.list_topics() == []  # neither message was stored, no topic auto-created


def test_a_batch_to_one_name_is_decided_once(broker):
    gate = PolicyGate()
    session(broker, gate).publish([Message(topic="t", body=b"x")] * 50)
    assert len(gate.asked) == 1


def test_decisions_are_cached_until_the_gate_version_moves(broker):
    gate = PolicyGate()
    s = session(broker, gate)
    s.publish([Message(topic="t", body=b"1")])
    s.publish([Message(topic="t", body=b"2")])
    assert len(gate.asked) == 1
    gate.denied.add((Action.PUB, "Topic:t"))
    gate.version += 1  # a policy changed: the next action is decided again
    with pytest.raises(NotAuthorized):
        s.publish([Message(topic="t", body=b"3")])


def test_private_topics_are_refused_to_clients_but_reachable_by_their_owner(broker):
    owner = session(broker)
    owner.claim_private("%MQTT%victim")
    stranger = session(broker)
    queue = QueueRef("%MQTT%victim", 0)
    for attempt in (
        lambda: stranger.pull(queue, 0),
        lambda: stranger.delete_topic("%MQTT%victim"),
        lambda: stranger.subscribe("%MQTT%victim", "%MQTT%victim", RecordingSink(), client_id="x"),
        lambda: stranger.publish([Message(topic="%MQTT%victim", body=b"x")]),
        lambda: stranger.bind("a/#", queue),
        lambda: stranger.get_topic("%MQTT%victim"),
        lambda: stranger.reset_offsets("%MQTT%victim", "%MQTT%victim", "earliest"),
    ):
        with pytest.raises(NotAuthorized):
            attempt()
    owner.bind("a/#", queue)
    assert owner.pull(queue, 0).messages == []
    assert "%MQTT%victim" not in [t.name for t in stranger.list_topics(include_internal=True)]
    assert "%MQTT%victim" in [t.name for t in owner.list_topics(include_internal=True)]


def test_clients_cannot_squat_reserved_names_but_may_read_dead_letter_topics(broker):
    s = session(broker)
    with pytest.raises(NotAuthorized):
        s.create_topic("%AMQP%orders")
    with pytest.raises(NotAuthorized):
        s.publish([Message(topic="%DLQ%g", body=b"forged")])
    system_session(broker, AllowAllGate(), "test").create_topic("%DLQ%g", queues=1)
    assert s.pull(QueueRef("%DLQ%g", 0), 0).messages == []


def test_a_message_id_of_a_private_topic_is_not_found_for_strangers(broker):
    owner = session(broker)
    owner.claim_private("%MQTT%c")
    result = owner.publish([Message(topic="%MQTT%c", body=b"secret")])[0]
    broker.clock_for_tests.advance(0)
    with pytest.raises(MessageNotFound):
        session(broker).query_by_id(result.msg_id)
    assert owner.query_by_id(result.msg_id).body == b"secret"


def test_subscribe_checks_the_topic_as_a_filter_and_the_group(broker):
    gate = PolicyGate((Action.SUB, "Group:other-team"))
    s = session(broker, gate)
    s.subscribe("mine", "orders", RecordingSink(), client_id="c1")
    assert (ANONYMOUS.name, Action.SUB, "Topic:orders/#", "127.0.0.1") in gate.asked
    with pytest.raises(NotAuthorized):
        s.subscribe("other-team", "orders", RecordingSink(), client_id="c1")


def test_system_principal_bypasses_the_gate(broker):
    gate = PolicyGate((Action.CREATE, "Topic:t"))
    system = CoreSession(broker, gate, SYSTEM)
    system.create_topic("t")
    assert gate.asked == []
    assert Resource.topic("t") == Resource.topic("t")


def test_get_and_ack_go_through_the_session_and_check_the_group(broker):
    gate = PolicyGate((Action.SUB, "Group:theirs"))
    s = session(broker, gate)
    assert s.get("mine", "jobs", auto_ack=False) is None  # joins the group (starts at latest)
    s.publish([Message(topic="jobs", body=b"job-1")])
    broker.clock_for_tests.advance(0)
    got = s.get("mine", "jobs", auto_ack=False)
    assert got.message.body == b"job-1"
    s.ack("mine", got.receipt)
    assert s.get("mine", "jobs", auto_ack=False) is None
    with pytest.raises(NotAuthorized):
        s.get("theirs", "jobs", auto_ack=True)


def test_a_session_reading_its_own_private_queue_does_not_ask_the_gate_about_it(broker):
    gate = PolicyGate()
    s = session(broker, gate)
    s.claim_private("%MQTT%me")
    s.own("%MQTT%me-group", own_queue=True)
    s.subscribe("%MQTT%me-group", "%MQTT%me", RecordingSink(), client_id="me")
    s.pull(QueueRef("%MQTT%me", 0), 0)
    assert [r for _, _, r, _ in gate.asked if "%MQTT%" in r] == []


def test_a_shared_private_queue_the_session_may_use_is_still_put_to_the_gate(broker):
    """An AMQP queue: the connection may reach it, but consuming is a Sub decision every time."""
    gate = PolicyGate((Action.SUB, "Topic:%AMQP%jobs/#"))
    system_session(broker, gate, "amqp").claim_private("%AMQP%jobs")
    s = session(broker, gate)
    s.own("%AMQP%jobs")
    with pytest.raises(NotAuthorized):
        s.subscribe("%AMQP%jobs", "%AMQP%jobs", RecordingSink(), client_id="c")
