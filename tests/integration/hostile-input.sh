#!/bin/bash
# hostile-input: the Replica server's certificate port against hostile input
# (SPEC §6: "Nothing a peer sends can name a path … Every length read from
# the network or disk is bounded before allocating.  Every refusal is logged
# as an audit event with the peer's identity").
#
# Requests go straight to the replica's HTTPS port (curl, and
# hostile-input.py for what curl cannot do).  For EVERY case the test
# asserts (1) the exact refusal: HTTP code, the "error" code name and the
# server's message (or the TLS failure); (2) a new audit event naming the
# peer: "… from <peer> (127.0.0.1:<the client's own port>): <that same
# message>"; (3) nothing written: the replica storage location and a
# directory outside it list the same files with the same sizes and times,
# no Replica VM appeared, and for uploads to the registered target VM its
# staging directory is empty, its disk's sha256 and its cycles unchanged.
#
#   1  expired client certificate            2  not-yet-valid client cert
#   3  vm name with ../                      4  vm name with /
#   5  vm name with an embedded NUL          6  vm name of 4096 bytes
#   7  disk id with ../ or /                 8  symlinks in the storage
#   9  huge length and count fields          10 decompression bombs (also
#                                               on a 40 MiB tmpfs storage)
#   11 JSON body over 64 KiB                 12 bad or missing epoch
# and, with the replica restarted with a 3 s request deadline and a cap of
# 4 connections (test hooks VMREPLICA_TEST_IDLE_TIMEOUT/_MAX_CONNECTIONS):
#   13 TLS 1.0 offered                       14 TLS 1.1 offered
#   15 plaintext HTTP on the TLS port        16 slowloris (idle timeout)
#   17 more connections than the cap
#
# Each case runs in a subshell and a failing one does not stop the others:
# the test fails at the end, listing every case that failed.
# HOSTILE_CASES="9 10" runs only those cases.
source "$(dirname "$0")/functions.sh"
requires curl jq openssl python3 zstd sha256sum find
requires_build

HOSTILE=$SOURCE_DIR/tests/integration/hostile-input.py
# The interpreter itself, not a version manager's shim (which costs 0.1 s
# a call).
PY=$(python3 -c 'import sys; print(sys.executable)')
"$PY" "$HOSTILE" crc-selftest >/dev/null || fail "hostile-input.py: CRC-32C"

setup_pair

STORAGE=$TESTDIR/replica-storage
OUTSIDE=$TESTDIR/outside
mkdir -p "$OUTSIDE"
R1=https://replica.test.local:$REPLICA_PORT/r1/vms

# --- requests ----------------------------------------------------------------

# r1 CERT METHOD PATH [CURL-ARGS…] — one request to the certificate port
# with client certificate CERT (a name in $PKI) and, unless the args give
# their own, X-Vmreplica-Epoch: 1.  Sets R1_CODE (the HTTP code, or "tls"
# when curl got no HTTP answer), R1_ERR and R1_MSG (the JSON answer's
# "error" and "message"), R1_PORT (curl's local port: the audit event must
# name it) and R1_CURL (curl's error text).
r1() {
    local cert=$1 method=$2 path=$3 out rc=0
    shift 3
    local args=(-sS --max-time 60 -o "$TESTDIR/r1.out"
        -w '%{http_code} %{local_port}' -X "$method" -H 'Expect:'
        --resolve "replica.test.local:$REPLICA_PORT:127.0.0.1"
        --cacert "$PKI/ca.pem" --cert "$PKI/$cert.pem" --key "$PKI/$cert.key")
    [[ " $* " == *"X-Vmreplica-Epoch"* ]] || args+=(-H 'X-Vmreplica-Epoch: 1')
    : >"$TESTDIR/r1.out"
    out=$(curl "${args[@]}" "$@" "$R1$path" 2>"$TESTDIR/r1.err") || rc=$?
    R1_CODE=${out%% *}
    R1_PORT=${out##* }
    R1_CURL=$(head -c 300 "$TESTDIR/r1.err")
    [ "$rc" -eq 0 ] && [ "$R1_CODE" != 000 ] || R1_CODE=tls
    R1_ERR=$(jq -r '.error // empty' "$TESTDIR/r1.out" 2>/dev/null || true)
    R1_MSG=$(jq -r '.message // empty' "$TESTDIR/r1.out" 2>/dev/null || true)
    log "  $method $path ($cert): $R1_CODE $R1_ERR: ${R1_MSG:-${R1_CURL:-$(head -c 300 "$TESTDIR/r1.out")}}"
}

# reg_body NAME [DISK-ID [SIZE]] — a registration body (jq does the
# escaping); one disk, 4 MiB unless SIZE.
reg_body() {
    jq -cn --arg n "$1" --arg d "${2:-disk0}" --argjson s "${3:-4194304}" \
        '{name: $n, cpus: 1, memory_mib: 128, epoch: 1,
          disks: [{id: $d, size: $s}]}'
}

