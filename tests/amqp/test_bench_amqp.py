"""`tidegate bench amqp` end to end against a spawned broker: a short run loses and duplicates nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("flags", [
    pytest.param([], id="transient"),
    pytest.param(["--persistent", "--confirm", "64", "--fanout", "--consumers", "2"], id="persistent-confirm-fanout"),
])
def test_bench_amqp_run_delivers_every_acknowledged_message_once(flags):
    result = subprocess.run(
        [sys.executable, "-m", "tidegate.gateway", "bench", "amqp", "--spawn-broker", "--duration", "1",
         "--json", *flags], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout)
    assert report["acked"] > 0 and report["lost"] == 0 and report["duplicated"] == 0
    assert report["received"] == report["acked"] * report["copies"]
