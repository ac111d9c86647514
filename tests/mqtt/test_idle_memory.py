"""What an idle MQTT connection costs the broker's Python heap, pinned (issue 10: ≤ 4 KiB of broker RSS each).

Measured with tracemalloc over in-memory transports: N MQTT 3.1.1 clean-session connections (keep alive 600, as
`tidegate bench mqtt-conns` opens them) are made and accepted, and what the broker allocated for them and still
holds is divided by N. The fake transports and the clients' bytes are made before the first snapshot and the fake
transport's own allocations are left out, so what is counted is the broker's: the protocol object, its codec, the
core and MQTT sessions, the outbound half, the idle deadline, the factory's tables.

Over real sockets Twisted's TCP connection, the socket object and the peer addresses add about 0.8 KB per
connection (`interop/idle_memory_profile.py` measures that); the ceiling below keeps the broker's own share small
enough that the whole stays under 4 KiB of RSS. It is a size ceiling, not a timing: it fails only when something
starts being allocated per connection.
"""

from __future__ import annotations

import gc
import tracemalloc

from twisted.internet.testing import StringTransport

from tidegate.adapters.mqtt.codec import Connect, MqttCodec

from .conftest import Env

CONNECTIONS = 500
# Heap bytes per idle connection over in-memory transports, broker side. 2026-12-03: 6,025 before the idle-memory
# work (1.6 KB of it the protocol's attribute dict), 2,346 after it.
HEAP_CEILING_PER_CONNECTION = 3072
IDLE_KEEP_ALIVE = 600


def idle_heap_per_connection(env: Env, count: int) -> tuple[float, list[tracemalloc.Statistic]]:
    """Open `count` idle connections on `env`; (heap bytes per connection, the largest allocation sites)."""
    codec = MqttCodec(server_side=False)
    codec.protocol_level = 4
    connects = [codec.encode(Connect(f"idle-{i}", protocol_level=4, clean_start=True, keep_alive=IDLE_KEEP_ALIVE))
                for i in range(count)]
    transports = [StringTransport() for _ in range(count)]
    protocols = [None] * count
    warm = env.client()  # first-use caches (codec tables, metrics labels) are not per connection
    warm.connect("warm-up")
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        for i in range(count):
            protocol = env.factory.buildProtocol(("127.0.0.1", 40000 + i))
            protocol.makeConnection(transports[i])
            protocol.dataReceived(connects[i])
            protocols[i] = protocol
        for transport in transports:
            transport.clear()  # the CONNACKs are the client's bytes, not the broker's memory
        env.pump()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert all(p.state == "connected" for p in protocols)
    fake = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "*/twisted/internet/testing.py"),
            tracemalloc.Filter(False, "*/_pyio.py")]
    stats = after.filter_traces(fake).compare_to(before.filter_traces(fake), "lineno")
    return sum(s.size_diff for s in stats) / count, stats


def test_an_idle_mqtt_connection_costs_the_broker_at_most_3_kib_of_heap():
    env = Env()
    per_connection, stats = idle_heap_per_connection(env, CONNECTIONS)
    largest = "\n".join(f"{s.size_diff / CONNECTIONS:7.0f} B  {s.traceback}" for s in stats[:15])
    assert per_connection <= HEAP_CEILING_PER_CONNECTION, (
        f"{per_connection:.0f} bytes of broker heap per idle connection (ceiling {HEAP_CEILING_PER_CONNECTION}); "
        f"largest per connection:\n{largest}")


def test_idle_connections_share_one_reactor_timer_for_their_keep_alive():
    env = Env()
    first = env.client()
    first.send(Connect("first", protocol_level=4, keep_alive=60))
    timers = len(env.clock.getDelayedCalls())
    for i in range(20):
        env.client().send(Connect(f"c{i}", protocol_level=4, keep_alive=60))
    assert len(env.factory.idle_timers) == 21
    assert len(env.clock.getDelayedCalls()) == timers  # no reactor timer per connection


def test_an_idle_connection_makes_its_inbound_half_only_when_the_client_sends_something_for_it():
    env = Env()
    client = env.client()
    client.connect("lazy")
    assert client.protocol.inbound is None and client.protocol.outbound is not None
    client.send_raw(b"\x30\x05\x00\x01tab")  # PUBLISH QoS 0 to "t" with payload "ab"
    assert client.protocol.inbound is not None and not client.closed
