#!/bin/bash
# firewall: `server firewall enable|disable|show` — nftables table inet
# vmreplica for the Replica server's listener ports (docs/security.md).
#
# The host's own firewall is never touched: the Replica server daemon runs
# in a network namespace of its own (DAEMON_NETNS_replica), joined by a veth
# pair to a second namespace for the client, and that namespace gets an
# administrator's ruleset that drops by default but accepts lo, established
# connections and `meta mark 0x766d72 accept` (the one rule docs/security.md
# asks of such a host).  Then:
#   - disabled (the default): show says so, no vmreplica table exists, and a
#     TCP connect from the client to the certificate port times out;
#   - enable: the table holds the port rule and the mark, the connect
#     works and an HTTPS request gets an HTTP answer;
#   - server set --certificate-port: the rule moves to the new port;
#     --auth both|kerberos (if MIT krb5 tools are here): the Kerberos port
#     too / alone; --disable: the table stays, with no port rule;
#   - a daemon restart re-creates the table deleted by hand;
#   - nft failing at start-up is an error event and the daemon runs on;
#     enable then fails with nft's own message;
#   - disable removes the table and the connect fails again;
#   - enable without nft on the daemon's PATH fails with a clear message
#     (and disable, already disabled, needs no nft).
source "$(dirname "$0")/functions.sh"
requires ip nft jq curl openssl timeout
requires_build

NS_R=vrfw-r-$$
NS_C=vrfw-c-$$
ADDR_R=10.231.0.1
ADDR_C=10.231.0.2
ip netns add "$NS_R" 2>/dev/null || skip "cannot create a network namespace (ip netns add)"
cleanup_fn ip netns del "$NS_R"
ip netns add "$NS_C" || fail "ip netns add $NS_C"
cleanup_fn ip netns del "$NS_C"
# Stop the daemon before its namespace goes (cleanups run last-first).
cleanup_fn stop_daemon replica

in_r() { ip netns exec "$NS_R" "$@"; }
ip -n "$NS_R" link set lo up && ip -n "$NS_C" link set lo up &&
    ip link add vrfw0 netns "$NS_R" type veth peer name vrfw1 netns "$NS_C" &&
    ip -n "$NS_R" addr add "$ADDR_R/24" dev vrfw0 &&
    ip -n "$NS_C" addr add "$ADDR_C/24" dev vrfw1 &&
    ip -n "$NS_R" link set vrfw0 up && ip -n "$NS_C" link set vrfw1 up ||
    fail "veth pair between $NS_R and $NS_C"
in_r nft -f - <<'EOF' || skip "nftables does not work in a network namespace here"
table inet admin {
    chain input {
        type filter hook input priority filter; policy drop;
        iif lo accept
        ct state established,related accept
        meta mark 0x766d72 accept
    }
}
EOF

# connect PORT — TCP connect from the client namespace to the replica:
# 0 when it connects, 124 when it times out (dropped), else refused.
connect() {
    local rc
    ip netns exec "$NS_C" timeout 3 \
        bash -c "exec 3<>/dev/tcp/$ADDR_R/$1" 2>/dev/null && rc=0 || rc=$?
    return "$rc"
}
assert_dropped() {
    local rc
    connect "$1" && rc=0 || rc=$?
    [ "$rc" = 124 ] || fail "connect to port $1 ($2): expected a timeout, got status $rc"
}
assert_open() {
    wait_until 5 connect "$1" || fail "connect to port $1 ($2) failed"
}
has_table() { in_r nft list tables | grep -qx 'table inet vmreplica'; }
table() { in_r nft list table inet vmreplica; }
fw() { jget replica "$1" server firewall show; }
last_event() { vrj replica events | jq -r '.events[-1] | "\(.level): \(.message)"'; }
event_seen() { vrj replica events | jq -e --arg m "$1" 'any(.events[]; .message == $m)' >/dev/null; }

P1=8443
P2=9443
KP=8080
HAVE_KRB=false
if command -v krb5kdc >/dev/null && command -v kdb5_util >/dev/null &&
    command -v kadmin.local >/dev/null; then
    krb_realm # exports KRB5_CONFIG before the daemon starts
    HAVE_KRB=true
fi
"$SOURCE_DIR/scripts/mkpki.sh" "$PKI" >/dev/null
mkdir -p "$TESTDIR/replica-storage"
DAEMON_NETNS_replica=$NS_R
start_daemon replica
vr replica server set --enable --auth certificate --certificate-port "$P1" \
    --certificate "$PKI/replica.pem" --key "$PKI/replica.key" \
    --ca "$PKI/ca.pem" --allow-any \
    --default-storage "$TESTDIR/replica-storage" >/dev/null ||
    fail "server set --enable"
