#!/usr/bin/env bash
# plugin-ref.sh: writes logged by reference (log=ref, the default) — the
# data plane keeps no copy of written data until a later cycle overwrites a
# block an unshipped cycle still needs, and then saves the block's content
# as of that cycle's seal in the cycle's preserve file first.  Every cycle
# is rebuilt here the way the shipper does (tests/tools/cycapply: segment +
# preserve file + disk image) and applied to a replica image, whose SHA-256
# must equal the one the plugin logged for the primary disk at that seal:
#
#  1. cycles 2 and 3 overwrite every block of cycle 1 (aligned, unaligned,
#     the partial last block, a write-zeroes): cycle 1, rebuilt after them,
#     is exactly the disk at seal 1, its data from the preserve file;
#  2. SHIPPED 1 retires cycle 1: later overwrites do not grow its preserve
#     file;
#  3. kill -9 of nbdkit with cycles 2 and 3 unshipped: restart rebuilds
#     which blocks they still need from their segments, so overwrites after
#     the restart are preserved and cycles 2, 3, 4 rebuild exactly;
#  4. kill -9 under 4000 random writes: every write that reached the disk
#     has its record (the record is written first), so after the restart
#     the replica rebuilt from the log equals the disk byte for byte;
#  5. past the refmap= budget, writes are logged with their data.
#
# Env: BUILD_DIR (default ./build), VMREPLICA_PLUGIN.
# Exit: 0 pass, 1 fail, 77 skip.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
CLDUMP=$BUILD_DIR/tests/tools/cldump
CYCAPPLY=$BUILD_DIR/tests/tools/cycapply
NAME=plugin-ref

skip() { echo "skip: $*"; exit 77; }
for c in nbdkit qemu-io socat sha256sum cmp; do
    command -v "$c" >/dev/null 2>&1 || skip "$c not found"
