"""A blocking connection for plain scripts and threads: socket + sans-IO codec + a reader and a writer thread.

Requests are pipelined: each gets a request id and a `concurrent.futures.Future` (or, for `send_async`, a plain
callback) the reader thread resolves. Writes are coalesced: a caller writes directly when nothing else is being
written; otherwise its bytes join an outgoing buffer that one writer thread sends with a single `sendall`, so a
pipelining producer costs a list append per message rather than a system call. Server pushes (DELIVER,
ASSIGNMENT) go to the handler registered for their subscription and run on the reader thread, so handlers must
only hand work off (the consumers put it on a queue).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    LENGTH_SIZE,
    FrameTooLarge,
    NativeCodec,
    ProtocolError,
    Role,
    encode_plain_send,
    encode_plain_send_batch,
    encode_send,
    encode_send_batch,
)
from tidegate.client.common import (
    CLIENT_MAX_FRAME,
    ConnectionClosed,
    RequestTimeout,
    error_from_frame,
    parse_address,
)
from tidegate.client.deliveries import DELIVER_TYPE, DeliveredBatch, core_deliver_decoder
from tidegate.client.tls import ClientTls
from tidegate.core.errors import TidegateError
from tidegate.core.model import Message

logger = logging.getLogger("tidegate.client")

PushHandler = Callable[[f.Frame], None]
# A pending request is answered through a Future or, on the hot path, a plain callable that receives the
# response frame or the exception (called on the reader thread; must not raise).
Responder = Callable[[Any], None]
RECV_SIZE = 256 * 1024
MAX_QUEUED_BYTES = 4 * 1024 * 1024  # pipelined sends wait while this much is queued and not yet written
PUSHES = frozenset((f.Deliver, f.Assignment, DeliveredBatch))  # server pushes: to the subscription's handler


class Connection:
    """One TCP connection to a broker. Thread-safe: any thread may call `request`/`send_frame`."""

    def __init__(self, address: str, *, client_id: str = "", client_name: str = "tidegate-python",
                 timeout: float = 10.0, username: str = "", password: str | bytes = "",
                 tls: ClientTls | None = None, core_deliveries: bool = False) -> None:
        self.address = address
        self.tls = tls  # None: plain TCP; else TLS with the broker's certificate and name checked
        self.client_id = client_id
        self.client_name = client_name
        self.username = username  # sent in HELLO; empty = anonymous
        self._password = password.encode() if isinstance(password, str) else bytes(password)
        self.timeout = timeout
        self.server_version = ""
        self.heartbeat_s = 0.0
        # core_deliveries: DELIVERs reach push handlers as deliveries.DeliveredBatch (core `Delivered` values, decoded
        # without DeliveryRecords) instead of Deliver frames; what consumers want, and cheaper.
        self.codec = NativeCodec(Role.CLIENT, max_frame=CLIENT_MAX_FRAME, open_decoders={
            DELIVER_TYPE: core_deliver_decoder()} if core_deliveries else None)
        self._sock: socket.socket | None = None
        self._state_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[f.Frame] | Responder] = {}
        self._pending_subscribe: dict[int, PushHandler] = {}
        self._push_handlers: dict[int, PushHandler] = {}
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._out: list[bytes] = []  # bytes waiting for the writer thread, in order
        # One lock guards the pending table, the outgoing buffer and the closed flag, so a pipelined send takes
        # it once and the reader once per received chunk (fewer lock hand-offs between threads under the GIL).
        self._out_cond = threading.Condition(self._state_lock)  # the writer thread waits here for bytes
        self._space_cond = threading.Condition(self._state_lock)  # senders wait here while the buffer is full
        self._out_bytes = 0
        self._writing = False  # some thread is inside sendall (at most one at a time)
        self._writer_idle = False  # the writer thread waits on _out_cond
        self._closed = False
        self._close_reason: TidegateError | None = None
        self._last_sent = 0.0
        self.last_oneway_error: TidegateError | None = None  # errors answering one-way requests land here

    # ------------------------------------------------------------------------------------------ lifecycle
    def open(self) -> Connection:
        host, port = parse_address(self.address)
        sock = socket.create_connection((host, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            # A TLS socket is read by the reader thread while the writer thread sends: OpenSSL allows one reader
            # and one writer at a time on a connection, and this class never has more of either.
            sock = self.tls.wrap(sock, host)
        self._sock = sock
        # The handshake runs on the caller's thread before the reader starts, so errors surface here.
        sock.sendall(self.codec.encode(f.Hello(request_id=0, client_id=self.client_id,
                                               client_name=self.client_name, username=self.username,
                                               password=self._password)))
        deadline = time.monotonic() + self.timeout
        frames: list[f.Frame] = []
        while not frames:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                sock.close()
                raise RequestTimeout(f"no HELLO_OK from {self.address} within {self.timeout}s") from None
            if not data:
                sock.close()
                raise ConnectionClosed(f"{self.address} closed the connection during the handshake")
            try:
                frames = self.codec.receive_data(data)
            except ProtocolError:
                sock.close()
                raise
        first, rest = frames[0], frames[1:]
        if isinstance(first, f.Error):
            sock.close()
            raise error_from_frame(first)
        assert isinstance(first, f.HelloOk)  # the client codec admits nothing else first
        self.server_version = first.server_version
        self.heartbeat_s = first.heartbeat_ms / 1000.0
        self._last_sent = time.monotonic()
        # Wake often enough to send a PING in time even when the server pushes non-stop.
        sock.settimeout(max(0.05, self.heartbeat_s / 3) if self.heartbeat_s else None)
        self._reader = threading.Thread(target=self._read_loop, args=(rest,), name="tidegate-reader",
                                        daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write_loop, name="tidegate-writer", daemon=True)
        self._writer.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Say BYE (best effort), then close the socket and fail whatever is still pending."""
        if self._closed or self._sock is None:
            return
        try:
            self.request(f.Bye, timeout=timeout)
        except TidegateError:
            pass
        self._shutdown(ConnectionClosed("connection closed by the client"))
        for thread in (self._reader, self._writer):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def _shutdown(self, reason: TidegateError) -> None:
        with self._out_cond:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason
            pending, self._pending = self._pending, {}
            self._pending_subscribe.clear()
            self._out.clear()
            self._out_bytes = 0
            self._out_cond.notify_all()
            self._space_cond.notify_all()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for entry in pending.values():
            if isinstance(entry, Future):
                if not entry.done():
                    entry.set_exception(reason)
            else:
                entry(reason)

    # ------------------------------------------------------------------------------------------- requests
    def _register(self, future: Future[f.Frame] | Responder | None, on_push: PushHandler | None) -> int:
        with self._state_lock:
            if self._closed:
                raise self._close_reason or ConnectionClosed("connection is closed")
            request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            if future is not None:
                self._pending[request_id] = future
            if on_push is not None:
                self._pending_subscribe[request_id] = on_push
            return request_id

    def _write(self, data: bytes) -> None:
        """Send `data` after everything queued before it: directly if nothing is being written, else through
        the writer thread. Raises ConnectionClosed if the connection is (or becomes, on a direct write) gone."""
        sock = self._sock
        if sock is None:
            raise ConnectionClosed("connection is not open")
        cond = self._out_cond
        with cond:
            if self._closed:
                raise self._close_reason or ConnectionClosed("connection is closed")
            if self._writing or self._out:
                self._out.append(data)
                self._out_bytes += len(data)
                if self._writer_idle:
                    cond.notify()
                return
            self._writing = True
        try:
            sock.sendall(data)
            self._last_sent = time.monotonic()
        except OSError as exc:
            error = ConnectionClosed(f"write to {self.address} failed: {exc}")
            self._shutdown(error)
            raise error from None
        finally:
            with cond:
                self._writing = False
                if self._out and self._writer_idle:
                    cond.notify()

    def _write_loop(self) -> None:
        cond = self._out_cond
        sock = self._sock
        while True:
            with cond:
                while (self._writing or not self._out) and not self._closed:
                    self._writer_idle = True
                    cond.wait()
                    self._writer_idle = False
                if self._closed:
                    return
                chunks, self._out = self._out, []
                if self._out_bytes >= MAX_QUEUED_BYTES:
                    self._space_cond.notify_all()
                self._out_bytes = 0
                self._writing = True
            try:
                sock.sendall(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                self._last_sent = time.monotonic()
            except OSError as exc:
                with cond:
                    self._writing = False
                self._shutdown(ConnectionClosed(f"write to {self.address} failed: {exc}"))
                return
            with cond:
                self._writing = False

    def _check_size(self, data: bytes, request_id: int, what: str) -> None:
        limit = self.codec.send_max_frame
        if limit is not None and len(data) - LENGTH_SIZE > limit:
            raise FrameTooLarge(f"{what} is {len(data) - LENGTH_SIZE} bytes; the peer accepts at most {limit}",
                                request_id=request_id, fatal=False)

    def send_message(self, message: Message, queue_id: int, responder: Future[f.Frame] | Responder | None, *,
                     oneway: bool = False, pipelined: bool = True) -> None:
        """SEND without a frame object: `responder` (a Future, or a callable taking the SendOk frame or the
        exception, run on the reader thread) gets the answer; None for one-way sends. `pipelined` sends through
        the writer thread (coalesced with other queued sends); else the caller writes when the socket is free."""
        if not pipelined:
            request_id = self._register(responder, None)
            try:
                data = encode_send(request_id, 1 if oneway else 0, queue_id, message)
                self._check_size(data, request_id, "Send")
            except Exception:
                with self._state_lock:
                    self._pending.pop(request_id, None)
                raise
            self._write(data)
            return
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        data = encode_send(request_id, 1 if oneway else 0, queue_id, message)
        self._check_size(data, request_id, "Send")
        self._queue_request(request_id, data, responder)

    def send_plain(self, topic: str, body: bytes, born_ts: int, queue_id: int, responder: Responder) -> None:
        """A pipelined SEND of a message that is only a topic and a body (persistent, no tag, keys, properties,
        delay or expiry), encoded without a Message object: the same bytes as `send_message` sends for
        `Message(topic, body, born_ts=born_ts)`. `responder` as for `send_message`."""
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        data = encode_plain_send(request_id, 0, queue_id, topic, body, born_ts)
        self._check_size(data, request_id, "Send")
        self._queue_request(request_id, data, responder)

    def _queue_request(self, request_id: int, data: bytes, responder: Future[f.Frame] | Responder | None) -> None:
        """Register `responder` (if any) and queue `data` for the writer thread under one lock acquisition,
        waiting while too much is queued already."""
        cond = self._out_cond
        with cond:  # register and queue under one lock acquisition
            while self._out_bytes >= MAX_QUEUED_BYTES and not self._closed:
                self._space_cond.wait()  # backpressure: the socket is not keeping up
            if self._closed:
                raise self._close_reason or ConnectionClosed("connection is closed")
            if responder is not None:
                self._pending[request_id] = responder
            self._out.append(data)
            self._out_bytes += len(data)
            if self._writer_idle:
                cond.notify()

    def submit_batch(self, messages: list[Message], queue_id: int) -> Future[f.Frame]:
        """SEND_BATCH without building the frame object; the future resolves to SEND_BATCH_OK."""
        future: Future[f.Frame] = Future()
        request_id = self._register(future, None)
        try:
            data = encode_send_batch(request_id, 0, queue_id, messages)
            self._check_size(data, request_id, "SendBatch")
        except Exception:
            with self._state_lock:
                self._pending.pop(request_id, None)
            raise
        self._write(data)
        return future

    def submit_plain_batch(self, topic: str, bodies: Sequence[bytes], born_ts: int, queue_id: int,
                           responder: Responder) -> None:
        """A pipelined SEND_BATCH of messages that are only `topic` and a body each (persistent, nothing else),
        encoded without Message objects: the same bytes as `submit_batch` sends for `Message(topic, body,
        born_ts=born_ts)` of each body. `responder` (run on the reader thread) gets the SendBatchOk frame or the
        exception."""
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        data = encode_plain_send_batch(request_id, 0, queue_id, topic, bodies, born_ts)
        self._check_size(data, request_id, "SendBatch")
        self._queue_request(request_id, data, responder)

    def submit(self, cls: type[f.Frame], *, on_push: PushHandler | None = None, **fields: Any) -> Future[f.Frame]:
        """Send a request; the future resolves to the response frame or fails with the server's error."""
        future: Future[f.Frame] = Future()
        request_id = self._register(future, on_push)
        try:
            data = self.codec.encode(cls(request_id=request_id, **fields))
        except Exception:
            with self._state_lock:
                self._pending.pop(request_id, None)
                self._pending_subscribe.pop(request_id, None)
            raise
        self._write(data)
        return future

    def request(self, cls: type[f.Frame], *, timeout: float | None = None, on_push: PushHandler | None = None,
                **fields: Any) -> f.Frame:
        future = self.submit(cls, on_push=on_push, **fields)
        wait = self.timeout if timeout is None else timeout
        try:
            return future.result(wait)
        except TimeoutError:
            raise RequestTimeout(f"{cls.__name__} got no answer within {wait}s") from None

    def send_oneway(self, cls: type[f.Frame], **fields: Any) -> None:
        """Send a request flagged ONEWAY: the server answers only if it fails (see `last_oneway_error`)."""
        request_id = self._register(None, None)
        self._write(self.codec.encode(cls(request_id=request_id, flags=f.FrameFlag.ONEWAY, **fields)))

    def remove_push_handler(self, subscription_id: int) -> None:
        self._push_handlers.pop(subscription_id, None)

    # --------------------------------------------------------------------------------------------- reader
    def _read_loop(self, first_frames: list[f.Frame]) -> None:
        reason: TidegateError = ConnectionClosed(f"{self.address} closed the connection")
        try:
            self._handle(first_frames)
            sock = self._sock
            codec = self.codec
            while not self._closed:
                try:
                    data = sock.recv(RECV_SIZE)
                except TimeoutError:
                    data = None
                if data == b"":
                    break
                if data:
                    try:
                        self._handle(codec.receive_data(data))
                    except ProtocolError as exc:
                        self._handle(exc.frames_before)
                        reason = exc
                        break
                if self.heartbeat_s and time.monotonic() - self._last_sent >= self.heartbeat_s:
                    self._write(self.codec.encode(f.Ping(request_id=0)))
        except OSError as exc:
            if not self._closed:
                reason = ConnectionClosed(f"connection to {self.address} failed: {exc}")
        except TidegateError as exc:
            reason = exc
        self._shutdown(reason)

    def _handle(self, frames: list[f.Frame]) -> None:
        if not frames:
            return
        send_ok = f.SendOk
        # Take every answered request off the table under one lock acquisition, then act in frame order.
        with self._state_lock:
            pending = self._pending
            subscribing = self._pending_subscribe
            entries = [pending.pop(frame.request_id, None) if type(frame) is send_ok
                       or (type(frame) not in PUSHES and type(frame) is not f.Pong) else None for frame in frames]
            on_pushes = [subscribing.pop(frame.request_id, None) for frame in frames] if subscribing else None
        fatal: TidegateError | None = None
        for i, frame in enumerate(frames):
            cls = type(frame)
            entry = entries[i]
            if cls is send_ok:
                if entry is None:
                    continue
                if type(entry) is Future:
                    entry.set_result(frame)
                else:
                    entry(frame)
                continue
            if cls in PUSHES:
                handler = self._push_handlers.get(frame.subscription_id)
                if handler is not None:
                    try:
                        handler(frame)
                    except Exception:
                        logger.exception("push handler for subscription %d failed", frame.subscription_id)
                continue
            if cls is f.Pong:
                continue
            on_push = on_pushes[i] if on_pushes is not None else None
            if cls is f.SubscribeOk and on_push is not None:
                # Registered here, on the reader thread, so the first DELIVER (next frame) finds its handler.
                self._push_handlers[frame.subscription_id] = on_push
            if entry is None:
                if cls is f.Error:
                    error = error_from_frame(frame)
                    if frame.request_id == 0:
                        fatal = error  # a connection-level error: the server is about to close
                        continue
                    self.last_oneway_error = error
                    logger.warning("broker rejected one-way request %d: %s", frame.request_id, error)
                continue
            if isinstance(entry, Future):
                if cls is f.Error:
                    entry.set_exception(error_from_frame(frame))
                else:
                    entry.set_result(frame)
            else:
                entry(error_from_frame(frame) if cls is f.Error else frame)
        if fatal is not None:
            raise fatal
