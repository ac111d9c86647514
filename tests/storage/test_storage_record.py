"""Record codec: round trips, CRC and torn-record detection, fillers, message ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.core.errors import CorruptRecord, MessageTooLarge
from tidegate.core.model import Message
from tidegate.core.storage.record import (
    FILLER_MAGIC,
    FILLER_SIZE,
    MESSAGE_MAGIC,
    TornRecord,
    check_record,
    decode_filler,
    decode_record,
    encode_filler,
    encode_record,
    make_msg_id,
    parse_msg_id,
    record_store_ts,
)

text = st.text(max_size=40)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

messages = st.builds(
    Message,
    topic=st.text(min_size=1, max_size=30),
    body=st.binary(max_size=300),
    subject=text,
    tag=text,
    keys=st.lists(text, max_size=4).map(tuple),
    properties=st.dictionaries(text, text, max_size=5),
    born_ts=i64,
    deliver_at=i64,
    expires_at=i64,
    group=text,
    flags=st.integers(min_value=0, max_value=2**32 - 1),
)
destinations = st.lists(
    st.tuples(st.text(min_size=1, max_size=20), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)), max_size=4
)


@settings(max_examples=200, deadline=None)
@given(message=messages, store_ts=i64, dests=destinations)
def test_every_field_and_destination_survives_a_round_trip(message, store_ts, dests):
    data = encode_record(message, store_ts, dests)
    decoded = decode_record(data)
    m = decoded.message
    assert (m.topic, m.body, m.subject, m.tag, m.keys, m.properties) == (
        message.topic, message.body, message.subject, message.tag, message.keys, message.properties)
    assert (m.born_ts, m.deliver_at, m.expires_at, m.group, m.flags, m.store_ts) == (
        message.born_ts, message.deliver_at, message.expires_at, message.group, message.flags, store_ts)
    assert decoded.destinations == [tuple(d) for d in dests]
    assert decoded.size == len(data)
    assert record_store_ts(data) == store_ts


@settings(max_examples=100, deadline=None)
@given(message=messages, flip=st.integers(min_value=12))
def test_any_flipped_bit_after_the_crc_field_is_detected(message, flip):
    data = bytearray(encode_record(message, 1, [("t", 0, 0)]))
    position = 12 + flip % (len(data) - 12)
    data[position] ^= 0x01
    with pytest.raises(CorruptRecord):
        decode_record(bytes(data))


def test_a_record_cut_short_is_reported_as_torn():
    data = encode_record(Message("t", b"x" * 100), 1, [("t", 0, 0)])
    for cut in (3, 12, 40, len(data) - 1):
        with pytest.raises(TornRecord):
            check_record(data[:cut])


def test_a_bad_magic_is_corrupt_not_torn():
    data = bytearray(encode_record(Message("t", b"x"), 1, []))
    data[4:8] = b"\xde\xad\xbe\xef"
    with pytest.raises(CorruptRecord) as info:
        check_record(bytes(data))
    assert not isinstance(info.value, TornRecord)


def test_a_length_below_the_header_size_is_corrupt():
    data = bytearray(encode_record(Message("t", b"x"), 1, []))
    data[0:4] = (10).to_bytes(4, "little")
    with pytest.raises(CorruptRecord):
        check_record(bytes(data))


def test_filler_records_its_logical_length_and_the_newest_store_time():
    filler = encode_filler(3000, 1_700_000_000_123)
    assert len(filler) == FILLER_SIZE
    assert check_record(filler) == (FILLER_MAGIC, 3000)
    assert decode_filler(filler) == (3000, 1_700_000_000_123)


def test_a_damaged_filler_is_detected():
    filler = bytearray(encode_filler(3000, 5))
    filler[-1] ^= 0xFF
    with pytest.raises(CorruptRecord):
        check_record(bytes(filler))


def test_decode_refuses_a_filler_where_a_message_is_expected():
    with pytest.raises(CorruptRecord):
        decode_record(encode_filler(100, 0))


def test_check_record_reports_message_magic_and_length():
    data = encode_record(Message("t", b"abc"), 1, [])
    assert check_record(b"junk" + data, 4) == (MESSAGE_MAGIC, len(data))


def test_a_field_longer_than_its_length_field_raises_message_too_large():
    with pytest.raises(MessageTooLarge):
        encode_record(Message("t", group="g" * 70_000), 1, [])


@given(offset=st.integers(0, 2**64 - 1), ts=st.integers(0, 2**62))
def test_message_ids_are_24_uppercase_hex_chars_holding_offset_and_seconds(offset, ts):
    msg_id = make_msg_id(offset, ts)
    assert len(msg_id) == 24 and msg_id == msg_id.upper()
    assert parse_msg_id(msg_id) == (offset, (ts // 1000) & 0xFFFFFFFF)


@pytest.mark.parametrize("bad", ["", "xyz", "0x" + "0" * 22, "0" * 23 + "_", "0" * 25, None, 12])
def test_strings_that_are_not_message_ids_parse_to_none(bad):
    assert parse_msg_id(bad) is None
