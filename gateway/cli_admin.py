"""Operator commands of the `tidegate` CLI: topic, send, consume, group, message, admin (and `bench`, see
gateway/bench.py).

Every command talks to a running broker over the native protocol through the blocking SDK (`tidegate.client`),
except `admin tls-reload`, which asks the admin HTTP API (`POST /api/tls/reload`, HTTPS when `--admin` starts
with https://, verified against `--cafile`; gateway/admin_client.py, as the `user|role|acl` commands) as an
administrator (`TIDEGATE_USER`/`TIDEGATE_PASSWORD`), and
`admin rotate-key`, which only edits the local encryption keyring file (docs/security.md, "Encryption at rest").
Output is a human table by default and JSON with `--json`. Failures are one line on stderr and exit code 1:
`error: <message> (<CODE NAME>)`; bad arguments exit 2 (argparse, or `UsageError` raised by a handler).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import queue
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.errors import wire_code
from tidegate.client import Admin, Connection, Producer
from tidegate.core.errors import TidegateError
from tidegate.core.model import Message, QueueRef
from tidegate.gateway.cli import EXIT_FAILURE, EXIT_OK, OneLineArgumentParser, UsageError

SERVER_ENV = "TIDEGATE_SERVER"
DEFAULT_SERVER = "127.0.0.1:10911"
EXIT_INTERRUPTED = 130
# Messages `consume` lets the broker push ahead of what it has printed; never more than --count still wanted.
CONSUME_WINDOW = 64
# How often a waiting `consume` wakes to notice a dropped connection or the end of --timeout.
CONSUME_POLL_S = 0.2
PRINTABLE_CONTROL = frozenset("\t\n\r")

Handler = Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------------------------- registration
def register(commands: argparse._SubParsersAction) -> None:
    """Add topic, send, consume, group and message (and bench) to the `tidegate` parser."""
    common = common_options()
    _register_topic(commands, common)
    _register_send(commands, common)
    _register_consume(commands, common)
    _register_group(commands, common)
    _register_message(commands, common)
    _register_admin(commands)
    # bench lives in its own module; registering it from here keeps cli.py's discovery (cli_* modules) the only hook.
    from tidegate.gateway import bench

    bench.register(commands)


def common_options() -> argparse.ArgumentParser:
    """--server and --json, shared by every operator command (a parent parser, so each subcommand accepts them)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--server", metavar="HOST:PORT", default=None,
                        help=f"broker native address (default: ${SERVER_ENV} or {DEFAULT_SERVER})")
    parent.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return parent


def _subcommands(parser: argparse.ArgumentParser, dest: str, names: Sequence[str]) -> argparse._SubParsersAction:
    return parser.add_subparsers(dest=dest, metavar="{" + ",".join(names) + "}", required=True,
                                 parser_class=OneLineArgumentParser)


