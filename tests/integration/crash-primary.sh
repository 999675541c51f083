#!/bin/bash
# crash-primary: the primary daemon dies; guest I/O and replication survive.
#
#   (a) The primary daemon is SIGKILLed while a writer writes through the
#       VM's NBD export: the writes keep succeeding while the daemon is down
#       (nbdkit runs on its own), the restarted daemon re-adopts the disk
#       server and replication continues; once the writer stops the replica
#       converges (cmp).
#   (b) The primary runs with VMREPLICA_FAULT=cycle-sent:3: it dies after
#       the Replica server acknowledged a cycle and before recording it (its
#       catalog says last_cycle = the replica's staged cycle - 1).  Restarted,
#       it sends that cycle again, the Replica server takes it as a
#       duplicate, and replication converges (cmp); the Replica VM never
#       leaves state Replicating and logs no error.
#   (c) Initial replication resumes where it stopped: a 512 MiB disk holding
#       128 MiB of random data in scattered 1 MiB pieces (4 chunks of 32 MiB),
#       the primary dies with VMREPLICA_FAULT=base-chunk-sent:2 during initial
#       replication (the 1st chunk known durable, the 2nd answered but not
#       yet synced); restarted (without the fault) it finishes (resuming on
#       its own or through `initial-replication start --wait`), the replica
#       is byte-identical, and bytes_sent_wire, which survives the restart in
#       the catalog, is at most 128 MiB + 40 MiB (at most one chunk re-sent).
#   (d) The primary runs with VMREPLICA_FAULT=cycle-built:4: it dies when a
#       cycle's build ends, while the cycle goes out as it is built (all of
#       it but its last byte may be on the wire).  The Replica server stages
#       nothing of it and keeps no temporary file; restarted, the primary
#       sends it again and replication converges (cmp).
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq curl openssl nbdkit python3 cmp numfmt
requires_build

setup_pair

vm=cp1
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 4M' >/dev/null
log "enable replication every second and run initial replication"
enable_replication "$vm" --frequency 1s

# catalog_last_cycle VM_UUID — the primary's recorded last_cycle, read from
# its catalog while the daemon is down.
catalog_last_cycle() {
    python3 - "$(state_dir primary)/catalog.db" "$1" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10)
row = db.execute("SELECT last_cycle FROM replications WHERE vm_uuid = ?",
                 (sys.argv[2],)).fetchone()
print(row[0] if row else "none")
PY
}

# last_cycle_at_least VM N / state_is VM STATE — of the primary.
last_cycle_at_least() {
    local c
    c=$(repl primary "$1" last_cycle 2>/dev/null) || return 1
    [[ $c =~ ^[0-9]+$ ]] && [ "$c" -ge "$2" ]
}
state_is() {
    [ "$(repl primary "$1" state 2>/dev/null)" = "$2" ]
}

# die_at FAULT — restart the primary with VMREPLICA_FAULT=FAULT and wait
# until it is SIGKILLed there.
die_at() {
    stop_daemon primary
    spawn_daemon primary VMREPLICA_FAULT="$1"
    killed_at primary "$1" 45
}

# replica_errors — how many error events the Replica server has logged;
# no_new_replica_errors N WHAT — fail if more than N now.
replica_errors() {
    vrj replica events | jq '[.events[] | select(.level == "error")] | length'
}
no_new_replica_errors() {
    [ "$(replica_errors)" = "$1" ] && return 0
    vrj replica events | jq -r '.events[] | select(.level == "error") | .message' >&2
    fail "the replica logged error events after $2"
}

# --- (a) SIGKILL while writing ---------------------------------------------------
log "--- (a) SIGKILL the primary daemon while a writer runs ---"
start_writer "$vm" 128k
applied=$(repl replica "$vm" applied_cycle)
wait_until 20 _applied_at_least "$vm" $((applied + 2)) ||
    fail "replication did not advance under load"
