# Shared by the bench scripts (sourced, not run): free ports, waiting for a listener, and
# stopping only the processes the script started, by PID, also when it is interrupted.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}

PIDS=()
# SIGTERM, then SIGKILL after 5 s; reaps the process and forgets it, so the exit trap never
# signals a PID that may since belong to someone else.
stop() {
    local pid=$1 p kept=()
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    for p in ${PIDS[@]+"${PIDS[@]}"}; do [ "$p" = "$pid" ] || kept+=("$p"); done
    PIDS=(${kept[@]+"${kept[@]}"})
}
cleanup() { local p; for p in ${PIDS[@]+"${PIDS[@]}"}; do stop "$p"; done; }
trap cleanup EXIT

# Load settings: no per-address limits (every client is on 127.0.0.x, so the address budgets
# would measure admission, not the server), no message rate limit.
export CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP=0 CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC=0 \
    CONFAB_LIMITS__HANDSHAKES_PER_IP=0 CONFAB_LIMITS__ROOMS_PER_IP=0 \
    CONFAB_LIMITS__MESSAGES_PER_SEC_PER_IP=0 CONFAB_LIMITS__MESSAGES_PER_SEC_PER_USER=0 \
    CONFAB_LIMITS__MESSAGES_PER_SEC=10000000 CONFAB_LIMITS__BURST=10000000 \
    CONFAB_SERVER__SHUTDOWN_GRACE_SECS=1 RUST_LOG=warn
