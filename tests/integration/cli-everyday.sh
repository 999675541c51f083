#!/bin/bash
# cli-everyday: what an administrator meets first with the vmreplica client,
# against one daemon (no replication):
#   - exit statuses of vmreplica(1) "EXIT STATUS": 3 and a message saying
#     to start the daemon or set VMREPLICA_SOCKET when the socket is not
#     there, 4 for a VM that does not exist, 1 for a refusal, 2 for a
#     usage error;
#   - a fresh server shows the certificate port it will use (443), not 0;
#   - `events --follow [--vm VM]` prints each new event as it is recorded
#     (and only that VM's), as lines or, with --json, one object per line,
#     and ends with status 3 when the daemon goes away;
#   - `vmreplica help NOUN VERB` mentions every option of SPEC §2's command
#     map, unless docs/cmdlets.md lists the option as planned;
#   - names with spaces are quoted in messages ('my vm');
#   - `vm stop` of a guest that ignores ACPI says, after a few seconds,
#     that it waits and that --force kills it at once (with QEMU);
#   - --json: every command that prints something prints valid JSON.
source "$(dirname "$0")/functions.sh"
requires jq curl
requires_build

start_daemon primary VMREPLICA_ACCEL=tcg

# expect_rc WANT ARGS… — run the CLI (ARGS include --connect), status WANT;
# stderr in $ERR.
expect_rc() {
    local want=$1 rc
    shift
    ERR=$(timeout "$VR_TIMEOUT" "$VMREPLICA" "$@" 2>&1 >/dev/null) && rc=0 || rc=$?
    [ "$rc" = "$want" ] || fail "vmreplica $*: status $rc, want $want ($ERR)"
}
SOCK=$(api_sock primary)

# --- exit statuses --------------------------------------------------------
log "exit statuses"
expect_rc 3 --connect "$TESTDIR/nosuch.sock" vm list
want="vmreplica: error: cannot connect to $TESTDIR/nosuch.sock: No such file or directory: is vmreplicad running? start it (systemctl start vmreplicad), or set VMREPLICA_SOCKET (or --connect) to its STATE_DIR/api.sock"
[ "$ERR" = "$want" ] || fail "unreachable socket: '$ERR', want '$want'"
ERR=$(VMREPLICA_SOCKET=$TESTDIR/nosuch.sock timeout 20 "$VMREPLICA" vm list 2>&1) &&
    fail "vm list on a missing \$VMREPLICA_SOCKET succeeded"
[ "$ERR" = "$want" ] || fail "unreachable \$VMREPLICA_SOCKET: '$ERR'"
expect_rc 4 --connect "$SOCK" vm show nosuch
[ "$ERR" = "vmreplica: error: vm nosuch: not found" ] || fail "vm show nosuch: '$ERR'"
expect_rc 4 --connect "$SOCK" replication measure nosuch
expect_rc 1 --connect "$SOCK" server set --enable
[[ $ERR == "vmreplica: error: replica server: certificate, key and ca are required"* ]] ||
    fail "server set --enable without certificates: '$ERR'"
expect_rc 2 --connect "$SOCK" vm show
expect_rc 2 --connect "$SOCK" vm list --nosuch-option

# --- a fresh server -------------------------------------------------------
log "a fresh server's ports"
port=$(vr primary server show | sed -n 's/^Certificate port: *//p')
[ "$port" = 443 ] || fail "fresh server: Certificate port '$port', want 443"
port=$(vr primary server show | sed -n 's/^Kerberos port: *//p')
[ "$port" = 80 ] || fail "fresh server: Kerberos port '$port', want 80"

# --- events --follow ------------------------------------------------------
log "events --follow"
vr primary vm create before --new-disk 1M >/dev/null || fail "vm create before"
# Not through vr (timeout): the first one's own status is checked at the
# end.
"$VMREPLICA" --connect "$SOCK" events --follow >"$TESTDIR/follow-all.out" \
    2>"$TESTDIR/follow-all.err" &
F_ALL=$!
"$VMREPLICA" --connect "$SOCK" events --follow --vm "my vm" \
    >"$TESTDIR/follow-vm.out" 2>&1 &
F_VM=$!
"$VMREPLICA" --connect "$SOCK" --json events --follow --vm "my vm" \
    >"$TESTDIR/follow-json.out" 2>&1 &
F_JSON=$!
_bg_pids+=("$F_ALL" "$F_VM" "$F_JSON")
# The event of before the follow is shown first (as `events` would).
wait_until 10 grep -q ' info    before  vm created with 1 disk(s)$' "$TESTDIR/follow-all.out" ||
    fail "events --follow: the past event is not shown: $(cat "$TESTDIR/follow-all.out")"
