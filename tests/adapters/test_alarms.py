"""Resource alarms (core/alarms.py) in the adapters: the shared part in adapters/base.py (reading paused by reason,
the keepalive check suspended while not read, the factory telling connections that published) and how MQTT,
native and AMQP connections act on it. Protocol tests with StringTransport and MemoryReactorClock."""

from __future__ import annotations

from pamqp import commands
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.amqp.connection import THROTTLE
from tidegate.adapters.base import ALARM, AdapterConnection, AdapterFactory, _reading_control
from tidegate.adapters.mqtt.codec import Pingreq, Pingresp, Puback, Publish, Suback, Subscribe, TopicSubscription
from tidegate.adapters.mqtt.properties import Properties
from tidegate.adapters.native import frames as f
from tidegate.adapters.native.server import IDLE_INTERVALS, NativeServerFactory, NativeSettings
from tidegate.core.model import Message
from tidegate.core.security import AllowAllGate
from tidegate.core.security.limits import Limiter, LimitSettings
from tidegate.core.testing import make_broker

from ..amqp.protocol_helpers import World
from ..mqtt.conftest import Env
from ..native.test_native_server import Peer

Connection, Queue, Basic = commands.Connection, commands.Queue, commands.Basic


# ---------------------------------------------------------------------------------------------- the shared part
class PublishingLines(AdapterConnection):
    """A toy protocol: every line `PUB x` is a publish, anything else a consumer's request; each is echoed."""

    def bytes_received(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            if not line:
                continue
            if line.startswith(b"PUB ") and (not self.has_published or self.factory.alarmed):
                self.publish_seen()
            self.write(b"ok " + line + b"\n")


class PublishingLinesFactory(AdapterFactory):
    protocol = PublishingLines
    protocol_label = "lines"


def _lines():
    clock = MemoryReactorClock()
    broker = make_broker(clock)
    factory = PublishingLinesFactory(broker, AllowAllGate(), clock, None)
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport, clock, broker, factory


def test_reading_resumes_only_when_every_reason_is_lifted():
    connection, transport, *_ = _lines()
    connection.pause_reading(ALARM)
    connection.pause_reading("throttle")
    assert transport.producerState == "paused"
    connection.resume_reading(ALARM)
    assert transport.producerState == "paused" and connection.reading_paused_for("throttle")
    connection.resume_reading(ALARM)  # lifting a reason twice changes nothing
    connection.resume_reading("throttle")
    assert transport.producerState == "producing" and not connection.reading_paused


def test_output_back_pressure_and_paused_reading_are_independent():
    connection, transport, *_ = _lines()
    connection.pause_reading(ALARM)
    connection.pauseProducing()  # the transport's buffer is full: our output stops
    connection.resumeProducing()  # drained: output goes on, the reading stays paused
    assert not connection.paused and transport.producerState == "paused"


def test_the_idle_check_spares_a_connection_we_do_not_read_and_counts_again_from_the_resume():
    connection, transport, clock, *_ = _lines()
    connection.start_idle_timer(10)
    connection.pause_reading(ALARM)
    clock.advance(100)  # the client's keepalives wait unread in the socket
    assert not transport.disconnecting
    connection.resume_reading(ALARM)
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(11)  # silent for the whole limit after the resume: now it is judged idle
    assert transport.disconnecting


def test_reading_control_reaches_the_transport_under_a_wrapper_without_one():
    class Wrapper:  # like autobahn's WebSocket protocol around the TCP transport: no pauseProducing of its own
        def __init__(self, transport):
            self.transport = transport

    tcp = StringTransport()
    _reading_control(Wrapper(tcp), "pauseProducing")()
    assert tcp.producerState == "paused"
    assert _reading_control(object(), "pauseProducing") is None


def test_only_connections_that_published_are_blocked_and_the_clear_resumes_them():
    publisher, publisher_transport, _, broker, factory = _lines()
    consumer = factory.buildProtocol(None)
    consumer_transport = StringTransport()
    consumer.makeConnection(consumer_transport)
    publisher.dataReceived(b"PUB a\n")
    consumer.dataReceived(b"GET\n")
    assert factory.publishers == {publisher}
    broker.alarms.set("memory", True, "high")
    assert factory.alarmed and "memory" in factory.alarm_reason
    assert publisher_transport.producerState == "paused"  # published before: not read from now on
    assert consumer_transport.producerState == "producing"
    consumer.dataReceived(b"GET\n")  # still read and answered
    assert consumer_transport.value().endswith(b"ok GET\n")
    broker.alarms.set("memory", False)
    assert publisher_transport.producerState == "producing"


def test_a_first_publish_during_an_alarm_is_handled_and_then_nothing_more_is_read():
    connection, transport, _, broker, factory = _lines()
    broker.alarms.set("storage", True, "disk")
    connection.dataReceived(b"PUB a\nGET\n")
    assert transport.value() == b"ok PUB a\nok GET\n"  # the read that held the publish is handled whole
    assert transport.producerState == "paused" and connection in factory.publishers
    broker.alarms.set("storage", False)
    assert transport.producerState == "producing"


def test_a_closed_connection_leaves_the_publishers_and_a_stopped_factory_the_alarms():
    connection, _, _, broker, factory = _lines()
    connection.dataReceived(b"PUB a\n")
    connection.connectionLost()
    assert factory.publishers == set()
    factory.stop()
    broker.alarms.set("memory", True, "high")
    assert not factory.alarmed  # no longer listening


# ---------------------------------------------------------------------------------------------- MQTT
def _mqtt_publish(client, packet_id: int, payload: bytes = b"x") -> None:
    client.send(Publish("t/a", payload, 1, False, False, packet_id, Properties()))


def test_mqtt_publish_during_an_alarm_is_acknowledged_then_the_connection_is_not_read_until_the_clear():
    env = Env()
    client = env.client()
    client.connect("pub")
    env.broker.alarms.set("memory", True, "high")
    assert client.transport.producerState == "producing"  # has not published yet
    _mqtt_publish(client, 1)
    env.pump()
    assert [type(p) for p in client.received()] == [Puback]  # what the read held is stored and acknowledged
    assert client.transport.producerState == "paused"
    env.broker.alarms.set("memory", False)
    assert client.transport.producerState == "producing"


def test_mqtt_a_client_that_published_before_the_alarm_is_not_read_from_the_moment_it_is_raised():
    env = Env()
    client = env.client()
    client.connect("pub")
    _mqtt_publish(client, 1)
    env.pump()
    client.received()
    env.broker.alarms.set("storage", True, "disk")
    assert client.transport.producerState == "paused"  # as RabbitMQ's MQTT plugin: published, so blocked
    env.broker.alarms.set("storage", False)
    assert client.transport.producerState == "producing"


def test_mqtt_subscriber_only_connections_are_read_and_served_during_an_alarm():
    env = Env()
    subscriber = env.client()
    subscriber.connect("sub")
    env.broker.alarms.set("memory", True, "high")
    subscriber.send(Subscribe(1, (TopicSubscription("t/#", 1),)))
    subscriber.send(Pingreq())
    assert [type(p) for p in subscriber.received()] == [Suback, Pingresp]
    assert subscriber.transport.producerState == "producing"


def test_mqtt_keep_alive_is_paused_while_the_connection_is_not_read_and_runs_again_after_the_clear():
    env = Env()
    client = env.client()
    client.connect("pub", keep_alive=10)
    env.broker.alarms.set("memory", True, "high")
    _mqtt_publish(client, 1)
    env.clock.advance(120)  # its PINGREQs wait unread: no keep alive timeout
    assert not client.closed
    env.broker.alarms.set("memory", False)
    env.clock.advance(14)
    assert not client.closed
    env.clock.advance(16)  # 1.5 x keep alive of silence after the clear: the check works again
    assert client.closed


# ---------------------------------------------------------------------------------------------- native
def _native(heartbeat_s: float = 30.0):
    clock = MemoryReactorClock()
    broker = make_broker(clock)
    factory = NativeServerFactory(broker, AllowAllGate(), clock, NativeSettings(heartbeat_s=heartbeat_s))
    return factory, broker, clock


def test_native_send_during_an_alarm_is_answered_then_the_connection_is_not_read_until_the_clear():
    factory, broker, _ = _native()
    producer = Peer(factory)
    producer.request(f.TopicCreate, name="t", queues=1)
    broker.alarms.set("storage", True, "disk")
    ok = producer.request(f.Send, message=Message(topic="t", body=b"during"))
    assert isinstance(ok, f.SendOk)  # the send that was read is stored and answered
    assert producer.transport.producerState == "paused"
    broker.alarms.set("storage", False)
    assert producer.transport.producerState == "producing"
    assert isinstance(producer.request(f.Send, message=Message(topic="t", body=b"after")), f.SendOk)


def test_native_a_producer_that_sent_before_the_alarm_is_not_read_from_the_moment_it_is_raised():
    factory, broker, _ = _native()
    producer = Peer(factory)
    producer.request(f.TopicCreate, name="t", queues=1)
    producer.request(f.SendBatch, messages=(Message(topic="t", body=b"a"),))
    broker.alarms.set("memory", True, "high")
    assert producer.transport.producerState == "paused"
    broker.alarms.set("memory", False)
    assert producer.transport.producerState == "producing"


def test_native_consumers_are_read_and_served_during_an_alarm():
    factory, broker, _ = _native()
    producer = Peer(factory)
    producer.request(f.TopicCreate, name="t", queues=1)
    producer.request(f.Send, message=Message(topic="t", body=b"m"))
    consumer = Peer(factory)
    broker.alarms.set("memory", True, "high")
    pulled = consumer.request(f.Pull, topic="t", queue_id=0, offset=0)
    assert isinstance(pulled, f.PullOk) and [m.message.body for m in pulled.messages] == [b"m"]
    assert consumer.transport.producerState == "producing"


def test_native_heartbeat_check_spares_a_producer_that_is_not_read():
    factory, broker, clock = _native(heartbeat_s=5)
    producer = Peer(factory)
    producer.request(f.TopicCreate, name="t", queues=1)
    broker.alarms.set("memory", True, "high")
    producer.request(f.Send, message=Message(topic="t", body=b"x"))
    clock.advance(10 * IDLE_INTERVALS * 5)
    assert not producer.transport.disconnecting
    broker.alarms.set("memory", False)
    clock.advance(IDLE_INTERVALS * 5 - 1)
    assert not producer.transport.disconnecting
    clock.advance(IDLE_INTERVALS * 5 + 1)  # silent for three intervals after the clear: closed as usual
    assert producer.transport.disconnecting


# ---------------------------------------------------------------------------------------------- AMQP
def throttled_and_alarmed_amqp_publisher():
    """An AMQP client over its publish rate (10/s) that sent 30 publishes while a memory alarm was raised."""
    world = World()
    world.factory.limiter = Limiter(LimitSettings(publish_rate=10), world.clock)
    client = world.client(capabilities={"connection.blocked": True})
    client.open_channel(1)
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    world.broker.alarms.set("memory", True, "high")
    client.raw(b"".join(client.codec.send_content(1, Basic.Publish(exchange="", routing_key="q"),
                                                  Basic.Properties(), b"m%d" % i) for i in range(30)))
    world.turn()
    return world, client


def test_amqp_throttle_and_alarm_each_hold_the_reading_until_both_are_lifted():
    world, client = throttled_and_alarmed_amqp_publisher()
    assert [type(m) for m in client.methods()] == [Connection.Blocked]
    protocol = client.protocol
    assert protocol.reading_paused_for(ALARM) and protocol.reading_paused_for(THROTTLE)
    world.clock.advance(5)  # the publish debt is paid: the throttle lets go, the alarm still holds
    assert not protocol.reading_paused_for(THROTTLE)
    assert client.transport.producerState == "paused"
    world.broker.alarms.set("memory", False)
    assert [type(m) for m in client.methods()] == [Connection.Unblocked]
    assert client.transport.producerState == "producing"


def test_amqp_an_alarm_cleared_during_a_throttle_leaves_the_reading_paused_for_the_throttle():
    world, client = throttled_and_alarmed_amqp_publisher()
    world.broker.alarms.set("memory", False)
    assert client.transport.producerState == "paused"  # still over the publish rate
    world.clock.advance(5)
    assert client.transport.producerState == "producing"


def test_amqp_factory_tells_only_connections_that_published():
    world = World()
    consumer = world.client(capabilities={"connection.blocked": True})
    publisher = world.client(capabilities={"connection.blocked": True})
    publisher.open_channel(1)
    publisher.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    publisher.publish(1, "", "q", b"x")
    assert world.factory.publishers == {publisher.protocol}
    world.broker.alarms.set("memory", True, "high")
    assert [type(m) for m in publisher.methods()] == [Connection.Blocked]
    assert consumer.methods() == []
