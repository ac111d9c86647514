"""The subscription trie routes full names (`topic/sub/ject`): `+` one level, `#` zero or more levels at any level.

Every test that builds a trie runs three times through the `make_trie` fixture: without a cache, with a one-entry
cache (evicts on every new name) and with the default cache, so cached and uncached lookups must agree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.core.errors import InvalidFilter
from tidegate.core.routing import SubscriptionTrie, pattern_matches, pattern_problem, validate_pattern

CACHE_SIZES = [0, 1, 4096]


@pytest.fixture(params=CACHE_SIZES, ids=lambda size: f"cache{size}")
def make_trie(request: pytest.FixtureRequest) -> Callable[[], SubscriptionTrie]:
    return functools.partial(SubscriptionTrie, cache_size=request.param)


def reference_match(pattern: str, name: str) -> bool:
    """A plain recursive matcher, independent of the trie: `+` one level, `#` zero or more levels."""
    p, n = pattern.split("/"), name.split("/")

    @functools.cache
    def from_(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(n)
        if p[i] == "#":
            return from_(i + 1, j) or (j < len(n) and from_(i, j + 1))
        return j < len(n) and (p[i] == "+" or p[i] == n[j]) and from_(i + 1, j + 1)

    return from_(0, 0)


CASES = [
    ("T", "T", True),
    ("T", "T/a", False),
    ("T/#", "T", True),  # '#' also matches the parent level (zero levels)
    ("T/#", "T/a/b", True),
    ("T/+", "T/a", True),
    ("T/+", "T/a/b", False),
    ("T/+", "T", False),
    ("T/+/b", "T/a/b", True),
    ("T/+/b", "T/a/c", False),
    ("+/b", "T/b", True),
    ("#", "anything/at/all", True),
    ("T/+", "T/", True),  # an empty level is still a level
    ("T//x", "T//x", True),
    ("U/#", "T/a", False),
    # '#' in the middle or at the start: zero or more levels (AMQP topic exchange rules)
    ("a/#/b", "a/b", True),
    ("a/#/b", "a/x/b", True),
    ("a/#/b", "a/x/y/b", True),
    ("a/#/b", "a/x", False),
    ("a/#/b", "a/b/c", False),
    ("a/#/b", "a/b/b", True),
    ("#/b", "b", True),
    ("#/b", "x/y/b", True),
    ("#/b", "b/x", False),
    ("a/#/#", "a", True),
    ("a/#/#", "a/x/y", True),
    ("#/#", "x", True),
    ("a/#/+", "a", False),  # '+' still needs exactly one level
    ("a/#/+", "a/x", True),
    ("+/#/+", "x", False),
    ("+/#/+", "x/y", True),
    ("a/#/b/#/c", "a/b/c", True),
    ("a/#/b/#/c", "a/x/b/y/z/c", True),
    ("a/#/b/#/c", "a/x/c/b", False),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), CASES)
def test_pattern_matches_with_one_and_zero_or_more_level_wildcards(make_trie, pattern, name, expected):
    trie = make_trie()
    trie.add(pattern, "dest")
    assert (trie.match(name) == {"dest"}) is expected
    assert (trie.match(name) == {"dest"}) is expected  # again, from the cache when there is one
    assert reference_match(pattern, name) is expected  # the test's own reference agrees with the table
    assert pattern_matches(pattern, name) is expected


# RabbitMQ tutorial 5 ("Topics") bindings and its routing outcomes, written with AMQP syntax and mapped the way
# DESIGN.md section 3 maps AMQP names onto core names: `.` -> `/`, `*` -> `+`, `#` stays.
RABBITMQ_BINDINGS = {"*.orange.*": "Q1", "*.*.rabbit": "Q2", "lazy.#": "Q2"}
RABBITMQ_ROUTES = [
    ("quick.orange.rabbit", {"Q1", "Q2"}),
    ("lazy.orange.elephant", {"Q1", "Q2"}),
    ("quick.orange.fox", {"Q1"}),
    ("lazy.brown.fox", {"Q2"}),
    ("lazy.pink.rabbit", {"Q2"}),  # matches two bindings of Q2, delivered once
    ("quick.brown.fox", set()),
    ("orange", set()),
    ("quick.orange.new.rabbit", set()),
    ("lazy.orange.new.rabbit", {"Q2"}),
    ("lazy", {"Q2"}),  # '#' matches zero words
]


def amqp_to_core(key: str) -> str:
    return "/".join("+" if word == "*" else word for word in key.split("."))


@pytest.mark.parametrize(("routing_key", "queues"), RABBITMQ_ROUTES)
def test_amqp_topic_exchange_semantics_after_mapping(make_trie, routing_key, queues):
    """Binding keys mapped to core patterns route exactly as RabbitMQ's topic exchange does."""
    trie = make_trie()
    for binding_key, queue in RABBITMQ_BINDINGS.items():
        trie.add(amqp_to_core(binding_key), queue)
    assert trie.match(amqp_to_core(routing_key)) == queues


