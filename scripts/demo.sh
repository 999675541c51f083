#!/bin/bash
# demo.sh — vmreplica in one minute, on one machine.
#
# Starts a Replica server and a primary server (two vmreplicad daemons on
# loopback, mutual TLS with a throw-away PKI), imports a real VM on the
# primary from a qcow2 image (the test guest, a boot sector that writes
# sequence-stamped sectors to its disk), replicates it every second, runs it
# under QEMU while the guest writes, then waits for the last changes to
# reach the replica and shows that the replica disk is byte-identical to the
# primary's and holds the guest's last sequence stamp.  Then a planned
# failover: the VM boots on the Replica server with no data lost, and
# replication is reversed towards the old primary without a resync.
#
# Environment: BUILD_DIR (default ./build), DEMO_DIR (default a fresh
# /tmp/vmreplica-demo.XXXXXX, removed at the end unless DEMO_KEEP=1; with
# DEMO_DIR=dir the run goes to a kept dir/run.XXXXXX), VMREPLICA_ACCEL
# (kvm|tcg, default tcg: the guest is tiny, and nested KVM can be slower),
# DEMO_GUEST_TIMEOUT (seconds for the guest to finish, default 60).
set -euo pipefail

SOURCE_DIR=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$SOURCE_DIR/build}
VMREPLICAD=$BUILD_DIR/daemon/vmreplicad
VMREPLICA=$BUILD_DIR/cli/vmreplica
export VMREPLICA_PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
GUEST_TIMEOUT=${DEMO_GUEST_TIMEOUT:-60}
export VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}

bold=
norm=
if [ -t 1 ]; then
    bold=$(printf '\033[1m')
    norm=$(printf '\033[0m')
fi
step() {
    printf '\n%s==> %s%s\n' "$bold" "$*" "$norm"
}
die() {
    printf 'demo: FAILED — %s\n' "$*" >&2
    exit 1
}
run() { # show a command, then run it
    printf '$ %s\n' "$*"
    "$@"
}

for f in "$VMREPLICAD" "$VMREPLICA" "$VMREPLICA_PLUGIN"; do
    [ -e "$f" ] || die "$f not found: build first (./quickstart.sh demo does)"
done
for c in qemu-system-x86_64 qemu-img jq curl openssl nbdkit python3 sha256sum; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found"
done

if [ -n "${DEMO_DIR:-}" ]; then
    # A fresh run directory inside it: cleanup kills whatever mentions the
    # run directory, so it must be unique to this run.
    mkdir -p "$DEMO_DIR"
    DEMO_DIR=$(mktemp -d "$(cd "$DEMO_DIR" && pwd)/run.XXXXXX")
    DEMO_KEEP=1
else
    DEMO_DIR=$(mktemp -d /tmp/vmreplica-demo.XXXXXX)
fi

declare -A PID=()

_kill_matching() { # SIG STRING — like pkill -f, without procps
    local d cmd
    for d in /proc/[0-9]*; do
        [ "${d#/proc/}" != "$$" ] || continue
        cmd=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline") || continue
        if [[ $cmd == *"$2"* ]]; then
            kill "-$1" "${d#/proc/}" 2>/dev/null
        fi
    done
    return 0
}

