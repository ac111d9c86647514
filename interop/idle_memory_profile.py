"""Where the broker's memory per idle MQTT connection goes, over real sockets.

    .venv/bin/python interop/idle_memory_profile.py [--count 2000] [--frames 12] [--top 30] [--group traceback]

Starts `tidegate serve` (MQTT listener only, as `tidegate bench mqtt-conns --spawn-broker` does) under tracemalloc,
opens `--count` idle MQTT 3.1.1 clean-session connections (keep alive 600) with the bench's connection workers,
and reads what the broker allocated (and still holds) between two SIGUSR1 signals: tracing starts just before the
connections, the snapshot is taken while they are held. Prints the heap bytes per connection, then the largest sums
grouped by allocation site (`--group lineno`) or by whole traceback (`--group traceback`, innermost frames first),
each as bytes per connection.

`--no-trace` runs the same broker without tracemalloc and prints only its VmRSS growth per connection (tracemalloc
keeps a record of its own for every traced block, which inflates RSS, so the two are measured apart).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path

SNAPSHOT_ENV = "TIDEGATE_TRACEMALLOC_SNAPSHOT"  # the broker writes its snapshots to this path on SIGUSR1
FRAMES_ENV = "TIDEGATE_TRACEMALLOC_FRAMES"


def traced_serve(argv: list[str]) -> int:
    """The broker side: `tidegate serve` with tracemalloc on and a snapshot written on every SIGUSR1."""
    frames = int(os.environ.get(FRAMES_ENV, "0"))
    path = os.environ.get(SNAPSHOT_ENV, "")

    def dump(signum: int, frame: object) -> None:
        # The first signal starts tracing (tracing the start-up would slow it past the bench's wait), the next
        # writes what was allocated since and is still alive.
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(path + ".tmp")
        else:
            if frames:
                tracemalloc.start(frames)
            Path(path + ".tmp").write_text("")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, dump)
    from tidegate.gateway.cli import main

    return main(argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=12, help="traceback depth tracemalloc keeps (12)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--group", choices=("lineno", "traceback"), default="lineno")
    parser.add_argument("--no-trace", action="store_true", help="RSS only, without tracemalloc")
    args = parser.parse_args()

    from tidegate.gateway.bench.broker import SpawnedBroker
    from tidegate.gateway.bench.mqtt_conns import raise_fd_limit, read_rss_kib, run_conns

    raise_fd_limit()
    broker = SpawnedBroker("sync", listeners=("mqtt",), extra_settings=("listeners.mqtt.ws_enabled=false",))
    snapshot_path = broker.data_dir.parent / "snapshot"
    broker.env = {SNAPSHOT_ENV: str(snapshot_path), FRAMES_ENV: "0" if args.no_trace else str(args.frames)}
    plain = broker.command()
    serve_at = plain.index("-m")
    broker.command = lambda: [plain[0], __file__, "--serve", *plain[serve_at + 2:]]  # type: ignore[method-assign]

    snapshots: list[tracemalloc.Snapshot | None] = []
    rss: list[int] = []

    def take() -> None:
        if snapshot_path.exists():
            snapshot_path.unlink()
        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not snapshot_path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no snapshot from the broker")
            time.sleep(0.05)  # bounded wait for the broker's file
        rss.append(read_rss_kib(broker.process.pid))
        snapshots.append(None if args.no_trace or not snapshot_path.stat().st_size
                         else tracemalloc.Snapshot.load(str(snapshot_path)))

    with broker:
        assert broker.process is not None
        time.sleep(1.0)  # let the fresh broker finish starting (as mqtt-conns does)
        take()

        def progress(line: str) -> None:
            print(line, file=sys.stderr)
            if "holding" in line:
                time.sleep(1.0)  # let the last CONNACKs settle
                take()

        report = run_conns(broker.address("mqtt"), args.count, hold=0.0, progress=progress)
    connected = report["connected"]
    print(f"{connected} connections; broker VmRSS {rss[0]} -> {rss[1]} KiB: "
          f"{(rss[1] - rss[0]) * 1024 / connected:,.0f} bytes per connection"
          + ("" if args.no_trace else " (with tracemalloc's own overhead)"))
    after = snapshots[1]
    if after is None:
        return 0
    after = after.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = after.statistics(args.group)
    total = sum(s.size for s in stats)
    blocks = sum(s.count for s in stats)
    print(f"python heap: {total / connected:,.0f} bytes and {blocks / connected:.1f} blocks per connection")
    for stat in stats[:args.top]:
        frames = stat.traceback.format(most_recent_first=True)
        where = frames[0].strip() if args.group == "lineno" else " <- ".join(
            f.strip() for f in frames if f.startswith("  File"))
        print(f"{stat.size / connected:8,.0f} B {stat.count / connected:5.2f} blk  {where}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(traced_serve(sys.argv[2:]))
    sys.exit(main())
