#!/bin/bash
# failover-planned: planned failover of a real VM, reverse replication with
# no resynchronization, and fail-back the same way.
#
# Both daemons play both roles (each has a certificate port).  The test
# guest (tests/guest/guest.S) runs on the primary while g1 replicates.
#   - `failover prepare g1` on the primary is refused while the VM runs;
#     once it is shut down it ships every change and marks the VM
#     PreparedForFailover, after which the VM does not start there.
#   - `failover start g1` on the Replica server is the planned failover: the
#     disk is byte-identical to the primary's (no data loss), and g1 boots
#     there and runs the guest to "done".
#   - `replication reverse g1` makes the Replica server the primary and the
#     old primary its Replica server: no initial copy is sent (bytes sent
#     are only the new writes), the old primary's VM is now a Replica VM,
#     and new writes reach it byte for byte.
#   - Fail-back: prepare on the new primary, `failover start g1` on the
#     original primary (g1 boots there), `replication reverse g1` with the
#     Replica server remembered from before; writes replicate to the
#     former Replica server again.
#   - Refusals: prepare of a Replica VM, reverse of a VM not failed over.
#     (Reverse after an unplanned failover: failback-unplanned.sh.)
#   - The status of i1 (an empty disk: its QEMU stays up) after its planned
#     failover, and again after a restart of the daemon: `vm list` and `vm
#     show` say running, "hypervisor" is true, its nbd_uri names a socket.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img qemu-io jq curl openssl nbdkit python3 cmp sha256sum
requires_build

VR_TIMEOUT=120
GUEST_TIMEOUT=${GUEST_TIMEOUT:-90}
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")

guest_params
sha() { sha256sum "$1" | cut -d' ' -f1; }

setup_pair
# The primary is a Replica server too (for the reverse direction), and,
# as vmreplica(1) advises, admits only the other server: an authorization
# entry, not --allow-any.
PRIMARY_PORT=$(free_port)
mkdir -p "$TESTDIR/primary-storage"
vr primary server set --enable --auth certificate \
    --certificate-port "$PRIMARY_PORT" >/dev/null ||
    fail "primary: server set --enable"
vr primary auth-entry add --primary replica.test.local \
    --storage "$TESTDIR/primary-storage" >/dev/null ||
    fail "primary: auth-entry add --primary replica.test.local"
[ "$(jget primary .allow_any server show)" = false ] || fail "primary allows any server"
wait_until 10 port_open "$PRIMARY_PORT" || fail "primary: port $PRIMARY_PORT"

create_guest_vm g1 --frequency 1s --recovery-history 1 --point-interval 60s
UUID=$(jget primary .uuid vm show g1)
PDISK=$(disk_path primary g1)
RDISK=$(disk_path replica g1)

# run_guest DAEMON — boot g1 on DAEMON and wait for the guest's "done".
run_guest() {
    local console
    console=$(state_dir "$1")/run/$UUID/console.log
    rm -f "$console"
    vr "$1" vm start g1 >/dev/null || fail "$1: vm start g1"
    wait_until "$GUEST_TIMEOUT" grep -q '^done' "$console" ||
        fail "$1: the guest did not print done: $(cat "$console" 2>/dev/null)"
    wait_until 30 vm_stopped "$1" g1 ||
        fail "$1: QEMU did not exit after done"
}
# write_on DAEMON PATTERN OFFSET — serve g1's disk on DAEMON, write 1 MiB.
write_on() {
    vr "$1" vm start g1 --no-hypervisor >/dev/null || fail "$1: serve g1"
    qemu-io -f raw "$(nbd_uri "$1" g1)" -c "write -P $2 $3 1M" >/dev/null ||
        fail "$1: write"
}

log "the guest runs on the primary"
run_guest primary
vr primary vm start g1 --no-hypervisor >/dev/null || fail "serve g1"
vr primary vm start g1 >/dev/null 2>&1 # QEMU too: prepare must refuse
if [ "$(vrj primary vm show g1 | jq -r .running)" = true ]; then
    err=$(vr primary failover prepare g1 2>&1) && fail "prepare of a running VM"
    grep -q "is running; shut it down first" <<<"$err" || fail "prepare running: $err"
    wait_until 60 vm_stopped primary g1 ||
        fail "the guest did not end"
fi
err=$(vr replica failover prepare g1 2>&1) && fail "prepare on the Replica server"
grep -q "not a primary VM on this server" <<<"$err" || fail "prepare on replica: $err"
err=$(vr replica replication reverse g1 2>&1) && fail "reverse before failover"
grep -q "not a failed-over Replica VM" <<<"$err" || fail "reverse before failover: $err"

log "planned failover to the Replica server"
qemu-io -f raw "$(nbd_uri primary g1)" -c "write -P 0x41 20M 1M" >/dev/null ||
    fail "last write on the primary"
