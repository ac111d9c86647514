"""Broker CPU per message on the hot path, in one process, without sockets or a load generator.

`python -m tidegate.gateway.bench.hotpath SCENARIO [--messages N] [--batch K]` builds a broker over a real
`FileMessageStore` (temp dir, fsync inline: sync flush) on a `MemoryReactorClock`, connects a publisher and a
subscriber over in-memory transports, and moves N messages of 256 bytes through it in reads of K messages
(publisher reads, durable acknowledgement, delivery, subscriber acknowledgements), the way `tidegate bench` loads a
real broker. It reports the CPU time (`time.process_time`) spent inside the broker's entry points per message:
client-side encoding and decoding happen outside the measured sections.

Why: the 2-core machine is shared, so throughput and even per-process CPU of the socket benchmarks move ±20% from
run to run. This harness is deterministic in what it does, so before/after comparisons of the hot path are fair,
and it runs under `valgrind --tool=callgrind` (small N) for instruction counts. It leaves out the reactor, the
kernel and the thread hop of the group commit, which `tidegate bench` includes.

Scenarios: `mqtt1` (QoS 1 1→1, PUBACK after the fsync, subscriber PUBACKs), `mqtt0` (QoS 0 1→1), `native`
(pipelined SENDs, one subscriber in offset mode that returns credit per DELIVER), `native-batch` (the same with
each read one SEND_BATCH of K messages). `--serve-gc` collects garbage with `tidegate serve`'s thresholds.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tidegate.gateway.bench.arguments import at_least

PAYLOAD = bytes(range(256))


class _Timer:
    """CPU time accumulated inside the broker's entry points."""

    def __init__(self) -> None:
        self.cpu = 0.0

    def run(self, work: Callable[..., Any], *args: Any) -> Any:
        started = time.process_time()
        try:
            return work(*args)
        finally:
            self.cpu += time.process_time() - started


def _broker(data_dir: str, clock: Any) -> Any:
    """A Broker over a FileMessageStore whose fsync runs on a worker thread, as `tidegate serve` runs it (on the
    reactor thread the store would also write its index files and checkpoint at every sync)."""
    from concurrent.futures import ThreadPoolExecutor

    from twisted.internet.defer import fail, succeed

    from tidegate.core.broker import Broker, BrokerConfig
    from tidegate.core.flush import Durability
    from tidegate.core.storage.filestore import FileMessageStore
    from tidegate.core.storage.memory import MemoryMetadataStore

    pool = ThreadPoolExecutor(1, thread_name_prefix="hotpath-flush")

    def run_in_thread(work: Callable[[], int]) -> Any:
        try:
            return succeed(pool.submit(work).result())
        except Exception as exc:  # noqa: BLE001 - handed to the Durability's errback, as deferToThread would
            return fail(exc)

    store = FileMessageStore(data_dir, clock_ms=lambda: int(clock.seconds() * 1000))
    durability = Durability(store, clock, run_in_thread=run_in_thread, mode="sync")
    return Broker(store, MemoryMetadataStore(), clock, durability, BrokerConfig())


def _lean_publishes(data: bytes) -> list[int | None]:
    """The packet ids (None at QoS 0) of the PUBLISH packets in `data`, by a minimal parser: the lean subscriber
    of `run_mqtt`, so that the subscriber's own work is a small share of what callgrind counts. Other packets are
    skipped; `data` holds whole packets (the broker writes whole packets)."""
    ids: list[int | None] = []
    position, end = 0, len(data)
    while position < end:
        first = data[position]
        remaining, shift, index = 0, 0, position + 1
        while True:
            byte = data[index]
            remaining |= (byte & 0x7F) << shift
            index += 1
            if not byte & 0x80:
                break
            shift += 7
        if first >> 4 == 3:
            if first & 0x06:
                topic_end = index + 2 + ((data[index] << 8) | data[index + 1])
                ids.append((data[topic_end] << 8) | data[topic_end + 1])
            else:
                ids.append(None)
        position = index + remaining
    return ids


