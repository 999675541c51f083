#!/bin/bash
# guest-agent: application-consistent points and failover network settings
# with a real Linux guest running the real QEMU guest agent.
#
# The guest (tests/guest/linux: a Debian kernel and a busybox initramfs)
# mounts its ext4 disk at /data, runs qemu-ga and an application that
# appends to /data/app.log five times a second.  It replicates every second
# with --app-consistent-every 1 and a 6 s point interval:
#   - an application-consistent point appears on the Replica server; its
#     file system is clean (ext4's freeze clears needs_recovery: e2fsck -fn
#     passes), while a crash-consistent point taken in the middle of the
#     application's writes still needs journal recovery — the difference an
#     application-consistent point makes;
#   - a crash of the primary between a freeze and its thaw leaves the
#     guest frozen only until the shipper starts again;
#   - an unplanned failover (--force: the primary is alive) to the
#     application-consistent point boots the guest on the Replica server
#     (kernel boot set there with vm set-boot), and its NIC gets the
#     failover network settings through the agent (address and route by
#     ip(8), resolv.conf), read back with guest-network-get-interfaces.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img jq curl openssl nbdkit python3 mkfs.ext4 e2fsck dumpe2fs
requires_build

VR_TIMEOUT=60
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
LG=$SOURCE_DIR/tests/guest/linux
QGA=$LG/qga.py

rc=0
bash "$LG/build.sh" "$TESTDIR/lg" >"$TESTDIR/build.log" 2>&1 || rc=$?
[ "$rc" -ne 77 ] || skip "Linux test guest: $(tail -n 2 "$TESTDIR/build.log" | tr '\n' ' ')"
[ "$rc" -eq 0 ] || fail "tests/guest/linux/build.sh: $(tail -n 5 "$TESTDIR/build.log")"
BOOT=(--kernel "$TESTDIR/lg/vmlinux" --initrd "$TESTDIR/lg/initrd.img"
    --append "console=ttyS0 quiet")

setup_pair
truncate -s 64M "$TESTDIR/lg.raw"
mkfs.ext4 -q -F "$TESTDIR/lg.raw" || fail "mkfs.ext4"
vr primary vm create lg --disk "$TESTDIR/lg.raw" --memory 256M --nic none \
    "${BOOT[@]}" >/dev/null || fail "vm create lg"
vr primary vm start lg --no-hypervisor >/dev/null || fail "serve lg"
enable_replication lg --frequency 1s --recovery-history 2 --point-interval 6s \
    --app-consistent-every 1
UUID=$(jget primary .uuid vm show lg)
RUN=$(state_dir primary)/run/$UUID
vr primary vm start lg >/dev/null || fail "vm start lg"
wait_until 90 grep -q '^agent ready' "$RUN/console.log" ||
    fail "the guest's agent did not start: $(tr -d '\r' <"$RUN/console.log" | tail -n 5)"
log "the Linux guest runs its agent on the primary"

app_point() { # the id of an application-consistent point, if any
    APP=$(vrj replica points list lg |
        jq -r '[.points[] | select(.kind == "application-consistent")][-1].id // empty')
    [ -n "$APP" ]
}
wait_until 60 app_point ||
    fail "no application-consistent point: $(vrj replica points list lg | jq -c '[.points[].kind]') $(vrj primary events --vm lg | jq -c '.events[-3:]')"
# A standard point while the application writes.
wait_until 30 eval 'STD=$(vrj replica points list lg | jq -r --argjson a "$APP" "[.points[] | select(.kind == \"standard\" and .id > \$a)][-1].id // empty"); [ -n "$STD" ]' ||
    fail "no standard point after $APP"
RDISK=$(disk_path replica lg)
latest=$(repl replica lg applied_cycle)
for p in "$APP" "$STD"; do
    "$BUILD_DIR/tests/tools/pointcat" "$(dirname "$RDISK")/undo" "$p" "$latest" \
        "$TESTDIR/p$p" "$RDISK" || fail "point $p cannot be rebuilt"
