"""The per-message inner loops of MESSAGE-mode delivery and acking, as plain functions with compiled twins.

`pop_run` is the common case of `Delivery._pump_pop` (core/delivery.py): consecutive index entries whose messages
are cached and unexpired, delivered under a shared first-attempt Inflight. `settle_run` is the loop of
`MessageAcks.ack_delivered` (core/acks.py). core/storage/_record_speedups.pyx has twins of both (same results,
same side effects: tests/core/test_delivery_loops.py); they are used unless TIDEGATE_NO_EXTENSIONS is set or the
extension was not built (core/storage/accelerator.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tidegate.core.storage.accelerator import load_extension


def pop_run(out: list, entries: Sequence[Any], i: int, cache: dict[int, Any], end: int, budget: int,
            next_fetch: int, now_ms: int, inflight: dict[int, Any], first: Any, queue: Any, receipt_head: str,
            delivered_type: type) -> tuple[int, int, int, int]:
    """Deliver `entries[i:]` into `out` while each one is the next offset to fetch (`next_fetch`), below `end`,
    its message is in `cache` (by commit offset) and not expired at `now_ms`, and `budget` allows: each gets
    `inflight[offset] = first` and a `delivered_type(message, queue, offset, f"{receipt_head}{offset}|1", 1)`.

    Stops at the first entry that needs more (a hole before it, a cache miss, an expired message) or at the end;
    returns (index of the first entry not taken, next_fetch, budget left, bodies' total size of those taken)."""
    size = 0
    add = out.append
    get = cache.get
    count = len(entries)
    while i < count and budget > 0:
        entry = entries[i]
        offset = entry.queue_offset
        if offset >= end or offset != next_fetch:
            break
        msg = get(entry.commit_offset)
        if msg is None or (msg.expires_at and msg.expires_at <= now_ms):
            break
        next_fetch = offset + 1
        inflight[offset] = first
        add(delivered_type(msg, queue, offset, f"{receipt_head}{offset}|1", 1))
        size += len(msg.body)
        budget -= 1
        i += 1
    return i, next_fetch, budget, size


def settle_run(pop: dict[tuple[str, Any], Any], key: str, deliveries: Sequence[Any],
               moved: dict[Any, tuple[Any, int]]) -> int:
    """Ack each delivery still in flight under its attempt (PopQueue of `pop[(key, queue)]`), skip stale ones;
    `moved` gets `queue -> (its PopQueue, committed before)` for each queue seen. Returns how many were settled."""
    settled = 0
    last_queue = None
    pq = None
    inflight: dict[int, Any] = {}
    committed = 0  # pq.committed, kept here while its deliveries are acked in order; written back below
    for delivered in deliveries:
        queue = delivered.queue
        if queue is not last_queue:
            if pq is not None:
                pq.committed = committed
            last_queue = queue
            pq = pop.get((key, queue))
            if pq is not None:
                if queue not in moved:
                    moved[queue] = (pq, pq.committed)
                inflight, committed = pq.inflight, pq.committed
        if pq is None:
            continue
        offset = delivered.queue_offset
        item = inflight.get(offset)
        if item is None or item.attempt != delivered.attempt:
            continue
        del inflight[offset]
        settled += 1
        if offset == committed and not pq.acked:
            committed = offset + 1  # acks in delivery order: no set round trip
        else:
            pq.committed = committed
            pq.acked.add(offset)
            pq.advance()
            committed = pq.committed
    if pq is not None:
        pq.committed = committed
    return settled


# The pure-Python functions stay importable under these names whichever variant is bound to the public ones.
py_pop_run = pop_run
py_settle_run = settle_run

_speedups = load_extension("tidegate.core.storage._record_speedups")
if _speedups is not None:
    pop_run = _speedups.pop_run  # noqa: F811
    settle_run = _speedups.settle_run  # noqa: F811
