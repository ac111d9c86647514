"""Key index: (hash64(topic, key), commit offset) pairs in one append-only file per commit-log segment.

A file lives and dies with its segment (retention deletes both), and is derived from the records, so recovery
rebuilds it by dropping its entries from the scan start on and re-adding them. Lookups are rare (admin "query by
key"): they search each file for the 8-byte hash with `bytes.find`, which runs at C speed, and the caller checks
the records themselves, so a hash collision costs a read, never a wrong answer.
"""

from __future__ import annotations

import os
import struct
from hashlib import blake2b

from tidegate.core.storage.fileio import OS_IO, FileIO, write_all
from tidegate.core.storage.layout import DATA_FILE_MODE, StoreLayout, fsync_file

KEY_ENTRY = struct.Struct("<QQ")
KEY_ENTRY_SIZE = KEY_ENTRY.size
_HASH = struct.Struct("<Q")


def key_hash(topic: str, key: str) -> int:
    data = topic.encode("utf-8", "surrogatepass") + b"\x00" + key.encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


class KeyIndex:
    def __init__(self, layout: StoreLayout, io: FileIO = OS_IO) -> None:
        self.layout = layout
        self.io = io
        self._pending: dict[int, bytearray] = {}  # segment base -> buffered entries
        self._unsynced: set[int] = set()

    def add(self, segment_base: int, hash64: int, commit_offset: int) -> None:
        buf = self._pending.get(segment_base)
        if buf is None:
            buf = self._pending[segment_base] = bytearray()
        buf += KEY_ENTRY.pack(hash64, commit_offset)

    def has_pending(self) -> bool:
        return any(self._pending.values())

    def flush(self) -> None:
        """Append each segment's buffered entries to its file. On an OSError the failed file is cut back to whole
        entries and its buffer kept, files written before it keep theirs cleared: a retry adds each entry once."""
        io = self.io
        for base in list(self._pending):
            buf = self._pending[base]
            if buf:
                fd = io.open(self.layout.key_index_path(base), os.O_WRONLY | os.O_CREAT | os.O_APPEND, DATA_FILE_MODE)
                try:
                    size = os.fstat(fd).st_size
                    whole = size - size % KEY_ENTRY_SIZE
                    if whole != size:  # an earlier failed write left part of an entry: drop it first
                        io.ftruncate(fd, whole)
                    try:
                        write_all(io, fd, buf)
                    except OSError:
                        io.ftruncate(fd, whole)
                        raise
                finally:
                    io.close(fd)
                self._unsynced.add(base)
            del self._pending[base]

    def fsync_files(self) -> None:
        for base in sorted(self._unsynced):
            fsync_file(self.layout.key_index_path(base), self.io)
            self._unsynced.discard(base)

    def lookup(self, hash64: int, bases: list[int]) -> list[int]:
        """Commit offsets whose (topic, key) hashes to `hash64`, oldest first, within the given segments."""
        needle = _HASH.pack(hash64)
        found: list[int] = []  # may repeat an offset (a flush retried after a failed cut-back): callers dedupe
        for base in bases:
            chunks = []
            try:
                with open(self.layout.key_index_path(base), "rb") as f:
                    chunks.append(f.read())
            except FileNotFoundError:
                pass
            pending = self._pending.get(base)
            if pending:
                chunks.append(bytes(pending))
            for data in chunks:
                pos = data.find(needle)
                while pos >= 0:
                    if pos % KEY_ENTRY_SIZE == 0:
                        found.append(KEY_ENTRY.unpack_from(data, pos)[1])
                        pos = data.find(needle, pos + KEY_ENTRY_SIZE)
                    else:  # the bytes matched across fields; resume at the next entry boundary
                        pos = data.find(needle, pos - pos % KEY_ENTRY_SIZE + KEY_ENTRY_SIZE)
        return found

    def drop_segment(self, base: int) -> None:
        self._pending.pop(base, None)
        self._unsynced.discard(base)
        try:
            self.io.unlink(self.layout.key_index_path(base))
        except FileNotFoundError:
            pass

    def truncate_from(self, commit_offset: int, first_segment_base: int) -> None:
        """Forget entries at or after `commit_offset` (recovery re-adds them); earlier segments are untouched."""
        for base in self.layout.key_index_bases():
            if base < first_segment_base:
                continue
            path = self.layout.key_index_path(base)
            with open(path, "rb") as f:
                data = f.read()
            whole = len(data) - len(data) % KEY_ENTRY_SIZE
            kept = b"".join(
                data[i:i + KEY_ENTRY_SIZE]
                for i in range(0, whole, KEY_ENTRY_SIZE)
                if KEY_ENTRY.unpack_from(data, i)[1] < commit_offset
            )
            if len(kept) != len(data):
                with open(path, "wb") as f:
                    f.write(kept)
        for buf in self._pending.values():
            buf.clear()
