#!/usr/bin/env bash
# Low-rate latency and broker CPU per message: start `tidegate serve` from the venv given (extra `--set k=v` settings
# after the mode), drive it with a paced `tidegate bench` (1,000 msg/s, 5 s), read the broker's CPU from /proc.
# Usage: interop/lowrate_latency.sh VENV_DIR mqtt|amqp [--set storage.x=y ...]
V=$1; MODE=$2; shift 2; D=$(mktemp -d); RATE=${RATE:-1000}; DURATION=${DURATION:-5}
$V/bin/tidegate serve --data-dir $D --set listeners.native.port=0 --set listeners.mqtt.port=0 --set listeners.admin.port=0 \
  --set listeners.mqtt.ws_enabled=false --set listeners.amqp.port=0 "$@" > $D/log 2>&1 &
PID=$!
for i in $(seq 100); do [ -f $D/listeners.json ] && break; sleep 0.1; done
sleep 1; ADDR=$(python3 -c "import json;print(json.load(open('$D/listeners.json'))['$MODE'])")
t0=$(awk '{print $14+$15}' /proc/$PID/stat)
if [ $MODE = mqtt ]; then OUT=$($V/bin/tidegate bench mqtt --qos 1 --rate $RATE --duration $DURATION --server $ADDR --json 2>/dev/null)
else OUT=$($V/bin/tidegate bench amqp --persistent --confirm 256 --rate $RATE --duration $DURATION --server $ADDR --json 2>/dev/null); fi
t1=$(awk '{print $14+$15}' /proc/$PID/stat)
kill $PID; wait $PID 2>/dev/null
echo "$OUT" > $D/out.json
python3 - "$D/out.json" "$MODE" "$t0" "$t1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); t0, t1 = float(sys.argv[3]), float(sys.argv[4])
n = d.get("sent") or d.get("published") or 1
flat = {k: v for k, v in d.items() if not isinstance(v, (dict, list))}
lat = {k: v for k, v in d.items() if isinstance(v, dict)}
print(sys.argv[2], "broker CPU %.0f us/msg" % ((t1 - t0) * 10000 / n), json.dumps(lat))
PY
grep -ho "fsyncs since start.*" $D/log; rm -rf $D
