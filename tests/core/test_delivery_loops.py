"""The delivery inner loops (core/delivery_loops.py) and record.make_msg_id: the compiled twins in
core/storage/_record_speedups.pyx give the same results and side effects as the pure-Python functions, on random
index entries, caches, in-flight tables and ack batches. The comparisons skip when the extension was not built."""

from __future__ import annotations

import copy
import importlib
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.core import delivery_loops
from tidegate.core.api import Delivered
from tidegate.core.consumers import Inflight, PopQueue
from tidegate.core.model import IndexEntry, Message, QueueRef
from tidegate.core.storage import record
from tidegate.core.storage.accelerator import extensions_disabled


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("tidegate.core.storage._record_speedups")
    except ImportError:
        return None


speedups = _load()
needs_extension = pytest.mark.skipif(speedups is None or extensions_disabled(),
                                     reason="compiled accelerator not built or disabled")
QUEUE = QueueRef("t/a", 0)
OTHER = QueueRef("t/b", 1)


def test_public_names_follow_the_environment_switch() -> None:
    """delivery_loops binds the compiled functions unless TIDEGATE_NO_EXTENSIONS is set (or nothing was built)."""
    compiled = speedups is not None and not extensions_disabled()
    assert (delivery_loops.pop_run is not delivery_loops.py_pop_run) == compiled
    assert (delivery_loops.settle_run is not delivery_loops.py_settle_run) == compiled
    assert (record.make_msg_id is not record.py_make_msg_id) == compiled


@st.composite
def pop_cases(draw: st.DrawFn) -> tuple:
    """Index entries with holes, a cache missing some messages, some expired, and a budget and end that cut short."""
    start = draw(st.integers(0, 1000))
    count = draw(st.integers(0, 20))
    offsets, offset = [], start
    for _ in range(count):
        offset += draw(st.sampled_from([1, 1, 1, 1, 2, 5]))
        offsets.append(offset)
    entries = [IndexEntry(o, 10_000 + o * 7, 80, 0) for o in offsets]
    cache = {}
    for e in entries:
        kind = draw(st.sampled_from(["cached", "cached", "cached", "missing", "expired", "expires_later"]))
        if kind == "missing":
            continue
        expires = {"expired": 500, "expires_later": 5_000}.get(kind, 0)
        cache[e.commit_offset] = Message(topic="t/a", body=b"x" * draw(st.integers(0, 40)), expires_at=expires)
    end = draw(st.integers(start, offset + 2))
    budget = draw(st.integers(0, 25))
    i = draw(st.integers(0, max(0, count - 1))) if count else 0
    next_fetch = offsets[i] if entries and draw(st.booleans()) else start + 1
    return entries, i, cache, end, budget, next_fetch


def _delivered_fields(out: list[Delivered]) -> list[tuple]:
    return [(d.message, d.queue, d.queue_offset, d.receipt, d.attempt) for d in out]


@needs_extension
@settings(max_examples=300, deadline=None)
@given(pop_cases())
def test_pop_run_twins_agree(case: tuple) -> None:
    """Both pop_run variants stop at the same entry (hole, cache miss, expiry, end, budget), return the same
    next_fetch, budget and size, and leave the same deliveries and in-flight entries."""
    entries, i, cache, end, budget, next_fetch = case
    first = Inflight(1, 0.0, None)
    results = []
    for fn in (delivery_loops.py_pop_run, speedups.pop_run):
        out: list[Delivered] = []
        inflight: dict[int, Inflight] = {3: Inflight(2, 1.0, None)}
        got = fn(out, entries, i, cache, end, budget, next_fetch, 1_000, inflight, first, QUEUE, "t/a|0|", Delivered)
        results.append((got, _delivered_fields(out), inflight))
        assert all(type(d) is Delivered for d in out)
    assert results[0] == results[1]


