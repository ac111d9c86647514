"""Retention of the file store: by age and by size, never the active segment, queues told they fell behind."""

from __future__ import annotations

import os
import shutil

import pytest

from tidegate.core.errors import MessageNotFound, OffsetOutOfRange
from tidegate.core.model import Message, QueueRef

Q0 = QueueRef("orders", 0)
Q1 = QueueRef("orders", 1)


def fill(store, count: int, queue: QueueRef = Q0, keys: tuple[str, ...] = ()) -> list:
    return [store.append(Message("orders", b"%04d" % n + b"x" * 300, keys=keys), [queue]) for n in range(count)]


def test_age_retention_deletes_segments_whose_newest_record_is_too_old(open_store, clock):
    store = open_store()
    old = fill(store, 30)
    clock.advance(60_000)
    fill(store, 3)
    segments_before = store.stats().segments
    deleted = store.enforce_retention(clock.now_ms, max_age_ms=30_000, max_bytes=0)
    assert deleted >= 2 and store.stats().segments == segments_before - deleted
    assert store.stats().min_offset > old[0].commit_offset
    with pytest.raises(MessageNotFound):
        store.read_message(old[0].commit_offset, old[0].size)
    with pytest.raises(MessageNotFound):
        store.lookup_id(old[0].msg_id)
    store.close()


def test_age_retention_keeps_segments_with_a_recent_record(open_store, clock):
    store = open_store()
    fill(store, 30)
    assert store.enforce_retention(clock.now_ms + 1000, max_age_ms=30_000, max_bytes=0) == 0
    store.close()


def test_size_retention_deletes_oldest_segments_until_under_the_limit(open_store, clock):
    store = open_store()
    fill(store, 60)
    limit = 3 * 4096
    deleted = store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=limit)
    assert deleted > 0
    assert store.stats().disk_bytes <= limit
    assert sorted(store._log.segment_bases())[0] == store.stats().min_offset
    store.close()


def test_the_active_segment_is_never_deleted_whatever_the_limits(open_store, clock):
    store = open_store()
    fill(store, 40)
    active = store._log.active_base
    store.enforce_retention(clock.now_ms + 10**9, max_age_ms=1, max_bytes=1)
    assert store._log.segment_bases() == [active]
    assert store.layout.segment_path(active).exists()
    bounds = store.queue_bounds(Q0)
    assert bounds.max_offset == 40 and bounds.min_offset > 0
    assert store.read_index(Q0, bounds.min_offset, 100)[-1].queue_offset == 39
    store.close()


def test_queue_minimum_rises_and_older_offsets_are_out_of_range_not_skipped(open_store, clock):
    store = open_store()
    results = fill(store, 40)
    store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=2 * 4096)
    bounds = store.queue_bounds(Q0)
    first_kept = next(n for n, r in enumerate(results) if r.commit_offset >= store.stats().min_offset)
    assert bounds.min_offset == first_kept
    with pytest.raises(OffsetOutOfRange):
        store.read_index(Q0, first_kept - 1, 5)
    assert store.read_index(Q0, first_kept, 1)[0].commit_offset == results[first_kept].commit_offset
    assert store.offset_for_time(Q0, 0) == first_kept
    store.close()


def test_index_files_wholly_below_the_minimum_are_deleted(open_store, clock):
    store = open_store()
    fill(store, 40)
    store.sync()
    store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=2 * 4096)
    minimum = store.queue_bounds(Q0).min_offset
    bases = store.layout.index_bases(Q0)
    assert bases[0] <= minimum < bases[0] + 8  # 8 entries per index file in these tests
    store.close()


def test_key_index_files_go_with_their_segments(open_store, clock):
    store = open_store()
    fill(store, 40, keys=("k",))
    store.sync()
    before = len(store.lookup_key("orders", "k", limit=100))
    store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=2 * 4096)
    assert set(store.layout.key_index_bases()) <= set(store._log.segment_bases())
    after = store.lookup_key("orders", "k", limit=100)
    assert 0 < len(after) < before
    assert all(m.msg_id for m in after)
    store.close()


