#!/bin/bash
# initial-sparse: initial replication sends only allocated regions.
#
# A 4 GiB sparse disk holding 64 MiB of random (incompressible) data in
# 64 pieces of 1 MiB at scattered offsets is replicated with compression
# on.  At most 64 MiB + 2 MiB may go over the wire, the replica disk must be
# byte-identical to the primary's, and it must still be sparse.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp du
requires_build

setup_pair

vm=sparse
log "create a VM with a 4 GiB sparse disk"
create_vm "$vm" 4G
uri=$(nbd_uri primary "$vm")

log "write 64 x 1 MiB of random data at scattered offsets"
cmds=()
for i in $(seq 0 63); do
    head -c 1M /dev/urandom >"$TESTDIR/rand$i"
    # One piece in each 64 MiB stretch, at a varying 1 MiB-aligned place.
    off=$(((i * 64 + (i * 37) % 63) * 1048576))
    cmds+=(-c "write -s $TESTDIR/rand$i $off 1M")
done
qemu-io -f raw "$uri" "${cmds[@]}" -c flush >/dev/null
rm -f "$TESTDIR"/rand*

log "enable replication (compression on) and run initial replication"
enable_replication "$vm" --frequency 5s --compression on

vrj primary replication measure "$vm" >"$TESTDIR/measure.json"
jq . "$TESTDIR/measure.json"
wire=$(jq -r '.bytes_sent_wire // .initial_replication_size' "$TESTDIR/measure.json")
[[ $wire =~ ^[0-9]+$ ]] || fail "measure: no bytes_sent_wire"
limit=$(((64 + 2) * 1048576))
[ "$wire" -le "$limit" ] ||
    fail "initial replication sent $wire bytes for 64 MiB of data (limit $limit)"
log "initial replication sent $wire bytes (limit $limit)"

# No writes since: the replica holds the primary's disk once the initial
# copy (and any cycle after it) is applied.
wait_converged "$vm" 60
assert_identical "$vm"

r=$(disk_path replica "$vm")
used=$(du -B1 "$r" | cut -f1)
[ "$used" -le $((66 * 1048576)) ] ||
    fail "replica disk is not sparse: $used bytes allocated"
log "replica disk allocates $used bytes of $(stat -c %s "$r")"
log "PASS"
