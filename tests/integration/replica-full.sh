#!/bin/bash
# replica-full.sh — the Replica server's storage fills up (SPEC §4: a full
# replica disk is a recoverable error).  Cycles that cannot be staged are
# refused and retried by the primary; a staged cycle that cannot be applied
# stays staged and is retried; nothing is lost: once space is made the
# replica converges to the primary byte for byte, and neither side ends in
# Error.  The storage is a small tmpfs, grown with a remount.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp mount umount
requires_build
[ "$(id -u)" = 0 ] || skip "needs root to mount a small tmpfs"

setup_pair
store=$TESTDIR/small-store
mkdir -p "$store"
mount -t tmpfs -o size=40m tmpfs "$store" || skip "cannot mount tmpfs here"
cleanup_fn umount -l "$store"
vr replica server set --default-storage "$store" >/dev/null ||
    fail "replica: server set --default-storage"

vm=full
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
enable_replication "$vm" --frequency 1s --compression off

# 30 MiB: the cycle is staged (30 MiB) but applying it needs 30 MiB more.
log "write 30 MiB: staged in a 40 MiB store, no room left to apply it"
head -c 30M /dev/urandom >"$TESTDIR/big"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/big 0 30M" >/dev/null
wait_until 20 grep -q "replica storage full; retrying" "$TESTDIR/replica.log" ||
    fail "the replica did not report a full store while applying"
# 20 MiB more: now not even staging fits; the primary is refused.
log "write 20 MiB more: the upload itself no longer fits"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/big 32M 20M" >/dev/null
rm -f "$TESTDIR/big"
sleep 5
errs=$(vrj primary replication measure "$vm" | jq -r .replication_errors)
pstate=$(repl primary "$vm" state)
rstate=$(repl replica "$vm" state)
log "while full: primary $pstate with $errs errors, replica $rstate"
[ "$errs" -gt 0 ] || fail "the primary saw no error while the store was full"
[ "$pstate" = Replicating ] || fail "primary went to $pstate"
[ "$rstate" = Replicating ] || fail "replica went to $rstate"

log "grow the store; replication must catch up by itself"
mount -o remount,size=256m "$store" || fail "remount"
wait_converged "$vm" 90
assert_identical "$vm"
assert_replicating "$vm"
log "PASS"
