"""Regression tests for the native-port and naming findings of issue 9 ("Found on today's build"): each failed on
the build it was found on. SUBSCRIBE client ids from the frame, guessable message ids, forged adapter properties
from native and AMQP publishers, and names too long for the store once escaped."""

from __future__ import annotations

from pathlib import Path

import pytest
from pamqp import commands
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.amqp.model import message_from_publish as amqp_message
from tidegate.adapters.mqtt.mapping import PROP_PUBLISHER, session_topic, share_group
from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import NativeCodec, Role, encode_frame
from tidegate.adapters.native.errors import ErrorCode
from tidegate.adapters.native.server import NativeServerFactory, NativeSettings
from tidegate.adapters.reserved_properties import is_reserved_property
from tidegate.core.errors import InvalidName, NotAuthorized
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef
from tidegate.core.security.gate import ALLOW, Action, AllowAllGate, Decision, Principal
from tidegate.core.session import CoreSession
from tidegate.core.storage.filestore import FileMessageStore
from tidegate.core.storage.layout import _escape_topic
from tidegate.core.testing import RecordingSink, make_broker
from tidegate.core.topics import MAX_ENCODED_TOPIC_BYTES, encoded_topic_length


class DenyGate(AllowAllGate):
    def __init__(self, *denied: tuple[Action, str]) -> None:
        self.denied = set(denied)

    def check(self, principal, action, resource, source):
        return Decision(False, "test") if (action, str(resource)) in self.denied else ALLOW


class Peer:
    """One native connection over StringTransport: HELLO with `client_id`, then request/answer."""

    def __init__(self, factory: NativeServerFactory, client_id: str) -> None:
        self.factory = factory
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(self.transport)
        self.codec = NativeCodec(Role.CLIENT)
        self.next_id = 1
        self.pushes: list[f.Frame] = []
        assert isinstance(self.request(f.Hello, client_id=client_id), f.HelloOk)

    def request(self, cls: type[f.Frame], **fields) -> f.Frame:
        self.next_id += 1
        self.protocol.dataReceived(encode_frame(cls(request_id=self.next_id, **fields)))
        self.factory.clock.advance(0)
        frames = self.codec.receive_data(self.transport.value())
        self.transport.clear()
        answers = [x for x in frames if x.request_id == self.next_id]
        self.pushes += [x for x in frames if x.request_id != self.next_id]
        assert len(answers) == 1, frames
        return answers[0]


def native_factory(broker=None, gate=None) -> NativeServerFactory:
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    return NativeServerFactory(broker or make_broker(clock), gate or AllowAllGate(), clock,
                               NativeSettings(max_frame=64 * 1024, heartbeat_s=10.0), metrics=CoreMetrics())


# ------------------------------------------------------------------------------------ 2. client ids, message ids
def test_native_subscribe_uses_the_hello_client_id_not_the_frames():
    """A SUBSCRIBE naming another member's client id (a broadcasting member's offsets are keyed by it) acts as
    the connection's own HELLO client id."""
    factory = native_factory()
    factory.core.create_topic("news", queues=1)
    peer = Peer(factory, "mallory")
    ok = peer.request(f.Subscribe, group="readers", topic="news", client_id="victim", credit=1,
                      mode=f.Mode.BROADCASTING)
    assert isinstance(ok, f.SubscribeOk)
    assert factory.core.group_info("readers").members == ["mallory"]


def test_query_by_id_checks_the_topic_of_what_it_finds():
    """Message ids are guessable (commit offset + store second): finding one is a Get on its topic."""
    factory = native_factory(gate=DenyGate((Action.GET, "Topic:payroll/march")))
    factory.system.publish([Message(topic="payroll", subject="march", body=b"salaries")])
    factory.clock.advance(0)
    msg_id = factory.core.list_by_time("payroll", 0, 2**62)[0].msg_id
    answer = Peer(factory, "mallory").request(f.QueryById, msg_id=msg_id)
    assert isinstance(answer, f.Error) and answer.code == ErrorCode.NOT_AUTHORIZED


# ------------------------------------------------------------------------------------ 6. forged properties
def test_native_publishers_cannot_set_adapter_properties():
    factory = native_factory()
    factory.core.create_topic("chat", queues=1)
    peer = Peer(factory, "forger")
    props = {PROP_PUBLISHER: "victim", "mqtt-retain": "1", "amqp-properties": "AAAA", "color": "blue"}
    for frame, fields in ((f.Send, {"queue_id": 0, "message": Message(topic="chat", body=b"one",
                                                                       properties=dict(props))}),
                          (f.SendBatch, {"queue_id": 0, "messages": [Message(topic="chat", body=b"two",
                                                                              properties=dict(props))]})):
        assert not isinstance(peer.request(frame, **fields), f.Error)
    stored = factory.core.pull(QueueRef("chat", 0), 0, 10).messages
    assert [d.message.properties for d in stored] == [{"color": "blue"}, {"color": "blue"}]


