#!/bin/bash
# health-outage: an outage shows in the primary's health as it happens
# (SPEC §9: missed cycles, Warning).
#
# A VM replicates every 2 s.  The Replica server is stopped: within a few
# periods the primary's `replication measure` counts missed cycles and its
# health is Warning with the detail "N cycle(s) missed since the last
# successful one (TIME); last error: …"; `replication list --health
# Warning` lists it.  The Replica server comes back: the detail goes (a
# successful cycle), the missed cycles stay counted.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp numfmt
requires_build

setup_pair
vm=h1
create_vm "$vm" 16M
qemu-io -f raw "$(nbd_uri primary "$vm")" -c 'write -P 0x11 0 1M' >/dev/null
enable_replication "$vm" --frequency 2s
wait_converged "$vm" 30
m=$(vrj primary replication measure "$vm")
[ "$(jq -r .health <<<"$m")" = Normal ] || fail "before the outage: $(jq -c '[.health, .health_details]' <<<"$m")"
[ "$(jq -r .missed_replication_count <<<"$m")" = 0 ] || fail "missed cycles before the outage"

log "the Replica server goes away"
stop_daemon replica
t0=$SECONDS
_outage_shows() {
    m=$(vrj primary replication measure "$vm") || return 1
    [ "$(jq -r .health <<<"$m")" = Warning ] &&
        jq -e '.health_details | map(test("^[0-9]+ cycle\\(s\\) missed since the last successful one \\(20[0-9-]+T[0-9:]+Z\\); last error: ")) | any' \
            <<<"$m" >/dev/null
}
# Due every 2 s: a missed cycle must show within a few periods, not after
# the hour of "no successful cycle" or 20 % of the window.
wait_until 12 _outage_shows ||
    fail "the outage does not show after $((SECONDS - t0)) s: $(jq -c '[.health, .health_details, .missed_replication_count]' <<<"$m")"
missed=$(jq -r .missed_replication_count <<<"$m")
[ "$missed" -ge 1 ] || fail "health Warning but missed_replication_count $missed"
log "after $((SECONDS - t0)) s: $(jq -r '.health_details | join("; ")' <<<"$m") (missed $missed)"
vrj primary replication list --health Warning | jq -e --arg v "$vm" '.replications | map(.vm) | index($v)' >/dev/null ||
    fail "replication list --health Warning: $(vrj primary replication list --health Warning)"
out=$(vr primary replication show "$vm")
grep -q "cycle(s) missed since the last successful one" <<<"$out" ||
    fail "replication show does not show the outage: $out"

log "the Replica server comes back"
start_replica
_recovered() {
    m=$(vrj primary replication measure "$vm") || return 1
    ! jq -e '.health_details | map(test("missed since the last successful")) | any' <<<"$m" >/dev/null
}
wait_until 30 _recovered || fail "still behind after the outage: $(jq -c .health_details <<<"$m")"
[ "$(jq -r .missed_replication_count <<<"$m")" -ge "$missed" ] ||
    fail "the missed cycles were forgotten: $(jq -r .missed_replication_count <<<"$m")"
qemu-io -f raw "$(nbd_uri primary "$vm")" -c 'write -P 0x22 2M 1M' >/dev/null
wait_converged "$vm" 30
assert_identical "$vm"
log "ok"
