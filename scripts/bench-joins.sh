#!/usr/bin/env bash
# One room of 5,000 idle members: frames to fill and to empty, with the join limit on (the
# default, 100) and off (10⁹, the behaviour before it), same binary.
#
#   cargo build --release --workspace     # confab and confab-bench (two packages)
#   BIN=<dir with release confab and confab-bench> scripts/bench-joins.sh [OUT_DIR]
#
# Writes joins-<limit>.json (table in joins-<limit>.txt) to OUT_DIR; stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=${BIN:-target/release}
OUT=${1:-$(mktemp -d /tmp/confab-joins.XXXXXX)}
mkdir -p "$OUT"
. scripts/bench-lib.sh

for limit in 100 1000000000; do
    port=$(free_port)
    CONFAB_LIMITS__JOIN_EVENTS_MAX_MEMBERS=$limit "$B/confab" --listen "127.0.0.1:$port" \
        >"$OUT/confab-$limit.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    status=0
    "$B/confab-bench" --url "ws://127.0.0.1:$port" --source 127.0.0.2,127.0.0.3 --pid "$pid" \
        --progress-secs 0 idle --connections 5000 --rooms 1 --hold-secs 2 --json \
        >"$OUT/joins-$limit.json" 2>"$OUT/joins-$limit.txt" || status=$?
    echo "limit=$limit: confab-bench exit $status"
    stop "$pid"
done
echo "results in $OUT"
