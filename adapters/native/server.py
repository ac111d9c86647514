"""Twisted adapter of the native protocol: a thin connection between the sans-IO codec and the core session.

`NativeProtocol` is an `AdapterConnection` (adapters/base.py): the base owns the one write point (everything one
read causes leaves in one `writeSequence`), connection metrics, TCP_NODELAY, back-pressure registration, the idle
timer and the authenticating state. This module feeds the codec and turns each frame into one call on the
connection's `CoreSession` (core/session.py), which asks the gate before the core acts.

HELLO is mandatory and first (the codec refuses anything else). It authenticates the connection through
`gate.authenticate(Credentials(...))` with HELLO's username and password (anonymous without them); frames
pipelined behind HELLO wait, in order, until the gate answers, then HELLO_OK goes out and they run. A refused
login gets ERROR NOT_AUTHENTICATED (HELLO's request id) and a close. Sends are answered only once
`session.when_durable` says the record is on disk, so a SEND_OK means the message survives a crash.
Core errors become ERROR frames through the one table in adapters/native/errors.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from tidegate.adapters.base import AdapterConnection, AdapterFactory, ConnectionLimits
from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    DEFAULT_MAX_FRAME,
    LENGTH_SIZE,
    SEND_OK_TYPE,
    SEND_TYPE,
    FrameTooLarge,
    NativeCodec,
    ProtocolError,
    Role,
    SendRequest,
    decode_send_request,
    encode_deliver,
    encode_deliver_runs,
    encode_frame,
    encode_send_batch_ok,
    encode_send_ok,
)
from tidegate.adapters.native.errors import ErrorCode, wire_code
from tidegate.adapters.native.fastpath import encode_send_oks
from tidegate.adapters.reserved_properties import strip_reserved_properties
from tidegate.core.api import AckMode, ConsumeMode, Delivered, DeliveryRun, GroupInfo, PullStatus, delivered_of
from tidegate.core.errors import BadRequest, NotAuthenticated, QuotaExceeded, TidegateError
from tidegate.core.interfaces import Core
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message, QueueRef, TopicConfig
from tidegate.core.security.gate import Credentials, Gate, Principal

SERVER_VERSION = "tidegate-native/0.1.0"
IDLE_INTERVALS = 3  # a connection silent for this many heartbeat intervals is dead
ONEWAY = int(f.FrameFlag.ONEWAY)
MIN_MAX_FRAME = 256  # room for a HELLO_OK and a short ERROR
DEFAULT_MAX_CREDIT = 10_000  # outstanding credit per subscription (NativeSettings.max_credit)

MODE_TO_CORE = {f.Mode.CLUSTERING: ConsumeMode.CLUSTERING, f.Mode.BROADCASTING: ConsumeMode.BROADCASTING}
MODE_TO_WIRE = {v: k for k, v in MODE_TO_CORE.items()}
ACK_TO_CORE = {f.Ack.OFFSET: AckMode.OFFSET, f.Ack.MESSAGE: AckMode.MESSAGE}
ACK_TO_WIRE = {v: k for k, v in ACK_TO_CORE.items()}
STATUS_TO_WIRE = {PullStatus.FOUND: f.Status.FOUND, PullStatus.NO_NEW: f.Status.NO_NEW,
                  PullStatus.OFFSET_MOVED: f.Status.OFFSET_MOVED}

log = Logger()


def topic_info(cfg: TopicConfig) -> f.TopicInfo:
    return f.TopicInfo(name=cfg.name, queues=cfg.queues, perm=cfg.perm, retention_ms=cfg.retention_ms,
                       internal=cfg.internal, created_ts=cfg.created_ts)


def delivery_record(d: Delivered) -> f.DeliveryRecord:
    return f.DeliveryRecord(topic=d.queue.topic, queue_id=d.queue.queue_id, queue_offset=d.queue_offset,
                            receipt=d.receipt, attempt=d.attempt, message=d.message)


def group_summary(info: GroupInfo) -> f.GroupSummary:
    return f.GroupSummary(name=info.name, mode=MODE_TO_WIRE[ConsumeMode(info.mode)],
                          ack=ACK_TO_WIRE[AckMode(info.ack)], topics=tuple(info.topics),
                          members=tuple(info.members), inflight=info.inflight, lag=info.lag)


def split_deliver(subscription_id: int, records: list[Delivered], max_frame: int) -> list[bytes]:
    """Encode a DELIVER push, halving the batch until each frame fits the limit the client was told."""
    data = encode_deliver(subscription_id, records)
    if len(data) - LENGTH_SIZE <= max_frame or len(records) == 1:
        return [data]
    half = len(records) // 2
    return split_deliver(subscription_id, records[:half], max_frame) + \
        split_deliver(subscription_id, records[half:], max_frame)


class SubscriptionSink:
    """The core's DeliverySink for one subscription of one connection: turns deliveries into DELIVER frames.

    Pushes that happen before SUBSCRIBE_OK went out (the broker may deliver or rebalance inside `subscribe`)
    are held back so the client always learns the subscription id first.
    """

    __slots__ = ("protocol", "subscription_id", "subscription", "_held", "held_credit")

    def __init__(self, protocol: NativeProtocol, subscription_id: int) -> None:
        self.protocol = protocol
        self.subscription_id = subscription_id
        self.subscription: Any = None
        self._held: list[bytes] | None = []
        # Credit kept from the core while the transport is paused (granted by the client meanwhile, or taken
        # back from the core on pause); handed to the core on resume.
        self.held_credit = 0

    def deliver(self, deliveries: list[Delivered]) -> None:
        self._push(split_deliver(self.subscription_id, deliveries, self.protocol.factory.settings.max_frame))

    def deliver_runs(self, runs: list[DeliveryRun]) -> None:
        """Offset-mode deliveries as runs of one queue (core/api.py `DeliveryRun`): the same DELIVER bytes as
        `deliver` of the same messages, encoded without a `Delivered` per message."""
        count = sum([len(run.offsets) for run in runs])
        data = encode_deliver_runs(self.subscription_id, runs, count)
        max_frame = self.protocol.factory.settings.max_frame
        if len(data) - LENGTH_SIZE > max_frame and count > 1:  # rare: split as `deliver` splits
            self._push(split_deliver(self.subscription_id, delivered_of(runs), max_frame))
        else:
            self._push([data])

    def _push(self, chunks: list[bytes]) -> None:
        if self._held is not None:
            self._held.extend(chunks)
        else:
            self.protocol.write_chunks(chunks)

    def assignment_changed(self, queues: list[QueueRef]) -> None:
        data = encode_frame(f.Assignment(subscription_id=self.subscription_id,
                                         queues=[f.QueueName(topic=q.topic, queue_id=q.queue_id) for q in queues]))
        if self._held is not None:
            self._held.append(data)
        else:
            self.protocol.write_chunks([data])

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            self.protocol.write_chunks(held)


class NativeProtocol(AdapterConnection):
    """One native connection: HELLO authenticates (asynchronously, through the gate) and opens the connection's
    `CoreSession`; every later frame becomes one call on that session."""

    factory: NativeServerFactory

    def __init__(self) -> None:
        super().__init__()
        self.codec: NativeCodec | None = None
        self.client_id = ""
        self.client_name = ""
        self.subscriptions: dict[int, SubscriptionSink] = {}
        self._next_subscription = itertools.count(1)
        self._hello_request_id = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def connection_started(self) -> None:
        settings = self.factory.settings
        # SENDs come as `SendRequest` tuples (same fields as the Send frame, cheaper to make)
        self.codec = NativeCodec(Role.SERVER, max_frame=settings.max_frame,
                                 open_decoders={SEND_TYPE: decode_send_request})
        if settings.heartbeat_s > 0:
            self.start_idle_timer(IDLE_INTERVALS * settings.heartbeat_s)

    def connection_ended(self, reason: Failure) -> None:
        subscriptions, self.subscriptions = self.subscriptions, {}
        for sink in subscriptions.values():
            if sink.subscription is not None:
                try:
                    sink.subscription.close()
                except Exception as exc:  # the connection is gone; the broker must not break the reactor
                    log.error("native: closing subscription {sid} failed: {exc!r}", sid=sink.subscription_id,
                              exc=exc)

    def on_pause(self) -> None:
        """The client does not read fast enough: take every subscription's credit back from the core, so that
        nothing more is delivered until the transport drains (what the core already handed out is written; the
        output budget of the base bounds it)."""
        for sink in self.subscriptions.values():
            sub = sink.subscription
            if sub is not None and sub.credit > 0:
                sink.held_credit += sub.credit
                sub.credit = 0

    def on_resume(self) -> None:
        """The transport drained: give the core back the credit held while it was paused."""
        for sink in list(self.subscriptions.values()):
            if self.paused:  # a delivery below filled the buffer again: the rest stays held
                break
            held, sink.held_credit = sink.held_credit, 0
            if held and sink.subscription is not None and not sink.subscription.closed:
                sink.subscription.grant(held)

    def _grant(self, sink: SubscriptionSink, credit: int) -> None:
        """Credit from the client (SUBSCRIBE or CREDIT), capped so that the outstanding credit of a subscription
        (the core's plus what is held) never exceeds `settings.max_credit`; held while the transport is paused."""
        sub = sink.subscription
        room = self.factory.settings.max_credit - max(0, sub.credit) - sink.held_credit
        credit = min(credit, room)
        if credit <= 0:
            return
        if self.paused:
            sink.held_credit += credit
        else:
            sub.grant(credit)

    def output_budget_exceeded(self) -> None:
        self._error(0, ErrorCode.BAD_REQUEST, f"the client does not read: more than {self.output_budget} bytes "
                    "wait to be sent; closing")
        super().output_budget_exceeded()

    def idle_timed_out(self, idle: float) -> None:
        heartbeat_s = self.factory.settings.heartbeat_s
        self._close_with_error(0, ErrorCode.BAD_REQUEST,
                               f"no frame for {idle:.1f}s (heartbeat {heartbeat_s}s); closing")

    # ------------------------------------------------------------------------------------------- outbound
    def emit(self, frame: f.Frame) -> None:
        try:
            data = self.codec.encode(frame)
        except FrameTooLarge as exc:
            data = encode_frame(f.Error(request_id=frame.request_id, code=int(exc.code), message=exc.message))
        self.write(data)

    def _error(self, request_id: int, code: ErrorCode | int, message: str) -> None:
        self.emit(f.Error(request_id=request_id, code=int(code), message=message[:4000]))

    def _close_with_error(self, request_id: int, code: ErrorCode | int, message: str) -> None:
        self._error(request_id, code, message)
        self.close()

    # -------------------------------------------------------------------------------------------- inbound
    def bytes_received(self, data: bytes) -> None:
        codec = self.codec
        while True:
            try:
                frames = codec.receive_data(data)
            except ProtocolError as exc:
                self._dispatch_all(exc.frames_before)
                if self.closing:
                    return
                if self.authenticating:
                    # The bad frame came after a HELLO whose login is pending: report it in its place.
                    self.hold_frames([exc])
                else:
                    self._protocol_error(exc)
                if exc.fatal:
                    return
                data = b""
                continue
            self._dispatch_all(frames)
            return

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._error(exc.request_id, exc.code, exc.message)
        if exc.fatal:
            self.close()

    def frames_resumed(self, frames: list[Any]) -> None:
        """Frames (and protocol errors) that arrived behind HELLO while its login was decided, in order."""
        start = 0
        for i, item in enumerate(frames):
            if isinstance(item, ProtocolError):
                self._dispatch_all(frames[start:i])
                if self.authenticating:
                    self.hold_frames(frames[i:])
                    return
                if self.closing:
                    return
                self._protocol_error(item)
                start = i + 1
        self._dispatch_all(frames[start:])

    def _dispatch_all(self, frames: list[f.Frame]) -> None:
        if self.authenticating:  # decoded after a HELLO whose login is pending (e.g. past a bad frame): wait too
            self.hold_frames(frames)
            return
        send = SendRequest
        count = len(frames)
        i = 0
        while i < count:
            if self.closing:
                return
            frame = frames[i]
            i += 1
            if type(frame) is send and i < count and type(frames[i]) is send:
                # A run of pipelined SENDs to one topic and queue choice is stored with one publish call
                # (one append_batch, one durability wait, one write of the acknowledgements).
                topic, queue_id = frame.message.topic, frame.queue_id
                j = i
                while j < count:
                    other = frames[j]
                    if type(other) is not send or other.queue_id != queue_id or other.message.topic != topic:
                        break
                    j += 1
                if j - i >= 1:
                    self._send_run(frames[i - 1 : j])
                    i = j
                    continue
            self._dispatch(frame)
            if self.authenticating:
                # HELLO started an asynchronous login: the rest of this read waits for its decision.
                self.hold_frames(frames[i:])
                return

    def _dispatch(self, frame: f.Frame | SendRequest) -> None:
        handler = HANDLERS.get(type(frame))
        name = "Send" if type(frame) is SendRequest else type(frame).__name__  # a SendRequest is a SEND
        try:
            if handler is None:
                raise ProtocolError(f"{name} is not a request", request_id=frame.request_id)
            if self.session is None and handler is not NativeProtocol.on_hello:
                raise NotAuthenticated(f"{name} before a successful HELLO")
            handler(self, frame)
        except TidegateError as exc:
            self._error(frame.request_id, wire_code(exc), exc.message)
        except Exception as exc:
            log.error("native: {frame} from {client} failed: {exc!r}", frame=name, client=self.client_id, exc=exc)
            self._error(frame.request_id, ErrorCode.INTERNAL, f"internal error handling {name}")

    def _send_run(self, run: list[SendRequest]) -> None:
        """Publish consecutive SENDs (same topic, same queue choice) as one batch. If the batch is refused,
        nothing of it was stored: publish them one by one so each bad message gets its own ERROR."""
        session = self.session
        queue_id = run[0].queue_id
        if session is None:  # cannot happen after the codec's HELLO-first rule; refused frame by frame
            for frame in run:
                self._dispatch(frame)
            return
        messages = self._client_messages([frame.message for frame in run])
        try:
            results = session.publish(messages, None if queue_id < 0 else queue_id)
        except Exception:
            for frame in run:
                if self.closing:
                    return
                self._dispatch(frame)
            return
        data = encode_send_oks(SEND_OK_TYPE, run, results, ONEWAY)
        if data:
            session.when_durable(results[-1].commit_end, lambda: self.write(data))

    def _reply(self, request: f.Frame, response: f.Frame) -> None:
        if not request.oneway:
            self.emit(response)

    # ------------------------------------------------------------------------------------------- handlers
    def on_hello(self, frame: f.Hello) -> None:
        """Ask the gate who this is; HELLO_OK (and every frame behind HELLO) waits for the answer."""
        factory = self.factory
        self.client_id = frame.client_id or f"native-{factory.next_connection_number()}"
        self.client_name = frame.client_name
        self._hello_request_id = frame.request_id
        username = frame.username
        # A HELLO without credentials on a connection with a verified client certificate logs in as its identity.
        identity = "" if username or frame.password else self.peer_certificate_identity()
        if identity:
            credentials = Credentials(mechanism="certificate", username=identity, certificate_identity=identity,
                                      client_id=self.client_id, source=self.source, listener=factory.listener)
        else:
            credentials = Credentials(mechanism="password" if username else "anonymous", username=username,
                                      password=frame.password, client_id=self.client_id,
                                      source=self.source, listener=factory.listener)
        self.authenticate(credentials)

    def on_authenticated(self, principal: Principal) -> None:
        factory = self.factory
        self.session = factory.open_session(principal, self.source, self.client_id)
        settings = factory.settings
        self.emit(f.HelloOk(request_id=self._hello_request_id, version=f.PROTOCOL_VERSION,
                            server_version=SERVER_VERSION, max_frame=settings.max_frame,
                            heartbeat_ms=int(settings.heartbeat_s * 1000)))

    def on_authentication_failed(self, failure: Failure) -> None:
        if failure.check(QuotaExceeded):  # a connection limit (core/security/limits.py)
            self._close_with_error(self._hello_request_id, ErrorCode.QUOTA_EXCEEDED, failure.value.message)
            return
        if failure.check(NotAuthenticated):
            message = failure.value.message or "authentication failed"
        else:  # the gate itself broke: our fault, logged, and the client learns only that it was refused
            log.failure("native: authenticating {client} from {source} failed", failure,
                        client=self.client_id, source=self.source)
            message = "authentication failed"
        self._close_with_error(self._hello_request_id, ErrorCode.NOT_AUTHENTICATED, message)

    def on_ping(self, frame: f.Ping) -> None:
        self.emit(f.Pong(request_id=frame.request_id))

    def on_pong(self, frame: f.Pong) -> None:
        pass  # any frame already refreshed the idle timer

    def on_bye(self, frame: f.Bye) -> None:
        self.emit(f.Ok(request_id=frame.request_id))
        self.close()

    # --- topics
    def on_topic_create(self, frame: f.TopicCreate) -> None:
        cfg = self.session.create_topic(frame.name, queues=frame.queues or None, perm=frame.perm or "rw",
                                        retention_ms=frame.retention_ms)
        self._reply(frame, f.TopicOk(request_id=frame.request_id, topic=topic_info(cfg)))

    def on_topic_update(self, frame: f.TopicUpdate) -> None:
        cfg = self.session.update_topic(frame.name, queues=frame.queues or None, perm=frame.perm or None,
                                        retention_ms=None if frame.retention_ms < 0 else frame.retention_ms)
        self._reply(frame, f.TopicOk(request_id=frame.request_id, topic=topic_info(cfg)))

    def on_topic_delete(self, frame: f.TopicDelete) -> None:
        self.session.delete_topic(frame.name)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_topic_list(self, frame: f.TopicList) -> None:
        topics = self.session.list_topics(include_internal=frame.include_internal)
        self._reply(frame, f.TopicListOk(request_id=frame.request_id, topics=[topic_info(t) for t in topics]))

    def on_topic_describe(self, frame: f.TopicDescribe) -> None:
        session = self.session
        cfg = session.get_topic(frame.name)
        ranges = []
        for queue_id in range(cfg.queues):
            low, high = session.queue_offsets(QueueRef(cfg.name, queue_id))
            ranges.append(f.QueueRange(queue_id=queue_id, min_offset=low, max_offset=high))
        self._reply(frame, f.TopicDescribeOk(request_id=frame.request_id, topic=topic_info(cfg), queues=ranges))

    # --- produce
    def _client_messages(self, messages: list[Message]) -> list[Message]:
        """What every publish path does first: note the publish (during a resource alarm the connection is not read
        after this read, base.py) and strip adapter bookkeeping (mqtt-publisher, ...), never a client's to set."""
        self.published_this_read = True  # delivery before ingest: see adapters/base.py
        if not self.has_published or self.factory.alarmed:
            self.publish_seen()
        strip_reserved_properties(messages)
        return messages

    def on_send(self, frame: f.Send | SendRequest) -> None:
        queue_id = None if frame.queue_id < 0 else frame.queue_id
        session = self.session
        messages = self._client_messages([frame.message])
        result = session.publish(messages, queue_id=queue_id)[0]
        if frame.flags & ONEWAY:
            return
        data = encode_send_ok(frame.request_id, result.msg_id, result.topic, result.queue_id, result.queue_offset)
        session.when_durable(result.commit_end, lambda: self.write(data))

    def on_send_batch(self, frame: f.SendBatch) -> None:
        queue_id = None if frame.queue_id < 0 else frame.queue_id
        session = self.session
        messages = self._client_messages(list(frame.messages))
        results = session.publish(messages, queue_id=queue_id)
        if frame.flags & ONEWAY:
            return
        data = encode_send_batch_ok(frame.request_id, results)
        if not results:
            self.write(data)
            return
        # one append: commit offsets grow through the batch, so the last result's end is the largest
        session.when_durable(results[-1].commit_end, lambda: self.write(data))

    # --- consume
    def on_subscribe(self, frame: f.Subscribe) -> None:
        subscription_id = next(self._next_subscription)
        sink = SubscriptionSink(self, subscription_id)
        # The member id is the connection's own client id (the one its HELLO logged in with), never the frame's:
        # a client naming another member's id would take over that member's broadcast offsets and identity in
        # the group. The SDK sends its HELLO client id here anyway; a different one is ignored.
        sub = self.session.subscribe(
            frame.group, frame.topic, sink, client_id=self.client_id,
            mode=MODE_TO_CORE[frame.mode], ack=ACK_TO_CORE[frame.ack], filter_expr=frame.filter_expr or "*",
            invisible_ms=frame.invisible_ms or None, max_attempts=frame.max_attempts or None,
            start=frame.start or None)
        sink.subscription = sub
        self.subscriptions[subscription_id] = sink
        self.emit(f.SubscribeOk(request_id=frame.request_id, subscription_id=subscription_id))
        sink.release()
        if frame.credit:
            self._grant(sink, frame.credit)

    def _sink(self, subscription_id: int) -> SubscriptionSink:
        sink = self.subscriptions.get(subscription_id)
        if sink is None:
            raise BadRequest(f"no subscription {subscription_id} on this connection")
        return sink

    def _subscription(self, subscription_id: int) -> Any:
        return self._sink(subscription_id).subscription

    def on_credit(self, frame: f.Credit) -> None:
        self._grant(self._sink(frame.subscription_id), frame.credit)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def _each_receipt(self, receipts: tuple[str, ...], action: Callable[[str], None]) -> None:
        # Settle every receipt even if one fails, then report the first failure (and how many failed).
        failures: list[TidegateError] = []
        for receipt in receipts:
            try:
                action(receipt)
            except TidegateError as exc:
                failures.append(exc)
        if failures:
            first = failures[0]
            # Same class (so the same wire code) as the first failure, with the count in the message.
            raise type(first)(f"{len(failures)} of {len(receipts)} receipts failed; first: {first.message}")

    def on_ack(self, frame: f.AckMessages) -> None:
        sub = self._subscription(frame.subscription_id)
        self._each_receipt(frame.receipts, sub.ack)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_nack(self, frame: f.NackMessages) -> None:
        sub = self._subscription(frame.subscription_id)
        self._each_receipt(frame.receipts, lambda r: sub.nack(r, requeue=frame.requeue, delay_ms=frame.delay_ms))
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_commit(self, frame: f.Commit) -> None:
        if frame.subscription_id:
            sub = self._subscription(frame.subscription_id)
            for item in frame.offsets:
                sub.commit(QueueRef(item.topic, item.queue_id), item.offset)
        else:
            if not frame.group:
                raise BadRequest("COMMIT needs a subscription id or a group")
            session = self.session
            for item in frame.offsets:
                session.commit_offset(frame.group, QueueRef(item.topic, item.queue_id), item.offset)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_unsubscribe(self, frame: f.Unsubscribe) -> None:
        sub = self._subscription(frame.subscription_id)
        del self.subscriptions[frame.subscription_id]
        sub.close()
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_pull(self, frame: f.Pull) -> None:
        result = self.session.pull(QueueRef(frame.topic, frame.queue_id), frame.offset,
                                   max_count=frame.max_count, filter_expr=frame.filter_expr or "*")
        self._reply(frame, f.PullOk(request_id=frame.request_id, status=STATUS_TO_WIRE[PullStatus(result.status)],
                                    next_offset=result.next_offset, min_offset=result.min_offset,
                                    max_offset=result.max_offset,
                                    messages=[delivery_record(d) for d in result.messages]))

    # --- groups
    def on_group_list(self, frame: f.GroupList) -> None:
        groups = self.session.list_groups()
        self._reply(frame, f.GroupListOk(request_id=frame.request_id, groups=[group_summary(g) for g in groups]))

    def on_group_describe(self, frame: f.GroupDescribe) -> None:
        info = self.session.group_info(frame.group)
        progress = [f.ProgressRecord(topic=p.queue.topic, queue_id=p.queue.queue_id, committed=p.committed,
                                     min_offset=p.min_offset, max_offset=p.max_offset, lag=p.lag, owner=p.owner)
                    for p in info.progress]
        self._reply(frame, f.GroupDescribeOk(request_id=frame.request_id, group=group_summary(info),
                                             progress=progress))

    def on_reset_offsets(self, frame: f.ResetOffsets) -> None:
        to: str | int = {f.ResetTo.EARLIEST: "earliest", f.ResetTo.LATEST: "latest"}.get(frame.to,
                                                                                         frame.timestamp_ms)
        offsets = self.session.reset_offsets(frame.group, frame.topic, to)
        self._reply(frame, f.ResetOffsetsOk(request_id=frame.request_id, offsets=[
            f.QueueOffset(topic=q.topic, queue_id=q.queue_id, offset=o) for q, o in sorted(
                offsets.items(), key=lambda item: (item[0].topic, item[0].queue_id))]))

    def on_group_delete(self, frame: f.GroupDelete) -> None:
        self.session.delete_group(frame.group)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    # --- queries
    def on_query_by_id(self, frame: f.QueryById) -> None:
        message = self.session.query_by_id(frame.msg_id)
        self._reply(frame, f.Messages(request_id=frame.request_id, messages=[message]))

    def on_query_by_key(self, frame: f.QueryByKey) -> None:
        found = self.session.query_by_key(frame.topic, frame.key, limit=frame.limit)
        self._reply(frame, f.Messages(request_id=frame.request_id, messages=list(found)))

    def on_query_by_time(self, frame: f.QueryByTime) -> None:
        found = self.session.list_by_time(frame.topic, frame.start_ms, frame.end_ms, limit=frame.limit)
        self._reply(frame, f.Messages(request_id=frame.request_id, messages=list(found)))


HANDLERS: dict[type, Callable[[NativeProtocol, Any], None]] = {
    f.Hello: NativeProtocol.on_hello,
    f.Ping: NativeProtocol.on_ping,
    f.Pong: NativeProtocol.on_pong,
    f.Bye: NativeProtocol.on_bye,
    f.TopicCreate: NativeProtocol.on_topic_create,
    f.TopicUpdate: NativeProtocol.on_topic_update,
    f.TopicDelete: NativeProtocol.on_topic_delete,
    f.TopicList: NativeProtocol.on_topic_list,
    f.TopicDescribe: NativeProtocol.on_topic_describe,
    f.Send: NativeProtocol.on_send,
    SendRequest: NativeProtocol.on_send,  # what the connection's codec makes of a SEND
    f.SendBatch: NativeProtocol.on_send_batch,
    f.Subscribe: NativeProtocol.on_subscribe,
    f.Credit: NativeProtocol.on_credit,
    f.AckMessages: NativeProtocol.on_ack,
    f.NackMessages: NativeProtocol.on_nack,
    f.Commit: NativeProtocol.on_commit,
    f.Unsubscribe: NativeProtocol.on_unsubscribe,
    f.Pull: NativeProtocol.on_pull,
    f.GroupList: NativeProtocol.on_group_list,
    f.GroupDescribe: NativeProtocol.on_group_describe,
    f.ResetOffsets: NativeProtocol.on_reset_offsets,
    f.GroupDelete: NativeProtocol.on_group_delete,
    f.QueryById: NativeProtocol.on_query_by_id,
    f.QueryByKey: NativeProtocol.on_query_by_key,
    f.QueryByTime: NativeProtocol.on_query_by_time,
}


@dataclass(frozen=True, slots=True)
class NativeSettings:
    """What a native listener announces in HELLO_OK and enforces."""

    max_frame: int = DEFAULT_MAX_FRAME  # largest frame accepted (and DELIVER pushes are split to fit)
    heartbeat_s: float = 30.0  # clients must send something this often; 3 silent intervals close (0 = never)
    # Outstanding credit of one subscription (granted and not yet used): SUBSCRIBE/CREDIT asking for more are
    # clamped to it, so a client's u32 credit cannot make the broker push millions of messages at once.
    max_credit: int = DEFAULT_MAX_CREDIT

    def __post_init__(self) -> None:
        if self.max_frame < MIN_MAX_FRAME:
            raise ValueError(f"max_frame must be at least {MIN_MAX_FRAME} bytes, not {self.max_frame}")
        if self.heartbeat_s < 0:
            raise ValueError(f"heartbeat_s must be 0 (off) or positive, not {self.heartbeat_s}")
        if self.max_credit < 1:
            raise ValueError(f"max_credit must be at least 1, not {self.max_credit}")


class NativeServerFactory(AdapterFactory):
    """The native listener: `NativeServerFactory(core, gate, clock, NativeSettings(...), metrics=, listener=)`."""

    protocol = NativeProtocol
    protocol_label = "native"

    def __init__(self, core: Core, gate: Gate, clock: IReactorTime, settings: NativeSettings | None = None, *,
                 metrics: CoreMetrics | None = None, listener: str = "native",
                 limits: ConnectionLimits | None = None) -> None:
        super().__init__(core, gate, clock, settings if settings is not None else NativeSettings(),
                         metrics=metrics, listener=listener,
                         limits=limits)
        self.settings: NativeSettings
        self._connection_numbers = itertools.count(1)

    def next_connection_number(self) -> int:
        return next(self._connection_numbers)