# register UUID BODY-FILE [CURL-ARGS…] — PUT /r1/vms/UUID with the primary's
# certificate.
register() {
    local u=$1 f=$2
    shift 2
    r1 primary PUT "/$u" -H 'Content-Type: application/json' \
        --data-binary "@$f" "$@"
}

# upload KIND N FILE [CURL-ARGS…] — PUT /r1/vms/$T/KIND/N (base or cycles).
upload() {
    local kind=$1 n=$2 f=$3
    shift 3
    r1 primary PUT "/$T/$kind/$n" -H 'Content-Type: application/octet-stream' \
        --data-binary "@$f" "$@"
}

newuuid() { cat /proc/sys/kernel/random/uuid; }

payload() { "$PY" "$HOSTILE" payload "$@" || fail "hostile-input.py payload $*"; }

# --- the three assertions ----------------------------------------------------

nevents() { vrj replica events | jq '.events | length'; }
# mark — remember where the events end (set before each refused request).
mark() { EV0=$(nevents); }
new_audits() {
    vrj replica events |
        jq -r --argjson n "$EV0" '.events[$n:][] | select(.level == "audit") |
            .message'
}

# refused CODE ERR MSG — the answer was HTTP CODE with error ERR and a
# message containing MSG.
refused() {
    [ "$R1_CODE" = "$1" ] && [ "$R1_ERR" = "$2" ] && [[ $R1_MSG == *"$3"* ]] ||
        fail "want HTTP $1 $2 '$3', got $R1_CODE '$R1_ERR' '$R1_MSG' ${R1_CURL:+(curl: $R1_CURL)}$(written)"
}

# audited PEER [TEXT] — an audit event since the mark names PEER and the
# client's address and port, "PEER (127.0.0.1:PORT)", and carries TEXT
# (default: the message the client was given).
_audited() { new_audits | grep -qF -- "$1"; }
audited() {
    local want="$1 (127.0.0.1:$R1_PORT)" text=${2-$R1_MSG}
    if ! wait_until 1 _audited "$want"; then
        log "  audit events since the request:"
        new_audits | sed 's/^/      /'
        fail "no audit event naming '$want'"
    fi
    new_audits | grep -F -- "$want" | grep -qF -- "$text" ||
        fail "the audit event naming '$want' does not say '$text': $(new_audits | grep -F -- "$want")"
    log "  audit: $(new_audits | grep -F -- "$want" | tail -n 1)"
}

# snapshot — every file and symlink under the storage and the outside
# directory (directories by name only: a refused upload's temporary file
# changes its directory's times) and the Replica VMs.
snapshot() {
    find "$STORAGE" "$OUTSIDE" \( -type d -printf 'd %p\n' \) -o \
        \( -type l -printf 'l %p -> %l\n' \) -o -printf '%y %p %s %T@\n' |
        sort
    vrj replica vm list | jq -r '.vms[] | "vm \(.uuid) \(.name)"' | sort
}
# snap — before a refused request: the snapshot, and the target's disk
# (TSUM) and cycles and state (TSTATE) for target_kept.
snap() {
    snapshot >"$TESTDIR/snap.before"
    TSUM=$(sha256sum <"$STORAGE/$T/disk0.raw")
    TSTATE=$(tstate)
}
# written — what changed since the snap, as " (written: …)", or nothing.
written() {
    snapshot >"$TESTDIR/snap.after"
    diff -u "$TESTDIR/snap.before" "$TESTDIR/snap.after" >"$TESTDIR/snap.diff" &&
        return 0
    printf ' (written: %s)' "$(grep '^[-+][^-+]' "$TESTDIR/snap.diff" |
        sed "s|$TESTDIR/||" | head -n 8 | tr '\n' ' ')"
}
unchanged() {
    local w
    w=$(written)
    [ -z "$w" ] || fail "a refused request wrote something$w"
}

# The registered target VM of the upload cases: nothing staged, the disk
# and the cycles as they were at the last snap.
tstate() { vrj replica replication show target | jq -c '[.last_cycle, .applied_cycle, .state]'; }
target_kept() {
    local left
    left=$(ls -A "$STORAGE/$T/staging")
    [ -z "$left" ] || fail "left in the target's staging dir: $left"
    [ "$(sha256sum <"$STORAGE/$T/disk0.raw")" = "$TSUM" ] ||
        fail "the target's Replica disk changed"
    [ "$(tstate)" = "$TSTATE" ] ||
        fail "the target's cycles/state moved: $TSTATE -> $(tstate)"
}

