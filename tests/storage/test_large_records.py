"""Large records (issue 10, large messages): a batch of large records goes to the commit log with one writev of its
pieces, the message bodies themselves (no join, no copy in user space); small records are still joined into one
write; short and failed writevs behave like short and failed writes (finished, or cut back and refused); the bytes
on disk are exactly the reference encoding, so recovery reads them as before."""

from __future__ import annotations

import errno
import os

import pytest

from tidegate.core.errors import StoreFull
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.commitlog import CommitLog
from tidegate.core.storage.filestore import FileMessageStore
from tidegate.core.storage.layout import StoreLayout
from tidegate.core.storage.record import decode_record, encode_record, encode_record_parts

SEGMENT = 8 * 1024 * 1024
BODY = 64 * 1024


def make_log(tmp_path) -> CommitLog:
    layout = StoreLayout(tmp_path / "data")
    layout.create_dirs()
    return CommitLog(layout, SEGMENT)


def pieces_of(messages: list[Message]) -> tuple[list, list[int]]:
    parts: list = []
    sizes = [encode_record_parts(parts, m, 1000 + n, [("t", 0, n)]) for n, m in enumerate(messages)]
    return parts, sizes


def recording_writev(log: CommitLog) -> list[list]:
    calls: list[list] = []
    real = log._writev
    assert real is os.writev  # the production file layer scatters

    def writev(fd: int, pieces) -> int:
        calls.append(list(pieces))
        return real(fd, pieces)

    log._writev = writev
    return calls


def test_a_batch_of_64_kib_records_is_one_writev_of_the_pieces_with_the_bodies_themselves(tmp_path):
    log = make_log(tmp_path)
    calls = recording_writev(log)
    messages = [Message("t", bytes([n]) * BODY) for n in range(16)]
    parts, sizes = pieces_of(messages)
    offsets = log.append_parts(parts, sizes, sum(sizes), 1000)
    assert len(calls) == 1
    written_bodies = [piece for piece in calls[0] if len(piece) == BODY]
    assert all(a is b.body for a, b in zip(written_bodies, messages, strict=True))  # no copy before the kernel
    for n, offset in enumerate(offsets):
        assert log.read(offset) == encode_record(messages[n], 1000 + n, [("t", 0, n)])


def test_small_records_are_joined_into_one_write(tmp_path):
    log = make_log(tmp_path)
    calls = recording_writev(log)
    messages = [Message("t", b"s" * 256) for _ in range(64)]
    parts, sizes = pieces_of(messages)
    offsets = log.append_parts(parts, sizes, sum(sizes), 1000)
    assert calls == []
    assert decode_record(log.read(offsets[-1])).message.body == b"s" * 256


def test_a_short_writev_is_finished_and_the_records_are_whole(tmp_path):
    log = make_log(tmp_path)
    log._writev = lambda fd, pieces: os.write(fd, memoryview(pieces[0])[:5])  # the kernel took 5 bytes
    messages = [Message("t", bytes([n]) * BODY) for n in range(3)]
    parts, sizes = pieces_of(messages)
    offsets = log.append_parts(parts, sizes, sum(sizes), 1000)
    for n, offset in enumerate(offsets):
        assert log.read(offset) == encode_record(messages[n], 1000 + n, [("t", 0, n)])


def test_a_failed_writev_is_cut_back_and_the_log_appends_after_it(tmp_path):
    log = make_log(tmp_path)
    before = log.append(encode_record(Message("t", b"first"), 1, [("t", 0, 0)]), 1)

    def disk_full(fd, pieces) -> int:
        os.write(fd, pieces[0])  # some bytes landed before the error
        raise OSError(errno.ENOSPC, "No space left on device")

    log._writev = disk_full
    parts, sizes = pieces_of([Message("t", b"x" * BODY)])
    with pytest.raises(StoreFull):
        log.append_parts(parts, sizes, sum(sizes), 2)
    log._writev = os.writev
    after = log.append_parts(parts, sizes, sum(sizes), 2)[0]
    assert decode_record(log.read(before)).message.body == b"first"
    assert decode_record(log.read(after)).message.body == b"x" * BODY
    assert os.path.getsize(tmp_path / "data" / "commitlog" / f"{0:020d}.log") == after + sizes[0]


def test_a_store_appending_one_large_message_writes_its_body_uncopied_and_recovers_it(tmp_path):
    store = FileMessageStore(tmp_path / "data", clock_ms=lambda: 1_700_000_000_000)
    calls = recording_writev(store._log)
    body = os.urandom(BODY)
    message = Message("t", body)
    result = store.append(message, [QueueRef("t", 0)])
    assert len(calls) == 1 and any(piece is body for piece in calls[0])
    store.sync()
    store._log._writev = os.writev
    store.close()
    (tmp_path / "data" / "clean_shutdown").unlink()  # as after a crash: the tail is scanned and CRC-checked
    reopened = FileMessageStore(tmp_path / "data", clock_ms=lambda: 1_700_000_000_000)
    try:
        assert reopened.read_message(result.commit_offset).body == body
        assert reopened.end_offset == result.commit_offset + result.size
    finally:
        reopened.close()


def test_a_batch_of_more_pieces_than_one_writev_takes_is_written_in_groups_without_a_join(tmp_path):
    """400 records of 16 KiB (1,200 pieces, over IOV_MAX): several writevs of at most MAX_SCATTER_PIECES pieces, the
    bodies themselves, and the bytes on disk are the reference encoding."""
    from tidegate.core.storage.commitlog import MAX_SCATTER_PIECES

    log = make_log(tmp_path)
    calls = recording_writev(log)
    messages = [Message("t", bytes([n % 256]) * 16384) for n in range(400)]
    parts, sizes = pieces_of(messages)
    offsets = log.append_parts(parts, sizes, sum(sizes), 1000)
    assert len(calls) == 2 and all(len(call) <= MAX_SCATTER_PIECES for call in calls)
    written = [piece for call in calls for piece in call]
    assert all(any(piece is m.body for piece in written[3 * n:3 * n + 3]) for n, m in enumerate(messages))
    for n, offset in enumerate(offsets):
        assert log.read(offset) == encode_record(messages[n], 1000 + n, [("t", 0, n)])


def test_a_failing_group_of_a_grouped_writev_cuts_the_whole_batch_back(tmp_path):
    log = make_log(tmp_path)
    before = log.append(encode_record(Message("t", b"first"), 1, [("t", 0, 0)]), 1)
    calls = []

    def second_group_fails(fd, pieces) -> int:
        calls.append(len(pieces))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.writev(fd, pieces)

    log._writev = second_group_fails
    parts, sizes = pieces_of([Message("t", b"y" * 16384) for _ in range(400)])
    with pytest.raises(StoreFull):
        log.append_parts(parts, sizes, sum(sizes), 2)
    assert os.path.getsize(tmp_path / "data" / "commitlog" / f"{0:020d}.log") == log._pos
    log._writev = os.writev
    after = log.append_parts(parts, sizes, sum(sizes), 2)[0]
    assert decode_record(log.read(before)).message.body == b"first"
    assert decode_record(log.read(after)).message.body == b"y" * 16384
    assert os.path.getsize(tmp_path / "data" / "commitlog" / f"{0:020d}.log") == after + sum(sizes)
