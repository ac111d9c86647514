"""`tidegate bench amqp`: AMQP 0-9-1 publishers and consumers on the `tidegate bench` engine, through a lean
blocking client on our own codec (adapters/amqp/codec.py), so the client costs little next to the broker.

- Publishers: `--publishers N` connections spread over the engine's producer workers, each publishing to exchange
  `<topic>` with routing key `bench`, persistent (`--persistent`, delivery mode 2) or not. With `--confirm W` a
  publisher keeps up to W messages unconfirmed (publisher confirms; a message counts as acknowledged on basic.ack);
  with `--confirm 0` (default) a message counts as acknowledged once written.
- Consumers: `--consumers M` connections, one per consumer worker, with prefetch `--prefetch` and manual acks (one
  `multiple` ack per read) unless `--no-ack`. By default they share one queue `<topic>` (each message to one of
  them); with `--fanout` the exchange is a fanout and each consumer has its own queue (each gets every message).
- No reconnects happen in a run: any duplicate is an error, and every acknowledged message must arrive.
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

from .arguments import EXIT_FAILURE, EXIT_OK, BenchCommand, add_spawn_broker_options, at_least, progress
from .broker import SpawnedBroker
from .delivery import MIN_SIZE, PAYLOAD_HEADER, PAYLOAD_MAGIC, ConsumerTally, ProducerTally
from .driver import SEND_DRAIN_TIMEOUT_S, BenchError, BenchOptions, Driver, RateLimiter, WorkerContext
from .engine import run_bench
from .latency import latency_line
from .plot import add_plot_option, plot_report

AMQP_PORT = 5672
CONNECT_TIMEOUT_S = 10.0
ROUTING_KEY = "bench"
MAX_BURST = 256  # a full-rate publisher writes at most this many publishes per send
POLL_S = 0.05


class AmqpBenchClient:
    """One AMQP connection with channel 1 open, as user guest on vhost `/`; blocking socket, no heartbeats."""

    def __init__(self, server: str) -> None:
        from pamqp import commands

        from tidegate.adapters.amqp.codec import PROTOCOL_HEADER, AmqpClientCodec

        self.commands = commands
        host, _, port = server.rpartition(":")
        try:
            self.sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise BenchError(f"cannot connect to AMQP at {server}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.codec = AmqpClientCodec()
        self.backlog: list[Any] = []
        self.sock.sendall(PROTOCOL_HEADER)
        self.wait(commands.Connection.Start)
        self.send(0, commands.Connection.StartOk(client_properties={"product": "tidegate bench"}, mechanism="PLAIN",
                                                 response="\x00guest\x00guest"))
        tune = self.wait(commands.Connection.Tune)
        self.send(0, commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
        self.call(0, commands.Connection.Open(virtual_host="/"), commands.Connection.OpenOk)
        self.call(1, commands.Channel.Open(), commands.Channel.OpenOk)
        self.sock.settimeout(None)

    def send(self, channel: int, method: Any) -> None:
        self.sock.sendall(self.codec.send_method(channel, method))

    def read(self) -> list[Any]:
        data = self.sock.recv(1 << 20)
        if not data:
            raise BenchError("the broker closed the AMQP connection")
        events = self.codec.receive_data(data)
        for event in events:
            method = getattr(event, "method", None)
            if isinstance(method, self.commands.Connection.Close | self.commands.Channel.Close):
                raise BenchError(f"the broker closed the {method.name.split('.')[0].lower()}: "
                                 f"{method.reply_code} {method.reply_text}")
        return events

    def wait(self, kind: type) -> Any:
        while True:
            for index, event in enumerate(self.backlog):
                if isinstance(getattr(event, "method", None), kind):
                    del self.backlog[index]
                    return event.method
            self.backlog.extend(self.read())

    def call(self, channel: int, method: Any, reply: type) -> Any:
        self.send(channel, method)
        return self.wait(reply)

    def close(self) -> None:
        try:
            self.send(0, self.commands.Connection.Close(reply_code=200, reply_text="bench done", class_id=0,
                                                        method_id=0))
        except OSError:
            pass
        self.sock.close()


class _Publisher:
    __slots__ = ("client", "frame_head", "window", "inflight", "next_tag")

    def __init__(self, client: AmqpBenchClient, window: int) -> None:
        self.client = client
        self.window = window
        self.inflight: dict[int, tuple[int, int]] = {}  # delivery tag -> (seq, send perf ns)
        self.next_tag = 1


def queue_names(options: BenchOptions) -> list[str]:
    if options.extra["fanout"]:
        return [f"{options.topic}-{n}" for n in range(max(1, options.consumers))]
    return [options.topic]


class AmqpDriver(Driver):
    name = "amqp"

    def copies(self, options: BenchOptions) -> int:
        return max(1, options.consumers) if options.extra["fanout"] else 1

    def prepare(self, options: BenchOptions) -> None:
        """Declare the exchange and the queues (durable when persistent) and bind them, before anyone publishes."""
        client = AmqpBenchClient(options.server)
        c = client.commands
        try:
            durable = options.extra["persistent"]
            kind = "fanout" if options.extra["fanout"] else "direct"
            client.call(1, c.Exchange.Declare(exchange=options.topic, exchange_type=kind, durable=durable),
                        c.Exchange.DeclareOk)
            for queue in queue_names(options):
                client.call(1, c.Queue.Declare(queue=queue, durable=durable), c.Queue.DeclareOk)
                client.call(1, c.Queue.Bind(queue=queue, exchange=options.topic, routing_key=ROUTING_KEY),
                            c.Queue.BindOk)
        finally:
            client.close()

    def run_producer(self, ctx: WorkerContext) -> dict[str, Any]:
        options = ctx.options
        extra = options.extra
        tally = ProducerTally()
        publishers: list[_Publisher] = []
        try:
            for _ in range(ctx.index, extra["publishers"], options.producers):
                client = AmqpBenchClient(options.server)
                if extra["confirm"]:
                    client.call(1, client.commands.Confirm.Select(), client.commands.Confirm.SelectOk)
                publishers.append(_Publisher(client, extra["confirm"]))
            with ctx.ticker(lambda: {"sent": tally.sent, "acked": tally.acked, "failed": tally.failed}):
                ctx.publish(ready=1)
                ctx.shared.go.wait()
                self._publish_loop(ctx, publishers, tally)
        finally:
            for publisher in publishers:
                publisher.client.close()
        return tally.result()

    @staticmethod
    def _publish_loop(ctx: WorkerContext, publishers: list[_Publisher], tally: ProducerTally) -> None:
        from pamqp import commands

        from tidegate.adapters.amqp.codec import _marshal_properties

        options = ctx.options
        extra = options.extra
        confirm = extra["confirm"]
        properties = _marshal_properties(commands.Basic.Properties(delivery_mode=2 if extra["persistent"] else 1))
        method = commands.Basic.Publish(exchange=options.topic, routing_key=ROUTING_KEY)
        deadline = ctx.run_deadline()
        limiter = RateLimiter(options.rate / options.producers if options.rate else 0)
        paced = bool(options.rate)
        padding = b"\x00" * (options.size - MIN_SIZE)
        pack, magic, index = PAYLOAD_HEADER.pack, PAYLOAD_MAGIC, ctx.index
        time_ns, perf_ns, monotonic = time.time_ns, time.perf_counter_ns, time.monotonic
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
                if not confirm or not any(p.inflight for p in publishers):
                    break
                if monotonic() >= drain_deadline:
                    raise TimeoutError(f"publishes still unconfirmed {SEND_DRAIN_TIMEOUT_S}s after the run")
            room_left = False
            window_full = paced  # paced: stays True if a due slot found no publisher with room
            # Paced: one message when its slot is due; until then wait in select below, so each confirm is read
            # (and timed) when it arrives, not after a sleep in the limiter (the MQTT bench does the same).
            if producing and (not paced or limiter.until_next_slot(monotonic()) <= 0.0):
                for p in publishers[turn:] + publishers[:turn] if paced else publishers:
                    room = p.window - len(p.inflight) if confirm else MAX_BURST
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
                    send_content = p.client.codec.send_content
                    parts = []
                    started = perf_ns()
                    for _ in range(n):
                        parts.append(send_content(1, method, properties,
                                                  pack(magic, index, seq, time_ns()) + padding))
                        if confirm:
                            p.inflight[p.next_tag] = (seq, started)
                            p.next_tag += 1
                        seq += 1
                    p.client.sock.sendall(b"".join(parts))
                    if not confirm:
                        tally.on_acked(seq - n, n, started)  # no confirms: "acknowledged" once written
                    tally.sent = seq
                    if room > n:
                        room_left = True
                if paced:
                    room_left = False  # only look for answers until the next slot
            timeout = limiter.answer_wait(room_left=room_left, paced=paced, producing=producing,
                                          window_full=window_full, poll_s=POLL_S, now=monotonic())
            if not confirm:
                if not producing:
                    break
                for sock in select.select(sockets, [], [], timeout if paced else 0)[0]:
                    by_socket[sock].client.read()  # nothing is expected; notice a channel or connection close
                continue
            for sock in select.select(sockets, [], [], timeout)[0]:
                p = by_socket[sock]
                inflight = p.inflight
                for event in p.client.read():
                    answer = getattr(event, "method", None)
                    if isinstance(answer, commands.Basic.Ack | commands.Basic.Nack):
                        tags = [t for t in inflight if t <= answer.delivery_tag] if answer.multiple \
                            else [answer.delivery_tag]
                        for tag in tags:
                            entry = inflight.pop(tag, None)
                            if entry is None:
                                continue
                            if isinstance(answer, commands.Basic.Ack):
                                tally.on_acked(entry[0], 1, entry[1])
                            else:
                                tally.on_failed(1, BenchError("basic.nack"))

    def run_consumer(self, ctx: WorkerContext) -> dict[str, Any]:
        from pamqp import commands

        from tidegate.adapters.amqp.codec import ContentEvent

        options = ctx.options
        extra = options.extra
        queues = queue_names(options)
        queue = queues[ctx.index % len(queues)]
        no_ack = extra["no_ack"]
        tally = ConsumerTally()
        client = AmqpBenchClient(options.server)
        try:
            client.call(1, commands.Basic.Qos(prefetch_count=extra["prefetch"]), commands.Basic.QosOk)
            client.call(1, commands.Basic.Consume(queue=queue, no_ack=no_ack), commands.Basic.ConsumeOk)
            sock, record, stop, monotonic = client.sock, tally.record, ctx.shared.stop, time.monotonic
            next_stop_check = 0.0
            pending = client.backlog
            client.backlog = []
            with ctx.ticker(lambda: {"received": tally.received, "ready": 1}):
                while True:
                    now = monotonic()
                    if now >= next_stop_check:
                        if stop.is_set():
                            break
                        next_stop_check = now + 0.1
                    if not pending:
                        if not select.select((sock,), (), (), 0.1)[0]:
                            continue
                        pending = client.read()
                    last_tag = 0
                    for event in pending:
                        if event.__class__ is ContentEvent:
                            record(event.body)
                            last_tag = event.method.delivery_tag
                    pending = []
                    if last_tag and not no_ack:
                        client.send(1, commands.Basic.Ack(delivery_tag=last_tag, multiple=True))
        finally:
            client.close()
        return tally.result()


# ===================================================================================================== CLI
class AmqpTarget:
    """The broker of the command: a spawned one with its AMQP listener, or --server as given."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.broker: SpawnedBroker | None = None

    def __enter__(self) -> str:
        import os

        args = self.args
        if not args.spawn_broker:
            if args.flush != "sync" or args.profile_broker:
                raise BenchError("--flush and --profile-broker apply to a broker started with --spawn-broker")
            return args.server or f"127.0.0.1:{AMQP_PORT}"
        profile = os.path.abspath(args.profile_broker) if args.profile_broker else ""
        self.broker = SpawnedBroker(args.flush, listeners=("amqp",), profile_path=profile)
        self.broker.__enter__()
        return self.broker.addresses["amqp"]

    def __exit__(self, *exc: object) -> None:
        if self.broker is not None:
            self.broker.__exit__(*exc)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="HOST:PORT", default=None,
                        help=f"AMQP address of the broker (default 127.0.0.1:{AMQP_PORT}); ignored with "
                             "--spawn-broker")
    add_spawn_broker_options(parser)
    parser.add_argument("--publishers", type=at_least(1), default=1, metavar="N", help="publisher connections (1)")
    parser.add_argument("--consumers", type=at_least(0), default=1, metavar="M",
                        help="consumer connections, one process each (1)")
    parser.add_argument("--fanout", action="store_true",
                        help="a fanout exchange and one queue per consumer (each gets every message) instead of one "
                             "shared queue")
    parser.add_argument("--persistent", action="store_true",
                        help="durable exchange and queues, delivery mode 2 (default: transient)")
    parser.add_argument("--confirm", type=at_least(0), default=0, metavar="W",
                        help="publisher confirms with up to W unconfirmed messages per publisher (0 = no confirms)")
    parser.add_argument("--prefetch", type=at_least(0), default=256, metavar="P",
                        help="consumer prefetch count (256; 0 = unlimited)")
    parser.add_argument("--no-ack", action="store_true", help="consume without acknowledgements")
    parser.add_argument("--client-processes", type=at_least(1), default=0, metavar="P",
                        help="processes the publisher connections are spread over (default min(N, 2))")
    parser.add_argument("--size", type=at_least(MIN_SIZE), default=256, metavar="BYTES",
                        help=f"payload size, at least {MIN_SIZE} (default 256)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="messages per second in total over all publishers; 0 = as fast as possible (default)")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds of publishing (10)")
    parser.add_argument("--topic", default="", help="exchange and queue name prefix (default: bench-<random>)")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                        help="after publishing, wait this long without progress for consumers to catch up (10)")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")
    add_plot_option(parser)


