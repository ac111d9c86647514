"""The interface the core's broker sees of durability (implemented by core/flush.py `Durability`).

The stores themselves are described in core/storage/api.py (`MessageStore`, `MetadataStore`); this module adds
the piece between them and the broker: when an appended record counts as on disk, and therefore when consumers
may see it and producers may be acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tidegate.core.metrics import CoreMetrics


class Durability(Protocol):
    metrics: CoreMetrics  # the process's counters; the broker counts into them unless given its own

    @property
    def visible_offset(self) -> int:
        """Commit-log offset below which consumers may see messages (durable in sync mode, appended in async)."""

    def on_durable(self, listener: Callable[[int], None]) -> None:
        """Call `listener(durable_offset)` on the reactor thread each time the durable offset advances."""

    def when_durable(self, commit_end: int, callback: Callable[[], None]) -> None:
        """Call `callback` on the reactor thread once everything below `commit_end` is on disk."""

    def request_flush(self) -> None:
        """Ask for an fsync soon (at the end of this reactor turn, shared by every append of the turn)."""

    def close(self) -> None:
        """Stop timers and make everything appended durable (shutdown path)."""
