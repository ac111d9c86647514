"""The optional compiled accelerator (core/storage/_record_speedups.pyx) against its pure-Python twins in record.py and
queueindex.py: same bytes, same results, same exception types, on random messages, records and damaged records.

The comparisons skip when the extension was not built (no C compiler at install time), except under CI=true on a
machine with a C compiler, where a missing extension fails. `make test` runs this file a second time with
TIDEGATE_NO_EXTENSIONS=1, so every other storage test also runs against the pure-Python code.
"""

from __future__ import annotations

import copy
import importlib
import os
import random
import shutil
import struct
import subprocess
import sys
from types import ModuleType

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.core.errors import CorruptRecord, MessageTooLarge
from tidegate.core.model import Message
from tidegate.core.storage import accelerator, queueindex, record
from tidegate.core.storage.accelerator import ENV_VAR, extensions_disabled

EXTENSION = "tidegate.core.storage._record_speedups"


def _load() -> ModuleType | None:
    try:
        module = importlib.import_module(EXTENSION)
    except ImportError:
        return None
    module.bind(record.DecodedRecord, record.TornRecord, record.SealedRecord)  # record.py skips this when disabled
    return module


speedups = _load()
# Under TIDEGATE_NO_EXTENSIONS the comparisons already ran in the run without it (make test runs both).
needs_extension = pytest.mark.skipif(
    speedups is None or extensions_disabled(),
    reason="compiled accelerator not built (no C compiler?)" if speedups is None else f"{ENV_VAR} is set")


def test_extension_is_built_in_ci_when_a_compiler_is_present() -> None:
    """Under CI=true with a C compiler on PATH the install must have built the accelerator (no silent fallback)."""
    if os.environ.get("CI") != "true" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("only enforced under CI=true with a C compiler")
    assert speedups is not None, "CI has a C compiler but the accelerator was not built: see the pip install output"


def test_public_names_follow_the_environment_switch() -> None:
    """record.py and queueindex.py bind the compiled functions unless TIDEGATE_NO_EXTENSIONS is set."""
    compiled = speedups is not None and not extensions_disabled()
    assert (record.encode_record_parts is not record.py_encode_record_parts) == compiled
    assert (record.decode_record is not record.py_decode_record) == compiled
    assert (queueindex.index_entries is not queueindex.py_index_entries) == compiled