done
[ -f "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
[ -x "$CLDUMP" ] || skip "cldump not built: $CLDUMP"
[ -x "$CYCAPPLY" ] || skip "cycapply not built: $CYCAPPLY"
PLUGIN=$(realpath "$PLUGIN")

T=$(mktemp -d "/tmp/vrt-$NAME.XXXXXX")
NBDKIT_PID=
WRITER_PID=
cleanup() {
    local rc=$?
    [ -n "$WRITER_PID" ] && kill -9 "$WRITER_PID" 2>/dev/null || true
    if [ -n "$NBDKIT_PID" ]; then
        kill -9 "$NBDKIT_PID" 2>/dev/null || true
        wait "$NBDKIT_PID" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$T/nbdkit.log" ]; then
        echo "--- nbdkit log (last 40 lines)"
        tail -40 "$T/nbdkit.log"
    fi
    rm -rf "$T"
}
trap cleanup EXIT

log() { echo "[$NAME] $*"; }
fail() { echo "[$NAME] FAIL: $*" >&2; exit 1; }

D=$T/disk.raw
L=$D.vrlog
R=$T/replica.raw
SOCK=$T/nbd.sock
CTL=$T/ctl.sock
# 4 MiB + 512: the last 4 KiB block is partial.
SIZE=$((4 * 1048576 + 512))
truncate -s $SIZE "$D"
truncate -s $SIZE "$R"

seg() { printf '%s/%020d.%s' "$L" "$1" "$2"; }

start_nbdkit() {
    rm -f "$SOCK"
    nbdkit --foreground --verbose --unix "$SOCK" "$PLUGIN" \
        disk=disk0:"$D" control="$CTL" hashlog="$T/hashes" "$@" \
        >>"$T/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    for _ in $(seq 100); do
        if [ -S "$SOCK" ] && [ -S "$CTL" ] && [ "$(ctl PING)" = OK ]; then
            return 0
        fi
        kill -0 "$NBDKIT_PID" 2>/dev/null || fail "nbdkit exited at start"
        sleep 0.1
    done
    fail "nbdkit did not come up"
}

kill9_nbdkit() {
    kill -9 "$NBDKIT_PID" 2>/dev/null || true
    wait "$NBDKIT_PID" 2>/dev/null || true
    NBDKIT_PID=
}

ctl() { printf '%s\n' "$1" | socat -t 30 - UNIX-CONNECT:"$CTL" 2>/dev/null; }

qio() {
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -t writeback -f raw "nbd+unix:///disk0?socket=$SOCK" "${args[@]}" \
        >>"$T/qemu-io.log" 2>&1
}

expect() { # expect WHAT GOT WANT
    [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"
}

# apply_check CYCLE: rebuild the cycle, apply it to the replica, compare
# with the hash the plugin logged at its seal.
apply_check() {
    "$CYCAPPLY" "$L" "$1" "$D" "$R" || fail "cycle $1 does not rebuild"
    local want got
    want=$(awk -v c="$1" '$1 == c && $2 == "disk0" { print $3 }' "$T/hashes")
    got=$(sha256sum "$R" | cut -d' ' -f1)
    [ -n "$want" ] || fail "no hash logged for cycle $1"
    expect "replica after cycle $1 = primary at seal $1" "$got" "$want"
}

# --- 1. a cycle rebuilt after later cycles overwrote all of it --------------
start_nbdkit
qio 'write -P 0xa1 0 64k' "write -P 0xa2 $((SIZE - 512)) 512" \
    'write -P 0xa3 1M 8k' || fail "cycle 1 writes"
expect "seal 1" "$(ctl SEAL)" "OK 1"
[ ! -e "$(seg 1 pre)" ] || fail "a preserve file before any overwrite"
qio 'write -P 0xb1 0 64k' "write -P 0xb2 $((SIZE - 512)) 512" \
    'write -P 0xb3 1M 8k' || fail "cycle 2 writes"
expect "seal 2" "$(ctl SEAL)" "OK 2"
got=$("$CLDUMP" "$(seg 1 pre)") || fail "cycle 1 preserve file unreadable"
expect "cycle 1 preserved blocks" "$got" "write 0 0 65536 0
write 0 4194304 512 1
write 0 1048576 8192 2"
# Cycle 3 overwrites part of cycle 2's blocks: unaligned, zero, trim.
qio 'write -P 0xc1 32k 64k' 'write -z 0 4k' 'write -P 0xc2 1049088 512' \
    'discard 2M 64k' || fail "cycle 3 writes"
expect "seal 3" "$(ctl SEAL)" "OK 3"
expect "cycle 1 preserve file unchanged" "$("$CLDUMP" "$(seg 1 pre)" | wc -l)" 3
apply_check 1
log "cycle 1 rebuilt exactly after cycles 2 and 3 overwrote it"

# --- 2. SHIPPED retires a cycle ---------------------------------------------
expect "shipped 1" "$(ctl 'SHIPPED 1')" "OK 1"
expect "shipped an open cycle" "$(ctl 'SHIPPED 4')" "ERR cycle 4 is not sealed"
expect "shipped garbage" "$(ctl 'SHIPPED x')" "ERR SHIPPED wants a cycle number"
rm -f "$(seg 1 log)" "$(seg 1 pre)" # as the shipper does after SHIPPED
qio 'write -P 0xd1 0 128k' || fail "cycle 4 writes"
[ ! -e "$(seg 1 pre)" ] || fail "a shipped cycle's preserve file came back"

# --- 3. kill -9 with cycles 2 and 3 unshipped --------------------------------
kill9_nbdkit
start_nbdkit
grep -q "blocks logged by reference in cycles 2\.\.4" "$T/nbdkit.log" ||
    fail "recovery did not rebuild the block owners of cycles 2..4"
pre2_before=$("$CLDUMP" "$(seg 2 pre)" | wc -l)
# 1 MiB: block 0 last written by cycle 3 (0xc2), block 1 by cycle 2.
qio 'write -P 0xe1 1M 8k' "write -P 0xe2 $((SIZE - 512)) 512" ||
    fail "writes after the restart"
pre2_after=$("$CLDUMP" "$(seg 2 pre)" | wc -l)
[ "$pre2_after" -gt "$pre2_before" ] ||
    fail "overwrite after the restart not preserved for cycle 2"
expect "seal 4" "$(ctl SEAL)" "OK 4"
for c in 2 3 4; do
    apply_check $c
done
cmp -s "$D" "$R" || fail "replica differs from the disk after cycle 4"
log "restart rebuilt which blocks cycles 2 and 3 need; cycles 2-4 exact"

# --- 4. kill -9 under load: the log is never behind the disk -----------------
expect "shipped 4" "$(ctl 'SHIPPED 4')" "OK 4"
for i in $(seq 0 39999); do
    echo "write -P $((i % 250 + 1)) $(( (i * 7919 % 1024) * 4096 )) 4k"
done >"$T/cmds"
qemu-io -t writeback -f raw "nbd+unix:///disk0?socket=$SOCK" <"$T/cmds" \
    >>"$T/qemu-io.log" 2>&1 &
WRITER_PID=$!
sleep 0.4
kill9_nbdkit
wait "$WRITER_PID" 2>/dev/null || true
WRITER_PID=
start_nbdkit
expect "seal 5" "$(ctl SEAL)" "OK 5"
n=$("$CLDUMP" "$(seg 5 log)" | wc -l)
[ "$n" -gt 0 ] && [ "$n" -lt 40000 ] ||
    fail "$n of 40000 writes logged: the kill did not land mid-run"
"$CYCAPPLY" "$L" 5 "$D" "$R" || fail "cycle 5 does not rebuild"
cmp -s "$D" "$R" || fail "after kill -9 the disk holds a write the log lacks"
log "kill -9 under load: $n of 40000 writes logged, replica = disk"

# --- 5. the refmap budget ------------------------------------------------------
kill "$NBDKIT_PID"
wait "$NBDKIT_PID" 2>/dev/null || true
NBDKIT_PID=
rm -f "$L"/*.log "$L"/*.pre # cycles 2-5 shipped
start_nbdkit refmap=16
qio 'write -P 0xf1 0 8k' 'write -P 0xf2 2M 128k' || fail "budget writes"
expect "seal 6" "$(ctl SEAL)" "OK 6"
expect "within and past the budget" \
    "$("$CLDUMP" "$(seg 6 log)" | cut -d' ' -f1-4)" "wref 0 0 8192
write 0 2097152 131072"
"$CYCAPPLY" "$L" 6 "$D" "$R" || fail "cycle 6 does not rebuild"
cmp -s "$D" "$R" || fail "replica differs after the budget cycle"
log "past refmap= the data is logged"

kill "$NBDKIT_PID"
wait "$NBDKIT_PID" 2>/dev/null || true
NBDKIT_PID=
log "PASS"
exit 0
