#!/bin/bash
# hints: a command run on the wrong server, or on a kept Replica copy, says
# what the VM is there and which command applies (issue #12, part 6).
#
#   - on the primary, `failover start` and `replication reverse` name the
#     Replica server they run on;
#   - a Replica VM whose replication was removed is one clear state: every
#     command (vm start, failover start, replication show/remove/reverse)
#     gives the same answer, naming the commands that do apply, and `vm
#     show` says kept_copy;
#   - after a planned failover, the hint to replicate back carries the
#     --replica-server that `replication reverse` will require.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64 qemu-io jq curl openssl nbdkit
requires_build
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
setup_pair

create_vm h1 8M
enable_replication h1 --frequency 1s
wait_converged h1 60

log "the primary points at the Replica server"
err=$(vr primary failover start h1 2>&1) && fail "failover start on the primary"
grep -qF "vm h1 is a primary VM here, replicating to replica.test.local:$REPLICA_PORT: a failover runs on the Replica server ('vmreplica failover start h1' there; for a planned one, 'vmreplica failover prepare h1' here first)" <<<"$err" ||
    fail "failover start on the primary: $err"
err=$(vr primary replication reverse h1 2>&1) && fail "reverse on the primary"
grep -qF "vm h1 is a primary VM here: 'replication reverse' runs on the server it failed over to (replica.test.local:$REPLICA_PORT), after 'vmreplica failover start h1' there" <<<"$err" ||
    fail "reverse on the primary: $err"

log "a kept Replica copy gives one answer"
vr primary replication remove h1 >/dev/null || fail "replication remove"
wait_until 10 eval '[ "$(jget replica .kept_copy vm show h1)" = true ]' ||
    fail "vm show: kept_copy $(jget replica .kept_copy vm show h1)"
kept="it is a kept Replica copy (its replication from primary.test.local was removed; the disks are kept). To replicate it again, run on primary.test.local 'vmreplica replication enable h1 …', then 'vmreplica initial-replication start h1 --use-existing' (only what differs is sent); to delete it here, 'vmreplica vm remove h1'"
check_kept() { # WHAT CMD…
    local what=$1 err
    shift
    err=$(vr replica "$@" 2>&1) && fail "$* on a kept copy succeeded"
    grep -qF "vm 'h1': $what does not apply: $kept" <<<"$err" ||
        fail "$* on a kept copy: $err"
}
check_kept "vm start" vm start h1 --no-hypervisor
check_kept "a failover" failover start h1
check_kept "a failover" failover start h1 --test
check_kept "this replication command" replication show h1
check_kept "this replication command" replication remove h1
check_kept "replication reverse" replication reverse h1

log "after a planned failover the hint carries --replica-server"
create_vm p1 8M
enable_replication p1 --frequency 1s
wait_converged p1 60
vr primary failover prepare p1 >/dev/null || fail "failover prepare p1"
out=$(vr replica failover start p1) || fail "planned failover start p1"
grep -qF "to replicate back, run 'vmreplica replication reverse p1 --replica-server primary.test.local:PORT' (PORT: the old primary's Replica server listener)" <<<"$out" ||
    fail "planned failover hint: $out"
vr replica vm stop p1 --force >/dev/null || fail "vm stop p1"
log "PASS"
