#!/bin/bash
# failback-unplanned: after an unplanned failover, `replication reverse`
# sends only the divergence, not the disk (issue #11, part 6).
#
# A 64 MiB disk holding 24 MiB replicates.  The Replica server goes away
# and the primary writes 1 MiB it never ships, then goes away too (its VM
# shut down).  The Replica server fails over at its latest point, commits
# it, and the VM there writes 2 MiB.  The old primary comes back:
#   - a reverse while the old primary serves the VM's disks is refused
#     (EBUSY, saying what to run): it may still run the VM;
#   - the new primary is SIGKILLed right after the old one accepted the
#     registration (reverse-registered) and the command is run again: the
#     old primary accepts the same registration again;
#   - then the comparison sends exactly the 3 MiB that differ — the old
#     primary's unshipped 1 MiB (as zeroes: the point never had it) and the
#     new primary's 2 MiB — while the VM goes on writing, and both disks end
#     byte-identical.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp
requires_build

setup_pair
# The primary is a Replica server too, for the reverse direction; an
# authorization entry for the Replica server is all it needs.
PRIMARY_PORT=$(free_port)
mkdir -p "$TESTDIR/primary-storage"
vr primary server set --enable --auth certificate \
    --certificate-port "$PRIMARY_PORT" \
    --default-storage "$TESTDIR/primary-storage" >/dev/null ||
    fail "primary: server set --enable"
vr primary auth-entry add --primary replica.test.local \
    --storage "$TESTDIR/primary-storage" >/dev/null ||
    fail "primary: auth-entry add"
wait_until 10 port_open "$PRIMARY_PORT" || fail "primary: port $PRIMARY_PORT"

vm=fb1
create_vm "$vm" 64M
puri=$(nbd_uri primary "$vm")
qemu-io -f raw "$puri" -c 'write -P 0x11 0 24M' >/dev/null || fail "write"
enable_replication "$vm" --frequency 1s
wait_converged "$vm" 60
assert_identical "$vm"

log "the Replica server goes; the primary writes 1 MiB it never ships, then goes"
stop_daemon replica
qemu-io -f raw "$puri" -c 'write -P 0x22 30M 1M' >/dev/null || fail "write"
vr primary vm stop "$vm" >/dev/null || fail "primary: vm stop"
stop_daemon primary

log "unplanned failover; the VM writes 2 MiB on the Replica server"
start_replica
vr replica failover start "$vm" --force >/dev/null || fail "failover start"
vr replica failover complete "$vm" >/dev/null || fail "failover complete"
vr replica vm start "$vm" --no-hypervisor >/dev/null || fail "replica: serve"
ruri=$(nbd_uri replica "$vm")
qemu-io -f raw "$ruri" -c 'write -P 0x33 40M 2M' >/dev/null || fail "write"

log "the old primary returns, serving the VM's disks: the reverse is refused"
start_primary
vr primary vm start "$vm" --no-hypervisor >/dev/null || fail "primary: serve"
reverse() {
    vrj replica replication reverse "$vm" \
        --replica-server "primary.test.local:$PRIMARY_PORT" \
        --connect-address 127.0.0.1
}
err=$(reverse 2>&1) && fail "reverse while the old primary serves the disks"
grep -qF "its disks are served here, so it may still run here; run 'vmreplica vm stop $vm' on primary.test.local" <<<"$err" ||
    fail "reverse refusal: $err"
[ "$(jget primary .mode vm show "$vm")" = primary ] ||
    fail "the refused reverse changed the old primary's VM"
vr primary vm stop "$vm" >/dev/null || fail "primary: vm stop"

log "the new primary dies right after the old one accepted; reverse again"
stop_daemon replica
start_replica VMREPLICA_FAULT=reverse-registered:1
reverse >/dev/null 2>&1 && fail "reverse survived its fault point"
wait_until 30 daemon_dead replica || fail "the replica did not die at reverse-registered"
[ "$(jget primary .mode vm show "$vm")" = replica ] ||
    fail "the old primary did not accept the registration"
start_replica
vr replica vm start "$vm" --no-hypervisor >/dev/null || fail "replica: serve"
out=$(reverse) || fail "reverse again after the crash"
[ "$(jq -r .mode <<<"$out")" = primary ] || fail "reverse: $out"
vr replica events --vm "$vm" | grep -qF "replication reversed after an unplanned failover" ||
    fail "no reverse event on the new primary"
vr primary events --vm "$vm" | grep -qF "the disks are kept, and only the chunks that differ from replica.test.local's will be sent" ||
    fail "no reverse event on the old primary"

SRC=replica DST=primary
wait_until 90 repl_is replica "$vm" state Replicating ||
    fail "reverse: state $(repl replica "$vm" state): $(repl replica "$vm" last_error)"
qemu-io -f raw "$ruri" -c 'write -P 0x44 50M 1M' >/dev/null || fail "write"
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
m=$(vrj replica replication measure "$vm")
sent=$(jq .initial_replication_sent <<<"$m")
[ "$sent" = $((3 << 20)) ] ||
    fail "the reverse's comparison sent $sent bytes, not the 3 MiB that differ: $m"
compared=$(jq .initial_replication_compared <<<"$m")
[ "$compared" = $((64 << 20)) ] || fail "compared $compared bytes: $m"
log "reverse after an unplanned failover: $sent bytes sent for 3 MiB diverged"
log "PASS"
