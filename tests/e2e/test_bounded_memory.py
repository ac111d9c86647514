"""End to end: subscribers that never read do not grow the broker's memory under a steady publish load.

A real `tidegate serve` process; 100 MQTT clients (QoS 0 and QoS 1 subscriptions, mixed) connect and subscribe
on sockets with a small receive buffer, then never call recv again; one publisher sends a fixed number of 1 KiB
QoS 1 messages, each acknowledged (so stored) before the test measures. The broker's peak resident memory
(VmHWM from /proc/<pid>/status) may grow by at most RSS_GROWTH_BUDGET over its resident memory once the
subscribers are connected.

What bounds it: per connection, the MQTT credit (receive maximum) and the stop on pause; in the core, the
recent-message cache's byte budget (`broker.message_cache_bytes`). The publish load (64 MiB) and the deliveries
it causes (PUBLISHED x SUBSCRIBERS x 16 KiB, 6.4 GB) would exceed the budget many times over if either were
unbounded; with a count-capped cache (8,192 messages) the 64 MiB published stayed resident. 16 KiB messages,
not 1 KiB: with 1 KiB messages a count cap of 8,192 happens to be small, which hides the count-vs-bytes bug.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

from tidegate.adapters.mqtt.codec import Connack, Connect, MqttCodec, Puback, Publish, Suback, Subscribe, Subscription
from tidegate.gateway.testing import BrokerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")

SUBSCRIBERS = 100
PUBLISHED = 4_000
BODY = bytes(range(256)) * 64  # 16 KiB
PUBLISH_WINDOW = 64  # QoS 1 publishes in flight
RECEIVE_MAXIMUM = 4  # MQTT credit per subscription: what the broker may hand a client that does not read
CACHE_BYTES = 8 * 1024 * 1024
RSS_GROWTH_BUDGET = 40 * 1024 * 1024
SMALL_RCVBUF = 4096
TIMEOUT_S = 60.0


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class RawMqtt:
    """An MQTT 3.1.1 connection on a plain socket whose receive buffer is set before it connects (so the TCP
    window it announces stays small)."""

    def __init__(self, address: tuple[str, int], client_id: str, rcvbuf: int = 0) -> None:
        self.codec = MqttCodec(server_side=False)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(address)
        self.pending: list[object] = []
        self.sock.sendall(self.codec.encode(Connect(client_id, protocol_level=4, clean_start=True, keep_alive=0)))
        assert self.expect(Connack).reason_code == 0

    def expect(self, packet_class: type) -> object:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for i, packet in enumerate(self.pending):
                if isinstance(packet, packet_class):
                    return self.pending.pop(i)
            assert time.monotonic() < deadline, f"no {packet_class.__name__} within {TIMEOUT_S}s"
            data = self.sock.recv(1 << 16)
            assert data, "the broker closed the connection"
            self.pending += self.codec.receive_data(data)

    def subscribe(self, topic_filter: str, qos: int) -> None:
        self.sock.sendall(self.codec.encode(Subscribe(1, (Subscription(topic_filter, qos),))))
        suback = self.expect(Suback)
        assert [int(c) for c in suback.reason_codes] == [qos]

    def close(self) -> None:
        self.sock.close()


def publish_acknowledged(publisher: RawMqtt, topic: str, count: int) -> int:
    """Publish `count` QoS 1 messages, at most PUBLISH_WINDOW unacknowledged; returns how many were PUBACKed."""
    acked = sent = 0
    while acked < count:
        burst = []
        while sent < count and sent - acked < PUBLISH_WINDOW:
            sent += 1
            burst.append(publisher.codec.encode(Publish(topic, BODY, 1, packet_id=sent % 65535 + 1)))
        if burst:
            publisher.sock.sendall(b"".join(burst))
        publisher.expect(Puback)
        acked += 1
    return acked


@pytest.fixture
def broker(tmp_path):
    with BrokerProcess(tmp_path / "data", "--set", f"broker.message_cache_bytes={CACHE_BYTES}",
                       "--set", f"listeners.mqtt.receive_maximum={RECEIVE_MAXIMUM}", "--log-level", "warning",
                       listeners=("mqtt",)) as process:
        yield process


def test_a_hundred_subscribers_that_never_read_keep_broker_memory_bounded(broker):
    pid = broker.process.pid
    address = broker.host_port("mqtt")
    subscribers = []
    try:
        for i in range(SUBSCRIBERS):
            client = RawMqtt(address, f"sleeper-{i}", rcvbuf=SMALL_RCVBUF)
            client.subscribe("load/#", qos=i % 2)  # half QoS 0, half QoS 1
            subscribers.append(client)
        publisher = RawMqtt(address, "publisher")
        # Warm-up: the first deliveries fill every subscriber's socket buffers (kernel memory, not RSS) and
        # allocate the broker's per-connection and per-message structures once.
        publish_acknowledged(publisher, "load/warm", 100)
        rss_before = proc_status_kib(pid, "VmRSS") * 1024
        assert publish_acknowledged(publisher, "load/steady", PUBLISHED) == PUBLISHED
        peak = proc_status_kib(pid, "VmHWM") * 1024
        rss_after = proc_status_kib(pid, "VmRSS") * 1024
        growth = max(peak, rss_after) - rss_before
        print(f"broker RSS {rss_before >> 20} MiB before, {rss_after >> 20} MiB after, peak {peak >> 20} MiB: "
              f"growth {growth >> 20} MiB for {PUBLISHED} x {len(BODY)} B to {SUBSCRIBERS} non-reading subscribers")
        assert growth < RSS_GROWTH_BUDGET
        publisher.close()
    finally:
        for client in subscribers:
            client.close()
    assert broker.process.poll() is None  # still serving
