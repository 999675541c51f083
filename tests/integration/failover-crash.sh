#!/bin/bash
# failover-crash: SIGKILL of the Replica server at each step of an
# unplanned failover's start, cancel and complete.
#
# Each Replica VM here replicates an 8 MiB disk every second with recovery
# history on: pattern A (0x11 at 0, 1 MiB) makes point P1, pattern B (0x22
# at 512 KiB, 1 MiB) the latest point.  QEMU boots nothing (an empty disk),
# so the disks' content is known exactly.  After a crash at any step of
# `failover start` the failover is undone: state Replicating, no run
# directory or process, the Replica disk at the latest point, and
# replication goes on.  A running failover survives a crash of the daemon.
# After a crash at any step of `failover stop` the cancel is finished.
# After a crash at any step of `failover complete` (including in the middle
# of reverting the disk, undo-revert:1) the completion is finished at the
# restart: FailedOver, a new epoch, no recovery point, and the disk exactly
# at P1 — the bytes of A and nothing of B.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img qemu-io jq curl openssl nbdkit python3 sha256sum pgrep
requires_build

VR_TIMEOUT=60
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
sha() { sha256sum "$1" | cut -d' ' -f1; }

setup_pair

# The disk at P1, built locally.
truncate -s 8M "$TESTDIR/p1.raw"
qemu-io -f raw "$TESTDIR/p1.raw" -c "write -P 0x11 0 1M" >/dev/null || fail "p1.raw"
P1_HASH=$(sha "$TESTDIR/p1.raw")

# mkvm VM — a Replica VM with points P1 (pattern A) and a later one (B);
# sets P1 and LATEST_HASH (the Replica disk now).
mkvm() {
    local vm=$1 uri
    create_vm "$vm" 8M
    enable_replication "$vm" --frequency 1s --recovery-history 2 --point-interval 120s
    uri=$(nbd_uri primary "$vm")
    qemu-io -f raw "$uri" -c "write -P 0x11 0 1M" >/dev/null || fail "write A"
    wait_converged "$vm" 60
    P1=$(vrj replica points list "$vm" | jq '.points[-1].id')
    qemu-io -f raw "$uri" -c "write -P 0x22 512k 1M" >/dev/null || fail "write B"
    wait_converged "$vm" 60
    LATEST_HASH=$(sha "$(disk_path replica "$vm")")
    [ "$LATEST_HASH" != "$P1_HASH" ] || fail "B changed nothing"
}
fo_dir() { echo "$(dirname "$(disk_path replica "$1")")/failover"; }
assert_not_failed_over() { # VM WHAT
    [ "$(repl replica "$1" state)" = Replicating ] ||
        fail "$2: state $(repl replica "$1" state)"
    [ "$(repl replica "$1" failover_point)" = null ] || fail "$2: failover_point set"
    [ ! -e "$(fo_dir "$1")" ] || fail "$2: $(fo_dir "$1") left: $(ls "$(fo_dir "$1")")"
    pgrep -f -- "$(fo_dir "$1")" >/dev/null &&
        fail "$2: processes left: $(pgrep -af -- "$(fo_dir "$1")")"
    [ "$(sha "$(disk_path replica "$1")")" = "$LATEST_HASH" ] ||
        fail "$2: the Replica disk changed"
    return 0
}

mkvm c0
for fault in failover-start-pinned:1 failover-start-view:1 \
             failover-start-overlays:1 failover-start-qemu:1; do
    crash_replica "$fault" failover start c0 --point "$P1" --force
    assert_not_failed_over c0 "after a crash at $fault"
    log "crash at $fault: the failover was undone"
done
vr replica failover start c0 --point "$P1" --force >/dev/null || fail "start c0"
kill_daemon replica
start_replica "${REPLICA_ENV[@]}"
[ "$(repl replica c0 failover_point)" = "$P1" ] || fail "a running failover did not survive a crash"
[ "$(vrj replica vm show c0 | jq -r .running)" = true ] || fail "c0 not running after the crash"
log "a running failover survives a crash of the Replica server"
for fault in failover-stop-marked:1 failover-stop-stopped:1 failover-stop-removed:1; do
    [ "$(repl replica c0 failover_point)" = "$P1" ] ||
        vr replica failover start c0 --point "$P1" --force >/dev/null ||
        fail "start before $fault"
    crash_replica "$fault" failover stop c0
    assert_not_failed_over c0 "after a crash at $fault"
    log "crash at $fault: the cancel was finished"
done
# Replication goes on after all that.
qemu-io -f raw "$(nbd_uri primary c0)" -c "write -P 0x33 4M 64k" >/dev/null || fail "write C"
wait_converged c0 60
assert_identical c0

i=1
for fault in failover-complete-marked:1 failover-complete-stopped:1 \
             undo-revert:1 failover-complete-reverted:1 \
             failover-complete-committed:1; do
    vm=c$i
    i=$((i + 1))
    mkvm "$vm"
    run=$(vrj replica failover start "$vm" --point "$P1" --force | jq -r .run_dir) ||
        fail "start $vm"
    # The guest shut down (QEMU boots nothing here: no clean shutdown).
    kill "$(cat "$run/qemu.pid")" || fail "stop $vm's QEMU"
    epoch=$(repl replica "$vm" epoch)
    crash_replica "$fault" failover complete "$vm"
    [ "$(repl replica "$vm" state)" = FailedOver ] ||
        fail "after a crash at $fault: state $(repl replica "$vm" state)"
    [ "$(repl replica "$vm" epoch)" -gt "$epoch" ] || fail "$fault: epoch"
    [ "$(vrj replica points list "$vm" | jq '.points | length')" = 0 ] ||
        fail "$fault: points left"
    [ ! -e "$run" ] || fail "$fault: $run left"
    [ "$(sha "$(disk_path replica "$vm")")" = "$P1_HASH" ] ||
        fail "after a crash at $fault the disk is not point $P1"
    log "crash at $fault: the completion was finished; the disk is point $P1"
done
log "PASS"
