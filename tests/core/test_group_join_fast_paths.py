"""The group join of every resumed session: the dead-letter name check and the unchanged-row check take their
short ways only where they give the same answer as the long ones (core/groups.py)."""

from __future__ import annotations

import pytest

from tidegate.core import groups as groups_module
from tidegate.core.api import AckMode, ConsumeMode
from tidegate.core.errors import InvalidName
from tidegate.core.topics import MAX_ENCODED_TOPIC_BYTES, check_encoded_topic, dead_letter_topic, encoded_topic_length


@pytest.mark.parametrize("name", ["a" * 127, "." + "b" * 126, "x", "mqtt.session-" + "c" * 110])
def test_a_group_name_without_percent_always_fits_its_dead_letter_topic(name: str) -> None:
    """The check is skipped for names without `%`: the full check agrees for the longest such names."""
    assert encoded_topic_length(dead_letter_topic(name)) <= MAX_ENCODED_TOPIC_BYTES
    check_encoded_topic(dead_letter_topic(name))
    groups_module._check_dead_letter_name(name)


def test_a_group_name_dense_in_percent_is_still_refused() -> None:
    with pytest.raises(InvalidName, match="dead-letter topic would be too long"):
        groups_module._check_dead_letter_name("%" * 120)
    groups_module._check_dead_letter_name("a%b")  # a few escapes fit


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
