#!/bin/bash
# auth-entries: which primaries may replicate to a Replica server, where
# their Replica VMs are kept, and trust groups (SPEC §6).
#
# The Replica server of setup_pair first allows any authenticated primary;
# with --no-allow-any only authorization entries admit one.  Each refusal
# must be an audit event naming the peer, and write nothing under any
# storage location:
#   - no entry matches (a wildcard of another domain, and the exact name of
#     another host);
#   - the entry admits primary.test.local (*.test.local, exact wins over
#     wildcard): replication works and the Replica VM lives under that
#     entry's storage;
#   - its trust group changes: the change warns, naming the primary it cuts
#     off, and the VM, created in group "east", refuses the primary now in
#     "west";
#   - the entry is removed: the primary's next cycle is refused.
# Bad patterns (a '*' that is not the whole first label), relative storage.
source "$(dirname "$0")/functions.sh"
requires jq curl openssl nbdkit qemu-io find
requires_build

setup_pair
ST_A=$TESTDIR/storage-a
ST_B=$TESTDIR/storage-b
audits() { vrj replica events | jq '[.events[] | select(.level == "audit")] | length'; }
files_under() { { find "$@" -type f 2>/dev/null || true; } | wc -l; }

vr replica server set --no-allow-any >/dev/null || fail "server set --no-allow-any"
create_vm v1 8M

# refused_enable WHY — replication enable must fail with WHY, audited, and
# write nothing anywhere.
refused_enable() {
    local a0 f0 err
    a0=$(audits)
    f0=$(files_under "$TESTDIR/replica-storage" "$ST_A" "$ST_B")
    err=$(vr primary replication enable v1 --replica-server "replica.test.local:$REPLICA_PORT" \
        --connect-address 127.0.0.1 --auth certificate 2>&1) &&
        fail "replication enable accepted ($1)"
    grep -q "$1" <<<"$err" || fail "refusal: $err"
    [ "$(audits)" -gt "$a0" ] || fail "no audit event for: $err"
    vrj replica events | jq -r '[.events[] | select(.level == "audit")][-1].message' |
        grep -q "from primary.test.local" || fail "the audit event does not name the peer"
    [ "$(files_under "$TESTDIR/replica-storage" "$ST_A" "$ST_B")" = "$f0" ] ||
        fail "a refused primary wrote under a storage location"
}
refused_enable "primary primary.test.local is not authorized on this server"

for bad in "a*.test.local" "foo.*.local" "*" "*.test.local." "test..local"; do
    err=$(vr replica auth-entry add --primary "$bad" --storage "$ST_A" 2>&1) &&
        fail "pattern '$bad' accepted"
    grep -q "expected an FQDN or \*.FQDN" <<<"$err" || fail "pattern '$bad': $err"
