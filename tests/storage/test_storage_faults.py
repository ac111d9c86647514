"""Storage faults fail safe: short writes, disk full, I/O errors and failed fsyncs, injected through FaultyFileIO.

Each test names the fault and the promise it checks: nothing torn is left for the next append to build on, nothing
is ever reported durable that an fsync did not prove, background work survives errors, and a restart recovers.
"""

from __future__ import annotations

import errno
import os

import pytest

from tidegate.core.errors import StoreError, StoreFull
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.fileio import FaultyFileIO

Q0 = QueueRef("orders", 0)


def abandon(store) -> None:
    """Simulate a crash: drop the store without flushing buffers, writing the checkpoint or the marker."""
    store._log.release()
    store._files.close_all()
    store._tombstones.close_quietly()
    store._closed = True


def fill(store, count: int, start: int = 0, queue: QueueRef = Q0) -> list:
    return [store.append(Message("orders", b"%04d" % n + b"x" * 100), [queue]) for n in range(start, start + count)]


def bodies(store, queue: QueueRef = Q0) -> list[bytes]:
    bounds = store.queue_bounds(queue)
    entries = store.read_index(queue, bounds.min_offset, bounds.max_offset - bounds.min_offset)
    return [store.read_message(e.commit_offset, e.size).body[:4] for e in entries]


def numbered(*ranges: range) -> list[bytes]:
    return [b"%04d" % n for r in ranges for n in r]


@pytest.fixture
def io() -> FaultyFileIO:
    return FaultyFileIO()


# --- short writes


def test_short_commit_log_writes_are_continued_until_the_record_is_whole(open_store, io):
    store = open_store(io=io)
    io.inject("write", short=7, path="commitlog", times=3)
    results = fill(store, 3)
    assert io.calls["write"] >= 6  # the shortened calls were followed by more
    assert bodies(store) == numbered(range(3))
    abandon(store)
    store = open_store()
    assert store.recovery.truncated_bytes == 0 and store.recovery.dropped_bytes == 0
    assert bodies(store) == numbered(range(3))
    assert store.end_offset == results[-1].commit_offset + results[-1].size
    store.close()


def test_short_index_writes_are_continued_so_a_restart_reads_every_entry(open_store, io):
    store = open_store(io=io)
    fill(store, 20)
    io.inject("pwrite", short=5, path=".idx")  # every index write stops after 5 bytes
    store.sync()
    io.clear()
    store.close()
    store = open_store()
    assert store.recovery.clean and bodies(store) == numbered(range(20))
    store.close()


def test_a_short_write_then_a_full_disk_fails_the_append_and_leaves_no_torn_bytes(open_store, io):
    store = open_store(io=io)
    fill(store, 2)
    end = store.end_offset
    segment = store.layout.segment_path(store._log.active_base)
    size = os.path.getsize(segment)
    io.inject("write", short=10, path="commitlog", times=1)
    io.inject("write", errno.ENOSPC, path="commitlog", after=1)
    store._space_is_back = lambda: False  # the test's filesystem is not really full
    with pytest.raises(StoreFull):
        fill(store, 1, start=2)
    assert store.end_offset == end and os.path.getsize(segment) == size
    assert store.queue_bounds(Q0).max_offset == 2
    ok, reason = store.health()
    assert not ok and "full" in reason
    io.clear()  # space is back
    again = fill(store, 1, start=2)[0]
    assert again.commit_offset == end and again.queue_offsets == (2,)
    assert store.health() == (True, "")
    store.sync()
    abandon(store)  # a crash right after: recovery finds nothing to cut
    store = open_store()
    assert store.recovery.truncated_bytes == 0
    assert bodies(store) == numbered(range(3))
    store.close()


def test_health_stops_reporting_a_full_disk_once_space_is_back_without_waiting_for_an_append(open_store, io):
    store = open_store(io=io)
    io.inject("write", errno.ENOSPC, path="commitlog")
    store._space_is_back = lambda: False
    with pytest.raises(StoreFull):
        fill(store, 1)
    assert not store.health()[0]
    store._space_is_back = lambda: True  # what os.statvfs says once files were removed
    assert store.health() == (True, "")
    io.clear()
    store.close()


def test_eio_on_append_raises_store_error_and_the_next_append_works(open_store, io):
    store = open_store(io=io)
    fill(store, 1)
    io.inject("write", errno.EIO, path="commitlog", times=1)
    with pytest.raises(StoreError):
        fill(store, 1, start=1)
    assert not store.health()[0]
    fill(store, 1, start=1)
    assert store.health()[0]
    assert bodies(store) == numbered(range(2))
    store.close()


