#!/bin/bash
# web-metrics: `server set --web-listen` — /metrics and /api/vms with curl.
#
# A replicating pair (certificate authentication) and a third daemon
# without a certificate.  The web listener is off by default; a bad
# address and a non-loopback address without a certificate are refused
# with their messages.  Without a certificate the listener serves plain
# HTTP on loopback.  With one it serves HTTPS and wants a client
# certificate from the CA: curl without one is refused, with one it gets
# the per-VM health and state gauges (exact lines, # HELP / # TYPE),
# /api/vms (mode, state, health, lag), /api/vms/VM (measure, recovery
# points, events), the dashboard page, 404 for unknown paths, 405 for
# POST, 413 for a body, 414 for a long URL.  The setting survives a
# restart; `replication suspend` shows in the gauges; --crl refuses a
# revoked client certificate; certificate files
# renewed in place are served without a `server set`; --no-web-listen
# stops the listener.
source "$(dirname "$0")/functions.sh"
requires jq curl openssl nbdkit python3
requires_build

setup_pair
create_vm web1 64M
enable_replication web1 --frequency 1s
uuid=$(jget primary .uuid vm show web1)

log "the web listener is off by default"
[ "$(jget primary .listening_web server show)" = false ] ||
    fail "primary: web listener on by default"
vr primary server show | grep -qx 'Web listener: *off' ||
    vr primary server show | grep -q 'Web listener.*off' ||
    fail "server show does not say the web listener is off"

log "bad addresses are refused"
start_daemon plain
WP=$(free_port)
err=$(vr plain server set --web-listen nonsense 2>&1) &&
    fail "--web-listen nonsense accepted"
[ "$err" = "vmreplica: error: web-listen nonsense: expected PORT, ADDR:PORT or [ADDR]:PORT with an IP address and a port 1-65535" ] ||
    fail "bad address: $err"
err=$(vr plain server set --web-listen "0.0.0.0:$WP" 2>&1) &&
    fail "plain HTTP on 0.0.0.0 accepted"
[ "$err" = "vmreplica: error: web-listen 0.0.0.0:$WP: not a loopback address, and this server has no certificate to serve HTTPS with (set --certificate, --key and --ca, or listen on 127.0.0.1)" ] ||
    fail "non-loopback without certificate: $err"
[ "$(jget plain '.web_listen // "none"' server show)" = none ] ||
    fail "a refused --web-listen was kept"

log "no certificate: plain HTTP on loopback (PORT alone)"
vr plain server set --web-listen "$WP" >/dev/null || fail "plain: --web-listen $WP"
[ "$(jget plain .web_listen server show)" = "$WP" ] || fail "plain: web_listen"
[ "$(jget plain .listening_web server show)" = true ] || fail "plain: not listening"
out=$(curl -sS -o /dev/null -w '%{http_code} %{content_type}' \
    "http://127.0.0.1:$WP/metrics") || fail "plain: curl /metrics"
[ "$out" = "200 text/plain; version=0.0.4; charset=utf-8" ] ||
    fail "plain: /metrics: $out"

log "with a certificate: HTTPS, client certificate required"
WS=$(free_port)
vr primary server set --web-listen "127.0.0.1:$WS" >/dev/null ||
    fail "primary: --web-listen"
vr primary server show | grep -q "Web listener: *127.0.0.1:$WS (listening)" ||
    fail "server show: $(vr primary server show | grep Web)"
URL="https://primary.test.local:$WS"
CURL=(curl -sS --max-time 10 --resolve "primary.test.local:$WS:127.0.0.1"
    --cacert "$PKI/ca.pem")
CERT=(--cert "$PKI/replica.pem" --key "$PKI/replica.key")
code=$("${CURL[@]}" -o "$TESTDIR/noclient" -w '%{http_code}' "$URL/metrics" 2>&1)
[ "$code" = 403 ] || fail "no client certificate: $code"
grep -q '"no client certificate"' "$TESTDIR/noclient" ||
    fail "no client certificate: $(cat "$TESTDIR/noclient")"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' --cert "$PKI/evil.pem" \
    --key "$PKI/evil.key" "$URL/metrics" 2>&1)
