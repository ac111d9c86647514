"""`tidegate bench mqtt-storm`: a reconnect storm. N MQTT connections are opened at the same instant and the time
until each is CONNACKed is reported (per connection p50/p99/max, and the total until the last one).

How: a few client processes each prebuild their CONNECT packets, then wait on one start signal; at the signal each
opens all its sockets non-blocking (connect, CONNECT on writable, CONNACK on readable) through one epoll loop, so
the broker sees the whole storm at once, as after a network blip or a broker restart. Times are measured from the
common start on the system-wide monotonic clock, so they include refused SYNs and their retransmissions (what an
accept backlog that is too small costs).

Persistent sessions: `--persistent` connects with CleanSession=0 under stable client ids (`--client-prefix`);
`--prepare` then subscribes each client to its own filter (QoS 1) and disconnects, leaving N stored sessions;
`--restart` (with `--spawn-broker`) does the whole cycle itself: prepare, restart the broker on the same data
directory, storm, and counts the CONNACKs with Session Present set.
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import selectors
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

from .arguments import EXIT_FAILURE, EXIT_OK, BenchCommand, at_least
from .arguments import progress as stderr_progress
from .broker import MqttTarget, add_mqtt_target_options
from .driver import BenchError
from .latency import BenchLatencies, merged
from .mqtt_client import IDLE_KEEP_ALIVE, split_address
from .mqtt_conns import raise_fd_limit, read_rss_kib, stop_workers

CONNACK = 0x20
SUBACK = 0x90
STORM_TIMEOUT_S = 120.0
PER_PROCESS = 2500  # connections one client process opens by default
MAX_ERRORS_KEPT = 5

CONNECTING, WAIT_CONNACK, WAIT_SUBACK, DONE = range(4)


def read_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (0.0 if unknown): on a shared machine the broker's CPU per
    connection is steadier than wall time."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def storm_filter(client_id: str) -> str:
    return f"bench/storm/{client_id}"


def _client_packets(client_ids: list[str], level: int, clean: bool, subscribe: bool) -> list[tuple[bytes, bytes]]:
    """(CONNECT, SUBSCRIBE or b"") per client, encoded once before the storm by our own codec."""
    from tidegate.adapters.mqtt.codec import Connect, MqttCodec, Subscribe, TopicSubscription

    codec = MqttCodec(server_side=False)
    out = []
    for client_id in client_ids:
        connect = codec.encode(Connect(client_id, protocol_level=level, clean_start=clean, keep_alive=IDLE_KEEP_ALIVE))
        sub = codec.encode(Subscribe(1, (TopicSubscription(storm_filter(client_id), 1),))) if subscribe else b""
        out.append((connect, sub))
    return out


def _storm(address: tuple[str, int], packets: list[tuple[bytes, bytes]], start: float, subscribe: bool,
           deadline: float) -> dict[str, Any]:
    """Open every connection now; returns latencies (µs from `start` to CONNACK), counts and the sockets."""
    latency = BenchLatencies()
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    state = [CONNECTING] * len(packets)
    buffers = [b""] * len(packets)
    sessions_present = refused = failed = 0
    errors: list[str] = []
    last_connack = start

    def fail(i: int, why: str) -> None:
        nonlocal failed
        failed += 1
        state[i] = DONE
        if len(errors) < MAX_ERRORS_KEPT:
            errors.append(f"connection {i}: {why}")
        try:
            selector.unregister(socks[i])
        except (KeyError, ValueError):
            pass

    for i in range(len(packets)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        socks.append(sock)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            fail(i, os.strerror(code))
            continue
        selector.register(sock, selectors.EVENT_WRITE, i)
    pending = len(packets) - failed
    while pending and time.monotonic() < deadline:
        for key, _events in selector.select(timeout=1.0):
            i, sock = key.data, key.fileobj
            try:
                if state[i] == CONNECTING:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        fail(i, os.strerror(code))
                        pending -= 1
                        continue
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.send(packets[i][0])  # a few dozen bytes into an empty socket buffer: never partial
                    state[i] = WAIT_CONNACK
                    selector.modify(sock, selectors.EVENT_READ, i)
                    continue
                data = sock.recv(256)
                if not data:
                    fail(i, "closed by the broker")
                    pending -= 1
                    continue
                buffers[i] += data
                buf = buffers[i]
                if state[i] == WAIT_CONNACK and len(buf) >= 4:
                    now = time.monotonic()
                    if buf[0] != CONNACK:
                        fail(i, f"expected CONNACK, got packet type 0x{buf[0]:02x}")
                        pending -= 1
                        continue
                    size = 2 + buf[1]
                    if len(buf) < size:
                        continue
                    if buf[3]:
                        refused += 1
                        fail(i, f"CONNACK refused: return code {buf[3]}")
                        pending -= 1
                        continue
                    latency.record(int((now - start) * 1e6))
                    last_connack = max(last_connack, now)
                    sessions_present += buf[2] & 1
                    buffers[i] = buf = buf[size:]
                    if subscribe:
                        sock.send(packets[i][1])
                        state[i] = WAIT_SUBACK
                    else:
                        state[i] = DONE
                        selector.unregister(sock)
                        pending -= 1
                if state[i] == WAIT_SUBACK and len(buf) >= 2:
                    if buf[0] != SUBACK:
                        fail(i, f"expected SUBACK, got packet type 0x{buf[0]:02x}")
                    elif len(buf) >= 2 + buf[1]:
                        state[i] = DONE
                        selector.unregister(sock)
                    else:
                        continue
                    pending -= 1
            except OSError as exc:
                fail(i, f"{type(exc).__name__}: {exc}")
                pending -= 1
    if pending:
        if len(errors) < MAX_ERRORS_KEPT:
            errors.append(f"{pending} connections unanswered after {STORM_TIMEOUT_S}s")
        failed += pending
    selector.close()
    return {"latency": latency.to_state(), "connected": latency.count, "failed": failed, "refused": refused,
            "sessions_present": sessions_present, "last_connack": last_connack, "errors": errors, "socks": socks}


def _storm_worker(server: str, level: int, client_ids: list[str], clean: bool, subscribe: bool, ready: Any,
                  go: Any, start_at: Any, results: Any, release: Any) -> None:
    raise_fd_limit()
    packets = _client_packets(client_ids, level, clean, subscribe)
    ready.put(len(packets))
    go.wait(STORM_TIMEOUT_S)
    start = start_at.value
    cpu_before = time.process_time()
    report = _storm(split_address(server), packets, start, subscribe, start + STORM_TIMEOUT_S)
    report["cpu_seconds"] = time.process_time() - cpu_before  # is the load generator the bottleneck?
    socks = report.pop("socks")
    results.put(report)
    release.wait(STORM_TIMEOUT_S)
    if subscribe:  # leave the sessions behind cleanly (3.1.1 DISCONNECT), as clients that are done would
        for sock in socks:
            try:
                sock.setblocking(True)
                sock.settimeout(1.0)
                sock.sendall(b"\xe0\x00")
            except OSError:
                pass
    for sock in socks:
        sock.close()


def run_storm(server: str, count: int, *, broker_pid: int = 0, processes: int = 0, level: int = 4,
              persistent: bool = False, prepare: bool = False, client_prefix: str = "", hold: float = 0.0,
              progress: Any = stderr_progress) -> dict[str, Any]:
    """One storm of `count` connections against `server`; see the module docstring."""
    limit = raise_fd_limit()
    processes = min(count, processes or max(2, -(-count // PER_PROCESS)))
    per_process = -(-count // processes)
    if per_process + 64 > limit:
        raise BenchError(f"{per_process} connections per process exceed the file-descriptor limit {limit}: "
                         "use more --processes")
    prefix = client_prefix or f"bench-storm-{uuid.uuid4().hex[:8]}"
    mp = multiprocessing.get_context("spawn")
    ready, results, go, release = mp.Queue(), mp.Queue(), mp.Event(), mp.Event()
    start_at = mp.Value("d", 0.0)
    workers = []
    for p in range(processes):
        ids = [f"{prefix}-{i}" for i in range(p * per_process, min(count, (p + 1) * per_process))]
        worker = mp.Process(target=_storm_worker, daemon=True,
                            args=(server, level, ids, not persistent, prepare, ready, go, start_at, results, release))
        worker.start()
        workers.append(worker)
    reports: list[dict[str, Any]] = []
    try:
        for _ in workers:
            ready.get(timeout=STORM_TIMEOUT_S)  # every worker has its packets built: the storm starts together
        rss_before = read_rss_kib(broker_pid) if broker_pid else 0
        load_before = os.getloadavg()[0]
        cpu_before = read_cpu_seconds(broker_pid) if broker_pid else 0.0
        overflows_before = listen_overflows()
        start_at.value = start = time.monotonic()
        go.set()
        while len(reports) < processes:
            try:
                reports.append(results.get(timeout=1.0))
            except Exception:  # queue.Empty
                if not any(w.is_alive() for w in workers) or time.monotonic() > start + 2 * STORM_TIMEOUT_S:
                    raise BenchError("storm workers ended without reporting") from None
        broker_cpu = read_cpu_seconds(broker_pid) - cpu_before if broker_pid else None
        overflows_after = listen_overflows()
        if hold:
            time.sleep(hold)  # let the broker settle before reading its memory
        rss_after = read_rss_kib(broker_pid) if broker_pid else 0
    finally:
        stop_workers(workers, release)
    latency = merged([r["latency"] for r in reports])
    connected = sum(r["connected"] for r in reports)
    total_s = max(r["last_connack"] for r in reports) - start
    errors = [e for r in reports for e in r["errors"]]
    return {
        "protocol": "mqtt-storm", "server": server, "count": count, "connected": connected,
        "failed": sum(r["failed"] for r in reports), "refused": sum(r["refused"] for r in reports),
        "processes": processes, "protocol_level": level, "persistent": persistent, "prepare": prepare,
        "client_prefix": prefix, "sessions_present": sum(r["sessions_present"] for r in reports),
        "all_connacked_seconds": round(total_s, 3), "connack_ms": latency.summary_ms(),
        "broker_pid": broker_pid or None,
        "broker_cpu_seconds": None if broker_cpu is None else round(broker_cpu, 3),
        "broker_cpu_ms_per_1000": None if broker_cpu is None else round(broker_cpu * 1e6 / max(1, connected), 1),
        "client_cpu_seconds": [round(r["cpu_seconds"], 3) for r in reports],
        "broker_rss_kib_before": rss_before or None, "broker_rss_kib_after": rss_after or None,
        "errors": errors,
        "machine": {"cpus": os.cpu_count(), "loadavg_before": round(load_before, 2),
                    "somaxconn": _read_int("/proc/sys/net/core/somaxconn"),
                    "tcp_max_syn_backlog": _read_int("/proc/sys/net/ipv4/tcp_max_syn_backlog")},
        # SYNs the kernel dropped because an accept queue was full, during the storm (machine-wide counter, so
        # other traffic on a shared machine counts too); each drop costs its client a retransmission 1 s later
        "listen_overflows": None if overflows_before is None or overflows_after is None
        else overflows_after - overflows_before,
        "listen_backlog": listen_backlog(server),
    }


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def listen_overflows() -> int | None:
    """The kernel's `TcpExt ListenOverflows` counter (`nstat`'s TcpExtListenOverflows), or None off Linux."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table["ListenOverflows"]) if "ListenOverflows" in table else None
    return None


