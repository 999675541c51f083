#!/usr/bin/env bash
# bench row 1 (qemu-img bench half): guest-visible write cost through
# QEMU's own NBD client, the path a VM takes: `qemu-img bench -w -t none
# -s 4096` (sequential 4 KiB writes, QCOUNT of them) at QD1 and QD16, on a
# fresh sparse raw file each run, through the tracked export (nbdkit with
# the vmreplica plugin, sealed every second and shipped at once, as the
# write row) against nbdkit `file` (target >= 0.9x) and `qemu-nbd` (report)
# on the same kind of file, and against qemu-img bench on the raw file
# itself without NBD (the limit of this path, through the page cache as
# the NBD servers write; target >= 0.8x).  bench/bench-plugin.sh runs it
# all, sides rotated round by round, medians.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/lib.sh"
BUILD_DIR=${BUILD_DIR:-$here/../build}
if [ "$SMOKE" = 1 ]; then
    export QCOUNT=${BENCH_QWRITE_COUNT:-3000} SIZE=64M
else
    export QCOUNT=${BENCH_QWRITE_COUNT:-200000} SIZE=${SIZE:-1G}
fi
export ROUNDS BUILD_DIR SHIP_LAG=${SHIP_LAG:-0} DIR=${DIR:-/tmp} \
    CLIENT=qemu-img KINDS="file tracked qemu-nbd direct"
out=$(bash "$here/bench-plugin.sh")
echo "$out" >&2
declare -A M
while read -r tag job kind v; do
    [ "$tag" = RES ] && M[$job.$kind]=$v
done <<<"$out"
for job in seq4k-qd1 seq4k-qd16; do
    t=${M[$job.tracked]:-} f=${M[$job.file]:-} q=${M[$job.qemu-nbd]:-} d=${M[$job.direct]:-}
    [ -n "$t" ] && [ -n "$f" ] && [ -n "$q" ] && [ -n "$d" ] ||
        { echo "qwrite: FAIL: no figures for $job" >&2; exit 1; }
    r=$(ratio "$t" "$f")
    result "writes $job, tracked vs nbdkit file (qemu-img bench, IOPS)" "$t" \
        "$f (nbdkit file)" "$r" ">= 0.9" "$(met_ge "$r" 0.9)"
    r=$(ratio "$t" "$q")
    result "writes $job, tracked vs qemu-nbd (qemu-img bench, IOPS)" "$t" \
        "$q (qemu-nbd)" "$r" "report" "-"
    r=$(ratio "$t" "$d")
    result "writes $job, tracked vs QEMU on the raw file (qemu-img bench, IOPS)" "$t" \
        "$d (no NBD)" "$r" ">= 0.8" "$(met_ge "$r" 0.8)"
done
