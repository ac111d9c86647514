"""Twisted SDK: the same codec in a Protocol, Deferred-returning calls, push handlers run on the reactor."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import NativeCodec, ProtocolError, Role
from tidegate.client.common import (
    CLIENT_MAX_FRAME,
    ConnectionClosed,
    SendResult,
    ack_of,
    delivered,
    error_from_frame,
    mode_of,
    pull_result,
    send_result,
)
from tidegate.client.tls import ClientTls
from tidegate.core.api import Delivered, PullResult
from tidegate.core.errors import TidegateError
from tidegate.core.model import Message, MessageFlag, QueueRef

log = Logger()


class TwistedClient(Protocol):
    """One connection. Create it with `connect(reactor, host, port)`; every request returns a Deferred."""

    def __init__(self, reactor: Any, client_id: str = "", client_name: str = "tidegate-twisted", *,
                 username: str = "", password: str | bytes = "") -> None:
        self.reactor = reactor
        self.client_id = client_id
        self.client_name = client_name
        self.username = username  # sent in HELLO; empty = anonymous
        self._password = password.encode() if isinstance(password, str) else bytes(password)
        self.codec = NativeCodec(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
        self.ready: Deferred[TwistedClient] = Deferred()
        self.server_version = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred[f.Frame]] = {}
        self._pending_subscribe: dict[int, Callable[[f.Frame], None]] = {}
        self._push: dict[int, Callable[[f.Frame], None]] = {}
        self._heartbeat: LoopingCall | None = None
        self._connected = False
        self._last_sent = 0.0

    # ------------------------------------------------------------------------------------------ lifecycle
    def connectionMade(self) -> None:
        self._connected = True
        self.transport.write(self.codec.encode(f.Hello(request_id=0, client_id=self.client_id,
                                                       client_name=self.client_name, username=self.username,
                                                       password=self._password)))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._connected = False
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        error = ConnectionClosed("connection to the broker was lost")
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(Failure(error))
        if not self.ready.called:
            self.ready.errback(Failure(error))

    def close(self) -> Deferred[Any]:
        """Say BYE and close; the Deferred fires once the server has answered (or the link is gone)."""
        if not self._connected:
            return succeed(None)
        d = self.request(f.Bye)
        d.addBoth(lambda _: self.transport.loseConnection())
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.codec.receive_data(data)
        except ProtocolError as exc:
            self._handle(exc.frames_before)
            log.error("tidegate: broker sent a bad frame: {exc}", exc=exc)
            self.transport.loseConnection()
            return
        self._handle(frames)

    def _handle(self, frames: list[f.Frame]) -> None:
        for frame in frames:
            cls = type(frame)
            if cls is f.Deliver or cls is f.Assignment:
                handler = self._push.get(frame.subscription_id)
                if handler is not None:
                    try:
                        handler(frame)
                    except Exception as exc:
                        log.error("tidegate: push handler failed: {exc!r}", exc=exc)
                continue
            if cls is f.HelloOk:
                self.server_version = frame.server_version
                if frame.heartbeat_ms:
                    self._heartbeat = LoopingCall(self._ping)
                    self._heartbeat.clock = self.reactor
                    self._heartbeat.start(frame.heartbeat_ms / 1000.0 / 2, now=False)
                self.ready.callback(self)
                continue
            if cls is f.Pong:
                continue
            d = self._pending.pop(frame.request_id, None)
            on_push = self._pending_subscribe.pop(frame.request_id, None)
            if cls is f.SubscribeOk and on_push is not None:
                self._push[frame.subscription_id] = on_push
            if cls is f.Error:
                error = error_from_frame(frame)
                if d is not None:
                    d.errback(Failure(error))
                elif not self.ready.called:
                    self.ready.errback(Failure(error))
                else:
                    log.warn("tidegate: broker error for request {rid}: {error}", rid=frame.request_id,
                             error=error)
            elif d is not None:
                d.callback(frame)

    def _ping(self) -> None:
        if self._connected and time.monotonic() - self._last_sent >= self._heartbeat.interval:
            self._write(self.codec.encode(f.Ping(request_id=0)))

    def _write(self, data: bytes) -> None:
        self._last_sent = time.monotonic()
        self.transport.write(data)

    # ------------------------------------------------------------------------------------------- requests
    def request(self, cls: type[f.Frame], *, on_push: Callable[[f.Frame], None] | None = None,
                **fields: Any) -> Deferred[Any]:
        if not self._connected:
            return fail(ConnectionClosed("not connected"))
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        try:
            data = self.codec.encode(cls(request_id=request_id, **fields))
        except TidegateError as exc:
            return fail(exc)
        d: Deferred[f.Frame] = Deferred()
        self._pending[request_id] = d
        if on_push is not None:
            self._pending_subscribe[request_id] = on_push
        self._write(data)
        return d

    def send_oneway_frame(self, cls: type[f.Frame], **fields: Any) -> None:
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        self._write(self.codec.encode(cls(request_id=request_id, flags=f.FrameFlag.ONEWAY, **fields)))

    def send(self, topic: str, body: bytes, *, tag: str = "", keys: Iterable[str] = (),
             properties: Mapping[str, str] | None = None, subject: str = "", group: str = "",
             deliver_at: int = 0, expires_at: int = 0, queue_id: int | None = None) -> Deferred[SendResult]:
        message = Message(topic=topic, body=bytes(body), subject=subject, tag=tag, keys=tuple(keys),
                          properties=dict(properties or {}), born_ts=int(time.time() * 1000),
                          deliver_at=deliver_at, expires_at=expires_at, group=group, flags=MessageFlag.PERSISTENT)
        return self.send_message(message, queue_id=queue_id)

    def send_message(self, message: Message, *, queue_id: int | None = None) -> Deferred[SendResult]:
        d = self.request(f.Send, queue_id=-1 if queue_id is None else queue_id, message=message)
        return d.addCallback(send_result)

    def send_batch(self, messages: Iterable[Message], *, queue_id: int | None = None) -> Deferred[list[SendResult]]:
        d = self.request(f.SendBatch, queue_id=-1 if queue_id is None else queue_id, messages=list(messages))
        return d.addCallback(lambda frame: [send_result(r) for r in frame.results])

    def subscribe(self, group: str, topic: str, handler: Callable[[Delivered], Any], *, mode: str = "clustering",
                  ack: str = "offset", filter: str = "*", start: str = "", credit: int = 64,
                  invisible_ms: int = 0, on_assignment: Callable[[list[QueueRef]], Any] | None = None,
                  ) -> Deferred[int]:
        """Push consumption; `handler(Delivered)` runs on the reactor. Flow control is the caller's: grant more
        credit with `grant(subscription_id, n)` and settle with `commit`/`ack`. Fires with the subscription id."""

        def on_push(frame: f.Frame) -> None:
            if isinstance(frame, f.Deliver):
                for record in frame.messages:
                    handler(delivered(record))
            elif on_assignment is not None:
                on_assignment([QueueRef(q.topic, q.queue_id) for q in frame.queues])

        d = self.request(f.Subscribe, on_push=on_push, group=group, topic=topic, client_id=self.client_id,
                         mode=mode_of(mode), ack=ack_of(ack), filter_expr=filter, start=start,
                         invisible_ms=invisible_ms, credit=credit)
        return d.addCallback(lambda frame: frame.subscription_id)

    def grant(self, subscription_id: int, credit: int) -> None:
        self.send_oneway_frame(f.Credit, subscription_id=subscription_id, credit=credit)

    def ack(self, subscription_id: int, receipts: Iterable[str]) -> Deferred[None]:
        return self.request(f.AckMessages, subscription_id=subscription_id, receipts=list(receipts)).addCallback(
            lambda _: None)

    def nack(self, subscription_id: int, receipts: Iterable[str], *, requeue: bool = True,
             delay_ms: int = 0) -> Deferred[None]:
        return self.request(f.NackMessages, subscription_id=subscription_id, receipts=list(receipts),
                            requeue=requeue, delay_ms=delay_ms).addCallback(lambda _: None)

    def commit(self, offsets: Mapping[QueueRef, int], *, subscription_id: int = 0,
               group: str = "") -> Deferred[None]:
        items = [f.QueueOffset(topic=q.topic, queue_id=q.queue_id, offset=o) for q, o in offsets.items()]
        return self.request(f.Commit, subscription_id=subscription_id, group=group, offsets=items).addCallback(
            lambda _: None)

    def unsubscribe(self, subscription_id: int) -> Deferred[None]:
        self._push.pop(subscription_id, None)
        return self.request(f.Unsubscribe, subscription_id=subscription_id).addCallback(lambda _: None)

    def pull(self, topic: str, queue_id: int, offset: int, max: int = 32,
             filter: str = "*") -> Deferred[PullResult]:
        d = self.request(f.Pull, topic=topic, queue_id=queue_id, offset=offset, max_count=max, filter_expr=filter)
        return d.addCallback(pull_result)

    def create_topic(self, name: str, queues: int = 0, *, perm: str = "rw",
                     retention_ms: int = 0) -> Deferred[f.TopicInfo]:
        d = self.request(f.TopicCreate, name=name, queues=queues, perm=perm, retention_ms=retention_ms)
        return d.addCallback(lambda frame: frame.topic)


class _ClientFactory(ClientFactory):
    """Fires `result` once the handshake is done (or the connection/handshake fails)."""

    def __init__(self, reactor: Any, client_id: str) -> None:
        self.reactor = reactor
        self.client_id = client_id
        self.result: Deferred[TwistedClient] = Deferred()

    def buildProtocol(self, addr: Any) -> TwistedClient:
        client = TwistedClient(self.reactor, self.client_id)
        client.factory = self
        client.ready.addCallbacks(self._succeeded, self._failed)
        return client

    def _succeeded(self, client: TwistedClient) -> None:
        if not self.result.called:
            self.result.callback(client)

    def _failed(self, reason: Failure) -> None:
        if not self.result.called:
            self.result.errback(reason)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._failed(reason)


def connect(reactor: Any, host: str = "127.0.0.1", port: int = 10911, *, client_id: str = "",
            timeout: float = 10.0, tls: ClientTls | None = None) -> Deferred[TwistedClient]:
    """Connect and handshake; fires with a ready TwistedClient or fails with the broker's error. With `tls`,
    over TLS: the broker's certificate and its name (`host`, or `tls.server_hostname`) are verified."""
    factory = _ClientFactory(reactor, client_id)
    if tls is None:
        reactor.connectTCP(host, port, factory, timeout=timeout)
    else:
        reactor.connectSSL(host, port, factory, tls.twisted_options(host), timeout=timeout)
    return factory.result