def listen_backlog(server: str) -> int | None:
    """The accept-queue size the kernel gave the socket listening on `server`'s port (`ss -ltn`'s Send-Q: the
    requested backlog capped by net.core.somaxconn), or None when `ss` cannot tell."""
    port = split_address(server)[1]
    try:
        done = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stdout.splitlines():
        fields = line.split()  # State Recv-Q Send-Q Local Peer
        if len(fields) >= 3 and fields[2].isdigit():
            return int(fields[2])
    return None


def run_storm_command(args: argparse.Namespace) -> int:
    raise_fd_limit()  # before spawning the broker, so that it inherits the raised limit
    if args.restart and not args.spawn_broker:
        print("error: --restart needs --spawn-broker (restart an external broker yourself between --prepare and "
              "the storm)", file=sys.stderr)
        return EXIT_FAILURE
    persistent = args.persistent or args.prepare or args.restart
    try:
        target = MqttTarget(args)
        with target as (server, pid):
            common = {"processes": args.processes, "level": args.protocol_level, "persistent": persistent}
            prepared = None
            if args.restart:
                prefix = args.client_prefix or f"bench-storm-{uuid.uuid4().hex[:8]}"
                prepared = run_storm(server, args.count, prepare=True, client_prefix=prefix, **common)
                stderr_progress(f"{prepared['connected']} persistent sessions prepared; restarting the broker")
                broker = target.broker
                assert broker is not None
                restart_started = time.monotonic()
                broker.stop()
                broker.start()
                restart_s = time.monotonic() - restart_started
                server, pid = broker.addresses["mqtt"], broker.process.pid
                stderr_progress(f"broker restarted in {restart_s:.2f}s on {server}; storm")
                report = run_storm(server, args.count, broker_pid=pid, client_prefix=prefix, hold=args.hold,
                                   **common)
                report["prepared"] = {k: prepared[k] for k in ("connected", "all_connacked_seconds", "errors")}
                report["broker_restart_seconds"] = round(restart_s, 3)
            else:
                report = run_storm(server, args.count, broker_pid=pid or args.broker_pid, prepare=args.prepare,
                                   client_prefix=args.client_prefix, hold=args.hold, **common)
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        lat = report["connack_ms"]
        sessions = f", {report['sessions_present']} with Session Present" if persistent else ""
        sys.stdout.write(
            f"tidegate bench mqtt-storm: {report['connected']}/{report['count']} CONNACKed in "
            f"{report['all_connacked_seconds']}s from a common start ({report['processes']} client processes"
            f"{sessions})\n  time to CONNACK ms: p50 {lat['p50']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}\n"
            + (f"  broker CPU {report['broker_cpu_seconds']}s ({report['broker_cpu_ms_per_1000']} ms per 1,000 "
               f"connections); client processes' CPU {report['client_cpu_seconds']}s\n"
               if report["broker_cpu_seconds"] is not None else "")
            + (f"  kernel: {report['listen_overflows']} accept-queue overflows during the storm (listen backlog "
               f"{report['listen_backlog']}, net.core.somaxconn {report['machine']['somaxconn']})\n"
               if report["listen_overflows"] is not None else "")
            + "".join(f"  error: {e}\n" for e in report["errors"]))
    failed = report["errors"] or report["connected"] < report["count"]
    return EXIT_FAILURE if failed else EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mqtt_target_options(parser)
    parser.add_argument("--count", type=at_least(1), default=1_000, metavar="N",
                        help="connections opened at once (1000)")
    parser.add_argument("--processes", type=at_least(1), default=0, metavar="P",
                        help=f"client processes (default: 1 per {PER_PROCESS:,}, at least 2)")
    parser.add_argument("--broker-pid", type=int, default=0, metavar="PID",
                        help="broker process whose VmRSS is read before and after (taken from --spawn-broker)")
    parser.add_argument("--protocol", dest="protocol_level", type=int, choices=(4, 5), default=4,
                        help="MQTT protocol level (4)")
    parser.add_argument("--persistent", action="store_true",
                        help="CleanSession=0 under stable client ids (--client-prefix): resume stored sessions")
    parser.add_argument("--prepare", action="store_true",
                        help="persistent clients subscribe to one filter each (QoS 1), then disconnect")
    parser.add_argument("--restart", action="store_true",
                        help="with --spawn-broker: prepare N sessions, restart the broker, storm them back")
    parser.add_argument("--client-prefix", default="", metavar="PREFIX",
                        help="client ids are PREFIX-0 .. PREFIX-(N-1) (default: random)")
    parser.add_argument("--hold", type=float, default=0.5, metavar="S",
                        help="seconds to keep the connections after the last CONNACK before reading memory (0.5)")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")
    parser.set_defaults(protocol="mqtt")


COMMAND = BenchCommand("mqtt-storm", "open N MQTT connections at once: time until all are CONNACKed",
                       add_arguments, run_storm_command)
