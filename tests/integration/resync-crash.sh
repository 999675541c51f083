#!/bin/bash
# resync-crash: a resynchronization killed at each of its steps resumes and
# ends exact (issue #11; "a test kills it at each step").
#
# As log-full: the change log is a 4 MiB tmpfs, the Replica server is
# down, the guest rewrites 2 MiB until tracking stops.  Then `replication
# resume --resync`, and the primary is SIGKILLed at each step in turn:
#   resync-rearmed     tracking re-armed, the step not yet recorded (the
#                      restart finds the void cycle from its C.dirty);
#   resync-cycle-sent  the comparison's cycle staged on the Replica
#                      server, the empty ones not yet; the Replica server
#                      is SIGKILLed too, while it holds its VM;
#   resync-completing  every cycle sent, resync-complete not yet.
# Each restart goes on by itself.  Until the end the Replica VM stays at
# the cycle it had; after it, the replica is byte-identical and at most
# 4 MiB of the 64 MiB disk was compared.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp mount
requires_build
setup_pair

vm=rs1
create_vm_small_log "$vm"
enable_replication "$vm" --frequency 1s --auto-resync off
wait_converged "$vm" 60

log "stop the Replica server; rewrite 2 MiB until tracking stops"
stop_daemon replica
for i in $(seq 1 40); do
    qemu-io -f raw "$uri" -c "write -P $((i % 200 + 20)) 0 2M" >/dev/null ||
        fail "guest write $i failed"
    [ "$(jget primary .health replication show "$vm")" = Critical ] && break
    sleep 0.3
done
[ "$(jget primary .health replication show "$vm")" = Critical ] ||
    fail "tracking never stopped"
qemu-io -f raw "$uri" -c 'write -P 0xee 1M 1M' -c 'write -z 3M 64k' >/dev/null ||
    fail "guest writes with tracking stopped"
start_replica
# A cycle sent just before the Replica server stopped is applied now; the
# resynchronization holds the Replica VM where it then is.
wait_until 30 eval '[ "$(repl replica "$vm" applied_cycle)" = "$(repl replica "$vm" last_cycle)" ]' ||
    fail "the Replica server did not apply its staged cycles"
held=$(repl replica "$vm" applied_cycle)

# served — make sure the VM's disks are served by the (restarted) primary.
served() {
    vr primary vm start "$vm" --no-hypervisor >/dev/null 2>&1 || true
}

# die_at FAULT [CMD…] — restart the primary with the fault point armed, run
# CMD (if any), and wait for the primary to die there by SIGKILL.  Without
# CMD the restarted primary goes on with the resynchronization by itself,
# maybe before its socket is up (the VM's data plane outlived the daemon).
die_at() {
    local fault=$1
    shift
    stop_daemon primary
    if [ $# -gt 0 ]; then
        start_primary VMREPLICA_FAULT="$fault"
        served
        # The fault point may be reached before the command's reply is
        # written (the step runs in the VM's worker): then the reply is
        # empty, and the catalog already holds what the command asked.
        local out
        out=$("$@" 2>&1) || grep -qE 'Empty reply from server|Recv failure' <<<"$out" ||
            fail "$*: $out"
    else
        spawn_daemon primary VMREPLICA_FAULT="$fault"
    fi
    wait_until 60 daemon_dead primary ||
        fail "the primary did not reach $fault (state $(repl primary "$vm" state), $(repl primary "$vm" last_error))"
    [ "$DAEMON_STATUS" -eq 137 ] ||
        fail "the primary exited $DAEMON_STATUS, not by SIGKILL at $fault"
    log "  the primary died at $fault"
    local at
    at=$(repl replica "$vm" applied_cycle)
    [ "$at" = "$held" ] ||
        fail "the Replica VM moved from cycle $held to $at during the resynchronization"
}

log "resume --resync, killed at every step"
die_at resync-rearmed:1 vr primary replication resume "$vm" --resync
die_at resync-cycle-sent:1
kill_daemon replica
start_replica
[ "$(repl replica "$vm" applied_cycle)" = "$held" ] ||
    fail "the restarted Replica server applied past cycle $held"
vrj replica replication show "$vm" | jq -r '.health_details[]' |
    grep -qxF "resynchronizing: the Replica VM stays at cycle $held until the new cut is received whole" ||
    fail "the Replica server does not say it holds its VM: $(vrj replica replication show "$vm" | jq -c .health_details)"
die_at resync-completing:1

log "restart without faults: the resynchronization ends"
stop_daemon primary
start_primary
served
wait_until 90 repl_is primary "$vm" state Replicating ||
    fail "the resynchronization did not complete: $(repl primary "$vm" state) $(repl primary "$vm" last_error)"
compared=$(vrj primary replication measure "$vm" | jq -r .resync_compared)
[ "$compared" -gt 0 ] && [ "$compared" -le $((4 << 20)) ] ||
    fail "compared $compared bytes (the changed regions are under 4 MiB)"
qemu-io -f raw "$uri" -c 'write -P 0x5a 5M 1M' >/dev/null
wait_converged "$vm" 90
assert_identical "$vm"
assert_normal_after_outage "$vm"
log "PASS"
