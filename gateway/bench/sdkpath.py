"""The load generator's own CPU per message: the Python SDK's native hot path, in one process, without a broker.

`python -m tidegate.gateway.bench.sdkpath [--messages N] [--batch K] [--repeat R]` drives the SDK objects
`tidegate bench native` uses, with the socket replaced by a sink and the broker's answers pre-encoded:

- producer, one at a time: `Producer.send_async` (plus the bench's payload and send window), then the SEND_OK
  answers through the connection's codec and reader dispatch to the callbacks;
- producer, batches of K: `Producer.send_batch_async`, then the SEND_BATCH_OK answers;
- consumer: DELIVER frames of 64 stored messages through the codec, the reader dispatch and a `PushConsumer`'s
  worker (handler = the bench's tally), with its commits and credit.

It reports `time.process_time` per message for each part. Why: with the broker at ~20 µs per message, the SDK
processes of `tidegate bench native` must stay well below that or they, not the broker, set the measured rate;
on a shared 2-core machine this is the number that can be compared run to run (`hotpath.py` does the same for the
broker). The writer thread, the socket and the kernel are left out.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from tidegate.gateway.bench.arguments import at_least

BODY_SIZE = 256
MSG_ID = "0A0B0C0D0E0F00010002000300040005"  # the shape of a broker message id
DELIVER_SIZE = 64  # messages per DELIVER, as the broker sends them to a consumer with credit


class _NullSocket:
    def sendall(self, data: bytes) -> None:
        pass


class _Answer:
    """What the broker's SEND_OK encoder reads from a core result and from a request."""

    __slots__ = ("msg_id", "topic", "queue_id", "queue_offset", "flags", "request_id")

    def __init__(self, request_id: int, offset: int) -> None:
        self.msg_id, self.topic, self.queue_id, self.queue_offset = MSG_ID, "bench", offset % 8, offset
        self.flags, self.request_id = 0, request_id


def _open(conn: Any) -> Any:
    """An SDK connection past its handshake, writing into a sink (no reader or writer thread)."""
    from tidegate.adapters.native.codec import State

    conn._sock = _NullSocket()
    conn.codec.state = State.OPEN
    return conn


def run_producer(messages: int, batch: int) -> tuple[float, float]:
    """(send CPU, answer CPU) in seconds for `messages` sends, one at a time or in batches of `batch`."""
    from tidegate.adapters.native.codec import SEND_OK_TYPE, encode_send_batch_ok
    from tidegate.adapters.native.fastpath import encode_send_oks
    from tidegate.client import Producer
    from tidegate.client.connection import Connection
    from tidegate.gateway.bench.delivery import MIN_SIZE, ProducerTally, encode_payload
    from tidegate.gateway.bench.native import NativeDriver, SendWindow

    producer = Producer("127.0.0.1:1")
    conn = producer._conn = _open(Connection("127.0.0.1:1"))
    tally = ProducerTally()
    window = SendWindow(messages + 1)
    padding = b"\x00" * (BODY_SIZE - MIN_SIZE)
    requests = max(1, messages // batch)
    started = time.process_time()
    for i in range(requests):
        window.acquire(1.0)
        seq = i * batch
        if batch == 1:
            producer.send_async("bench", encode_payload(0, seq, padding),
                                NativeDriver._on_sent(tally, window, seq, 1, 0))
        else:
            producer.send_batch_async("bench", [encode_payload(0, s, padding) for s in range(seq, seq + batch)],
                                      NativeDriver._on_sent(tally, window, seq, batch, 0))
        if len(conn._out) >= 256:  # what the writer thread takes away
            conn._out.clear()
            conn._out_bytes = 0
    send_cpu = time.process_time() - started
    first_id = 1
    if batch == 1:
        answers = [_Answer(first_id + i, i) for i in range(requests)]
        reads = [encode_send_oks(SEND_OK_TYPE, answers[i:i + 64], answers[i:i + 64], 1)
                 for i in range(0, requests, 64)]
    else:
        reads = [encode_send_batch_ok(first_id + i, [_Answer(0, i * batch + j) for j in range(batch)])
                 for i in range(requests)]
    started = time.process_time()
    for data in reads:
        conn._handle(conn.codec.receive_data(data))
    answer_cpu = time.process_time() - started
    if tally.acked != requests * batch:
        raise SystemExit(f"the producer saw {tally.acked} of {requests * batch} sends answered")
    return send_cpu, answer_cpu


def run_consumer(messages: int) -> float:
    """CPU seconds for `messages` delivered messages through the codec, the reader and a PushConsumer."""
    from tidegate.adapters.native.codec import encode_deliver
    from tidegate.client import PushConsumer
    from tidegate.client.blocking import _STOP
    from tidegate.client.connection import Connection
    from tidegate.core.api import Delivered
    from tidegate.core.model import Message, QueueRef
    from tidegate.gateway.bench.delivery import MIN_SIZE, ConsumerTally, encode_payload

    tally = ConsumerTally()
    consumer = PushConsumer("bench", "bench", lambda d: tally.record(d.message.body), credit=2048)
    conn = consumer._conn = _open(Connection("127.0.0.1:1", core_deliveries=True))
    consumer.subscription_id = 1
    conn._push_handlers[1] = consumer._on_push
    padding = b"\x00" * (BODY_SIZE - MIN_SIZE)
    delivered = [Delivered(Message("bench", encode_payload(0, i, padding), born_ts=1, msg_id=MSG_ID, store_ts=1),
                           QueueRef("bench", i % 8), i) for i in range(messages)]
    reads = [encode_deliver(1, delivered[i:i + DELIVER_SIZE]) for i in range(0, messages, DELIVER_SIZE)]
    started = time.process_time()
    for data in reads:
        conn._handle(conn.codec.receive_data(data))
    consumer._inbox.put(_STOP)
    consumer._work()  # inline: the worker thread's loop, until the stop marker
    cpu = time.process_time() - started
    if tally.received != messages:
        raise SystemExit(f"the consumer got {tally.received} of {messages} messages")
    return cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidegate.gateway.bench.sdkpath",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=at_least(1), default=20_000)
    parser.add_argument("--batch", type=at_least(1), default=1, help="messages per SEND_BATCH; 1 = send_async")
    parser.add_argument("--repeat", type=at_least(1), default=3, help="runs; the report gives the minimum (3)")
    args = parser.parse_args(argv)
    sends, answers, consumes = [], [], []
    for _ in range(args.repeat):
        send_cpu, answer_cpu = run_producer(args.messages, args.batch)
        sends.append(send_cpu * 1e6 / args.messages)
        answers.append(answer_cpu * 1e6 / args.messages)
        consumes.append(run_consumer(args.messages) * 1e6 / args.messages)
    print(f"sdk (batch {args.batch}): producer {min(sends):.1f} µs send + {min(answers):.1f} µs answer, consumer "
          f"{min(consumes):.1f} µs per message (min of {args.repeat} runs of {args.messages})")


if __name__ == "__main__":
    main()
