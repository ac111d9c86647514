#!/usr/bin/env bash
# Every side-by-side benchmark of docs/performance.md's "Latest side-by-side run", in the order it was run, on a
# quiet machine (~11 minutes): MQTT against Mosquitto and amqtt (C load generator), interleaved reruns of the 1→1 and
# fan-in scenarios, the four native runs, AMQP against RabbitMQ, and the 1→1 scenarios with the Python generator.
# Usage: interop/bench_all.sh [OUT_DIR]   (run from the repository root, after `make` installed .venv)
set -u
OUT=${1:-/tmp/tidegate-bench}; PY=.venv/bin/python; mkdir -p "$OUT"
echo "start $(date) load $(cat /proc/loadavg)"
$PY interop/bench_mqtt_compare.py --duration 6 --conns 10000 --amqtt-conns 2000 --storm-counts 10000 \
  --brokers tidegate-sync,mosquitto,amqtt --out "$OUT/mqtt" > "$OUT/mqtt.log" 2>&1
echo "mqtt done $(date) load $(cat /proc/loadavg)"
$PY interop/bench_mqtt_compare.py --duration 5 --conns 0 --storm-counts '' --brokers tidegate-sync,mosquitto \
  --scenarios qos0_1to1,qos1_1to1,qos0_fan_in --repeat 3 --out "$OUT/repeat" > "$OUT/repeat.log" 2>&1
echo "repeat done $(date) load $(cat /proc/loadavg)"
for args in "--flush async" "--flush sync" "--flush sync --batch 64" "--flush async --batch 64"; do
  echo "native $args"; .venv/bin/tidegate bench native --spawn-broker $args --duration 5 2>&1 | tail -4
done > "$OUT/native.log" 2>&1
echo "native done $(date)"
$PY interop/bench_amqp_compare.py --duration 5 --out "$OUT/amqp" > "$OUT/amqp.log" 2>&1
echo "amqp done $(date)"
$PY interop/bench_mqtt_compare.py --duration 5 --conns 0 --storm-counts '' --brokers tidegate-sync,mosquitto \
  --scenarios qos0_1to1,qos1_1to1 --loadgen python --out "$OUT/python" > "$OUT/python.log" 2>&1
echo "python load generator done $(date); results in $OUT/*/results.md"