kill_daemon primary
log "primary daemon killed; the VM's disk server must keep serving"
for i in 1 2 3 4 5; do
    qemu-io -f raw "$uri" -c "write -P 0x$((70 + i)) $((i * 4))M 256k" \
        -c flush >/dev/null ||
        fail "an NBD write failed while the primary daemon was down"
    sleep 0.5
done
kill -0 "$WRITER_PID" 2>/dev/null ||
    fail "the writer stopped while the primary daemon was down: $(tail -n 3 "$TESTDIR/writer-$vm.log")"
log "writes kept succeeding for 2.5 s with the daemon down"
start_primary
c0=$(repl primary "$vm" last_cycle)
wait_until 20 last_cycle_at_least "$vm" $((c0 + 2)) ||
    fail "replication did not continue after the restart (last_cycle $(repl primary "$vm" last_cycle))"
log "restarted; replication continues (cycle $c0 -> $(repl primary "$vm" last_cycle))"
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
[ "$(repl primary "$vm" state)" = Replicating ] ||
    fail "primary state after (a): $(repl primary "$vm" state)"

# --- (b) acknowledged but not recorded --------------------------------------------
log "--- (b) the primary dies after a cycle was acknowledged, before recording it ---"
UUID=$(jget primary .uuid vm show "$vm")
rerr0=$(replica_errors)
start_writer "$vm" 64k
die_at cycle-sent:3
staged=$(repl replica "$vm" last_cycle)
recorded=$(catalog_last_cycle "$UUID")
log "primary killed at cycle-sent:3; the replica staged cycle $staged, the primary recorded $recorded"
[ "$recorded" = $((staged - 1)) ] ||
    fail "expected the primary to have recorded cycle $((staged - 1)), it recorded $recorded"
[ "$(repl replica "$vm" state)" = Replicating ] ||
    fail "replica state: $(repl replica "$vm" state)"
start_primary
wait_until 20 last_cycle_at_least "$vm" $((staged + 1)) ||
    fail "the primary did not get past cycle $staged after the restart"
log "restarted: the primary re-sent cycle $staged and went on (last_cycle $(repl primary "$vm" last_cycle))"
sleep 1
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
no_new_replica_errors "$rerr0" "the duplicate cycle"
errs=$(jget primary .replication_errors replication measure "$vm")
[ "$errs" = 0 ] || fail "the primary counted $errs replication errors"

# --- (d) killed while a cycle is sent as it is built ------------------------------
# In certificate mode a cycle goes out while it is built, and its body ends
# only once the build finished and checked well.  Killed there
# (cycle-built: the whole payload but its last byte may be on the wire), the
# Replica server must not stage that cycle: it holds exactly what the
# primary recorded, keeps no temporary file, logs no error, and the
# restarted primary sends the cycle again.
log "--- (d) the primary dies at the end of a build while the cycle is on the wire ---"
rerr0=$(replica_errors)
start_writer "$vm" 256k
die_at cycle-built:4
recorded=$(catalog_last_cycle "$UUID")
# The Replica server sees the connection end; give it a moment to drop it.
no_staged_tmp() { ! compgen -G "$TESTDIR/replica-storage/$UUID/staging/*.tmp" >/dev/null; }
wait_until 10 no_staged_tmp ||
    fail "the Replica server kept a temporary file of the cut cycle: $(ls "$TESTDIR/replica-storage/$UUID/staging")"
staged=$(repl replica "$vm" last_cycle)
log "primary killed at cycle-built:4 with cycle $((recorded + 1)) on the wire; the replica staged $staged, the primary recorded $recorded"
[ "$staged" = "$recorded" ] ||
    fail "the Replica server staged cycle $staged of a body cut before its end (the primary recorded $recorded)"
[ ! -e "$TESTDIR/replica-storage/$UUID/staging/$(printf '%020d' $((recorded + 1))).cycle" ] ||
    fail "cycle $((recorded + 1)) is staged on the Replica server"