# vmpeak — the replica daemon's peak virtual memory, KiB.
vmpeak() { awk '/^VmPeak:/ { print $2 }' "/proc/${DAEMON_PID[replica]}/status"; }

# conn_audited PORT TEXT — an audit event "refused connection from
# 127.0.0.1:PORT: TEXT…" since the mark (a refusal before any request).
conn_audited() {
    local want="refused connection from 127.0.0.1:$1: $2"
    if ! wait_until 5 _audited "$want"; then
        log "  audit events since the mark:"
        new_audits | sed 's/^/      /'
        fail "no audit event '$want…'"
    fi
    log "  audit: $(new_audits | grep -F -- "$want" | tail -n 1)"
}

# --- running the cases -------------------------------------------------------

declare -a FAILED=()
declare -A NSUB=()
NCASES=0
# run_case N TITLE FN [ARGS…] — run FN ARGS as case N.<next> in a subshell:
# a fail ends that case only, and the verdict lists every failed case.
# HOSTILE_CASES="N…", if set, runs only those cases (the setup always runs).
run_case() {
    local n=$1 title=$2 rc=0 id
    shift 2
    if [ -n "${HOSTILE_CASES:-}" ] && [[ " $HOSTILE_CASES " != *" $n "* ]]; then
        return 0
    fi
    NSUB[$n]=$((${NSUB[$n]:-0} + 1))
    id=$n.${NSUB[$n]}
    NCASES=$((NCASES + 1))
    log "--- case $id: $title"
    set +e
    (
        set -e
        "$@"
    )
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        log "case $id: ok"
    else
        log "case $id: FAILED"
        FAILED+=("$id $title")
    fi
}

# --- the target VM: registered, one base chunk applied ------------------------

T=$(newuuid)
reg_body target >"$TESTDIR/target.json"
register "$T" "$TESTDIR/target.json"
[ "$R1_CODE" = 200 ] || fail "registering the target vm: $R1_CODE $R1_MSG"
payload "$TESTDIR/base-ok.bin" "$T" --base --rec write:0:8192:8192:0x5a \
    --rec write:1048576:4096:4096:0xa5
upload base 1 "$TESTDIR/base-ok.bin"
[ "$R1_CODE" = 200 ] || fail "a valid base chunk: $R1_CODE $R1_MSG"
log "target vm $T registered, base chunk 1 applied; state $(tstate)"

# bad_upload KIND N FILE CODE ERR MSG [CURL-ARGS…] — the upload to the
# target is refused with HTTP CODE ERR MSG, audited, leaves the target as
# it was, and the daemon's peak virtual size grows by less than 1 GiB (a
# hostile length must not be allocated).
bad_upload() {
    local kind=$1 n=$2 f=$3 code=$4 err=$5 msg=$6 p0 p1
    shift 6
    snap
    mark
    p0=$(vmpeak)
    upload "$kind" "$n" "$f" "$@"
    p1=$(vmpeak)
    refused "$code" "$err" "$msg"
    audited "from primary.test.local"
    unchanged
    target_kept
    [ $((p1 - p0)) -lt $((1 << 20)) ] ||
        fail "the replica's peak virtual memory grew by $(((p1 - p0) >> 10)) MiB"
}

# bad_register BODY-FILE CODE ERR MSG [UUID [CURL-ARGS…]] — registering
# UUID (default: a new one) is refused with HTTP CODE ERR MSG, audited,
# and writes nothing.
bad_register() {
    local body=$1 code=$2 err=$3 msg=$4 u=${5:-$(newuuid)}
    shift 4
    [ $# -eq 0 ] || shift
    snap
    mark
    register "$u" "$body" "$@"
    refused "$code" "$err" "$msg"
    audited "from primary.test.local"
    unchanged
    target_kept
    [ "$u" = "$T" ] || [ ! -e "$STORAGE/$u" ] || fail "$STORAGE/$u exists"
}

# --- 1, 2: certificates outside their validity ----------------------------------

# bad_cert CERT WHY WHAT — a request with client certificate CERT is
# refused: HTTP 403 EACCES "client certificate refused: …WHY…" and an audit
# event naming the unauthenticated peer's address; or, should the server
# check validity during the handshake, a TLS failure audited as "refused
# connection from 127.0.0.1:PORT: TLS handshake failed: …".  WHAT: status
# (GET the target), register (a new VM), upload (a base chunk).
bad_cert() {
    local cert=$1 why=$2 what=$3
    reg_body intruder >"$TESTDIR/intruder.json"
    snap
    mark
    case $what in
    status) r1 "$cert" GET "/$T" ;;
    register)
        r1 "$cert" PUT "/$(newuuid)" -H 'Content-Type: application/json' \
            --data-binary "@$TESTDIR/intruder.json"
        ;;
    upload)
        r1 "$cert" PUT "/$T/base/2" --data-binary "@$TESTDIR/base-ok.bin" \
            -H 'Content-Type: application/octet-stream'
        ;;
    esac
    if [ "$R1_CODE" = tls ]; then
        conn_audited "$R1_PORT" "TLS handshake failed: "
    else
        refused 403 EACCES "client certificate refused: "
        grep -qiE "$why" <<<"$R1_MSG" ||
            fail "the refusal does not say why ($why): $R1_MSG"
        audited "from unauthenticated peer"
    fi
    unchanged
    target_kept
}
for what in status register upload; do
    run_case 1 "expired client certificate: $what" \
        bad_cert expired 'expired' "$what"
