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
# that dies at its start without a word is started once more.
source "$(dirname "$0")/functions.sh"
requires nbdkit jq
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

[ "$(jget primary '.disks_served // false' vm show v1)" != true ] ||
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

# An nbdkit that dies at its start without a word (a signal) is started
# once more; twice is an error.  (A stand-in for nbdkit does that.)
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
vr primary vm start v1 --no-hypervisor >/dev/null ||
    fail "vm start did not survive one silent death of nbdkit"
# With how it ended, read from the zombie before init reaps it ("status
# unknown" where init reaps at once).
grep -Eq "exited at start without a word \((killed by signal 15 \(Terminated\)|status unknown); pid file not written\); starting it again" \
    "$rundir/nbdkit.log" ||
    fail "the restart is not said in nbdkit.log with how nbdkit ended: $(grep vmreplicad: "$rundir/nbdkit.log")"
vr primary vm stop v1 >/dev/null || fail "vm stop"
echo 2 >"$TESTDIR/deaths"
vr primary vm start v1 --no-hypervisor >"$TESTDIR/start.out" 2>&1 &&
    fail "vm start succeeded although nbdkit died twice"
grep -Eq "start nbdkit for v1: exited( \(killed by signal 15 \(Terminated\)\))?: " "$TESTDIR/start.out" ||
    fail "two deaths: $(cat "$TESTDIR/start.out")"
log "a silent death of nbdkit at start: started again; two: $(cat "$TESTDIR/start.out")"
stop_daemon primary
kill -0 "$OTHER" 2>/dev/null || fail "the other program's nbdkit is gone"
log "PASS"
