"""Encryption at rest in the file store: sealed records, the keyring, key checks at open, rotation, tampering."""

from __future__ import annotations

import base64
import os
import struct

import pytest
from crc32c import crc32c

from tidegate.core.errors import CorruptRecord, MessageNotFound
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.encryption import (
    EncryptionKeyError,
    Keyring,
    add_key_to_file,
    decode_sealed_record,
    load_keyring,
    next_key_id,
    read_key_uses,
)
from tidegate.core.storage.record import (
    ENCRYPTED_MAGIC,
    MESSAGE_MAGIC,
    PREFIX,
    PREFIX_SIZE,
    SealedRecord,
    check_record,
    decode_record,
    encode_record,
)

Q0 = QueueRef("orders", 0)
Q1 = QueueRef("orders", 1)
SECRET = b"PLAINTEXT-CARD-4111111111111111"


def keyring(*ids: str, seed: int = 0) -> Keyring:
    """Deterministic keys per (id, seed): the same id with another seed is a *different* key under that id."""
    keys = {key_id: bytes((seed + i + j) % 256 for j in range(32)) for i, key_id in enumerate(ids)}
    return Keyring(keys, ids[-1])


def secret_message(n: int = 0) -> Message:
    return Message("orders", SECRET + b"-%d" % n, subject="patients/alice", tag="created", keys=(f"order-{n}",),
                   properties={"iban": "DE89370400440532013000", "content-type": "application/json"},
                   born_ts=1_600_000_000_000 + n, deliver_at=0, expires_at=1_800_000_000_000, group="fifo", flags=1)


def bodies(store, queue: QueueRef = Q0) -> list[bytes]:
    bounds = store.queue_bounds(queue)
    entries = store.read_index(queue, bounds.min_offset, bounds.max_offset - bounds.min_offset)
    return [store.read_message(e.commit_offset, e.size).body for e in entries]


def segment_bytes_on_disk(store) -> bytes:
    return b"".join(store.layout.segment_path(base).read_bytes() for base in store.layout.segment_bases())


def record_key_id(store, commit_offset: int) -> str:
    data = store._log.read(commit_offset)
    envelope = decode_record(data, verify=False).message.body
    return envelope[1:1 + envelope[0]].decode()


def crash(store) -> None:
    """kill -9 as far as the store can tell: no index flush, no checkpoint, no clean-shutdown marker."""
    store._log.release()
    store._files.close_all()
    store._closed = True


# --- record format
def test_plain_records_are_byte_identical_to_the_format_before_encryption():
    """Existing logs stay readable and the plain path is unchanged: this is the exact pre-encryption encoding."""
    message = Message("orders", b"hello", subject="eu/1", tag="t", keys=("k1",), properties={"a": "b"}, born_ts=5,
                      group="g")
    assert encode_record(message, 7, [("orders", 1, 2)]).hex() == (
        "7b00000054474d315dfdd9a80100000005000000000000000700000000000000000000000000000000000000000000000600040001"
        "000100060000000a0000000100050000006f726465727365752f317467020000006b310100000061010000006206000100000002"
        "000000000000006f726465727368656c6c6f")


def test_round_trip_of_every_field_through_a_sealed_record(open_store):
    store = open_store(keyring=keyring("k1"))
    message = secret_message()
    result = store.append(message, [Q0, Q1])
    got = store.read_message(result.commit_offset, result.size)
    for name in ("topic", "body", "subject", "tag", "keys", "properties", "born_ts", "deliver_at", "expires_at",
                 "group", "flags"):
        assert getattr(got, name) == getattr(message, name), name
    assert got.msg_id == result.msg_id and got.store_ts == result.store_ts
    assert store.lookup_id(result.msg_id).body == message.body
    assert [m.body for m in store.lookup_key("orders", "order-0")] == [message.body]
    assert bodies(store, Q1) == [message.body]
    store.close()


