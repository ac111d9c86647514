"""The core's tunables (the gateway fills them from the `broker` section of its configuration)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BrokerConfig:
    auto_create_topics: bool = True
    default_queues: int = 4
    max_body: int = 4 * 1024 * 1024
    new_group_start: str = "latest"  # "earliest" | "latest": where a group with no committed offset begins
    invisible_ms: int = 30_000  # default invisibility timeout in MESSAGE mode
    max_attempts: int = 16  # deliveries before a message goes to %DLQ%group
    retention_ms: int = 72 * 3600 * 1000
    retention_bytes: int = 0  # 0 = no size limit
    # Recent messages kept decoded for delivery, by bytes (record size + a small per-message overhead); a message
    # above a quarter of it is not cached; 0 = no cache.
    message_cache_bytes: int = 64 * 1024 * 1024
