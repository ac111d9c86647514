"""Encryption at rest for commit-log records: the keyring, the sealed-record codec and the key check file.

Keyring. Lines of `id:base64key` (a file, or an environment variable where commas may stand for newlines); blank
lines and `#` comments are ignored. Each key is 32 random bytes (AES-256). The *last* key is the current one: new
records are sealed with it; every other key only opens old records. `id` is 1-64 of `A-Za-z0-9_.-`.

Sealed record (ENCRYPTED_MAGIC, see record.py). Same layout as a plain record, with subject_len = props_len = 0 and
the body replaced by an envelope:

```
key_id_len u8, key_id (ASCII), nonce (12 bytes), AES-256-GCM(plaintext) with its 16-byte tag
plaintext = subject_len u32, props_len u32, subject, properties (as in a plain record), body
```

So topic, tag, message group, keys and destinations stay in clear (routing, lookup by key, recovery of the queue
indexes work without the key), and subject, properties and body are sealed.

Nonces are 96 random bits from the OS (os.urandom) per record. A counter would need to be persisted and could repeat
after a crash that loses its last value (kill -9 between writing a record and saving the counter, or a restored
backup), and a repeated nonce breaks GCM; random nonces need no state. Their limit is the birthday bound: NIST
SP 800-38D allows 2^32 records per key with random nonces, so rotate keys well before four billion records.

Associated data (authenticated, not encrypted) binds a record to where it is: the commit offset (8 bytes), the
magic, and every clear byte of the record after the CRC — flags, born/store/deliver/expiry times, topic, tag,
group, keys, every destination (queue topic, queue id, queue offset), the key id and the nonce. A record copied to
another offset, another queue or queue position, or edited in any clear field fails its tag check, which the reader
reports like a CRC failure (CorruptRecord), never as a message.

Key check file (`encryption_keys` in the data directory, JSON, no secrets): every key that has been current, with
the commit offset from which it sealed records and a check value (a GCM tag over a fixed text). At open, every key
whose records may still be in the log must be in the keyring and pass its check, or the store refuses to open
(EncryptionKeyError, a clear message); a store that has sealed records cannot be opened without a keyring.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from tidegate.core.errors import CorruptRecord, MessageTooLarge, StoreError
from tidegate.core.model import Message
from tidegate.core.storage.layout import write_atomically
from tidegate.core.storage.record import (
    _ENCODING,
    _ERRORS,
    ENCRYPTED_MAGIC,
    PREFIX,
    PREFIX_SIZE,
    Destination,
    _general_head,
    _read_strings,
    _strings,
    check_record,
    decode_record,
)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHECK_FILE_VERSION = 1
_CHECK_TEXT = b"tidegate encryption key check"
_AAD_HEAD = struct.Struct("<QI")  # commit offset, magic
_SPLIT = struct.Struct("<II")  # subject_len, props_len at the start of the plaintext


class EncryptionKeyError(StoreError):
    """The keyring is unusable (unreadable, malformed, too open) or does not match the data: the store will not open."""


def _aesgcm(key: bytes) -> object:
    # Imported here: a broker without encryption at rest never loads the cryptography package for it.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


class Keyring:
    """Keys by id; `current` seals new records, all of them open old ones."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise EncryptionKeyError(f"current key {current!r} is not in the keyring")
        self.keys = dict(keys)
        self.current = current
        self._ciphers: dict[str, object] = {}

    def __repr__(self) -> str:  # never the key bytes
        return f"Keyring(ids={list(self.keys)}, current={self.current!r})"

    @classmethod
    def parse(cls, text: str, source: str) -> Keyring:
        """Parse `id:base64key` lines (or comma-separated entries); the last key is current."""
        keys: dict[str, bytes] = {}
        current = ""
        for number, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key_id, sep, encoded = line.partition(":")
            key_id = key_id.strip()
            if not sep or not KEY_ID.fullmatch(key_id):
                raise EncryptionKeyError(f"{source}, entry {number}: expected id:base64key with an id of 1-64 of "
                                         "A-Z a-z 0-9 _ . -")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise EncryptionKeyError(f"{source}, key {key_id!r}: not valid base64") from None
            if len(key) != KEY_BYTES:
                raise EncryptionKeyError(f"{source}, key {key_id!r}: {len(key)} bytes, AES-256 needs {KEY_BYTES}")
            if key_id in keys:
                raise EncryptionKeyError(f"{source}: key id {key_id!r} appears twice")
            keys[key_id] = key
            current = key_id
        if not keys:
            raise EncryptionKeyError(f"{source}: no key (expected lines of id:base64key)")
        return cls(keys, current)

    def cipher(self, key_id: str) -> object:
        """The AES-GCM object of a key (built once per key)."""
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            cipher = self._ciphers[key_id] = _aesgcm(self.keys[key_id])
        return cipher


