"""In-memory twins of the stores, for tests and for brokers that need no durability.

MemoryMessageStore keeps the same record bytes and the same offset arithmetic as the file store (segments,
fillers, MessageTooLarge, retention by whole segments), so the contract suite holds for both; `sync()` makes
everything "durable" at once.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tidegate.core.errors import (
    CorruptRecord,
    InvalidName,
    MessageNotFound,
    MessageTooLarge,
    OffsetOutOfRange,
    ShuttingDown,
)
from tidegate.core.model import AppendResult, IndexEntry, Message, QueueRef, tag_hash
from tidegate.core.storage.api import QueueBounds, RecoveryReport, StoreStats
from tidegate.core.storage.metadata import (
    SCHEMA_VERSION,
    normalize_group_row,
    normalize_offset_row,
    normalize_policy_row,
    normalize_role_row,
    normalize_topic_row,
    normalize_user_row,
    to_json,
)
from tidegate.core.storage.record import (
    FILLER_SIZE,
    decode_record,
    encode_record,
    find_by_id,
    make_msg_id,
)

_MAX_QUEUE_ID = 0xFFFFFFFF


@dataclass(slots=True)
class _Segment:
    base: int
    used: int = 0
    last_ts: int = 0
    offsets: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Queue:
    base: int = 0  # queue offset of entries[0]
    min_offset: int = 0
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (commit offset, size, tag hash)

    @property
    def max_offset(self) -> int:
        return self.base + len(self.entries)


class MemoryMessageStore:
    """MessageStore in memory, with the file store's record format and offset arithmetic."""

    def __init__(self, segment_bytes: int = 64 << 20, clock_ms: Callable[[], int] | None = None) -> None:
        self.segment_bytes = segment_bytes
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._lock = threading.Lock()
        self._records: dict[int, bytes] = {}
        self._segments: list[_Segment] = [_Segment(0)]
        self._queues: dict[QueueRef, _Queue] = {}
        self._keys: dict[tuple[str, str], list[int]] = {}
        self._end = 0
        self._durable = 0
        self._last_ts = 0
        self._closed = False
        self.recovery = RecoveryReport(True, 0, 0, 0, 0, 0)

    # --- appending
    def _queue(self, ref: QueueRef) -> _Queue:
        q = self._queues.get(ref)
        if q is None:
            if not isinstance(ref.queue_id, int) or not 0 <= ref.queue_id <= _MAX_QUEUE_ID:
                raise InvalidName(f"queue id {ref.queue_id!r} is not in 0..{_MAX_QUEUE_ID}")
            if not ref.topic or "/" in ref.topic or "\x00" in ref.topic:
                raise InvalidName(f"topic {ref.topic!r} cannot name a queue")
            q = self._queues[ref] = _Queue()
        return q

    def _place(self, length: int, store_ts: int) -> int:
        """Commit offset for a record of `length` bytes, rolling to a new segment when it does not fit."""
        if length + FILLER_SIZE > self.segment_bytes:
            raise MessageTooLarge(
                f"record of {length} bytes does not fit a commit-log segment of {self.segment_bytes} bytes"
            )
        active = self._segments[-1]
        if active.used + length + FILLER_SIZE > self.segment_bytes:
            active = _Segment(active.base + self.segment_bytes)
            self._segments.append(active)
        offset = active.base + active.used
        active.used += length
        active.last_ts = store_ts
        active.offsets.append(offset)
        return offset

    def _plan(self, message: Message, destinations: Sequence[QueueRef], claimed: dict[QueueRef, int],
              store_ts: int) -> bytes:
        dests = []
        for ref in destinations:
            q = self._queue(ref)
            extra = claimed.get(ref, 0)
            claimed[ref] = extra + 1
            dests.append((ref.topic, ref.queue_id, q.max_offset + extra))
        return encode_record(message, store_ts, dests)

    def _commit(self, message: Message, destinations: Sequence[QueueRef], record: bytes,
                store_ts: int) -> AppendResult:
        offset = self._place(len(record), store_ts)
        with self._lock:
            self._records[offset] = record
            self._end = offset + len(record)
        th = tag_hash(message.tag)
        queue_offsets = []
        for ref in destinations:
            q = self._queues[ref]
            queue_offsets.append(q.max_offset)
            q.entries.append((offset, len(record), th))
        for key in message.keys:
            self._keys.setdefault((message.topic, key), []).append(offset)
        message.msg_id = make_msg_id(offset, store_ts)
        message.store_ts = store_ts
        return AppendResult(message.msg_id, offset, len(record), store_ts, tuple(queue_offsets))

    def _store_ts(self) -> int:
        now = self._clock()
        return now if now > self._last_ts else self._last_ts

    def append(self, message: Message, destinations: Sequence[QueueRef]) -> AppendResult:
        return self.append_batch([(message, destinations)])[0]

    def append_batch(self, items: Sequence[tuple[Message, Sequence[QueueRef]]]) -> list[AppendResult]:
        if self._closed:
            raise ShuttingDown("the message store is closed")
        store_ts = self._store_ts()
        claimed: dict[QueueRef, int] = {}
        records = [self._plan(message, destinations, claimed, store_ts) for message, destinations in items]
        for record in records:  # all or nothing, like the file store
            if len(record) + FILLER_SIZE > self.segment_bytes:
                raise MessageTooLarge(
                    f"record of {len(record)} bytes does not fit a commit-log segment of {self.segment_bytes} bytes"
                )
        self._last_ts = store_ts
        return [
            self._commit(message, destinations, record, store_ts)
            for (message, destinations), record in zip(items, records, strict=True)
        ]

    def sync(self) -> int:
        with self._lock:
            self._durable = self._end
            return self._durable

    @property
    def end_offset(self) -> int:
        return self._end

    @property
    def durable_offset(self) -> int:
        return self._durable

    # --- reading
    def queue_bounds(self, queue: QueueRef) -> QueueBounds:
        q = self._queues.get(queue)
        return QueueBounds(q.min_offset, q.max_offset) if q else QueueBounds(0, 0)

    def read_index(self, queue: QueueRef, offset: int, max_entries: int) -> list[IndexEntry]:
        q = self._queues.get(queue) or _Queue()
        if offset < q.min_offset or offset > q.max_offset:
            raise OffsetOutOfRange(f"offset {offset} of queue {queue} is outside [{q.min_offset}, {q.max_offset}]")
        start = offset - q.base
        chunk = q.entries[start:start + max(0, max_entries)]
        return [IndexEntry(offset + i, commit, size, th) for i, (commit, size, th) in enumerate(chunk)]

    def read_message(self, commit_offset: int, size: int | None = None) -> Message:
        record = self._records.get(commit_offset)
        if record is None or (size is not None and size != len(record)):
            raise MessageNotFound(f"no message at commit offset {commit_offset}")
        try:
            message = decode_record(record).message
        except CorruptRecord as exc:  # pragma: no cover - records in memory are never damaged
            raise MessageNotFound(f"no message at commit offset {commit_offset}: {exc.message}") from None
        message.msg_id = make_msg_id(commit_offset, message.store_ts)
        return message

    def lookup_id(self, msg_id: str) -> Message:
        return find_by_id(self.read_message, msg_id)

    def lookup_key(self, topic: str, key: str, limit: int = 64) -> list[Message]:
        offsets = [o for o in self._keys.get((topic, key), ()) if o in self._records]
        return [self.read_message(o) for o in offsets[-limit:]] if limit > 0 else []

    def offset_for_time(self, queue: QueueRef, ts_ms: int) -> int:
        q = self._queues.get(queue)
        if q is None:
            return 0
        lo, hi = q.min_offset, q.max_offset
        while lo < hi:
            mid = (lo + hi) // 2
            record = self._records.get(q.entries[mid - q.base][0])
            stored_at = decode_record(record, verify=False).message.store_ts if record else -1
            if stored_at >= ts_ms:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def queues(self) -> Iterable[QueueRef]:
        return list(self._queues)

    def delete_queue(self, queue: QueueRef) -> None:
        self._queues.pop(queue, None)

    # --- retention
    def _disk_bytes(self) -> int:
        return sum(s.used for s in self._segments[:-1]) + self._segments[-1].used

    def enforce_retention(self, now_ms: int, max_age_ms: int, max_bytes: int) -> int:
        total = self._disk_bytes()
        deleted = 0
        while len(self._segments) > 1:
            oldest = self._segments[0]
            too_old = max_age_ms > 0 and now_ms - oldest.last_ts > max_age_ms
            too_big = max_bytes > 0 and total > max_bytes
            if not (too_old or too_big):
                break
            with self._lock:
                for offset in oldest.offsets:
                    del self._records[offset]
            self._segments.pop(0)
            total -= oldest.used
            deleted += 1
        if deleted:
            log_min = self._segments[0].base
            for q in self._queues.values():
                while q.min_offset < q.max_offset and q.entries[q.min_offset - q.base][0] < log_min:
                    q.min_offset += 1
                drop = q.min_offset - q.base
                if drop:
                    del q.entries[:drop]
                    q.base = q.min_offset
        return deleted

    def expire_queue_before(self, queue: QueueRef, ts_ms: int) -> int:
        if self._closed:
            raise ShuttingDown("the message store is closed")
        q = self._queues.get(queue)
        if q is None:
            return 0
        new_min = self.offset_for_time(queue, ts_ms)
        dropped = new_min - q.min_offset
        if dropped <= 0:
            return 0
        del q.entries[:new_min - q.base]
        q.base = q.min_offset = new_min
        return dropped

    def stats(self) -> StoreStats:
        return StoreStats(
            segments=len(self._segments),
            disk_bytes=self._disk_bytes(),
            end_offset=self._end,
            durable_offset=self._durable,
            min_offset=self._segments[0].base,
        )

    def segment_of(self, commit_offset: int) -> int:
        bases = [s.base for s in self._segments]
        return bases[max(0, bisect_right(bases, commit_offset) - 1)]

    def health(self) -> tuple[bool, str]:
        """Memory never fails to write."""
        return True, ""

    def close(self) -> None:
        self.sync()
        self._closed = True