@pytest.mark.skipif(speedups is None, reason="compiled accelerator not built (no C compiler?)")
def test_environment_switch_selects_pure_python_in_a_fresh_interpreter() -> None:
    """TIDEGATE_NO_EXTENSIONS=1 gives the pure functions and says so in the variant description."""
    code = ("from tidegate.core.storage import record, accelerator; "
            "print(record.encode_record is record.py_encode_record, accelerator.describe())")
    for value, pure in (("1", True), ("0", False)):
        env = {**os.environ, ENV_VAR: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split(" ", 1)[0] == str(pure)
        assert ("pure Python" in out.stdout) == pure


_text = st.text(max_size=12)  # includes lone surrogates: records carry them with surrogatepass
_u32 = st.integers(0, 2**32 - 1)
_i64 = st.integers(-(2**63), 2**63 - 1)
_destinations = st.lists(st.tuples(_text, _u32, st.integers(0, 2**64 - 1)), max_size=4)


def _random_bytes(min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    """Large random payloads, cheaper to draw than st.binary of that size (the bytes themselves do not matter)."""
    return st.tuples(st.integers(min_size, max_size), st.integers(0, 2**32)).map(
        lambda size_seed: random.Random(size_seed[1]).randbytes(size_seed[0]))


# small bodies (copied next to their head), around the 4 KiB switch, and large ones (not copied; a bytearray too)
_bodies = st.one_of(st.binary(max_size=300), _random_bytes(4090, 4100), _random_bytes(5000, 70000).map(bytearray))
_messages = st.builds(
    Message, topic=_text, body=_bodies, subject=st.one_of(st.just(""), _text), tag=st.one_of(st.just(""), _text),
    keys=st.lists(_text, max_size=3).map(tuple), properties=st.dictionaries(_text, _text, max_size=3),
    born_ts=_i64, deliver_at=_i64, expires_at=_i64, group=st.one_of(st.just(""), _text), flags=_u32,
)
_plain_messages = st.builds(Message, topic=_text, body=_bodies, born_ts=_i64, flags=_u32,
                            subject=st.one_of(st.just(""), _text))


def _fields(decoded: record.DecodedRecord) -> tuple:
    m = decoded.message
    return (m.topic, bytes(m.body), m.subject, m.tag, m.keys, m.properties, m.born_ts, m.deliver_at, m.expires_at,
            m.group, m.flags, m.store_ts, decoded.destinations, decoded.size)


def _outcome(function, *args) -> tuple:
    """('ok', result) or ('raised', exception type) — what both variants must agree on."""
    try:
        return ("ok", function(*args))
    except (CorruptRecord, MessageTooLarge, ValueError) as exc:
        return ("raised", type(exc))


@needs_extension
@settings(max_examples=300, deadline=None)
@given(message=st.one_of(_messages, _plain_messages), store_ts=_i64, destinations=_destinations)
def test_compiled_encoding_is_byte_identical(message: Message, store_ts: int, destinations: list) -> None:
    """encode_record and encode_record_parts: the same record bytes and length as the pure-Python encoder."""
    expected = record.py_encode_record(message, store_ts, destinations)
    assert speedups.encode_record(message, store_ts, destinations) == expected
    pure_out: list = [b"x"]
    compiled_out: list = [b"x"]
    pure_len = record.py_encode_record_parts(pure_out, message, store_ts, destinations)
    compiled_len = speedups.encode_record_parts(compiled_out, message, store_ts, destinations)
    assert len(compiled_out) == len(pure_out) == 4  # three pieces per record, as CommitLog.append_parts expects
    assert b"".join(compiled_out[1:]) == b"".join(pure_out[1:]) == expected
    assert compiled_len == pure_len == len(expected)


@needs_extension
@settings(max_examples=300, deadline=None)
@given(message=_messages, store_ts=_i64, destinations=_destinations)
def test_compiled_decoding_matches_pure(message: Message, store_ts: int, destinations: list) -> None:
    """decode_record (verified and not) and check_record give the same message, destinations and size."""
    data = record.py_encode_record(message, store_ts, destinations)
    for verify in (True, False):
        assert _fields(speedups.decode_record(data, verify)) == _fields(record.py_decode_record(data, verify))
    framed = b"\0" * 7 + data + b"tail"
    assert speedups.check_record(framed, 7) == record.py_check_record(framed, 7)


@needs_extension
@settings(max_examples=400, deadline=None)
@given(message=st.builds(Message, topic=_text, body=st.binary(max_size=64), subject=_text, tag=_text,
                         keys=st.lists(_text, max_size=3).map(tuple),
                         properties=st.dictionaries(_text, _text, max_size=3)),
       destinations=_destinations, data=st.data())
def test_damaged_records_are_refused_alike(message: Message, destinations: list, data: st.DataObject) -> None:
    """Flipped bytes, truncation and a CRC re-stamped over damage: both variants accept or raise the same type."""
    good = bytearray(record.py_encode_record(message, 1, destinations))
    damaged = bytearray(good)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    damaged = damaged[:cut] if data.draw(st.booleans()) else damaged
    if data.draw(st.booleans()) and len(damaged) >= record.PREFIX_SIZE:
        # keep the CRC right so the decoder's own field checks are what is compared
        struct.pack_into("<I", damaged, 8, crc32c(bytes(damaged[record.PREFIX_SIZE:])))
    blob = bytes(damaged)
    assert _outcome(speedups.check_record, blob) == _outcome(record.py_check_record, blob)
    for verify in (True, False):
        compiled = _outcome(speedups.decode_record, blob, verify)
        pure = _outcome(record.py_decode_record, blob, verify)
        if compiled[0] == "ok" and pure[0] == "ok":
            assert _fields(compiled[1]) == _fields(pure[1])
        else:
            assert compiled[0] == pure[0] == "raised"
            assert issubclass(compiled[1], CorruptRecord) and issubclass(pure[1], CorruptRecord)
            assert compiled[1] is pure[1] or not verify  # verified: the very same class (torn, sealed, corrupt)


@needs_extension
@pytest.mark.parametrize("blob", [
    record.encode_filler(4096, 123),
    record.encode_filler(4096, 123)[:15],
    record.encode_filler(10, 123),
    b"\x10\0\0\0TGE1" + b"\0" * 60,
    b"\0" * 11,
])
def test_fillers_and_odd_prefixes_are_checked_alike(blob: bytes) -> None:
    """Fillers (whole, torn, too short a length), encrypted magics and short prefixes: same outcome."""
    assert _outcome(speedups.check_record, blob) == _outcome(record.py_check_record, blob)


@needs_extension
def test_sealed_record_is_refused_with_sealed_record() -> None:
    """An encrypted record reaching the compiled decoder raises SealedRecord as the pure one does."""
    data = bytearray(record.py_encode_record(Message(topic="t", body=b"b"), 1, [("t", 0, 0)]))
    struct.pack_into("<I", data, 4, record.ENCRYPTED_MAGIC)
    with pytest.raises(record.SealedRecord):
        speedups.decode_record(bytes(data))


@needs_extension
@pytest.mark.parametrize("message, destinations", [
    (Message(topic="t", body=b"x", flags=2**32), (("t", 0, 0),)),
    (Message(topic="t", body=b"x", flags=-1), (("t", 0, 0),)),
    (Message(topic="t", body=b"x", born_ts=2**63), ()),
    (Message(topic="t", body=b"x", subject="s" * 70000), (("t", 0, 0),)),
    (Message(topic="t", body=b"x", tag="g" * 70000), ()),
    (Message(topic="t", body=b"x"), (("d" * 70000, 0, 0),)),
    (Message(topic="t", body=b"x"), (("t", 2**32, 0),)),
    (Message(topic="t", body=b"x"), (("t", 0, -1),)),
    (Message(topic="t", body=b"x"), [("t", 0, 0)] * 70000),
])
def test_oversized_fields_raise_message_too_large_in_both(message: Message, destinations) -> None:
    """A field that does not fit its length field is MessageTooLarge in both variants, and nothing is appended."""
    for encode_parts in (speedups.encode_record_parts, record.py_encode_record_parts):
        out: list = []
        with pytest.raises(MessageTooLarge):
            encode_parts(out, message, 1, destinations)
        assert out == []
    with pytest.raises(MessageTooLarge):
        speedups.encode_record(message, 1, destinations)


@needs_extension
@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 2**64 - 1), _u32, st.integers(0, 2**64 - 1)), max_size=20),
       first=st.integers(0, 2**40))
