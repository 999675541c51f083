#!/usr/bin/env bash
# bench row 2: ship + apply throughput.  1 GiB of VM-like data (lib.sh
# vmlike: text, binaries, mostly-zero tables) written into a replicating
# VM at a 1 s frequency (qemu-img convert into its NBD export, as fast as
# it goes), timed from the first write until the Replica server has
# applied it all (bench_converged: nothing pending on the primary, the
# replica's applied cycle at the primary's last), over loopback mutual TLS
# (setup_pair: certificate authentication) with zstd (--compression on:
# level 1, the daemon's only level).  Against the local limit: the same
# data through `zstd -1 -c | zstd -d -c` into a file, then sync.  MB/s of
# data, target >= 0.6x.
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

# ours: write the data into the VM, then wait until it is applied.
run_ours() {
    local t0
    t0=$(now_ms)
    qemu-img convert -n -f raw -O raw "$TESTDIR/src.raw" "$uri" ||
        fail "qemu-img convert into $uri"
    local t1
    t1=$(now_ms)
    bench_converged "$vm" 900
    ours+=($(( $(now_ms) - t0 )))
    log "ours: written in $((t1 - t0)) ms, applied $(( $(now_ms) - t1 )) ms later" >&2
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

ours=() peer=()
w0=$(jget primary .bytes_sent_wire replication measure "$vm")
for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        run_peer; run_ours
    else
        run_ours; run_peer
    fi
done
wire=$(( ($(jget primary .bytes_sent_wire replication measure "$vm") - w0) / ROUNDS ))
assert_identical "$vm" >/dev/null
o=$(median "${ours[@]}") p=$(median "${peer[@]}")
mbps() { awk -v b="$bytes" -v ms="$1" 'BEGIN { printf "%.0f", b / 1e3 / ms }'; }
r=$(ratio "$p" "$o")
result "ship + apply $SIZE VM-like data, 1 s cycles, mTLS + zstd ($((wire >> 20)) MiB on the wire; MB/s)" \
    "$(mbps "$o")" "$(mbps "$p") (zstd -1 | zstd -d > file)" "$r" ">= 0.6" "$(met_ge "$r" 0.6)"
