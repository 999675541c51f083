#!/usr/bin/env bash
# bench row 8: test-failover open time at the oldest of 24 recovery points
# on a 16 GiB sparse Replica disk (build/bench/bench-view: undo_view_open
# plus the first read, median of 5, warm cache; 256 MiB of data, 25 cycles
# of 256 x 64 KiB writes), against what opening the point would cost
# without undo views: copying the disk (`cp --sparse=always` + sync, which
# bench-view times too).  The same on a 1 GiB disk shows whether the open
# depends on the disk's size.  Smoke: bench-view -s (a sixteenth of the
# data and writes).
source "$(dirname "$0")/../../tests/integration/functions.sh"
source "$(dirname "$0")/../lib.sh"
BV=$BUILD_DIR/bench/bench-view
[ -x "$BV" ] || skip "bench-view not built ($BV)"

flag=()
[ "$SMOKE" = 1 ] && flag=(-s)
LARGE=${BENCH_VIEW_GIB:-16}
opens=() cps=() smalls=()
for _ in $(seq "$ROUNDS"); do
    out=$("$BV" ${flag[@]+"${flag[@]}"} "$TESTDIR" 1 "$LARGE") || fail "bench-view"
    echo "$out" >&2
    read -r _ _ s _ _ < <(grep '^small ' <<<"$out")
    read -r _ _ o c _ < <(grep '^large ' <<<"$out")
    opens+=("$o") cps+=("$c") smalls+=("$s")
done
o=$(median "${opens[@]}") c=$(median "${cps[@]}") s=$(median "${smalls[@]}")
r=$(ratio "$o" "$c")
result "test-failover open, oldest of 24 points, $LARGE GiB disk (ms)" "$o" \
    "$c (cp --sparse + sync)" "$r" "report" "-"
r=$(ratio "$o" "$s")
result "the same open, $LARGE GiB vs 1 GiB disk (ms)" "$o" "$s (1 GiB)" "$r" \
    "<= 1.5" "$(met_le "$r" 1.5)"
