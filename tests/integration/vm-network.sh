#!/bin/bash
# vm-network: a VM's NICs travel with it; a test failover puts them on the
# test network; a failover keeps their networks; failover network settings
# are validated and kept per NIC on the Replica server.
#
# What QEMU is given is read from its command line (/proc/PID/cmdline):
# "none" is a NIC on a hub of its own (-netdev hubport), "user" QEMU's
# user-mode network, each with the VM's MAC.  Setting the addresses inside
# a guest is tested with the Linux guest (guest-agent.sh).
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img jq curl openssl nbdkit python3
requires_build

VR_TIMEOUT=60
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
REPLICA_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
setup_pair

err=$(vr primary vm create bad --new-disk 8M --nic bogus 2>&1) && fail "--nic bogus accepted"
grep -q "nic 0: network bogus: expected none, user, tap:IFNAME or bridge:BRIDGE" <<<"$err" ||
    fail "bad network: $err"
vr primary vm create n1 --new-disk 8M --nic user --nic none >/dev/null || fail "vm create n1"
nics=$(vrj primary vm show n1 | jq -c '[.nics[] | {network, mac}]')
[ "$(jq -r '[.[].network] | join(",")' <<<"$nics")" = user,none ] || fail "nics: $nics"
mac0=$(jq -r '.[0].mac' <<<"$nics")
mac1=$(jq -r '.[1].mac' <<<"$nics")
[[ $mac0 =~ ^52:54:00(:[0-9a-f]{2}){3}$ ]] && [ "$mac0" != "$mac1" ] || fail "MACs: $nics"

# qemu_args DAEMON RUNDIR — QEMU's command line, one argument per line.
qemu_args() {
    local pid
    pid=$(cat "$1/qemu.pid") || fail "no qemu.pid in $1"
    tr '\0' '\n' <"/proc/$pid/cmdline"
}
UUID=$(jget primary .uuid vm show n1)
vr primary vm start n1 >/dev/null || fail "vm start n1"
args=$(qemu_args "$(state_dir primary)/run/$UUID")
grep -qx "user,id=net0" <<<"$args" && grep -qx "hubport,id=net1,hubid=101" <<<"$args" ||
    fail "primary QEMU netdevs: $(grep -A1 netdev <<<"$args")"
grep -qx "virtio-net-pci,netdev=net0,mac=$mac0" <<<"$args" || fail "NIC 0 device"
vr primary vm stop n1 --force >/dev/null || fail "vm stop"
vr primary vm start n1 --no-hypervisor >/dev/null || fail "serve n1"
enable_replication n1 --frequency 1s
[ "$(vrj replica vm show n1 | jq -c '[.nics[] | {network, mac}]')" = "$nics" ] ||
    fail "the NICs did not travel: $(vrj replica vm show n1 | jq -c .nics)"
log "the NICs travel with the VM"

err=$(vr replica vm set-failover-network n1 --nic 0 --ipv4 300.1.1.1/24 2>&1) &&
    fail "a bad address accepted"
grep -q "nic 0: failover ipv4: bad address" <<<"$err" || fail "bad address: $err"
err=$(vr replica vm set-failover-network n1 --nic 5 --ipv4 10.0.0.1/24 2>&1) &&
    fail "a missing NIC accepted"
grep -q "no NIC 5 (it has 2)" <<<"$err" || fail "missing NIC: $err"
vr replica vm set-failover-network n1 --nic 0 --ipv4 10.9.8.7/24 --gateway4 10.9.8.1 \
    --dns 10.9.8.53,10.9.8.54 >/dev/null || fail "set-failover-network"
[ "$(vrj replica vm show n1 | jq -c '.nics[0].failover')" = \
  '{"ipv4":"10.9.8.7/24","gateway4":"10.9.8.1","dns":["10.9.8.53","10.9.8.54"]}' ] ||
    fail "failover settings: $(vrj replica vm show n1 | jq -c .nics)"
log "failover network settings are validated and kept"

