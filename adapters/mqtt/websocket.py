"""MQTT over WebSocket: binary WebSocket messages carry the MQTT byte stream into the same `MqttProtocol`.

`MqttWebSocketFactory(mqtt_factory, url)` is an autobahn server factory (subprotocols `mqtt`, and `mqttv3.1` for old
clients); `websocket_site(mqtt_factory, url)` is a twisted.web Site serving it at `/mqtt`, ready for `listenTCP`/
`listenSSL`. Each batch of packets the protocol writes becomes one binary message.

Cross-site WebSocket hijacking: browsers let any web page open a WebSocket to any address (127.0.0.1 included) and
only tell the server which page asked, in the Origin header. A handshake whose Origin is another site than the
Host it was sent to is refused with HTTP 403 unless `ws_allowed_origins` lists that origin (or `*`). A request
without Origin comes from a program, not a page, and is accepted; `Origin: null` (sandboxed frames, file: pages)
counts as cross-site.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WrappingWebSocketServerFactory, WrappingWebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.web.resource import Resource
from twisted.web.server import Site

from .server import MqttServerFactory

SUBPROTOCOLS = ("mqtt", "mqttv3.1")
WEBSOCKET_PATH = b"mqtt"


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_allowed(origin: str | None, host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket handshake with this Origin and Host may proceed (see the module docstring).

    `allowed` holds lower-case origins without a trailing `/` (MqttSettings normalizes them). Same origin means
    the Origin's host and port are the Host header's, a port left out being the default of the Origin's scheme.
    """
    if origin is None or not origin.strip():
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in allowed:
        return True
    if not host_header:
        return False
    try:
        page = urlsplit(origin)
        page_port = page.port or _DEFAULT_PORTS.get(page.scheme)
        target = urlsplit("//" + host_header.strip().lower())
        target_port = target.port or _DEFAULT_PORTS.get(page.scheme)
    except ValueError:
        return False  # a malformed port in either header
    if page.scheme not in _DEFAULT_PORTS or not page.hostname:
        return False  # "null" and anything that is not a web origin
    return (page.hostname, page_port) == (target.hostname, target_port)


class MqttWebSocketProtocol(WrappingWebSocketServerProtocol):
    def onConnect(self, request: Any) -> str | None:
        settings = self.factory._factory.settings
        headers = getattr(self, "http_headers", {}) or {}
        if not origin_allowed(headers.get("origin"), headers.get("host"), settings.ws_allowed_origins):
            self.factory._factory.client_log.info(
                "ws-origin-refused", "mqtt websocket %s: refused: Origin %s is not allowed for Host %s",
                request.peer, str(headers.get("origin"))[:100], str(headers.get("host"))[:100])
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "cross-origin WebSocket requests are not allowed")
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
                                maxFramePayloadSize=4 * mqtt_factory.settings.max_packet_size,
                                allowNullOrigin=True)  # decided (403) with every other Origin in onConnect

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
