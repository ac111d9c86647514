"""paho-mqtt (3.1.1 and 5) sessions and retained messages across broker restarts: a clean stop (SIGTERM) and kill -9.

With the default `sync` flush a PUBACK means "on disk", so a persistent session's QoS 1 backlog and the retained
messages must be there after either kind of restart. Every test owns its broker (ports change on restart).
"""

from __future__ import annotations

import pytest

VERSIONS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]
RESTARTS = ["clean-restart", "kill-9"]


def restart(process, how: str) -> None:
    if how == "kill-9":
        process.kill()
    else:
        assert process.stop() == 0, process.log()[-2000:]
    process.start()


@pytest.mark.parametrize("how", RESTARTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_offline_qos1_messages_of_a_persistent_session_survive_a_restart(broker_factory, paho_client, version, how):
    """A persistent session (3.1.1 clean_session=False / 5 clean_start=False + Session Expiry Interval) subscribed at
    QoS 1 goes offline; QoS 1 messages published then are delivered, in order, when it reconnects after the broker
    was restarted."""
    process = broker_factory()
    client_id = f"durable-{version}-{how}"
    topic = f"durable/{version}/{how}"

    def session():
        return paho_client(client_id, version=version, clean=False, session_expiry=3600)

    first = session().connect(process.host_port("mqtt")[1])
    assert first.subscribe(topic, qos=1)[0].value == 1
    first.disconnect()

    publisher = paho_client(f"pub-{client_id}", version=version).connect(process.host_port("mqtt")[1])
    payloads = [f"offline message {i}".encode() for i in range(5)]
    for payload in payloads:
        publisher.publish(topic, payload, qos=1)  # returns once PUBACKed: durable under sync flush
    publisher.disconnect()

    restart(process, how)

    back = session().connect(process.host_port("mqtt")[1])
    assert back.connect_flags.session_present, "the persistent session was lost by the restart"
    got = back.wait_messages(len(payloads))
    assert [m.payload for m in got] == payloads
    assert all(m.qos == 1 and m.topic == topic for m in got)


@pytest.mark.parametrize("how", RESTARTS)
def test_retained_messages_survive_a_restart(broker_factory, paho_client, how):
    """A retained message (and its replacement/clearing) is what a new subscriber gets after the broker restarted."""
    process = broker_factory()
    publisher = paho_client(f"retain-pub-{how}").connect(process.host_port("mqtt")[1])
    publisher.publish("keep/lamp", b"first", qos=1, retain=True)
    publisher.publish("keep/lamp", b"on", qos=1, retain=True)  # replaces "first"
    publisher.publish("keep/door", b"open", qos=1, retain=True)
    publisher.publish("keep/door", b"", qos=1, retain=True)  # clears
    publisher.disconnect()

    restart(process, how)

    subscriber = paho_client(f"retain-sub-{how}", version=5).connect(process.host_port("mqtt")[1])
    subscriber.subscribe("keep/#", qos=1)
    [got] = subscriber.wait_messages(1)
    assert (got.topic, got.payload, got.retain) == ("keep/lamp", b"on", True)
    subscriber.publish("keep/marker", b"end", qos=1)  # a live message after the retained ones ends the check
    subscriber.wait_messages(1, lambda m: m.topic == "keep/marker")
    assert [m.topic for m in subscriber.received()] == ["keep/lamp", "keep/marker"]


def test_unacknowledged_deliveries_are_redelivered_after_kill_9_and_not_after_puback(broker_factory, paho_client,
                                                                                     raw_mqtt):
    """A persistent 3.1.1 session that received QoS 1 messages but never PUBACKed them gets them again after the
    broker was killed (-9) and restarted; once PUBACKed they are not delivered a third time."""
    process = broker_factory()
    session_flags = 0x00  # clean session = 0

    def subscribe_packet(raw, topic: str) -> bytes:
        return raw.packet(0x82, b"\x00\x01" + raw.mqtt_str(topic) + b"\x01")

    def publishes(raw, count: int) -> list[tuple[int, bytes, bytes]]:
        out = []
        for _ in range(count):
            got = raw.read_packet()
            assert got is not None and got[0] & 0xF0 == 0x30, f"expected PUBLISH, got {got}"
            first, body = got
            length = int.from_bytes(body[:2], "big")
            topic, packet_id, payload = body[2:2 + length], body[2 + length:4 + length], body[4 + length:]
            out.append(((first >> 1) & 3, packet_id, topic + b" " + payload))
        return out

    raw = raw_mqtt(process.host_port("mqtt")[1])
    raw.connect("never-acks", 4, flags=session_flags)
    raw.send(subscribe_packet(raw, "unacked/#"))
    assert raw.read_packet() == (0x90, b"\x00\x01\x01")  # SUBACK, QoS 1 granted
    publisher = paho_client("unacked-pub").connect(process.host_port("mqtt")[1])
    publisher.publish("unacked/a", b"one", qos=1)
    publisher.publish("unacked/b", b"two", qos=1)
    publisher.disconnect()
    first = publishes(raw, 2)
    assert [(qos, text) for qos, _, text in first] == [(1, b"unacked/a one"), (1, b"unacked/b two")]

    process.kill()
    raw.close()
    process.start()

    again = raw_mqtt(process.host_port("mqtt")[1])
    assert again.connect("never-acks", 4, flags=session_flags) == (0x20, b"\x01\x00")  # session present
    redelivered = publishes(again, 2)
    assert [text for _, _, text in redelivered] == [b"unacked/a one", b"unacked/b two"]
    for _, packet_id, _ in redelivered:
        again.send(b"\x40\x02" + packet_id)  # PUBACK
    again.send(again.DISCONNECT)
    assert again.read_until_closed() == []

    last = raw_mqtt(process.host_port("mqtt")[1])
    assert last.connect("never-acks", 4, flags=session_flags) == (0x20, b"\x01\x00")
    marker = paho_client("unacked-marker").connect(process.host_port("mqtt")[1])
    marker.publish("unacked/marker", b"end", qos=1)
    assert [text for _, _, text in publishes(last, 1)] == [b"unacked/marker end"]
