"""Timing script for the AMQP codec (not a test): `python tests/amqp/bench_codec.py [count]`.

Prints microseconds per Basic.Publish decoded (method, content header and one body frame; one publish per read and 64
per read) and per Basic.Deliver encoded (properties as a pamqp object and as the raw bytes a publish carried), next to
pamqp's own generic frame functions doing the same work, so the fast path's share is visible.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from tidegate.adapters.amqp.codec import PROTOCOL_HEADER, AmqpClientCodec, AmqpServerCodec

PROPERTIES = commands.Basic.Properties(content_type="application/json", delivery_mode=2, message_id="m-0001")
BODY = b"x" * 256


ROUNDS = 5


def timed(label: str, count: int, action: Callable[[], object], per_call: int = 1) -> None:
    """Best of ROUNDS rounds: on a shared machine the fastest round is the one least disturbed by other work."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(count):
            action()
        best = min(best, time.perf_counter() - start)
    n = count * per_call
    print(f"{label:<52} {best / n * 1e6:6.2f} us  {n / best:10,.0f} /s")


def main(count: int) -> None:
    # A pure-Python yardstick: the numbers below scale with it from one machine (or one load) to another.
    timed("calibration: sum(range(1000))", count // 10, lambda: sum(range(1000)))
    publish = commands.Basic.Publish(exchange="amq.topic", routing_key="orders.eu.created", mandatory=False)
    publish_bytes = AmqpClientCodec().send_content(1, publish, PROPERTIES, BODY)
    server = AmqpServerCodec()
    server.receive_data(PROTOCOL_HEADER)
    timed("decode publish, 1 per read (codec)", count, lambda: server.receive_data(publish_bytes))
    batch = publish_bytes * 64
    timed("decode publish, 64 per read (codec)", count // 64, lambda: server.receive_data(batch), 64)

    def pamqp_decode() -> None:
        offset = 0
        for _ in range(3):
            consumed, _channel, _frame = frame.unmarshal(publish_bytes[offset:])
            offset += consumed

    timed("decode publish (pamqp.frame.unmarshal x3, reference)", count, pamqp_decode)

    deliver = commands.Basic.Deliver("ctag-1", 1, False, "amq.topic", "orders.eu.created")
    [published] = server.receive_data(publish_bytes)
    raw_properties = published.raw_properties
    timed("encode deliver, Properties object (codec)", count, lambda: server.send_content(1, deliver, PROPERTIES, BODY))
    timed("encode deliver, raw properties (codec)", count,
          lambda: server.send_content(1, deliver, raw_properties, BODY))  # fmt: skip

    def pamqp_encode() -> bytes:
        return b"".join((
            frame.marshal(deliver, 1),
            frame.marshal(header.ContentHeader(0, len(BODY), PROPERTIES), 1),
            frame.marshal(pamqp_body.ContentBody(BODY), 1),
        ))  # fmt: skip

    timed("encode deliver (pamqp.frame.marshal x3, reference)", count, pamqp_encode)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
