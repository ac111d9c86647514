"""Tombstones of deleted queues: append-only (no whole-file rewrite or fsync per deletion), compacted rarely, pruned
when retention removed every record they guard, and still keeping deleted queues dead through crash recovery."""

from __future__ import annotations

import errno
import json

import pytest

from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.fileio import FaultyFileIO
from tidegate.core.storage.tombstones import Tombstones


def abandon(store) -> None:
    store._log.release()
    store._files.close_all()
    store._tombstones.close_quietly()
    store._closed = True


def rewrites(io: FaultyFileIO) -> int:
    """Whole-file rewrites of the tombstones file: renames onto it (write_atomically)."""
    return sum(1 for op, path in io.history if op == "replace" and path.endswith("tombstones"))


def fsyncs_of_tombstones(io: FaultyFileIO) -> int:
    return sum(1 for op, path in io.history if op == "fsync" and path.endswith("tombstones"))


def test_queue_deletions_append_one_line_each_without_rewriting_or_fsyncing_the_file(open_store):
    io = FaultyFileIO()
    store = open_store(io=io)
    queues = [QueueRef(f"s{n}", 0) for n in range(300)]
    for ref in queues:
        store.append(Message(ref.topic, b"m"), [ref])
    for ref in queues:
        store.delete_queue(ref)
    assert rewrites(io) == 0  # every deletion was one appended line
    assert fsyncs_of_tombstones(io) == 0  # and none was fsynced on the caller's thread
    assert store.layout.tombstones_path.read_bytes().count(b"\n") == len(queues)
    store.sync()
    assert fsyncs_of_tombstones(io) == 1  # the next flush covers all of them with one fsync
    abandon(store)
    store = open_store()
    assert set(store.queues()).isdisjoint(queues)  # recovery kept every deleted queue dead
    store.close()


def test_repeated_deletions_rewrite_the_file_a_bounded_number_of_times(tmp_path):
    """The same few queues deleted over and over pile up dead lines; compaction bounds the file, and a rewrite of L
    live lines comes only after more than L + slack appended lines (amortised O(1) per deletion)."""
    io = FaultyFileIO()
    slack = 16
    stones = Tombstones(tmp_path / "tombstones", io=io, slack=slack)
    live = [QueueRef(f"s{n}", 0) for n in range(200)]
    for n, ref in enumerate(live):
        stones.add(ref, n)
    churn = 5000
    for n in range(churn):
        stones.add(QueueRef("churn", n % 3), 1000 + n)
    total_live = len(live) + 3
    assert stones.rewrites == rewrites(io)
    assert 1 <= rewrites(io) <= churn // (total_live + slack) + 1
    assert (tmp_path / "tombstones").read_bytes().count(b"\n") <= 2 * total_live + slack
    stones.close()
    reread = Tombstones(tmp_path / "tombstones")
    assert len(reread) == total_live and reread.get(QueueRef("churn", (churn - 1) % 3)) == 1000 + churn - 1


def test_a_deleted_queue_stays_deleted_after_a_crash_and_a_recreated_one_keeps_its_new_records(open_store):
    store = open_store()
    q = QueueRef("orders", 0)
    for n in range(5):
        store.append(Message("orders", b"old%d" % n), [q])
    store.sync()
    store.delete_queue(q)
    store.append(Message("orders", b"new"), [q])
    abandon(store)
    store.layout.checkpoint_path.unlink()  # force a scan of the whole log
    store = open_store()
    bounds = store.queue_bounds(q)
    entries = store.read_index(q, bounds.min_offset, bounds.max_offset - bounds.min_offset)
    assert [store.read_message(e.commit_offset).body for e in entries] == [b"new"]
    store.close()


def test_tombstones_below_the_first_segment_are_pruned_at_open_and_by_retention(open_store, clock):
    io = FaultyFileIO()
    store = open_store(io=io)
    dead = [QueueRef("gone", n) for n in range(5)]
    for ref in dead:
        store.append(Message("gone", b"x" * 300), [ref])
        store.delete_queue(ref)
    assert len(store._tombstones) == 5
    live = QueueRef("live", 0)
    for _ in range(40):
        store.append(Message("live", b"y" * 300), [live])
    clock.advance(60_000)
    store.append(Message("live", b"recent"), [live])
    assert store.enforce_retention(clock.now_ms, max_age_ms=30_000, max_bytes=0) >= 1
    assert len(store._tombstones) == 0  # every record they guarded is gone
    assert not store.layout.tombstones_path.exists()
    store.close()

    # a file written by an older run, with tombstones the log no longer needs, is pruned when the store opens
    store.layout.tombstones_path.write_text(json.dumps([["gone", 0, 1], ["gone", 1, 1 << 40]]))
    store = open_store()
    assert store._tombstones.items() == [(QueueRef("gone", 1), 1 << 40)]
    assert store.layout.tombstones_path.read_bytes().count(b"\n") == 1  # rewritten in the append-only format
    store.close()


def test_a_torn_last_line_is_skipped_and_the_next_deletion_still_parses(tmp_path):
    path = tmp_path / "tombstones"
    stones = Tombstones(path)
    stones.add(QueueRef("a", 0), 10)
    stones.add(QueueRef("b", 0), 20)
    stones.close()
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # a crash mid-append
    stones = Tombstones(path)
    assert stones.items() == [(QueueRef("a", 0), 10)]
    stones.add(QueueRef("c", 0), 30)
    stones.close_quietly()
    assert Tombstones(path).items() == [(QueueRef("a", 0), 10), (QueueRef("c", 0), 30)]


def test_a_failed_append_leaves_no_half_line(tmp_path):
    path = tmp_path / "tombstones"
    io = FaultyFileIO()
    stones = Tombstones(path, io=io)
    stones.add(QueueRef("a", 0), 10)
    io.inject("write", short=5, times=1)
    io.inject("write", errno.ENOSPC, after=1, times=1)
    with pytest.raises(OSError):
        stones.add(QueueRef("b", 0), 20)
    stones.add(QueueRef("c", 0), 30)
    stones.close()
    assert Tombstones(path).items() == [(QueueRef("a", 0), 10), (QueueRef("c", 0), 30)]
