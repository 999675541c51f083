#!/usr/bin/env bash
# plugin-stop.sh: replication never fails the guest (issue #11): when the
# change log cannot follow (a full log file system, a failed preserve, a
# damaged log), writes go on untracked, marked in a dirty map, and REARM
# plus the map bring a replica back (plugin-stop.py).  Mounts a tmpfs, so
# it needs root.
#
# Env: BUILD_DIR (default ./build), VMREPLICA_PLUGIN.
# Exit: 0 pass, 1 fail, 77 skip.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
CYCAPPLY=$BUILD_DIR/tests/tools/cycapply
PY=/usr/bin/python3

skip() { echo "skip: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "not root (mounts a tmpfs)"
for c in nbdkit mount; do
    command -v "$c" >/dev/null 2>&1 || skip "$c not found"
done
"$PY" -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed"
[ -f "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
[ -x "$CYCAPPLY" ] || skip "cycapply not built: $CYCAPPLY"

T=$(mktemp -d /tmp/vrt-plugin-stop.XXXXXX)
trap 'rm -rf "$T"' EXIT

"$PY" "$(dirname "$0")/plugin-stop.py" --plugin "$(realpath "$PLUGIN")" \
    --cycapply "$(realpath "$CYCAPPLY")" --dir "$T" "$@"
