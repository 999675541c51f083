#!/bin/bash
# test-connection: `server test-connection` checks the path replication
# would take and says at which step it fails.
#
# Certificate mode (setup_pair): accepted (with the storage location the
# Replica server would use), nothing listening on the port (the message
# names the --connect-address dialled), a name that does not resolve (the
# message suggests --connect-address), the Replica
# server refusing this host (no authorization entry; the refusal is audited
# there), an entry with a trust group, this host presenting a certificate of
# another CA, a Replica server whose certificate lacks serverAuth or names
# another host, a certificate chosen by thumbprint from a store of several
# (--certificate-thumbprint, SHA-1 or SHA-256), and the Replica server
# disabled.  Kerberos mode is checked in
# kerberos.sh.
source "$(dirname "$0")/functions.sh"
requires jq curl openssl python3
requires_build

setup_pair
T="replica.test.local:$REPLICA_PORT"

# tc [ARGS…] — test-connection from the primary; output in $TESTDIR/tc.out.
tc() {
    vr primary server test-connection "$@" --auth certificate \
        --connect-address 127.0.0.1 >"$TESTDIR/tc.out" 2>&1
}
expect_fail() { # WHAT TEXT…
    local what=$1 t
    shift
    for t in "$@"; do
        grep -qF -- "$t" "$TESTDIR/tc.out" ||
            fail "$what: output lacks '$t': $(cat "$TESTDIR/tc.out")"
    done
    log "$what: $(cat "$TESTDIR/tc.out")"
}

tc "$T" || fail "accepted case failed: $(cat "$TESTDIR/tc.out")"
grep -qF "$T accepts replication from primary.test.local (certificate authentication)" \
    "$TESTDIR/tc.out" || fail "accepted: $(cat "$TESTDIR/tc.out")"
grep -qF "$TESTDIR/replica-storage" "$TESTDIR/tc.out" || fail "no storage shown"
log "accepted: $(head -1 "$TESTDIR/tc.out")"
[ -z "$(find "$TESTDIR/replica-storage" -mindepth 1)" ] ||
    fail "test-connection wrote under the storage location"

port=$(free_port)
tc "replica.test.local:$port" && fail "a port nobody listens on passed"
expect_fail "nothing listening" "cannot reach it" "replica.test.local:$port" \
    "replica server replica.test.local:$port (dialled at --connect-address 127.0.0.1): "
# A name this host cannot resolve: say how to give the address instead.
vr primary server test-connection "nosuch.invalid:$port" --auth certificate \
    >"$TESTDIR/tc.out" 2>&1 && fail "an unresolvable name passed"
expect_fail "unresolvable name" "cannot reach it" \
    "; if this host cannot resolve that name, give the address to dial with --connect-address IP"

vr replica server set --no-allow-any >/dev/null || fail "server set --no-allow-any"
a0=$(vrj replica events | jq '[.events[] | select(.level == "audit")] | length')
tc "$T" && fail "an unauthorized primary passed"
expect_fail "not authorized" "it does not accept this host" \
    "primary primary.test.local is not authorized"
a1=$(vrj replica events | jq '[.events[] | select(.level == "audit")] | length')
[ "$a1" -gt "$a0" ] || fail "the refusal was not audited on the Replica server"

mkdir -p "$TESTDIR/east"
vr replica auth-entry add --primary '*.test.local' --storage "$TESTDIR/east" \
    --trust-group east >/dev/null || fail "auth-entry add"
tc "$T" || fail "with an entry: $(cat "$TESTDIR/tc.out")"
grep -q "Storage location: *$TESTDIR/east" "$TESTDIR/tc.out" &&
    grep -q "Trust group: *east" "$TESTDIR/tc.out" ||
    fail "entry: storage or trust group not shown: $(cat "$TESTDIR/tc.out")"
log "with an entry: storage $TESTDIR/east, trust group east"

vr primary server set --certificate "$PKI/evil.pem" --key "$PKI/evil.key" \
    >/dev/null || fail "primary: server set (evil certificate)"
