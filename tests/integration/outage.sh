#!/bin/bash
# outage: a 2-minute Replica server outage under a steady writer, with a
# log budget small enough to overflow (issue #11, SPEC §3).
#
# The VM replicates every second with --log-budget 1M.  The Replica server
# is stopped for OUTAGE_S seconds (120) while a writer rewrites random
# 64 KiB blocks of the disk's first 16 MiB; the unsent cycles' preserve
# files pass the budget and the primary folds the log into dirty-region
# maps (Resynchronizing, a warning, never Error).  When the Replica server
# is back, replication resumes by itself: the folded regions are compared
# and only what differs is sent.  The replica ends byte-identical, and the
# payload bytes sent since the outage began are at most 1.5 x the distinct
# data the writer changed.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp sort
requires_build
OUTAGE_S=${OUTAGE_S:-120}

setup_pair

vm=out1
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
enable_replication "$vm" --frequency 1s --log-budget 1M
[ "$(jget primary .log_budget replication show "$vm")" = 1048576 ] ||
    fail "log budget not kept: $(jget primary .log_budget replication show "$vm")"
wait_converged "$vm" 60
raw0=$(vrj primary replication measure "$vm" | jq -r .bytes_sent_raw)

log "Replica server down for ${OUTAGE_S}s; a writer rewrites 64 KiB blocks of 16 MiB"
stop_daemon replica
: >"$TESTDIR/offsets"
end=$((SECONDS + OUTAGE_S))
n=0
worst=Replicating
while [ "$SECONDS" -lt "$end" ]; do
    off=$(((RANDOM % 256) * 65536))
    head -c 65536 /dev/urandom >"$TESTDIR/blk"
    qemu-io -f raw "$uri" -c "write -s $TESTDIR/blk $off 64k" >/dev/null ||
        fail "guest write $n failed during the outage"
    echo "$off" >>"$TESTDIR/offsets"
    n=$((n + 1))
    if [ $((n % 20)) = 0 ]; then
        st=$(repl primary "$vm" state)
        case $st in
        Replicating | Resynchronizing) [ "$st" = Replicating ] || worst=$st ;;
        *) fail "primary state $st during the outage" ;;
        esac
    fi
done
distinct=$(($(sort -u "$TESTDIR/offsets" | wc -l) * 65536))
log "  $n writes, $distinct distinct bytes; the primary went $worst"
[ "$worst" = Resynchronizing ] ||
    fail "the log never passed its budget (state stayed $worst)"
vrj primary events | jq -r '.events[] | select(.vm == "'"$vm"'") | .message' |
    grep -q "^the unsent change log passed its budget ([0-9]* bytes of 1048576): folded into dirty-region maps through cycle [0-9]*; only the regions changed are compared and sent when the Replica server answers$" ||
    fail "no event for the fold"

log "Replica server back: replication resumes by itself"
start_replica
wait_until 120 repl_is primary "$vm" state Replicating ||
    fail "replication did not resume: $(repl primary "$vm" state) $(repl primary "$vm" last_error)"
wait_converged "$vm" 90
assert_identical "$vm"
m=$(vrj primary replication measure "$vm")
sent=$(($(jq -r .bytes_sent_raw <<<"$m") - raw0))
log "  sent $sent payload bytes for $distinct distinct bytes changed (compared $(jq -r .resync_compared <<<"$m"))"
[ "$sent" -le $((distinct * 3 / 2)) ] ||
    fail "sent $sent bytes, more than 1.5 x the $distinct distinct bytes changed"
errs=$(vrj primary events | jq '[.events[] | select(.vm == "'"$vm"'" and .level == "error")] | length')
[ "$errs" = 0 ] || fail "$errs error events on the primary"
# The cycles the outage cost are counted (SPEC §9): the only detail left
# may be the share of missed cycles, which reset-stats clears.
det=$(vrj primary replication show "$vm" | jq -c '.health_details - ["more than 20% of cycles were missed"]')
[ "$det" = '[]' ] || fail "health after the outage: $det"
[ "$(jget primary .missed_replication_count replication measure "$vm")" -gt 0 ] ||
    fail "a ${OUTAGE_S}s outage at a 1 s frequency missed no cycle"
vr primary replication reset-stats "$vm" >/dev/null || fail "reset-stats"
[ "$(jget primary .health replication show "$vm")" = Normal ] ||
    fail "health after the outage: $(vrj primary replication show "$vm" | jq -c .health_details)"
log "PASS"