done
for what in status register upload; do
    run_case 2 "not-yet-valid client certificate: $what" \
        bad_cert future 'not (yet )?(valid|activated)' "$what"
done

# --- 3-7: names ----------------------------------------------------------------

# bad_name NAME [UUID] — a registration naming the VM NAME is refused with
# HTTP 400 EINVAL "register: invalid vm name".
bad_name() {
    reg_body "$1" >"$TESTDIR/name.json"
    bad_register "$TESTDIR/name.json" 400 EINVAL "register: invalid vm name" \
        "${2:-}"
}
# bad_name_json NAME-AS-JSON — the same with the name written into the JSON
# text as is (escapes such as \u0000 included).
bad_name_json() {
    printf '{"name":"%s","cpus":1,"memory_mib":128,"epoch":1,"disks":[{"id":"disk0","size":4194304}]}' \
        "$1" >"$TESTDIR/name.json"
    bad_register "$TESTDIR/name.json" 400 EINVAL "register: invalid vm name"
}
# bad_disk_id ID — a registration with disk id ID is refused with HTTP 400
# EINVAL and a message about the disk.
bad_disk_id() {
    reg_body "disk-id-$RANDOM" "$1" >"$TESTDIR/name.json"
    bad_register "$TESTDIR/name.json" 400 EINVAL "disk"
}

for n in "../../outside/evil" "../evil" ".." "a/../../../outside"; do
    run_case 3 "vm name '$n'" bad_name "$n"
done
run_case 3 "vm name '../target' for the target's own uuid" bad_name "../target" "$T"
for n in "a/b" "/etc/passwd" "x/" "$OUTSIDE/evil"; do
    run_case 4 "vm name '$n'" bad_name "$n"
done
# JSON "\u0000": a C string ends there, and what is left ("nul") is a valid
# name — the name sent is not the name a strlen() sees.
for n in 'nul1\u0000../../outside/evil' 'nul2\u0000/x' 'nul3\u0000' '\u0000'; do
    run_case 5 "vm name '$n' (JSON escape)" bad_name_json "$n"
done
run_case 6 "vm name of 4096 bytes" bad_name "$(head -c 4096 /dev/zero | tr '\0' a)"
run_case 6 "vm name of 65 bytes" bad_name "$(head -c 65 /dev/zero | tr '\0' b)"
for d in "../../outside/d" "../d" "a/b" "/tmp/d" "disk0/../../x"; do
    run_case 7 "disk id '$d'" bad_disk_id "$d"
done

# --- 8: symlinks in the storage location -----------------------------------------