out=$(vrj primary failover prepare g1) || fail "failover prepare g1"
[ "$(jq -r .state <<<"$out")" = PreparedForFailover ] || fail "prepare: $out"
N=$(jq -r .prepared_cycle <<<"$out")
[ "$(vrj primary vm show g1 | jq -r .served)" = false ] || fail "disks still served"
err=$(vr primary vm start g1 2>&1) && fail "the prepared VM started on the primary"
grep -q "prepared for failover" <<<"$err" || fail "start prepared: $err"
out=$(vrj replica failover start g1) || fail "planned failover start"
[ "$(jq -r .planned <<<"$out")" = true ] && [ "$(jq -r .point <<<"$out")" = "$N" ] ||
    fail "planned start: $out"
[ "$(repl replica g1 state)" = FailedOver ] || fail "replica state $(repl replica g1 state)"
log "failed over at cycle $N; the VM starts on the former Replica server"
CONSOLE_R=$(state_dir replica)/run/$UUID/console.log
wait_until "$GUEST_TIMEOUT" grep -q '^done' "$CONSOLE_R" ||
    fail "g1 did not boot after the planned failover"
wait_until 30 vm_stopped replica g1 ||
    fail "QEMU did not exit after done (replica)"
cmp "$PDISK" "$RDISK" || fail "the failed-over disk differs from the primary's"
[ "$(vrj replica points list g1 | jq '.points | length')" = 0 ] ||
    fail "recovery points left after a planned failover"
log "no data lost: the disks are byte-identical"

log "reverse replication"
write_on replica 0x52 24M
out=$(vrj replica replication reverse g1 --replica-server "primary.test.local:$PRIMARY_PORT" \
    --connect-address 127.0.0.1) || fail "replication reverse"
[ "$(jq -r .mode <<<"$out")" = primary ] || fail "reverse: $out"
[ "$(vrj primary vm show g1 | jq -r .mode)" = replica ] ||
    fail "the old primary's VM is $(vrj primary vm show g1 | jq -r .mode)"
SRC=replica DST=primary
wait_until 60 repl_is replica g1 state Replicating ||
    fail "reverse: state $(repl replica g1 state): $(repl replica g1 last_error)"
write_on replica 0x53 28M
vr replica vm stop g1 >/dev/null || fail "stop serving"
wait_converged g1 60
assert_identical g1
assert_replicating g1
m=$(vrj replica replication measure g1)
[ "$(jq .initial_replication_sent <<<"$m")" = 0 ] ||
    fail "reverse replication copied a disk: $m"
# The two 1 MiB writes and the guest's sectors, not the 64 MiB disk.
raw=$(jq .bytes_sent_raw <<<"$m")
[ "$raw" -ge $((2 << 20)) ] && [ "$raw" -lt $((8 << 20)) ] ||
    fail "reverse replication sent $raw bytes: $m"
err=$(vr primary vm start g1 2>&1) && fail "the old primary started its Replica VM"
grep -q "Replica VM" <<<"$err" || fail "old primary start: $err"
log "reversed with no resynchronization; the old primary is the Replica server"

log "fail-back"
out=$(vrj replica failover prepare g1) || fail "prepare on the new primary"
[ "$(jq -r .state <<<"$out")" = PreparedForFailover ] || fail "prepare 2: $out"
vrj primary failover start g1 >/dev/null || fail "planned failover back"
CONSOLE_P=$(state_dir primary)/run/$UUID/console.log
wait_until "$GUEST_TIMEOUT" grep -q '^done' "$CONSOLE_P" ||
    fail "g1 did not boot after the fail-back"
wait_until 30 vm_stopped primary g1 ||
    fail "QEMU did not exit after done (primary)"
cmp "$PDISK" "$RDISK" || fail "fail-back: the disks differ"
out=$(vrj primary replication reverse g1) || fail "reverse back (remembered server)"
[ "$(jq -r .replica_server <<<"$out")" = "replica.test.local:$REPLICA_PORT" ] ||
    fail "reverse back went to $(jq -r .replica_server <<<"$out")"
SRC=primary DST=replica
wait_until 60 repl_is primary g1 state Replicating ||
    fail "fail-back reverse: $(repl primary g1 state): $(repl primary g1 last_error)"
write_on primary 0x61 32M
vr primary vm stop g1 >/dev/null || fail "stop serving"
wait_converged g1 60
assert_identical g1
assert_replicating g1
log "failed back; replication runs the original way again"

log "the status of a VM after a planned failover is that of its processes"
create_vm i1 8M
enable_replication i1 --frequency 1s
vr primary failover prepare i1 >/dev/null || fail "failover prepare i1"
vr replica failover start i1 >/dev/null || fail "planned failover start i1"
assert_vm_runs replica i1
stop_daemon replica
start_replica "${REPLICA_ENV[@]}"
assert_vm_runs replica i1
vr replica vm stop i1 --force >/dev/null || fail "vm stop i1"
log "i1 after a planned failover and a restart: running, hypervisor true"
log "PASS"
