"""MQTT over WebSocket refuses cross-site pages (issue 9 finding: any web page the local user opened could publish
and subscribe to `#` through ws://127.0.0.1:8083/mqtt): Origin must be the Host's or listed in ws_allowed_origins."""

from __future__ import annotations

import base64
import os

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.mqtt.server import MqttServerFactory
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.adapters.mqtt.websocket import origin_allowed, websocket_site
from tidegate.core.security import AllowAllGate
from tidegate.core.testing import make_broker


def handshake(settings: MqttSettings, origin: str | None, host: str = "127.0.0.1:8083") -> bytes:
    """The HTTP answer to one WebSocket upgrade request for /mqtt."""
    clock = MemoryReactorClock()
    factory = MqttServerFactory(make_broker(clock), AllowAllGate(), clock, settings)
    site = websocket_site(factory, "ws://127.0.0.1:8083/mqtt", reactor=clock)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8083))
    transport.protocol = protocol  # autobahn's resource takes the connection over from the HTTP channel
    protocol.makeConnection(transport)
    lines = [b"GET /mqtt HTTP/1.1", b"Host: " + host.encode(), b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)), b"Sec-WebSocket-Version: 13",
             b"Sec-WebSocket-Protocol: mqtt"]
    if origin is not None:
        lines.append(b"Origin: " + origin.encode())
    protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
    return transport.value()


@pytest.mark.parametrize("origin, allowed", [
    (None, True),  # a program, not a browser page
    ("http://127.0.0.1:8083", True),  # the page the broker itself serves
    ("https://evil.example", False),
    ("http://127.0.0.1:9999", False),  # another local service's page
    ("null", False),
])
def test_cross_origin_handshakes_are_refused_with_403_by_default(origin, allowed):
    answer = handshake(MqttSettings(sys_interval=0), origin)
    assert answer.startswith(b"HTTP/1.1 101") is allowed, answer[:200]
    if not allowed:
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]


def test_listed_origins_are_allowed_and_star_allows_any():
    listed = MqttSettings(sys_interval=0, ws_allowed_origins="https://app.example.com/, https://ops.example.com")
    assert listed.ws_allowed_origins == ("https://app.example.com", "https://ops.example.com")
    assert handshake(listed, "https://APP.example.com").startswith(b"HTTP/1.1 101")
    assert handshake(listed, "https://evil.example").startswith(b"HTTP/1.1 403")
    assert handshake(MqttSettings(sys_interval=0, ws_allowed_origins="*"), "https://any.example").startswith(
        b"HTTP/1.1 101")


@pytest.mark.parametrize("origin, host, ok", [
    ("http://localhost", "localhost", True),  # default ports on both sides
    ("https://broker.example", "broker.example", True),
    ("https://broker.example", "broker.example:443", True),
    ("http://broker.example", "broker.example:8083", False),
    ("http://broker.example:8083", "broker.example:8083", True),
    ("http://broker.example:bad", "broker.example", False),
    ("ftp://broker.example", "broker.example", False),
    ("http://a.example", "", False),
])
def test_same_origin_compares_host_and_port(origin, host, ok):
    assert origin_allowed(origin, host, ()) is ok
