#!/bin/bash
# libvirt: a VM adopted from a libvirt domain replicates, and its test
# failover starts a libvirt domain on the Replica server.
#
# The test starts a libvirtd of its own (libvirtd.sh): Debian's libvirtd
# in a private mount namespace, its sockets under $TESTDIR; the system's
# libvirt is never touched and nothing is left at exit.
#
# A domain "lvguest" is defined from the boot-sector test guest
# (tests/guest/guest.S): a qcow2 boot disk and a raw data disk, a NIC,
# its console to a file; domain type kvm where /dev/kvm opens, else qemu
# (TCG).  `vm create g1 --from-libvirt lvguest` must take its CPUs, memory
# and NIC, convert the qcow2 disk, take the raw one in place, keep the
# original XML, and redefine the domain on the NBD exports.  Replicated
# every second, `vm start g1` starts the domain (libvirt, the adopted
# VM's default): the guest writes its stamps, the test writes the data
# disk; the replica must converge byte-identical.  Then, on the Replica
# server set to `--hypervisor libvirt`, `failover start g1 --test` must
# start the libvirt domain "g1 - Test" (virsh says running, the guest's
# console shows it booted) and `failover stop --test` must remove it; the
# same for an unplanned failover (domain "g1").  Last, a VM created by
# vmreplica runs as a transient domain with `vm start --hypervisor libvirt`.
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img qemu-io jq curl openssl nbdkit python3 cmp xmllint
requires_build

VR_TIMEOUT=60
GUEST_TIMEOUT=${GUEST_TIMEOUT:-60}
guest_params

# --- a libvirtd of the test's own -------------------------------------------
source "$(dirname "$0")/libvirtd.sh"
start_libvirtd

PRIMARY_ENV=("VMREPLICA_LIBVIRT_URI=$URI")
REPLICA_ENV=("VMREPLICA_LIBVIRT_URI=$URI")
if [ -n "${VMREPLICA_ACCEL:-}" ]; then
    PRIMARY_ENV+=("VMREPLICA_ACCEL=$VMREPLICA_ACCEL")
    REPLICA_ENV+=("VMREPLICA_ACCEL=$VMREPLICA_ACCEL")
fi
setup_pair

# --- the libvirt domain to adopt ---------------------------------------------
TYPE=qemu
if [ "${VMREPLICA_ACCEL:-}" != tcg ] && [ -w /dev/kvm ]; then TYPE=kvm; fi
qemu-img convert -f raw -O qcow2 "$GUEST" "$TESTDIR/boot.qcow2" &&
    qemu-img resize -q -f qcow2 "$TESTDIR/boot.qcow2" 64M || fail "guest qcow2"
DATA=$TESTDIR/data.raw
truncate -s 16M "$DATA"
CONSOLE=$TESTDIR/lvguest-console.log
MAC=52:54:00:aa:bb:01
cat >"$TESTDIR/lvguest.xml" <<EOF
<domain type='$TYPE'>
  <name>lvguest</name>
  <memory unit='MiB'>64</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$TESTDIR/boot.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$DATA'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='user'>
      <mac address='$MAC'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='$CONSOLE'/><target port='0'/></serial>
  </devices>
</domain>
EOF
virsh_ define "$TESTDIR/lvguest.xml" >/dev/null || fail "virsh define lvguest"
ORIG=$(virsh_ dumpxml --inactive lvguest)

# --- adoption ----------------------------------------------------------------
vr primary vm create g1 --from-libvirt lvguest >/dev/null ||
    fail "vm create g1 --from-libvirt lvguest"
show=$(vrj primary vm show g1) || fail "vm show g1"
got=$(jq -r '[.cpus, .memory_mib, .libvirt_domain, (.disks | length),
             .nics[0].mac, .nics[0].network] | join(" ")' <<<"$show")
[ "$got" = "2 64 lvguest 2 $MAC user" ] ||
    fail "adopted VM: cpus memory domain disks mac network = '$got'"
