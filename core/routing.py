"""Subscription trie: which destinations a message's full name (`topic/sub/ject`) is routed to.

Patterns are `/`-separated levels. `+` matches exactly one level (which may be empty); `#` matches zero or more
levels and may stand at any level: `a/#` matches `a`, `a/x` and `a/x/y`; `a/#/b` matches `a/b`, `a/x/b` and
`a/x/y/b`; `#/b` matches `b` and `x/b`. These are RabbitMQ's topic-exchange rules (`*` = one word, `#` = zero or
more words) with `/` for `.` and `+` for `*`, and for filters MQTT allows (`#` only last) also MQTT's rules, so
AMQP binding keys and MQTT filters map onto one matcher. MQTT's extra rules (`#` must be last, the `$` rule) are
applied by the MQTT adapter on top.

Lookups walk literal children plus the `+` and `#` slots (nats-server `sublist.go` style) instead of scanning every
pattern. A `#` node may absorb any number of levels, so the walk is a search over states (node, level index); the
states of `#` nodes are memoised, which keeps a lookup within O(nodes x levels) even for patterns such as
`#/#/#/#/x` (without it, the ways of splitting a name between several `#` grow exponentially). The walk is
iterative, so neither a deep pattern nor a long name can exhaust the Python stack.

A bounded cache remembers recent results of `match`; any change to the trie clears it; `cache_size=0` disables it.

This module is also the one wildcard matcher of the code base: `pattern_matches` answers for a single pattern with a
one-pattern trie, and `pattern_problem` is the level rule every protocol's filter validation starts from.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from tidegate.core.errors import InvalidFilter

V = TypeVar("V", bound=Hashable)

_NOTHING: frozenset = frozenset()
ONE_LEVEL = "+"
ANY_LEVELS = "#"


class _Node(Generic[V]):
    __slots__ = ("children", "plus", "hash", "values", "pattern", "absorbs")

    def __init__(self, absorbs: bool = False) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.plus: _Node[V] | None = None
        self.hash: _Node[V] | None = None  # the node a `#` level leads to
        self.values: set[V] = set()  # values of the pattern that ends exactly here
        # The pattern ending here ("" while no pattern ends here; "" is never a valid pattern). Kept only on nodes
        # that hold values: storing every node's prefix would cost memory quadratic in a deep pattern's depth.
        self.pattern = ""
        self.absorbs = absorbs  # reached through a `#` level: may consume any number of further levels

    def is_empty(self) -> bool:
        return not (self.children or self.plus or self.hash or self.values)


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a routing pattern, or None if it is.

    The rule shared by every protocol's filter validation: a pattern is not empty, and `+` and `#` fill a whole
    level. Callers raise their own error (`InvalidFilter` in the core, reason code 0x8F in MQTT) and add their
    protocol's own rules on top.
    """
    if not pattern:
        return "is empty"
    if ONE_LEVEL not in pattern and ANY_LEVELS not in pattern:
        return None
    for level in pattern.split("/"):
        if level != ONE_LEVEL and level != ANY_LEVELS and (ONE_LEVEL in level or ANY_LEVELS in level):
            return f"has a wildcard that does not fill the whole level {level!r}"
    return None


def validate_pattern(pattern: str) -> list[str]:
    """The levels of a routing pattern; raises `InvalidFilter` if it is not one (see `pattern_problem`)."""
    problem = pattern_problem(pattern)
    if problem is not None:
        raise InvalidFilter(f"routing pattern {pattern!r} {problem}")
    return pattern.split("/")