def test_a_failed_batch_append_on_a_full_disk_leaves_nothing_and_later_batches_work(open_store, io):
    store = open_store(io=io)
    fill(store, 1)
    end = store.end_offset
    io.inject("write", errno.ENOSPC, path="commitlog", after=1, times=1)  # fails after a segment roll
    batch = [(Message("orders", b"%04d" % n + b"x" * 300), [Q0]) for n in range(1, 30)]
    with pytest.raises(StoreFull):
        store.append_batch(batch)
    assert store.end_offset == end and store.queue_bounds(Q0).max_offset == 1
    results = store.append_batch(batch)
    assert results[0].commit_offset == end and results[0].queue_offsets == (1,)
    abandon(store)
    store = open_store()
    assert store.recovery.truncated_bytes == 0
    assert bodies(store) == numbered(range(30))
    store.close()


def test_when_a_failed_write_cannot_be_cut_back_the_store_refuses_writes_until_a_restart(open_store, io):
    store = open_store(io=io)
    fill(store, 3)
    store.sync()
    io.inject("write", short=20, path="commitlog", times=1)
    io.inject("write", errno.EIO, path="commitlog", after=1, times=1)
    io.inject("ftruncate", errno.EIO, path="commitlog", times=1)
    with pytest.raises(StoreError):
        fill(store, 1, start=3)
    io.clear()
    with pytest.raises(StoreError, match="restart to recover"):
        fill(store, 1, start=3)  # would land after the torn bytes
    ok, reason = store.health()
    assert not ok and "restart" in reason
    store.close()
    assert not store.layout.clean_shutdown_path.exists()
    store = open_store()
    assert not store.recovery.clean and store.recovery.truncated_bytes == 20
    assert bodies(store) == numbered(range(3))
    fill(store, 1, start=3)
    assert bodies(store) == numbered(range(4))
    store.close()


# --- fsync failures


def test_a_failed_fsync_is_never_retried_into_a_durable_offset(open_store, io):
    """PostgreSQL's fsync lesson: after a failed fsync the kernel may have dropped the dirty pages, so a second
    fsync can succeed although the data is not on disk. The store must never report those bytes durable."""
    store = open_store(io=io)
    fill(store, 3)
    durable = store.sync()
    fill(store, 2, start=3)
    io.inject("fsync", errno.EIO, path="commitlog", times=1)
    with pytest.raises(StoreError):
        store.sync()
    io.clear()  # the next fsync would succeed
    with pytest.raises(StoreError, match="restart to recover"):
        store.sync()
    assert store.durable_offset == durable < store.end_offset
    with pytest.raises(StoreError, match="restart to recover"):
        fill(store, 1, start=5)
    with pytest.raises(StoreError, match="restart to recover"):
        store.append_batch([(Message("orders", b"late"), [Q0])])
    ok, reason = store.health()
    assert not ok and "fsync" in reason
    assert store.queue_bounds(Q0).max_offset == 5  # reads still work
    store.close()  # closes the files, but writes neither the checkpoint nor the clean marker
    assert not store.layout.clean_shutdown_path.exists()

    store = open_store()
    assert not store.recovery.clean and store.recovery.scanned_bytes > 0  # re-verified by CRC
    assert bodies(store) == numbered(range(5))
    assert store.health() == (True, "")
    fill(store, 1, start=5)
    assert store.sync() == store.end_offset
    store.close()


def test_a_failed_directory_fsync_after_a_segment_roll_is_fatal_too(open_store, io):
    store = open_store(io=io)
    fill(store, 40)  # rolls segments: the directory must be fsynced
    io.inject("fsync", errno.EIO, path="commitlog", times=1)
    with pytest.raises(StoreError):
        store.sync()
    assert store.durable_offset == 0
    with pytest.raises(StoreError):
        store.sync()
    store.close()


# --- background work survives errors


