#!/bin/bash
# recovery-history: undo logs on the Replica server and the retention of
# recovery points, checked against the primary's own record of its disk.
#
# The primary's plugin logs the SHA-256 of the disk at every seal
# (VMREPLICA_TEST_HASHLOG).  Replication runs every second with
# --recovery-history 3 --point-interval 3s (a 3-second "hour"), so within
# half a minute points are kept for the recent window (every cycle of the
# last interval) and one per older interval, and the rest are pruned.
# With replication suspended (no cycle applied meanwhile), every retained
# point is rebuilt from the live Replica disk plus the undo files
# (tests/tools/pointcat) and must hash to the primary's disk at that very
# cycle; the undo files must tile the history exactly (one span between
# consecutive points: pruned points were merged away).
#
# Then the Replica server is SIGKILLed at each step of keeping history —
# capturing a cycle's undo data (before and after its rename), after a
# cycle reached the disk but before it was recorded, after dropping points
# from the catalog but before the files followed, in the middle of merging
# two spans — and after each restart every retained point must still hash
# to the primary's value.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq curl openssl nbdkit python3 cmp sha256sum socat
requires_build
POINTCAT=$BUILD_DIR/tests/tools/pointcat
[ -x "$POINTCAT" ] || skip "pointcat not built: $POINTCAT"

HASHLOG=$TESTDIR/hashlog
PRIMARY_ENV=(VMREPLICA_TEST_HASHLOG="$HASHLOG")
setup_pair

vm=hist
create_vm "$vm" 16M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 2M' >/dev/null
enable_replication "$vm" --frequency 1s --recovery-history 3 \
    --point-interval 3s
[ "$(repl primary "$vm" recovery_history)" = 3 ] ||
    fail "primary does not show recovery_history 3"
# `replication show` (the table) shows the settings, on both sides.
for side in primary replica; do
    show=$(vr "$side" replication show "$vm") || fail "$side: replication show"
    grep -qx 'Recovery history: *3 points besides the latest, one per 3s' <<<"$show" ||
        fail "$side: replication show lacks the recovery history: $show"
done
grep -qx 'App-consistent points: *off' <<<"$(vr primary replication show "$vm")" ||
    fail "primary: replication show lacks the app-consistent setting"

# write_for SECONDS — distinct, partly overlapping writes, zeroes, trims.
ROUND=0
write_for() {
    local end=$((SECONDS + $1))
    while [ "$SECONDS" -lt "$end" ]; do
        ROUND=$((ROUND + 1))
        qemu-io -f raw "$uri" \
            -c "write -P $((ROUND % 250 + 1)) $((ROUND % 16 * 65536)) 96k" \
            -c "write -P $((ROUND * 3 % 250 + 1)) $((ROUND % 7 * 1048576 + 512)) 1k" \
            -c "write -z $((ROUND % 5 * 131072 + 4194304)) 64k" \
            -c "discard $((ROUND % 3 * 65536 + 8388608)) 64k" \
            >/dev/null || fail "qemu-io round $ROUND"
        sleep 0.25
    done
}

# check_points WHAT — suspend replication, wait until the replica has
# applied everything, rebuild every point and compare with the hashlog.
# Replication is left suspended: the caller resumes it.
check_points() {
    local what=$1 pts latest p h want undo spans n_pts
    vr primary replication suspend "$vm" >/dev/null || fail "suspend"
    wait_until 30 _replica_caught_up || fail "$what: replica did not catch up"
    pts=$(vrj replica points list "$vm" | jq -c .points) ||
        fail "$what: points list"
    latest=$(repl replica "$vm" applied_cycle)
    [ "$(jq -r '.[-1].id' <<<"$pts")" = "$latest" ] ||
        fail "$what: latest point is not the applied cycle $latest: $pts"
    n_pts=$(jq length <<<"$pts")
    undo="$(dirname "$(disk_path replica "$vm")")/undo"
    for p in $(jq -r '.[].id' <<<"$pts"); do
        "$POINTCAT" "$undo" "$p" "$latest" "$TESTDIR/pt" \
            "$(disk_path replica "$vm")" ||
            fail "$what: point $p cannot be rebuilt"
        h=$(sha256sum "$TESTDIR/pt.0" | cut -d' ' -f1)
        want=$(awk -v c="$p" '$1 == c { print $3 }' "$HASHLOG")
        [ "$h" = "$want" ] ||
            fail "$what: point $p hashes to $h, the primary had $want"
    done
    # One span per gap between consecutive points, nothing else.
    spans=$(find "$undo" -name '*.undo' | wc -l)
    [ "$spans" = $((n_pts - 1)) ] ||
        fail "$what: $spans undo files for $n_pts points: $(ls "$undo")"
    [ -z "$(find "$undo" -name '*.tmp')" ] || fail "$what: temporary files left"
    log "$what: $n_pts points (cycles $(jq -r '[.[].id] | join(",")' <<<"$pts")), each equal to the primary at its cycle"
    N_POINTS=$n_pts
}
_replica_caught_up() {
    local last applied
    last=$(repl primary "$vm" last_cycle) || return 1
    applied=$(repl replica "$vm" applied_cycle) || return 1
    [ "$applied" -ge "$last" ] && [ "$(repl replica "$vm" last_cycle)" = "$applied" ]
}

