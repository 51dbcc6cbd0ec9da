#!/usr/bin/env bash
set -u
# Bridge: 20 rooms, a publisher on replica A and a receiver on B each, through a redis-server
# of its own; stepped rates per room (RATES=…). SERVER_BIN=… runs another confab binary. Usage: BIN=<release dir> scripts/bench-bridge.sh
# Writes /tmp/bridge.json (and the table on /tmp/bridge.err); stops what it started by PID.
B=${BIN:-target/release}
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port $rport --save '' --appendonly no --daemonize no > /tmp/bridge-redis.log 2>&1 &
rpid=$!
sleep 0.5
export CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP=0 CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC=0 \
  CONFAB_LIMITS__MESSAGES_PER_SEC=10000000 CONFAB_LIMITS__BURST=10000000 RUST_LOG=warn \
  CONFAB_REDIS__URL=redis://127.0.0.1:$rport
ports=(); pids=()
for n in a b; do
  p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  CONFAB_SERVER__NODE_ID=$n ${SERVER_BIN:-$B/confab} --listen 127.0.0.1:$p > /tmp/bridge-$n.log 2>&1 &
  pids+=($!); ports+=($p)
done
sleep 2
$B/confab-bench --url ws://127.0.0.1:${ports[0]},ws://127.0.0.1:${ports[1]} --pid ${pids[0]},${pids[1]} --progress-secs 0 \
  cross --rooms 20 --members 2 --rates ${RATES:-1000,2500,4000,5000} --step-secs 4 --drain-secs 4 --keep-going --json > /tmp/bridge.json 2> /tmp/bridge.err
echo "exit $?"
kill ${pids[@]} $rpid; wait 2>/dev/null