def _register_topic(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    topic = commands.add_parser("topic", help="create, update, list, describe and delete topics")
    sub = _subcommands(topic, "topic_command", ["create", "update", "list", "describe", "delete", "schema"])
    # `topic schema ...` calls the admin HTTP API (authenticated admin), not the native port
    from tidegate.gateway.cli_security import register_topic_schema

    register_topic_schema(sub)

    create = sub.add_parser("create", parents=[common], help="create a topic")
    create.add_argument("name")
    create.add_argument("--queues", type=positive_int, default=0, metavar="N",
                        help="number of queues (default: the broker's broker.default_queues)")
    create.add_argument("--perm", choices=("r", "w", "rw"), default="rw", help="r, w or rw (default rw)")
    create.add_argument("--retention-hours", type=non_negative_int, default=0, metavar="H",
                        help="keep messages this long (default: the broker's retention)")
    create.set_defaults(handler=guarded(run_topic_create))

    update = sub.add_parser("update", parents=[common], help="change queues, permission or retention of a topic")
    update.add_argument("name")
    update.add_argument("--queues", type=positive_int, default=None, metavar="N")
    update.add_argument("--perm", choices=("r", "w", "rw"), default=None)
    update.add_argument("--retention-hours", type=non_negative_int, default=None, metavar="H")
    update.set_defaults(handler=guarded(run_topic_update))

    listing = sub.add_parser("list", parents=[common], help="list topics")
    listing.add_argument("--internal", action="store_true",
                         help="include internal topics (retry, dead-letter); the private queues of MQTT sessions "
                              "and AMQP are never listed to clients")
    listing.set_defaults(handler=guarded(run_topic_list))

    describe = sub.add_parser("describe", parents=[common], help="a topic's settings and per-queue offsets")
    describe.add_argument("name")
    describe.set_defaults(handler=guarded(run_topic_describe))

    delete = sub.add_parser("delete", parents=[common], help="delete a topic and its messages")
    delete.add_argument("name")
    delete.set_defaults(handler=guarded(run_topic_delete))


def _register_send(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    send = commands.add_parser("send", parents=[common], help="send a message (body from the argument, a file "
                               "or stdin)")
    send.add_argument("topic")
    send.add_argument("body", nargs="?", help="message body as text; omit to read --file or stdin")
    send.add_argument("--file", metavar="F", help="read the body from this file (binary safe)")
    send.add_argument("--tag", default="")
    send.add_argument("--key", dest="keys", action="append", default=[], metavar="KEY",
                      help="message key for `message query --key` (repeatable)")
    send.add_argument("--prop", dest="props", action="append", default=[], metavar="K=V",
                      help="message property (repeatable)")
    send.add_argument("--subject", default="", help="subject below the topic, e.g. a/b (MQTT topic T/a/b)")
    send.add_argument("--count", type=positive_int, default=1, metavar="N", help="send the message N times")
    send.set_defaults(handler=guarded(run_send))


def _register_consume(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    consume = commands.add_parser("consume", parents=[common], help="consume and print messages as a group member")
    consume.add_argument("topic")
    consume.add_argument("--group", required=True, help="consumer group (its committed offsets are where it resumes)")
    consume.add_argument("--filter", default="*", metavar="EXPR", help="tag filter, e.g. 'TagA || TagB' (default *)")
    consume.add_argument("--from", dest="start", choices=("earliest", "latest"), default=None,
                         help="where a group without committed offsets begins (default: the broker's setting)")
    consume.add_argument("--count", type=positive_int, default=None, metavar="N",
                         help="stop after N messages (default: run until --timeout or Ctrl-C)")
    consume.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                         help="stop after S seconds without a new message (default: wait forever)")
    consume.add_argument("--ack", choices=("offset", "message"), default="offset",
                         help="offset: commit queue offsets (default); message: ack each message (pop style)")
    consume.set_defaults(handler=guarded(run_consume))


def _register_group(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("group", help="list and describe consumer groups, reset their offsets")
    sub = _subcommands(group, "group_command", ["list", "describe", "reset-offset"])

    listing = sub.add_parser("list", parents=[common], help="list consumer groups with members and lag")
    listing.set_defaults(handler=guarded(run_group_list))

    describe = sub.add_parser("describe", parents=[common], help="a group's committed offsets and lag per queue")
    describe.add_argument("group")
    describe.set_defaults(handler=guarded(run_group_describe))

    reset = sub.add_parser("reset-offset", parents=[common], help="move a group's offsets on a topic")
    reset.add_argument("group")
    reset.add_argument("--topic", required=True)
    reset.add_argument("--to", required=True, metavar="WHERE",
                       help="earliest, latest, an ISO 8601 time (local time unless it has an offset) or ms since "
                            "the epoch: the first message stored at or after it")
    reset.set_defaults(handler=guarded(run_group_reset_offset))


def _register_message(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    message = commands.add_parser("message", help="look messages up by id, key or store time")
    sub = _subcommands(message, "message_command", ["query"])
    query = sub.add_parser("query", parents=[common], help="--id ID | --key K --topic T | --topic T --from T1 --to T2")
    query.add_argument("--id", dest="msg_id", metavar="ID")
    query.add_argument("--key")
    query.add_argument("--topic")
    query.add_argument("--from", dest="time_from", metavar="TIME", help="ISO 8601 time or ms since the epoch")
    query.add_argument("--to", dest="time_to", metavar="TIME", help="ISO 8601 time or ms (default: now)")
    query.add_argument("--limit", type=positive_int, default=100, metavar="N")
    query.set_defaults(handler=guarded(run_message_query))


def _register_rotate_key(sub: argparse._SubParsersAction) -> None:
    from tidegate.gateway.cli import add_config_arguments

    rotate = sub.add_parser("rotate-key", help="add a new encryption-at-rest key to the keyring; it seals new "
                                               "records from the next start, old keys keep opening old records")
    add_config_arguments(rotate)
    rotate.add_argument("--key-file", metavar="PATH",
                        help="keyring file to extend or create (default: storage.encryption_key_file)")
    rotate.add_argument("--key-id", metavar="ID", default="", help="id of the new key (default: k<n+1>)")
    rotate.set_defaults(handler=run_admin_rotate_key)


# ------------------------------------------------------------------------------------------ argument types
def _register_admin(commands: argparse._SubParsersAction) -> None:
    admin = commands.add_parser("admin", help="broker operations: tls-reload (over the admin HTTP API), rotate-key "
                                              "(encryption-at-rest keyring file)")
    sub = _subcommands(admin, "admin_command", ["tls-reload", "rotate-key"])
    _register_rotate_key(sub)
    from tidegate.gateway.admin_client import admin_options, guarded

    reload = sub.add_parser("tls-reload", parents=[admin_options()],
                            help="re-read the TLS certificate, key and CA files (as SIGHUP does); open connections "
                                 "stay, new ones get the new certificate")
    reload.set_defaults(handler=guarded(run_admin_tls_reload))


def run_admin_tls_reload(args: argparse.Namespace) -> int:
    from tidegate.gateway.admin_client import client_for

    answer = client_for(args, "tls").call("POST", "reload", {})
    if args.json:
        print_json(answer)
    else:
        for listener, not_after in sorted(answer.get("not_after", {}).items()):
            print(f"{listener}: certificate valid until {not_after}")
        if not answer.get("not_after"):
            print("reloaded (no TLS listener)")
    return EXIT_OK


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch from digits (already ms) or ISO 8601; a time without offset is local time."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is neither an ISO 8601 time (2024-05-01T12:00:00Z) nor milliseconds") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # interpret as the operator's local time
    return int(moment.timestamp() * 1000)


def parse_properties(items: Iterable[str]) -> dict[str, str]:
    properties: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--prop expects KEY=VALUE, got {item!r}")
        properties[key] = value
    return properties


def server_address(args: argparse.Namespace) -> str:
    return args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER


# ----------------------------------------------------------------------------------------------- error guard
def guarded(handler: Handler) -> Handler:
    """Turn broker errors and unreachable brokers into one stderr line and exit code 1 (never a traceback)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except TidegateError as exc:
            print(f"error: {exc.message} ({wire_code(exc).name})", file=sys.stderr)
        except ConnectionRefusedError:
            print(f"error: cannot connect to the broker at {server_address(args)}: connection refused "
                  f"(is `tidegate serve` running? point --server or ${SERVER_ENV} at it)", file=sys.stderr)
        except (TimeoutError, OSError) as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            print(f"error: cannot reach the broker at {server_address(args)}: {reason}", file=sys.stderr)
        except ValueError as exc:
            # The SDK rejects a malformed --server this way, before any I/O.
            raise UsageError(str(exc)) from None
        return EXIT_FAILURE

    return run


# --------------------------------------------------------------------------------------------------- output
def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; `-` for empty cells so columns never collapse."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in text_rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def print_json(value: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def iso_time(ms: int) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def body_view(body: bytes) -> tuple[str, str]:
    """(encoding, text): UTF-8 text when the body is printable text, otherwise hex."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "hex", body.hex()
    if any(not ch.isprintable() and ch not in PRINTABLE_CONTROL for ch in text):
        return "hex", body.hex()
    return "utf-8", text


def message_record(message: Message) -> dict[str, Any]:
    encoding, body = body_view(message.body)
    return {
        "msg_id": message.msg_id,
        "topic": message.topic,
        "subject": message.subject,
        "tag": message.tag,
        "keys": list(message.keys),
        "properties": dict(message.properties),
        "born_ts": message.born_ts,
        "store_ts": message.store_ts,
        "group": message.group,
        "body_encoding": encoding,
        "body": body,
        "body_size": len(message.body),
    }


def message_line(message: Message, prefix: Sequence[tuple[str, Any]] = ()) -> str:
    """One line per message; text bodies are JSON-quoted so newlines in a body cannot break the line structure."""
    encoding, body = body_view(message.body)
    fields: list[str] = [f"{name}={value}" for name, value in prefix]
    fields.append(f"id={message.msg_id}")
    if message.subject:
        fields.append(f"subject={message.subject}")
    if message.tag:
        fields.append(f"tag={message.tag}")
    if message.keys:
        fields.append("keys=" + ",".join(message.keys))
    if message.properties:
        fields.append("props=" + json.dumps(message.properties, ensure_ascii=False, sort_keys=True))
    fields.append("body=" + (json.dumps(body, ensure_ascii=False) if encoding == "utf-8" else f"hex:{body}"))
    return " ".join(fields)


def topic_record(info: f.TopicInfo) -> dict[str, Any]:
    return {"name": info.name, "queues": info.queues, "perm": info.perm, "retention_ms": info.retention_ms,
            "internal": info.internal, "created": iso_time(info.created_ts)}


def retention_ms(hours: int | None) -> int | None:
    return None if hours is None else hours * 3_600_000


# --------------------------------------------------------------------------------------------------- topics
def run_topic_create(args: argparse.Namespace) -> int:
    with Admin(server_address(args)) as admin:
        info = admin.create_topic(args.name, args.queues, perm=args.perm,
                                  retention_ms=args.retention_hours * 3_600_000)
    if args.json:
        print_json(topic_record(info))
    else:
        print(f"created topic {info.name} with {info.queues} queues ({info.perm})")
    return EXIT_OK


def run_topic_update(args: argparse.Namespace) -> int:
    if args.queues is None and args.perm is None and args.retention_hours is None:
        raise UsageError("nothing to change: give --queues, --perm or --retention-hours")
    with Admin(server_address(args)) as admin:
        info = admin.update_topic(args.name, queues=args.queues, perm=args.perm,
                                  retention_ms=retention_ms(args.retention_hours))
    if args.json:
        print_json(topic_record(info))
    else:
        print(f"updated topic {info.name}: {info.queues} queues ({info.perm}), retention {info.retention_ms} ms")
    return EXIT_OK


def run_topic_list(args: argparse.Namespace) -> int:
    with Admin(server_address(args)) as admin:
        topics = admin.list_topics(include_internal=args.internal)
    if args.json:
        print_json([topic_record(t) for t in topics])
    else:
        rows = [(t.name, t.queues, t.perm, t.retention_ms or "default", t.internal, iso_time(t.created_ts))
                for t in topics]
        sys.stdout.write(format_table(("TOPIC", "QUEUES", "PERM", "RETENTION MS", "INTERNAL", "CREATED"), rows))
    return EXIT_OK


def run_topic_describe(args: argparse.Namespace) -> int:
    with Admin(server_address(args)) as admin:
        description = admin.describe_topic(args.name)
    queues = [{"queue_id": q.queue_id, "min_offset": q.min_offset, "max_offset": q.max_offset,
               "messages": q.max_offset - q.min_offset} for q in description.queues]
    if args.json:
        print_json({**topic_record(description.topic), "queue_offsets": queues})
    else:
        info = description.topic
        retention = f"{info.retention_ms} ms" if info.retention_ms else "default"
        print(f"topic {info.name}: {info.queues} queues, perm {info.perm}, retention {retention}, "
              f"created {iso_time(info.created_ts) or '-'}")
        sys.stdout.write(format_table(("QUEUE", "MIN OFFSET", "MAX OFFSET", "MESSAGES"),
                                      [(q["queue_id"], q["min_offset"], q["max_offset"], q["messages"])
                                       for q in queues]))
    return EXIT_OK


def run_topic_delete(args: argparse.Namespace) -> int:
    with Admin(server_address(args)) as admin:
        admin.delete_topic(args.name)
    if args.json:
        print_json({"deleted": args.name})
    else:
        print(f"deleted topic {args.name}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------- send
def read_body(args: argparse.Namespace, stdin: Any = None) -> bytes:
    if args.body is not None and args.file is not None:
        raise UsageError("give the body as an argument or with --file, not both")
    if args.body is not None:
        return args.body.encode("utf-8")
    if args.file is not None:
        try:
            with open(args.file, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file}: {exc.strerror}") from None
    source = stdin if stdin is not None else sys.stdin
    if source.isatty():
        raise UsageError("no body: give it as an argument, with --file, or pipe it on stdin")
    return source.buffer.read()


def run_send(args: argparse.Namespace) -> int:
    body = read_body(args)
    properties = parse_properties(args.props)
    results = []
    with Producer(server_address(args)) as producer:
        for _ in range(args.count):
            results.append(producer.send(args.topic, body, tag=args.tag, keys=args.keys, properties=properties,
                                         subject=args.subject))
    if args.json:
        print_json([{"msg_id": r.msg_id, "topic": r.topic, "queue_id": r.queue_id, "queue_offset": r.queue_offset}
                    for r in results])
    else:
        sys.stdout.write(format_table(("MSG ID", "QUEUE", "OFFSET"),
                                      [(r.msg_id, f"{r.topic}:{r.queue_id}", r.queue_offset) for r in results]))
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- consume
class CountedSubscription:
    """A group member that never takes more messages than it will print.

    The SDK's PushConsumer grants credit ahead and commits whatever its handler was given, so stopping it after N
    messages would silently consume the ones buffered behind them. Here credit is granted only up to the number
    still wanted, and progress (offsets, or acks in message mode) is committed only for printed messages.
    """

    def __init__(self, conn: Connection, *, group: str, topic: str, filter_expr: str, start: str | None,
                 ack: str, limit: int | None) -> None:
        self.conn = conn
        self.limit = limit
        self.ack_mode = f.Ack.MESSAGE if ack == "message" else f.Ack.OFFSET
        self.inbox: queue.SimpleQueue[f.DeliveryRecord] = queue.SimpleQueue()
        self.taken = 0  # messages handed to the caller
        self.outstanding = self._window()
        self._offsets: dict[QueueRef, int] = {}
        self._receipts: list[str] = []
        frame = conn.request(f.Subscribe, on_push=self._on_push, group=group, topic=topic, client_id=conn.client_id,
                             mode=f.Mode.CLUSTERING, ack=self.ack_mode, filter_expr=filter_expr, start=start or "",
                             credit=self.outstanding)
        self.subscription_id = frame.subscription_id

    def _window(self) -> int:
        return CONSUME_WINDOW if self.limit is None else min(CONSUME_WINDOW, self.limit)

    def _on_push(self, frame: f.Frame) -> None:
        # Runs on the SDK reader thread: hand off only.
        if isinstance(frame, f.Deliver):
            for record in frame.messages:
                self.inbox.put(record)

    def next(self, wait_s: float) -> f.DeliveryRecord | None:
        try:
            return self.inbox.get(timeout=wait_s)
        except queue.Empty:
            return None

    def taken_record(self, record: f.DeliveryRecord) -> None:
        """The caller printed `record`: count it as consumed and keep the window open for what is still wanted."""
        self.taken += 1
        self.outstanding -= 1
        if self.ack_mode is f.Ack.MESSAGE:
            self._receipts.append(record.receipt)
        else:
            self._offsets[QueueRef(record.topic, record.queue_id)] = record.queue_offset + 1
        if self.inbox.empty():
            self.commit(wait=False)
            self._refill()

    def _refill(self) -> None:
        still_wanted = CONSUME_WINDOW if self.limit is None else self.limit - self.taken
        grant = min(CONSUME_WINDOW, still_wanted) - self.outstanding
        # Re-grant in chunks rather than per message, so a fast stream costs few CREDIT frames.
        if grant > 0 and (grant * 2 >= CONSUME_WINDOW or self.outstanding == 0):
            self.outstanding += grant
            self.conn.send_oneway(f.Credit, subscription_id=self.subscription_id, credit=grant)

    def commit(self, wait: bool) -> None:
        send = self.conn.request if wait else self.conn.send_oneway
        if self._receipts:
            receipts, self._receipts = self._receipts, []
            send(f.AckMessages, subscription_id=self.subscription_id, receipts=receipts)
        if self._offsets:
            offsets, self._offsets = self._offsets, {}
            send(f.Commit, subscription_id=self.subscription_id,
                 offsets=[f.QueueOffset(topic=q.topic, queue_id=q.queue_id, offset=o) for q, o in offsets.items()])

    def close(self) -> None:
        """Commit what was printed (waiting for the broker), leave the group, close the connection."""
        if not self.conn.closed:
            try:
                self.commit(wait=True)
                self.conn.request(f.Unsubscribe, subscription_id=self.subscription_id)
            finally:
                self.conn.close()


def run_consume(args: argparse.Namespace) -> int:
    client_id = f"tidegate-cli-{uuid.uuid4().hex[:12]}"
    conn = Connection(server_address(args), client_id=client_id).open()
    try:
        subscription = CountedSubscription(conn, group=args.group, topic=args.topic, filter_expr=args.filter,
                                           start=args.start, ack=args.ack, limit=args.count)
    except BaseException:
        conn.close()
        raise
    interrupted = False
    try:
        idle_since = time.monotonic()
        while args.count is None or subscription.taken < args.count:
            record = subscription.next(CONSUME_POLL_S)
            if record is None:
                if conn.closed:
                    raise TidegateError("the broker closed the connection")
                if args.timeout is not None and time.monotonic() - idle_since >= args.timeout:
                    break
                continue
            print_delivery(record, args.json)
            subscription.taken_record(record)
            idle_since = time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        subscription.close()
    if not args.json:
        print(f"consumed {subscription.taken} message(s)", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def print_delivery(record: f.DeliveryRecord, as_json: bool) -> None:
    message = record.message
    if as_json:
        # One JSON object per line, so a long-running consume can be piped into a stream processor.
        line = {"queue_id": record.queue_id, "queue_offset": record.queue_offset, "attempt": record.attempt,
                **message_record(message)}
        sys.stdout.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
    else:
        sys.stdout.write(message_line(message, (("queue", f"{record.topic}:{record.queue_id}"),
                                                ("offset", record.queue_offset))) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------- groups
MODE_NAMES = {f.Mode.CLUSTERING: "clustering", f.Mode.BROADCASTING: "broadcasting"}
ACK_NAMES = {f.Ack.OFFSET: "offset", f.Ack.MESSAGE: "message"}


def group_record(summary: f.GroupSummary) -> dict[str, Any]:
    return {"name": summary.name, "mode": MODE_NAMES.get(summary.mode, str(summary.mode)),
            "ack": ACK_NAMES.get(summary.ack, str(summary.ack)), "topics": list(summary.topics),
            "members": list(summary.members), "inflight": summary.inflight, "lag": summary.lag}


def run_group_list(args: argparse.Namespace) -> int:
    with Admin(server_address(args)) as admin:
        groups = admin.list_groups()
    records = [group_record(g) for g in groups]
    if args.json:
        print_json(records)
    else:
        rows = [(r["name"], r["mode"], r["ack"], r["topics"], len(r["members"]), r["inflight"], r["lag"])
                for r in records]
        sys.stdout.write(format_table(("GROUP", "MODE", "ACK", "TOPICS", "MEMBERS", "INFLIGHT", "LAG"), rows))
    return EXIT_OK


def run_group_describe(args: argparse.Namespace) -> int:
    with Admin(server_address(args)) as admin:
        description = admin.describe_group(args.group)
    progress = [{"topic": p.topic, "queue_id": p.queue_id, "committed": p.committed, "min_offset": p.min_offset,
                 "max_offset": p.max_offset, "lag": p.lag, "owner": p.owner} for p in description.progress]
    record = group_record(description.group)
    if args.json:
        print_json({**record, "progress": progress})
    else:
        print(f"group {record['name']}: {record['mode']}/{record['ack']}, topics {_cell(record['topics'])}, "
              f"members {_cell(record['members'])}, in flight {record['inflight']}, lag {record['lag']}")
        sys.stdout.write(format_table(("TOPIC", "QUEUE", "COMMITTED", "MIN", "MAX", "LAG", "OWNER"),
                                      [(p["topic"], p["queue_id"], p["committed"], p["min_offset"], p["max_offset"],
                                        p["lag"], p["owner"] or None) for p in progress]))
    return EXIT_OK


def reset_target(text: str) -> str | int:
    return text if text in ("earliest", "latest") else parse_time_ms(text)


def run_group_reset_offset(args: argparse.Namespace) -> int:
    target = reset_target(args.to)
    with Admin(server_address(args)) as admin:
        offsets = admin.reset_offsets(args.group, args.topic, target)
    rows = sorted(offsets.items(), key=lambda item: (item[0].topic, item[0].queue_id))
    if args.json:
        print_json({"group": args.group, "topic": args.topic, "to": target,
                    "offsets": [{"topic": q.topic, "queue_id": q.queue_id, "offset": o} for q, o in rows]})
    else:
        print(f"group {args.group} on {args.topic} reset to {args.to}")
        sys.stdout.write(format_table(("QUEUE", "OFFSET"), [(q.queue_id, o) for q, o in rows]))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- admin
def run_admin_rotate_key(args: argparse.Namespace) -> int:
    """Extend the keyring file (or, for a keyring in an environment variable, print the entry to add to it)."""
    from pathlib import Path

    from tidegate.core.storage.encryption import (
        EncryptionKeyError,
        Keyring,
        add_key_to_file,
        choose_key_id,
        format_key_line,
        generate_key,
    )
    from tidegate.gateway.cli import load_config_from_args

    storage = load_config_from_args(args).config.storage
    key_file = args.key_file or storage.encryption_key_file
    try:
        if key_file:
            path = Path(os.path.expanduser(key_file))
            key_id = add_key_to_file(path, args.key_id)
            print(f"added key {key_id} to {path}; it becomes the current key when the broker restarts. Keep the "
                  "older keys while records sealed with them are stored.", file=sys.stderr)
            return EXIT_OK
        if storage.encryption_key_env:
            name = storage.encryption_key_env
            current = os.environ.get(name, "")
            existing = list(Keyring.parse(current, f"${name}").keys) if current else []
            key_id = choose_key_id(existing, args.key_id, f"${name}")
            print(format_key_line(key_id, generate_key()))
            print(f"append this entry to ${name} (entries separated by commas) and restart the broker; keep the "
                  "older entries while records sealed with them are stored.", file=sys.stderr)
            return EXIT_OK
    except EncryptionKeyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    raise UsageError("no keyring configured: set storage.encryption_key_file or storage.encryption_key_env, or "
                     "pass --key-file PATH to create one")


# -------------------------------------------------------------------------------------------------- message
def run_message_query(args: argparse.Namespace) -> int:
    with_time = args.time_from is not None or args.time_to is not None
    if args.msg_id is not None:
        if args.key is not None or args.topic is not None or with_time:
            raise UsageError("--id looks up one message; it takes no --key, --topic, --from or --to")
    elif args.key is not None:
        if args.topic is None or with_time:
            raise UsageError("--key needs --topic (and takes no --from/--to)")
    elif args.topic is not None:
        if args.time_from is None:
            raise UsageError("give --from TIME (and optionally --to TIME) to list a topic's messages by store time")
    else:
        raise UsageError("give --id ID, --key K --topic T, or --topic T --from TIME [--to TIME]")
    with Admin(server_address(args)) as admin:
        if args.msg_id is not None:
            messages = [admin.query_by_id(args.msg_id)]
        elif args.key is not None:
            messages = admin.query_by_key(args.topic, args.key, limit=args.limit)
        else:
            start = parse_time_ms(args.time_from)
            end = parse_time_ms(args.time_to) if args.time_to is not None else int(time.time() * 1000)
            if end < start:
                raise UsageError("--to is before --from")
            messages = admin.query_by_time(args.topic, start, end, limit=args.limit)
    if args.json:
        print_json([message_record(m) for m in messages])
    else:
        for m in messages:
            print(message_line(m, (("stored", iso_time(m.store_ts)), ("topic", m.topic))))
        print(f"{len(messages)} message(s)", file=sys.stderr)
    return EXIT_OK