def test_a_sealed_record_has_its_own_magic_and_the_plain_decoder_refuses_it(open_store):
    store = open_store(keyring=keyring("k1"))
    result = store.append(secret_message(), [Q0])
    data = store._log.read(result.commit_offset)
    assert PREFIX.unpack_from(data)[1] == ENCRYPTED_MAGIC
    assert check_record(data) == (ENCRYPTED_MAGIC, len(data))  # CRC still guards against torn writes
    with pytest.raises(SealedRecord):
        decode_record(data)
    store.close()


def test_batches_of_sealed_records_land_where_the_placer_predicted_across_segment_rolls(open_store):
    """Tiny segments: the offset bound in each record must be where the log really wrote it, rolls included."""
    store = open_store(keyring=keyring("k1"))
    messages = [Message("orders", b"%03d" % n + b"y" * (37 * (n % 5)), subject=f"s/{n}") for n in range(120)]
    results = []
    for start in range(0, len(messages), 7):
        results += store.append_batch([(m, [Q0]) for m in messages[start:start + 7]])
    results.append(store.append(Message("orders", b"single"), [Q0]))
    assert len(store._log.segment_bases()) > 3
    assert bodies(store) == [m.body for m in messages] + [b"single"]
    store.close()


def test_the_plaintext_payload_never_reaches_the_segment_files(open_store):
    store = open_store(keyring=keyring("k1"))
    store.append_batch([(secret_message(n), [Q0]) for n in range(20)])
    store.append(secret_message(99), [Q0])
    store.sync()
    on_disk = segment_bytes_on_disk(store)
    assert SECRET not in on_disk
    assert b"patients/alice" not in on_disk  # subject: sealed
    assert b"DE89370400440532013000" not in on_disk and b"iban" not in on_disk  # property names and values
    assert b"orders" in on_disk and b"order-3" in on_disk  # topic and lookup keys stay in clear (documented)
    store.close()


def test_without_encryption_the_payload_is_in_clear_so_the_check_above_means_something(open_store):
    store = open_store()
    store.append(secret_message(), [Q0])
    store.sync()
    assert SECRET in segment_bytes_on_disk(store)
    store.close()


# --- restart and key checks
def test_restart_with_the_same_key_reads_everything(open_store):
    store = open_store(keyring=keyring("k1"))
    store.append_batch([(secret_message(n), [Q0]) for n in range(10)])
    store.close()
    store = open_store(keyring=keyring("k1"))
    assert bodies(store) == [secret_message(n).body for n in range(10)]
    store.close()


def test_restart_with_a_wrong_key_is_refused_with_a_clear_message(open_store):
    store = open_store(keyring=keyring("k1"))
    store.append(secret_message(), [Q0])
    store.close()
    with pytest.raises(EncryptionKeyError, match="wrong encryption key: key 'k1'"):
        open_store(keyring=keyring("k1", seed=99))


def test_restart_without_a_key_is_refused_when_encrypted_records_exist(open_store):
    store = open_store(keyring=keyring("k1"))
    store.append(secret_message(), [Q0])
    store.close()
    with pytest.raises(EncryptionKeyError, match="no encryption key is configured"):
        open_store()


def test_restart_with_a_keyring_missing_a_key_still_needed_is_refused(open_store):
    store = open_store(keyring=keyring("k1"))
    store.append(secret_message(), [Q0])
    store.close()
    with pytest.raises(EncryptionKeyError, match="key 'k1'.*does not contain"):
        open_store(keyring=keyring("k2"))


def test_a_key_that_never_sealed_a_record_is_not_required(open_store):
    """Configured then replaced before any message: no record needs the first key, so nothing is refused."""
    open_store(keyring=keyring("k1")).close()
    store = open_store(keyring=keyring("k1", seed=50))  # same id, other key, nothing sealed yet: accepted
    store.append(secret_message(), [Q0])
    store.close()
    store = open_store(keyring=keyring("k1", seed=50))
    assert bodies(store) == [secret_message().body]
    store.close()


