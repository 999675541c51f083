#!/usr/bin/env bash
# bench row 2: ship + apply throughput.  1 GiB of VM-like data (lib.sh
# vmlike: text, binaries, mostly-zero tables) changed in a replicating VM
# (qemu-img convert into its NBD export), over loopback mutual TLS
# (setup_pair: certificate authentication) with zstd (--compression on:
# level 1, the daemon's only level).  Against the local limit: the same
# data through `zstd -1 -c | zstd -d -c` into a file, then sync.  MB/s of
# data, two figures a round:
#   ship + apply: the data written with replication suspended, timed from
#     `replication resume` until the Replica server has applied it all
#     (bench_converged: nothing pending on the primary, the replica's
#     applied cycle at the primary's last).  The peer, too, starts from
#     data at rest: this is the figure with the target, >= 0.6x.
#   write + ship + apply: the same data written at 1 s cycles, timed from
#     the first write (the guest's own write, 1-2 s here, competes with
#     the cycles it makes for the two CPUs); reported.
source "$(dirname "$0")/../../tests/integration/functions.sh"
source "$(dirname "$0")/../lib.sh"
requires qemu-img zstd jq python3 numfmt
requires_build

SIZE=${BENCH_SHIP_SIZE:-$([ "$SMOKE" = 1 ] && echo 16M || echo 1G)}
bytes=$(size_of "$SIZE")
vmlike "$TESTDIR/src.raw" "$bytes" "$bytes" 5
bench_pki
setup_pair >/dev/null
vm=s1
create_vm "$vm" "$SIZE"
enable_replication "$vm" --frequency 1s --compression on
[ "$(repl primary "$vm" compression)" = true ] || fail "compression is off"
uri=$(nbd_uri primary "$vm")

# run_ours — written at 1 s cycles, timed from the first write.
run_ours() {
    local t0
    t0=$(now_ms)
    qemu-img convert -n -f raw -O raw "$TESTDIR/src.raw" "$uri" ||
        fail "qemu-img convert into $uri"
    local t1
    t1=$(now_ms)
    bench_converged "$vm" 900
    full+=($(( $(now_ms) - t0 )))
    log "write + ship + apply: written in $((t1 - t0)) ms, applied $(( $(now_ms) - t1 )) ms later" >&2
}
# run_ship — written while suspended, timed from the resume.
run_ship() {
    vr primary replication suspend "$vm" >/dev/null || fail "suspend"
    # Nothing in flight, and the shipper has seen the suspension (it looks
    # at least once a second at 1 s cycles) before the data is written.
    bench_converged "$vm" 900
    sleep 1.1
    local l0
    l0=$(repl primary "$vm" last_cycle)
    qemu-img convert -n -f raw -O raw "$TESTDIR/src.raw" "$uri" ||
        fail "qemu-img convert into $uri"
    [ "$(repl primary "$vm" last_cycle)" = "$l0" ] ||
        fail "a cycle was sent while suspended"
    local w0 t0
    w0=$(jget primary .bytes_sent_wire replication measure "$vm")
    t0=$(now_ms)
    vr primary replication resume "$vm" >/dev/null || fail "resume"
    bench_converged "$vm" 900
    ours+=($(( $(now_ms) - t0 )))
    wire+=($(( $(jget primary .bytes_sent_wire replication measure "$vm") - w0 )))
    log "ship + apply: applied $(( $(now_ms) - t0 )) ms after the resume" >&2
}
# the local limit: compress, decompress, write, sync.
run_peer() {
    local t0
    t0=$(now_ms)
    zstd -q -1 -c "$TESTDIR/src.raw" | zstd -q -d -c >"$TESTDIR/peer.raw" ||
        fail "zstd"
    sync -f "$TESTDIR/peer.raw"
    peer+=($(( $(now_ms) - t0 )))
    rm -f "$TESTDIR/peer.raw"
}

ours=() full=() peer=() wire=()
for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        run_peer; run_ship; run_ours
    else
        run_ours; run_ship; run_peer
    fi
done
assert_identical "$vm" >/dev/null
o=$(median "${ours[@]}") f=$(median "${full[@]}") p=$(median "${peer[@]}")
w=$(median "${wire[@]}")
mbps() { awk -v b="$bytes" -v ms="$1" 'BEGIN { printf "%.0f", b / 1e3 / ms }'; }
r=$(ratio "$p" "$o")
result "ship + apply $SIZE VM-like data, mTLS + zstd, from the resume ($((w >> 20)) MiB on the wire; MB/s)" \
    "$(mbps "$o")" "$(mbps "$p") (zstd -1 | zstd -d > file)" "$r" ">= 0.6" "$(met_ge "$r" 0.6)"
r=$(ratio "$p" "$f")
result "write + ship + apply $SIZE at 1 s cycles, from the first write (MB/s)" \
    "$(mbps "$f")" "$(mbps "$p") (zstd -1 | zstd -d > file)" "$r" "report" "-"
