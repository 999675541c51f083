#!/bin/bash
# state-lock: one daemon per state directory, one nbdkit per run directory.
#
# A second `vmreplicad --state-dir D` on a daemon's state directory (a
# mistake a new administrator makes) used to start: it took over api.sock
# (and removed it at exit, so the first daemon could no longer be reached)
# and shipped the same VMs, which broke their change logs ("change log:
# cycle N missing") until a full initial copy.  Now:
#   - the second daemon refuses at once, exit status 1, naming the pid of
#     the daemon that holds STATE/vmreplicad.lock, and changes nothing in
#     the state directory: the first daemon's api.sock is the same socket
#     and answers, the VM replicates on, byte for byte;
#   - the run directory of a served VM is locked by its nbdkit (run.lock,
#     with its pid);
#   - a daemon killed by SIGKILL leaves no lock behind: a new one starts;
#   - an nbdkit the daemon no longer knows (its pid file gone) is not
#     joined by a second one on the same disks: `vm start` refuses naming
#     it, `vm stop` leaves its sockets; once it is gone, `vm start` works;
#   - the same for a QEMU the daemon no longer knows (qemu.lock), if QEMU
#     is installed.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp sha256sum flock timeout
requires_build

setup_pair
create_vm v1 16M
uri=$(nbd_uri primary v1)
qemu-io -f raw "$uri" -c 'write -P 0x11 0 1M' >/dev/null || fail "write 1"
enable_replication v1 --frequency 1s
qemu-io -f raw "$uri" -c 'write -P 0x22 2M 1M' >/dev/null || fail "write 2"
wait_converged v1 60
assert_identical v1

SD=$(state_dir primary)
UUID=$(jget primary .uuid vm show v1)
RUN=$SD/run/$UUID
[ "$(cat "$SD/vmreplicad.lock")" = "$primary_pid" ] ||
    fail "vmreplicad.lock holds '$(cat "$SD/vmreplicad.lock")', not the daemon's pid $primary_pid"

# Daemon 1 quiet (no cycle cut meanwhile), so any change is daemon 2's.
vr primary replication set v1 --frequency 3600 >/dev/null || fail "frequency 1 h"
wait_converged v1 30
# (catalog.db-shm is SQLite's shared memory: readers write in it too.)
snap() {
    (cd "$SD" && find . \( -path ./run -o -name catalog.db-shm \) -prune -o \
        -printf '%p %y %i %s %T@\n' | sort &&
        { sha256sum catalog.db catalog.db-wal vmreplicad.lock 2>&1 || :; })
}
events_before=$(vrj primary events | jq '.events | length')
before=$(snap)

log "a second daemon on the same state directory"
rc=0
out=$(timeout 20 "$VMREPLICAD" --state-dir "$SD" 2>&1) || rc=$?
[ "$rc" -ne 124 ] || fail "the second daemon did not refuse: still running after 20 s: $out"
[ "$rc" -ne 0 ] || fail "the second daemon exited 0: $out"
grep -q "vmreplicad is already running (pid $primary_pid)" <<<"$out" ||
    fail "the second daemon's refusal does not name pid $primary_pid: $out"
log "refused (exit $rc): $(tail -n 1 <<<"$out")"
[ "$(snap)" = "$before" ] ||
    fail "the second daemon changed the state directory: $(diff <(echo "$before") <(snap))"
vr primary server show >/dev/null || fail "daemon 1 no longer answers on api.sock"
[ "$(vrj primary events | jq '.events | length')" = "$events_before" ] ||
    fail "events were added: $(vrj primary events | jq -c '.events[-2:]')"
log "the state directory and api.sock are untouched; daemon 1 answers"

vr primary replication set v1 --frequency 1s >/dev/null || fail "frequency 1 s"
qemu-io -f raw "$uri" -c 'write -P 0x33 4M 1M' -c 'write -z 2M 64k' \
    >/dev/null || fail "write 3"
wait_converged v1 60
assert_identical v1
assert_replicating v1

log "the run directory is locked by the VM's nbdkit"
NBDKIT=$(cat "$RUN/nbdkit.pid")
[ "$(cat "$RUN/run.lock")" = "$NBDKIT" ] ||
    fail "run.lock holds '$(cat "$RUN/run.lock")', not nbdkit's pid $NBDKIT"
flock -n "$RUN/run.lock" true &&
    fail "$RUN/run.lock is not locked while nbdkit serves v1"

