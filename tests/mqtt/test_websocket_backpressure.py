"""MQTT over a real WebSocket connection on 127.0.0.1: a full socket buffer pauses the MQTT connection.

Under twisted.web the HTTP channel is the TCP transport's registered producer; the MQTT protocol behind the
WebSocket wrapper must take that slot, or it never hears "pause" and keeps writing into the buffer. The reactor runs
in a daemon thread; waiting uses events with timeouts, never sleeps.
"""

from __future__ import annotations

import base64
import datetime
import os
import socket
import ssl
import struct
import threading

import pytest
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread

from tidegate.adapters.mqtt.codec import Connect, MqttCodec
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


def self_signed_context_factory(directory) -> object:
    """A Twisted TLS server context with a throw-away self-signed certificate for 127.0.0.1."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet.ssl import DefaultOpenSSLContextFactory

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return DefaultOpenSSLContextFactory(str(key_file), str(cert_file))


@pytest.fixture(params=["ws", "wss"])
def ws_server(request, running_reactor, tmp_path):
    tls = request.param == "wss"
    context = self_signed_context_factory(tmp_path) if tls else None

    def start():
        broker = make_broker(reactor, flush="sync")
        factory = MqttServerFactory(broker, AllowAllGate(), reactor, MqttSettings(sys_interval=0))
        site = websocket_site(factory, f"{request.param}://127.0.0.1/mqtt", reactor)
        if tls:
            port = reactor.listenSSL(0, site, context, interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        return factory, port

    factory, port = blockingCallFromThread(reactor, start)
    yield factory, port.getHost().port, tls

    def stop():
        factory.stop()
        return port.stopListening()

    blockingCallFromThread(reactor, stop)


def masked_binary_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + body


def open_websocket_mqtt(port: int, tls: bool) -> socket.socket:
    """A WebSocket MQTT client that sends CONNECT and then never reads again."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a throw-away certificate: only the transport under test matters
        sock = context.wrap_socket(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
                  ).encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, "server closed during the WebSocket handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    codec = MqttCodec(server_side=False)
    sock.sendall(masked_binary_frame(codec.encode(Connect("ws-slow", protocol_level=4))))
    return sock


def test_a_full_websocket_socket_buffer_pauses_the_mqtt_connection(ws_server):
    factory, port, tls = ws_server
    sock = open_websocket_mqtt(port, tls)
    try:
        connected = threading.Event()

        def poll() -> None:
            if any(c.state == "connected" for c in factory.connections):
                connected.set()
            else:
                reactor.callLater(0.01, poll)

        reactor.callFromThread(poll)
        assert connected.wait(TIMEOUT), "the WebSocket MQTT connection was not accepted"

        def flood() -> tuple[bool, int]:
            (conn,) = [c for c in factory.connections if c.state == "connected"]
            written = 0
            chunk = b"\xd0\x00" * 16384  # PINGRESPs: 32 KB per write
            while not conn.paused and written < 4 * 1024 * 1024:
                conn.write(chunk)
                written += len(chunk)
            return conn.paused, written

        paused, written = blockingCallFromThread(reactor, flood)
        assert paused, f"{written} bytes written into a socket nobody reads and the MQTT connection never paused"
        assert written <= 1024 * 1024
    finally:
        sock.close()
