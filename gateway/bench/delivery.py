"""What a bench message carries and how its delivery is checked: the payload header, per-worker tallies, and the
loss/duplicate check over per-producer sequence bitmaps.

Every message body starts with a fixed header (magic, producer index, sequence number, send time in ns since the
epoch), padded to --size. Consumers compute end-to-end latency from it (producer and consumers share the machine's
clock; against a remote --server the clocks must be synchronised) and mark the sequence in a bitmap per producer.
At the end the bitmaps are merged: a sequence acknowledged but never seen is lost, one seen twice is duplicated.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

from .latency import BenchLatencies

PAYLOAD_HEADER = struct.Struct("<4sIQQ")  # magic, producer index, sequence, send time (ns since the epoch)
PAYLOAD_MAGIC = b"TGB1"
MIN_SIZE = PAYLOAD_HEADER.size


def encode_payload(producer: int, seq: int, padding: bytes) -> bytes:
    return PAYLOAD_HEADER.pack(PAYLOAD_MAGIC, producer, seq, time.time_ns()) + padding


class SequenceBitmap:
    """One bit per sequence number, growing as needed. Serialised as bytes; bit `seq` of the little-endian integer
    is sequence `seq`, so merging is integer `|`, `&` and `bit_count`."""

    __slots__ = ("bits",)

    def __init__(self, data: bytes = b"") -> None:
        self.bits = bytearray(data)

    def add(self, seq: int) -> bool:
        """Mark `seq`; False if it was already marked (a duplicate)."""
        index = seq >> 3
        bits = self.bits
        if index >= len(bits):
            bits.extend(bytes(max(index + 1 - len(bits), len(bits))))
        mask = 1 << (seq & 7)
        if bits[index] & mask:
            return False
        bits[index] |= mask
        return True

    def as_int(self) -> int:
        return int.from_bytes(self.bits, "little")


@dataclass(slots=True)
class DeliveryCheck:
    """Loss and duplication over every producer's acknowledged set and every consumer's seen set."""

    acked: int = 0
    unique: int = 0
    lost: int = 0
    duplicated: int = 0
    received_unacked: int = 0  # seen but never acknowledged to the producer (a send that timed out yet was stored)


def check_delivery(acked: dict[int, bytes], seen_by_consumer: list[dict[int, bytes]],
                   local_duplicates: int) -> DeliveryCheck:
    result = DeliveryCheck(duplicated=local_duplicates)
    producers = set(acked) | {p for seen in seen_by_consumer for p in seen}
    for producer in producers:
        acked_set = int.from_bytes(acked.get(producer, b""), "little")
        union = 0
        for seen in seen_by_consumer:
            bits = int.from_bytes(seen.get(producer, b""), "little")
            result.duplicated += (union & bits).bit_count()  # the same message at two consumers
            union |= bits
        result.acked += acked_set.bit_count()
        result.unique += union.bit_count()
        result.lost += (acked_set & ~union).bit_count()
        result.received_unacked += (union & ~acked_set).bit_count()
    return result


def check_fan_out(acked: dict[int, bytes], seen_by_consumer: list[dict[int, bytes]],
                  local_duplicates: int) -> DeliveryCheck:
    """Like `check_delivery`, for consumers that each must see every message (MQTT non-shared subscribers):
    counts are deliveries, so a message one of three subscribers missed is one lost delivery."""
    result = DeliveryCheck(duplicated=local_duplicates)
    producers = set(acked) | {p for seen in seen_by_consumer for p in seen}
    for producer in producers:
        acked_set = int.from_bytes(acked.get(producer, b""), "little")
        result.acked += acked_set.bit_count() * len(seen_by_consumer)
        for seen in seen_by_consumer:
            bits = int.from_bytes(seen.get(producer, b""), "little")
            result.unique += bits.bit_count()
            result.lost += (acked_set & ~bits).bit_count()
            result.received_unacked += (bits & ~acked_set).bit_count()
    return result


class ConsumerTally:
    """What one consumer worker saw: latency, per-producer sequence bitmaps, duplicates, foreign messages."""

    def __init__(self) -> None:
        self.latency = BenchLatencies()
        self.seen: dict[int, SequenceBitmap] = {}
        self.received = 0
        self.duplicates = 0
        self.foreign = 0  # messages on the topic that no bench producer of this run wrote
        self.first_ns = 0
        self.last_ns = 0

    def record(self, body: bytes) -> None:
        now = time.time_ns()
        if len(body) < MIN_SIZE or body[:4] != PAYLOAD_MAGIC:
            self.foreign += 1
            return
        _, producer, seq, sent_ns = PAYLOAD_HEADER.unpack_from(body)
        self.received += 1
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        self.latency.record(max(0, now - sent_ns) // 1000)
        bitmap = self.seen.get(producer)
        if bitmap is None:
            bitmap = self.seen[producer] = SequenceBitmap()
        if not bitmap.add(seq):
            self.duplicates += 1

    def result(self) -> dict[str, Any]:
        return {"received": self.received, "duplicates": self.duplicates, "foreign": self.foreign,
                "first_ns": self.first_ns, "last_ns": self.last_ns, "latency": self.latency.to_state(),
                "seen": {p: bytes(b.bits) for p, b in self.seen.items()}}


class ProducerTally:
    """What one producer worker did: sent, acknowledged (bitmap), failed, ack latency."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.failed = 0
        self.acked_seqs = SequenceBitmap()
        self.ack_latency = BenchLatencies()
        self.first_error = ""
        self.first_ns = 0
        self.last_ack_ns = 0

    def on_acked(self, seq: int, count: int, sent_perf_ns: int) -> None:
        now = time.perf_counter_ns()
        for s in range(seq, seq + count):
            self.acked_seqs.add(s)
        self.acked += count
        self.ack_latency.record((now - sent_perf_ns) // 1000)
        self.last_ack_ns = time.time_ns()

    def on_failed(self, count: int, error: BaseException) -> None:
        self.failed += count
        if not self.first_error:
            self.first_error = f"{type(error).__name__}: {error}"

    def result(self) -> dict[str, Any]:
        return {"sent": self.sent, "acked": self.acked, "failed": self.failed, "first_error": self.first_error,
                "first_ns": self.first_ns, "last_ack_ns": self.last_ack_ns,
                "ack_latency": self.ack_latency.to_state(), "acked_seqs": bytes(self.acked_seqs.bits)}
