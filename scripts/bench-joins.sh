#!/usr/bin/env bash
# One room of 5,000 idle members: frames to fill and to empty, join limit on (default) vs off.
# Usage: BIN=<dir with release confab and confab-bench> scripts/bench-joins.sh  (JSON in /tmp/joins-*.json)
set -u
B=${BIN:-target/release}
for limit in 100 1000000000; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP=0 CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC=0 \
  CONFAB_LIMITS__JOIN_EVENTS_MAX_MEMBERS=$limit RUST_LOG=warn \
    $B/confab --listen 127.0.0.1:$port > /tmp/joins-$limit.log 2>&1 &
  pid=$!
  sleep 1
  $B/confab-bench --url ws://127.0.0.1:$port --source 127.0.0.2,127.0.0.3 --pid $pid --progress-secs 0 \
    idle --connections 5000 --rooms 1 --hold-secs 2 --json > /tmp/joins-$limit.json 2> /tmp/joins-$limit.err
  echo "limit=$limit exit=$?"
  kill $pid; wait $pid 2>/dev/null
done
