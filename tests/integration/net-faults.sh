#!/bin/bash
# net-faults: replication through a proxy that breaks the network
# (tests/tools/faultproxy.c; this kernel has no netem).
#
# The primary reaches the Replica server through faultproxy while a writer
# changes the VM's disk and cycles go every second.  One after the other,
# for 6 s each: connections cut (FIN) after 20 kB, reset (RST) after 5 kB,
# an answer lost after 20 kB of requests (the request was applied, so the
# primary's retry delivers it twice), 300 ms of delay on every chunk, a 300 kB/s throttle, a hang (nothing
# forwarded, connections kept open), new connections refused.  Then:
#   - replication never left Replicating (every fault is retried, none is
#     taken for the end of replication), and the faults did fail attempts
#     (replication_errors > 0) and cut connections (the proxy's count);
#   - once the network is clean and the writer stopped, the replica
#     converges to a byte-identical copy.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp numfmt
requires_build
FAULTPROXY=$BUILD_DIR/tests/tools/faultproxy
[ -x "$FAULTPROXY" ] || skip "faultproxy not built"

setup_pair

PPORT=$(free_port)
FP_CTL=$TESTDIR/fp.ctl
"$FAULTPROXY" "$PPORT" "$REPLICA_PORT" "$FP_CTL" >"$TESTDIR/fp.log" 2>&1 &
_bg_pids+=("$!")
wait_until 5 port_open "$PPORT" || fail "faultproxy did not start"

# fp COMMAND — one command to the proxy; prints its reply.
fp() {
    python3 - "$FP_CTL" "$*" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
r = s.recv(200).decode().strip()
print(r)
sys.exit(0 if r.startswith("OK") else 1)
EOF
}

vm=net1
create_vm "$vm" 64M
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 0x11 0 4M' >/dev/null
log "enable replication through the proxy (port $PPORT), every second"
vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$PPORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s \
    >/dev/null || fail "replication enable"
vr primary initial-replication start "$vm" --wait >/dev/null ||
    fail "initial-replication start --wait"
wait_converged "$vm" 60
start_writer "$vm" 64k

for fault in "cut 20000" "rst 5000" "lose 20000" "delay 300" "throttle 300000" hang refuse; do
    log "fault: $fault, for 6 s"
    fp "$fault" >/dev/null || fail "faultproxy refused '$fault'"
    for _ in 1 2 3 4 5 6; do
        st=$(repl primary "$vm" state)
        [ "$st" = Replicating ] ||
            fail "under '$fault' the primary went $st: $(repl primary "$vm" last_error)"
        sleep 1
    done
    fp pass >/dev/null
    sleep 2
done
stop_writer

stats=$(fp stats)
log "proxy: $stats"
read -r _ _ conns _ _ _ _ _ cuts <<<"$stats"
[ "$cuts" -ge 3 ] || fail "the proxy cut $cuts times, want 3 (cut, rst, lose)"
[ "$conns" -ge 3 ] || fail "only $conns connections through the proxy"
errors=$(jget primary .replication_errors replication measure "$vm")
[ "$errors" -gt 0 ] || fail "no replication attempt failed: the faults did not bite"
log "$errors failed attempts, all retried"

wait_converged "$vm" 120
assert_replicating "$vm"
assert_identical "$vm"
log "PASS"