start_primary
wait_until 20 last_cycle_at_least "$vm" $((recorded + 2)) ||
    fail "the primary did not get past cycle $((recorded + 1)) after the restart"
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
no_new_replica_errors "$rerr0" "the cut transfer"

# --- (c) initial replication resumes ---------------------------------------------
log "--- (c) initial replication resumes after the primary dies mid-copy ---"
ir=cp-ir
python3 - "$TESTDIR/ir-src.raw" <<'PY'
import os, random, sys
MiB = 1 << 20
with open(sys.argv[1], "wb") as f:
    f.truncate(512 * MiB)
    for slot in random.Random(7).sample(range(512), 128):
        f.seek(slot * MiB)
        f.write(os.urandom(MiB))
PY
vr primary vm create "$ir" --disk "$TESTDIR/ir-src.raw" >/dev/null ||
    fail "primary: vm create $ir --disk ir-src.raw"
rm -f "$TESTDIR/ir-src.raw"
vr primary vm start "$ir" --no-hypervisor >/dev/null || fail "primary: vm start $ir"
alloc=$(du -B1 "$(disk_path primary "$ir")" | cut -f1)
log "$ir: 512 MiB disk, $((alloc >> 20)) MiB allocated"
vr primary replication enable "$ir" --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s >/dev/null ||
    fail "primary: replication enable $ir"
stop_daemon primary
start_primary VMREPLICA_FAULT=base-chunk-sent:2
vr primary initial-replication start "$ir" >/dev/null ||
    fail "primary: initial-replication start $ir"
killed_at primary base-chunk-sent:2 60
start_primary
m=$(vrj primary replication measure "$ir")
st=$(repl primary "$ir" state)
log "killed after 2 chunks; restarted: state $st, sent $(( $(jq -r .initial_replication_sent <<<"$m") >> 20 )) of $(( $(jq -r .initial_replication_size <<<"$m") >> 20 )) MiB, wire $(( $(jq -r .bytes_sent_wire <<<"$m") >> 20 )) MiB"
# The Replica server syncs a chunk when the next one comes, so of the 2
# chunks answered before the crash, the 1st is the one known durable.
[ "$(jq -r .initial_replication_sent <<<"$m")" -ge $((32 << 20)) ] ||
    [ "$st" = Replicating ] ||
    fail "the chunk known durable before the crash is not counted as sent"
case $st in
InitialReplicationInProgress)
    if ! out=$(vr primary initial-replication start "$ir" --wait 2>&1); then
        [ "$(repl primary "$ir" initial_done)" = true ] ||
            fail "initial-replication start $ir --wait: $out"
    fi
    ;;
Replicating) ;;
*) fail "$ir: state $st after the restart" ;;
esac
wait_until 60 state_is "$ir" Replicating ||
    fail "$ir: initial replication did not complete (state $(repl primary "$ir" state))"
[ "$(repl replica "$ir" initial_done)" = true ] || fail "replica: initial_done is not true"
wait_converged "$ir" 60
assert_identical "$ir"
m=$(vrj primary replication measure "$ir")
sent=$(jq -r .initial_replication_sent <<<"$m")
size=$(jq -r .initial_replication_size <<<"$m")
wire=$(jq -r .bytes_sent_wire <<<"$m")
log "$ir: initial_replication_size $size, initial_replication_sent $sent, bytes_sent_wire $wire"
[ "$sent" -ge $((128 << 20)) ] || fail "initial_replication_sent $sent < 128 MiB"
[ "$sent" -le $(((128 + 32) << 20)) ] ||
    fail "initial_replication_sent $sent: more than one chunk sent twice"
[ "$wire" -le $(((128 + 40) << 20)) ] ||
    fail "bytes_sent_wire $wire > 168 MiB: the copy restarted instead of resuming"
log "PASS (${SECONDS}s)"
