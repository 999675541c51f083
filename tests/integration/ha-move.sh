#!/bin/bash
# ha-move: a Replica server moved between two cluster "nodes" by its
# Pacemaker resource agent while a primary replicates, as docs/ha.md
# describes.  The state directory ($TESTDIR/replica) and the Replica
# storage ($TESTDIR/replica-storage) stand for the shared (or DRBD)
# filesystem; each node has only its own log ($TESTDIR/nodeA.log,
# nodeB.log).  Under write load, the agent stops vmreplicad on node A and,
# 3 s later, starts it on node B.  The primary must see failed uploads and
# retry them, and then: no resynchronization (one initial replication in
# all, still Replicating), no lost cycle (the Replica server applies every
# cycle the primary sealed, in order, each equal to the primary's disk at
# its seal), and byte-identical disks at the end.
source "$(dirname "$0")/functions.sh"
requires ocf-tester flock setsid qemu-io jq curl openssl nbdkit python3 cmp numfmt
requires_build
agent=$BUILD_DIR/dist/vmreplicad-ocf
[ -f "$agent" ] || skip "resource agent not built ($agent)"

HASHLOG=$TESTDIR/hashlog
APPLYLOG=$TESTDIR/applylog

# ra NODE ACTION — the resource agent on NODE, as Pacemaker runs it.
ra() {
    env OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=replica-server \
        OCF_RESKEY_CRM_meta_timeout=60000 \
        OCF_RESKEY_state_dir="$(state_dir replica)" \
        OCF_RESKEY_binary="$VMREPLICAD" OCF_RESKEY_client="$VMREPLICA" \
        OCF_RESKEY_options="--hostname replica.test.local -v" \
        OCF_RESKEY_log="$TESTDIR/$1.log" \
        VMREPLICA_TEST_APPLYLOG="$APPLYLOG" \
        sh "$agent" "$2"
}

pair_pki
ra nodeA start || fail "node A: start: $?"
start_daemon primary VMREPLICA_TEST_HASHLOG="$HASHLOG"
configure_pair

vm=web
create_vm "$vm" 32M
qemu-io -f raw "$(nbd_uri primary "$vm")" -c 'write -P 0x5a 0 2M' >/dev/null
enable_replication "$vm" --frequency 1s
start_writer "$vm" 64k
a=$(repl replica "$vm" applied_cycle)
wait_until 30 _applied_at_least "$vm" $((a + 3)) ||
    fail "replica did not reach cycle $((a + 3)) under load on node A"

moved_at=$(repl replica "$vm" applied_cycle)
log "cluster move at applied cycle $moved_at: stop on node A"
ra nodeA stop || fail "node A: stop: $?"
rc=0; ra nodeA monitor || rc=$?
[ "$rc" = 7 ] || fail "node A: monitor after stop: $rc, want 7"
sleep 3 # the cluster fences, mounts the storage, moves the IP address
log "start on node B"
ra nodeB start || fail "node B: start: $?; lock holders: $(ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -F "$(state_dir replica)/vmreplicad.lock" ; for f in /proc/[0-9]*/fd/*; do [ "$(readlink "$f")" = "$(state_dir replica)/vmreplicad.lock" ] && echo "$f $(tr '\0' ' ' <"${f%/fd/*}/cmdline")"; done)"
ra nodeB monitor || fail "node B: monitor: $?"
grep -q "vmreplicad info: event: vmreplicad .* started (state dir $(state_dir replica))" \
    "$TESTDIR/nodeB.log" || fail "node B's log has no daemon start"

wait_until 60 _applied_at_least "$vm" $((moved_at + 5)) ||
    fail "replica did not go past cycle $((moved_at + 5)) on node B"
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"

# What the primary saw: failed uploads retried, then recovery.
events=$(vrj primary events --vm "$vm") || fail "primary: events"
jq -e '[.events[] | select(.message | startswith("replication failed, retrying in "))] | length > 0' \
    <<<"$events" >/dev/null || fail "the primary saw no failed upload during the move"
jq -e '[.events[] | select(.message | test("^replication recovered after [0-9]+ failed attempt"))] | length > 0' \
    <<<"$events" >/dev/null || fail "the primary did not recover after the move"
errors=$(jget primary .replication_errors replication measure "$vm")
[ "$errors" -gt 0 ] || fail "replication_errors $errors: no attempt failed"
# No resynchronization: the one initial replication is the first.
n=$(jq '[.events[] | select(.message | startswith("initial replication started"))] | length' <<<"$events")
[ "$n" = 1 ] || fail "$n initial replications: a resynchronization happened"
[ "$(repl primary "$vm" initial_done)" = true ] || fail "initial_done is not true"

# No lost cycle: from the first cycle applied after the initial copy to
# the last, the Replica server applied exactly the cycles the primary
# sealed, in order, each the primary's disk at that seal.
applied=$(awk '{ print $1 }' "$APPLYLOG")
first=$(head -n 1 <<<"$applied")
last=$(tail -n 1 <<<"$applied")
sealed=$(awk -v f="$first" -v l="$last" '$1 >= f && $1 <= l { print $1 }' "$HASHLOG" | sort -n -u)
[ "$applied" = "$sealed" ] || fail "applied cycles differ from the sealed ones:
$(diff <(echo "$sealed") <(echo "$applied") | head -n 20)"
while read -r c id h; do
    grep -qx "$c $id $h" "$HASHLOG" ||
        fail "replica after cycle $c is not the primary's disk at that seal"
done <"$APPLYLOG"
[ "$first" -le "$moved_at" ] && [ "$last" -gt $((moved_at + 5)) ] ||
    fail "applied cycles $first..$last do not span the move at $moved_at"
log "moved at cycle $moved_at; cycles $first..$last all applied once, in order; $errors failed upload(s) retried; no resync"
ra nodeB stop || fail "node B: stop: $?"
