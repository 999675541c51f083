# shellcheck shell=bash
# functions.sh — shared helpers for the integration tests (sourced).
#
# Each test is a bash script that does
#     source "$(dirname "$0")/functions.sh"
# and then drives real vmreplicad daemons on loopback through the vmreplica
# CLI.  meson passes BUILD_DIR and SOURCE_DIR; run by hand, they default to
# ./build and the checkout this file is in.
#
# Exit status: 0 pass, 1 fail, 77 skip (with a "skip: …" line saying why).
#
# Everything a test creates lives under $TESTDIR (a fresh directory under
# /tmp, removed at exit unless VMREPLICA_KEEP_TESTDIR=1 or the test failed
# and VMREPLICA_KEEP_FAILED=1).  At exit the cleanup functions run (last
# registered first), every daemon is stopped and any process whose command
# line mentions $TESTDIR (nbdkit, qemu-io writers…) is killed, so no stray
# process survives a test.

set -euo pipefail

SOURCE_DIR=${SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
BUILD_DIR=${BUILD_DIR:-$SOURCE_DIR/build}
VMREPLICAD=${VMREPLICAD:-$BUILD_DIR/daemon/vmreplicad}
VMREPLICA=${VMREPLICA:-$BUILD_DIR/cli/vmreplica}
export VMREPLICA_PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
# Seconds any single CLI call may take before the test gives up on it.
VR_TIMEOUT=${VR_TIMEOUT:-120}

TESTNAME=$(basename "$0" .sh)
# Short: unix socket paths (…/vms/<uuid>/nbd.sock) must stay < 108 bytes.
TESTDIR=$(mktemp -d "/tmp/vrt-$TESTNAME.XXXXXX")
export TESTDIR

declare -a _cleanups=()
declare -A DAEMON_PID=()
declare -a _bg_pids=()

log() {
    printf '[%s] %s\n' "$TESTNAME" "$*"
}

# fail MSG — print MSG and exit 1 (the exit trap prints the daemon logs).
fail() {
    printf '[%s] FAIL: %s\n' "$TESTNAME" "$*" >&2
    exit 1
}

# skip MSG — exit 77 with a reason meson's log (and the summary) show.
skip() {
    printf 'skip: %s\n' "$*"
    printf 'skip: %s\n' "$*" >&2
    exit 77
}

# requires CMD… — skip the test unless every CMD is on PATH.
requires() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || skip "$c not found"
    done
}

# requires_build — skip unless the daemon, CLI and plugin have been built.
requires_build() {
    [ -x "$VMREPLICAD" ] || skip "vmreplicad not built ($VMREPLICAD)"
    [ -x "$VMREPLICA" ] || skip "vmreplica CLI not built ($VMREPLICA)"
    [ -e "$VMREPLICA_PLUGIN" ] || skip "plugin not built ($VMREPLICA_PLUGIN)"
}

# cleanup_fn CMD [ARGS…] — run CMD at exit; the last registered runs first.
cleanup_fn() {
    local q
    printf -v q '%q ' "$@"
    _cleanups+=("$q")
}

