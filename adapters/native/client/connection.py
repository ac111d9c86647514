"""A blocking connection for plain scripts and threads: socket + sans-IO codec + one reader thread.

Requests are pipelined: each gets a request id and a `concurrent.futures.Future` the reader thread resolves.
Writes take one lock. Server pushes (DELIVER, ASSIGNMENT) go to the handler registered for their subscription
and run on the reader thread, so handlers must only hand work off (the consumers put it on a queue).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import NativeCodec, ProtocolError, Role
from tidegate.client.common import (
    CLIENT_MAX_FRAME,
    ConnectionClosed,
    RequestTimeout,
    error_from_frame,
    parse_address,
)
from tidegate.core.errors import TidegateError

logger = logging.getLogger("tidegate.client")

PushHandler = Callable[[f.Frame], None]
RECV_SIZE = 256 * 1024


class Connection:
    """One TCP connection to a broker. Thread-safe: any thread may call `request`/`send_frame`."""

    def __init__(self, address: str, *, client_id: str = "", client_name: str = "tidegate-python",
                 timeout: float = 10.0) -> None:
        self.address = address
        self.client_id = client_id
        self.client_name = client_name
        self.timeout = timeout
        self.server_version = ""
        self.heartbeat_s = 0.0
        self.codec = NativeCodec(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
        self._sock: socket.socket | None = None
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[f.Frame]] = {}
        self._pending_subscribe: dict[int, PushHandler] = {}
        self._push_handlers: dict[int, PushHandler] = {}
        self._reader: threading.Thread | None = None
        self._closed = False
        self._close_reason: TidegateError | None = None
        self._last_sent = 0.0
        self.last_oneway_error: TidegateError | None = None  # errors answering one-way requests land here

    # ------------------------------------------------------------------------------------------ lifecycle
    def open(self) -> Connection:
        host, port = parse_address(self.address)
        sock = socket.create_connection((host, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        # The handshake runs on the caller's thread before the reader starts, so errors surface here.
        sock.sendall(self.codec.encode(f.Hello(request_id=0, client_id=self.client_id,
                                               client_name=self.client_name)))
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
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def _shutdown(self, reason: TidegateError) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason
            pending, self._pending = self._pending, {}
            self._pending_subscribe.clear()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for future in pending.values():
            if not future.done():
                future.set_exception(reason)

    # ------------------------------------------------------------------------------------------- requests
    def _register(self, future: Future[f.Frame] | None, on_push: PushHandler | None) -> int:
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
        sock = self._sock
        if sock is None:
            raise ConnectionClosed("connection is not open")
        try:
            with self._write_lock:
                sock.sendall(data)
                self._last_sent = time.monotonic()
        except OSError as exc:
            error = ConnectionClosed(f"write to {self.address} failed: {exc}")
            self._shutdown(error)
            raise error from None

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
        for frame in frames:
            cls = type(frame)
            if cls is f.Deliver or cls is f.Assignment:
                handler = self._push_handlers.get(frame.subscription_id)
                if handler is not None:
                    try:
                        handler(frame)
                    except Exception:
                        logger.exception("push handler for subscription %d failed", frame.subscription_id)
                continue
            if cls is f.Pong:
                continue
            with self._state_lock:
                future = self._pending.pop(frame.request_id, None)
                on_push = self._pending_subscribe.pop(frame.request_id, None)
            if cls is f.SubscribeOk and on_push is not None:
                # Registered here, on the reader thread, so the first DELIVER (next frame) finds its handler.
                self._push_handlers[frame.subscription_id] = on_push
            if future is None:
                if cls is f.Error:
                    error = error_from_frame(frame)
                    if frame.request_id == 0:
                        raise error  # a connection-level error: the server is about to close
                    self.last_oneway_error = error
                    logger.warning("broker rejected one-way request %d: %s", frame.request_id, error)
                continue
            if cls is f.Error:
                future.set_exception(error_from_frame(frame))
            else:
                future.set_result(frame)
