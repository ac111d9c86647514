"""Committed offsets: per progress key (a group, or `group@client` when broadcasting) and queue.

Kept in memory, loaded from metadata the first time a key is used, and written back in batches: at most
OFFSET_FLUSH_S after a change, on `flush()` and at shutdown.

Loading is in bulk where the metadata store can (`all_offsets`): the first key asked for reads every stored
offset in one query, and later keys are taken from that read instead of one SELECT each, which is what thousands
of persistent MQTT sessions resuming after a restart would otherwise cost.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from tidegate.core.model import QueueRef
from tidegate.core.storage.api import MetadataStore

OFFSET_FLUSH_S = 1.0


class OffsetBook:
    def __init__(self, metadata: MetadataStore, clock: IReactorTime) -> None:
        self._meta = metadata
        self._clock = clock
        self._offsets: dict[str, dict[QueueRef, int]] = {}  # progress key -> queue -> next offset to consume
        self._member_keys: dict[str, set[str]] = {}  # group -> loaded `group@client` keys (broadcasting)
        self._dirty: set[tuple[str, QueueRef]] = set()
        # every stored offset not asked for yet, read in one query at the first miss (None: not read yet)
        self._stored: dict[str, dict[QueueRef, int]] | None = None
        self._flush_call: IDelayedCall | None = None
        self._closed = False

    def of(self, key: str) -> dict[QueueRef, int]:
        """The live offsets of `key` (loaded on first use); callers may read them, and change them only through
        `set` or `init`."""
        offsets = self._offsets.get(key)
        if offsets is None:
            offsets = self._offsets[key] = self._load(key)
            if "@" in key:
                self._member_keys.setdefault(key.partition("@")[0], set()).add(key)
        return offsets

    def _load(self, key: str) -> dict[QueueRef, int]:
        stored = self._stored
        if stored is None:
            all_offsets = getattr(self._meta, "all_offsets", None)
            if all_offsets is None:
                return {QueueRef(t, q): o for (t, q), o in self._meta.get_offsets(key).items()}
            # its queues are QueueRefs already (made while the rows are read): a key's offsets are taken as they are
            stored = self._stored = all_offsets()
        return stored.pop(key, None) or {}

    def set(self, key: str, queue: QueueRef, offset: int) -> None:
        self.of(key)[queue] = offset
        self._dirty.add((key, queue))
        self.schedule_flush()

    def init(self, key: str, queue: QueueRef, offset: int) -> None:
        """Set an offset the key did not have, writing it with the next batch."""
        self.of(key)[queue] = offset
        self._dirty.add((key, queue))

    def member_keys(self, group: str) -> list[str]:
        """The `group@client` keys of a broadcasting group known in this process, sorted."""
        return sorted(self._member_keys.get(group, ()))

    def schedule_flush(self) -> None:
        if self._flush_call is None and self._dirty and not self._closed:
            self._flush_call = self._clock.callLater(OFFSET_FLUSH_S, self.flush)

    def flush(self) -> None:
        """Write changed offsets to metadata in one batch."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        self._meta.put_offsets([(key, q.topic, q.queue_id, self._offsets[key][q]) for key, q in dirty])

    def forget_group(self, group: str) -> None:
        """Delete every offset of `group` and of its broadcasting members, in memory and in metadata."""
        keys = {group} | self._member_keys.pop(group, set())
        for key in keys:
            self._offsets.pop(key, None)
            if self._stored is not None:
                self._stored.pop(key, None)
            self._meta.delete_offsets(key)
        self._dirty = {(k, q) for k, q in self._dirty if k not in keys}

    def close(self) -> None:
        self._closed = True
        self.flush()