def amqp_options(args: argparse.Namespace, server: str) -> BenchOptions:
    run_id = uuid.uuid4().hex[:8]
    processes = args.client_processes or min(args.publishers, 2)
    return BenchOptions(
        protocol="amqp", server=server, producers=min(processes, args.publishers), consumers=args.consumers,
        size=args.size, rate=args.rate, duration=args.duration, topic=args.topic or f"bench-{run_id}",
        queues=max(1, args.consumers), inflight=max(1, args.confirm), drain_timeout=args.drain_timeout,
        workers="process", group=f"bench-{run_id}",
        extra={"publishers": args.publishers, "fanout": args.fanout, "persistent": args.persistent,
               "confirm": args.confirm, "prefetch": args.prefetch, "no_ack": args.no_ack,
               "broker_flush": args.flush if args.spawn_broker else "unknown"})


def run_amqp_command(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.rate < 0:
        print("error: --duration must be above 0 and --rate at least 0", file=sys.stderr)
        return EXIT_FAILURE
    try:
        with AmqpTarget(args) as server:
            if args.spawn_broker:
                progress(f"spawned broker (flush={args.flush}) with AMQP on {server}")
            report = run_bench(AmqpDriver, amqp_options(args, server), progress)
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    errors = list(report["errors"])
    if report["duplicated"]:
        errors.append(f"{report['duplicated']} duplicated deliveries (no reconnects happened: none is allowed)")
    if report["lost"]:
        errors.append(f"{report['lost']} acknowledged deliveries lost")
    report["errors"] = errors
    plot_report(args.plot, report, "tidegate bench amqp: latency")
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_amqp_report(report))
    return EXIT_FAILURE if errors else EXIT_OK


