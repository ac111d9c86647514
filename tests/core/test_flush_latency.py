"""Sync flush at low rate: an idle flusher starts the fsync for the first record in the reactor turn that appended it
(a zero-delay call: no timer, no batching window), and what the fsync covers (acknowledgements, visibility) is
released in the reactor turn that learns it finished.

In Twisted's reactor a zero-delay call made while handling a poll's events runs right after them, before the next
poll; one made while handling a thread's result (`callFromThread`) runs in the same `runUntilCurrent`. With a
MemoryReactorClock both are `clock.advance(0)`, so "no clock.advance" below means "in the same turn" and
"advance(0)" means "at the end of this turn, no time passing".

The fsync thread is a fake executor: the work runs when submitted (an fsync covers what was written before it
started) and its result arrives only when the test says the thread finished, as `callFromThread` would deliver it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.core.broker import Broker, BrokerConfig
from tidegate.core.flush import Durability
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.memory import MemoryMessageStore, MemoryMetadataStore


class FsyncedStore(MemoryMessageStore):
    """A store whose durable offset moves only when an fsync returns, to what was written when it started."""

    def __init__(self) -> None:
        super().__init__()
        self.proven = 0

    @property
    def durable_offset(self) -> int:
        return self.proven


class FakeFsyncThread:
    """`run_in_thread` for `store.sync` whose jobs finish only when `finish()` is called (oldest first)."""

    def __init__(self, store: FsyncedStore) -> None:
        self.store = store
        self.running: list[tuple[int, Callable[[], int], Deferred[int]]] = []
        self.started = 0

    def __call__(self, work: Callable[[], int]) -> Deferred[int]:
        self.started += 1
        done: Deferred[int] = Deferred()
        self.running.append((self.store.end_offset, work, done))  # an fsync covers what was written before it
        return done

    def finish(self) -> None:
        covered, work, done = self.running.pop(0)
        work()
        self.store.proven = max(self.store.proven, covered)
        done.callback(covered)


def setup() -> tuple[MemoryReactorClock, FsyncedStore, FakeFsyncThread]:
    store = FsyncedStore()
    return MemoryReactorClock(), store, FakeFsyncThread(store)


def append(store: MemoryMessageStore) -> int:
    result = store.append(Message("t", b"x"), [QueueRef("t", 0)])
    return result.commit_offset + result.size


def zero_delay_only(clock: MemoryReactorClock) -> bool:
    return all(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls())


def test_an_idle_flusher_starts_the_fsync_for_the_first_record_at_the_end_of_its_turn_without_a_timer():
    clock, store, thread = setup()
    durability = Durability(store, clock, run_in_thread=thread)
    durability.when_durable(append(store), lambda: None)
    assert thread.started == 0 and len(clock.getDelayedCalls()) == 1 and zero_delay_only(clock)
    clock.advance(0)  # the end of the append's turn: no time passes
    assert thread.started == 1
    assert clock.getDelayedCalls() == []


def test_the_ack_is_released_in_the_same_turn_the_fsync_completes():
    clock, store, thread = setup()
    durability = Durability(store, clock, run_in_thread=thread)
    durable_seen: list[int] = []
    durability.on_durable(durable_seen.append)
    acked: list[str] = []
    end = append(store)
    durability.when_durable(end, lambda: acked.append("m1"))
    clock.advance(0)
    assert acked == []
    thread.finish()
    assert acked == ["m1"] and durable_seen == [end]  # no clock.advance between the fsync's end and the ack
    assert clock.getDelayedCalls() == []


def test_appends_during_an_fsync_share_the_next_one_which_starts_in_the_turn_the_first_finishes():
    clock, store, thread = setup()
    durability = Durability(store, clock, run_in_thread=thread)
    acked: list[int] = []
    durability.when_durable(append(store), lambda: acked.append(1))
    clock.advance(0)
    for n in (2, 3, 4):  # arrive while the first fsync runs: group commit, not an fsync each
        durability.when_durable(append(store), lambda n=n: acked.append(n))
        clock.advance(0)
    assert thread.started == 1
    thread.finish()
    assert acked == [1] and zero_delay_only(clock)  # the next fsync is due in the same runUntilCurrent
    clock.advance(0)
    assert thread.started == 2
    thread.finish()
    assert acked == [1, 2, 3, 4] and thread.started == 2


def test_a_publish_on_an_idle_broker_is_made_visible_and_delivered_in_the_turn_its_fsync_completes():
    """Core level: the visibility listener runs when the fsync completes; the delivery pump it wakes is a zero-delay
    call, which Twisted's reactor runs in the same runUntilCurrent as the thread's result (no extra poll)."""
    from tidegate.core.testing import RecordingSink

    clock, store, thread = setup()
    durability = Durability(store, clock, run_in_thread=thread)
    broker = Broker(store, MemoryMetadataStore(), clock, durability, BrokerConfig())
    broker.create_topic("t", queues=1)
    sink = RecordingSink()
    broker.subscribe("g", "t", sink, client_id="c").grant(10)
    clock.advance(0)
    [result] = broker.publish([Message("t", b"hello")])
    clock.advance(0)
    assert thread.started == 1 and sink.bodies == []
    acked: list[bool] = []
    broker.when_durable(result.commit_end, lambda: acked.append(True))
    thread.finish()
    assert acked == [True]
    clock.advance(0)  # the zero-delay pump the fsync's listener woke: no time passes
    assert sink.bodies == [b"hello"]


def test_an_mqtt_qos1_publish_gets_its_puback_in_the_turn_its_fsync_completes():
    from tidegate.adapters.mqtt.codec import Connect, MqttCodec
    from tidegate.adapters.mqtt.packets import Puback, Publish
    from tidegate.adapters.mqtt.server import MqttServerFactory
    from tidegate.adapters.mqtt.settings import MqttSettings
    from tidegate.core.security import AllowAllGate

    clock, store, thread = setup()
    durability = Durability(store, clock, run_in_thread=thread)
    broker = Broker(store, MemoryMetadataStore(), clock, durability, BrokerConfig())
    factory = MqttServerFactory(broker, AllowAllGate(), clock, MqttSettings(sys_interval=0))
    protocol = factory.buildProtocol(("127.0.0.1", 40001))
    transport = StringTransport()
    protocol.makeConnection(transport)
    codec = MqttCodec(server_side=False)
    codec.protocol_level = 4
    protocol.dataReceived(codec.encode(Connect("pub", protocol_level=4, clean_start=True)))
    codec.receive_data(transport.value())
    transport.clear()
    protocol.dataReceived(codec.encode(Publish("a/b", b"payload", 1, packet_id=7)))
    clock.advance(0)
    assert thread.started == 1  # the fsync began at the end of the PUBLISH's turn
    assert codec.receive_data(transport.value()) == []
    thread.finish()
    assert codec.receive_data(transport.value()) == [Puback(7)]  # written by the callback, no clock.advance
    protocol.connectionLost(None)
