#!/usr/bin/env bash
# Run the Autobahn|Testsuite "fuzzingclient" against a running WebSocket server
# and print a pass/fail summary.
#
#   scripts/autobahn.sh [URL]        (default URL: ws://127.0.0.1:9001/echo)
#
# The server must already be listening at URL; this script does not start it.
#
# Environment:
#   AUTOBAHN_VENV     virtualenv to use/create (default ~/.cache/confab-autobahn-venv)
#   AUTOBAHN_CASES    comma-separated case patterns (default 1.*,...,7.*,10.*)
#   AUTOBAHN_TIMEOUT  max seconds for the whole wstest run (default 1200)
#
# Output: HTML/JSON reports in docs/autobahn/reports/ (git-ignored) and the
# summary in docs/autobahn/summary.txt. Exits non-zero if any case FAILED or if
# no case ran (e.g. the server was not reachable).
#
# Why Python 2.7: autobahntestsuite (0.8.2, its last release) only runs on
# Python 2.7, with old pinned dependencies (scripts/autobahn-requirements.txt).
# Fresh machine needs: gcc (build-essential) to build the wsaccel and
# zope.interface C extensions; if Python 2.7 itself has to be built by pyenv,
# also pyenv's usual build deps (libssl-dev zlib1g-dev libbz2-dev
# libreadline-dev libsqlite3-dev libffi-dev libncursesw5-dev xz-utils tk-dev).
set -euo pipefail

URL="${1:-ws://127.0.0.1:9001/echo}"
CASES="${AUTOBAHN_CASES:-1.*,2.*,3.*,4.*,5.*,6.*,7.*,10.*}"
TIMEOUT="${AUTOBAHN_TIMEOUT:-1200}"
VENV="${AUTOBAHN_VENV:-$HOME/.cache/confab-autobahn-venv}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQS="$ROOT/scripts/autobahn-requirements.txt"
OUT="$ROOT/docs/autobahn"
REPORTS="$OUT/reports"

die() { echo "autobahn.sh: error: $*" >&2; exit 1; }

# Print the path of a working Python 2.7 interpreter, or nothing.
# We really run each candidate: a pyenv shim called python2.7 exists on PATH
# even when the active pyenv version is not 2.7, and then it just errors out.
find_python27() {
    local cand
    local cands=()
    if command -v python2.7 >/dev/null 2>&1; then cands+=("python2.7"); fi
    if command -v pyenv >/dev/null 2>&1; then
        # Glob may match nothing; the -x test below filters that out.
        cands+=("$(pyenv root)"/versions/2.7*/bin/python2.7)
    fi
    for cand in "${cands[@]}"; do
        if "$cand" -c 'import sys; assert sys.version_info[:2] == (2, 7)' >/dev/null 2>&1; then
            "$cand" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 0
}

# --- 1. Python 2.7 + virtualenv with the pinned test suite -------------------
if [ ! -x "$VENV/bin/wstest" ] || ! cmp -s "$REQS" "$VENV/.confab-requirements.txt"; then
    PY27="$(find_python27)"
    if [ -z "$PY27" ]; then
        if command -v pyenv >/dev/null 2>&1; then
            echo "autobahn.sh: no Python 2.7 found; building it with 'pyenv install 2.7.18' (takes a few minutes)" >&2
            pyenv install --skip-existing 2.7.18
            PY27="$(find_python27)"
        fi
        [ -n "$PY27" ] || die "Python 2.7 is required (autobahntestsuite does not run on Python 3).
Install pyenv and run 'pyenv install 2.7.18', or put python2.7 on PATH."
    fi
    echo "autobahn.sh: creating virtualenv $VENV with $PY27" >&2

    # Python 2.7 has no 'venv' module. virtualenv 16.7.12 is a single module
    # with no dependencies that still runs on 2.7 and bundles pip 20.3.4, so we
    # install it into a throwaway dir instead of into the interpreter itself.
    BOOT="$(mktemp -d)"
    trap 'rm -rf "$BOOT"' EXIT
    "$PY27" -m pip install --quiet --disable-pip-version-check --target "$BOOT" virtualenv==16.7.12
    # Only ever delete something that looks like a virtualenv we made.
    if [ -e "$VENV" ] && [ ! -f "$VENV/bin/activate" ]; then
        die "$VENV exists but is not a virtualenv; refusing to delete it (set AUTOBAHN_VENV)"
    fi
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    PYTHONPATH="$BOOT" "$PY27" -m virtualenv --quiet "$VENV"

    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-python-version-warning -r "$REQS"
    # Remember which pins this venv was built from, so edits to the
    # requirements file trigger a rebuild and unchanged pins skip the install.
    cp "$REQS" "$VENV/.confab-requirements.txt"
