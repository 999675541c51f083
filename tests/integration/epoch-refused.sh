#!/bin/bash
# epoch-refused: the Replica server refuses cycles it must not stage.
#
# A VM replicates (certificate authentication, every second); replication is
# then suspended on the primary so that nothing else arrives, and requests
# are sent to the replica's certificate port with curl and the GOOD primary
# certificate (so they pass TLS and identify as primary.test.local):
#   1. PUT cycles/<staged+1> with X-Vmreplica-Epoch: 2 (the relationship's
#      epoch is 1) -> 409 ESTALE, an audit event naming the primary and
#      saying "epoch";
#   2. the same without X-Vmreplica-Epoch -> 4xx EPROTO;
#   3. PUT cycles/<staged+5> (right epoch, a payload with a valid-looking
#      header) -> 400/409 EPROTO "out of order";
#   4. PUT cycles/<staged+1> (right epoch) with garbage: random bytes, then
#      a correct cycle header (CRC-32C and all) followed by random bytes,
#      and the header alone -> refused with a 4xx (a malformed payload is the
#      client's fault, not the server's) and EBADMSG or EPROTO.
# After each, nothing is left in the VM's staging directory on the replica
# (STORAGE/<uuid>/staging), and the replica's staged and applied cycles have
# not moved.  Then replication is resumed and must converge (cmp), with both
# sides still in state Replicating.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp numfmt
requires_build

setup_pair

vm=epoch1
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 1M' -c 'write -P 0x22 40M 256k' \
    >/dev/null
log "enable replication every second and run initial replication"
enable_replication "$vm" --frequency 1s
UUID=$(jget primary .uuid vm show "$vm")
STAGING=$TESTDIR/replica-storage/$UUID/staging
[ -d "$STAGING" ] || fail "no staging directory $STAGING on the replica"
epoch=$(repl replica "$vm" epoch)
[ "$epoch" = 1 ] || fail "replica: relationship epoch is '$epoch', expected 1"

log "a few cycles with writes, then suspend replication on the primary"
start_writer "$vm" 64k
sleep 3
stop_writer
wait_converged "$vm" 60
vr primary replication suspend "$vm" >/dev/null ||
    fail "primary: replication suspend"

# Once suspended, the shipper finishes the cycle it may be sending; wait
# until the replica has applied everything it staged and stays put.
_settled() {
    local s a
    s=$(repl replica "$vm" last_cycle) a=$(repl replica "$vm" applied_cycle)
    [ "$s" = "$a" ] && [ -z "$(ls -A "$STAGING")" ] || return 1
    sleep 1.5
    [ "$(repl replica "$vm" last_cycle)" = "$s" ] &&
        [ "$(repl replica "$vm" applied_cycle)" = "$a" ]
}
wait_until 30 _settled || fail "replica did not settle after the suspend"
STAGED=$(repl replica "$vm" last_cycle)
APPLIED=$(repl replica "$vm" applied_cycle)
log "replica settled: staged $STAGED, applied $APPLIED, staging dir empty"

# --- bodies ---------------------------------------------------------------
head -c 65536 /dev/urandom >"$TESTDIR/random.bin"
# cycle_body FILE CYCLE EPOCH — a 64-byte cycle header as docs/formats.md
# §2 describes it (magic, version 1, flags 0, cycle, epoch, 1 disk, uuid,
# correct CRC-32C) followed by 64 KiB of random bytes.
cycle_body() {
    python3 - "$1" "$2" "$3" "$UUID" "$TESTDIR/random.bin" <<'PY'
import struct, sys, uuid
path, cycle, epoch, u, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF
h = struct.pack("<8sIIQQII16sI", b"VRCYCLE1", 1, 0, cycle, epoch, 1, 0,
                uuid.UUID(u).bytes, 0)
assert len(h) == 60
h += struct.pack("<I", crc32c(h))
with open(path, "wb") as f:
    f.write(h + open(rnd, "rb").read())
PY
}
cycle_body "$TESTDIR/epoch2.bin" $((STAGED + 1)) 2
cycle_body "$TESTDIR/ahead.bin" $((STAGED + 5)) 1
cycle_body "$TESTDIR/next.bin" $((STAGED + 1)) 1