P0=$(jq -r '.disks[0].path' <<<"$show")
P1=$(jq -r '.disks[1].path' <<<"$show")
[ "$P1" = "$DATA" ] || fail "raw disk not taken in place: $P1"
[ "$P0" != "$TESTDIR/boot.qcow2" ] && cmp -n 512 "$GUEST" "$P0" ||
    fail "qcow2 disk not converted to raw: $P0"
vr primary vm show g1 | grep -qx "Libvirt domain: *lvguest" ||
    fail "vm show g1 does not name the domain: $(vr primary vm show g1)"
UUID=$(jq -r .uuid <<<"$show")
VMDIR=$(state_dir primary)/vms/$UUID
RUNDIR=$(state_dir primary)/run/$UUID
[ "$(cat "$VMDIR/libvirt-original.xml")" = "$ORIG" ] ||
    fail "original XML not kept as $VMDIR/libvirt-original.xml"
NEW=$(virsh_ dumpxml --inactive lvguest)
for d in vda vdb; do
    disk=$(xmllint --xpath "//disk[target/@dev='$d']" - <<<"$NEW") ||
        fail "redefined domain: no disk $d"
    grep -q "protocol=\"nbd\"" <<<"$disk" &&
        grep -q "socket=\"$RUNDIR/nbd.sock\"" <<<"$disk" ||
        fail "redefined domain: disk $d is not on the exports: $disk"
done
grep -q "org.qemu.guest_agent.0" <<<"$NEW" ||
    fail "redefined domain has no guest agent channel"
log "g1 adopted from lvguest: qcow2 converted, raw in place, domain on $RUNDIR/nbd.sock"

# --- replication, then the domain runs ----------------------------------------
vr primary vm start g1 --no-hypervisor >/dev/null || fail "serve g1"
enable_replication g1 --frequency 1s
vr primary vm stop g1 >/dev/null || fail "vm stop g1"

c0=$(repl primary g1 last_cycle)
vr primary vm start g1 >/dev/null || fail "vm start g1 (libvirt domain)"
[ "$(virsh_ domstate lvguest)" = running ] ||
    fail "lvguest is not running after vm start: $(virsh_ domstate lvguest)"
[ "$(jget primary .running vm show g1)" = true ] || fail "vm show: not running"
vr primary events | grep -q "vm started (libvirt domain)" ||
    fail "no event 'vm started (libvirt domain)'"
qemu-io -f raw "$(nbd_uri primary g1 1)" -c 'write -P 0x5a 1M 2M' >/dev/null ||
    fail "write the data disk while the domain runs"
wait_until "$GUEST_TIMEOUT" grep -q '^done' "$CONSOLE" ||
    fail "guest did not print done: $(tail -n 3 "$CONSOLE" 2>/dev/null)"
vr primary vm stop g1 --force >/dev/null || fail "vm stop g1 --force"
[ "$(virsh_ domstate lvguest)" = "shut off" ] ||
    fail "lvguest after vm stop: $(virsh_ domstate lvguest)"
vr primary vm start g1 --no-hypervisor >/dev/null || fail "serve g1 again"
wait_converged g1 60
assert_identical g1
c1=$(repl primary g1 last_cycle)
[ "$c1" -gt "$c0" ] || fail "no cycle while the domain ran ($c0 -> $c1)"
RDISK=$(disk_path replica g1)
[ "$(max_stamp "$RDISK")" = "$TOTAL" ] ||
    fail "replica holds stamp $(max_stamp "$RDISK"), want $TOTAL"
log "the domain's writes are on the replica (cycles $c0..$c1)"

# --- test failover on a libvirt Replica server ---------------------------------
vr replica server set --hypervisor libvirt >/dev/null ||
    fail "replica: server set --hypervisor libvirt"
[ "$(jget replica .hypervisor server show)" = libvirt ] ||
    fail "replica: server show does not say libvirt"
