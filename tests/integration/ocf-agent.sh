#!/bin/bash
# ocf-agent: the Pacemaker resource agent for vmreplicad passes ocf-tester
# (meta-data valid against ra-api-1.dtd; validate-all; monitor 7 when
# stopped, 0 when running; start and stop, each twice in a row), and a
# daemon it started answers on the state directory's api.sock, keeps its
# settings across a stop and start, and is gone after stop.
source "$(dirname "$0")/functions.sh"
requires ocf-tester xmllint flock setsid jq
requires_build
agent_src=$BUILD_DIR/dist/vmreplicad-ocf
[ -f "$agent_src" ] || skip "resource agent not built ($agent_src)"

# ocf-tester runs meta-data as user nobody: the agent must be reachable.
chmod 755 "$TESTDIR"
agent=$TESTDIR/vmreplicad
install -m 755 "$agent_src" "$agent"
state=$TESTDIR/shared/state
ocf_opts=(-o state_dir="$state" -o binary="$VMREPLICAD" -o client="$VMREPLICA"
    -o options="--hostname replica.test.local -v" -o log="$TESTDIR/ha.log")

ocf-tester -n vmreplica-test "${ocf_opts[@]}" "$agent" >"$TESTDIR/ocf-tester.out" 2>&1 ||
    fail "ocf-tester: $(cat "$TESTDIR/ocf-tester.out")"
grep -qx "$agent passed all tests" "$TESTDIR/ocf-tester.out" ||
    fail "ocf-tester did not pass: $(cat "$TESTDIR/ocf-tester.out")"
log "ocf-tester: $(tail -n 1 "$TESTDIR/ocf-tester.out")"

# The agent by hand: what start leaves running, what stop leaves behind.
ra() { # ACTION — run the agent as Pacemaker would
    env OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=vmreplica-test \
        OCF_RESKEY_state_dir="$state" OCF_RESKEY_binary="$VMREPLICAD" \
        OCF_RESKEY_client="$VMREPLICA" OCF_RESKEY_log="$TESTDIR/ha.log" \
        OCF_RESKEY_options="--hostname replica.test.local" "$agent" "$1"
}
rc=0; ra monitor || rc=$?
[ "$rc" = 7 ] || fail "monitor before start: $rc, want 7"
ra start || fail "start: $?"
pid=$(tr -dc 0-9 <"$state/vmreplicad.lock")
[ "$(readlink "/proc/$pid/exe")" = "$(readlink -f "$VMREPLICAD")" ] ||
    fail "the lock's pid $pid is not vmreplicad"
[ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ] ||
    fail "vmreplicad does not run in its own session"
"$VMREPLICA" --connect "$state/api.sock" server set --monitoring-interval 2h >/dev/null ||
    fail "server set through the agent's daemon"
ra monitor || fail "monitor while running: $?"
ra stop || fail "stop: $?"
# Gone, or a zombie its new parent has not reaped yet.
st=$(ps -o stat= -p "$pid" || true)
[ -z "$st" ] || [[ $st == Z* ]] || fail "vmreplicad $pid still runs after stop ($st)"
rc=0; ra monitor || rc=$?
[ "$rc" = 7 ] || fail "monitor after stop: $rc, want 7"
ra start || fail "start again: $?"
got=$("$VMREPLICA" --connect "$state/api.sock" --json server show |
    jq -c '[.monitoring_interval, .hostname, .state_dir]')
[ "$got" = "[7200,\"replica.test.local\",\"$state\"]" ] ||
    fail "after stop and start: interval, hostname, state dir $got"
ra stop || fail "stop again: $?"

# A binary that is not there: validate-all says so (OCF_ERR_INSTALLED).
rc=0
env OCF_ROOT=/usr/lib/ocf OCF_RESKEY_state_dir="$state" \
    OCF_RESKEY_binary=/nonexistent/vmreplicad "$agent" validate-all \
    >"$TESTDIR/validate.out" 2>&1 || rc=$?
[ "$rc" = 5 ] || fail "validate-all with no binary: $rc, want 5"
grep -qF "/nonexistent/vmreplicad is not installed (or not executable)" "$TESTDIR/validate.out" ||
    fail "validate-all: $(cat "$TESTDIR/validate.out")"
log "agent: start, monitor, stop and validate-all as expected"
