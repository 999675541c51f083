#!/bin/bash
# crash-replica: the Replica VM is always the primary at a cycle boundary.
#
# The primary runs with VMREPLICA_TEST_HASHLOG, so its plugin logs the
# sha256 of the disk at every seal.  Under write load the replica daemon is
# restarted with a fault point that SIGKILLs it in the middle of its work:
#   apply-record:3   while applying a cycle (after its 3rd record)
#   receive-chunk:2  while receiving a cycle upload (2nd body chunk)
#   apply-record:40  deeper into a cycle's records
#   apply-before-commit:1  after a cycle reached the disks, before it was
#                    recorded as applied (it is applied again at restart)
# Replication is then suspended on the primary (nothing more arrives), the
# replica restarted normally (its startup recovery finishes before its
# socket is up), and the replica disk's sha256 must be one of the primary's
# seal hashes: never a mix of two cycles.  Then replication resumes, writes
# stop, and the replica must converge to a byte-identical copy.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp sha256sum numfmt
requires_build

HASHLOG=$TESTDIR/hashlog
PRIMARY_ENV=(VMREPLICA_TEST_HASHLOG="$HASHLOG")
setup_pair

vm=crashy
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 4M' >/dev/null
log "enable replication every second and run initial replication"
enable_replication "$vm" --frequency 1s

crash_case() { # FAULTPOINT:N
    local fault=$1 applied target h r cyc id
    log "--- fault $fault ---"
    start_writer "$vm" 256k

    applied=$(repl replica "$vm" applied_cycle)
    target=$((applied + 3))
    wait_until 30 _applied_at_least "$vm" "$target" ||
        fail "replica did not reach cycle $target under load"
    log "replica at cycle $(repl replica "$vm" applied_cycle); restart it with VMREPLICA_FAULT=$fault"

    stop_daemon replica
    spawn_daemon replica VMREPLICA_FAULT="$fault"
    killed_at replica "$fault" 45
    log "replica killed at $fault"

    vr primary replication suspend "$vm" >/dev/null ||
        fail "primary: replication suspend"
    start_daemon replica

    r=$(disk_path replica "$vm")
    h=$(sha256sum "$r" | cut -d' ' -f1)
    cyc=$(repl replica "$vm" applied_cycle)
    id=$(jget primary ".disks[0].id" vm show "$vm")
    # Hashlog lines: <cycle> <disk id> <sha256>.
    if ! awk -v h="$h" -v id="$id" '$2 == id && $3 == h { found = 1 }
                         END { exit !found }' "$HASHLOG"; then
        log "replica applied_cycle $cyc, disk sha256 $h; primary hashlog tail:"
        tail -n 20 "$HASHLOG" >&2
        fail "after the crash at $fault the replica disk matches no cycle of the primary"
    fi
    log "after recovery the replica disk is the primary's disk at cycle $(awk -v h="$h" '$3 == h { print $1; exit }' "$HASHLOG") (replica says applied_cycle $cyc)"
    if ! awk -v h="$h" -v c="$cyc" '$1 == c && $3 == h { found = 1 }
                                    END { exit !found }' "$HASHLOG"; then
        log "note: hashlog cycle numbering differs from applied_cycle"
    fi

    vr primary replication resume "$vm" >/dev/null ||
        fail "primary: replication resume"
    sleep 2
    stop_writer
    wait_converged "$vm" 60
    assert_identical "$vm"
}

crash_case apply-record:3
crash_case receive-chunk:2
crash_case apply-record:40
crash_case apply-before-commit:1
log "PASS"
