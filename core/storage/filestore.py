"""FileMessageStore: the commit log, per-queue indexes and the key index on disk, with crash recovery.

Index entries and key entries are buffered in memory and written in batches (`flush_indexes`): when the buffer is
large, on `sync()` called from the owning thread, and on `close()`. After each batch the *checkpoint* file records a
commit offset below which every record's index entries are on disk; it never exceeds the durable offset.

Opening: when the clean-shutdown marker is present (and the checkpoint agrees with the index files), nothing is
scanned. Otherwise the log is verified from the checkpoint's segment on, cut at the first bad record, the records
after the checkpoint are re-dispatched into the indexes (each record names its destinations and queue offsets, so
re-dispatch is idempotent), and index entries pointing past the recovered end are trimmed. If the indexes turn out
to be missing entries older than the checkpoint (files deleted or lost), the whole log is re-dispatched.
A damaged record in the middle of the log costs only itself: the scan resumes at the next trustworthy record (see
CommitLog.recover), index entries that pointed into the damaged bytes become holes, and the RecoveryReport lists the
dropped ranges.

Faults: every OS call that changes a file goes through a FileIO (core/storage/fileio.py), which tests replace with
one that injects EIO, ENOSPC and short writes. A failed append leaves nothing behind and the store works again once
the disk does; a failed fsync makes the store refuse writes until a restart (CommitLog); a failed background task
(`flush_indexes`, `enforce_retention`, the checkpoint) raises StoreError, keeps its buffers and its old checkpoint,
and succeeds when called again. `health()` says what is wrong for readiness.
"""

from __future__ import annotations

import errno
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
    StoreFull,
)
from tidegate.core.model import AppendResult, IndexEntry, Message, QueueRef, tag_hash
from tidegate.core.storage.api import QueueBounds, RecoveryReport, StoreStats
from tidegate.core.storage.commitlog import SCATTER_MIN_PIECE_BYTES, CommitLog
from tidegate.core.storage.encryption import (
    Keyring,
    decode_sealed_record,
    encode_sealed_record,
    key_uses_json,
    read_key_uses,
    record_current_key,
    verify_keyring,
)
from tidegate.core.storage.fileio import OS_IO, FileIO
from tidegate.core.storage.keyindex import KeyIndex, key_hash
from tidegate.core.storage.layout import StoreLayout, fsync_dir, write_atomically
from tidegate.core.storage.queueindex import IndexFiles, QueueIndex, entry_pack
from tidegate.core.storage.record import (
    SealedRecord,
    decode_record,
    encode_batch,
    encode_record_parts,
    find_by_id,
    index_batch,
    make_msg_id,
    msg_id_suffix,
)
from tidegate.core.storage.tombstones import Tombstones

logger = logging.getLogger("tidegate.storage")