wait_until 10 in_r bash -c "exec 3<>/dev/tcp/127.0.0.1/$P1" 2>/dev/null ||
    fail "certificate port $P1 not listening in $NS_R"

# --- disabled: the default, and no nft at all -----------------------------
out=$(vr replica server firewall show) || fail "firewall show"
grep -q "^Firewall: *disabled" <<<"$out" || fail "show (default): $out"
# hint TEXT — the note of `firewall show` on one line (the CLI folds it).
hint() { tr -s ' \n' ' ' <<<"$1" | grep -o 'Note: .*'; }
hint "$out" | grep -q "if this host's own ruleset drops by default, add this rule to its input chain (at priority filter or later): meta mark 0x766d72 accept" ||
    fail "show has no hint: $out"
[ "$(fw .enabled)" = false ] || fail "enabled by default"
[ "$(fw .table)" = null ] || fail "a table listed while disabled"
[ "$(jget replica .firewall_enabled server show)" = false ] ||
    fail "server show: firewall_enabled"
has_table && fail "a vmreplica table exists before enable"
assert_dropped "$P1" "firewall disabled"
log "disabled by default: no table, the certificate port is dropped"

# --- enable ---------------------------------------------------------------
out=$(vr replica server firewall enable) || fail "firewall enable"
grep -q "^Firewall: *enabled" <<<"$out" || fail "enable: $out"
grep -q "Listener ports: *$P1/tcp" <<<"$out" || fail "enable ports: $out"
grep -q "tcp dport $P1 meta mark set 0x00766d72 accept" <<<"$out" ||
    fail "enable does not list the table: $out"
hint "$out" | grep -q "cannot override a drop in another table" ||
    fail "enable: no hint: $out"
fw .hint | grep -q "cannot override a drop in another table" || fail "hint: $(fw .hint)"
has_table || fail "no vmreplica table after enable"
t=$(table)
grep -q "type filter hook input priority filter - 10; policy accept;" <<<"$t" ||
    fail "base chain: $t"
grep -q "tcp dport $P1 meta mark set 0x00766d72 accept" <<<"$t" || fail "rule: $t"
assert_open "$P1" "firewall enabled"
code=$(ip netns exec "$NS_C" curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
    --cacert "$PKI/ca.pem" --cert "$PKI/primary.pem" --key "$PKI/primary.key" \
    --resolve "replica.test.local:$P1:$ADDR_R" \
    "https://replica.test.local:$P1/r1/vms/00000000-0000-4000-8000-000000000000") || true
[[ $code =~ ^[1-5][0-9][0-9]$ ]] || fail "HTTPS through the firewall: code '$code'"
event_seen "firewall enabled (ports $P1)" || fail "no enable event: $(last_event)"
[ "$(jget replica .firewall_enabled server show)" = true ] ||
    fail "server show: firewall_enabled"
log "enable: table inet vmreplica marks and accepts port $P1 (HTTP $code)"

# --- the rule follows the listeners ---------------------------------------
vr replica server set --certificate-port "$P2" >/dev/null || fail "server set --certificate-port"
t=$(table)
grep -q "tcp dport $P2 meta mark" <<<"$t" || fail "new port not in the table: $t"
grep -q "$P1" <<<"$t" && fail "old port still in the table: $t"
assert_open "$P2" "new certificate port"
assert_dropped "$P1" "old certificate port"
event_seen "firewall rules applied (ports $P2)" || fail "no rewrite event: $(last_event)"
log "server set --certificate-port $P2: the rule moved"

if $HAVE_KRB; then
    vr replica server set --auth both --kerberos-port "$KP" \
        --keytab "$KRB/replica.keytab" >/dev/null || fail "server set --auth both"
    t=$(table)
    grep -q "tcp dport { $KP, $P2 } meta mark set" <<<"$t" || fail "auth both: $t"
    assert_open "$KP" "Kerberos port"
    [ "$(fw '.ports | sort | join(",")')" = "$KP,$P2" ] || fail "show ports: $(fw .ports)"
    vr replica server set --auth kerberos >/dev/null || fail "server set --auth kerberos"
    t=$(table)
    grep -q "tcp dport $KP meta mark" <<<"$t" && ! grep -q "$P2" <<<"$t" ||
        fail "auth kerberos: $t"
    assert_dropped "$P2" "certificate port with --auth kerberos"
    vr replica server set --auth certificate >/dev/null || fail "server set --auth certificate"
    t=$(table)
    grep -q "tcp dport $P2 meta mark" <<<"$t" && ! grep -q "$KP" <<<"$t" ||
        fail "auth certificate: $t"
    log "--auth both|kerberos|certificate: the rule holds the running listeners' ports"
