#!/bin/bash
# replica-limits: one authenticated primary cannot exhaust the Replica
# server (issue #9, defect 6; SPEC §6 "every length read from the network
# … is bounded").  Requests go straight to the certificate port with the
# primary's certificate (curl, and hostile-input.py for held or many
# concurrent uploads).  Each refusal is asserted exactly (HTTP code, error
# name, message), with its audit event naming the peer and its port, and
# that it wrote nothing.
#
#   1  out-of-range numbers: frequency, compression, reverse_of, a cycle
#      number over 2^63 - 1, an epoch over 2^63 - 1, a base_cycle that is
#      not an integer -> 400, nothing created
#   2  free space is reserved across concurrent uploads: on a 100 MiB
#      tmpfs, a base chunk of 40 MiB (claiming 80: staged, then applied)
#      is held after its first MiB; a second one is refused (507 ENOSPC)
#      while the first then completes
#   3  memory is bounded per server: with a 160 MiB budget, six concurrent
#      uploads each decompressing to a 48 MiB record (a 64 MiB buffer
#      each) are partly refused (503 EAGAIN, Retry-After) and the daemon's
#      peak RSS (VmHWM) grows by less than the budget + 64 MiB
#   4  VMs per authorization entry: --max-vms N with N Replica VMs there,
#      a new one is refused (403 EPERM); registering an existing one again
#      is not, nor a new one once the cap is raised
source "$(dirname "$0")/functions.sh"
requires curl jq openssl python3 zstd sha256sum find mount umount
requires_build
[ "$(id -u)" = 0 ] || skip "needs root to mount a small tmpfs"

HOSTILE=$SOURCE_DIR/tests/integration/hostile-input.py
PY=$(python3 -c 'import sys; print(sys.executable)')
setup_pair
STORAGE=$TESTDIR/replica-storage
mkdir -p "$TESTDIR/small"
R1=https://replica.test.local:$REPLICA_PORT/r1/vms

# r1 METHOD PATH [CURL-ARGS…] — one request with the primary's certificate
# (X-Vmreplica-Epoch: 1 unless given).  Sets CODE ERR MSG PORT HDRS.
r1() {
    local method=$1 path=$2 out
    shift 2
    local args=(-sS --max-time 60 -o "$TESTDIR/r1.out" -D "$TESTDIR/r1.hdr"
        -w '%{http_code} %{local_port}' -X "$method" -H 'Expect:'
        --resolve "replica.test.local:$REPLICA_PORT:127.0.0.1"
        --cacert "$PKI/ca.pem" --cert "$PKI/primary.pem" --key "$PKI/primary.key")
    [[ " $* " == *"X-Vmreplica-Epoch"* ]] || args+=(-H 'X-Vmreplica-Epoch: 1')
    out=$(curl "${args[@]}" "$@" "$R1$path") || fail "curl $method $path"
    set_answer "${out%% *}" "${out##* }" "$(cat "$TESTDIR/r1.out")"
    log "  $method $path: $CODE $ERR: $MSG"
}
# set_answer CODE PORT BODY — CODE PORT ERR MSG from an answer.
set_answer() {
    CODE=$1
    PORT=$2
    ERR=$(jq -r '.error // empty' <<<"$3" 2>/dev/null || true)
    MSG=$(jq -r '.message // empty' <<<"$3" 2>/dev/null || true)
}
newuuid() { cat /proc/sys/kernel/random/uuid; }
# register UUID NAME [SIZE [EXTRA-JSON]] — PUT /r1/vms/UUID, one disk.
register() {
    jq -cn --arg n "$2" --argjson s "${3:-4194304}" --argjson x "${4:-{\}}" \
        '{name: $n, cpus: 1, memory_mib: 128, frequency: 30,
          disks: [{id: "disk0", size: $s}]} + $x' >"$TESTDIR/reg.json"
    r1 PUT "/$1" -H 'Content-Type: application/json' \
        --data-binary "@$TESTDIR/reg.json"
}

nevents() { vrj replica events | jq '.events | length'; }
mark() {
    EV0=$(nevents)
    find "$STORAGE" "$TESTDIR/small" -printf '%y %p %s\n' 2>/dev/null |
        sort >"$TESTDIR/files.before"
    vrj replica vm list | jq -r '.vms[].uuid' | sort >"$TESTDIR/vms.before"
}
# refused CODE ERR MSG-REGEX — the answer, its audit event (naming the
# peer and its port, with the same message), and nothing written.
refused() {
    local want
    [ "$CODE" = "$1" ] && [ "$ERR" = "$2" ] && [[ $MSG =~ ^$3$ ]] ||
        fail "want HTTP $1 $2 '$3', got $CODE $ERR '$MSG'"
    want="refused request from primary.test.local (127.0.0.1:$PORT): $MSG"
    wait_until 2 eval 'vrj replica events | jq -r --argjson n "$EV0" ".events[\$n:][] | select(.level == \"audit\") | .message" | grep -qxF -- "$want"' ||
        fail "no audit event '$want'"
    find "$STORAGE" "$TESTDIR/small" -printf '%y %p %s\n' 2>/dev/null |
        sort >"$TESTDIR/files.after"
    diff -u "$TESTDIR/files.before" "$TESTDIR/files.after" ||
        fail "a refused request wrote something"
    vrj replica vm list | jq -r '.vms[].uuid' | sort | cmp -s - "$TESTDIR/vms.before" ||
        fail "a refused request changed the Replica VMs"
    log "  audit: $want"
}

