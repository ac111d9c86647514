"""`tidegate bench mqtt` and `tidegate bench mqtt-conns`: MQTT drivers on the `tidegate bench` engine.

The clients are deliberately lean: plain blocking sockets, `select` for readiness, our own sans-IO codec
(`adapters/mqtt/codec.py`) for CONNECT/SUBSCRIBE and for decoding everything the broker sends, and a prebuilt PUBLISH
template per connection (checked once against `MqttCodec.encode`) so that a publish costs a `struct.pack` and a
join, not a dataclass and an encoder call. A paho client spends tens of µs of Python per message and would measure
itself, not the broker; these loops cost a few µs.

- Publishers: `--publishers N` connections, spread over the engine's producer workers (processes; at most
  `--client-processes`, default min(N, 2)), publishing to `<topic>/<n>`. QoS 1/2 are pipelined: up to `--inflight`
  unacknowledged PUBLISHes per connection (capped by the broker's Receive Maximum on MQTT 5). A message is
  "acknowledged" on PUBACK (QoS 1), PUBREC (QoS 2, the window slot frees on PUBCOMP) or, at QoS 0, when written.
- Subscribers: `--subscribers M` connections, one per consumer worker, subscribed to `<topic>/#` (each gets every
  message: loss and duplicates are checked per subscriber) or with `--shared` to `$share/bench/<topic>/#` (the
  broker splits the messages: checked like a consumer group). PUBACK/PUBREC/PUBCOMP of one read go out in one write.
- No reconnects happen in a run, so any duplicate is an error, at every QoS. At QoS 0 the broker may drop
  messages (MQTT allows it): loss is reported but is not an error.

`mqtt-conns` opens N idle connections (CONNECT + CONNACK, keep alive 600) from a few client processes, and reports
connect time and the broker's resident memory growth per connection (VmRSS from /proc/<pid>/status).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import select
import socket
import sys
import time
import uuid
from typing import Any

from .bench import (
    DEFAULT_SERVER,
    DRIVERS,
    EXIT_FAILURE,
    EXIT_OK,
    MIN_SIZE,
    PAYLOAD_HEADER,
    PAYLOAD_MAGIC,
    SEND_DRAIN_TIMEOUT_S,
    SERVER_ENV,
    BenchError,
    BenchOptions,
    ConsumerTally,
    Driver,
    LatencyHistogram,
    ProducerTally,
    RateLimiter,
    SpawnedBroker,
    WorkerContext,
    _at_least,
    latency_line,
    run_bench,
)

CONNECT_TIMEOUT_S = 10.0
RECV_BYTES = 1 << 18
# With --rate 0, a QoS 0 publisher writes this many PUBLISHes per send (TCP backpressure is its only flow control).
QOS0_BURST = 128
# A QoS 1/2 publisher at full rate tops up its window in sends of at most this many messages.
MAX_BURST = 256
SUBSCRIBER_KEEP_ALIVE = 60
IDLE_KEEP_ALIVE = 600
POLL_S = 0.05

PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x62  # PUBREL has the fixed flags 0010
PUBCOMP = 0x70


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BenchError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _ack(first_byte: int) -> list[bytes]:
    """The 4-byte acknowledgement packet (no reason code: success) for every packet id, prebuilt."""
    head = bytes((first_byte, 2))
    return [head + pid.to_bytes(2, "big") for pid in range(65536)]


# ========================================================================================== the lean client
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
        from tidegate.adapters.mqtt.codec import Suback, Subscribe, Subscription

        self.sock.settimeout(CONNECT_TIMEOUT_S)
        self.sock.sendall(self.codec.encode(Subscribe(1, (Subscription(topic_filter, qos),))))
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


# ============================================================================================== the driver
class _Publisher:
    __slots__ = ("client", "head", "tail", "window", "inflight", "next_pid")

    def __init__(self, client: MqttClient, head: bytes, tail: bytes, window: int) -> None:
        self.client = client
        self.head = head
        self.tail = tail
        self.window = window
        self.inflight: dict[int, list[int]] = {}  # packet id -> [seq, send perf ns, released-by-PUBREC flag]
        self.next_pid = 0


class MqttDriver(Driver):
    name = "mqtt"

    def copies(self, options: BenchOptions) -> int:
        return 1 if options.extra.get("shared") else max(1, options.consumers)

    def prepare(self, options: BenchOptions) -> None:
        # The broker answers CONNECT: fail fast and clearly before starting workers.
        client = MqttClient(options.server, f"bench-probe-{uuid.uuid4().hex[:8]}", options.extra["protocol_level"],
                            keep_alive=SUBSCRIBER_KEEP_ALIVE)
        client.close()

    def run_producer(self, ctx: WorkerContext) -> dict[str, Any]:
        options = ctx.options
        extra = options.extra
        qos, level = extra["qos"], extra["protocol_level"]
        tally = ProducerTally()
        publishers: list[_Publisher] = []
        try:
            for n in range(ctx.index, extra["publishers"], options.producers):
                client = MqttClient(options.server, f"{options.group}-pub-{n}", level, keep_alive=IDLE_KEEP_ALIVE)
                head, tail = client.publish_template(f"{options.topic}/{n}", qos, options.size)
                window = min(options.inflight, client.server_receive_maximum) if qos else QOS0_BURST
                publishers.append(_Publisher(client, head, tail, window))
            with ctx.ticker(lambda: {"sent": tally.sent, "acked": tally.acked, "failed": tally.failed}):
                ctx.publish(ready=1)
                ctx.shared.go.wait()
                self._publish_loop(ctx, publishers, tally, qos)
        finally:
            for publisher in publishers:
                publisher.client.close()
        return tally.result()

    @staticmethod
    def _publish_loop(ctx: WorkerContext, publishers: list[_Publisher], tally: ProducerTally, qos: int) -> None:
        options = ctx.options
        deadline = ctx.run_deadline()
        limiter = RateLimiter(options.rate / options.producers if options.rate else 0)
        paced = bool(options.rate)
        padding = b"\x00" * (options.size - MIN_SIZE)
        pack = PAYLOAD_HEADER.pack
        magic = PAYLOAD_MAGIC
        index = ctx.index
        time_ns = time.time_ns
        perf_ns = time.perf_counter_ns
        monotonic = time.monotonic
        pubrel = _ack(PUBREL)
        by_socket = {p.client.sock: p for p in publishers}
        sockets = list(by_socket)
        seq = 0
        tally.first_ns = time_ns()
        producing = True
        drain_deadline = 0.0
        while True:
            if producing and monotonic() >= deadline:
                producing = False
                drain_deadline = monotonic() + SEND_DRAIN_TIMEOUT_S
            if not producing:
                if not any(p.inflight for p in publishers):
                    break
                if monotonic() >= drain_deadline:
                    raise TimeoutError(f"publishes still unacknowledged {SEND_DRAIN_TIMEOUT_S}s after the run")
            room_left = False
            if producing:
                for p in publishers:
                    room = p.window - len(p.inflight) if qos else QOS0_BURST
                    if room <= 0:
                        continue
                    if paced:
                        limiter.acquire(1)
                        n = 1
                    else:
                        n = min(room, MAX_BURST)
                    parts = []
                    if qos:
                        inflight = p.inflight
                        head, tail = p.head, p.tail
                        pid = p.next_pid
                        for _ in range(n):
                            pid = pid % 65535 + 1
                            while pid in inflight:
                                pid = pid % 65535 + 1
                            inflight[pid] = [seq, perf_ns(), 0]
                            parts.append(head + pid.to_bytes(2, "big") + tail
                                         + pack(magic, index, seq, time_ns()) + padding)
                            seq += 1
                        p.next_pid = pid
                        p.client.sock.sendall(b"".join(parts))
                    else:
                        started = perf_ns()
                        head = p.head + p.tail
                        for _ in range(n):
                            parts.append(head + pack(magic, index, seq, time_ns()) + padding)
                            seq += 1
                        p.client.sock.sendall(b"".join(parts))
                        tally.on_acked(seq - n, n, started)  # QoS 0: "acknowledged" once written
                    tally.sent = seq
                    if room > n:
                        room_left = True
                if paced:
                    room_left = False  # the limiter sleeps between messages; only look for answers
            if not qos:
                if not producing:
                    break
                # Nothing comes back at QoS 0; just notice a closed connection now and then.
                readable = select.select(sockets, [], [], 0)[0]
                for sock in readable:
                    by_socket[sock].client.read()
                continue
            readable = select.select(sockets, [], [], 0 if (room_left or paced) else POLL_S)[0]
            for sock in readable:
                p = by_socket[sock]
                inflight = p.inflight
                releases = []
                for packet in p.client.read():
                    kind = packet.__class__.__name__
                    entry = inflight.get(packet.packet_id) if kind in ("Puback", "Pubrec", "Pubcomp") else None
                    if entry is None:
                        if kind in ("Puback", "Pubrec", "Pubcomp"):
                            raise BenchError(f"{kind} for unknown packet id {packet.packet_id}")
                        continue  # PINGRESP, anything else: nothing to do
                    if kind == "Pubcomp":
                        del inflight[packet.packet_id]
                        continue
                    if packet.reason_code >= 0x80:
                        del inflight[packet.packet_id]
                        tally.on_failed(1, BenchError(f"{kind} reason code {int(packet.reason_code):#x}"))
                        continue
                    if not entry[2]:
                        entry[2] = 1
                        tally.on_acked(entry[0], 1, entry[1])
                    if kind == "Puback":
                        del inflight[packet.packet_id]
                    else:
                        releases.append(pubrel[packet.packet_id])
                if releases:
                    sock.sendall(b"".join(releases))

    def run_consumer(self, ctx: WorkerContext) -> dict[str, Any]:
        from tidegate.adapters.mqtt.codec import Publish, Pubrel

        options = ctx.options
        extra = options.extra
        qos, level = extra["qos"], extra["protocol_level"]
        topic_filter = f"{options.topic}/#"
        if extra["shared"]:
            topic_filter = f"$share/bench/{topic_filter}"
        tally = ConsumerTally()
        client = MqttClient(options.server, f"{options.group}-sub-{ctx.index}", level,
                            keep_alive=SUBSCRIBER_KEEP_ALIVE, receive_maximum=max(1, options.inflight))
        try:
            client.subscribe(topic_filter, qos)
            puback, pubrec, pubcomp = _ack(PUBACK), _ack(PUBREC), _ack(PUBCOMP)
            pingreq = bytes((0xC0, 0))
            sock = client.sock
            record = tally.record
            stop = ctx.shared.stop
            monotonic = time.monotonic
            last_write = monotonic()
            next_stop_check = 0.0
            with ctx.ticker(lambda: {"received": tally.received, "ready": 1}):
                while True:
                    now = monotonic()
                    if now >= next_stop_check:
                        if stop.is_set():
                            break
                        next_stop_check = now + 0.1
                    if not select.select((sock,), (), (), 0.1)[0]:
                        if now - last_write > SUBSCRIBER_KEEP_ALIVE / 2:
                            sock.sendall(pingreq)
                            last_write = now
                        continue
                    acks = []
                    for packet in client.read():
                        cls = packet.__class__
                        if cls is Publish:
                            record(packet.payload)
                            if packet.qos == 1:
                                acks.append(puback[packet.packet_id])
                            elif packet.qos == 2:
                                acks.append(pubrec[packet.packet_id])
                        elif cls is Pubrel:
                            acks.append(pubcomp[packet.packet_id])
                    if acks:
                        sock.sendall(b"".join(acks))
                        last_write = now
        finally:
            client.close()
        return tally.result()


# ===================================================================================================== CLI
def register_commands(protocols: argparse._SubParsersAction) -> None:
    mqtt = protocols.add_parser("mqtt", help="MQTT publishers and subscribers (lean clients on our codec)")
    _server_options(mqtt)
    mqtt.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="QoS of publishes and subscriptions (1)")
    mqtt.add_argument("--publishers", type=_at_least(1), default=1, metavar="N", help="publisher connections (1)")
    mqtt.add_argument("--subscribers", type=_at_least(0), default=1, metavar="M",
                      help="subscriber connections, one process each (1)")
    mqtt.add_argument("--shared", action="store_true",
                      help="subscribers share $share/bench/<topic>/# (each message to one) instead of each "
                           "subscribing <topic>/# (each message to all)")
    mqtt.add_argument("--client-processes", type=_at_least(1), default=0, metavar="P",
                      help="processes the publisher connections are spread over (default min(N, 2))")
    mqtt.add_argument("--size", type=_at_least(MIN_SIZE), default=256, metavar="BYTES",
                      help=f"payload size, at least {MIN_SIZE} (default 256)")
    mqtt.add_argument("--rate", type=float, default=0.0, metavar="R",
                      help="messages per second in total over all publishers; 0 = as fast as possible (default)")
    mqtt.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds of publishing (10)")
    mqtt.add_argument("--topic", default="", help="topic prefix (default: a new bench-<random>)")
    mqtt.add_argument("--protocol", dest="protocol_level", type=int, choices=(4, 5), default=4,
                      help="MQTT protocol level: 4 = 3.1.1 (default), 5 = 5.0")
    mqtt.add_argument("--inflight", type=_at_least(1), default=64, metavar="N",
                      help="unacknowledged QoS 1/2 publishes per publisher connection, capped by the broker's "
                           "Receive Maximum on MQTT 5; also the Receive Maximum subscribers announce (64)")
    mqtt.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                      help="after publishing, wait this long without progress for subscribers to catch up (10)")
    mqtt.add_argument("--json", action="store_true", help="print the final report as JSON")
    mqtt.set_defaults(handler=run_mqtt_command, protocol="mqtt")

    conns = protocols.add_parser("mqtt-conns", help="open N idle MQTT connections: connect time, broker memory")
    _server_options(conns)
    conns.add_argument("--count", type=_at_least(1), default=10_000, metavar="N", help="connections (10000)")
    conns.add_argument("--processes", type=_at_least(1), default=0, metavar="P",
                       help="client processes opening connections in parallel (default: 1 per 2,500, at least 2)")
    conns.add_argument("--broker-pid", type=int, default=0, metavar="PID",
                       help="broker process whose VmRSS is read before and after (taken from --spawn-broker)")
    conns.add_argument("--protocol", dest="protocol_level", type=int, choices=(4, 5), default=4,
                       help="MQTT protocol level (4)")
    conns.add_argument("--hold", type=float, default=2.0, metavar="S",
                       help="seconds to keep every connection open before reading the broker's memory (2)")
    conns.add_argument("--json", action="store_true", help="print the final report as JSON")
    conns.set_defaults(handler=run_conns_command, protocol="mqtt")
    protocols.metavar = "{" + ",".join(protocols.choices) + "}"


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="HOST:PORT", default=None,
                        help=f"MQTT address of the broker (default: ${SERVER_ENV}'s host with port 1883, or "
                             "127.0.0.1:1883); ignored with --spawn-broker")
    parser.add_argument("--spawn-broker", action="store_true",
                        help="start a temporary `tidegate serve` (ephemeral ports, temp data dir) and stop it after")
    parser.add_argument("--flush", choices=("sync", "async"), default="sync",
                        help="with --spawn-broker: the broker's storage.flush (default sync)")
    parser.add_argument("--profile-broker", metavar="FILE", default="",
                        help="with --spawn-broker: run the broker under cProfile, write the profile to FILE")


def _default_server() -> str:
    native = os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    return native.rpartition(":")[0] + ":1883"


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (a spawned broker, client processes) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class _Spawned:
    """`--spawn-broker` for MQTT: a SpawnedBroker with the mqtt listener, or nothing with --server."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.broker: SpawnedBroker | None = None

    def __enter__(self) -> tuple[str, int]:
        args = self.args
        if not args.spawn_broker:
            if args.flush != "sync" or args.profile_broker:
                raise BenchError("--flush and --profile-broker apply to a broker started with --spawn-broker")
            return args.server or _default_server(), getattr(args, "broker_pid", 0)
        profile = os.path.abspath(args.profile_broker) if args.profile_broker else ""
        self.broker = SpawnedBroker(args.flush, listeners=("mqtt",), profile_path=profile,
                                    extra_settings=("listeners.mqtt.ws_enabled=false",))
        self.broker.__enter__()
        assert self.broker.process is not None
        return self.broker.addresses["mqtt"], self.broker.process.pid

    def __exit__(self, *exc: object) -> None:
        if self.broker is not None:
            self.broker.__exit__(*exc)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_mqtt_command(args: argparse.Namespace) -> int:
    from tidegate.core.errors import TidegateError

    if args.duration <= 0 or args.rate < 0:
        print("error: --duration must be above 0 and --rate at least 0", file=sys.stderr)
        return EXIT_FAILURE
    try:
        with _Spawned(args) as (server, _pid):
            if args.spawn_broker:
                _progress(f"spawned broker (flush={args.flush}) with MQTT on {server}")
            options = mqtt_options(args, server)
            report = run_bench(options, _progress)
    except TidegateError as exc:
        print(f"error: {exc.message} ({exc.code.name})", file=sys.stderr)
        return EXIT_FAILURE
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    report = mqtt_report(report)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_mqtt_report(report))
    return EXIT_FAILURE if report["errors"] else EXIT_OK