out=$(vrj replica failover start g1 --test) || fail "failover start g1 --test"
[ "$(jq -r .test_vm <<<"$out")" = "g1 - Test" ] || fail "test VM: $out"
[ "$(virsh_ domstate 'g1 - Test')" = running ] ||
    fail "libvirt domain 'g1 - Test' is not running: $(virsh_ list --all)"
TXML=$(virsh_ dumpxml 'g1 - Test')
grep -q "protocol='nbd'" <<<"$TXML" && grep -q "\.qcow2" <<<"$TXML" ||
    fail "'g1 - Test' is not on overlays over the view: $TXML"
[ "$(jget replica .running vm show 'g1 - Test')" = true ] ||
    fail "vm show 'g1 - Test': not running"
TCONSOLE=$(jq -r .run_dir <<<"$out")/console.log
wait_until 30 grep -q "vmreplica test guest" "$TCONSOLE" ||
    fail "the test domain did not boot the guest: $(cat "$TCONSOLE" 2>/dev/null)"
log "test failover: libvirt domain 'g1 - Test' runs on the Replica server"
vr replica failover stop g1 --test >/dev/null || fail "failover stop --test"
virsh_ domstate 'g1 - Test' >/dev/null 2>&1 &&
    fail "'g1 - Test' still defined after failover stop --test"
wait_converged g1 30
assert_identical g1

# An unplanned failover (--force: the primary is alive) starts the domain
# "g1"; cancelling it removes the domain and replication goes on.
out=$(vrj replica failover start g1 --force) || fail "failover start g1 --force"
[ "$(virsh_ domstate g1)" = running ] ||
    fail "libvirt domain g1 is not running after failover start: $(virsh_ list --all)"
wait_until 30 grep -q "vmreplica test guest" "$(jq -r .run_dir <<<"$out")/console.log" ||
    fail "the failed-over domain did not boot the guest"
vr replica failover stop g1 >/dev/null || fail "failover stop g1"
virsh_ domstate g1 >/dev/null 2>&1 && fail "domain g1 left after failover stop"
log "failover: libvirt domain g1 started on the Replica server, gone after failover stop"
wait_converged g1 30
assert_identical g1

vr primary vm stop g1 >/dev/null || fail "vm stop g1"
# Its disks no longer served, the adopted domain cannot run untracked.
err=$(virsh_ start lvguest 2>&1) && fail "lvguest started without its exports"
grep -q "nbd.sock" <<<"$err" || fail "virsh start lvguest without exports: $err"

# --- a VM of vmreplica's own as a transient domain ------------------------------
vr primary vm create n1 --new-disk 16M --nic none >/dev/null || fail "vm create n1"
err=$(vr primary vm start n1 --hypervisor xen 2>&1) && fail "--hypervisor xen accepted"
grep -q "invalid --hypervisor 'xen': expected qemu or libvirt" <<<"$err" ||
    fail "--hypervisor xen: $err"
vr primary vm start n1 --hypervisor libvirt >/dev/null ||
    fail "vm start n1 --hypervisor libvirt"
[ "$(virsh_ domstate n1)" = running ] || fail "domain n1 is not running"
[ "$(virsh_ dominfo n1 | awk '/^Persistent:/ { print $2 }')" = no ] ||
    fail "domain n1 is not transient"
err=$(vr primary vm create n2 --from-libvirt n1 2>&1) &&
    fail "a running domain was adopted"
grep -q "libvirt domain n1 is running: shut it down first" <<<"$err" ||
    fail "adopting a running domain: $err"
vr primary vm stop n1 --force >/dev/null || fail "vm stop n1"
virsh_ domstate n1 >/dev/null 2>&1 && fail "domain n1 left after vm stop"
[ "$(jget primary .running vm show n1)" = false ] || fail "n1 still running"
log "vm start --hypervisor libvirt: transient domain n1 started and stopped"
log "pass"
