"""Reactor iterations per message at low rate (core/delivery.py `run_woken`, `new_work`; core/flush.py order):

- the deliveries an fsync releases are pumped in the turn that learned of the fsync, not in a zero-delay call of
  the next reactor iteration, and they leave before the publishers' acknowledgements;
- credit coming back to a MESSAGE-mode member that had handed out everything visible schedules no (empty) pump;
- that shortcut never strands a message: new messages, redeliveries and credit restored after the adapter took it
  away all still reach the member.

The broker is the in-memory one of core/testing.py on a MemoryReactorClock (sync flush, fsync in `_start_flush`):
`clock.advance(0)` is one reactor iteration's timed calls.
"""

from __future__ import annotations

import logging

import pytest

from tidegate.core.model import Message
from tidegate.core.testing import RecordingSink


def subscribe(broker, sink, credit: int = 10):
    broker.create_topic("t", queues=1)
    sub = broker.subscribe("g", "t", sink, client_id="c", ack="message", invisible_ms=0, start="earliest")
    sub.grant(credit)
    return sub


def publish(broker, body: bytes, on_durable=None) -> None:
    result = broker.publish([Message(topic="t", body=body)])[0]
    if on_durable is not None:
        broker.when_durable(result.commit_end, on_durable)


def pending_calls(clock) -> list[str]:
    """The flush and pump calls scheduled (other timers, such as the offsets' flush, are not this test's)."""
    return [call.func.__name__ for call in clock.getDelayedCalls()
            if call.active() and call.func.__name__ in ("_start_flush", "_run_wakes")]


def test_a_message_is_delivered_in_the_iteration_its_fsync_completes(broker, clock):
    sink = RecordingSink()
    subscribe(broker, sink)
    clock.advance(0)  # the first pump of the new member (nothing to deliver yet)
    publish(broker, b"a")
    assert pending_calls(clock) == ["_start_flush"]
    clock.advance(0)  # one iteration: fsync, visibility, pump
    assert sink.bodies == [b"a"]
    assert pending_calls(clock) == []  # no zero-delay pump left for a next iteration


def test_the_delivery_leaves_before_the_publishers_acknowledgement(broker, clock):
    events: list[str] = []

    class OrderSink(RecordingSink):
        def deliver(self, deliveries):
            events.append("deliver")
            super().deliver(deliveries)

    subscribe(broker, OrderSink())
    clock.advance(0)
    publish(broker, b"a", on_durable=lambda: events.append("ack"))
    clock.advance(0)
    assert events == ["deliver", "ack"]


def test_credit_back_to_a_drained_member_schedules_no_pump(broker, clock):
    sink = RecordingSink()
    sub = subscribe(broker, sink)
    clock.advance(0)
    publish(broker, b"a")
    clock.advance(0)
    sub.ack_delivered(sink.delivered)
    sub.grant(1)  # the PUBACK's credit: nothing is waiting
    assert pending_calls(clock) == []
    publish(broker, b"b")  # and the next message still goes out in its fsync's iteration
    clock.advance(0)
    assert sink.bodies == [b"a", b"b"]


def test_credit_back_to_a_member_that_ran_out_of_credit_pumps_what_waits(broker, clock):
    sink = RecordingSink()
    sub = subscribe(broker, sink, credit=1)
    clock.advance(0)
    publish(broker, b"a")
    publish(broker, b"b")
    clock.advance(0)
    assert sink.bodies == [b"a"]  # credit spent: not drained
    sub.ack_delivered(sink.delivered)
    sub.grant(1)
    clock.advance(0)
    assert sink.bodies == [b"a", b"b"]


def test_messages_that_grew_while_credit_was_taken_away_go_out_when_credit_returns(broker, clock):
    """An adapter may set a subscription's credit to 0 (AMQP flow, a paused native consumer): visibility does not
    pump it then, but must still note the new work, or the credit restored later would find it "drained"."""
    sink = RecordingSink()
    sub = subscribe(broker, sink)
    clock.advance(0)
    publish(broker, b"a")
    clock.advance(0)
    held, sub.credit = sub.credit, 0
    publish(broker, b"b")
    clock.advance(0)
    assert sink.bodies == [b"a"]
    sub.grant(held)
    clock.advance(0)
    assert sink.bodies == [b"a", b"b"]


def test_a_nacked_message_is_redelivered_to_a_drained_member(broker, clock):
    sink = RecordingSink()
    sub = subscribe(broker, sink)
    clock.advance(0)
    publish(broker, b"a")
    clock.advance(0)
    sub.nack(sink.delivered[0].receipt, requeue=True)
    clock.advance(0)
    assert [(d.message.body, d.attempt) for d in sink.delivered] == [(b"a", 1), (b"a", 2)]


def test_a_second_member_joining_is_pumped_for_what_waits(broker, clock):
    """Assignment changes count as new work too (a drained member's queues may change)."""
    first = RecordingSink()
    subscribe(broker, first)
    clock.advance(0)
    publish(broker, b"a")
    clock.advance(0)
    second = RecordingSink()
    other = broker.subscribe("g2", "t", second, client_id="d", ack="message", invisible_ms=0, start="earliest")
    other.grant(5)
    clock.advance(0)
    assert second.bodies == [b"a"]


def test_a_failing_pump_after_an_fsync_is_logged_and_the_acknowledgements_still_go_out(broker, clock, caplog):
    class BrokenSink(RecordingSink):
        def deliver(self, deliveries):
            raise RuntimeError("sink bug")

    subscribe(broker, BrokenSink())
    clock.advance(0)
    acked: list[bool] = []
    publish(broker, b"a", on_durable=lambda: acked.append(True))
    with caplog.at_level(logging.ERROR, logger="tidegate.broker"):
        clock.advance(0)
    assert acked == [True]
    assert "delivery pump after an fsync failed" in caplog.text


@pytest.mark.parametrize("credit", [0, 3])
def test_new_work_pumps_only_members_with_credit(broker, clock, credit):
    sink = RecordingSink()
    sub = subscribe(broker, sink, credit=credit)
    clock.advance(0)
    publish(broker, b"a")
    clock.advance(0)
    assert sink.bodies == ([b"a"] if credit else [])
    assert sub.credit == max(0, credit - 1)


def test_a_sink_that_hands_credit_back_inside_deliver_gets_a_backlog_larger_than_its_credit(broker, clock):
    """Like MQTT QoS 0: the credit comes back inside `deliver`, so the credit left after a pump says nothing about
    whether the queue was read to its end; a member that spent its whole budget is not "drained"."""

    class AutoAckSink(RecordingSink):
        sub = None

        def deliver(self, deliveries):
            super().deliver(deliveries)
            self.sub.ack_delivered(deliveries)
            self.sub.grant(len(deliveries))

    sink = AutoAckSink()
    sink.sub = subscribe(broker, sink, credit=4)
    clock.advance(0)  # the first pump finds nothing
    bodies = [str(i).encode() for i in range(40)]
    broker.publish([Message(topic="t", body=b) for b in bodies])
    for _ in range(20):
        clock.advance(0)
    assert sink.bodies == bodies
