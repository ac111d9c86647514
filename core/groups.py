"""Consumer groups: who they are and what they look like.

Two sources describe a group: `states` holds the groups consuming in this process (members, per-message
progress); the metadata rows remember every group ever seen (mode, ack mode, topics), including pull-only groups
that only committed offsets. The rows are read once at start and kept in step on every write, so describing a
group or listing all of them never rereads the metadata table (that made /metrics quadratic in the group count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidegate.core.api import AckMode, ConsumeMode, GroupInfo, QueueProgress
from tidegate.core.consumers import GroupState
from tidegate.core.errors import GroupNotFound, InvalidName, TidegateError
from tidegate.core.model import DLQ_PREFIX, QueueRef
from tidegate.core.offsets import OffsetBook
from tidegate.core.storage.api import MessageStore, MetadataStore
from tidegate.core.topics import MAX_ENCODED_TOPIC_BYTES, TopicRegistry, check_encoded_topic, dead_letter_topic
from tidegate.core.visibility import Visibility

_DLQ_PREFIX_ESCAPES = DLQ_PREFIX.count("%")


class GroupRegistry:
    def __init__(self, metadata: MetadataStore, store: MessageStore, topics: TopicRegistry, offsets: OffsetBook,
                 visibility: Visibility, now_ms: Callable[[], int]) -> None:
        self._meta = metadata
        self._store = store
        self._topics = topics
        self._offsets = offsets
        self._visibility = visibility
        self._now_ms = now_ms
        self.states: dict[str, GroupState] = {}
        self._rows: dict[str, dict[str, Any]] = {row["name"]: row for row in metadata.get_groups()}

    def known(self, group: str) -> bool:
        """Whether `group` is consuming in this process or was ever stored (its name was validated then)."""
        return group in self.states or group in self._rows

    def join(self, group: str, topic: str, mode: ConsumeMode, ack: AckMode) -> GroupState:
        """The state of `group` consuming `topic` in `mode`/`ack` (created if new); raises if members online
        consume in another mode. A group with nobody online takes the mode of whoever joins."""
        state = self.states.get(group)
        if state is None:
            _check_dead_letter_name(group)
            state = self.states[group] = GroupState(group, mode, ack)
        elif state.subscriptions() and (state.mode, state.ack) != (mode, ack):
            raise TidegateError(f"group {group!r} is consuming in {state.mode.value}/{state.ack.value} mode; "
                                f"a member cannot join in {mode.value}/{ack.value} mode")
        else:
            state.mode, state.ack = mode, ack
        state.topics.add(topic)
        self._persist(group, mode, ack, state.topics)
        return state

    def note_topic(self, group: str, topic: str) -> None:
        """`group` committed an offset on `topic`: remember the topic (this is how a pull-only group becomes known)."""
        state = self.states.get(group)
        if state is not None:
            if topic not in state.topics:
                state.topics.add(topic)
                self._persist(group, state.mode, state.ack, state.topics)
            return
        row = self._rows.get(group)
        if row is None:
            self._persist(group, ConsumeMode.CLUSTERING, AckMode.OFFSET, {topic})
            return
        topics = set((row.get("extra") or {}).get("topics", []))
        if topic not in topics:
            self._persist(group, ConsumeMode(row["mode"]), AckMode(row["ack"]), topics | {topic})

    def _persist(self, group: str, mode: ConsumeMode, ack: AckMode, topics: set[str]) -> None:
        old = self._rows.get(group)
        # the modes are StrEnums: compared with the stored strings as they are, without `.value` (a descriptor)
        if old is not None and old["mode"] == mode and old["ack"] == ack:
            stored = (old.get("extra") or {}).get("topics")
            if stored is not None and len(stored) == len(topics) and topics.issuperset(stored):
                return  # unchanged: members coming and going (and every get) cost no metadata write
        extra = {"topics": sorted(topics)}
        if old is not None and (old["mode"], old["ack"], old.get("extra")) == (mode.value, ack.value, extra):
            return
        row = {"name": group, "mode": mode.value, "ack": ack.value,
               "created_ts": old["created_ts"] if old is not None else self._now_ms(), "extra": extra}
        self._meta.put_group(row)
        self._rows[group] = row

    def describe(self, group: str) -> tuple[ConsumeMode, AckMode, list[str]]:
        state = self.states.get(group)
        if state is not None:
            return state.mode, state.ack, sorted(state.topics)
        row = self._rows.get(group)
        if row is None:
            raise GroupNotFound(f"consumer group {group!r} does not exist")
        return ConsumeMode(row["mode"]), AckMode(row["ack"]), list((row.get("extra") or {}).get("topics", []))

    def info(self, group: str) -> GroupInfo:
        mode, ack, topics = self.describe(group)
        state = self.states.get(group)
        members = sorted({s.client_id for s in state.subscriptions()}) if state else []
        info = GroupInfo(name=group, mode=mode, ack=ack, topics=topics, members=members)
        owners: dict[QueueRef, str] = {}
        if state is not None:
            if mode is ConsumeMode.CLUSTERING and ack is AckMode.OFFSET:
                for sub in state.subscriptions():
                    for q in sub.assigned:
                        owners[q] = sub.client_id
            info.inflight = sum(len(pq.inflight) for pq in state.pop.values())
        keys = [group] if mode is ConsumeMode.CLUSTERING else self._offsets.member_keys(group) or [group]
        configs = self._topics.configs
        for topic in topics:
            if topic not in configs:
                continue
            for q in self._topics.queues_of(topic):
                low, high = self._store.queue_bounds(q).min_offset, self._visibility.visible_max(q)
                for key in keys:
                    committed = self._offsets.of(key).get(q, high)
                    owner = owners.get(q, key.split("@", 1)[1] if "@" in key else "")
                    info.progress.append(QueueProgress(q, committed, high, low, owner))
        return info

    def names(self) -> list[str]:
        return sorted(self._rows.keys() | self.states.keys())

    def forget(self, group: str) -> None:
        """Delete the group (its offsets are the caller's: OffsetBook.forget_group)."""
        self.describe(group)
        state = self.states.get(group)
        if state is not None and state.subscriptions():
            raise TidegateError(f"group {group!r} has online members; stop them first")
        self.states.pop(group, None)
        self._rows.pop(group, None)
        self._meta.delete_group(group)


def _check_dead_letter_name(group: str) -> None:
    """A consuming group may dead-letter: refuse it up front if its dead-letter topic could not be created (a name
    dense in `%` escapes past the file system's limit), rather than failing at the first dead letter. A name whose
    dead-letter topic fits even untruncated (prefix, name, 2 bytes more per `%`) passes without building that topic:
    every group a resumed MQTT session joins (`%MQTT%<client id>`) is checked with one count."""
    if len(DLQ_PREFIX) + len(group) + 2 * (_DLQ_PREFIX_ESCAPES + group.count("%")) <= MAX_ENCODED_TOPIC_BYTES:
        return
    try:
        check_encoded_topic(dead_letter_topic(group))
    except InvalidName:
        raise InvalidName(f"invalid group name {group[:40]!r}...: its dead-letter topic would be too long once "
                          "escaped for the store (every '%' takes 3 bytes)") from None
