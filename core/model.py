"""The protocol-free core model: messages, topics, queues (RocketMQ vocabulary).

A *topic* is a flat name split into N queues. A message names its topic and optionally a *subject*: a
`/`-separated path below the topic that MQTT and AMQP routing keys map onto (see ../shared/DESIGN.md section 3).
Internal queues (MQTT sessions, AMQP queues, retry and dead-letter queues) are topics too, named with a
`%KIND%` prefix the way RocketMQ names `%RETRY%group` and `%DLQ%group`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntFlag
from typing import NamedTuple

from tidegate.core.errors import InvalidName, MessageTooLarge

TOPIC_NAME = re.compile(r"[A-Za-z0-9_.%-]{1,127}\Z")
GROUP_NAME = re.compile(r"[A-Za-z0-9_.%-]{1,127}\Z")
MAX_SUBJECT_BYTES = 4096
MAX_TAG_BYTES = 255
MAX_PROPERTY_BYTES = 64 * 1024
# Keys feed the key index (one entry per key): bound them so one message cannot write megabytes of index.
MAX_KEYS = 64
MAX_KEY_BYTES = 255
MAX_PROPERTIES = 256
DEFAULT_MAX_BODY = 4 * 1024 * 1024

RETRY_PREFIX = "%RETRY%"
DLQ_PREFIX = "%DLQ%"
# `%KIND%name` is the broker's namespace (RocketMQ style): clients never create or write such topics. Protocol
# encodings of client names never produce it (MQTT escapes `%` as `%25`).
RESERVED_TOPIC = re.compile(r"%[A-Z]+%")


class MessageFlag(IntFlag):
    NONE = 0
    PERSISTENT = 1  # must be on disk before it is acknowledged (under sync flush)
    TRANSIENT = 2  # may be kept in memory only (MQTT QoS 0, AMQP delivery_mode 1)
    # Bits 4 and up are reserved for adapters and never interpreted by the core; bit 4 is the MQTT adapter's QoS 2
    # mark (stored messages carry it: never reuse it).


def validate_topic(name: str) -> str:
    if not isinstance(name, str) or not TOPIC_NAME.match(name):
        raise InvalidName(f"invalid topic name {name!r}: use 1-127 of A-Z a-z 0-9 _ . % -")
    return name


def is_reserved_topic(name: str) -> bool:
    """Named in the broker's own `%KIND%` namespace (session queues, dead-letter and retry topics)."""
    return RESERVED_TOPIC.match(name) is not None


def is_private_topic(name: str) -> bool:
    """Reserved for one adapter's own use (MQTT session queues, AMQP queues): only the session that owns it, or the
    broker itself, may read it. Dead-letter and retry topics are reserved but readable like any topic."""
    return RESERVED_TOPIC.match(name) is not None and not name.startswith((DLQ_PREFIX, RETRY_PREFIX))


def validate_group(name: str) -> str:
    if not isinstance(name, str) or not GROUP_NAME.match(name):
        raise InvalidName(f"invalid group name {name!r}: use 1-127 of A-Z a-z 0-9 _ . % -")
    return name


def validate_subject(subject: str) -> str:
    """A subject is a `/`-separated path; levels may be empty (MQTT allows `a//b`) but carry no wildcards."""
    if len(subject.encode("utf-8", "surrogatepass")) > MAX_SUBJECT_BYTES:
        raise InvalidName(f"subject longer than {MAX_SUBJECT_BYTES} bytes")
    if "+" in subject or "#" in subject or "\x00" in subject:
        raise InvalidName(f"invalid subject {subject!r}: wildcards and NUL are not allowed in a subject")
    return subject


