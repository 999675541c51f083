#!/bin/bash
# tls-transient: a handshake cut short is retried; one the peer refuses is not.
#
# While the Replica server restarts, the primary's TLS handshakes can be
# cut short (the peer closes the connection mid-handshake).  That must be a
# recoverable error — the shipper retries and replication continues once the
# Replica server is back — not the unrecoverable Error state a refused
# certificate gives.  A stand-in on the Replica server's port (python3)
# closes every connection once the ClientHello has started to arrive; then
# the real Replica server refuses a certificate from an unrelated CA, which
# must stop replication with the reason.
source "$(dirname "$0")/functions.sh"
requires python3 jq curl openssl nbdkit qemu-io
requires_build

setup_pair
create_vm v1 8M
enable_replication v1 --frequency 1s
uri=$(nbd_uri primary v1)

# standin — accept on REPLICA_PORT and close each connection mid-handshake.
standin() {
    python3 - "$REPLICA_PORT" <<'PY' &
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(16)
while True:
    c, _ = ls.accept()
    c.recv(64)  # the ClientHello has started
    c.close()
PY
    STANDIN=$!
    _bg_pids+=("$STANDIN")
    wait_until 10 port_open "$REPLICA_PORT" || fail "stand-in not listening"
}

stop_daemon replica
standin
qemu-io -f raw "$uri" -c "write -P 0x5a 1M 64k" >/dev/null || fail "write"
wait_until 20 eval '[ "$(vrj primary replication measure v1 | jq .replication_errors)" -ge 3 ]' ||
    fail "the shipper did not retry against the closing stand-in: $(repl primary v1 last_error)"
[ "$(repl primary v1 state)" = Replicating ] ||
    fail "a handshake cut short stopped replication: $(repl primary v1 state): $(repl primary v1 last_error)"
kill "$STANDIN"
wait_until 10 eval '! port_open "$REPLICA_PORT"' || fail "stand-in still listening"
start_replica
wait_converged v1 60
assert_identical v1
log "handshakes cut short were retried; replication went on"

# The real Replica server refuses a certificate from an unrelated CA.
vr primary server set --certificate "$PKI/evil.pem" --key "$PKI/evil.key" \
    --ca "$PKI/ca.pem" >/dev/null || fail "primary: server set (evil)"
qemu-io -f raw "$uri" -c "write -P 0x6b 2M 64k" >/dev/null || fail "write 2"
wait_until 20 eval '[ "$(repl primary v1 state)" = Error ]' ||
    fail "a refused handshake did not stop replication: $(repl primary v1 state): $(repl primary v1 last_error)"
repl primary v1 last_error | grep -q "certificate refused" ||
    fail "the error does not say why: $(repl primary v1 last_error)"
log "a handshake the peer refused set Error: $(repl primary v1 last_error)"
log "PASS"
