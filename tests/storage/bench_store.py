"""Timing script for the file store (not a test): `python tests/storage/bench_store.py [count]`.

Prints microseconds per append (one by one and in batches of 64), per sync-covered append, per read.
"""

from __future__ import annotations

import sys
import tempfile
import time

from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.filestore import FileMessageStore


def main(count: int) -> None:
    body = b"x" * 256
    queue = QueueRef("bench", 0)
    with tempfile.TemporaryDirectory() as data_dir:
        store = FileMessageStore(data_dir, segment_bytes=64 << 20)
        messages = [Message("bench", body, tag="t") for _ in range(count)]
        start = time.perf_counter()
        for message in messages:
            store.append(message, (queue,))
        elapsed = time.perf_counter() - start
        print(f"append          {elapsed / count * 1e6:6.2f} us/msg  {count / elapsed:10,.0f} msg/s")

        batches = [[(Message("bench", body, tag="t"), (queue,)) for _ in range(64)] for _ in range(count // 64)]
        start = time.perf_counter()
        for batch in batches:
            store.append_batch(batch)
        elapsed = time.perf_counter() - start
        n = len(batches) * 64
        print(f"append_batch64  {elapsed / n * 1e6:6.2f} us/msg  {n / elapsed:10,.0f} msg/s")

        start = time.perf_counter()
        store.sync()
        print(f"sync            {(time.perf_counter() - start) * 1e3:6.1f} ms for {store.end_offset >> 20} MiB")

        start = time.perf_counter()
        read = 0
        for offset in range(0, store.queue_bounds(queue).max_offset, 32):
            for entry in store.read_index(queue, offset, 32):
                store.read_message(entry.commit_offset, entry.size)
                read += 1
        elapsed = time.perf_counter() - start
        print(f"read            {elapsed / read * 1e6:6.2f} us/msg (read_index pages of 32 + read_message)")
        store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
