#!/bin/bash
# initial-resume: an interrupted initial replication resumes where it
# stopped (SPEC §5; issue #11), by each method that sends or writes a copy.
#
#   (a) Network copy: a 256 MiB disk holding 128 MiB of random data (4 base
#       chunks of 32 MiB); the primary is SIGKILLed right after the 2nd
#       chunk is answered and recorded (VMREPLICA_FAULT=base-chunk-sent:2).
#       The Replica server syncs a chunk's disks only when the next one
#       comes, so what the primary recorded as durable is the 1st chunk
#       (32 MiB counted).  Restarted, it resumes by itself from the 2nd
#       chunk: the replica ends byte-identical and the bytes sent in all
#       (bytes_sent_wire, kept in the catalog across the kill) are under
#       1.3x the data.
#   (c) The Replica server is SIGKILLed while the primary holds the 2nd
#       chunk answered but not yet synced (the primary paused after it:
#       VMREPLICA_FAULT=base-chunk-sent:2:pause=...), and the replica disk's
#       range of that chunk is zeroed while it is down: what a power loss
#       can do to writes not yet synced.  The restarted Replica server's
#       answer to the 3rd chunk names no synced chunk, so the primary sends
#       the 2nd again ("no word of base chunk 2"): the replica ends
#       byte-identical.  A primary that took the 2nd chunk as durable would
#       leave those 32 MiB zero.
#   (d) The same after the last (4th) chunk: initial-complete, which names
#       it, is refused by the restarted Replica server, and the primary
#       sends the 4th chunk again before it completes.
#   (e) initial-complete syncs the last chunk's disks without the Replica
#       server's global lock: while that sync is held up (the Replica
#       server pauses right after it, VMREPLICA_FAULT=
#       initial-complete-synced:1:pause=...), the same server still answers
#       `vm list` at once, the same initial-complete sent again waits for
#       the first and gets its answer (200, not EPROTO), and the copy then
#       completes byte-identical.
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
[ "$(jq -r .initial_replication_sent <<<"$m")" -ge $((32 * MiB)) ] ||
    [ "$(jq -r .state <<<"$m")" = Replicating ] ||
    fail "the chunk recorded durable before the kill is not counted"
wait_until 60 eval '[ "$(repl primary "$vm" state)" = Replicating ]' ||
    fail "the copy did not resume by itself (state $(repl primary "$vm" state))"
wait_converged "$vm" 60
assert_identical "$vm"
wire=$(vrj primary replication measure "$vm" | jq -r .bytes_sent_wire)
limit=$((128 * MiB * 13 / 10))
log "  $wire bytes on the wire for 128 MiB of data (limit $limit)"
[ "$wire" -lt "$limit" ] ||
    fail "the resumed copy sent $wire bytes for 128 MiB of data (1.3x: $limit)"

# lose_unsynced VM N — the primary pauses after answering base chunk N
# (unsynced on the Replica server); meanwhile the Replica server is
# SIGKILLed, chunk N's range of its disk zeroed (as a power loss may leave
# writes never synced), and the Replica server started again.
lose_unsynced() {
    local vm=$1 n=$2 rdisk hits
    hits=$(grep -c "fault point base-chunk-sent hit, pausing" "$TESTDIR/primary.log" || true)
    stop_daemon primary
    start_primary VMREPLICA_FAULT=base-chunk-sent:$n:pause=8000
    vr primary initial-replication start "$vm" >/dev/null || fail "initial-replication start"
    wait_until 60 eval '[ "$(grep -c "fault point base-chunk-sent hit, pausing" "$TESTDIR/primary.log")" -gt "$hits" ]' ||
        fail "the primary did not pause after chunk $n"
    rdisk=$(disk_path replica "$vm" 0)
    kill_daemon replica
    dd if=/dev/zero of="$rdisk" bs=1M seek=$(((n - 1) * 32)) count=32 \
        conv=notrunc status=none || fail "zero chunk $n's range on the replica"
    start_replica
    wait_until 90 eval '[ "$(repl primary "$vm" state)" = Replicating ]' ||
        fail "the copy did not end (state $(repl primary "$vm" state))"
}

log "(c) a Replica server restarted before a chunk's sync: the chunk goes again"
vm=resumec
fill "$vm"
lose_unsynced "$vm" 2
grep -q "$vm: the Replica server has no word of base chunk 2 being durable" \
    "$TESTDIR/primary.log" || fail "the primary did not send the 2nd chunk again"
wait_converged "$vm" 60
assert_identical "$vm"
[ "$(vrj primary replication measure "$vm" | jq -r .initial_replication_sent)" = $((128 * MiB)) ] ||
    fail "initial_replication_sent $(vrj primary replication measure "$vm" | jq -r .initial_replication_sent), not the 128 MiB copied"

log "(d) the same before initial-complete: the last chunk goes again"
vm=resumed
fill "$vm"
lose_unsynced "$vm" 4
grep -q "$vm: .*initial-complete: vm $vm: base chunk 4 was not applied since this server started" \
    "$TESTDIR/primary.log" || fail "initial-complete did not refuse the unconfirmed last chunk"
wait_converged "$vm" 60
assert_identical "$vm"

log "(e) initial-complete syncs without holding up the Replica server"
vm=resumee
stop_daemon replica
start_replica VMREPLICA_FAULT=initial-complete-synced:1:pause=6000
fill "$vm"
vr primary initial-replication start "$vm" >/dev/null || fail "initial-replication start"
wait_until 60 eval 'grep -q "fault point initial-complete-synced hit, pausing" "$TESTDIR/replica.log"' ||
    fail "the Replica server did not reach initial-complete's sync"
t0=$(date +%s%N)
vr replica vm list >/dev/null || fail "vm list on the Replica server"
ms=$((($(date +%s%N) - t0) / 1000000))
log "  vm list answered in $ms ms during initial-complete's sync"
[ "$ms" -lt 3000 ] ||
    fail "vm list took $ms ms: initial-complete held the daemon's lock through its sync"
# The same initial-complete again, as from a primary that did not hear the
# answer: it waits for the first one's sync and gets its answer (refused
# at once, "not in initial replication", it would put the primary in Error).
rs=$(vrj primary replication show "$vm")
uuid=$(vrj primary vm show "$vm" | jq -r .uuid)
code=$(curl -sS --max-time 60 -o "$TESTDIR/again.out" -w '%{http_code}' \
    -X POST -H 'Expect:' -H 'Content-Type: application/json' \
    -H "X-Vmreplica-Epoch: $(jq -r .epoch <<<"$rs")" \
    --resolve "replica.test.local:$REPLICA_PORT:127.0.0.1" --cacert "$PKI/ca.pem" \
    --cert "$PKI/primary.pem" --key "$PKI/primary.key" \
    --data-binary "{\"base_cycle\": $(jq -r .base_cycle <<<"$rs")}" \
    "https://replica.test.local:$REPLICA_PORT/r1/vms/$uuid/initial-complete")
log "  the same initial-complete again meanwhile: $code $(head -c 200 "$TESTDIR/again.out")"
[ "$code" = 200 ] ||
    fail "initial-complete sent again during the first one's sync: $code $(head -c 300 "$TESTDIR/again.out")"
wait_until 60 eval '[ "$(repl primary "$vm" state)" = Replicating ]' ||
    fail "the copy did not complete (state $(repl primary "$vm" state))"
wait_converged "$vm" 60
assert_identical "$vm"
stop_daemon replica
start_replica

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
