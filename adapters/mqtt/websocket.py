"""MQTT over WebSocket: binary WebSocket messages carry the MQTT byte stream into the same `MqttProtocol`.

`MqttWebSocketFactory(mqtt_factory, url)` is an autobahn server factory (subprotocols `mqtt`, and `mqttv3.1` for old
clients); `websocket_site(mqtt_factory, url)` is a twisted.web Site serving it at `/mqtt`, ready for `listenTCP`/
`listenSSL`. Each batch of packets the protocol writes becomes one binary message.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WrappingWebSocketServerFactory, WrappingWebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.web.resource import Resource
from twisted.web.server import Site

from .server import MqttServerFactory

SUBPROTOCOLS = ("mqtt", "mqttv3.1")
WEBSOCKET_PATH = b"mqtt"


class MqttWebSocketProtocol(WrappingWebSocketServerProtocol):
    def onConnect(self, request: Any) -> str | None:
        for offered in request.protocols:
            if offered in SUBPROTOCOLS:
                self._binaryMode = True
                return offered
        if not request.protocols:
            self._binaryMode = True  # lenient: some clients send no subprotocol at all
            return None
        raise ConnectionDeny(ConnectionDeny.NOT_ACCEPTABLE, "MQTT over WebSocket needs the 'mqtt' subprotocol")

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Back-pressure comes from the TCP (or TLS) transport under the WebSocket framing. Under twisted.web the
        HTTP channel registered itself as that transport's producer and never unregisters: the WebSocket resource
        took the transport over, so the channel's slot is stale. Free it first, or the registration fails (and the
        MQTT connection never hears "pause" while its buffer grows)."""
        self.transport.unregisterProducer()
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()


class MqttWebSocketFactory(WrappingWebSocketServerFactory):
    def __init__(self, mqtt_factory: MqttServerFactory, url: str = "ws://localhost/mqtt", reactor: Any = None) -> None:
        super().__init__(mqtt_factory, url, reactor=reactor, enableCompression=False)
        self._subprotocols = list(SUBPROTOCOLS)
        self.setProtocolOptions(maxMessagePayloadSize=4 * mqtt_factory.settings.max_packet_size,
                                maxFramePayloadSize=4 * mqtt_factory.settings.max_packet_size)

    def buildProtocol(self, addr: Any) -> MqttWebSocketProtocol:
        proto = MqttWebSocketProtocol()
        proto.factory = self
        proto._proto = self._factory.buildProtocol(addr)
        proto._proto.transport = proto
        return proto


def websocket_resource(mqtt_factory: MqttServerFactory, url: str = "ws://localhost/mqtt",
                       reactor: Any = None) -> WebSocketResource:
    """A twisted.web resource speaking MQTT over WebSocket (mount it at `/mqtt`)."""
    return WebSocketResource(MqttWebSocketFactory(mqtt_factory, url, reactor))


def websocket_site(mqtt_factory: MqttServerFactory, url: str = "ws://localhost/mqtt", reactor: Any = None) -> Site:
    """A Site serving MQTT over WebSocket at `/mqtt`."""
    root = Resource()
    root.putChild(WEBSOCKET_PATH, websocket_resource(mqtt_factory, url, reactor))
    return Site(root)