vr primary vm create "my vm" --new-disk 1M >/dev/null || fail "vm create 'my vm'"
vr primary vm create other --new-disk 1M >/dev/null || fail "vm create other"
wait_until 10 grep -q ' info    other  vm created with 1 disk(s)$' "$TESTDIR/follow-all.out" ||
    fail "events --follow: no new event: $(cat "$TESTDIR/follow-all.out")"
grep -q ' info    my vm  vm created with 1 disk(s)$' "$TESTDIR/follow-all.out" ||
    fail "events --follow: no event of 'my vm': $(cat "$TESTDIR/follow-all.out")"
wait_until 10 grep -q 'my vm  vm created with 1 disk(s)$' "$TESTDIR/follow-vm.out" ||
    fail "events --follow --vm: no event: $(cat "$TESTDIR/follow-vm.out")"
wait_until 10 grep -q created "$TESTDIR/follow-json.out" ||
    fail "events --follow --json: no event: $(cat "$TESTDIR/follow-json.out")"
vr primary vm remove "my vm" >/dev/null || fail "vm remove 'my vm'"
wait_until 10 grep -q 'my vm  vm removed$' "$TESTDIR/follow-vm.out" ||
    fail "events --follow --vm: no second event: $(cat "$TESTDIR/follow-vm.out")"
wait_until 10 grep -q removed "$TESTDIR/follow-json.out" ||
    fail "events --follow --json: no second event"
n=$(wc -l <"$TESTDIR/follow-vm.out")
[ "$n" = 2 ] || fail "events --follow --vm 'my vm': $n lines, want 2: $(cat "$TESTDIR/follow-vm.out")"
# Each event once, in order; only that VM's.
got=$(jq -sc 'map([.vm, .level, .message])' "$TESTDIR/follow-json.out") ||
    fail "events --follow --json: not one JSON object per line: $(cat "$TESTDIR/follow-json.out")"
[ "$got" = '[["my vm","info","vm created with 1 disk(s)"],["my vm","info","vm removed"]]' ] ||
    fail "events --follow --json: $got"
jq -se 'map(.id | type == "number") | all' "$TESTDIR/follow-json.out" >/dev/null ||
    fail "events --follow --json: events without an id"
[ "$(grep -c 'vm created' "$TESTDIR/follow-all.out")" = 3 ] ||
    fail "events --follow: an event shown twice or missed: $(cat "$TESTDIR/follow-all.out")"
kill -TERM "$F_VM" "$F_JSON"
wait "$F_VM" "$F_JSON" 2>/dev/null || true

# --- names with spaces are quoted in messages -----------------------------
log "names with spaces"
vr primary vm create "my vm" --new-disk 1M >/dev/null || fail "vm create 'my vm'"
out=$(vr primary vm start "my vm" --no-hypervisor) || fail "vm start 'my vm'"
[ "$(head -1 <<<"$out")" = "vm 'my vm': disks served (no hypervisor)" ] ||
    fail "vm start 'my vm': $out"
out=$(vr primary vm stop "my vm") || fail "vm stop 'my vm'"
[ "$out" = "vm 'my vm' stopped" ] || fail "vm stop 'my vm': $out"
out=$(vr primary vm stop before) || fail "vm stop before"
[ "$out" = "vm before stopped" ] || fail "vm stop before: $out"
expect_rc 4 --connect "$SOCK" vm show "no such"
[ "$ERR" = "vmreplica: error: vm 'no such': not found" ] || fail "vm show 'no such': '$ERR'"

# --- vm stop of a guest that ignores ACPI says so ------------------------
if command -v qemu-system-x86_64 >/dev/null; then
    log "vm stop of a guest that ignores the ACPI power button"
    # No OS on a blank disk: the BIOS ignores the power button, so the
    # daemon waits its 30 s before it kills QEMU; the client says so.
    vr primary vm create deaf --new-disk 1M >/dev/null || fail "vm create deaf"
    vr primary vm start deaf >/dev/null || fail "vm start deaf"
    t0=$SECONDS
    err=$(vr primary vm stop deaf 2>&1 >/dev/null) || fail "vm stop deaf: $err"
    [ "$err" = "vmreplica: waiting for vm deaf to shut down: its guest was sent the ACPI power button and is killed if it still runs after 30 s; 'vmreplica vm stop deaf --force' kills it at once" ] ||
        fail "vm stop of a guest ignoring ACPI ($((SECONDS - t0)) s): '$err'"
    vr primary vm start deaf >/dev/null || fail "vm start deaf again"
    err=$(vr primary vm stop deaf --force 2>&1 >/dev/null) || fail "vm stop --force: $err"
    [ -z "$err" ] || fail "vm stop --force printed '$err'"
