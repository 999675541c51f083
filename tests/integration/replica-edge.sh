#!/bin/bash
# replica-edge.sh — two Replica-server edge cases found in review:
#
# 1. Re-configuring the replica listener (server set --certificate-port)
#    while a cycle upload is in flight must neither hang the daemon nor
#    drop the upload's bookkeeping: the old listener stops accepting at
#    once and finishes its requests on its own; the API stays alive and the
#    new port serves.
# 2. `replication remove` while the Replica server is down cannot tell it;
#    the primary then changes the disk (a discard) and enables replication
#    again.  The registration must start the relationship afresh (reset the
#    kept Replica disk) so initial replication, which sends allocated
#    regions only, leaves the replica byte-identical.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp timeout
requires_build

setup_pair

# --- 1. listener restart during an upload ----------------------------------
vm=edge1
create_vm "$vm" 16M
enable_replication "$vm" --frequency 1s
vr primary replication suspend "$vm" >/dev/null
sleep 2
uuid=$(jget primary .uuid vm show "$vm")
staged=$(repl replica "$vm" last_cycle)
log "start a slow upload of cycle $((staged + 1)), then move the listener"
(
    printf 'X'
    sleep 30
) | curl -sS --max-time 40 -o /dev/null \
    --resolve "replica.test.local:$REPLICA_PORT:127.0.0.1" \
    --cacert "$PKI/ca.pem" --cert "$PKI/primary.pem" --key "$PKI/primary.key" \
    -X PUT -H 'Expect:' -H "X-Vmreplica-Epoch: 1" \
    -H 'Content-Type: application/octet-stream' -T - \
    "https://replica.test.local:$REPLICA_PORT/r1/vms/$uuid/cycles/$((staged + 1))" \
    >/dev/null 2>&1 &
upload=$!
_bg_pids+=("$upload")
sleep 2
newport=$(free_port)
timeout 15 "$VMREPLICA" --connect "$(api_sock replica)" server set \
    --certificate-port "$newport" >/dev/null ||
    fail "server set --certificate-port hung or failed during an upload"
timeout 5 "$VMREPLICA" --connect "$(api_sock replica)" vm list >/dev/null ||
    fail "the replica's API died after moving the listener"
wait_until 10 port_open "$newport" || fail "new port $newport not listening"
port_open "$REPLICA_PORT" && fail "old port $REPLICA_PORT still accepts"
log "listener moved to $newport during an upload; API alive"
kill "$upload" 2>/dev/null || true

# The primary follows the move: point it at the new port and resume.
vr primary replication remove "$vm" >/dev/null || fail "remove $vm"
REPLICA_PORT=$newport

# --- 2. re-enable after a remove the replica never heard of ----------------
vm=edge2
create_vm "$vm" 16M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 1M' -c 'write -P 0x22 8M 1M' \
    >/dev/null
enable_replication "$vm" --frequency 1s
wait_converged "$vm" 60
assert_identical "$vm"
log "remove replication while the Replica server is down"
stop_daemon replica
vr primary replication remove "$vm" >/dev/null ||
    fail "remove with the replica down"
qemu-io -f raw "$uri" -c 'discard 8M 1M' >/dev/null
start_daemon replica
wait_until 10 port_open "$REPLICA_PORT" || fail "replica port after restart"
[ "$(repl replica "$vm" initial_done)" = true ] ||
    fail "setup: the replica should still believe it is replicating"
enable_replication "$vm" --frequency 1s
wait_converged "$vm" 60
assert_identical "$vm"
log "re-enabled after an unheard remove: replica byte-identical"
log "PASS"