# r1_put N EPOCH|- BODYFILE — PUT /r1/vms/UUID/cycles/N with the good primary
# certificate; "-" sends no X-Vmreplica-Epoch.  Sets R1_CODE and R1_ERR
# (the "error" member of the JSON answer) and R1_MSG.
r1_put() {
    local n=$1 ep=$2 body=$3 hdr=()
    [ "$ep" = - ] || hdr=(-H "X-Vmreplica-Epoch: $ep")
    R1_CODE=$(curl -sS --max-time 30 -o "$TESTDIR/r1.out" -w '%{http_code}' \
        --resolve "replica.test.local:$REPLICA_PORT:127.0.0.1" \
        --cacert "$PKI/ca.pem" --cert "$PKI/primary.pem" \
        --key "$PKI/primary.key" -X PUT -H 'Expect:' \
        -H 'Content-Type: application/octet-stream' ${hdr[@]+"${hdr[@]}"} \
        --data-binary "@$body" \
        "https://replica.test.local:$REPLICA_PORT/r1/vms/$UUID/cycles/$n" \
        2>"$TESTDIR/r1.err") || R1_CODE=curl-failed
    R1_ERR=$(jq -r '.error // empty' "$TESTDIR/r1.out" 2>/dev/null || true)
    R1_MSG=$(jq -r '.message // empty' "$TESTDIR/r1.out" 2>/dev/null || true)
}

