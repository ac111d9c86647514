"""The commit log: fixed-size segments of records, appended by one thread, fsynced by another.

Segments are files named by their 20-digit base offset (StoreLayout). Offsets are logical: a segment covers
[base, next base) and its file holds the records plus a short filler header at the end, so a rolled segment's
file is shorter than `segment_bytes`; the next segment starts at the base of the previous plus `segment_bytes`.

Threading: `append*`, `read`, recovery and segment deletion run on the owning (reactor) thread; `sync()` may
run on a flusher thread at the same time. `_lock` guards the bookkeeping the two share (active fd, dirty
segments, durable offset); an fd the flusher may be fsyncing is never closed by the appender — it is parked in
`_retired` and closed by the flusher once its fsync returns.

Faults fail closed. A write error (disk full, EIO) cuts the partial record back and the append raises; later appends
work once the disk does. Two errors are fatal until a restart, because the log could otherwise lie: a failed fsync
(the kernel may have dropped the dirty pages, so a retried fsync could "succeed" over lost data — PostgreSQL's fsync
lesson) and a failed cut-back of a partial write (the next append would land after torn bytes). Then `failure` says
why, appends raise StoreError and `sync()` keeps failing; the next open recovers from the log, verifying every record
after the checkpoint by its CRC.

Recovery loses only what is damaged: a record in the middle of a segment that fails its checks is skipped and the
scan resumes at the next trustworthy record (its own length, when its header is intact; otherwise the next record
magic whose record passes its CRC and the caller's plausibility check). A damaged tail of the last segment (a crash
mid-append) is cut off, as is everything after a damaged filler that has no later segment.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from tidegate.core.errors import CorruptRecord, MessageNotFound, MessageTooLarge, StoreError, StoreFull
from tidegate.core.storage.fileio import OS_IO, FileIO, pwrite_all
from tidegate.core.storage.layout import DATA_FILE_MODE, StoreLayout, fsync_dir
from tidegate.core.storage.record import (
    ENCRYPTED_MAGIC,
    FILLER_MAGIC,
    FILLER_SIZE,
    MESSAGE_MAGIC,
    MIN_RECORD_SIZE,
    PREFIX,
    PREFIX_SIZE,
    STR_LEN,
    check_record,
    decode_filler,
    encode_filler,
    record_store_ts,
)

logger = logging.getLogger("tidegate.storage")

_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A batch whose pieces average at least this many bytes is written with os.writev of the pieces, not a join and a
# write: joining would copy every large body once more in user space; below it, one join is cheaper than the
# kernel's per-piece work.
SCATTER_MIN_PIECE_BYTES = 4096
# Linux's IOV_MAX: a batch of more pieces is written with one writev per this many.
MAX_SCATTER_PIECES = 1024
# Page-cache advice (`page_cache_bytes`): only where the OS has it (Linux, the BSDs); elsewhere nothing is dropped.
_fadvise_dontneed: Callable[[int, int, int], None] | None = None
if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"):
    def _fadvise_dontneed(fd: int, start: int, length: int) -> None:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
_PAGE = 4096
_len_unpack = STR_LEN.unpack
_MESSAGE_MAGIC_BYTES = MESSAGE_MAGIC.to_bytes(4, "little")
_ENCRYPTED_MAGIC_BYTES = ENCRYPTED_MAGIC.to_bytes(4, "little")


@dataclass(slots=True)
class ScanResult:
    scanned_bytes: int = 0
    truncated_bytes: int = 0
    dropped_records: int = 0
    deleted_segments: tuple[int, ...] = ()
    end_offset: int = 0
    dropped_bytes: int = 0  # damaged bytes skipped in the middle of the log (valid records after them were kept)
    dropped_ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) commit offsets skipped


def _count_records_best_effort(data: bytes | mmap.mmap, pos: int, end: int | None = None) -> int:
    """How many records (whole or partial) lie in [pos, end), following lengths while they look sane."""
    count = 0
    size = len(data) if end is None else end
    while pos < size:
        count += 1
        if size - pos < PREFIX.size:
            break
        length, magic, _crc = PREFIX.unpack_from(data, pos)
        if magic == FILLER_MAGIC:
            count -= 1  # a filler is padding, not a message
            break
        if (magic != MESSAGE_MAGIC and magic != ENCRYPTED_MAGIC) or length < MIN_RECORD_SIZE or pos + length > size:
            break
        pos += length
    return count


class CommitLog:
    def __init__(self, layout: StoreLayout, segment_bytes: int, read_fd_cache: int = 64, io: FileIO = OS_IO,
                 page_cache_bytes: int = 0) -> None:
        """`page_cache_bytes` > 0: after each fsync, ask the OS to drop the cached pages of the log that lie more
        than this many bytes behind the durable end (they are on disk: a reader of them reads the disk). A log
        that only grows otherwise keeps taking never-used pages for its cache, which costs far more per byte
        written than reusing the ones it just released (docs/performance.md, "Third pass"). 0: the OS decides."""
        if segment_bytes < 4 * (MIN_RECORD_SIZE + FILLER_SIZE):
            raise ValueError(f"segment_bytes {segment_bytes} is too small")
        self.layout = layout
        self.segment_bytes = segment_bytes
        self._io = io
        self._write: Callable[[int, bytes], int] = io.write  # cached: the per-record path pays no extra lookup
        # writev of a batch's pieces, only with the production file layer: a test's FaultyFileIO routes `write`,
        # so with it every batch is joined and written through its `write`, where faults are injected.
        self._writev: Callable[[int, Sequence[bytes]], int] | None = os.writev if io.write is os.write else None
        self._failed: str | None = None  # why the log refuses writes until a restart (fsync or cut-back failed)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._read_fds: OrderedDict[int, int] = OrderedDict()
        self._read_fd_cache = read_fd_cache
        self._dirty_sealed: set[int] = set()
        self._busy_fd = -1
        self._retired: list[int] = []
        self._generation = 0
        self._dir_dirty = False
        self._last_ts: dict[int, int] = {}
        self._sizes: dict[int, int] = {}  # file sizes of sealed segments
        self._page_cache_bytes = page_cache_bytes if _fadvise_dontneed is not None else 0

        self._bases = layout.segment_bases()
        if not self._bases:
            io.close(self._create_segment_file(0))
            fsync_dir(layout.commitlog_dir, io)
            self._bases = [0]
        for base in self._bases[:-1]:
            self._sizes[base] = os.stat(layout.segment_path(base)).st_size
        self._active_base = self._bases[-1]
        self._active_fd = io.open(layout.segment_path(self._active_base), os.O_RDWR | os.O_APPEND)
        self._pos = os.fstat(self._active_fd).st_size
        self._active_last_ts = 0
        self._end = self._active_base + self._pos
        self._durable = self._end
        self._uncached_below = self._end  # pages of the log below this offset were dropped (or never written here)

    # --- properties
    @property
    def end_offset(self) -> int:
        return self._end

    @property
    def durable_offset(self) -> int:
        return self._durable

    @property
    def min_offset(self) -> int:
        return self._bases[0]

    @property
    def active_base(self) -> int:
        return self._active_base

    def segment_bases(self) -> list[int]:
        return list(self._bases)

    def segment_of(self, offset: int) -> int:
        return self._bases[max(0, bisect_right(self._bases, offset) - 1)]

    def disk_bytes(self) -> int:
        return sum(self._sizes.values()) + self._pos

    @property
    def failure(self) -> str | None:
        """Why the log refuses appends until a restart, or None while it is healthy."""
        return self._failed

    def _fail(self, reason: str) -> StoreError:
        """Enter the failed state (first reason wins) and return the error to raise."""
        if self._failed is None:
            self._failed = reason
        return StoreError(f"{self._failed}; the commit log refuses writes: restart to recover")

    # --- writing
    def _create_segment_file(self, base: int) -> int:
        try:
            return self._io.open(self.layout.segment_path(base), os.O_RDWR | os.O_CREAT | os.O_APPEND, DATA_FILE_MODE)
        except OSError as exc:
            if exc.errno in _FULL_DISK_ERRNOS:
                raise StoreFull(f"cannot create segment {base}: disk full") from None
            raise StoreError(f"cannot create segment {base}: {exc}") from None

    def _write_fully(self, data: bytes) -> None:
        """Write all of `data` at the end of the active segment, or nothing (a partial write is cut back).

        Short writes are continued. If the cut-back itself fails, torn bytes stay where the next append would go
        (the fd appends), so the log enters the failed state instead of building on them.
        """
        fd = self._active_fd
        try:
            written = self._write(fd, data)
            if written < len(data):
                self._finish_write(fd, memoryview(data), written)
        except OSError as exc:
            self._write_failed(fd, exc)

    def _writev_fully(self, pieces: Sequence[bytes], total: int) -> None:
        """`_write_fully` of the concatenation of `pieces` (`total` bytes), written with one writev per
        MAX_SCATTER_PIECES pieces (IOV_MAX) and no join. A short writev (rare: a signal, a nearly full disk) is
        finished from its group joined into one buffer."""
        fd = self._active_fd
        writev = self._writev
        assert writev is not None
        try:
            if len(pieces) <= MAX_SCATTER_PIECES:
                written = writev(fd, pieces)
                if written < total:
                    self._finish_write(fd, memoryview(b"".join(pieces)), written)
                return
            for start in range(0, len(pieces), MAX_SCATTER_PIECES):
                group = pieces[start:start + MAX_SCATTER_PIECES]
                written = writev(fd, group)
                if written < sum(map(len, group)):
                    self._finish_write(fd, memoryview(b"".join(group)), written)
        except OSError as exc:
            self._write_failed(fd, exc)  # cuts back to before the batch, whichever group failed

    def _finish_write(self, fd: int, view: memoryview, written: int) -> None:
        """Write the rest of `view` after a short write of `written` bytes (raises OSError as a write does)."""
        while written < len(view):
            step = self._write(fd, view[written:])
            if step <= 0:
                raise OSError(errno.EIO, "write made no progress")
            written += step

    def _write_failed(self, fd: int, exc: OSError) -> None:
        """Cut a failed append back to the last whole record and raise StoreFull or StoreError."""
        self._cut_back(fd, self._pos)
        if exc.errno in _FULL_DISK_ERRNOS:
            raise StoreFull("the commit log's disk is full") from None
        raise StoreError(f"commit log write failed: {exc}") from None

    def _cut_back(self, fd: int, pos: int) -> None:
        """Truncate the active segment to `pos` after a failed write; failing that, fail the log."""
        try:
            self._io.ftruncate(fd, pos)
        except OSError as exc:
            raise self._fail(f"cannot cut a failed commit-log write back ({exc})") from None

    def _release_fd(self, fd: int) -> None:
        """Close `fd` unless the flusher is fsyncing it; then the flusher closes it. Call with _lock held."""
        if fd == self._busy_fd:
            self._retired.append(fd)
        else:
            self._io.close(fd)

    def _roll(self, incoming_ts: int) -> None:
        """Pad the active segment with a filler and make a new empty segment active.

        The filler records the segment's newest store_ts for retention. When it is unknown (no append since
        open), the incoming record's store_ts stands in: never older than the truth, so retention is late at
        worst, never early.
        """
        old_base, pos = self._active_base, self._pos
        new_base = old_base + max(self.segment_bytes, pos + FILLER_SIZE)
        last_ts = self._active_last_ts or incoming_ts
        self._write_fully(encode_filler(new_base - old_base - pos, last_ts))
        try:
            new_fd = self._create_segment_file(new_base)
        except StoreError:
            self._cut_back(self._active_fd, pos)
            raise
        with self._lock:
            self._release_fd(self._active_fd)
            self._sizes[old_base] = pos + FILLER_SIZE
            self._last_ts[old_base] = last_ts
            self._dirty_sealed.add(old_base)
            self._bases.append(new_base)
            self._active_base, self._active_fd, self._pos = new_base, new_fd, 0
            self._active_last_ts = 0
            self._dir_dirty = True

    def _check_size(self, length: int) -> None:
        if length + FILLER_SIZE > self.segment_bytes:
            raise MessageTooLarge(
                f"record of {length} bytes does not fit a commit-log segment of {self.segment_bytes} bytes"
            )

    def append(self, record: bytes, store_ts: int) -> int:
        """Write one record; return its commit offset. Raises MessageTooLarge, StoreFull or StoreError (nothing
        written)."""
        if self._failed is not None:
            raise self._fail(self._failed)
        length = len(record)
        if self._pos + length + FILLER_SIZE > self.segment_bytes:
            self._check_size(length)
            self._roll(store_ts)
        offset = self._active_base + self._pos
        self._write_fully(record)
        self._pos += length
        self._active_last_ts = store_ts
        self._end = offset + length
        return offset

    def placer(self) -> Callable[[int], int]:
        """A function giving the commit offset where the next record of that length will land, for records that
        are then appended in the order asked (one `append`, or one `append_batch` of all of them).

        It mirrors the roll rule of `append`/`append_batch` (a record that would leave no room for the filler
        starts the next segment). Encrypted records bind their commit offset, so they must know it before they
        are written; nothing else needs this.
        """
        base, pos = self._active_base, self._pos
        limit = self.segment_bytes - FILLER_SIZE

        def place(length: int) -> int:
            nonlocal base, pos
            if pos + length > limit:
                base += max(self.segment_bytes, pos + FILLER_SIZE)
                pos = 0
            offset = base + pos
            pos += length
            return offset

        return place

    def append_batch(self, records: Sequence[bytes], store_ts: int) -> list[int]:
        """Write several records with one write per segment touched; all or nothing."""
        if self._failed is not None:
            raise self._fail(self._failed)
        for record in records:
            self._check_size(len(record))
        start_base, start_pos, start_ts = self._active_base, self._pos, self._active_last_ts
        offsets: list[int] = []
        chunk: list[bytes] = []
        chunk_bytes = 0
        limit = self.segment_bytes - FILLER_SIZE
        try:
            for record in records:
                length = len(record)
                if self._pos + chunk_bytes + length > limit:
                    if chunk:
                        self._write_fully(b"".join(chunk))
                        self._pos += chunk_bytes
                        self._active_last_ts = store_ts
                        chunk, chunk_bytes = [], 0
                    self._roll(store_ts)
                offsets.append(self._active_base + self._pos + chunk_bytes)
                chunk.append(record)
                chunk_bytes += length
            if chunk:
                self._write_fully(b"".join(chunk) if len(chunk) > 1 else chunk[0])
                self._pos += chunk_bytes
        except (StoreError, StoreFull):
            if self._active_base != start_base or self._pos != start_pos:
                self._rollback(start_base, start_pos, start_ts)
            raise
        if offsets:
            self._active_last_ts = store_ts
            self._end = self._active_base + self._pos
        return offsets

    def append_parts(self, parts: list, sizes: list[int], total: int, store_ts: int) -> list[int]:
        """`append_batch` for records given as pieces, three per record in order (as `encode_record_parts` makes
        them), `sizes` their lengths and `total` their sum; return their commit offsets. All or nothing.

        A batch that fits the active segment (the common case) is one write, and the offsets follow from the
        sizes: of the joined pieces when they are small, of the pieces themselves (writev, no copy of the bodies)
        when they average SCATTER_MIN_PIECE_BYTES or more. One that would roll the segment goes through
        `append_batch` record by record.
        """
        if self._failed is not None:
            raise self._fail(self._failed)
        pos = self._pos
        if pos + total + FILLER_SIZE > self.segment_bytes:
            return self.append_batch([b"".join(parts[i:i + 3]) for i in range(0, len(parts), 3)], store_ts)
        offsets = list(accumulate(sizes, initial=self._active_base + pos))
        # either way cut back by itself if it fails: nothing else changed yet
        if total >= SCATTER_MIN_PIECE_BYTES * len(parts) and self._writev is not None:
            self._writev_fully(parts, total)
        else:
            self._write_fully(b"".join(parts))
        self._pos = pos + total
        self._active_last_ts = store_ts
        self._end = offsets.pop()
        return offsets

    def _rollback(self, base: int, pos: int, last_ts: int) -> None:
        """Undo a partly written batch: drop segments created by it and cut `base` back to `pos`."""
        try:
            self._rollback_files(base, pos, last_ts)
        except OSError as exc:
            raise self._fail(f"cannot undo a failed commit-log batch ({exc})") from None

    def _rollback_files(self, base: int, pos: int, last_ts: int) -> None:
        io = self._io
        with self._lock:
            self._generation += 1
            for newer in [b for b in self._bases if b > base]:
                if newer == self._active_base:
                    self._release_fd(self._active_fd)
                self._forget_segment(newer)
                try:
                    io.unlink(self.layout.segment_path(newer))
                except FileNotFoundError:
                    pass
            if self._active_base != base:
                self._active_fd = io.open(self.layout.segment_path(base), os.O_RDWR | os.O_APPEND)
                self._active_base = base
                self._sizes.pop(base, None)
                self._dirty_sealed.add(base)  # it may hold unsynced records from before the batch
            io.ftruncate(self._active_fd, pos)
            self._pos = pos
            self._active_last_ts = last_ts
            self._uncached_below = min(self._uncached_below, base + pos)  # rewritten pages get dropped later too
            self._dir_dirty = True

    def _forget_segment(self, base: int) -> None:
        """Drop in-memory state of a segment about to be deleted. Call with _lock held."""
        self._bases.remove(base)
        self._dirty_sealed.discard(base)
        self._sizes.pop(base, None)
        self._last_ts.pop(base, None)
        fd = self._read_fds.pop(base, None)
        if fd is not None:
            os.close(fd)

    # --- durability
    def sync(self) -> int:
        """fsync every segment holding unsynced records; return the durable offset. Thread-safe.

        A failed fsync is fatal: the durable offset never moves past what an earlier fsync proved, this and every
        later call raise StoreError, and appends are refused until a restart recovers from the log.
        """
        io = self._io
        with self._sync_lock:
            if self._failed is not None:
                raise self._fail(self._failed)
            with self._lock:
                target, generation = self._end, self._generation
                if target <= self._durable and not self._dirty_sealed and not self._dir_dirty:
                    return self._durable
                sealed = sorted(self._dirty_sealed)
                fd = self._busy_fd = self._active_fd
                dir_dirty, self._dir_dirty = self._dir_dirty, False
                fd_base = self._active_base
                drops = self._cache_drops(target) if self._page_cache_bytes else ()
            try:
                for base in sealed:
                    try:
                        sealed_fd = io.open(self.layout.segment_path(base), os.O_RDONLY)
                    except FileNotFoundError:
                        continue  # retention deleted it meanwhile
                    try:
                        io.fsync(sealed_fd)
                    finally:
                        io.close(sealed_fd)
                io.fsync(fd)
                if dir_dirty:
                    fsync_dir(self.layout.commitlog_dir, io)
            except OSError as exc:
                with self._lock:
                    self._dir_dirty = self._dir_dirty or dir_dirty
                    self._finish_sync()
                # Never retried: after a failed fsync the kernel may have dropped the dirty pages and marked them
                # clean, so a second fsync could succeed and vouch for records that are not on disk.
                raise self._fail(f"fsync of the commit log failed ({exc})") from None
            if drops:
                self._drop_cached(drops, fd, fd_base)  # while `fd` is still busy: the appender cannot close it under us
            with self._lock:
                self._finish_sync()
                self._dirty_sealed.difference_update(sealed)
                if generation == self._generation and target > self._durable:
                    self._durable = target
                return self._durable

    def _cache_drops(self, target: int) -> list[tuple[int, int, int]]:
        """(segment base, file start, file end) of the pages to drop once `target` is durable: the whole pages from
        where the last drop stopped up to `page_cache_bytes` behind `target`, each page once. Call with _lock
        held."""
        limit = target - self._page_cache_bytes
        start = self._uncached_below
        if limit - start < _PAGE:
            return []
        self._uncached_below = limit
        drops = []
        bases = self._bases
        for i in range(max(bisect_right(bases, start) - 1, 0), len(bases)):
            base = bases[i]
            if base >= limit:
                break
            end = bases[i + 1] if i + 1 < len(bases) else limit
            low, high = max(start, base) - base, min(end, limit) - base
            # whole pages below the limit: the page holding the last stop was left out then and is taken now
            low, high = low & ~(_PAGE - 1), high & ~(_PAGE - 1)
            if high > low:
                drops.append((base, low, high))
        return drops

    def _drop_cached(self, drops: list[tuple[int, int, int]], fd: int, fd_base: int) -> None:
        """posix_fadvise(DONTNEED) each range (synced pages: the kernel drops them, no I/O); `fd` is open on the
        segment at `fd_base`, the others are opened for the call. Advice only: a segment deleted meanwhile or a
        refused call changes nothing but the cache."""
        assert _fadvise_dontneed is not None
        for base, low, high in drops:
            try:
                if base == fd_base:
                    _fadvise_dontneed(fd, low, high - low)
                    continue
                sealed_fd = os.open(self.layout.segment_path(base), os.O_RDONLY)
                try:
                    _fadvise_dontneed(sealed_fd, low, high - low)
                finally:
                    os.close(sealed_fd)
            except OSError:
                continue

    def _finish_sync(self) -> None:
        self._busy_fd = -1
        for fd in self._retired:
            self._io.close(fd)
        self._retired.clear()

    # --- reading
    def _fd_for(self, base: int) -> int:
        if base == self._active_base:
            return self._active_fd
        fd = self._read_fds.get(base)
        if fd is not None:
            self._read_fds.move_to_end(base)
            return fd
        try:
            fd = os.open(self.layout.segment_path(base), os.O_RDONLY)
        except FileNotFoundError:
            raise MessageNotFound(f"commit-log segment {base} no longer exists") from None
        self._read_fds[base] = fd
        if len(self._read_fds) > self._read_fd_cache:
            os.close(self._read_fds.popitem(last=False)[1])
        return fd

    def read(self, offset: int, size: int | None = None) -> bytes:
        """The record bytes at `offset` (not verified). Raises MessageNotFound outside the stored range."""
        if offset < self._bases[0] or offset >= self._end or offset < 0:
            raise MessageNotFound(f"no record at commit offset {offset}: stored range is "
                                  f"[{self._bases[0]}, {self._end})")
        base = self._bases[bisect_right(self._bases, offset) - 1]
        fd = self._fd_for(base)
        pos = offset - base
        if size is None:
            head = os.pread(fd, 4, pos)
            if len(head) < 4:
                raise MessageNotFound(f"no record at commit offset {offset}")
            (size,) = _len_unpack(head)
        if size < MIN_RECORD_SIZE or size > self.segment_bytes:
            raise MessageNotFound(f"no record at commit offset {offset}")
        data = os.pread(fd, size, pos)
        if len(data) != size:
            raise MessageNotFound(f"record at commit offset {offset} is cut short")
        return data

    def read_store_ts(self, offset: int) -> int:
        """store_ts of the record at `offset`, reading only its header."""
        data = self.read(offset, MIN_RECORD_SIZE)
        return record_store_ts(data)

    # --- retention
    def sealed_segments(self) -> list[tuple[int, int]]:
        """(base, file bytes) of every segment but the active one, oldest first."""
        return [(base, self._sizes.get(base, 0)) for base in self._bases[:-1]]

    def segment_last_store_ts(self, base: int) -> int:
        """Newest store_ts in a sealed segment: from its filler, or by scanning if it has none."""
        cached = self._last_ts.get(base)
        if cached is not None:
            return cached
        fd = self._fd_for(base)
        size = os.fstat(fd).st_size
        last_ts = 0
        try:
            if size >= FILLER_SIZE:
                last_ts = decode_filler(os.pread(fd, FILLER_SIZE, size - FILLER_SIZE))[1]
        except CorruptRecord:
            data = os.pread(fd, size, 0)
            pos = 0
            while pos < size:
                try:
                    magic, length = check_record(data, pos)
                except CorruptRecord:
                    break
                if magic == FILLER_MAGIC:
                    break
                last_ts = record_store_ts(data[pos:pos + MIN_RECORD_SIZE])
                pos += length
        self._last_ts[base] = last_ts
        return last_ts

    def delete_segment(self, base: int) -> None:
        """Delete a sealed segment; on an error (EIO) it stays, known and readable, and StoreError is raised."""
        if base == self._active_base:
            raise StoreError("the active commit-log segment is never deleted")
        try:
            self._io.unlink(self.layout.segment_path(base))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot delete commit-log segment {base}: {exc}") from None
        with self._lock:
            self._forget_segment(base)
            self._dir_dirty = True

    # --- recovery
    def recover(self, start_offset: int, on_record: Callable[[int, bytes], None],
                plausible: Callable[[int, bytes], bool] | None = None,
                on_dropped: Callable[[int, int], None] | None = None) -> ScanResult:
        """Verify every record from the segment holding `start_offset` on; skip damaged records, cut a torn tail.

        `on_record(commit_offset, record_bytes)` is called for each good record at or after `start_offset`.
        A damaged record with trustworthy records after it in the same segment is skipped (its range goes to
        `dropped_ranges`, and to `on_dropped(start, end)` as it is found); a record found only by searching for
        the next record magic must also satisfy
        `plausible(commit_offset, record_bytes)` (the caller checks it against the queue indexes), which keeps
        a record embedded in another record's body from being taken for a real one. A sealed segment whose end
        is damaged gets a new filler when a later segment exists. What cannot be resynced is cut off: the tail
        of the last segment, and everything after a damaged segment that has no later segment. The scanned
        segments are fsynced afterwards, so the durable offset is the recovered end.
        """
        result = ScanResult()
        start_offset = max(start_offset, self._bases[0])
        first = max(0, bisect_right(self._bases, start_offset) - 1)
        cut: tuple[int, int] | None = None  # (segment base, file position) of the first bad byte
        ended_with_filler = False
        last_ts = 0
        for i in range(first, len(self._bases)):
            base = self._bases[i]
            is_last = i == len(self._bases) - 1
            path = self.layout.segment_path(base)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data: bytes | mmap.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            refill_at = -1  # file position where a damaged sealed segment gets a new filler
            try:
                pos = 0
                ended_with_filler = False
                while pos < size:
                    try:
                        magic, length = check_record(data, pos)
                    except CorruptRecord:
                        resume = self._resync(data, size, pos, base, last_ts, plausible)
                        if resume is not None:
                            self._drop(result, data, base, pos, resume, on_dropped)
                            pos = resume
                            continue
                        if not is_last and self._filler_fits(base, pos, i):
                            refill_at = pos
                            self._drop(result, data, base, pos, size, on_dropped)
                            break
                        cut = (base, pos)
                        result.truncated_bytes += size - pos
                        result.dropped_records += _count_records_best_effort(data, pos)
                        break
                    if magic == FILLER_MAGIC:
                        if pos + FILLER_SIZE != size:
                            cut = (base, pos + FILLER_SIZE)  # bytes after a filler are garbage
                            result.truncated_bytes += size - pos - FILLER_SIZE
                            result.dropped_records += _count_records_best_effort(data, pos + FILLER_SIZE)
                        else:
                            ended_with_filler = True
                            self._sizes[base] = size
                            self._last_ts[base] = decode_filler(data[pos:pos + FILLER_SIZE])[1]
                        break
                    last_ts = record_store_ts(data[pos:pos + MIN_RECORD_SIZE])
                    if is_last:
                        self._active_last_ts = last_ts
                    if base + pos >= start_offset:
                        on_record(base + pos, data[pos:pos + length])
                        result.scanned_bytes += length
                    pos += length
                if cut is None and refill_at < 0 and not ended_with_filler and not is_last:
                    if self._filler_fits(base, size, i):
                        refill_at = size  # the filler was lost (power failure before it reached the disk)
                    else:
                        cut = (base, size)  # a sealed segment must end with a filler; later ones cannot be trusted
            finally:
                if isinstance(data, mmap.mmap):
                    data.close()
            if refill_at >= 0:
                self._refill(base, refill_at, self._bases[i + 1], last_ts)
            if cut is not None:
                break
        if cut is not None:
            result.deleted_segments = self._truncate(*cut, result)
        elif ended_with_filler:
            # crashed between writing the filler and creating the next segment
            new_base = self._next_base(self._bases[-1])
            new_fd = self._create_segment_file(new_base)
            with self._lock:
                self._release_fd(self._active_fd)
                self._active_fd, self._active_base, self._pos = new_fd, new_base, 0
                self._bases.append(new_base)
                self._active_last_ts = 0
                self._dir_dirty = True
        self._end = self._active_base + self._pos
        io = self._io
        for base in self._bases[first:]:
            fd = io.open(self.layout.segment_path(base), os.O_RDONLY)
            try:
                io.fsync(fd)
            finally:
                io.close(fd)
        fsync_dir(self.layout.commitlog_dir, io)
        self._dir_dirty = False
        self._durable = self._uncached_below = self._end
        result.end_offset = self._end
        return result

    def _resync(self, data: bytes | mmap.mmap, size: int, pos: int, base: int, last_ts: int,
                plausible: Callable[[int, bytes], bool] | None) -> int | None:
        """File position of the first trustworthy record (or final filler) after the damaged bytes at `pos`,
        or None when there is none (a torn tail, or damage running to the end of the segment)."""

        def good(at: int, searched: bool) -> bool:
            try:
                magic, length = check_record(data, at)
            except CorruptRecord:
                return False
            if magic == FILLER_MAGIC:
                return at + FILLER_SIZE == size
            if record_store_ts(data[at:at + MIN_RECORD_SIZE]) < last_ts:
                return False  # store times never go back in the log
            return not searched or plausible is None or plausible(base + at, bytes(data[at:at + length]))

        # A damaged body behind an intact header: the record's own length says where the next one starts.
        if size - pos >= PREFIX_SIZE:
            length, magic, _crc = PREFIX.unpack_from(data, pos)
            if ((magic == MESSAGE_MAGIC or magic == ENCRYPTED_MAGIC) and length >= MIN_RECORD_SIZE
                    and pos + length < size and good(pos + length, False)):
                return pos + length
        # Otherwise search for the next record magic, plain or encrypted (it sits 4 bytes into a record), or the
        # segment's filler. The next hit of each magic is remembered so each byte is searched once per magic.
        filler_at = size - FILLER_SIZE
        search = pos + 1 + 4
        next_hit = {_MESSAGE_MAGIC_BYTES: -2, _ENCRYPTED_MAGIC_BYTES: -2}
        while True:
            for magic_bytes, hit in next_hit.items():
                if hit != -1 and hit < search:
                    next_hit[magic_bytes] = data.find(magic_bytes, search)
            hits = [hit for hit in next_hit.values() if hit >= 0]
            found = min(hits) if hits else -1
            candidate = found - 4 if found >= 0 else -1
            if candidate < 0 or candidate >= filler_at:
                break
            if good(candidate, True):
                return candidate
            search = found + 1
        if filler_at > pos and good(filler_at, True):
            return filler_at
        return None

    def _drop(self, result: ScanResult, data: bytes | mmap.mmap, base: int, start: int, end: int,
              on_dropped: Callable[[int, int], None] | None) -> None:
        result.dropped_bytes += end - start
        result.dropped_records += _count_records_best_effort(data, start, end)
        result.dropped_ranges.append((base + start, base + end))
        if on_dropped is not None:
            on_dropped(base + start, base + end)

    def _filler_fits(self, base: int, pos: int, index: int) -> bool:
        """Whether a filler written at file position `pos` of segment `base` reaches the next segment."""
        return index + 1 < len(self._bases) and self._bases[index + 1] - base - pos >= FILLER_SIZE

    def _refill(self, base: int, pos: int, next_base: int, last_ts: int) -> None:
        """End sealed segment `base` at `pos` with a new filler that reaches `next_base`."""
        filler = encode_filler(next_base - base - pos, last_ts)
        io = self._io
        fd = io.open(self.layout.segment_path(base), os.O_RDWR)
        try:
            io.ftruncate(fd, pos)
            pwrite_all(io, fd, filler, pos)
        finally:
            io.close(fd)
        self._sizes[base] = pos + FILLER_SIZE
        self._last_ts[base] = last_ts
        cached = self._read_fds.pop(base, None)
        if cached is not None:
            io.close(cached)
        logger.warning("commit-log segment %d had a damaged end; it now ends at %d with a new filler", base, pos)

    def _next_base(self, base: int) -> int:
        fd = self._fd_for(base)
        size = os.fstat(fd).st_size
        length, _ts = decode_filler(os.pread(fd, FILLER_SIZE, size - FILLER_SIZE))
        return base + size - FILLER_SIZE + length

    def _truncate(self, base: int, pos: int, result: ScanResult) -> tuple[int, ...]:
        """Cut segment `base` at `pos`, delete every later segment, and make `base` active."""
        deleted = []
        with self._lock:
            self._generation += 1
            for newer in [b for b in self._bases if b > base]:
                if newer == self._active_base:
                    self._release_fd(self._active_fd)
                path = self.layout.segment_path(newer)
                try:
                    size = os.stat(path).st_size
                    with open(path, "rb") as f:
                        data = f.read()
                    result.truncated_bytes += size
                    result.dropped_records += _count_records_best_effort(data, 0)
                except FileNotFoundError:
                    pass
                self._forget_segment(newer)
                try:
                    self._io.unlink(path)
                except FileNotFoundError:
                    pass
                deleted.append(newer)
            if self._active_base != base:
                self._active_fd = self._io.open(self.layout.segment_path(base), os.O_RDWR | os.O_APPEND)
                self._active_base = base
                self._sizes.pop(base, None)
                self._last_ts.pop(base, None)
                cached = self._read_fds.pop(base, None)
                if cached is not None:
                    self._io.close(cached)
            self._io.ftruncate(self._active_fd, pos)
            self._pos = pos
            self._dir_dirty = True
        return tuple(deleted)

    def close(self) -> None:
        """fsync (unless the log has failed: nothing more can be proven durable) and close every fd."""
        try:
            if self._failed is None and self._active_fd >= 0:
                self.sync()
        finally:
            self.release()

    def release(self) -> None:
        """Close every fd without syncing (idempotent)."""
        with self._lock:
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()
            if self._active_fd >= 0:
                self._io.close(self._active_fd)
            self._active_fd = -1
