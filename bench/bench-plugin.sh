#!/usr/bin/env bash
# bench-plugin.sh: tracked writes through nbdkit-vmreplica-plugin versus
# nbdkit's own file plugin on the same kind of file, with fio's nbd engine
# (a real NBD client) over a unix socket.
#
#   bench/bench-plugin.sh                # uses ./build
#   BUILD_DIR=build RUNTIME=10 DIR=/dev/shm SIZE=1G ROUNDS=3 bench/bench-plugin.sh
#
# Jobs (each on a fresh sparse SIZE file, file plugin first, then tracked):
#   rand4k-qd1    4 KiB random writes, iodepth 1, RUNTIME seconds
#   rand4k-qd16   4 KiB random writes, iodepth 16, RUNTIME seconds
#   seq1m         1 MiB sequential writes, iodepth 4, 2 x SIZE bytes
# Prints IOPS / MB/s per job and the ratio tracked / file (target >= 0.9).
#
# CLIENT=qemu-img drives the exports with `qemu-img bench` instead (QEMU's
# own NBD client, the path a VM takes): it writes sequentially, so its
# jobs are
#   seq4k-qd1     4 KiB sequential writes, 1 in flight, QCOUNT requests
#   seq4k-qd16    the same, 16 in flight
# KINDS (default "file tracked") adds other sides: qemu-nbd (the same kind
# of raw file served by qemu-nbd, --cache=writeback) and direct (qemu-img
# bench on the raw file itself, no NBD: the limit of this path; through
# the page cache, as the NBD servers write, unless DIRECT_CACHE=none).
# Every side's median is also printed as a line "RES JOB KIND VALUE".
#
# While a tracked run goes, a loop does what vmreplicad does with a 1 s
# frequency: SEAL every second over the control socket, then (the cycle
# "shipped") keep the sealed segment as the plugin's spare for its next
# segment, as the shipper does.  CYCLE_S=0 turns the loop off (one segment
# for the whole run).  The log-bytes column adds up the sealed segments.
# LOGIO=auto|write|mmap selects the plugin's logio= (how records reach the log).
# LOG=ref|data selects the plugin's log= (writes logged by reference to the
# disk, the default, or with their data copied into the log).  With
# LOG=ref the loop reports cycles shipped (SHIPPED) SHIP_LAG cycles after
# sealing them: SHIP_LAG=1 (default) models a shipper that needs a whole
# period to send a cycle, so every cycle stays protected for CYCLE_S
# seconds and writes that overwrite its blocks meanwhile pay for preserving
# them; SHIP_LAG=0 models instant shipping (as the LOG=data loop does by
# recycling each segment at once).  The log-bytes column then includes the
# preserve files.
set -euo pipefail

BUILD_DIR=${BUILD_DIR:-./build}
PLUGIN=${VMREPLICA_PLUGIN:-$BUILD_DIR/plugin/nbdkit-vmreplica-plugin.so}
RUNTIME=${RUNTIME:-10}
DIR=${DIR:-/dev/shm}
SIZE=${SIZE:-1G}
CYCLE_S=${CYCLE_S:-1}
LOGIO=${LOGIO:-auto}
LOG=${LOG:-ref}
SHIP_LAG=${SHIP_LAG:-1}
ROUNDS=${ROUNDS:-3}
CLIENT=${CLIENT:-fio}
KINDS=${KINDS:-file tracked}
QCOUNT=${QCOUNT:-200000}
DIRECT_CACHE=${DIRECT_CACHE:-writeback}

for c in nbdkit python3 $([ "$CLIENT" = fio ] && echo fio || echo qemu-img) \
    $([[ " $KINDS " = *" qemu-nbd "* ]] && echo qemu-nbd); do
    command -v "$c" >/dev/null || { echo "bench: $c not found" >&2; exit 77; }
done
[ -f "$PLUGIN" ] || { echo "bench: $PLUGIN not built" >&2; exit 77; }
PLUGIN=$(realpath "$PLUGIN")

