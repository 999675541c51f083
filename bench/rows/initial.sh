#!/usr/bin/env bash
# bench row 4: initial replication of a sparse disk (8 GiB holding 1 GiB of
# VM-like data) until Replicating, against a local `qemu-img convert` of the
# same image (target <= 1.5x); then, the replication removed and 1 % of
# the data changed, initial replication by --use-existing against hashing
# both images once with xxh3 (xxhsum -H2) — and the bytes it sent.
source "$(dirname "$0")/../../tests/integration/functions.sh"
source "$(dirname "$0")/../lib.sh"
requires qemu-img qemu-io jq xxhsum python3 numfmt
requires_build

SIZE=${BENCH_INITIAL_SIZE:-$([ "$SMOKE" = 1 ] && echo 64M || echo 8G)}
DATA=${BENCH_INITIAL_DATA:-$([ "$SMOKE" = 1 ] && echo 8M || echo 1G)}
vmlike "$TESTDIR/src.raw" "$(size_of "$SIZE")" "$(size_of "$DATA")" 1
bench_pki
setup_pair >/dev/null

ours=() peer=()
for round in $(seq "$ROUNDS"); do
    t0=$(now_ms)
    qemu-img convert -f raw -O raw "$TESTDIR/src.raw" "$TESTDIR/conv.raw"
    sync -f "$TESTDIR/conv.raw"
    peer+=($(( $(now_ms) - t0 )))
    rm -f "$TESTDIR/conv.raw"

    vm=i$round
    vr primary vm create "$vm" --disk "$TESTDIR/src.raw" >/dev/null || fail "vm create"
    vr primary vm start "$vm" --no-hypervisor >/dev/null || fail "vm start"
    t0=$(now_ms)
    enable_replication "$vm" --frequency 30s
    ours+=($(( $(now_ms) - t0 )))
    repl_is primary "$vm" state Replicating || fail "state $(repl primary "$vm" state)"
done
o=$(median "${ours[@]}") p=$(median "${peer[@]}")
r=$(ratio "$o" "$p")
result "initial replication, $SIZE sparse holding $DATA (ms)" "$o" \
    "$p (qemu-img convert)" "$r" "<= 1.5" "$(met_le "$r" 1.5)"

# --use-existing: the copy the last round left on the Replica server, 1 %
# of the data rewritten on the primary in 64 KiB pieces.
vm=i$ROUNDS
vr primary replication remove "$vm" >/dev/null || fail "replication remove"
uri=$(nbd_uri primary "$vm")
n=$(( $(size_of "$DATA") / 100 / 65536 ))
[ "$n" -ge 1 ] || n=1
cmds=()
for i in $(seq "$n"); do
    # Inside the data extents vmlike wrote (1 MiB each, spread evenly).
    cmds+=(-c "write -P $((i % 250 + 1)) $(( (i * 7919 % ($(size_of "$DATA") >> 20)) * ($(size_of "$SIZE") / $(size_of "$DATA")) << 20 )) 64k")
done
qemu-io -f raw "$uri" "${cmds[@]}" >/dev/null || fail "qemu-io"
t0=$(now_ms)
vr primary replication enable "$vm" \
    --replica-server "replica.test.local:$REPLICA_PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 30s >/dev/null ||
    fail "replication enable"
vr primary initial-replication start "$vm" --use-existing --wait >/dev/null ||
    fail "initial-replication start --use-existing"
o=$(( $(now_ms) - t0 ))
sent=$(jget primary .initial_replication_sent replication measure "$vm")
t0=$(now_ms)
xxhsum -H2 "$(disk_path primary "$vm")" "$(disk_path replica "$vm")" >/dev/null
p=$(( $(now_ms) - t0 ))
r=$(ratio "$o" "$p")
result "initial --use-existing, $((n * 64)) KiB of $DATA different (ms)" "$o" \
    "$p (xxh3 of both images)" "$r" "report" "-"
r=$(ratio "$sent" $((n * 65536)))
result "initial --use-existing: chunk bytes sent" "$sent" \
    "$((n * 65536)) (bytes changed)" "$r" "<= 1.0" "$(met_le "$r" 1.0)"
