#!/usr/bin/env bash
# Broker CPU per message: start `tidegate serve` from the venv given, drive it with `tidegate bench`, read the
# broker process's CPU time from /proc. Usage: interop/cpu_per_message.sh VENV_DIR native|mqtt
V=$1; MODE=$2; D=$(mktemp -d)
$V/bin/tidegate serve --data-dir $D --set listeners.native.port=0 --set listeners.mqtt.port=0 --set listeners.admin.port=0 --set listeners.mqtt.ws_enabled=false --set listeners.amqp.enabled=false > $D/log 2>&1 &
PID=$!
for i in $(seq 100); do [ -f $D/listeners.json ] && break; sleep 0.1; done
ADDR=$(python3 -c "import json;print(json.load(open('$D/listeners.json'))['$MODE'])")
t0=$(awk '{print $14+$15}' /proc/$PID/stat)
if [ $MODE = mqtt ]; then OUT=$($V/bin/tidegate bench mqtt --qos 1 --server $ADDR --duration 6 --json 2>/dev/null); else OUT=$($V/bin/tidegate bench native --server $ADDR --duration 6 --json 2>/dev/null); fi
t1=$(awk '{print $14+$15}' /proc/$PID/stat)
kill $PID; wait $PID 2>/dev/null
echo "$OUT" | python3 -c "import json,sys; d=json.load(sys.stdin); n=d['sent']; print(f\"$MODE {d['produce_msgs_per_s']} msg/s, broker CPU {($t1-$t0)*10000/n:.1f} us/msg\")"
rm -rf $D
