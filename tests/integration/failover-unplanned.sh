#!/bin/bash
# failover-unplanned: unplanned failover of a real VM to an older recovery
# point — refused while the primary is in contact, cancelled, tried again,
# completed — and the old primary's stale epoch refused afterwards.
#
# The test guest (tests/guest/guest.S) runs on the primary while it
# replicates every second with recovery history on; the primary's plugin
# logs the hash of the disk at every cycle (hashlog).  On the Replica
# server:
#   - `failover start g1` is refused while the primary is in contact;
#   - the primary daemon is SIGKILLed (the disaster); `failover start i1
#     --point N --force` of a VM whose QEMU stays up (an empty disk): `vm
#     list` and `vm show` say running, "hypervisor" is true, no nbd_uri
#     names a missing socket (they said "served", false and one);
#   - `failover start g1
#     --point P` for a point in the middle of the guest's run boots g1 from
#     P: the guest runs again and prints "done"; the view under it hashes
#     to the primary's disk at cycle P;
#   - `failover stop g1` cancels: the Replica disk is untouched, the state
#     is Replicating again;
#   - `failover start g1 --point P` again, the guest runs to "done", then
#     `failover complete g1`: the Replica disk is exactly the overlay's
#     content (point P plus the guest's writes), no recovery point is left,
#     the state is FailedOver and the epoch is new;
#   - the old primary comes back and ships a cycle: it is refused as stale
#     (an audit event on the Replica server, Error on the primary) and the
#     Replica disk does not change;
#   - `vm start g1` boots the failed-over VM from its own disk.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img qemu-io jq curl openssl nbdkit python3 cmp sha256sum
requires_build

VR_TIMEOUT=90
GUEST_TIMEOUT=${GUEST_TIMEOUT:-90}
HASHLOG=$TESTDIR/hashlog
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}" VMREPLICA_TEST_HASHLOG="$HASHLOG")
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")

guest_params
sha() { sha256sum "$1" | cut -d' ' -f1; }

setup_pair
create_guest_vm g1 --frequency 1s --recovery-history 2 --point-interval 120s

log "run the guest on the primary while it replicates"
run_guest_replicated g1

RDISK=$(disk_path replica g1)
pts=$(vrj replica points list g1 | jq -c .points) || fail "points list"
mid_run_point g1 "$pts"
want=$(awk -v c="$P" '$1 == c { print $3 }' "$HASHLOG")
[ -n "$want" ] || fail "no hash of cycle $P in the primary's hashlog"
latest_hash=$(sha "$RDISK")
log "point $P has the guest mid-run"

# i1: an empty disk, so its QEMU stays up (the firmware finds nothing to
# boot and waits) while its status is checked.  Made only now: its disk's
# hashes at each seal go to the same hashlog, under the same disk id.
create_vm i1 8M
enable_replication i1 --frequency 1s --recovery-history 2 --point-interval 120s
qemu-io -f raw "$(nbd_uri primary i1)" -c "write -P 0x11 0 1M" >/dev/null ||
    fail "write i1"
wait_converged i1 60

err=$(vr replica failover start g1 --point "$P" 2>&1) &&
    fail "failover accepted while the primary is in contact"
grep -q "primary server primary.test.local was in contact" <<<"$err" ||
    fail "failover while the primary is in contact: $err"
err=$(vr primary failover start g1 2>&1) && fail "failover on the primary"
grep -q "vm g1 is a primary VM here, replicating to replica.test.local:$REPLICA_PORT: a failover runs on the Replica server" <<<"$err" ||
    fail "failover on the primary: $err"
err=$(vr replica failover complete g1 2>&1) && fail "complete without failover"
grep -q "no failover to complete" <<<"$err" || fail "complete without failover: $err"

log "the disaster: the primary server dies"
kill_daemon primary
sleep 9 # three replication periods plus 5 s without contact

log "the status of a failed-over VM is that of its processes"
IP=$(vrj replica points list i1 | jq '.points[-1].id')
out=$(vrj replica failover start i1 --point "$IP" --force) ||
    fail "failover start i1 --point $IP --force"
assert_vm_runs replica i1
vr replica failover stop i1 >/dev/null || fail "failover stop i1"
[ "$(vr replica vm list | awk 'index($0, "i1  ") == 1 { print $NF }')" = stopped ] ||
    fail "i1 after failover stop: $(vr replica vm list)"
log "i1 failed over: vm list and vm show say running, hypervisor true"

# start_at P — fail over to point P; sets RUN (its run directory).
start_at() {
    local out
    out=$(vrj replica failover start g1 --point "$1") ||
        fail "failover start g1 --point $1"
    [ "$(jq -r .state <<<"$out")" = FailOverWaitingCompletion ] ||
        fail "state after failover start: $out"
    RUN=$(jq -r .run_dir <<<"$out")
    [ "$(repl replica g1 failover_point)" = "$1" ] || fail "failover_point"
    wait_until "$GUEST_TIMEOUT" grep -q '^done' "$RUN/console.log" ||
        fail "the failed-over VM did not run the guest to done: $(cat "$RUN/console.log" 2>/dev/null)"
    grep -q "vmreplica test guest" "$RUN/console.log" || fail "console"
    qemu-img convert -f raw -O raw "nbd+unix:///disk0?socket=$RUN/nbd.sock" \
        "$TESTDIR/view.raw" || fail "read the view"
    [ "$(sha "$TESTDIR/view.raw")" = "$want" ] ||
        fail "the failed-over VM does not start from the primary's disk at cycle $1"
}

