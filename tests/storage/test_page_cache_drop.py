"""Commit-log pages behind the durable end are dropped from the OS page cache (issue 10, large messages, third pass):
with `page_cache_bytes` set, each fsync is followed by posix_fadvise(DONTNEED) of the synced pages further than that
behind the durable end, in whole pages, each page once, across segment rolls; nothing unsynced is ever advised;
0 advises nothing; the log reads back unchanged after its pages were dropped."""

from __future__ import annotations

import os

import pytest

from tidegate.core.storage import commitlog as commitlog_module
from tidegate.core.storage.commitlog import CommitLog
from tidegate.core.storage.filestore import FileMessageStore
from tidegate.core.storage.layout import StoreLayout

PAGE = 4096
WINDOW = 64 * 1024
RECORD_BODY = 20_000

pytestmark = pytest.mark.skipif(commitlog_module._fadvise_dontneed is None, reason="no posix_fadvise on this OS")


def make_log(tmp_path, segment_bytes: int = 1 << 20, page_cache_bytes: int = WINDOW) -> CommitLog:
    layout = StoreLayout(tmp_path / "data")
    layout.create_dirs()
    return CommitLog(layout, segment_bytes, page_cache_bytes=page_cache_bytes)


def record(n: int) -> bytes:
    from tidegate.core.model import Message
    from tidegate.core.storage.record import encode_record

    return encode_record(Message("t", bytes([n % 256]) * RECORD_BODY), 1000 + n, [("t", 0, n)])


@pytest.fixture
def advised(monkeypatch) -> list[tuple[str, int, int]]:
    """Every DONTNEED advice as (file name, start, end); the real call is still made."""
    calls: list[tuple[str, int, int]] = []
    real = commitlog_module._fadvise_dontneed

    def record_advice(fd: int, start: int, length: int) -> None:
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), start, start + length))
        real(fd, start, length)

    monkeypatch.setattr(commitlog_module, "_fadvise_dontneed", record_advice)
    return calls


def covered(calls: list[tuple[str, int, int]], name: str) -> list[tuple[int, int]]:
    return [(start, end) for file, start, end in calls if file == name]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name advised files")
def test_synced_pages_further_than_the_window_behind_the_end_are_dropped_once_in_whole_pages(tmp_path, advised):
    log = make_log(tmp_path)
    for n in range(10):
        log.append(record(n), 1000 + n)
        durable = log.sync()
    name = os.path.basename(log.layout.segment_path(0))
    ranges = covered(advised, name)
    assert ranges, "nothing was dropped"
    # contiguous, page aligned, each page once, never closer than the window to the durable end
    assert ranges[0][0] == 0
    for (_, end), (start, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert start == end
    assert all(start % PAGE == 0 and end % PAGE == 0 and end > start for start, end in ranges)
    assert ranges[-1][1] <= durable - WINDOW
    assert ranges[-1][1] > durable - WINDOW - PAGE
    for n in range(10):  # the bytes are on disk: dropped pages read back unchanged
        assert log.read(n * len(record(0))) == record(n)


def test_nothing_is_advised_before_it_is_synced_or_while_within_the_window(tmp_path, advised):
    log = make_log(tmp_path)
    for n in range(10):
        log.append(record(n), 1000 + n)
    assert advised == []  # appended, not synced
    small = make_log(tmp_path / "small")
    small.append(record(0), 1000)
    small.append(record(1), 1001)
    small.sync()  # 40 KB synced: all of it within the 64 KiB window
    assert advised == []


def test_a_zero_window_leaves_the_page_cache_to_the_os(tmp_path, advised):
    log = make_log(tmp_path, page_cache_bytes=0)
    for n in range(10):
        log.append(record(n), 1000 + n)
        log.sync()
    assert advised == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name advised files")
def test_sealed_segments_are_dropped_through_their_own_file_after_a_roll(tmp_path, advised):
    segment = 256 * 1024
    log = make_log(tmp_path, segment_bytes=segment)
    for n in range(40):  # ~800 KB: three rolls
        log.append(record(n), 1000 + n)
        log.sync()
    bases = log.segment_bases()
    assert len(bases) >= 4
    for base in bases[:-2]:  # every sealed segment well behind the window was dropped from start to end
        name = os.path.basename(log.layout.segment_path(base))
        ranges = covered(advised, name)
        assert ranges and ranges[0][0] == 0
        assert ranges[-1][1] >= os.stat(log.layout.segment_path(base)).st_size - PAGE
    first_of_second = log.read(bases[1])
    assert first_of_second in {record(n) for n in range(40)}  # dropped sealed pages read back from disk


def test_the_store_passes_its_setting_to_the_commit_log(tmp_path):
    store = FileMessageStore(tmp_path / "data", page_cache_bytes=123 * PAGE)
    try:
        assert store._log._page_cache_bytes == 123 * PAGE
    finally:
        store.close()
    plain = FileMessageStore(tmp_path / "plain")
    try:
        assert plain._log._page_cache_bytes == 0
    finally:
        plain.close()
