"""Consumer-side values: subscriptions, group state, per-message progress, receipts, invisibility timers.

Two ways of tracking progress, chosen per group (see core/api.py AckMode):
- OFFSET: each queue is owned by one member (RocketMQ AllocateMessageQueueAveragely); the member reads the queue in
  order from the committed offset and commits offsets. A rebalance hands a queue to another member, which resumes at
  the committed offset: committed messages are never delivered again, uncommitted ones may be (at least once).
- MESSAGE (RocketMQ 5 "pop"): every member may take any message; each delivery is in flight until acked, and comes
  back after the invisibility timeout, a nack, or when its consumer leaves. The committed offset is the lowest
  offset not yet acked. After `max_attempts` deliveries a message goes to the group's dead-letter topic.
Broadcasting gives every member its own progress (its own offsets, its own in-flight set).

The logic that moves these values lives in core/delivery.py; a Subscription reaches it only through the narrow
`SubscriptionOwner` interface below.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from tidegate.core.api import AckMode, ConsumeMode, Delivered, DeliverySink
from tidegate.core.errors import InvalidReceipt, TidegateError
from tidegate.core.filters import TagFilter
from tidegate.core.model import QueueRef


class SubscriptionOwner(Protocol):
    """What a Subscription asks of the delivery machinery (implemented by core/delivery.py `Delivery`)."""

    def wake(self, sub: Subscription) -> None:
        """`sub` has credit again: deliver to it at the end of this reactor turn."""

    def ack(self, sub: Subscription, receipt: str) -> None:
        """MESSAGE mode: the message of `receipt` is done for the subscription's progress key."""

    def ack_delivered(self, sub: Subscription, deliveries: Sequence[Delivered]) -> int:
        """MESSAGE mode: settle every delivery still in flight under its attempt, at once; the others are stale
        (redelivered, released) and skipped. Returns how many were settled."""

    def nack(self, sub: Subscription, receipt: str, requeue: bool, delay_ms: int) -> None:
        """MESSAGE mode: give the message back (after `delay_ms`), or dead-letter it when not `requeue`."""

    def commit(self, sub: Subscription, queue: QueueRef, offset: int) -> None:
        """OFFSET mode: everything below `offset` in `queue` is consumed by the subscription's progress key."""

    def detach(self, sub: Subscription) -> None:
        """The subscription closed: release its queues and its in-flight messages."""


@dataclass(slots=True)
class Inflight:
    """One delivery in flight. Never changed once stored (a new one replaces it): the delivery pump shares one
    first-attempt entry among the messages of a pump."""

    attempt: int
    deadline: float  # clock seconds; 0 = no timeout (released only by nack or consumer leaving)
    # the subscription holding it; None when taken by Broker.get or parked by a delayed nack (no consumer leaving
    # can release it: only its deadline, an ack or a nack)
    owner: Subscription | None


@dataclass(slots=True)
class PopQueue:
    """Per-message progress of one (progress key, queue) in MESSAGE mode."""

    committed: int  # every offset below is acked
    next_fetch: int  # next offset never handed out
    inflight: dict[int, Inflight] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)  # acked offsets above `committed`
    # offsets to redeliver, oldest first; a list, not a deque: an empty deque costs ~600 bytes and there is one
    # PopQueue per session queue, while redeliveries waiting at once are few
    ready: list[int] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)  # deliveries so far for offsets in `ready`

    def advance(self) -> bool:
        """Move `committed` over acked offsets; True if it moved."""
        moved = False
        while self.committed in self.acked:
            self.acked.discard(self.committed)
            self.committed += 1
            moved = True
        return moved


