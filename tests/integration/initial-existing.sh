#!/bin/bash
# initial-existing: `initial-replication start VM --use-existing` compares
# chunk hashes with the copy the Replica server kept and sends only the
# 64 KiB chunks that differ (SPEC §5; issue #11).
#
# A 256 MiB disk holding 160 MiB of random data is replicated in full and
# the replication removed (the Replica server keeps its copy).  Then the
# two copies are made to differ by exactly 1 MiB + 256 KiB of chunks:
#   primary: 64 KiB rewritten at 10 MiB; 4 KiB at 100 MiB + 4 KiB (its
#            whole 64 KiB chunk differs); 1 MiB zeroed at 50 MiB; 64 KiB
#            written into the hole at 200 MiB;
#   replica: 64 KiB of garbage written into its copy at 220 MiB, where the
#            primary has a hole (a restored backup need not match).
# Replication is enabled again and the comparison must send exactly those
# chunks' bytes (initial_replication_sent), a little more on the wire, and
# the replica must end byte-identical.  A second round runs the comparison
# while a writer changes the primary: the replica still ends identical.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp
requires_build

setup_pair

vm=existing
MiB=1048576
create_vm "$vm" 256M
uri=$(nbd_uri primary "$vm")

log "write 160 MiB of random data, leave the rest a hole"
head -c $((160 * MiB)) /dev/urandom >"$TESTDIR/rand"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/rand 0 160M" -c flush >/dev/null ||
    fail "fill the disk"
rm -f "$TESTDIR/rand"

log "full initial replication, then remove (the replica keeps its copy)"
enable_replication "$vm" --frequency 1s
wait_converged "$vm" 60
assert_identical "$vm"
[ "$(vrj primary replication measure "$vm" | jq -r .initial_replication_method)" = full ] ||
    fail "the first initial replication is not a full copy"
vr primary replication remove "$vm" >/dev/null || fail "replication remove"
wait_until 20 eval '[ "$(vrj replica vm show "$vm" | jq -r .mode)" = replica ]' ||
    fail "the Replica VM was not kept"

log "make the copies differ by 1 MiB + 256 KiB of 64 KiB chunks"
head -c 65536 /dev/urandom >"$TESTDIR/a"
head -c 4096 /dev/urandom >"$TESTDIR/b"
head -c 65536 /dev/urandom >"$TESTDIR/c"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/a $((10 * MiB)) 64k" \
    -c "write -s $TESTDIR/b $((100 * MiB + 4096)) 4k" \
    -c "write -z $((50 * MiB)) 1M" \
    -c "write -s $TESTDIR/c $((200 * MiB)) 64k" -c flush >/dev/null ||
    fail "change the primary"
rdisk=$(disk_path replica "$vm")
head -c 65536 /dev/urandom |
    dd of="$rdisk" bs=64k seek=$((220 * 16)) conv=notrunc status=none ||
    fail "change the replica's copy"
want=$((MiB + 4 * 65536))
cmp -s "$(disk_path primary "$vm")" "$rdisk" && fail "the copies do not differ"

# hashes BODY — POST /r1/vms/UUID/hashes as the primary; sets CODE, ERR, MSG.
hashes() {
    local epoch
    epoch=$(vrj replica replication show "$vm" | jq -r .epoch)
    CODE=$(curl -sS --max-time 30 -o "$TESTDIR/h.out" -w '%{http_code}' \
        -X POST -H 'Expect:' -H "X-Vmreplica-Epoch: $epoch" \
        -H 'Content-Type: application/json' \
        --resolve "replica.test.local:$REPLICA_PORT:127.0.0.1" \
        --cacert "$PKI/ca.pem" --cert "$PKI/primary.pem" --key "$PKI/primary.key" \
        --data-binary "$1" \
        "https://replica.test.local:$REPLICA_PORT/r1/vms/$uuid/hashes") ||
        fail "curl POST hashes"
    ERR=$(jq -r '.error // empty' "$TESTDIR/h.out")
    MSG=$(jq -r '.message // empty' "$TESTDIR/h.out")
}
uuid=$(jget primary .uuid vm show "$vm")

