"""`tidegate bench mqtt`: MQTT publishers and subscribers on the `tidegate bench` engine, through the lean client
of `mqtt_client.py`.

- Publishers: `--publishers N` connections, spread over the engine's producer workers (processes; at most
  `--client-processes`, default min(N, 2)), publishing to `<topic>/<n>`. QoS 1/2 are pipelined: up to `--inflight`
  unacknowledged PUBLISHes per connection (capped by the broker's Receive Maximum on MQTT 5). A message is
  "acknowledged" on PUBACK (QoS 1), PUBREC (QoS 2, the window slot frees on PUBCOMP) or, at QoS 0, when written.
- Subscribers: `--subscribers M` connections, one per consumer worker, subscribed to `<topic>/#` (each gets every
  message: loss and duplicates are checked per subscriber) or with `--shared` to `$share/bench/<topic>/#` (the
  broker splits the messages: checked like a consumer group). PUBACK/PUBREC/PUBCOMP of one read go out in one write.
- No reconnects happen in a run, so any duplicate is an error, at every QoS. At QoS 0 the broker may drop
  messages (MQTT allows it): loss is reported but is not an error.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
import uuid
from typing import Any

from .arguments import EXIT_FAILURE, EXIT_OK, BenchCommand, at_least, progress
from .broker import MqttTarget, add_mqtt_target_options
from .delivery import MIN_SIZE, PAYLOAD_HEADER, PAYLOAD_MAGIC, ConsumerTally, ProducerTally
from .driver import SEND_DRAIN_TIMEOUT_S, BenchError, BenchOptions, Driver, RateLimiter, WorkerContext
from .engine import run_bench
from .latency import latency_line
from .mqtt_client import IDLE_KEEP_ALIVE, PUBACK, PUBCOMP, PUBREC, PUBREL, RECV_BYTES, MqttClient, ack_packets
from .plot import add_plot_option, plot_report

# With --rate 0, a QoS 0 publisher writes this many PUBLISHes per send (TCP backpressure is its only flow control).
QOS0_BURST = 128
# A QoS 1/2 publisher at full rate tops up its window in sends of at most this many messages.
MAX_BURST = 256
SUBSCRIBER_KEEP_ALIVE = 60
POLL_S = 0.05
# Payloads at least this large are sent as pieces (a small per-message head, then the shared padding) with
# sendmsg, never concatenated: at 64 KiB, building each PUBLISH and joining the burst copied every payload twice in
# the publisher. Smaller ones are joined (cheaper than the per-piece work).
SCATTER_MIN_SIZE = 4096
MAX_SCATTER_PIECES = 1024  # Linux's IOV_MAX
# The subscriber reads up to this much at a time, so that a stream of large PUBLISHes is decoded many per read.
SUBSCRIBER_RECV_BYTES = 1 << 20


def send_pieces(sock: socket.socket, pieces: list[bytes]) -> None:
    """`sock.sendall(b"".join(pieces))` without the join: sendmsg of up to MAX_SCATTER_PIECES pieces at a time,
    continuing after a partial send (only a piece cut in two is sliced)."""
    start = 0
    while start < len(pieces):
        batch = pieces[start:start + MAX_SCATTER_PIECES]
        start += len(batch)
        sent = sock.sendmsg(batch)
        for i, piece in enumerate(batch):
            if sent >= len(piece):
                sent -= len(piece)
                continue
            sock.sendall(memoryview(piece)[sent:])
            for rest in batch[i + 1:]:
                sock.sendall(rest)
            break


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
        scatter = options.size >= SCATTER_MIN_SIZE
        pack = PAYLOAD_HEADER.pack
        magic = PAYLOAD_MAGIC
        index = ctx.index
        time_ns = time.time_ns
        perf_ns = time.perf_counter_ns
        monotonic = time.monotonic
        pubrel = ack_packets(PUBREL)
        by_socket = {p.client.sock: p for p in publishers}
        sockets = list(by_socket)
        seq = 0
        turn = 0  # paced: the publisher whose turn the next slot is
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
            window_full = paced  # paced: stays True if a due slot found no publisher with room
            # Paced: send one message when its slot is due; until then wait in select below, so each PUBACK is read
            # (and timed) when it arrives, not after a sleep in the limiter, and sends stay evenly spaced.
            if producing and (not paced or limiter.until_next_slot(monotonic()) <= 0.0):
                for p in publishers[turn:] + publishers[:turn] if paced else publishers:
                    room = p.window - len(p.inflight) if qos else QOS0_BURST
                    if room <= 0:
                        continue
                    if paced:
                        if limiter.until_next_slot(monotonic()) > 0.0:
                            break  # the next publisher's turn comes at the next slot, after reading answers
                        limiter.acquire(1)
                        turn = (publishers.index(p) + 1) % len(publishers)
                        window_full = False
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
                            parts.append(head + pid.to_bytes(2, "big") + tail + pack(magic, index, seq, time_ns()))
                            parts.append(padding)
                            seq += 1
                        p.next_pid = pid
                    else:
                        started = perf_ns()
                        head = p.head + p.tail
                        for _ in range(n):
                            parts.append(head + pack(magic, index, seq, time_ns()))
                            parts.append(padding)
                            seq += 1
                    if scatter:
                        send_pieces(p.client.sock, parts)
                    else:
                        p.client.sock.sendall(b"".join(parts))
                    if not qos:
                        tally.on_acked(seq - n, n, started)  # QoS 0: "acknowledged" once written
                    tally.sent = seq
                    if room > n:
                        room_left = True
                if paced:
                    room_left = False  # only look for answers until the next slot
            timeout = limiter.answer_wait(room_left=room_left, paced=paced, producing=producing,
                                          window_full=window_full, poll_s=POLL_S, now=monotonic())
            if not qos:
                if not producing:
                    break
                # Nothing comes back at QoS 0; just notice a closed connection now and then.
                readable = select.select(sockets, [], [], timeout if paced else 0)[0]
                for sock in readable:
                    by_socket[sock].client.read()
                continue
            readable = select.select(sockets, [], [], timeout)[0]
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
            puback, pubrec, pubcomp = ack_packets(PUBACK), ack_packets(PUBREC), ack_packets(PUBCOMP)
            pingreq = bytes((0xC0, 0))
            sock = client.sock
            receive = client.codec.receive_data
            recv_bytes = SUBSCRIBER_RECV_BYTES if options.size >= SCATTER_MIN_SIZE else RECV_BYTES
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
                    data = sock.recv(recv_bytes)
                    if not data:
                        raise ConnectionError("the broker closed the connection")
                    acks = []
                    for packet in receive(data):
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
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mqtt_target_options(parser)
    parser.add_argument("--qos", type=int, choices=(0, 1, 2), default=1,
                        help="QoS of publishes and subscriptions (1)")
    parser.add_argument("--publishers", type=at_least(1), default=1, metavar="N", help="publisher connections (1)")
    parser.add_argument("--subscribers", type=at_least(0), default=1, metavar="M",
                        help="subscriber connections, one process each (1)")
    parser.add_argument("--shared", action="store_true",
                        help="subscribers share $share/bench/<topic>/# (each message to one) instead of each "
                             "subscribing <topic>/# (each message to all)")
    parser.add_argument("--client-processes", type=at_least(1), default=0, metavar="P",
                        help="processes the publisher connections are spread over (default min(N, 2))")
    parser.add_argument("--size", type=at_least(MIN_SIZE), default=256, metavar="BYTES",
                        help=f"payload size, at least {MIN_SIZE} (default 256)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="messages per second in total over all publishers; 0 = as fast as possible (default)")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds of publishing (10)")
    parser.add_argument("--topic", default="", help="topic prefix (default: a new bench-<random>)")
    parser.add_argument("--protocol", dest="protocol_level", type=int, choices=(4, 5), default=4,
                        help="MQTT protocol level: 4 = 3.1.1 (default), 5 = 5.0")
    parser.add_argument("--inflight", type=at_least(1), default=64, metavar="N",
                        help="unacknowledged QoS 1/2 publishes per publisher connection, capped by the broker's "
                             "Receive Maximum on MQTT 5; also the Receive Maximum subscribers announce (64)")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                        help="after publishing, wait this long without progress for subscribers to catch up (10)")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")
    add_plot_option(parser)
    parser.set_defaults(protocol="mqtt")


def run_mqtt_command(args: argparse.Namespace) -> int:
    from tidegate.adapters.native.errors import wire_code
    from tidegate.core.errors import TidegateError

    if args.duration <= 0 or args.rate < 0:
        print("error: --duration must be above 0 and --rate at least 0", file=sys.stderr)
        return EXIT_FAILURE
    try:
        with MqttTarget(args) as (server, _pid):
            if args.spawn_broker:
                progress(f"spawned broker (flush={args.flush}) with MQTT on {server}")
            options = mqtt_options(args, server)
            report = run_bench(MqttDriver, options, progress)
    except TidegateError as exc:
        print(f"error: {exc.message} ({wire_code(exc).name})", file=sys.stderr)
        return EXIT_FAILURE
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    report = mqtt_report(report)
    plot_report(args.plot, report, f"tidegate bench mqtt (QoS {args.qos}): latency")
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


COMMAND = BenchCommand("mqtt", "MQTT publishers and subscribers (lean clients on our codec)", add_arguments,
                       run_mqtt_command)
