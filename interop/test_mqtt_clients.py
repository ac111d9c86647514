"""mosquitto_pub / mosquitto_sub (MQTT 3.1.1 and 5) against one `tidegate serve` process.

What a user of the stock Mosquitto command-line clients checks first: every QoS both ways, wildcards, retained
messages, `$SYS`, MQTT 5 properties and expiry, and the packet-size limit.
"""

from __future__ import annotations

import time

import pytest

from tidegate.gateway.testing import wait_until

MAX_PACKET = 65536
# $SYS every second so the "# does not match $SYS" test sees a periodic update quickly.
BROKER_ARGS = ("--set", f"listeners.mqtt.max_packet_size={MAX_PACKET}", "--set", "listeners.mqtt.sys_interval_s=1")
VERSIONS = ["mqttv311", "mqttv5"]


def port_of(broker) -> int:
    return broker.host_port("mqtt")[1]


@pytest.mark.parametrize("version", VERSIONS)
def test_mosquitto_publishes_and_receives_at_qos_0_1_and_2(broker, mosquitto, version):
    """Each QoS published by mosquitto_pub reaches a QoS 2 mosquitto_sub with that QoS and the exact payload."""
    port = port_of(broker)
    sub = mosquitto.sub(port, f"qos/{version}/#", qos=2, version=version)
    for qos in (0, 1, 2):
        mosquitto.pub(port, f"qos/{version}/q{qos}", f"payload at qos {qos}", qos=qos, version=version)
    got = sub.wait_messages(3)
    assert [(m.topic, m.qos, m.payload) for m in got] == [
        (f"qos/{version}/q{qos}", qos, f"payload at qos {qos}".encode()) for qos in (0, 1, 2)]


@pytest.mark.parametrize("version", VERSIONS)
def test_subscription_qos_caps_the_delivered_qos(broker, mosquitto, version):
    """A QoS 1 subscriber gets a QoS 2 publish as QoS 1 and a QoS 0 publish as QoS 0."""
    port = port_of(broker)
    sub = mosquitto.sub(port, f"cap/{version}/+", qos=1, version=version)
    mosquitto.pub(port, f"cap/{version}/two", "2", qos=2, version=version)
    mosquitto.pub(port, f"cap/{version}/zero", "0", qos=0, version=version)
    got = sub.wait_messages(2)
    assert [(m.topic, m.qos) for m in got] == [(f"cap/{version}/two", 1), (f"cap/{version}/zero", 0)]


def test_plus_and_hash_wildcards_match_the_right_topics(broker, mosquitto):
    """`+` matches one level, `#` any number including the parent; each subscriber sees exactly its topics."""
    port = port_of(broker)
    filters = {
        "wild/+/temp": ["wild/kitchen/temp", "wild/hall/temp"],
        "wild/#": ["wild", "wild/kitchen/temp", "wild/hall/temp", "wild/kitchen/humidity", "wild/a/b/c"],
        "wild/kitchen/+": ["wild/kitchen/temp", "wild/kitchen/humidity"],
        "+/hall/#": ["wild/hall/temp"],
    }
    subs = {f: mosquitto.sub(port, f, qos=1) for f in filters}
    for topic in ("wild", "wild/kitchen/temp", "wild/hall/temp", "wild/kitchen/humidity", "wild/a/b/c",
                  "other/kitchen/temp"):
        mosquitto.pub(port, topic, topic, qos=1)
    # Last messages that each filter matches one of: once one arrived, everything before it has been delivered.
    mosquitto.pub(port, "wild/kitchen/temp", "end", qos=1)
    mosquitto.pub(port, "wild/hall/temp", "end", qos=1)
    for flt, expected in filters.items():
        got = subs[flt].wait_messages(1, lambda m: m.payload == b"end")
        assert got, flt
        topics = [m.topic for m in subs[flt].received() if m.payload != b"end"]
        assert topics == expected, flt


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_message_is_set_replaced_and_cleared(broker, mosquitto, version):
    """`-r` stores the last value for new subscribers, a second `-r` replaces it, `-r -n` (empty) clears it."""
    port = port_of(broker)
    topic = f"retained/{version}/lamp"

    def new_subscriber_sees() -> list:
        sub = mosquitto.sub(port, topic, qos=1, version=version)
        mosquitto.pub(port, topic, "live-marker", qos=1, version=version)  # not retained: ends the check
        sub.wait_messages(1, lambda m: m.payload == b"live-marker")
        sub.close()
        return [(m.payload, m.retain) for m in sub.received() if m.payload != b"live-marker"]

    mosquitto.pub(port, topic, "on", qos=1, version=version, extra=["-r"])
    assert new_subscriber_sees() == [(b"on", True)]
    mosquitto.pub(port, topic, "off", qos=1, version=version, extra=["-r"])
    assert new_subscriber_sees() == [(b"off", True)]
    mosquitto.pub(port, topic, None, qos=1, version=version, extra=["-r", "-n"])
    assert new_subscriber_sees() == []


def test_retained_message_is_sent_to_an_existing_subscriber_without_the_retain_flag(broker, mosquitto):
    """A subscriber that is already there gets a retained publish as a normal message (retain flag 0)."""
    port = port_of(broker)
    sub = mosquitto.sub(port, "retained/live/#", qos=1)
    mosquitto.pub(port, "retained/live/x", "value", qos=1, extra=["-r"])
    [got] = sub.wait_messages(1)
    assert (got.payload, got.retain) == (b"value", False)
    mosquitto.pub(port, "retained/live/x", None, qos=1, extra=["-r", "-n"])