fi

# --- 2. Run the fuzzing client -----------------------------------------------
# Start from an empty report dir so a stale index.json can't pass for this run.
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
SPEC="$REPORTS/fuzzingclient.json"

# Write the spec with Python so the URL and case list are JSON-quoted properly.
"$VENV/bin/python" - "$SPEC" "$REPORTS" "$URL" "$CASES" <<'EOF'
import json, sys
spec_path, outdir, url, cases = sys.argv[1:5]
spec = {
    "outdir": outdir,
    "servers": [{"agent": "confab", "url": url}],
    "cases": [c.strip() for c in cases.split(",") if c.strip()],
    "exclude-cases": [],
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
EOF

echo "autobahn.sh: running fuzzingclient against $URL (cases: $CASES)" >&2
START=$(date +%s)
# wstest exits 0 even when it cannot connect (it then writes an empty
# index.json), so its exit code is only informative; the summary below decides.
# 'timeout' bounds the run in case the server under test hangs.
WSTEST_RC=0
# PYTHONWARNINGS hides cryptography's "Python 2 is deprecated" warning spam.
PYTHONWARNINGS=ignore timeout "$TIMEOUT" "$VENV/bin/wstest" -m fuzzingclient -s "$SPEC" \
    > "$REPORTS/wstest.log" 2>&1 || WSTEST_RC=$?
echo "autobahn.sh: wstest finished in $(( $(date +%s) - START ))s (exit $WSTEST_RC, log: $REPORTS/wstest.log)" >&2
if [ "$WSTEST_RC" -ne 0 ]; then
    tail -n 20 "$REPORTS/wstest.log" >&2
fi

# --- 3. Summarize index.json -------------------------------------------------
SUMMARY_RC=0
"$VENV/bin/python" - "$REPORTS/index.json" "$URL" > "$OUT/summary.txt" <<'EOF' || SUMMARY_RC=$?
from __future__ import print_function
import json, sys

index_path, url = sys.argv[1:3]
try:
    with open(index_path) as f:
        index = json.load(f)
except (IOError, ValueError) as e:
    print("Autobahn fuzzingclient vs %s: could not read %s (%s)" % (url, index_path, e))
    sys.exit(1)

def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))

# One agent ("confab") per run; merge in case there are several.
cases = {}
for agent_cases in index.values():
    cases.update(agent_cases)

# A case is a failure if its behavior is FAILED, or if the closing handshake
# was FAILED/UNCLEAN (the HTML report paints both red).
BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
counts = dict((b, 0) for b in BEHAVIORS)
failed = []
for case_id in sorted(cases, key=case_key):
    r = cases[case_id]
    behavior = r.get("behavior")
    counts[behavior] = counts.get(behavior, 0) + 1
    close = r.get("behaviorClose")
    if behavior == "FAILED" or close in ("FAILED", "UNCLEAN"):
        failed.append("%s (behavior=%s, close=%s, remoteCloseCode=%s)"
                      % (case_id, behavior, close, r.get("remoteCloseCode")))

# The path only: the port changes every run, and this summary is committed.
where = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else url
print("Autobahn fuzzingclient vs confab %s: %d cases" % (where, len(cases)))
for b in BEHAVIORS + sorted(set(counts) - set(BEHAVIORS)):
    print("  %-14s %d" % (b, counts[b]))
for b in ("NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"):
    ids = [c for c in sorted(cases, key=case_key) if cases[c].get("behavior") == b]
    if ids:
        print("  %s: %s" % (b, ", ".join(ids)))
if failed:
    print("FAILED cases (%d):" % len(failed))
    for line in failed:
        print("  " + line)
if not cases:
    print("No cases ran: was the server listening at %s?" % url)
sys.exit(1 if failed or not cases else 0)
EOF
cat "$OUT/summary.txt"
# When nothing ran, wstest's log says why (e.g. "Connection ... refused").
if grep -q "^No cases ran" "$OUT/summary.txt"; then
    grep -i -m 5 "fail\|error\|refused" "$REPORTS/wstest.log" >&2 || true
fi
echo "HTML report: $REPORTS/index.html"
exit "$SUMMARY_RC"
