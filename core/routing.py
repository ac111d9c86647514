"""Subscription trie: which destinations a message's full name (`topic/sub/ject`) is routed to.

Patterns are `/`-separated levels with `+` (exactly one level) and `#` (this level and everything below, also
zero levels), the MQTT rules that AMQP topic bindings map onto. Lookups walk literal children plus the `+` and `#`
slots (nats-server sublist style) instead of scanning every pattern, and a bounded cache remembers recent results;
any change to the trie clears the cache.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from tidegate.core.errors import InvalidFilter

V = TypeVar("V", bound=Hashable)


class _Node(Generic[V]):
    __slots__ = ("children", "plus", "hash_values", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.plus: _Node[V] | None = None
        self.hash_values: set[V] = set()  # values of patterns ending in `#` at this node
        self.values: set[V] = set()  # values of patterns ending exactly here

    def is_empty(self) -> bool:
        return not (self.children or self.plus or self.hash_values or self.values)


def validate_pattern(pattern: str) -> list[str]:
    if not pattern:
        raise InvalidFilter("empty routing pattern")
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise InvalidFilter(f"invalid pattern {pattern!r}: '#' must be the last level")
        elif level != "+" and ("#" in level or "+" in level):
            raise InvalidFilter(f"invalid pattern {pattern!r}: wildcards must fill a whole level")
    return levels


class SubscriptionTrie(Generic[V]):
    def __init__(self, cache_size: int = 4096) -> None:
        self._root: _Node[V] = _Node()
        self._cache: dict[str, frozenset[V]] = {}
        self._cache_size = cache_size
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, value: V) -> bool:
        """Add a pattern → value; returns False if it was already there."""
        levels = validate_pattern(pattern)
        node = self._root
        for level in levels:
            if level == "#":
                added = value not in node.hash_values
                node.hash_values.add(value)
                break
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                node = node.children.setdefault(level, _Node())
        else:
            added = value not in node.values
            node.values.add(value)
        if added:
            self._count += 1
            self._cache.clear()
        return added

    def remove(self, pattern: str, value: V) -> bool:
        levels = validate_pattern(pattern)
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in levels:
            if level == "#":
                if value not in node.hash_values:
                    return False
                node.hash_values.discard(value)
                break
            nxt = node.plus if level == "+" else node.children.get(level)
            if nxt is None:
                return False
            path.append((node, level))
            node = nxt
        else:
            if value not in node.values:
                return False
            node.values.discard(value)
        # prune empty branches so the trie does not grow with churn
        for parent, level in reversed(path):
            child = parent.plus if level == "+" else parent.children[level]
            if not child.is_empty():
                break
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]
        self._count -= 1
        self._cache.clear()
        return True

    def match(self, name: str) -> frozenset[V]:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        result: set[V] = set()
        self._collect(self._root, name.split("/"), 0, result)
        frozen = frozenset(result)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[name] = frozen
        return frozen

    def _collect(self, node: _Node[V], levels: list[str], i: int, out: set[V]) -> None:
        # `#` matches the parent level too ("a/#" matches "a"), so hash values apply before consuming a level
        if node.hash_values:
            out.update(node.hash_values)
        if i == len(levels):
            out.update(node.values)
            return
        child = node.children.get(levels[i])
        if child is not None:
            self._collect(child, levels, i + 1, out)
        if node.plus is not None:
            self._collect(node.plus, levels, i + 1, out)

    def items(self) -> Iterator[tuple[str, V]]:
        stack: list[tuple[_Node[V], list[str]]] = [(self._root, [])]
        while stack:
            node, prefix = stack.pop()
            for v in node.values:
                yield "/".join(prefix), v
            for v in node.hash_values:
                yield "/".join([*prefix, "#"]), v
            for level, child in node.children.items():
                stack.append((child, [*prefix, level]))
            if node.plus is not None:
                stack.append((node.plus, [*prefix, "+"]))
