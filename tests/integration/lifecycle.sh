#!/bin/bash
# lifecycle: suspend, resume, remove and re-enable replication; missed cycles.
#
# A VM replicates every second while a writer runs.
#   - `replication suspend` on the Replica server is refused, naming the
#     primary server to run it on;
#   - `replication suspend`: the replica's applied cycle stays put for 3+ s
#     while writes go on, the primary's pending_size grows above 0, its
#     health is Warning with a detail that says suspended;
#     `replication resume`: the replica converges (cmp).
#   - `replication measure`: successful_replication_count > 0, no errors.
#   - `vm remove` is refused while the VM runs, and (once stopped) while
#     replication is enabled, with a message that says so.
#   - `replication remove` on the primary: the primary's VM is mode "none"
#     and has no replication any more; the replica keeps the VM (mode
#     "replica") and its disk file, and `replication list` there no longer
#     lists it.
#   - The primary then changes the disk (new data, and zeroes and discards
#     over data the kept replica copy still holds), replication of the same
#     VM to the same replica is enabled again and initial replication run:
#     the replica must converge to a byte-identical copy (re-registration of
#     a kept Replica VM).
#   - Missed cycles: the primary is restarted with
#     VMREPLICA_TEST_SEND_DELAY_MS=2500 and a second VM replicates every
#     second while written: missed_replication_count becomes > 0 and nothing
#     is lost (writes stop, the replica converges, cmp).
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp numfmt
requires_build

setup_pair

vm=life1
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 2M' -c 'write -P 0x22 16M 2M' \
    -c 'write -P 0x33 48M 2M' >/dev/null
log "enable replication every second and run initial replication"
enable_replication "$vm" --frequency 1s
RDISK=$(disk_path replica "$vm")
UUID=$(jget primary .uuid vm show "$vm")

# --- suspend / resume ---------------------------------------------------------
start_writer "$vm" 64k
sleep 2
log "suspend replication while the writer runs"
# Suspend belongs to the primary: the Replica server refuses it and says
# where to run it.
err=$(vr replica replication suspend "$vm" 2>&1) &&
    fail "replication suspend on the Replica server was accepted"
[ "$err" = "vmreplica: error: vm $vm: a Replica VM is not suspended on the Replica server; run 'vmreplica replication suspend $vm' on its primary server (primary.test.local)" ] ||
    fail "replication suspend on the Replica server: '$err'"
[ "$(repl replica "$vm" state)" = Replicating ] ||
    fail "replica state after the refused suspend: $(repl replica "$vm" state)"
vr primary replication suspend "$vm" >/dev/null || fail "primary: replication suspend"
[ "$(repl primary "$vm" state)" = Suspended ] ||
    fail "primary state after suspend is $(repl primary "$vm" state)"
# A cycle being sent when the suspend came may still land: let it.
sleep 1.5
a0=$(repl replica "$vm" applied_cycle)
t0=$SECONDS
while [ $((SECONDS - t0)) -lt 4 ]; do
    a=$(repl replica "$vm" applied_cycle)
    [ "$a" = "$a0" ] ||
        fail "replica applied cycle moved $a0 -> $a while replication was suspended"
    sleep 0.5
done
kill -0 "$WRITER_PID" 2>/dev/null || fail "the writer stopped"
m=$(vrj primary replication measure "$vm")
pending=$(jq -r .pending_size <<<"$m")
health=$(jq -r .health <<<"$m")
[ "$pending" -gt 0 ] || fail "pending_size is $pending while suspended and writing"
[ "$health" = Warning ] || fail "health while suspended is $health, want Warning"
jq -e '.health_details | map(test("suspend"; "i")) | any' <<<"$m" >/dev/null ||
    fail "health details do not mention suspended: $(jq -c .health_details <<<"$m")"
log "suspended: applied cycle stayed at $a0 for 4 s, pending_size $pending, health $health ($(jq -r '.health_details | join("; ")' <<<"$m"))"

vr primary replication resume "$vm" >/dev/null || fail "primary: replication resume"
[ "$(repl primary "$vm" state)" = Replicating ] ||
    fail "primary state after resume is $(repl primary "$vm" state)"
wait_until 20 _applied_at_least "$vm" $((a0 + 1)) ||
    fail "replica did not apply a cycle after resume"
sleep 1
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
# Suspended time is not a cycle "still being sent when the next is due":
# no cycle may count as missed, and health is Normal again.
m=$(vrj primary replication measure "$vm")
[ "$(jq -r .missed_replication_count <<<"$m")" = 0 ] ||
    fail "the suspension was counted as $(jq -r .missed_replication_count <<<"$m") missed cycle(s)"
[ "$(jq -r .health <<<"$m")" = Normal ] ||
    fail "health after resume: $(jq -c '[.health, .health_details]' <<<"$m")"

m=$(vrj primary replication measure "$vm")
ok=$(jq -r .successful_replication_count <<<"$m")
errs=$(jq -r .replication_errors <<<"$m")
[ "$ok" -gt 0 ] || fail "successful_replication_count is $ok"
[ "$errs" = 0 ] || fail "replication_errors is $errs"
log "measure: $ok successful cycles, $errs errors, $(jq -r .bytes_sent_wire <<<"$m") bytes on the wire"

# --- vm remove is refused -----------------------------------------------------
if out=$(vr primary vm remove "$vm" 2>&1); then
    fail "vm remove of a running, replicated VM succeeded"
