"""The one atomic small-file writer every part of the process uses (checkpoint, tombstones, low-water marks,
listeners.json)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tidegate.core.storage.fileio import FaultyFileIO
from tidegate.core.storage.layout import write_atomically


def fs_calls(io: FaultyFileIO) -> list[str]:
    """The fsyncs (of a file or a directory) and renames `io` saw, in order."""
    out = []
    for operation, path in io.history:
        if operation == "fsync":
            out.append("fsync dir" if os.path.isdir(path) else "fsync file")
        elif operation == "replace":
            out.append("rename")
    return out


def test_a_durable_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path: Path):
    target = tmp_path / "checkpoint"
    target.write_bytes(b"old")
    io = FaultyFileIO()
    write_atomically(target, b"new content", io=io)
    assert fs_calls(io) == ["fsync file", "rename", "fsync dir"]
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["checkpoint"]  # no temporary file left behind


def test_a_non_durable_write_is_still_a_rename_but_skips_both_fsyncs(tmp_path: Path):
    target = tmp_path / "low_water"
    io = FaultyFileIO()
    write_atomically(target, b"x" * 10, durable=False, io=io)
    assert fs_calls(io) == ["rename"]
    assert target.read_bytes() == b"x" * 10


def test_a_failed_write_leaves_the_old_content_in_place(tmp_path: Path, monkeypatch):
    target = tmp_path / "tombstones"
    target.write_bytes(b"old")

    io = FaultyFileIO()
    io.inject("fsync", errno.EIO)
    with pytest.raises(OSError):
        write_atomically(target, b"new", io=io)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["tombstones"]  # the temporary file does not keep the space


def test_a_short_write_is_continued_until_every_byte_is_written(tmp_path: Path):
    target = tmp_path / "checkpoint"
    io = FaultyFileIO()
    io.inject("write", short=3, times=2)
    write_atomically(target, b"0123456789", io=io)
    assert target.read_bytes() == b"0123456789"
    assert io.calls["write"] == 3


def test_a_full_disk_while_writing_the_temporary_file_keeps_the_old_content(tmp_path: Path):
    target = tmp_path / "checkpoint"
    target.write_bytes(b"old")
    io = FaultyFileIO()
    io.inject("write", short=2, times=1)
    io.inject("write", errno.ENOSPC, after=1)
    with pytest.raises(OSError):
        write_atomically(target, b"new content", io=io)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["checkpoint"]
