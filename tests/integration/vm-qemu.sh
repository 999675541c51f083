#!/bin/bash
# vm-qemu: a real VM (QEMU, TCG by default) replicated end to end.
#
# The test guest (tests/guest/guest.S: a boot sector that writes
# sequence-stamped sectors with BIOS int 0x13, prints to COM1 and ends QEMU
# through isa-debug-exit) is imported as a qcow2 resized to 64 MiB with
# `vm create --disk` (qcow2 -> raw conversion: the raw disk must start with
# the guest's boot sector), replicated every second to a Replica server, and
# started with `vm start` (QEMU attached to the tracked NBD export).  While it
# runs, replication cycles must be sealed (more than one) and the replica
# must be seen holding the guest's writes half-way; once it has printed
# "done" and QEMU has exited, the next cycle is awaited and the replica disk
# must be byte-identical to the primary's and hold the last sequence stamps
# the guest wrote.  `vm create` from a VMDK and from a VHDX of the guest
# must give a raw disk that starts with the guest's boot sector too.
#
# The guest image is BUILD_DIR/tests/guest/guest.img (built by meson), else
# it is assembled here from SOURCE_DIR/tests/guest/guest.S.  QEMU runs under
# TCG unless VMREPLICA_ACCEL is set (kvm|tcg; the daemon otherwise picks KVM
# whenever /dev/kvm opens, and nested KVM can be slower than TCG).
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img jq curl openssl nbdkit python3 cmp
requires_build

VR_TIMEOUT=60
GUEST_TIMEOUT=${GUEST_TIMEOUT:-75} # seconds for the guest to print "done"
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")

# --- the guest image ----------------------------------------------------
GUEST=$BUILD_DIR/tests/guest/guest.img
if [ ! -s "$GUEST" ]; then
    if ! command -v as >/dev/null || ! command -v ld >/dev/null; then
        skip "no $GUEST and no binutils (as, ld) to assemble tests/guest/guest.S"
    fi
    GUEST=$TESTDIR/guest.img
    python3 "$SOURCE_DIR/tests/guest/mkguest.py" as ld \
        "$SOURCE_DIR/tests/guest/guest.S" "$GUEST" ||
        fail "could not assemble tests/guest/guest.S"
    log "guest image assembled from guest.S (no $BUILD_DIR/tests/guest/guest.img)"
fi
[ "$(stat -c %s "$GUEST")" = 512 ] || fail "$GUEST is not 512 bytes"

# The guest's parameters (TOTAL_WRITES, BASE_LBA, NSECT, BATCH, DELAY_US),
# from the parameter block at 0x1e0 of its boot sector.
GUESTDISK=$SOURCE_DIR/tests/guest/guestdisk.py
read -r TOTAL BASE NSECT _ _ < <(python3 "$GUESTDISK" params "$GUEST") ||
    fail "$GUEST has no parameter block"
[ -n "$NSECT" ] || fail "$GUEST has no parameter block"
log "guest: $TOTAL writes over LBA $BASE..$((BASE + NSECT - 1))"

# check_stamps FILE — FILE holds, in each sector of the guest's range, the
# last sequence stamp the guest wrote there (see guest.S for the layout).
check_stamps() {
    python3 "$GUESTDISK" check "$1" "$TOTAL" "$BASE" "$NSECT"
}

# max_stamp FILE — the largest sequence stamp in the guest's range (0: none).
max_stamp() {
    python3 "$GUESTDISK" max-stamp "$1" "$BASE" "$NSECT"
}

setup_pair

# --- vm create from VMDK and VHDX ---------------------------------------
# (VMDK cannot be resized: convert a 16 MiB raw copy of the guest.)
cp "$GUEST" "$TESTDIR/guest16.raw"
truncate -s 16M "$TESTDIR/guest16.raw"
for fmt in vmdk vhdx; do
    qemu-img convert -f raw -O "$fmt" "$TESTDIR/guest16.raw" \
        "$TESTDIR/guest.$fmt" || fail "qemu-img convert -O $fmt"
    vr primary vm create "g-$fmt" --disk "$TESTDIR/guest.$fmt" >/dev/null ||
        fail "primary: vm create g-$fmt --disk guest.$fmt"
    p=$(disk_path primary "g-$fmt")
    [ "$p" != "$TESTDIR/guest.$fmt" ] || fail "g-$fmt: disk is the $fmt file itself"
    cmp -n 512 "$GUEST" "$p" ||
        fail "g-$fmt: first sector of $p differs from the guest image"
    sz=$(jget primary '.disks[0].size' vm show "g-$fmt")
    [ "$sz" = $((16 << 20)) ] || fail "g-$fmt: disk size $sz, want 16 MiB"
    log "vm create from $fmt: raw disk $p starts with the guest boot sector"
    vr primary vm remove "g-$fmt" >/dev/null || fail "primary: vm remove g-$fmt"
done

# --- the replicated VM ----------------------------------------------------
qemu-img convert -f raw -O qcow2 "$GUEST" "$TESTDIR/guest.qcow2" ||
    fail "qemu-img convert -O qcow2"
