"""End-to-end: the blocking SDK against a native server (in-memory broker) in a subprocess, over 127.0.0.1."""

from __future__ import annotations

import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import NativeCodec, Role, UnsupportedVersion, encode_frame
from tidegate.adapters.native.errors import ErrorCode
from tidegate.client import (
    Admin,
    Delivered,
    Message,
    Producer,
    PullConsumer,
    PullStatus,
    PushConsumer,
    SendResult,
    SimpleConsumer,
    TidegateError,
)
from tidegate.core.errors import InvalidName, TopicNotFound

SERVER_SCRIPT = Path(__file__).with_name("native_server_process.py")
HEARTBEAT_S = 0.3  # short, so the heartbeat test is quick; every client must ping to stay connected
WAIT_S = 10.0


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), str(HEARTBEAT_S)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=30):
                raise RuntimeError("native test server did not start within 30s")
        line = proc.stdout.readline().decode().strip()
        if not line.isdigit():
            proc.kill()
            raise RuntimeError(f"native test server failed: {line!r} {proc.stderr.read().decode()[-2000:]}")
        yield f"127.0.0.1:{line}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_send_is_acknowledged_and_every_field_survives(address: str) -> None:
    """send() returns a SendResult; query_by_id returns the message with every field the producer set."""
    topic = unique("e2e")
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic(topic, queues=2)
        result = producer.send(topic, b"hello", tag="TagA", keys=("k1", "k2"), properties={"p": "v"},
                               subject="a/b", group="fifo-1", queue_id=1)
        assert isinstance(result, SendResult) and result.topic == topic and result.queue_id == 1
        found = admin.query_by_id(result.msg_id)
        assert (found.body, found.tag, found.keys, found.properties, found.subject, found.group) == \
            (b"hello", "TagA", ("k1", "k2"), {"p": "v"}, "a/b", "fifo-1")
        assert found.msg_id == result.msg_id and found.store_ts > 0 and found.born_ts > 0
        assert [m.body for m in admin.query_by_key(topic, "k2")] == [b"hello"]
        described = admin.describe_topic(topic)
        assert [(q.queue_id, q.max_offset) for q in described.queues] == [(0, 0), (1, 1)]


def test_send_async_oneway_and_batch(address: str) -> None:
    """send_async calls back with a result, send_oneway stores without answer, send_batch returns one result each."""
    topic = unique("modes")
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic(topic, queues=1)
        got: list[object] = []
        done = threading.Event()

        def callback(result: object) -> None:
            got.append(result)
            done.set()

        producer.send_async(topic, b"async", callback)
        assert done.wait(WAIT_S) and isinstance(got[0], SendResult)
        producer.send_oneway(topic, b"oneway")
        results = producer.send_batch([Message(topic=topic, body=b"b1"), Message(topic=topic, body=b"b2")])
        assert [r.queue_offset for r in results] == [2, 3]  # the one-way send landed before the batch
        assert admin.describe_topic(topic).queues[0].max_offset == 4


def test_send_batch_async_stores_all_and_calls_back_with_one_result_each(address: str) -> None:
    """send_batch_async sends the bodies in one SEND_BATCH: the callback gets a SendResult per body, in order, and a
    consumer reads them back as plain persistent messages of the topic."""
    topic = unique("batchasync")
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic(topic, queues=1)
        got: list[object] = []
        done = threading.Event()

        def callback(results: object) -> None:
            got.append(results)
            done.set()

        producer.send_batch_async(topic, [b"a", bytearray(b"b"), b"c"], callback, queue_id=0)
        assert done.wait(WAIT_S)
        [results] = got
        assert [(r.topic, r.queue_id, r.queue_offset) for r in results] == [(topic, 0, 0), (topic, 0, 1),
                                                                            (topic, 0, 2)]
        assert all(isinstance(r, SendResult) and r.msg_id for r in results)
        with PullConsumer("g", address) as consumer:
            pulled = consumer.pull(topic, 0, 0, max=10)
        assert [d.message.body for d in pulled.messages] == [b"a", b"b", b"c"]
        assert all(d.message.born_ts and d.message.flags == 1 and not d.message.tag for d in pulled.messages)


def test_errors_arrive_typed_and_the_connection_survives(address: str) -> None:
    """Server errors raise the matching TidegateError subclass with its code; the client keeps working."""
    with Admin(address) as admin, Producer(address) as producer:
        with pytest.raises(TopicNotFound) as info:
            admin.delete_topic(unique("missing"))
        assert info.value.code == ErrorCode.TOPIC_NOT_FOUND
        with pytest.raises(InvalidName):
            producer.send("bad topic name!", b"x")
        async_error: list[object] = []
        done = threading.Event()
        producer.send_async("bad topic name!", b"x", lambda r: (async_error.append(r), done.set()))
        assert done.wait(WAIT_S) and isinstance(async_error[0], InvalidName)
        assert producer.send(unique("ok"), b"fine").msg_id


