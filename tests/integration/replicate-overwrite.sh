#!/bin/bash
# replicate-overwrite: writes logged by reference, end to end, under the
# pressure that makes them hard — the guest rewrites the same blocks every
# cycle while earlier cycles are still waiting to be sent (each upload is
# delayed 1.5 s at a 1 s frequency), so the data plane must save each
# block's content as of every unshipped seal before overwriting it, and the
# shipper must read it back from the preserve files, racing the writes.
#
# The primary's plugin logs the SHA-256 of the disk at every seal
# (VMREPLICA_TEST_HASHLOG); the Replica server logs the SHA-256 of the
# Replica disk after every cycle it applies (VMREPLICA_TEST_APPLYLOG).
# Every state the replica passes through must be the primary's disk at that
# very seal, and at the end the disks are byte-identical.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp
requires_build

HASHLOG=$TESTDIR/hashlog
APPLYLOG=$TESTDIR/applylog
PRIMARY_ENV=(VMREPLICA_TEST_HASHLOG="$HASHLOG" VMREPLICA_TEST_SEND_DELAY_MS=1500)
REPLICA_ENV=(VMREPLICA_TEST_APPLYLOG="$APPLYLOG")
setup_pair

create_vm hot 32M
uri=$(nbd_uri primary hot)
qemu-io -f raw "$uri" -c 'write -P 0x11 0 1M' >/dev/null
enable_replication hot --frequency 1s
logdir="$(disk_path primary hot 0).vrlog"

log "rewrite a hot 256 KiB region for 10 s while cycles queue up"
end=$((SECONDS + 10))
i=0
saw_pre=0
while [ "$SECONDS" -lt "$end" ]; do
    qemu-io -f raw "$uri" -c "write -P $((i % 255 + 1)) 0 256k" \
        -c "write -P $(((i * 7) % 255 + 1)) $((i % 32 * 4096 + 512)) 1k" \
        -c "write -z $((128 + i % 4 * 4))k 4k" \
        -c "write -P $((i % 200 + 3)) $((1048576 + i * 65536)) 64k" \
        >/dev/null || fail "qemu-io write $i"
    if compgen -G "$logdir/*.pre" >/dev/null; then
        saw_pre=1
    fi
    i=$((i + 1))
    sleep 0.1
done
[ "$saw_pre" = 1 ] || fail "no block was ever preserved: the test did not exercise it"

wait_converged hot 120
assert_identical hot
assert_replicating hot

n=0
while read -r c id h; do
    grep -qx "$c $id $h" "$HASHLOG" ||
        fail "replica after cycle $c ($id $h) is not the primary's disk at seal $c"
    n=$((n + 1))
done <"$APPLYLOG"
[ "$n" -ge 5 ] || fail "only $n cycles applied"
pre_left=$(compgen -G "$logdir/*.pre" | wc -l || true)
[ "$pre_left" = 0 ] || fail "$pre_left preserve files left after convergence"
log "$i rounds of overwrites; $n cycles applied, each equal to the primary at its seal"

# pending_size counts the data a write logged by reference stands for, not
# the 32-byte record: 1 MiB + 64 KiB written while suspended.
vr primary replication suspend hot >/dev/null || fail "suspend"
qemu-io -f raw "$uri" -c 'write -P 0x42 8M 1M' -c 'write -P 0x43 20M 64k' \
    >/dev/null || fail "write while suspended"
pending=$(vrj primary replication measure hot | jq -r .pending_size)
[ "$pending" = $((1048576 + 65536 + 2 * 32)) ] ||
    fail "pending_size $pending, want $((1048576 + 65536 + 2 * 32))"
vr primary replication resume hot >/dev/null || fail "resume"
wait_converged hot 60
assert_identical hot
log "PASS"
