#!/bin/bash
# host-crash: after a host crash only the activity log's extents are
# compared (issue #11 item 5, SPEC §3).
#
# A 256 MiB disk holding 128 MiB of data replicates every second.  Then a
# few writes land in two 4 MiB extents, and every process of the primary
# host is SIGKILLed (vmreplicad and the VM's nbdkit); the daemon and the
# VM start again under another boot id (VMREPLICA_TEST_BOOT_ID), as after
# a power loss.  The data plane finds the marker of the old boot, so
# tracking is stopped, and its dirty map holds the activity log's extents
# and the unshipped records' ranges, not the whole disk.  `replication
# resume --resync` must compare at most those 8 MiB and 3 grains (asserted
# from resync_compared) and the replica must end byte-identical.
#
# Not simulated: the loss of unsynced page-cache data itself (this kernel
# cannot drop dirty pages on demand); the plugin's own tests cover which
# writes the activity log holds (plugin-stop.py activity-log).
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp
requires_build

PRIMARY_ENV=(VMREPLICA_TEST_BOOT_ID=boot-a)
setup_pair
stop_daemon primary
start_primary VMREPLICA_TEST_BOOT_ID=boot-a

vm=hc1
MiB=1048576
create_vm "$vm" 256M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c "write -P 0x11 0 128M" -c flush >/dev/null ||
    fail "fill the disk"
enable_replication "$vm" --frequency 1s
wait_converged "$vm" 60

log "writes in two extents, then every process of the host is killed"
qemu-io -f raw "$uri" -c "write -P 0x22 $((100 * MiB)) 64k" \
    -c "write -P 0x33 $((101 * MiB)) 64k" \
    -c "write -P 0x44 $((200 * MiB + 4096)) 4k" >/dev/null ||
    fail "the writes before the crash"
sock=$(jget primary '.disks[0].nbd_uri' vm show "$vm")
rundir=$(dirname "${sock#*socket=}")
nbdkit_pid=$(cat "$rundir/nbdkit.pid") || fail "no nbdkit.pid"
kill_daemon primary
kill -KILL "$nbdkit_pid" || fail "kill nbdkit $nbdkit_pid"

log "the host comes back under another boot"
start_primary VMREPLICA_TEST_BOOT_ID=boot-b
vr primary vm start "$vm" --no-hypervisor >/dev/null 2>&1 || true
wait_until 30 eval '[ "$(jget primary .health replication show "$vm")" = Critical ]' ||
    fail "the primary did not see tracking stopped: $(vrj primary replication show "$vm" | jq -c .health_details)"
details=$(vrj primary replication show "$vm" | jq -r '.health_details[]')
[[ $details == *"the host went down while the disks were served (boot boot-a; now boot-b)"* ]] ||
    fail "health does not say the host went down: $details"
qemu-io -f raw "$uri" -c "write -P 0x55 $((10 * MiB)) 64k" >/dev/null ||
    fail "a guest write after the restart"

log "resume --resync: only the suspect extents are compared"
vr primary replication resume "$vm" --resync >/dev/null || fail "resume --resync"
wait_until 90 repl_is primary "$vm" state Replicating ||
    fail "the resynchronization did not complete: $(repl primary "$vm" state) $(repl primary "$vm" last_error)"
m=$(vrj primary replication measure "$vm")
compared=$(jq -r .resync_compared <<<"$m")
sent=$(jq -r .resync_sent <<<"$m")
log "  compared $compared bytes, sent $sent bytes of chunks"
# Two 4 MiB extents and the grain written after the restart (64 KiB):
# the unshipped records' grains lie inside the extents.
[ "$compared" -gt 0 ] && [ "$compared" -le $((8 * MiB + 65536)) ] ||
    fail "compared $compared bytes: more than the activity log's 2 extents and 1 grain (of 256 MiB)"
wait_converged "$vm" 90
assert_identical "$vm"
log "PASS"