def test_bounds_after_retention_survive_a_clean_restart(open_store, clock):
    store = open_store()
    fill(store, 40)
    store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=2 * 4096)
    bounds = store.queue_bounds(Q0)
    store.close()
    store = open_store()
    assert store.queue_bounds(Q0) == bounds
    store.close()


def test_indexes_rebuilt_after_retention_start_at_the_first_stored_record(open_store, clock):
    store = open_store()
    fill(store, 40)
    store.append(Message("orders", b"late"), [Q1])
    store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=2 * 4096)
    bounds = store.queue_bounds(Q0)
    store.close()
    shutil.rmtree(store.layout.index_dir)
    os.unlink(store.layout.checkpoint_path)
    os.unlink(store.layout.clean_shutdown_path)  # as if it crashed, with no checkpoint to start from
    store = open_store()
    assert store.queue_bounds(Q0) == bounds
    assert store.queue_bounds(Q1).max_offset == 1
    assert store.append(Message("orders", b"next"), [Q0]).queue_offsets == (bounds.max_offset,)
    store.close()


def test_a_queue_deleted_and_recreated_after_retention_starts_from_zero(open_store, clock):
    store = open_store()
    fill(store, 40)
    store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=2 * 4096)
    store.delete_queue(Q0)
    assert store.append(Message("orders", b"fresh"), [Q0]).queue_offsets == (0,)
    assert store.queue_bounds(Q0).min_offset == 0
    store.close()


def test_a_topic_retention_trim_survives_a_clean_restart_and_deletes_index_files_below_it(open_store, clock):
    """expire_queue_before persists the queue's new minimum (its low-water file) and drops whole index files."""
    store = open_store()
    fill(store, 20)
    clock.advance(1_000)
    fill(store, 5)
    store.sync()
    assert store.expire_queue_before(Q0, clock.now_ms) == 20
    assert store.layout.index_bases(Q0) == [16, 24]  # 8 entries per file: files [0, 8) and [8, 16) are gone
    store.close()
    store = open_store()
    assert store.recovery.clean
    assert store.queue_bounds(Q0).min_offset == 20 and store.queue_bounds(Q0).max_offset == 25
    with pytest.raises(OffsetOutOfRange):
        store.read_index(Q0, 19, 1)
    assert store.read_message(store.read_index(Q0, 20, 1)[0].commit_offset).body[:4] == b"0000"
    assert store.stats().min_offset == 0  # the commit log lost nothing
    store.close()


def test_global_retention_after_a_topic_trim_never_lowers_the_queue_minimum(open_store, clock):
    store = open_store()
    fill(store, 40)
    clock.advance(1_000)
    fill(store, 2)
    store.expire_queue_before(Q0, clock.now_ms)
    store.enforce_retention(clock.now_ms, max_age_ms=0, max_bytes=2 * 4096)
    assert store.queue_bounds(Q0).min_offset == 40
    store.close()
    store = open_store()
    assert store.queue_bounds(Q0).min_offset == 40
    store.close()


def test_a_queue_deleted_after_a_topic_trim_comes_back_from_zero_with_no_stale_minimum(open_store, clock):
    store = open_store()
    fill(store, 10)
    store.expire_queue_before(Q0, clock.now_ms + 1)
    store.delete_queue(Q0)
    assert not store.layout.low_water_path(Q0).exists()
    assert store.append(Message("orders", b"fresh"), [Q0]).queue_offsets == (0,)
    store.close()
    store = open_store()
    assert store.queue_bounds(Q0).min_offset == 0 and store.queue_bounds(Q0).max_offset == 1
    store.close()


def test_a_damaged_low_water_file_shows_the_expired_entries_again_rather_than_hiding_others(open_store, clock):
    store = open_store()
    fill(store, 10)
    store.sync()  # index files on disk, so the trim deletes the file of entries [0, 8)
    store.expire_queue_before(Q0, clock.now_ms + 1)
    store.close()
    store.layout.low_water_path(Q0).write_bytes(b"garbage")
    store = open_store()
    assert store.queue_bounds(Q0).min_offset == 8  # the first index file still on disk
    store.close()
