#!/bin/bash
# libvirt-agent: application-consistent points of a VM run as a libvirt
# domain, the guest agent reached through libvirt.
#
# Under libvirt the guest agent's channel is libvirt's own (docs/libvirt.md):
# vmreplicad sends the freeze and thaw of an application-consistent point
# with virDomainQemuAgentCommand instead of its qga.sock.  The Linux test
# guest (tests/guest/linux: ext4 on /dev/vda at /data, the real qemu-ga, an
# application appending to /data/app.log) runs with `vm start --hypervisor
# libvirt` on a libvirtd of the test's own (libvirtd.sh) while it
# replicates every second with --app-consistent-every 1; an
# application-consistent point must appear on the Replica server and be a
# clean file system (e2fsck -fn: ext4's freeze cleared needs_recovery).
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img jq curl openssl nbdkit python3 mkfs.ext4 e2fsck
requires_build

VR_TIMEOUT=60
LG=$SOURCE_DIR/tests/guest/linux
rc=0
bash "$LG/build.sh" "$TESTDIR/lg" >"$TESTDIR/build.log" 2>&1 || rc=$?
[ "$rc" -ne 77 ] || skip "Linux test guest: $(tail -n 2 "$TESTDIR/build.log" | tr '\n' ' ')"
[ "$rc" -eq 0 ] || fail "tests/guest/linux/build.sh: $(tail -n 5 "$TESTDIR/build.log")"

source "$(dirname "$0")/libvirtd.sh"
start_libvirtd
PRIMARY_ENV=("VMREPLICA_LIBVIRT_URI=$URI" "VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
REPLICA_ENV=("VMREPLICA_LIBVIRT_URI=$URI" "VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
setup_pair

truncate -s 64M "$TESTDIR/lg.raw"
mkfs.ext4 -q -F "$TESTDIR/lg.raw" || fail "mkfs.ext4"
vr primary vm create lg --disk "$TESTDIR/lg.raw" --memory 256M --nic none \
    --kernel "$TESTDIR/lg/vmlinux" --initrd "$TESTDIR/lg/initrd.img" \
    --append "console=ttyS0 quiet" >/dev/null || fail "vm create lg"
vr primary vm start lg --no-hypervisor >/dev/null || fail "serve lg"
enable_replication lg --frequency 1s --recovery-history 2 --point-interval 6s \
    --app-consistent-every 1
RUN=$(state_dir primary)/run/$(jget primary .uuid vm show lg)
vr primary vm start lg --hypervisor libvirt >/dev/null ||
    fail "vm start lg --hypervisor libvirt"
[ "$(virsh_ domstate lg)" = running ] || fail "domain lg is not running"
[ ! -e "$RUN/qga.sock" ] || fail "vmreplica's own agent socket under libvirt"
wait_until 90 grep -q '^agent ready' "$RUN/console.log" ||
    fail "the guest's agent did not start: $(tr -d '\r' <"$RUN/console.log" | tail -n 5)"
log "the Linux guest runs its agent in libvirt domain lg"

app_point() {
    APP=$(vrj replica points list lg |
        jq -r '[.points[] | select(.kind == "application-consistent")][-1].id // empty')
    [ -n "$APP" ]
}
wait_until 60 app_point ||
    fail "no application-consistent point: $(vrj primary events --vm lg | jq -c '.events[-3:]')"
# The guest stopped (pulled: the point is what it is) and the replica
# converged, so no cycle is applied while the point is rebuilt from the
# Replica disk and its undo spans.
vr primary vm stop lg --force >/dev/null || fail "vm stop lg"
virsh_ domstate lg >/dev/null 2>&1 && fail "domain lg left after vm stop"
vr primary vm start lg --no-hypervisor >/dev/null || fail "serve lg"
wait_converged lg 60
app_point || fail "the application-consistent point is gone"
RDISK=$(disk_path replica lg)
"$BUILD_DIR/tests/tools/pointcat" "$(dirname "$RDISK")/undo" "$APP" \
    "$(repl replica lg applied_cycle)" "$TESTDIR/p$APP" "$RDISK" ||
    fail "point $APP cannot be rebuilt"
e2fsck -fn "$TESTDIR/p$APP.0" >"$TESTDIR/fsck.log" 2>&1 ||
    fail "the application-consistent point $APP is not a clean file system: $(tail -n 5 "$TESTDIR/fsck.log")"
log "point $APP (frozen through libvirt's guest agent) is a clean file system"
vr primary vm stop lg >/dev/null || fail "vm stop lg"
log "PASS"