def test_amqp_binding_keys_map_to_core_patterns():
    assert amqp_to_core("a.*.b") == "a/+/b"
    assert amqp_to_core("a.#.b") == "a/#/b"
    assert amqp_to_core("#.b") == "#/b"


def test_overlapping_patterns_return_each_destination_once(make_trie):
    trie = make_trie()
    trie.add("T/#", "a")
    trie.add("T/+/b", "a")
    trie.add("T/#/b", "a")
    trie.add("T/x/b", "b")
    assert trie.match("T/x/b") == {"a", "b"}


def test_match_patterns_says_which_patterns_matched(make_trie):
    """`match_patterns` returns (pattern, value) pairs; a value matched through two patterns appears twice."""
    trie = make_trie()
    trie.add("T/#", "a")
    trie.add("T/+/b", "a")
    trie.add("T/#/b", "c")
    trie.add("T/x/b", "b")
    trie.add("U/#", "d")
    assert trie.match_patterns("T/x/b") == {("T/#", "a"), ("T/+/b", "a"), ("T/#/b", "c"), ("T/x/b", "b")}
    assert trie.match_patterns("T") == {("T/#", "a")}
    assert trie.match_patterns("V") == frozenset()
    assert {value for _, value in trie.match_patterns("T/x/b")} == trie.match("T/x/b")


def test_remove_prunes_and_clears_cache(make_trie):
    trie = make_trie()
    trie.add("T/+/b", "a")
    trie.add("T/#/b", "c")
    assert trie.match("T/x/b") == {"a", "c"}
    assert trie.remove("T/+/b", "a")
    assert trie.match("T/x/b") == {"c"}
    assert trie.remove("T/#/b", "c")
    assert trie.match("T/x/b") == frozenset()
    assert not trie.remove("T/+/b", "a")
    assert not trie.remove("T/#/b", "c")
    assert not trie.remove("T/#", "c")
    assert len(trie) == 0
    assert list(trie.items()) == []
    assert trie._root.is_empty()  # every branch was pruned


def test_remove_keeps_other_values_and_longer_patterns(make_trie):
    trie = make_trie()
    trie.add("a/#", 1)
    trie.add("a/#/b", 2)
    trie.add("a/#", 3)
    assert trie.remove("a/#", 1)
    assert trie.match("a/b") == {2, 3}
    assert trie.remove("a/#", 3)
    assert trie.match("a/b") == {2}
    assert trie.match("a/c") == frozenset()
    assert sorted(trie.items()) == [("a/#/b", 2)]


def test_add_is_idempotent_and_items_lists_patterns(make_trie):
    trie = make_trie()
    assert trie.add("T/#", 1)
    assert not trie.add("T/#", 1)
    trie.add("+/x", 2)
    trie.add("#/x/#", 3)
    assert sorted(trie.items()) == [("#/x/#", 3), ("+/x", 2), ("T/#", 1)]
    assert len(trie) == 3


@pytest.mark.parametrize("bad", ["", "T/a+", "T/#x", "T/+x", "#a", "a/b#/c", "++"])
def test_invalid_patterns_are_rejected(make_trie, bad):
    with pytest.raises(InvalidFilter):
        make_trie().add(bad, 1)
    with pytest.raises(InvalidFilter):
        make_trie().remove(bad, 1)
    with pytest.raises(InvalidFilter):
        pattern_matches(bad, "T")
    assert pattern_problem(bad) is not None


@pytest.mark.parametrize("good", ["T", "#", "+", "T/#/x", "#/#", "a//b", "/", "+/#/+"])
def test_hash_may_stand_at_any_level(good):
    assert pattern_problem(good) is None
    assert validate_pattern(good) == good.split("/")


def test_negative_cache_size_is_refused():
    with pytest.raises(ValueError):
        SubscriptionTrie(cache_size=-1)


def test_cache_size_zero_means_no_cache():
    """With cache_size=0 every match walks the trie (and does not crash on the empty cache)."""
    trie: SubscriptionTrie[int] = SubscriptionTrie(cache_size=0)
    trie.add("a/+", 1)
    assert trie.match("a/b") == {1}
    walked = trie.states_visited
    assert trie.match("a/b") == {1}
    assert trie.states_visited > walked