def test_index_entries_pack_and_read_alike(entries: list, first: int) -> None:
    """entry_pack gives ENTRY.pack's 20 bytes; index_entries gives QueueIndex.read's entries, holes left out."""
    packed = b"".join(speedups.entry_pack(*entry) for entry in entries)
    assert packed == b"".join(queueindex.py_entry_pack(*entry) for entry in entries)
    assert speedups.index_entries(packed, first) == queueindex.py_index_entries(packed, first)
    assert all(type(e) is type(p) for e, p in zip(speedups.index_entries(packed, first),
                                                 queueindex.py_index_entries(packed, first), strict=True))


@needs_extension
@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), _random_bytes(4000, 70000)), value=_u32)
def test_crc32c_matches_the_crc32c_package(data: bytes, value: int) -> None:
    """Both CRC32C paths (SSE4.2 where the CPU has it, tables elsewhere) equal crc32c(data, value)."""
    assert speedups.crc32c(data, value) == crc32c(data, value)
    assert speedups.crc32c_software(data, value) == crc32c(data, value)


@needs_extension
@pytest.mark.parametrize("body", [b"y" * 5000, bytearray(b"z" * 70000)])
def test_large_body_is_handed_on_uncopied_in_both(body) -> None:
    """Over 4 KiB the pieces are prefix, head and the body object itself (no copy) in both variants."""
    message = Message(topic="t", body=body, subject="s")
    for encode_parts in (speedups.encode_record_parts, record.py_encode_record_parts):
        out: list = []
        encode_parts(out, message, 1, [("t", 0, 0)])
        assert out[2] is body and len(out[0]) == record.PREFIX_SIZE


def _run_batch(encode_batch, index_batch, messages: list[Message], dest_choice: list[int], store_ts: int,
               offsets_from: int) -> tuple:
    """Plan, encode and index one batch as FileMessageStore.append_batch does, with three shared destination
    tuples (one names a queue twice); returns everything the store would use, and the stamped messages."""
    messages = [copy.copy(m) for m in messages]
    shared = [("q0",), ("q1", "q0"), ("q2", "q2", "q1")]
    slot_names = ["q0", "q1", "q2"]
    bases = [5, 0, 2**40]
    used: list[str] = []
    counts: list[int] = []
    slot_bases: list[int] = []

    def resolve(destinations: tuple[str, ...]) -> tuple[tuple[int, str, int], ...]:
        plan = []
        for name in destinations:
            if name not in used:
                used.append(name)
                counts.append(0)
                slot_bases.append(bases[slot_names.index(name)])
            plan.append((used.index(name), f"topic-{name}", slot_names.index(name)))
        return tuple(plan)

    items = [(m, shared[choice]) for m, choice in zip(messages, dest_choice, strict=False)]
    parts: list = []
    sizes: list[int] = []
    plans = encode_batch(parts, sizes, items, store_ts, resolve, slot_bases, counts)
    offsets = []
    at = offsets_from
    for size in sizes:
        offsets.append(at)
        at += size + 7  # as if a filler sat between records
    tag_hashes: dict[str, int] = {"": 0}
    blocks, results, keyed = index_batch(items, offsets, sizes, plans, counts, tag_hashes,
                                         lambda tag: len(tag) * 2**50 + 3, record.msg_id_suffix(store_ts), store_ts,
                                         tuple)
    stamped = [(m.msg_id, m.store_ts) for m in messages]
    return b"".join(parts), sizes, plans, counts, used, blocks, results, keyed, stamped