@pytest.mark.parametrize("version", VERSIONS)
def test_sys_broker_version_is_readable(broker, mosquitto, version):
    """Subscribing to `$SYS/broker/version` answers at once with "tidegate <version>" (flagged retained)."""
    sub = mosquitto.sub(port_of(broker), "$SYS/broker/version", version=version)
    got = sub.wait_messages(1)[0]  # the retained copy comes first; a periodic $SYS update may follow it
    assert got.topic == "$SYS/broker/version"
    assert got.payload.startswith(b"tidegate ")
    assert got.retain


def test_hash_subscription_does_not_receive_sys_topics(broker, mosquitto):
    """`#` never matches `$SYS/...` (MQTT 4.7.2), even while `$SYS` updates are being published."""
    port = port_of(broker)
    everything = mosquitto.sub(port, "#")
    plus = mosquitto.sub(port, "+/broker/uptime")
    sys_sub = mosquitto.sub(port, "$SYS/broker/uptime")
    # The first message is the snapshot sent on SUBSCRIBE; the second is a periodic update (sys_interval_s=1),
    # sent to every $SYS listener in the same pass, so `#` would have received it before the marker below.
    sys_sub.wait_messages(2)
    mosquitto.pub(port, "sys-check/marker", "marker")
    everything.wait_messages(1, lambda m: m.topic == "sys-check/marker")
    plus.close()
    assert not everything.received(lambda m: m.topic.startswith("$")), everything.output()
    assert not plus.received(lambda m: m.topic.startswith("$")), plus.output()


def test_mqtt5_user_properties_and_content_type_reach_the_subscriber(broker, mosquitto):
    """`-D publish user-property k v` and `-D publish content-type` are delivered to an MQTT 5 subscriber."""
    port = port_of(broker)
    sub = mosquitto.sub(port, "props/#", qos=1, version="mqttv5")
    mosquitto.pub(port, "props/a", '{"t": 21}', qos=1, version="mqttv5", extra=[
        "-D", "publish", "user-property", "region", "eu",
        "-D", "publish", "user-property", "unit", "celsius",
        "-D", "publish", "content-type", "application/json"])
    [got] = sub.wait_messages(1)
    assert got.payload == b'{"t": 21}'
    assert got.content_type == "application/json"
    assert sorted(got.user_properties) == [("region", "eu"), ("unit", "celsius")]


def test_mqtt5_message_expiry_is_forwarded_with_the_remaining_lifetime(broker, mosquitto):
    """A message with expiry 600 s reaches a live subscriber with an expiry interval of at most 600 s."""
    port = port_of(broker)
    sub = mosquitto.sub(port, "expiry/live", qos=1, version="mqttv5")
    mosquitto.pub(port, "expiry/live", "m", qos=1, version="mqttv5",
                  extra=["-D", "publish", "message-expiry-interval", "600"])
    [got] = sub.wait_messages(1)
    assert got.expiry and 590 <= int(got.expiry) <= 600


def test_mqtt5_expired_message_is_not_delivered_to_a_returning_session(broker, mosquitto):
    """A persistent v5 session offline longer than a message's expiry interval never gets that message."""
    port = port_of(broker)
    session = ["-c", "-x", "300", "-i", "expiry-session"]
    subscribed = mosquitto.sub(port, "expiry/offline", qos=1, version="mqttv5", extra=[*session, "-E"])
    assert subscribed.wait_exit() == 0  # -E: exit once the SUBACK arrived; the session stays
    published = time.monotonic()
    mosquitto.pub(port, "expiry/offline", "short-lived", qos=1, version="mqttv5",
                  extra=["-D", "publish", "message-expiry-interval", "1"])
    mosquitto.pub(port, "expiry/offline", "long-lived", qos=1, version="mqttv5")
    # The subject of this test is the passing of time: let the 1 s lifetime run out (bounded, with margin).
    wait_until(lambda: time.monotonic() > published + 2.2, 5, "the 1 s message lifetime to pass")
    back = mosquitto.sub(port, "expiry/offline", qos=1, version="mqttv5", wait=False,
                         extra=["-c", "-x", "0", "-i", "expiry-session", "-C", "1"])
    [got] = back.wait_messages(1)
    assert got.payload == b"long-lived", back.output()


def publish_packet_size(topic: str, payload_len: int) -> int:
    """Size of a 3.1.1 QoS 1 PUBLISH: fixed header + remaining length + topic + packet id + payload."""
    remaining = 2 + len(topic.encode()) + 2 + payload_len
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + length_bytes + remaining


def test_payload_at_the_max_packet_size_passes_and_one_byte_more_is_rejected(broker, mosquitto, tmp_path):
    """A PUBLISH exactly at max_packet_size is delivered intact; one byte over is refused (connection closed,
    nothing delivered) and the broker keeps serving the next publisher."""
    port = port_of(broker)
    topic = "big/file"
    size = max(n for n in range(MAX_PACKET - 64, MAX_PACKET) if publish_packet_size(topic, n) <= MAX_PACKET)
    assert publish_packet_size(topic, size) == MAX_PACKET
    fits, too_big = tmp_path / "fits.bin", tmp_path / "too-big.bin"
    fits.write_bytes(bytes(i % 251 for i in range(size)))
    too_big.write_bytes(b"x" * (size + 1))
    sub = mosquitto.sub(port, "big/#", qos=1)

    mosquitto.pub(port, topic, None, qos=1, extra=["-f", str(fits)])
    [got] = sub.wait_messages(1)
    assert got.payload == fits.read_bytes()

    refused = mosquitto.pub(port, topic, None, qos=1, extra=["-f", str(too_big)], check=False)
    assert refused.returncode != 0, "a PUBLISH over the maximum packet size was acknowledged"
    mosquitto.pub(port, "big/after", "still serving", qos=1)
    sub.wait_messages(1, lambda m: m.topic == "big/after")
    assert [len(m.payload) for m in sub.received()] == [size, len(b"still serving")]
