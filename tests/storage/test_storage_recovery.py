"""Crash recovery of the file store: torn tails, corrupt records, lost or stale indexes, the clean-shutdown marker."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap

from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.filestore import FileMessageStore
from tidegate.core.storage.record import decode_record

Q0 = QueueRef("orders", 0)
Q1 = QueueRef("orders", 1)


def abandon(store) -> None:
    """Simulate a crash: drop the store without flushing buffers, writing the checkpoint or the marker."""
    log = store._log
    for fd in [log._active_fd, *log._read_fds.values()]:
        os.close(fd)
    log._read_fds.clear()
    store._files.close_all()
    store._closed = True


def fill(store, count: int, queue: QueueRef = Q0, body_size: int = 200, keys: tuple[str, ...] = ()) -> list:
    return [store.append(Message("orders", b"%04d" % n + b"x" * body_size, keys=keys), [queue])
            for n in range(count)]


def segment_path(store, base: int):
    return store.layout.segment_path(base)


def bodies(store, queue: QueueRef = Q0) -> list[bytes]:
    bounds = store.queue_bounds(queue)
    entries = store.read_index(queue, bounds.min_offset, bounds.max_offset - bounds.min_offset)
    return [store.read_message(e.commit_offset, e.size).body[:4] for e in entries]


def test_clean_close_then_open_scans_nothing_and_keeps_everything(open_store, tmp_path):
    store = open_store()
    fill(store, 30)
    store.close()
    assert store.layout.clean_shutdown_path.exists()
    store = open_store()
    assert store.recovery.clean and store.recovery.scanned_bytes == 0
    assert not store.layout.clean_shutdown_path.exists()  # removed on open: a crash from now on is unclean
    assert bodies(store) == [b"%04d" % n for n in range(30)]
    assert store.durable_offset == store.end_offset
    store.close()


def test_a_torn_last_record_is_truncated_and_everything_before_it_survives(open_store, tmp_path, caplog):
    store = open_store()
    results = fill(store, 20)
    store.sync()
    last = results[-1]
    abandon(store)
    base = store._log.active_base
    os.truncate(segment_path(store, base), last.commit_offset - base + last.size // 2)

    with caplog.at_level(logging.INFO, logger="tidegate.storage"):
        store = open_store()
    report = store.recovery
    assert not report.clean
    assert report.truncated_bytes == last.size // 2 and report.dropped_records == 1
    assert report.trimmed_index_entries == 1
    assert store.end_offset == last.commit_offset
    assert bodies(store) == [b"%04d" % n for n in range(19)]
    assert [r.getMessage() for r in caplog.records if "storage recovery" in r.getMessage()]
    # the next append takes the dropped record's place, in the log and in the queue
    again = store.append(Message("orders", b"new!"), [Q0])
    assert (again.commit_offset, again.queue_offsets) == (last.commit_offset, (19,))
    store.close()


def test_garbage_after_the_last_record_is_cut_off(open_store, tmp_path):
    store = open_store()
    fill(store, 5)
    end = store.end_offset
    abandon(store)
    with open(segment_path(store, store._log.active_base), "ab") as f:
        f.write(b"\x17" * 100)
    store = open_store()
    assert store.recovery.truncated_bytes == 100 and store.recovery.dropped_records == 1
    assert store.end_offset == end
    assert bodies(store) == [b"%04d" % n for n in range(5)]
    store.close()


def test_a_crc_error_in_the_tail_drops_that_record_and_all_after_it(open_store, tmp_path):
    store = open_store()
    results = fill(store, 30)  # several segments; the checkpoint was never written, so everything is scanned
    bad = results[12]
    abandon(store)
    segment = store._log.segment_of(bad.commit_offset)
    with open(segment_path(store, segment), "r+b") as f:
        f.seek(bad.commit_offset - segment + bad.size - 1)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    store = open_store()
    report = store.recovery
    assert report.dropped_records == 30 - 12
    assert store.end_offset == bad.commit_offset
    assert store.queue_bounds(Q0).max_offset == 12
    assert bodies(store) == [b"%04d" % n for n in range(12)]
    assert store._log.segment_bases()[-1] == segment  # later segments are gone
    store.close()


def test_indexes_are_rebuilt_from_the_log_when_their_files_are_deleted_after_a_crash(open_store, tmp_path):
    store = open_store()
    fill(store, 25, keys=("k",))
    store.append(Message("orders", b"fan!"), [Q0, Q1])
    store.sync()  # flushes indexes and writes the checkpoint
    abandon(store)
    shutil.rmtree(store.layout.index_dir)
    shutil.rmtree(store.layout.keys_dir)
    store = open_store()
    assert store.recovery.rebuilt_index_entries == 27
    assert bodies(store) == [b"%04d" % n for n in range(25)] + [b"fan!"]
    assert bodies(store, Q1) == [b"fan!"]
    assert len(store.lookup_key("orders", "k")) == 25
    store.close()


def test_indexes_deleted_after_a_clean_shutdown_are_rebuilt_too(open_store, tmp_path):
    store = open_store()
    fill(store, 12)
    store.close()
    shutil.rmtree(store.layout.index_dir)
    store = open_store()
    assert store.recovery.rebuilt_index_entries == 12
    assert bodies(store) == [b"%04d" % n for n in range(12)]
    store.close()


def test_an_index_left_behind_the_checkpoint_is_completed_from_the_log(open_store, tmp_path):
    store = open_store()
    fill(store, 10)
    store.sync()
    stale = tmp_path / "stale-index"
    shutil.copytree(store.layout.index_dir, stale)
    fill(store, 10)
    store.sync()
    abandon(store)
    shutil.rmtree(store.layout.index_dir)
    shutil.copytree(stale, store.layout.index_dir)
    store = open_store()
    assert store.queue_bounds(Q0).max_offset == 20
    assert bodies(store) == [b"%04d" % n for n in range(10)] * 2
    store.close()


def test_index_entries_pointing_past_the_recovered_log_end_are_trimmed(open_store, tmp_path):
    store = open_store()
    results = fill(store, 10)
    store.sync()  # index entries for all 10 are on disk
    abandon(store)
    cut = results[7].commit_offset
    base = store._log.segment_of(cut)
    os.truncate(segment_path(store, base), cut - base)  # as if the log's last records never reached the disk
    store = open_store()
    assert store.recovery.trimmed_index_entries == 3
    assert store.queue_bounds(Q0).max_offset == 7
    assert bodies(store) == [b"%04d" % n for n in range(7)]
    store.close()


def test_records_appended_after_the_last_checkpoint_are_indexed_on_recovery(open_store, tmp_path):
    store = open_store()
    fill(store, 5)
    store.sync()
    fill(store, 5, keys=("late",))  # indexed only in memory when the crash comes
    abandon(store)
    store = open_store()
    assert store.recovery.rebuilt_index_entries == 5
    assert store.queue_bounds(Q0).max_offset == 10
    assert len(store.lookup_key("orders", "late")) == 5
    store.close()


def test_a_queue_deleted_before_a_crash_does_not_come_back(open_store, tmp_path):
    store = open_store()
    store.append(Message("orders", b"fan"), [Q0, Q1])
    store.delete_queue(Q0)
    abandon(store)
    store = open_store()
    assert set(store.queues()) == {Q1}
    store.close()


def test_a_crash_between_filler_and_new_segment_continues_in_a_new_segment(open_store, tmp_path):
    store = open_store()
    while len(store._log.segment_bases()) < 2:
        store.append(Message("orders", b"x" * 300), [Q0])
    count = store.queue_bounds(Q0).max_offset
    last = store.read_index(Q0, count - 1, 1)[0]
    abandon(store)
    newest = store._log.segment_bases()[-1]
    # keep only the sealed segment: undo the last append and the creation of the new segment
    os.unlink(segment_path(store, newest))
    store = open_store()
    assert store.queue_bounds(Q0).max_offset == count - 1
    assert store._log.segment_bases() == [0, newest]
    result = store.append(Message("orders", b"next"), [Q0])
    assert result.commit_offset == newest and result.queue_offsets == (count - 1,)
    assert last.commit_offset == newest
    store.close()


def test_durable_offset_after_recovery_is_the_recovered_end(open_store, tmp_path):
    store = open_store()
    fill(store, 8)
    abandon(store)
    store = open_store()
    assert store.durable_offset == store.end_offset > 0
    store.close()


CHILD = textwrap.dedent("""
    import sys
    from tidegate.core.model import Message, QueueRef
    from tidegate.core.storage.filestore import FileMessageStore
    store = FileMessageStore(sys.argv[1], segment_bytes=4096, index_entries_per_file=8)
    queue = QueueRef("orders", 0)
    n = 0
    while True:
        for _ in range(7):
            store.append(Message("orders", b"%06d" % n), [queue])
            n += 1
        store.sync()
        print(n, flush=True)  # every message below n is acknowledged as durable