log "write for 20 s while replicating every second"
write_for 20
check_points "after 20 s"
applied=$(repl replica "$vm" applied_cycle)
[ "$N_POINTS" -ge 4 ] || fail "only $N_POINTS points kept"
[ "$N_POINTS" -lt $((applied - 2)) ] ||
    fail "$N_POINTS points of about $applied cycles: nothing was pruned"
vr replica points list "$vm" | grep -q "recent (every cycle)" ||
    fail "points list does not show the recent window"
# --json gives each point's time in RFC 3339, as the rest of the API.
vrj replica points list "$vm" |
    jq -e '.points | length > 0 and all(.[]; .time == (.time_ms / 1000 | floor | todate))' >/dev/null ||
    fail "points list --json: times not RFC 3339: $(vrj replica points list "$vm" | jq -c '[.points[] | {time, time_ms}]')"
vr primary points list "$vm" >/dev/null 2>&1 &&
    fail "points list on the primary should be refused"
# Checked above while suspended: a cycle applied after a long check (a
# loaded machine) would leave no point but the latest within the 3 s
# window, and no "recent" line (a flake).
vr primary replication resume "$vm" >/dev/null || fail "resume"

log "serve the oldest point read-only over NBD; a qcow2 overlay makes it writable"
vr primary replication suspend "$vm" >/dev/null || fail "suspend"
wait_until 30 _replica_caught_up || fail "replica did not catch up"
pts=$(vrj replica points list "$vm" | jq -c .points)
oldest=$(jq -r '.[0].id' <<<"$pts")
latest=$(repl replica "$vm" applied_cycle)
rdisk=$(disk_path replica "$vm")
undo="$(dirname "$rdisk")/undo"
live=$(sha256sum "$rdisk" | cut -d' ' -f1)
vsock=$TESTDIR/view.sock
rm -f "$vsock"
nbdkit --foreground --unix "$vsock" "$VMREPLICA_PLUGIN" disk=disk0:"$rdisk" \
    control="$TESTDIR/view.ctl" view="$undo:$oldest:$latest" \
    >>"$TESTDIR/view.log" 2>&1 &
vpid=$!
_bg_pids+=("$vpid")
wait_until 10 test -S "$vsock" || fail "view did not come up"
vuri="nbd+unix:///disk0?socket=$vsock"
qemu-img convert -f raw -O raw "$vuri" "$TESTDIR/view.raw" ||
    fail "read the view"
h=$(sha256sum "$TESTDIR/view.raw" | cut -d' ' -f1)
want=$(awk -v c="$oldest" '$1 == c { print $3 }' "$HASHLOG")
[ "$h" = "$want" ] || fail "view of point $oldest hashes to $h, want $want"
qemu-io -f raw "$vuri" -c 'write 0 4k' >/dev/null 2>&1 &&
    fail "the view accepted a write"
[ "$(printf 'STATUS\n' | socat -t 5 - UNIX-CONNECT:"$TESTDIR/view.ctl")" = \
  "OK view $oldest $latest" ] || fail "view STATUS"
qemu-img create -q -f qcow2 -F raw -b "$vuri" "$TESTDIR/overlay.qcow2" ||
    fail "overlay on the view"
