"""Topic configurations: the in-memory map every hot path reads, persisted to metadata on each change.

Name bounds: a topic names a directory of the store (`index/<escaped topic>/`, core/storage/layout.py escapes `%`
as `%25` and a leading `.` as `%2E`), and file systems refuse names over 255 bytes (ENAMETOOLONG). The topic-name
rule allows 127 characters, so a name dense in `%` passes it and failed deep in the store, as an internal error,
after its configuration was saved. `create` refuses such names (InvalidName) before anything is saved, and groups
are refused where the name of their dead-letter topic would not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from tidegate.core.errors import InvalidName, QueueNotFound, TidegateError, TopicExists, TopicNotFound
from tidegate.core.model import DLQ_PREFIX, QueueRef, TopicConfig, validate_topic
from tidegate.core.storage.api import MetadataStore

MAX_QUEUES = 1024
MAX_ENCODED_TOPIC_BYTES = 255  # NAME_MAX of ext4, xfs, btrfs, tmpfs and APFS


def encoded_topic_length(name: str) -> int:
    """Bytes of the directory name the store gives topic `name` (the topic alphabet is ASCII, one byte each)."""
    return len(name) + 2 * name.count("%") + (2 if name.startswith(".") else 0)


def check_encoded_topic(name: str) -> str:
    """Raise InvalidName unless the store can name a directory after topic `name`."""
    length = encoded_topic_length(name)
    if length > MAX_ENCODED_TOPIC_BYTES:
        raise InvalidName(f"invalid topic name {name[:40]!r}...: {length} bytes once escaped for the store "
                          f"(every '%' takes 3), at most {MAX_ENCODED_TOPIC_BYTES}")
    return name


def dead_letter_topic(group: str) -> str:
    """The dead-letter topic of a consumer group (core/acks.py writes to it)."""
    return f"{DLQ_PREFIX}{group}"[:127]


class TopicRegistry:
    def __init__(self, metadata: MetadataStore, default_queues: Callable[[], int], now_ms: Callable[[], int]) -> None:
        self._meta = metadata
        self._default_queues = default_queues
        self._now_ms = now_ms
        # name -> config. The publish path reads this dict directly; it is never replaced, only changed in place.
        self.configs: dict[str, TopicConfig] = {}
        for row in metadata.get_topics():
            cfg = TopicConfig(name=row["name"], queues=int(row["queues"]), perm=row["perm"],
                              retention_ms=int(row.get("retention_ms") or 0), internal=bool(row.get("internal")),
                              created_ts=int(row.get("created_ts") or 0))
            self.configs[cfg.name] = cfg

    def create(self, name: str, queues: int | None, perm: str, retention_ms: int, internal: bool) -> TopicConfig:
        validate_topic(name)
        check_encoded_topic(name)
        if name in self.configs:
            raise TopicExists(f"topic {name!r} already exists")
        cfg = TopicConfig(name=name, queues=self._check_queues(queues), perm=_check_perm(perm),
                          retention_ms=max(0, int(retention_ms)), internal=internal, created_ts=self._now_ms())
        self._save(cfg)
        return cfg

    def update(self, name: str, queues: int | None, perm: str | None, retention_ms: int | None) -> TopicConfig:
        cfg = self.get(name)
        new = replace(
            cfg,
            queues=cfg.queues if queues is None else self._check_queues(queues),
            perm=cfg.perm if perm is None else _check_perm(perm),
            retention_ms=cfg.retention_ms if retention_ms is None else max(0, int(retention_ms)),
        )
        self._save(new)
        return new

    def forget(self, name: str) -> None:
        """Drop the topic's configuration (the caller has already torn down its queues, groups and bindings)."""
        del self.configs[name]
        self._meta.delete_topic(name)

    def get(self, name: str) -> TopicConfig:
        cfg = self.configs.get(name)
        if cfg is None:
            raise TopicNotFound(f"topic {name!r} does not exist")
        return cfg

    def list(self, include_internal: bool) -> list[TopicConfig]:
        return sorted((t for t in self.configs.values() if include_internal or not t.internal), key=lambda t: t.name)

    def queues_of(self, topic: str) -> list[QueueRef]:
        return [QueueRef(topic, i) for i in range(self.get(topic).queues)]

    def check_queue(self, queue: QueueRef) -> TopicConfig:
        """The queue's topic configuration; raises TopicNotFound/QueueNotFound if there is no such queue."""
        cfg = self.get(queue.topic)
        if not 0 <= queue.queue_id < cfg.queues:
            raise QueueNotFound(f"topic {queue.topic!r} has no queue {queue.queue_id} (it has {cfg.queues})")
        return cfg

    def _check_queues(self, queues: int | None) -> int:
        n = self._default_queues() if queues is None else int(queues)
        if not 1 <= n <= MAX_QUEUES:
            raise TidegateError(f"a topic has 1 to {MAX_QUEUES} queues, not {n}")
        return n

    def _save(self, cfg: TopicConfig) -> None:
        self.configs[cfg.name] = cfg
        self._meta.put_topic({"name": cfg.name, "queues": cfg.queues, "perm": cfg.perm,
                              "retention_ms": cfg.retention_ms, "internal": int(cfg.internal),
                              "created_ts": cfg.created_ts})


def _check_perm(perm: str) -> str:
    if perm not in ("r", "w", "rw"):
        raise TidegateError(f"topic permission must be 'r', 'w' or 'rw', not {perm!r}")
    return perm
