#!/bin/bash
# replicate-basic: initial and incremental replication over mutual TLS.
#
# Two daemons on loopback (primary, replica, certificate authentication).
# A VM with a 64 MiB disk is replicated every second; random writes, zeroes
# and discards go through its NBD export while replication runs; once the
# writes stop and the next cycle is applied, the replica disk must be
# byte-identical to the primary's.  Done twice: with compression (the
# default) and with --compression off.  Also checks that the Replica VM has
# the same name and UUID and that the replica side reports mode "replica".
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit python3 cmp numfmt
requires_build

setup_pair

run_case() { # VM [replication enable options…]
    local vm=$1 i off uri
    shift
    log "$vm: create a VM with a 64 MiB disk and serve it"
    create_vm "$vm" 64M
    uri=$(nbd_uri primary "$vm")

    # Some data before initial replication, so it has something to send.
    qemu-io -f raw "$uri" -c 'write -P 0x11 0 1M' \
        -c 'write -P 0x22 32M 512k' >/dev/null

    log "$vm: enable replication (frequency 1s $*) and run initial replication"
    enable_replication "$vm" --frequency 1s "$@"

    log "$vm: write while replication runs"
    start_writer "$vm" 64k
    qemu-io -f raw "$uri" -c 'write -P 0x5a 1M 64k' -c 'write -z 2M 64k' \
        -c 'discard 4M 64k' -c 'write -P 0xa5 60M 1M' \
        -c 'write -z 32M 128k' -c 'discard 0 4k' >/dev/null
    for i in $(seq 1 20); do
        head -c 4096 /dev/urandom >"$TESTDIR/r.buf"
        off=$(((RANDOM * 32768 + RANDOM) % (64 * 256) * 4096))
        qemu-io -f raw "$uri" -c "write -s $TESTDIR/r.buf $off 4k" >/dev/null
        [ $((i % 5)) -ne 0 ] || sleep 1
    done
    # Unaligned write straddling two blocks.
    qemu-io -f raw "$uri" -c 'write -P 0x33 12345 70000' >/dev/null
    sleep 2
    stop_writer

    log "$vm: wait for the next cycle to be applied"
    wait_converged "$vm" 60
    assert_identical "$vm"

    local pu ru rn mode
    pu=$(jget primary .uuid vm show "$vm")
    ru=$(jget replica .uuid vm show "$vm")
    rn=$(jget replica .name vm show "$vm")
    [ "$pu" = "$ru" ] || fail "$vm: uuid differs: primary $pu, replica $ru"
    [ "$rn" = "$vm" ] || fail "$vm: replica vm is named '$rn'"
    mode=$(repl replica "$vm" mode)
    [ "$mode" = replica ] || fail "$vm: replica side mode is '$mode'"
    mode=$(repl primary "$vm" mode)
    [ "$mode" = primary ] || fail "$vm: primary side mode is '$mode'"
    # The last writes before a stop are sealed by the stop and shipped
    # while the VM is off.  Frequency 1 h: no timed seal can pick them up
    # first, only the stop's.
    vr primary replication set "$vm" --frequency 3600 >/dev/null
    sleep 1.5
    qemu-io -f raw "$uri" -c 'write -P 0x77 8M 256k' >/dev/null
    vr primary vm stop "$vm" --force >/dev/null
    vr primary replication set "$vm" --frequency 1s >/dev/null
    wait_converged "$vm" 30
    assert_identical "$vm"
    log "$vm: OK (cycle $CONVERGED_CYCLE, uuid $pu)"
}

run_case basic1
run_case basic2 --compression off

# Prometheus metrics on the management socket, per VM.
metrics=$(curl -sf --unix-socket "$(state_dir primary)/api.sock" \
    http://localhost/metrics) || fail "GET /metrics"
u1=$(jget primary .uuid vm show basic1)
for m in "vmreplica_bytes_sent_total{vm=\"$u1\",kind=\"wire\"}" \
         "vmreplica_cycles_total{vm=\"$u1\",result=\"ok\"}" \
         "vmreplica_cycle_duration_seconds_max{vm=\"$u1\"}"; do
    v=$(printf '%s\n' "$metrics" | grep -F "$m " | awk '{ print $2 }')
    [ -n "$v" ] && awk -v v="$v" 'BEGIN { exit !(v > 0) }' ||
        fail "metric $m missing or zero: '$v'"
done
log "metrics: bytes, cycles and cycle durations reported per VM"
[ "$(repl primary basic2 compression)" = false ] ||
    fail "basic2: compression not reported off"
log "PASS"
