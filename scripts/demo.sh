#!/bin/bash
# demo.sh — vmreplica in two minutes, on one machine.
#
# Starts a Replica server and a primary server (two vmreplicad daemons on
# loopback, mutual TLS with a throw-away PKI), creates a VM on the primary,
# replicates it every 2 seconds while a writer changes its disk, then stops
# the writer, waits for the last changes to reach the replica and shows that
# the replica disk is byte-identical to the primary's.
#
# Environment: BUILD_DIR (default ./build), DEMO_DIR (default a fresh
# /tmp/vmreplica-demo.XXXXXX, removed at the end unless DEMO_KEEP=1; with
# DEMO_DIR=dir the run goes to a kept dir/run.XXXXXX),
# DEMO_WRITE_SECONDS (default 10).
set -euo pipefail

SOURCE_DIR=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$SOURCE_DIR/build}
VMREPLICAD=$BUILD_DIR/daemon/vmreplicad
VMREPLICA=$BUILD_DIR/cli/vmreplica
export VMREPLICA_PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
WRITE_SECONDS=${DEMO_WRITE_SECONDS:-10}

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
for c in qemu-io jq curl openssl nbdkit python3 sha256sum; do
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
WRITER_PID=

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
    [ -z "$WRITER_PID" ] || kill "$WRITER_PID" 2>/dev/null
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
    # Anything else started under the demo dir (nbdkit, qemu-io).
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

step "5. Create a VM with a 256 MiB disk on the primary and serve its disk over NBD (no hypervisor needed for the demo)"
run primary vm create demo-vm --new-disk 256M
run primary vm start demo-vm --no-hypervisor
URI=$(primary --json vm show demo-vm | jq -r '.disks[0].nbd_uri')
if [ -z "$URI" ] || [ "$URI" = null ]; then
    die "no nbd_uri for demo-vm"
fi
echo "    the disk is served at $URI — anything writing there (QEMU, qemu-io) is tracked"

step "6. Enable replication to replica.test.local every 2 seconds"
run primary replication enable demo-vm --replica-server "replica.test.local:$PORT" \
    --connect-address 127.0.0.1 --auth certificate --frequency 2s

step "7. Initial replication: copy the disk once (only allocated regions travel)"
run primary initial-replication start demo-vm --wait

step "8. Write random data to the VM's disk for $WRITE_SECONDS s while replication runs"
writer() {
    local n=0 off
    while [ ! -e "$DEMO_DIR/writer.stop" ]; do
        head -c 65536 /dev/urandom >"$DEMO_DIR/write.buf"
        off=$(((RANDOM * 32768 + RANDOM) % 4096 * 65536))
        qemu-io -f raw "$URI" -c "write -s $DEMO_DIR/write.buf $off 64k" \
            >/dev/null || exit 1
        n=$((n + 1))
        echo "$n" >"$DEMO_DIR/writes"
    done
}
writer &
WRITER_PID=$!
end=$((SECONDS + WRITE_SECONDS))
while [ "$SECONDS" -lt "$end" ]; do
    sleep 3
    kill -0 "$WRITER_PID" 2>/dev/null || die "the writer stopped"
    echo "--- replication measure demo-vm (primary), $(cat "$DEMO_DIR/writes" 2>/dev/null || echo 0) writes of 64 KiB so far"
    primary replication measure demo-vm
done
touch "$DEMO_DIR/writer.stop" # let the last write complete
wait "$WRITER_PID" || die "the writer failed"
WRITER_PID=
echo "    writer stopped after $(cat "$DEMO_DIR/writes") writes of 64 KiB"

step "9. Wait for the last changes to reach the replica"
last=$(primary --json replication show demo-vm | jq -r '.last_cycle')
[[ $last =~ ^[0-9]+$ ]] || die "primary: no last_cycle"
target=$((last + 1))
echo "    the primary's last sealed cycle is $last; the next one, $target, holds the writes made since — waiting for the replica to apply it"
applied=0
for ((i = 0; i < 300; i++)); do
    applied=$(replica --json replication show demo-vm | jq -r '.applied_cycle')
    [[ $applied =~ ^[0-9]+$ ]] || applied=0
    [ "$applied" -lt "$target" ] || break
    sleep 0.2
done
[ "$applied" -ge "$target" ] ||
    die "the replica applied cycle $applied, not $target, within 60 s"

step "10. The Replica server's view of the VM"
run replica replication show demo-vm

step "11. Compare the disks"
pdisk=$(primary --json vm show demo-vm | jq -r '.disks[0].path')
rdisk=$(replica --json vm show demo-vm | jq -r '.disks[0].path')
psum=$(sha256sum "$pdisk" | cut -d' ' -f1)
rsum=$(sha256sum "$rdisk" | cut -d' ' -f1)
echo "    primary $psum  $pdisk"
echo "    replica $rsum  $rdisk"
[ "$psum" = "$rsum" ] || die "the replica disk differs from the primary's"
echo
echo "demo: OK — replica is byte-identical to the primary at cycle $applied"
