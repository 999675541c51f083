#!/bin/bash
# initial-media: initial replication by external media (SPEC §5; issue
# #11): `initial-replication start VM --export DIR` on the primary writes
# the disks compressed with a manifest while a writer goes on changing
# them; `initial-replication import VM --from DIR` on the Replica server
# checks and loads the export; the primary then completes the initial
# replication and the changes made meanwhile flow.
#
# A 256 MiB disk holds 160 MiB of random data.  Asserted:
#   - the export puts nothing on the wire (bytes_sent_wire 0), stores no
#     hole (the data files hold at most the 160 MiB plus framing), and the
#     primary then waits, InitialReplicationInProgress;
#   - damaged exports are refused with the exact error and leave the
#     Replica VM's disk and state as they were: a flipped byte in a data
#     file, a truncated data file, the export of another VM, other disk
#     sizes, a data file named outside DIR;
#   - the good export imported, the replica converges byte-identical, and
#     the whole initial replication put less than 24 MiB on the wire (the
#     writer's changes), not the 160 MiB of data.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp sha256sum
requires_build

# Slower export batches, so the writer writes during the export.
PRIMARY_ENV=(VMREPLICA_TEST_SEND_DELAY_MS=400)
setup_pair

vm=media
MiB=1048576
create_vm "$vm" 256M
uri=$(nbd_uri primary "$vm")
head -c $((160 * MiB)) /dev/urandom >"$TESTDIR/rand"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/rand 0 160M" -c flush >/dev/null ||
    fail "fill the disk"
rm -f "$TESTDIR/rand"

vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s >/dev/null ||
    fail "replication enable"

log "export with a writer running"
ex=$TESTDIR/export
start_writer "$vm" 64k
# A relative DIR, not there yet: the CLI gives the daemon its absolute path.
cli=$(realpath "$VMREPLICA")
out=$(cd "$TESTDIR" && VMREPLICA=$cli vr primary initial-replication start "$vm" --export export --wait) ||
    fail "initial-replication start --export"
[ "$out" = "initial replication of vm $vm exported to $ex; import it on the Replica server with 'vmreplica initial-replication import $vm --from DIR'" ] ||
    fail "start --export said: $out"
stop_writer
vrj primary replication measure "$vm" >"$TESTDIR/m.json"
jq -c '{state, initial_replication_method, initial_replication_exported,
        initial_replication_sent, bytes_sent_wire}' "$TESTDIR/m.json"
[ "$(jq -r '"\(.state) \(.initial_replication_method) \(.initial_replication_exported) \(.bytes_sent_wire)"' "$TESTDIR/m.json")" = \
  "InitialReplicationInProgress export true 0" ] ||
    fail "after the export: $(jq -c . "$TESTDIR/m.json")"
jq -e '.vm_uuid and .base_cycle > 0 and .chunk_size == 1048576 and
       (.disks | length) == 1 and .disks[0].size == 268435456' \
    "$ex/manifest.json" >/dev/null || fail "manifest: $(head -c 300 "$ex/manifest.json")"
stored=$(stat -c %s "$ex/disk0.zst")
nchunks=$(jq '.disks[0].chunks | length' "$ex/manifest.json")
# 160 chunks of random data, and the few the writer put in the hole.
[ "$stored" -le $((200 * MiB)) ] && [ "$nchunks" -le 200 ] ||
    fail "the export stored $stored bytes in $nchunks chunks"
log "  exported $nchunks chunks in $stored bytes"

rdisk=$(disk_path replica "$vm")
before=$(sha256sum <"$rdisk")
rstate() { repl replica "$vm" state; }
[ "$(rstate)" = WaitingForInitialReplication ] || fail "replica state $(rstate)"

