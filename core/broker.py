"""The core broker: one protocol-free API over topics, queues, groups, routing, delivery and storage.

(Skeleton: signatures are the contract the adapters are written against; bodies arrive next.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tidegate.core.api import (
    AckMode,
    ConsumeMode,
    DeliverySink,
    GroupInfo,
    PullResult,
    SendResult,
)
from tidegate.core.model import Message, QueueRef, TopicConfig


@dataclass(slots=True)
class BrokerConfig:
    auto_create_topics: bool = True
    default_queues: int = 4
    max_body: int = 4 * 1024 * 1024
    new_group_start: str = "latest"  # "earliest" | "latest": where a group with no committed offset begins
    invisible_ms: int = 30_000  # default invisibility timeout in ack mode
    max_attempts: int = 16  # deliveries before a message goes to %DLQ%group
    retention_ms: int = 72 * 3600 * 1000
    retention_bytes: int = 0  # 0 = no size limit


class Subscription:
    """A consumer attached to a group (push consumption). Returned by Broker.subscribe."""

    client_id: str
    group: str
    topic: str
    assigned: list[QueueRef]

    def grant(self, credit: int) -> None:
        """Allow `credit` more messages to be delivered (flow control)."""

    def ack(self, receipt: str) -> None:
        """MESSAGE mode: the message is done. Raises InvalidReceipt for an unknown/expired receipt."""

    def nack(self, receipt: str, requeue: bool = True, delay_ms: int = 0) -> None:
        """MESSAGE mode: redeliver (after delay_ms) or, with requeue=False, dead-letter the message."""

    def commit(self, queue: QueueRef, offset: int) -> None:
        """OFFSET mode: everything below `offset` in `queue` is consumed."""

    def close(self) -> None:
        """Detach; unacked messages become visible to other members; owned queues are rebalanced."""


class Broker:
    def __init__(self, store, metadata, clock, durability, config: BrokerConfig | None = None) -> None:
        raise NotImplementedError

    # --- topics
    def create_topic(self, name: str, queues: int | None = None, perm: str = "rw", retention_ms: int = 0,
                     internal: bool = False) -> TopicConfig:
        """Create a topic; raises TopicExists if it exists, InvalidName for a bad name."""

    def ensure_topic(self, name: str, queues: int | None = None, internal: bool = False) -> TopicConfig:
        """Return the topic, creating it if needed (idempotent)."""

    def update_topic(self, name: str, queues: int | None = None, perm: str | None = None,
                     retention_ms: int | None = None) -> TopicConfig: ...

    def delete_topic(self, name: str) -> None: ...

    def get_topic(self, name: str) -> TopicConfig:
        """Raises TopicNotFound."""

    def list_topics(self, include_internal: bool = False) -> list[TopicConfig]: ...

    # --- produce
    def publish(self, messages: Sequence[Message], queue_id: int | None = None) -> list[SendResult]:
        """Validate, route and append messages. Raises TidegateError on bad input (nothing stored then).

        Queue choice: `queue_id` if given; else hash of message.group (FIFO); else round-robin.
        Routing also appends index entries to every queue bound by a matching binding (fan-out without copies).
        Consumers see the messages once they are durable (sync flush) or at once (async flush).
        """

    def when_durable(self, commit_end: int, callback: Callable[[], None]) -> None:
        """Call `callback` (on the reactor thread) once everything below `commit_end` is on disk."""

    # --- routing (adapters store their subscriptions/bindings through this)
    def bind(self, pattern: str, destination: QueueRef) -> None:
        """Route messages whose full name (`topic/subject`) matches `pattern` (`+` one level, `#` the rest)
        to `destination` as well. Persisted; idempotent."""

    def unbind(self, pattern: str, destination: QueueRef) -> None: ...

    def bindings(self, destination_topic: str | None = None) -> list[tuple[str, QueueRef]]: ...

    # --- consume
    def subscribe(self, group: str, topic: str, sink: DeliverySink, *, client_id: str,
                  mode: ConsumeMode = ConsumeMode.CLUSTERING, ack: AckMode = AckMode.OFFSET,
                  filter_expr: str = "*", invisible_ms: int | None = None, max_attempts: int | None = None,
                  start: str | None = None) -> Subscription:
        """Attach a push consumer. Delivery starts once credit is granted."""

    def pull(self, queue: QueueRef, offset: int, max_count: int = 32, filter_expr: str = "*") -> PullResult: ...

    def commit_offset(self, group: str, queue: QueueRef, offset: int) -> None: ...

    def committed_offsets(self, group: str) -> dict[QueueRef, int]: ...

    def reset_offsets(self, group: str, topic: str, to: str | int) -> dict[QueueRef, int]:
        """`to` = "earliest", "latest" or a timestamp in ms."""

    def group_info(self, group: str) -> GroupInfo: ...

    def list_groups(self) -> list[GroupInfo]: ...

    def delete_group(self, group: str) -> None: ...

    # --- query
    def query_by_id(self, msg_id: str) -> Message: ...

    def query_by_key(self, topic: str, key: str, limit: int = 64) -> list[Message]: ...

    def list_by_time(self, topic: str, start_ms: int, end_ms: int, limit: int = 100) -> list[Message]: ...

    # --- lifecycle
    def close(self) -> None: ...
