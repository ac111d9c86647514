"""Tombstones: queues deleted while the commit log still holds records naming them, so recovery skips those records.

The file is append-only: deleting a queue appends one short line `<crc32c hex8> <json [topic, queue_id, offset]>`,
and no fsync happens on the caller's (reactor) thread; `sync()` makes appended lines durable in batches (the store
calls it when it flushes its indexes, and at close). A line means "records of this queue below `offset` are dead";
a later line for the same queue wins. A torn or damaged line (a crash mid-append) is skipped.

Bounded: a tombstone whose offset is at or below the log's first offset guards nothing (retention removed every
record it covered) and is pruned, at open and whenever retention deletes segments. The file is rewritten whole
(compacted, durably, through write_atomically) at open when it holds dead lines, when pruning removed entries, at
close when it holds dead lines, and when its lines exceed twice the live entries plus `slack` — so a rewrite of L
live lines comes after at least L + `slack` appended ones: amortised O(1) per deletion, never a rewrite per deletion.

A file in the older format (one JSON array, rewritten per deletion) is read and rewritten in this format at open.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from crc32c import crc32c

from tidegate.core.model import QueueRef
from tidegate.core.storage.fileio import OS_IO, FileIO, write_all
from tidegate.core.storage.layout import DATA_FILE_MODE, write_atomically

logger = logging.getLogger("tidegate.storage")

DEFAULT_SLACK = 1024


def _line(ref: QueueRef, offset: int) -> bytes:
    body = json.dumps([ref.topic, ref.queue_id, offset], separators=(",", ":"), ensure_ascii=False)
    data = body.encode("utf-8", "surrogatepass")
    return b"%08x %s\n" % (crc32c(data), data)


class Tombstones:
    """The deleted queues (queue -> commit offset below which its records are dead), kept in an append-only file."""

    def __init__(self, path: Path, io: FileIO = OS_IO, slack: int = DEFAULT_SLACK) -> None:
        self.path = path
        self._io = io
        self._slack = slack
        self._live: dict[QueueRef, int] = {}
        self._lines = 0  # lines in the file, dead ones included
        self._fd = -1
        self._unsynced = False
        self.rewrites = 0  # how many times the whole file was rewritten (compactions)
        self._load()

    # --- reading
    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data.lstrip().startswith(b"["):  # the older format: one JSON array
            try:
                rows = json.loads(data)
                self._live = {QueueRef(topic, queue_id): offset for topic, queue_id, offset in rows}
            except (ValueError, TypeError):
                logger.warning("tombstones file is damaged; deleted queues may reappear after recovery")
            self._lines = len(self._live) + 1  # force the rewrite into the append-only format
            return
        damaged = 0
        for raw in data.split(b"\n"):
            if not raw:
                continue
            self._lines += 1
            try:
                crc_hex, body = raw.split(b" ", 1)
                if int(crc_hex, 16) != crc32c(body):
                    raise ValueError("crc mismatch")
                topic, queue_id, offset = json.loads(body)
            except (ValueError, TypeError):
                damaged += 1
                continue
            self._live[QueueRef(topic, queue_id)] = offset
        if damaged:
            logger.warning("tombstones file has %d damaged lines (a crash mid-write); they are skipped", damaged)

    def get(self, ref: QueueRef) -> int | None:
        return self._live.get(ref)

    def items(self) -> list[tuple[QueueRef, int]]:
        return list(self._live.items())

    def __len__(self) -> int:
        return len(self._live)

    # --- writing
    def add(self, ref: QueueRef, offset: int) -> None:
        """Record that `ref`'s records below `offset` are dead: one appended line, no fsync here."""
        line = _line(ref, offset)
        fd = self._append_fd()
        size = os.fstat(fd).st_size
        try:
            write_all(self._io, fd, line)
        except OSError:
            try:  # never leave half a line for the next one to follow
                self._io.ftruncate(fd, size)
            except OSError:
                pass  # a torn line is skipped on load; the next line starts after it
            raise
        self._live[ref] = offset
        self._lines += 1
        self._unsynced = True
        if self._lines > 2 * len(self._live) + self._slack:
            try:
                self.compact()
            except OSError as exc:  # the line is written; compaction is retried by the next deletion or close
                logger.warning("compacting the tombstones file failed: %s", exc)

    def _append_fd(self) -> int:
        if self._fd < 0:
            self._fd = self._io.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, DATA_FILE_MODE)
            size = os.fstat(self._fd).st_size
            if size:  # a line torn by a crash: end it, so the next line parses
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        write_all(self._io, self._fd, b"\n")
        return self._fd

    def prune(self, log_min_offset: int) -> int:
        """Forget tombstones no record in the log is covered by any more; compact when some went. Returns how many."""
        stale = [ref for ref, offset in self._live.items() if offset <= log_min_offset]
        for ref in stale:
            del self._live[ref]
        if stale or self._lines > len(self._live):
            self.compact()
        return len(stale)

    def compact(self) -> None:
        """Rewrite the file with one line per live tombstone (durably; an empty set removes the file)."""
        self._close_fd(sync=False)  # its content is about to be replaced
        if not self._live:
            try:
                self._io.unlink(self.path)
            except FileNotFoundError:
                pass
        else:
            data = b"".join(_line(ref, offset) for ref, offset in self._live.items())
            write_atomically(self.path, data, durable=True, io=self._io)
        self.rewrites += 1
        self._lines = len(self._live)
        self._unsynced = False

    def sync(self) -> None:
        """fsync lines appended since the last call (one fsync however many deletions came in between)."""
        if self._unsynced and self._fd >= 0:
            self._io.fsync(self._fd)
            self._unsynced = False

    def close(self) -> None:
        """Compact if the file holds dead lines, else fsync what was appended; close the file."""
        if self._lines > len(self._live):
            self.compact()
        else:
            self.sync()
        self._close_fd(sync=True)

    def close_quietly(self) -> None:
        """Release the file without writing (after a failure, or a second time)."""
        if self._fd >= 0:
            try:
                self._io.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def _close_fd(self, sync: bool) -> None:
        if self._fd >= 0:
            if sync:
                self.sync()
            self._io.close(self._fd)
            self._fd = -1
