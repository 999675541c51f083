#!/bin/bash
# failover-test: a test failover of a real VM at an older recovery point,
# while replication goes on.
#
# The test guest (tests/guest/guest.S: a boot sector that writes
# sequence-stamped sectors, prints to COM1 and ends QEMU) runs on the
# primary under QEMU while it replicates every second with recovery history
# on, so the Replica server keeps points in the middle of its run.  Then, on
# the Replica server, `failover start g1 --test --point P` for a point in
# the middle must boot "g1 - Test" from a qcow2 overlay on a read-only view
# of point P: the guest runs again and prints "done", writing into the
# overlay only.  Meanwhile the primary keeps changing the disk and cycles
# keep being applied to the Replica VM; the view must still be exactly the
# primary's disk at cycle P (its hash at that seal), and the Replica disk
# must converge byte-identical to the primary's, untouched by the test VM.
# `failover stop g1 --test` removes the test VM.  Refusals: a second test
# failover, an unknown point, a failover while the primary is in
# contact, failover on the primary, replication remove during a test.  Then
# the Replica server is SIGKILLed at each step of starting and of stopping
# a test failover; after its restart the test failover is whole or gone.
# Last, the test VM of i1 (an empty disk: its QEMU stays up) must be
# listed and shown running, with "hypervisor" true.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img jq curl openssl nbdkit python3 cmp sha256sum pgrep
requires_build

VR_TIMEOUT=90
GUEST_TIMEOUT=${GUEST_TIMEOUT:-90}
HASHLOG=$TESTDIR/hashlog
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}" VMREPLICA_TEST_HASHLOG="$HASHLOG")
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")

guest_params

setup_pair
create_guest_vm g1 --frequency 1s --recovery-history 2 --point-interval 120s

log "run the guest on the primary while it replicates"
run_guest_replicated g1

RDISK=$(disk_path replica g1)
pts=$(vrj replica points list g1 | jq -c .points) || fail "points list"
n=$(jq length <<<"$pts")
[ "$n" -ge 3 ] || fail "only $n points kept during the guest's run"
mid_run_point g1 "$pts"
want=$(awk -v c="$P" '$1 == c { print $3 }' "$HASHLOG")
log "point $P has the guest at stamp $PSTAMP of $TOTAL"

out=$(vrj replica failover start g1 --test --point "$P") ||
    fail "failover start g1 --test --point $P"
[ "$(jq -r .test_vm <<<"$out")" = "g1 - Test" ] || fail "test VM name: $out"
TESTRUN=$(jq -r .run_dir <<<"$out")
[ "$(repl replica g1 state)" = TestFailoverInProgress ] ||
    fail "Replica VM state during a test: $(repl replica g1 state)"
[ "$(vrj replica replication list --mode test | jq -r '[.replications[].vm] | join(",")')" = g1 ] ||
    fail "replication list --mode test: $(vrj replica replication list --mode test)"
t=$(vrj replica vm show "g1 - Test") || fail "vm show \"g1 - Test\""
[ "$(jq -r '.mode + " " + .test_of + " " + (.point|tostring)' <<<"$t")" = "test g1 $P" ] ||
    fail "the test VM: $t"
vrj replica vm list | jq -e '.vms[] | select(.name == "g1 - Test" and .mode == "test")' \
    >/dev/null || fail "vm list has no \"g1 - Test\""
err=$(vr replica failover start g1 --test 2>&1) &&
    fail "a second test failover was accepted"
grep -q "a test failover is running (point $P)" <<<"$err" ||
    fail "second test failover: $err"

err=$(vr replica replication remove g1 2>&1) &&
    fail "replication remove accepted during a test failover"
grep -q "a test failover is running" <<<"$err" || fail "remove during test: $err"

log "keep changing the primary while the test VM runs"
puri=$(nbd_uri primary g1)
for i in 1 2 3; do
    qemu-io -f raw "$puri" -c "write -P $((0x40 + i)) $((32 + i))M 1M" >/dev/null ||
        fail "primary write $i"
    sleep 1
done
wait_until "$GUEST_TIMEOUT" grep -q '^done' "$TESTRUN/console.log" ||
    fail "the test VM did not run the guest to done: $(cat "$TESTRUN/console.log" 2>/dev/null)"