""")


def test_kill_9_mid_stream_loses_no_acknowledged_message(open_store, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "data")], stdout=subprocess.PIPE,
                             text=True)
    try:
        acknowledged = 0
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= 700:  # ~100 sync rounds, many segment rolls
                break
    finally:
        child.kill()
        child.wait()
    store = open_store()
    entries = store.read_index(Q0, 0, store.queue_bounds(Q0).max_offset)
    got = [store.read_message(e.commit_offset, e.size).body for e in entries]
    assert len(got) >= acknowledged
    assert [int(b) for b in got[:acknowledged]] == list(range(acknowledged))
    for entry in store.read_index(Q0, 0, len(got)):
        assert decode_record(store._log.read(entry.commit_offset, entry.size)).destinations[0][2] == \
            entry.queue_offset
    store.close()


def test_deleting_a_queue_does_not_make_the_next_crash_recovery_rescan_the_whole_log(open_store, monkeypatch):
    store = open_store()
    store.append(Message("orders", b"a"), [Q0])
    store.append(Message("orders", b"b"), [Q1])
    store.sync()
    store.delete_queue(Q0)
    abandon(store)
    seen = []
    original = FileMessageStore._recover

    def spy(self, clean, checkpoint, full):
        seen.append(full)
        return original(self, clean, checkpoint, full)

    monkeypatch.setattr(FileMessageStore, "_recover", spy)
    store = open_store()
    assert seen == [False]
    assert set(store.queues()) == {Q1}
    store.close()


def test_sync_from_the_owning_thread_persists_index_entries_for_the_next_crash(open_store):
    store = open_store()
    fill(store, 6)
    store.sync()
    abandon(store)
    store = open_store()
    assert store.recovery.rebuilt_index_entries == 0  # nothing after the checkpoint needed re-dispatch
    assert bodies(store) == [b"%04d" % n for n in range(6)]
    store.close()


def test_a_topic_retention_trim_survives_a_crash(open_store, clock):
    store = open_store()
    fill(store, 12)
    clock.advance(1_000)
    fill(store, 3)
    assert store.expire_queue_before(Q0, clock.now_ms) == 12
    fill(store, 2)  # appended after the trim, indexed only in memory when the crash comes
    store.sync()
    abandon(store)
    store = open_store()
    assert not store.recovery.clean
    assert store.queue_bounds(Q0).min_offset == 12 and store.queue_bounds(Q0).max_offset == 17
    assert bodies(store) == [b"%04d" % n for n in (0, 1, 2, 0, 1)]
    store.close()


def test_a_low_water_mark_above_the_recovered_queue_end_comes_down_so_new_entries_are_not_hidden(open_store, clock):
    """When a crash loses both the newest index entries and their records, the queue ends below its low-water
    mark and the next appends reuse those offsets: they must stay readable after the next restart."""
    store = open_store()
    results = fill(store, 10)
    store.sync()  # index entries and the checkpoint on disk
    assert store.expire_queue_before(Q0, clock.now_ms + 1) == 10
    abandon(store)
    os.truncate(store.layout.index_path(Q0, 8), 0)  # entries 8 and 9 never reached the disk...
    cut = results[8].commit_offset
    base = store._log.segment_of(cut)
    os.truncate(segment_path(store, base), cut - base)  # ...and neither did their records
    store = open_store()
    assert store.queue_bounds(Q0).max_offset == 8
    assert store.append(Message("orders", b"new!"), [Q0]).queue_offsets == (8,)
    store.close()
    store = open_store()
    assert store.queue_bounds(Q0).max_offset == 9
    assert store.queue_bounds(Q0).min_offset <= 8
    assert store.read_message(store.read_index(Q0, 8, 1)[0].commit_offset).body == b"new!"
    store.close()
