#!/bin/bash
# planned-crash: SIGKILL at each step of a planned failover and of
# reverse replication; after the restart nothing is half done and the step
# can be run again to the end, with no resynchronization.
#
#   - the primary dies at each step of `failover prepare` (disks stopped,
#     changes shipped, state recorded): after the restart `failover
#     prepare` again succeeds and the Replica server knows the very cycle
#     (the one its disk holds, byte for byte);
#   - the Replica server dies at each step of the planned `failover start`
#     (points reset, state recorded): after the restart it is either still
#     prepared (start again) or failed over with the VM's disk intact;
#   - the Replica server dies before and after its reverse registration is
#     accepted, and the old primary dies while accepting it: running
#     `replication reverse` again finishes it, and writes then flow the
#     other way, byte for byte, with no initial copy.
# The VMs have empty disks (QEMU boots nothing): the bytes are the test's.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img qemu-io jq curl openssl nbdkit python3 cmp
requires_build

VR_TIMEOUT=60
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")

setup_pair
PRIMARY_PORT=$(free_port)
mkdir -p "$TESTDIR/primary-storage"
vr primary server set --enable --auth certificate \
    --certificate-port "$PRIMARY_PORT" --allow-any \
    --default-storage "$TESTDIR/primary-storage" >/dev/null ||
    fail "primary: server set --enable"

# mkvm VM — replicating VM with a written 8 MiB disk, shut down.
mkvm() {
    create_vm "$1" 8M
    enable_replication "$1" --frequency 1s
    qemu-io -f raw "$(nbd_uri primary "$1")" -c "write -P 0x11 0 1M" \
        -c "write -P 0x12 3M 512k" >/dev/null || fail "write $1"
}
prepare_ok() { # VM — prepare must succeed and both sides agree on the cycle
    local out n
    out=$(vrj primary failover prepare "$1") || fail "failover prepare $1"
    [ "$(jq -r .state <<<"$out")" = PreparedForFailover ] || fail "prepare $1: $out"
    n=$(jq -r .prepared_cycle <<<"$out")
    wait_until 20 repl_is replica "$1" prepared_cycle "$n" ||
        fail "$1: the Replica server is not prepared at $n: $(repl replica "$1" prepared_cycle)"
}
same_disks() { # VM
    cmp "$(disk_path primary "$1")" "$(disk_path replica "$1")" ||
        fail "$1: the disks differ"
}

mkvm p1
for fault in prepare-stopped:1 prepare-shipped:1 prepare-saved:1; do
    crash_daemon primary "$fault" failover prepare p1
    state=$(repl primary p1 state)
    case $fault in
    prepare-saved:1)
        [ "$state" = PreparedForFailover ] || fail "$fault: state $state"
        err=$(vr primary vm start p1 2>&1) && fail "$fault: the VM started"
        grep -q "prepared for failover" <<<"$err" || fail "$fault: $err" ;;
    *)
        [ "$state" = Replicating ] || fail "$fault: state $state" ;;
    esac
    log "primary crash at $fault: state $state"
done
prepare_ok p1
wait_until 20 eval '[ "$(repl replica p1 applied_cycle)" = "$(repl replica p1 prepared_cycle)" ]' ||
    fail "p1: the prepared cycle is not applied"
same_disks p1
log "prepare finished after the crashes; the Replica disk is the primary's"

crash_replica planned-start-reset:1 failover start p1
[ "$(repl replica p1 state)" = Replicating ] || fail "planned-start-reset: $(repl replica p1 state)"
[ "$(repl replica p1 prepared_cycle)" != null ] || fail "planned-start-reset: not prepared"
crash_replica planned-start-saved:1 failover start p1
[ "$(repl replica p1 state)" = FailedOver ] || fail "planned-start-saved: $(repl replica p1 state)"
same_disks p1
log "planned start: undone before its record, kept after it"

