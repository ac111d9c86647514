"""The typed seams between the core and everything above it.

Adapters never hold the concrete `Broker`: a listener gets a `Core` (the broker's public planes), opens one
`CoreSession` per connection (core/session.py) and reaches the data and admin planes only through it. Adapter
state that the core does not interpret (MQTT sessions and retained messages, AMQP exchanges and queue arguments)
lives in an `AdapterStateStore` namespace, never in the metadata store directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tidegate.core.alarms import ResourceAlarms
from tidegate.core.api import AckMode, ConsumeMode, Delivered, GroupInfo, PullResult, SendResult
from tidegate.core.filters import TagFilter
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef, TopicConfig


class DeliverySink(Protocol):
    """What an adapter gives the core for each push consumer."""

    def deliver(self, deliveries: list[Delivered]) -> None:
        """Messages for this consumer; never more than the credit it was granted."""

    # Optional: `deliver_runs(runs: list[DeliveryRun]) -> None` (core/api.py): offset-mode pumps as runs of
    # (queue, offsets, messages) instead of one `Delivered` per message.

    def assignment_changed(self, queues: list[QueueRef]) -> None:
        """Offset mode: the queues this member owns after a rebalance."""

    def offset_moved(self, queue: QueueRef, old: int, new: int) -> None:
        """Retention removed offsets `old..new-1` of `queue` before this consumer read them (optional)."""


class Subscription(Protocol):
    """A push consumer attached to a group, as `subscribe` returns it."""

    group: str
    topic: str
    client_id: str
    credit: int
    closed: bool

    def grant(self, credit: int) -> None: ...

    def ack(self, receipt: str) -> None: ...

    def nack(self, receipt: str, requeue: bool = True, delay_ms: int = 0) -> None: ...

    def commit(self, queue: QueueRef, offset: int) -> None: ...

    def close(self) -> None: ...


class AdapterStateStore(Protocol):
    """One namespace of adapter-owned rows (JSON values), durable in the metadata store."""

    namespace: str

    def items(self) -> list[tuple[str, Any]]: ...

    def get(self, key: str) -> Any | None: ...

    def put(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> None: ...


class DataPlane(Protocol):
    """Producing and consuming: what every adapter uses."""

    def now_ms(self) -> int: ...

    def publish(self, messages: Sequence[Message], queue_id: int | None = None) -> list[SendResult]: ...

    def when_durable(self, commit_end: int, callback: Callable[[], None]) -> None: ...

    def subscribe(self, group: str, topic: str, sink: DeliverySink, *, client_id: str,
                  mode: ConsumeMode | str = ..., ack: AckMode | str = ..., filter_expr: str = "*",
                  invisible_ms: int | None = None, max_attempts: int | None = None,
                  start: str | int | None = None) -> Subscription: ...

    def bind(self, pattern: str, destination: QueueRef) -> None: ...

    def unbind(self, pattern: str, destination: QueueRef) -> None: ...

    def pull(self, queue: QueueRef, offset: int, max_count: int = 32,
             filter_expr: str | TagFilter = "*") -> PullResult: ...

    def get(self, group: str, topic: str, *, auto_ack: bool, invisible_ms: int | None = None) -> Delivered | None:
        ...

    def ack(self, group: str, receipt: str) -> None: ...

    def nack(self, group: str, receipt: str, requeue: bool = True, delay_ms: int = 0) -> None: ...

    def commit_offset(self, group: str, queue: QueueRef, offset: int) -> None: ...

    def ensure_topic(self, name: str, queues: int | None = None, internal: bool = False) -> TopicConfig: ...

    def get_topic(self, name: str) -> TopicConfig: ...

    def queue_offsets(self, queue: QueueRef) -> tuple[int, int]: ...


class AdminPlane(Protocol):
    """Managing topics, groups and messages: the native admin frames, the CLI and the admin HTTP API."""

    def create_topic(self, name: str, queues: int | None = None, perm: str = "rw", retention_ms: int = 0,
                     internal: bool = False) -> TopicConfig: ...

    def update_topic(self, name: str, queues: int | None = None, perm: str | None = None,
                     retention_ms: int | None = None) -> TopicConfig: ...

    def delete_topic(self, name: str) -> None: ...

    def list_topics(self, include_internal: bool = False) -> list[TopicConfig]: ...

    def list_groups(self) -> list[GroupInfo]: ...

    def group_info(self, group: str) -> GroupInfo: ...

    def reset_offsets(self, group: str, topic: str, to: str | int) -> dict[QueueRef, int]: ...

    def delete_group(self, group: str) -> None: ...

    def query_by_id(self, msg_id: str) -> Message: ...

    def query_by_key(self, topic: str, key: str, limit: int = 64) -> list[Message]: ...

    def list_by_time(self, topic: str, start_ms: int, end_ms: int, limit: int = 100) -> list[Message]: ...


class Core(DataPlane, AdminPlane, Protocol):
    """What a listener factory is given: both planes, the core's counters, resource alarms (core/alarms.py) and
    adapter state namespaces."""

    metrics: CoreMetrics
    alarms: ResourceAlarms

    def adapter_state(self, namespace: str) -> AdapterStateStore: ...
