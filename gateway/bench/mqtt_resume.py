"""Broker CPU per resumed persistent MQTT session after a restart, in one process, without sockets.

`python -m tidegate.gateway.bench.mqtt_resume [--sessions N] [--repeat R]` prepares N persistent sessions
(CleanSession=0, one QoS 1 subscription each, a QoS 1 message queued for every `--queued-every`-th one) on a real
`FileMessageStore` and `SqliteMetadataStore` in a temp dir, behind the gate `tidegate serve` uses (`PolicyGate`,
anonymous clients from loopback), closes everything, opens a new broker on the same directory, and measures the
CPU time (`time.process_time`) of N clients reconnecting with CleanSession=0 over in-memory transports: protocol
construction, CONNECT, login, session attach, CONNACK, the session queue's core subscription and the write-behind
row flush at the end of the turn. It checks that every CONNACK has Session Present and that every queued message
is delivered after the resume.

Why: `tidegate bench mqtt-storm --restart` measures the same thing through real sockets, but on a shared 2-core
machine its broker CPU moves ±20 % from run to run, and it includes Twisted's accept and transport set-up. This
harness is deterministic in what it does and runs under `valgrind --tool=callgrind` (small N) for instruction
counts: `valgrind --tool=callgrind --toggle-collect=starmap_next` collects only the measured part. The broker
start-up (loading N stored sessions) is reported separately (`load`).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from typing import Any

from tidegate.gateway.app import freeze_startup_objects, tune_garbage_collector
from tidegate.gateway.bench.arguments import at_least
from tidegate.gateway.config import ProcessSection


class ResumeRun:
    """One prepare / restart / resume cycle over `data_dir`; `stats` has the CPU seconds of each phase."""

    def __init__(self, data_dir: str, sessions: int, queued_every: int = 10, *, serve_gc: bool = False) -> None:
        self.data_dir = data_dir
        self.serve_gc = serve_gc  # the garbage collector set up as `tidegate serve` does (threshold, freeze)
        self.count = sessions
        self.queued_every = queued_every
        self.stats: dict[str, float] = {}

    def client_id(self, index: int) -> str:
        return f"resume-{index}"

    def _open(self) -> tuple[Any, Any, Any, Any]:
        """(clock, broker, metadata, factory) over the data dir, as `tidegate serve` builds them (inline fsync)."""
        from twisted.internet.defer import fail, succeed

        from tidegate.adapters.mqtt.server import MqttServerFactory
        from tidegate.adapters.mqtt.settings import MqttSettings
        from tidegate.core.broker import Broker, BrokerConfig
        from tidegate.core.flush import Durability
        from tidegate.core.security.policy_gate import open_policy_gate
        from tidegate.core.storage.filestore import FileMessageStore
        from tidegate.core.storage.layout import StoreLayout
        from tidegate.core.storage.metadata import SqliteMetadataStore

        def run_inline(work: Any) -> Any:
            try:
                return succeed(work())
            except Exception as exc:  # noqa: BLE001 - handed to the Durability's errback, as deferToThread would
                return fail(exc)

        clock = HeapClock(1_700_000_000.0)
        store = FileMessageStore(self.data_dir, clock_ms=lambda: int(clock.seconds() * 1000))
        metadata = SqliteMetadataStore(StoreLayout(self.data_dir).meta_db_path)
        durability = Durability(store, clock, run_in_thread=run_inline, mode="sync")
        broker = Broker(store, metadata, clock, durability, BrokerConfig())
        gate = open_policy_gate(metadata, clock)
        factory = MqttServerFactory(broker, gate, clock, MqttSettings(sys_interval=0))
        return clock, broker, metadata, factory

    @staticmethod
    def _close(broker: Any, metadata: Any, factory: Any) -> None:
        factory.stop()
        broker.close()
        metadata.close()

    def _client(self, index: int, clean: bool) -> tuple[Any, Any, bytes]:
        """A client's codec, transport and encoded CONNECT, made before the measured part."""
        from twisted.internet.testing import StringTransport

        from tidegate.adapters.mqtt.codec import Connect, MqttCodec

        codec = MqttCodec(server_side=False)
        codec.protocol_level = 4
        connect = codec.encode(Connect(self.client_id(index), protocol_level=4, clean_start=clean, keep_alive=600))
        return codec, StringTransport(peerAddress=_Peer("127.0.0.1", 40000 + index % 20000)), connect

    @staticmethod
    def _connect(factory: Any, client: tuple[Any, Any, bytes]) -> tuple[Any, Any, Any]:
        codec, transport, connect = client
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        protocol.dataReceived(connect)
        return protocol, transport, codec

    def prepare(self) -> None:
        """N persistent sessions with one QoS 1 subscription each; a message queued for every `queued_every`-th."""
        from tidegate.adapters.mqtt.packets import Disconnect, Publish, Subscribe, TopicSubscription

        clock, broker, metadata, factory = self._open()
        connections = []
        for index in range(self.count):
            protocol, transport, codec = self._connect(factory, self._client(index, clean=False))
            protocol.dataReceived(codec.encode(Subscribe(1, (TopicSubscription(f"bench/resume/{index}", 1),))))
            connections.append((protocol, transport, codec))
        clock.advance(0)
        for protocol, _transport, codec in connections:
            protocol.dataReceived(codec.encode(Disconnect()))
            protocol.connectionLost(None)
        clock.advance(0)
        if self.queued_every:
            publisher, out, codec = self._connect(factory, self._client(self.count, clean=True))
            packet_id = 0
            for index in range(0, self.count, self.queued_every):
                packet_id = packet_id % 65535 + 1
                publisher.dataReceived(codec.encode(Publish(f"bench/resume/{index}", b"queued", 1,
                                                            packet_id=packet_id)))
            clock.advance(0)
            clock.advance(0)
            publisher.dataReceived(codec.encode(Disconnect()))
            publisher.connectionLost(None)
        clock.advance(0)
        self._close(broker, metadata, factory)

    def resume(self) -> None:
        """Restart on the same directory and reconnect every session; fills `stats` and checks the outcome."""
        from tidegate.adapters.mqtt.packets import Connack, Publish

        started = time.process_time()
        clock, broker, metadata, factory = self._open()
        self.stats["load"] = time.process_time() - started
        if self.serve_gc:
            freeze_startup_objects(ProcessSection())  # what `tidegate serve` does once started
        clients = [self._client(index, clean=False) for index in range(self.count)]
        started = time.process_time()
        # through `itertools.starmap` so that `valgrind --tool=callgrind --toggle-collect=starmap_next` counts
        # the instructions of this part only
        connections = list(itertools.starmap(self._connect, ((factory, client) for client in clients)))
        # the end of the reactor turn: write-behind rows, deliveries of queued messages
        list(itertools.starmap(clock.advance, [(0,)]))
        self.stats["resume"] = time.process_time() - started
        present = delivered = 0
        for _protocol, transport, codec in connections:
            for packet in codec.receive_data(transport.value()):
                if isinstance(packet, Connack):
                    present += packet.session_present
                elif isinstance(packet, Publish):
                    delivered += 1
        expected = len(range(0, self.count, self.queued_every)) if self.queued_every else 0
        for protocol, _transport, _codec in connections:
            protocol.connectionLost(None)
        clock.advance(0)
        self._close(broker, metadata, factory)
        if present != self.count or delivered != expected:
            raise SystemExit(f"resume: {present} of {self.count} with Session Present, {delivered} of {expected} "
                             "queued messages delivered")


