#!/usr/bin/env bash
# log-mutate.sh: seeded mutations (bit flips, overwrites, zeroed sectors,
# truncations, duplicated and swapped records, huge lengths and offsets)
# of real change-log segments, preserve files and cycle payloads, fed to
# the change-log reader, the plugin's reopen and the Replica server's
# decoder and applier (log-mutate.py, tests/tools/logmut.c).  N mutations
# per input (default 400); SOAK=1 runs SOAK_N (default 20000).
#
# Env: BUILD_DIR (default ./build), VMREPLICA_PLUGIN, N, SEED.
# Exit: 0 pass, 1 fail, 77 skip.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
LOGMUT=$BUILD_DIR/tests/tools/logmut
PY=/usr/bin/python3
N=${N:-400}
SEED=${SEED:-1}
[ "${SOAK:-0}" = 0 ] || N=${SOAK_N:-20000}

skip() { echo "skip: $*"; exit 77; }
command -v nbdkit >/dev/null 2>&1 || skip "nbdkit not found"
"$PY" -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed"
[ -f "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
[ -x "$LOGMUT" ] || skip "logmut not built: $LOGMUT"

T=$(mktemp -d /dev/shm/vrt-log-mutate.XXXXXX)
trap 'rm -rf "$T"' EXIT

"$PY" "$(dirname "$0")/log-mutate.py" --plugin "$(realpath "$PLUGIN")" \
    --logmut "$(realpath "$LOGMUT")" --dir "$T" --n "$N" --seed "$SEED"