def test_a_key_rotated_away_before_sealing_anything_is_not_required_later(open_store):
    store = open_store(keyring=keyring("k1"))
    store.append(Message("orders", b"sealed with k1"), [Q0])
    store.close()
    open_store(keyring=keyring("k1", "k2")).close()  # k2 current, seals nothing
    store = open_store(keyring=keyring("k1", "k3"))  # k3 current; k2 is no longer needed
    store.append(Message("orders", b"sealed with k3"), [Q0])
    store.close()
    store = open_store(keyring=Keyring({"k1": keyring("k1").keys["k1"], "k3": keyring("k1", "k3").keys["k3"]}, "k3"))
    assert bodies(store) == [b"sealed with k1", b"sealed with k3"]
    store.close()


def test_turning_encryption_on_keeps_the_plain_records_readable(open_store):
    store = open_store()
    store.append(Message("orders", b"plain-before"), [Q0])
    store.close()
    store = open_store(keyring=keyring("k1"))
    store.append(secret_message(), [Q0])
    assert bodies(store) == [b"plain-before", secret_message().body]
    store.close()


def test_an_encrypted_record_read_without_its_key_is_not_found_never_garbage(open_store):
    """Even with the key check file gone (so the open is not refused), a sealed record is never delivered raw."""
    store = open_store(keyring=keyring("k1"))
    result = store.append(secret_message(), [Q0])
    store.close()
    store.layout.encryption_keys_path.unlink()
    store = open_store()
    with pytest.raises(MessageNotFound, match="encrypted"):
        store.read_message(result.commit_offset, result.size)
    store.close()


# --- rotation
def test_rotation_seals_new_records_with_the_new_key_and_old_records_stay_readable(open_store, clock):
    store = open_store(keyring=keyring("k1"))
    old = store.append_batch([(secret_message(n), [Q0]) for n in range(30)])
    store.close()
    store = open_store(keyring=keyring("k1", "k2"))
    new = store.append_batch([(secret_message(n), [Q0]) for n in range(30, 60)])
    assert {record_key_id(store, r.commit_offset) for r in old} == {"k1"}
    assert {record_key_id(store, r.commit_offset) for r in new} == {"k2"}
    assert bodies(store) == [secret_message(n).body for n in range(60)]
    store.close()
    with pytest.raises(EncryptionKeyError, match="'k1'"):
        open_store(keyring=keyring("k2", seed=1))  # k1 records are still stored: dropping k1 is refused


def test_an_old_key_can_go_once_retention_deleted_its_records(open_store, clock):
    store = open_store(keyring=keyring("k1"))
    for n in range(40):  # several tiny segments sealed with k1
        store.append(secret_message(n), [Q0])
    store.close()
    store = open_store(keyring=keyring("k1", "k2"))
    clock.advance(10_000)
    for n in range(40):
        store.append(secret_message(100 + n), [Q0])
    clock.advance(10_000)
    for n in range(40):  # whole segments written after the k1 ones
        store.append(secret_message(200 + n), [Q0])
    clock.advance(10_000)
    store.enforce_retention(clock(), max_age_ms=15_000, max_bytes=0)  # drops every segment holding k1 records
    k2_since = read_key_uses(store.layout.encryption_keys_path)[-1].since
    assert store._log.min_offset > k2_since
    remaining = bodies(store)
    store.close()
    k2_only = Keyring({"k2": keyring("k1", "k2").keys["k2"]}, "k2")
    store = open_store(keyring=k2_only)
    assert bodies(store) == remaining and secret_message(239).body in remaining
    store.close()


# --- tampering
def _rewrite(store, commit_offset: int, mutate) -> None:
    """Change a stored record and fix its CRC, as an attacker with write access to the files would."""
    base = store._log.segment_of(commit_offset)
    path = store.layout.segment_path(base)
    raw = bytearray(path.read_bytes())
    pos = commit_offset - base
    length = struct.unpack_from("<I", raw, pos)[0]
    record = bytearray(raw[pos:pos + length])
    mutate(record)
    struct.pack_into("<I", record, 8, crc32c(bytes(record[PREFIX_SIZE:])))
    raw[pos:pos + length] = record
    path.write_bytes(bytes(raw))


