"""Delivery before ingest (adapters/base.py, core/delivery.py `wakes_pending`/`when_drained`): a connection whose
read held a publish is not read again while deliveries are due (a woken subscription with credit), is read again
once the pumps have run, and never longer than the bound; subscribers without credit do not hold publishers.
Deterministic: MemoryReactorClock, StringTransport, in-memory broker."""

from __future__ import annotations

from pamqp import commands
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.base import (
    ALARM,
    DELIVERY,
    MAX_READ_BYTES,
    MIN_READ_BYTES,
    AdapterConnection,
    AdapterFactory,
)
from tidegate.adapters.mqtt.codec import Publish
from tidegate.adapters.mqtt.properties import Properties
from tidegate.adapters.native import frames as f
from tidegate.adapters.native.server import NativeServerFactory, NativeSettings
from tidegate.core.model import Message
from tidegate.core.security import AllowAllGate
from tidegate.core.testing import RecordingSink, make_broker

from ..amqp.protocol_helpers import World
from ..mqtt.conftest import Env
from ..native.test_native_server import Peer

Queue, Basic = commands.Queue, commands.Basic


class PublishingLines(AdapterConnection):
    """A toy protocol: every line `PUB x` publishes x to topic "t" (as the adapters' publish paths do, it marks the
    read), anything else is a consumer's request; each line is echoed."""

    def bytes_received(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            if not line:
                continue
            if line.startswith(b"PUB "):
                self.published_this_read = True
                if not self.has_published or self.factory.alarmed:
                    self.publish_seen()
                self.factory.core.publish([Message(topic="t", body=line[4:])])
            self.write(b"ok " + line + b"\n")


class PublishingLinesFactory(AdapterFactory):
    protocol = PublishingLines
    protocol_label = "lines"


# A full read (at least MIN_READ_BYTES): only those are held, the client sends faster than it is read
FILLER = b"#" * MIN_READ_BYTES + b"\n"


def _world(credit: int = 100):
    """A publisher connection and a subscription on "t" with `credit` (async flush: a publish is visible, and its
    subscribers woken, in the read that made it, as a sync flush's fsync completion does in its turn)."""
    clock = MemoryReactorClock()
    broker = make_broker(clock, flush="async")
    broker.create_topic("t", queues=1)
    sink = RecordingSink()
    sub = broker.subscribe("g", "t", sink, client_id="c", start="earliest")
    if credit:
        sub.grant(credit)
    clock.advance(0)
    factory = PublishingLinesFactory(broker, AllowAllGate(), clock, None)
    publisher = factory.buildProtocol(None)
    transport = StringTransport()
    publisher.makeConnection(transport)
    return publisher, transport, clock, broker, sink, sub


def test_a_publisher_is_not_read_while_a_subscriber_with_credit_waits_and_is_read_once_the_pump_ran():
    publisher, transport, clock, broker, sink, _ = _world()
    publisher.dataReceived(b"PUB a\nPUB b\n" + FILLER)
    assert transport.value().startswith(b"ok PUB a\nok PUB b\n")  # what the read held is handled whole
    assert broker.deliveries_due() and sink.bodies == []
    assert transport.producerState == "paused" and publisher.reading_paused_for(DELIVERY)
    clock.advance(0)  # the wake round: the subscriber gets both, then the publisher is read again
    assert sink.bodies == [b"a", b"b"]
    assert not broker.deliveries_due()
    assert transport.producerState == "producing" and not publisher.reading_paused


def test_a_held_publisher_reads_the_default_size_again():
    """A grown read (up to MAX_READ_BYTES of small publishes) is ingested whole: a held publisher goes back to
    MIN_READ_BYTES so what it adds between two delivery rounds stays small."""
    publisher, transport, clock, broker, sink, _ = _world()
    transport.bufferSize = MAX_READ_BYTES  # as `_adapt_read_size` grows a plain TCP transport's reads
    publisher._reads_grown = True
    publisher.dataReceived(b"PUB a\n" + FILLER)
    assert transport.producerState == "paused"
    assert transport.bufferSize == MIN_READ_BYTES and not publisher._reads_grown


def test_a_subscriber_without_credit_does_not_hold_publishers():
    publisher, transport, clock, broker, sink, _ = _world(credit=0)
    publisher.dataReceived(b"PUB a\n" + FILLER)
    assert not broker.deliveries_due()
    assert transport.producerState == "producing"


def test_a_subscriber_that_used_up_its_credit_no_longer_holds_publishers():
    """Its client does not keep up (an MQTT subscriber whose transport is paused holds its credit back, too)."""
    publisher, transport, clock, broker, sink, _ = _world(credit=1)
    publisher.dataReceived(b"PUB a\nPUB b\n" + FILLER)
    assert transport.producerState == "paused"
    clock.advance(0)
    assert sink.bodies == [b"a"] and transport.producerState == "producing"
    publisher.dataReceived(b"PUB c\n" + FILLER)  # the subscriber has no credit left: nothing is due
    assert transport.producerState == "producing"


def test_a_read_that_is_not_full_is_not_held():
    """A windowed publisher (QoS 1 with a bounded inflight) never fills a read: it is not held, and does not pay
    the extra reactor turn."""
    publisher, transport, clock, broker, sink, _ = _world()
    publisher.dataReceived(b"PUB a\n")
    assert broker.deliveries_due() and transport.producerState == "producing"


def test_a_read_without_a_publish_is_not_held():
    publisher, transport, clock, broker, sink, _ = _world()
    publisher.dataReceived(b"PUB a\n" + FILLER)
    clock.advance(0)
    broker.publish([Message(topic="t", body=b"from elsewhere")])  # a delivery is due now
    publisher.dataReceived(b"GET\n" + FILLER)  # a consumer's request (ack, pull, ...) of the same connection
    assert transport.producerState == "producing"


def test_the_pause_ends_after_a_bounded_number_of_turns_when_a_pump_keeps_waking_itself():
    publisher, transport, clock, broker, sink, sub = _world()
    delivery = broker._delivery
    delivery.max_yield_turns = 2
    reading_at_pump: list[str] = []

    def pump_that_wakes_itself(woken):  # a consumer that never catches up, for 100 pumps
        reading_at_pump.append(transport.producerState)
        if len(reading_at_pump) < 100:
            delivery.wake(woken)

    delivery._pump_offset = pump_that_wakes_itself
    publisher.dataReceived(b"PUB a\n" + FILLER)
    assert transport.producerState == "paused"
    clock.advance(0)
    assert len(reading_at_pump) == 100
    first_read_again = reading_at_pump.index("producing")
    assert 0 < first_read_again < 100  # let go while the pump still went on
    assert transport.producerState == "producing"


def test_the_pause_ends_after_max_yield_seconds_when_a_pump_keeps_waking_itself():
    publisher, transport, clock, broker, sink, sub = _world()
    delivery = broker._delivery
    delivery.max_yield_turns = 1000
    reading_at_pump: list[str] = []

    def slow_pump_that_wakes_itself(woken):
        reading_at_pump.append(transport.producerState)
        clock.rightNow += 0.001  # each pump takes 1 ms of the clock
        if len(reading_at_pump) < 100:
            delivery.wake(woken)

    delivery._pump_offset = slow_pump_that_wakes_itself
    publisher.dataReceived(b"PUB a\n" + FILLER)
    clock.advance(0)
    first_read_again = reading_at_pump.index("producing")
    # released at the end of the turn (16 pumps) in which 50 ms had passed: the fourth turn
    assert delivery.max_yield_seconds == 0.05 and first_read_again == 64


def test_a_connection_lost_while_held_is_let_go_without_errors():
    publisher, transport, clock, broker, sink, _ = _world()
    publisher.dataReceived(b"PUB a\n" + FILLER)
    publisher.connectionLost()
    clock.advance(0)
    assert sink.bodies == [b"a"] and not publisher.reading_paused


def test_closing_the_broker_lets_held_publishers_go():
    publisher, transport, clock, broker, sink, _ = _world()
    publisher.dataReceived(b"PUB a\n" + FILLER)
    broker.close()
    assert transport.producerState == "producing"


def test_the_delivery_reason_and_an_alarm_each_hold_the_reading():
    publisher, transport, clock, broker, sink, _ = _world()
    publisher.dataReceived(b"PUB a\n" + FILLER)
    broker.alarms.set("memory", True, "high")
    clock.advance(0)  # the deliveries ran: only the alarm holds the reading now
    assert publisher.reading_paused_for(ALARM) and not publisher.reading_paused_for(DELIVERY)
    assert transport.producerState == "paused"
    broker.alarms.set("memory", False)
    assert transport.producerState == "producing"


def test_when_drained_calls_back_at_once_when_nothing_is_due():
    _, _, _, broker, _, _ = _world()
    called: list[bool] = []
    broker.when_deliveries_drained(lambda: called.append(True))
    assert called == [True]


# ------------------------------------------------------------------ every adapter's publish path marks the read
def _hold_deliveries(factory):
    """Make deliveries due for `factory`'s connections and collect who waits for them to drain."""
    waiting: list = []
    factory.deliveries_due = lambda: True
    factory.when_deliveries_drained = waiting.append
    return waiting


def test_mqtt_publish_holds_the_reading_while_deliveries_are_due():
    env = Env()
    client = env.client()
    client.connect("pub")
    waiting = _hold_deliveries(env.factory)
    client.send(Publish("t/a", FILLER, 0, False, False, None, Properties()))
    assert client.transport.producerState == "paused" and len(waiting) == 1
    waiting.pop()()
    assert client.transport.producerState == "producing"
    client.send(Publish("t/a", FILLER, 1, False, False, 7, Properties()))  # QoS 1: the other publish path
    assert client.transport.producerState == "paused"


def test_native_send_holds_the_reading_while_deliveries_are_due():
    clock = MemoryReactorClock()
    broker = make_broker(clock)
    factory = NativeServerFactory(broker, AllowAllGate(), clock, NativeSettings())
    producer = Peer(factory)
    producer.request(f.TopicCreate, name="t", queues=1)
    waiting = _hold_deliveries(factory)
    producer.request(f.TopicDescribe, name="t")  # not a publish: read on
    assert producer.transport.producerState == "producing"
    producer.request(f.Send, message=Message(topic="t", body=FILLER))
    assert producer.transport.producerState == "paused" and len(waiting) == 1
    waiting.pop()()
    assert producer.transport.producerState == "producing"


def test_amqp_publish_holds_the_reading_while_deliveries_are_due():
    world = World()
    client = world.client()
    client.open_channel(1)
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    waiting = _hold_deliveries(world.factory)
    client.raw(client.codec.send_content(1, Basic.Publish(exchange="", routing_key="q"), Basic.Properties(), FILLER))
    assert client.transport.producerState == "paused" and len(waiting) == 1
    waiting.pop()()
    assert client.transport.producerState == "producing"
