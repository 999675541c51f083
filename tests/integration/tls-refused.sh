#!/bin/bash
# tls-refused: the Replica server's certificate port refuses bad clients.
#
# Talks to the replica's HTTPS port directly with curl: a client without a
# certificate, with a certificate from an unrelated CA, with a certificate
# lacking the clientAuth EKU, and (with `server set --crl`) a revoked one
# must all be refused (TLS failure or 401/403), each refusal must appear as
# an "audit" event naming the peer, and nothing may be created under the
# storage location.  A good primary certificate gets an ordinary HTTP answer
# (404 for an unknown VM).  Bad TLS material given to `server set` (a key
# that does not match, an expired or not-yet-valid certificate) is
# refused and the old settings kept.  A certificate renewed in place is
# served within seconds, without a restart, once its key matches.
source "$(dirname "$0")/functions.sh"
requires curl jq openssl nbdkit python3
requires_build

setup_pair

uuid=00000000-0000-4000-8000-000000000000
url=https://replica.test.local:$REPLICA_PORT/r1/vms/$uuid
body='{"name":"intruder","uuid":"'$uuid'","cpus":1,"memory_mib":128,"epoch":1,"disks":[{"id":"disk0","size":1048576}]}'

# req LABEL CERT|none METHOD — one request; prints the HTTP code, or "tls"
# when curl failed before getting an HTTP answer.
req() {
    local label=$1 cert=$2 method=$3 code rc
    local args=(-sS -o "$TESTDIR/curl-$label.out" -w '%{http_code}'
        --max-time 10 --cacert "$PKI/ca.pem"
        --resolve "replica.test.local:$REPLICA_PORT:127.0.0.1"
        -H 'X-Vmreplica-Epoch: 1' -X "$method")
    if [ "$cert" != none ]; then
        args+=(--cert "$PKI/$cert.pem" --key "$PKI/$cert.key")
    fi
    if [ "$method" = PUT ]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    code=$(curl "${args[@]}" "$url" 2>"$TESTDIR/curl-$label.err") && rc=0 || rc=$?
    if [ "$rc" -ne 0 ] || [ "$code" = 000 ]; then
        echo tls
    else
        echo "$code"
    fi
}

audits() {
    vrj replica events | jq '[.events[] | select(.level == "audit")] | length'
}
audits_at_least() { # N
    [ "$(audits)" -ge "$1" ]
}
before=$(audits)

for c in none evil noclientauth; do
    for m in PUT GET; do
        r=$(req "$c-$m" "$c" "$m")
        case $r in
        tls | 401 | 403)
            log "client cert '$c', $m: refused ($r: $(head -c 200 "$TESTDIR/curl-$c-$m.err" "$TESTDIR/curl-$c-$m.out" 2>/dev/null | tr '\n' ' '))"
            ;;
        *) fail "client cert '$c', $m: not refused (HTTP $r)" ;;
        esac
    done
done

r=$(req good primary GET)
[ "$r" = 404 ] ||
    fail "good primary certificate: expected HTTP 404 for an unknown vm, got '$r' ($(cat "$TESTDIR/curl-good.err"))"
log "good primary certificate: HTTP 404 for an unknown vm"

# Each refusal is an audit event naming the peer (its address, or the name
# in its certificate).
wait_until 5 audits_at_least $((before + 3)) ||
    fail "expected >= 3 new audit events, have $(($(audits) - before))"
vrj replica events |
    jq -r '.events[] | select(.level == "audit") | .message' >"$TESTDIR/audit.txt"
log "audit events:"
sed 's/^/    /' "$TESTDIR/audit.txt"
# Each refusal says why.
for why in "no client certificate" "The certificate issuer is unknown" \
    "does not match the intended purpose"; do
    grep -q "$why" "$TESTDIR/audit.txt" || fail "no audit event says '$why'"
done
n=$(grep -cE '127\.0\.0\.1|test\.local' "$TESTDIR/audit.txt" || true)
[ "$n" -ge 3 ] ||
    fail "audit events do not name the peer (127.0.0.1 or its certificate name)"

# Nothing was created on the replica.
left=$(find "$TESTDIR/replica-storage" -mindepth 1 | head -5)
[ -z "$left" ] || fail "refused requests created files: $left"
n=$(jget replica '.vms | length' vm list)
[ "$n" -eq 0 ] || fail "refused requests created $n vm(s) on the replica"

# Bad TLS material is refused by `server set`, and the old settings stay.
if vr replica server set --certificate "$PKI/evil.pem" \
    --key "$PKI/replica.key" >"$TESTDIR/set.out" 2>&1; then
    fail "server set accepted a certificate that does not match its key"
fi
grep -q '^vmreplica: error: ' "$TESTDIR/set.out" ||
    fail "server set: no 'vmreplica: error:' line: $(cat "$TESTDIR/set.out")"
log "server set with a mismatched key: $(cat "$TESTDIR/set.out")"
[ "$(jget replica .certificate server show)" = "$PKI/replica.pem" ] ||
    fail "server set kept the refused certificate"