def run_mqtt(messages: int, batch: int, qos: int, data_dir: str, lean: bool = True) -> float:
    """Broker CPU seconds for `messages` MQTT publishes at `qos`, 1 publisher → 1 subscriber (3.1.1).

    `lean` (the default): the clients build PUBLISH bytes from a template and read deliveries with a minimal
    parser, so that under callgrind the count is mostly the broker's; without it they use the full codec (each
    PUBLISH built and each delivery decoded into packet objects), as the first two passes measured."""
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from tidegate.adapters.mqtt.codec import Connect, MqttCodec
    from tidegate.adapters.mqtt.packets import Puback, Publish, Subscribe, TopicSubscription
    from tidegate.adapters.mqtt.server import MqttServerFactory
    from tidegate.adapters.mqtt.settings import MqttSettings
    from tidegate.core.security import AllowAllGate

    clock = MemoryReactorClock()
    clock.advance(1_700_000_000.0)
    broker = _broker(data_dir, clock)
    factory = MqttServerFactory(broker, AllowAllGate(), clock, MqttSettings(sys_interval=0))
    timer = _Timer()

    def connection(client_id: str, port: int) -> tuple[Any, StringTransport, MqttCodec]:
        protocol = factory.buildProtocol(("127.0.0.1", port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        codec = MqttCodec(server_side=False)
        codec.protocol_level = 4
        protocol.dataReceived(codec.encode(Connect(client_id, protocol_level=4, clean_start=True)))
        codec.receive_data(transport.value())
        transport.clear()
        return protocol, transport, codec

    pub, pub_out, pub_codec = connection("hot-pub", 40001)
    sub, sub_out, sub_codec = connection("hot-sub", 40002)
    sub.dataReceived(sub_codec.encode(Subscribe(1, (TopicSubscription("hot/#", qos),))))
    clock.advance(0)
    sub_codec.receive_data(sub_out.value())
    sub_out.clear()
    reads = []
    packet_id = 0
    pack_id = struct.Struct(">H").pack
    if lean:
        # the bytes Publish + encode give, from one template: the packet id is the only part that changes
        template = pub_codec.encode(Publish("hot/a", PAYLOAD, qos, packet_id=1 if qos else None))
        id_at = len(template) - len(PAYLOAD) - 2  # fixed header, topic, packet id, payload
        head, tail = template[:id_at], template[id_at + 2:]

        def publish_bytes(packet_id: int) -> bytes:
            return head + pack_id(packet_id) + tail if qos else template

        def take(data: bytes) -> list[int | None]:
            return _lean_publishes(data)

        def acks_for(ids: list[int | None]) -> bytes:
            return b"".join([b"\x40\x02" + pack_id(i) for i in ids if i is not None])
    else:
        def publish_bytes(packet_id: int) -> bytes:
            return pub_codec.encode(Publish("hot/a", PAYLOAD, qos, packet_id=packet_id if qos else None))

        def take(data: bytes) -> list[int | None]:
            return [p.packet_id for p in sub_codec.receive_data(data)]

        def acks_for(ids: list[int | None]) -> bytes:
            return b"".join(sub_codec.encode(Puback(i)) for i in ids if i is not None)

    for start in range(0, messages, batch):
        chunk = []
        for _ in range(min(batch, messages - start)):
            packet_id = packet_id % 65535 + 1
            chunk.append(publish_bytes(packet_id))
        reads.append(b"".join(chunk))
    received = 0
    for data in reads:
        timer.run(pub.dataReceived, data)
        for _ in range(3):  # fsync + PUBACKs, wake-up, delivery: each one reactor turn
            timer.run(clock.advance, 0)
        pub_out.clear()
        ids = take(sub_out.value())
        sub_out.clear()
        received += len(ids)
        if qos:
            timer.run(sub.dataReceived, acks_for(ids))
            timer.run(clock.advance, 0)
            ids = take(sub_out.value())  # deliveries the returned credit let through
            sub_out.clear()
            received += len(ids)
            if ids:
                timer.run(sub.dataReceived, acks_for(ids))
    for _ in range(5):
        timer.run(clock.advance, 0)
        ids = take(sub_out.value())
        sub_out.clear()
        received += len(ids)
        if qos and ids:
            timer.run(sub.dataReceived, acks_for(ids))
    if received != messages:
        raise SystemExit(f"the subscriber got {received} of {messages} messages")
    broker.close()
    return timer.cpu


def run_native(messages: int, batch: int, data_dir: str, send_batch: bool = False) -> float:
    """Broker CPU seconds for `messages` native SENDs (K per read), one consumer returning credit per DELIVER;
    `send_batch`: each read is one SEND_BATCH of K messages instead of K pipelined SENDs."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from tidegate.adapters.native import frames as f
    from tidegate.adapters.native.codec import NativeCodec, Role, encode_frame, encode_send, encode_send_batch
    from tidegate.adapters.native.server import NativeServerFactory
    from tidegate.core.model import Message
    from tidegate.core.security import AllowAllGate

    clock = MemoryReactorClock()
    clock.advance(1_700_000_000.0)
    broker = _broker(data_dir, clock)
    factory = NativeServerFactory(broker, AllowAllGate(), clock)
    timer = _Timer()

    def connection(client_id: str, port: int) -> tuple[Any, StringTransport, NativeCodec]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        codec = NativeCodec(Role.CLIENT)
        protocol.dataReceived(encode_frame(f.Hello(request_id=1, client_id=client_id)))
        clock.advance(0)
        codec.receive_data(transport.value())
        transport.clear()
        return protocol, transport, codec

    producer, producer_out, _ = connection("hot-producer", 40001)
    consumer, consumer_out, consumer_codec = connection("hot-consumer", 40002)
    producer.dataReceived(encode_frame(f.TopicCreate(request_id=2, name="hot", queues=8)))
    clock.advance(0)
    producer_out.clear()
    consumer.dataReceived(encode_frame(f.Subscribe(request_id=3, group="hot-group", topic="hot", start="earliest",
                                                   credit=1024)))
    clock.advance(0)
    frames = consumer_codec.receive_data(consumer_out.value())
    consumer_out.clear()
    subscription_id = next(x.subscription_id for x in frames if isinstance(x, f.SubscribeOk))
    reads = []
    request_id = 10
    message = Message(topic="hot", body=PAYLOAD)
    for start in range(0, messages, batch):
        count = min(batch, messages - start)
        if send_batch:
            request_id += 1
            reads.append(encode_send_batch(request_id, 0, -1, [message] * count))
            continue
        chunk = []
        for _ in range(count):
            request_id += 1
            chunk.append(encode_send(request_id, 0, -1, message))
        reads.append(b"".join(chunk))
    received = 0

    def take_deliveries() -> None:
        nonlocal received
        frames = consumer_codec.receive_data(consumer_out.value())
        consumer_out.clear()
        got = sum(len(x.messages) for x in frames if isinstance(x, f.Deliver))
        received += got
        if got:
            timer.run(consumer.dataReceived, encode_frame(f.Credit(request_id=0, subscription_id=subscription_id,
                                                                   credit=got)))

    for data in reads:
        timer.run(producer.dataReceived, data)
        for _ in range(3):
            timer.run(clock.advance, 0)
        producer_out.clear()
        take_deliveries()
    for _ in range(10):
        timer.run(clock.advance, 0)
        take_deliveries()
    if received != messages:
        raise SystemExit(f"the consumer got {received} of {messages} messages")
    broker.close()
    return timer.cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidegate.gateway.bench.hotpath",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("scenario", choices=("mqtt1", "mqtt0", "native", "native-batch"))
    parser.add_argument("--messages", type=at_least(1), default=20_000)
    parser.add_argument("--batch", type=at_least(1), default=64, help="messages per publisher read (64)")
    parser.add_argument("--serve-gc", action="store_true",
                        help="collect garbage as `tidegate serve` does (process.gc_threshold 50000, older "
                             "generations 20 and 100); default: this interpreter's thresholds, as earlier passes "
                             "measured")
    parser.add_argument("--repeat", type=at_least(1), default=3, help="runs; the report gives min and median (3)")
    parser.add_argument("--codec-clients", action="store_true",
                        help="MQTT clients build and decode every packet with the full codec (as the first passes "
                             "measured); default: lean clients, so callgrind counts mostly the broker")
    args = parser.parse_args(argv)
    if args.serve_gc:
        from tidegate.gateway.app import tune_garbage_collector
        from tidegate.gateway.config import ProcessSection

        tune_garbage_collector(ProcessSection())
    results = []
    for _ in range(args.repeat):
        data_dir = tempfile.mkdtemp(prefix="tidegate-hotpath-")
        try:
            if args.scenario.startswith("native"):
                cpu = run_native(args.messages, args.batch, data_dir, send_batch=args.scenario == "native-batch")
            else:
                cpu = run_mqtt(args.messages, args.batch, int(args.scenario[-1]), data_dir,
                               lean=not args.codec_clients)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        results.append(cpu * 1e6 / args.messages)
    results.sort()
    print(f"{args.scenario}: broker CPU per message {results[0]:.1f} µs (min), {results[len(results) // 2]:.1f} µs "
          f"(median) over {args.repeat} runs of {args.messages} messages, {args.batch} per read")


if __name__ == "__main__":
    main()
