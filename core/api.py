"""Types of the core API that adapters use: send results, deliveries, pull results, group views.

The entry point is `tidegate.core.broker.Broker`; this module holds only the values that cross the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, Protocol

from tidegate.core.model import Message, QueueRef


class ConsumeMode(StrEnum):
    CLUSTERING = "clustering"  # each message to one member; queues (offset mode) or messages (ack mode) shared
    BROADCASTING = "broadcasting"  # every member gets every message


class AckMode(StrEnum):
    OFFSET = "offset"  # classic push consumer: queues assigned exclusively, progress is a committed offset
    MESSAGE = "message"  # pop style: per-message ack, invisibility timeout, redelivery, dead-letter


class PullStatus(StrEnum):
    FOUND = "found"
    NO_NEW = "no_new"
    OFFSET_MOVED = "offset_moved"  # asked below the first stored offset: retention removed those messages


class SendResult(NamedTuple):
    msg_id: str
    topic: str
    queue_id: int
    queue_offset: int
    commit_offset: int
    commit_end: int  # commit-log offset after this record; durable once the store's durable offset reaches it
    # queues besides the home queue (`queue_id`) that received the message because a binding matched its full
    # name; 0 = no binding routed it anywhere else (AMQP: unroutable when the home queue is nobody's queue)
    bound: int = 0


@dataclass(slots=True)
class Delivered:
    message: Message
    queue: QueueRef
    queue_offset: int
    receipt: str = ""  # ack handle in MESSAGE mode
    attempt: int = 1  # 1 on first delivery, +1 on each redelivery


class DeliveryRun(NamedTuple):
    """Messages of one queue handed out in offset mode, in offset order: first attempt, no receipt. A sink with
    `deliver_runs` gets a pump's messages as such runs (two list appends per message in the core, no `Delivered`
    object); `delivered_of` turns runs into the `Delivered` values `deliver` would have been given."""

    queue: QueueRef
    offsets: list[int]
    messages: list[Message]


def delivered_of(runs: Sequence[DeliveryRun]) -> list[Delivered]:
    """The `Delivered` values that `runs` stand for, in order (what `DeliverySink.deliver` gets)."""
    return [Delivered(message, run.queue, offset)
            for run in runs for offset, message in zip(run.offsets, run.messages, strict=True)]


@dataclass(slots=True)
class PullResult:
    status: PullStatus
    messages: list[Delivered]
    next_offset: int
    min_offset: int
    max_offset: int


@dataclass(slots=True)
class QueueProgress:
    queue: QueueRef
    committed: int
    max_offset: int
    min_offset: int
    owner: str = ""  # client id in offset mode

    @property
    def lag(self) -> int:
        return max(0, self.max_offset - max(self.committed, self.min_offset))


@dataclass(slots=True)
class GroupInfo:
    name: str
    mode: ConsumeMode
    ack: AckMode
    topics: list[str]
    members: list[str]
    progress: list[QueueProgress] = field(default_factory=list)
    inflight: int = 0

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.progress)


class DeliverySink(Protocol):
    """What an adapter gives the core for each consumer connection (push consumption)."""

    def deliver(self, deliveries: list[Delivered]) -> None:
        """Messages for this consumer; never more than the credit it was granted."""

    # Optional: `deliver_runs(runs: list[DeliveryRun]) -> None`. A sink that has it gets offset-mode pumps as
    # runs of (queue, offsets, messages) instead of `deliver` with one `Delivered` per message: the same messages
    # in the same order, credit and metrics counted the same way. Message mode always calls `deliver`.

    def assignment_changed(self, queues: list[QueueRef]) -> None:
        """Offset mode: the queues this member owns after a rebalance."""
