"""Twisted adapter of the native protocol: a thin Protocol between the sans-IO codec and the Broker.

`dataReceived` feeds the codec; each frame becomes one broker call; every byte leaves through `_emit`, which
collects the responses of one `dataReceived` call and writes them with one `writeSequence`. Sends are answered
only once `broker.when_durable` says the record is on disk, so a SEND_OK means the message survives a crash.
The reactor/clock is passed in; nothing here imports the global reactor.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    DEFAULT_MAX_FRAME,
    LENGTH_SIZE,
    FrameTooLarge,
    NativeCodec,
    ProtocolError,
    Role,
    encode_deliver,
    encode_frame,
    encode_send_batch_ok,
    encode_send_ok,
)
from tidegate.adapters.transport import disable_nagle
from tidegate.core.api import AckMode, ConsumeMode, Delivered, GroupInfo, PullStatus
from tidegate.core.errors import ErrorCode, TidegateError
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import QueueRef, TopicConfig

SERVER_VERSION = "tidegate-native/0.1.0"
IDLE_INTERVALS = 3
ONEWAY = int(f.FrameFlag.ONEWAY)  # a connection silent for this many heartbeat intervals is dead

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

    __slots__ = ("protocol", "subscription_id", "subscription", "_held")

    def __init__(self, protocol: NativeProtocol, subscription_id: int) -> None:
        self.protocol = protocol
        self.subscription_id = subscription_id
        self.subscription: Any = None
        self._held: list[bytes] | None = []

    def deliver(self, deliveries: list[Delivered]) -> None:
        chunks = split_deliver(self.subscription_id, deliveries, self.protocol.factory.max_frame)
        if self._held is not None:
            self._held.extend(chunks)
        else:
            self.protocol.emit_bytes(chunks)

    def assignment_changed(self, queues: list[QueueRef]) -> None:
        data = encode_frame(f.Assignment(subscription_id=self.subscription_id,
                                         queues=[f.QueueName(topic=q.topic, queue_id=q.queue_id) for q in queues]))
        if self._held is not None:
            self._held.append(data)
        else:
            self.protocol.emit_bytes([data])

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            self.protocol.emit_bytes(held)


class NativeProtocol(Protocol):
    factory: NativeServerFactory

    def __init__(self) -> None:
        self.codec: NativeCodec | None = None
        self.client_id = ""
        self.client_name = ""
        self.subscriptions: dict[int, SubscriptionSink] = {}
        self._next_subscription = itertools.count(1)
        self._batch: list[bytes] | None = None
        self._closing = False
        self._connected = False
        self._last_seen = 0.0
        self._idle_timer: Any = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def connectionMade(self) -> None:
        factory = self.factory
        self.codec = NativeCodec(Role.SERVER, max_frame=factory.max_frame)
        self._connected = True
        disable_nagle(self.transport)
        self._last_seen = factory.clock.seconds()
        if factory.heartbeat_s > 0:
            self._idle_timer = factory.clock.callLater(factory.heartbeat_s, self._check_idle)
        if factory.metrics is not None:
            factory.metrics.connections["native"] += 1
            factory.metrics.connections_total["native"] += 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._connected:
            return
        self._connected = False
        factory = self.factory
        if factory.metrics is not None:
            factory.metrics.connections["native"] -= 1
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        subscriptions, self.subscriptions = self.subscriptions, {}
        for sink in subscriptions.values():
            if sink.subscription is not None:
                try:
                    sink.subscription.close()
                except Exception as exc:  # the connection is gone; the broker must not break the reactor
                    log.error("native: closing subscription {sid} failed: {exc!r}", sid=sink.subscription_id,
                              exc=exc)

    def _check_idle(self) -> None:
        factory = self.factory
        idle = factory.clock.seconds() - self._last_seen
        limit = IDLE_INTERVALS * factory.heartbeat_s
        if idle >= limit:
            self._idle_timer = None
            self._close_with_error(0, ErrorCode.BAD_REQUEST,
                                   f"no frame for {idle:.1f}s (heartbeat {factory.heartbeat_s}s); closing")
            return
        self._idle_timer = factory.clock.callLater(min(factory.heartbeat_s, limit - idle), self._check_idle)

    # ------------------------------------------------------------------------------------------- outbound
    def emit(self, frame: f.Frame) -> None:
        try:
            data = self.codec.encode(frame)
        except FrameTooLarge as exc:
            data = encode_frame(f.Error(request_id=frame.request_id, code=int(exc.code), message=exc.message))
        self.emit_bytes([data])

    def emit_bytes(self, chunks: list[bytes]) -> None:
        """The one write point: inside dataReceived the chunks join that call's batch, else go out now."""
        if not self._connected:
            return
        if self._batch is not None:
            self._batch.extend(chunks)
        elif len(chunks) == 1:
            self.transport.write(chunks[0])
        else:
            self.transport.writeSequence(chunks)

    def _error(self, request_id: int, code: ErrorCode | int, message: str) -> None:
        self.emit(f.Error(request_id=request_id, code=int(code), message=message[:4000]))

    def _close_with_error(self, request_id: int, code: ErrorCode | int, message: str) -> None:
        self._error(request_id, code, message)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._batch is None and self._connected:
            self.transport.loseConnection()

    # -------------------------------------------------------------------------------------------- inbound
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_seen = self.factory.clock.seconds()
        batch: list[bytes] = []
        self._batch = batch
        try:
            self._feed(data)
        finally:
            self._batch = None
            if batch and self._connected:
                self.transport.writeSequence(batch)
            if self._closing and self._connected:
                self.transport.loseConnection()

    def _feed(self, data: bytes) -> None:
        codec = self.codec
        while True:
            try:
                frames = codec.receive_data(data)
            except ProtocolError as exc:
                self._dispatch_all(exc.frames_before)
                if self._closing:
                    return
                self._error(exc.request_id, exc.code, exc.message)
                if exc.fatal:
                    self._close()
                    return
                data = b""
                continue
            self._dispatch_all(frames)
            return

    def _dispatch_all(self, frames: list[f.Frame]) -> None:
        send = f.Send
        count = len(frames)
        i = 0
        while i < count:
            if self._closing:
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

    def _dispatch(self, frame: f.Frame) -> None:
        handler = HANDLERS.get(type(frame))
        try:
            if handler is None:
                raise TidegateError(f"{type(frame).__name__} is not a request", ErrorCode.BAD_REQUEST)
            handler(self, frame)
        except TidegateError as exc:
            self._error(frame.request_id, exc.code, exc.message)
        except Exception as exc:
            log.error("native: {frame} from {client} failed: {exc!r}", frame=type(frame).__name__,
                      client=self.client_id, exc=exc)
            self._error(frame.request_id, ErrorCode.INTERNAL, f"internal error handling {type(frame).__name__}")

    def _send_run(self, run: list[f.Send]) -> None:
        """Publish consecutive SENDs (same topic, same queue choice) as one batch. If the batch is refused,
        nothing of it was stored: publish them one by one so each bad message gets its own ERROR."""
        broker = self.factory.broker
        queue_id = run[0].queue_id
        try:
            results = broker.publish([frame.message for frame in run], queue_id=None if queue_id < 0 else queue_id)
        except Exception:
            for frame in run:
                if self._closing:
                    return
                self._dispatch(frame)
            return
        ok = encode_send_ok
        acks = [ok(frame.request_id, r.msg_id, r.topic, r.queue_id, r.queue_offset)
                for frame, r in zip(run, results, strict=True) if not frame.flags & ONEWAY]
        if acks:
            data = b"".join(acks)
            broker.when_durable(results[-1].commit_end, lambda: self.emit_bytes([data]))

    def _reply(self, request: f.Frame, response: f.Frame) -> None:
        if not request.oneway:
            self.emit(response)

    # ------------------------------------------------------------------------------------------- handlers
    def on_hello(self, frame: f.Hello) -> None:
        factory = self.factory
        self.client_id = frame.client_id or f"native-{factory.next_connection_number()}"
        self.client_name = frame.client_name
        self.emit(f.HelloOk(request_id=frame.request_id, version=f.PROTOCOL_VERSION,
                            server_version=SERVER_VERSION, max_frame=factory.max_frame,
                            heartbeat_ms=int(factory.heartbeat_s * 1000)))

    def on_ping(self, frame: f.Ping) -> None:
        self.emit(f.Pong(request_id=frame.request_id))

    def on_pong(self, frame: f.Pong) -> None:
        pass  # any frame already refreshed the idle timer

    def on_bye(self, frame: f.Bye) -> None:
        self.emit(f.Ok(request_id=frame.request_id))
        self._close()

    # --- topics
    def on_topic_create(self, frame: f.TopicCreate) -> None:
        cfg = self.factory.broker.create_topic(frame.name, queues=frame.queues or None, perm=frame.perm or "rw",
                                               retention_ms=frame.retention_ms)
        self._reply(frame, f.TopicOk(request_id=frame.request_id, topic=topic_info(cfg)))

    def on_topic_update(self, frame: f.TopicUpdate) -> None:
        cfg = self.factory.broker.update_topic(frame.name, queues=frame.queues or None, perm=frame.perm or None,
                                               retention_ms=None if frame.retention_ms < 0 else frame.retention_ms)
        self._reply(frame, f.TopicOk(request_id=frame.request_id, topic=topic_info(cfg)))

    def on_topic_delete(self, frame: f.TopicDelete) -> None:
        self.factory.broker.delete_topic(frame.name)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_topic_list(self, frame: f.TopicList) -> None:
        topics = self.factory.broker.list_topics(include_internal=frame.include_internal)
        self._reply(frame, f.TopicListOk(request_id=frame.request_id, topics=[topic_info(t) for t in topics]))

    def on_topic_describe(self, frame: f.TopicDescribe) -> None:
        broker = self.factory.broker
        cfg = broker.get_topic(frame.name)
        ranges = []
        for queue_id in range(cfg.queues):
            low, high = self.factory.queue_bounds(QueueRef(cfg.name, queue_id))
            ranges.append(f.QueueRange(queue_id=queue_id, min_offset=low, max_offset=high))
        self._reply(frame, f.TopicDescribeOk(request_id=frame.request_id, topic=topic_info(cfg), queues=ranges))

    # --- produce
    def on_send(self, frame: f.Send) -> None:
        queue_id = None if frame.queue_id < 0 else frame.queue_id
        broker = self.factory.broker
        result = broker.publish([frame.message], queue_id=queue_id)[0]
        if frame.flags & ONEWAY:
            return
        data = encode_send_ok(frame.request_id, result.msg_id, result.topic, result.queue_id, result.queue_offset)
        broker.when_durable(result.commit_end, lambda: self.emit_bytes([data]))

    def on_send_batch(self, frame: f.SendBatch) -> None:
        queue_id = None if frame.queue_id < 0 else frame.queue_id
        broker = self.factory.broker
        results = broker.publish(list(frame.messages), queue_id=queue_id)
        if frame.flags & ONEWAY:
            return
        data = encode_send_batch_ok(frame.request_id, results)
        if not results:
            self.emit_bytes([data])
            return
        broker.when_durable(max(r.commit_end for r in results), lambda: self.emit_bytes([data]))

    # --- consume
    def on_subscribe(self, frame: f.Subscribe) -> None:
        subscription_id = next(self._next_subscription)
        sink = SubscriptionSink(self, subscription_id)
        sub = self.factory.broker.subscribe(
            frame.group, frame.topic, sink, client_id=frame.client_id or self.client_id,
            mode=MODE_TO_CORE[frame.mode], ack=ACK_TO_CORE[frame.ack], filter_expr=frame.filter_expr or "*",
            invisible_ms=frame.invisible_ms or None, max_attempts=frame.max_attempts or None,
            start=frame.start or None)
        sink.subscription = sub
        self.subscriptions[subscription_id] = sink
        self.emit(f.SubscribeOk(request_id=frame.request_id, subscription_id=subscription_id))
        sink.release()
        if frame.credit:
            sub.grant(frame.credit)

    def _subscription(self, subscription_id: int) -> Any:
        sink = self.subscriptions.get(subscription_id)
        if sink is None:
            raise TidegateError(f"no subscription {subscription_id} on this connection", ErrorCode.BAD_REQUEST)
        return sink.subscription

    def on_credit(self, frame: f.Credit) -> None:
        self._subscription(frame.subscription_id).grant(frame.credit)
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
            raise TidegateError(f"{len(failures)} of {len(receipts)} receipts failed; first: {first.message}",
                                first.code)

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
                raise TidegateError("COMMIT needs a subscription id or a group", ErrorCode.BAD_REQUEST)
            broker = self.factory.broker
            for item in frame.offsets:
                broker.commit_offset(frame.group, QueueRef(item.topic, item.queue_id), item.offset)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_unsubscribe(self, frame: f.Unsubscribe) -> None:
        sub = self._subscription(frame.subscription_id)
        del self.subscriptions[frame.subscription_id]
        sub.close()
        self._reply(frame, f.Ok(request_id=frame.request_id))

    def on_pull(self, frame: f.Pull) -> None:
        result = self.factory.broker.pull(QueueRef(frame.topic, frame.queue_id), frame.offset,
                                          max_count=frame.max_count, filter_expr=frame.filter_expr or "*")
        self._reply(frame, f.PullOk(request_id=frame.request_id, status=STATUS_TO_WIRE[PullStatus(result.status)],
                                    next_offset=result.next_offset, min_offset=result.min_offset,
                                    max_offset=result.max_offset,
                                    messages=[delivery_record(d) for d in result.messages]))

    # --- groups
    def on_group_list(self, frame: f.GroupList) -> None:
        groups = self.factory.broker.list_groups()
        self._reply(frame, f.GroupListOk(request_id=frame.request_id, groups=[group_summary(g) for g in groups]))

    def on_group_describe(self, frame: f.GroupDescribe) -> None:
        info = self.factory.broker.group_info(frame.group)
        progress = [f.ProgressRecord(topic=p.queue.topic, queue_id=p.queue.queue_id, committed=p.committed,
                                     min_offset=p.min_offset, max_offset=p.max_offset, lag=p.lag, owner=p.owner)
                    for p in info.progress]
        self._reply(frame, f.GroupDescribeOk(request_id=frame.request_id, group=group_summary(info),
                                             progress=progress))

    def on_reset_offsets(self, frame: f.ResetOffsets) -> None:
        to: str | int = {f.ResetTo.EARLIEST: "earliest", f.ResetTo.LATEST: "latest"}.get(frame.to,
                                                                                         frame.timestamp_ms)
        offsets = self.factory.broker.reset_offsets(frame.group, frame.topic, to)
        self._reply(frame, f.ResetOffsetsOk(request_id=frame.request_id, offsets=[
            f.QueueOffset(topic=q.topic, queue_id=q.queue_id, offset=o) for q, o in sorted(
                offsets.items(), key=lambda item: (item[0].topic, item[0].queue_id))]))

    def on_group_delete(self, frame: f.GroupDelete) -> None:
        self.factory.broker.delete_group(frame.group)
        self._reply(frame, f.Ok(request_id=frame.request_id))

    # --- queries
    def on_query_by_id(self, frame: f.QueryById) -> None:
        message = self.factory.broker.query_by_id(frame.msg_id)
        self._reply(frame, f.Messages(request_id=frame.request_id, messages=[message]))

    def on_query_by_key(self, frame: f.QueryByKey) -> None:
        found = self.factory.broker.query_by_key(frame.topic, frame.key, limit=frame.limit)
        self._reply(frame, f.Messages(request_id=frame.request_id, messages=list(found)))

    def on_query_by_time(self, frame: f.QueryByTime) -> None:
        found = self.factory.broker.list_by_time(frame.topic, frame.start_ms, frame.end_ms, limit=frame.limit)
        self._reply(frame, f.Messages(request_id=frame.request_id, messages=list(found)))


HANDLERS: dict[type[f.Frame], Callable[[NativeProtocol, Any], None]] = {
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


class NativeServerFactory(Factory):
    """Builds one NativeProtocol per connection over a shared broker and clock."""

    protocol = NativeProtocol

    def __init__(self, broker: Any, clock: IReactorTime, *, max_frame: int = DEFAULT_MAX_FRAME,
                 heartbeat_s: float = 30.0, metrics: CoreMetrics | None = None) -> None:
        self.broker = broker
        self.clock = clock
        self.max_frame = max_frame
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics if metrics is not None else getattr(broker, "metrics", None)
        self._connection_numbers = itertools.count(1)

    def next_connection_number(self) -> int:
        return next(self._connection_numbers)

    def queue_bounds(self, queue: QueueRef) -> tuple[int, int]:
        """(min, max) offsets of a queue as consumers see them."""
        return self.broker.queue_offsets(queue)