class MemoryMetadataStore:
    """MetadataStore in memory. Values go through JSON like the SQLite store, so callers see the same copies."""

    def __init__(self) -> None:
        self._topics: dict[str, dict[str, Any]] = {}
        self._groups: dict[str, dict[str, Any]] = {}
        self._offsets: dict[tuple[str, str, int], int] = {}
        self._kv: dict[tuple[str, str], str] = {}
        self._users: dict[str, dict[str, Any]] = {}
        self._roles: dict[str, dict[str, Any]] = {}
        self._policies: dict[int, dict[str, Any]] = {}
        self._next_policy_id = 1
        self.schema_version = SCHEMA_VERSION

    def get_topics(self) -> list[dict[str, Any]]:
        return [dict(self._topics[name]) for name in sorted(self._topics)]

    def put_topic(self, row: dict[str, Any]) -> None:
        normalized = normalize_topic_row(row)
        self._topics[normalized["name"]] = normalized

    def delete_topic(self, name: str) -> None:
        self._topics.pop(name, None)

    def get_groups(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(self._groups[name]) for name in sorted(self._groups)]

    def put_group(self, row: dict[str, Any]) -> None:
        normalized = normalize_group_row(row)
        normalized["extra"] = json.loads(json.dumps(normalized["extra"]))
        self._groups[normalized["name"]] = normalized

    def delete_group(self, name: str) -> None:
        self._groups.pop(name, None)

    def get_offsets(self, group: str) -> dict[tuple[str, int], int]:
        return {(t, q): o for (g, t, q), o in self._offsets.items() if g == group}

    def put_offsets(self, rows: Iterable[tuple[str, str, int, int]]) -> None:
        checked = [normalize_offset_row(row) for row in rows]  # validate all before changing any
        for group, topic, queue_id, offset in checked:
            self._offsets[(group, topic, queue_id)] = offset

    def delete_offsets(self, group: str, topic: str | None = None) -> None:
        for key in [k for k in self._offsets if k[0] == group and (topic is None or k[1] == topic)]:
            del self._offsets[key]

    def kv_get(self, namespace: str, key: str) -> Any | None:
        raw = self._kv.get((namespace, key))
        return None if raw is None else json.loads(raw)

    def kv_put(self, namespace: str, key: str, value: Any) -> None:
        self._kv[(namespace, key)] = to_json(value)

    def kv_delete(self, namespace: str, key: str) -> None:
        self._kv.pop((namespace, key), None)

    def kv_items(self, namespace: str) -> list[tuple[str, Any]]:
        return sorted((k, json.loads(v)) for (ns, k), v in self._kv.items() if ns == namespace)

    def get_users(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(self._users[name]) for name in sorted(self._users)]

    def put_user(self, row: dict[str, Any]) -> None:
        normalized = normalize_user_row(row)
        self._users[normalized["name"]] = normalized

    def delete_user(self, name: str) -> None:
        self._users.pop(name, None)

    def get_roles(self) -> list[dict[str, Any]]:
        return [dict(self._roles[name]) for name in sorted(self._roles)]

    def put_role(self, row: dict[str, Any]) -> None:
        normalized = normalize_role_row(row)
        self._roles[normalized["name"]] = normalized

    def delete_role(self, name: str) -> None:
        self._roles.pop(name, None)

    def get_policies(self) -> list[dict[str, Any]]:
        return [{"id": i, **copy.deepcopy(row)} for i, row in sorted(self._policies.items())]

    def add_policy(self, row: dict[str, Any]) -> int:
        normalized = normalize_policy_row(row)
        policy_id, self._next_policy_id = self._next_policy_id, self._next_policy_id + 1
        self._policies[policy_id] = normalized
        return policy_id

    def delete_policy(self, policy_id: int) -> bool:
        return self._policies.pop(policy_id, None) is not None

    def delete_policies_of(self, owner: str) -> None:
        for policy_id in [i for i, row in self._policies.items() if row["owner"] == owner]:
            del self._policies[policy_id]

    def close(self) -> None:
        pass
