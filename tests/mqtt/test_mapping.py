"""MQTT names ↔ core names: round trips, the `%HH` encoding, and that two MQTT names never share a core name."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidegate.adapters.mqtt.mapping import (
    PROP_CORRELATION_ENCODING,
    QOS2_FLAG,
    PublishFields,
    UnmappableName,
    core_address,
    core_pattern,
    decode_level,
    encode_level,
    flags_for_qos,
    message_from_publish,
    message_qos,
    mqtt_topic_name,
    publish_fields,
    session_topic,
    share_topic,
)
from tidegate.core.model import TOPIC_NAME, MessageFlag
from tidegate.core.routing import SubscriptionTrie

level_text = st.text(st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs",)), max_size=20)


@pytest.mark.parametrize(("level", "encoded"), [
    ("sensors", "sensors"), ("a.b-c_d", "a.b-c_d"), ("$SYS", "%24SYS"), ("%", "%25"), ("", "%00"),
    ("h\u00e9", "h%C3%A9"), ("a b", "a%20b"),
])
def test_first_level_encoding_examples(level, encoded):
    """Letters, digits, `_ . -` stay; everything else is `%HH` of its UTF-8 bytes; an empty level is `%00`."""
    assert encode_level(level) == encoded
    assert decode_level(encoded) == level


@given(level_text)
def test_level_round_trip_and_core_alphabet(level):
    """Every MQTT level encodes into a valid core topic spelling and decodes back to itself."""
    encoded = encode_level(level)
    assert decode_level(encoded) == level
    if len(encoded) <= 127:
        assert TOPIC_NAME.match(encoded)


@given(level_text, level_text)
def test_distinct_levels_never_collide(a, b):
    """The encoding is injective: two different first levels never map to one core topic."""
    if a != b:
        assert encode_level(a) != encode_level(b)


@pytest.mark.parametrize("core_topic", [
    "%MQTT%client", "%DLQ%group", "%RETRY%g", "%MQTTSHARE%abc", "%41", "%2F", "%c3%a9", "%2", "%", "%00x",
])
def test_internal_and_non_canonical_core_topics_are_invisible_to_mqtt(core_topic):
    """Internal topics and names the encoder would never produce have no MQTT name."""
    assert decode_level(core_topic) is None
    assert mqtt_topic_name(core_topic, "a/b") is None


def test_topic_name_to_core_address():
    assert core_address("T/a/b") == ("T", "a/b")
    assert core_address("T") == ("T", "")
    assert core_address("/a") == ("%00", "a")
    assert core_address("T//b") == ("T", "/b")
    assert mqtt_topic_name("T", "a/b") == "T/a/b"
    assert mqtt_topic_name("%00", "a") == "/a"


def test_unmappable_names():
    """A first level over 127 encoded characters, or a single trailing `/`, has no core spelling."""
    with pytest.raises(UnmappableName):
        core_address("\u00e9" * 30 + "/x")
    with pytest.raises(UnmappableName):
        core_address("T/")


def test_filters_keep_wildcards_and_encode_the_first_level():
    assert core_pattern("#") == "#"
    assert core_pattern("+/b") == "+/b"
    assert core_pattern("T/+/b") == "T/+/b"
    assert core_pattern("$SYS/#") == "%24SYS/#"
    assert core_pattern("/x/#") == "%00/x/#"


def test_session_and_share_names_are_internal_and_bounded():
    for client_id in ("c1", "", "x" * 500, "a b/c"):
        name = session_topic(client_id)
        assert name.startswith("%MQTT%") and TOPIC_NAME.match(name)
        assert decode_level(name) is None
    assert session_topic("x" * 500) != session_topic("x" * 499)
    assert share_topic("g", "a/#") != share_topic("g", "a/+")
    assert TOPIC_NAME.match(share_topic("g" * 300, "f" * 1000))


def test_qos_flags():
    assert message_qos(MessageFlag.TRANSIENT) == 0
    assert message_qos(MessageFlag.PERSISTENT) == 1
    assert message_qos(MessageFlag.PERSISTENT | QOS2_FLAG) == 2
    assert flags_for_qos(2) == MessageFlag.PERSISTENT | QOS2_FLAG


def test_messages_stored_with_flag_4_still_reach_mqtt_at_qos_2():
    """Stored-data compatibility: the QoS 2 bit is the value the core's former EXACTLY_ONCE flag had (4), so a message
    written by an older broker with flags 1|4 is still delivered at QoS 2."""
    assert QOS2_FLAG == 4
    assert message_qos(1 | 4) == 2


def test_message_properties_round_trip():
    """User properties (last repeated value wins), content type, response topic and correlation data survive."""
    fields = PublishFields(payload_format_indicator=1, message_expiry_interval=10, content_type="text/plain",
                           response_topic="reply/here", correlation_data=b"abc",
                           user_properties=(("k", "1"), ("k", "2"), ("z", "v")))
    msg = message_from_publish("T/a", b"x", 1, False, fields, now_ms=1_000_000)
    assert msg.properties["k"] == "2"
    assert msg.properties["content-type"] == "text/plain"
    assert msg.properties["reply-to"] == "reply/here"
    assert msg.properties["correlation-id"] == "abc"
    assert msg.expires_at == 1_010_000
    out = publish_fields(msg, now_ms=1_004_500)
    assert out.message_expiry_interval == 6
    assert out.content_type == "text/plain" and out.response_topic == "reply/here"
    assert out.correlation_data == b"abc" and out.payload_format_indicator == 1
    assert dict(out.user_properties) == {"k": "2", "z": "v"}
    assert publish_fields(msg, now_ms=1_010_000) is None


def test_binary_correlation_data_goes_base64():
    msg = message_from_publish("T", b"", 1, False, PublishFields(correlation_data=b"\xff\x00"), now_ms=0)
    assert msg.properties[PROP_CORRELATION_ENCODING] == "base64"
    assert publish_fields(msg, 0).correlation_data == b"\xff\x00"


# --- the core router and the session's re-match agree ---------------------------------------------------------

route_level = st.sampled_from(["a", "b", "", "$x", "h\u00e9", "%"])
route_filters = st.tuples(st.lists(st.one_of(route_level, st.just("+")), min_size=1, max_size=4), st.booleans()).map(
    lambda t: "/".join(t[0] + ["#"]) if t[1] else "/".join(t[0])).filter(bool)
route_names = st.lists(route_level, min_size=1, max_size=5).map("/".join)


@given(st.lists(route_filters, min_size=1, max_size=6), route_names)
def test_core_routing_of_mapped_filters_equals_matching_the_mqtt_name(filters, name):
    """Binding `core_pattern(f)` and routing the core name of an MQTT name picks the same filters as matching the
    MQTT name against the filters themselves (what a session's re-match does), so a session is routed exactly the
    messages its filters want (the `$` rule aside, which only the adapter applies)."""
    try:
        topic, subject = core_address(name)
    except UnmappableName:
        return
    core_router: SubscriptionTrie[str] = SubscriptionTrie(cache_size=0)
    mqtt_side: SubscriptionTrie[str] = SubscriptionTrie(cache_size=0)
    for topic_filter in filters:
        core_router.add(core_pattern(topic_filter), topic_filter)
        mqtt_side.add(topic_filter, topic_filter)
    full_name = f"{topic}/{subject}" if subject else topic
    assert core_router.match(full_name) == mqtt_side.match(name)
