#!/bin/bash
# stale-pid: a stale pid file whose number now belongs to another program's
# nbdkit is never taken for the VM's own (nor killed).
#
# pid_max is 32768 here and tests spawn thousands of processes, so a pid
# file left by a crash soon names someone else's process.  vmreplicad used
# to check only that the process was "nbdkit": it then believed a VM's
# disks served by an unrelated nbdkit and killed it at `vm stop` (seen as a
# CI flake: another test's nbdkit "exited: (log is empty)").  Now the
# process must also have been given that very pid file.  And an nbdkit
# that dies at its start is an error that says how it ended; one that asks
# for SIGTERM at its parent's death (PR_SET_PDEATHSIG, as nbdkit 1.32
# does) outlives the intermediate child of the daemon's double fork.
source "$(dirname "$0")/functions.sh"
requires nbdkit jq qemu-io setpriv
requires_build

start_primary
vr primary vm create v1 --new-disk 16M >/dev/null || fail "vm create"
vr primary vm start v1 --no-hypervisor >/dev/null || fail "vm start"
sock=$(jget primary '.disks[0].nbd_uri' vm show v1)
rundir=$(dirname "${sock#*socket=}")
[ -e "$rundir/nbdkit.pid" ] || fail "no nbdkit.pid in $rundir ($sock)"
vr primary vm stop v1 >/dev/null || fail "vm stop"

# Another program's nbdkit, and its pid in v1's pid file.
nbdkit --foreground --unix "$TESTDIR/other.sock" memory 1M \
    >"$TESTDIR/other.log" 2>&1 &
OTHER=$!
_bg_pids+=("$OTHER")
wait_until 10 test -S "$TESTDIR/other.sock" || fail "the other nbdkit did not start"
echo "$OTHER" >"$rundir/nbdkit.pid"

[ "$(jget primary .served vm show v1)" != true ] ||
    fail "vm show: the other program's nbdkit is taken for v1's"
vr primary vm start v1 --no-hypervisor >/dev/null || fail "vm start over the stale pid file"
[ "$(cat "$rundir/nbdkit.pid")" != "$OTHER" ] || fail "v1 did not start its own nbdkit"
vr primary vm stop v1 >/dev/null || fail "vm stop"
kill -0 "$OTHER" 2>/dev/null || fail "vm stop killed the other program's nbdkit"
log "vm start/stop with a stale pid file: the other nbdkit ($OTHER) untouched"

# The same across a daemon restart (start-up looks at every run directory).
echo "$OTHER" >"$rundir/nbdkit.pid"
stop_daemon primary
start_primary
vr primary vm start v1 --no-hypervisor >/dev/null || fail "vm start after restart"
vr primary vm stop v1 >/dev/null || fail "vm stop after restart"
kill -0 "$OTHER" 2>/dev/null || fail "a restart killed the other program's nbdkit"
log "a daemon restart over the stale pid file: the other nbdkit untouched"

# An nbdkit that dies at its start without a word (a signal) is an error,
# said with how it ended — not started again behind the user's back.  (A
# stand-in for nbdkit kills itself with SIGTERM.)
cat >"$TESTDIR/nbdkit" <<'EOS'
#!/bin/bash
n=$(cat "$NBDKIT_DEATHS" 2>/dev/null || echo 0)
if [ "$n" -gt 0 ]; then
    echo $((n - 1)) >"$NBDKIT_DEATHS"
    kill -TERM $$
fi
exec nbdkit "$@"
EOS
chmod +x "$TESTDIR/nbdkit"
stop_daemon primary
start_primary VMREPLICA_NBDKIT="$TESTDIR/nbdkit" NBDKIT_DEATHS="$TESTDIR/deaths"
echo 1 >"$TESTDIR/deaths"
vr primary vm start v1 --no-hypervisor >"$TESTDIR/start.out" 2>&1 &&
    fail "vm start succeeded although nbdkit died at its start"
# How it ended is read from the zombie before init reaps it (plain
# "exited" where init reaps at once).
grep -Eq "start nbdkit for v1: exited( \(killed by signal 15 \(Terminated\)\))?: \(log is empty\)" \
    "$TESTDIR/start.out" || fail "a silent death: $(cat "$TESTDIR/start.out")"
[ "$(cat "$TESTDIR/deaths")" = 0 ] || fail "nbdkit was started more than once"
log "a silent death of nbdkit at start: $(cat "$TESTDIR/start.out")"

# Why nbdkit died at its start about once per CI run: nbdkit (1.32) sets
# PR_SET_PDEATHSIG(SIGTERM) at the top of main(), and its parent was the
# intermediate child of vmreplicad's double fork, which exits at once but
# can lose that race (descheduled on two loaded cores, slow to exit under
# ASan).  The stand-in does what nbdkit does, whatever its version, and
# the daemon holds the intermediate child 1 s: nbdkit must outlive it.
mkdir -p "$TESTDIR/pdeath"
cat >"$TESTDIR/pdeath/nbdkit" <<'EOS'
#!/bin/bash
exec setpriv --pdeathsig TERM -- nbdkit "$@"
EOS
chmod +x "$TESTDIR/pdeath/nbdkit"
stop_daemon primary
start_primary VMREPLICA_NBDKIT="$TESTDIR/pdeath/nbdkit" VMREPLICA_TEST_SPAWN_EXIT_DELAY_MS=1000
vr primary vm start v1 --no-hypervisor >"$TESTDIR/start.out" 2>&1 ||
    fail "nbdkit died with the intermediate child of the double fork: $(cat "$TESTDIR/start.out")"
# vm start returns once the intermediate child has exited (it is waited
# for), but a SIGTERM it caused may still be being handled: nbdkit quits
# gracefully within milliseconds.  A second later it must still serve.
pid=$(cat "$rundir/nbdkit.pid")
sleep 1
[ "$(jget primary .served vm show v1)" = true ] && kill -0 "$pid" ||
    fail "nbdkit ($pid) is gone after the intermediate child exited: $(grep -E '^State' /proc/"$pid"/status 2>/dev/null)"
qemu-io -f raw "$(nbd_uri primary v1)" -c 'read 0 4k' >/dev/null ||
    fail "nbdkit does not serve after the intermediate child exited"
vr primary vm stop v1 >/dev/null || fail "vm stop"
log "nbdkit with PR_SET_PDEATHSIG outlives the intermediate child held 1 s"
stop_daemon primary
kill -0 "$OTHER" 2>/dev/null || fail "the other program's nbdkit is gone"
log "PASS"
