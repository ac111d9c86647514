"""Recovery loses only what is damaged: a corrupt record in the middle of the log is skipped, the valid records after
it are kept, index entries into the damaged bytes become holes, and holes are never returned by read_index."""

from __future__ import annotations

import logging
import os

from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.layout import StoreLayout
from tidegate.core.storage.queueindex import IndexFiles, QueueIndex
from tidegate.core.storage.record import FILLER_SIZE, MESSAGE_MAGIC, decode_record, encode_record

Q0 = QueueRef("orders", 0)
BIG_SEGMENT = 1 << 16  # every record of a test in one segment


def abandon(store) -> None:
    """Simulate a crash: drop the store without flushing buffers, writing the checkpoint or the marker."""
    store._log.release()
    store._files.close_all()
    store._tombstones.close_quietly()
    store._closed = True


def fill(store, count: int, start: int = 0) -> list:
    return [store.append(Message("orders", b"%04d" % n + b"x" * 100), [Q0]) for n in range(start, start + count)]


def bodies(store) -> list[bytes]:
    bounds = store.queue_bounds(Q0)
    entries = store.read_index(Q0, bounds.min_offset, bounds.max_offset - bounds.min_offset)
    return [store.read_message(e.commit_offset, e.size).body[:4] for e in entries]


def numbered(count: int, skip: tuple[int, ...] = ()) -> list[bytes]:
    return [b"%04d" % n for n in range(count) if n not in skip]


def damage(store, commit_offset: int, at: int, xor: int = 0xFF) -> None:
    """Flip bits of the byte `at` bytes into the record at `commit_offset`."""
    base = store._log.segment_of(commit_offset)
    with open(store.layout.segment_path(base), "r+b") as f:
        f.seek(commit_offset - base + at)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ xor]))


def assert_indexes_point_right(store) -> None:
    bounds = store.queue_bounds(Q0)
    for entry in store.read_index(Q0, bounds.min_offset, bounds.max_offset - bounds.min_offset):
        record = decode_record(store._log.read(entry.commit_offset, entry.size))
        assert record.destinations == [("orders", 0, entry.queue_offset)]