@dataclass(slots=True)
class Message:
    """One message as producers give it and consumers receive it.

    The broker fills the system fields (`msg_id`, `store_ts`) on append; the rest travels unchanged between
    protocols. `properties` are str -> str (MQTT user properties, AMQP headers, native properties).
    """

    topic: str
    body: bytes = b""
    subject: str = ""
    tag: str = ""
    keys: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    born_ts: int = 0  # ms since epoch, set by the producer (the broker fills it when 0)
    deliver_at: int = 0  # ms since epoch; 0 = deliver now (delayed messages)
    expires_at: int = 0  # ms since epoch; 0 = never expires
    group: str = ""  # FIFO message group
    flags: int = MessageFlag.PERSISTENT
    # system fields, set by the store
    msg_id: str = ""
    store_ts: int = 0

    @property
    def full_name(self) -> str:
        """The topic joined with its subject, as MQTT spells it: `T/a/b`."""
        return f"{self.topic}/{self.subject}" if self.subject else self.topic

    def validate(self, max_body: int = DEFAULT_MAX_BODY, check_topic: bool = True) -> Message:
        """Raise a TidegateError for anything a store or another protocol could not carry.

        `check_topic=False` skips the topic-name check for callers that already know the topic exists.
        """
        if check_topic:
            validate_topic(self.topic)
        if not isinstance(self.body, bytes):
            raise InvalidName("a message body must be bytes")
        if self.subject:
            validate_subject(self.subject)
        if len(self.body) > max_body:
            raise MessageTooLarge(f"message body is {len(self.body)} bytes; the maximum is {max_body}")
        if self.tag:
            if len(self.tag.encode("utf-8", "surrogatepass")) > MAX_TAG_BYTES:
                raise InvalidName(f"tag longer than {MAX_TAG_BYTES} bytes")
            if "||" in self.tag:
                raise InvalidName("a tag may not contain '||'")
        if self.keys:
            if len(self.keys) > MAX_KEYS:
                raise InvalidName(f"a message has at most {MAX_KEYS} keys, not {len(self.keys)}")
            for key in self.keys:
                if not isinstance(key, str) or not key or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
                    raise InvalidName(f"a message key is a non-empty string of at most {MAX_KEY_BYTES} bytes")
        if not self.properties:
            return self
        if len(self.properties) > MAX_PROPERTIES:
            raise InvalidName(f"a message has at most {MAX_PROPERTIES} properties, not {len(self.properties)}")
        size = 0
        for k, v in self.properties.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidName("message properties must map strings to strings")
            size += len(k) + len(v)
        if size > MAX_PROPERTY_BYTES:
            raise MessageTooLarge(f"message properties exceed {MAX_PROPERTY_BYTES} bytes")
        return self


class QueueRef(NamedTuple):
    """One queue of a topic: the unit of ordering, of index files and of consumer assignment."""

    topic: str
    queue_id: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.queue_id}"


# The value types below are NamedTuples, not dataclasses: they are built once per message on the hot path and
# tuple construction is several times cheaper than a frozen dataclass __init__.
class IndexEntry(NamedTuple):
    """One per-queue index entry: where in the commit log a message of this queue lives."""

    queue_offset: int
    commit_offset: int
    size: int
    tag_hash: int


class AppendResult(NamedTuple):
    """Where one appended message landed: its id, commit-log offset and its offset in every destination queue."""

    msg_id: str
    commit_offset: int
    size: int
    store_ts: int
    queue_offsets: tuple[int, ...]  # aligned with the destinations passed to append


@dataclass(slots=True, frozen=True)
class TopicConfig:
    name: str
    queues: int = 4
    perm: str = "rw"  # r, w or rw: whether producers may send / consumers may read
    retention_ms: int = 0  # 0 = broker default
    internal: bool = False  # created by an adapter or the broker (sessions, queues, retry, DLQ)
    created_ts: int = 0


def tag_hash(tag: str) -> int:
    """Stable 63-bit hash of a tag, stored in index entries so tag filters skip messages without reading them."""
    if not tag:
        return 0
    h = 1469598103934665603  # FNV-1a 64
    for b in tag.encode("utf-8", "surrogatepass"):
        h ^= b
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