CHECKPOINT = struct.Struct("<IIQQ")  # magic, version, commit offset, total index entries; then crc32c u32
CHECKPOINT_MAGIC = 0x50434754  # b"TGCP"
CHECKPOINT_VERSION = 1
_CRC = struct.Struct("<I")
_MAX_QUEUE_ID = 0xFFFFFFFF
# A single record this large is appended as its pieces (CommitLog.append_parts: writev when the pieces are large).
_SCATTER_RECORD_BYTES = 3 * SCATTER_MIN_PIECE_BYTES
_SPACE_BACK_BYTES = 16 << 20  # free space at which health() stops reporting a full disk seen by an append


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
        io: FileIO | None = None,
        keyring: Keyring | None = None,
        page_cache_bytes: int = 0,
    ) -> None:
        """`keyring` turns on encryption at rest (core/storage/encryption.py): new records are sealed with its
        current key. Raises EncryptionKeyError when the log holds sealed records the keyring cannot open.
        `page_cache_bytes` > 0: synced commit-log pages further than that behind the end are dropped from the OS
        page cache after each fsync (`CommitLog`); 0 leaves the cache to the OS."""
        self.layout = StoreLayout(data_dir)
        fresh = not self.layout.commitlog_dir.exists()
        self.layout.create_dirs()
        self._io = io = io or OS_IO
        self._clock = clock_ms or _default_clock_ms
        self._owner = threading.get_ident()
        self._flush_threshold = index_flush_entries
        self._write_error: str | None = None  # the last append failed (disk full, EIO); cleared by the next success
        self._full = False  # ... because the disk was full: health() also clears it once space is back
        self._background_errors: dict[str, str] = {}  # task -> why its last run failed; cleared by its next success
        self._log = CommitLog(self.layout, segment_bytes, io=io, page_cache_bytes=page_cache_bytes)
        self._files = IndexFiles(self.layout, index_entries_per_file, max_open_index_files, io=io)
        self._keys = KeyIndex(self.layout, io=io)
        self._queues: dict[QueueRef, QueueIndex] = {
            ref: QueueIndex(ref, self._files) for ref in self.layout.indexed_queues()
        }
        self._dirty: set[QueueIndex] = set()
        self._pending_entries = 0
        self._tag_hashes: dict[str, int] = {}
        self._tombstones = Tombstones(self.layout.tombstones_path, io=io)
        self._last_ts = 0
        self._closed = False
        self._checkpoint = -1  # last value written; -1 forces the first write
        self._keyring = keyring
        key_uses = read_key_uses(self.layout.encryption_keys_path)
        try:
            verify_keyring(key_uses, keyring, self._log.min_offset, self._log.end_offset,
                           self.layout.encryption_keys_path)
        except StoreError:
            self._log.release()  # nothing was written: refuse before recovery touches the data
            raise
        self.recovery = self._open(fresh)
        if keyring is not None:
            self._start_sealing(key_uses, keyring)

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
        """Write the checkpoint; `_checkpoint` moves only once the write succeeded (OSError propagates)."""
        total = sum(q.max_offset for q in self._queues.values())
        body = CHECKPOINT.pack(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, offset, total)
        data = body + _CRC.pack(crc32c(body))
        # Not durable on the periodic path: process-crash safe (page cache survives kill -9), and after a power
        # failure recovery notices indexes behind the checkpoint and re-dispatches; close() writes it durably.
        write_atomically(self.layout.checkpoint_path, data, durable=durable, io=self._io)
        self._checkpoint = offset

    # --- health
    def health(self) -> tuple[bool, str]:
        """(ok, reason) for readiness: a failed log (fsync error: restart to recover), the last append's failure,
        the last failure of each background task. Reason is "" when ok."""
        reasons = []
        failure = self._log.failure
        if failure is not None:
            reasons.append(f"{failure}: the store refuses writes until a restart")
        if self._write_error is not None and self._full and self._space_is_back():
            self._write_error = None  # the next append will most likely work: do not keep publishers away
        if self._write_error is not None:
            reasons.append(self._write_error)
        reasons.extend(f"{task} failed: {why}" for task, why in self._background_errors.items())
        return (not reasons, "; ".join(reasons))

    def _append_failed(self, exc: StoreFull | StoreError) -> None:
        self._write_error = f"append failed: {exc.message}"
        self._full = isinstance(exc, StoreFull)

    def _space_is_back(self) -> bool:
        """Whether the data directory's filesystem has room again (so readiness need not wait for an append)."""
        try:
            st = os.statvfs(self.layout.root)
        except OSError:
            return False
        # 16 MiB back, or a quarter of a small file system (which may never have 16 MiB free at all)
        return st.f_bavail * st.f_frsize >= min(_SPACE_BACK_BYTES, st.f_blocks * st.f_frsize // 4)

    def _background_failed(self, task: str, exc: BaseException) -> StoreError:
        """Remember why `task` failed (health) and return the StoreError its caller gets."""
        if isinstance(exc, OSError):
            why = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"I/O error: {exc}"
        else:
            why = getattr(exc, "message", None) or str(exc)
        self._background_errors[task] = why
        return StoreError(f"{task} failed ({why}); it can be retried")

    def _open(self, fresh: bool) -> RecoveryReport:
        try:
            self._tombstones.prune(self._log.min_offset)
        except OSError as exc:
            raise StoreError(f"cannot rewrite the tombstones file: {exc}") from None
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
        dropped: set[tuple[int, int]] = set()

        def on_dropped(start_offset: int, end_offset: int) -> None:
            dropped.add((start_offset, end_offset))  # records after a skipped range may leave gaps: holes

        def dispatch_partial(offset: int, data: bytes) -> None:
            counters["rebuilt"] += self._dispatch(offset, data, allow_gaps=full or bool(dropped), counters=counters)

        scan = self._log.recover(start, dispatch_partial, self._plausible, on_dropped)
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

            full_scan = self._log.recover(0, dispatch_full, self._plausible, on_dropped)
            for base in full_scan.deleted_segments:
                self._keys.drop_segment(base)
            scanned += full_scan.scanned_bytes
        holes = 0
        if dropped:
            # entries indexed before the crash may point into the skipped bytes: make them holes, never garbage
            for q in self._queues.values():
                for start_offset, end_offset in sorted(dropped):
                    holes += q.punch_holes(start_offset, end_offset)
                    self._dirty.add(q)
        for q in self._queues.values():
            q.advance_min(self._log.min_offset)
        self.flush_indexes()
        self._files.fsync_all()
        self._keys.fsync_files()
        self._write_checkpoint(self._log.end_offset, durable=True)
        ranges = tuple(sorted(dropped))
        dropped_bytes = sum(end_offset - start_offset for start_offset, end_offset in ranges)
        report = RecoveryReport(
            clean=clean,
            scanned_bytes=scanned,
            truncated_bytes=scan.truncated_bytes,
            dropped_records=scan.dropped_records,
            rebuilt_index_entries=counters["rebuilt"],
            trimmed_index_entries=trimmed,
            dropped_bytes=dropped_bytes,
            dropped_ranges=ranges,
        )
        if ranges:
            shown = ", ".join(f"[{a}, {b})" for a, b in ranges[:10]) + (" ..." if len(ranges) > 10 else "")
            logger.warning("storage recovery: skipped %d damaged bytes of the commit log in %d ranges (%s); the valid "
                           "records after them were kept, %d index entries into them became holes",
                           dropped_bytes, len(ranges), shown, holes)
        log_line = (
            "storage recovery: scanned %d bytes from offset %d, truncated %d tail bytes, skipped %d damaged bytes "
            "(%d records lost), rebuilt %d index entries, trimmed %d, log end %d"
        )
        level = logging.WARNING if scan.truncated_bytes or trimmed or ranges else logging.INFO
        logger.log(level, log_line, scanned, start, scan.truncated_bytes, dropped_bytes, scan.dropped_records,
                   counters["rebuilt"], trimmed, self._log.end_offset)
        return report

    def _plausible(self, offset: int, data: bytes) -> bool:
        """Whether a record found by searching past damaged bytes can be real: it decodes, and no queue index holds
        a different record at a queue offset it claims (an embedded copy of a record fails this)."""
        try:
            record = decode_record(data, verify=False)
        except CorruptRecord:
            return False
        for topic, queue_id, queue_offset in record.destinations:
            q = self._queues.get(QueueRef(topic, queue_id))
            if q is None or not q.min_offset <= queue_offset < q.max_offset:
                continue
            commit, size, _tag = q.entry_at(queue_offset)
            if size and (commit, size) != (offset, len(data)):
                return False
        return True

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

    # --- encryption at rest
    def _start_sealing(self, key_uses: list, keyring: Keyring) -> None:
        """Note the current key in the key check file (before it seals anything), then route appends through the
        sealing twins; the plain `append`/`append_batch` stay untouched, so a store without a keyring pays
        nothing for encryption."""
        updated = record_current_key(key_uses, keyring, self._log.end_offset)
        if updated is not None:
            try:
                write_atomically(self.layout.encryption_keys_path, key_uses_json(updated), io=self._io)
            except OSError as exc:
                raise StoreError(f"cannot write the key check file: {exc}") from None
            logger.info("encryption at rest: new records are sealed with key %r", keyring.current)
        self.append = self._append_sealed  # type: ignore[method-assign]
        self.append_batch = self._append_batch_sealed  # type: ignore[method-assign]

    def _open_sealed(self, data: bytes, commit_offset: int) -> Message:
        if self._keyring is None:
            raise MessageNotFound(f"no message at commit offset {commit_offset}: the record is encrypted and the "
                                  "store has no encryption key")
        try:
            return decode_sealed_record(data, commit_offset, self._keyring)
        except CorruptRecord as exc:
            raise MessageNotFound(f"no message at commit offset {commit_offset}: {exc.message}") from None

    def _append_sealed(self, message: Message, destinations: Sequence[QueueRef]) -> AppendResult:
        return self._append_batch_sealed(((message, destinations),))[0]

    def _append_batch_sealed(self, items: Sequence[tuple[Message, Sequence[QueueRef]]]) -> list[AppendResult]:
        """append_batch with sealed records (mirrors it: keep the two in step). Each record binds the commit
        offset the log's placer predicts for it; a different actual offset would make it unreadable, so it is
        checked and fails the log (never an acknowledgement for a record that cannot be opened)."""
        self._check_open()
        if not items:
            return []
        now = self._clock()
        store_ts = now if now > self._last_ts else self._last_ts
        keyring = self._keyring
        assert keyring is not None
        place = self._log.placer()
        planned: list[int] = []

        def place_and_note(length: int) -> int:
            offset = place(length)
            planned.append(offset)
            return offset

        claimed: dict[QueueIndex, int] = {}
        records = []
        plans: list[tuple[tuple[QueueIndex, ...], tuple[int, ...]]] = []
        for message, destinations in items:
            targets, dests, queue_offsets = self._plan(destinations, claimed)
            records.append(encode_sealed_record(message, store_ts, dests, keyring, place_and_note))
            plans.append((targets, queue_offsets))
        try:
            offsets = self._log.append_batch(records, store_ts)
        except (StoreFull, StoreError) as exc:
            self._append_failed(exc)
            raise
        if offsets != planned:
            raise self._log._fail(f"sealed records landed at {offsets[:3]}, not at the planned {planned[:3]}")
        return self._commit_batch(items, plans, claimed, offsets, [len(record) for record in records], store_ts)

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
        parts: list[bytes] = []
        size = encode_record_parts(parts, message, store_ts, dests)
        try:
            if size >= _SCATTER_RECORD_BYTES:  # a large body is written as its own piece, never joined
                offset = self._log.append_parts(parts, [size], size, store_ts)[0]
            else:
                offset = self._log.append(b"".join(parts), store_ts)
        except (StoreFull, StoreError) as exc:
            self._append_failed(exc)
            raise
        if self._write_error is not None:
            self._write_error = None
        self._last_ts = store_ts
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
            self._flush_quietly()
        return AppendResult(msg_id, offset, size, store_ts, queue_offsets)

    def append_batch(self, items: Sequence[tuple[Message, Sequence[QueueRef]]]) -> list[AppendResult]:
        """Append a batch: `record.encode_batch` plans the queue offsets and encodes the records as pieces of one
        list, written with one join and one write (`CommitLog.append_parts`); `record.index_batch` then builds
        the index entries as one bytes block per queue, stamps the messages and builds the results (both are one
        compiled call each with the accelerator). `_append_batch_sealed` is the twin for encrypted stores."""
        self._check_open()
        if not items:
            return []
        now = self._clock()
        store_ts = now if now > self._last_ts else self._last_ts
        queues = self._queues
        slots: list[QueueIndex] = []  # the queues of this batch, in first-seen order
        slot_of: dict[QueueIndex, int] = {}
        bases: list[int] = []
        counts: list[int] = []

        def resolve(destinations: Sequence[QueueRef]) -> tuple[tuple[int, str, int], ...]:
            # once per distinct destinations object of the batch (the producer shares them), not per message
            plan = []
            for ref in destinations:
                q = queues.get(ref) or self._new_queue(ref)
                slot = slot_of.get(q)
                if slot is None:
                    slot = slot_of[q] = len(slots)
                    slots.append(q)
                    bases.append(q.max_offset)
                    counts.append(0)
                plan.append((slot, ref.topic, ref.queue_id))
            return tuple(plan)

        parts: list[bytes] = []
        sizes: list[int] = []
        plans = encode_batch(parts, sizes, items, store_ts, resolve, bases, counts)
        try:
            offsets = self._log.append_parts(parts, sizes, sum(sizes), store_ts)
        except (StoreFull, StoreError) as exc:
            self._append_failed(exc)
            raise
        if self._write_error is not None:
            self._write_error = None
        self._last_ts = store_ts
        blocks, results, keyed = index_batch(items, offsets, sizes, plans, counts, self._tag_hashes,
                                             self._tag_hash, msg_id_suffix(store_ts), store_ts, AppendResult)
        for q, block, count in zip(slots, blocks, counts, strict=True):
            q.add_block(block, count)
        for i in keyed:
            message, offset = items[i][0], offsets[i]
            segment = self._log.segment_of(offset)
            for key in message.keys:
                self._keys.add(segment, key_hash(message.topic, key), offset)
        self._dirty.update(slots)
        self._pending_entries += sum(counts)
        if self._pending_entries >= self._flush_threshold:
            self._flush_quietly()
        return results

    def _plan(self, destinations: Sequence[QueueRef], claimed: dict[QueueIndex, int]
              ) -> tuple[tuple[QueueIndex, ...], list[tuple[str, int, int]], tuple[int, ...]]:
        """Queues, record destinations and queue offsets of one message, claiming its offsets in `claimed` (the
        entries of this batch per queue so far; a queue named twice gets two consecutive offsets)."""
        queues = self._queues
        targets: list[QueueIndex] = []
        dests = []
        queue_offsets = []
        for ref in destinations:
            q = queues.get(ref) or self._new_queue(ref)
            extra = claimed.get(q, 0)
            claimed[q] = extra + 1
            queue_offset = q.max_offset + extra
            targets.append(q)
            dests.append((ref.topic, ref.queue_id, queue_offset))
            queue_offsets.append(queue_offset)
        return tuple(targets), dests, tuple(queue_offsets)

    def _commit_batch(self, items: Sequence[tuple[Message, Sequence[QueueRef]]],
                      plans: list[tuple[tuple[QueueIndex, ...], tuple[int, ...]]], claimed: dict[QueueIndex, int],
                      offsets: list[int], sizes: list[int], store_ts: int) -> list[AppendResult]:
        """After a batch's records are written: stamp the messages, buffer the index entries (one bytes block per
        queue) and the key entries, and build the results. Shared by the plain and the sealed append."""
        if self._write_error is not None:
            self._write_error = None
        self._last_ts = store_ts
        tag_hashes = self._tag_hashes
        suffix = msg_id_suffix(store_ts)
        new_result = tuple.__new__  # AppendResult(...) without NamedTuple's Python-level __new__
        results = []
        single = len(claimed) == 1
        if single:
            entries: list[bytes] = []
            add_entry = entries.append
        else:
            per_queue: dict[QueueIndex, list[bytes]] = {q: [] for q in claimed}
            add_to = {q: block.append for q, block in per_queue.items()}
        last_tag: str | None = None
        th = 0
        add_result = results.append
        for (message, _), offset, size, (targets, queue_offsets) in zip(items, offsets, sizes, plans, strict=True):
            tag = message.tag
            if tag != last_tag:  # a batch is mostly one tag (or none): hash it once per run
                th = tag_hashes.get(tag)
                if th is None:
                    th = self._tag_hash(tag)
                last_tag = tag
            entry = entry_pack(offset, size, th)
            if single:
                for _ in targets:
                    add_entry(entry)
            elif len(targets) == 2:
                q0, q1 = targets
                add_to[q0](entry)
                add_to[q1](entry)
            else:
                for q in targets:
                    add_to[q](entry)
            if message.keys:
                segment = self._log.segment_of(offset)
                for key in message.keys:
                    self._keys.add(segment, key_hash(message.topic, key), offset)
            msg_id = f"{offset:016X}{suffix}"
            message.msg_id = msg_id
            message.store_ts = store_ts
            add_result(new_result(AppendResult, (msg_id, offset, size, store_ts, queue_offsets)))
        if single:
            for q in claimed:
                q.add_block(b"".join(entries), len(entries))
        else:
            for q, block in per_queue.items():
                q.add_block(b"".join(block), len(block))
        self._dirty.update(claimed)
        self._pending_entries += sum(claimed.values())
        if self._pending_entries >= self._flush_threshold:
            self._flush_quietly()
        return results

    # --- durability
    def sync(self) -> int:
        """fsync the log; on the owning thread also write the buffered index entries and the checkpoint.

        Raises StoreError when the fsync fails, then and on every later call (see CommitLog.sync). A failure to
        write the indexes does not fail the sync (the records are durable): it shows in `health()` and the next
        flush retries it.
        """
        durable = self._log.sync()
        if threading.get_ident() == self._owner and not self._closed:
            self._flush_quietly()
        return durable

    def sync_log(self) -> int:
        """fsync the log only, on any thread: what `sync()` does off the owning thread. The buffered index entries
        and the checkpoint wait for the periodic `flush_indexes` (the broker's inline fsync on the reactor thread
        uses this, so a message at low rate does not pay for index and checkpoint file writes). Same failure rules
        as `sync()`."""
        return self._log.sync()

    def _flush_quietly(self) -> None:
        """flush_indexes from the append and sync paths: a failure is kept for health() and retried later (after
        another `index_flush_entries` entries, or the next sync), never raised into an append that succeeded."""
        was_failing = "index flush" in self._background_errors
        try:
            self.flush_indexes()
        except StoreError as exc:
            self._pending_entries = 0  # back off: the next attempt comes after another batch of entries
            if not was_failing:  # one line when it starts failing, not one per sync
                logger.warning("%s", exc.message)
            return
        if was_failing:
            logger.info("index flush works again")

    def flush_indexes(self, sync_tombstones: bool = True) -> None:
        """Write buffered index and key entries to their files and advance the checkpoint. Owning thread only.

        Also fsyncs tombstone lines appended since the last flush (one fsync for any number of deletions), unless
        `sync_tombstones` is False (delete_queue's own flush: the deletion path never fsyncs).
        Raises StoreError on an I/O error (disk full, EIO) and loses nothing: entries not written stay buffered
        (index writes are positioned, so a retry rewrites the same bytes), the checkpoint stays where it was, and
        calling again once the disk works finishes the job. The error shows in `health()` until then.
        """
        checkpoint = min(self._log.durable_offset, self._log.end_offset)
        if not self._dirty and not self._keys.has_pending() and checkpoint == self._checkpoint:
            self._background_errors.pop("index flush", None)  # nothing left that failed
            return  # nothing new: spare the file write on every sync
        try:
            for q in self._dirty:
                q.flush()
            self._dirty.clear()
            self._keys.flush()
            if sync_tombstones:
                self._tombstones.sync()
            self._write_checkpoint(checkpoint, durable=False)
        except OSError as exc:
            raise self._background_failed("index flush", exc) from None
        self._pending_entries = 0
        self._background_errors.pop("index flush", None)

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
        return q.read(offset, max_entries)  # holes left out: see QueueIndex.read

    def read_message(self, commit_offset: int, size: int | None = None) -> Message:
        try:
            data = self._log.read(commit_offset, size)
            message = decode_record(data).message
        except SealedRecord:
            message = self._open_sealed(data, commit_offset)
        except CorruptRecord as exc:
            raise MessageNotFound(f"no message at commit offset {commit_offset}: {exc.message}") from None
        message.msg_id = make_msg_id(commit_offset, message.store_ts)
        return message

    def lookup_id(self, msg_id: str) -> Message:
        return find_by_id(self.read_message, msg_id)

    def lookup_key(self, topic: str, key: str, limit: int = 64) -> list[Message]:
        log_min = self._log.min_offset
        offsets = list(dict.fromkeys(self._keys.lookup(key_hash(topic, key), self._log.segment_bases())))
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
        """Forget the queue; its tombstone (one appended line, no fsync here) keeps recovery from reviving it.

        Raises StoreError when the tombstone cannot be written (the queue is then untouched)."""
        q = self._queues.get(queue)
        if q is None:
            return
        # records already in the log still name this queue; recovery must not bring it back
        try:
            self._tombstones.add(queue, self._log.end_offset)
        except OSError as exc:
            raise StoreError(f"cannot record the deletion of queue {queue}: {exc}") from None
        del self._queues[queue]
        self._dirty.discard(q)
        try:
            q.delete()
        except OSError as exc:
            raise StoreError(f"deleting the index files of queue {queue} failed: {exc}") from None
        # the checkpoint's entry count must not vouch for the deleted entries (or the next crash recovery would
        # think index files were lost and re-dispatch the whole log); a failure here is retried by the next flush
        self._checkpoint = -1
        try:
            self.flush_indexes(sync_tombstones=False)
        except StoreError as exc:
            logger.warning("%s", exc.message)

    # --- retention
    def enforce_retention(self, now_ms: int, max_age_ms: int, max_bytes: int) -> int:
        """See MessageStore. Raises StoreError on an I/O error after doing what it could (every segment deleted
        before the error stays deleted and the indexes follow); calling again retries the rest."""
        self._check_open()
        log = self._log
        total = log.disk_bytes()
        deleted = 0
        error: BaseException | None = None
        try:
            for base, size in log.sealed_segments():
                too_old = max_age_ms > 0 and now_ms - log.segment_last_store_ts(base) > max_age_ms
                too_big = max_bytes > 0 and total > max_bytes
                if not (too_old or too_big):
                    break
                log.delete_segment(base)  # first: a key file left behind is harmless, a segment without one is not
                total -= size
                deleted += 1
                self._keys.drop_segment(base)
        except (OSError, StoreError) as exc:
            error = exc
        if deleted:
            log_min = log.min_offset
            try:
                for q in self._queues.values():
                    q.advance_min(log_min)
                self._tombstones.prune(log_min)
            except OSError as exc:
                error = error or exc
            logger.info("retention deleted %d commit-log segments; log now starts at %d", deleted, log_min)
        if error is not None:
            raise self._background_failed("retention", error)
        self._background_errors.pop("retention", None)
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
        """See MessageStore. A store whose log failed (fsync error) only closes its files: it writes neither the
        checkpoint nor the clean-shutdown marker, so the next open recovers from the log."""
        if self._closed:
            return
        failure = self._log.failure
        try:
            if failure is None:
                self.flush_indexes()
            self._log.close()
            if failure is None:
                self._files.fsync_all()
                self._keys.fsync_files()
                self._tombstones.close()
                self._write_checkpoint(self._log.end_offset, durable=True)
                self.layout.clean_shutdown_path.write_bytes(b"")
                fsync_dir(self.layout.root, self._io)
            else:
                logger.error("message store closed after a failure (%s): no clean-shutdown marker, the next open "
                             "recovers from the commit log", failure)
        except OSError as exc:
            raise StoreError(f"closing the message store failed: {exc}") from None
        finally:
            self._closed = True
            self._files.close_all()
            self._tombstones.close_quietly()
            self._log.release()
