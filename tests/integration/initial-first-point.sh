#!/bin/bash
# initial-first-point: no recovery point before the Replica VM can equal
# the primary.
#
# Initial replication seals a base cycle B and copies the live disk while
# the guest writes on; the writes go into cycles after B, shipped once the
# copy is done.  A cycle sealed *during* the copy (here by `vm stop`) is
# not a consistent point: the copy may read, after that seal, data written
# after it, and applying the cycle does not undo that.  The first cycle at
# whose seal the replica equals the primary is the one open when the copy
# read its last byte.
#
# The primary logs the SHA-256 of its disk at every seal
# (VMREPLICA_TEST_HASHLOG) and delays every upload by 2 s, so the copy
# of 96 MiB (three 32 MiB chunks) reads its last chunk at least 4 s after
# it starts.  Meanwhile: a write at 10M, `vm stop` (seals B+1), `vm
# start`, and a write at 80M — in the copy's last chunk, not read yet, so
# the copy reads the new data, newer than B+1's seal.  With recovery
# history on, every applied cycle is a point; each one listed must rebuild
# (tests/tools/pointcat) to the primary's disk at its cycle, none may be
# B+1, and until the first point is applied the replica's health says
# there is none yet.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq curl openssl nbdkit python3 sha256sum
requires_build
POINTCAT=$BUILD_DIR/tests/tools/pointcat
[ -x "$POINTCAT" ] || skip "pointcat not built: $POINTCAT"

HASHLOG=$TESTDIR/hashlog
PRIMARY_ENV=(VMREPLICA_TEST_HASHLOG="$HASHLOG" VMREPLICA_TEST_SEND_DELAY_MS=2000)
setup_pair

vm=first
create_vm "$vm" 128M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 96M' -c flush >/dev/null ||
    fail "seed the disk"

vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s \
    --recovery-history 2 --point-interval 600s >/dev/null ||
    fail "replication enable"
vr primary initial-replication start "$vm" >/dev/null ||
    fail "initial-replication start"
wait_until 10 repl_is primary "$vm" state InitialReplicationInProgress ||
    fail "initial replication did not start: $(repl primary "$vm" state)"
# The base is recorded once the Replica server knows the method (POST
# .../initial): the state changes before that.
wait_until 10 eval '[ "$(repl primary "$vm" base_cycle)" -gt 0 ]' ||
    fail "no base cycle recorded"
base=$(repl primary "$vm" base_cycle)
log "copy running from base cycle $base"

# A cycle sealed in the middle of the copy, then a write the copy has not
# read yet.
qemu-io -f raw "$uri" -c 'write -P 0x22 10M 64k' >/dev/null || fail "write 10M"
vr primary vm stop "$vm" >/dev/null || fail "vm stop during the copy"
grep -q "^$((base + 1)) " "$HASHLOG" ||
    fail "vm stop did not seal cycle $((base + 1)): $(cat "$HASHLOG")"
vr primary vm start "$vm" --no-hypervisor >/dev/null ||
    fail "vm start during the copy"
qemu-io -f raw "$uri" -c 'write -P 0x33 80M 64k' >/dev/null || fail "write 80M"
sent=$(vrj primary replication measure "$vm" | jq -r .initial_replication_sent)
state=$(repl primary "$vm" state)
[ "$state" = InitialReplicationInProgress ] && [ "$sent" -lt $((64 << 20)) ] ||
    fail "the copy was too fast ($state, $sent bytes sent): the write at 80M may not have preceded its read, the test proves nothing"
log "cycle $((base + 1)) sealed and 80M rewritten while the copy had sent $sent bytes"

# The first consistent cycle is the one open when the copy read its last
# chunk: the one `vm start` opened (the shipper seals nothing during the
# copy).  Until it is applied, the replica's health says there is no point
# yet (looked at now, within the upload delay; checked at the end).
want=$((base + 2))
wait_until 60 repl_is primary "$vm" state Replicating ||
    fail "initial replication did not complete: $(repl primary "$vm" last_error)"
early_applied=$(repl replica "$vm" applied_cycle)
early=$(vrj replica replication measure "$vm")

# A little more writing, then every point against the primary's hashes.
qemu-io -f raw "$uri" -c 'write -P 0x44 20M 64k' >/dev/null || fail "write 20M"
wait_converged "$vm" 90
vr primary replication suspend "$vm" >/dev/null || fail "suspend"
wait_until 30 eval '[ "$(repl replica "$vm" applied_cycle)" -ge "$(repl primary "$vm" last_cycle)" ]' ||
    fail "replica did not catch up"
latest=$(repl replica "$vm" applied_cycle)
pts=$(vrj replica points list "$vm" | jq -c '[.points[].id]') || fail "points list"
rdisk=$(disk_path replica "$vm")
undo="$(dirname "$rdisk")/undo"
for p in $(jq -r '.[]' <<<"$pts"); do
    "$POINTCAT" "$undo" "$p" "$latest" "$TESTDIR/pt" "$rdisk" ||
        fail "point $p cannot be rebuilt"
    h=$(sha256sum "$TESTDIR/pt.0" | cut -d' ' -f1)
    w=$(awk -v c="$p" '$1 == c { print $3 }' "$HASHLOG")
    [ "$h" = "$w" ] ||
        fail "point $p (points $pts, base $base) is not the primary at cycle $p: $h, the primary had $w"
done
[ "$(jq -r '.[0]' <<<"$pts")" = "$want" ] ||
    fail "first point listed is $(jq -r '.[0]' <<<"$pts"), want $want: $pts"
log "points $pts: the first is cycle $want, each equal to the primary at its cycle"
assert_identical "$vm"

[ "$(repl replica "$vm" first_point)" = "$want" ] ||
    fail "replica: first_point $(repl replica "$vm" first_point), want $want"
[ "$early_applied" -lt "$want" ] ||
    fail "cycle $want was applied within the upload delay: the health check proves nothing"
[ "$(jq -r .health <<<"$early")" = Warning ] &&
    jq -e --arg f "$want" '.health_details |
        map(startswith("no recovery point yet: the Replica VM is consistent from cycle " + $f + " on")) | any' \
        <<<"$early" >/dev/null ||
    fail "replica health before cycle $want was applied: $(jq -c '[.health, .health_details]' <<<"$early")"
log "replica health before cycle $want: $(jq -r '.health_details | join("; ")' <<<"$early")"
log "PASS"