# bad NAME EXPECTED — the import of $TESTDIR/NAME fails with EXPECTED and
# leaves the Replica VM as it was.
bad() {
    local out
    out=$(vr replica initial-replication import "$vm" --from "$TESTDIR/$1" 2>&1) &&
        fail "import of $1 succeeded"
    [ "$out" = "vmreplica: error: import vm $vm from $TESTDIR/$1: $2" ] ||
        fail "import of $1: $out"
    [ "$(sha256sum <"$rdisk")" = "$before" ] || fail "import of $1 changed the replica disk"
    [ "$(rstate)" = WaitingForInitialReplication ] || fail "replica state after $1: $(rstate)"
    [ "$(vrj replica replication show "$vm" | jq -r .initial_done)" = false ] ||
        fail "initial done after $1"
}
copy() { rm -rf "${TESTDIR:?}/$1"; cp -r "$ex" "$TESTDIR/$1"; }
edit() { # NAME JQ — rewrite the copy's manifest
    jq -c "$2" "$ex/manifest.json" >"$TESTDIR/$1/manifest.json"
}

log "damaged exports are refused, the replica untouched"
copy flipped
off0=$(jq '.disks[0].chunks[0][0]' "$ex/manifest.json")
printf '\x5a' | dd of="$TESTDIR/flipped/disk0.zst" bs=1 seek=1000 conv=notrunc status=none
cmp -s "$ex/disk0.zst" "$TESTDIR/flipped/disk0.zst" &&
    { printf '\xa5' | dd of="$TESTDIR/flipped/disk0.zst" bs=1 seek=1000 conv=notrunc status=none; }
bad flipped "disk0.zst: chunk at offset $off0: checksum mismatch"
copy truncated
truncate -s -1 "$TESTDIR/truncated/disk0.zst"
bad truncated "disk0.zst is $((stored - 1)) bytes, the manifest says $stored"
copy othervm
edit othervm '.vm_uuid = "00000000-0000-4000-8000-000000000000"'
bad othervm "the export is of vm 00000000-0000-4000-8000-000000000000, not of this Replica VM ($(jget replica .uuid vm show "$vm"))"
copy othersize
edit othersize '.disks[0].size = 134217728'
bad othersize "manifest: disk 0 is 134217728 bytes, the Replica VM's is 268435456"
copy escape
edit escape '.disks[0].file = "../export/disk0.zst"'
bad escape "manifest: disk 0: file '../export/disk0.zst' is not a plain file name in the export directory"
copy nomanifest
rm "$TESTDIR/nomanifest/manifest.json"
bad nomanifest "$TESTDIR/nomanifest/manifest.json: No such file or directory"
out=$(vr primary initial-replication import "$vm" --from "$ex" 2>&1) &&
    fail "import on the primary succeeded"
[ "$out" = "vmreplica: error: vm $vm: not a Replica VM; an export is imported on the Replica server" ] ||
    fail "import on the primary: $out"
[ "$(vrj primary replication measure "$vm" | jq -r .bytes_sent_wire)" = 0 ] ||
    fail "bytes sent before the import"

log "import the export on the Replica server"
out=$(vr replica initial-replication import "$vm" --from "$ex") || fail "import"
[ "$out" = "initial replication of vm $vm imported from $ex; the primary completes it" ] ||
    fail "import said: $out"
vrj replica events | jq -r '.events[].message' |
    grep -q "^initial replication imported from $ex: [0-9]* bytes of data, base cycle $(jq .base_cycle "$ex/manifest.json"); the primary completes it and sends the changes since$" ||
    fail "no import event"
out=$(vr replica initial-replication import "$vm" --from "$ex" 2>&1) &&
    fail "a second import succeeded"
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
wire=$(vrj primary replication measure "$vm" | jq -r .bytes_sent_wire)
log "  $wire bytes on the wire for 160 MiB of data"
[ "$wire" -le $((24 * MiB)) ] ||
    fail "the initial replication by media put $wire bytes on the wire"
# The writer's changes after the base went as cycles, not on the media.
[ "$wire" -ge 65536 ] || fail "only $wire bytes on the wire: no tracked change flowed"
vrj primary events | jq -r '.events[].message' |
    grep -qxF "initial replication from external media complete: the Replica server imported base cycle $(jq .base_cycle "$ex/manifest.json")" ||
    fail "no completion event on the primary"
log "PASS"
