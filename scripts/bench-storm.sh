#!/usr/bin/env bash
# Reconnect storms (issue 19): one replica on its own redis-server, then RUNS storms in a row,
# each N connections over ROOMS rooms all opened at once (--connect-concurrency N) and held a
# moment, then all closed at once. Prints the sessions lost per run: connections that never
# got their presence frame (closed with 1013, timed out) plus those the server closed later,
# and the replica's "cannot start" lines.
#
#   cargo build --release --workspace     # confab and confab-bench (two packages)
#   BIN=<dir with release confab and confab-bench> scripts/bench-storm.sh [OUT_DIR]
#   (RUNS=10 N=10000 ROOMS=100 by default; CONCURRENCY=N, connections opened at once)
#
# Writes storm-<run>.json per run and the replica's log to OUT_DIR; stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=${BIN:-target/release}
RUNS=${RUNS:-10}
N=${N:-10000}
ROOMS=${ROOMS:-100}
CONCURRENCY=${CONCURRENCY:-$N}
HOLD=${HOLD:-1}
OUT=${1:-$(mktemp -d /tmp/confab-storm.XXXXXX)}
mkdir -p "$OUT"
. scripts/bench-lib.sh
# A real storm comes from many addresses; this one from four, so the per-address admission
# limits (handshakes in progress, rooms) are off too: the storm must reach the join path.
export CONFAB_LIMITS__HANDSHAKES_PER_IP=0 CONFAB_LIMITS__ROOMS_PER_IP=0

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
PIDS+=("$!")
wait_port "$rport"
port=$(free_port)
CONFAB_REDIS__URL="redis://127.0.0.1:$rport" CONFAB_SERVER__NODE_ID=storm \
    "$B/confab" --listen "127.0.0.1:$port" >"$OUT/confab.log" 2>&1 &
pid=$!
PIDS+=("$pid")
wait_port "$port"
for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.1
done

for run in $(seq "$RUNS"); do
    before=$(grep -c "cannot start" "$OUT/confab.log" || true)
    status=0
    "$B/confab-bench" --url "ws://127.0.0.1:$port" --source 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 \
        --pid "$pid" --progress-secs 0 --connect-concurrency "$CONCURRENCY" --connect-timeout 60 \
        --prefix "storm$run" idle --connections "$N" --rooms "$ROOMS" --hold-secs "$HOLD" --close true \
        --json >"$OUT/storm-$run.json" 2>"$OUT/storm-$run.txt" || status=$?
    after=$(grep -c "cannot start" "$OUT/confab.log" || true)
    python3 - "$OUT/storm-$run.json" "$run" "$status" "$((after - before))" <<'PY'
import json, sys
path, run, status, cannot = sys.argv[1:]
r = json.load(open(path))
c = r["connections"]
later = sum(n for code, n in r["closed_by_server"].items())
print(f"run {run}: exit {status}, attached {c['attached']}/{c['requested']} in "
      f"{c['connect_secs']:.1f} s, lost {c['failed'] + later} (not served {c['failed']} "
      f"{c['failures']}, closed later {later} {r['closed_by_server']}), "
      f"'cannot start' lines {cannot}")
PY
    # Resident now (all closed) and at its peak so far (VmHWM), KiB.
    grep -E '^(VmRSS|VmHWM)' "/proc/$pid/status" | tr -s ' \t\n' ' '
    echo
done
# Every run closed all its sessions: no room may still list anybody.
sleep 2
left=$(redis-cli -p "$rport" --scan --pattern 'confab:*:presence:users' | wc -l)
echo "rooms still listing users after the last run: $left"
stop "$pid" # before Redis, so the replica gives its lease up cleanly
echo "results in $OUT"
