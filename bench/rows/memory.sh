#!/usr/bin/env bash
# bench row 5: the primary's memory with 10 VMs of 1 TiB sparse disks
# replicating every second (then 50 in the full run): PSS of vmreplicad
# plus every nbdkit it runs, from /proc/PID/smaps_rollup (target: <= 64 MiB
# in all, flat in VM count past the first).
source "$(dirname "$0")/../../tests/integration/functions.sh"
source "$(dirname "$0")/../lib.sh"
requires jq qemu-io
requires_build

DISK=${BENCH_MEMORY_DISK:-$([ "$SMOKE" = 1 ] && echo 1G || echo 1T)}
COUNTS=${BENCH_MEMORY_COUNTS:-$([ "$SMOKE" = 1 ] && echo 2 || echo "10 50")}
SETTLE=${BENCH_MEMORY_S:-$([ "$SMOKE" = 1 ] && echo 2 || echo 20)}
bench_pki
setup_pair >/dev/null

# pss_kib PATTERN [FIELD] [NAME] — the summed FIELD of smaps_rollup (KiB;
# default Pss) of the processes whose command line holds PATTERN and, with
# NAME, whose first word ends in NAME (command lines read with a builtin:
# a tr and a grep per process took over a second on a busy machine).
pss_kib() {
    local total=0 p v args
    for p in /proc/[0-9]*; do
        mapfile -d '' -t args 2>/dev/null <"$p/cmdline" || continue
        [[ "${args[*]}" == *"$1"* ]] || continue
        [ -z "${3:-}" ] || [[ "${args[0]:-}" == *"$3" ]] || continue
        v=$(awk -v f="${2:-Pss}:" '$1 == f { print $2 }' "$p/smaps_rollup" 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
# nbdkits PATTERN — how many nbdkit processes hold PATTERN.
nbdkits() {
    local n=0 p args
    for p in /proc/[0-9]*; do
        mapfile -d '' -t args 2>/dev/null <"$p/cmdline" || continue
        [[ "${args[0]:-}" == *nbdkit && "${args[*]}" == *"$1"* ]] && n=$((n + 1))
    done
    echo "$n"
}

have=0
for n in $COUNTS; do
    while [ "$have" -lt "$n" ]; do
        have=$((have + 1))
        create_vm "m$have" "$DISK"
        qemu-io -f raw "$(nbd_uri primary "m$have")" -c 'write -P 7 0 1M' >/dev/null
        enable_replication "m$have" --frequency 1s
    done
    sleep "$SETTLE"
    d=$(pss_kib "$(state_dir primary)")
    # The daemon's own: its command line names the state directory, as
    # nbdkit's do (their sockets are in it): take the daemon alone too.
    dd=$(awk '/^Pss:/ { print $2 }' "/proc/${DAEMON_PID[primary]}/smaps_rollup")
    result "primary memory, $n VMs x $DISK sparse at 1 s (PSS MiB; vmreplicad alone)" \
        "$((d / 1024))" "$((dd / 1024)) (vmreplicad)" "-" "<= 64" "$(met_le $((d / 1024)) 64)"
done

# What one more VM costs, against the floor of a process per VM: the
# private (anonymous) memory of each of our nbdkits, idle VMs replicating,
# and of an `nbdkit file` serving a disk of the same size, given the same
# first 1 MiB write, then idle.  (A process's share of the libraries both
# map goes to zero as VMs are added; its private memory does not.)
ours_n=$(nbdkits "$(state_dir primary)")
ours_anon=$(pss_kib "$(state_dir primary)" Pss_Anon nbdkit)
peers=()
for i in $(seq "$ours_n"); do
    truncate -s "$DISK" "$TESTDIR/peer$i.raw"
    nbdkit --foreground --unix "$TESTDIR/peer$i.sock" file \
        file="$TESTDIR/peer$i.raw" >/dev/null 2>&1 &
    peers+=($!)
    _bg_pids+=($!)
done
for i in $(seq "$ours_n"); do # the same first write as each VM's
    wait_until 30 test -S "$TESTDIR/peer$i.sock" || fail "nbdkit file did not start"
    qemu-io -f raw "nbd+unix:///?socket=$TESTDIR/peer$i.sock" \
        -c 'write -P 7 0 1M' >/dev/null || fail "write to nbdkit file $i"
done
sleep 0.5
peer_anon=$(pss_kib "$TESTDIR/peer" Pss_Anon nbdkit)
kill "${peers[@]}" 2>/dev/null
wait "${peers[@]}" 2>/dev/null
result "private memory of one VM's nbdkit, $ours_n VMs (Pss_Anon KiB)" \
    "$((ours_anon / ours_n))" "$((peer_anon / ours_n)) (nbdkit file)" \
    "$(ratio $((ours_anon / ours_n)) $((peer_anon / ours_n)))" "report" "-"