_on_exit() {
    local rc=$1 i name
    set +e
    trap - EXIT
    # Only what is still our child: a background job that ended long ago
    # may have left its number to another test's process (a CI flake:
    # "start nbdkit … exited: (log is empty)").
    for i in "${_bg_pids[@]}"; do
        _is_child "$i" && kill -TERM "$i" 2>/dev/null
    done
    for ((i = ${#_cleanups[@]} - 1; i >= 0; i--)); do
        eval "${_cleanups[$i]}"
    done
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
        for f in "$TESTDIR"/*.log; do
            [ -e "$f" ] || continue
            echo "----- tail of $f -----" >&2
            tail -n 40 "$f" >&2
        done
    fi
    for name in "${!DAEMON_PID[@]}"; do
        _is_child "${DAEMON_PID[$name]}" && _stop_pid "${DAEMON_PID[$name]}" 10
    done
    # nbdkit (started by the daemons, survives them by design), writers…
    _kill_matching TERM "$TESTDIR"
    sleep 0.3
    _kill_matching KILL "$TESTDIR"
    if [ "${VMREPLICA_KEEP_TESTDIR:-0}" = 1 ] ||
        { [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] &&
            [ "${VMREPLICA_KEEP_FAILED:-0}" = 1 ]; }; then
        echo "[$TESTNAME] test directory kept: $TESTDIR" >&2
    else
        rm -rf "$TESTDIR"
    fi
    exit "$rc"
}
# _is_child PID — true if PID is a live child of this shell.
_is_child() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) } # after "pid (comm) ": state ppid …
    set -- $stat
    [ "${2:-}" = "$$" ]
}
# _kill_matching SIG STRING — signal every process whose command line
# contains STRING (pkill -f without needing procps).  The command line is
# read with a builtin: a `tr` per process made each call take over a
# second on a busy machine (twice at every test's exit).
_kill_matching() {
    local sig=$1 str=$2 d args
    for d in /proc/[0-9]*; do
        [ "${d#/proc/}" != "$$" ] || continue
        mapfile -d '' -t args 2>/dev/null <"$d/cmdline" || continue
        if [[ "${args[*]}" == *"$str"* ]]; then
            kill "-$sig" "${d#/proc/}" 2>/dev/null
        fi
    done
    return 0
}

trap '_on_exit $?' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# wait_until TIMEOUT_S CMD [ARGS…] — retry CMD every 0.2 s until it succeeds;
# returns 1 if it has not succeeded after TIMEOUT_S seconds.
wait_until() {
    local timeout=$1
    shift
    local deadline=$((SECONDS + timeout))
    while :; do
        if "$@"; then
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            return 1
        fi
        sleep 0.2
    done
}

# free_port — print a TCP port on 127.0.0.1 that nobody listens on now.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# state_dir NAME / api_sock NAME — where daemon NAME keeps its state.
state_dir() {
    echo "$TESTDIR/$1"
}
api_sock() {
    echo "$TESTDIR/$1/api.sock"
}

_api_up() { # NAME — true once the daemon answers on its socket
    curl -s -o /dev/null --max-time 2 --unix-socket "$(api_sock "$1")" \
        http://localhost/v1/server
}

# spawn_daemon NAME [VAR=VALUE…] — start vmreplicad NAME in the background
# (state dir $TESTDIR/NAME, hostname NAME.test.local, stderr and stdout
# appended to $TESTDIR/NAME.log), with the extra environment given, and do
# not wait for it.  Sets DAEMON_PID[NAME] and NAME_pid.  If the variable
# DAEMON_NETNS_NAME is set, the daemon runs in that network namespace
# (`ip netns exec`, which execs it: the pid is the daemon's); its api.sock
# is a unix socket, reached from here as usual.
spawn_daemon() {
    local name=$1 nsvar=DAEMON_NETNS_$1
    shift
    local wrap=()
    [ -z "${!nsvar:-}" ] || wrap=(ip netns exec "${!nsvar}")
    mkdir -p "$(state_dir "$name")"
    echo "=== $(date -u +%FT%TZ) start $name $*" >>"$TESTDIR/$name.log"
    ${wrap[@]+"${wrap[@]}"} env "$@" "$VMREPLICAD" --state-dir "$(state_dir "$name")" \
        --hostname "$name.test.local" -v \
        >>"$TESTDIR/$name.log" 2>&1 &
    DAEMON_PID[$name]=$!
    printf -v "${name}_pid" '%s' "$!"
    export "${name}_pid"
}

# wait_daemon NAME [TIMEOUT_S] — wait until daemon NAME accepts on api.sock.
wait_daemon() {
    local name=$1 timeout=${2:-20}
    local pid=${DAEMON_PID[$name]} rc
    local deadline=$((SECONDS + timeout))
    while ! _api_up "$name"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null && rc=0 || rc=$?
            fail "daemon $name exited (status $rc) before its socket was up"
        fi
        [ "$SECONDS" -lt "$deadline" ] ||
            fail "daemon $name: api.sock not up after ${timeout}s"
        sleep 0.1
    done
}

# start_daemon NAME [VAR=VALUE…] — spawn_daemon, then wait up to 20 s for its
# socket to accept (the daemon listens once its startup recovery is done).
start_daemon() {
    spawn_daemon "$@"
    wait_daemon "$1" 20
}

# start_primary / start_replica [VAR=VALUE…] — the two usual daemons.
start_primary() {
    start_daemon primary "$@"
}
start_replica() {
    start_daemon replica "$@"
}

_stop_pid() { # PID TIMEOUT_S — SIGTERM, wait, then SIGKILL
    # Only while PID is still our child: bash reaps a background job as
    # soon as it ends, and its number may then be another process's.  (The
    # SIGKILL used to follow every stop, to a number already released:
    # strace showed kill(N, 0) = ESRCH, then kill(N, SIGKILL).)
    local pid=$1 timeout=$2 i
    _is_child "$pid" && kill -TERM "$pid" 2>/dev/null ||
        { wait "$pid" 2>/dev/null || true; return 0; }
    for ((i = 0; i < timeout * 10; i++)); do
        _is_child "$pid" || break
        sleep 0.1
    done
    if _is_child "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    return 0
}

# stop_daemon NAME — SIGTERM daemon NAME and wait for it (SIGKILL after 20 s).
stop_daemon() {
    local name=$1
    [ -n "${DAEMON_PID[$name]:-}" ] || return 0
    _stop_pid "${DAEMON_PID[$name]}" 20
    unset "DAEMON_PID[$name]"
}

# kill_daemon NAME — SIGKILL daemon NAME and reap it.
kill_daemon() {
    local name=$1
    [ -n "${DAEMON_PID[$name]:-}" ] || return 0
    if _is_child "${DAEMON_PID[$name]}"; then
        kill -KILL "${DAEMON_PID[$name]}" 2>/dev/null || true
    fi
    wait "${DAEMON_PID[$name]}" 2>/dev/null || true
    unset "DAEMON_PID[$name]"
}

# daemon_dead NAME — true once daemon NAME has exited (and reaps it).
daemon_dead() {
    local pid=${DAEMON_PID[$1]:-}
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        return 1
    fi
    # shellcheck disable=SC2034 # read by tests
    wait "$pid" 2>/dev/null && DAEMON_STATUS=0 || DAEMON_STATUS=$?
    unset "DAEMON_PID[$1]"
    return 0
}

# killed_at NAME FAULT SECONDS — wait up to SECONDS until daemon NAME has
# died, and fail unless it died by SIGKILL (status 137, as a shell reports
# it), as VMREPLICA_FAULT=FAULT makes it at its fault point.
killed_at() {
    wait_until "$3" daemon_dead "$1" ||
        fail "$1 did not hit fault point $2 within $3 s"
    [ "$DAEMON_STATUS" -eq 137 ] ||
        fail "$1 exited with status $DAEMON_STATUS, not by SIGKILL at $2"
}

# crash_daemon NAME FAULT CMD… — restart daemon NAME (primary or replica)
# with VMREPLICA_FAULT=FAULT, run `vmreplica CMD…` against it, which must
# fail as the daemon dies by SIGKILL at the fault point, then start it
# normally again.  crash_replica FAULT CMD… is crash_daemon replica.
crash_daemon() {
    local name=$1 fault=$2 env
    shift 2
    if [ "$name" = primary ]; then
        env=(${PRIMARY_ENV[@]+"${PRIMARY_ENV[@]}"})
    else
        env=(${REPLICA_ENV[@]+"${REPLICA_ENV[@]}"})
    fi
    stop_daemon "$name"
    spawn_daemon "$name" ${env[@]+"${env[@]}"} VMREPLICA_FAULT="$fault"
    wait_daemon "$name" 20
    vr "$name" "$@" >/dev/null 2>&1 && fail "$* survived fault $fault"
    killed_at "$name" "$fault" 30
    start_daemon "$name" ${env[@]+"${env[@]}"}
}
crash_replica() { crash_daemon replica "$@"; }

# vr NAME ARGS… — the vmreplica CLI against daemon NAME.
vr() {
    local name=$1
    shift
    timeout "$VR_TIMEOUT" "$VMREPLICA" --connect "$(api_sock "$name")" "$@"
}

# vrj NAME ARGS… — the same with --json.
vrj() {
    local name=$1
    shift
    vr "$name" --json "$@"
}

# jget NAME FILTER ARGS… — run `vr NAME --json ARGS…` and apply jq FILTER.
jget() {
    local name=$1 filter=$2
    shift 2
    vrj "$name" "$@" | jq -er "$filter"
}

# disk_path NAME VM [INDEX] / nbd_uri NAME VM [INDEX] — from `vm show --json`.
disk_path() {
    jget "$1" ".disks[${3:-0}].path" vm show "$2" ||
        fail "$1: no path for disk ${3:-0} of vm $2"
}
nbd_uri() {
    jget "$1" ".disks[${3:-0}].nbd_uri" vm show "$2" ||
        fail "$1: no nbd_uri for disk ${3:-0} of vm $2 (not served?)"
}

# assert_vm_runs NAME VM — VM's QEMU runs on daemon NAME now (a guest that
# keeps running: the caller knows), and its status says so: `vm list` and
# `vm show` say running, `vm show --json` has "running" and "hypervisor"
# true, and a disk's nbd_uri, if given, names a socket that exists.
assert_vm_runs() {
    local st show uri
    st=$(vr "$1" vm list | awk -v n="$2" 'index($0, n "  ") == 1 {
        sub(/.*  /, ""); print }') || fail "$1: vm list"
    [ "$st" = running ] || fail "$1: vm list says '$st' for $2, whose QEMU runs"
    st=$(vr "$1" vm show "$2" | sed -n 's/^State: *//p') || fail "$1: vm show $2"
    [ "$st" = running ] || fail "$1: vm show $2 says '$st', its QEMU runs"
    show=$(vrj "$1" vm show "$2") || fail "$1: vm show --json $2"
    [ "$(jq -c '[.running, .hypervisor]' <<<"$show")" = '[true,true]' ] ||
        fail "$1: vm show $2: running, hypervisor: $(jq -c '[.running, .hypervisor]' <<<"$show")"
    for uri in $(jq -r '.disks // [] | .[] | .nbd_uri // empty' <<<"$show"); do
        [ -S "${uri#*socket=}" ] || fail "$1: vm show $2: $uri: no such socket"
    done
}

# repl NAME VM KEY — one key of `replication show --json` (null → "null").
repl() {
    vrj "$1" replication show "$2" | jq -r ".$3"
}

# vm_stopped NAME VM — true if QEMU does not run VM on daemon NAME now.
# repl_is NAME VM KEY VALUE — true if replication KEY of VM is VALUE now.
# (For wait_until: its command is run again each time, unlike a "$(…)"
# argument, which the shell expands once.)
vm_stopped() { [ "$(vrj "$1" vm show "$2" | jq -r .running)" = false ]; }
repl_is() { [ "$(repl "$1" "$2" "$3" 2>/dev/null)" = "$4" ]; }

# The test PKI (scripts/mkpki.sh) and the certificate port of the replica.
PKI=$TESTDIR/pki
REPLICA_PORT=

# setup_pair — PKI, then a Replica server daemon "replica" and a primary
# daemon "primary" on loopback, configured for certificate authentication
# (replica: allow any authenticated primary, storage in
# $TESTDIR/replica-storage).  Extra environment for each daemon can be
# given in the arrays PRIMARY_ENV and REPLICA_ENV (VAR=VALUE words).
# A test that starts the daemons its own way calls pair_pki, starts them,
# then configure_pair.
setup_pair() {
    pair_pki
    start_daemon replica ${REPLICA_ENV[@]+"${REPLICA_ENV[@]}"}
    start_daemon primary ${PRIMARY_ENV[@]+"${PRIMARY_ENV[@]}"}
    configure_pair
}
pair_pki() { # the PKI, REPLICA_PORT and the Replica storage directory
    "$SOURCE_DIR/scripts/mkpki.sh" "$PKI"
    REPLICA_PORT=$(free_port)
    mkdir -p "$TESTDIR/replica-storage"
}
configure_pair() { # the server settings of the running replica and primary
    vr replica server set --enable --auth certificate \
        --certificate-port "$REPLICA_PORT" \
        --certificate "$PKI/replica.pem" --key "$PKI/replica.key" \
        --ca "$PKI/ca.pem" --allow-any \
        --default-storage "$TESTDIR/replica-storage" >/dev/null ||
        fail "replica: server set"
    vr primary server set --certificate "$PKI/primary.pem" \
        --key "$PKI/primary.key" --ca "$PKI/ca.pem" >/dev/null ||
        fail "primary: server set"
    wait_until 10 port_open "$REPLICA_PORT" ||
        fail "replica: certificate port $REPLICA_PORT not listening"
}

# port_open PORT — true if something accepts TCP on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# create_vm VM SIZE — create a VM with one new sparse disk on the primary
# and serve its disk (no hypervisor).
create_vm() {
    vr primary vm create "$1" --new-disk "$2" >/dev/null ||
        fail "primary: vm create $1"
    vr primary vm start "$1" --no-hypervisor >/dev/null ||
        fail "primary: vm start $1"
}

# create_vm_small_log VM — create_vm VM 64M whose change log is a 4 MiB
# tmpfs (mounted over DISK.vrlog, unmounted at exit), with its first 4 MiB
# written; sets disk and uri.  Skips the test if not root.
create_vm_small_log() {
    [ "$(id -u)" = 0 ] || skip "not root (mounts a tmpfs)"
    vr primary vm create "$1" --new-disk 64M >/dev/null || fail "vm create $1"
    disk=$(disk_path primary "$1")
    mkdir -p "$disk.vrlog"
    mount -t tmpfs -o size=4m tmpfs "$disk.vrlog" || skip "cannot mount a tmpfs"
    cleanup_fn umount -l "$disk.vrlog"
    vr primary vm start "$1" --no-hypervisor >/dev/null || fail "vm start $1"
    uri=$(nbd_uri primary "$1")
    qemu-io -f raw "$uri" -c 'write -P 0x11 0 4M' >/dev/null ||
        fail "write $1"
}

# enable_replication VM [OPTIONS…] — enable replication of VM to the replica
# of setup_pair (certificate auth) and run initial replication to the end.
enable_replication() {
    local vm=$1
    shift
    vr primary replication enable "$vm" \
        --replica-server "replica.test.local:$REPLICA_PORT" \
        --connect-address 127.0.0.1 --auth certificate "$@" >/dev/null ||
        fail "primary: replication enable $vm"
    vr primary initial-replication start "$vm" --wait >/dev/null ||
        fail "primary: initial-replication start $vm --wait"
}

# The daemons a VM replicates from and to (swapped by a test after
# `replication reverse`); the functions below follow them.
SRC=primary
DST=replica

# wait_converged VM [TIMEOUT_S] — call once the writers have stopped: waits
# until the primary has nothing left to send (pending_size 0: no unsent
# sealed segment and an empty open one) and the replica has applied the
# primary's last acknowledged cycle, so the replica holds every write made
# before the call.  A cycle sealed before the writers stopped but still in
# flight keeps pending_size above 0, so it cannot be missed.  Sets
# CONVERGED_CYCLE to the cycle the replica reached.
wait_converged() {
    local vm=$1 timeout=${2:-60}
    CONVERGED_CYCLE=
    wait_until "$timeout" _converged "$vm" ||
        fail "vm $vm: replica did not converge within ${timeout}s (primary last_cycle $(repl "$SRC" "$vm" last_cycle 2>/dev/null || echo '?'), pending $(vrj "$SRC" replication measure "$vm" 2>/dev/null | jq -r .pending_size), replica applied $(repl "$DST" "$vm" applied_cycle 2>/dev/null || echo '?'))"
}
_converged() { # VM
    local pending last applied
    pending=$(vrj "$SRC" replication measure "$1" 2>/dev/null |
        jq -r .pending_size) || return 1
    [ "$pending" = 0 ] || return 1
    last=$(repl "$SRC" "$1" last_cycle 2>/dev/null) || return 1
    applied=$(repl "$DST" "$1" applied_cycle 2>/dev/null) || return 1
    [[ $last =~ ^[0-9]+$ && $applied =~ ^[0-9]+$ ]] || return 1
    [ "$applied" -ge "$last" ] || return 1
    CONVERGED_CYCLE=$applied
}
_applied_at_least() { # VM N
    local a
    a=$(repl "$DST" "$1" applied_cycle 2>/dev/null) || return 1
    [[ $a =~ ^[0-9]+$ ]] && [ "$a" -ge "$2" ]
}

# assert_replicating VM — both the primary and the replica say Replicating.
assert_replicating() {
    local side st
    for side in "$SRC" "$DST"; do
        st=$(repl "$side" "$1" state)
        [ "$st" = Replicating ] || fail "vm $1: $side state is $st"
    done
}

# assert_normal_after_outage VM — after an outage the only health detail
# left on the primary may be the share of cycles it missed (SPEC §9);
# reset-stats clears it, and then the health is Normal.
assert_normal_after_outage() {
    local det
    det=$(vrj "$SRC" replication show "$1" |
        jq -c '.health_details - ["more than 20% of cycles were missed"]')
    [ "$det" = '[]' ] || fail "vm $1: health after the outage: $det"
    vr "$SRC" replication reset-stats "$1" >/dev/null || fail "reset-stats $1"
    [ "$(jget "$SRC" .health replication show "$1")" = Normal ] ||
        fail "vm $1: health after reset-stats: $(vrj "$SRC" replication show "$1" | jq -c .health_details)"
}

# assert_identical VM — the primary and replica disks of VM are the same,
# byte for byte (every disk).
assert_identical() {
    local vm=$1 n i p r
    n=$(jget "$SRC" '.disks | length' vm show "$vm")
    for ((i = 0; i < n; i++)); do
        p=$(disk_path "$SRC" "$vm" "$i")
        r=$(disk_path "$DST" "$vm" "$i")
        cmp "$p" "$r" ||
            fail "vm $vm disk $i: replica $r differs from primary $p"
    done
    log "vm $vm: replica is byte-identical to the primary ($n disk(s))"
}

# --- the boot-sector test guest (tests/guest/guest.S) ----------------------
#
# guest_params — GUEST, GUESTDISK, TOTAL, BASE, NSECT (skips the test if the
# guest is not built).  max_stamp DISK — the newest sequence stamp in the
# guest's sectors of DISK (0: none).
guest_params() {
    GUEST=$BUILD_DIR/tests/guest/guest.img
    [ -s "$GUEST" ] || skip "guest image not built: $GUEST"
    GUESTDISK=$SOURCE_DIR/tests/guest/guestdisk.py
    read -r TOTAL BASE NSECT _ _ < <(python3 "$GUESTDISK" params "$GUEST") ||
        fail "$GUEST has no parameter block"
}
max_stamp() { python3 "$GUESTDISK" max-stamp "$1" "$BASE" "$NSECT"; }

# create_guest_vm VM [ENABLE-OPTIONS…] — import the guest as a 64 MiB VM on
# the primary and replicate it (initial replication done) with OPTIONS;
# its disks are left unserved.
create_guest_vm() {
    local vm=$1
    shift
    qemu-img convert -f raw -O qcow2 "$GUEST" "$TESTDIR/$vm.qcow2" &&
        qemu-img resize -q -f qcow2 "$TESTDIR/$vm.qcow2" 64M ||
        fail "guest qcow2"
    vr primary vm create "$vm" --disk "$TESTDIR/$vm.qcow2" --memory 64M \
        >/dev/null || fail "vm create $vm"
    vr primary vm start "$vm" --no-hypervisor >/dev/null ||
        fail "vm start --no-hypervisor"
    enable_replication "$vm" "$@"
    vr primary vm stop "$vm" >/dev/null || fail "vm stop"
}

# run_guest_replicated VM — boot VM on the primary until the guest prints
# done and QEMU exits, serve its disks again and wait until the replica is
# byte-identical.  Sets UUID.
run_guest_replicated() {
    local vm=$1 console
    UUID=$(jget primary .uuid vm show "$vm")
    console=$(state_dir primary)/run/$UUID/console.log
    vr primary vm start "$vm" >/dev/null || fail "vm start $vm (QEMU)"
    wait_until "$GUEST_TIMEOUT" grep -q '^done' "$console" ||
        fail "guest did not print done on the primary"
    wait_until 30 vm_stopped primary "$vm" ||
        fail "QEMU did not exit after done"
    vr primary vm start "$vm" --no-hypervisor >/dev/null ||
        fail "serve $vm again"
    wait_converged "$vm" 60
    assert_identical "$vm"
}

# mid_run_point VM POINTS-JSON — P and PSTAMP: the first of the points whose
# disk, rebuilt from the Replica disk and its undo spans, holds some of the
# guest's stamps but not all (the guest caught mid-run).
mid_run_point() {
    local vm=$1 pts=$2 rdisk id s
    rdisk=$(disk_path replica "$vm")
    P=
    for id in $(jq -r '.[].id' <<<"$pts"); do
        "$BUILD_DIR/tests/tools/pointcat" "$(dirname "$rdisk")/undo" "$id" \
            "$(repl replica "$vm" applied_cycle)" "$TESTDIR/pt" "$rdisk" ||
            fail "point $id cannot be rebuilt"
        s=$(max_stamp "$TESTDIR/pt.0")
        if [ "$s" -gt 0 ] && [ "$s" -lt "$TOTAL" ]; then
            P=$id
            PSTAMP=$s
            break
        fi
    done
    [ -n "$P" ] || fail "no point caught the guest mid-run: $pts"
}

# Random-data writers through a disk's NBD export.
#
# start_writer VM [BLOCK] — write fresh random BLOCK-sized pieces (default
# 64k) at random aligned offsets, with some write-zeroes and discards, in a
# loop in the background until stop_writer.  Sets WRITER_PID.
start_writer() {
    local vm=$1 block=${2:-64k} uri size
    uri=$(nbd_uri primary "$vm")
    size=$(jget primary '.disks[0].size' vm show "$vm")
    WRITER_STOP=$TESTDIR/writer-$vm.stop
    rm -f "$WRITER_STOP"
    _writer "$uri" "$size" "$block" "$WRITER_STOP" "$TESTDIR/writer-$vm" \
        >>"$TESTDIR/writer-$vm.log" 2>&1 &
    WRITER_PID=$!
    _bg_pids+=("$WRITER_PID")
}
_writer() { # URI SIZE BLOCK STOPFILE TMPPREFIX
    local uri=$1 size=$2 block=$3 stop=$4 tmp=$5 bs nblocks off n=0
    bs=$(numfmt --from=iec "${block^^}")
    nblocks=$((size / bs))
    while [ ! -e "$stop" ]; do
        head -c "$bs" /dev/urandom >"$tmp.buf"
        off=$(((RANDOM * 32768 + RANDOM) % nblocks * bs))
        case $((n % 8)) in
        5) qemu-io -f raw "$uri" -c "write -z $off $bs" ;;
        7) qemu-io -f raw "$uri" -c "discard $off $bs" ;;
        *) qemu-io -f raw "$uri" -c "write -s $tmp.buf $off $bs" ;;
        esac || { echo "writer: qemu-io failed"; return 1; }
        n=$((n + 1))
        sleep 0.05
    done
    echo "writer: $n operations"
}