[ "$code" = 403 ] || fail "client certificate from another CA: $code"
"${CURL[@]}" -o /dev/null "http://127.0.0.1:$WS/metrics" 2>/dev/null &&
    fail "plain HTTP answered on the HTTPS listener"

wait_until 30 repl_is primary web1 health Normal ||
    fail "web1: health $(repl primary web1 health)"
out=$("${CURL[@]}" "${CERT[@]}" -D "$TESTDIR/h" "$URL/metrics") ||
    fail "curl /metrics with a client certificate"
grep -qi '^content-type: text/plain; version=0.0.4; charset=utf-8' "$TESTDIR/h" ||
    fail "/metrics content type: $(cat "$TESTDIR/h")"
for line in \
    '# HELP vmreplica_vm_health replication health of the VM: 0 Normal, 1 Warning, 2 Critical' \
    '# TYPE vmreplica_vm_health gauge' \
    "vmreplica_vm_health{vm=\"web1\",uuid=\"$uuid\"} 0" \
    '# TYPE vmreplica_vm_state gauge' \
    "vmreplica_vm_state{vm=\"web1\",uuid=\"$uuid\",state=\"Replicating\"} 1"; do
    grep -qxF "$line" <<<"$out" ||
        fail "/metrics lacks: $line; has: $(grep vmreplica_vm <<<"$out")"
done
grep -q "^vmreplica_lag_seconds{vm=\"$uuid\",mode=\"primary\"} " <<<"$out" ||
    fail "/metrics lacks the existing lag gauge"

log "/api/vms and /api/vms/VM"
out=$("${CURL[@]}" "${CERT[@]}" -D "$TESTDIR/h" "$URL/api/vms") || fail "curl /api/vms"
grep -qi '^content-type: application/json' "$TESTDIR/h" || fail "/api/vms content type"
[ "$(jq -r '.vms[] | select(.name == "web1") | [.mode, .state, .health] | join(" ")' <<<"$out")" = \
    "primary Replicating Normal" ] || fail "/api/vms: $out"
jq -e '.vms[] | select(.name == "web1") | .lag_seconds < 30 and
    (.last_replication_time | test("^20"))' <<<"$out" >/dev/null ||
    fail "/api/vms: lag or last replication time: $out"
RS=$(free_port)
vr replica server set --web-listen "127.0.0.1:$RS" >/dev/null || fail "replica: --web-listen"
replica_vm() {
    curl -sS --resolve "replica.test.local:$RS:127.0.0.1" --cacert "$PKI/ca.pem" \
        --cert "$PKI/primary.pem" --key "$PKI/primary.key" \
        "https://replica.test.local:$RS/api/vms/web1"
}
out=$(replica_vm) || fail "curl replica /api/vms/web1"
jq -e '.mode == "replica" and .measure.state == "Replicating" and
    (.points | length) >= 1 and (.events | length) >= 1 and
    .sample_interval_ms == 5000' <<<"$out" >/dev/null ||
    fail "replica /api/vms/web1: $out"
# A sample every 5 s; the first of a VM created after the last one may
# take that long.
wait_until 12 eval '[ "$(replica_vm | jq ".samples | length")" -ge 1 ]' ||
    fail "no lag samples: $(replica_vm | jq -c .samples)"
replica_vm | jq -e '.samples[-1] | length == 3 and .[1] < 30' >/dev/null ||
    fail "bad sample: $(replica_vm | jq -c .samples)"