def test_one_corrupt_record_in_the_middle_of_a_segment_loses_only_that_record(open_store, caplog):
    store = open_store(segment_bytes=BIG_SEGMENT)
    results = fill(store, 40)
    store.sync()  # indexes on disk, checkpoint at the end: the segment is verified, nothing re-dispatched
    abandon(store)
    bad = results[20]
    damage(store, bad.commit_offset, bad.size // 2)  # a flipped bit in the body: the header still says its length
    with caplog.at_level(logging.WARNING, logger="tidegate.storage"):
        store = open_store(segment_bytes=BIG_SEGMENT)
    report = store.recovery
    assert report.dropped_ranges == ((bad.commit_offset, bad.commit_offset + bad.size),)
    assert (report.dropped_bytes, report.dropped_records, report.truncated_bytes) == (bad.size, 1, 0)
    assert any("skipped" in r.getMessage() and str(bad.commit_offset) in r.getMessage() for r in caplog.records)
    assert store.queue_bounds(Q0).max_offset == 40
    assert bodies(store) == numbered(40, skip=(20,))
    assert store.read_index(Q0, 20, 1) == []  # the hole left for it is never returned
    assert [e.queue_offset for e in store.read_index(Q0, 19, 3)] == [19, 21]
    assert_indexes_point_right(store)
    later = fill(store, 1, start=40)[0]
    assert later.queue_offsets == (40,)
    store.close()
    store = open_store(segment_bytes=BIG_SEGMENT)
    assert bodies(store) == numbered(41, skip=(20,))
    store.close()


def test_a_damaged_record_header_is_resynced_at_the_next_record_magic(open_store):
    store = open_store(segment_bytes=BIG_SEGMENT)
    results = fill(store, 30)
    store.sync()
    abandon(store)
    bad = results[10]
    damage(store, bad.commit_offset, 5)  # inside the magic: the record cannot even say how long it is
    store = open_store(segment_bytes=BIG_SEGMENT)
    assert store.recovery.dropped_ranges == ((bad.commit_offset, bad.commit_offset + bad.size),)
    assert bodies(store) == numbered(30, skip=(10,))
    assert_indexes_point_right(store)
    store.close()


def test_a_damaged_length_field_in_the_middle_is_not_taken_for_a_torn_tail(open_store):
    store = open_store(segment_bytes=BIG_SEGMENT)
    results = fill(store, 30)
    store.sync()
    abandon(store)
    bad = results[10]
    damage(store, bad.commit_offset, 2, xor=0x7F)  # the length now runs past the end of the segment
    store = open_store(segment_bytes=BIG_SEGMENT)
    assert store.recovery.truncated_bytes == 0
    assert store.end_offset == results[-1].commit_offset + results[-1].size
    assert bodies(store) == numbered(30, skip=(10,))
    store.close()


def test_records_after_a_corrupt_record_that_were_never_indexed_are_re_dispatched_around_a_hole(open_store):
    store = open_store(segment_bytes=BIG_SEGMENT)
    fill(store, 5)
    store.sync()  # the checkpoint stops here; what follows is only in the log
    results = fill(store, 20, start=5)
    abandon(store)
    bad = results[5]  # queue offset 10
    damage(store, bad.commit_offset, bad.size - 1)
    store = open_store(segment_bytes=BIG_SEGMENT)
    assert store.recovery.dropped_records == 1
    assert store.queue_bounds(Q0).max_offset == 25
    assert bodies(store) == numbered(25, skip=(10,))
    assert_indexes_point_right(store)
    store.close()


def test_a_record_embedded_in_a_damaged_body_is_not_taken_for_a_real_one(open_store):
    """A body may hold bytes of a whole valid record (a bridged or re-published record). When the record around
    it is damaged, the search for the next record magic finds the embedded one; it claims a queue offset the index
    gives to another record, so it is rejected and the search goes on to the real next record."""
    store = open_store(segment_bytes=BIG_SEGMENT)
    fill(store, 5)
    # stored "later" than every real record, so only the queue-index check can tell it is not one
    impostor = encode_record(Message("orders", b"fake"), 1 << 50, [("orders", 0, 3)])
    carrier = store.append(Message("orders", b"0005" + impostor + b"y" * 30), [Q0])
    fill(store, 5, start=6)
    store.sync()
    abandon(store)
    damage(store, carrier.commit_offset, 5)
    store = open_store(segment_bytes=BIG_SEGMENT)
    assert store.recovery.dropped_ranges == ((carrier.commit_offset, carrier.commit_offset + carrier.size),)
    assert bodies(store) == numbered(11, skip=(5,))
    assert_indexes_point_right(store)
    store.close()


def test_a_torn_tail_is_still_cut_off(open_store):
    store = open_store(segment_bytes=BIG_SEGMENT)
    results = fill(store, 10)
    store.sync()
    abandon(store)
    last = results[-1]
    base = store._log.active_base
    os.truncate(store.layout.segment_path(base), last.commit_offset - base + 30)
    store = open_store(segment_bytes=BIG_SEGMENT)
    assert store.recovery.truncated_bytes == 30 and store.recovery.dropped_ranges == ()
    assert store.end_offset == last.commit_offset
    assert bodies(store) == numbered(9)
    store.close()


def test_a_damaged_filler_keeps_the_later_segments_and_gets_rewritten(open_store):
    store = open_store()  # tiny segments: several of them
    results = fill(store, 60)
    abandon(store)
    bases = store._log.segment_bases()
    assert len(bases) >= 3
    first = store.layout.segment_path(bases[0])
    size = os.path.getsize(first)
    with open(first, "r+b") as f:
        f.seek(size - 2)  # inside the filler's last_store_ts, covered by its CRC
        f.write(b"\xAA")
    store = open_store()
    report = store.recovery
    assert report.truncated_bytes == 0 and report.dropped_records == 0
    assert report.dropped_ranges == ((bases[0] + size - FILLER_SIZE, bases[0] + size),)
    assert store._log.segment_bases() == bases
    assert bodies(store) == numbered(60)
    assert store.end_offset == results[-1].commit_offset + results[-1].size
    abandon(store)
    store = open_store()  # the filler was rewritten: nothing to skip any more
    assert store.recovery.dropped_ranges == ()
    assert bodies(store) == numbered(60)
    store.close()


def test_a_sealed_segment_that_lost_its_filler_keeps_the_later_segments(open_store):
    store = open_store()
    fill(store, 60)
    abandon(store)
    bases = store._log.segment_bases()
    first = store.layout.segment_path(bases[0])
    os.truncate(first, os.path.getsize(first) - FILLER_SIZE)
    store = open_store()
    assert store.recovery.truncated_bytes == 0
    assert store._log.segment_bases() == bases
    assert bodies(store) == numbered(60)
    store.close()


def test_read_index_leaves_holes_out_and_an_all_hole_window_reads_empty(tmp_path):
    layout = StoreLayout(tmp_path)
    layout.create_dirs()
    files = IndexFiles(layout, entries_per_file=4)
    q = QueueIndex(Q0, files)
    for n in range(10):
        if n in (2, 5, 6):
            q.add(0, 0, 0)  # holes, as recovery writes them
        else:
            q.add(1000 + n * 100, 100, 7)
    q.flush()
    assert [e.queue_offset for e in q.read(0, 10)] == [0, 1, 3, 4, 7, 8, 9]
    assert q.read(5, 2) == []
    assert [e.queue_offset for e in q.read(5, 3)] == [7]
    assert all(e.size for e in q.read(0, 10))
    assert q.punch_holes(1300, 1500) == 2  # entries 3 and 4
    assert [e.queue_offset for e in q.read(0, 10)] == [0, 1, 7, 8, 9]
    files.close_all()


def test_the_record_magic_constant_matches_the_encoded_bytes():
    record = encode_record(Message("t", b"x"), 0, [("t", 0, 0)])
    assert record[4:8] == MESSAGE_MAGIC.to_bytes(4, "little")
