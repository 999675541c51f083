#!/bin/bash
# net-partition: network partitions between the primary and the Replica
# server, each daemon in its own network namespace joined by a veth pair,
# while a writer changes the VM's disk and cycles go every second.
#
# Each round picks, seeded (SEED), a partition and how long it lasts:
#   drop-in    nftables in the Replica server's namespace drops everything
#              that arrives on the veth (SYNs and established flows hang);
#   drop-both  the same in both namespaces, both directions;
#   reject     the Replica server answers new and established packets
#              with a TCP reset / port unreachable;
#   link-down  the veth is set down on the primary's side;
# then heals it (the table deleted, the link up).  Checked: the primary
# never leaves Replicating and never fails a guest write (the writer's
# qemu-io), the partitions failed attempts (replication_errors grows), and
# after the last heal, with the writer stopped, the replica converges
# byte-identical.
#
# CI: ROUNDS=4 rounds of 3-5 s (about 25 s after setup).  SOAK=1: SOAK_ROUNDS
# (default 30) rounds of 5-60 s.
source "$(dirname "$0")/functions.sh"
requires ip nft qemu-io jq curl openssl nbdkit python3 cmp numfmt timeout
requires_build

SEED=${SEED:-1}
ROUNDS=${ROUNDS:-4}
MIN_S=3 MAX_S=5
if [ "${SOAK:-0}" != 0 ]; then ROUNDS=${SOAK_ROUNDS:-30}; MIN_S=5 MAX_S=60; fi
RANDOM=$SEED

NS_P=vrnp-p-$$
NS_R=vrnp-r-$$
ADDR_P=10.233.0.2
ADDR_R=10.233.0.1
ip netns add "$NS_R" 2>/dev/null || skip "cannot create a network namespace (ip netns add)"
cleanup_fn ip netns del "$NS_R"
ip netns add "$NS_P" || fail "ip netns add $NS_P"
cleanup_fn ip netns del "$NS_P"
# Stop the daemons before their namespaces go (cleanups run last-first).
cleanup_fn stop_daemon replica
cleanup_fn stop_daemon primary
in_r() { ip netns exec "$NS_R" "$@"; }
in_p() { ip netns exec "$NS_P" "$@"; }
ip -n "$NS_R" link set lo up && ip -n "$NS_P" link set lo up &&
    ip link add vrnp0 netns "$NS_R" type veth peer name vrnp1 netns "$NS_P" &&
    ip -n "$NS_R" addr add "$ADDR_R/24" dev vrnp0 &&
    ip -n "$NS_P" addr add "$ADDR_P/24" dev vrnp1 &&
    ip -n "$NS_R" link set vrnp0 up && ip -n "$NS_P" link set vrnp1 up ||
    fail "veth pair between $NS_R and $NS_P"
in_r nft -f - <<'EOT' || skip "nftables does not work in a network namespace here"
table inet vrnp_probe {
    chain input { type filter hook input priority 0; }
}
EOT
in_r nft delete table inet vrnp_probe

pair_pki
DAEMON_NETNS_replica=$NS_R
DAEMON_NETNS_primary=$NS_P
start_daemon replica
start_daemon primary
vr replica server set --enable --auth certificate \
    --certificate-port "$REPLICA_PORT" \
    --certificate "$PKI/replica.pem" --key "$PKI/replica.key" \
    --ca "$PKI/ca.pem" --allow-any \
    --default-storage "$TESTDIR/replica-storage" >/dev/null ||
    fail "replica: server set"
vr primary server set --certificate "$PKI/primary.pem" \
    --key "$PKI/primary.key" --ca "$PKI/ca.pem" >/dev/null ||
    fail "primary: server set"
wait_until 10 in_p bash -c "exec 3<>/dev/tcp/$ADDR_R/$REPLICA_PORT" 2>/dev/null ||
    fail "replica: port $REPLICA_PORT not reachable from the primary's namespace"

vm=part1
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 4M' >/dev/null || fail "first write"
vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address "$ADDR_R" --auth certificate --frequency 1s \
    >/dev/null || fail "replication enable"
vr primary initial-replication start "$vm" --wait >/dev/null ||
    fail "initial-replication start --wait"
wait_converged "$vm" 60
start_writer "$vm" 64k

partition() { # KIND
    case $1 in
    drop-in) in_r nft -f - <<'EOT' ;;
table inet vrnp {
    chain input { type filter hook input priority 0; iifname "vrnp0" drop; }
}
EOT
    drop-both)
        in_r nft -f - <<'EOT' &&
table inet vrnp {
    chain input { type filter hook input priority 0; iifname "vrnp0" drop; }
    chain output { type filter hook output priority 0; oifname "vrnp0" drop; }
}
EOT
        in_p nft -f - <<'EOT' ;;
table inet vrnp {
    chain input { type filter hook input priority 0; iifname "vrnp1" drop; }
    chain output { type filter hook output priority 0; oifname "vrnp1" drop; }
}
EOT
    reject) in_r nft -f - <<'EOT' ;;
table inet vrnp {
    chain input {
        type filter hook input priority 0;
        iifname "vrnp0" meta l4proto tcp reject with tcp reset
        iifname "vrnp0" reject
    }
}
EOT
    link-down) ip -n "$NS_P" link set vrnp1 down ;;
    esac
}
heal() { # KIND
    case $1 in
    link-down) ip -n "$NS_P" link set vrnp1 up ;;
    drop-both) in_r nft delete table inet vrnp && in_p nft delete table inet vrnp ;;
    *) in_r nft delete table inet vrnp ;;
    esac
}

kinds=(drop-in drop-both reject link-down)
errors0=$(jget primary .replication_errors replication measure "$vm")
total_s=0
for ((round = 1; round <= ROUNDS; round++)); do
    # The first four rounds take each kind once, in a seeded order.
    if [ "$round" -le 4 ]; then
        k=${kinds[(SEED + round) % 4]}
    else
        k=${kinds[RANDOM % 4]}
    fi
    secs=$((MIN_S + RANDOM % (MAX_S - MIN_S + 1)))
    log "round $round: $k for ${secs}s"
    partition "$k" || fail "partition $k"
    for ((s = 0; s < secs; s++)); do
        st=$(repl primary "$vm" state)
        [ "$st" = Replicating ] ||
            fail "during $k the primary went $st: $(repl primary "$vm" last_error)"
        kill -0 "$WRITER_PID" 2>/dev/null ||
            { stop_writer; fail "the writer stopped during $k"; }
        sleep 1
    done
    heal "$k" || fail "heal $k"
    total_s=$((total_s + secs))
    sleep 2
done
stop_writer
errors=$(jget primary .replication_errors replication measure "$vm")
[ "$errors" -gt "$errors0" ] ||
    fail "no replication attempt failed during the partitions: they did not bite"
wait_converged "$vm" 180
assert_replicating "$vm"
assert_identical "$vm"
log "partitions: $ROUNDS rounds, ${total_s}s partitioned (seed $SEED), $((errors - errors0)) failed attempts, all retried; $(tail -1 "$TESTDIR/writer-$vm.log")"
log "PASS"