cleanup() {
    local rc=$? n i
    set +e
    trap - EXIT
    if [ -n "${PID[primary]:-}" ]; then
        "$VMREPLICA" --connect "$DEMO_DIR/primary/api.sock" vm stop demo-vm \
            --force >/dev/null 2>&1
    fi
    for n in "${!PID[@]}"; do
        kill -TERM "${PID[$n]}" 2>/dev/null
    done
    for n in "${!PID[@]}"; do
        for ((i = 0; i < 100; i++)); do
            kill -0 "${PID[$n]}" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "${PID[$n]}" 2>/dev/null
        wait "${PID[$n]}" 2>/dev/null
    done
    # Anything else started under the demo dir (nbdkit, QEMU).
    _kill_matching TERM "$DEMO_DIR"
    sleep 0.3
    _kill_matching KILL "$DEMO_DIR"
    if [ "$rc" -ne 0 ]; then
        for n in primary replica; do
            [ -e "$DEMO_DIR/$n.log" ] || continue
            echo "----- last lines of the $n daemon's log ($DEMO_DIR/$n.log) -----" >&2
            tail -n 25 "$DEMO_DIR/$n.log" >&2
        done
    fi
    if [ "${DEMO_KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
        echo "demo: files kept in $DEMO_DIR"
    else
        rm -rf "$DEMO_DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

start_daemon() { # NAME
    local n=$1 i
    mkdir -p "$DEMO_DIR/$n"
    "$VMREPLICAD" --state-dir "$DEMO_DIR/$n" --hostname "$n.test.local" \
        >"$DEMO_DIR/$n.log" 2>&1 &
    PID[$n]=$!
    for ((i = 0; i < 200; i++)); do
        if curl -s -o /dev/null --max-time 2 \
            --unix-socket "$DEMO_DIR/$n/api.sock" http://localhost/v1/server; then
            echo "    $n daemon running (pid ${PID[$n]}, state $DEMO_DIR/$n, log $DEMO_DIR/$n.log)"
            return 0
        fi
        kill -0 "${PID[$n]}" 2>/dev/null || die "the $n daemon exited at start"
        sleep 0.1
    done
    die "the $n daemon did not open its socket within 20 s"
}

# The CLI, against the primary or the replica daemon.
primary() {
    "$VMREPLICA" --connect "$DEMO_DIR/primary/api.sock" "$@"
}
replica() {
    "$VMREPLICA" --connect "$DEMO_DIR/replica/api.sock" "$@"
}

cat <<EOF
vmreplica demo: asynchronous replication of a VM from a primary server to a
Replica server, both on this machine (loopback), over mutual TLS.
Working directory: $DEMO_DIR
EOF

step "1. Make a test PKI: a CA and one certificate per host (primary.test.local, replica.test.local)"
"$SOURCE_DIR/scripts/mkpki.sh" "$DEMO_DIR/pki"
PKI=$DEMO_DIR/pki
ls "$PKI"

step "2. Start two vmreplicad daemons, each with its own state directory"
start_daemon replica
start_daemon primary
PORT=$(free_port)

step "3. Make the second one a Replica server: HTTPS on port $PORT, accept any primary whose certificate our CA signed"
run replica server set --enable --auth certificate --certificate-port "$PORT" \
    --certificate "$PKI/replica.pem" --key "$PKI/replica.key" --ca "$PKI/ca.pem" \
    --allow-any --default-storage "$DEMO_DIR/replica-storage"

step "4. Give the primary its certificate (it proves its name, primary.test.local, to the Replica server)"
run primary server set --certificate "$PKI/primary.pem" --key "$PKI/primary.key" \
    --ca "$PKI/ca.pem"


step "5. Import a VM: the test guest (a boot sector that writes sequence-stamped sectors) as a 64 MiB qcow2"
GUEST=$BUILD_DIR/tests/guest/guest.img
if [ ! -s "$GUEST" ]; then
    if ! command -v as >/dev/null 2>&1 || ! command -v ld >/dev/null 2>&1; then
        die "$GUEST not built and no binutils (as, ld) to assemble tests/guest/guest.S"
    fi
    GUEST=$DEMO_DIR/guest.img
    python3 "$SOURCE_DIR/tests/guest/mkguest.py" as ld \
        "$SOURCE_DIR/tests/guest/guest.S" "$GUEST" >/dev/null ||
        die "could not assemble tests/guest/guest.S"
fi
# The guest's parameters, from the block at offset 0x1e0 of its boot sector.
GUESTDISK=$SOURCE_DIR/tests/guest/guestdisk.py
read -r TOTAL BASE NSECT _ _ < <(python3 "$GUESTDISK" params "$GUEST") ||
    die "$GUEST has no parameter block"
[ -n "$NSECT" ] || die "$GUEST has no parameter block"
run qemu-img convert -f raw -O qcow2 "$GUEST" "$DEMO_DIR/demo-vm.qcow2"
run qemu-img resize -q -f qcow2 "$DEMO_DIR/demo-vm.qcow2" 64M
run primary vm create demo-vm --disk "$DEMO_DIR/demo-vm.qcow2" --memory 64M
echo "    the qcow2 is now a sparse raw disk owned by the primary; the guest will write"
echo "    $TOTAL sectors, sequence-stamped 1..$TOTAL, over LBA $BASE..$((BASE + NSECT - 1))"

# max_stamp FILE — the largest sequence stamp in the guest's sectors (0: none).
max_stamp() {
    python3 "$GUESTDISK" max-stamp "$1" "$BASE" "$NSECT"
}

step "6. Serve its disk (no hypervisor yet), enable replication to replica.test.local every second"
run primary vm start demo-vm --no-hypervisor
echo "    the disk is served at $(primary --json vm show demo-vm | jq -r '.disks[0].nbd_uri')"
echo "    — anything writing there (QEMU, libvirt, qemu-io) is tracked"
run primary replication enable demo-vm --replica-server "replica.test.local:$PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 1s

step "7. Initial replication: copy the disk once (only allocated regions travel)"
run primary initial-replication start demo-vm --wait
run primary replication measure demo-vm

step "8. Boot the VM under QEMU ($VMREPLICA_ACCEL): stop serving, then vm start attaches QEMU to the tracked disk"
run primary vm stop demo-vm
UUID=$(primary --json vm show demo-vm | jq -r .uuid)
CONSOLE=$DEMO_DIR/primary/run/$UUID/console.log
pdisk=$(primary --json vm show demo-vm | jq -r '.disks[0].path')
rdisk=$(replica --json vm show demo-vm | jq -r '.disks[0].path')
run primary vm start demo-vm
echo "    the guest's serial console is $CONSOLE; every second, its last line and the"
echo "    replica's state (the newest sequence stamp on the replica disk):"
running() {
    [ "$(primary --json vm show demo-vm | jq -r .running)" = true ]
}
deadline=$((SECONDS + GUEST_TIMEOUT))
shown=0
until grep -q '^done' "$CONSOLE" 2>/dev/null; do
    if ! running && ! grep -q '^done' "$CONSOLE" 2>/dev/null; then
        sed 's/^/    console: /' "$CONSOLE" 2>/dev/null | tail -n 5 >&2
        die "QEMU exited before the guest printed done"
    fi
    [ "$SECONDS" -lt "$deadline" ] ||
        die "the guest did not print done within ${GUEST_TIMEOUT}s"
    # Show the banner once, then one progress line per second.
    if [ "$shown" = 0 ] && [ -s "$CONSOLE" ]; then
        echo "    console: $(head -n 1 "$CONSOLE" | tr -d '\r')"
        shown=1
    fi
    line=$(grep '^seq ' "$CONSOLE" 2>/dev/null | tail -n 1 | tr -d '\r') || true
    printf '    console: %-10s | replica: cycle %s applied, newest stamp on its disk %s\n' \
        "${line:-(booting)}" "$(replica --json replication show demo-vm | jq -r .applied_cycle)" \
        "$(max_stamp "$rdisk")"
    sleep 1
done
grep '^seq ' "$CONSOLE" | tail -n 1 | tr -d '\r' | sed 's/^/    console: /'
grep -v '^seq ' "$CONSOLE" | tr -d '\r' | sed 's/^/    console: /' | tail -n +2 || true
! grep -q '^error' "$CONSOLE" || die "the guest reported a disk error"
for ((i = 0; i < 150; i++)); do
    running || break
    sleep 0.1
done
running && die "QEMU still running 15 s after the guest printed done"
echo "    the guest wrote seq $TOTAL and ended; QEMU exited"

step "9. Wait for the last changes to reach the replica"
echo "    until the primary has nothing pending (every write is in a cycle it has sent)"
echo "    and the replica has applied the primary's last cycle"
applied=0 last=
for ((i = 0; i < 300; i++)); do
    m=$(primary --json replication measure demo-vm)
    last=$(jq -r .last_cycle <<<"$m")
    pending=$(jq -r .pending_size <<<"$m")
    applied=$(replica --json replication show demo-vm | jq -r '.applied_cycle')
    [[ $applied =~ ^[0-9]+$ ]] || applied=0
    if [ "$pending" = 0 ] && [[ $last =~ ^[0-9]+$ ]] && [ "$applied" -ge "$last" ]; then
        break
    fi
    sleep 0.2
done
if [ "$pending" != 0 ] || [ "$applied" -lt "$last" ]; then
    die "after 60 s: $pending bytes pending on the primary, replica at cycle $applied of $last"
fi
echo "    nothing pending; the replica applied cycle $applied"
run primary replication measure demo-vm

step "10. The Replica server's view of the VM"
run replica replication show demo-vm

step "11. Compare the disks"
psum=$(sha256sum "$pdisk" | cut -d' ' -f1)
rsum=$(sha256sum "$rdisk" | cut -d' ' -f1)
echo "    primary $psum  $pdisk"
echo "    replica $rsum  $rdisk"
[ "$psum" = "$rsum" ] || die "the replica disk differs from the primary's"
stamp=$(max_stamp "$rdisk")
echo "    newest sequence stamp on the replica disk: $stamp (the guest wrote 1..$TOTAL)"
[ "$stamp" = "$TOTAL" ] || die "the replica's newest stamp is $stamp, not $TOTAL"

step "12. Planned failover: on the primary (VM shut down), ship every change and hand over"
run primary failover prepare demo-vm
if primary vm start demo-vm >/dev/null 2>&1; then
    die "the prepared VM started on the primary"
fi
echo "    the VM no longer starts on the primary"

step "13. On the Replica server: fail over — the VM boots from its replica disk, no data lost"
run replica failover start demo-vm
RCONSOLE=$DEMO_DIR/replica/run/$UUID/console.log
for ((i = 0; i < GUEST_TIMEOUT * 5; i++)); do
    grep -q '^done' "$RCONSOLE" 2>/dev/null && break
    sleep 0.2
done
grep -q '^done' "$RCONSOLE" 2>/dev/null ||
    die "the guest did not run to done on the Replica server"
echo "    console on the Replica server: $(head -n 1 "$RCONSOLE" | tr -d '\r') ... $(grep '^done' "$RCONSOLE" | tr -d '\r')"

step "14. Reverse replication: the former primary becomes the Replica server, with no resynchronization"
PORT2=$(free_port)
run primary server set --enable --auth certificate --certificate-port "$PORT2" \
    --allow-any --default-storage "$DEMO_DIR/primary-storage"
run replica replication reverse demo-vm --replica-server "primary.test.local:$PORT2" \
    --connect-address 127.0.0.1
for ((i = 0; i < 150; i++)); do
    [ "$(replica --json replication show demo-vm | jq -r .state)" = Replicating ] && break
    sleep 0.2
done
[ "$(replica --json replication show demo-vm | jq -r .state)" = Replicating ] ||
    die "reverse replication did not start: $(replica --json replication show demo-vm | jq -r .last_error)"
run primary replication show demo-vm
sent=$(replica --json replication measure demo-vm | jq -r .initial_replication_sent)
echo "    initial copy for the reverse direction: $sent bytes"
echo
echo "demo: OK — the replica was byte-identical to the primary at cycle $applied (seq $stamp),"
echo "      the VM failed over to it with no data loss and now replicates back to the old primary"
