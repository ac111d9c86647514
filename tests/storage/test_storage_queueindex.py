"""Queue index files: naming, bounded descriptors for many queues, trimming, torn entry writes."""

from __future__ import annotations

import os

from tidegate.core.model import QueueRef
from tidegate.core.storage.layout import StoreLayout
from tidegate.core.storage.queueindex import ENTRY_SIZE, IndexFiles, QueueIndex


def make_files(tmp_path, per_file: int = 8, max_open: int = 4) -> IndexFiles:
    layout = StoreLayout(tmp_path / "data")
    layout.create_dirs()
    return IndexFiles(layout, per_file, max_open)


def test_entries_go_to_files_named_by_20_digit_base_entry(tmp_path):
    files = make_files(tmp_path)
    q = QueueIndex(QueueRef("t", 3), files)
    for n in range(20):
        q.add(n * 100, 100, 7)
    q.flush()
    names = sorted(os.listdir(tmp_path / "data" / "index" / "t" / "3"))
    assert names == [f"{b:020d}.idx" for b in (0, 8, 16)]
    assert [e.commit_offset for e in q.read(6, 5)] == [600, 700, 800, 900, 1000]


def test_thousands_of_queues_stay_within_the_descriptor_bound(tmp_path):
    files = make_files(tmp_path, max_open=16)
    queues = [QueueIndex(QueueRef("t", n), files) for n in range(2_000)]
    for n, q in enumerate(queues):
        q.add(n, 50, 0)
    for q in queues:
        q.flush()
    assert files.open_count() <= 16
    for n in range(0, 2_000, 97):
        assert queues[n].read(0, 1)[0].commit_offset == n
    assert files.open_count() <= 16
    reloaded = QueueIndex(QueueRef("t", 1_999), files)
    assert (reloaded.min_offset, reloaded.max_offset) == (0, 1)


def test_reads_combine_flushed_and_buffered_entries(tmp_path):
    q = QueueIndex(QueueRef("t", 0), make_files(tmp_path))
    for n in range(5):
        q.add(n, 1 + n, 0)
    q.flush()
    for n in range(5, 12):
        q.add(n, 1 + n, 0)
    assert [e.commit_offset for e in q.read(3, 6)] == [3, 4, 5, 6, 7, 8]


def test_trim_to_removes_later_files_and_cuts_the_last_one(tmp_path):
    files = make_files(tmp_path)
    q = QueueIndex(QueueRef("t", 0), files)
    for n in range(20):
        q.add(n, 10, 0)
    q.flush()
    q.trim_to(10)
    assert q.max_offset == 10
    reloaded = QueueIndex(QueueRef("t", 0), files)
    assert reloaded.max_offset == 10 and reloaded.bases == [0, 8]


def test_a_torn_entry_at_the_end_of_a_file_is_dropped_on_load(tmp_path):
    files = make_files(tmp_path)
    q = QueueIndex(QueueRef("t", 0), files)
    for n in range(3):
        q.add(n, 10, 0)
    q.flush()
    files.close_all()
    path = files.layout.index_path(QueueRef("t", 0), 0)
    with open(path, "ab") as f:
        f.write(b"\x01" * (ENTRY_SIZE // 2))
    reloaded = QueueIndex(QueueRef("t", 0), files)
    assert reloaded.max_offset == 3 and os.path.getsize(path) == 3 * ENTRY_SIZE


def test_topic_names_dot_and_dotdot_get_their_own_directories(tmp_path):
    files = make_files(tmp_path)
    for topic in (".", "..", "%2E", "a.b"):
        q = QueueIndex(QueueRef(topic, 0), files)
        q.add(1, 10, 0)
        q.flush()
    assert sorted(q.topic for q in files.layout.indexed_queues()) == sorted([".", "..", "%2E", "a.b"])
    assert all(p.resolve().is_relative_to(files.layout.index_dir) for p in files.layout.index_dir.iterdir())
