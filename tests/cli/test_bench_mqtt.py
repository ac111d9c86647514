"""`tidegate bench mqtt` and `tidegate bench mqtt-conns`: smoke runs against a spawned broker, plus the fan-out
delivery check. Each run is a few seconds; the whole file stays well under 30 s."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

from tidegate.gateway.bench.delivery import check_fan_out
from tidegate.gateway.bench.mqtt import MAX_SCATTER_PIECES, send_pieces

RUN_TIMEOUT_S = 60


def bench(*argv: str) -> tuple[int, dict, str]:
    completed = subprocess.run([sys.executable, "-m", "tidegate.gateway", "bench", *argv, "--json"],
                               capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    report = json.loads(completed.stdout) if completed.stdout.strip() else {}
    return completed.returncode, report, completed.stderr


def test_check_fan_out_counts_per_subscriber_deliveries() -> None:
    acked = {0: (0b1111).to_bytes(1, "little")}
    everything, missing_one = {0: (0b1111).to_bytes(1, "little")}, {0: (0b0111).to_bytes(1, "little")}
    result = check_fan_out(acked, [everything, missing_one], local_duplicates=0)
    assert (result.acked, result.unique, result.lost, result.duplicated) == (8, 7, 1, 0)


def test_bench_mqtt_qos1_with_a_spawned_broker_loses_and_duplicates_nothing() -> None:
    code, report, stderr = bench("mqtt", "--spawn-broker", "--duration", "2", "--rate", "200", "--qos", "1")
    assert code == 0, stderr
    assert report["errors"] == []
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["acked"] == report["received"] > 200  # 2 s at 200 msg/s, one subscriber
    assert report["options"]["qos"] == 1 and report["options"]["broker_flush"] == "sync"
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]


def test_bench_mqtt_qos1_with_64_kib_payloads_sent_as_pieces_loses_and_duplicates_nothing() -> None:
    """Large payloads take the publisher's scatter path (head + shared padding per message, sendmsg) and the
    subscriber's large reads; every acknowledged message arrives once."""
    code, report, stderr = bench("mqtt", "--spawn-broker", "--duration", "1", "--qos", "1", "--size", "65536",
                                 "--inflight", "16")
    assert code == 0, stderr
    assert report["errors"] == [] and report["lost"] == 0 and report["duplicated"] == 0
    assert report["acked"] == report["received"] > 0


def test_send_pieces_sends_the_concatenation_in_order_across_many_pieces_and_partial_sends() -> None:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.settimeout(10)  # with a timeout Python sends without blocking: sendmsg returns partial counts
    pieces = [bytes([n % 256]) * (1 + n % 300) for n in range(MAX_SCATTER_PIECES * 2 + 7)]
    expected = b"".join(pieces)
    received = bytearray()

    def read_all() -> None:
        while len(received) < len(expected):
            received.extend(peer.recv(1 << 16))

    reader = threading.Thread(target=read_all)
    reader.start()
    send_pieces(ours, pieces)
    reader.join(10)
    ours.close()
    peer.close()
    assert bytes(received) == expected


def test_bench_mqtt_conns_opens_idle_connections_and_reads_broker_memory() -> None:
    code, report, stderr = bench("mqtt-conns", "--spawn-broker", "--count", "50", "--hold", "0.5")
    assert code == 0, stderr
    assert report["connected"] == 50 and report["errors"] == []
    assert report["broker_rss_kib_before"] > 0 and report["broker_rss_kib_after"] > 0
    assert report["broker_bytes_per_connection"] is not None
    assert report["connect_ms"]["count"] == 50 and report["connect_ms"]["p99"] > 0
