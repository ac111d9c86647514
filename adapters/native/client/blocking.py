"""Blocking SDK: producers, admin and consumers for plain scripts and threads (no Twisted reactor needed)."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.fastpath import slot_setter
from tidegate.client.common import (
    DEFAULT_ADDRESS,
    GroupDescription,
    NotStarted,
    RequestTimeout,
    SendResult,
    TopicDescription,
    ack_of,
    delivered,
    mode_of,
    pull_result,
    reset_target,
    send_result,
)
from tidegate.client.connection import Connection
from tidegate.client.deliveries import DeliveredBatch
from tidegate.client.tls import ClientTls
from tidegate.core.api import Delivered, PullResult
from tidegate.core.errors import TidegateError
from tidegate.core.model import Message, MessageFlag, QueueRef

logger = logging.getLogger("tidegate.client")

SendCallback = Callable[[SendResult | BaseException], None]
BatchCallback = Callable[[list[SendResult] | BaseException], None]
_new_result = SendResult  # positional: msg_id, topic, queue_id, queue_offset
_new = object.__new__
_set_msg_id, _set_topic, _set_queue_id, _set_queue_offset = (
    slot_setter(SendResult, name) for name in ("msg_id", "topic", "queue_id", "queue_offset"))


_time = time.time
_PERSISTENT = MessageFlag.PERSISTENT


def _now_ms() -> int:
    return int(time.time() * 1000)


def build_message(topic: str, body: bytes, *, tag: str = "", keys: Iterable[str] = (),
                  properties: Mapping[str, str] | None = None, subject: str = "", group: str = "",
                  deliver_at: int = 0, expires_at: int = 0) -> Message:
    # positional (core.model.Message field order): topic, body, subject, tag, keys, properties, born_ts,
    # deliver_at, expires_at, group, flags
    return Message(topic, body if type(body) is bytes else bytes(body), subject, tag, tuple(keys) if keys else (),
                   dict(properties) if properties else {}, int(_time() * 1000), deliver_at, expires_at, group,
                   _PERSISTENT)

# The broker clamps a subscription's outstanding credit to its `max_credit` (10,000 by default): asking for more
# would leave this side counting credit the broker never granted.
RECEIVE_MAX = 10_000


class _Client:
    """Owns one connection; `start()`/`close()` or use as a context manager."""

    def __init__(self, address: str = DEFAULT_ADDRESS, client_id: str | None = None, *,
                 timeout: float = 10.0, username: str = "", password: str | bytes = "",
                 tls: ClientTls | None = None) -> None:
        self.address = address
        self.client_id = client_id or f"{type(self).__name__.lower()}-{uuid.uuid4().hex[:12]}"
        self.timeout = timeout
        self.username = username  # sent in HELLO; empty = anonymous
        self._password = password
        self.tls = tls  # None: plain TCP; ClientTls: TLS (see tidegate.client.tls)
        self._conn: Connection | None = None

    # Consumers take DELIVERs as deliveries.DeliveredBatch (core Delivered values straight from the bytes).
    core_deliveries = False

    def start(self) -> Any:
        if self._conn is None:
            self._conn = Connection(self.address, client_id=self.client_id, timeout=self.timeout,
                                    username=self.username, password=self._password, tls=self.tls,
                                    core_deliveries=self.core_deliveries).open()
        return self

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise NotStarted(f"{type(self).__name__} is not started; call start() first")
        return self._conn

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Producer(_Client):
    """Sends messages. `send` returns once the broker has the message on disk (under sync flush)."""

    def send(self, topic: str, body: bytes, *, tag: str = "", keys: Iterable[str] = (),
             properties: Mapping[str, str] | None = None, subject: str = "", group: str = "",
             deliver_at: int = 0, expires_at: int = 0, queue_id: int | None = None) -> SendResult:
        message = build_message(topic, body, tag=tag, keys=keys, properties=properties, subject=subject,
                                group=group, deliver_at=deliver_at, expires_at=expires_at)
        return self.send_message(message, queue_id=queue_id)

    def send_message(self, message: Message, *, queue_id: int | None = None) -> SendResult:
        conn = self.conn
        future: Future[f.Frame] = Future()
        conn.send_message(message, -1 if queue_id is None else queue_id, future, pipelined=False)
        try:
            return send_result(future.result(conn.timeout))
        except TimeoutError:
            raise RequestTimeout(f"Send got no answer within {conn.timeout}s") from None

    def send_async(self, topic: str, body: bytes, callback: SendCallback, *, tag: str = "",
                   keys: Iterable[str] = (), properties: Mapping[str, str] | None = None, subject: str = "",
                   group: str = "", deliver_at: int = 0, expires_at: int = 0,
                   queue_id: int | None = None) -> None:
        """Send without waiting; `callback(SendResult or exception)` runs on the SDK's I/O thread, so keep it
        short. Pipelined: sends queued meanwhile leave together in one write."""

        def done(answer: Any) -> None:
            try:
                if isinstance(answer, BaseException):
                    callback(answer)
                else:
                    result = _new(SendResult)  # fields set through their slots: cheaper than the frozen __init__
                    _set_msg_id(result, answer.msg_id)
                    _set_topic(result, answer.topic)
                    _set_queue_id(result, answer.queue_id)
                    _set_queue_offset(result, answer.queue_offset)
                    callback(result)
            except Exception:
                logger.exception("send_async callback failed")

        if not (tag or keys or properties or subject or group or deliver_at or expires_at):
            # Only a topic and a body (the common case): encoded straight to the wire, no Message object.
            self.conn.send_plain(topic, body if type(body) is bytes else bytes(body), int(_time() * 1000),
                                 -1 if queue_id is None else queue_id, done)
            return
        message = build_message(topic, body, tag=tag, keys=keys, properties=properties, subject=subject,
                                group=group, deliver_at=deliver_at, expires_at=expires_at)
        self.conn.send_message(message, -1 if queue_id is None else queue_id, done)

    def send_batch_async(self, topic: str, bodies: Iterable[bytes], callback: BatchCallback, *,
                         queue_id: int | None = None) -> None:
        """Send the bodies as messages of `topic` (persistent, no tag, keys or properties) in one SEND_BATCH frame
        without waiting: `callback(list of SendResult, in order, or an exception)` runs on the SDK's I/O thread,
        so keep it short. All are stored or none. Pipelined like `send_async`; encoded without Message objects."""

        def done(answer: Any) -> None:
            try:
                if isinstance(answer, BaseException):
                    callback(answer)
                else:
                    results = []
                    for r in answer.results:
                        result = _new(SendResult)  # through the slots: cheaper than the frozen __init__
                        _set_msg_id(result, r.msg_id)
                        _set_topic(result, r.topic)
                        _set_queue_id(result, r.queue_id)
                        _set_queue_offset(result, r.queue_offset)
                        results.append(result)
                    callback(results)
            except Exception:
                logger.exception("send_batch_async callback failed")

        batch = [body if type(body) is bytes else bytes(body) for body in bodies]
        self.conn.submit_plain_batch(topic, batch, int(_time() * 1000), -1 if queue_id is None else queue_id, done)

    def send_oneway(self, topic: str, body: bytes, *, tag: str = "", keys: Iterable[str] = (),
                    properties: Mapping[str, str] | None = None, subject: str = "", group: str = "",
                    deliver_at: int = 0, expires_at: int = 0, queue_id: int | None = None) -> None:
        """Fire and forget: no result, no durability promise; a rejection only shows in the log."""
        message = build_message(topic, body, tag=tag, keys=keys, properties=properties, subject=subject,
                                group=group, deliver_at=deliver_at, expires_at=expires_at)
        self.conn.send_message(message, -1 if queue_id is None else queue_id, None, oneway=True)

    def send_batch(self, messages: Iterable[Message], *, queue_id: int | None = None) -> list[SendResult]:
        """Send several messages in one frame; all are validated before any is stored."""
        batch = list(messages)
        now = 0
        for m in batch:
            if not isinstance(m, Message):
                raise f.FrameValueError(f"{type(m).__name__} is not a Message")
            if not m.born_ts:
                m.born_ts = now = now or _now_ms()
        conn = self.conn
        future = conn.submit_batch(batch, -1 if queue_id is None else queue_id)
        try:
            frame = future.result(conn.timeout)
        except TimeoutError:
            raise RequestTimeout(f"SendBatch got no answer within {conn.timeout}s") from None
        return [_new_result(r.msg_id, r.topic, r.queue_id, r.queue_offset) for r in frame.results]


class Admin(_Client):
    """Topic, group and message administration."""

    def create_topic(self, name: str, queues: int = 0, *, perm: str = "rw", retention_ms: int = 0) -> f.TopicInfo:
        return self.conn.request(f.TopicCreate, name=name, queues=queues, perm=perm, retention_ms=retention_ms).topic

    def update_topic(self, name: str, *, queues: int | None = None, perm: str | None = None,
                     retention_ms: int | None = None) -> f.TopicInfo:
        return self.conn.request(f.TopicUpdate, name=name, queues=queues or 0, perm=perm or "",
                                 retention_ms=-1 if retention_ms is None else retention_ms).topic

    def delete_topic(self, name: str) -> None:
        self.conn.request(f.TopicDelete, name=name)

    def list_topics(self, include_internal: bool = False) -> list[f.TopicInfo]:
        return list(self.conn.request(f.TopicList, include_internal=include_internal).topics)

    def describe_topic(self, name: str) -> TopicDescription:
        frame = self.conn.request(f.TopicDescribe, name=name)
        return TopicDescription(topic=frame.topic, queues=frame.queues)

    def list_groups(self) -> list[f.GroupSummary]:
        return list(self.conn.request(f.GroupList).groups)

    def describe_group(self, group: str) -> GroupDescription:
        frame = self.conn.request(f.GroupDescribe, group=group)
        return GroupDescription(group=frame.group, progress=frame.progress)

    def delete_group(self, group: str) -> None:
        self.conn.request(f.GroupDelete, group=group)

    def reset_offsets(self, group: str, topic: str, to: str | int) -> dict[QueueRef, int]:
        """`to` is "earliest", "latest" or a timestamp in ms; returns the new committed offset per queue."""
        target, ts = reset_target(to)
        frame = self.conn.request(f.ResetOffsets, group=group, topic=topic, to=target, timestamp_ms=ts)
        return {QueueRef(o.topic, o.queue_id): o.offset for o in frame.offsets}

    def query_by_id(self, msg_id: str) -> Message:
        return self.conn.request(f.QueryById, msg_id=msg_id).messages[0]

    def query_by_key(self, topic: str, key: str, limit: int = 64) -> list[Message]:
        return list(self.conn.request(f.QueryByKey, topic=topic, key=key, limit=limit).messages)

    def query_by_time(self, topic: str, start_ms: int, end_ms: int, limit: int = 100) -> list[Message]:
        return list(self.conn.request(f.QueryByTime, topic=topic, start_ms=start_ms, end_ms=end_ms,
                                      limit=limit).messages)


class PullConsumer(_Client):
    """Reads queues at offsets the caller chooses; progress is committed explicitly."""

    def __init__(self, group: str, address: str = DEFAULT_ADDRESS, client_id: str | None = None, *,
                 timeout: float = 10.0, username: str = "", password: str | bytes = "",
                 tls: ClientTls | None = None) -> None:
        super().__init__(address, client_id, timeout=timeout, username=username, password=password, tls=tls)
        self.group = group

    def pull(self, topic: str, queue_id: int, offset: int, max: int = 32, filter: str = "*") -> PullResult:
        frame = self.conn.request(f.Pull, topic=topic, queue_id=queue_id, offset=offset, max_count=max,
                                  filter_expr=filter)
        return pull_result(frame)

    def commit(self, topic: str, queue_id: int, offset: int) -> None:
        """Everything below `offset` in the queue is consumed by this group."""
        self.commit_many({QueueRef(topic, queue_id): offset})

    def commit_many(self, offsets: Mapping[QueueRef, int]) -> None:
        self.conn.request(f.Commit, group=self.group, offsets=[
            f.QueueOffset(topic=q.topic, queue_id=q.queue_id, offset=o) for q, o in offsets.items()])


_STOP = object()


class PushConsumer(_Client):
    """Messages are pushed by the broker and handed to `handler(Delivered)` on one consumer thread.

    Offset mode: offsets are committed (batched) after the handler returns; a handler exception is logged and
    the message counts as consumed (there is no per-message redelivery in offset mode). Message mode: each
    message is acked after the handler returns, or nacked for redelivery if it raises. Credit is re-granted as
    messages are processed, so at most `credit` messages are ever buffered in this process.
    """

    COMMIT_EVERY = 64  # messages between commits while the queue stays busy
    COMMIT_INTERVAL_S = 1.0
    core_deliveries = True

    def __init__(self, group: str, topic: str, handler: Callable[[Delivered], Any], *,
                 address: str = DEFAULT_ADDRESS, mode: str = "clustering", ack: str = "offset",
                 filter: str = "*", start: str = "latest", credit: int = 64, client_id: str | None = None,
                 invisible_ms: int = 0, timeout: float = 10.0, username: str = "",
                 password: str | bytes = "", tls: ClientTls | None = None) -> None:
        super().__init__(address, client_id, timeout=timeout, username=username, password=password, tls=tls)
        if credit < 1:
            raise ValueError("credit must be at least 1")
        self.group, self.topic, self.handler = group, topic, handler
        self.mode, self.ack_mode = mode_of(mode), ack_of(ack)
        self.filter, self.start_position, self.credit, self.invisible_ms = filter, start, credit, invisible_ms
        self.subscription_id = 0
        self.assigned: list[QueueRef] = []
        self.processed = 0
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._offsets: dict[QueueRef, int] = {}  # next offset to commit, per queue
        self._queue_refs: dict[tuple[str, int], QueueRef] = {}  # one QueueRef per queue, shared by its messages
        self._receipts: list[str] = []
        self._uncredited = 0
        self._since_commit = 0
        self._last_commit = time.monotonic()

    def start(self) -> PushConsumer:
        super().start()
        frame = self.conn.request(f.Subscribe, on_push=self._on_push, group=self.group, topic=self.topic,
                                  client_id=self.client_id, mode=self.mode, ack=self.ack_mode,
                                  filter_expr=self.filter, start=self.start_position,
                                  invisible_ms=self.invisible_ms, credit=self.credit)
        self.subscription_id = frame.subscription_id
        self._worker = threading.Thread(target=self._work, name=f"tidegate-consumer-{self.group}", daemon=True)
        self._worker.start()
        return self

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            self._inbox.put(_STOP)
            worker.join(self.timeout)
        if self._conn is not None and not self._conn.closed and self.subscription_id:
            try:
                self._flush(final=True)
                self.conn.request(f.Unsubscribe, subscription_id=self.subscription_id)
            except TidegateError as exc:
                logger.warning("closing consumer %s: %s", self.client_id, exc)
        super().close()

    def _on_push(self, frame: f.Frame) -> None:
        # Runs on the reader thread: hand off only (a whole DELIVER at a time: one queue operation per frame).
        if type(frame) is DeliveredBatch:
            if frame.deliveries:
                self._inbox.put(frame.deliveries)
        elif isinstance(frame, f.Deliver):  # a connection without core_deliveries
            if frame.messages:
                queues = self._queue_refs
                items = []
                for record in frame.messages:
                    key = (record.topic, record.queue_id)
                    ref = queues.get(key)
                    if ref is None:
                        ref = queues[key] = QueueRef(record.topic, record.queue_id)
                    items.append(Delivered(record.message, ref, record.queue_offset, record.receipt,
                                           record.attempt))
                self._inbox.put(items)
        elif isinstance(frame, f.Assignment):
            self.assigned = [QueueRef(q.topic, q.queue_id) for q in frame.queues]

    def _work(self) -> None:
        inbox = self._inbox
        while True:
            try:
                item = inbox.get(timeout=self.COMMIT_INTERVAL_S)
            except queue.Empty:
                self._flush_quietly()
                continue
            if item is _STOP:
                return
            # A large DELIVER runs in slices of COMMIT_EVERY, so a slow handler still commits and returns credit
            # as it goes (as when messages were handed over one by one).
            every = self.COMMIT_EVERY
            for start in range(0, len(item), every):
                self._process_batch(item[start:start + every] if len(item) > every else item)
                if inbox.empty() or self._since_commit >= every or \
                        time.monotonic() - self._last_commit >= self.COMMIT_INTERVAL_S:
                    self._flush_quietly()

    def _process_batch(self, deliveries: list[Delivered]) -> None:
        """Run the handler on each message of one DELIVER, in order; then count them for credit and commits
        (acks, commits and credit go out after the batch, from `_flush`)."""
        handler = self.handler
        by_message = self.ack_mode is f.Ack.MESSAGE
        offsets = self._offsets
        for d in deliveries:
            try:
                handler(d)
                failed = False
            except Exception:
                logger.exception("consumer handler failed for %s:%d@%d", d.queue.topic, d.queue.queue_id,
                                 d.queue_offset)
                failed = True
            if by_message:
                if failed:
                    self.conn.send_oneway(f.NackMessages, subscription_id=self.subscription_id,
                                          receipts=[d.receipt], requeue=True)
                else:
                    self._receipts.append(d.receipt)
            else:
                offsets[d.queue] = d.queue_offset + 1
        count = len(deliveries)
        self.processed += count
        self._uncredited += count
        self._since_commit += count

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except TidegateError as exc:
            logger.warning("consumer %s could not commit: %s", self.client_id, exc)

    def _flush(self, final: bool = False) -> None:
        conn = self.conn
        if self._receipts:
            receipts, self._receipts = self._receipts, []
            if final:
                conn.request(f.AckMessages, subscription_id=self.subscription_id, receipts=receipts)
            else:
                conn.send_oneway(f.AckMessages, subscription_id=self.subscription_id, receipts=receipts)
        if self._offsets:
            offsets, self._offsets = self._offsets, {}
            items = [f.QueueOffset(topic=q.topic, queue_id=q.queue_id, offset=o) for q, o in offsets.items()]
            if final:
                conn.request(f.Commit, subscription_id=self.subscription_id, offsets=items)
            else:
                conn.send_oneway(f.Commit, subscription_id=self.subscription_id, offsets=items)
        self._since_commit = 0
        self._last_commit = time.monotonic()
        # Re-grant in chunks (not per message) so credit frames stay few; the broker never exceeds `credit`.
        if not final and self._uncredited and (self._uncredited * 2 >= self.credit or self._inbox.empty()):
            grant, self._uncredited = self._uncredited, 0
            conn.send_oneway(f.Credit, subscription_id=self.subscription_id, credit=grant)


class SimpleConsumer(_Client):
    """Pop-style consumption: `receive` returns messages, each hidden from others for `invisible_ms` until it
    is acked (or becomes visible again for redelivery)."""

    core_deliveries = True

    def __init__(self, group: str, topic: str, *, address: str = DEFAULT_ADDRESS, filter: str = "*",
                 invisible_ms: int = 30_000, client_id: str | None = None, start: str = "",
                 timeout: float = 10.0, username: str = "", password: str | bytes = "",
                 tls: ClientTls | None = None) -> None:
        super().__init__(address, client_id, timeout=timeout, username=username, password=password, tls=tls)
        self.group, self.topic, self.filter, self.invisible_ms = group, topic, filter, invisible_ms
        self.start_position = start
        self.subscription_id = 0
        self._buffer: list[Delivered] = []
        self._cond = threading.Condition()
        self._outstanding = 0  # credit granted but not yet used by the broker

    def start(self) -> SimpleConsumer:
        super().start()
        frame = self.conn.request(f.Subscribe, on_push=self._on_push, group=self.group, topic=self.topic,
                                  client_id=self.client_id, mode=f.Mode.CLUSTERING, ack=f.Ack.MESSAGE,
                                  filter_expr=self.filter, start=self.start_position,
                                  invisible_ms=self.invisible_ms, credit=0)
        self.subscription_id = frame.subscription_id
        return self

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed and self.subscription_id:
            try:
                self.conn.request(f.Unsubscribe, subscription_id=self.subscription_id)
            except TidegateError as exc:
                logger.warning("closing simple consumer %s: %s", self.client_id, exc)
        super().close()

    def _on_push(self, frame: f.Frame | DeliveredBatch) -> None:
        if type(frame) is DeliveredBatch:
            items = frame.deliveries
        elif isinstance(frame, f.Deliver):  # a connection without core_deliveries
            items = [delivered(r) for r in frame.messages]
        else:
            return
        with self._cond:
            self._buffer.extend(items)
            self._outstanding = max(0, self._outstanding - len(items))
            self._cond.notify_all()

    def receive(self, max: int = 16, timeout: float = 5.0) -> list[Delivered]:
        """Up to `max` messages (at most RECEIVE_MAX: brokers cap a subscription's outstanding credit there);
        waits up to `timeout` seconds for the first one, returns [] if none came."""
        max = min(max, RECEIVE_MAX)
        with self._cond:
            wanted = max - len(self._buffer) - self._outstanding
            if wanted > 0:
                self._outstanding += wanted
                self.conn.send_oneway(f.Credit, subscription_id=self.subscription_id, credit=wanted)
            deadline = time.monotonic() + timeout
            while not self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.conn.closed:
                    break
                self._cond.wait(remaining)
            taken, self._buffer = self._buffer[:max], self._buffer[max:]
            return taken

    def ack(self, message: Delivered) -> None:
        self.conn.request(f.AckMessages, subscription_id=self.subscription_id, receipts=[message.receipt])

    def nack(self, message: Delivered, *, delay_ms: int = 0, requeue: bool = True) -> None:
        """Give the message back: visible again after `delay_ms`, or dead-lettered with requeue=False."""
        self.conn.request(f.NackMessages, subscription_id=self.subscription_id, receipts=[message.receipt],
                          requeue=requeue, delay_ms=delay_ms)
