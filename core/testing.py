"""Helpers for tests of the core and of adapters: a ready broker over the in-memory stores, a recording sink."""

from __future__ import annotations

from typing import Any

from tidegate.core.api import Delivered
from tidegate.core.broker import Broker, BrokerConfig
from tidegate.core.flush import Durability
from tidegate.core.model import QueueRef


def make_broker(clock: Any = None, *, flush: str = "sync", config: BrokerConfig | None = None,
                store: Any = None, metadata: Any = None) -> Broker:
    """A Broker over MemoryMessageStore/MemoryMetadataStore (or the stores given), fsync run inline.

    With a `MemoryReactorClock`, deliveries happen on `clock.advance(0)` (the broker batches wake-ups per turn).
    """
    from tidegate.core.storage.memory import MemoryMessageStore, MemoryMetadataStore

    if clock is None:
        from twisted.internet.testing import MemoryReactorClock

        clock = MemoryReactorClock()
    store = store if store is not None else MemoryMessageStore(clock_ms=lambda: int(clock.seconds() * 1000))
    metadata = metadata if metadata is not None else MemoryMetadataStore()
    durability = Durability(store, clock, run_in_thread=None, mode=flush)
    return Broker(store, metadata, clock, durability, config or BrokerConfig())


class RecordingSink:
    """A DeliverySink that keeps what it was given."""

    def __init__(self) -> None:
        self.delivered: list[Delivered] = []
        self.assignments: list[list[QueueRef]] = []
        self.moved: list[tuple[QueueRef, int, int]] = []

    def deliver(self, deliveries: list[Delivered]) -> None:
        self.delivered.extend(deliveries)

    def assignment_changed(self, queues: list[QueueRef]) -> None:
        self.assignments.append(list(queues))

    def offset_moved(self, queue: QueueRef, old: int, new: int) -> None:
        self.moved.append((queue, old, new))

    @property
    def bodies(self) -> list[bytes]:
        return [d.message.body for d in self.delivered]

    @property
    def assigned(self) -> list[QueueRef]:
        return self.assignments[-1] if self.assignments else []
