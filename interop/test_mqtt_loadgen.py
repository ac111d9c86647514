"""The C MQTT load generator (interop/loadgen/mqtt_loadgen.c) against a real `tidegate serve`: it builds, its runs
are lossless against Tidegate, and its JSON report has what bench_mqtt_compare.py reads (counts, rates, latency
percentiles, the generator's own CPU time)."""

from __future__ import annotations

import json
import subprocess

RUN_TIMEOUT_S = 60  # a 1-second run plus the drain, with plenty of room on a loaded machine


def run_loadgen(binary, broker, *args: str) -> tuple[int, dict]:
    host, port = broker.host_port("mqtt")
    done = subprocess.run([str(binary), "--host", host, "--port", str(port), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.stdout.strip(), f"no report (exit {done.returncode}): {done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_qos1_one_to_one_for_one_second_loses_nothing(broker, mqtt_loadgen):
    """1 publisher -> 1 subscriber at QoS 1, max rate for 1 s: every publish is PUBACKed and received exactly once."""
    code, report = run_loadgen(mqtt_loadgen, broker, "--qos", "1", "--duration", "1")
    assert code == 0, report["errors"]
    assert report["errors"] == []
    assert report["sent"] > 0
    assert report["acked"] == report["sent"] == report["received"]
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["foreign"] == 0
    assert report["publish_msgs_per_s"] > 0 and report["receive_msgs_per_s"] > 0
    assert report["ack_latency_ms"]["count"] == report["acked"]
    assert report["latency_ms"]["count"] == report["received"]
    assert report["client_cpu_s"]["total"] >= 0 and report["client_wall_s"] > 0


def test_paced_qos0_fan_out_reports_latency_percentiles_per_delivery(broker, mqtt_loadgen):
    """2 publishers -> 2 subscribers at QoS 0, paced at 200 msg/s: each subscriber gets every message (each delivery
    timed: p50 <= p99 <= p999 <= max), and the paced rate is kept roughly."""
    code, report = run_loadgen(mqtt_loadgen, broker, "--qos", "0", "--publishers", "2", "--subscribers", "2",
                               "--rate", "200", "--duration", "1", "--size", "100")
    assert code == 0, report["errors"]
    assert report["received"] == 2 * report["sent"]
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert 100 <= report["sent"] <= 260
    latency = report["latency_ms"]
    assert latency["count"] == report["received"]
    assert 0 <= latency["p50"] <= latency["p99"] <= latency["p999"] <= latency["max"]
    assert report["options"] == report["options"] | {"qos": 0, "publishers": 2, "subscribers": 2, "size": 100}


def test_payloads_smaller_than_the_sequence_header_are_refused(broker, mqtt_loadgen):
    """--size below the 24-byte payload header (magic, publisher, sequence, timestamp) is a usage error (exit 2)."""
    host, port = broker.host_port("mqtt")
    done = subprocess.run([str(mqtt_loadgen), "--port", str(port), "--size", "10"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 2
    assert "at least 24" in done.stderr


def test_max_drain_cuts_the_wait_short_and_says_so(broker, mqtt_loadgen):
    """--max-drain 0: the run stops right after publishing, with QoS 1 publishes still in flight (a window of 100 at
    max rate against fsync'd PUBACKs), and reports that as an error (exit 1) instead of waiting for them."""
    code, report = run_loadgen(mqtt_loadgen, broker, "--qos", "1", "--duration", "0.5", "--max-drain", "0")
    assert code == 1
    assert any("--max-drain" in error for error in report["errors"]), report["errors"]
    assert report["options"]["max_drain"] == 0