# stop_writer — stop the writer and wait for its last write to complete.
stop_writer() {
    [ -n "${WRITER_PID:-}" ] || return 0
    touch "$WRITER_STOP"
    wait "$WRITER_PID" || fail "writer failed (see $TESTDIR/writer-*.log)"
    WRITER_PID=
}

# --- Kerberos: a private MIT realm on loopback -----------------------------
#
# krb_realm — realm TEST.LOCAL under $KRB with its KDC on a free loopback
# port (TCP only), no /etc change and no DNS: KRB5_CONFIG is exported, so
# the daemons and tools started afterwards use it.  Principals and keytabs:
#   $KRB/primary.keytab  host/ and HTTP/primary.test.local
#   $KRB/replica.keytab  host/ and HTTP/replica.test.local
#   $KRB/rogue.keytab    host/rogue.test.local (a host no entry admits)
#   $KRB/alice.keytab    alice (a user, not a host)
#   $KRB/wild.keytab     host/ of test.local, a.b.test.local, badtest.local
#                        and test.local.evil.net (wildcard edge cases)
# The KDC is stopped at exit.
KRB=$TESTDIR/krb
krb_realm() {
    requires krb5kdc kdb5_util kadmin.local
    local port p
    port=$(free_port)
    mkdir -p "$KRB"
    cat >"$KRB/krb5.conf" <<EOC
[libdefaults]
  default_realm = TEST.LOCAL
  dns_lookup_kdc = false
  dns_lookup_realm = false
  rdns = false
  dns_canonicalize_hostname = false
  udp_preference_limit = 1
  default_ccache_name = FILE:$KRB/ccache
  default_keytab_name = FILE:$KRB/none.keytab
[realms]
  TEST.LOCAL = {
    kdc = 127.0.0.1:$port
  }
[domain_realm]
  .test.local = TEST.LOCAL
  test.local = TEST.LOCAL
EOC
    cat >"$KRB/kdc.conf" <<EOC
[kdcdefaults]
  kdc_listen = 127.0.0.1:$port
  kdc_tcp_listen = 127.0.0.1:$port
[realms]
  TEST.LOCAL = {
    database_name = $KRB/principal
    key_stash_file = $KRB/stash
    acl_file = $KRB/kadm5.acl
    max_life = 10h
    supported_enctypes = aes256-cts-hmac-sha1-96:normal
  }
[logging]
  kdc = FILE:$KRB/kdc.log
EOC
    : >"$KRB/kadm5.acl"
    export KRB5_CONFIG=$KRB/krb5.conf KRB5_KDC_PROFILE=$KRB/kdc.conf
    kdb5_util create -s -r TEST.LOCAL -P "master-$RANDOM$RANDOM" \
        >"$KRB/setup.log" 2>&1 || fail "kdb5_util create (see $KRB/setup.log)"
    for p in host/primary.test.local HTTP/primary.test.local \
        host/replica.test.local HTTP/replica.test.local \
        host/rogue.test.local alice host/test.local host/a.b.test.local \
        host/badtest.local host/test.local.evil.net; do
        kadmin.local -q "addprinc -randkey $p" >>"$KRB/setup.log" 2>&1 ||
            fail "kadmin.local addprinc $p"
    done
    kadmin.local -q "ktadd -k $KRB/primary.keytab host/primary.test.local HTTP/primary.test.local" \
        >>"$KRB/setup.log" 2>&1 || fail "ktadd primary"
    kadmin.local -q "ktadd -k $KRB/replica.keytab host/replica.test.local HTTP/replica.test.local" \
        >>"$KRB/setup.log" 2>&1 || fail "ktadd replica"
    kadmin.local -q "ktadd -k $KRB/rogue.keytab host/rogue.test.local" \
        >>"$KRB/setup.log" 2>&1 || fail "ktadd rogue"
    kadmin.local -q "ktadd -k $KRB/alice.keytab alice" \
        >>"$KRB/setup.log" 2>&1 || fail "ktadd alice"
    kadmin.local -q "ktadd -k $KRB/wild.keytab host/test.local host/a.b.test.local host/badtest.local host/test.local.evil.net" \
        >>"$KRB/setup.log" 2>&1 || fail "ktadd wild"
    krb5kdc -n -P "$KRB/kdc.pid" >"$KRB/kdc.stdout" 2>&1 &
    KDC_PID=$!
    _bg_pids+=("$KDC_PID")
    KDC_PORT=$port
    wait_until 10 port_open "$port" || fail "KDC not listening on $port"
}

# setup_krb_pair — krb_realm, then the daemons "replica" (a Replica server
# with Kerberos authentication on KRB_PORT, its keytab, any authenticated
# primary admitted, storage in $TESTDIR/replica-storage) and "primary"
# (its keytab).  Extra daemon environment: PRIMARY_ENV, REPLICA_ENV.
setup_krb_pair() {
    krb_realm
    KRB_PORT=$(free_port)
    mkdir -p "$TESTDIR/replica-storage"
    start_daemon replica ${REPLICA_ENV[@]+"${REPLICA_ENV[@]}"}
    start_daemon primary ${PRIMARY_ENV[@]+"${PRIMARY_ENV[@]}"}
    vr replica server set --enable --auth kerberos \
        --kerberos-port "$KRB_PORT" --keytab "$KRB/replica.keytab" \
        --allow-any --default-storage "$TESTDIR/replica-storage" \
        >/dev/null || fail "replica: server set (Kerberos)"
    vr primary server set --keytab "$KRB/primary.keytab" >/dev/null ||
        fail "primary: server set --keytab"
    wait_until 10 port_open "$KRB_PORT" ||
        fail "replica: Kerberos port $KRB_PORT not listening"
}