else
    log "no qemu-system-x86_64: vm stop's note not checked"
fi

# --- help lists every option of SPEC's command map ------------------------
log "help against SPEC's command map"
# One line per command of SPEC §2's command map: NOUN VERB, then options.
spec_map='server set|--enable --disable --auth --kerberos-port --certificate-port --certificate --key --ca --allow-any --default-storage --monitoring-interval
server show|
auth-entry add|--primary --storage --trust-group
auth-entry list|
auth-entry set|--storage --trust-group
auth-entry remove|
server firewall|enable disable show
server test-connection|--auth
vm create|
vm list|
vm show|
vm start|
vm stop|
vm remove|
replication enable|--replica-server --connect-address --auth --frequency --recovery-history --app-consistent-every --compression --exclude-disk --auto-resync --resync-window --bandwidth-limit
replication set|--connect-address --frequency --recovery-history --app-consistent-every --compression --exclude-disk --auto-resync --resync-window --bandwidth-limit
replication reverse|
replication show|
replication list|--state --health --mode
replication measure|
replication suspend|
replication resume|--resync --at --continue
replication stop-resync|
replication remove|
replication reset-stats|
initial-replication start|--at --export --use-existing
initial-replication import|--from
initial-replication stop|
points list|
failover prepare|
failover start|--test --point
failover complete|
failover stop|--test
vm set-failover-network|
vm set-test-network|
events|--vm --follow'
# planned CMD [OPT] — docs/cmdlets.md has a row naming CMD (or, given,
# OPT: its rows name options alone) whose status is "planned".
planned() {
    local what="\`$1"
    [ -z "${2:-}" ] || what="$2"
    grep -F -- "$what" "$SOURCE_DIR/docs/cmdlets.md" | grep -q '| planned'
}
missing=()
while IFS='|' read -r cmdname opts; do
    # shellcheck disable=SC2086 # NOUN VERB are two words
    if ! help=$("$VMREPLICA" help $cmdname 2>/dev/null); then
        planned "$cmdname" || missing+=("$cmdname (no such command)")
        continue
    fi
    for o in $opts; do
        grep -qe "$o\\b" <<<"$help" && continue
        planned "$cmdname" "$o" || missing+=("$cmdname $o")
    done
done <<<"$spec_map"
[ "${#missing[@]}" = 0 ] ||
    fail "vmreplica help lacks SPEC options (not planned in docs/cmdlets.md): ${missing[*]}"
# The overview lists every command with its summary.
"$VMREPLICA" help | grep -q '^  events  *show recent events' || fail "help: no events line"

# --- --json on every command that prints something ------------------------
log "--json everywhere"
vr primary auth-entry add --primary 'p.test.local' --storage "$TESTDIR/st" >/dev/null ||
    fail "auth-entry add"
json_ok() { # ARGS… — `vr primary --json ARGS…` prints one JSON value
    local out
    out=$(vr primary --json "$@") || fail "--json $*: failed"
    jq -e . <<<"$out" >/dev/null || fail "--json $*: not JSON: $out"
}
json_ok server show
json_ok server firewall show
json_ok vm list
json_ok vm show before
json_ok vm create j1 --new-disk 1M
json_ok vm set-test-network j1 none
json_ok vm start j1 --no-hypervisor
json_ok vm stop j1
json_ok vm remove j1
json_ok replication list
json_ok auth-entry list
json_ok auth-entry set p.test.local --max-vms 3
json_ok auth-entry remove p.test.local
json_ok events
# --json after the command's arguments works too.
out=$(vr primary vm list --json) && jq -e 'type == "object"' <<<"$out" >/dev/null ||
    fail "vm list --json: $out"

# --- the follower ends with status 3 when the daemon goes away ------------
log "events --follow when the daemon stops"
stop_daemon primary
rc=0
wait_until 10 eval '! kill -0 "$F_ALL" 2>/dev/null' ||
    fail "events --follow still runs after the daemon stopped"
wait "$F_ALL" || rc=$?
[ "$rc" = 3 ] || fail "events --follow: status $rc after the daemon stopped, want 3"
grep -q "^vmreplica: error: cannot connect to $SOCK: " "$TESTDIR/follow-all.err" ||
    fail "events --follow: $(cat "$TESTDIR/follow-all.err")"
log "ok"