done
err=$(curl -s --unix-socket "$(api_sock replica)" -X POST -d '{"primary":"x.test.local","storage":"rel/dir"}' \
    http://localhost/v1/auth-entries)
grep -q "expected an absolute directory" <<<"$err" || fail "relative storage: $err"

vr replica auth-entry add --primary "*.example.com" --storage "$ST_B" >/dev/null ||
    fail "auth-entry add *.example.com"
vr replica auth-entry add --primary "other.test.local" --storage "$ST_B" >/dev/null ||
    fail "auth-entry add other.test.local"
refused_enable "no authorization entry matches it"
log "no matching entry: refused, audited, nothing written"

vr replica auth-entry add --primary "*.test.local" --storage "$ST_B" --trust-group west \
    >/dev/null || fail "auth-entry add *.test.local"
vr replica auth-entry add --primary "primary.test.local" --storage "$ST_A" --trust-group east \
    >/dev/null || fail "auth-entry add primary.test.local"
err=$(vr replica auth-entry add --primary "primary.test.local" --storage "$ST_A" 2>&1) &&
    fail "a second entry for one pattern"
grep -q "exists; use 'vmreplica auth-entry set'" <<<"$err" || fail "duplicate: $err"
[ "$(vrj replica auth-entry list | jq -r '[.entries[].primary] | join(",")')" = \
  "*.example.com,*.test.local,other.test.local,primary.test.local" ] ||
    fail "auth-entry list: $(vrj replica auth-entry list)"
enable_replication v1 --frequency 1s
RDISK=$(disk_path replica v1)
[[ $RDISK == "$ST_A"/* ]] || fail "the Replica VM is not under the entry's storage: $RDISK"
qemu-io -f raw "$(nbd_uri primary v1)" -c "write -P 0x31 1M 64k" >/dev/null || fail "write"
wait_converged v1 60
assert_identical v1
log "the exact entry admits the primary; its VM lives under $ST_A"

# (The mark before the change: the primary's next cycle, even an empty
# one a second later, may be refused before the change command returns.)
a0=$(audits)
err=$(vr replica auth-entry set primary.test.local --trust-group west 2>&1 >/dev/null) ||
    fail "set group: $err"
# The change is accepted, with a warning naming the primary it cuts off.
want="vmreplica: warning: authorization entry primary.test.local: trust group 'west' cuts off the primaries already replicating here under another group, whose cycles are now refused: primary.test.local (vm v1, trust group 'east'); 'vmreplica auth-entry set primary.test.local --trust-group GROUP' with their group lets them in again"
[ "$err" = "$want" ] || fail "auth-entry set --trust-group: warning '$err', want '$want'"
vrj replica events | jq -e --arg w "${want#vmreplica: warning: }" \
    '[.events[] | select(.level == "warning" and .message == $w)] | length == 1' >/dev/null ||
    fail "the cut-off warning is not an event"
qemu-io -f raw "$(nbd_uri primary v1)" -c "write -P 0x32 2M 64k" >/dev/null || fail "write 2"
wait_until 20 repl_is primary v1 state Error ||
    fail "a primary of another trust group replicated: $(repl primary v1 state)"
repl primary v1 last_error | grep -q "belongs to trust group 'east'; primary.test.local is in 'west'" ||
    fail "trust group error: $(repl primary v1 last_error)"
[ "$(audits)" -gt "$a0" ] || fail "trust group refusal not audited"
log "a VM of trust group east refuses its primary once that is in west"

err=$(vr replica auth-entry set primary.test.local --trust-group east 2>&1 >/dev/null) ||
    fail "set group back: $err"
[ -z "$err" ] || fail "setting the VM's own group back warned: $err"
vr primary replication resume v1 >/dev/null || fail "resume"
wait_converged v1 60
assert_identical v1
a0=$(audits)
# The wildcard first: while it is left alone it admits the primary in
# group west, which v1 (east) refuses with another message.
vr replica auth-entry remove "*.test.local" >/dev/null || fail "auth-entry remove *.test.local"
vr replica auth-entry remove primary.test.local >/dev/null || fail "auth-entry remove"
err=$(vr replica auth-entry remove primary.test.local 2>&1) && fail "second remove"
grep -q "no authorization entry for primary.test.local" <<<"$err" || fail "second remove: $err"
staged=$(files_under "$(dirname "$RDISK")/staging")
qemu-io -f raw "$(nbd_uri primary v1)" -c "write -P 0x33 3M 64k" >/dev/null || fail "write 3"
wait_until 20 repl_is primary v1 state Error || fail "a removed entry still admits the primary"
repl primary v1 last_error | grep -q "not authorized" || fail "removed: $(repl primary v1 last_error)"
[ "$(audits)" -gt "$a0" ] || fail "removed-entry refusal not audited"
[ "$(files_under "$(dirname "$RDISK")/staging")" = "$staged" ] ||
    fail "a refused cycle was staged"
log "a removed entry refuses the primary's next cycle"
log "PASS"