def test_pop_run_takes_the_common_run_and_stops_at_a_hole() -> None:
    """pop_run delivers consecutive cached offsets with first-attempt receipts and stops at the first gap."""
    msgs = {100 + o: Message(topic="t/a", body=b"ab") for o in (5, 6, 8)}
    entries = [IndexEntry(o, 100 + o, 50, 0) for o in (5, 6, 8)]
    out: list[Delivered] = []
    inflight: dict[int, Inflight] = {}
    first = Inflight(1, 0.0, None)
    got = delivery_loops.pop_run(out, entries, 0, msgs, 100, 10, 5, 0, inflight, first, QUEUE, "t/a|0|", Delivered)
    assert got == (2, 7, 8, 4)
    assert [d.receipt for d in out] == ["t/a|0|5|1", "t/a|0|6|1"]
    assert inflight == {5: first, 6: first}


@st.composite
def settle_cases(draw: st.DrawFn) -> tuple:
    """Two queues' in-flight tables (some acked already above the commit) and a batch of deliveries to ack, some
    stale (wrong attempt, unknown offset, or a queue without progress), in and out of order."""
    pop = {}
    for q in (QUEUE, OTHER):
        if draw(st.booleans()) or q is QUEUE:
            committed = draw(st.integers(0, 50))
            pq = PopQueue(committed=committed, next_fetch=committed + 30)
            for o in range(committed, committed + 30):
                if draw(st.integers(0, 9)) < 8:
                    pq.inflight[o] = Inflight(draw(st.sampled_from([1, 1, 2])), 0.0, None)
                elif draw(st.booleans()):
                    pq.acked.add(o)
            pop[("key", q)] = pq
    picks = draw(st.lists(st.tuples(st.sampled_from([QUEUE, OTHER]), st.integers(0, 85), st.sampled_from([1, 1, 2])),
                          max_size=40))
    deliveries = [Delivered(Message(topic=q.topic, body=b""), q, o, "", a) for q, o, a in picks]
    return pop, deliveries


@needs_extension
@settings(max_examples=300, deadline=None)
@given(settle_cases())
def test_settle_run_twins_agree(case: tuple) -> None:
    """Both settle_run variants settle the same deliveries and leave the same committed offsets, acked sets,
    in-flight tables and `moved` records."""
    pop, deliveries = case
    results = []
    for fn in (delivery_loops.py_settle_run, speedups.settle_run):
        mine = copy.deepcopy(pop)
        moved: dict = {}
        settled = fn(mine, "key", deliveries, moved)
        state = {k: (pq.committed, sorted(pq.acked), sorted((o, i.attempt) for o, i in pq.inflight.items()))
                 for k, pq in mine.items()}
        results.append((settled, state, {q: (pq.committed, before) for q, (pq, before) in moved.items()}))
    assert results[0] == results[1]


def _old_msg_id(commit_offset: int, store_ts: int) -> str:
    """make_msg_id as it was before it became one format operation."""
    return ((commit_offset << 32) | ((store_ts // 1000) & 0xFFFFFFFF)).to_bytes(12, "big").hex().upper()


@settings(max_examples=500, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.integers(-(1 << 50), 1 << 50))
def test_make_msg_id_text_is_unchanged(commit_offset: int, store_ts: int) -> None:
    """Both make_msg_id variants give exactly the text of the former 12-byte hex packing."""
    expected = _old_msg_id(commit_offset, store_ts)
    assert record.py_make_msg_id(commit_offset, store_ts) == expected
    assert record.make_msg_id(commit_offset, store_ts) == expected


@pytest.mark.parametrize("commit_offset", [-1, 1 << 64])
def test_make_msg_id_rejects_offsets_outside_16_hex_digits(commit_offset: int) -> None:
    """Like the former packing, an offset below 0 or from 2**64 on raises OverflowError in both variants."""
    for fn in (record.py_make_msg_id, record.make_msg_id):
        with pytest.raises(OverflowError):
            fn(commit_offset, 0)
