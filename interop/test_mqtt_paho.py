"""paho-mqtt 2.x (3.1.1 and 5) against one `tidegate serve` process: wills, session takeover, shared subscriptions,
MQTT over WebSocket."""

from __future__ import annotations

import pytest

from tidegate.gateway.testing import wait_until

VERSIONS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]
SESSION_TAKEN_OVER = 0x8E


def port_of(broker, name: str = "mqtt") -> int:
    return broker.host_port(name)[1]


@pytest.mark.parametrize("version", VERSIONS)
def test_will_is_published_when_the_socket_drops_but_not_after_a_clean_disconnect(broker, paho_client, raw_mqtt,
                                                                                    version):
    """A client that sends DISCONNECT leaves no will; a client whose TCP connection just closes gets its will
    published to the subscribers of the will topic."""
    port = port_of(broker)
    watcher = paho_client(f"will-watcher-{version}", version=version).connect(port)
    watcher.subscribe(f"wills/{version}/#", qos=1)

    polite = raw_mqtt(port)
    polite.connect(f"will-polite-{version}", level=version, will=(f"wills/{version}/polite", b"polite died"),
                   will_qos=1)
    polite.send(polite.DISCONNECT)
    assert polite.read_until_closed() == []  # the broker has processed the DISCONNECT and closed

    rude = raw_mqtt(port)
    rude.connect(f"will-rude-{version}", level=version, will=(f"wills/{version}/rude", b"rude died"), will_qos=1)
    rude.close()  # no DISCONNECT: the socket just goes away

    watcher.wait_messages(1)
    watcher.publish(f"wills/{version}/marker", b"end", qos=1)  # after the wills: ends the check
    watcher.wait_messages(1, lambda m: m.payload == b"end")
    assert [(m.topic, m.payload) for m in watcher.received()] == [
        (f"wills/{version}/rude", b"rude died"), (f"wills/{version}/marker", b"end")]


@pytest.mark.parametrize("version", VERSIONS)
def test_second_client_with_the_same_id_takes_the_session_over(broker, paho_client, version):
    """Connecting again with a client id in use disconnects the first connection (v5: reason 0x8E, Session taken
    over); the newcomer is the one that gets the session's messages."""
    port = port_of(broker)
    client_id = f"takeover-{version}"
    first = paho_client(client_id, version=version, clean=False, session_expiry=300).connect(port)
    first.subscribe(f"takeover/{version}", qos=1)
    second = paho_client(client_id, version=version, clean=False, session_expiry=0).connect(port)
    assert first.disconnected.wait(15), "the first connection was not closed"
    if version == 5:
        assert first.disconnect_reason.value == SESSION_TAKEN_OVER, first.disconnect_reason
    assert second.connect_flags.session_present
    publisher = paho_client(f"takeover-pub-{version}").connect(port)
    publisher.publish(f"takeover/{version}", b"to the new owner", qos=1)
    [got] = second.wait_messages(1)
    assert got.payload == b"to the new owner"
    assert first.received() == []


@pytest.mark.parametrize("version", VERSIONS)
def test_shared_subscription_gives_each_message_to_exactly_one_member(broker, paho_client, version):
    """Two clients on `$share/workers/jobs/#`: every job published reaches exactly one of them."""
    port = port_of(broker)
    share = f"$share/workers-{version}/jobs/{version}/#"
    members = [paho_client(f"worker-{version}-{i}", version=version).connect(port) for i in range(2)]
    for member in members:
        assert member.subscribe(share, qos=1)[0].value == 1
    publisher = paho_client(f"jobs-pub-{version}", version=version).connect(port)
    jobs = [f"job {i}".encode() for i in range(30)]
    for i, job in enumerate(jobs):
        publisher.publish(f"jobs/{version}/{i % 3}", job, qos=1)

    wait_until(lambda: sum(len(m.received()) for m in members) >= len(jobs), 15, "all jobs delivered")
    delivered = [msg.payload for member in members for msg in member.received()]
    assert sorted(delivered) == sorted(jobs), "a job was lost or delivered twice"


@pytest.mark.parametrize("version", VERSIONS)
def test_mqtt_over_websocket_publishes_and_subscribes(broker, paho_client, version):
    """paho with transport="websockets" on path /mqtt: messages flow WebSocket -> WebSocket and WebSocket <-> TCP."""
    ws_port, tcp_port = port_of(broker, "mqtt_ws"), port_of(broker)
    ws = paho_client(f"ws-{version}", version=version, transport="websockets").connect(ws_port)
    tcp = paho_client(f"ws-tcp-{version}", version=version).connect(tcp_port)
    ws.subscribe(f"ws/{version}/#", qos=1)
    tcp.subscribe(f"ws/{version}/from-ws", qos=1)
    ws.publish(f"ws/{version}/from-ws", b"over websocket", qos=1)
    tcp.publish(f"ws/{version}/from-tcp", b"over tcp", qos=1)
    assert [m.payload for m in tcp.wait_messages(1)] == [b"over websocket"]
    got = ws.wait_messages(2)
    assert sorted((m.topic, m.payload) for m in got) == [
        (f"ws/{version}/from-tcp", b"over tcp"), (f"ws/{version}/from-ws", b"over websocket")]
