#!/usr/bin/env bash
# plugin-crash.sh: the data plane's concurrency and crash harness
# (plugin-crash.py: QD 48 writes/zeroes/trims over a hot region while
# cycles are sealed and shipped, SIGKILL at random moments and at named
# fault points, and after each restart: every completed request in the log,
# every cycle equal to the primary at its seal, the replica equal to the
# disk).  ROUNDS (default 200) and SEED (default 1); SOAK=1 runs 5000
# rounds (docs/reliability.md).
#
# Env: BUILD_DIR (default ./build), VMREPLICA_PLUGIN.
# Exit: 0 pass, 1 fail, 77 skip.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
CYCAPPLY=$BUILD_DIR/tests/tools/cycapply
PY=/usr/bin/python3
ROUNDS=${ROUNDS:-200}
SEED=${SEED:-1}
[ "${SOAK:-0}" = 0 ] || ROUNDS=${SOAK_ROUNDS:-5000}

skip() { echo "skip: $*"; exit 77; }
command -v nbdkit >/dev/null 2>&1 || skip "nbdkit not found"
"$PY" -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed"
[ -f "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
[ -x "$CYCAPPLY" ] || skip "cycapply not built: $CYCAPPLY"

# tmpfs: a process crash keeps the page cache, and fsync costs nothing.
T=$(mktemp -d /dev/shm/vrt-plugin-crash.XXXXXX)
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -f "$T/nbdkit.log" ]; then
        echo "--- nbdkit log (last 30 lines)"
        tail -30 "$T/nbdkit.log"
    fi
    rm -rf "$T"
}
trap cleanup EXIT

"$PY" "$(dirname "$0")/plugin-crash.py" --plugin "$(realpath "$PLUGIN")" \
    --cycapply "$(realpath "$CYCAPPLY")" --dir "$T" --rounds "$ROUNDS" \
    --seed "$SEED"
