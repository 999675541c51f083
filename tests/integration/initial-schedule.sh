#!/bin/bash
# initial-schedule: `initial-replication start VM --at TIME` starts the
# initial replication by itself at TIME, also across a daemon restart, and
# `initial-replication stop VM` cancels a scheduled or a running one
# (SPEC §5; issue #11).
#
#   - TIME more than 7 days ahead, in the past or not a time: refused with
#     the exact error;
#   - a running copy stopped: back to ReadyForInitialReplication, the next
#     start is afresh;
#   - a start scheduled a few seconds ahead, then stopped: when its time
#     has passed, nothing started and nothing more was sent (byte counters);
#   - a start scheduled a few seconds ahead, shown by `replication show`
#     and `measure`, the primary daemon restarted before the time: it
#     starts by itself, not before the time, and the replica converges
#     byte-identical.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp
requires_build

# Slow chunks, so a running copy can be stopped in the middle.
PRIMARY_ENV=(VMREPLICA_TEST_SEND_DELAY_MS=700)
setup_pair

vm=sched
MiB=1048576
create_vm "$vm" 128M
uri=$(nbd_uri primary "$vm")
head -c $((96 * MiB)) /dev/urandom >"$TESTDIR/rand"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/rand 0 96M" -c flush >/dev/null ||
    fail "fill the disk"
rm -f "$TESTDIR/rand"

vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s >/dev/null ||
    fail "replication enable"

# rfc3339 SECONDS_FROM_NOW
rfc3339() { date -u -d "@$(($(date +%s) + $1))" +%Y-%m-%dT%H:%M:%SZ; }
wire() { vrj primary replication measure "$vm" | jq -r .bytes_sent_wire; }
state() { repl primary "$vm" state; }

log "refusals"
far=$(rfc3339 $((7 * 86400 + 3600)))
out=$(vr primary initial-replication start "$vm" --at "$far" 2>&1) &&
    fail "a start 7 days and an hour ahead was accepted"
[ "$out" = "vmreplica: error: vm $vm: start time $far is more than 7 days ahead" ] ||
    fail "too far ahead: $out"
past=$(rfc3339 -60)
out=$(vr primary initial-replication start "$vm" --at "$past" 2>&1) &&
    fail "a start in the past was accepted"
[ "$out" = "vmreplica: error: vm $vm: start time $past is in the past" ] ||
    fail "in the past: $out"
out=$(vr primary initial-replication start "$vm" --at 25:00 2>&1) &&
    fail "--at 25:00 was accepted"
[ "$out" = "vmreplica: error: --at 25:00: expected +DURATION (e.g. +2h), HH:MM, YYYY-MM-DD HH:MM[:SS] (local time) or an RFC 3339 date-time with its zone" ] ||
    fail "25:00: $out"
# +DURATION, as replication resume --resync --at takes it.
vr primary initial-replication start "$vm" --at +3h >/dev/null || fail "--at +3h"
t=$(vrj primary replication show "$vm" | jq -r .initial_replication_scheduled)
s=$(($(date -d "$t" +%s) - $(date +%s)))
[ "$s" -gt $((3 * 3600 - 30)) ] && [ "$s" -le $((3 * 3600)) ] || fail "--at +3h scheduled for $t"
vr primary initial-replication stop "$vm" >/dev/null || fail "stop (+3h)"
out=$(vr primary initial-replication stop "$vm" 2>&1) &&
    fail "stop with nothing scheduled succeeded"
[ "$out" = "vmreplica: error: vm $vm: no initial replication is scheduled or running (state ReadyForInitialReplication)" ] ||
    fail "stop with nothing: $out"
# HH:MM is today or tomorrow: always ahead, within a day.
vr primary initial-replication start "$vm" --at "$(date -d '+2 hours' +%H:%M)" >/dev/null ||
    fail "--at HH:MM"
t=$(vrj primary replication show "$vm" | jq -r .initial_replication_scheduled)
s=$(date -d "$t" +%s)
[ "$s" -gt "$(date +%s)" ] && [ "$s" -le $(($(date +%s) + 86400)) ] ||
    fail "--at HH:MM scheduled for $t"