# nothing_staged LABEL — the staging dir is empty (a refused upload may
# have had a temporary file for a moment: give the server 5 s to remove
# it) and the replica's cycles have not moved.
nothing_staged() {
    local label=$1 s a
    if ! wait_until 5 eval 'test -z "$(ls -A "$STAGING")"'; then
        ls -la "$STAGING" >&2
        fail "$label: files left in the replica's staging dir $STAGING"
    fi
    for f in "$STAGING"/*; do
        [ -e "$f" ] || continue
        fail "$label: $f in staging"
    done
    s=$(repl replica "$vm" last_cycle) a=$(repl replica "$vm" applied_cycle)
    [ "$s" = "$STAGED" ] ||
        fail "$label: the replica's staged cycle moved from $STAGED to $s"
    [ "$a" = "$APPLIED" ] ||
        fail "$label: the replica's applied cycle moved from $APPLIED to $a"
    [ "$(repl replica "$vm" state)" = Replicating ] ||
        fail "$label: replica state is $(repl replica "$vm" state)"
}

audit_count() {
    vrj replica events | jq '[.events[] | select(.level == "audit")] | length'
}

# --- 1. stale epoch ---------------------------------------------------------
a0=$(audit_count)
r1_put $((STAGED + 1)) 2 "$TESTDIR/epoch2.bin"
log "epoch 2 for cycle $((STAGED + 1)): HTTP $R1_CODE $R1_ERR ($R1_MSG)"
[ "$R1_CODE" = 409 ] || fail "stale epoch: HTTP $R1_CODE, want 409 ($(cat "$TESTDIR/r1.out" "$TESTDIR/r1.err"))"
[ "$R1_ERR" = ESTALE ] || fail "stale epoch: error '$R1_ERR', want ESTALE"
grep -q '"error" *: *"ESTALE"' "$TESTDIR/r1.out" ||
    fail "stale epoch: answer lacks \"error\":\"ESTALE\": $(cat "$TESTDIR/r1.out")"
nothing_staged "stale epoch"
# The audit event: names the primary and says epoch.
_audit_epoch() {
    vrj replica events | jq -e --argjson n "$a0" '
        [.events[] | select(.level == "audit")] | .[$n:] |
        map(select((.message | test("primary\\.test\\.local")) and
                   (.message | test("epoch"; "i")))) | length > 0' >/dev/null
}
wait_until 5 _audit_epoch || {
    vrj replica events | jq -r '.events[] | "\(.level) \(.message)"' | tail -n 5 >&2
    fail "stale epoch: no audit event naming primary.test.local and the epoch"
}
log "stale epoch refused: $(vrj replica events | jq -r '[.events[] | select(.level == "audit")] | last | .message')"

# --- 2. no epoch header -----------------------------------------------------
r1_put $((STAGED + 1)) - "$TESTDIR/next.bin"
log "no X-Vmreplica-Epoch: HTTP $R1_CODE $R1_ERR ($R1_MSG)"
[[ $R1_CODE == 4[0-9][0-9] ]] || fail "no epoch header: HTTP $R1_CODE, want 4xx"
[ "$R1_ERR" = EPROTO ] || fail "no epoch header: error '$R1_ERR', want EPROTO"
nothing_staged "no epoch header"

# --- 3. a cycle far ahead ---------------------------------------------------
r1_put $((STAGED + 5)) 1 "$TESTDIR/ahead.bin"
log "cycle $((STAGED + 5)) (expected $((STAGED + 1))): HTTP $R1_CODE $R1_ERR ($R1_MSG)"
[ "$R1_CODE" = 409 ] || [ "$R1_CODE" = 400 ] ||
    fail "cycle out of order: HTTP $R1_CODE, want 409 or 400"
[ "$R1_ERR" = EPROTO ] || fail "cycle out of order: error '$R1_ERR', want EPROTO"
[[ $R1_MSG == *"out of order"* ]] ||
    fail "cycle out of order: message '$R1_MSG' does not say out of order"
nothing_staged "cycle out of order"

# --- 4. garbage for the right next cycle ------------------------------------
for body in random next; do
    r1_put $((STAGED + 1)) 1 "$TESTDIR/$body.bin"
    log "garbage ($body) as cycle $((STAGED + 1)): HTTP $R1_CODE $R1_ERR ($R1_MSG)"
    [[ $R1_CODE == 4[0-9][0-9] ]] || fail "garbage ($body): HTTP $R1_CODE, want 4xx"
    case $R1_ERR in
    EBADMSG | EPROTO) ;;
    *) fail "garbage ($body): error '$R1_ERR', want EBADMSG or EPROTO" ;;
    esac
    nothing_staged "garbage ($body)"
done

# A truncated but otherwise well-formed start: the header alone.
head -c 64 "$TESTDIR/next.bin" >"$TESTDIR/hdronly.bin"
r1_put $((STAGED + 1)) 1 "$TESTDIR/hdronly.bin"
log "header only as cycle $((STAGED + 1)): HTTP $R1_CODE $R1_ERR ($R1_MSG)"
[[ $R1_CODE == 4[0-9][0-9] ]] || fail "header only: HTTP $R1_CODE, want 4xx"
nothing_staged "header only"

# --- replication still works -------------------------------------------------
pstate=$(repl primary "$vm" state)
[ "$pstate" = Suspended ] || fail "primary state changed to $pstate by the probes"
log "resume replication; it must converge"
vr primary replication resume "$vm" >/dev/null || fail "primary: replication resume"
start_writer "$vm" 64k
qemu-io -f raw "$uri" -c 'write -P 0x5a 8M 1M' -c 'write -z 40M 64k' \
    -c 'discard 0 64k' >/dev/null
sleep 3
stop_writer
wait_converged "$vm" 60
assert_identical "$vm"
assert_replicating "$vm"
errs=$(jget primary .replication_errors replication measure "$vm")
[ "$errs" = 0 ] || fail "primary counted $errs replication errors"
log "PASS (${SECONDS}s)"
