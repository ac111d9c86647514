"""Adapter state namespaces over the metadata store's key/value table (see core/interfaces.AdapterStateStore)."""

from __future__ import annotations

from typing import Any

from tidegate.core.storage.api import MetadataStore


class MetadataNamespace:
    """Rows of one adapter namespace (`mqtt.sessions`, `amqp.exchanges`, ...), JSON values, written through."""

    __slots__ = ("namespace", "_meta")

    def __init__(self, meta: MetadataStore, namespace: str) -> None:
        self.namespace = namespace
        self._meta = meta

    def items(self) -> list[tuple[str, Any]]:
        return self._meta.kv_items(self.namespace)

    def get(self, key: str) -> Any | None:
        return self._meta.kv_get(self.namespace, key)

    def put(self, key: str, value: Any) -> None:
        self._meta.kv_put(self.namespace, key, value)

    def delete(self, key: str) -> None:
        self._meta.kv_delete(self.namespace, key)

    def apply(self, changes: dict[str, Any]) -> None:
        """Put (value) and delete (None) many rows at once: one transaction where the metadata store offers
        `kv_apply` (SQLite), else one write each. Raises like `put` and writes nothing on error then."""
        kv_apply = getattr(self._meta, "kv_apply", None)
        if kv_apply is not None:
            kv_apply(self.namespace, changes)
            return
        for key, value in changes.items():
            if value is None:
                self._meta.kv_delete(self.namespace, key)
            else:
                self._meta.kv_put(self.namespace, key, value)
