#!/usr/bin/env bash
# plugin-order.sh: the data plane's ordering rules, one named scenario per
# defect of issue #9 it fixes (plugin-order.py): a completed write always
# survives a crash (1), and a sealed segment is durable before the next
# exists (8).  Defect 3 (a failed preserve) is in plugin-stop.sh.
#
# Env: BUILD_DIR (default ./build), VMREPLICA_PLUGIN.
# Exit: 0 pass, 1 fail, 77 skip.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
CYCAPPLY=$BUILD_DIR/tests/tools/cycapply
PY=/usr/bin/python3

skip() { echo "skip: $*"; exit 77; }
for c in nbdkit strace; do
    command -v "$c" >/dev/null 2>&1 || skip "$c not found"
done
"$PY" -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed"
[ -f "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
[ -x "$CYCAPPLY" ] || skip "cycapply not built: $CYCAPPLY"

T=$(mktemp -d /tmp/vrt-plugin-order.XXXXXX)
trap 'rm -rf "$T"' EXIT

"$PY" "$(dirname "$0")/plugin-order.py" --plugin "$(realpath "$PLUGIN")" \
    --cycapply "$(realpath "$CYCAPPLY")" --dir "$T" "$@"