log "daemon 1 killed by SIGKILL: a new daemon starts"
kill_daemon primary
start_primary
[ "$(cat "$SD/vmreplicad.lock")" = "$primary_pid" ] ||
    fail "vmreplicad.lock does not name the new daemon ($primary_pid)"
[ "$(jget primary .served vm show v1)" = true ] || fail "v1's nbdkit not found again"
qemu-io -f raw "$uri" -c 'write -P 0x44 6M 1M' >/dev/null || fail "write 4"
wait_converged v1 60
assert_identical v1

log "an nbdkit the daemon no longer knows"
rm "$RUN/nbdkit.pid"
[ "$(jget primary .served vm show v1)" = false ] || fail "v1 still seen as served"
err=$(vr primary vm start v1 --no-hypervisor 2>&1) &&
    fail "a second nbdkit was started on v1's disks while pid $NBDKIT serves them"
grep -q "is in use by another process (pid $NBDKIT)" <<<"$err" ||
    fail "vm start over an unknown nbdkit: $err"
err=$(vr primary vm stop v1 2>&1) && fail "vm stop did not see the unknown nbdkit"
grep -q "is in use by another process (pid $NBDKIT)" <<<"$err" ||
    fail "vm stop over an unknown nbdkit: $err"
[ -S "$RUN/nbd.sock" ] && [ -S "$RUN/ctl.sock" ] ||
    fail "the unknown nbdkit's sockets were removed"
kill -0 "$NBDKIT" || fail "nbdkit $NBDKIT was stopped"
log "refused: $err"
kill -TERM "$NBDKIT"
wait_until 10 eval '! kill -0 "$NBDKIT" 2>/dev/null' || fail "nbdkit $NBDKIT did not end"
vr primary vm start v1 --no-hypervisor >/dev/null || fail "vm start once it is gone"
[ "$(cat "$RUN/run.lock")" = "$(cat "$RUN/nbdkit.pid")" ] || fail "run.lock not renewed"
qemu-io -f raw "$uri" -c 'write -P 0x55 8M 1M' >/dev/null || fail "write 5"
wait_converged v1 60
assert_identical v1
assert_replicating v1

# The same for QEMU (RUNDIR/qemu.lock): v1's disk boots nothing, so its
# QEMU waits in the firmware.  KVM or TCG, whichever there is.
if command -v qemu-system-x86_64 >/dev/null; then
    log "a QEMU the daemon no longer knows"
    vr primary vm start v1 >/dev/null || fail "vm start v1 (QEMU)"
    QEMU=$(cat "$RUN/qemu.pid")
    [ "$(cat "$RUN/qemu.lock")" = "$QEMU" ] ||
        fail "qemu.lock holds '$(cat "$RUN/qemu.lock")', not QEMU's pid $QEMU"
    rm "$RUN/qemu.pid"
    err=$(vr primary vm start v1 2>&1) &&
        fail "a second QEMU was started on v1's disks while pid $QEMU runs"
    grep -q "is in use by another process (pid $QEMU)" <<<"$err" ||
        fail "vm start over an unknown QEMU: $err"
    err=$(vr primary vm stop v1 --force 2>&1) && fail "vm stop did not see the unknown QEMU"
    grep -q "is in use by another process (pid $QEMU)" <<<"$err" ||
        fail "vm stop over an unknown QEMU: $err"
    [ -S "$RUN/qmp.sock" ] || fail "the unknown QEMU's QMP socket was removed"
    kill -0 "$QEMU" || fail "QEMU $QEMU was stopped"
    log "refused: $err"
    kill -KILL "$QEMU"
    wait_until 10 eval '! kill -0 "$QEMU" 2>/dev/null' || fail "QEMU $QEMU did not end"
    vr primary vm start v1 >/dev/null || fail "vm start (QEMU) once it is gone"
    [ "$(cat "$RUN/qemu.lock")" = "$(cat "$RUN/qemu.pid")" ] || fail "qemu.lock not renewed"
    vr primary vm stop v1 --force >/dev/null || fail "vm stop v1"
    vr primary vm start v1 --no-hypervisor >/dev/null || fail "serve v1 again"
    qemu-io -f raw "$uri" -c 'write -P 0x66 10M 1M' >/dev/null || fail "write 6"
    wait_converged v1 60
    assert_identical v1
fi
log "PASS"
