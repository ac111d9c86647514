"""`tidegate bench`: an end-to-end load generator that measures throughput, latency, loss and duplication.

Where things are:

- `registry.py`   the `bench` command and `COMMANDS`, one entry per driver (`native`, `mqtt`, `mqtt-conns`)
- `native.py`     the native-protocol driver (SDK producers, a consumer group) and its command
- `mqtt.py`       the MQTT driver (publishers, subscribers) and its command, on the client of `mqtt_client.py`
- `mqtt_conns.py` `mqtt-conns`: many idle MQTT connections, connect time and broker memory (no engine)
- `engine.py`     the protocol-free engine: worker processes, progress, the final report
- `driver.py`     what a driver implements (`Driver`) and receives (`BenchOptions`, `WorkerContext`), `RateLimiter`
- `delivery.py`   the payload header, per-worker tallies, the loss/duplicate check
- `latency.py`    `BenchLatencies` (mergeable µs percentiles) and the report's latency line
- `broker.py`     `--spawn-broker`: `SpawnedBroker`, and how MQTT commands pick their broker
- `arguments.py`  exit codes, default server, option helpers and `BenchCommand` shared by the commands

The `tidegate` CLI adds the command through `register` (called from gateway/cli_admin.py).
"""

from __future__ import annotations

from .registry import register

__all__ = ["register"]