# --- 1: numbers out of range ---------------------------------------------------

bad_reg() { # EXTRA-JSON MSG
    mark
    register "$(newuuid)" num 4194304 "$1"
    refused 400 EINVAL "$2"
}
log "1: numbers out of range"
bad_reg '{"frequency": 1000000000000}' 'register: frequency: must be 1 s \.\. 24 h \(1\.\.86400 seconds\)'
bad_reg '{"frequency": 0}' 'register: frequency: must be 1 s \.\. 24 h \(1\.\.86400 seconds\)'
bad_reg '{"frequency": "30"}' 'register: frequency: must be 1 s \.\. 24 h \(1\.\.86400 seconds\)'
bad_reg '{"compression": "yes"}' 'register: compression: must be true or false'
bad_reg '{"reverse_of": -1}' 'register: reverse_of: must be a cycle number >= 1'
bad_reg '{"cpus": 1e9}' 'register: bad cpus or memory'
bad_reg '{"disks": [{"id": "disk0", "size": 2251799813685248}]}' 'register: disk 0: bad size'
T=$(newuuid)
register "$T" target
[ "$CODE" = 200 ] || fail "registering the target: $CODE $MSG"
mark
r1 PUT "/$T/base/9223372036854775808" --data-binary x
refused 400 EINVAL 'bad number in url'
mark
r1 PUT "/$T/base/1" -H 'X-Vmreplica-Epoch: 9223372036854775808' --data-binary x
refused 400 EPROTO 'missing or bad X-Vmreplica-Epoch'
mark
r1 POST "/$T/initial-complete" -H 'Content-Type: application/json' \
    --data-binary '{"base_cycle": "1"}'
refused 400 EINVAL 'initial-complete: base_cycle missing or out of range'
mark
r1 POST "/$T/initial-complete" -H 'Content-Type: application/json' \
    --data-binary '{"base_cycle": 1, "first_point": "2"}'
refused 400 EINVAL 'initial-complete: first_point is not a cycle number'
mark
r1 POST "/$T/initial-complete" -H 'Content-Type: application/json' \
    --data-binary '{"base_cycle": 5, "first_point": 5}'
refused 400 EINVAL 'initial-complete: first_point 5 is not after base_cycle 5 \(or too far\)'

# --- 2: space reserved across concurrent uploads --------------------------------

log "2: two 40 MiB base chunks on a 100 MiB tmpfs"
mkdir -p "$TESTDIR/small"
mount -t tmpfs -o size=100m tmpfs "$TESTDIR/small" || skip "cannot mount a tmpfs"
cleanup_fn umount -l "$TESTDIR/small"
vr replica server set --default-storage "$TESTDIR/small" >/dev/null ||
    fail "server set --default-storage (tmpfs)"
A=$(newuuid)
C=$(newuuid)
register "$A" space-a $((64 << 20))
[ "$CODE" = 200 ] || fail "register space-a: $CODE $MSG"
register "$C" space-c $((64 << 20))
[ "$CODE" = 200 ] || fail "register space-c: $CODE $MSG"
"$PY" "$HOSTILE" bomb "$A" 1 40 >"$TESTDIR/a.bin" || fail "payload a"
"$PY" "$HOSTILE" bomb "$C" 1 40 >"$TESTDIR/c.bin" || fail "payload c"
CSUM=$(sha256sum <"$TESTDIR/small/$C/disk0.raw")
"$PY" "$HOSTILE" hold-put "$REPLICA_PORT" "$PKI" "/r1/vms/$A/base/1" \
    "$TESTDIR/a.bin" $((1 << 20)) "$TESTDIR/gate-a" X-Vmreplica-Epoch:1 \
    >"$TESTDIR/a.out" &
HOLD_PID=$!
_bg_pids+=("$HOLD_PID")
a_staging() { # the held upload has staged its first MiB
    local f
    f=$(find "$TESTDIR/small/$A/staging" -name '*.tmp' -size +1000k 2>/dev/null)
    [ -n "$f" ]
}
wait_until 20 a_staging || fail "the first upload did not start staging"
mark
r1 PUT "/$C/base/1" -H 'Content-Type: application/octet-stream' \
    --data-binary "@$TESTDIR/c.bin"
refused 507 ENOSPC "replica storage: the payload needs $((2 * $(stat -c %s "$TESTDIR/c.bin"))) bytes, more than the [0-9]+ bytes its file system can take now \(free space less a reserve and what uploads in progress hold\)"
[ -z "$(ls -A "$TESTDIR/small/$C/staging")" ] || fail "the refused upload left a file"
[ "$(sha256sum <"$TESTDIR/small/$C/disk0.raw")" = "$CSUM" ] || fail "space-c's disk changed"
touch "$TESTDIR/gate-a"
wait "$HOLD_PID" || fail "hold-put"
a=$(cat "$TESTDIR/a.out")
[ "$(jq -r .code <<<"$a")" = 200 ] || fail "the first upload did not complete: $a"
log "  the held upload completed: $(jq -r .body <<<"$a")"
vr replica server set --default-storage "$STORAGE" >/dev/null ||
    fail "server set --default-storage back"