class SubscriptionTrie(Generic[V]):
    """Patterns → values; `match(name)` returns the values of every pattern that matches a name.

    `cache_size` bounds how many names' results are remembered (0 = no cache). `states_visited` counts the
    (node, level) states the walks have expanded, a measure of lookup work for tests and profiling.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, not {cache_size}")
        self._root: _Node[V] = _Node()
        self._cache: dict[str, frozenset[V]] = {}
        self._cache_size = cache_size
        self._count = 0
        self.states_visited = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, value: V) -> bool:
        """Add a pattern → value; returns False if it was already there. Raises `InvalidFilter` for a bad pattern."""
        node = self._root
        for level in validate_pattern(pattern):
            if level == ANY_LEVELS:
                if node.hash is None:
                    node.hash = _Node(absorbs=True)
                node = node.hash
            elif level == ONE_LEVEL:
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
                node = child
        if value in node.values:
            return False
        node.values.add(value)
        node.pattern = pattern
        self._count += 1
        self._cache.clear()
        return True

    def remove(self, pattern: str, value: V) -> bool:
        """Remove a pattern → value; returns False if it was not there."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in validate_pattern(pattern):
            nxt = _child(node, level)
            if nxt is None:
                return False
            path.append((node, level))
            node = nxt
        if value not in node.values:
            return False
        node.values.discard(value)
        if not node.values:
            node.pattern = ""
        # prune empty branches so the trie does not grow with churn
        for parent, level in reversed(path):
            child = _child(parent, level)
            if child is None or not child.is_empty():
                break
            if level == ANY_LEVELS:
                parent.hash = None
            elif level == ONE_LEVEL:
                parent.plus = None
            else:
                del parent.children[level]
        self._count -= 1
        self._cache.clear()
        return True

    def match(self, name: str) -> frozenset[V]:
        """The values of every pattern matching `name` (each value once)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        nodes = self._walk(name.split("/"))
        if not nodes:
            result: frozenset[V] = _NOTHING
        elif len(nodes) == 1:
            result = frozenset(nodes[0].values)
        else:
            values: set[V] = set()
            for node in nodes:
                values.update(node.values)
            result = frozenset(values)
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))  # oldest first: dicts keep insertion order
            self._cache[name] = result
        return result

    def match_patterns(self, name: str) -> frozenset[tuple[str, V]]:
        """Which (pattern, value) pairs match `name`: like `match`, but says through which pattern each value
        matched (a value bound by two matching patterns appears twice). Not cached: it serves tools and
        explanations, while the routing hot path uses `match`."""
        return frozenset((node.pattern, value) for node in self._walk(name.split("/"))
                         for value in node.values)

    def _walk(self, levels: list[str]) -> list[_Node[V]]:
        """The nodes holding values whose patterns match `levels` (a node may appear more than once)."""
        end = len(levels)
        matched: list[_Node[V]] = []
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        push, pop = stack.append, stack.pop
        seen: set[tuple[_Node[V], int]] | None = None
        steps = 0
        while stack:
            node, i = pop()
            while True:  # follow one branch down, leaving the other branches on the stack
                steps += 1
                if node.absorbs:
                    # Only `#` nodes can be reached twice in the same state (a name splits between several `#`
                    # in many ways); every other node hangs below its nearest `#` by a fixed number of levels,
                    # so memoising the `#` states bounds the whole walk.
                    if seen is None:
                        seen = set()
                    elif (node, i) in seen:
                        break
                    seen.add((node, i))
                    if i < end:
                        push((node, i + 1))  # `#` takes level i too
                hash_node = node.hash
                if hash_node is not None:
                    if hash_node.children or hash_node.plus or hash_node.hash:
                        push((hash_node, i))  # `#` starts by taking no level
                    else:
                        matched.append(hash_node)  # a last `#` matches whatever remains, without walking it
                if i == end:
                    if node.values:
                        matched.append(node)
                    break
                child = node.children.get(levels[i])
                plus = node.plus
                if child is None:
                    if plus is None:
                        break
                    node = plus
                else:
                    if plus is not None:
                        push((plus, i + 1))
                    node = child
                i += 1
        self.states_visited += steps
        return matched

    def items(self) -> Iterator[tuple[str, V]]:
        """Every (pattern, value) in the trie."""
        stack: list[_Node[V]] = [self._root]
        while stack:
            node = stack.pop()
            for value in node.values:
                yield node.pattern, value
            stack.extend(node.children.values())
            if node.plus is not None:
                stack.append(node.plus)
            if node.hash is not None:
                stack.append(node.hash)


def _child(node: _Node[V], level: str) -> _Node[V] | None:
    if level == ANY_LEVELS:
        return node.hash
    if level == ONE_LEVEL:
        return node.plus
    return node.children.get(level)


_SMALL_PATTERN_CHARS = 128  # one-pattern tries of longer patterns are not kept, so the memo stays small in bytes


@functools.lru_cache(maxsize=256)
def _one_pattern_trie(pattern: str) -> SubscriptionTrie[bool]:
    trie: SubscriptionTrie[bool] = SubscriptionTrie(cache_size=0)
    trie.add(pattern, True)
    return trie


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether one pattern matches a name, by the same trie walk as `SubscriptionTrie.match` (so the two can never
    disagree). Raises `InvalidFilter` for a bad pattern."""
    if ONE_LEVEL not in pattern and ANY_LEVELS not in pattern:
        validate_pattern(pattern)
        return pattern == name
    if len(pattern) <= _SMALL_PATTERN_CHARS:
        trie = _one_pattern_trie(pattern)
    else:
        trie = SubscriptionTrie(cache_size=0)
        trie.add(pattern, True)
    return bool(trie.match(name))
