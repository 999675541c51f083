#!/bin/bash
# kerberos: replication in Kerberos mode, and the refusals it must make.
#
# A private MIT realm on loopback (krb_realm: a KDC of its own, keytabs, no
# /etc change).  The Replica server listens with Kerberos only; the primary
# authenticates as host/primary.test.local from its keytab.
#  1. A VM replicates end to end over Kerberos (HTTP, every request signed:
#     a GSS MIC over its digest); the replica is byte-identical.
#  2. With --kerberos-encrypt on, the same with the data wrapped: a marker
#     written by the guest crosses the wire in the clear without encryption
#     (seen in a capture by a socat relay) and never with it.
#     Unsigned answers from a forger on the path ("403 EPERM", "200 OK",
#     "201", a 200 with a wrong MIC) are not trusted: the primary stays
#     Replicating, retries, and catches up byte for byte once the path is
#     clean.
#  3. Refusals, each with its exact error, an audit event naming the peer,
#     and nothing written under the storage location: no ticket; a host no
#     entry admits (host/rogue); the wildcard edge cases of SPEC §6 against
#     '*.test.local' (test.local, a.b.test.local, badtest.local,
#     test.local.evil.net, with one.test.local admitted); a user principal (alice); a stock SPNEGO
#     client (curl --negotiate); a replayed
#     request; a body changed after it was signed; no MIC; a Replica server
#     whose clock is 10 min ahead and one 10 min behind (faketime); a server
#     that requires encryption and a primary that does not encrypt.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl nbdkit python3 cmp socat kinit
requires_build
KRBTOKEN=$BUILD_DIR/tests/tools/krbtoken
[ -x "$KRBTOKEN" ] || skip "krbtoken not built"

setup_krb_pair

audits() { vrj replica events | jq '[.events[] | select(.level == "audit")] | length'; }
last_audit() { vrj replica events | jq -r '[.events[] | select(.level == "audit")][-1].message'; }

# --- 1. replication end to end ------------------------------------------
# Through a relay that records what the primary sends (socat -r).
RELAY_PORT=$(free_port)
relay_start() {
    socat -r "$TESTDIR/wire.bin" "TCP-LISTEN:$RELAY_PORT,bind=127.0.0.1,fork,reuseaddr" \
        "TCP:127.0.0.1:$KRB_PORT" 2>>"$TESTDIR/socat.log" &
    RELAY_PID=$!
    _bg_pids+=("$RELAY_PID")
    wait_until 10 port_open "$RELAY_PORT" || fail "relay not listening"
}
relay_start

