#!/usr/bin/env bash
# Heap profile of idle sessions: confab (embedded bus) under valgrind's DHAT, N idle
# connections over R rooms opened by confab-bench, then SIGTERM; prints the top allocation
# sites at the heap's peak per connection (scripts/dhat-top.py). Loopback only, bounded.
#
#   scripts/profile-idle.sh [N] [ROOMS] [OUT_DIR]     # defaults 2000 20 /tmp/confab-profile
#
# Needs valgrind and the profiling build (release with line tables):
#   cargo build --profile profiling --bin confab && cargo build --release -p confab-bench
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-2000}
ROOMS=${2:-20}
OUT=${3:-/tmp/confab-profile}
mkdir -p "$OUT"
TARGET=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
CONFAB=${CONFAB:-$TARGET/profiling/confab}
BENCH=${BENCH:-$TARGET/release/confab-bench}
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP=0 CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC=0 \
CONFAB_SERVER__SHUTDOWN_GRACE_SECS=1 CONFAB_SERVER__NODE_ID="profile-$PORT" RUST_LOG=warn \
    valgrind --tool=dhat --dhat-out-file="$OUT/dhat.out" \
    "$CONFAB" --listen "127.0.0.1:$PORT" 2>"$OUT/valgrind.log" &
PID=$!
trap 'kill -KILL $PID 2>/dev/null || true' EXIT
for i in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    kill -0 "$PID" 2>/dev/null || { echo "valgrind/confab exited; see $OUT/valgrind.log" >&2; exit 1; }
    [ "$i" -lt 600 ] || { echo "confab under valgrind never listened on $PORT" >&2; exit 1; }
    sleep 0.1
done

# Valgrind runs the server one thread at a time, far slower: generous connect time-outs.
"$BENCH" --url "ws://127.0.0.1:$PORT" --source 127.0.0.2,127.0.0.3 --pid "$PID" --json \
    --progress-secs 10 --connect-timeout 120 --connect-concurrency 16 --max-secs 900 \
    idle --connections "$N" --rooms "$ROOMS" --hold-secs 5 --close false \
    >"$OUT/idle.json" 2>"$OUT/idle.txt" \
    || echo "confab-bench failed (see $OUT/idle.txt); the profile is still written" >&2
sed -n '/^== confab-bench/,$p' "$OUT/idle.txt"

kill -TERM "$PID"
for _ in $(seq 1200); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PID" 2>/dev/null; then
    echo "valgrind did not finish writing $OUT/dhat.out within 120 s" >&2
    exit 1
fi
trap - EXIT
python3 scripts/dhat-top.py "$OUT/dhat.out" --connections "$N" --top 40 | tee "$OUT/top.md"