def test_a_cache_hit_does_not_walk_and_a_full_cache_evicts_the_oldest():
    trie: SubscriptionTrie[int] = SubscriptionTrie(cache_size=2)
    trie.add("a/+", 1)
    trie.match("a/b")
    walked = trie.states_visited
    assert trie.match("a/b") == {1}
    assert trie.states_visited == walked
    trie.match("a/c")
    trie.match("a/d")  # evicts a/b
    walked = trie.states_visited
    trie.match("a/d")
    assert trie.states_visited == walked
    trie.match("a/b")
    assert trie.states_visited > walked


def test_many_hashes_do_not_blow_up(make_trie):
    """`#/#/#/#/#/#/#/#/x` against a long name: the walk expands O(nodes x levels) states, not the exponential
    number of ways eight `#` can share the levels."""
    trie = make_trie()
    pattern = "/".join(["#"] * 8 + ["x"])
    trie.add(pattern, 1)
    nodes = 1 + 9  # root, eight `#` nodes and `x`
    for name_levels in (["a"] * 300, ["a"] * 299 + ["x"], ["x"] * 300):
        before = trie.states_visited
        expected = {1} if name_levels[-1] == "x" else set()
        assert trie.match("/".join(name_levels)) == expected
        assert trie.states_visited - before <= 2 * nodes * (len(name_levels) + 1)


def test_trailing_hash_does_not_walk_the_rest_of_the_name():
    """A `#` that ends its pattern matches the rest at once: the work does not grow with the name's length."""
    trie: SubscriptionTrie[int] = SubscriptionTrie(cache_size=0)
    trie.add("a/#", 1)
    trie.add("#", 2)
    assert trie.match("a/" + "/".join(["x"] * 2000)) == {1, 2}
    assert trie.states_visited <= 10


def test_deep_patterns_and_long_names_do_not_exhaust_the_stack(make_trie):
    trie = make_trie()
    deep = "/".join(["+"] * 5000)
    trie.add(deep, 1)
    deep_hash = "/".join(["a"] * 4000 + ["#"])
    trie.add(deep_hash, 2)
    name = "/".join(["a"] * 5000)
    assert trie.match(name) == {1, 2}
    assert sorted(trie.items()) == sorted([(deep, 1), (deep_hash, 2)])
    assert trie.remove(deep, 1)
    assert trie.match(name) == {2}


# --- property tests: the trie against the reference matcher --------------------------------------------------

LEVEL_WORDS = ["a", "b", ""]
pattern_levels = st.sampled_from(["a", "b", "", "+", "#"])
patterns = st.lists(pattern_levels, min_size=1, max_size=5).map("/".join).filter(bool)
names = st.lists(st.sampled_from(LEVEL_WORDS), min_size=1, max_size=6).map("/".join)


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
@given(pattern_list=st.lists(patterns, max_size=8), name=names)
def test_trie_agrees_with_the_reference_matcher(cache_size, pattern_list, name):
    trie: SubscriptionTrie[int] = SubscriptionTrie(cache_size=cache_size)
    for i, p in enumerate(pattern_list):
        trie.add(p, i)
    expected = {i for i, p in enumerate(pattern_list) if reference_match(p, name)}
    assert trie.match(name) == expected
    assert trie.match(name) == expected  # second time through the cache
    assert trie.match_patterns(name) == {(p, i) for i, p in enumerate(pattern_list) if i in expected}
    for i, p in enumerate(pattern_list):
        assert pattern_matches(p, name) is (i in expected)


operations = st.lists(st.tuples(st.booleans(), patterns, st.integers(0, 2)), max_size=25)


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
@settings(max_examples=200)
@given(ops=operations, probes=st.lists(names, min_size=1, max_size=6))
def test_trie_agrees_with_the_reference_after_adds_and_removes(cache_size, ops, probes):
    """Random add/remove sequences, with lookups in between so stale cache entries would show."""
    trie: SubscriptionTrie[int] = SubscriptionTrie(cache_size=cache_size)
    model: set[tuple[str, int]] = set()
    for step, (adding, pattern, value) in enumerate(ops):
        if adding:
            assert trie.add(pattern, value) is ((pattern, value) not in model)
            model.add((pattern, value))
        else:
            assert trie.remove(pattern, value) is ((pattern, value) in model)
            model.discard((pattern, value))
        probe = probes[step % len(probes)]
        assert trie.match(probe) == {v for p, v in model if reference_match(p, probe)}
    assert len(trie) == len(model)
    assert set(trie.items()) == model
    for probe in probes:
        assert trie.match(probe) == {v for p, v in model if reference_match(p, probe)}
        assert trie.match_patterns(probe) == {(p, v) for p, v in model if reference_match(p, probe)}
    for pattern, value in model:
        trie.remove(pattern, value)
    assert trie._root.is_empty()  # removing everything prunes everything