def generate_key() -> bytes:
    return os.urandom(KEY_BYTES)


def format_key_line(key_id: str, key: bytes) -> str:
    return f"{key_id}:{base64.b64encode(key).decode('ascii')}"


def check_key_file_mode(path: Path) -> None:
    """Refuse a key file that group or others may read or write (like ssh with private keys)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise EncryptionKeyError(f"cannot read the encryption key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise EncryptionKeyError(f"the encryption key file {path} is not a regular file")
    if mode & 0o077:
        raise EncryptionKeyError(f"the encryption key file {path} is accessible by group or others (mode "
                                 f"{stat.S_IMODE(mode):04o}): run chmod 600 {path}")


def load_keyring(key_file: str = "", key_env: str = "", environ: Mapping[str, str] | None = None) -> Keyring | None:
    """The keyring from a file path or the name of an environment variable (at most one), or None when neither is
    given (encryption at rest is off). Raises EncryptionKeyError with a message an operator can act on."""
    if key_file and key_env:
        raise EncryptionKeyError("set either storage.encryption_key_file or storage.encryption_key_env, not both")
    if key_file:
        path = Path(os.path.expanduser(key_file))
        check_key_file_mode(path)
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise EncryptionKeyError(f"cannot read the encryption key file {path}: {exc}") from None
        return Keyring.parse(text, f"encryption key file {path}")
    if key_env:
        value = (os.environ if environ is None else environ).get(key_env)
        if not value:
            raise EncryptionKeyError(f"storage.encryption_key_env names ${key_env}, which is not set or empty")
        return Keyring.parse(value, f"environment variable ${key_env}")
    return None


# --- the record codec
def encode_sealed_record(message: Message, store_ts: int, destinations: Sequence[Destination], keyring: Keyring,
                         place: Callable[[int], int]) -> bytes:
    """An encrypted record. `place(length)` says at which commit offset the record will be written (bound in the
    associated data); it is called once, with the record's final length."""
    # The clear part: a plain record without subject, properties and body, re-stamped below with the sealed sizes.
    clear_message = Message(topic=message.topic, body=b"", tag=message.tag, keys=message.keys,
                            born_ts=message.born_ts, deliver_at=message.deliver_at, expires_at=message.expires_at,
                            group=message.group, flags=message.flags)
    subject = message.subject.encode(_ENCODING, _ERRORS) if message.subject else b""
    props = _strings([text for pair in message.properties.items() for text in pair]) if message.properties else b""
    plaintext = b"".join((_SPLIT.pack(len(subject), len(props)), subject, props, message.body))
    key_id = keyring.current.encode("ascii")
    nonce = os.urandom(NONCE_BYTES)
    envelope_head = bytes((len(key_id),)) + key_id + nonce
    envelope_len = len(envelope_head) + len(plaintext) + TAG_BYTES
    try:
        head = _general_head(clear_message, store_ts, destinations, envelope_len) + envelope_head
    except struct.error as exc:
        raise MessageTooLarge(f"a message field does not fit its length field in the record: {exc}") from None
    length = PREFIX_SIZE + len(head) - len(envelope_head) + envelope_len
    offset = place(length)
    sealed = keyring.cipher(keyring.current).encrypt(  # type: ignore[attr-defined]
        nonce, plaintext, _AAD_HEAD.pack(offset, ENCRYPTED_MAGIC) + head)
    tail = head + sealed
    return PREFIX.pack(length, ENCRYPTED_MAGIC, crc32c(tail)) + tail