def mqtt_options(args: argparse.Namespace, server: str) -> BenchOptions:
    run_id = uuid.uuid4().hex[:8]
    processes = args.client_processes or min(args.publishers, 2)
    return BenchOptions(
        protocol="mqtt", server=server, producers=min(processes, args.publishers), consumers=args.subscribers,
        size=args.size, rate=args.rate, duration=args.duration, topic=args.topic or f"bench-{run_id}",
        # The engine waits until the consumers' "ready" flags add up to `queues`: one per subscriber.
        queues=max(1, args.subscribers), inflight=args.inflight, drain_timeout=args.drain_timeout,
        workers="process", group=f"bench-{run_id}",
        extra={"qos": args.qos, "protocol_level": args.protocol_level, "publishers": args.publishers,
               "subscribers": args.subscribers, "shared": args.shared, "spawned_broker": args.spawn_broker,
               "broker_flush": args.flush if args.spawn_broker else "unknown"})


def mqtt_report(report: dict[str, Any]) -> dict[str, Any]:
    """The engine's report, with MQTT's reading of it: at QoS 0 loss is allowed, duplicates never are."""
    options = report["options"]
    errors = list(report["errors"])
    if report["duplicated"]:
        errors.append(f"{report['duplicated']} duplicated deliveries (no reconnects happened: none is allowed)")
    if report["lost"] and options["qos"] > 0:
        errors.append(f"{report['lost']} acknowledged QoS {options['qos']} deliveries lost")
    report["errors"] = errors
    report["publish_msgs_per_s"] = report["produce_msgs_per_s"]
    report["receive_msgs_per_s"] = report["deliveries_per_s"]
    return report