# --- 3: memory bounded per server -----------------------------------------------

log "3: six concurrent uploads of a 48 MiB record, 160 MiB budget"
REPLICA_ENV=(VMREPLICA_TEST_MEM_BUDGET_MIB=160)
stop_daemon replica
start_replica "${REPLICA_ENV[@]}"
wait_until 10 port_open "$REPLICA_PORT" || fail "replica port after restart"
args=()
declare -a MU=()
for i in 1 2 3 4 5 6; do
    u=$(newuuid)
    MU+=("$u")
    register "$u" mem-$i $((64 << 20))
    [ "$CODE" = 200 ] || fail "register mem-$i: $CODE $MSG"
    "$PY" "$HOSTILE" bomb "$u" 1 48 | zstd -q -c -3 >"$TESTDIR/m$i.zst" ||
        fail "payload m$i"
    args+=("/r1/vms/$u/base/1" "$TESTDIR/m$i.zst")
done
hwm() { awk '/^VmHWM:/ { print $2 }' "/proc/${DAEMON_PID[replica]}/status"; }
h0=$(hwm)
EV0=$(nevents)
out=$("$PY" "$HOSTILE" many-put "$REPLICA_PORT" "$PKI" 3 "${args[@]}" -- \
    X-Vmreplica-Epoch:1 Content-Encoding:zstd) || fail "many-put: $out"
h1=$(hwm)
log "  answers: $(jq -c '[.[].code]' <<<"$out"); VmHWM $((h0 >> 10)) -> $((h1 >> 10)) MiB"
[ $((h1 - h0)) -lt $(((160 + 64) << 10)) ] ||
    fail "the replica's peak RSS grew by $(((h1 - h0) >> 10)) MiB with a 160 MiB budget"
nok=$(jq '[.[] | select(.code == 200)] | length' <<<"$out")
[ "$nok" -ge 1 ] || fail "no upload was accepted: $out"
n=$(jq length <<<"$out")
for ((i = 0; i < n; i++)); do
    [ "$(jq -r ".[$i].code" <<<"$out")" = 503 ] || continue
    set_answer 503 "$(jq -r ".[$i].local_port" <<<"$out")" "$(jq -r ".[$i].body" <<<"$out")"
    [ "$(jq -r ".[$i].retry_after" <<<"$out")" = 5 ] ||
        fail "refusal $i: no 'Retry-After: 5'"
    [ "$ERR" = EAGAIN ] &&
        [ "$MSG" = "replica server: its memory budget for requests (160 MiB) is in use by other transfers; try again later" ] ||
        fail "refusal $i: $ERR '$MSG'"
    want="refused request from primary.test.local (127.0.0.1:$PORT): $MSG"
    vrj replica events | jq -r --argjson n "$EV0" '.events[$n:][] | select(.level == "audit") | .message' |
        grep -qxF -- "$want" || fail "no audit event '$want'"
    [ -z "$(ls -A "$STORAGE/${MU[$i]}/staging")" ] || fail "refused upload $i left a file"
    [ "$(stat -c %b "$STORAGE/${MU[$i]}/disk0.raw")" = 0 ] || fail "refused upload $i wrote its disk"
    NREF=$((${NREF:-0} + 1))
done
[ "${NREF:-0}" -ge 1 ] || fail "no upload was refused with 503 EAGAIN: $(jq -c '[.[].code]' <<<"$out")"
log "  $nok accepted, $NREF refused (503 EAGAIN, audited, nothing staged)"

# --- 4: Replica VMs per authorization entry ----------------------------------------

log "4: --max-vms"
vr replica auth-entry add --primary primary.test.local --storage "$STORAGE" \
    --max-vms 10 >/dev/null || fail "auth-entry add --max-vms"
[ "$(vrj replica auth-entry list | jq -r '.entries[0].max_vms')" = 10 ] ||
    fail "auth-entry list: $(vrj replica auth-entry list)"
have=$(vrj replica vm list | jq '[.vms[] | select(.mode == "replica")] | length')
vr replica auth-entry set primary.test.local --max-vms "$have" >/dev/null ||
    fail "auth-entry set --max-vms"
mark
register "$(newuuid)" one-too-many
refused 403 EPERM "register: primary.test.local may not create another Replica VM here: authorization entry primary.test.local allows $have \(max-vms\), and $have exist"
register "$T" target
[ "$CODE" = 200 ] || fail "registering an existing VM again under the cap: $CODE $MSG"
vr replica auth-entry set primary.test.local --max-vms $((have + 1)) >/dev/null ||
    fail "auth-entry set --max-vms +1"
register "$(newuuid)" one-more
[ "$CODE" = 200 ] || fail "one more VM under the raised cap: $CODE $MSG"
log "PASS"
