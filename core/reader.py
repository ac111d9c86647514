"""Reading queues: index entries → tag-hash prefilter → records, through a cache of recently published messages."""

from __future__ import annotations

import logging

from tidegate.core.api import Delivered, DeliverySink
from tidegate.core.errors import OffsetOutOfRange
from tidegate.core.filters import TagFilter
from tidegate.core.model import IndexEntry, Message, QueueRef
from tidegate.core.storage.api import MessageStore

log = logging.getLogger("tidegate.broker")

READ_BATCH = 64  # index entries asked of the store at once
MAX_SCAN_PER_PUMP = 4096  # index entries one delivery round or pull may skip over (filters) before yielding
MESSAGE_CACHE = 8192  # recent messages kept decoded


class QueueReader:
    def __init__(self, store: MessageStore) -> None:
        self._store = store
        # commit offset -> message. The publish path adds what it appends; the dict is never replaced, only
        # cleared when full (cheaper than evicting one by one; it only saves decoding recent records).
        self.cache: dict[int, Message] = {}

    def read(self, entry: IndexEntry) -> Message:
        msg = self.cache.get(entry.commit_offset)
        if msg is None:
            msg = self._store.read_message(entry.commit_offset, entry.size)
            cache = self.cache
            if len(cache) >= MESSAGE_CACHE:
                cache.clear()
            cache[entry.commit_offset] = msg
        return msg

    def entry_at(self, q: QueueRef, offset: int) -> IndexEntry | None:
        """The index entry at `offset`, or None if retention removed it."""
        try:
            entries = self._store.read_index(q, offset, 1)
        except OffsetOutOfRange:
            return None
        return entries[0] if entries else None

    def wanted(self, entry: IndexEntry, tag_filter: TagFilter, now_ms: int) -> Message | None:
        """The message of `entry` if the filter takes it and it has not expired (the tag hash decides most
        cases without reading the log)."""
        if not tag_filter.may_match_hash(entry.tag_hash):
            return None
        msg = self.read(entry)
        if (tag_filter.tags is not None and msg.tag not in tag_filter.tags) or (
                msg.expires_at and msg.expires_at <= now_ms):
            return None
        return msg

    def collect(self, q: QueueRef, pos: int, end: int, want: int, tag_filter: TagFilter, now_ms: int,
                scan_limit: int) -> tuple[list[Delivered], int, int]:
        """Read `q` from `pos` up to `end` until `want` messages pass the filter or `scan_limit` index entries were
        looked at. Returns (deliveries, next position, entries looked at); raises OffsetOutOfRange when `pos` is
        below what retention kept."""
        out: list[Delivered] = []
        looked = 0
        read_index, wanted = self._store.read_index, self.wanted
        while pos < end and len(out) < want and looked < scan_limit:
            window = min(READ_BATCH, end - pos)
            entries = read_index(q, pos, window)
            if not entries:  # only holes here (records lost in a crash recovery): step over them
                pos += window
                looked += window
                continue
            for e in entries:
                if e.queue_offset >= end or len(out) >= want:
                    break
                pos = e.queue_offset + 1
                looked += 1
                msg = wanted(e, tag_filter, now_ms)
                if msg is not None:
                    out.append(Delivered(msg, q, e.queue_offset))
        return out, pos, looked

    def fell_behind(self, group: str, sink: DeliverySink | None, q: QueueRef, pos: int) -> int:
        """Retention removed offsets `group` had not read from `pos` on: say so (log, and the sink if it has
        the optional `offset_moved(queue, old, new)`), and return the first offset still stored."""
        new = self._store.queue_bounds(q).min_offset
        log.warning("group %s fell behind retention on %s: skipping offsets %d..%d", group, q, pos, new)
        notify = getattr(sink, "offset_moved", None)
        if notify is not None:
            notify(q, pos, new)
        return new