# sym_register UUID [CHECK…] — registering UUID, whose storage holds a
# symlink out of it, is refused (a 4xx/5xx with a JSON error), audited, and
# writes nothing anywhere: not outside, not beneath the storage.  CHECK, if
# given, runs first, right after the request.
sym_register() {
    local u=$1
    shift
    reg_body "sym-${u:0:8}" >"$TESTDIR/sym.json"
    snap
    mark
    register "$u" "$TESTDIR/sym.json"
    [ $# -eq 0 ] || "$@"
    [[ $R1_CODE == [45][0-9][0-9] ]] && [ -n "$R1_ERR" ] ||
        fail "not refused: HTTP $R1_CODE $R1_ERR $R1_MSG; outside now holds: $(cd "$OUTSIDE" && find . -mindepth 1 | tr '\n' ' ')"
    audited "from primary.test.local"
    unchanged
    target_kept
}
sym_vm_dir() { # STORAGE/UUID is a symlink to a directory outside
    local u
    u=$(newuuid)
    mkdir -p "$OUTSIDE/a"
    ln -s "$OUTSIDE/a" "$STORAGE/$u"
    sym_register "$u"
}
sym_staging() { # STORAGE/UUID/staging -> a directory outside holding a file
    local u
    u=$(newuuid)
    mkdir -p "$OUTSIDE/b" "$STORAGE/$u"
    echo canary >"$OUTSIDE/b/keep.me"
    ln -s "$OUTSIDE/b" "$STORAGE/$u/staging"
    sym_register "$u" canary_kept
}
canary_kept() {
    [ "$(cat "$OUTSIDE/b/keep.me" 2>/dev/null)" = canary ] ||
        fail "$OUTSIDE/b/keep.me was deleted through the symlink (HTTP $R1_CODE $R1_ERR $R1_MSG)"
}
sym_disk() { # STORAGE/UUID/disk0.raw -> a file outside
    local u sum
    u=$(newuuid)
    mkdir -p "$OUTSIDE/c" "$STORAGE/$u/staging"
    head -c 65536 /dev/urandom >"$OUTSIDE/c/victim"
    sum=$(sha256sum <"$OUTSIDE/c/victim")
    ln -s "$OUTSIDE/c/victim" "$STORAGE/$u/disk0.raw"
    VICTIM_SUM=$sum sym_register "$u" victim_kept
}
victim_kept() {
    [ "$(sha256sum <"$OUTSIDE/c/victim")" = "$VICTIM_SUM" ] ||
        fail "$OUTSIDE/c/victim was written through the symlink (HTTP $R1_CODE $R1_ERR $R1_MSG)"
}
run_case 8 "STORAGE/UUID is a symlink to a directory outside" sym_vm_dir
run_case 8 "STORAGE/UUID/staging is a symlink to a directory outside" sym_staging
run_case 8 "STORAGE/UUID/disk0.raw is a symlink to a file outside" sym_disk

# --- 9: huge length and count fields (base chunks) --------------------------------

# bad_payload KIND N CODE ERR MSG PAYLOAD-ARGS… — craft a payload for the
# target with hostile-input.py, upload it as KIND/N: refused as bad_upload.
bad_payload() {
    local kind=$1 n=$2 code=$3 err=$4 msg=$5
    shift 5
    payload "$TESTDIR/p.bin" "$T" "$@"
    bad_upload "$kind" "$n" "$TESTDIR/p.bin" "$code" "$err" "$msg"
}
run_case 9 "base: record length 0xffffffff" bad_payload base 2 400 EBADMSG \
    "cycle payload: record 0: change log record: write length 4294967295 out of range" \
    --base --rec write:0:0xffffffff:65536
run_case 9 "base: record length 64 MiB + 1" bad_payload base 2 400 EBADMSG \
    "cycle payload: record 0: change log record: write length 67108865 out of range" \
    --base --rec write:0:0x4000001:4096
run_case 9 "base: header ndisks 0xffffffff" bad_payload base 2 400 EBADMSG \
    "cycle header: 4294967295 disks out of range" \
    --base --ndisks 0xffffffff --rec write:0:4096
run_case 9 "base: seal count 2^64-1" bad_payload base 2 400 EBADMSG \
    "cycle payload: seal record counts 18446744073709551615 records, payload has 1" \
    --base --rec write:0:4096 --seal 0xffffffffffffffff
run_case 9 "base: offset + length overflows" bad_payload base 2 400 EBADMSG \
    "cycle payload: record 0: change log record: offset 9223372036854775807 + length 4096 overflows" \
    --base --rec zero:0x7fffffffffffffff:4096
run_case 9 "base: a write beyond the 4 MiB disk" bad_payload base 2 400 EBADMSG \
    "cycle payload: record 0 ends at 4198400, beyond disk 0" \
    --base --rec write:4190208:8192

# --- 10: decompression bombs ------------------------------------------------------

# R1_MAX_BASE_RAW (80 MiB) caps a base chunk; the target is in initial
# replication.  272 WRITE records of 4 MiB of zeroes (1088 MiB, valid CRCs,
# each covering the whole 4 MiB disk) make about 40 KiB of zstd.  It is sent with a pause before its last byte
# so the staging directory can be watched: the test reports how much of
# it the server wrote to its temporary file before refusing it.
# paused_put PATH FILE TMPGLOB — PUT FILE (zstd) with a pause before its
# last byte, watching TMPGLOB meanwhile: sets the R1_* of the answer and
# PAUSED_PEAK, the most bytes the temporary file held.
paused_put() {
    local out
    out=$("$PY" "$HOSTILE" paused-put "$REPLICA_PORT" "$PKI" "$1" "$2" "$3" \
        X-Vmreplica-Epoch:1 Content-Encoding:zstd) || fail "paused-put: $out"
    R1_CODE=$(jq -r .code <<<"$out")
    R1_PORT=$(jq -r .local_port <<<"$out")
    R1_ERR=$(jq -r '.body | fromjson? | .error // empty' <<<"$out")
    R1_MSG=$(jq -r '.body | fromjson? | .message // empty' <<<"$out")
    R1_CURL=
    PAUSED_PEAK=$(jq -r .tmp_peak_bytes <<<"$out")
}
zstd_bomb() {
    local peak p0 p1
    "$PY" "$HOSTILE" bomb "$T" 272 4 | zstd -q -c -3 >"$TESTDIR/bomb.zst" ||
        fail "making the bomb"
    log "  bomb: $(stat -c %s "$TESTDIR/bomb.zst") bytes of zstd for 1088 MiB"
    snap
    mark
    p0=$(vmpeak)
    paused_put "/r1/vms/$T/base/2" "$TESTDIR/bomb.zst" "$STORAGE/$T/staging/*.tmp"
    p1=$(vmpeak)
    peak=$PAUSED_PEAK
    log "  PUT base/2 (zstd bomb): $R1_CODE $R1_ERR: $R1_MSG"
    log "  written to the temporary file before the refusal: $peak bytes ($((peak >> 20)) MiB); VmPeak +$(((p1 - p0) >> 10)) MiB"
    refused 413 EFBIG "cycle payload: more than 83886080 bytes uncompressed"
    [ "$peak" -le $((80 << 20)) ] ||
        fail "$peak bytes staged, more than the 80 MiB cap"
    audited "from primary.test.local"
    unchanged
    target_kept
}
# A frame whose header asks for a 1 GiB window (the decoder allows 16 MiB):
# refused before the decoder allocates it.
zstd_window() {
    payload "$TESTDIR/w.bin" "$T" --base --rec write:0:4096
    zstd -q -c --long=30 -1 <"$TESTDIR/w.bin" >"$TESTDIR/w.zst"
    bad_upload base 2 "$TESTDIR/w.zst" 400 EBADMSG \
        "cycle payload: zstd: Frame requires too much memory for decoding" \
        -H 'Content-Encoding: zstd'
}
run_case 10 "zstd bomb: 1088 MiB as a base chunk" zstd_bomb
run_case 10 "zstd frame with a 1 GiB window" zstd_window
# On a nearly full storage location (a 40 MiB tmpfs), the same bomb is cut
# before it fills the file system: what may be staged is its free space
# less a reserve, and the refusal says so (ENOSPC, audited).
SMALL=$TESTDIR/small
mkdir -p "$SMALL"
if mount -t tmpfs -o size=40m tmpfs "$SMALL"; then
    cleanup_fn umount -l "$SMALL"
fi
zstd_bomb_small() {
    local u peak avail
    mountpoint -q "$SMALL" || fail "cannot mount a tmpfs on $SMALL"
    vr replica server set --default-storage "$SMALL" >/dev/null ||
        fail "server set --default-storage (tmpfs)"
    u=$(newuuid)
    reg_body small >"$TESTDIR/small.json"
    register "$u" "$TESTDIR/small.json"
    [ "$R1_CODE" = 200 ] || fail "registering on the tmpfs: $R1_CODE $R1_MSG"
    "$PY" "$HOSTILE" bomb "$u" 272 4 | zstd -q -c -3 >"$TESTDIR/bomb2.zst" ||
        fail "making the bomb"
    avail=$(($(stat -f -c '%a*%S' "$SMALL")))
    mark
    paused_put "/r1/vms/$u/base/1" "$TESTDIR/bomb2.zst" "$SMALL/$u/staging/*.tmp"
    peak=$PAUSED_PEAK
    log "  PUT base/1 on a 40 MiB tmpfs ($avail bytes free): $R1_CODE $R1_ERR: $R1_MSG; staged at most $peak bytes"
    refused 507 ENOSPC "decompresses to more than the"
    [ "$peak" -lt "$avail" ] || fail "the bomb filled the file system ($peak of $avail bytes)"
    audited "from primary.test.local"
    [ -z "$(ls "$SMALL/$u/staging")" ] || fail "the temporary file stayed"
    vr replica server set --default-storage "$STORAGE" >/dev/null ||
        fail "server set --default-storage back"
}
run_case 10 "zstd bomb on a nearly full storage location" zstd_bomb_small

# --- 11: a JSON body over 64 KiB ---------------------------------------------------

json_big() { # [UUID]
    jq -cn --arg p "$(head -c 70000 /dev/zero | tr '\0' x)" \
        '{name: "big", cpus: 1, memory_mib: 128, epoch: 1, pad: $p,
          disks: [{id: "disk0", size: 1048576}]}' >"$TESTDIR/big.json"
    bad_register "$TESTDIR/big.json" 413 EFBIG "request body too large" "${1:-}"
}
run_case 11 "a registration of 70 KiB" json_big
run_case 11 "a registration of 70 KiB for the target's uuid" json_big "$T"