reverse() { # VM [DAEMON-TO-CRASH FAULT]
    local args=(replication reverse "$1" --replica-server "primary.test.local:$PRIMARY_PORT"
        --connect-address 127.0.0.1)
    if [ $# -eq 1 ]; then
        vr replica "${args[@]}" >/dev/null || fail "reverse $1"
    elif [ "$2" = replica ]; then
        crash_replica "$3" "${args[@]}"
    else
        stop_daemon primary
        spawn_daemon primary "${PRIMARY_ENV[@]}" VMREPLICA_FAULT="$3"
        wait_daemon primary 20
        vr replica "${args[@]}" >/dev/null 2>&1 && fail "reverse survived $3"
        wait_until 30 daemon_dead primary || fail "primary did not die at $3"
        start_primary "${PRIMARY_ENV[@]}"
    fi
}
reverse p1 replica reverse-registering:1
[ "$(vrj replica vm show p1 | jq -r .mode)" = replica ] || fail "reverse-registering: mode"
[ "$(repl primary p1 state)" = PreparedForFailover ] || fail "reverse-registering: old primary"
reverse p1 replica reverse-registered:1
[ "$(vrj replica vm show p1 | jq -r .mode)" = replica ] || fail "reverse-registered: mode"
[ "$(vrj primary vm show p1 | jq -r .mode)" = replica ] ||
    fail "reverse-registered: the old primary did not accept"
reverse p1
SRC=replica DST=primary
wait_until 30 repl_is replica p1 state Replicating || fail "p1 reversed: $(repl replica p1 state)"
vr replica vm start p1 --no-hypervisor >/dev/null || fail "serve p1"
qemu-io -f raw "$(nbd_uri replica p1)" -c "write -P 0x21 5M 1M" >/dev/null || fail "write p1"
wait_converged p1 60
assert_identical p1
[ "$(vrj replica replication measure p1 | jq .initial_replication_sent)" = 0 ] ||
    fail "p1: the reverse copied a disk"
log "reverse after Replica-server crashes before and after registering: no resync"

SRC=primary DST=replica
mkvm p2
prepare_ok p2
vr replica failover start p2 >/dev/null || fail "planned start p2"
reverse p2 primary reverse-accepting:1
[ "$(repl primary p2 state)" = PreparedForFailover ] ||
    fail "reverse-accepting: the old primary is $(repl primary p2 state)"
[ "$(vrj replica vm show p2 | jq -r .mode)" = replica ] || fail "reverse-accepting: new primary"
reverse p2
SRC=replica DST=primary
wait_until 30 repl_is replica p2 state Replicating || fail "p2 reversed"
qemu-io -f raw "$(nbd_uri replica p2)" -c "write -P 0x22 6M 1M" >/dev/null || fail "write p2"
wait_converged p2 60
assert_identical p2
log "reverse after the old primary died while accepting it: no resync"

# A prepared primary is not suspended or resumed out of its state, and an
# unplanned failover at a chosen point (its disks diverge from the old
# primary's) is never reversed as if it were planned: by comparison.
SRC=primary DST=replica
mkvm p3
prepare_ok p3
for verb in suspend resume; do
    err=$(vr primary replication "$verb" p3 2>&1) && fail "$verb of a prepared VM"
    grep -q "prepared for failover; 'vmreplica failover stop p3' undoes" <<<"$err" ||
        fail "$verb prepared: $err"
done
pt=$(vrj replica points list p3 | jq '.points[-1].id')
vr replica failover start p3 --point "$pt" >/dev/null || fail "unplanned start of p3"
[ "$(repl replica p3 prepared_cycle)" = null ] || fail "p3 is still prepared"
err=$(vr replica replication suspend p3 2>&1) && fail "suspend during a failover"
grep -qF "a Replica VM is not suspended on the Replica server" <<<"$err" ||
    fail "suspend during failover: $err"
vr replica failover complete p3 >/dev/null || fail "complete p3"
vr replica vm start p3 --no-hypervisor >/dev/null || fail "serve p3"
vr replica replication reverse p3 --replica-server "primary.test.local:$PRIMARY_PORT" \
    --connect-address 127.0.0.1 >/dev/null || fail "reverse p3 after its unplanned failover"
SRC=replica DST=primary
wait_until 60 repl_is replica p3 state Replicating ||
    fail "p3 reversed: $(repl replica p3 state) $(repl replica p3 last_error)"
[ "$(jget replica .initial_replication_method replication measure p3)" = compare ] ||
    fail "p3's unplanned failover was reversed as if planned"
wait_converged p3 60
assert_identical p3
log "prepared and failed-over states hold; an unplanned failover is reversed by comparison"
log "PASS"
