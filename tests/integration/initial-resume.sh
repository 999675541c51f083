#!/bin/bash
# initial-resume: an interrupted initial replication resumes where it
# stopped (SPEC §5; issue #11), by each method that sends or writes a copy.
#
#   (a) Network copy: a 256 MiB disk holding 128 MiB of random data (4 base
#       chunks of 32 MiB); the primary is SIGKILLed right after the 2nd
#       chunk is acknowledged and recorded (VMREPLICA_FAULT=base-chunk-sent:2).
#       Restarted, it resumes by itself from the 3rd chunk: the replica ends
#       byte-identical and the bytes sent in all (bytes_sent_wire, kept in
#       the catalog across the kill) are under 1.3x the data.
#   (b) Export: the primary is SIGKILLed in the middle of writing an export
#       (VMREPLICA_FAULT=export-batch:2, after 64 MiB).  Restarted, it
#       writes the export again with the same base cycle; the export
#       imports and the replica converges byte-identical.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp
requires_build

setup_pair
MiB=1048576

# fill VM — create VM, 256 MiB, with 128 MiB of random data at its start.
fill() {
    create_vm "$1" 256M
    head -c $((128 * MiB)) /dev/urandom >"$TESTDIR/rand"
    qemu-io -f raw "$(nbd_uri primary "$1")" -c "write -s $TESTDIR/rand 0 128M" \
        -c flush >/dev/null || fail "fill $1"
    rm -f "$TESTDIR/rand"
    vr primary replication enable "$1" \
        --replica-server "replica.test.local:$REPLICA_PORT" \
        --connect-address 127.0.0.1 --auth certificate --frequency 1s >/dev/null ||
        fail "replication enable $1"
}
# dead_at FAULT CMD… — restart the primary with FAULT, run CMD, wait for
# the SIGKILL at the fault; the caller looks at what it left, then starts
# the primary again (start_primary), which resumes the work at once.
dead_at() {
    local fault=$1
    shift
    stop_daemon primary
    start_primary VMREPLICA_FAULT="$fault"
    vr primary "$@" >/dev/null || fail "$*"
    killed_at primary "$fault" 60
}

log "(a) a network copy killed after 2 of 4 chunks resumes"
vm=resume
fill "$vm"
dead_at base-chunk-sent:2 initial-replication start "$vm"
start_primary
m=$(vrj primary replication measure "$vm")
log "  restarted: state $(jq -r .state <<<"$m"), sent $(($(jq -r .initial_replication_sent <<<"$m") / MiB)) MiB"
[ "$(jq -r .initial_replication_sent <<<"$m")" -ge $((64 * MiB)) ] ||
    [ "$(jq -r .state <<<"$m")" = Replicating ] ||
    fail "the 2 chunks recorded before the kill are not counted"
wait_until 60 eval '[ "$(repl primary "$vm" state)" = Replicating ]' ||
    fail "the copy did not resume by itself (state $(repl primary "$vm" state))"
wait_converged "$vm" 60
assert_identical "$vm"
wire=$(vrj primary replication measure "$vm" | jq -r .bytes_sent_wire)
limit=$((128 * MiB * 13 / 10))
log "  $wire bytes on the wire for 128 MiB of data (limit $limit)"
[ "$wire" -lt "$limit" ] ||
    fail "the resumed copy sent $wire bytes for 128 MiB of data (1.3x: $limit)"

log "(b) an export killed half-way is written again"
vm=resumex
fill "$vm"
ex=$TESTDIR/export
dead_at export-batch:2 initial-replication start "$vm" --export "$ex"
# Before the restart: the restarted primary writes the export again at
# once, manifest last.
[ ! -e "$ex/manifest.json" ] || fail "a killed export left a manifest"
start_primary
base=$(repl primary "$vm" base_cycle)
[ "$(repl primary "$vm" state)" = InitialReplicationInProgress ] ||
    fail "state after the kill: $(repl primary "$vm" state)"
wait_until 60 eval '[ "$(vrj primary replication measure "$vm" | jq -r .initial_replication_exported)" = true ]' ||
    fail "the export was not written again"
[ "$(jq .base_cycle "$ex/manifest.json")" = "$base" ] ||
    fail "the export was written with base $(jq .base_cycle "$ex/manifest.json"), not $base"
vr replica initial-replication import "$vm" --from "$ex" >/dev/null || fail "import"
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
[ "$(vrj primary replication measure "$vm" | jq -r .bytes_sent_wire)" -lt $((4 * MiB)) ] ||
    fail "the export's data went on the wire"
log "PASS"
