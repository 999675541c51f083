#!/usr/bin/env bash
# bench row 7: one Replica server taking 50 VMs (one primary daemon) at a
# 30 s frequency, each VM with a modest writer (64 KiB pieces of VM-like
# data at random places, 128 KiB/s a VM), for CYCLES cycles of every VM:
# - missed cycles: the primaries' missed_replication_count (a cycle is
#   missed when the next falls due before it was sent), summed over the
#   VMs, target 0;
# - CPU per MB applied on the Replica server: vmreplicad's user + system
#   time (and its children's, /proc/PID/stat) over the cycles, divided by
#   the cycles' data (bytes_sent_raw: the payload before compression, what
#   the replica decompresses and applies), reported.
# Smoke: 3 VMs at 1 s, one cycle.
source "$(dirname "$0")/../../tests/integration/functions.sh"
source "$(dirname "$0")/../lib.sh"
requires jq python3 numfmt
requires_build
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed"

if [ "$SMOKE" = 1 ]; then
    N=${BENCH_SCALE_VMS:-3} FREQ=${BENCH_SCALE_FREQ:-1} CYCLES=${BENCH_SCALE_CYCLES:-1}
    DISK=${BENCH_SCALE_DISK:-64M} RATE=${BENCH_SCALE_RATE:-256k}
else
    N=${BENCH_SCALE_VMS:-50} FREQ=${BENCH_SCALE_FREQ:-30} CYCLES=${BENCH_SCALE_CYCLES:-3}
    DISK=${BENCH_SCALE_DISK:-256M} RATE=${BENCH_SCALE_RATE:-128k}
fi
vmlike "$TESTDIR/data.raw" $((16 << 20)) $((16 << 20)) 7
bench_pki
setup_pair >/dev/null
uris=()
for i in $(seq "$N"); do
    create_vm "sc$i" "$DISK"
    enable_replication "sc$i" --frequency "${FREQ}s"
    uris+=("$(nbd_uri primary "sc$i")")
done

# sum_measure KEY — KEY of `replication measure` summed over the VMs.
sum_measure() {
    local i s=0 v
    for i in $(seq "$N"); do
        v=$(jget primary ".$1" replication measure "sc$i") || fail "measure sc$i"
        s=$((s + v))
    done
    echo "$s"
}
# cycles_done MIN — true once every VM's last cycle is at least MIN[i].
# replica_caught_up — true once the replica applied every VM's last cycle.
cycles_done() {
    vrj primary replication list | jq -e --argjson min "$1" \
        '[.replications[] | select(.last_cycle < $min[.vm])] | length == 0' >/dev/null
}
replica_caught_up() {
    jq -e -n --argjson p "$(vrj primary replication list)" \
        --argjson r "$(vrj replica replication list)" '
        ($p.replications | map({(.vm): .last_cycle}) | add) as $last
        | [$r.replications[] | select(.applied_cycle < $last[.vm])] | length == 0' >/dev/null
}

# The writers: one process, every VM's export, a 64 KiB piece a VM every
# 64 KiB / RATE seconds.
/usr/bin/python3 - "$TESTDIR/data.raw" "$(size_of "$DISK")" "$(size_of "${RATE^^}")" \
    "$TESTDIR/writers.stop" "${uris[@]}" >"$TESTDIR/writers.log" 2>&1 <<'PY' &
import nbd, os, random, sys, time
data, size, rate, stop, uris = open(sys.argv[1], "rb").read(), int(sys.argv[2]), \
    int(sys.argv[3]), sys.argv[4], sys.argv[5:]
P = 65536
rnd = random.Random(13)
hs = []
for u in uris:
    h = nbd.NBD()
    h.connect_uri(u)
    hs.append(h)
period = P / rate
nxt = time.monotonic()
n = 0
while not os.path.exists(stop):
    for h in hs:
        src = rnd.randrange(len(data) // P) * P
        h.pwrite(data[src:src + P], rnd.randrange(size // P) * P)
    n += len(hs)
    nxt += period
    time.sleep(max(0, nxt - time.monotonic()))
for h in hs:
    h.flush()
    h.shutdown()
print("writers: %d pieces" % n)
PY
WPID=$!
_bg_pids+=("$WPID")

min=$(vrj primary replication list |
    jq -c --argjson k "$CYCLES" '.replications | map({(.vm): (.last_cycle + $k)}) | add')
m0=$(sum_measure missed_replication_count)
r0=$(sum_measure bytes_sent_raw)
c0=$(cpu_ms "${DAEMON_PID[replica]}")
wait_until $((CYCLES * FREQ * 3 + 60)) cycles_done "$min" ||
    fail "not every VM shipped $CYCLES cycle(s) in time: $(vrj primary replication list | jq -c '[.replications[] | {vm, last_cycle}]')"
touch "$TESTDIR/writers.stop"
wait "$WPID" || fail "writers: $(tail -3 "$TESTDIR/writers.log")"
m1=$(sum_measure missed_replication_count)
r1=$(sum_measure bytes_sent_raw)
wait_until 120 replica_caught_up || fail "the replica did not apply every cycle sent"
c1=$(cpu_ms "${DAEMON_PID[replica]}")

missed=$((m1 - m0)) mb=$(awk -v b=$((r1 - r0)) 'BEGIN { printf "%.1f", b / 1e6 }')
result "$N VMs at ${FREQ} s, $CYCLES cycle(s) each, $RATE/s a VM: missed cycles" \
    "$missed" "-" "-" "0" "$([ "$missed" = 0 ] && echo met || echo "not met")"
result "$N VMs at ${FREQ} s: Replica server CPU per MB applied ($mb MB; ms/MB)" \
    "$(awk -v c=$((c1 - c0)) -v m="$mb" 'BEGIN { printf "%.1f", (m > 0 ? c / m : 0) }')" \
    "-" "-" "report" "-"