# marker TEXT FILE — 1 MiB of TEXT repeated.
marker() {
    python3 -c 'import sys; t = sys.argv[1].encode(); n = 1 << 20
sys.stdout.buffer.write((t * (n // len(t) + 1))[:n])' "$1" >"$2"
}

krb_enable() { # VM [options…]
    local vm=$1
    shift
    vr primary replication enable "$vm" \
        --replica-server "replica.test.local:$RELAY_PORT" \
        --connect-address 127.0.0.1 --auth kerberos --frequency 1s \
        --compression off "$@" >/dev/null ||
        fail "primary: replication enable $vm (kerberos)"
    vr primary initial-replication start "$vm" --wait >/dev/null ||
        fail "primary: initial-replication start $vm"
}

log "plain: a VM replicates over Kerberos"
create_vm kplain 32M
uri=$(nbd_uri primary kplain)
qemu-io -f raw "$uri" -c 'write -P 0x11 0 1M' >/dev/null
krb_enable kplain
marker "PLAINTEXT-MARKER-kplain-" "$TESTDIR/m1"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/m1 4M 1M" -c 'write -P 0x5a 9M 64k' \
    -c 'write -z 10M 64k' -c 'discard 0 4k' >/dev/null
start_writer kplain 64k
sleep 3
stop_writer
wait_converged kplain 60
assert_identical kplain
[ "$(repl replica kplain auth)" = kerberos ] || fail "replica side: auth is not kerberos"
[ "$(repl replica kplain primary_server)" = primary.test.local ] ||
    fail "replica side: primary is '$(repl replica kplain primary_server)'"
[ "$(repl primary kplain state)" = Replicating ] || fail "primary not Replicating"
grep -aq "PLAINTEXT-MARKER-kplain-" "$TESTDIR/wire.bin" ||
    fail "the relay's capture does not hold the unencrypted marker (capture broken?)"
grep -aq "Authorization: Negotiate " "$TESTDIR/wire.bin" ||
    fail "no Negotiate header on the wire"
grep -aq "X-Vmreplica-MIC: " "$TESTDIR/wire.bin" || fail "no MIC on the wire"

log "encrypted: --kerberos-encrypt on wraps the data"
create_vm ksecret 32M
uri=$(nbd_uri primary ksecret)
marker "SECRET-MARKER-ksecret-" "$TESTDIR/m2"
qemu-io -f raw "$uri" -c "write -s $TESTDIR/m2 0 1M" >/dev/null
krb_enable ksecret --kerberos-encrypt on
qemu-io -f raw "$uri" -c "write -s $TESTDIR/m2 8M 1M" -c 'write -P 0x77 20M 128k' >/dev/null
start_writer ksecret 64k
sleep 3
stop_writer
wait_converged ksecret 60
assert_identical ksecret
[ "$(repl replica ksecret kerberos_encrypt)" = true ] || fail "replica: not recorded as encrypted"
if grep -aq "SECRET-MARKER-ksecret-" "$TESTDIR/wire.bin"; then
    fail "the encrypted VM's data crossed the wire in the clear"
fi
grep -aq "X-Vmreplica-Wrap: gss-v1" "$TESTDIR/wire.bin" || fail "no wrapped request seen"
log "replicated in both modes; the marker of the encrypted VM never crossed the wire"

# Kerberos mode is plain HTTP: anyone on the path can answer.  Only
# HTTP/replica can sign an answer, so an answer without its signature —
# a refusal ("403 EPERM"), a success ("200 OK", "201 Created"), or a
# success whose MIC is not HTTP/replica's — must delay replication, never
# stop it.  The relay is replaced by a forger answering each in turn.
forger_start() { # MODE: 403, 200, 201 or 200-badmic
    python3 -c 'import http.server, sys
mode = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n: self.rfile.read(n)
        if mode == "403":
            code, b = 403, b"{\"error\":\"EPERM\",\"message\":\"forged refusal\"}\n"
        else:
            code, b = int(mode[:3]), b"{}\n"
        self.send_response(code); self.send_header("Content-Length", str(len(b)))
        if mode.endswith("badmic"):
            # A well-formed token that is not a MIC of this answer.
            self.send_header("X-Vmreplica-MIC", "BAQE/wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        self.end_headers(); self.wfile.write(b)
    do_GET = do_PUT = do_POST = do_DELETE = answer
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()' "$RELAY_PORT" "$1" &
    FORGER_PID=$!
    _bg_pids+=("$FORGER_PID")
    wait_until 10 port_open "$RELAY_PORT" || fail "forger not listening"
}
repl_errors() { vrj primary replication measure kplain | jq -r .replication_errors; }
kill "$RELAY_PID" 2>/dev/null; wait "$RELAY_PID" 2>/dev/null || true
byte=0x61
for mode in 403 200 201 200-badmic; do
    forger_start "$mode"
    qemu-io -f raw "$(nbd_uri primary kplain)" -c "write -P $byte 14M 64k" >/dev/null
    byte=$((byte + 1))
    want="unsigned answer ${mode%-badmic} (not trusted, retrying)"
    [ "$mode" = 200-badmic ] && want="unsigned answer 200 (not trusted, retrying): not signed by HTTP/*: kerberos: message integrity check failed"
    wait_until 30 eval '[[ "$(repl primary kplain last_error)" == *$want* ]]' ||
        fail "forger $mode: the forged answer was not seen (state $(repl primary kplain state), last_error: $(repl primary kplain last_error))"
    # Still trying: a later attempt fails again, and the state never left
    # Replicating.
    errs=$(repl_errors)
    wait_until 30 eval '[ "$(repl_errors)" -gt "$errs" ]' ||
        fail "forger $mode: no retry after the forged answer (state $(repl primary kplain state), last_error: $(repl primary kplain last_error))"
    [ "$(repl primary kplain state)" = Replicating ] ||
        fail "forger $mode: a forged, unsigned answer stopped replication: $(repl primary kplain state): $(repl primary kplain last_error)"
    log "forger $mode ignored: $(repl primary kplain last_error)"
    kill "$FORGER_PID" 2>/dev/null; wait "$FORGER_PID" 2>/dev/null || true
done
relay_start
wait_converged kplain 90
assert_identical kplain

# server test-connection over Kerberos: accepted; a name the KDC does not
# know fails at authentication, and says so.
vr primary server test-connection "replica.test.local:$KRB_PORT" --auth kerberos \
    --connect-address 127.0.0.1 >"$TESTDIR/tc.out" 2>&1 ||
    fail "test-connection (kerberos): $(cat "$TESTDIR/tc.out")"
grep -qF "accepts replication from primary.test.local (kerberos authentication)" \
    "$TESTDIR/tc.out" || fail "test-connection (kerberos): $(cat "$TESTDIR/tc.out")"
vr primary server test-connection "nosuch.test.local:$KRB_PORT" --auth kerberos \
    --connect-address 127.0.0.1 >"$TESTDIR/tc.out" 2>&1 &&
    fail "test-connection to a host the KDC does not know passed"
grep -qF "authentication failed" "$TESTDIR/tc.out" &&
    grep -qF "HTTP/nosuch.test.local" "$TESTDIR/tc.out" ||
    fail "test-connection (unknown service): $(cat "$TESTDIR/tc.out")"
log "test-connection: accepted; unknown service: $(cat "$TESTDIR/tc.out")"

# --- 3. refusals ------------------------------------------------------------
# The real primary pauses meanwhile (it would be refused too when the
# server demands encryption).
vr primary replication suspend kplain >/dev/null || fail "suspend kplain"
vr primary replication suspend ksecret >/dev/null || fail "suspend ksecret"
URL=http://replica.test.local:$KRB_PORT
UUID=00000000-0000-4000-8000-00000000abcd
BODY=$TESTDIR/register.json
printf '{"name":"intruder","uuid":"%s","cpus":1,"memory_mib":128,"epoch":1,"disks":[{"id":"disk0","size":1048576}]}' \
    "$UUID" >"$BODY"
before=$(find "$TESTDIR/replica-storage" | sort | sha256sum)

# send LABEL HEADERS_FILE|none BODYFILE — PUT the registration; prints the
# HTTP code.
send() {
    local label=$1 hdrs=$2 body=$3 args
    args=(-sS -o "$TESTDIR/resp-$label" -w '%{http_code}' --max-time 10
        --resolve "replica.test.local:$KRB_PORT:127.0.0.1"
        -H 'X-Vmreplica-Epoch: 1' -H 'X-Vmreplica-History: 0/3600'
        -H 'Content-Type: application/json' -X PUT --data-binary "@$body")
    [ "$hdrs" = none ] || args+=(-H "@$hdrs")
    curl "${args[@]}" "$URL/r1/vms/$UUID"
}

# token KEYTAB SELF [BODYFILE] — headers for the registration request.
token() {
    "$KRBTOKEN" "$1" "$2" replica.test.local PUT "/r1/vms/$UUID" 1 0/3600 \
        "${3:-$BODY}"
}

# refused LABEL CODE MESSAGE WHO — the last request got CODE and MESSAGE,
# one more audit event names WHO and says MESSAGE, nothing was written.
refused() {
    local label=$1 code=$2 msg=$3 who=$4 got
    got=$(jq -r .message "$TESTDIR/resp-$label")
    [[ $got == *"$msg"* ]] || fail "$label: message '$got', want '$msg'"
    [ "$(audits)" -gt "$a0" ] || fail "$label: not audited"
    last_audit | grep -qF "$msg" || fail "$label: audit '$(last_audit)' lacks '$msg'"
    last_audit | grep -qF "from $who (" || fail "$label: audit '$(last_audit)' does not name $who"
    [ "$(find "$TESTDIR/replica-storage" | sort | sha256sum)" = "$before" ] ||
        fail "$label: something was written under the storage location"
    vr replica vm show intruder >/dev/null 2>&1 && fail "$label: a VM was created"
    log "$label: refused ($code: $got), audited"
}

a0=$(audits)
code=$(send noticket none "$BODY")
[ "$code" = 401 ] || fail "no ticket: HTTP $code, want 401"
grep -qi "^WWW-Authenticate: Negotiate" <(curl -sS -D - -o /dev/null \
    --resolve "replica.test.local:$KRB_PORT:127.0.0.1" "$URL/r1/vms/$UUID") ||
    fail "no ticket: no WWW-Authenticate: Negotiate challenge"
refused noticket 401 "no Kerberos ticket" "unauthenticated peer"

# An authorization entry for primary.test.local only: rogue is refused.
vr replica auth-entry add --primary primary.test.local \
    --storage "$TESTDIR/replica-storage" >/dev/null || fail "auth-entry add"
vr replica server set --no-allow-any >/dev/null || fail "server set --no-allow-any"
a0=$(audits)
token "$KRB/rogue.keytab" rogue.test.local >"$TESTDIR/h-rogue" || fail "krbtoken rogue"
code=$(send rogue "$TESTDIR/h-rogue" "$BODY")
[ "$code" = 403 ] || fail "rogue: HTTP $code, want 403"
refused rogue 403 "primary rogue.test.local is not authorized" \
    "host/rogue.test.local@TEST.LOCAL"

# Wildcard edge cases of SPEC §6 against the live server: with only
# '*.test.local' admitting, a host one label deeper is admitted, and
# test.local, a.b.test.local, badtest.local and test.local.evil.net are not
# (each refused, audited, nothing written).  GET /r1/test writes nothing
# even when admitted.
vr replica auth-entry remove primary.test.local >/dev/null || fail "auth-entry remove"
vr replica auth-entry add --primary '*.test.local' \
    --storage "$TESTDIR/replica-storage" >/dev/null || fail "auth-entry add *.test.local"
# probe LABEL PRINCIPAL KEYTAB — GET /r1/test as PRINCIPAL; prints the code.
probe() {
    "$KRBTOKEN" "$3" "$2" replica.test.local GET /r1/test 1 0/3600 - \
        >"$TESTDIR/h-$1" || fail "krbtoken $2"
    curl -sS -o "$TESTDIR/resp-$1" -w '%{http_code}' --max-time 10 \
        --resolve "replica.test.local:$KRB_PORT:127.0.0.1" -H "@$TESTDIR/h-$1" \
        -H 'X-Vmreplica-Epoch: 1' -H 'X-Vmreplica-History: 0/3600' "$URL/r1/test"
}
code=$(probe wild-ok host/rogue.test.local@TEST.LOCAL "$KRB/rogue.keytab")
[ "$code" = 200 ] || fail "*.test.local does not admit rogue.test.local: $code $(cat "$TESTDIR/resp-wild-ok")"
[ "$(jq -r .primary "$TESTDIR/resp-wild-ok")" = rogue.test.local ] || fail "wild-ok: $(cat "$TESTDIR/resp-wild-ok")"
for h in test.local a.b.test.local badtest.local test.local.evil.net; do
    a0=$(audits)
    code=$(probe "wild-$h" "host/$h@TEST.LOCAL" "$KRB/wild.keytab")
    [ "$code" = 403 ] || fail "*.test.local vs $h: HTTP $code, want 403"
    refused "wild-$h" 403 "primary $h is not authorized" "host/$h@TEST.LOCAL"
done
vr replica auth-entry remove '*.test.local' >/dev/null || fail "auth-entry remove *"
vr replica auth-entry add --primary primary.test.local \
    --storage "$TESTDIR/replica-storage" >/dev/null || fail "auth-entry add back"

# A user (not a host) principal.
a0=$(audits)
"$KRBTOKEN" "$KRB/alice.keytab" alice@TEST.LOCAL replica.test.local PUT \
    "/r1/vms/$UUID" 1 0/3600 "$BODY" >"$TESTDIR/h-alice" || fail "krbtoken alice"
code=$(send alice "$TESTDIR/h-alice" "$BODY")
[ "$code" = 401 ] || fail "alice: HTTP $code, want 401"
refused alice 401 "principal alice@TEST.LOCAL is not a host principal" \
    "alice@TEST.LOCAL"

# A stock SPNEGO client (curl --negotiate with a kinit'ed user): a clear
# refusal, not a GSSAPI riddle.
a0=$(audits)
KRB5CCNAME=FILE:$KRB/alice.cc kinit -k -t "$KRB/alice.keytab" alice || fail "kinit alice"
code=$(KRB5CCNAME=FILE:$KRB/alice.cc curl -sS -o "$TESTDIR/resp-spnego" -w '%{http_code}' \
    --negotiate -u : --resolve "replica.test.local:$KRB_PORT:127.0.0.1" \
    -H 'X-Vmreplica-Epoch: 1' -X PUT --data-binary "@$BODY" "$URL/r1/vms/$UUID")
[ "$code" = 401 ] || fail "spnego: HTTP $code, want 401"
refused spnego 401 "a SPNEGO token" "unauthenticated peer"

# A request signed and sent once is refused when sent again.
a0=$(audits)
token "$KRB/primary.keytab" primary.test.local >"$TESTDIR/h-replay" || fail "krbtoken"
printf '{"name":"intruder","uuid":"%s","cpus":1,"memory_mib":128,"epoch":1,"disks":[]}' \
    "$UUID" >"$TESTDIR/bad-register.json"
# (first use: a valid request whose body the server refuses; it is spent)
"$KRBTOKEN" "$KRB/primary.keytab" primary.test.local replica.test.local PUT \
    "/r1/vms/$UUID" 1 0/3600 "$TESTDIR/bad-register.json" >"$TESTDIR/h-replay"
code=$(send replay1 "$TESTDIR/h-replay" "$TESTDIR/bad-register.json")
[ "$code" = 400 ] || fail "replay: first use HTTP $code, want 400 ($(cat "$TESTDIR/resp-replay1"))"
a0=$(audits)
code=$(send replay "$TESTDIR/h-replay" "$TESTDIR/bad-register.json")
[ "$code" = 401 ] || fail "replay: HTTP $code, want 401"
refused replay 401 "Request is a replay" "unauthenticated peer"

# The body changed after it was signed.
a0=$(audits)
token "$KRB/primary.keytab" primary.test.local >"$TESTDIR/h-tamper" || fail "krbtoken"
sed 's/"memory_mib":128/"memory_mib":129/' "$BODY" >"$TESTDIR/tampered.json"
code=$(send tamper "$TESTDIR/h-tamper" "$TESTDIR/tampered.json")
[ "$code" = 403 ] || fail "tamper: HTTP $code, want 403"
refused tamper 403 "message integrity check failed" "host/primary.test.local@TEST.LOCAL"

# No MIC at all.
a0=$(audits)
token "$KRB/primary.keytab" primary.test.local | grep '^Authorization' >"$TESTDIR/h-nomic"
code=$(send nomic "$TESTDIR/h-nomic" "$BODY")
[ "$code" = 403 ] || fail "no MIC: HTTP $code, want 403"
refused nomic 403 "no X-Vmreplica-MIC header" "host/primary.test.local@TEST.LOCAL"

# The Replica server requires encryption; the plain VM's next cycle is refused.
a0=$(audits)
token "$KRB/primary.keytab" primary.test.local >"$TESTDIR/h-enc" || fail "krbtoken"
vr replica server set --kerberos-encrypt on >/dev/null || fail "server set --kerberos-encrypt on"
code=$(send needenc "$TESTDIR/h-enc" "$BODY")
[ "$code" = 403 ] || fail "encryption required: HTTP $code, want 403"
refused needenc 403 "accepts Kerberos replication only encrypted" \
    "host/primary.test.local@TEST.LOCAL"
vr replica server set --kerberos-encrypt off >/dev/null || fail "server set --kerberos-encrypt off"

# Clock skew: the Replica server's clock 10 min ahead, then 10 min behind.
if grep -q __asan_init "$VMREPLICAD"; then
    # libfaketime's first clock call looks the real one up with dlsym,
    # which allocates; under load ASan's allocator can be holding its lock
    # in that clock call: the daemon deadlocks at start-up.  The plain
    # build runs these cases (the code path is the same).
    log "ASan build: the clock-skew cases run in the plain build only"
elif FAKETIME_LIB=$(ls /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 2>/dev/null); then
    for skew in +10m -10m; do
        want="Clock skew too great"
        [ "$skew" = +10m ] || want="Ticket not yet valid"
        stop_daemon replica
        spawn_daemon replica LD_PRELOAD="$FAKETIME_LIB" FAKETIME="$skew" \
            FAKETIME_DONT_FAKE_MONOTONIC=1
        wait_daemon replica 20
        wait_until 10 port_open "$KRB_PORT" || fail "replica ($skew): not listening"
        a0=$(audits)
        token "$KRB/primary.keytab" primary.test.local >"$TESTDIR/h-skew" || fail "krbtoken"
        code=$(send "skew$skew" "$TESTDIR/h-skew" "$BODY")
        [ "$code" = 401 ] || fail "skew $skew: HTTP $code, want 401"
        refused "skew$skew" 401 "$want" "unauthenticated peer"
        jq -r .message "$TESTDIR/resp-skew$skew" | grep -q "clocks of the primary and the Replica server differ" ||
            fail "skew $skew: the error does not say the clocks differ"
    done
    # The real primary against the skewed server: it keeps retrying (skew
    # heals when the clocks are fixed) and says why it fails.
    vr primary replication resume kplain >/dev/null || fail "resume kplain"
    wait_until 30 eval '[[ "$(repl primary kplain last_error)" == *"Ticket not yet valid"* ]]' ||
        fail "the primary does not report the skew (last_error: $(repl primary kplain last_error))"
    sleep 3
    st=$(repl primary kplain state)
    [ "$st" != Error ] || fail "a clock skew stopped replication (state Error)"
    log "primary against a skewed server: state $st, retrying: $(repl primary kplain last_error)"
    stop_daemon replica
    start_daemon replica
    wait_until 10 port_open "$KRB_PORT" || fail "replica: not listening after restart"
else
    log "faketime is not installed: clock-skew cases not run"
    skip "faketime (libfaketimeMT) is not installed"
fi

# After all that, with the clocks right again, the real primary replicates.
vr primary replication resume kplain >/dev/null 2>&1 || true
uri=$(nbd_uri primary kplain)
qemu-io -f raw "$uri" -c 'write -P 0x42 12M 256k' >/dev/null
wait_converged kplain 60
assert_identical kplain
log "all Kerberos cases passed"
