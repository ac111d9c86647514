"""Topic names, topic filters, matching and shared subscriptions (MQTT 5 sections 4.7 and 4.8.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidegate.adapters.mqtt.codec import (
    MqttProtocolError,
    ReasonCode,
    parse_shared_subscription,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)
from tidegate.adapters.mqtt.packets import hidden_by_dollar_rule
from tidegate.core.routing import SubscriptionTrie, pattern_problem


@pytest.mark.parametrize("name", ["a", "a/b", "/", "/a", "a/", "a//b", "$SYS/x", "caf\u00e9", " ", "a b/c"])
def test_valid_topic_names_pass(name: str) -> None:
    validate_topic_name(name)


@pytest.mark.parametrize("name", ["", "+", "#", "a/+", "a/#", "a+", "a#b", "nul\x00", "x" * 65_536, "\ud800"])
def test_invalid_topic_names_are_topic_name_invalid(name: str) -> None:
    """Empty, wildcards, U+0000, surrogates and more than 65535 bytes are not topic names."""
    with pytest.raises(MqttProtocolError) as caught:
        validate_topic_name(name)
    assert caught.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


def test_topic_name_length_counts_utf8_bytes() -> None:
    validate_topic_name("\u00e9" * 32_767)  # 65534 bytes
    with pytest.raises(MqttProtocolError):
        validate_topic_name("\u00e9" * 32_768)  # 65536 bytes


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "a/#", "a/+", "+/+", "/+", "+/", "a/+/b/#", "sport/tennis/+", "$SYS/#", "$share/g/a/#",
     "$share/g/#", "$share/g/+", "$share", "$sharex/a"],
)  # fmt: skip
def test_valid_topic_filters_pass(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    ["", "a/#/b", "#/a", "a#", "a/b#", "+a", "a+", "a/+b/c", "##", "++", "$share/", "$share//a", "$share/g",
     "$share/g/", "$share/g+/a", "$share/#/a", "$share/g/a/#/x", "bad\x00"],
)  # fmt: skip
def test_invalid_topic_filters_are_topic_filter_invalid(topic_filter: str) -> None:
    with pytest.raises(MqttProtocolError) as caught:
        validate_topic_filter(topic_filter)
    assert caught.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("$share/consumers/sport/#", ("consumers", "sport/#")),
        ("$share/g/+", ("g", "+")),
        ("$share/g//", ("g", "/")),
        ("sport/#", None),
        ("$share", None),
        ("$SYS/share", None),
    ],
)
def test_parse_shared_subscription(topic_filter: str, expected: tuple[str, str] | None) -> None:
    """`$share/{group}/{filter}` splits at the first '/' after the share name."""
    assert parse_shared_subscription(topic_filter) == expected


# Spec 4.7.1.2, 4.7.1.3 and 4.7.2 examples, plus edge cases.
MATCHES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a/+/c", "a//c", True),
    ("a/#", "b", False),
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS", "$SYS", True),
    ("+", "$", False),
]


@pytest.mark.parametrize(("topic_filter", "name", "expected"), MATCHES)
def test_topic_matches(topic_filter: str, name: str, expected: bool) -> None:
    assert topic_matches(topic_filter, name) is expected


level = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/+#"), max_size=4)
names = st.lists(level, min_size=1, max_size=5).map("/".join).filter(bool)


@given(names)
def test_a_name_used_as_filter_matches_itself(name: str) -> None:
    validate_topic_filter(name)
    assert topic_matches(name, name)


@given(names)
def test_hash_matches_every_name_not_starting_with_dollar(name: str) -> None:
    assert topic_matches("#", name) is not name.startswith("$")


@given(names, st.data())
def test_replacing_levels_with_plus_still_matches(name: str, data: st.DataObject) -> None:
    """Swapping any levels of a name for '+' (and optionally cutting the tail to '#') gives a matching filter."""
    levels = name.split("/")
    mask = data.draw(st.lists(st.booleans(), min_size=len(levels), max_size=len(levels)))
    filter_levels = ["+" if use_plus else part for part, use_plus in zip(levels, mask, strict=True)]
    cut = data.draw(st.integers(0, len(filter_levels)))
    topic_filter = "/".join(filter_levels[:cut] + ["#"]) if data.draw(st.booleans()) else "/".join(filter_levels)
    validate_topic_filter(topic_filter)
    starts_with_wildcard = topic_filter[:1] in ("+", "#")
    assert topic_matches(topic_filter, name) is not (name.startswith("$") and starts_with_wildcard)


# --- one matcher: MQTT matching is the core trie's matching plus the `$` rule ------------------------------------

filter_level = st.sampled_from(["a", "b", "", "$x", "+"])
mqtt_filters = st.tuples(st.lists(filter_level, min_size=1, max_size=4), st.booleans()).map(
    lambda t: "/".join(t[0] + ["#"]) if t[1] else "/".join(t[0])).filter(bool)
small_names = st.lists(st.sampled_from(["a", "b", "", "$x"]), min_size=1, max_size=5).map("/".join)


@given(st.lists(mqtt_filters, min_size=1, max_size=6), small_names)
def test_topic_matches_agrees_with_the_core_trie(filters: list[str], name: str) -> None:
    """`topic_matches` is the core SubscriptionTrie's answer, minus what the `$` rule hides."""
    trie: SubscriptionTrie[str] = SubscriptionTrie(cache_size=0)
    for topic_filter in filters:
        validate_topic_filter(topic_filter)
        trie.add(topic_filter, topic_filter)
    by_trie = trie.match(name)
    for topic_filter in filters:
        expected = topic_filter in by_trie and not hidden_by_dollar_rule(topic_filter, name)
        assert topic_matches(topic_filter, name) is expected


@pytest.mark.parametrize(("topic_filter", "hidden"), [("#", True), ("+/x", True), ("$SYS/#", False), ("a/#", False)])
def test_dollar_rule_hides_names_starting_with_dollar_from_leading_wildcards(topic_filter: str, hidden: bool) -> None:
    assert hidden_by_dollar_rule(topic_filter, "$SYS/x") is hidden
    assert not hidden_by_dollar_rule(topic_filter, "SYS/x")


@pytest.mark.parametrize("topic_filter", ["a/#/b", "#/a", "#/#", "+/#/+"])
def test_mqtt_keeps_hash_last_while_the_core_allows_it_anywhere(topic_filter: str) -> None:
    """The level rule is shared with the core; `#` only as the last level is MQTT's own rule on top."""
    assert pattern_problem(topic_filter) is None
    with pytest.raises(MqttProtocolError) as caught:
        validate_topic_filter(topic_filter)
    assert caught.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID
    assert "last level" in str(caught.value)


@pytest.mark.parametrize("topic_filter", ["a+", "a/#b", "##", "$share/g/a+"])
def test_wildcards_inside_a_level_are_refused_by_the_shared_rule(topic_filter: str) -> None:
    with pytest.raises(MqttProtocolError) as caught:
        validate_topic_filter(topic_filter)
    assert caught.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID
    assert "whole level" in str(caught.value)
