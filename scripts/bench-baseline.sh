#!/usr/bin/env bash
# The baseline of docs/PERFORMANCE.md: confab (Redis bus and embedded bus) and the yardstick,
# measured by confab-bench in one run, on loopback. Starts and stops its own redis-server,
# servers and yardstick (by PID); every step is bounded in time.
#
#   scripts/bench-baseline.sh [OUT_DIR]       # default /tmp/confab-baseline; JSON per run
#   BIN=/path/to/release scripts/bench-baseline.sh   # binaries from elsewhere
#   PHASES=idle,fanout IDLE_N=10000 FANOUT_RATES=250,500,1000 scripts/bench-baseline.sh
#
# Needs the release builds of the whole workspace (the server, confab-bench, the yardstick):
#   cargo build --release --workspace --bins --examples
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-/tmp/confab-baseline}
mkdir -p "$OUT"
if [ -z "${BIN:-}" ]; then
    BIN="$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release"
fi
PHASES=${PHASES:-idle,fanout}
IDLE_N=${IDLE_N:-10000}
IDLE_ROOMS=${IDLE_ROOMS:-100}
FANOUT_MEMBERS=${FANOUT_MEMBERS:-1000}
FANOUT_RATES=${FANOUT_RATES:-250,500,750,1000,1500,2000,3000,4000}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5

. scripts/bench-lib.sh

{ date -u; nproc; grep -m1 'model name' /proc/cpuinfo; uptime; redis-server --version; } >"$OUT/machine.txt"

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT"

# start_server NAME [redis]: sets PORT and PID of a fresh server.
start_server() {
    PORT=$(free_port)
    case $1 in
        yardstick) "$BIN/examples/yardstick" --listen "127.0.0.1:$PORT" 2>"$OUT/$1.log" & ;;
        confab-redis) CONFAB_REDIS__URL="redis://127.0.0.1:$REDIS_PORT" CONFAB_REDIS__PREFIX="b$PORT" \
            CONFAB_SERVER__NODE_ID="bench-$PORT" "$BIN/confab" --listen "127.0.0.1:$PORT" 2>"$OUT/$1.log" & ;;
        # STORE_URL: the embedded bus's store (default memory, as the baseline was measured;
        # sqlite:$OUT/confab.db for the default a newcomer runs). Never data/ in the tree.
        confab-embedded) CONFAB_REDIS__URL='' CONFAB_STORE__URL="${STORE_URL:-memory}" CONFAB_SERVER__NODE_ID="bench-$PORT" \
            "$BIN/confab" --listen "127.0.0.1:$PORT" 2>"$OUT/$1.log" & ;;
    esac
    PID=$!
    PIDS+=("$PID")
    wait_port "$PORT"
    sleep 1
}

bench() {
    local name=$1; shift
    echo "== $name" >&2
    "$BIN/confab-bench" --url "ws://127.0.0.1:$PORT" --source "$SOURCES" --pid "$PID" \
        --json --progress-secs 5 "$@" >"$OUT/$name.json" 2>"$OUT/$name.txt" || true
    sed -n '/^== confab-bench/,$p' "$OUT/$name.txt" >&2
}

case ",$PHASES," in *,idle,*)
    for server in confab-redis confab-embedded yardstick; do
        start_server "$server"
        bench "idle-$server" --max-secs 240 idle --connections "$IDLE_N" --rooms "$IDLE_ROOMS" --hold-secs 5
        stop "$PID"
    done
esac

case ",$PHASES," in *,fanout,*)
    for server in confab-redis yardstick; do
        start_server "$server"
        bench "fanout-$server" --max-secs 300 fanout --members "$FANOUT_MEMBERS" --rates "$FANOUT_RATES" \
            --warmup-secs 1 --step-secs 5 --drain-secs 5
        stop "$PID"
    done
esac
echo "JSON and logs in $OUT" >&2