def test_push_consumer_offset_mode_consumes_everything_and_commits(address: str) -> None:
    """A push consumer with small credit receives all messages across queues and commits them (lag 0)."""
    topic, group = unique("push"), unique("g")
    received: list[bytes] = []
    lock = threading.Lock()

    def handler(message: Delivered) -> None:
        with lock:
            received.append(message.message.body)

    with Admin(address) as admin:
        admin.create_topic(topic, queues=3)
        consumer = PushConsumer(group, topic, handler, address=address, start="earliest", credit=4)
        with consumer, Producer(address) as producer:
            for i in range(30):
                producer.send(topic, str(i).encode())
            wait_until(lambda: len(received) >= 30, what="30 deliveries")
            assert sorted(received) == sorted(str(i).encode() for i in range(30))
            wait_until(lambda: admin.describe_group(group).lag == 0, what="commits to reach the broker")
            assert len(consumer.assigned) == 3
        desc = admin.describe_group(group)
        assert sum(p.committed for p in desc.progress) == 30


def test_push_consumer_message_mode_nacks_failures_for_redelivery(address: str) -> None:
    """In message mode a handler exception nacks the message; it comes back with attempt 2 and is then acked."""
    topic, group = unique("pop"), unique("gm")
    attempts: list[tuple[bytes, int]] = []

    def handler(message: Delivered) -> None:
        attempts.append((message.message.body, message.attempt))
        if message.attempt == 1:
            raise RuntimeError("fail the first delivery")

    with Admin(address) as admin:
        admin.create_topic(topic, queues=1)
        with PushConsumer(group, topic, handler, address=address, ack="message", start="earliest"), \
                Producer(address) as producer:
            producer.send(topic, b"retry-me")
            wait_until(lambda: (b"retry-me", 2) in attempts, what="the redelivery")
        assert attempts[:2] == [(b"retry-me", 1), (b"retry-me", 2)]


def test_pull_consumer_reads_and_commits(address: str) -> None:
    """pull returns messages and offsets; commit is accepted within the queue and refused beyond its end."""
    topic, group = unique("pull"), unique("gp")
    with Admin(address) as admin, Producer(address) as producer, PullConsumer(group, address) as consumer:
        admin.create_topic(topic, queues=1)
        for body in (b"a", b"b", b"c"):
            producer.send(topic, body)
        result = consumer.pull(topic, 0, 0, max=2)
        assert result.status is PullStatus.FOUND and [d.message.body for d in result.messages] == [b"a", b"b"]
        assert (result.next_offset, result.max_offset) == (2, 3)
        consumer.commit(topic, 0, result.next_offset)
        with pytest.raises(TidegateError) as info:
            consumer.commit(topic, 0, 99)  # beyond the end of the queue
        assert info.value.code == ErrorCode.OFFSET_OUT_OF_RANGE
        assert consumer.pull(topic, 0, 3).status is PullStatus.NO_NEW
        assert admin.reset_offsets(group, topic, "earliest") == {admin_queue(topic): 0}


def admin_queue(topic: str):
    from tidegate.core.model import QueueRef

    return QueueRef(topic, 0)


def test_simple_consumer_receives_and_acks(address: str) -> None:
    """receive() returns up to max messages with receipts; ack() settles them; an empty topic returns []."""
    topic, group = unique("simple"), unique("gs")
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic(topic, queues=2)
        with SimpleConsumer(group, topic, address=address, invisible_ms=30_000, start="earliest") as consumer:
            for i in range(5):
                producer.send(topic, str(i).encode())
            got: list[Delivered] = []
            deadline = time.monotonic() + WAIT_S
            while len(got) < 5 and time.monotonic() < deadline:
                got += consumer.receive(max=3, timeout=1.0)
            assert sorted(d.message.body for d in got) == [b"0", b"1", b"2", b"3", b"4"]
            for message in got:
                consumer.ack(message)
            with pytest.raises(TidegateError) as info:
                consumer.ack(got[0])
            assert info.value.code == ErrorCode.INVALID_RECEIPT
            assert consumer.receive(max=3, timeout=0.2) == []


def test_idle_client_stays_connected_thanks_to_heartbeats(address: str) -> None:
    """A producer idle for longer than 3 heartbeat intervals is still connected (the SDK pings)."""
    with Producer(address) as producer:
        idle = threading.Event()
        idle.wait(HEARTBEAT_S * 4)  # the behaviour under test is the passage of time itself
        assert not producer.conn.closed
        assert producer.send(unique("hb"), b"still here").msg_id


def test_unsupported_version_over_a_real_socket(address: str) -> None:
    """A raw client announcing version 9 receives ERROR UNSUPPORTED_VERSION and then EOF."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(encode_frame(f.Hello(request_id=1, version=9)))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    codec = NativeCodec(Role.CLIENT)
    (err,) = codec.receive_data(data)
    assert err.code == ErrorCode.UNSUPPORTED_VERSION


def test_oversize_frame_over_a_real_socket_is_refused(address: str) -> None:
    """A frame length above max_frame gets ERROR FRAME_TOO_LARGE and the server closes the connection."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(encode_frame(f.Hello(request_id=1)) + struct.pack(">I", 2**31))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    hello_ok, err = NativeCodec(Role.CLIENT).receive_data(data)
    assert isinstance(hello_ok, f.HelloOk) and err.code == ErrorCode.FRAME_TOO_LARGE


def test_handshake_error_surfaces_as_typed_exception() -> None:
    """The client maps a handshake ERROR to its TidegateError subclass (checked with the codec directly)."""
    from tidegate.client.common import error_from_frame

    error = error_from_frame(f.Error(code=ErrorCode.UNSUPPORTED_VERSION, message="no"))
    assert isinstance(error, UnsupportedVersion) and error.code == ErrorCode.UNSUPPORTED_VERSION
    assert error_from_frame(f.Error(code=777, message="odd")).code == ErrorCode.INTERNAL
