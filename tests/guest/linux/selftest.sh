#!/bin/bash
# tests/guest/linux/selftest.sh — build the Linux test guest and check it end
# to end under TCG, with the QEMU command line vmreplica uses (a raw file
# instead of the NBD disk).  Exit 0 passed, 77 prerequisites missing, 1
# failed.
#
#   boot 1 (256M, OUTDIR/vmlinux): boot to "agent ready", guest-sync,
#          guest-fsfreeze-status/-freeze (the app's "seq" console lines stop)
#          /-thaw (they go on), /data/stop made through guest-file-open,
#          "done", QEMU exits; then app.log and counter read with debugfs,
#          e2fsck clean
#   boot 2 (128M, OUTDIR/vmlinuz): the app continues from the counter and
#          stops at vrlimit=N, the log is contiguous
#   boot 3 (an unformatted disk): "mount failed", QEMU exits
#
# SELFTEST_KEEP=1 keeps the work directory; SELFTEST_DIR=DIR uses DIR.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
QGA="python3 $HERE/qga.py"
APPEND_BASE="console=ttyS0 quiet"

log() { printf 'selftest: %s\n' "$*"; }
skip() { log "SKIP: $*"; exit 77; }
fail() {
    log "FAIL: $*"
    if [ -n "${CONSOLE:-}" ] && [ -r "$CONSOLE" ]; then
        log "console ($CONSOLE), last lines:"
        tail -n 30 "$CONSOLE" | sed 's/^/    /'
    fi
    exit 1
}

for t in qemu-system-x86_64 mkfs.ext4 debugfs e2fsck python3 truncate; do
    command -v "$t" >/dev/null ||
        skip "$t not found (apt-get install -y qemu-system-x86 e2fsprogs python3)"
done

