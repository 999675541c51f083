#!/bin/bash
# initial-during-writes.sh — initial replication of a disk that the guest
# keeps writing: every write made during the copy is tracked and applied
# after it (SPEC §5), so once the writes stop the replica is byte-identical,
# including blocks the copy had already sent before they changed and blocks
# trimmed or zeroed during the copy.
#
# The primary delays every upload by 400 ms (VMREPLICA_TEST_SEND_DELAY_MS)
# so the copy of 96 MiB (three 32 MiB chunks) takes over a second, and the
# test itself writes while the state is InitialReplicationInProgress and
# counts those writes: at least three must land during the copy.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp
requires_build

PRIMARY_ENV=(VMREPLICA_TEST_SEND_DELAY_MS=400)
setup_pair

vm=busy
log "create a VM with a 256 MiB disk holding 96 MiB of data"
create_vm "$vm" 256M
uri=$(nbd_uri primary "$vm")
head -c 96M /dev/urandom >"$TESTDIR/seed"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/seed 0 96M" -c flush >/dev/null
rm -f "$TESTDIR/seed"

log "enable replication and start initial replication without waiting"
vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s \
    >/dev/null || fail "replication enable"
vr primary initial-replication start "$vm" >/dev/null ||
    fail "initial-replication start"

during=0
i=0
while :; do
    state=$(repl primary "$vm" state)
    case $state in
    InitialReplicationInProgress | ReadyForInitialReplication) ;;
    Replicating) break ;;
    *) fail "unexpected state $state during initial replication" ;;
    esac
    # Overwrite data the copy may already have sent, zero and trim some.
    off=$(((i * 7 % 96) * 1048576 + (i % 4) * 65536))
    case $((i % 5)) in
    3) qemu-io -f raw "$uri" -c "write -z $off 64k" >/dev/null ;;
    4) qemu-io -f raw "$uri" -c "discard $off 64k" >/dev/null ;;
    *) qemu-io -f raw "$uri" -c "write -P $((i % 250 + 1)) $off 64k" \
        >/dev/null ;;
    esac || fail "write during initial replication"
    [ "$state" != InitialReplicationInProgress ] || during=$((during + 1))
    i=$((i + 1))
    [ "$i" -lt 2000 ] || fail "initial replication did not finish"
done
[ "$during" -ge 3 ] ||
    fail "only $during writes landed during the copy; the test proves nothing"
log "$during writes landed while initial replication ran"

# And a few more right after it.
qemu-io -f raw "$uri" -c 'write -P 0x42 200M 1M' >/dev/null
wait_converged "$vm" 60
assert_identical "$vm"
log "PASS"
