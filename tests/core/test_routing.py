"""The subscription trie routes full names (`topic/sub/ject`) the MQTT way: `+` one level, `#` the rest."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidegate.core.errors import InvalidFilter
from tidegate.core.routing import SubscriptionTrie

CASES = [
    ("T", "T", True),
    ("T", "T/a", False),
    ("T/#", "T", True),  # '#' also matches the parent level
    ("T/#", "T/a/b", True),
    ("T/+", "T/a", True),
    ("T/+", "T/a/b", False),
    ("T/+/b", "T/a/b", True),
    ("T/+/b", "T/a/c", False),
    ("+/b", "T/b", True),
    ("#", "anything/at/all", True),
    ("T/+", "T/", True),  # an empty level is still a level
    ("T//x", "T//x", True),
    ("U/#", "T/a", False),
]


@pytest.mark.parametrize("cache", [0, 4096])
@pytest.mark.parametrize(("pattern", "name", "expected"), CASES)
def test_pattern_matches_like_mqtt(pattern, name, expected, cache):
    trie = SubscriptionTrie(cache_size=cache or 1)
    trie.add(pattern, "dest")
    assert (trie.match(name) == {"dest"}) is expected


def test_overlapping_patterns_return_each_destination_once():
    trie = SubscriptionTrie()
    trie.add("T/#", "a")
    trie.add("T/+/b", "a")
    trie.add("T/x/b", "b")
    assert trie.match("T/x/b") == {"a", "b"}


def test_remove_prunes_and_clears_cache():
    trie = SubscriptionTrie()
    trie.add("T/+/b", "a")
    assert trie.match("T/x/b") == {"a"}
    assert trie.remove("T/+/b", "a")
    assert trie.match("T/x/b") == frozenset()
    assert not trie.remove("T/+/b", "a")
    assert len(trie) == 0
    assert list(trie.items()) == []


def test_add_is_idempotent_and_items_lists_patterns():
    trie = SubscriptionTrie()
    assert trie.add("T/#", 1)
    assert not trie.add("T/#", 1)
    trie.add("+/x", 2)
    assert sorted(trie.items()) == [("+/x", 2), ("T/#", 1)]


@pytest.mark.parametrize("bad", ["", "T/#/x", "T/a+", "T/#x"])
def test_invalid_patterns_are_rejected(bad):
    with pytest.raises(InvalidFilter):
        SubscriptionTrie().add(bad, 1)


def _reference_match(pattern: str, name: str) -> bool:
    p, n = pattern.split("/"), name.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(n) or (level != "+" and level != n[i]):
            return False
    return len(p) == len(n)


levels = st.sampled_from(["a", "b", ""])


@given(
    patterns=st.lists(
        st.tuples(st.sampled_from(["a", "b", "+"]), st.lists(st.sampled_from(["a", "b", "+", ""]), max_size=3))
        .map(lambda t: "/".join([t[0], *t[1]]))
        .flatmap(lambda p: st.sampled_from([p, p + "/#", "#"])),
        max_size=8,
    ),
    name=st.lists(levels, min_size=1, max_size=5).map("/".join),
)
def test_trie_agrees_with_a_linear_scan(patterns, name):
    trie = SubscriptionTrie(cache_size=2)
    for i, p in enumerate(patterns):
        trie.add(p, i)
    expected = {i for i, p in enumerate(patterns) if _reference_match(p, name)}
    assert trie.match(name) == expected
    assert trie.match(name) == expected  # second time through the cache
