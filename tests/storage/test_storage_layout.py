"""The one atomic small-file writer every part of the process uses (checkpoint, tombstones, low-water marks,
listeners.json)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tidegate.core.storage import layout
from tidegate.core.storage.layout import write_atomically


def record_fs_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened: dict[int, str] = {}

    def fake_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = "dir" if os.path.isdir(path) else "file"
        return fd

    def fake_fsync(fd: int) -> None:
        calls.append(f"fsync {opened.get(fd, '?')}")
        real_fsync(fd)

    def fake_replace(src, dst) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(layout.os, "open", fake_open)
    monkeypatch.setattr(layout.os, "fsync", fake_fsync)
    monkeypatch.setattr(layout.os, "replace", fake_replace)
    return calls


def test_a_durable_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path: Path, monkeypatch):
    target = tmp_path / "checkpoint"
    target.write_bytes(b"old")
    calls = record_fs_calls(monkeypatch)
    write_atomically(target, b"new content")
    assert calls == ["fsync file", "rename", "fsync dir"]
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["checkpoint"]  # no temporary file left behind


def test_a_non_durable_write_is_still_a_rename_but_skips_both_fsyncs(tmp_path: Path, monkeypatch):
    target = tmp_path / "low_water"
    calls = record_fs_calls(monkeypatch)
    write_atomically(target, b"x" * 10, durable=False)
    assert calls == ["rename"]
    assert target.read_bytes() == b"x" * 10


def test_a_failed_write_leaves_the_old_content_in_place(tmp_path: Path, monkeypatch):
    target = tmp_path / "tombstones"
    target.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(layout.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