class HeapClock:
    """An `IReactorTime` whose time moves only on `advance`, with its calls in a heap: Twisted's
    `MemoryReactorClock` sorts its whole list on every `callLater`, which with thousands of connections (one idle
    timer each) would cost more than the broker's own work."""

    def __init__(self, now: float = 0.0) -> None:
        self._now = now
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = 0

    def seconds(self) -> float:
        return self._now

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any:  # noqa: N802 - Twisted's name
        from twisted.internet.base import DelayedCall

        call = DelayedCall(self._now + delay, callable, args, kw, lambda c: None, self._push, seconds=self.seconds)
        self._push(call)
        return call

    def _push(self, call: Any) -> None:
        import heapq

        self._seq += 1
        heapq.heappush(self._heap, (call.getTime(), self._seq, call))

    def getDelayedCalls(self) -> list[Any]:  # noqa: N802 - Twisted's name
        return [call for _, _, call in self._heap if call.active()]

    def advance(self, amount: float) -> None:
        """Move the time on by `amount` and run every call due, in time order (calls made meanwhile included)."""
        import heapq

        self._now += amount
        heap = self._heap
        while heap and heap[0][0] <= self._now:
            when, _, call = heapq.heappop(heap)
            if not call.active() or call.getTime() != when:
                continue  # cancelled, or reset to another time (pushed again then)
            call.called = 1
            call.func(*call.args, **call.kw)


class _Peer:
    """A TCP peer address (what `peer_host` reads from the transport)."""

    type = "TCP"

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidegate.gateway.bench.mqtt_resume",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sessions", type=at_least(1), default=2_000)
    parser.add_argument("--queued-every", type=at_least(0), default=10, metavar="K",
                        help="queue one QoS 1 message for every K-th session (10; 0: none)")
    parser.add_argument("--repeat", type=at_least(1), default=3, help="runs; the report gives min and median (3)")
    args = parser.parse_args(argv)
    tune_garbage_collector(ProcessSection())  # as `tidegate serve` runs (process.gc_threshold)
    resumes, loads = [], []
    for _ in range(args.repeat):
        data_dir = tempfile.mkdtemp(prefix="tidegate-resume-")
        try:
            run = ResumeRun(data_dir, args.sessions, args.queued_every, serve_gc=True)
            run.prepare()
            run.resume()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        resumes.append(run.stats["resume"] * 1e6 / args.sessions)
        loads.append(run.stats["load"] * 1e6 / args.sessions)
    resumes.sort()
    loads.sort()
    print(f"mqtt resume: broker CPU per resumed session {resumes[0]:.1f} µs (min), {resumes[len(resumes) // 2]:.1f} "
          f"µs (median); start-up load {loads[0]:.1f} µs per session (min); {args.repeat} runs of {args.sessions}")


if __name__ == "__main__":
    main()