def test_tampered_ciphertext_is_detected_and_reported_like_a_checksum_failure(open_store):
    store = open_store(keyring=keyring("k1"))
    results = store.append_batch([(secret_message(n), [Q0]) for n in range(3)])
    store.close()

    def flip_last_byte(record: bytearray) -> None:
        record[-20] ^= 0x01

    _rewrite(store, results[1].commit_offset, flip_last_byte)
    store = open_store(keyring=keyring("k1"))
    with pytest.raises(MessageNotFound, match="failed authentication"):
        store.read_message(results[1].commit_offset, results[1].size)
    assert store.read_message(results[2].commit_offset).body == secret_message(2).body
    store.close()


def test_editing_a_clear_field_breaks_the_seal(open_store):
    """Destinations are bound: pointing a record at another queue offset (CRC fixed) makes it unreadable."""
    store = open_store(keyring=keyring("k1"))
    result = store.append(secret_message(), [Q0])
    data = store._log.read(result.commit_offset)
    store.close()
    dest_at = data.index(b"orders", data.index(b"order-0")) - 14  # destination: topic_len u16, queue_id u32, off u64

    def move_queue_offset(record: bytearray) -> None:
        struct.pack_into("<Q", record, dest_at + 6, 5)

    _rewrite(store, result.commit_offset, move_queue_offset)
    store = open_store(keyring=keyring("k1"))
    with pytest.raises(MessageNotFound, match="failed authentication"):
        store.read_message(result.commit_offset)
    store.close()


def test_a_record_copied_to_another_commit_offset_does_not_open():
    """The commit offset is bound in the associated data: a replayed copy at another position fails."""
    from tidegate.core.storage.encryption import encode_sealed_record

    ring = keyring("k1")
    data = encode_sealed_record(secret_message(), 1, [("orders", 0, 0)], ring, lambda length: 4096)
    assert decode_sealed_record(data, 4096, ring).body == secret_message().body
    with pytest.raises(CorruptRecord, match="failed authentication"):
        decode_sealed_record(data, 8192, ring)


