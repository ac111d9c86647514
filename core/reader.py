"""Reading queues: index entries → tag-hash prefilter → records, through a cache of recently published messages."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from tidegate.core.api import Delivered, DeliverySink
from tidegate.core.errors import OffsetOutOfRange
from tidegate.core.filters import TagFilter
from tidegate.core.model import IndexEntry, Message, QueueRef
from tidegate.core.storage.api import MessageStore

log = logging.getLogger("tidegate.broker")

READ_BATCH = 64  # index entries asked of the store at once
MAX_SCAN_PER_PUMP = 4096  # index entries one delivery round or pull may skip over (filters) before yielding
DEFAULT_MESSAGE_CACHE_BYTES = 64 * 1024 * 1024  # recent messages kept decoded, by bytes (BrokerConfig)
# Bytes charged per cached message on top of its record size: the Message object, its dict slot and the eviction
# queue entry. Without it a flood of empty messages would be "free" and the cache unbounded in count.
CACHE_ENTRY_OVERHEAD = 256


class QueueReader:
    """Reads queues for delivery, pull and acks, through a cache of recent messages bounded by bytes.

    The cache maps commit offset -> decoded message. It is charged each message's record size (what the store
    wrote: body, topic, keys, properties) plus CACHE_ENTRY_OVERHEAD and never holds more than `cache_budget`
    bytes: the oldest entries are evicted first (a FIFO of (offset, charge) beside the dict, O(1) per eviction).
    A message charged more than a quarter of the budget is not cached at all (it would evict much of the rest
    for one reader); a budget of 0 turns the cache off. The cache only saves decoding recent records.
    """

    def __init__(self, store: MessageStore, cache_budget: int = DEFAULT_MESSAGE_CACHE_BYTES) -> None:
        self._store = store
        self.cache: dict[int, Message] = {}
        self.cache_budget = max(0, cache_budget)
        self.cache_bytes = 0  # what the cached messages are charged, always <= cache_budget
        self._largest_cached = self.cache_budget // 4
        self._cache_order: deque[tuple[int, int]] = deque()  # (commit offset, charge), oldest first

    def remember(self, commit_offset: int, msg: Message, record_size: int) -> None:
        """Cache `msg` (just appended or just read) at `commit_offset`, evicting the oldest past the budget.

        On the publish path for every message: a few dict/deque operations, no scan."""
        charge = record_size + CACHE_ENTRY_OVERHEAD
        if charge > self._largest_cached:
            return
        self.cache[commit_offset] = msg
        self._cache_order.append((commit_offset, charge))
        self.cache_bytes += charge
        if self.cache_bytes > self.cache_budget:
            self._evict()

    @property
    def largest_cached(self) -> int:
        """The largest charge a message may have and still be cached."""
        return self._largest_cached

    def remember_with(self) -> tuple[dict[int, Message], Callable[[tuple[int, int]], None]]:
        """For a caller that caches a batch inline (the publish path, per message without a call): the cache
        dict and the append of its eviction queue. The caller stores `cache[offset] = msg`, appends
        `(offset, charge)` for each message whose charge is at most `largest_cached`, then calls `charge` once
        with their sum. Between the two the cache may briefly be over budget by that one batch."""
        return self.cache, self._cache_order.append

    def charge(self, charged: int) -> None:
        """Account for messages cached through `remember_with`, evicting the oldest past the budget."""
        self.cache_bytes += charged
        if self.cache_bytes > self.cache_budget:
            self._evict()

    def _evict(self) -> None:
        # Down to 15/16 of the budget, so that a full cache evicts in small batches rather than on every add.
        cache, order = self.cache, self._cache_order
        total, low = self.cache_bytes, self.cache_budget - (self.cache_budget >> 4)
        while total > low:
            offset, charge = order.popleft()
            total -= charge
            cache.pop(offset, None)  # None: an offset remembered twice is charged (and evicted) twice
        self.cache_bytes = total

    def read(self, entry: IndexEntry) -> Message:
        msg = self.cache.get(entry.commit_offset)
        if msg is None:
            msg = self._store.read_message(entry.commit_offset, entry.size)
            self.remember(entry.commit_offset, msg, entry.size)
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
        if tag_filter.tags is None and tag_filter.hashes is None:  # the common case: one loop, no call per entry
            offsets: list[int] = []
            messages: list[Message] = []
            pos, looked, _ = self.collect_plain(q, pos, end, want, now_ms, scan_limit, offsets, messages)
            return [Delivered(msg, q, offset) for offset, msg in zip(offsets, messages, strict=True)], pos, looked
        out: list[Delivered] = []
        add = out.append
        looked = 0
        read_index, wanted = self._store.read_index, self.wanted
        while pos < end and len(out) < want and looked < scan_limit:
            window = min(READ_BATCH, end - pos)
            entries = read_index(q, pos, window)
            if not entries:  # only holes here (records lost in a crash recovery): step over them
                pos += window
                looked += window
                continue
            room = want - len(out)
            for e in entries:
                if e.queue_offset >= end or room <= 0:
                    break
                pos = e.queue_offset + 1
                looked += 1
                msg = wanted(e, tag_filter, now_ms)
                if msg is not None:
                    add(Delivered(msg, q, e.queue_offset))
                    room -= 1
        return out, pos, looked

    def collect_plain(self, q: QueueRef, pos: int, end: int, want: int, now_ms: int, scan_limit: int,
                      offsets: list[int], messages: list[Message]) -> tuple[int, int, int]:
        """`collect` without a tag filter, appending each message's offset and message to `offsets` and `messages`
        instead of building a `Delivered` (the message cache is asked here, without two calls per entry). Returns
        (next position, entries looked at, the bodies' total size); raises OffsetOutOfRange when `pos` is below
        what retention kept."""
        read_index, read = self._store.read_index, self.read
        cache_get = self.cache.get
        add_offset, add_message = offsets.append, messages.append
        looked = size = 0
        room = want
        while pos < end and room > 0 and looked < scan_limit:
            window = min(READ_BATCH, end - pos)
            entries = read_index(q, pos, window)
            if not entries:  # only holes here (records lost in a crash recovery): step over them
                pos += window
                looked += window
                continue
            for e in entries:
                offset = e.queue_offset
                if offset >= end or room <= 0:
                    break
                pos = offset + 1
                looked += 1
                msg = cache_get(e.commit_offset) or read(e)
                if msg.expires_at and msg.expires_at <= now_ms:
                    continue
                add_offset(offset)
                add_message(msg)
                size += len(msg.body)
                room -= 1
        return pos, looked, size

    def fell_behind(self, group: str, sink: DeliverySink | None, q: QueueRef, pos: int) -> int:
        """Retention removed offsets `group` had not read from `pos` on: say so (log, and the sink if it has
        the optional `offset_moved(queue, old, new)`), and return the first offset still stored."""
        new = self._store.queue_bounds(q).min_offset
        log.warning("group %s fell behind retention on %s: skipping offsets %d..%d", group, q, pos, new)
        notify = getattr(sink, "offset_moved", None)
        if notify is not None:
            notify(q, pos, new)
        return new