def test_amqp_headers_cannot_set_adapter_properties():
    headers = {PROP_PUBLISHER: "victim", "amqp-properties": "AAAA", "mqtt-retain": "1", "color": "blue"}
    message = amqp_message("chat", "", commands.Basic.Properties(headers=headers), b"", b"x", 0)
    assert message.properties.get("color") == "blue"
    assert PROP_PUBLISHER not in message.properties and "mqtt-retain" not in message.properties
    assert message.properties.get("amqp-properties") != "AAAA"  # only the adapter's own copy, if any


def test_reserved_property_names_cover_every_mqtt_bookkeeping_property():
    from tidegate.adapters.mqtt import mapping

    owned = {mapping.PROP_PUBLISHER, mapping.PROP_RETAIN, mapping.PROP_PAYLOAD_FORMAT,
             mapping.PROP_CORRELATION_ENCODING}
    assert all(is_reserved_property(name) for name in owned)
    assert is_reserved_property("amqp-properties") and not is_reserved_property("content-type")


# ------------------------------------------------------------------------------------ 8. long names
def test_the_encoded_length_is_the_stores_directory_name():
    for name in ("%" * 90, ".hidden", "..", "a%b", "plain"):
        assert encoded_topic_length(name) == len(_escape_topic(name))


@pytest.fixture
def file_broker(tmp_path: Path):
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    store = FileMessageStore(tmp_path / "data", clock_ms=lambda: int(clock.seconds() * 1000))
    broker = make_broker(clock, store=store)
    yield broker
    broker.close()


@pytest.mark.parametrize("request_type", ["create", "send"])
def test_a_topic_too_long_for_the_store_is_refused_cleanly_and_leaves_nothing(file_broker, tmp_path, request_type):
    """90 `%` pass the 127-character rule but escape to 270 bytes: INVALID_NAME, never ENAMETOOLONG as an
    internal error, and no empty topic left behind."""
    factory = native_factory(broker=file_broker)
    peer = Peer(factory, "c")
    name = "%" * 90
    if request_type == "create":
        answer = peer.request(f.TopicCreate, name=name, queues=1)
    else:
        answer = peer.request(f.Send, queue_id=-1, message=Message(topic=name, body=b"x"))
    assert isinstance(answer, f.Error) and answer.code == ErrorCode.INVALID_NAME, answer
    assert [t.name for t in file_broker.list_topics(include_internal=True)] == []
    assert list((tmp_path / "data" / "index").iterdir()) == []
    fits = "%" * (MAX_ENCODED_TOPIC_BYTES // 3)
    assert not isinstance(peer.request(f.TopicCreate, name=fits, queues=1), f.Error)
    file_broker.publish([Message(topic=fits, body=b"x")])  # the store can name its directory


def test_a_group_whose_dead_letter_topic_cannot_exist_is_refused(file_broker):
    factory = native_factory(broker=file_broker)
    file_broker.create_topic("jobs", queues=1)
    peer = Peer(factory, "c")
    answer = peer.request(f.Subscribe, group="%" * 120, topic="jobs", credit=1, ack=f.Ack.MESSAGE)
    assert isinstance(answer, f.Error) and answer.code == ErrorCode.INVALID_NAME
    with pytest.raises(InvalidName):
        file_broker.subscribe("%" * 120, "jobs", RecordingSink(), client_id="c")


def test_adapter_made_names_always_fit_the_store():
    """MQTT session and share-group names and AMQP queue and exchange topics (hashed when long) never exceed the
    store's limit, whatever the client chose: only native clients name core topics directly."""
    from tidegate.adapters.amqp.model import exchange_topic, queue_topic

    for client_id in ("%" * 65535, "é" * 1000, "/" * 300, "%" * 42, ""):
        for name in (session_topic(client_id), share_group(client_id), queue_topic(client_id or "q"),
                     exchange_topic(client_id or "x")):
            assert encoded_topic_length(name) <= MAX_ENCODED_TOPIC_BYTES, name
            assert encoded_topic_length(f"%DLQ%{name}"[:127]) <= MAX_ENCODED_TOPIC_BYTES, name
        assert encoded_topic_length(session_topic(client_id)) <= MAX_ENCODED_TOPIC_BYTES
        assert encoded_topic_length(f"%DLQ%{session_topic(client_id)}"[:127]) <= MAX_ENCODED_TOPIC_BYTES
        assert encoded_topic_length(share_group(client_id)) <= MAX_ENCODED_TOPIC_BYTES


def test_a_native_client_cannot_reach_mqtt_share_groups():
    factory = native_factory()
    factory.core.create_topic("t", queues=1)
    session = CoreSession(factory.core, AllowAllGate(), Principal("mallory"))
    with pytest.raises(NotAuthorized):
        session.subscribe(share_group("g"), "t", RecordingSink(), client_id="x")
