"""The pure policy decision: patterns, specificity, Deny-wins-ties, placeholders, CIDRs and subscription filters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.core.security.gate import Action, Resource
from tidegate.core.security.policy import (
    Grant,
    PolicyEntry,
    PolicyError,
    compile_pattern,
    covers,
    decide,
    overlaps,
)


def grants(*entries: tuple[str, str, str] | tuple[str, str, str, tuple[str, ...]]) -> list[Grant]:
    out = []
    for spec in entries:
        effect, actions, resource, *rest = spec
        out.append(Grant("user:t", PolicyEntry.create(resource, actions, effect, rest[0] if rest else ())))
    return out


def allowed(gs: list[Grant], action: Action, resource: Resource, *, source: str = "10.0.0.1",
            username: str = "alice", client_id: str = "c1") -> bool:
    return decide(gs, action, resource, source, username=username, client_id=client_id).allowed


T = Resource.topic
F = Resource.topic_filter


# ---------------------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("orders", "orders", True),
    ("orders", "orders/x", False),
    ("orders*", "orders", True),
    ("orders*", "orders-eu/x", True),
    ("orders*", "order", False),
    ("*", "anything/at/all", True),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a//c", True),
    ("a/+/c", "a/b/x/c", False),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "x/y", True),
    ("+", "x", True),
    ("+", "x/y", False),
    ("a.b", "aXb", False),  # regex characters are literal
])
def test_pattern_matches_names_like_mqtt_and_rocketmq(pattern, name, expected):
    assert compile_pattern(pattern).matches(name) is expected


@pytest.mark.parametrize("bad", ["a/#/b", "a#", "a/b+", "a*b", "*a", "a/*/b"])
def test_malformed_patterns_are_refused(bad):
    with pytest.raises(PolicyError):
        compile_pattern(bad)


@pytest.mark.parametrize(("resource", "actions", "effect", "sources"), [
    ("Queue:x", "Pub", "Allow", ()),
    ("Topic:", "Pub", "Allow", ()),
    ("Cluster:x", "Get", "Allow", ()),
    ("Topic:a", "Publish", "Allow", ()),
    ("Topic:a", "", "Allow", ()),
    ("Topic:a", "Pub", "Maybe", ()),
    ("Topic:a", "Pub", "Allow", ("not-an-ip",)),
    ("Topic:a/#/b", "Pub", "Allow", ()),
])
def test_invalid_entries_are_refused(resource, actions, effect, sources):
    with pytest.raises(PolicyError):
        PolicyEntry.create(resource, actions, effect, sources)


def test_entries_round_trip_through_dicts_case_insensitively():
    entry = PolicyEntry.create("topic:a/#", "pub, SUB", "allow", ["10.0.0.0/8"])
    assert entry.to_dict() == {"resource": "Topic:a/#", "actions": ["Pub", "Sub"], "decision": "Allow",
                               "sources": ["10.0.0.0/8"]}
    assert PolicyEntry.from_dict(entry.to_dict()) == entry


# ---------------------------------------------------------------------------------------------- decisions
def test_no_match_means_deny():
    assert not allowed([], Action.PUB, T("a"))
    assert not allowed(grants(("Allow", "Pub", "Topic:b")), Action.PUB, T("a"))


def test_action_and_resource_type_must_match():
    gs = grants(("Allow", "Pub", "Topic:a"), ("Allow", "Sub", "Group:a"))
    assert allowed(gs, Action.PUB, T("a"))
    assert not allowed(gs, Action.SUB, T("a"))
    assert not allowed(gs, Action.PUB, Resource.group("a"))
    assert allowed(gs, Action.SUB, Resource.group("a"))


def test_all_covers_every_action():
    gs = grants(("Allow", "All", "Topic:*"))
    assert all(allowed(gs, action, T("x/y")) for action in Action)


def test_literal_beats_prefix_and_wildcard():
    gs = grants(("Deny", "Pub", "Topic:a*"), ("Deny", "Pub", "Topic:a/#"), ("Allow", "Pub", "Topic:a/b"))
    assert allowed(gs, Action.PUB, T("a/b"))
    assert not allowed(gs, Action.PUB, T("a/c"))


def test_longer_prefix_beats_shorter():
    gs = grants(("Allow", "Pub", "Topic:*"), ("Deny", "Pub", "Topic:secret*"), ("Allow", "Pub", "Topic:secret/ok*"))
    assert allowed(gs, Action.PUB, T("public"))
    assert not allowed(gs, Action.PUB, T("secret/x"))
    assert allowed(gs, Action.PUB, T("secret/ok/1"))


def test_deny_wins_ties():
    gs = grants(("Allow", "Pub", "Topic:a/+"), ("Deny", "Pub", "Topic:a/#"))  # both have 2 literal characters
    assert not allowed(gs, Action.PUB, T("a/b"))
    same = grants(("Allow", "Pub", "Topic:x"), ("Deny", "Pub", "Topic:x"))
    decision = decide(same, Action.PUB, T("x"), "", username="u")
    assert not decision.allowed and decision.grant is not None and decision.grant.entry.effect.value == "Deny"


def test_super_user_bypasses():
    assert decide([], Action.DELETE, T("x"), "", username="admin", superuser=True).allowed


def test_decision_reports_the_winning_entry():
    gs = grants(("Allow", "Pub", "Topic:telemetry/${username}/#"))
    decision = decide(gs, Action.PUB, T("telemetry/alice/temp"), "", username="alice")
    assert decision.to_dict() == {"decision": "allow", "reason": "allowed by policy", "entry": {
        "owner": "user:t", "resource": "Topic:telemetry/${username}/#", "actions": ["Pub"], "decision": "Allow",
        "sources": []}}


# ---------------------------------------------------------------------------------------------- sources
def test_source_cidr_limits_allow_entries():
    gs = grants(("Allow", "Pub", "Topic:a", ("10.0.0.0/8", "::1/128")))
    assert allowed(gs, Action.PUB, T("a"), source="10.1.2.3")
    assert allowed(gs, Action.PUB, T("a"), source="::ffff:10.1.2.3")  # IPv4-mapped
    assert allowed(gs, Action.PUB, T("a"), source="::1")
    assert not allowed(gs, Action.PUB, T("a"), source="192.168.0.1")
    assert not allowed(gs, Action.PUB, T("a"), source="")  # unknown source: outside every Allow CIDR


def test_source_cidr_deny_applies_to_unknown_sources():
    gs = grants(("Allow", "Pub", "Topic:a"), ("Deny", "Pub", "Topic:a", ("192.168.0.0/16",)))
    assert allowed(gs, Action.PUB, T("a"), source="10.0.0.1")
    assert not allowed(gs, Action.PUB, T("a"), source="192.168.3.4")
    assert not allowed(gs, Action.PUB, T("a"), source="internal")


# ---------------------------------------------------------------------------------------------- placeholders
def test_placeholders_are_substituted():
    gs = grants(("Allow", "Pub", "Topic:telemetry/${username}/#"), ("Allow", "Sub", "Topic:cmd/${client_id}"))
    assert allowed(gs, Action.PUB, T("telemetry/alice/temp"))
    assert not allowed(gs, Action.PUB, T("telemetry/bob/temp"))
    assert allowed(gs, Action.SUB, T("cmd/c1"))
    assert not allowed(gs, Action.SUB, T("cmd/c2"))


@pytest.mark.parametrize("client_id", ["a/b", "+", "#", "a*", "x/#", ""])
def test_client_id_with_wildcards_never_widens_an_allow(client_id):
    gs = grants(("Allow", "Pub", "Topic:telemetry/${client_id}/#"))
    for name in ["telemetry/a/b/x", "telemetry/other/x", "telemetry/+/x", "telemetry//x", "telemetry/a"]:
        assert not allowed(gs, Action.PUB, T(name), client_id=client_id)
    assert not allowed(gs, Action.SUB, F("telemetry/#"), client_id=client_id)


@pytest.mark.parametrize("client_id", ["a/b", "+", "#", ""])
def test_client_id_with_wildcards_widens_a_deny(client_id):
    gs = grants(("Allow", "Pub", "Topic:telemetry/#"), ("Deny", "Pub", "Topic:telemetry/${client_id}/secret"))
    assert not allowed(gs, Action.PUB, T("telemetry/a/b/secret"), client_id=client_id)
    assert not allowed(gs, Action.PUB, T("telemetry/zzz/secret"), client_id=client_id)
    assert allowed(gs, Action.PUB, T("other"), client_id=client_id) is False  # no allow there anyway


def test_placeholder_values_are_substituted_once_not_recursively():
    gs = grants(("Allow", "Pub", "Topic:u/${username}"))
    assert allowed(gs, Action.PUB, T("u/${client_id}"), username="${client_id}", client_id="c1")
    assert not allowed(gs, Action.PUB, T("u/c1"), username="${client_id}", client_id="c1")


# ---------------------------------------------------------------------------------------------- filters
def test_hash_is_granted_only_where_every_topic_is():
    gs = grants(("Allow", "Sub", "Topic:commands/${username}/#"))
    assert allowed(gs, Action.SUB, F("commands/alice/#"))
    assert allowed(gs, Action.SUB, F("commands/alice/+/x"))
    assert not allowed(gs, Action.SUB, F("#"))
    assert not allowed(gs, Action.SUB, F("commands/#"))
    assert not allowed(gs, Action.SUB, F("commands/+/x"))


def test_filter_with_a_deny_inside_is_refused_but_narrower_filters_pass():
    gs = grants(("Allow", "Sub", "Topic:*"), ("Deny", "Sub", "Topic:private/#"))
    assert not allowed(gs, Action.SUB, F("#"))
    assert not allowed(gs, Action.SUB, F("+/x"))  # private/x is under it
    assert allowed(gs, Action.SUB, F("public/#"))
    assert not allowed(gs, Action.SUB, F("private/a"))


def test_filter_allowed_when_the_only_deny_is_less_specific():
    gs = grants(("Deny", "Sub", "Topic:*"), ("Allow", "Sub", "Topic:sensors/#"))
    assert allowed(gs, Action.SUB, F("sensors/+/temp"))
    assert not allowed(gs, Action.SUB, F("sensors2/#"))


def test_a_literal_filter_is_decided_like_its_topic():
    gs = grants(("Allow", "Sub", "Topic:a/b"))
    assert allowed(gs, Action.SUB, F("a/b"))
    assert not allowed(gs, Action.SUB, F("a/+"))


def test_malformed_filter_is_denied():
    assert not allowed(grants(("Allow", "Sub", "Topic:*")), Action.SUB, F("a/#/b"))


# ---------------------------------------------------------------------------------------------- properties
level = st.sampled_from(["a", "b", "ab", "", "+"])
pattern_levels = st.lists(level, min_size=1, max_size=4)


@st.composite
def patterns(draw, star: bool = True) -> str:
    levels = draw(pattern_levels)
    text = "/".join(levels)
    tail = draw(st.sampled_from(["", "/#", "*"] if star else ["", "/#"]))
    if tail == "*" and levels[-1] == "+":
        tail = ""
    out = "#" if text == "" and tail == "/#" else text + tail
    return out or "a"


names = st.lists(st.sampled_from(["a", "b", "ab", "c", ""]), min_size=1, max_size=5).map("/".join)


def _sample_names(limit: int = 5):
    alphabet = ["a", "b", "ab", "c", ""]
    out = [""]
    for depth in range(1, limit + 1):
        out = [n + ("/" if depth > 1 else "") + lvl for n in out for lvl in alphabet] if depth > 1 else alphabet[:]
        yield from out


ALL_NAMES = list(dict.fromkeys(_sample_names(4)))


@settings(max_examples=200, deadline=None)
@given(patterns(), patterns(star=False))
def test_covers_and_overlaps_agree_with_enumeration(outer_text, filter_text):
    outer = compile_pattern(outer_text)
    inner = compile_pattern(filter_text, mqtt_filter=True)
    matched = [n for n in ALL_NAMES if inner.matches(n)]
    if covers(outer, inner):
        assert all(outer.matches(n) for n in matched)
    if any(outer.matches(n) for n in matched):
        assert overlaps(outer, inner)
    if not overlaps(outer, inner):
        assert not any(outer.matches(n) for n in matched)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Allow", "Deny"]), patterns()), max_size=4), patterns(star=False))
def test_a_granted_filter_only_matches_allowed_topics(entries, filter_text):
    gs = grants(*[(effect, "Sub", f"Topic:{p}") for effect, p in entries])
    if allowed(gs, Action.SUB, F(filter_text)):
        wanted = compile_pattern(filter_text, mqtt_filter=True)
        for name in ALL_NAMES:
            if wanted.matches(name):
                assert allowed(gs, Action.SUB, T(name)), name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Allow", "Deny"]), patterns()), max_size=4), names)
def test_concrete_decisions_follow_most_specific_deny_wins(entries, name):
    gs = grants(*[(effect, "Pub", f"Topic:{p}") for effect, p in entries])
    matching = [(compile_pattern(p).specificity, effect) for effect, p in entries if compile_pattern(p).matches(name)]
    if not matching:
        expected = False
    else:
        best = max(s for s, _ in matching)
        expected = all(effect == "Allow" for s, effect in matching if s == best)
    assert allowed(gs, Action.PUB, T(name)) is expected


def test_regex_and_automaton_agree_on_a_sample():
    """`matches` (a regular expression, made lazily) and the automaton `covers`/`overlaps` walk accept the same
    names."""
    from tidegate.core.security.policy import _accepting, _start, _step

    for text in ["a/+/b", "a/#", "a*", "#", "+/+", "a/b"]:
        pattern = compile_pattern(text)
        for name in ALL_NAMES:
            states = _start(pattern)
            for char in name:
                states = _step(pattern, states, char)
            assert _accepting(pattern, states) == pattern.matches(name), (text, name)


def test_very_long_filters_are_decided_without_automata_or_denied():
    long_filter = "/".join(["abc"] * 300) + "/#"
    assert allowed(grants(("Allow", "Sub", "Topic:*")), Action.SUB, F(long_filter))
    decision = decide(grants(("Allow", "Sub", "Topic:abc/#")), Action.SUB, F(long_filter), "", username="u")
    assert not decision.allowed and "longer than" in decision.reason


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab/+#*$", max_size=6), names)
def test_a_client_id_placeholder_only_ever_allows_that_clients_own_subtree(client_id, name):
    gs = grants(("Allow", "Pub", "Topic:t/${client_id}/#"))
    topic = f"t/{name}"
    if allowed(gs, Action.PUB, T(topic), client_id=client_id):
        assert client_id and not set(client_id) & set("/+#*")
        assert topic == f"t/{client_id}" or topic.startswith(f"t/{client_id}/")