r=$(req good2 primary GET)
[ "$r" = 404 ] || fail "after the refused server set: good client got '$r'"
# So is a certificate outside its validity window (peers would refuse it
# at the next cycle), on either side, with the dates.
rfc='[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z'
for side in replica primary; do
    err=$(vr "$side" server set --certificate "$PKI/expired.pem" \
        --key "$PKI/expired.key" 2>&1) && fail "$side: server set took an expired certificate"
    grep -qxE "vmreplica: error: certificate $PKI/expired.pem: expired on $rfc \(now $rfc\): peers would refuse it; give a valid one" <<<"$err" ||
        fail "$side: expired certificate: '$err'"
    err=$(vr "$side" server set --certificate "$PKI/future.pem" \
        --key "$PKI/future.key" 2>&1) && fail "$side: server set took a not-yet-valid certificate"
    grep -qxE "vmreplica: error: certificate $PKI/future.pem: not valid before $rfc \(now $rfc\): peers would refuse it; check this host's clock or give a valid one" <<<"$err" ||
        fail "$side: not-yet-valid certificate: '$err'"
    [ "$(jget "$side" .certificate server show)" = "$PKI/$side.pem" ] ||
        fail "$side: server set kept a refused certificate"
done
log "server set refuses expired and not-yet-valid certificates: $err"
r=$(req good3 primary GET)
[ "$r" = 404 ] || fail "after the refused server sets: good client got '$r'"

# A revocation list: the revoked certificate is refused, audited as such,
# nothing written; the good one still gets through.  A list the CA did not
# sign is refused by `server set`.
vr replica server set --crl "$PKI/crl.pem" >"$TESTDIR/crl.out" 2>&1 || fail "server set --crl: $(cat "$TESTDIR/crl.out")"
[ "$(jget replica .crl server show)" = "$PKI/crl.pem" ] || fail "crl not shown"
a0=$(audits)
r=$(req revoked-before-crl-check revoked GET)
case $r in
tls | 401 | 403) ;;
*) fail "revoked certificate: not refused (HTTP $r)" ;;
esac
wait_until 5 audits_at_least $((a0 + 1)) || fail "revoked certificate: not audited"
vrj replica events | jq -r '[.events[] | select(.level == "audit")][-1].message' \
    >"$TESTDIR/revoked.txt"
grep -q "it is revoked (certificate revocation list)" "$TESTDIR/revoked.txt" ||
    fail "revoked certificate: audit says '$(cat "$TESTDIR/revoked.txt")'"
grep -q "127.0.0.1" "$TESTDIR/revoked.txt" || fail "revoked: audit does not name the peer"
log "revoked certificate: refused, audited: $(cat "$TESTDIR/revoked.txt")"
left=$(find "$TESTDIR/replica-storage" -mindepth 1 | head -5)
[ -z "$left" ] || fail "the revoked client created files: $left"
r=$(req good3 primary GET)
[ "$r" = 404 ] || fail "with the crl: good client got '$r'"
"$SOURCE_DIR/scripts/mkpki.sh" "$TESTDIR/pki2"
if vr replica server set --crl "$TESTDIR/pki2/crl.pem" >"$TESTDIR/set2.out" 2>&1; then
    fail "server set accepted a revocation list of another CA"
fi
grep -q "no revocation list signed by the ca\|crl" "$TESTDIR/set2.out" ||
    fail "foreign crl: $(cat "$TESTDIR/set2.out")"
log "a foreign CA's revocation list: $(cat "$TESTDIR/set2.out")"
[ "$(jget replica .crl server show)" = "$PKI/crl.pem" ] || fail "the refused crl replaced the old one"

# A renewed certificate is picked up without a restart, once the
# certificate and its key match again (a half-written renewal is ignored).
served() {
    openssl s_client -connect "127.0.0.1:$REPLICA_PORT" -servername replica.test.local \
        </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256 2>/dev/null
}
fp() { openssl x509 -in "$1" -noout -fingerprint -sha256; }
served_is() { [ "$(served)" = "$1" ]; }
fp0=$(fp "$PKI/replica.pem")
[ "$(served)" = "$fp0" ] || fail "served certificate is not replica.pem"
cp "$PKI/replica.pem" "$TESTDIR/replica.pem.orig"
cp "$PKI/replica.key" "$TESTDIR/replica.key.orig"
cat "$PKI/evil.pem" >"$PKI/replica.pem"   # the certificate, not yet its key
sleep 7
[ "$(served)" = "$fp0" ] || fail "a half-written renewal was loaded"
cat "$PKI/evil.key" >"$PKI/replica.key"
wait_until 15 served_is "$(fp "$PKI/evil.pem")" ||
    fail "the renewed certificate was not picked up (serving $(served))"
vrj replica events | jq -r '.events[].message' | grep -q "certificate files changed, reloaded" ||
    fail "no event for the reload"
log "renewed certificate picked up without a restart"
cat "$TESTDIR/replica.pem.orig" >"$PKI/replica.pem"
cat "$TESTDIR/replica.key.orig" >"$PKI/replica.key"
wait_until 15 served_is "$fp0" || fail "the restored certificate was not picked up"
r=$(req good4 primary GET)
[ "$r" = 404 ] || fail "after the renewals: good client got '$r'"
log "PASS"
