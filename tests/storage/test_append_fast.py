"""The batch append path (issue 10, second pass): pieces-based record encoding, one write per batch, index entries
as one block per queue. Everything here is held to the bytes of the reference encoder `encode_record` and of
appending one message at a time, so the on-disk format cannot drift."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.core.errors import MessageTooLarge
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.record import (
    decode_record,
    encode_record,
    encode_record_parts,
    make_msg_id,
    msg_id_suffix,
)

from .conftest import FakeClock, open_file_store

_text = st.text(max_size=12)
_u32 = st.integers(0, 2**32 - 1)
_i64 = st.integers(-(2**63), 2**63 - 1)
_destinations = st.lists(st.tuples(_text, _u32, st.integers(0, 2**64 - 1)), max_size=3)
_messages = st.builds(
    Message,
    topic=_text,
    body=st.binary(max_size=300),
    subject=st.one_of(st.just(""), _text),
    tag=st.one_of(st.just(""), _text),
    keys=st.lists(_text, max_size=3).map(tuple),
    properties=st.dictionaries(_text, _text, max_size=3),
    born_ts=_i64,
    deliver_at=_i64,
    expires_at=_i64,
    group=st.one_of(st.just(""), _text),
    flags=_u32,
)
# the fast path's messages: no tag, group, keys or properties (a subject or not)
_plain_messages = st.builds(Message, topic=_text, body=st.binary(max_size=300), born_ts=_i64, flags=_u32,
                            subject=st.one_of(st.just(""), _text))


@settings(max_examples=300, deadline=None)
@given(message=st.one_of(_messages, _plain_messages), store_ts=_i64, destinations=_destinations)
def test_record_pieces_join_to_the_reference_encoding(message: Message, store_ts: int, destinations: list) -> None:
    """encode_record_parts appends exactly three pieces whose concatenation and length are encode_record's."""
    out: list[bytes] = [b"before"]
    length = encode_record_parts(out, message, store_ts, destinations)
    expected = encode_record(message, store_ts, destinations)
    assert len(out) == 4
    assert b"".join(out[1:]) == expected
    assert length == len(expected)


@settings(max_examples=200, deadline=None)
@given(message=_plain_messages, store_ts=_i64,
       destinations=st.lists(st.tuples(_text, _u32, st.integers(0, 2**64 - 1)), min_size=1, max_size=2))
def test_fast_path_records_match_reference_and_decode(message: Message, store_ts: int, destinations: list) -> None:
    """The cached-struct heads (header + topic, one or two destinations) give the reference bytes, and decode."""
    out: list[bytes] = []
    encode_record_parts(out, message, store_ts, destinations)
    data = b"".join(out)
    assert data == encode_record(message, store_ts, destinations)
    decoded = decode_record(data)
    assert (decoded.message.topic, decoded.message.subject, decoded.message.body) == (
        message.topic, message.subject, message.body)
    assert decoded.destinations == [tuple(d) for d in destinations]


@pytest.mark.parametrize("message, destinations", [
    (Message(topic="t", body=b"x", flags=2**32), (("t", 0, 0),)),  # plain fast path
    (Message(topic="t", body=b"x", subject="s", flags=-1), (("t", 0, 0),)),
    (Message(topic="t", body=b"x", tag="g", flags=-1), (("t", 0, 0),)),  # general path
    (Message(topic="t", body=b"x", subject="s" * 70000), (("t", 0, 0),)),
    (Message(topic="t", body=b"x"), (("t", 0, 2**64),)),
    (Message(topic="t", body=b"x"), (("t", 2**32, 0), ("u", 0, 0))),
])
def test_overflowing_fields_raise_message_too_large_and_append_nothing(message: Message,
                                                                        destinations: tuple) -> None:
    with pytest.raises(MessageTooLarge):
        encode_record(message, 1, destinations)
    out: list[bytes] = []
    with pytest.raises(MessageTooLarge):
        encode_record_parts(out, message, 1, destinations)
    assert out == []


@settings(max_examples=300, deadline=None)
@given(commit_offset=st.integers(0, 2**64 - 1), store_ts=st.integers(0, 2**63 - 1))
def test_msg_id_suffix_builds_the_same_ids_as_make_msg_id(commit_offset: int, store_ts: int) -> None:
    assert f"{commit_offset:016X}{msg_id_suffix(store_ts)}" == make_msg_id(commit_offset, store_ts)


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "checkpoint" not in p.name}


