"""FileMessageStore: the commit log, per-queue indexes and the key index on disk, with crash recovery.

Index entries and key entries are buffered in memory and written in batches (`flush_indexes`): when the buffer is
large, on `sync()` called from the owning thread, and on `close()`. After each batch the *checkpoint* file records a
commit offset below which every record's index entries are on disk; it never exceeds the durable offset.

Opening: when the clean-shutdown marker is present (and the checkpoint agrees with the index files), nothing is
scanned. Otherwise the log is verified from the checkpoint's segment on, cut at the first bad record, the records
after the checkpoint are re-dispatched into the indexes (each record names its destinations and queue offsets, so
re-dispatch is idempotent), and index entries pointing past the recovered end are trimmed. If the indexes turn out
to be missing entries older than the checkpoint (files deleted or lost), the whole log is re-dispatched.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from crc32c import crc32c

from tidegate.core.errors import (
    CorruptRecord,
    InvalidName,
    MessageNotFound,
    OffsetOutOfRange,
    ShuttingDown,
    StoreError,
)
from tidegate.core.model import AppendResult, IndexEntry, Message, QueueRef, tag_hash
from tidegate.core.storage.api import QueueBounds, RecoveryReport, StoreStats
from tidegate.core.storage.commitlog import CommitLog
from tidegate.core.storage.keyindex import KeyIndex, key_hash
from tidegate.core.storage.layout import StoreLayout, fsync_dir, write_atomically
from tidegate.core.storage.queueindex import IndexFiles, QueueIndex
from tidegate.core.storage.record import decode_record, encode_record, find_by_id, make_msg_id

logger = logging.getLogger("tidegate.storage")

CHECKPOINT = struct.Struct("<IIQQ")  # magic, version, commit offset, total index entries; then crc32c u32
CHECKPOINT_MAGIC = 0x50434754  # b"TGCP"
CHECKPOINT_VERSION = 1
_CRC = struct.Struct("<I")
_MAX_QUEUE_ID = 0xFFFFFFFF


def _default_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class FileMessageStore:
    """MessageStore on disk. Single writer (the thread that created it); `sync()` may be called from any thread."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        segment_bytes: int = 1 << 30,
        index_entries_per_file: int = 300_000,
        clock_ms: Callable[[], int] | None = None,
        index_flush_entries: int = 32_768,
        max_open_index_files: int = 256,
    ) -> None:
        self.layout = StoreLayout(data_dir)
        fresh = not self.layout.commitlog_dir.exists()
        self.layout.create_dirs()
        self._clock = clock_ms or _default_clock_ms
        self._owner = threading.get_ident()
        self._flush_threshold = index_flush_entries
        self._log = CommitLog(self.layout, segment_bytes)
        self._files = IndexFiles(self.layout, index_entries_per_file, max_open_index_files)
        self._keys = KeyIndex(self.layout)
        self._queues: dict[QueueRef, QueueIndex] = {
            ref: QueueIndex(ref, self._files) for ref in self.layout.indexed_queues()
        }
        self._dirty: set[QueueIndex] = set()
        self._pending_entries = 0
        self._tag_hashes: dict[str, int] = {}
        self._tombstones = self._read_tombstones()
        self._last_ts = 0
        self._closed = False
        self._checkpoint = -1  # last value written; -1 forces the first write
        self.recovery = self._open(fresh)

    # --- opening and recovery
    def _read_checkpoint(self) -> tuple[int, int | None]:
        """(commit offset, total index entries) or (0, None) when missing or damaged."""
        try:
            data = self.layout.checkpoint_path.read_bytes()
        except FileNotFoundError:
            return 0, None
        if len(data) != CHECKPOINT.size + _CRC.size or _CRC.unpack_from(data, CHECKPOINT.size)[0] != crc32c(
            data[:CHECKPOINT.size]
        ):
            logger.warning("checkpoint file is damaged; recovering from the start of the log")
            return 0, None
        magic, version, offset, total = CHECKPOINT.unpack_from(data)
        if magic != CHECKPOINT_MAGIC or version != CHECKPOINT_VERSION:
            return 0, None
        return offset, total

    def _write_checkpoint(self, offset: int, durable: bool) -> None:
        total = sum(q.max_offset for q in self._queues.values())
        self._checkpoint = offset
        body = CHECKPOINT.pack(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, offset, total)
        data = body + _CRC.pack(crc32c(body))
        # Not durable on the periodic path: process-crash safe (page cache survives kill -9), and after a power
        # failure recovery notices indexes behind the checkpoint and re-dispatches; close() writes it durably.
        write_atomically(self.layout.checkpoint_path, data, durable=durable)

    def _read_tombstones(self) -> dict[QueueRef, int]:
        try:
            rows = json.loads(self.layout.tombstones_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            logger.warning("tombstones file is damaged; deleted queues may reappear after recovery")
            return {}
        return {QueueRef(topic, queue_id): offset for topic, queue_id, offset in rows}

    def _write_tombstones(self) -> None:
        rows = [[ref.topic, ref.queue_id, offset] for ref, offset in self._tombstones.items()]
        write_atomically(self.layout.tombstones_path, json.dumps(rows).encode())

    def _open(self, fresh: bool) -> RecoveryReport:
        clean = self.layout.clean_shutdown_path.exists()
        checkpoint, total = self._read_checkpoint()
        log_min = self._log.min_offset
        if log_min:
            for q in self._queues.values():
                q.advance_min(log_min)
        indexed = sum(q.max_offset for q in self._queues.values())
        if clean:
            os.unlink(self.layout.clean_shutdown_path)
            fsync_dir(self.layout.root)
            if total == indexed:
                return RecoveryReport(True, 0, 0, 0, 0, 0)
            logger.warning("clean shutdown marker present but the indexes disagree with the checkpoint; rebuilding")
        if fresh:
            return RecoveryReport(True, 0, 0, 0, 0, 0)
        # fewer entries than the checkpoint vouched for: index files were lost, so re-dispatch the whole log
        behind = total is not None and indexed < total
        return self._recover(clean, checkpoint, full=behind)

    def _recover(self, clean: bool, checkpoint: int, full: bool) -> RecoveryReport:
        start = 0 if full else min(checkpoint, self._log.end_offset)
        first_segment = self._log.segment_of(start)
        self._keys.truncate_from(start, first_segment)
        counters = {"rebuilt": 0, "gap": False}

        def dispatch_partial(offset: int, data: bytes) -> None:
            counters["rebuilt"] += self._dispatch(offset, data, allow_gaps=full, counters=counters)

        scan = self._log.recover(start, dispatch_partial)
        for base in scan.deleted_segments:
            self._keys.drop_segment(base)
        trimmed = 0
        for q in self._queues.values():
            trimmed += q.trim_beyond(scan.end_offset)
        scanned = scan.scanned_bytes
        if counters["gap"]:
            logger.warning("queue indexes are missing entries below the checkpoint; re-dispatching the whole log")
            self._keys.truncate_from(0, 0)

            def dispatch_full(offset: int, data: bytes) -> None:
                counters["rebuilt"] += self._dispatch(offset, data, allow_gaps=True, counters=counters)

            full = self._log.recover(0, dispatch_full)
            for base in full.deleted_segments:
                self._keys.drop_segment(base)
            scanned += full.scanned_bytes
        for q in self._queues.values():
            q.advance_min(self._log.min_offset)
        self.flush_indexes()
        self._files.fsync_all()
        self._keys.fsync_files()
        self._write_checkpoint(self._log.end_offset, durable=True)
        report = RecoveryReport(
            clean=clean,
            scanned_bytes=scanned,
            truncated_bytes=scan.truncated_bytes,
            dropped_records=scan.dropped_records,
            rebuilt_index_entries=counters["rebuilt"],
            trimmed_index_entries=trimmed,
        )
        log_line = (
            "storage recovery: scanned %d bytes from offset %d, truncated %d bytes (%d records), "
            "rebuilt %d index entries, trimmed %d, log end %d"
        )
        level = logging.WARNING if scan.truncated_bytes or trimmed else logging.INFO
        logger.log(level, log_line, scanned, start, scan.truncated_bytes, scan.dropped_records,
                   counters["rebuilt"], trimmed, self._log.end_offset)
        return report

    def _dispatch(self, offset: int, data: bytes, allow_gaps: bool, counters: dict) -> int:
        """Index one recovered record; return how many queue entries were added."""
        record = decode_record(data, verify=False)
        message = record.message
        added = 0
        tag = self._tag_hash(message.tag)
        for topic, queue_id, queue_offset in record.destinations:
            ref = QueueRef(topic, queue_id)
            tombstone = self._tombstones.get(ref)
            if tombstone is not None and offset < tombstone:
                continue
            q = self._queues.get(ref) or self._new_queue(ref)
            if queue_offset < q.max_offset:
                continue
            if queue_offset > q.max_offset:
                if not allow_gaps:
                    counters["gap"] = True
                    continue
                if q.min_offset == q.max_offset:
                    q.start_at(queue_offset)
                else:
                    logger.warning("queue %s has no record for offsets %d..%d; they read as holes",
                                   ref, q.max_offset, queue_offset - 1)
                    while q.max_offset < queue_offset:
                        q.add(0, 0, 0)
            q.add(offset, record.size, tag)
            self._dirty.add(q)
            added += 1
        if message.keys:
            segment = self._log.segment_of(offset)
            for key in message.keys:
                self._keys.add(segment, key_hash(message.topic, key), offset)
        return added

    # --- helpers
    def _tag_hash(self, tag: str) -> int:
        h = self._tag_hashes.get(tag)
        if h is None:
            if len(self._tag_hashes) > 4096:
                self._tag_hashes.clear()
            h = self._tag_hashes[tag] = tag_hash(tag)
        return h

    def _new_queue(self, ref: QueueRef) -> QueueIndex:
        if not isinstance(ref.queue_id, int) or not 0 <= ref.queue_id <= _MAX_QUEUE_ID:
            raise InvalidName(f"queue id {ref.queue_id!r} is not in 0..{_MAX_QUEUE_ID}")
        q = self._queues[ref] = QueueIndex(ref, self._files)
        return q

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown("the message store is closed")

    # --- appending
    def append(self, message: Message, destinations: Sequence[QueueRef]) -> AppendResult:
        if self._closed:
            raise ShuttingDown("the message store is closed")
        now = self._clock()
        store_ts = now if now > self._last_ts else self._last_ts
        queues = self._queues
        if len(destinations) == 1:
            ref = destinations[0]
            q = queues.get(ref) or self._new_queue(ref)
            targets: tuple[QueueIndex, ...] | list[QueueIndex] = (q,)
            dests: list[tuple[str, int, int]] | tuple[tuple[str, int, int], ...] = (
                (ref.topic, ref.queue_id, q.max_offset),
            )
        else:
            targets = []
            dests = []
            for ref in destinations:
                q = queues.get(ref) or self._new_queue(ref)
                dests.append((ref.topic, ref.queue_id, q.max_offset + targets.count(q)))
                targets.append(q)
        record = encode_record(message, store_ts, dests)
        offset = self._log.append(record, store_ts)
        self._last_ts = store_ts
        size = len(record)
        th = self._tag_hashes.get(message.tag)
        if th is None:
            th = self._tag_hash(message.tag)
        dirty = self._dirty
        if len(targets) == 1:
            queue_offsets: tuple[int, ...] = (q.add(offset, size, th),)
            dirty.add(q)
        else:
            queue_offsets = tuple([q.add(offset, size, th) for q in targets])
            dirty.update(targets)
        if message.keys:
            segment = self._log.active_base
            for key in message.keys:
                self._keys.add(segment, key_hash(message.topic, key), offset)
        msg_id = make_msg_id(offset, store_ts)
        message.msg_id = msg_id
        message.store_ts = store_ts
        self._pending_entries += len(targets)
        if self._pending_entries >= self._flush_threshold:
            self.flush_indexes()
        return AppendResult(msg_id, offset, size, store_ts, queue_offsets)

    def append_batch(self, items: Sequence[tuple[Message, Sequence[QueueRef]]]) -> list[AppendResult]:
        self._check_open()
        if not items:
            return []
        now = self._clock()
        store_ts = now if now > self._last_ts else self._last_ts
        queues = self._queues
        claimed: dict[QueueIndex, int] = {}
        records = []
        plans = []
        for message, destinations in items:
            if len(destinations) == 1:
                ref = destinations[0]
                q = queues.get(ref) or self._new_queue(ref)
                extra = claimed.get(q, 0)
                claimed[q] = extra + 1
                records.append(encode_record(message, store_ts, ((ref.topic, ref.queue_id, q.max_offset + extra),)))
                plans.append((q,))
                continue
            targets = []
            dests = []
            for ref in destinations:
                q = queues.get(ref) or self._new_queue(ref)
                extra = claimed.get(q, 0)
                claimed[q] = extra + 1
                targets.append(q)
                dests.append((ref.topic, ref.queue_id, q.max_offset + extra))
            records.append(encode_record(message, store_ts, dests))
            plans.append(targets)
        offsets = self._log.append_batch(records, store_ts)
        self._last_ts = store_ts
        results = []
        tag_hashes = self._tag_hashes
        entries = 0
        for i, offset in enumerate(offsets):
            message = items[i][0]
            size = len(records[i])
            th = tag_hashes.get(message.tag)
            if th is None:
                th = self._tag_hash(message.tag)
            targets = plans[i]
            queue_offsets = tuple([q.add(offset, size, th) for q in targets])
            entries += len(targets)
            if message.keys:
                segment = self._log.segment_of(offset)
                for key in message.keys:
                    self._keys.add(segment, key_hash(message.topic, key), offset)
            msg_id = make_msg_id(offset, store_ts)
            message.msg_id = msg_id
            message.store_ts = store_ts
            results.append(AppendResult(msg_id, offset, size, store_ts, queue_offsets))
        self._dirty.update(claimed)
        self._pending_entries += entries
        if self._pending_entries >= self._flush_threshold:
            self.flush_indexes()
        return results

    # --- durability
    def sync(self) -> int:
        """fsync the log; on the owning thread also write the buffered index entries and the checkpoint."""
        durable = self._log.sync()
        if threading.get_ident() == self._owner and not self._closed:
            self.flush_indexes()
        return durable

    def flush_indexes(self) -> None:
        """Write buffered index and key entries to their files and advance the checkpoint. Owning thread only."""
        checkpoint = min(self._log.durable_offset, self._log.end_offset)
        if not self._dirty and not self._keys.has_pending() and checkpoint == self._checkpoint:
            return  # nothing new: spare the file write on every sync
        for q in self._dirty:
            q.flush()
        self._dirty.clear()
        self._keys.flush()
        self._pending_entries = 0
        self._write_checkpoint(checkpoint, durable=False)

    @property
    def end_offset(self) -> int:
        return self._log.end_offset

    @property
    def durable_offset(self) -> int:
        return self._log.durable_offset

    # --- reading
    def queue_bounds(self, queue: QueueRef) -> QueueBounds:
        q = self._queues.get(queue)
        if q is None:
            return QueueBounds(0, 0)
        return QueueBounds(q.min_offset, q.max_offset)

    def read_index(self, queue: QueueRef, offset: int, max_entries: int) -> list[IndexEntry]:
        q = self._queues.get(queue)
        if q is None:
            if offset == 0:
                return []
            raise OffsetOutOfRange(f"queue {queue} has no entries; offset {offset} is out of range")
        return q.read(offset, max_entries)

    def read_message(self, commit_offset: int, size: int | None = None) -> Message:
        try:
            data = self._log.read(commit_offset, size)
            message = decode_record(data).message
        except CorruptRecord as exc:
            raise MessageNotFound(f"no message at commit offset {commit_offset}: {exc.message}") from None
        message.msg_id = make_msg_id(commit_offset, message.store_ts)
        return message

    def lookup_id(self, msg_id: str) -> Message:
        return find_by_id(self.read_message, msg_id)

    def lookup_key(self, topic: str, key: str, limit: int = 64) -> list[Message]:
        log_min = self._log.min_offset
        offsets = self._keys.lookup(key_hash(topic, key), self._log.segment_bases())
        found: list[Message] = []
        for offset in reversed(offsets):
            if len(found) >= limit:
                break
            if offset < log_min:
                continue
            try:
                message = self.read_message(offset)
            except MessageNotFound:
                continue
            if message.topic == topic and key in message.keys:
                found.append(message)
        found.reverse()
        return found

    def offset_for_time(self, queue: QueueRef, ts_ms: int) -> int:
        q = self._queues.get(queue)
        if q is None:
            return 0
        lo, hi = q.min_offset, q.max_offset
        read_ts = self._log.read_store_ts
        while lo < hi:
            mid = (lo + hi) // 2
            commit, size, _tag = q.entry_at(mid)
            try:
                stored_at = read_ts(commit) if size else -1
            except MessageNotFound:
                stored_at = -1  # removed by retention: older than anything still stored
            if stored_at >= ts_ms:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def queues(self) -> Iterable[QueueRef]:
        return list(self._queues)

    def delete_queue(self, queue: QueueRef) -> None:
        q = self._queues.pop(queue, None)
        if q is None:
            return
        self._dirty.discard(q)
        q.delete()
        # records already in the log still name this queue; recovery must not bring it back
        self._tombstones[queue] = self._log.end_offset
        self._write_tombstones()
        # the checkpoint's entry count must not vouch for the deleted entries
        self.flush_indexes()
        self._write_checkpoint(min(self._log.durable_offset, self._log.end_offset), durable=False)

    # --- retention
    def enforce_retention(self, now_ms: int, max_age_ms: int, max_bytes: int) -> int:
        self._check_open()
        log = self._log
        total = log.disk_bytes()
        deleted = 0
        for base, size in log.sealed_segments():
            too_old = max_age_ms > 0 and now_ms - log.segment_last_store_ts(base) > max_age_ms
            too_big = max_bytes > 0 and total > max_bytes
            if not (too_old or too_big):
                break
            self._keys.drop_segment(base)
            log.delete_segment(base)
            total -= size
            deleted += 1
        if deleted:
            log_min = log.min_offset
            for q in self._queues.values():
                q.advance_min(log_min)
            stale = [ref for ref, offset in self._tombstones.items() if offset <= log_min]
            if stale:
                for ref in stale:
                    del self._tombstones[ref]
                self._write_tombstones()
            logger.info("retention deleted %d commit-log segments; log now starts at %d", deleted, log_min)
        return deleted

    def expire_queue_before(self, queue: QueueRef, ts_ms: int) -> int:
        self._check_open()
        q = self._queues.get(queue)
        if q is None:
            return 0
        return q.expire_to(self.offset_for_time(queue, ts_ms))

    def stats(self) -> StoreStats:
        log = self._log
        return StoreStats(
            segments=len(log.segment_bases()),
            disk_bytes=log.disk_bytes(),
            end_offset=log.end_offset,
            durable_offset=log.durable_offset,
            min_offset=log.min_offset,
        )

    def close(self) -> None:
        if self._closed:
            return
        self.flush_indexes()
        self._log.close()
        try:
            self._files.fsync_all()
            self._keys.fsync_files()
            self._write_checkpoint(self._log.end_offset, durable=True)
            self.layout.clean_shutdown_path.write_bytes(b"")
            fsync_dir(self.layout.root)
        except OSError as exc:
            raise StoreError(f"closing the message store failed: {exc}") from None
        finally:
            self._closed = True
            self._files.close_all()