fi
log "vm remove while running: refused ($out)"
vr primary vm stop "$vm" >/dev/null || fail "primary: vm stop"
if out=$(vr primary vm remove "$vm" 2>&1); then
    fail "vm remove of a VM with replication enabled succeeded"
fi
[[ $out == "vmreplica: error: "* ]] || fail "vm remove: unexpected output '$out'"
[[ $out == *replication* ]] || fail "vm remove: the error does not say replication is enabled: '$out'"
log "vm remove while replication is enabled: refused ($out)"
vr primary vm show "$vm" >/dev/null || fail "the vm is gone after a refused remove"
vr primary vm start "$vm" --no-hypervisor >/dev/null || fail "primary: vm start"
uri=$(nbd_uri primary "$vm")

# --- replication remove -------------------------------------------------------
qemu-io -f raw "$uri" -c 'write -P 0x44 4M 1M' >/dev/null
wait_converged "$vm" 30
log "replication remove on the primary"
vr primary replication remove "$vm" >/dev/null || fail "primary: replication remove"
mode=$(jget primary .mode vm show "$vm")
[ "$mode" = none ] || fail "primary vm mode after remove is '$mode'"
if vr primary replication show "$vm" >/dev/null 2>&1; then
    fail "primary: replication show still works after remove"
fi
[ "$(jget replica .mode vm show "$vm")" = replica ] ||
    fail "replica vm mode is $(jget replica .mode vm show "$vm")"
[ "$(jget replica .disks[0].path vm show "$vm")" = "$RDISK" ] ||
    fail "replica disk path changed"
[ -s "$RDISK" ] || fail "replica disk $RDISK is gone"
n=$(vrj replica replication list | jq --arg u "$UUID" '[.replications[] | select(.uuid == $u)] | length')
[ "$n" = 0 ] || fail "replica: replication list still lists $vm"
n=$(vrj primary replication list | jq --arg u "$UUID" '[.replications[] | select(.uuid == $u)] | length')
[ "$n" = 0 ] || fail "primary: replication list still lists $vm"
log "removed: primary mode none; replica keeps $vm (mode replica, $RDISK), not in its replication list"

# --- re-enable to the kept replica ---------------------------------------------
log "change the disk, then enable replication again to the same replica"
qemu-io -f raw "$uri" -c 'write -P 0x55 8M 1M' -c 'write -z 0 1M' \
    -c 'discard 16M 1M' -c 'write -z 48M 2M' -c 'write -P 0x66 60M 64k' \
    >/dev/null
enable_replication "$vm" --frequency 1s
[ "$(repl replica "$vm" mode)" = replica ] || fail "replica side mode after re-enable"
[ "$(jget replica .disks[0].path vm show "$vm")" = "$RDISK" ] ||
    fail "re-enable created a new replica disk instead of reusing $RDISK"
start_writer "$vm" 64k
sleep 2
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
[ "$(repl replica "$vm" state)" = Replicating ] ||
    fail "replica state after re-enable: $(repl replica "$vm" state)"
log "re-enabled replication converged (cycle $CONVERGED_CYCLE)"

# --- missed cycles -------------------------------------------------------------
log "restart the primary with VMREPLICA_TEST_SEND_DELAY_MS=2500"
stop_daemon primary
start_primary VMREPLICA_TEST_SEND_DELAY_MS=2500
vm2=life2
create_vm "$vm2" 32M
qemu-io -f raw "$(nbd_uri primary "$vm2")" -c 'write -P 0x77 0 1M' >/dev/null
enable_replication "$vm2" --frequency 1s
start_writer "$vm2" 64k
sleep 8
m=$(vrj primary replication measure "$vm2")
missed=$(jq -r .missed_replication_count <<<"$m")
[ "$missed" -gt 0 ] ||
    fail "missed_replication_count is $missed after 8 s of 2.5 s uploads every 1 s"
log "after 8 s: missed $missed, successful $(jq -r .successful_replication_count <<<"$m") ($(jq -r '.health_details | join("; ")' <<<"$m"))"
stop_writer
# With 2.5 s uploads a cycle sealed before the writer stopped may still be
# in flight (not yet in last_cycle) when wait_converged looks: waiting
# twice makes sure a cycle sealed after the last write has been applied.
wait_converged "$vm2" 60
wait_converged "$vm2" 60
assert_identical "$vm2"
errs=$(jget primary .replication_errors replication measure "$vm2")
[ "$errs" = 0 ] || fail "$vm2: replication_errors is $errs"

# reset-stats clears the counters (and health's missed-cycle warning).
# Suspend first, and let an upload in flight (2.5 s) end, so no cycle
# completes between the reset and the look.
vr primary replication suspend "$vm2" >/dev/null || fail "suspend $vm2"
sleep 3
vr primary replication reset-stats "$vm2" >/dev/null ||
    fail "replication reset-stats $vm2"
m=$(vrj primary replication measure "$vm2")
[ "$(jq -r .missed_replication_count <<<"$m")" = 0 ] &&
    [ "$(jq -r .successful_replication_count <<<"$m")" = 0 ] &&
    [ "$(jq -r .maximum_replication_size <<<"$m")" = 0 ] ||
    fail "reset-stats left counters: $m"
log "reset-stats cleared the counters"
log "PASS (${SECONDS}s)"