def format_amqp_report(report: dict[str, Any]) -> str:
    o = report["options"]
    mode = "fanout" if o["fanout"] else "shared queue"
    lines = [
        f"tidegate bench amqp: {o['publishers']} publisher(s) in {o['producers']} process(es), {o['consumers']} "
        f"consumer(s) ({mode}), {'persistent' if o['persistent'] else 'transient'}, confirm window "
        f"{o['confirm'] or 'off'}, prefetch {o['prefetch']}{', no-ack' if o['no_ack'] else ''}, {o['size']} B, "
        f"rate {o['rate'] or 'max'}, {o['duration']}s, flush {o['broker_flush']}",
        f"  published {report['sent']}  acked {report['acked']}  failed {report['failed']}  received "
        f"{report['received']}  lost {report['lost']}  duplicated {report['duplicated']}",
        f"  publish {report['produce_msgs_per_s']} msg/s  receive {report['deliveries_per_s']} msg/s",
        latency_line("end-to-end", report["latency_ms"]),
        latency_line("publish-to-ack", report["ack_latency_ms"]),
    ]
    lines += [f"  error: {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


COMMAND = BenchCommand("amqp", "AMQP 0-9-1 publishers and consumers (lean clients on our codec)", add_arguments,
                       run_amqp_command)
