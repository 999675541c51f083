#!/bin/bash
# replica-crash-many: the Replica server killed while it receives and
# applies cycles of several VMs from several primaries at once (issue #9's
# harness, Replica side).
#
# Two primary daemons ("primary" and "primary2"), two VMs each, replicate
# every second to one Replica server while a libnbd writer per VM keeps 16
# writes, zeroes and trims in flight.  ROUNDS times (default 4; SOAK=1:
# 40) the Replica server dies: by SIGKILL at a random moment, or restarted
# with a fault point that kills it inside its work (receiving a chunk,
# applying a record, after applying before committing, capturing undo
# data).  Then every VM's replication is suspended on its primary (nothing
# more arrives), the Replica server restarts (its start-up recovery runs
# before its socket opens) and every replica disk must equal its primary's
# disk at one of that primary's seals (the plugin's hashlog) — never a mix
# of two cycles — and be at least as new as before the crash.  Replication
# resumes; at the end the writers stop and every replica must converge
# byte for byte.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit cmp sha256sum
requires_build
/usr/bin/python3 -c 'import nbd' 2>/dev/null ||
    skip "python3-libnbd not installed"

ROUNDS=${ROUNDS:-4}
[ "${SOAK:-0}" = 0 ] || ROUNDS=${SOAK_ROUNDS:-40}
SEED=${SEED:-1}
RANDOM=$SEED

PRIMARY_ENV=(VMREPLICA_TEST_HASHLOG="$TESTDIR/hashlog-primary")
setup_pair
start_daemon primary2 VMREPLICA_TEST_HASHLOG="$TESTDIR/hashlog-primary2"
vr primary2 server set --certificate "$PKI/primary.pem" \
    --key "$PKI/primary.key" --ca "$PKI/ca.pem" >/dev/null ||
    fail "primary2: server set"

# The writer: QD 16 random writes (4-64 KiB, some unaligned), zeroes and
# trims over the first 8 MiB of the disk until STOPFILE exists.
cat >"$TESTDIR/writer.py" <<'EOF'
import os, random, sys, time
import nbd
uri, stop, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = min(h.get_size(), 8 << 20)
pool = bytearray(os.urandom(1 << 20))
inflight = [0]
def done(err):
    inflight[0] -= 1
    if err.value:
        print("writer: request failed: errno %d" % err.value, flush=True)
        os._exit(1)
    return 1
n = 0
while not os.path.exists(stop):
    while inflight[0] < 16:
        ln = rng.choice([4096, 16384, 65536, rng.randrange(1, 65536)])
        off = rng.randrange(0, size - ln)
        if rng.random() < 0.7:
            off -= off % 512
        r = rng.random()
        if r < 0.8:
            po = rng.randrange(0, len(pool) - ln)
            h.aio_pwrite(nbd.Buffer.from_bytearray(pool[po:po + ln]), off,
                         completion=done)
        elif r < 0.9:
            h.aio_zero(ln, off, completion=done)
        else:
            h.aio_trim(ln, off, completion=done)
        inflight[0] += 1
        n += 1
    h.poll(100)
    time.sleep(0.002)
while inflight[0] > 0:
    h.poll(1000)
h.flush()
print("writer: %d requests" % n, flush=True)
EOF

VMS=(a1 a2 b1 b2)
declare -A SRCOF WPID WSTOP
SRCOF=([a1]=primary [a2]=primary [b1]=primary2 [b2]=primary2)

# a2 and b2 keep recovery history (undo data captured before each apply).
# Every VM's log budget is past what its writer logs while the Replica
# server is down (half the 16 MiB disk was passed once, and a fold's
# resynchronization is outage.sh's subject, not this test's).
declare -A EXTRA
EXTRA=([a2]="--recovery-history 3 --point-interval 3s"
    [b2]="--recovery-history 3 --point-interval 3s")
for vm in "${VMS[@]}"; do
    p=${SRCOF[$vm]}
    vr "$p" vm create "$vm" --new-disk 16M >/dev/null || fail "$p: vm create $vm"
    vr "$p" vm start "$vm" --no-hypervisor >/dev/null || fail "$p: vm start $vm"
    # shellcheck disable=SC2086 # EXTRA holds words
    vr "$p" replication enable "$vm" \
        --replica-server "replica.test.local:$REPLICA_PORT" \
        --connect-address 127.0.0.1 --auth certificate --frequency 1s \
        --log-budget 256M ${EXTRA[$vm]:-} >/dev/null ||
        fail "$p: replication enable $vm"
