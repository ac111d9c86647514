"""Bindings: persisted routes from a pattern over full names (`topic/subject`) to extra destination queues.

The trie (core/routing.py) answers lookups; this module keeps it and the metadata rows in step.
"""

from __future__ import annotations

from collections.abc import Callable

from tidegate.core.model import QueueRef
from tidegate.core.routing import SubscriptionTrie, validate_pattern
from tidegate.core.storage.api import MetadataStore

BINDINGS_NS = "core.bindings"


class Bindings:
    def __init__(self, metadata: MetadataStore, check_destination: Callable[[QueueRef], object]) -> None:
        self._meta = metadata
        self._check_destination = check_destination  # raises when the queue does not exist
        self.trie: SubscriptionTrie[QueueRef] = SubscriptionTrie()  # the publish path matches against it directly
        for _, value in metadata.kv_items(BINDINGS_NS):
            pattern, topic, qid = value
            self.trie.add(pattern, QueueRef(topic, int(qid)))

    def bind(self, pattern: str, destination: QueueRef) -> None:
        """Add and persist the route (idempotent); raises on a bad pattern or a missing destination queue."""
        validate_pattern(pattern)
        self._check_destination(destination)
        if self.trie.add(pattern, destination):
            self._meta.kv_put(BINDINGS_NS, _key(pattern, destination),
                              [pattern, destination.topic, destination.queue_id])

    def unbind(self, pattern: str, destination: QueueRef) -> None:
        if self.trie.remove(pattern, destination):
            self._meta.kv_delete(BINDINGS_NS, _key(pattern, destination))

    def unbind_topic(self, topic: str) -> None:
        """Remove every binding whose destination is a queue of `topic`."""
        for pattern, dest in list(self.trie.items()):
            if dest.topic == topic:
                self.unbind(pattern, dest)

    def list(self, destination_topic: str | None) -> list[tuple[str, QueueRef]]:
        return sorted(((p, d) for p, d in self.trie.items()
                       if destination_topic is None or d.topic == destination_topic), key=lambda x: (x[0], str(x[1])))

    def route(self, full_name: str) -> frozenset[QueueRef]:
        return self.trie.match(full_name)


def _key(pattern: str, destination: QueueRef) -> str:
    return f"{pattern}\x00{destination.topic}\x00{destination.queue_id}"
