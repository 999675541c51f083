#!/usr/bin/env bash
# plugin-basic.sh: the data plane on its own — nbdkit with the vmreplica
# plugin, real NBD clients (qemu-io), the control socket (socat) and the
# change log read back with tests/tools/cldump.
#
#  1. writes, write-zeroes, trim, FUA and flush through two exports are
#     logged in order with the right kinds, offsets, lengths and sequence
#     numbers; SEAL seals both disks at the same cycle; the hash log matches
#     the disks; sequence numbers continue into the next segment;
#  2. kill -9 of nbdkit while a client writes, plus a torn record appended
#     to the open segment: restart cuts the tail, keeps the cycle number and
#     the next SEAL yields a cleanly decoding segment with contiguous seqs;
#  3. a crash in the middle of a SEAL (fault point after the first disk):
#     restart finishes the seal, both disks continue at the same cycle.
#
# Env: BUILD_DIR (default ./build), VMREPLICA_PLUGIN, CLDUMP.
# Exit: 0 pass, 1 fail, 77 skip.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
CLDUMP=${CLDUMP:-$BUILD_DIR/tests/tools/cldump}
NAME=plugin-basic

skip() { echo "skip: $*"; exit 77; }
for c in nbdkit qemu-io socat sha256sum; do
    command -v "$c" >/dev/null 2>&1 || skip "$c not found"