tc "$T" && fail "a certificate of another CA passed"
expect_fail "unknown CA" "authentication failed"
vr primary server set --certificate "$PKI/primary.pem" --key "$PKI/primary.key" \
    >/dev/null || fail "primary: server set (own certificate)"
tc "$T" || fail "back to the good certificate: $(cat "$TESTDIR/tc.out")"

# What the primary checks of the Replica server: the serverAuth purpose and
# its name (the SAN must carry replica.test.local).
vr replica server set --certificate "$PKI/noserverauth.pem" \
    --key "$PKI/noserverauth.key" >/dev/null || fail "replica: noserverauth"
tc "$T" && fail "a Replica server certificate without serverAuth passed"
expect_fail "server certificate without serverAuth" "authentication failed" \
    "its certificate lacks the serverAuth extended key usage"
vr replica server set --certificate "$PKI/primary.pem" --key "$PKI/primary.key" \
    >/dev/null || fail "replica: a certificate of another name"
tc "$T" && fail "a Replica server certificate of another name passed"
expect_fail "server certificate of another name" "authentication failed" \
    "replica.test.local"
vr replica server set --certificate "$PKI/replica.pem" --key "$PKI/replica.key" \
    >/dev/null || fail "replica: its own certificate"
tc "$T" || fail "the replica's own certificate again: $(cat "$TESTDIR/tc.out")"

# --certificate-thumbprint chooses among several certificates of a store.
S=$TESTDIR/store
mkdir -p "$S"
for n in primary evil noclientauth; do
    cp "$PKI/$n.pem" "$PKI/$n.key" "$S/"
done
cp "$PKI/ca.pem" "$S/"
sha1=$(openssl x509 -in "$PKI/primary.pem" -noout -fingerprint -sha1 | cut -d= -f2)
vr primary server set --certificate-store "$S" --certificate-thumbprint "$sha1" \
    >/dev/null || fail "server set --certificate-thumbprint (primary's)"
[ "$(jget primary .certificate server show)" = "$S/primary.pem" ] ||
    fail "the thumbprint chose $(jget primary .certificate server show)"
[ "$(jget primary .certificate_thumbprint server show)" = "$(tr -d : <<<"${sha1,,}")" ] ||
    fail "thumbprint shown: $(jget primary .certificate_thumbprint server show)"
tc "$T" || fail "with the store's primary certificate: $(cat "$TESTDIR/tc.out")"
sha256=$(openssl x509 -in "$PKI/evil.pem" -noout -fingerprint -sha256 | cut -d= -f2)
vr primary server set --certificate-thumbprint "$sha256" >/dev/null ||
    fail "server set --certificate-thumbprint (SHA-256, evil)"
[ "$(jget primary .certificate server show)" = "$S/evil.pem" ] || fail "SHA-256 not matched"
tc "$T" && fail "the store's evil certificate passed"
expect_fail "store: evil certificate" "authentication failed"
vr primary server set --certificate-thumbprint 00112233445566778899aabbccddeeff00112233 \
    >"$TESTDIR/tc.out" 2>&1 && fail "an unknown thumbprint was accepted"
expect_fail "unknown thumbprint" "none of its 4 certificates has thumbprint"
[ "$(jget primary .certificate server show)" = "$S/evil.pem" ] ||
    fail "a refused thumbprint changed the certificate"
vr primary server set --certificate-thumbprint xyz >"$TESTDIR/tc.out" 2>&1 &&
    fail "a malformed thumbprint was accepted"
expect_fail "malformed thumbprint" "expected 40 (SHA-1) or 64 (SHA-256)"
vr primary server set --certificate "$PKI/primary.pem" --key "$PKI/primary.key" \
    >/dev/null || fail "primary: back to certificate files"
[ "$(vrj primary server show | jq -r .certificate_store)" = null ] ||
    fail "the store stayed after --certificate"
tc "$T" || fail "back to files: $(cat "$TESTDIR/tc.out")"

vr replica server set --disable >/dev/null || fail "server set --disable"
tc "$T" && fail "a disabled Replica server passed"
expect_fail "disabled" "cannot reach it"

vr primary server test-connection "$T" --auth bogus >"$TESTDIR/tc.out" 2>&1 &&
    fail "--auth bogus accepted"
log "PASS"