T=$(mktemp -d "$DIR/vr-bench.XXXXXX")
PID=
cleanup() {
    [ -z "${SEALER:-}" ] || kill "$SEALER" 2>/dev/null || true
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

start() { # start file|tracked|qemu-nbd|direct
    rm -rf "$T/disk.raw" "$T/disk.raw.vrlog" "$T/nbd.sock"
    truncate -s "$SIZE" "$T/disk.raw"
    if [ "$1" = direct ]; then
        URI=$T/disk.raw
        return 0
    elif [ "$1" = qemu-nbd ]; then
        qemu-nbd -f raw -k "$T/nbd.sock" -t --cache=writeback --aio=threads \
            "$T/disk.raw" &
        URI="nbd+unix:///?socket=$T/nbd.sock"
    elif [ "$1" = file ]; then
        nbdkit --foreground --unix "$T/nbd.sock" file file="$T/disk.raw" &
        URI="nbd+unix:///?socket=$T/nbd.sock"
    else
        nbdkit --foreground --unix "$T/nbd.sock" "$PLUGIN" \
            disk=disk0:"$T/disk.raw" control="$T/ctl.sock" \
            logio="$LOGIO" log="$LOG" &
        URI="nbd+unix:///disk0?socket=$T/nbd.sock"
    fi
    PID=$!
    for _ in $(seq 100); do
        [ -S "$T/nbd.sock" ] && return 0
        sleep 0.05
    done
    echo "bench: nbdkit did not start" >&2
    exit 1
}

# The daemon's part: seal every CYCLE_S seconds and recycle the segment,
# from one process on one control connection (as vmreplicad's shipper
# keeps its cost off the data plane's CPUs as far as it can).
SEALER=
start_sealer() {
    : >"$T/sealed-bytes"
    [ "$CYCLE_S" != 0 ] || return 0
    python3 - "$T" "$CYCLE_S" "$LOG" "$SHIP_LAG" <<'PY' &
import os, socket, sys, time
t, period, log, lag = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
d = t + "/disk.raw.vrlog"
s = socket.socket(socket.AF_UNIX)
s.connect(t + "/ctl.sock")
f = s.makefile("rw")
out = open(t + "/sealed-bytes", "a")
def ask(line):
    f.write(line + "\n"); f.flush()
    return f.readline().strip()
def keep_as_spare(path):
    # Never over an existing spare (as the shipper does): the plugin may
    # have it open.  link + unlink is rename without replacing.
    try:
        os.link(path, d + "/spare")
    except FileExistsError:
        pass
    os.unlink(path)
nxt = time.monotonic() + period
while True:
    time.sleep(max(0, nxt - time.monotonic()))
    nxt += period
    r = ask("SEAL")
    if not r.startswith("OK "):
        continue
    n = int(r[3:])
    seg = "%s/%020d.log" % (d, n)
    out.write("%d\n" % os.stat(seg).st_size); out.flush()
    if log != "ref":
        keep_as_spare(seg)
        continue
    # Cycle n - lag is now shipped: release it, keep its segment as spare.
    c = n - lag
    if c < 1:
        continue
    ask("SHIPPED %d" % c)
    prev = "%s/%020d" % (d, c)
    if os.path.exists(prev + ".pre"):
        out.write("%d\n" % os.stat(prev + ".pre").st_size); out.flush()
        os.unlink(prev + ".pre")
    keep_as_spare(prev + ".log")
PY
    SEALER=$!
}
stop_sealer() {
    [ -z "$SEALER" ] || { kill "$SEALER" 2>/dev/null; wait "$SEALER" 2>/dev/null || true; }
    SEALER=
    local open
    open=$(du -cb "$T"/disk.raw.vrlog/*.open 2>/dev/null | tail -1 | cut -f1)
    awk -v o="${open:-0}" '{ s += $1 } END { printf "%.0f\n", s + o }' \
        "$T/sealed-bytes"
}

stop() {
    [ -n "$PID" ] || return 0
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
}

run_fio() { # run_fio NAME ARGS... -> prints "iops bw_bytes"
    local name=$1
    shift
    fio --name="$name" --ioengine=nbd --uri="$URI" --size="$SIZE" \
        --output-format=json --output="$T/fio.json" "$@" >/dev/null
    python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print("%.0f %.0f" % (j["iops"], j["bw_bytes"]))' "$T/fio.json"
}

# run_qimg DEPTH [CACHE] -> prints "iops bw_bytes" (QCOUNT 4 KiB writes)
run_qimg() {
    local out secs
    out=$(qemu-img bench -w -t "${2:-none}" -c "$QCOUNT" -d "$1" -s 4096 \
        -f raw "$URI") || { echo "bench: qemu-img bench $URI failed" >&2; exit 1; }
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
    awk -v n="$QCOUNT" -v s="$secs" 'BEGIN { printf "%.0f %.0f\n", n / s, n * 4096 / s }'
}

# run_job JOB KIND -> prints "iops bw_bytes"
run_job() {
    case $1 in
    seq4k-qd1) run_qimg 1 "$([ "$2" = direct ] && echo "$DIRECT_CACHE")" ;;
    seq4k-qd16) run_qimg 16 "$([ "$2" = direct ] && echo "$DIRECT_CACHE")" ;;
    *) # shellcheck disable=SC2046
       run_fio "$1" $(job_args "$1") ;;
    esac
}

declare -A RES
read -r -a kinds <<<"$KINDS"
if [ "$CLIENT" = qemu-img ]; then
    read -r -a jobs <<<"${JOBS:-seq4k-qd1 seq4k-qd16}"
else
    read -r -a jobs <<<"${JOBS:-rand4k-qd1 rand4k-qd16 seq1m}"
fi
job_args() {
    case $1 in
    rand4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1 --time_based" \
        "--runtime=$RUNTIME --randrepeat=1 --norandommap" ;;
    rand4k-qd16) echo "--rw=randwrite --bs=4k --iodepth=16 --time_based" \
        "--runtime=$RUNTIME --randrepeat=1 --norandommap" ;;
    seq1m) echo "--rw=write --bs=1M --iodepth=4 --io_size=$((2 * $(
        numfmt --from=iec "$SIZE")))" ;;
    esac
}

# Alternate file and tracked runs ROUNDS times and report medians: on this
# shared 2-CPU machine one run of either can be off by 30 % or more.
for job in "${jobs[@]}"; do
    for round in $(seq "$ROUNDS"); do
        # Rotate which side goes first: a run inherits the page-cache
        # writeback of the one before it.
        order=()
        for i in "${!kinds[@]}"; do
            order+=("${kinds[(i + round - 1) % ${#kinds[@]}]}")
        done
        for kind in "${order[@]}"; do
            start "$kind"
            [ "$kind" != tracked ] || start_sealer
            read -r iops bw <<<"$(run_job "$job" "$kind")"
            if [ "$job" = seq1m ]; then v=$bw; else v=$iops; fi
            RES[$job.$kind]="${RES[$job.$kind]:-} $v"
            if [ "$kind" = tracked ]; then
                logb=$(stop_sealer)
                [ "$round" != 1 ] || RES[$job.log]=$logb
            fi
            stop
        done
    done
done

median() {
    tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2];
              else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

for job in "${jobs[@]}"; do
    for kind in "${kinds[@]}"; do
        echo "RES $job $kind $(median <<<"${RES[$job.$kind]}")"
    done
done
[[ " $KINDS " = *" file "* && " $KINDS " = *" tracked "* ]] || exit 0
echo "# vmreplica plugin vs nbdkit file plugin ($CLIENT): $DIR, $SIZE file," \
    "runtime ${RUNTIME}$([[ $RUNTIME =~ ^[0-9]+$ ]] && echo s), seal every ${CYCLE_S}s, log=$LOG (ship lag $SHIP_LAG), logio=$LOGIO," \
    "median of $ROUNDS" \
    "alternating rounds," \
    "$(nproc) CPUs, $(nbdkit --version)"
printf '%-12s %14s %14s %8s %14s\n' job file tracked ratio "log bytes"
for job in "${jobs[@]}"; do
    f=$(median <<<"${RES[$job.file]}")
    t=$(median <<<"${RES[$job.tracked]}")
    r=$(awk -v a="$t" -v b="$f" 'BEGIN { printf "%.2fx", a / b }')
    if [ "$job" = seq1m ]; then
        f=$(awk -v b="$f" 'BEGIN { printf "%.0f MB/s", b / 1e6 }')
        t=$(awk -v b="$t" 'BEGIN { printf "%.0f MB/s", b / 1e6 }')
    else
        f="$f IOPS"
        t="$t IOPS"
    fi
    printf '%-12s %14s %14s %8s %14s\n' "$job" "$f" "$t" "$r" \
        "${RES[$job.log]}"
    printf '#   %-10s file:%s  tracked:%s\n' "$job" "${RES[$job.file]}" \
        "${RES[$job.tracked]}"
done
