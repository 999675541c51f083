#!/bin/bash
# resync-schedule: when a resynchronization runs is the administrator's
# choice (issue #11 part 2, SPEC §5): a window for the automatic one, a
# time for one started by hand (surviving a restart), suspend and
# --continue, stop-resync.
#
# As resync-crash: the change log is a 4 MiB tmpfs, the Replica server is
# down, the guest rewrites 2 MiB until tracking stops.
#   1. --resync-window closed now: the automatic resynchronization waits
#      (WaitingForStartResynchronize, health Critical saying so); a window
#      that holds now starts it, and the replica ends exact.
#   2. --auto-resync off, tracking stopped again (the VM stays Replicating,
#      Critical, retrying): --continue with nothing
#      suspended is refused; --at +8s waits across a daemon restart;
#      suspend gives ResynchronizeSuspended, a plain resume is refused,
#      stop-resync leaves Error "resynchronization required"; --at +3s
#      then starts it no earlier than asked, and the replica ends exact.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp mount
requires_build
setup_pair

vm=rw1
# A window of one hour starting in two hours (local time): closed now.
closed=$(date -d '+2 hours' +%H:00)-$(date -d '+3 hours' +%H:00)
open_now=$(date -d '-1 hour' +%H:00)-$(date -d '+2 hours' +%H:00)
create_vm_small_log "$vm"
enable_replication "$vm" --frequency 1s --resync-window "$closed"
wait_converged "$vm" 60
[ "$(jget primary .resync_window replication show "$vm")" = "$closed" ] ||
    fail "replication show: resync_window $(jget primary .resync_window replication show "$vm")"

# stop_tracking ROUND — with the Replica server down, rewrite 2 MiB until
# change tracking stops; then a few writes untracked, and the Replica
# server back.
stop_tracking() {
    stop_daemon replica
    for i in $(seq 1 40); do
        qemu-io -f raw "$uri" -c "write -P $((i % 200 + $1)) 0 2M" >/dev/null ||
            fail "guest write $i failed"
        vrj primary replication show "$vm" | jq -r '.health_details[]' |
            grep -q '^change tracking stopped' && break
        sleep 0.3
    done
    vrj primary replication show "$vm" | jq -r '.health_details[]' |
        grep -q '^change tracking stopped' || fail "tracking never stopped"
    qemu-io -f raw "$uri" -c "write -P $1 1M 1M" -c 'write -z 3M 64k' >/dev/null ||
        fail "guest writes with tracking stopped"
    start_replica
}
details() { vrj primary replication show "$vm" | jq -r '.health_details[]'; }

log "round 1: the automatic resynchronization waits for its window"
stop_tracking 20
wait_until 30 repl_is primary "$vm" state WaitingForStartResynchronize ||
    fail "state $(repl primary "$vm" state), not waiting for the window"
[ "$(jget primary .health replication show "$vm")" = Critical ] ||
    fail "health while waiting: $(jget primary .health replication show "$vm")"
details | grep -qxF "resynchronization required: it waits for its window $closed" ||
    fail "health details while waiting: $(details)"
sleep 3
repl_is primary "$vm" state WaitingForStartResynchronize ||
    fail "started outside its window: $(repl primary "$vm" state)"
vr primary replication set "$vm" --resync-window "$open_now" >/dev/null ||
    fail "replication set --resync-window"
wait_until 90 repl_is primary "$vm" state Replicating ||
    fail "the resynchronization did not run in its window: $(repl primary "$vm" state) $(repl primary "$vm" last_error)"
vr primary events --vm "$vm" | grep -qF "resynchronization started: its window $open_now is open" ||
    fail "no event for the window's start"
wait_converged "$vm" 90
assert_identical "$vm"

log "round 2: --at across a restart, suspend, --continue, stop-resync"
vr primary replication set "$vm" --auto-resync off >/dev/null || fail "set --auto-resync off"
stop_tracking 120
# Without auto-resync the shipper retries and says why (health Critical).
sleep 2
repl_is primary "$vm" state Replicating ||
    fail "state $(repl primary "$vm" state) with --auto-resync off"
err=$(vr primary replication resume "$vm" --resync --continue 2>&1) &&
    fail "--continue with nothing suspended"
grep -qF "no suspended resynchronization to continue (state Replicating)" <<<"$err" ||
    fail "--continue refusal: $err"
err=$(vr primary replication resume "$vm" --resync --at 'next week' 2>&1) &&
    fail "a bad --at was taken"
grep -qF "invalid --at 'next week'" <<<"$err" || fail "bad --at: $err"
err=$(vr primary replication resume "$vm" --resync --at +8d 2>&1) &&
    fail "--at 8 days ahead was taken"
grep -qF "at most 7 days ahead" <<<"$err" || fail "--at +8d: $err"

vr primary replication resume "$vm" --resync --at +8s >/dev/null || fail "resume --resync --at"
at=$(jget primary .resync_at replication show "$vm")
repl_is primary "$vm" state WaitingForStartResynchronize ||
    fail "after --at: $(repl primary "$vm" state)"
stop_daemon primary
start_primary
vr primary vm start "$vm" --no-hypervisor >/dev/null 2>&1 || true
repl_is primary "$vm" state WaitingForStartResynchronize ||
    fail "after a restart: $(repl primary "$vm" state)"
[ "$(jget primary .resync_at replication show "$vm")" = "$at" ] ||
    fail "the scheduled time changed across the restart"
vr primary replication suspend "$vm" >/dev/null || fail "suspend"
repl_is primary "$vm" state ResynchronizeSuspended ||
    fail "suspend of a scheduled resynchronization: $(repl primary "$vm" state)"
err=$(vr primary replication resume "$vm" 2>&1) && fail "plain resume of a suspended resync"
grep -qF "a resynchronization is pending (ResynchronizeSuspended); go on with it: 'vmreplica replication resume $vm --resync'" <<<"$err" ||
    fail "plain resume refusal: $err"
out=$(vr primary replication stop-resync "$vm") || fail "stop-resync"
grep -qF "resynchronization of vm $vm stopped (state Error)" <<<"$out" ||
    fail "stop-resync said: $out"
details | grep -qF "resynchronization required: stopped by the administrator" ||
    fail "health details after stop-resync: $(details)"
err=$(vr primary replication stop-resync "$vm" 2>&1) && fail "stop-resync twice"
grep -qF "no resynchronization to stop (state Error)" <<<"$err" || fail "stop-resync twice: $err"

vr primary replication resume "$vm" --resync --at +3s >/dev/null || fail "resume --resync --at +3s"
at=$(jget primary .resync_at replication show "$vm")
wait_until 90 repl_is primary "$vm" state Replicating ||
    fail "the scheduled resynchronization did not complete: $(repl primary "$vm" state) $(repl primary "$vm" last_error)"
started=$(vrj primary events --vm "$vm" |
    jq -r '[.events[] | select(.message == "scheduled resynchronization started")] | last | .time')
[ -n "$started" ] && [ "$started" != null ] || fail "no event for the scheduled start"
[ "$(date -d "$started" +%s)" -ge "$at" ] ||
    fail "started at $started, before the time asked ($(date -d "@$at"))"
wait_converged "$vm" 90
assert_identical "$vm"
log "PASS"
