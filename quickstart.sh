#!/bin/bash
# quickstart.sh demo|test — set up a Debian 12 machine, build, and run.
#
#   ./quickstart.sh demo   install what is missing, build, run scripts/demo.sh
#                          (a primary and a Replica server on loopback
#                          replicating a VM that writes)
#   ./quickstart.sh test   install what is missing, build, run the whole test
#                          suite, then the unit tests again under ASan+UBSan
#                          (clang), and print "N passed, N failed, N skipped"
#
# Packages are installed with apt-get only when running as root; otherwise
# the missing ones are listed and the script stops.
set -euo pipefail

cd "$(dirname "$0")"

PACKAGES=(build-essential meson ninja-build pkg-config nbdkit
    nbdkit-plugin-dev libnbd-dev libnbd-bin qemu-system-x86 qemu-utils
    libzstd-dev libxxhash-dev libgnutls28-dev gnutls-bin libcurl4-gnutls-dev
    libmicrohttpd-dev libsqlite3-dev libjson-c-dev openssl curl jq socat
    zstd rsync xxhash clang python3 busybox-static qemu-guest-agent e2fsprogs
    libkrb5-dev krb5-user krb5-kdc krb5-admin-server faketime
    nftables iproute2 python3-libnbd fio strace scdoc debhelper
    resource-agents libxml2-utils chromium
    libvirt-dev libxml2-dev libvirt-daemon-system libvirt-clients)

say() { # with the seconds since the start, to see where a run's time goes
    printf 'quickstart: [%ss] %s\n' "$SECONDS" "$*"
}
die() {
    printf 'quickstart: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    echo "usage: $0 demo|test" >&2
    exit 2
}

install_packages() {
    local missing=() p
    if ! command -v dpkg-query >/dev/null 2>&1; then
        say "not a Debian system: make sure these are installed: ${PACKAGES[*]}"
        return 0
    fi
    for p in "${PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" != "ii " ]; then
            missing+=("$p")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        die "missing packages: ${missing[*]}
  install them as root:  apt-get install ${missing[*]}"
    fi
    say "installing: ${missing[*]}"
    apt-get update -q
    # The tests run a Kerberos KDC of their own; the packages must not
    # start the system's (unconfigured) KDC and kadmind, whose failure to
    # start would fail the install where no policy says otherwise.
    local policy=/usr/sbin/policy-rc.d added=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added=true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}" </dev/null || {
        [ "$added" = false ] || rm -f "$policy"
        die "apt-get install failed"
    }
    [ "$added" = false ] || rm -f "$policy"
}

# setup DIR [OPTIONS…] — meson setup (or --reconfigure) quietly; on failure
# show meson's output.
setup() {
    local dir=$1 out
    shift
    if [ -e "$dir/meson-private/coredata.dat" ]; then
        set -- --reconfigure "$@"
    fi
    out=$(mktemp)
    if ! meson setup "$@" "$dir" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        return 1
    fi
    rm -f "$out"
}

build() {
    # Warnings are errors in CI only (STYLE.md): a new compiler's new
    # warning must not stop a user's build.
    local werror=false
    [ "${CI:-}" != true ] || werror=true
    say "configuring (meson setup build, werror=$werror)"
    setup build -Dwerror="$werror" || die "meson setup build failed"
    say "building (ninja -C build)"
    ninja -C build
}

run_tests() {
    local ncpu jobs rc=0
    ncpu=$(nproc 2>/dev/null || echo 2)
    # Two tests more than CPUs: the integration scenarios spend most of
    # their time waiting (replication periods, polls, guests), so four at
    # once on two cores take about a third of the time of one at a time.
    jobs=$((ncpu + 2))
    [ "$jobs" -le 6 ] || jobs=6

    rm -f build/meson-logs/testlog.json build-asan/meson-logs/testlog.json \
        build-asan/meson-logs/fuzzlog.json

    # Timeouts are for hangs, set for a test running alone: tripled, as a
    # test sharing the CPUs with three others may take three times as long.
    say "running the test suite (meson test -C build)"
    meson test -C build --print-errorlogs --num-processes "$jobs" \
        --timeout-multiplier 3 || rc=1

    say "building with ASan+UBSan (clang, build-asan)"
    if CC=clang setup build-asan -Db_sanitize=address,undefined \
        -Db_lundef=false -Dc_args=-fno-sanitize-recover=all \
        -Dfuzzing=true -Dfuzz_seconds=15 \
        -Dintegration_plugin="$PWD/build/plugin/nbdkit-vmreplica-plugin.so"; then
        say "under ASan+UBSan: unit tests, each fuzzer briefly, and the" \
            "'sanitize' integration tests with the daemon and CLI instrumented"
        meson test -C build-asan --suite unit --suite sanitize \
            --print-errorlogs --num-processes "$jobs" \
            --timeout-multiplier 3 || rc=1
        # A fuzzer runs for a fixed time and finds as much as the CPU it
        # gets: one per CPU, with nothing else of ours beside them.
        meson test -C build-asan --suite fuzz --logbase fuzzlog \
            --print-errorlogs --num-processes "$ncpu" \
            --timeout-multiplier 3 || rc=1
    else
        say "error: meson setup build-asan failed"
        rc=1
    fi

    say "done"
    echo
    scripts/test-summary.sh \
        build/meson-logs/testlog.json build-asan/meson-logs/testlog.json \
        build-asan/meson-logs/fuzzlog.json || rc=1
    return "$rc"
}

[ $# -eq 1 ] || usage
case $1 in
demo | test) ;;
*) usage ;;
esac

install_packages
build

case $1 in
demo) exec scripts/demo.sh ;;
test) run_tests ;;
esac