@needs_extension
@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.one_of(_messages, _plain_messages), min_size=1, max_size=6),
       data=st.data(), store_ts=st.integers(0, 2**62), offsets_from=st.integers(0, 2**63))
def test_compiled_batch_encoding_and_index_blocks_are_identical(messages: list[Message], data: st.DataObject,
                                                                 store_ts: int, offsets_from: int) -> None:
    """encode_batch and index_batch (FileMessageStore.append_batch's two calls): the same record bytes, queue
    offsets, index entry blocks per queue, results, msg ids and key positions as the pure-Python twins."""
    dest_choice = data.draw(st.lists(st.integers(0, 2), min_size=len(messages), max_size=len(messages)))
    pure = _run_batch(record.py_encode_batch, record.py_index_batch, messages, dest_choice, store_ts, offsets_from)
    compiled = _run_batch(speedups.encode_batch, speedups.index_batch, messages, dest_choice, store_ts, offsets_from)
    assert compiled == pure
    joined, sizes, plans, counts, used, blocks, results, keyed, stamped = pure
    # and both agree with the one-message functions they replace
    for (msg_id, offset, _size, ts, _), (stamped_id, stamped_ts) in zip(results, stamped, strict=True):
        assert msg_id == stamped_id == record.make_msg_id(offset, store_ts) and ts == stamped_ts == store_ts
    assert [len(block) for block in blocks] == [count * queueindex.ENTRY_SIZE for count in counts]
    assert keyed == [i for i, m in enumerate(messages) if m.keys]


def _publish_results(send_results, batch: list[tuple[int, int, int]], largest_cached: int) -> tuple:
    """Producer.publish's step after the append, on `batch` = (destination count, record size, body size) per
    message: destination tuples of 1, 2 and 3 queues, queue offsets growing per queue."""
    from tidegate.core.api import SendResult
    from tidegate.core.model import AppendResult, QueueRef

    queues = [QueueRef("t", i) for i in range(3)]
    next_offset = [0, 10, 20]
    items, results = [], []
    for i, (n_dests, size, body_size) in enumerate(batch):
        dests = tuple(queues[:n_dests])
        offsets = []
        for q in dests:
            offsets.append(next_offset[q.queue_id])
            next_offset[q.queue_id] += 1
        items.append((Message(topic="t", body=b"b" * body_size), dests))
        results.append(AppendResult(f"id{i}", 1000 * i, size, 7, tuple(offsets)))
    ends: dict = {}
    cached: dict = {}
    order: list = []
    out, cached_bytes, body_bytes = send_results(items, results, ends, cached, order.append, largest_cached, 256,
                                                 SendResult)
    assert all(type(result) is SendResult for result in out)
    return out, cached_bytes, body_bytes, ends, sorted(cached), order


@needs_extension
@settings(max_examples=100, deadline=None)
@given(batch=st.lists(st.tuples(st.integers(1, 3), st.integers(70, 5000), st.integers(0, 300)), min_size=1,
                      max_size=8),
       largest_cached=st.integers(-1, 3000))
def test_compiled_send_results_match_pure(batch: list[tuple[int, int, int]], largest_cached: int) -> None:
    """produce.send_results (the publish path after the append): the same SendResults, visible ends, cached
    messages and charges as the pure-Python twin."""
    from tidegate.core import produce

    assert _publish_results(speedups.send_results, batch, largest_cached) == _publish_results(
        produce.py_send_results, batch, largest_cached)


def test_a_stale_build_is_not_used_at_all(monkeypatch) -> None:
    """An extension built from older sources (an editable install not rebuilt after a pull) lacks names the code
    needs: it is treated as not built, with the reason in `tidegate version`, instead of failing at import."""
    import types

    stale = types.ModuleType("stale_speedups")
    stale.encode_record = lambda *args: b""  # what an older build had; the newer names are missing
    monkeypatch.setattr(accelerator.importlib, "import_module", lambda name: stale)
    monkeypatch.setattr(accelerator, "_loaded", {})
    monkeypatch.setattr(accelerator, "_failures", {})
    monkeypatch.setattr(accelerator, "_warned_stale", {})
    monkeypatch.delenv(accelerator.ENV_VAR, raising=False)
    assert accelerator.load_extension("stale_speedups", accelerator.RECORD_SPEEDUPS_NAMES) is None
    assert "reinstall" in accelerator._failures["stale_speedups"]
    assert accelerator.describe() == ("pure Python (compiled accelerator built from older sources: reinstall to "
                                      "rebuild it)")