done
[ -f "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
[ -x "$CLDUMP" ] || skip "cldump not built: $CLDUMP"
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

D0=$T/disk0.raw
D1=$T/disk1.raw
L0=$D0.vrlog
L1=$D1.vrlog
SOCK=$T/nbd.sock
CTL=$T/ctl.sock
truncate -s 16M "$D0"
truncate -s 8M "$D1"

seg() { printf '%s/%020d.%s' "$1" "$2" "$3"; }

start_nbdkit() {
    rm -f "$SOCK"
    env "$@" nbdkit --foreground --verbose --unix "$SOCK" "$PLUGIN" \
        disk=disk0:"$D0" disk=disk1:"$D1" control="$CTL" \
        hashlog="$T/hashes" ${PLUGIN_EXTRA:-} >>"$T/nbdkit.log" 2>&1 &
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

qio() { # qio EXPORT CMD...
    local e=$1 args=()
    shift
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -t writeback -f raw "nbd+unix:///$e?socket=$SOCK" "${args[@]}" \
        >>"$T/qemu-io.log" 2>&1
}

expect() { # expect WHAT GOT WANT
    [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"
}

# --- 1. tracking, FUA, flush, seal ------------------------------------------
log "start"
start_nbdkit
expect "status at start" "$(ctl STATUS)" "OK 1 128 0"
expect "unknown command" "$(ctl FROB)" "ERR unknown command"
long=$(head -c 300 /dev/zero | tr '\0' 'A')
ctl "$long" | grep -q '^ERR' || fail "overlong line not refused"

qio disk0 'write -P 0xab 0 64k' 'write -z 1M 64k' 'discard 2M 64k' \
    'write -f -P 0xcd 128k 4k' 'flush' || fail "qemu-io disk0 writes"
qio disk1 'write -P 0x11 4096 512' 'write -z -f 8192 4096' 'flush' ||
    fail "qemu-io disk1 writes"
qio disk0 'read -P 0xab 0 64k' 'read -P 0 1M 64k' 'read -P 0 2M 64k' \
    'read -P 0xcd 128k 4k' || fail "read back disk0"
qio "" 'read -P 0xab 0 64k' || fail "default export is not disk0"

expect "seal 1" "$(ctl SEAL)" "OK 1"
for f in "$(seg "$L0" 1 log)" "$(seg "$L1" 1 log)" "$(seg "$L0" 2 open)" \
         "$(seg "$L1" 2 open)"; do
    [ -f "$f" ] || fail "missing $f after seal"
done
[ ! -e "$(seg "$L0" 1 open)" ] || fail "cycle 1 still open"

got=$("$CLDUMP" -F "$(seg "$L0" 1 log)") || fail "cldump disk0 cycle 1"
want="wref 0 0 65536 0
zero 0 1048576 65536 1
trim 0 2097152 65536 2
wref 0 131072 4096 3 fua"
expect "disk0 cycle 1 records" "$got" "$want"
got=$("$CLDUMP" -F "$(seg "$L1" 1 log)") || fail "cldump disk1 cycle 1"
want="wref 1 4096 512 0
zero 1 8192 4096 1 fua"
expect "disk1 cycle 1 records" "$got" "$want"

h0=$(sha256sum "$D0" | cut -d' ' -f1)
h1=$(sha256sum "$D1" | cut -d' ' -f1)
expect "hash log" "$(cat "$T/hashes")" "1 disk0 $h0
1 disk1 $h1"

# Sequence numbers continue across segments, cycle numbers stay in step.
qio disk0 'write -P 0x22 4k 4k' || fail "write after seal"
expect "status" "$(ctl STATUS)" "OK 2 $((64 + 64 + 32)) $((32 + 4096))"
expect "seal 2" "$(ctl SEAL)" "OK 2"
got=$("$CLDUMP" -H "$(seg "$L0" 2 log)")
expect "disk0 cycle 2" "$got" "# cycle 2 disk 0 first_seq 4
wref 0 4096 4096 4"
got=$("$CLDUMP" -H "$(seg "$L1" 2 log)")
expect "disk1 cycle 2 (empty)" "$got" "# cycle 2 disk 1 first_seq 2"
expect "disk0 cycle 3 header" "$("$CLDUMP" -H "$(seg "$L0" 3 open)")" \
    "# cycle 3 disk 0 first_seq 5"
log "tracking, FUA, flush and seal ok"

# --- 2. kill -9 while writing, torn tail ------------------------------------
cmds=()
for i in $(seq 0 3999); do
    cmds+=("write -P $((i % 250 + 1)) $((i * 4096 % 8388608)) 4k")
done
qio disk0 "${cmds[@]}" &
WRITER_PID=$!
qio disk1 "${cmds[@]:0:50}" || fail "disk1 writes"
sleep 0.3
kill9_nbdkit
wait "$WRITER_PID" 2>/dev/null || true
WRITER_PID=
open0=$(seg "$L0" 3 open)
open1=$(seg "$L1" 3 open)
n_before=$("$CLDUMP" "$open0" | wc -l)
# The writer preallocates (zeroes after the records); where the records
# end is the header plus each record's header and write data.
records_end() { # SEGMENT
    "$CLDUMP" "$1" |
        awk '{ n += 32 + ($1 == "write" ? $4 : 0) } END { print 64 + n }'
}
size_good=$(records_end "$open0")
end1=$(records_end "$open1")
# A torn record right after the last good one: a valid-looking header
# prefix, inside the preallocated zeroes; and garbage after disk1's.
head -c 93 "$(seg "$L0" 1 log)" | tail -c 29 |
    dd of="$open0" bs=1 seek="$size_good" conv=notrunc status=none
head -c 1000 /dev/urandom |
    dd of="$open1" bs=1 seek="$end1" conv=notrunc status=none
"$CLDUMP" "$open0" >/dev/null 2>&1 && fail "torn tail not detected"
"$CLDUMP" "$open1" >/dev/null 2>&1 && fail "garbage tail not detected"

start_nbdkit
expect "disk0 tail cut exactly" "$(stat -c %s "$open0")" "$size_good"
expect "disk1 tail cut exactly" "$(stat -c %s "$open1")" "$end1"
"$CLDUMP" "$open1" >/dev/null || fail "disk1 tail not cut"
grep -q "torn tail of [0-9]* bytes cut" "$T/nbdkit.log" ||
    fail "recovery did not report the cut"
expect "cycle after crash" "$(ctl STATUS | cut -d' ' -f1,2)" "OK 3"
qio disk0 'write -P 0x77 0 4k' || fail "write after recovery"
expect "seal 3" "$(ctl SEAL)" "OK 3"
got=$("$CLDUMP" "$(seg "$L0" 3 log)") || fail "cycle 3 does not decode"
n_after=$(printf '%s\n' "$got" | wc -l)
expect "records kept" "$n_after" "$((n_before + 1))"
# Seqs contiguous from first_seq 5; the last one is the post-crash write.
printf '%s\n' "$got" | awk 'BEGIN { s = 5 } $5 != s++ { exit 1 }' ||
    fail "seqs not contiguous"
expect "last record" "$(printf '%s\n' "$got" | tail -1)" \
    "wref 0 0 4096 $((5 + n_before))"
expect "next first_seq" \
    "$("$CLDUMP" -H "$(seg "$L0" 4 open)")" "# cycle 4 disk 0 first_seq $((5 + n_before + 1))"
log "recovery after kill -9: torn tail cut, $n_before of 4000 writes were logged"

# --- 3. crash in the middle of a seal ----------------------------------------
kill9_nbdkit
# seal-disk:2: disk0 was cut and its cycle 5 opened, disk1 was cut but has
# no cycle 5 yet; nothing was committed (renamed to .log).
start_nbdkit VMREPLICA_FAULT=seal-disk:2
qio disk0 'write -P 0x66 8k 4k' || fail "write before faulty seal"
qio disk1 'write -P 0x67 8k 4k' || fail "write before faulty seal"
ctl SEAL >/dev/null || true
wait "$NBDKIT_PID" 2>/dev/null || true
NBDKIT_PID=
[ -f "$(seg "$L0" 4 open)" ] && [ -f "$(seg "$L0" 5 open)" ] ||
    fail "fault hit before disk0 was cut and cycle 5 opened"
[ -f "$(seg "$L1" 4 open)" ] && [ ! -e "$(seg "$L1" 5 open)" ] ||
    fail "disk1 got cycle 5 despite the fault"
[ ! -e "$(seg "$L0" 4 log)" ] || fail "disk0 committed before the cut ended"
start_nbdkit
grep -q "committed the seal of cycle 4 that a crash interrupted" \
    "$T/nbdkit.log" || fail "recovery did not commit disk0's cut seal"
grep -q "finished interrupted seal of cycle 4" "$T/nbdkit.log" ||
    fail "recovery did not finish the seal"
for f in "$(seg "$L0" 4 log)" "$(seg "$L1" 4 log)" "$(seg "$L0" 5 open)" \
         "$(seg "$L1" 5 open)"; do
    [ -f "$f" ] || fail "missing $f after seal recovery"
done
"$CLDUMP" "$(seg "$L0" 4 log)" "$(seg "$L1" 4 log)" >/dev/null ||
    fail "cycle 4 segments do not decode"
expect "disk1 cycle 4" "$("$CLDUMP" "$(seg "$L1" 4 log)" | tail -1 | cut -d' ' -f1-4)" \
    "wref 1 8192 4096"
expect "cycle after seal recovery" "$(ctl STATUS | cut -d' ' -f1,2)" "OK 5"
expect "seal 5" "$(ctl SEAL)" "OK 5"
log "interrupted seal finished at restart"

# seal-commit:1: every disk was cut and has cycle 7 open, writes went on in
# cycle 7, then the crash came before any cycle-6 segment was committed.
kill9_nbdkit
start_nbdkit VMREPLICA_FAULT=seal-commit:1
qio disk0 'write -P 0x68 16k 4k' || fail "write before faulty commit"
ctl SEAL >/dev/null || true
wait "$NBDKIT_PID" 2>/dev/null || true
NBDKIT_PID=
for f in "$(seg "$L0" 6 open)" "$(seg "$L1" 6 open)" "$(seg "$L0" 7 open)" \
         "$(seg "$L1" 7 open)"; do
    [ -f "$f" ] || fail "missing $f after a crash before the commit"
done
start_nbdkit
for f in "$(seg "$L0" 6 log)" "$(seg "$L1" 6 log)"; do
    [ -f "$f" ] || fail "recovery did not commit $f"
done
expect "disk0 cycle 6" "$("$CLDUMP" "$(seg "$L0" 6 log)" | cut -d' ' -f1-4)" \
    "wref 0 16384 4096"
expect "cycle after commit recovery" "$(ctl STATUS | cut -d' ' -f1,2)" "OK 7"
expect "seal 7" "$(ctl SEAL)" "OK 7"
log "seal cut but not committed: committed at restart"

# --- 4. log=data: records carry their data ------------------------------------
kill9_nbdkit
PLUGIN_EXTRA=log=data start_nbdkit
qio disk0 'write -P 0x42 12k 4k' || fail "write with log=data"
expect "status with data" "$(ctl STATUS | cut -d' ' -f3)" \
    "$((2 * 64 + 32 + 4096))"
expect "seal 8" "$(ctl SEAL)" "OK 8"
expect "log=data record" "$("$CLDUMP" "$(seg "$L0" 8 log)" | cut -d' ' -f1-4)" \
    "write 0 12288 4096"
log "log=data copies the data into the log"

kill "$NBDKIT_PID"
wait "$NBDKIT_PID" 2>/dev/null || true
NBDKIT_PID=
[ ! -e "$CTL" ] || fail "control socket left behind"
log "PASS"
exit 0