qemu-img resize -q -f qcow2 "$TESTDIR/guest.qcow2" 64M ||
    fail "qemu-img resize qcow2"
vr primary vm create g1 --disk "$TESTDIR/guest.qcow2" --memory 64M \
    >/dev/null || fail "primary: vm create g1 --disk guest.qcow2"
PDISK=$(disk_path primary g1)
cmp -n 512 "$GUEST" "$PDISK" ||
    fail "g1: first sector of $PDISK (from qcow2) differs from the guest image"
[ "$(stat -c %s "$PDISK")" = $((64 << 20)) ] ||
    fail "g1: raw disk is $(stat -c %s "$PDISK") bytes, want 64 MiB"
[ "$(max_stamp "$PDISK")" = 0 ] || fail "g1: stamps on the disk before the run"
log "g1: created from qcow2 (64 MiB raw, boot sector intact)"

vr primary vm start g1 --no-hypervisor >/dev/null || fail "primary: vm start g1 --no-hypervisor"
log "g1: enable replication (frequency 1s), initial replication"
enable_replication g1 --frequency 1s
RDISK=$(disk_path replica g1)
cmp "$PDISK" "$RDISK" || fail "g1: replica differs after initial replication"
vr primary vm stop g1 >/dev/null || fail "primary: vm stop g1"

UUID=$(jget primary .uuid vm show g1)
RUNDIR=$(state_dir primary)/run/$UUID
CONSOLE=$RUNDIR/console.log

c0=$(repl primary g1 last_cycle)
[[ $c0 =~ ^[0-9]+$ ]] || c0=0
t0=$SECONDS
log "g1: vm start (QEMU, accel ${VMREPLICA_ACCEL:-tcg}); last cycle $c0"
vr primary vm start g1 >/dev/null || {
    [ -f "$RUNDIR/qemu.log" ] && sed 's/^/  qemu.log: /' "$RUNDIR/qemu.log" >&2
    fail "primary: vm start g1 (with QEMU)"
}

qemu_gone() { [ "$(vrj primary vm show g1 | jq -r .running)" = false ]; }

# While the guest runs: watch its console, the cycles, and the replica disk.
mid_seen=0 mid_seq=0 mid_applied=
deadline=$((SECONDS + GUEST_TIMEOUT))
until grep -q '^done' "$CONSOLE" 2>/dev/null; do
    if qemu_gone &&
        ! grep -q '^done' "$CONSOLE" 2>/dev/null; then
        sed 's/^/  console: /' "$CONSOLE" >&2 2>/dev/null || true
        fail "g1: QEMU exited before the guest printed done"
    fi
    [ "$SECONDS" -lt "$deadline" ] || {
        tail -n 5 "$CONSOLE" | sed 's/^/  console: /' >&2 2>/dev/null || true
        fail "g1: guest did not print done within ${GUEST_TIMEOUT}s"
    }
    if [ "$mid_seen" = 0 ]; then
        s=$(max_stamp "$RDISK")
        if [ "$s" -gt 0 ] && [ "$s" -lt "$TOTAL" ] &&
            ! grep -q '^done' "$CONSOLE" 2>/dev/null; then
            mid_seen=1 mid_seq=$s mid_applied=$(repl replica g1 applied_cycle)
        fi
    fi
    sleep 0.5
done
t_done=$SECONDS
c1=$(repl primary g1 last_cycle)
head -n 1 "$CONSOLE" | grep -q '^vmreplica test guest' ||
    fail "g1: no banner on the console"
if grep -q '^error' "$CONSOLE"; then
    fail "g1: the guest reported a disk error: $(grep '^error' "$CONSOLE")"
fi
last=$(grep '^seq ' "$CONSOLE" | tail -n 1 | tr -d '\r')
[ "$last" = "seq $TOTAL" ] || fail "g1: last console line before done is '$last', want 'seq $TOTAL'"
log "g1: guest printed done after $((t_done - t0))s; cycles $c0 -> $c1"

wait_until 15 qemu_gone ||
    fail "g1: QEMU still running 15s after the guest printed done"
log "g1: QEMU exited"

[ "$((c1 - c0))" -gt 1 ] ||
    fail "g1: only $((c1 - c0)) cycle(s) sealed while the guest ran"
[ "$mid_seen" = 1 ] ||
    fail "g1: the replica was never seen holding part of the guest's writes"
log "g1: $((c1 - c0)) cycles sealed while the guest ran; replica held seq $mid_seq of $TOTAL mid-run (applied cycle $mid_applied)"

check_stamps "$PDISK" || fail "g1: the primary disk lacks the guest's last stamps"

log "g1: wait for the next cycle to be applied on the replica"
wait_converged g1 30
assert_identical g1
check_stamps "$RDISK" || fail "g1: the replica disk lacks the guest's last stamps"
cmp -n 512 "$GUEST" "$RDISK" || fail "g1: replica boot sector differs"
log "g1: replica holds the last $NSECT stamps (up to seq $TOTAL), cycle $CONVERGED_CYCLE"

vr primary vm stop g1 >/dev/null || fail "primary: vm stop g1"
log "PASS ($((SECONDS))s)"