# --- 12: bad or missing X-Vmreplica-Epoch --------------------------------------------

# epoch_args VALUE — curl arguments sending X-Vmreplica-Epoch: VALUE ("none":
# no such header at all; "": the header, empty).
epoch_args() {
    case $1 in
    none) EPOCH_ARGS=(-H 'X-Vmreplica-Epoch:') ;;
    '') EPOCH_ARGS=(-H 'X-Vmreplica-Epoch;') ;;
    *) EPOCH_ARGS=(-H "X-Vmreplica-Epoch: $1") ;;
    esac
}
bad_epoch_register() {
    epoch_args "$1"
    reg_body "epoch-$RANDOM" >"$TESTDIR/ep.json"
    bad_register "$TESTDIR/ep.json" 400 EPROTO \
        "missing or bad X-Vmreplica-Epoch" "$(newuuid)" "${EPOCH_ARGS[@]}"
}
bad_epoch_upload() { # VALUE KIND N PAYLOAD-ARGS…
    local v=$1 kind=$2 n=$3
    shift 3
    epoch_args "$v"
    payload "$TESTDIR/ep.bin" "$T" "$@"
    bad_upload "$kind" "$n" "$TESTDIR/ep.bin" 400 EPROTO \
        "missing or bad X-Vmreplica-Epoch" "${EPOCH_ARGS[@]}"
}
stale_epoch_upload() { # KIND N PAYLOAD-ARGS…
    local kind=$1 n=$2
    shift 2
    payload "$TESTDIR/ep.bin" "$T" "$@"
    bad_upload "$kind" "$n" "$TESTDIR/ep.bin" 409 ESTALE \
        "replica vm target: epoch 2 refused (current 1)" \
        -H 'X-Vmreplica-Epoch: 2'
}
EPOCHS=(none "" abc 0 1x 0x1 "1 1" -1 18446744073709551616)
for v in "${EPOCHS[@]}"; do
    run_case 12 "registration, X-Vmreplica-Epoch '$v'" bad_epoch_register "$v"
    run_case 12 "base chunk, X-Vmreplica-Epoch '$v'" \
        bad_epoch_upload "$v" base 2 --base --rec write:0:4096
