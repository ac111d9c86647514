"""The small interfaces the core sees of storage. Two implementations each: files on disk and an in-memory twin.

The message store is *synchronous* and single-writer: the reactor thread calls `append*`, `read_*`, `lookup_*`;
only `sync()` may be called from another thread (the group-commit flusher) concurrently with appends.
Reads may return records that are not yet durable: the broker decides what consumers see (core/flush.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tidegate.core.model import AppendResult, IndexEntry, Message, QueueRef


@dataclass(slots=True, frozen=True)
class QueueBounds:
    min_offset: int  # first offset still stored (retention may have removed older ones)
    max_offset: int  # next offset to be written (== number of entries ever written)


@dataclass(slots=True, frozen=True)
class StoreStats:
    segments: int
    disk_bytes: int
    end_offset: int  # commit-log offset after the last appended record
    durable_offset: int  # commit-log offset up to which everything is fsynced
    min_offset: int  # first commit-log offset still on disk


@dataclass(slots=True, frozen=True)
class RecoveryReport:
    clean: bool  # the previous run wrote the clean-shutdown marker
    scanned_bytes: int
    truncated_bytes: int  # bytes dropped from the torn/corrupt tail
    dropped_records: int
    rebuilt_index_entries: int
    trimmed_index_entries: int


class MessageStore(Protocol):
    """Commit log + per-queue indexes + key/id/time lookup."""

    recovery: RecoveryReport

    def append(self, message: Message, destinations: Sequence[QueueRef]) -> AppendResult:
        """Write one record holding `message` and add one index entry per destination queue.

        Fills `message.msg_id` and `message.store_ts`. Not durable until `sync()` covers it.
        Raises MessageTooLarge if the record exceeds a segment, StoreFull if the disk is full.
        """

    def append_batch(self, items: Sequence[tuple[Message, Sequence[QueueRef]]]) -> list[AppendResult]:
        """Same as append for several messages, with one write call."""

    def sync(self) -> int:
        """fsync everything appended so far; return the new durable offset. Thread-safe against append."""

    @property
    def end_offset(self) -> int: ...

    @property
    def durable_offset(self) -> int: ...

    def queue_bounds(self, queue: QueueRef) -> QueueBounds: ...

    def read_index(self, queue: QueueRef, offset: int, max_entries: int) -> list[IndexEntry]:
        """Index entries from `offset` on (fewer at the end of the queue). Raises OffsetOutOfRange below min."""

    def read_message(self, commit_offset: int, size: int | None = None) -> Message:
        """Decode the record at `commit_offset`; raises MessageNotFound if retention removed it."""

    def lookup_id(self, msg_id: str) -> Message:
        """The message with this id (ids encode the commit offset), or MessageNotFound."""

    def lookup_key(self, topic: str, key: str, limit: int = 64) -> list[Message]: ...

    def offset_for_time(self, queue: QueueRef, ts_ms: int) -> int:
        """First queue offset whose message was stored at or after ts_ms (max_offset if none)."""

    def queues(self) -> Iterable[QueueRef]:
        """Every queue that has an index."""

    def delete_queue(self, queue: QueueRef) -> None:
        """Forget a queue's index (its topic was deleted); the log records age out by retention."""

    def enforce_retention(self, now_ms: int, max_age_ms: int, max_bytes: int) -> int:
        """Delete whole old segments (never the active one); return how many were deleted."""

    def expire_queue_before(self, queue: QueueRef, ts_ms: int) -> int:
        """Per-topic retention: raise the queue's min offset to its first entry stored at or after `ts_ms`.

        Returns how many entries were dropped (0 for an unknown queue). Only the queue's index is trimmed: the
        commit log is shared by every queue and loses whole segments to `enforce_retention` alone. The new min
        offset survives a restart.
        """

    def stats(self) -> StoreStats: ...

    def close(self) -> None:
        """Flush, fsync, write the checkpoint and the clean-shutdown marker."""


class MetadataStore(Protocol):
    """Durable metadata in SQLite (WAL): topics, groups, offsets, subscriptions, bindings, sessions, users...

    Adapters keep their own concepts here through the generic `kv_*` calls (namespaced), so the core never
    learns MQTT or AMQP vocabulary.
    """

    def get_topics(self) -> list[dict[str, Any]]: ...

    def put_topic(self, row: dict[str, Any]) -> None: ...

    def delete_topic(self, name: str) -> None: ...

    def get_groups(self) -> list[dict[str, Any]]: ...

    def put_group(self, row: dict[str, Any]) -> None: ...

    def delete_group(self, name: str) -> None: ...

    def get_offsets(self, group: str) -> dict[tuple[str, int], int]:
        """Committed offsets of a group: (topic, queue_id) -> next offset to consume."""

    def put_offsets(self, rows: Iterable[tuple[str, str, int, int]]) -> None:
        """Batch upsert of (group, topic, queue_id, offset)."""

    def delete_offsets(self, group: str, topic: str | None = None) -> None: ...

    def kv_get(self, namespace: str, key: str) -> Any | None: ...

    def kv_put(self, namespace: str, key: str, value: Any) -> None:
        """Store a JSON-serialisable value."""

    def kv_delete(self, namespace: str, key: str) -> None: ...

    def kv_items(self, namespace: str) -> list[tuple[str, Any]]: ...

    def close(self) -> None: ...