done
e2fsck -fn "$TESTDIR/p$APP.0" >"$TESTDIR/fsck.log" 2>&1 ||
    fail "the application-consistent point $APP is not a clean file system: $(tail -n 5 "$TESTDIR/fsck.log")"
dumpe2fs -h "$TESTDIR/p$STD.0" 2>/dev/null | grep -q needs_recovery ||
    fail "the standard point $STD does not need recovery: the test shows nothing"
log "point $APP (application-consistent) is a clean file system; point $STD (standard) needs journal recovery"

# A crash between the freeze and the thaw: the guest stays frozen until
# the primary's shipper starts again and thaws it.
seqs() { tr -d '\r' <"$RUN/console.log" | grep -c '^seq ' || true; }
stop_daemon primary
spawn_daemon primary "${PRIMARY_ENV[@]}" VMREPLICA_FAULT=app-frozen:1
wait_until 40 daemon_dead primary || fail "the primary did not die at app-frozen"
s0=$(seqs)
sleep 4
[ "$(seqs)" = "$s0" ] || fail "the guest's application went on: it was not frozen"
start_primary "${PRIMARY_ENV[@]}"
wait_until 30 eval '[ "$(seqs)" -gt "$s0" ]' ||
    fail "the guest stayed frozen after the primary restarted"
grep -q "thawed 1 file system(s) left frozen" "$TESTDIR/primary.log" ||
    fail "no thaw logged at the shipper's start"
log "a crash between freeze and thaw: thawed when the shipper started again"

log "failover to the application-consistent point, with failover network settings"
# The newest application-consistent point (the retention dropped older ones).
wait_until 60 app_point || fail "no application-consistent point any more"
vr replica vm set-boot lg "${BOOT[@]}" >/dev/null || fail "set-boot on the Replica server"
vr replica vm set-failover-network lg --nic 0 --ipv4 10.9.8.7/24 --gateway4 10.9.8.1 \
    --dns 10.9.8.53 >/dev/null || fail "set-failover-network"
FRUN=$(vrj replica failover start lg --point "$APP" --force | jq -r .run_dir) ||
    fail "failover start lg --point $APP"
wait_until 90 grep -q '^agent ready' "$FRUN/console.log" ||
    fail "the guest did not boot on the Replica server: $(tr -d '\r' <"$FRUN/console.log" | tail -n 5)"
set_event() {
    vrj replica events --vm lg | jq -r '.events[].message' |
        grep -q 'failover network of NIC 0 set in the guest'
}
wait_until 120 set_event ||
    fail "failover network not set: $(vrj replica events --vm lg | jq -c '.events[-3:]')"
mac=$(vrj replica vm show lg | jq -r '.nics[0].mac')
ifs=$(python3 "$QGA" "$FRUN/qga.sock" guest-network-get-interfaces) ||
    fail "guest-network-get-interfaces"
jq -e --arg m "$mac" '.[] | select(."hardware-address" == $m) |
    ."ip-addresses"[] | select(."ip-address" == "10.9.8.7" and .prefix == 24)' \
    <<<"$ifs" >/dev/null || fail "the guest's NIC has no 10.9.8.7/24: $ifs"
h=$(python3 "$QGA" "$FRUN/qga.sock" guest-file-open '{"path":"/etc/resolv.conf","mode":"r"}') ||
    fail "open resolv.conf"
conf=$(python3 "$QGA" "$FRUN/qga.sock" guest-file-read "{\"handle\":$h}" | jq -r '."buf-b64"' | base64 -d)
python3 "$QGA" "$FRUN/qga.sock" guest-file-close "{\"handle\":$h}" >/dev/null
grep -qx "nameserver 10.9.8.53" <<<"$conf" || fail "resolv.conf: $conf"
log "the failed-over guest has 10.9.8.7/24 and nameserver 10.9.8.53"
vr replica failover stop lg >/dev/null || fail "cancel"
log "PASS"