class Subscription:
    """A consumer attached to a group; returned by Broker.subscribe.

    The subscription owns its identity, its settings, its credit and `closed`. The fields under "delivery state"
    are written only by its owner (core/delivery.py): which queues it reads, where it is in each, and `cursor`,
    the index in `assigned` the next delivery round starts at (so one busy queue cannot starve the others).
    Slotted: every resumed MQTT session makes one, so its construction is on a reconnect storm's path and
    10,000 of them live as long as their connections.
    """

    __slots__ = ("owner", "state", "group", "topic", "sink", "client_id", "member_id", "filter", "invisible_ms",
                 "max_attempts", "credit", "closed", "assigned", "positions", "last_delivered", "cursor")

    def __init__(self, owner: SubscriptionOwner, state: GroupState, topic: str, sink: DeliverySink,
                 client_id: str, member_id: str, tag_filter: TagFilter, invisible_ms: int,
                 max_attempts: int) -> None:
        self.owner = owner
        self.state = state
        self.group = state.name
        self.topic = topic
        self.sink = sink
        self.client_id = client_id
        self.member_id = member_id
        self.filter = tag_filter
        self.invisible_ms = invisible_ms
        self.max_attempts = max_attempts
        self.credit = 0
        self.closed = False
        # delivery state
        self.assigned: list[QueueRef] = []
        self.positions: dict[QueueRef, int] = {}  # OFFSET mode: next offset to deliver per owned queue
        self.last_delivered: dict[QueueRef, int] = {}  # OFFSET mode: offset of the last message delivered
        self.cursor = 0

    @property
    def progress_key(self) -> str:
        """Whose offsets this member advances: the group's, or its own when broadcasting."""
        if self.state.mode is ConsumeMode.BROADCASTING:
            return f"{self.state.name}@{self.client_id}"
        return self.state.name

    def grant(self, credit: int) -> None:
        if credit < 0:
            raise TidegateError("credit must be positive")
        self.credit += credit
        if credit and not self.closed:
            self.owner.wake(self)

    def ack(self, receipt: str) -> None:
        self.owner.ack(self, receipt)

    def ack_delivered(self, deliveries: Sequence[Delivered]) -> int:
        """Ack many deliveries of this subscription in one call (MESSAGE mode), e.g. every PUBACK of one read:
        one committed-offset update per queue instead of one receipt parse and update per message. Deliveries no
        longer in flight under their attempt (redelivered meanwhile, released when a member left) are skipped
        rather than refused, as a per-message `ack` of them would raise InvalidReceipt; returns how many were
        settled. A group that commits offsets raises InvalidReceipt, as `ack` does."""
        return self.owner.ack_delivered(self, deliveries)

    def nack(self, receipt: str, requeue: bool = True, delay_ms: int = 0) -> None:
        self.owner.nack(self, receipt, requeue, delay_ms)

    def commit(self, queue: QueueRef, offset: int) -> None:
        self.owner.commit(self, queue, offset)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.detach(self)

    def __repr__(self) -> str:
        return f"<Subscription {self.group}/{self.topic} {self.member_id} credit={self.credit}>"


class GroupState:
    """A group with members online (or with per-message progress) in this process. Slotted, as `Subscription`:
    every persistent MQTT session is a group of its own."""

    __slots__ = ("name", "mode", "ack", "topics", "members", "pop", "get_cursor")

    def __init__(self, name: str, mode: ConsumeMode, ack: AckMode) -> None:
        self.name = name
        self.mode = mode
        self.ack = ack
        self.topics: set[str] = set()
        self.members: dict[str, list[Subscription]] = {}  # topic -> subscriptions
        self.pop: dict[tuple[str, QueueRef], PopQueue] = {}  # (progress key, queue) -> state
        self.get_cursor = 0  # Broker.get: index of the queue the next get looks at first

    def subscriptions(self) -> list[Subscription]:
        return [s for subs in self.members.values() for s in subs]


def allocate_averagely(queues: list[QueueRef], members: list[str]) -> dict[str, list[QueueRef]]:
    """RocketMQ's AllocateMessageQueueAveragely: contiguous blocks, the first members get one more."""
    out: dict[str, list[QueueRef]] = {m: [] for m in members}
    if not members:
        return out
    n, m = len(queues), len(members)
    for i, member in enumerate(members):
        size = n // m + (1 if i < n % m else 0)
        start = i * (n // m) + min(i, n % m)
        out[member] = queues[start:start + size]
    return out


def parse_receipt(receipt: str) -> tuple[QueueRef, int, int]:
    """Receipts are `topic|queue_id|offset|attempt`: enough to find the in-flight entry and reject stale acks."""
    try:
        topic, qid, offset, attempt = receipt.rsplit("|", 3)
        return QueueRef(topic, int(qid)), int(offset), int(attempt)
    except (ValueError, AttributeError):
        raise InvalidReceipt(f"malformed receipt {receipt!r}") from None


def make_receipt(queue: QueueRef, offset: int, attempt: int) -> str:
    return f"{queue.topic}|{queue.queue_id}|{offset}|{attempt}"


class InvisibilityTimers:
    """One heap of deadlines for all in-flight messages, driven by a single clock call."""

    def __init__(self, clock: IReactorTime, on_expired: Callable[[list[Any]], None]) -> None:
        self.clock = clock
        self.on_expired = on_expired
        self.heap: list[tuple[float, int, Any]] = []
        self.seq = 0
        self.call: IDelayedCall | None = None

    def add(self, deadline: float, item: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (deadline, self.seq, item))
        if self.call is None or not self.call.active() or self.call.getTime() > deadline:
            if self.call is not None and self.call.active():
                self.call.cancel()
            self.call = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self.call = None
        now = self.clock.seconds()
        due = []
        while self.heap and self.heap[0][0] <= now:
            due.append(heapq.heappop(self.heap)[2])
        if due:
            self.on_expired(due)
        if self.heap and self.call is None:
            self.call = self.clock.callLater(max(0.0, self.heap[0][0] - self.clock.seconds()), self._fire)

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