log "enable again and start initial replication --use-existing"
vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s >/dev/null ||
    fail "replication enable (again)"
hashes '{"disk": 0, "offset": 0, "length": 1048576, "chunk": 3000}'
[ "$CODE $ERR $MSG" = "400 EINVAL hashes: chunk 3000: not a power of two from 4096 to 16777216" ] ||
    fail "a bad chunk size: $CODE $ERR $MSG"
hashes '{"disk": 0, "offset": 0, "length": 268435456, "chunk": 4096}'
[ "$CODE $ERR $MSG" = "400 EINVAL hashes: range 0+268435456: more than 4096 chunks or 1073741824 bytes" ] ||
    fail "a range over the bounds: $CODE $ERR $MSG"
hashes '{"disk": 1, "offset": 0, "length": 65536, "chunk": 65536}'
[ "$CODE $ERR $MSG" = "400 EINVAL hashes: replica vm $vm has no disk 1" ] ||
    fail "a disk it does not have: $CODE $ERR $MSG"
hashes '{"disk": 0, "offset": 0, "length": 65536, "chunk": 65536}'
[ "$CODE $ERR $MSG" = "400 EPROTO hashes: replica vm $vm is to be reset for a full initial replication" ] ||
    fail "hashes before the primary said compare: $CODE $ERR $MSG"
out=$(vr primary initial-replication start "$vm" --use-existing --wait) ||
    fail "initial-replication start --use-existing"
log "  $out"
vrj primary replication measure "$vm" >"$TESTDIR/measure.json"
jq -c '{initial_replication_method, initial_replication_size,
        initial_replication_compared, initial_replication_sent,
        bytes_sent_wire}' "$TESTDIR/measure.json"
[ "$(jq -r .initial_replication_method "$TESTDIR/measure.json")" = compare ] ||
    fail "method is not compare"
size=$((256 * MiB))
[ "$(jq -r .initial_replication_compared "$TESTDIR/measure.json")" = "$size" ] ||
    fail "compared $(jq -r .initial_replication_compared "$TESTDIR/measure.json") bytes, want the whole disk ($size)"
sent=$(jq -r .initial_replication_sent "$TESTDIR/measure.json")
[ "$sent" = "$want" ] ||
    fail "the comparison sent $sent bytes of chunks; exactly $want differ"
wire=$(jq -r .bytes_sent_wire "$TESTDIR/measure.json")
# Random data does not compress; the zero chunks are records without data;
# the hash requests are not counted here.  Headers and framing: 64 KiB.
[ "$wire" -le $((3 * 65536 + 4096 + 65536)) ] ||
    fail "the comparison put $wire bytes on the wire for $want bytes of chunks"
log "  compared $size bytes, sent $sent bytes of chunks, $wire on the wire"
vrj replica events | jq -r '.events[].message' |
    grep -qxF "initial replication by comparison: the disks here are kept and only what differs is received" ||
    fail "no replica event for the comparison"
wait_converged "$vm" 60
assert_identical "$vm"
hashes '{"disk": 0, "offset": 0, "length": 65536, "chunk": 65536}'
[ "$CODE $ERR $MSG" = "400 EPROTO replica vm $vm: initial replication is already complete" ] ||
    fail "hashes after the initial replication: $CODE $ERR $MSG"

log "again, with a writer changing the primary during the comparison"
vr primary replication remove "$vm" >/dev/null || fail "replication remove (2)"
vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s >/dev/null ||
    fail "replication enable (3)"
start_writer "$vm" 64k
sleep 1
vr primary initial-replication start "$vm" --use-existing --wait >/dev/null ||
    fail "initial-replication start --use-existing (with a writer)"
sleep 2
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
log "PASS"
