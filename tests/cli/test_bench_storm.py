"""`tidegate bench mqtt-storm`: N MQTT connections opened at once against a spawned broker, time until every one is
CONNACKed; and persistent sessions resumed at once after a broker restart (Session Present on every CONNACK)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

RUN_TIMEOUT_S = 90


def bench(*argv: str) -> tuple[int, dict, str]:
    completed = subprocess.run([sys.executable, "-m", "tidegate.gateway", "bench", *argv, "--json"],
                               capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    report = json.loads(completed.stdout) if completed.stdout.strip() else {}
    return completed.returncode, report, completed.stderr


def test_storm_connects_every_client_and_reports_time_to_connack() -> None:
    code, report, stderr = bench("mqtt-storm", "--spawn-broker", "--count", "200", "--hold", "0")
    assert code == 0, stderr
    assert report["connected"] == 200 and report["failed"] == 0 and report["errors"] == []
    latency = report["connack_ms"]
    assert latency["count"] == 200
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert report["all_connacked_seconds"] >= latency["max"] / 1000 - 0.01  # the total covers the slowest
    assert report["sessions_present"] == 0 and not report["persistent"]
    assert report["broker_rss_kib_after"] > 0


def test_storm_reports_the_kernels_accept_queue_counters() -> None:
    """The report says how many SYNs the kernel dropped for a full accept queue during the storm, and the accept
    queue the broker's listener got (its backlog capped by net.core.somaxconn), where the machine can tell."""
    code, report, stderr = bench("mqtt-storm", "--spawn-broker", "--count", "50", "--hold", "0")
    assert code == 0, stderr
    somaxconn = report["machine"]["somaxconn"]
    if somaxconn is None:
        pytest.skip("no /proc/sys/net/core/somaxconn here")
    assert report["listen_overflows"] >= 0
    if report["listen_backlog"] is not None:  # `ss` is installed
        assert report["listen_backlog"] == somaxconn  # the default backlog asks for all the kernel allows


def test_storm_after_a_restart_resumes_every_persistent_session() -> None:
    code, report, stderr = bench("mqtt-storm", "--spawn-broker", "--count", "100", "--restart", "--hold", "0")
    assert code == 0, stderr
    assert report["prepared"]["connected"] == 100 and report["prepared"]["errors"] == []
    assert report["connected"] == 100 and report["persistent"]
    assert report["sessions_present"] == 100  # every session survived the restart
    assert report["broker_restart_seconds"] > 0


def test_restart_without_a_spawned_broker_is_refused_with_a_reason() -> None:
    code, _report, stderr = bench("mqtt-storm", "--server", "127.0.0.1:1", "--restart")
    assert code == 1
    assert "--restart needs --spawn-broker" in stderr
