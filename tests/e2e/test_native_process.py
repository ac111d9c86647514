"""End to end: the real `tidegate serve` process, the blocking SDK over loopback, crash and rebalance behaviour."""

from __future__ import annotations

import threading

import pytest

from tidegate.adapters.native.errors import ErrorCode
from tidegate.client import Admin, Producer, PullConsumer, PushConsumer
from tidegate.core.errors import TidegateError
from tidegate.gateway.testing import BrokerProcess, wait_until

TINY_SEGMENTS = ("--set", "storage.segment_bytes=65536", "--set", "broker.max_message_bytes=16384",
                 "--set", "storage.index_entries_per_file=256")


@pytest.fixture
def broker(tmp_path):
    with BrokerProcess(tmp_path / "data", *TINY_SEGMENTS) as process:
        yield process


def pull_all(address: str, topic: str, queues: int) -> list:
    out = []
    with PullConsumer("verify", address=address) as consumer:
        for qid in range(queues):
            offset = 0
            while True:
                result = consumer.pull(topic, qid, offset, max=256)
                if not result.messages:
                    break
                out.extend(result.messages)
                offset = result.next_offset
    return out


def test_send_then_push_consume_with_every_field(broker):
    with Admin(address=broker.native) as admin:
        admin.create_topic("orders", queues=2)
    got: list = []
    lock = threading.Lock()

    def handler(delivered):
        with lock:
            got.append(delivered.message)

    with PushConsumer("g1", "orders", handler, address=broker.native, start="earliest"), \
            Producer(address=broker.native) as producer:
        result = producer.send("orders", b"hello", tag="new", keys=("order-1",), properties={"k": "v"},
                               subject="eu/paris")
        assert result.msg_id and result.queue_id in (0, 1)
        wait_until(lambda: len(got) == 1, 20, "the pushed message")
    [message] = got
    assert (message.body, message.tag, message.keys, message.properties["k"], message.subject) == (
        b"hello", "new", ("order-1",), "v", "eu/paris")
    assert message.msg_id == result.msg_id


def test_bad_input_gets_error_codes_not_disconnects(broker):
    with Producer(address=broker.native) as producer:
        with pytest.raises(TidegateError) as bad_name:
            producer.send("bad topic!", b"x")
        assert bad_name.value.code == ErrorCode.INVALID_NAME
        with pytest.raises(TidegateError) as too_big:
            producer.send("t", b"x" * 20000)
        assert too_big.value.code in (ErrorCode.MESSAGE_TOO_LARGE, ErrorCode.FRAME_TOO_LARGE)
        assert producer.send("t", b"still connected").msg_id  # the connection survived


def test_kill_9_keeps_every_acknowledged_message(tmp_path):
    """Sync flush (the default): every send acknowledged before kill -9 is there after restart, uncorrupted."""
    process = BrokerProcess(tmp_path / "data", *TINY_SEGMENTS).start()
    acked: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    try:
        with Admin(address=process.native) as admin:
            admin.create_topic("crash", queues=3)
        producer = Producer(address=process.native, timeout=5).start()

        def on_result(result_or_error):
            with lock:
                if isinstance(result_or_error, BaseException):
                    errors.append(result_or_error)
                else:
                    acked.append(result_or_error.msg_id)

        def produce():
            for i in range(20000):
                try:
                    producer.send_async("crash", b"m%05d" % i + b"." * 200, on_result)
                except TidegateError:
                    return  # the broker is gone
        sender = threading.Thread(target=produce, daemon=True)
        sender.start()
        wait_until(lambda: len(acked) >= 1500, 60, "1500 acknowledged sends", process.process, process.log_path)
        process.kill()  # mid-stream, with sends in flight
        sender.join(timeout=30)
        producer.close()
    finally:
        process.kill()
    with lock:
        acknowledged = set(acked)
    assert len(acknowledged) >= 1500
    process.start()
    try:
        stored = {d.message.msg_id for d in pull_all(process.native, "crash", 3)}
        assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged messages lost"
        assert "recover" in process.log().lower()
    finally:
        process.stop()


def test_clean_restart_keeps_topics_messages_and_offsets(tmp_path):
    process = BrokerProcess(tmp_path / "data", *TINY_SEGMENTS).start()
    try:
        with Producer(address=process.native) as producer:
            for i in range(50):
                producer.send("keep", b"%d" % i)
        with PullConsumer("g", address=process.native) as consumer:
            consumer.commit("keep", 0, 5)
    finally:
        assert process.stop() == 0
    process.start()
    try:
        with Admin(address=process.native) as admin:
            assert "keep" in [t.name for t in admin.list_topics()]
            description = admin.describe_group("g")
            assert any(p.committed == 5 for p in description.progress)
        assert len(pull_all(process.native, "keep", 4)) == 50
    finally:
        process.stop()


def test_consumer_group_rebalance_loses_nothing(broker):
    """Members join and leave while messages flow: every message is consumed, the group ends with no lag."""
    with Admin(address=broker.native) as admin:
        admin.create_topic("jobs", queues=4)
    seen: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def handler_for(name):
        def handle(delivered):
            with lock:
                seen.setdefault(name, []).append(delivered.message.body)
        return handle

    def all_bodies():
        with lock:
            return {b for bodies in seen.values() for b in bodies}

    first = PushConsumer("workers", "jobs", handler_for("a"), address=broker.native, start="earliest").start()
    second = PushConsumer("workers", "jobs", handler_for("b"), address=broker.native).start()
    wait_until(lambda: len(first.assigned) == 2 and len(second.assigned) == 2, 20, "two members with 2 queues each")
    expected = {b"job-%d" % i for i in range(400)}
    with Producer(address=broker.native) as producer:
        for i in range(200):
            producer.send("jobs", b"job-%d" % i)
        third = PushConsumer("workers", "jobs", handler_for("c"), address=broker.native).start()
        second.close()
        for i in range(200, 400):
            producer.send("jobs", b"job-%d" % i)
    wait_until(lambda: all_bodies() >= expected, 30, "every job consumed")
    wait_until(lambda: sorted(len(c.assigned) for c in (first, third)) == [2, 2], 20, "queues rebalanced")
    first.close()
    third.close()
    with Admin(address=broker.native) as admin:
        wait_until(lambda: admin.describe_group("workers").lag == 0, 20, "the group to have no lag")
    assert set(seen) == {"a", "b", "c"} or set(seen) >= {"a", "c"}
