#!/bin/bash
# stop-during-seal: a `vm stop` between the shipper's look at the disks
# and its seal does not stop replication.
#
# The shipper sees the disks served, then asks nbdkit to seal over the
# control socket; a `vm stop` in between (which seals the last writes
# itself) removes the socket, and the seal failed with "connect: No such
# file or directory" — ENOENT, which the shipper took for unrecoverable:
# state Error, for good (seen in a loop of 300 vm start/stop under ASan).
# The primary holds the shipper 1.5 s in that window
# (VMREPLICA_TEST_SEAL_DELAY_MS, every second), so a stop lands in it; the
# VM must stay Replicating and the replica catch up byte for byte.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp
requires_build

PRIMARY_ENV=(VMREPLICA_TEST_SEAL_DELAY_MS=1500)
setup_pair
create_vm v1 16M
enable_replication v1 --frequency 1s
uri=$(nbd_uri primary v1)

hit=false
for round in 1 2 3 4 5 6; do
    qemu-io -f raw "$uri" -c "write -P $round $((round))M 64k" >/dev/null ||
        fail "write $round"
    sleep 0.7 # into the shipper's window (it is in it most of the time)
    vr primary vm stop v1 >/dev/null || fail "vm stop $round"
    # The held shipper wakes up and seals (or not) within 1.5 s.
    sleep 2
    [ "$(repl primary v1 state)" = Replicating ] ||
        fail "round $round: a vm stop during the seal stopped replication: $(repl primary v1 state): $(repl primary v1 last_error)"
    if grep -q "not sealed, the disks stopped being served meanwhile" \
        "$TESTDIR/primary.log"; then
        hit=true
        break
    fi
    vr primary vm start v1 --no-hypervisor >/dev/null || fail "vm start $round"
    uri=$(nbd_uri primary v1)
done
$hit || fail "no vm stop landed between the shipper's look and its seal in 6 rounds"
log "vm stop in the seal window (round $round): still $(repl primary v1 state)"
wait_converged v1 60
assert_identical v1
log "PASS"
