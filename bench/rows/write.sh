#!/usr/bin/env bash
# bench row 1 (fio half): guest-visible write cost, 4 KiB random at QD1 and
# QD16 and 1 MiB sequential at QD4, the tracked export against nbdkit's own
# `file` plugin on the same kind of file, fio's nbd engine, cycles sealed
# every second and shipped at once (bench/bench-plugin.sh, which this row
# runs; target >= 0.9x).  qemu-img bench, qemu-nbd and QEMU on the raw file
# (the rest of row 1): the qwrite row.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/lib.sh"
BUILD_DIR=${BUILD_DIR:-$here/../build}
if [ "$SMOKE" = 1 ]; then
    # fio takes half a second to start: half a second of writes, sealed
    # four times a second, is enough to show the row still runs.
    export RUNTIME=500ms CYCLE_S=0.25 SIZE=64M
else
    export RUNTIME=${RUNTIME:-10} SIZE=${SIZE:-1G}
fi
export ROUNDS BUILD_DIR SHIP_LAG=${SHIP_LAG:-0} DIR=${DIR:-/tmp}
out=$(bash "$here/bench-plugin.sh")
echo "$out" >&2
while read -r job f fu t tu r _; do
    case $job in rand4k-qd1 | rand4k-qd16 | seq1m) ;; *) continue ;; esac
    result "writes $job, tracked vs nbdkit file (fio, $fu)" "$t" "$f (nbdkit file)" \
        "${r%x}" ">= 0.9" "$(met_ge "${r%x}" 0.9)"
done <<<"$out"
