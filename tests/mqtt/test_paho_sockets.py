"""Real sockets: paho-mqtt clients (3.1.1 and 5, TCP and WebSocket) against the adapter on 127.0.0.1, port 0.

The Twisted reactor runs in a daemon thread; every broker call happens on it (blockingCallFromThread). Waiting uses
threading.Event with timeouts, never sleeps.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread

from tidegate.adapters.mqtt.server import MqttServerFactory
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.adapters.mqtt.websocket import websocket_site
from tidegate.core.security import AllowAllGate
from tidegate.core.testing import make_broker

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def running_reactor():
    if not reactor.running:
        thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        thread.start()
        started = threading.Event()
        reactor.callFromThread(started.set)
        assert started.wait(TIMEOUT), "reactor did not start"
    return reactor


@pytest.fixture
def server(running_reactor):
    def start():
        broker = make_broker(reactor, flush="sync")
        factory = MqttServerFactory(broker, AllowAllGate(), reactor, MqttSettings(sys_interval=0))
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ws = reactor.listenTCP(0, websocket_site(factory, "ws://127.0.0.1/mqtt", reactor), interface="127.0.0.1")
        return broker, factory, tcp, ws

    broker, factory, tcp, ws = blockingCallFromThread(reactor, start)
    yield {"tcp": tcp.getHost().port, "ws": ws.getHost().port, "factory": factory, "broker": broker}

    def stop():
        factory.stop()
        tcp.stopListening()
        ws.stopListening()

    blockingCallFromThread(reactor, stop)


class PahoClient:
    def __init__(self, client_id: str, protocol, transport: str = "tcp") -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  transport=transport)
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.published = threading.Event()
        self.messages: list = []
        self.got_message = threading.Event()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connected.set()
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subscribed.set()
        self.client.on_publish = lambda c, u, mid, rc, props: self.published.set()

        def on_message(c, u, message):
            self.messages.append(message)
            self.got_message.set()

        self.client.on_message = on_message

    def start(self, port: int, **connect_kwargs) -> None:
        self.client.connect("127.0.0.1", port, keepalive=30, **connect_kwargs)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize(("protocol", "transport"), [
    (paho.MQTTv311, "tcp"), (paho.MQTTv5, "tcp"), (paho.MQTTv311, "websockets"), (paho.MQTTv5, "websockets"),
])
def test_paho_connect_subscribe_publish_qos1_receive(server, protocol, transport):
    port = server["ws"] if transport == "websockets" else server["tcp"]
    sub = PahoClient(f"sub-{protocol}-{transport}", protocol, transport)
    pub = PahoClient(f"pub-{protocol}-{transport}", protocol, transport)
    try:
        sub.start(port)
        sub.client.subscribe("paho/#", qos=1)
        assert sub.subscribed.wait(TIMEOUT), "no SUBACK"
        pub.start(port)
        info = pub.client.publish("paho/test", b"hello over the wire", qos=1)
        assert pub.published.wait(TIMEOUT), "no PUBACK"
        assert info.rc == 0
        assert sub.got_message.wait(TIMEOUT), "message not delivered"
        [message] = sub.messages
        assert (message.topic, message.payload, message.qos) == ("paho/test", b"hello over the wire", 1)
    finally:
        sub.stop()
        pub.stop()


def test_paho_v5_user_properties_and_retained(server):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    pub = PahoClient("pub-props", paho.MQTTv5)
    sub = PahoClient("sub-props", paho.MQTTv5)
    try:
        pub.start(server["tcp"])
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("origin", "paho")]
        props.ContentType = "text/plain"
        pub.client.publish("props/x", b"kept", qos=1, retain=True, properties=props)
        assert pub.published.wait(TIMEOUT)
        sub.start(server["tcp"])
        sub.client.subscribe("props/+", qos=1)
        assert sub.got_message.wait(TIMEOUT), "retained message not delivered"
        [message] = sub.messages
        assert message.retain and message.payload == b"kept"
        assert ("origin", "paho") in message.properties.UserProperty
        assert message.properties.ContentType == "text/plain"
    finally:
        pub.stop()
        sub.stop()
