"""Stand-ins the limits tests share: a settable clock and the key-value namespace per-user overrides live in."""

from __future__ import annotations


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now


class MemoryKV:
    def __init__(self) -> None:
        self.rows: dict[str, object] = {}

    def items(self):
        return list(self.rows.items())

    def put(self, key, value):
        self.rows[key] = value

    def delete(self, key):
        self.rows.pop(key, None)