log "the dashboard page, and what is refused"
out=$("${CURL[@]}" "${CERT[@]}" -D "$TESTDIR/h" "$URL/") || fail "curl /"
grep -qi '^content-type: text/html; charset=utf-8' "$TESTDIR/h" || fail "/ content type"
grep -q '<script src="/dashboard.js"' <<<"$out" || fail "/ is not the dashboard"
code() { "${CURL[@]}" "${CERT[@]}" -o /dev/null -w '%{http_code}' "$@"; }
[ "$(code "$URL/dashboard.js")" = 200 ] || fail "/dashboard.js"
[ "$(code "$URL/nope")" = 404 ] || fail "/nope is not 404"
[ "$(code "$URL/api/vms/nope")" = 404 ] || fail "/api/vms/nope is not 404"
[ "$(code -X POST "$URL/metrics")" = 405 ] || fail "POST /metrics is not 405"
[ "$(code -X DELETE "$URL/api/vms/web1")" = 405 ] || fail "DELETE is not 405"
"${CURL[@]}" "${CERT[@]}" -D - -o /dev/null -X POST "$URL/api/vms" |
    grep -qi '^allow: GET, HEAD' || fail "405 without Allow"
[ "$(code -X GET --data x "$URL/metrics")" = 413 ] || fail "a body is not 413"
[ "$(code "$URL/$(head -c 600 /dev/zero | tr '\0' a)")" = 414 ] ||
    fail "a long URL is not 414"

log "the setting survives a restart"
stop_daemon primary
start_daemon primary
wait_until 10 port_open "$WS" || fail "web listener not back after a restart"
[ "$(code "$URL/api/vms")" = 200 ] || fail "/api/vms after a restart"

log "replication suspend shows in the gauges"
vr primary replication suspend web1 >/dev/null || fail "suspend web1"
out=$("${CURL[@]}" "${CERT[@]}" "$URL/metrics") || fail "curl /metrics"
grep -qxF "vmreplica_vm_state{vm=\"web1\",uuid=\"$uuid\",state=\"Suspended\"} 1" <<<"$out" ||
    fail "no Suspended state line: $(grep vm_state <<<"$out")"
grep -qxF "vmreplica_vm_health{vm=\"web1\",uuid=\"$uuid\"} 1" <<<"$out" ||
    fail "suspended web1 is not Warning: $(grep vm_health <<<"$out")"

log "with --crl, a revoked client certificate is refused"
REV=(--cert "$PKI/revoked.pem" --key "$PKI/revoked.key")
[ "$(code "${REV[@]}" "$URL/api/vms")" = 200 ] || fail "revoked.pem before --crl"
vr primary server set --crl "$PKI/crl.pem" >/dev/null || fail "--crl"
"${CURL[@]}" "${REV[@]}" -o "$TESTDIR/rev" "$URL/api/vms" 2>/dev/null
grep -q 'client certificate refused: it is revoked' "$TESTDIR/rev" ||
    fail "revoked client certificate: $(cat "$TESTDIR/rev")"
[ "$(code "$URL/api/vms")" = 200 ] || fail "a good client certificate with --crl"
vr primary server set --no-crl >/dev/null || fail "--no-crl"

log "renewed certificate files are picked up without server set"
served_fp() {
    openssl s_client -connect "127.0.0.1:$WS" -servername primary.test.local \
        </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256
}
want=$(openssl x509 -in "$PKI/revoked.pem" -noout -fingerprint -sha256)
[ "$(served_fp)" != "$want" ] || fail "already serving the other certificate"
cp "$PKI/revoked.key" "$PKI/primary.key.new"
cp "$PKI/revoked.pem" "$PKI/primary.pem.new"
mv "$PKI/primary.key.new" "$PKI/primary.key"
mv "$PKI/primary.pem.new" "$PKI/primary.pem"
wait_until 15 eval '[ "$(served_fp)" = "$want" ]' ||
    fail "the renewed certificate is not served: $(served_fp)"
vrj primary events | jq -e '[.events[].message] |
    any(test("web listener: certificate files changed"))' >/dev/null ||
    fail "no event for the reload"
[ "$(code "$URL/api/vms")" = 200 ] || fail "/api/vms after the reload"

log "--no-web-listen stops it"
vr primary server set --no-web-listen >/dev/null || fail "--no-web-listen"
wait_until 5 eval '! port_open '"$WS" || fail "still listening on $WS"
[ "$(jget primary .listening_web server show)" = false ] || fail "listening_web"
log "ok"
