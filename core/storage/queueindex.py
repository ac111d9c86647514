"""Per-queue index: fixed-width entries (commit offset u64, size u32, tag hash u64) in files of N entries.

Entry `k` of a queue lives in file `index/<topic>/<queue_id>/<base>.idx` with `base = k - k % N`, at byte
`(k - base) * 20`. New entries are buffered in memory (`pending`) and written in batches by `flush()`; they are
derived from the commit log, so losing the buffer in a crash only costs a re-dispatch on recovery.

An entry with size 0 is a hole: recovery writes one for a queue offset whose record it could not find (lost with a
damaged record, or a queue restarted in the middle of a file when retention already removed its older records).
Holes are never reported as stored and `read` leaves them out.

A topic's own retention (`retention_ms`) trims a queue logically: it raises the queue's min offset without touching
the commit log, whose records other queues may still reference. Index files cover N entries, so the new min offset
is kept in a small `low_water` file beside them (see StoreLayout.low_water_path) to survive a restart.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Callable

from crc32c import crc32c

from tidegate.core.errors import OffsetOutOfRange, StoreError
from tidegate.core.model import IndexEntry, QueueRef
from tidegate.core.storage.accelerator import RECORD_SPEEDUPS, RECORD_SPEEDUPS_NAMES, load_extension
from tidegate.core.storage.fileio import OS_IO, FileIO, pwrite_all
from tidegate.core.storage.layout import (
    DATA_FILE_MODE,
    StoreLayout,
    fsync_dir,
    fsync_file,
    make_private_dirs,
    write_atomically,
)

logger = logging.getLogger("tidegate.storage")

ENTRY = struct.Struct("<QIQ")
ENTRY_SIZE = ENTRY.size
entry_pack = ENTRY.pack
HOLE = entry_pack(0, 0, 0)
LOW_WATER = struct.Struct("<QI")  # first kept queue offset, crc32c of those 8 bytes


def py_index_entries(raw: bytes, first_offset: int) -> list[IndexEntry]:
    """An IndexEntry per packed entry of `raw` (queue offsets from `first_offset` on) that is not a hole."""
    new = tuple.__new__  # IndexEntry(...) without NamedTuple's Python-level __new__ (delivery reads every entry)
    return [
        new(IndexEntry, (first_offset + i, commit, size, tag))
        for i, (commit, size, tag) in enumerate(ENTRY.iter_unpack(raw))
        if size
    ]


py_entry_pack = entry_pack
index_entries = py_index_entries
# Compiled twins (core/storage/_record_speedups.pyx) unless TIDEGATE_NO_EXTENSIONS is set or they were not built.
_speedups = load_extension(RECORD_SPEEDUPS, RECORD_SPEEDUPS_NAMES)
if _speedups is not None:
    entry_pack = _speedups.entry_pack
    index_entries = _speedups.index_entries


class IndexFiles:
    """A bounded cache of open index-file descriptors shared by every queue (10,000 queues, not 10,000 fds)."""

    def __init__(self, layout: StoreLayout, entries_per_file: int, max_open: int = 256, io: FileIO = OS_IO) -> None:
        if entries_per_file < 1:
            raise ValueError("entries_per_file must be positive")
        self.layout = layout
        self.io = io
        self.entries_per_file = entries_per_file
        self.file_bytes = entries_per_file * ENTRY_SIZE
        self._max_open = max_open
        self._fds: OrderedDict[tuple[QueueRef, int], int] = OrderedDict()
        self.unsynced: set[tuple[QueueRef, int]] = set()  # files written since the last fsync_all
        self.unsynced_low_water: set[QueueRef] = set()  # low-water files written since the last fsync_all

    def fd(self, queue: QueueRef, base: int) -> int:
        key = (queue, base)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        path = self.layout.index_path(queue, base)
        try:
            fd = self.io.open(path, os.O_RDWR | os.O_CREAT, DATA_FILE_MODE)
        except FileNotFoundError:
            make_private_dirs(path.parent)
            fd = self.io.open(path, os.O_RDWR | os.O_CREAT, DATA_FILE_MODE)
        self._fds[key] = fd
        if len(self._fds) > self._max_open:
            self.io.close(self._fds.popitem(last=False)[1])
        return fd

    def forget(self, queue: QueueRef, base: int) -> None:
        fd = self._fds.pop((queue, base), None)
        if fd is not None:
            self.io.close(fd)

    def delete_file(self, queue: QueueRef, base: int) -> None:
        try:
            self.io.unlink(self.layout.index_path(queue, base))
        except FileNotFoundError:
            pass
        self.forget(queue, base)
        self.unsynced.discard((queue, base))

    def open_count(self) -> int:
        return len(self._fds)

    # --- low-water marks (per-topic retention)
    def read_low_water(self, queue: QueueRef) -> int:
        """The queue's persisted low-water mark; 0 when there is none (or it is damaged: entries reappear, none
        are lost)."""
        path = self.layout.low_water_path(queue)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        if len(data) == LOW_WATER.size:
            offset, crc = LOW_WATER.unpack(data)
            if crc == crc32c(data[:8]):
                return offset
        logger.warning("low-water file %s is damaged; queue %s shows entries its retention had dropped", path, queue)
        return 0

    def write_low_water(self, queue: QueueRef, offset: int) -> None:
        # Not fsynced here: a retention pass may move thousands of queues on the reactor thread. Losing the write to
        # power failure only brings expired entries back until the next pass; fsync_all() makes it durable at close.
        data = LOW_WATER.pack(offset, crc32c(offset.to_bytes(8, "little")))
        path = self.layout.low_water_path(queue)
        # a queue whose entries are all still buffered has no dir yet
        make_private_dirs(path.parent)
        write_atomically(path, data, durable=False, io=self.io)
        self.unsynced_low_water.add(queue)

    def remove_low_water(self, queue: QueueRef) -> None:
        try:
            self.io.unlink(self.layout.low_water_path(queue))
        except FileNotFoundError:
            pass
        self.unsynced_low_water.discard(queue)

    def fsync_all(self) -> None:
        """fsync every index file written since the last call (close() and recovery, not the hot path)."""
        for key in sorted(self.unsynced, key=lambda k: (k[0].topic, k[0].queue_id, k[1])):
            fd = self._fds.get(key)
            if fd is not None:
                self.io.fsync(fd)
            else:
                fsync_file(self.layout.index_path(*key), self.io)
            self.unsynced.discard(key)  # only once it worked: a failed fsync_all is retried whole
        for queue in sorted(self.unsynced_low_water, key=lambda q: (q.topic, q.queue_id)):
            path = self.layout.low_water_path(queue)
            if path.exists():
                fsync_file(path, self.io)
                fsync_dir(path.parent, self.io)  # the rename that put it there
            self.unsynced_low_water.discard(queue)

    def close_all(self) -> None:
        for fd in self._fds.values():
            self.io.close(fd)
        self._fds.clear()


class QueueIndex:
    """One queue's index: entries [min_offset, max_offset); [persisted, max_offset) still in `pending`."""

    __slots__ = ("queue", "files", "bases", "min_offset", "max_offset", "persisted", "pending", "low_water")

    def __init__(self, queue: QueueRef, files: IndexFiles) -> None:
        self.queue = queue
        self.files = files
        self.bases: list[int] = files.layout.index_bases(queue)
        self.pending = bytearray()
        if self.bases:
            last = self.bases[-1]
            path = files.layout.index_path(queue, last)
            size = os.stat(path).st_size
            whole = min(size // ENTRY_SIZE, files.entries_per_file)
            if whole * ENTRY_SIZE != size:  # a torn entry write: drop the partial entry
                files.io.truncate(path, whole * ENTRY_SIZE)
            self.min_offset = self.bases[0]
            self.max_offset = last + whole
            self.low_water = files.read_low_water(queue)
        else:
            self.min_offset = self.max_offset = 0
            self.low_water = 0
        self.persisted = self.max_offset
        if self.low_water > self.max_offset:
            # The index lost entries above the mark (recovery re-dispatches them if the log still has them); a mark
            # above the end would hide the offsets written next, so it comes down and expired entries may reappear.
            self.low_water = self.max_offset
            files.write_low_water(queue, self.max_offset)
        self._apply_low_water()

    # --- writing
    def add(self, commit_offset: int, size: int, tag_hash: int) -> int:
        """Buffer one entry; return its queue offset."""
        self.pending += entry_pack(commit_offset, size, tag_hash)
        offset = self.max_offset
        self.max_offset = offset + 1
        return offset

    def add_block(self, entries: bytes, count: int) -> None:
        """Buffer `count` packed entries at once (a batch's entries of this queue, in queue-offset order); the
        caller assigned them the queue offsets from max_offset on."""
        self.pending += entries
        self.max_offset += count

    def start_at(self, queue_offset: int) -> None:
        """Begin an empty queue at `queue_offset` (its older entries were lost with retained-away records)."""
        if self.max_offset != self.min_offset:
            raise StoreError(f"queue {self.queue} is not empty; it cannot restart at {queue_offset}")
        self.min_offset = self.max_offset = self.persisted = queue_offset

    def flush(self) -> int:
        """Write the buffered entries to their files; return how many were written."""
        pending = self.pending
        if not pending:
            return 0
        per_file = self.files.entries_per_file
        offset = self.persisted
        view = memoryview(pending)
        pos = 0
        io = self.files.io
        try:
            while pos < len(pending):
                base = offset - offset % per_file
                count = min(per_file - (offset - base), (len(pending) - pos) // ENTRY_SIZE)
                fd = self.files.fd(self.queue, base)  # may fail (disk full): then `bases` does not list it
                if not self.bases or self.bases[-1] < base:
                    self.bases.append(base)
                self.files.unsynced.add((self.queue, base))
                # positioned, so a retry after an error (or a short write) rewrites the same bytes
                pwrite_all(io, fd, view[pos:pos + count * ENTRY_SIZE], (offset - base) * ENTRY_SIZE)
                pos += count * ENTRY_SIZE
                offset += count
        finally:
            view.release()
        written = len(pending) // ENTRY_SIZE
        self.pending = bytearray()
        self.persisted = offset
        return written

    # --- reading
    def _raw(self, offset: int, end: int) -> bytes:
        """Entry bytes for [offset, end), from files and the pending buffer."""
        parts = []
        per_file = self.files.entries_per_file
        file_end = min(end, self.persisted)
        while offset < file_end:
            base = offset - offset % per_file
            count = min(base + per_file, file_end) - offset
            data = os.pread(self.files.fd(self.queue, base), count * ENTRY_SIZE, (offset - base) * ENTRY_SIZE)
            if len(data) != count * ENTRY_SIZE:  # a file shorter than the queue says: report holes, not garbage
                data = data + bytes(count * ENTRY_SIZE - len(data))
            parts.append(data)
            offset += count
        if end > offset:
            start = (offset - self.persisted) * ENTRY_SIZE
            parts.append(bytes(self.pending[start:(end - self.persisted) * ENTRY_SIZE]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def entry_at(self, offset: int) -> tuple[int, int, int]:
        """(commit_offset, size, tag_hash) of entry `offset`, which must be below max_offset."""
        return ENTRY.unpack(self._raw(offset, offset + 1))

    def read(self, offset: int, max_entries: int) -> list[IndexEntry]:
        """The entries among queue offsets [offset, offset + max_entries) that hold a record.

        Holes are left out, so queue offsets may jump and a list shorter than asked (even empty) does not mean the
        queue ends there: `max_offset` says where it does.
        """
        if offset < self.min_offset or offset > self.max_offset:
            raise OffsetOutOfRange(
                f"offset {offset} of queue {self.queue} is outside [{self.min_offset}, {self.max_offset}]"
            )
        end = min(self.max_offset, offset + max(0, max_entries))
        if end <= offset:
            return []
        return index_entries(self._raw(offset, end), offset)

    def _first_where(self, lo: int, hi: int, predicate: Callable[[tuple[int, int, int]], bool]) -> int:
        """First offset in [lo, hi) whose entry satisfies a monotone predicate (hi if none)."""
        while lo < hi:
            mid = (lo + hi) // 2
            if predicate(self.entry_at(mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # --- trimming
    def _apply_low_water(self) -> None:
        """Keep min_offset at or above the low-water mark, within the entries the queue has."""
        if self.low_water > self.min_offset:
            self.min_offset = min(self.low_water, self.max_offset)

    def advance_min(self, log_min_offset: int) -> int:
        """Raise min_offset to the first entry whose record is still stored; delete files wholly below it."""
        if self.min_offset < self.max_offset:
            def stored(entry: tuple[int, int, int]) -> bool:
                return entry[1] > 0 and entry[0] >= log_min_offset

            if not stored(self.entry_at(self.min_offset)):
                self.min_offset = self._first_where(self.min_offset, self.max_offset, stored)
        self._apply_low_water()
        self._delete_files_below_min()
        return self.min_offset

    def expire_to(self, new_min: int) -> int:
        """Drop entries below `new_min` (per-topic retention), persisting the new low-water mark; return how many
        entries were dropped. The commit log is not touched."""
        new_min = min(new_min, self.max_offset)
        if new_min <= self.min_offset:
            return 0
        dropped = new_min - self.min_offset
        self.low_water = self.min_offset = new_min
        self.files.write_low_water(self.queue, new_min)
        self._delete_files_below_min()
        return dropped

    def _delete_files_below_min(self) -> None:
        per_file = self.files.entries_per_file
        # keep the file holding the newest entry, or a restart could not tell max_offset
        last_needed = max(self.min_offset, self.max_offset - 1) if self.max_offset else 0
        while self.bases and self.bases[0] + per_file <= self.min_offset and self.bases[0] + per_file <= last_needed:
            self.files.delete_file(self.queue, self.bases.pop(0))

    def punch_holes(self, start: int, end: int) -> int:
        """Turn entries whose record starts in commit offsets [start, end) into holes (recovery skipped those
        bytes as damaged); return how many. Entries are ordered by commit offset, holes aside."""
        lo, hi = self.min_offset, self.max_offset
        while lo < hi:  # first entry (not a hole) at or after `start`
            mid = probe = (lo + hi) // 2
            commit, size, _tag = self.entry_at(probe)
            while size == 0 and probe + 1 < hi:
                probe += 1
                commit, size, _tag = self.entry_at(probe)
            if size == 0 or commit >= start:
                hi = mid
            else:
                lo = probe + 1
        punched = 0
        for offset in range(lo, self.max_offset):
            commit, size, _tag = self.entry_at(offset)
            if size == 0:
                continue
            if commit >= end:
                break
            if commit >= start:
                self._set_entry(offset, HOLE)
                punched += 1
        return punched

    def _set_entry(self, offset: int, entry: bytes) -> None:
        if offset >= self.persisted:
            at = (offset - self.persisted) * ENTRY_SIZE
            self.pending[at:at + ENTRY_SIZE] = entry
            return
        per_file = self.files.entries_per_file
        base = offset - offset % per_file
        self.files.unsynced.add((self.queue, base))
        pwrite_all(self.files.io, self.files.fd(self.queue, base), entry, (offset - base) * ENTRY_SIZE)

    def trim_beyond(self, log_end: int) -> int:
        """Drop entries pointing at or past `log_end` (records lost from a torn tail); return how many."""
        if self.min_offset == self.max_offset:
            return 0
        commit, size, _tag = self.entry_at(self.max_offset - 1)
        if commit + size <= log_end:
            return 0
        keep = self._first_where(self.min_offset, self.max_offset, lambda e: e[0] + e[1] > log_end and e[1] > 0)
        dropped = self.max_offset - keep
        self.trim_to(keep)
        return dropped

    def trim_to(self, new_max: int) -> None:
        """Forget entries from `new_max` on."""
        if new_max >= self.max_offset:
            return
        if new_max >= self.persisted:
            del self.pending[(new_max - self.persisted) * ENTRY_SIZE:]
        else:
            self.pending = bytearray()
            per_file = self.files.entries_per_file
            while self.bases and self.bases[-1] >= new_max and self.bases[-1] > 0:
                self.files.delete_file(self.queue, self.bases.pop())
            if self.bases:
                base = self.bases[-1]
                keep_bytes = min(new_max - base, per_file) * ENTRY_SIZE
                self.files.io.ftruncate(self.files.fd(self.queue, base), max(0, keep_bytes))
            self.persisted = new_max
        self.max_offset = new_max
        self.min_offset = min(self.min_offset, new_max)

    def delete(self) -> None:
        """Remove every file of this queue and its directories."""
        for base in self.bases:
            self.files.delete_file(self.queue, base)
        self.bases = []
        self.pending = bytearray()
        self.files.remove_low_water(self.queue)  # a topic created again under this name starts at offset 0
        self.low_water = 0
        queue_dir = self.files.layout.queue_dir(self.queue)
        for directory in (queue_dir, queue_dir.parent):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty (other queues of the topic) or already gone
