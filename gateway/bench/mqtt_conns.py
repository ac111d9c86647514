"""`tidegate bench mqtt-conns`: open N idle MQTT connections (CONNECT + CONNACK, keep alive 600) from a few client
processes, and report connect time and the broker's resident memory growth per connection (VmRSS from
/proc/<pid>/status).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time
import uuid
from typing import Any

from .arguments import EXIT_FAILURE, EXIT_OK, BenchCommand, at_least
from .arguments import progress as stderr_progress
from .broker import MqttTarget, add_mqtt_target_options
from .driver import BenchError
from .latency import BenchLatencies, merged
from .mqtt_client import IDLE_KEEP_ALIVE, MqttClient


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (a spawned broker, client processes) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def read_rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop_workers(workers: list[Any], release: Any) -> None:
    """Let the connection workers close their clients and end; terminate any that hang."""
    release.set()
    for worker in workers:
        worker.join(60)
        if worker.is_alive():
            worker.terminate()


def _conns_worker(server: str, level: int, prefix: str, indices: range, results: Any, release: Any) -> None:
    """Open one connection after the other, report, hold them until `release`, close."""
    raise_fd_limit()
    connect_latency = BenchLatencies()
    clients: list[MqttClient] = []
    error = ""
    started = time.monotonic()
    try:
        for i in indices:
            t0 = time.perf_counter_ns()
            clients.append(MqttClient(server, f"{prefix}-{i}", level, keep_alive=IDLE_KEEP_ALIVE))
            connect_latency.record((time.perf_counter_ns() - t0) // 1000)
    except (OSError, BenchError, TimeoutError) as exc:
        error = f"connection {len(clients) + indices.start} of this worker failed: {type(exc).__name__}: {exc}"
    results.put({"connected": len(clients), "seconds": time.monotonic() - started, "error": error,
                 "latency": connect_latency.to_state()})
    release.wait(600)
    for client in clients:
        client.sock.close()  # no DISCONNECT: 10,000 of them would only add load; a close is what idle clients do


def run_conns(server: str, count: int, *, broker_pid: int = 0, processes: int = 0, level: int = 4,
              hold: float = 2.0, progress: Any = stderr_progress) -> dict[str, Any]:
    limit = raise_fd_limit()
    processes = processes or max(2, -(-count // 2500))
    processes = min(processes, count)
    per_process = -(-count // processes)
    if per_process + 64 > limit:
        raise BenchError(f"{per_process} connections per process exceed the file-descriptor limit {limit}: "
                         "use more --processes")
    mp = multiprocessing.get_context("spawn")
    results, release = mp.Queue(), mp.Event()
    prefix = f"bench-idle-{uuid.uuid4().hex[:8]}"
    load_before = os.getloadavg()[0]
    rss_before = read_rss_kib(broker_pid) if broker_pid else 0
    workers = []
    for p in range(processes):
        indices = range(p * per_process, min(count, (p + 1) * per_process))
        worker = mp.Process(target=_conns_worker, args=(server, level, prefix, indices, results, release),
                            daemon=True)
        worker.start()
        workers.append(worker)
    reports = []
    try:
        deadline = time.monotonic() + 600
        while len(reports) < processes:
            try:
                reports.append(results.get(timeout=1.0))
            except Exception:  # queue.Empty
                if not any(w.is_alive() for w in workers) or time.monotonic() > deadline:
                    raise BenchError("connection workers ended without reporting") from None
        # Each worker timed its own connect loop (its interpreter's start-up is not connect time).
        total_s = max(r["seconds"] for r in reports)
        connected = sum(r["connected"] for r in reports)
        progress(f"{connected} connections open after {total_s:.1f}s; holding {hold}s")
        time.sleep(hold)  # let the broker settle (deferred allocations, timers) before reading its memory
        rss_after = read_rss_kib(broker_pid) if broker_pid else 0
    finally:
        stop_workers(workers, release)
    latency = merged([r["latency"] for r in reports])
    errors = [r["error"] for r in reports if r["error"]]
    growth = rss_after - rss_before
    return {
        "protocol": "mqtt-conns", "server": server, "count": count, "connected": connected,
        "processes": processes, "protocol_level": level,
        "connect_seconds_total": round(total_s, 3),
        "connects_per_s": round(connected / total_s) if total_s else 0,
        "connect_ms": latency.summary_ms(),
        "broker_pid": broker_pid or None,
        "broker_rss_kib_before": rss_before or None, "broker_rss_kib_after": rss_after or None,
        "broker_rss_growth_kib": growth if broker_pid else None,
        "broker_bytes_per_connection": round(growth * 1024 / connected) if broker_pid and connected else None,
        "errors": errors,
        "machine": {"cpus": os.cpu_count(), "loadavg_before": round(load_before, 2)},
    }


def run_conns_command(args: argparse.Namespace) -> int:
    raise_fd_limit()  # before spawning the broker, so that it inherits the raised limit
    try:
        with MqttTarget(args) as (server, pid):
            if args.spawn_broker:
                stderr_progress(f"spawned broker (flush={args.flush}) with MQTT on {server}, pid {pid}")
                time.sleep(1.0)  # let the fresh broker finish starting before the baseline RSS
            report = run_conns(server, args.count, broker_pid=pid or args.broker_pid, processes=args.processes,
                               level=args.protocol_level, hold=args.hold)
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        lat = report["connect_ms"]
        per = report["broker_bytes_per_connection"]
        sys.stdout.write(
            f"tidegate bench mqtt-conns: {report['connected']}/{report['count']} connections in "
            f"{report['connect_seconds_total']}s ({report['connects_per_s']}/s, {report['processes']} client "
            f"processes)\n  connect ms: p50 {lat['p50']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}\n"
            f"  broker RSS: {report['broker_rss_kib_before']} KiB -> {report['broker_rss_kib_after']} KiB, "
            f"{'unknown (no --broker-pid)' if per is None else f'{per} bytes'} per connection\n"
            + "".join(f"  error: {e}\n" for e in report["errors"]))
    return EXIT_FAILURE if report["errors"] or report["connected"] < report["count"] else EXIT_OK



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mqtt_target_options(parser)
    parser.add_argument("--count", type=at_least(1), default=10_000, metavar="N", help="connections (10000)")
    parser.add_argument("--processes", type=at_least(1), default=0, metavar="P",
                        help="client processes opening connections in parallel (default: 1 per 2,500, at least 2)")
    parser.add_argument("--broker-pid", type=int, default=0, metavar="PID",
                        help="broker process whose VmRSS is read before and after (taken from --spawn-broker)")
    parser.add_argument("--protocol", dest="protocol_level", type=int, choices=(4, 5), default=4,
                        help="MQTT protocol level (4)")
    parser.add_argument("--hold", type=float, default=2.0, metavar="S",
                        help="seconds to keep every connection open before reading the broker's memory (2)")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")
    parser.set_defaults(protocol="mqtt")


COMMAND = BenchCommand("mqtt-conns", "open N idle MQTT connections: connect time, broker memory", add_arguments,
                       run_conns_command)