start_at "$P"
err=$(vr replica failover start g1 2>&1) && fail "a second failover accepted"
grep -q "failed over at point $P" <<<"$err" || fail "second failover: $err"
err=$(vr replica failover start g1 --test 2>&1) && fail "test failover during failover"
grep -q "failed over at point $P" <<<"$err" || fail "test during failover: $err"
err=$(vr replica replication remove g1 2>&1) && fail "remove during failover"
grep -q "failed over at point $P" <<<"$err" || fail "remove during failover: $err"
log "g1 booted from point $P on the Replica server"

vr replica failover stop g1 >/dev/null || fail "failover stop (cancel)"
[ ! -e "$RUN" ] || fail "cancel left $RUN"
[ "$(repl replica g1 state)" = Replicating ] || fail "state after cancel: $(repl replica g1 state)"
[ "$(repl replica g1 failover_point)" = null ] || fail "failover_point after cancel"
[ "$(sha "$RDISK")" = "$latest_hash" ] || fail "cancel changed the Replica disk"
log "cancelled: the Replica disk is still the latest point"

start_at "$P"
wait_until 30 vm_stopped replica g1 ||
    fail "the failed-over guest's QEMU did not exit after done"
qemu-img convert -f qcow2 -O raw "$RUN/disk0.qcow2" "$TESTDIR/ov.raw" ||
    fail "read the overlay"
[ "$(max_stamp "$TESTDIR/ov.raw")" = "$TOTAL" ] ||
    fail "the guest's writes are not in its overlay"
epoch=$(repl replica g1 epoch)
out=$(vrj replica failover complete g1) || fail "failover complete"
[ "$(jq -r .state <<<"$out")" = FailedOver ] || fail "complete: $out"
[ "$(repl replica g1 epoch)" -gt "$epoch" ] || fail "epoch not bumped: $out"
cmp "$RDISK" "$TESTDIR/ov.raw" ||
    fail "after complete the Replica disk is not point $P plus the guest's writes"
[ "$(vrj replica points list g1 | jq '.points | length')" = 0 ] ||
    fail "recovery points left after complete: $(vrj replica points list g1)"
[ ! -e "$RUN" ] || fail "complete left $RUN"
err=$(vr replica failover stop g1 2>&1) && fail "cancel after complete"
grep -q "no failover to cancel" <<<"$err" || fail "cancel after complete: $err"
err=$(vr replica failover start g1 --force 2>&1) && fail "failover after complete"
grep -q "failover is complete" <<<"$err" || fail "failover after complete: $err"
done_hash=$(sha "$RDISK")
log "complete: the Replica disk is point $P plus the failed-over VM's writes"

log "the old primary comes back"
audits() { vrj replica events --vm g1 | jq '[.events[] | select(.level == "audit")] | length'; }
a0=$(audits)
start_primary "${PRIMARY_ENV[@]}"
puri=$(nbd_uri primary g1)
qemu-io -f raw "$puri" -c "write -P 0x77 40M 1M" >/dev/null || fail "write on the old primary"
wait_until 30 repl_is primary g1 state Error ||
    fail "the old primary is still $(repl primary g1 state): $(repl primary g1 last_error)"
repl primary g1 last_error | grep -q "epoch .* refused" ||
    fail "old primary's error: $(repl primary g1 last_error)"
# It says where the VM runs now, that this copy is stale, and what to run.
repl primary g1 last_error | grep -qF "the VM failed over on replica.test.local, so the copy on primary.test.local is stale and its changes are refused; on primary.test.local run 'vmreplica replication remove g1' (its disks are kept), and protect the VM again from replica.test.local ('vmreplica replication reverse g1' there)" ||
    fail "old primary's error does not say what happened: $(repl primary g1 last_error)"
[ "$(audits)" -gt "$a0" ] || fail "the stale upload was not audited"
vrj replica events --vm g1 | jq -r '.events[] | select(.level == "audit") | .message' |
    grep -q "refused cycle from primary.test.local .*epoch" ||
    fail "audit line: $(vrj replica events --vm g1 | jq -c '.events[-3:]')"
[ "$(sha "$RDISK")" = "$done_hash" ] || fail "a stale cycle changed the Replica disk"
log "the old primary's stale epoch was refused and audited; nothing applied"

vr replica vm start g1 >/dev/null || fail "vm start g1 after failover"
RCONSOLE=$(state_dir replica)/run/$UUID/console.log
wait_until "$GUEST_TIMEOUT" grep -q '^done' "$RCONSOLE" ||
    fail "g1 did not boot from its failed-over disk"
log "g1 boots from its own disk on the former Replica server"
log "PASS"
