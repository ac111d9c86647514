#!/usr/bin/env python3
"""Tidegate's AMQP side against RabbitMQ: the same `tidegate bench amqp` scenarios, back to back.

A script, not a test (pytest does not collect it). Run from the repository, with Debian's rabbitmq-server installed:

    .venv/bin/python interop/bench_amqp_compare.py [--duration 5] [--out DIR]

For every scenario both brokers run in turn: Tidegate through `--spawn-broker` (default sync flush: a confirm means
on disk), RabbitMQ started here as its own node (`tgbench@localhost`) on free 127.0.0.1 ports with a temporary
data directory, and stopped afterwards by its PID (and the epmd it started, by PID). RabbitMQ 3.x classic queues
fsync persistent messages before confirming them as well.

Scenarios (issue 8): transient 1→1 at max rate; persistent with confirms (window 256) and manual acks; fan-out to 10
queues; latency at 1,000 msg/s persistent. Prints a Markdown table and writes results.json/results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PYTHON = sys.executable
RABBITMQ = "/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8/sbin/rabbitmq-server"
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 300

SCENARIOS = [
    ("transient 1→1, max rate", []),
    ("persistent, confirms (256), manual acks", ["--persistent", "--confirm", "256"]),
    ("fan-out to 10 queues", ["--fanout", "--consumers", "10"]),
    ("persistent at 1,000 msg/s", ["--persistent", "--confirm", "256", "--rate", "1000"]),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RabbitMQ:
    """A RabbitMQ node of our own: temporary directories, free ports, stopped by PID."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tidegate-rabbit-"))
        self.dir.chmod(0o777)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.epmd_before = self._epmd_pids()

    @staticmethod
    def _epmd_pids() -> set[int]:
        found = subprocess.run(["pgrep", "-x", "epmd"], capture_output=True, text=True).stdout.split()
        return {int(pid) for pid in found}

    def start(self) -> str:
        (self.dir / "rabbitmq.conf").write_text("loopback_users = none\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        env = {**os.environ, "HOME": str(self.dir), "RABBITMQ_NODENAME": "tgbench@localhost",
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
               "RABBITMQ_LOG_BASE": str(self.dir / "log"), "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"), "ERL_EPMD_ADDRESS": "127.0.0.1"}
        log = (self.dir / "out.log").open("wb")
        self.process = subprocess.Popen([RABBITMQ], env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"completed with" not in (self.dir / "out.log").read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("RabbitMQ did not start:\n" + (self.dir / "out.log").read_text()[-2000:])
            time.sleep(0.2)  # polling a log file for the start-up line
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the node and the children of its session, by its id
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=60)
        for pid in self._epmd_pids() - self.epmd_before:
            os.kill(pid, signal.SIGTERM)  # the epmd this node started
        shutil.rmtree(self.dir, ignore_errors=True)


def bench(target: list[str], scenario: list[str], duration: float) -> dict[str, Any]:
    command = [PYTHON, "-m", "tidegate.gateway", "bench", "amqp", *target, "--duration", str(duration), "--json",
               *scenario]
    done = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT_S)
    if done.returncode not in (0, 1) or not done.stdout:
        return {"errors": [done.stderr.decode(errors="replace")[-500:]]}
    return json.loads(done.stdout)


def row(name: str, tidegate: dict[str, Any], rabbit: dict[str, Any]) -> str:
    def cell(report: dict[str, Any]) -> str:
        if "produce_msgs_per_s" not in report:
            return "did not run: " + "; ".join(report.get("errors", []))[:80]
        lat = report.get("latency_ms", {})
        text = (f"{report['produce_msgs_per_s']} / {report['deliveries_per_s']} msg/s, "
                f"p50 {lat.get('p50')} p99 {lat.get('p99')} ms")
        if report.get("errors"):
            text += " (" + "; ".join(report["errors"]) + ")"
        return text

    return f"| {name} | {cell(tidegate)} | {cell(rabbit)} |"


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """throughput.svg (deliveries per second per scenario, Tidegate beside RabbitMQ) and latency.svg (p50/p99 of
    each scenario) next to results.json."""
    from tidegate.gateway.bench.plot import bar_chart_svg, write_svg

    names = list(results)
    brokers = ("tidegate", "rabbitmq")
    rates = {b: [results[n][b].get("deliveries_per_s") for n in names] for b in brokers}
    latency = {f"{b} {p}": [results[n][b].get("latency_ms", {}).get(p) for n in names]
               for b in brokers for p in ("p50", "p99")}
    return [write_svg(out / "throughput.svg", bar_chart_svg("AMQP: deliveries per second", "msg/s", names, rates)),
            write_svg(out / "latency.svg", bar_chart_svg("AMQP: end-to-end latency", "ms", names, latency))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if not Path(RABBITMQ).exists():
        print(f"rabbitmq-server not found at {RABBITMQ} (apt-get install rabbitmq-server)", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    lines = ["| scenario | Tidegate (publish / deliveries, end-to-end latency) | RabbitMQ |", "|---|---|---|"]
    for name, scenario in SCENARIOS:
        tidegate = bench(["--spawn-broker"], scenario, args.duration)
        rabbit_node = RabbitMQ()
        try:
            rabbit = bench(["--server", rabbit_node.start()], scenario, args.duration)
        finally:
            rabbit_node.stop()
        results[name] = {"tidegate": tidegate, "rabbitmq": rabbit}
        lines.append(row(name, tidegate, rabbit))
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "results.md").write_text(table)
        write_plots(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
