#!/usr/bin/env bash
# power-cut.sh: power loss of the data plane's files (power-cut.py,
# tests/tools/powercut.c): nbdkit under an LD_PRELOAD layer that keeps what
# each fsync/fdatasync made durable, SIGKILL under a writer and a shipper,
# then STATES power-loss states per cut (unsynced 512 B sectors or 4 KiB
# pages dropped, kept, or a seeded subset), each restarted under another
# boot id and checked: flushed requests on the disk, the dirty map covers
# every difference from the replica.  CUTS (default 4), STATES (default
# 4), SEED (default 1); SOAK=1 runs SOAK_CUTS (default 100) x 8 states.
#
# Env: BUILD_DIR (default ./build), VMREPLICA_PLUGIN.
# Exit: 0 pass, 1 fail, 77 skip.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
CYCAPPLY=$BUILD_DIR/tests/tools/cycapply
POWERCUT=$BUILD_DIR/tests/tools/libpowercut.so
PY=/usr/bin/python3
CUTS=${CUTS:-4}
STATES=${STATES:-4}
SEED=${SEED:-1}
if [ "${SOAK:-0}" != 0 ]; then CUTS=${SOAK_CUTS:-100}; STATES=8; fi

skip() { echo "skip: $*"; exit 77; }
command -v nbdkit >/dev/null 2>&1 || skip "nbdkit not found"
"$PY" -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed"
[ -f "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
[ -x "$CYCAPPLY" ] || skip "cycapply not built: $CYCAPPLY"
[ -f "$POWERCUT" ] || skip "powercut layer not built: $POWERCUT"

T=$(mktemp -d /dev/shm/vrt-power-cut.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$T"' EXIT

"$PY" "$(dirname "$0")/power-cut.py" --plugin "$(realpath "$PLUGIN")" \
    --cycapply "$(realpath "$CYCAPPLY")" --powercut "$(realpath "$POWERCUT")" \
    --dir "$T" --cuts "$CUTS" --states "$STATES" --seed "$SEED"
