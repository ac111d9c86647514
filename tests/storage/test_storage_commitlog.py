"""Commit log: segment rolling at tiny sizes, fillers, naming, size limits, full disk, concurrent sync."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from tidegate.core.errors import MessageNotFound, MessageTooLarge, StoreFull
from tidegate.core.model import Message
from tidegate.core.storage.commitlog import CommitLog
from tidegate.core.storage.layout import StoreLayout
from tidegate.core.storage.record import FILLER_SIZE, check_record, decode_record, encode_record

SEGMENT = 4096


def make_log(tmp_path, segment_bytes=SEGMENT) -> CommitLog:
    layout = StoreLayout(tmp_path / "data")
    layout.create_dirs()
    return CommitLog(layout, segment_bytes)


def record(n: int, body_size: int = 300) -> bytes:
    return encode_record(Message("t", bytes([n % 256]) * body_size), 1000 + n, [("t", 0, n)])


def test_segments_roll_at_the_configured_size_and_are_named_by_20_digit_base_offsets(tmp_path):
    log = make_log(tmp_path)
    for n in range(40):
        log.append(record(n), 1000 + n)
    names = sorted(os.listdir(tmp_path / "data" / "commitlog"))
    assert len(names) > 2
    assert all(len(name) == 24 and name.endswith(".log") and name[:20].isdigit() for name in names)
    assert [int(name[:20]) for name in names] == [i * SEGMENT for i in range(len(names))]


def test_a_record_never_spans_two_segments_and_a_filler_pads_each_rolled_segment(tmp_path):
    log = make_log(tmp_path)
    offsets = [log.append(record(n), 1000 + n) for n in range(40)]
    size = len(record(0))
    for offset in offsets:
        assert offset // SEGMENT == (offset + size - 1) // SEGMENT
        assert decode_record(log.read(offset)).message.body[0] == offsets.index(offset) % 256
    for base, file_bytes in log.sealed_segments():
        data = (tmp_path / "data" / "commitlog" / f"{base:020d}.log").read_bytes()
        assert len(data) == file_bytes <= SEGMENT
        _magic, length = check_record(data, len(data) - FILLER_SIZE)
        assert len(data) - FILLER_SIZE + length == SEGMENT  # the filler covers the rest of the segment
        assert log.segment_last_store_ts(base) > 0


def test_a_record_larger_than_a_segment_raises_message_too_large_and_writes_nothing(tmp_path):
    log = make_log(tmp_path)
    with pytest.raises(MessageTooLarge):
        log.append(record(0, body_size=SEGMENT), 1)
    with pytest.raises(MessageTooLarge):
        log.append_batch([record(1), record(2, body_size=SEGMENT)], 1)
    assert log.end_offset == 0 and log.disk_bytes() == 0


def test_append_batch_writes_once_per_segment_and_returns_each_offset(tmp_path):
    log = make_log(tmp_path)
    writes = []
    real_write = log._write

    def counting_write(fd, data):
        writes.append(len(data))
        return real_write(fd, data)

    log._write = counting_write
    batch = [record(n) for n in range(5)]
    offsets = log.append_batch(batch, 7)
    assert len(writes) == 1
    assert offsets == [sum(len(r) for r in batch[:i]) for i in range(5)]
    assert log.end_offset == sum(len(r) for r in batch)


def test_a_batch_crossing_a_segment_boundary_rolls_between_records(tmp_path):
    log = make_log(tmp_path)
    offsets = log.append_batch([record(n) for n in range(30)], 7)
    assert len(log.segment_bases()) >= 3
    for n, offset in enumerate(offsets):
        assert decode_record(log.read(offset)).destinations == [("t", 0, n)]


def test_full_disk_raises_store_full_and_cuts_the_partial_write_back(tmp_path):
    log = make_log(tmp_path)
    log.append(record(0), 1)
    end = log.end_offset
    real_write = log._write

    def half_then_enospc(fd, data):
        if len(data) > 10:
            real_write(fd, data[: len(data) // 2])
            return len(data) // 2
        raise OSError(errno.ENOSPC, "No space left on device")

    log._write = half_then_enospc
    with pytest.raises(StoreFull):
        log.append(record(1), 2)
    assert log.end_offset == end
    assert os.path.getsize(tmp_path / "data" / "commitlog" / f"{0:020d}.log") == end
    log._write = real_write
    offset = log.append(record(2), 3)
    assert offset == end
    assert decode_record(log.read(offset)).destinations == [("t", 0, 2)]


def test_a_full_disk_in_the_middle_of_a_batch_leaves_no_trace_of_the_batch(tmp_path):
    log = make_log(tmp_path)
    log.append(record(0), 1)
    end, bases = log.end_offset, log.segment_bases()
    real_write = log._write
    calls = []

    def fail_on_second_segment(fd, data):
        calls.append(1)
        if len(calls) >= 3:  # first chunk and the filler succeed, the next segment's chunk fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    log._write = fail_on_second_segment
    with pytest.raises(StoreFull):
        log.append_batch([record(n) for n in range(1, 30)], 2)
    assert (log.end_offset, log.segment_bases()) == (end, bases)
    assert sorted(os.listdir(tmp_path / "data" / "commitlog")) == [f"{0:020d}.log"]
    log._write = real_write
    assert log.append(record(99), 3) == end


def test_reading_outside_the_stored_range_raises_message_not_found(tmp_path):
    log = make_log(tmp_path)
    log.append(record(0), 1)
    for offset in (-1, log.end_offset, 10**9):
        with pytest.raises(MessageNotFound):
            log.read(offset)


def test_sync_advances_the_durable_offset_to_the_end(tmp_path):
    log = make_log(tmp_path)
    for n in range(20):
        log.append(record(n), n)
    assert log.durable_offset == 0
    assert log.sync() == log.end_offset == log.durable_offset


def test_sync_from_another_thread_while_appending_never_fails_and_covers_what_it_saw(tmp_path):
    log = make_log(tmp_path)
    errors: list[BaseException] = []
    done = threading.Event()
    synced: list[int] = []

    def flusher():
        try:
            while not done.is_set():
                synced.append(log.sync())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for n in range(300):  # ~30 segment rolls while the flusher runs
            log.append(record(n), n)
    finally:
        done.set()
        thread.join()
    assert not errors
    assert synced == sorted(synced)
    assert log.sync() == log.end_offset
    log.close()
