"""OffsetBook loads stored offsets in bulk (one query for every key) and the metadata store applies a batch of
adapter rows in one transaction: what thousands of persistent sessions resuming after a restart cost."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.errors import BadRequest
from tidegate.core.model import QueueRef
from tidegate.core.offsets import OffsetBook
from tidegate.core.storage.metadata import SqliteMetadataStore


class CountingReads:
    def __init__(self, meta: SqliteMetadataStore) -> None:
        self.meta = meta
        self.reads: list[str] = []

    def __getattr__(self, name):
        if name in ("get_offsets", "all_offsets"):
            self.reads.append(name)
        return getattr(self.meta, name)


def test_offsets_of_many_keys_are_read_in_one_query(tmp_path) -> None:
    meta = SqliteMetadataStore(tmp_path / "meta.db")
    meta.put_offsets([(f"g{i}", f"%MQTT%c{i}", 0, i) for i in range(100)] + [("g0", "other", 2, 7)])
    counting = CountingReads(meta)
    book = OffsetBook(counting, MemoryReactorClock())
    assert book.of("g0") == {QueueRef("%MQTT%c0", 0): 0, QueueRef("other", 2): 7}
    for i in range(1, 100):
        assert book.of(f"g{i}") == {QueueRef(f"%MQTT%c{i}", 0): i}
    assert book.of("never-committed") == {}
    assert counting.reads == ["all_offsets"]


def test_a_forgotten_group_does_not_come_back_from_the_bulk_read(tmp_path) -> None:
    meta = SqliteMetadataStore(tmp_path / "meta.db")
    meta.put_offsets([("a", "t", 0, 5), ("b", "t", 0, 9)])
    book = OffsetBook(meta, MemoryReactorClock())
    assert book.of("a") == {QueueRef("t", 0): 5}  # the bulk read happened, `b` waits in it
    book.forget_group("b")
    assert book.of("b") == {}
    assert meta.get_offsets("b") == {}


def test_kv_apply_writes_puts_and_deletes_all_or_nothing(tmp_path) -> None:
    meta = SqliteMetadataStore(tmp_path / "meta.db")
    meta.kv_put("ns", "old", {"v": 0})
    meta.kv_apply("ns", {"a": {"v": 1}, "b": [2], "old": None})
    assert meta.kv_items("ns") == [("a", {"v": 1}), ("b", [2])]
    with pytest.raises(BadRequest):
        meta.kv_apply("ns", {"c": {"v": 3}, "bad": {1, 2}, "a": None})  # a set is not JSON: nothing is written
    assert meta.kv_items("ns") == [("a", {"v": 1}), ("b", [2])]


def test_the_bulk_read_gives_queue_refs_the_book_keeps_as_they_are(tmp_path) -> None:
    """`all_offsets` keys each offset by a QueueRef (still a (topic, queue id) tuple for other callers), so a key's
    first lookup takes its dict without rebuilding it; the per-key path (`get_offsets`) gives QueueRefs too."""
    meta = SqliteMetadataStore(tmp_path / "meta.db")
    meta.put_offsets([("g", "t", 0, 5), ("g", "t", 1, 6), ("h@client", "u", 0, 1)])
    stored = meta.all_offsets()
    assert stored == {"g": {("t", 0): 5, ("t", 1): 6}, "h@client": {("u", 0): 1}}
    assert all(type(queue) is QueueRef for offsets in stored.values() for queue in offsets)
    book = OffsetBook(meta, MemoryReactorClock())
    assert book.of("g") == {QueueRef("t", 0): 5, QueueRef("t", 1): 6}
    assert all(type(queue) is QueueRef for queue in book.of("g"))
    assert book.of("h@client") == {QueueRef("u", 0): 1}
    assert book.member_keys("h") == ["h@client"]

    class PerKeyOnly:  # a metadata store without the bulk read
        def get_offsets(self, key):
            return meta.get_offsets(key)

    per_key = OffsetBook(PerKeyOnly(), MemoryReactorClock())
    assert per_key.of("g") == {QueueRef("t", 0): 5, QueueRef("t", 1): 6}
    assert all(type(queue) is QueueRef for queue in per_key.of("g"))
