"""Shared fixtures for the storage tests: a hand-driven clock and both implementations of each store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tidegate.core.storage.filestore import FileMessageStore
from tidegate.core.storage.memory import MemoryMessageStore, MemoryMetadataStore
from tidegate.core.storage.metadata import SqliteMetadataStore

SEGMENT_BYTES = 4096
ENTRIES_PER_FILE = 8


class FakeClock:
    """Milliseconds that only move when a test says so."""

    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_file_store(path, clock, **kwargs) -> FileMessageStore:
    kwargs.setdefault("segment_bytes", SEGMENT_BYTES)
    kwargs.setdefault("index_entries_per_file", ENTRIES_PER_FILE)
    return FileMessageStore(path, clock_ms=clock, **kwargs)


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path, clock) -> Iterator:
    """The contract suite runs against both MessageStore implementations with tiny segments."""
    if request.param == "file":
        s = open_file_store(tmp_path / "data", clock)
    else:
        s = MemoryMessageStore(segment_bytes=SEGMENT_BYTES, clock_ms=clock)
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "memory"])
def meta_factory(request, tmp_path):
    """Returns a callable opening the metadata store; calling it again 'reopens' the same store."""
    if request.param == "sqlite":
        path = tmp_path / "meta.db"
        return lambda: SqliteMetadataStore(path)
    shared = MemoryMetadataStore()
    return lambda: shared


@pytest.fixture
def open_store(tmp_path, clock):
    """Opens (or reopens) a FileMessageStore with tiny segments; the data dir defaults to tmp_path/data."""

    def opener(path=None, **kwargs) -> FileMessageStore:
        return open_file_store(path if path is not None else tmp_path / "data", clock, **kwargs)

    return opener