def _batch(seed: int) -> list[tuple[Message, list[QueueRef]]]:
    """A mixed batch: plain single-queue messages, keys and tags, several destinations, one queue named twice."""
    a, b, c = QueueRef("orders", 0), QueueRef("orders", 1), QueueRef("audit", 0)
    items = []
    for i in range(40):
        body = bytes((seed + i) % 256 for _ in range(i * 7 % 200))
        if i % 5 == 0:
            items.append((Message(topic="orders", body=body, keys=(f"k{i}",), tag="t1"), [a, c]))
        elif i % 7 == 0:
            items.append((Message(topic="orders", body=body, properties={"p": str(i)}), [b, b]))
        elif i % 3 == 0:
            items.append((Message(topic="orders", body=body, subject="s"), [b]))
        else:
            items.append((Message(topic="orders", body=body), [a]))
    return items


@pytest.mark.parametrize("segment_bytes", [1 << 20, 4096])  # one write; a batch that rolls segments
def test_append_batch_writes_the_same_files_as_appending_one_by_one(tmp_path: Path, segment_bytes: int) -> None:
    """Same log segments, index files and results as the one-at-a-time path, whether or not the batch rolls a
    segment; and every message reads back."""
    one_root, batch_root = tmp_path / "one", tmp_path / "batch"
    one = open_file_store(one_root, FakeClock(), segment_bytes=segment_bytes)
    batched = open_file_store(batch_root, FakeClock(), segment_bytes=segment_bytes)
    for seed in range(3):
        items = _batch(seed)
        expected = [one.append(Message(**_fields(m)), dests) for m, dests in items]
        messages = [(Message(**_fields(m)), dests) for m, dests in items]
        got = batched.append_batch(messages)
        assert got == expected
        assert all(type(r) is type(expected[0]) for r in got)
        for (message, _), result in zip(messages, got, strict=True):
            assert message.msg_id == result.msg_id and message.store_ts == result.store_ts
            assert batched.read_message(result.commit_offset).body == message.body
    for queue in (QueueRef("orders", 0), QueueRef("orders", 1), QueueRef("audit", 0)):
        assert batched.read_index(queue, 0, 1000) == one.read_index(queue, 0, 1000)
        assert batched.queue_bounds(queue) == one.queue_bounds(queue)
    assert batched.lookup_key("orders", "k5") == one.lookup_key("orders", "k5")
    one.close()
    batched.close()
    assert _store_files(batch_root) == _store_files(one_root)


def _fields(m: Message) -> dict:
    return {"topic": m.topic, "body": m.body, "subject": m.subject, "tag": m.tag, "keys": m.keys,
            "properties": dict(m.properties)}


def test_refused_batch_leaves_no_trace(tmp_path: Path) -> None:
    """A batch with one message too large for its length fields stores nothing and claims no queue offset."""
    store = open_file_store(tmp_path, FakeClock())
    queue = QueueRef("orders", 0)
    store.append(Message(topic="orders", body=b"first"), [queue])
    end = store.end_offset
    with pytest.raises(MessageTooLarge):
        store.append_batch([(Message(topic="orders", body=b"ok"), [queue]),
                            (Message(topic="orders", body=b"bad", flags=2**32), [queue])])
    assert store.end_offset == end
    result = store.append_batch([(Message(topic="orders", body=b"next"), [queue])])[0]
    assert result.queue_offsets == (1,)
    assert [e.commit_offset for e in store.read_index(queue, 0, 10)] == [0, result.commit_offset]
    store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(st.binary(max_size=900), min_size=1, max_size=12))
def test_append_batch_log_bytes_are_the_reference_records(tmp_path_factory: pytest.TempPathFactory,
                                                          bodies: list[bytes]) -> None:
    """The log holds exactly encode_record's bytes for each message at the offsets the results give."""
    root = tmp_path_factory.mktemp("log")
    clock = FakeClock()
    store = open_file_store(root, clock)
    queue = QueueRef("t", 2)
    results = store.append_batch([(Message(topic="t", body=body), [queue]) for body in bodies])
    for i, (body, result) in enumerate(zip(bodies, results, strict=True)):
        expected = encode_record(Message(topic="t", body=body), clock.now_ms, (("t", 2, i),))
        assert result.size == len(expected)
        assert store._log.read(result.commit_offset, result.size) == expected
        length = struct.unpack_from("<I", expected)[0]
        assert length == len(expected)
    store.close()
