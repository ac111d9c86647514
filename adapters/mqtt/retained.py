"""Retained messages: an adapter concept kept in adapter state (namespace `mqtt.retained`), never in the core.

One entry per MQTT topic name: the core message that was retained (body base64, properties, flags, expiry), so a
retained message survives restarts and is delivered with the same fields as a live one. An empty payload clears it.
All entries are also held in memory; a SUBSCRIBE scans them (fine for thousands of retained topics; a trie would be
the next step if that ever shows up in a profile).
"""

from __future__ import annotations

import base64
from typing import Any

from tidegate.core.interfaces import AdapterStateStore
from tidegate.core.model import Message

from .codec import topic_matches

RETAINED_NAMESPACE = "mqtt.retained"


class RetainedStore:
    """Retained messages by MQTT topic name, written through to `rows` (the `mqtt.retained` namespace)."""

    def __init__(self, rows: AdapterStateStore) -> None:
        self._rows = rows
        self._messages: dict[str, Message] = {}
        for topic_name, row in rows.items():
            try:
                self._messages[topic_name] = _from_row(row)
            except (KeyError, TypeError, ValueError):
                continue  # an unreadable row is skipped, not fatal: retained messages are best effort state

    def __len__(self) -> int:
        return len(self._messages)

    def set(self, topic_name: str, message: Message) -> None:
        """Retain `message` under `topic_name`, or clear the entry when the payload is empty."""
        if not message.body:
            if self._messages.pop(topic_name, None) is not None:
                self._rows.delete(topic_name)
            return
        self._messages[topic_name] = message
        self._rows.put(topic_name, _to_row(message))

    def get(self, topic_name: str) -> Message | None:
        return self._messages.get(topic_name)

    def matching(self, topic_filter: str, now_ms: int) -> list[tuple[str, Message]]:
        """Retained messages whose topic name matches `topic_filter` (MQTT rules, incl. `$`); expired ones are
        removed on the way."""
        out: list[tuple[str, Message]] = []
        expired: list[str] = []
        if "+" not in topic_filter and "#" not in topic_filter:
            candidates = [(topic_filter, self._messages[topic_filter])] if topic_filter in self._messages else []
        else:
            candidates = list(self._messages.items())
        for topic_name, message in candidates:
            if message.expires_at and message.expires_at <= now_ms:
                expired.append(topic_name)
                continue
            if topic_matches(topic_filter, topic_name):
                out.append((topic_name, message))
        for topic_name in expired:
            del self._messages[topic_name]
            self._rows.delete(topic_name)
        out.sort(key=lambda item: item[0])
        return out


def _to_row(message: Message) -> dict[str, Any]:
    return {"topic": message.topic, "subject": message.subject, "body": base64.b64encode(message.body).decode("ascii"),
            "properties": dict(message.properties), "flags": int(message.flags), "expires_at": message.expires_at,
            "born_ts": message.born_ts}


def _from_row(row: dict[str, Any]) -> Message:
    return Message(topic=row["topic"], subject=row.get("subject", ""), body=base64.b64decode(row["body"]),
                   properties=dict(row.get("properties") or {}), flags=int(row["flags"]),
                   expires_at=int(row.get("expires_at") or 0), born_ts=int(row.get("born_ts") or 0))
