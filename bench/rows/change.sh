#!/usr/bin/env bash
# bench row 3: 5 % of a 2 GiB image changed in random 4 KiB blocks (random
# data), until the Replica server applied it, against rsync's best setting
# for an image (`rsync --inplace --no-whole-file -B 4096`, local, so no
# network but its own pipe): time (target <= 0.1x) and bytes on the wire
# (target <= 1x).  The same blocks change on both sides (one seed a round).
source "$(dirname "$0")/../../tests/integration/functions.sh"
source "$(dirname "$0")/../lib.sh"
requires qemu-img jq rsync python3 numfmt
requires_build
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed"

SIZE=${BENCH_CHANGE_SIZE:-$([ "$SMOKE" = 1 ] && echo 32M || echo 2G)}
bytes=$(size_of "$SIZE")
vmlike "$TESTDIR/src.raw" "$bytes" "$bytes" 3
bench_pki
setup_pair >/dev/null
vm=c1
vr primary vm create "$vm" --disk "$TESTDIR/src.raw" >/dev/null || fail "vm create"
vr primary vm start "$vm" --no-hypervisor >/dev/null || fail "vm start"
enable_replication "$vm" --frequency 1s
wait_converged "$vm" 600
# rsync's pair: the source changes as the VM's disk does; the destination
# is the copy before.
mv "$TESTDIR/src.raw" "$TESTDIR/rs-src.raw"
cp --sparse=always "$TESTDIR/rs-src.raw" "$TESTDIR/rs-dst.raw"

# change SEED — write the same 5 % of random 4 KiB blocks into the VM (over
# NBD, 16 in flight) and into rsync's source.
change() {
    /usr/bin/python3 - "$(nbd_uri primary "$vm")" "$TESTDIR/rs-src.raw" "$bytes" "$1" <<'PY'
import nbd, random, sys
uri, path, size, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
blocks = rnd.sample(range(size // 4096), size // 4096 * 5 // 100)
h = nbd.NBD()
h.connect_uri(uri)
with open(path, "r+b") as f:
    for b in blocks:
        buf = rnd.randbytes(4096)
        while h.aio_in_flight() >= 16:
            h.poll(-1)
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(buf)), b * 4096)
        f.seek(b * 4096)
        f.write(buf)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
h.shutdown()
PY
}

ours=() peer=() wire=() rwire=()
for round in $(seq "$ROUNDS"); do
    w0=$(jget primary .bytes_sent_wire replication measure "$vm")
    change "$round"
    t0=$(now_ms)
    bench_converged "$vm" 600
    ours+=($(( $(now_ms) - t0 )))
    wire+=($(( $(jget primary .bytes_sent_wire replication measure "$vm") - w0 )))
    t0=$(now_ms)
    st=$(rsync --inplace --no-whole-file -B 4096 --ignore-times --stats \
        "$TESTDIR/rs-src.raw" "$TESTDIR/rs-dst.raw") || fail "rsync"
    peer+=($(( $(now_ms) - t0 )))
    s=$(awk -F': ' '/^Total bytes sent/ { gsub(/,/, "", $2); print $2 }' <<<"$st")
    r=$(awk -F': ' '/^Total bytes received/ { gsub(/,/, "", $2); print $2 }' <<<"$st")
    rwire+=($(( s + r )))
done
assert_identical "$vm" >/dev/null
cmp "$TESTDIR/rs-src.raw" "$TESTDIR/rs-dst.raw" || fail "rsync's copy differs"
o=$(median "${ours[@]}") p=$(median "${peer[@]}")
r=$(ratio "$o" "$p")
result "5 % of $SIZE changed (4 KiB blocks): time to applied (ms)" "$o" \
    "$p (rsync -B 4096)" "$r" "<= 0.1" "$(met_le "$r" 0.1)"
o=$(median "${wire[@]}") p=$(median "${rwire[@]}")
r=$(ratio "$o" "$p")
result "5 % of $SIZE changed: bytes on the wire" "$o" "$p (rsync)" "$r" \
    "<= 1.0" "$(met_le "$r" 1.0)"
