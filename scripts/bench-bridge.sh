#!/usr/bin/env bash
# Bridge: 20 rooms, a publisher on replica A and a receiver on B each, through a redis-server
# of its own; stepped rates per room.
#
#   cargo build --release --workspace     # confab and confab-bench (two packages)
#   BIN=<release dir> scripts/bench-bridge.sh [OUT_DIR]     # default: a new temporary folder
#   RATES=1000,2500 SERVER_BIN=/path/to/other/confab scripts/bench-bridge.sh
#
# Writes bridge.json (and the table in bridge.txt) to OUT_DIR; stops what it started by PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=${BIN:-target/release}
OUT=${1:-$(mktemp -d /tmp/confab-bridge.XXXXXX)}
mkdir -p "$OUT"
. scripts/bench-lib.sh

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
redis_pid=$!
PIDS+=("$redis_pid")
wait_port "$rport"
export CONFAB_REDIS__URL="redis://127.0.0.1:$rport"
ports=(); pids=()
for n in a b; do
    p=$(free_port)
    CONFAB_SERVER__NODE_ID=$n "${SERVER_BIN:-$B/confab}" --listen "127.0.0.1:$p" >"$OUT/$n.log" 2>&1 &
    pids+=("$!"); PIDS+=("$!"); ports+=("$p")
done
for p in "${ports[@]}"; do wait_port "$p"; done
status=0
"$B/confab-bench" --url "ws://127.0.0.1:${ports[0]},ws://127.0.0.1:${ports[1]}" \
    --pid "${pids[0]},${pids[1]},$redis_pid" --progress-secs 0 \
    cross --rooms 20 --members 2 --rates "${RATES:-1000,2500,4000,5000}" --step-secs 4 \
    --drain-secs 4 --keep-going --json >"$OUT/bridge.json" 2>"$OUT/bridge.txt" || status=$?
echo "confab-bench exit $status; results in $OUT"
