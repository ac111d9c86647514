#!/usr/bin/env bash
# Broker CPU per AMQP message (persistent, publisher confirms, manual acks): start `tidegate serve` from the venv
# given, drive it with `tidegate bench amqp` at a fixed rate, read the broker process's CPU time from /proc.
# Usage: interop/amqp_cpu_per_message.sh VENV_DIR [RATE] [SECONDS]. CPU time per message does not depend on how
# loaded the machine is the way throughput does, so two runs side by side compare code, not neighbours.
V=$1; RATE=${2:-4000}; SECONDS_=${3:-5}; D=$(mktemp -d)
$V/bin/tidegate serve --data-dir $D --set listeners.native.port=0 --set listeners.mqtt.enabled=false \
  --set listeners.admin.port=0 --set listeners.amqp.port=0 > $D/log 2>&1 &
PID=$!
for i in $(seq 100); do [ -f $D/listeners.json ] && break; sleep 0.1; done
ADDR=$(python3 -c "import json;print(json.load(open('$D/listeners.json'))['amqp'])")
t0=$(awk '{print $14+$15}' /proc/$PID/stat)
OUT=$($V/bin/tidegate bench amqp --server $ADDR --persistent --confirm 256 --rate $RATE --duration $SECONDS_ --json 2>/dev/null)
t1=$(awk '{print $14+$15}' /proc/$PID/stat)
kill $PID; wait $PID 2>/dev/null
echo "$OUT" | python3 -c "
import json,sys; d=json.load(sys.stdin); n=max(1, d.get('published') or d.get('sent') or 0)
print(f\"amqp persistent+confirms: {n} msgs, broker CPU {($t1-$t0)*10000/n:.1f} us/msg; report: {json.dumps({k: v for k, v in d.items() if not isinstance(v, (dict, list))})}\")"
rm -rf $D