W=${SELFTEST_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/vmreplica-lg.XXXXXX")}
mkdir -p "$W/run"
RD=$W/run
QPID=
cleanup() {
    if [ -n "$QPID" ] && alive; then
        kill "$QPID" 2>/dev/null
    fi
    if [ -z "${SELFTEST_KEEP:-}" ] && [ -z "${SELFTEST_DIR:-}" ]; then
        rm -rf "$W"
    fi
}
trap cleanup EXIT

now_ms() { echo $(($(date +%s%N) / 1000000)); }

"$HERE/build.sh" "$W/out" >"$W/build.log" 2>&1
rc=$?
if [ $rc -eq 77 ]; then
    cat "$W/build.log"
    exit 77
fi
[ $rc -eq 0 ] || { cat "$W/build.log"; fail "build.sh exited $rc"; }
log "built: $(grep -o 'kernel [^ ]* from .*' "$W/build.log" | head -1)"

# boot KERNEL MEM DISK APPEND — start QEMU like vmreplica's start_qemu does
boot() {
    local kernel=$1 mem=$2 disk=$3 append=$4
    CONSOLE=$RD/console.log
    rm -f "$CONSOLE" "$RD/qemu.pid" "$RD/qga.sock" "$RD/qmp.sock"
    T0=$(now_ms)
    qemu-system-x86_64 -name selftest -machine q35,accel=tcg -m "$mem" \
        -smp 1 -nodefaults -display none -serial "file:$CONSOLE" \
        -qmp "unix:$RD/qmp.sock,server=on,wait=off" \
        -pidfile "$RD/qemu.pid" -daemonize \
        -blockdev "driver=file,filename=$disk,node-name=d0" \
        -device virtio-blk-pci,drive=d0 \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -chardev "socket,path=$RD/qga.sock,server=on,wait=off,id=qga0" \
        -device virtio-serial \
        -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
        -kernel "$kernel" -initrd "$W/out/initrd.img" -append "$append" \
        >"$RD/qemu.log" 2>&1 || { cat "$RD/qemu.log"; fail "qemu did not start"; }
    QPID=$(cat "$RD/qemu.pid")
}

# The console without CRs (the kernel's own messages end in CR LF).
con() { tr -d '\r' <"$CONSOLE" 2>/dev/null; }
# alive — QEMU runs (a zombie waiting for its reaper does not count)
alive() {
    local st
    st=$(sed -n 's/^[0-9]* (.*) \(.\).*/\1/p' "/proc/$QPID/stat" 2>/dev/null) &&
        [ -n "$st" ] && [ "$st" != Z ]
}
# wait_console REGEX SECONDS — until a console line matches
wait_console() {
    local end=$(($(now_ms) + $2 * 1000))
    while [ "$(now_ms)" -lt $end ]; do
        con | grep -qE "$1" && return 0
        alive || { con | grep -qE "$1" && return 0; return 1; }
        sleep 0.05
    done
    return 1
}
wait_exit() { # SECONDS — until QEMU is gone
    local end=$(($(now_ms) + $1 * 1000))
    while alive; do
        [ "$(now_ms)" -lt $end ] || return 1
        sleep 0.1
    done
}
last_seq() { con | grep -aoE '^seq [0-9]+' | tail -n 1 | cut -d' ' -f2; }
qga() { $QGA "$RD/qga.sock" "$@"; }
# check_log DISK N — app.log holds "seq 1".."seq N", counter holds N
check_log() {
    local disk=$1 n=$2 got
    debugfs -R 'cat /app.log' "$disk" >"$W/app.log" 2>/dev/null ||
        fail "debugfs cannot read /app.log"
    seq 1 "$n" | sed 's/^/seq /' >"$W/expect.log"
    cmp -s "$W/app.log" "$W/expect.log" ||
        fail "app.log is not seq 1..$n: $(head -c 300 "$W/app.log" | tail -n 3)"
    got=$(debugfs -R 'cat /counter' "$disk" 2>/dev/null)
    [ "$got" = "$n" ] || fail "counter is '$got', expected $n"
    e2fsck -fn "$disk" >"$W/fsck.log" 2>&1 || { cat "$W/fsck.log"; fail "e2fsck: $disk not clean"; }
}

DISK=$W/disk.raw
truncate -s 64M "$DISK" && mkfs.ext4 -F -q "$DISK" || fail "mkfs.ext4"

KERNEL=$W/out/vmlinux
[ -e "$KERNEL" ] || KERNEL=$W/out/vmlinuz

# --- boot 1: agent, freeze, thaw, stop --------------------------------------
log "boot 1: $(basename "$KERNEL"), 256M"
boot "$KERNEL" 256 "$DISK" "$APPEND_BASE"
wait_console '^vmreplica linux guest' 60 || fail "no banner"
BANNER_MS=$(($(now_ms) - T0))
wait_console '^agent ready' 60 || fail "no 'agent ready'"
READY1_MS=$(($(now_ms) - T0))
log "banner after $BANNER_MS ms, agent ready after $READY1_MS ms"
wait_console '^seq 10$' 30 || fail "the app does not run"

st=$(qga guest-fsfreeze-status) || fail "guest-fsfreeze-status"
[ "$st" = '"thawed"' ] || fail "status before freeze: $st"
t=$(now_ms)
n=$(qga --time guest-fsfreeze-freeze 2>"$W/t.freeze") || fail "guest-fsfreeze-freeze"
FREEZE_CLI_MS=$(($(now_ms) - t))
[ "$n" = 1 ] || fail "guest-fsfreeze-freeze froze $n file systems, expected 1"
st=$(qga guest-fsfreeze-status) || fail "guest-fsfreeze-status"
[ "$st" = '"frozen"' ] || fail "status after freeze: $st"
sleep 1 # a line the app wrote just before the freeze may still be printed
s1=$(last_seq)
sleep 5 # 25 iterations: 2 or 3 console lines if the app were not blocked
s2=$(last_seq)
[ "$s1" = "$s2" ] || fail "the app went on while frozen (seq $s1 -> $s2)"
log "frozen: the app stays at seq $s2 for 5 s"
t=$(now_ms)
n=$(qga --time guest-fsfreeze-thaw 2>"$W/t.thaw") || fail "guest-fsfreeze-thaw"
THAW_CLI_MS=$(($(now_ms) - t))
[ "$n" = 1 ] || fail "guest-fsfreeze-thaw thawed $n file systems, expected 1"
st=$(qga guest-fsfreeze-status) || fail "guest-fsfreeze-status"
[ "$st" = '"thawed"' ] || fail "status after thaw: $st"
wait_console "^seq $((s2 + 10))\$" 20 || fail "the app does not go on after thaw"
log "thawed: the app goes on (seq $((s2 + 10)))"
log "$(cat "$W/t.freeze") (qga.py process: $FREEZE_CLI_MS ms)," \
    "$(cat "$W/t.thaw") (qga.py process: $THAW_CLI_MS ms)"

h=$(qga guest-file-open '{"path":"/data/stop","mode":"w"}') || fail "guest-file-open"
# The app may see /data/stop, stop the agent and power off before the close
# is answered: a failed close is fine once the app says it stopped.
qga guest-file-close "{\"handle\":$h}" >/dev/null 2>"$W/close.err" ||
    wait_console '^app stopped' 5 || { cat "$W/close.err"; fail "guest-file-close"; }
wait_console '^done' 30 || fail "no 'done' after /data/stop"
wait_exit 30 || fail "QEMU still runs after 'done'"
con | grep -q 'umount failed\|write failed' && fail "unclean stop"
N=$(con | grep -aoE '^app stopped at seq [0-9]+' | grep -oE '[0-9]+$')
[ -n "$N" ] || fail "no 'app stopped at seq N'"
check_log "$DISK" "$N"
debugfs -R 'stat /stop' "$DISK" >/dev/null 2>&1 || fail "no /stop on the disk"
log "boot 1: stopped at seq $N; app.log and counter on the disk agree"

# --- boot 2: bzImage, 128M, continue to vrlimit ------------------------------
debugfs -w -R 'rm /stop' "$DISK" >/dev/null 2>&1 || fail "debugfs rm /stop"
LIMIT=$((N + 5))
log "boot 2: vmlinuz, 128M, vrlimit=$LIMIT"
boot "$W/out/vmlinuz" 128 "$DISK" "$APPEND_BASE vrlimit=$LIMIT"
wait_console '^agent ready' 90 || fail "no 'agent ready'"
READY2_MS=$(($(now_ms) - T0))
log "agent ready after $READY2_MS ms"
wait_console "^app start after seq $N," 5 ||
    fail "the app does not continue from seq $N"
wait_console '^done' 30 || fail "no 'done' at vrlimit=$LIMIT"
wait_exit 30 || fail "QEMU still runs after 'done'"
check_log "$DISK" "$LIMIT"
log "boot 2: continued from seq $N to $LIMIT"

# --- boot 3: no file system --------------------------------------------------
BLANK=$W/blank.raw
truncate -s 16M "$BLANK"
log "boot 3: unformatted disk"
boot "$KERNEL" 128 "$BLANK" "$APPEND_BASE"
wait_console '^mount failed' 60 || fail "no 'mount failed'"
wait_exit 30 || fail "QEMU still runs after 'mount failed'"

log "boot to 'agent ready': $READY1_MS ms (vmlinux, 256M)," \
    "$READY2_MS ms (vmlinuz, 128M)"
log "ok"
echo "1 passed, 0 failed"
exit 0