qemu-io -f qcow2 "$TESTDIR/overlay.qcow2" -c 'write -P 0x99 0 64k' \
    -c 'read -P 0x99 0 64k' >/dev/null || fail "write through the overlay"
qemu-img convert -f qcow2 -O raw "$TESTDIR/overlay.qcow2" "$TESTDIR/ov.raw"
cmp -s -i 65536 "$TESTDIR/ov.raw" "$TESTDIR/view.raw" ||
    fail "overlay differs from the point beyond what was written to it"
[ "$(sha256sum "$rdisk" | cut -d' ' -f1)" = "$live" ] ||
    fail "the Replica disk changed under a view"
kill "$vpid"
wait "$vpid" 2>/dev/null || true
log "point $oldest served read-only (= the primary at cycle $oldest); overlay writes left the Replica disk alone"

# A view of the latest point stays at that point while later cycles are
# applied, once REFRESH has given it their undo spans — as long as the point
# is kept (a test failover pins it; here a longer interval keeps every
# cycle of the next minute, whatever the speed of this machine).
vr primary replication set "$vm" --point-interval 60s >/dev/null ||
    fail "replication set --point-interval 60s"
rm -f "$vsock"
nbdkit --foreground --unix "$vsock" "$VMREPLICA_PLUGIN" disk=disk0:"$rdisk" \
    control="$TESTDIR/view.ctl" view="$undo:$latest:$latest" \
    >>"$TESTDIR/view.log" 2>&1 &
vpid=$!
_bg_pids+=("$vpid")
wait_until 10 test -S "$vsock" || fail "view did not come up"
vr primary replication resume "$vm" >/dev/null || fail "resume"
write_for 2
vr primary replication suspend "$vm" >/dev/null || fail "suspend"
wait_until 30 _replica_caught_up || fail "replica did not catch up"
now=$(repl replica "$vm" applied_cycle)
[ "$now" -gt "$latest" ] || fail "no cycle applied after $latest"
qemu-img convert -f raw -O raw "$vuri" "$TESTDIR/view.raw"
want=$(awk -v c="$latest" '$1 == c { print $3 }' "$HASHLOG")
[ "$(sha256sum "$TESTDIR/view.raw" | cut -d' ' -f1)" != "$want" ] ||
    fail "cycles after $latest changed nothing: REFRESH is not tested"
ctl_v() { printf '%s\n' "$1" | socat -t 5 - UNIX-CONNECT:"$TESTDIR/view.ctl"; }
[ "$(ctl_v "REFRESH $((latest - 1))")" = "ERR REFRESH wants a cycle >= $latest" ] ||
    fail "REFRESH backwards not refused"
[ "$(ctl_v "REFRESH $now")" = "OK $latest $now" ] || fail "REFRESH $now"
qemu-img convert -f raw -O raw "$vuri" "$TESTDIR/view.raw"
[ "$(sha256sum "$TESTDIR/view.raw" | cut -d' ' -f1)" = "$want" ] ||
    fail "after REFRESH $now the view is not point $latest"
kill "$vpid"
wait "$vpid" 2>/dev/null || true
vr primary replication set "$vm" --point-interval 3s >/dev/null ||
    fail "replication set --point-interval 3s"
vr primary replication resume "$vm" >/dev/null || fail "resume"
log "view of point $latest kept at it across cycles $((latest + 1))..$now by REFRESH"

for fault in undo-capture:2 undo-captured:2 apply-before-commit:2 \
             prune-after-catalog:3 undo-merge:2; do
    log "--- SIGKILL of the Replica server at $fault ---"
    # Suspended while the replica restarts: the primary's cycles (one a
    # second, even empty ones) would otherwise reach the fault point before
    # wait_daemon sees the socket up on a loaded machine (a flake: "daemon
    # replica exited (status 137) before its socket was up").
    vr primary replication suspend "$vm" >/dev/null || fail "suspend"
    stop_daemon replica
    spawn_daemon replica VMREPLICA_FAULT="$fault"
    wait_daemon replica 20
    vr primary replication resume "$vm" >/dev/null || fail "resume"
    ( write_for 30 ) &
    wpid=$!
    killed_at replica "$fault" 45
    kill "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
    start_daemon replica
    write_for 3
    check_points "after a crash at $fault"
    vr primary replication resume "$vm" >/dev/null || fail "resume"
done
assert_replicating "$vm"
log "PASS"