def decode_sealed_record(buf: bytes, offset: int, keyring: Keyring) -> Message:
    """Open an encrypted record read at commit `offset`. Raises CorruptRecord on a bad CRC, an unknown key id or a
    failed tag check (tampering, a moved record, a wrong key): never returns unauthenticated data."""
    from cryptography.exceptions import InvalidTag

    magic, length = check_record(buf)
    if magic != ENCRYPTED_MAGIC or length != len(buf):
        raise CorruptRecord("expected one whole encrypted record")
    message = decode_record(buf, verify=False).message
    envelope = bytes(message.body)  # no copy while decode_record returns bytes
    try:
        id_len = envelope[0]
        key_id = envelope[1:1 + id_len].decode("ascii")
        nonce = envelope[1 + id_len:1 + id_len + NONCE_BYTES]
    except (IndexError, UnicodeDecodeError):
        raise CorruptRecord("undecodable encrypted record envelope") from None
    head_len = 1 + id_len + NONCE_BYTES
    if len(envelope) < head_len + TAG_BYTES:
        raise CorruptRecord("encrypted record envelope cut short")
    if key_id not in keyring.keys:
        raise CorruptRecord(f"record encrypted with key {key_id!r}, which is not in the keyring")
    head_end = len(buf) - len(envelope) + head_len
    aad = _AAD_HEAD.pack(offset, ENCRYPTED_MAGIC) + buf[PREFIX_SIZE:head_end]
    try:
        plaintext = keyring.cipher(key_id).decrypt(nonce, envelope[head_len:], aad)  # type: ignore[attr-defined]
    except InvalidTag:
        raise CorruptRecord(f"encrypted record failed authentication (key {key_id!r}): tampered, moved or "
                            "sealed with another key of that id") from None
    try:
        subject_len, props_len = _SPLIT.unpack_from(plaintext, 0)
        pos = _SPLIT.size
        message.subject = plaintext[pos:pos + subject_len].decode(_ENCODING, _ERRORS)
        pos += subject_len
        if props_len:
            flat = _read_strings(plaintext, pos, pos + props_len)
            if len(flat) % 2:
                raise CorruptRecord("properties hold an odd number of strings")
            message.properties = dict(zip(flat[0::2], flat[1::2], strict=True))
        pos += props_len
        if pos > len(plaintext):
            raise CorruptRecord("sealed fields do not add up")
        message.body = plaintext[pos:]
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptRecord(f"undecodable encrypted record: {exc}") from None
    return message


# --- the key check file
@dataclass(frozen=True, slots=True)
class KeyUse:
    key_id: str
    since: int  # commit offset from which this key sealed new records
    check: str  # base64(nonce + GCM output of the check text)


def _check_value(keyring: Keyring, key_id: str) -> str:
    nonce = os.urandom(NONCE_BYTES)
    sealed = keyring.cipher(key_id).encrypt(nonce, _CHECK_TEXT, key_id.encode("ascii"))  # type: ignore[attr-defined]
    return base64.b64encode(nonce + sealed).decode("ascii")


def _passes_check(keyring: Keyring, use: KeyUse) -> bool:
    from cryptography.exceptions import InvalidTag

    try:
        raw = base64.b64decode(use.check, validate=True)
        return keyring.cipher(use.key_id).decrypt(  # type: ignore[attr-defined]
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], use.key_id.encode("ascii")) == _CHECK_TEXT
    except (InvalidTag, binascii.Error, ValueError):
        return False


def read_key_uses(path: Path) -> list[KeyUse]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise EncryptionKeyError(f"cannot read the key check file {path}: {exc}") from None
    try:
        if data["version"] != CHECK_FILE_VERSION:
            raise EncryptionKeyError(f"key check file {path} has unknown version {data['version']!r}")
        return [KeyUse(str(u["id"]), int(u["since"]), str(u["check"])) for u in data["keys"]]
    except (KeyError, TypeError, ValueError):
        raise EncryptionKeyError(f"key check file {path} is malformed") from None