grep -q "vmreplica test guest" "$TESTRUN/console.log" || fail "test VM console"
wait_converged g1 60
applied=$(repl replica g1 applied_cycle)
[ "$applied" -gt "$P" ] || fail "replication stopped during the test"
qemu-img convert -f raw -O raw "nbd+unix:///disk0?socket=$TESTRUN/nbd.sock" \
    "$TESTDIR/view.raw" || fail "read the test view"
[ "$(sha256sum "$TESTDIR/view.raw" | cut -d' ' -f1)" = "$want" ] ||
    fail "after cycles up to $applied the test view is not point $P"
qemu-img convert -f qcow2 -O raw "$TESTRUN/disk0.qcow2" "$TESTDIR/ov.raw" ||
    fail "read the overlay"
[ "$(max_stamp "$TESTDIR/ov.raw")" = "$TOTAL" ] ||
    fail "the test VM's own writes are not in its overlay"
assert_identical g1
log "test VM ran from point $P; replication went on to cycle $applied; replica untouched"

vr replica failover stop g1 --test >/dev/null || fail "failover stop --test"
[ ! -e "$TESTRUN" ] || fail "test run directory left: $(ls "$TESTRUN")"
err=$(vr replica failover stop g1 --test 2>&1) && fail "second stop accepted"
grep -q "no test failover is running" <<<"$err" || fail "second stop: $err"
err=$(vr replica failover start g1 --test --point 999999 2>&1) &&
    fail "unknown point accepted"
grep -q "no recovery point 999999" <<<"$err" || fail "unknown point: $err"
err=$(vr replica failover start g1 2>&1) &&
    fail "failover accepted while the primary is in contact"
grep -q "was in contact" <<<"$err" || fail "failover without --test: $err"
err=$(vr primary failover start g1 --test 2>&1) && fail "test failover on the primary"
grep -q "vm g1 is a primary VM here, replicating to replica.test.local:$REPLICA_PORT: a failover runs on the Replica server" <<<"$err" || fail "failover on the primary: $err"

# SIGKILL of the Replica server at each step of starting and stopping a
# test failover: after the restart it is either whole (view and QEMU both
# running) or gone without a trace — never half done.
test_procs() { pgrep -f -- "$TESTRUN" >/dev/null; }
assert_no_test() { # WHAT
    [ "$(repl replica g1 test_failover_point)" = null ] ||
        fail "$1: test failover still recorded"
    [ ! -e "$TESTRUN" ] || fail "$1: $TESTRUN left behind"
    test_procs && fail "$1: test processes still running: $(pgrep -af -- "$TESTRUN")"
    return 0
}
for fault in test-start-pinned:1 test-start-view:1 test-start-overlays:1 \
             test-start-qemu:1; do
    crash_replica "$fault" failover start g1 --test
    if [ "$fault" = test-start-qemu:1 ]; then
        tp=$(repl replica g1 test_failover_point)
        [ "$tp" != null ] || fail "$fault: a fully started test was undone"
        test_procs || fail "$fault: test processes not running"
        vr replica failover stop g1 --test >/dev/null || fail "$fault: stop"
    fi
    assert_no_test "after a crash at $fault"
    log "crash at $fault: test failover whole or gone"
done
for fault in test-stop-stopped:1 test-stop-removed:1; do
    vr replica failover start g1 --test >/dev/null || fail "start before $fault"
    crash_replica "$fault" failover stop g1 --test
    assert_no_test "after a crash at $fault"
    log "crash at $fault: test failover gone"
done
vr replica failover start g1 --test >/dev/null || fail "start after the crashes"
vr replica failover stop g1 --test >/dev/null || fail "stop after the crashes"
wait_converged g1 60
assert_identical g1
assert_replicating g1

log "the status of a test VM is that of its processes"
create_vm i1 8M
enable_replication i1 --frequency 1s --recovery-history 2 --point-interval 120s
wait_converged i1 60
vr replica failover start i1 --test >/dev/null || fail "failover start i1 --test"
assert_vm_runs replica "i1 - Test"
vr replica failover stop i1 --test >/dev/null || fail "failover stop i1 --test"
log "i1 - Test: vm list and vm show say running, hypervisor true"
log "PASS"