done
run_case 12 "base chunk, X-Vmreplica-Epoch 2 (the relationship's is 1)" \
    stale_epoch_upload base 2 --base --rec write:0:4096

# --- cycles: the same hostile fields once initial replication is complete -------

r1 primary POST "/$T/initial-complete" -H 'Content-Type: application/json' \
    --data-binary '{"base_cycle":0}'
[ "$R1_CODE" = 200 ] || fail "initial-complete: $R1_CODE $R1_MSG"
log "target: initial replication complete; state $(tstate)"

run_case 9 "cycle 1: header ndisks 0xffffffff" bad_payload cycles 1 400 EBADMSG \
    "cycle header: 4294967295 disks out of range" \
    --cycle 1 --ndisks 0xffffffff --rec write:0:4096
run_case 9 "cycle 1: record length 0xfffffff0" bad_payload cycles 1 400 EBADMSG \
    "cycle payload: record 0: change log record: write length 4294967280 out of range" \
    --cycle 1 --rec write:0:0xfffffff0:65536
run_case 9 "cycle 1: seal count 2^63" bad_payload cycles 1 400 EBADMSG \
    "cycle payload: seal record counts 9223372036854775808 records, payload has 1" \
    --cycle 1 --rec write:0:4096 --seal 0x8000000000000000
for v in none abc -1; do
    run_case 12 "cycle 1, X-Vmreplica-Epoch '$v'" \
        bad_epoch_upload "$v" cycles 1 --cycle 1 --rec write:0:4096
done
run_case 12 "cycle 1, X-Vmreplica-Epoch 2 (the relationship's is 1)" \
    stale_epoch_upload cycles 1 --cycle 1 --rec write:0:4096

# --- 13-17: need server code being written ----------------------------------------