else
    log "no MIT krb5 tools: the Kerberos port cases are not run"
fi

vr replica server set --disable >/dev/null || fail "server set --disable"
has_table || fail "the table went with the replica server"
t=$(table)
grep -q "dport" <<<"$t" && fail "a port rule without a listener: $t"
[ "$(fw '.ports | length')" = 0 ] || fail "show ports: $(fw .ports)"
out=$(vr replica server firewall show)
grep -q "Listener ports: *none" <<<"$out" || fail "show without listener: $out"
vr replica server set --enable >/dev/null || fail "server set --enable"
grep -q "tcp dport $P2 meta mark" <<<"$(table)" || fail "rule not back: $(table)"
assert_open "$P2" "replica server enabled again"
log "replica server disabled: the table stays, without a port rule"

# --- persistence: re-created at start -------------------------------------
stop_daemon replica
in_r nft delete table inet vmreplica || fail "nft delete table"
start_daemon replica
wait_until 10 has_table || fail "the table was not re-created at start"
grep -q "tcp dport $P2 meta mark" <<<"$(table)" || fail "restart: $(table)"
[ "$(fw .enabled)" = true ] || fail "not enabled after a restart"
assert_open "$P2" "after a restart"
log "enabled survives a restart: the table deleted by hand is back"

# --- nft failing ----------------------------------------------------------
mkdir -p "$TESTDIR/fakebin" "$TESTDIR/nobin"
cat >"$TESTDIR/fakebin/nft" <<'EOF'
#!/bin/sh
echo "Error: Could not process rule: Operation not permitted" >&2
echo "table inet vmreplica {}" >&2
echo "^^^^^^^^^^^^^^^^^^^^^^" >&2
exit 1
EOF
chmod +x "$TESTDIR/fakebin/nft"
NFT_ERR="firewall: nft -f - failed (exit status 1): Error: Could not process rule: Operation not permitted"
stop_daemon replica
in_r nft delete table inet vmreplica || fail "nft delete table"
start_daemon replica PATH="$TESTDIR/fakebin"
vrj replica events | jq -e --arg m "$NFT_ERR" \
    'any(.events[]; .level == "error" and .message == $m)' >/dev/null ||
    fail "no error event for nft failing at start: $(last_event)"
[ "$(fw .error)" = "$NFT_ERR" ] || fail "show error: $(fw .error)"
err=$(vr replica server show 2>&1 >/dev/null) || fail "server show"
[ "$err" = "vmreplica: warning: $NFT_ERR" ] || fail "server show warning: $err"
err=$(vr replica server firewall enable 2>&1) && fail "enable with a failing nft"
[ "$err" = "vmreplica: error: $NFT_ERR" ] || fail "enable, nft failing: $err"
has_table && fail "a table while nft fails"
log "nft failing: an error event at start, the daemon runs; enable says: ${NFT_ERR#firewall: }"

stop_daemon replica
start_daemon replica
wait_until 10 has_table || fail "table not re-created"
[ "$(fw .error)" = null ] || fail "error kept after a good start: $(fw .error)"

# --- disable --------------------------------------------------------------
out=$(vr replica server firewall disable) || fail "firewall disable"
grep -q "^Firewall: *disabled" <<<"$out" || fail "disable: $out"
has_table && fail "the table is still there after disable"
assert_dropped "$P2" "firewall disabled again"
event_seen "firewall disabled" || fail "no disable event: $(last_event)"
log "disable: the table is gone, the port is dropped again"

# --- no nft at all --------------------------------------------------------
stop_daemon replica
start_daemon replica PATH="$TESTDIR/nobin"
vr replica server firewall disable >/dev/null || fail "disable (already) needs nft"
err=$(vr replica server firewall enable 2>&1) && fail "enable without nft"
[ "$err" = "vmreplica: error: firewall: nft not found in PATH (install nftables)" ] ||
    fail "enable without nft: $err"
[ "$(fw .enabled)" = false ] || fail "enabled although nft is missing"
has_table && fail "a table without nft"
log "no nft: enable fails with a clear message, the setting stays disabled"
log "PASS"
