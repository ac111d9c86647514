"""A session re-matches each delivery against its filters with the core routing trie (plus MQTT's `$` rule)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tidegate.adapters.mqtt.codec import topic_matches
from tidegate.adapters.mqtt.sessions import Session, SubscriptionEntry


def entry(topic_filter: str, qos: int = 1) -> SubscriptionEntry:
    share = None
    if topic_filter.startswith("$share/"):
        name, _, inner = topic_filter[len("$share/"):].partition("/")
        share = (name, inner)
    return SubscriptionEntry(topic_filter, qos, share=share)


def test_matching_subscriptions_returns_each_matching_entry():
    session = Session("c", "%MQTT%c", 5, 0)
    for topic_filter in ("a/+", "a/#", "b", "$share/g/a/x", "#"):
        session.put_subscription(entry(topic_filter))
    assert sorted(e.topic_filter for e in session.matching_subscriptions("a/x")) == [
        "#", "$share/g/a/x", "a/#", "a/+"]
    assert sorted(e.topic_filter for e in session.matching_subscriptions("b")) == ["#", "b"]


def test_dollar_names_are_hidden_from_filters_starting_with_a_wildcard():
    session = Session("c", "%MQTT%c", 5, 0)
    for topic_filter in ("#", "+/x", "$SYS/#", "$share/g/#"):
        session.put_subscription(entry(topic_filter))
    assert [e.topic_filter for e in session.matching_subscriptions("$SYS/x")] == ["$SYS/#"]


def test_put_pop_and_clear_keep_the_trie_in_step_with_the_subscriptions():
    session = Session("c", "%MQTT%c", 5, 0)
    assert not session.put_subscription(entry("a/+", qos=0))
    assert session.put_subscription(entry("a/+", qos=2))  # same filter: replaced, still matched once
    assert [e.qos for e in session.matching_subscriptions("a/x")] == [2]
    assert session.pop_subscription("a/+") is not None
    assert session.pop_subscription("a/+") is None
    assert session.matching_subscriptions("a/x") == []
    session.put_subscription(entry("$share/g/a/#"))
    session.clear_subscriptions()
    assert session.subscriptions == {} and session.matching_subscriptions("a/x") == []


def test_a_restored_session_matches_its_persisted_filters():
    session = Session("c", "%MQTT%c", 5, 60)
    session.put_subscription(entry("a/#"))
    session.put_subscription(entry("$share/g/+/y"))
    restored = Session.from_row(session.to_row())
    assert sorted(e.topic_filter for e in restored.matching_subscriptions("a/y")) == ["$share/g/+/y", "a/#"]


filters = st.lists(st.sampled_from(["a", "b", "", "$s", "+"]), min_size=1, max_size=3).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"]), "#"])).filter(bool)
names = st.lists(st.sampled_from(["a", "b", "", "$s"]), min_size=1, max_size=4).map("/".join)


@given(st.lists(st.tuples(st.booleans(), filters), max_size=12), names)
def test_session_matching_equals_topic_matches_after_subscribes_and_unsubscribes(ops, name):
    session = Session("c", "%MQTT%c", 5, 0)
    for subscribing, topic_filter in ops:
        if subscribing:
            session.put_subscription(entry(topic_filter))
        else:
            session.pop_subscription(topic_filter)
    expected = sorted(f for f in session.subscriptions if topic_matches(f, name))
    assert sorted(e.topic_filter for e in session.matching_subscriptions(name)) == expected