# case_tls_old VERSION — a client offering only TLS VERSION fails its
# handshake, and the server audits "refused connection from
# 127.0.0.1:PORT: TLS handshake failed: <reason>" with a reason about the
# version (gnutls: "A packet with illegal or unsupported version was
# received.").  The same client offering TLS 1.2 succeeds, so the failure
# is the version's.
case_tls_old() {
    local out
    out=$("$PY" "$HOSTILE" tls-old "$REPLICA_PORT" "$PKI" 1.2)
    [ "$(jq -r .handshake <<<"$out")" = ok ] ||
        fail "the control, TLS 1.2 with the same client, failed: $out"
    snap
    mark
    out=$("$PY" "$HOSTILE" tls-old "$REPLICA_PORT" "$PKI" "$1")
    log "  TLS $1 offered: $out"
    [ "$(jq -r .handshake <<<"$out")" = failed ] ||
        fail "TLS $1 accepted: $out"
    # The client did offer TLS $1: it did not give up before sending.
    ! jq -r .error <<<"$out" | grep -qiE 'no protocols available|no ciphers' ||
        fail "this client cannot offer TLS $1: $out"
    conn_audited "$(jq -r .local_port <<<"$out")" "TLS handshake failed: "
    new_audits | grep -F "127.0.0.1:$(jq -r .local_port <<<"$out"): " |
        grep -qi version ||
        fail "the audit event does not say the version was refused"
    unchanged
}
case_tls10() { case_tls_old 1.0; }
case_tls11() { case_tls_old 1.1; }
case_plaintext() {
    local out
    snap
    mark
    out=$("$PY" "$HOSTILE" plaintext "$REPLICA_PORT")
    log "  plaintext HTTP: $out"
    [ "$(jq -r .closed <<<"$out")" = true ] ||
        fail "the connection stayed open: $out"
    [ "$(jq -r .http_answer <<<"$out")" = false ] ||
        fail "the TLS port answered plaintext HTTP: $out"
    conn_audited "$(jq -r .local_port <<<"$out")" "TLS handshake failed: "
    unchanged
}
case_slowloris() {
    local out t
    snap
    mark
    out=$("$PY" "$HOSTILE" slowloris "$REPLICA_PORT" "$PKI" "$T" 10)
    log "  one header byte a second: $out"
    t=$(jq -r .closed_after_s <<<"$out")
    [ "$t" != null ] || fail "the server kept a slow client for 10 s: $out"
    awk -v t="$t" 'BEGIN { exit !(t >= 2.5 && t <= 7) }' ||
        fail "closed after ${t}s, want about 3 s"
    conn_audited "$(jq -r .local_port <<<"$out")" "no complete request within 3 s"
    unchanged
}
case_flood() {
    local out
    snap
    mark
    out=$("$PY" "$HOSTILE" flood "$REPLICA_PORT" "$PKI" 4)
    log "  4 connections held, a 5th: $out"
    [ "$(jq -r .held_still_open <<<"$out")" = 4 ] ||
        fail "the server closed held connections: $out"
    case $(jq -r .extra <<<"$out") in
    refused | "closed after handshake") ;;
    *) fail "the 5th connection was served: $out" ;;
    esac
    awk -v t="$(jq -r .seconds <<<"$out")" 'BEGIN { exit !(t < 2) }' ||
        fail "the 5th connection was not closed at once: $out"
    conn_audited "$(jq -r .local_port <<<"$out")" "too many connections (4)"
    unchanged
    # Once they are closed, the server takes connections again.
    sleep 0.5
    r1 primary GET "/$(newuuid)"
    [ "$R1_CODE" = 404 ] || fail "after the flood: HTTP $R1_CODE $R1_MSG"
}

if [ -z "${HOSTILE_CASES:-}" ] || [[ " $HOSTILE_CASES " =~ \ 1[3-7]\  ]]; then
    log "restarting the replica with an idle timeout of 3 s and at most 4 connections"
    REPLICA_ENV=(VMREPLICA_TEST_IDLE_TIMEOUT=3 VMREPLICA_TEST_MAX_CONNECTIONS=4)
    stop_daemon replica
    start_replica "${REPLICA_ENV[@]}"
    wait_until 10 port_open "$REPLICA_PORT" ||
        fail "replica: certificate port not listening after the restart"
    sleep 0.5 # the probe's own connection is gone
    run_case 13 "TLS 1.0 offered" case_tls10
    run_case 14 "TLS 1.1 offered" case_tls11
    run_case 15 "plaintext HTTP on the TLS port" case_plaintext
    run_case 17 "more connections than the cap" case_flood
    run_case 16 "slowloris" case_slowloris
fi

# --- verdict ---------------------------------------------------------------------

# The replica is still answering the target's primary.
r1 primary GET "/$T"
[ "$R1_CODE" = 200 ] || fail "the target's status after the attacks: $R1_CODE $R1_MSG"

if [ "${#FAILED[@]}" -gt 0 ]; then
    for c in "${FAILED[@]}"; do
        printf '[%s]   failed: case %s\n' "$TESTNAME" "$c" >&2
    done
    fail "${#FAILED[@]} of $NCASES cases failed (${SECONDS}s)"
fi
log "PASS: $NCASES cases (${SECONDS}s)"
