"""The group join of every resumed session: the dead-letter name check and the unchanged-row check take their
short ways only where they give the same answer as the long ones (core/groups.py)."""

from __future__ import annotations

import pytest

from tidegate.core import groups as groups_module
from tidegate.core.api import AckMode, ConsumeMode
from tidegate.core.errors import InvalidName
from tidegate.core.topics import MAX_ENCODED_TOPIC_BYTES, check_encoded_topic, dead_letter_topic, encoded_topic_length


def _full_check_passes(name: str) -> bool:
    try:
        check_encoded_topic(dead_letter_topic(name))
    except InvalidName:
        return False
    return True


@pytest.mark.parametrize("name", ["a" * 127, "." + "b" * 126, "x", "%MQTT%client-1", "%MQTT%" + "c" * 121,
                                  "%" * 40 + "d" * 87, "%" * 76, "%" * 77, "%" * 80, "%" * 120, "a%b" * 42])
def test_the_dead_letter_name_check_agrees_with_the_full_check(name: str) -> None:
    """The short way (a bound on the untruncated name) and building the dead-letter topic give the same answer,
    on both sides of the limit: near 255 bytes the full check decides."""
    if _full_check_passes(name):
        groups_module._check_dead_letter_name(name)
    else:
        with pytest.raises(InvalidName, match="dead-letter topic would be too long"):
            groups_module._check_dead_letter_name(name)


def test_every_resumed_session_group_takes_the_short_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MQTT session's group (`%MQTT%<client id>`, ids up to 23 characters and well beyond) never builds its
    dead-letter topic to be checked."""
    monkeypatch.setattr(groups_module, "check_encoded_topic", lambda name: pytest.fail("full check ran"))
    groups_module._check_dead_letter_name("%MQTT%" + "c" * 100)
    assert encoded_topic_length(dead_letter_topic("%MQTT%" + "c" * 100)) <= MAX_ENCODED_TOPIC_BYTES


class _Rows:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.puts: list[dict] = []

    def get_groups(self) -> list[dict]:
        return self.rows

    def put_group(self, row: dict) -> None:
        self.puts.append(row)


def _registry(rows: list[dict]) -> tuple[groups_module.GroupRegistry, _Rows]:
    meta = _Rows(rows)
    return groups_module.GroupRegistry(meta, None, None, None, None, lambda: 1000), meta  # type: ignore[arg-type]


def test_joining_a_stored_group_as_stored_writes_no_row() -> None:
    registry, meta = _registry([{"name": "g", "mode": "clustering", "ack": "message", "created_ts": 5,
                                 "extra": {"topics": ["t"]}}])
    registry.join("g", "t", ConsumeMode.CLUSTERING, AckMode.MESSAGE)
    assert meta.puts == []


def test_joining_in_another_mode_or_on_another_topic_rewrites_the_row() -> None:
    stored = {"name": "g", "mode": "clustering", "ack": "message", "created_ts": 5, "extra": {"topics": ["t"]}}
    registry, meta = _registry([dict(stored)])
    registry.join("g", "t", ConsumeMode.CLUSTERING, AckMode.OFFSET)
    assert meta.puts == [{"name": "g", "mode": "clustering", "ack": "offset", "created_ts": 5,
                          "extra": {"topics": ["t"]}}]
    registry, meta = _registry([dict(stored)])
    registry.join("g", "u", ConsumeMode.CLUSTERING, AckMode.MESSAGE)
    assert len(meta.puts) == 1 and "u" in meta.puts[0]["extra"]["topics"]
