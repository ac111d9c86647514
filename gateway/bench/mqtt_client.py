"""A lean, blocking MQTT client for the bench: plain sockets, our own sans-IO codec (`adapters/mqtt/codec.py`) for
CONNECT/SUBSCRIBE and for decoding everything the broker sends, and a prebuilt PUBLISH template per connection
(checked once against `MqttCodec.encode`) so that a publish costs a `struct.pack` and a join, not a dataclass and
an encoder call. A paho client spends tens of µs of Python per message and would measure itself, not the broker;
the loops built on this one (`mqtt.py`, `mqtt_conns.py`) cost a few µs.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from .driver import BenchError

CONNECT_TIMEOUT_S = 10.0
RECV_BYTES = 1 << 18
IDLE_KEEP_ALIVE = 600

PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x62  # PUBREL has the fixed flags 0010
PUBCOMP = 0x70


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BenchError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def ack_packets(first_byte: int) -> list[bytes]:
    """The 4-byte acknowledgement packet (no reason code: success) for every packet id, prebuilt."""
    head = bytes((first_byte, 2))
    return [head + pid.to_bytes(2, "big") for pid in range(65536)]


class MqttClient:
    """One blocking MQTT connection speaking through `MqttCodec(server_side=False)`."""

    def __init__(self, address: str, client_id: str, level: int, *, keep_alive: int,
                 timeout: float = CONNECT_TIMEOUT_S, receive_maximum: int = 65535) -> None:
        from tidegate.adapters.mqtt.codec import Connack, Connect, MqttCodec, Properties
        from tidegate.adapters.mqtt.properties import NO_PROPERTIES

        self.level = level
        self.codec = MqttCodec(server_side=False)
        self.sock = socket.create_connection(split_address(address), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        properties = Properties(receive_maximum=receive_maximum) if level == 5 else NO_PROPERTIES
        self.sock.sendall(self.codec.encode(Connect(client_id, protocol_level=level, clean_start=True,
                                                    keep_alive=keep_alive, properties=properties)))
        self.pending: list[Any] = []
        connack = self.expect(Connack, timeout)
        if connack.reason_code:
            raise BenchError(f"CONNACK refused the connection: {connack.reason_code!r}")
        self.server_receive_maximum = (connack.properties.receive_maximum or 65535) if level == 5 else 65535
        self.sock.settimeout(None)

    def read(self) -> list[Any]:
        data = self.sock.recv(RECV_BYTES)
        if not data:
            raise ConnectionError("the broker closed the connection")
        return self.codec.receive_data(data)

    def expect(self, packet_class: type, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for i, packet in enumerate(self.pending):
                if isinstance(packet, packet_class):
                    del self.pending[i]
                    return packet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {packet_class.__name__} within {timeout}s")
            self.sock.settimeout(remaining)
            self.pending += self.read()

    def subscribe(self, topic_filter: str, qos: int) -> None:
        from tidegate.adapters.mqtt.codec import Suback, Subscribe, TopicSubscription

        self.sock.settimeout(CONNECT_TIMEOUT_S)
        self.sock.sendall(self.codec.encode(Subscribe(1, (TopicSubscription(topic_filter, qos),))))
        suback = self.expect(Suback, CONNECT_TIMEOUT_S)
        self.sock.settimeout(None)
        if any(code >= 0x80 for code in suback.reason_codes):
            raise BenchError(f"SUBACK refused {topic_filter!r}: {[int(c) for c in suback.reason_codes]}")

    def publish_template(self, topic: str, qos: int, size: int) -> tuple[bytes, bytes]:
        """(head, tail) so that a PUBLISH is head + [packet id] + tail + payload, payload being `size` bytes."""
        from tidegate.adapters.mqtt.codec import Publish
        from tidegate.adapters.mqtt.properties import encode_variable_byte_integer

        name = topic.encode()
        tail = b"\x00" if self.level == 5 else b""  # MQTT 5: empty property list
        remaining = 2 + len(name) + (2 if qos else 0) + len(tail) + size
        head = bytes((0x30 | (qos << 1),)) + encode_variable_byte_integer(remaining) + len(name).to_bytes(2, "big") \
            + name
        sample = bytes(range(256)) * (size // 256 + 1)
        sample = sample[:size]
        expected = self.codec.encode(Publish(topic, sample, qos, packet_id=7 if qos else None))
        built = head + ((7).to_bytes(2, "big") if qos else b"") + tail + sample
        if built != expected:  # the shortcut must produce exactly what our codec would
            raise AssertionError("PUBLISH template does not match MqttCodec.encode")
        return head, tail

    def close(self) -> None:
        from tidegate.adapters.mqtt.codec import Disconnect

        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(self.codec.encode(Disconnect()))
        except OSError:
            pass
        self.sock.close()