# --- crash recovery
def test_recovery_after_a_crash_with_encryption_on_rebuilds_indexes_without_reading_plaintext(open_store):
    store = open_store(keyring=keyring("k1"))
    store.append_batch([(secret_message(n), [Q0]) for n in range(25)])
    store.sync()
    tail = store.append(secret_message(25), [Q0])
    crash(store)
    base = store._log.segment_of(tail.commit_offset)
    path = store.layout.segment_path(base)
    with open(path, "r+b") as fh:  # the last record torn in half, as by kill -9 mid-write
        fh.truncate(tail.commit_offset - base + tail.size // 2)
    store = open_store(keyring=keyring("k1"))
    assert not store.recovery.clean and store.recovery.truncated_bytes > 0
    assert bodies(store) == [secret_message(n).body for n in range(25)]
    assert store.append(secret_message(26), [Q0]).queue_offsets == (25,)
    store.close()


def test_recovery_resyncs_past_a_damaged_sealed_record_by_searching_for_the_sealed_magic(open_store):
    """A record whose header is smashed in the middle of the log: the scan finds the next `TGE1` record and keeps
    everything after it; only the damaged record is lost."""
    store = open_store(keyring=keyring("k1"))
    results = store.append_batch([(secret_message(n), [Q0]) for n in range(6)])
    store.sync()
    crash(store)
    victim = results[2]
    base = store._log.segment_of(victim.commit_offset)
    path = store.layout.segment_path(base)
    raw = bytearray(path.read_bytes())
    raw[victim.commit_offset - base:victim.commit_offset - base + 12] = b"\xff" * 12  # length, magic and CRC gone
    path.write_bytes(bytes(raw))
    store = open_store(keyring=keyring("k1"))
    assert store.recovery.dropped_ranges and store.recovery.truncated_bytes == 0
    survivors = [r for n, r in enumerate(results) if n != 2]
    assert [store.read_message(r.commit_offset, r.size).body for r in survivors] == \
        [secret_message(n).body for n in (0, 1, 3, 4, 5)]
    store.close()


# --- keyring sources
def _line(key_id: str, key: bytes) -> str:
    return f"{key_id}:{base64.b64encode(key).decode()}"


def test_keyring_parsing_takes_the_last_key_as_current_and_skips_comments():
    text = f"# rotated 2026-01\n{_line('k1', b'a' * 32)}\n\n{_line('k2', b'b' * 32)}\n"
    ring = Keyring.parse(text, "test")
    assert ring.current == "k2" and set(ring.keys) == {"k1", "k2"}
    assert Keyring.parse(f"{_line('a', b'a' * 32)},{_line('b', b'b' * 32)}", "env").current == "b"
    assert "b'a" not in repr(ring) and "YWFh" not in repr(ring)  # repr never shows key bytes


@pytest.mark.parametrize("text, why", [
    ("", "no key"),
    ("k1", "expected id:base64key"),
    ("bad id!:" + base64.b64encode(b"a" * 32).decode(), "expected id:base64key"),
    ("k1:not base64!", "not valid base64"),
    ("k1:" + base64.b64encode(b"a" * 16).decode(), "16 bytes, AES-256 needs 32"),
    (f"k1:{base64.b64encode(b'a' * 32).decode()}\nk1:{base64.b64encode(b'b' * 32).decode()}", "appears twice"),
])
def test_a_malformed_keyring_is_refused_naming_the_problem(text, why):
    with pytest.raises(EncryptionKeyError, match=why):
        Keyring.parse(text, "test")


def test_a_key_file_readable_by_group_or_others_is_refused(tmp_path):
    path = tmp_path / "keys"
    path.write_text(_line("k1", os.urandom(32)) + "\n")
    for mode in (0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(EncryptionKeyError, match="chmod 600"):
            load_keyring(key_file=str(path))
    path.chmod(0o600)
    assert load_keyring(key_file=str(path)).current == "k1"


def test_keyring_from_an_environment_variable_and_its_errors(tmp_path):
    env = {"TIDEGATE_KEYRING": _line("k7", os.urandom(32))}
    assert load_keyring(key_env="TIDEGATE_KEYRING", environ=env).current == "k7"
    with pytest.raises(EncryptionKeyError, match="not set or empty"):
        load_keyring(key_env="MISSING", environ=env)
    with pytest.raises(EncryptionKeyError, match="not both"):
        load_keyring(key_file=str(tmp_path / "k"), key_env="TIDEGATE_KEYRING", environ=env)
    with pytest.raises(EncryptionKeyError, match="cannot read"):
        load_keyring(key_file=str(tmp_path / "missing"))
    assert load_keyring() is None


def test_add_key_to_file_creates_a_private_file_and_keeps_older_keys(tmp_path):
    path = tmp_path / "keys"
    assert add_key_to_file(path) == "k1"
    assert path.stat().st_mode & 0o777 == 0o600
    first = load_keyring(key_file=str(path))
    assert add_key_to_file(path) == "k2"
    assert add_key_to_file(path, "2027-q1") == "2027-q1"
    ring = load_keyring(key_file=str(path))
    assert ring.current == "2027-q1" and ring.keys["k1"] == first.keys["k1"] and len(ring.keys) == 3
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(EncryptionKeyError, match="already"):
        add_key_to_file(path, "k2")
    assert next_key_id(["k9", "other"]) == "k10"


def test_the_memory_store_and_plain_file_store_still_use_the_plain_magic(open_store):
    store = open_store()
    result = store.append(Message("orders", b"x"), [Q0])
    assert PREFIX.unpack_from(store._log.read(result.commit_offset))[1] == MESSAGE_MAGIC
    assert not store.layout.encryption_keys_path.exists()
    store.close()