def test_a_full_disk_during_flush_indexes_keeps_the_entries_and_the_old_checkpoint_and_a_retry_succeeds(
        open_store, io):
    store = open_store(io=io)
    fill(store, 10)
    store.sync()
    checkpoint = store.layout.checkpoint_path.read_bytes()
    fill(store, 10, start=10)
    io.inject("pwrite", errno.ENOSPC, path=".idx")
    io.inject("write", errno.ENOSPC, path="checkpoint")
    durable = store.sync()  # the log's fsync worked: sync succeeds, the index flush failure shows in health
    assert durable == store.end_offset
    with pytest.raises(StoreError, match="index flush"):
        store.flush_indexes()
    assert store.layout.checkpoint_path.read_bytes() == checkpoint  # the checkpoint did not advance
    ok, reason = store.health()
    assert not ok and "index flush failed: disk full" in reason
    assert bodies(store) == numbered(range(20))  # buffered entries still read
    io.clear()  # space is back
    store.flush_indexes()
    assert store.health() == (True, "")
    assert store.layout.checkpoint_path.read_bytes() != checkpoint
    abandon(store)
    store = open_store()
    assert store.recovery.rebuilt_index_entries == 0  # the retried flush put everything on disk
    assert bodies(store) == numbered(range(20))
    store.close()


def test_a_failing_checkpoint_write_never_advances_the_checkpoint(open_store, io):
    store = open_store(io=io)
    fill(store, 5)
    store.sync()
    before = store._checkpoint
    fill(store, 5, start=5)
    io.inject("replace", errno.EIO, path="checkpoint")
    store.sync()  # the log is durable; the checkpoint write inside fails quietly
    assert store._checkpoint == before and not store.health()[0]
    with pytest.raises(StoreError):
        store.flush_indexes()
    assert store._checkpoint == before
    assert not [name for name in os.listdir(store.layout.root) if name.endswith(".tmp")]
    io.clear()
    store.flush_indexes()
    assert store._checkpoint == store.durable_offset > before
    store.close()


def test_appends_succeed_while_the_automatic_index_flush_fails(open_store, io):
    store = open_store(io=io, index_flush_entries=4)
    io.inject("pwrite", errno.ENOSPC, path=".idx")
    fill(store, 12)  # crosses the flush threshold three times; the failures are not the appends' business
    assert not store.health()[0]
    io.clear()
    store.flush_indexes()
    assert store.health()[0]
    store.close()
    store = open_store()
    assert bodies(store) == numbered(range(12))
    store.close()


def test_a_key_index_flush_that_fails_midway_adds_each_key_once_when_retried(open_store, io):
    store = open_store(io=io)
    for n in range(5):
        store.append(Message("orders", b"%04d" % n, keys=("k",)), [Q0])
    io.inject("write", short=9, path="keys", times=1)
    io.inject("write", errno.ENOSPC, path="keys", after=1, times=1)
    with pytest.raises(StoreError):
        store.flush_indexes()
    store.flush_indexes()
    assert [m.body for m in store.lookup_key("orders", "k")] == numbered(range(5))
    store.close()
    store = open_store()
    assert [m.body for m in store.lookup_key("orders", "k")] == numbered(range(5))
    store.close()


def test_retention_survives_an_io_error_and_finishes_once_the_disk_works(open_store, io, clock):
    store = open_store(io=io)
    old = fill(store, 40)
    clock.advance(60_000)
    fill(store, 2, start=40)
    segments = store.stats().segments
    io.inject("unlink", errno.EIO, path="commitlog", after=1)  # the first segment goes, the second fails
    with pytest.raises(StoreError, match="retention"):
        store.enforce_retention(clock.now_ms, max_age_ms=30_000, max_bytes=0)
    assert store.stats().segments == segments - 1
    assert store.queue_bounds(Q0).min_offset > 0  # the queue followed the segment that did go
    assert store.read_message(old[-1].commit_offset).body[:4] == b"0039"
    ok, reason = store.health()
    assert not ok and "retention failed" in reason
    io.clear()
    deleted = store.enforce_retention(clock.now_ms, max_age_ms=30_000, max_bytes=0)
    assert deleted >= 1 and store.health() == (True, "")
    kept = bodies(store)
    store.close()
    store = open_store()
    assert bodies(store) == kept and kept[-2:] == numbered(range(40, 42))
    store.close()


def test_a_queue_deletion_whose_tombstone_cannot_be_written_changes_nothing(open_store, io):
    store = open_store(io=io)
    fill(store, 3)
    io.inject("write", errno.ENOSPC, path="tombstones")
    with pytest.raises(StoreError):
        store.delete_queue(Q0)
    assert bodies(store) == numbered(range(3))
    io.clear()
    store.delete_queue(Q0)
    assert Q0 not in set(store.queues())
    store.close()