for net in none user; do
    [ "$net" = none ] || vr replica vm set-test-network n1 "$net" >/dev/null ||
        fail "set-test-network $net"
    run=$(vrj replica failover start n1 --test | jq -r .run_dir) || fail "test failover ($net)"
    args=$(qemu_args "$run")
    want0=$([ "$net" = user ] && echo "user,id=net0" || echo "hubport,id=net0,hubid=100")
    want1=$([ "$net" = user ] && echo "user,id=net1" || echo "hubport,id=net1,hubid=101")
    grep -qx "$want0" <<<"$args" && grep -qx "$want1" <<<"$args" ||
        fail "test failover on $net: $(grep -A1 netdev <<<"$args")"
    grep -qx "virtio-net-pci,netdev=net1,mac=$mac1" <<<"$args" || fail "test NIC 1 MAC"
    vr replica failover stop n1 --test >/dev/null || fail "stop test"
    log "test failover: the NICs are on the test network ($net)"
done

run=$(vrj replica failover start n1 --force | jq -r .run_dir) || fail "failover start"
args=$(qemu_args "$run")
grep -qx "user,id=net0" <<<"$args" && grep -qx "hubport,id=net1,hubid=101" <<<"$args" ||
    fail "failover NICs: $(grep -A1 netdev <<<"$args")"
vr replica failover stop n1 >/dev/null || fail "cancel"
log "failover: the NICs keep their own networks"

# A NIC the primary puts on a host interface arrives unconnected: a peer
# names nothing on the Replica server's host; the administrator there
# connects it.
vr primary vm create n2 --new-disk 8M --nic tap:vrtap0 >/dev/null || fail "vm create n2"
vr primary vm start n2 --no-hypervisor >/dev/null || fail "serve n2"
enable_replication n2 --frequency 1s
[ "$(vrj replica vm show n2 | jq -r '.nics[0].network')" = none ] ||
    fail "a peer's tap reached the Replica server: $(vrj replica vm show n2 | jq -c .nics)"
err=$(vr replica vm set-failover-network n2 --nic 0 2>&1) && fail "an empty setting accepted"
grep -q "nothing to set" <<<"$err" || fail "empty setting: $err"
vr replica vm set-failover-network n2 --nic 0 --network user >/dev/null || fail "--network user"
[ "$(vrj replica vm show n2 | jq -c '.nics[0] | {network, failover}')" = \
  '{"network":"user","failover":null}' ] || fail "n2 nic: $(vrj replica vm show n2 | jq -c .nics)"
log "a peer's host interface is not used on the Replica server; --network connects the NIC"

# Direct kernel boot is this server's setting: a peer never names a path
# on the Replica server (SPEC §6).
echo "not really a kernel" >"$TESTDIR/vmlinuz"
err=$(vr primary vm create k1 --new-disk 8M --kernel "$TESTDIR/nope" 2>&1) &&
    fail "a missing kernel accepted"
grep -q "kernel: expected the absolute path of a file" <<<"$err" || fail "missing kernel: $err"
vr primary vm create k1 --new-disk 8M --kernel "$TESTDIR/vmlinuz" \
    --append "console=ttyS0 quiet" >/dev/null || fail "vm create k1 --kernel"
[ "$(vrj primary vm show k1 | jq -r '.kernel + " | " + .cmdline')" = \
  "$TESTDIR/vmlinuz | console=ttyS0 quiet" ] || fail "k1 boot: $(vrj primary vm show k1)"
vr primary vm start k1 --no-hypervisor >/dev/null || fail "serve k1"
enable_replication k1 --frequency 1s
[ "$(vrj replica vm show k1 | jq -r '.kernel // "none"')" = none ] ||
    fail "the registration named a kernel path on the Replica server"
vr replica vm set-boot k1 --kernel "$TESTDIR/vmlinuz" >/dev/null || fail "set-boot"
[ "$(vrj replica vm show k1 | jq -r .kernel)" = "$TESTDIR/vmlinuz" ] || fail "set-boot kernel"
vr replica vm set-boot k1 >/dev/null || fail "set-boot (from disk)"
[ "$(vrj replica vm show k1 | jq -r '.kernel // "none"')" = none ] || fail "set-boot clear"
log "kernel boot is set per server; the registration names no path"
log "PASS"
