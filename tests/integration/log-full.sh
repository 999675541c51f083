#!/bin/bash
# log-full: a full log file system never fails the guest (issue #11).
#
# A VM's change log (DISK.vrlog) is a 4 MiB tmpfs.  The VM replicates every
# second; the Replica server is stopped, so cycles pile up, and the guest
# keeps rewriting the same 2 MiB, so every write of a block of an unshipped
# cycle preserves it (4 KiB each) until the log file system is full.
#   - every guest write succeeds, also once the log is full, and the disk
#     holds them;
#   - the primary's health turns Critical with a detail saying tracking
#     stopped and why (no space), and the VM stays Replicating (retrying);
#   - with the Replica server back, no cycle is sent (the Replica VM stays
#     at its last cycle: the void cycles are never shipped);
#   - `replication resume --resync` restarts tracking in a new log (REARM)
#     and compares only the regions changed while the log could not follow
#     (the 64 MiB disk's first 2 MiB, and two 64 KiB pieces): at most
#     4 MiB compared, less sent, the Replica VM held at its last cycle
#     until the new cut is staged whole, then byte-identical, health
#     Normal.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp numfmt mount
requires_build
setup_pair

vm=full1
create_vm_small_log "$vm"
log "enable replication every second"
enable_replication "$vm" --frequency 1s --auto-resync off
wait_converged "$vm" 60
before=$(repl replica "$vm" applied_cycle)
# Nothing to resynchronize while tracking follows the disk.
err=$(vr primary replication resume "$vm" --resync 2>&1) &&
    fail "resume --resync with tracking intact succeeded: $err"
[ "$err" = "vmreplica: error: vm $vm: change tracking is intact, there is nothing to resynchronize (if it stopped since the last cycle, the next one will say so)" ] ||
    fail "resume --resync with tracking intact: $err"

log "stop the Replica server; rewrite 2 MiB of the disk until the log is full"
stop_daemon replica
full=false
for i in $(seq 1 40); do
    out=$(qemu-io -f raw "$uri" -c "write -P $((i % 200 + 20)) 0 2M" 2>&1) ||
        fail "guest write $i failed: $out"
    [[ $out == *"wrote 2097152/2097152"* ]] || fail "guest write $i: $out"
    if [ "$(jget primary .health replication show "$vm")" = Critical ]; then
        full=true
        break
    fi
    sleep 0.3
done
$full || fail "the log never filled (health $(jget primary .health replication show "$vm"))"
# More writes with the log full: they go on.
qemu-io -f raw "$uri" -c 'write -P 0xee 1M 1M' -c 'write -z 3M 64k' \
    -c 'discard 8M 64k' >/dev/null || fail "guest writes after the log filled"
want=$(mktemp "$TESTDIR/want.XXXXXX")
python3 - "$disk" "$want" <<'EOF' || fail "the disk does not hold the writes"
import sys
d = open(sys.argv[1], "rb").read(4 << 20)
assert d[1 << 20:2 << 20] == b"\xee" * (1 << 20), "1M..2M"
assert d[3 << 20:(3 << 20) + 65536] == bytes(65536), "zeroes at 3M"
EOF
details=$(vrj primary replication show "$vm" | jq -r '.health_details[]')
log "health Critical: $details"
[[ $details == *"change tracking stopped"*"No space left on device"* ]] ||
    fail "health details do not say tracking stopped for want of space: $details"
[ "$(repl primary "$vm" state)" = Replicating ] ||
    fail "primary state $(repl primary "$vm" state), want Replicating (retrying)"

log "start the Replica server again: no void cycle is shipped"
start_replica
sleep 4
# Cycles the primary had acknowledged before the stop (an empty one may
# have been in flight) are applied; nothing after them arrives.
acked=$(repl primary "$vm" last_cycle)
staged=$(repl replica "$vm" last_cycle)
[ "$staged" = "$acked" ] ||
    fail "the Replica server has cycle $staged, the primary acknowledged $acked: a void cycle was shipped"
wait_until 30 eval '[ "$(repl replica "$vm" applied_cycle)" = "$acked" ]' ||
    fail "the Replica server did not apply cycle $acked"
before=$acked
err=$(repl primary "$vm" last_error)
[[ $err == *"tracking stopped on this primary"*"stays at cycle"*"replication resume $vm --resync"* ]] ||
    fail "last_error does not say what to do: $err"

log "resynchronize: only the regions changed untracked are compared"
out=$(vr primary replication resume "$vm" --resync) || fail "replication resume --resync"
log "  $out"
wait_until 90 repl_is primary "$vm" state Replicating ||
    fail "the resynchronization did not complete: $(repl primary "$vm" state) $(repl primary "$vm" last_error)"
vrj primary replication measure "$vm" >"$TESTDIR/measure.json"
compared=$(jq -r .resync_compared "$TESTDIR/measure.json")
sent=$(jq -r .resync_sent "$TESTDIR/measure.json")
log "  compared $compared bytes, sent $sent bytes of chunks"
[ "$compared" -gt 0 ] && [ "$compared" -le $((4 << 20)) ] ||
    fail "the resynchronization compared $compared bytes (the changed regions are under 4 MiB of the 64 MiB disk)"
[ "$sent" -gt 0 ] && [ "$sent" -le "$compared" ] ||
    fail "the resynchronization sent $sent bytes of chunks for $compared compared"
vrj primary events | jq -r '.events[].message' |
    grep -q "^resynchronization complete: $compared bytes compared, $sent bytes of chunks sent; the Replica VM equals this VM again from cycle [0-9]*$" ||
    fail "no event for the completed resynchronization"
qemu-io -f raw "$uri" -c 'write -P 0x5a 5M 1M' >/dev/null
wait_converged "$vm" 90
assert_identical "$vm"
vrj replica events | jq -r '.events[].message' >"$TESTDIR/rev"
grep -q "^resynchronization by primary primary.test.local: the Replica VM stays at cycle $before until the new cut is received whole; its recovery points are kept$" "$TESTDIR/rev" ||
    fail "the Replica server did not hold its VM at cycle $before: $(grep resync "$TESTDIR/rev")"
grep -q "^resynchronization applied: the Replica VM is at cycle " "$TESTDIR/rev" ||
    fail "no replica event for the applied resynchronization"
assert_normal_after_outage "$vm"
grep -q "vmreplica tracking" "$disk.vrlog/tracking" ||
    fail "the tracking marker does not say tracking"
log "PASS"