done
for vm in "${VMS[@]}"; do
    vr "${SRCOF[$vm]}" initial-replication start "$vm" --wait >/dev/null ||
        fail "${SRCOF[$vm]}: initial-replication start $vm"
done

n=0
for vm in "${VMS[@]}"; do
    n=$((n + 1))
    WSTOP[$vm]=$TESTDIR/writer-$vm.stop
    /usr/bin/python3 "$TESTDIR/writer.py" "$(nbd_uri "${SRCOF[$vm]}" "$vm")" \
        "${WSTOP[$vm]}" "$((SEED * 10 + n))" >>"$TESTDIR/writer-$vm.log" 2>&1 &
    WPID[$vm]=$!
    _bg_pids+=("${WPID[$vm]}")
done
log "4 VMs on 2 primaries replicate every second under QD 16 writers"

# check_at_seal VM — the replica disk of VM equals its primary's disk at
# one of its seals; prints that cycle.
check_at_seal() {
    local vm=$1 p id h c
    p=${SRCOF[$vm]}
    id=$(jget "$p" ".disks[0].id" vm show "$vm")
    h=$(sha256sum "$(disk_path replica "$vm")" | cut -d' ' -f1)
    c=$(awk -v h="$h" -v id="$id" '$2 == id && $3 == h { print $1; exit }' \
        "$TESTDIR/hashlog-$p")
    [ -n "$c" ] || fail "$vm: after the crash the replica disk matches no seal of $p (applied_cycle $(repl replica "$vm" applied_cycle))"
    echo "$c"
}

FAULTS=(kill kill receive-chunk:1 receive-chunk:3 apply-record:2
    apply-record:25 apply-before-commit:1 undo-capture:1)
declare -A LAST
for vm in "${VMS[@]}"; do LAST[$vm]=0; done
for ((round = 1; round <= ROUNDS; round++)); do
    sleep "$((1 + RANDOM % 3)).$((RANDOM % 10))"
    fault=${FAULTS[RANDOM % ${#FAULTS[@]}]}
    if [ "$fault" = kill ]; then
        kill_daemon replica
        how="SIGKILL"
    else
        stop_daemon replica
        spawn_daemon replica VMREPLICA_FAULT="$fault"
        if wait_until 20 daemon_dead replica; then
            [ "$DAEMON_STATUS" -eq 137 ] ||
                fail "replica exited $DAEMON_STATUS, not at fault $fault"
            how="fault point $fault"
        else
            kill_daemon replica
            how="SIGKILL (fault $fault not reached in 20 s)"
        fi
    fi
    for vm in "${VMS[@]}"; do
        vr "${SRCOF[$vm]}" replication suspend "$vm" >/dev/null ||
            fail "${SRCOF[$vm]}: replication suspend $vm"
    done
    start_daemon replica
    line="round $round ($how):"
    for vm in "${VMS[@]}"; do
        c=$(check_at_seal "$vm")
        [ "$c" -ge "${LAST[$vm]}" ] ||
            fail "$vm: replica went back from cycle ${LAST[$vm]} to $c"
        LAST[$vm]=$c
        line+=" $vm@$c"
    done
    log "$line"
    for vm in "${VMS[@]}"; do
        vr "${SRCOF[$vm]}" replication resume "$vm" >/dev/null ||
            fail "${SRCOF[$vm]}: replication resume $vm"
    done
done

for vm in "${VMS[@]}"; do
    touch "${WSTOP[$vm]}"
done
for vm in "${VMS[@]}"; do
    wait "${WPID[$vm]}" || fail "writer of $vm failed: $(tail -1 "$TESTDIR/writer-$vm.log")"
    log "$vm: $(tail -1 "$TESTDIR/writer-$vm.log")"
done
for vm in "${VMS[@]}"; do
    SRC=${SRCOF[$vm]}
    wait_converged "$vm" 90
    assert_identical "$vm"
    assert_replicating "$vm"
done
log "PASS: $ROUNDS crashes of the Replica server, 4 VMs from 2 primaries, every replica at a seal after each"
