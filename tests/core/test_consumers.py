"""A Subscription talks to delivery only through the SubscriptionOwner interface."""

import pytest

from tidegate.core.api import AckMode, ConsumeMode
from tidegate.core.consumers import GroupState, Subscription, SubscriptionOwner, allocate_averagely
from tidegate.core.errors import TidegateError
from tidegate.core.filters import parse_tag_filter
from tidegate.core.model import QueueRef
from tidegate.core.testing import RecordingSink


class RecordingOwner:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def wake(self, sub):
        self.calls.append(("wake", sub))

    def ack(self, sub, receipt):
        self.calls.append(("ack", sub, receipt))

    def nack(self, sub, receipt, requeue, delay_ms):
        self.calls.append(("nack", sub, receipt, requeue, delay_ms))

    def commit(self, sub, queue, offset):
        self.calls.append(("commit", sub, queue, offset))

    def detach(self, sub):
        self.calls.append(("detach", sub))


def make_sub(owner: SubscriptionOwner, mode=ConsumeMode.CLUSTERING) -> Subscription:
    state = GroupState("g", mode, AckMode.MESSAGE)
    return Subscription(owner, state, "t", RecordingSink(), "client", "client#1", parse_tag_filter("*"), 0, 3)


def test_subscription_forwards_each_action_to_its_owner():
    owner = RecordingOwner()
    sub = make_sub(owner)
    q = QueueRef("t", 0)
    sub.grant(0)  # no credit, no wake-up
    sub.grant(2)
    sub.ack("r1")
    sub.nack("r2", requeue=False, delay_ms=5)
    sub.commit(q, 7)
    sub.close()
    sub.close()  # once only
    sub.grant(1)  # closed: credit is kept but nobody is woken
    assert owner.calls == [("wake", sub), ("ack", sub, "r1"), ("nack", sub, "r2", False, 5),
                           ("commit", sub, q, 7), ("detach", sub)]
    with pytest.raises(TidegateError):
        sub.grant(-1)


def test_progress_key_is_per_member_when_broadcasting():
    assert make_sub(RecordingOwner()).progress_key == "g"
    assert make_sub(RecordingOwner(), ConsumeMode.BROADCASTING).progress_key == "g@client"


def test_allocate_averagely_gives_contiguous_blocks_first_members_one_more():
    queues = [QueueRef("t", i) for i in range(5)]
    plan = allocate_averagely(queues, ["a", "b"])
    assert plan == {"a": queues[:3], "b": queues[3:]}
    assert allocate_averagely(queues, []) == {}