def format_mqtt_report(report: dict[str, Any]) -> str:
    o = report["options"]
    lat, ack = report["latency_ms"], report["ack_latency_ms"]
    subs = f"{o['subscribers']} subscriber(s){' (shared)' if o['shared'] else ''}"
    lines = [
        f"tidegate bench mqtt: {o['publishers']} publisher(s) in {o['producers']} process(es), {subs}, "
        f"QoS {o['qos']}, MQTT level {o['protocol_level']}, {o['size']} B, rate {o['rate'] or 'max'}, "
        f"{o['duration']}s, inflight {o['inflight']}, flush {o['broker_flush']}",
        f"  published {report['sent']}  acked {report['acked']}  failed {report['failed']}  received "
        f"{report['received']}  lost {report['lost']}  duplicated {report['duplicated']}",
        f"  publish {report['publish_msgs_per_s']} msg/s  receive {report['receive_msgs_per_s']} msg/s "
        f"(deliveries over all subscribers)",
        latency_line("end-to-end", lat),
        latency_line("publish-to-ack", ack),
    ]
    lines += [f"  error: {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


# ============================================================================================== mqtt-conns
def read_rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _conns_worker(server: str, level: int, prefix: str, indices: range, results: Any, release: Any) -> None:
    """Open one connection after the other, report, hold them until `release`, close."""
    raise_fd_limit()
    histogram = LatencyHistogram()
    clients: list[MqttClient] = []
    error = ""
    started = time.monotonic()
    try:
        for i in indices:
            t0 = time.perf_counter_ns()
            clients.append(MqttClient(server, f"{prefix}-{i}", level, keep_alive=IDLE_KEEP_ALIVE))
            histogram.record((time.perf_counter_ns() - t0) // 1000)
    except (OSError, BenchError, TimeoutError) as exc:
        error = f"connection {len(clients) + indices.start} of this worker failed: {type(exc).__name__}: {exc}"
    results.put({"connected": len(clients), "seconds": time.monotonic() - started, "error": error,
                 "latency": histogram.to_state()})
    release.wait(600)
    for client in clients:
        client.sock.close()  # no DISCONNECT: 10,000 of them would only add load; a close is what idle clients do


def run_conns(server: str, count: int, *, broker_pid: int = 0, processes: int = 0, level: int = 4,
              hold: float = 2.0, progress: Any = _progress) -> dict[str, Any]:
    limit = raise_fd_limit()
    processes = processes or max(2, -(-count // 2500))
    processes = min(processes, count)
    per_process = -(-count // processes)
    if per_process + 64 > limit:
        raise BenchError(f"{per_process} connections per process exceed the file-descriptor limit {limit}: "
                         "use more --processes")
    mp = multiprocessing.get_context("spawn")
    results, release = mp.Queue(), mp.Event()
    prefix = f"bench-idle-{uuid.uuid4().hex[:8]}"
    load_before = os.getloadavg()[0]
    rss_before = read_rss_kib(broker_pid) if broker_pid else 0
    workers = []
    for p in range(processes):
        indices = range(p * per_process, min(count, (p + 1) * per_process))
        worker = mp.Process(target=_conns_worker, args=(server, level, prefix, indices, results, release),
                            daemon=True)
        worker.start()
        workers.append(worker)
    reports = []
    try:
        deadline = time.monotonic() + 600
        while len(reports) < processes:
            try:
                reports.append(results.get(timeout=1.0))
            except Exception:  # queue.Empty
                if not any(w.is_alive() for w in workers) or time.monotonic() > deadline:
                    raise BenchError("connection workers ended without reporting") from None
        # Each worker timed its own connect loop (its interpreter's start-up is not connect time).
        total_s = max(r["seconds"] for r in reports)
        connected = sum(r["connected"] for r in reports)
        progress(f"{connected} connections open after {total_s:.1f}s; holding {hold}s")
        time.sleep(hold)  # let the broker settle (deferred allocations, timers) before reading its memory
        rss_after = read_rss_kib(broker_pid) if broker_pid else 0
    finally:
        release.set()
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.terminate()
    latency = LatencyHistogram()
    for r in reports:
        latency.merge(LatencyHistogram.from_state(r["latency"]))
    errors = [r["error"] for r in reports if r["error"]]
    growth = rss_after - rss_before
    return {
        "protocol": "mqtt-conns", "server": server, "count": count, "connected": connected,
        "processes": processes, "protocol_level": level,
        "connect_seconds_total": round(total_s, 3),
        "connects_per_s": round(connected / total_s) if total_s else 0,
        "connect_ms": latency.summary_ms(),
        "broker_pid": broker_pid or None,
        "broker_rss_kib_before": rss_before or None, "broker_rss_kib_after": rss_after or None,
        "broker_rss_growth_kib": growth if broker_pid else None,
        "broker_bytes_per_connection": round(growth * 1024 / connected) if broker_pid and connected else None,
        "errors": errors,
        "machine": {"cpus": os.cpu_count(), "loadavg_before": round(load_before, 2)},
    }


def run_conns_command(args: argparse.Namespace) -> int:
    raise_fd_limit()  # before spawning the broker, so that it inherits the raised limit
    try:
        with _Spawned(args) as (server, pid):
            if args.spawn_broker:
                _progress(f"spawned broker (flush={args.flush}) with MQTT on {server}, pid {pid}")
                time.sleep(1.0)  # let the fresh broker finish starting before the baseline RSS
            report = run_conns(server, args.count, broker_pid=pid or args.broker_pid, processes=args.processes,
                               level=args.protocol_level, hold=args.hold)
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        lat = report["connect_ms"]
        per = report["broker_bytes_per_connection"]
        sys.stdout.write(
            f"tidegate bench mqtt-conns: {report['connected']}/{report['count']} connections in "
            f"{report['connect_seconds_total']}s ({report['connects_per_s']}/s, {report['processes']} client "
            f"processes)\n  connect ms: p50 {lat['p50']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}\n"
            f"  broker RSS: {report['broker_rss_kib_before']} KiB -> {report['broker_rss_kib_after']} KiB, "
            f"{'unknown (no --broker-pid)' if per is None else f'{per} bytes'} per connection\n"
            + "".join(f"  error: {e}\n" for e in report["errors"]))
    return EXIT_FAILURE if report["errors"] or report["connected"] < report["count"] else EXIT_OK


DRIVERS[MqttDriver.name] = MqttDriver