vr primary initial-replication stop "$vm" >/dev/null || fail "stop (HH:MM)"

log "a running copy stopped goes back to ReadyForInitialReplication"
vr primary initial-replication start "$vm" >/dev/null || fail "start"
wait_until 20 eval '[ "$(vrj primary replication measure "$vm" | jq -r .initial_replication_sent)" -gt 0 ]' ||
    fail "the copy did not start"
out=$(vr primary initial-replication stop "$vm") || fail "stop (running)"
[ "$out" = "initial replication of vm $vm stopped; it waits for 'initial-replication start'" ] ||
    fail "stop said: $out"
[ "$(state)" = ReadyForInitialReplication ] || fail "state after stop: $(state)"
vrj primary replication measure "$vm" >"$TESTDIR/m.json"
[ "$(jq -r '"\(.current_task) \(.initial_replication_sent)"' "$TESTDIR/m.json")" = "None 0" ] ||
    fail "after stop: $(jq -c '{current_task, initial_replication_sent}' "$TESTDIR/m.json")"
vrj primary events | jq -r '.events[].message' |
    grep -q "^initial replication stopped after [0-9]* bytes; it starts afresh with 'initial-replication start'$" ||
    fail "no event for the stop"
# The shipper has let go of the copy: nothing more goes out.
sleep 2
w0=$(wire)
sleep 2
[ "$(wire)" = "$w0" ] || fail "bytes still sent after the stop ($w0 -> $(wire))"

log "a scheduled start, stopped before its time: nothing starts"
at=$(rfc3339 4)
out=$(vr primary initial-replication start "$vm" --at "$at") || fail "start --at"
[ "$out" = "initial replication of vm $vm scheduled for $at" ] || fail "start --at said: $out"
vr primary initial-replication stop "$vm" >/dev/null || fail "stop (scheduled)"
vrj primary events | jq -r '.events[].message' |
    grep -qxF "initial replication scheduled for $at cancelled" ||
    fail "no event for the cancelled schedule"
[ "$(vrj primary replication show "$vm" | jq -r .initial_replication_scheduled)" = null ] ||
    fail "still scheduled after stop"
until [ "$(date +%s)" -ge $(($(date -d "$at" +%s) + 3)) ]; do sleep 0.5; done
[ "$(state)" = ReadyForInitialReplication ] || fail "cancelled start ran: $(state)"
[ "$(wire)" = "$w0" ] || fail "cancelled start sent bytes ($w0 -> $(wire))"

log "a scheduled start survives a daemon restart and starts at its time"
at=$(rfc3339 8)
vr primary initial-replication start "$vm" --at "$at" >/dev/null || fail "start --at (2)"
[ "$(vrj primary replication show "$vm" | jq -r .initial_replication_scheduled)" = "$at" ] ||
    fail "replication show does not show $at"
vrj primary replication measure "$vm" >"$TESTDIR/m.json"
[ "$(jq -r .initial_replication_scheduled "$TESTDIR/m.json")" = "$at" ] ||
    fail "measure does not show $at"
jq -r '.health_details[]' "$TESTDIR/m.json" |
    grep -qxF "initial replication is scheduled for $at" ||
    fail "no health detail for the schedule"
stop_daemon primary
PRIMARY_ENV=()
start_primary
[ "$(state)" = ReadyForInitialReplication ] || fail "state after restart: $(state)"
[ "$(vrj primary replication show "$vm" | jq -r .initial_replication_scheduled)" = "$at" ] ||
    fail "the schedule was lost in the restart"
[ "$(date +%s)" -lt "$(date -d "$at" +%s)" ] ||
    fail "the restart took past the scheduled time; the test proves nothing"
wait_until 30 eval '[ "$(state)" != ReadyForInitialReplication ]' ||
    fail "the scheduled start did not happen"
started=$(vrj primary events | jq -r --arg m "scheduled initial replication started (it was set for $at)" \
    '.events[] | select(.message == $m) | .time')
[ -n "$started" ] || fail "no event for the scheduled start"
[[ "$started" > "$at" || "$started" == "$at" ]] ||
    fail "started at $started, before its time $at"
log "  scheduled for $at, started at $started"
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
log "PASS"