def key_uses_json(uses: Sequence[KeyUse]) -> bytes:
    body = {"version": CHECK_FILE_VERSION,
            "keys": [{"id": u.key_id, "since": u.since, "check": u.check} for u in uses]}
    return (json.dumps(body, indent=1) + "\n").encode("utf-8")


def verify_keyring(uses: Sequence[KeyUse], keyring: Keyring | None, log_min_offset: int, log_end_offset: int,
                   path: Path) -> None:
    """Refuse (EncryptionKeyError) unless every key whose sealed records may still be in the log is usable.

    A key's records lie in [its since, the next key's since); they may remain while that end is above the log's
    first offset (retention deleted everything below it) and the log is not empty beyond its since."""
    for i, use in enumerate(uses):
        end = uses[i + 1].since if i + 1 < len(uses) else log_end_offset
        if end <= log_min_offset or use.since >= log_end_offset or end <= use.since:
            continue  # retention removed its records, or it never sealed one
        if keyring is None:
            raise EncryptionKeyError(
                f"the commit log holds encrypted records (key {use.key_id!r}, from offset {use.since}) but no "
                "encryption key is configured: set storage.encryption_key_file or storage.encryption_key_env")
        if use.key_id not in keyring.keys:
            raise EncryptionKeyError(
                f"the commit log holds records encrypted with key {use.key_id!r} (from offset {use.since}), which "
                f"the keyring does not contain: add that key back (keys listed in {path})")
        if not _passes_check(keyring, use):
            raise EncryptionKeyError(
                f"wrong encryption key: key {use.key_id!r} in the keyring is not the key that encrypted the "
                "records with that id")


def record_current_key(uses: list[KeyUse], keyring: Keyring, end_offset: int) -> list[KeyUse] | None:
    """The key uses with the keyring's current key appended when it is not already the newest, else None."""
    if uses and uses[-1].key_id == keyring.current:
        if _passes_check(keyring, uses[-1]):
            return None
        # verify_keyring would have refused a key that sealed records: this entry sealed none, so replace it
        uses = uses[:-1]
    return [*uses, KeyUse(keyring.current, end_offset, _check_value(keyring, keyring.current))]



# --- rotation
def next_key_id(existing: Sequence[str]) -> str:
    """`k<n>`, one above the highest `k<number>` id in the keyring (k1 for an empty one)."""
    numbers = [int(key_id[1:]) for key_id in existing if re.fullmatch(r"k[0-9]{1,9}", key_id)]
    n = max(numbers, default=0) + 1
    while f"k{n}" in existing:
        n += 1
    return f"k{n}"


def choose_key_id(existing: Sequence[str], wanted: str, where: str) -> str:
    """The id of a new key: `wanted`, or the next free `k<n>`; refused when malformed or already in `where`."""
    key_id = wanted or next_key_id(list(existing))
    if not KEY_ID.fullmatch(key_id):
        raise EncryptionKeyError(f"key id {key_id!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    if key_id in existing:
        raise EncryptionKeyError(f"key id {key_id!r} is already in {where}")
    return key_id


def add_key_to_file(path: Path, key_id: str = "") -> str:
    """Append a new random key to the keyring file (created, mode 0600, when missing), making it the current key;
    return its id. The file is replaced atomically and keeps mode 0600; existing keys are kept (old records need
    them). Raises EncryptionKeyError for a file that is too open, malformed, or an id already taken."""
    existing: list[str] = []
    text = ""
    if path.exists():
        check_key_file_mode(path)
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise EncryptionKeyError(f"cannot read the encryption key file {path}: {exc}") from None
        existing = list(Keyring.parse(text, f"encryption key file {path}").keys)
    key_id = choose_key_id(existing, key_id, str(path))
    if text and not text.endswith("\n"):
        text += "\n"
    data = (text + format_key_line(key_id, generate_key()) + "\n").encode("ascii")
    try:
        # O_CREAT's mode (0600) does not apply to a temporary file a crash left behind: start from none
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        write_atomically(path, data)
    except OSError as exc:
        raise EncryptionKeyError(f"cannot write the encryption key file {path}: {exc.strerror or exc}") from None
    return key_id
