"""End to end: subscribers that never read do not grow the broker's memory under a steady publish load.

A real `tidegate serve` process; 100 MQTT clients (QoS 0 and QoS 1 subscriptions, mixed) connect and subscribe
on sockets with a small receive buffer, then never call recv again; one publisher sends a fixed number of 16 KiB
QoS 1 messages, each acknowledged (so stored) before the test measures. The broker's peak resident memory
(VmHWM from /proc/<pid>/status) may grow by at most RSS_GROWTH_BUDGET over its resident memory once the
subscribers are connected.

What bounds it: per connection, the MQTT credit (receive maximum), the stop on pause and the output budget
(`connections.output_budget_bytes`); in the core, the byte budget of the recent-message cache
(`broker.message_cache_bytes`). Worst case: CACHE_BYTES + SUBSCRIBERS x OUTPUT_BUDGET = 33 MiB. The publish
load (64 MiB) and the deliveries it causes (PUBLISHED x SUBSCRIBERS x 16 KiB, 6.4 GB) would exceed the budget
many times over if either were unbounded; with the old count-capped cache (8,192 messages) the 64 MiB published
stayed resident (+67 MiB measured). 16 KiB messages, not 1 KiB: with 1 KiB messages a count cap of 8,192 happens
to be small (+6 MiB measured before and after), which hides the count-vs-bytes bug.

The native test below checks the same for a native consumer with a huge credit.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

from tidegate.adapters.mqtt.codec import (
    Connack,
    Connect,
    MqttCodec,
    Puback,
    Publish,
    Suback,
    Subscribe,
    TopicSubscription,
)
from tidegate.gateway.testing import BrokerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")

SUBSCRIBERS = 100
PUBLISHED = 4_000
BODY = bytes(range(256)) * 64  # 16 KiB
PUBLISH_WINDOW = 64  # QoS 1 publishes in flight
RECEIVE_MAXIMUM = 4  # MQTT credit per subscription: what the broker may hand a client that does not read
CACHE_BYTES = 8 * 1024 * 1024
OUTPUT_BUDGET = 256 * 1024  # per connection, while its socket is paused (then it is closed)
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
        self.sock.sendall(self.codec.encode(Subscribe(1, (TopicSubscription(topic_filter, qos),))))
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
                       "--set", f"listeners.mqtt.receive_maximum={RECEIVE_MAXIMUM}",
                       "--set", f"connections.output_budget_bytes={OUTPUT_BUDGET}", "--log-level", "warning",
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


# ------------------------------------------------------------------------------------------------ native push
NATIVE_BODY = b"n" * 8192
NATIVE_MESSAGES = 2_000  # 16 MiB: twice the default output budget (8 MiB) of a connection


class RawNative:
    """A native connection on a plain socket with a small receive buffer, driven by the client-side codec."""

    def __init__(self, address: tuple[str, int]) -> None:
        from tidegate.adapters.native.codec import NativeCodec, Role

        self.codec = NativeCodec(Role.CLIENT)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(address)
        self.pending: list[object] = []

    def send(self, frame: object) -> None:
        self.sock.sendall(self.codec.encode(frame))

    def read_frames(self) -> list[object]:
        data = self.sock.recv(1 << 16)
        assert data, "the broker closed the connection"
        return self.codec.receive_data(data)

    def expect(self, frame_class: type) -> object:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for i, frame in enumerate(self.pending):
                if isinstance(frame, frame_class):
                    return self.pending.pop(i)
            assert time.monotonic() < deadline, f"no {frame_class.__name__} within {TIMEOUT_S}s"
            self.pending += self.read_frames()


@pytest.fixture
def native_broker(tmp_path):
    with BrokerProcess(tmp_path / "data", "--log-level", "warning") as process:
        yield process


def test_a_native_consumer_with_huge_credit_that_stops_reading_is_paused_not_flooded(native_broker):
    """SUBSCRIBE with a u32 credit, then no reading while 16 MiB are published: the broker stops pushing when the
    socket is full instead of buffering everything (which used to exceed the output budget and drop the
    connection); once the client reads again it gets every message, in order, on the same connection."""
    from tidegate.adapters.native import frames as f
    from tidegate.client import Admin, Producer

    with Admin(address=native_broker.native) as admin:
        admin.create_topic("slow", queues=1)
    consumer = RawNative(native_broker.host_port("native"))
    try:
        consumer.send(f.Hello(request_id=1, client_id="sleeper"))
        consumer.expect(f.HelloOk)
        consumer.send(f.Subscribe(request_id=2, group="g", topic="slow", client_id="sleeper", credit=2**32 - 1,
                                  start="earliest"))
        consumer.expect(f.SubscribeOk)
        with Producer(address=native_broker.native) as producer:
            for _ in range(NATIVE_MESSAGES):
                producer.send("slow", NATIVE_BODY)
        offsets: list[int] = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(offsets) < NATIVE_MESSAGES:
            assert time.monotonic() < deadline, f"{len(offsets)} of {NATIVE_MESSAGES} delivered"
            frames, consumer.pending = consumer.pending + consumer.read_frames(), []
            errors = [x for x in frames if isinstance(x, f.Error)]
            assert not errors, errors[0].message
            offsets += [m.queue_offset for x in frames if isinstance(x, f.Deliver) for m in x.messages]
        assert offsets == list(range(NATIVE_MESSAGES))
    finally:
        consumer.sock.close()
