#!/bin/bash
# check-layers-test.sh: scripts/check-layers.sh fails on what it must
# refuse — an upward include, a sibling include (primary/replica), and a
# layer library that calls a higher one — with the message that names the
# file, the line and the layers; and passes the tree as it is.
#
#   tests/layers/check-layers-test.sh SOURCE_DIR
set -u
src=${1:?usage: check-layers-test.sh SOURCE_DIR}
check=$src/scripts/check-layers.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
not_ok() { n=$((n + 1)); echo "not ok $n - $*"; failed=1; }
failed=0

# A copy of the sources check-layers.sh reads.
mkdir -p "$tmp/tree"
cp -r "$src/lib" "$src/daemon" "$tmp/tree/"

expect() { # name expected-rc pattern args...
    local name=$1 want=$2 pat=$3
    shift 3
    local out rc
    out=$("$check" "$@" 2>&1)
    rc=$?
    if [ "$rc" != "$want" ]; then
        not_ok "$name: exit $rc, expected $want"
        printf '%s\n' "$out" | sed 's/^/# /'
    elif [ -n "$pat" ] && ! printf '%s\n' "$out" | grep -qF -- "$pat"; then
        not_ok "$name: no line with: $pat"
        printf '%s\n' "$out" | sed 's/^/# /'
    else
        ok "$name"
    fi
}

expect "the tree as it is passes" 0 "check-layers: ok" "$tmp/tree"

# An upward include: core may not see net.
f=$tmp/tree/daemon/core/storage.c
cp "$f" "$tmp/storage.c.orig"
line=$(($(wc -l <"$f") + 1))
echo '#include "net/tls.h"' >>"$f"
expect "an upward include fails" 1 \
    "daemon/core/storage.c:$line: includes \"net/tls.h\": core may not include net" \
    "$tmp/tree"
cp "$tmp/storage.c.orig" "$f"

# A bare include of a daemon/ header is the top layer: upward too.
f=$tmp/tree/daemon/proc/vmproc.c
cp "$f" "$tmp/vmproc.c.orig"
line=$(($(wc -l <"$f") + 1))
: >"$tmp/tree/daemon/wiring.h"
echo '#include "wiring.h"' >>"$f"
expect "an include of the top fails" 1 \
    "daemon/proc/vmproc.c:$line: includes \"wiring.h\": proc may not include top" \
    "$tmp/tree"
cp "$tmp/vmproc.c.orig" "$f"
rm "$tmp/tree/daemon/wiring.h"

# The top is main.c alone: any other .c there is in no layer.
: >"$tmp/tree/daemon/stray.c"
expect "a .c beside main.c fails" 1 \
    "daemon/stray.c: in no layer folder" "$tmp/tree"
rm "$tmp/tree/daemon/stray.c"

# lib knows nothing above it.
f=$tmp/tree/lib/util.c
if [ -e "$f" ]; then
    line=$(($(wc -l <"$f") + 1))
    echo '#include "core/state.h"' >>"$f"
    expect "lib including the daemon fails" 1 \
        "lib/util.c:$line: includes \"core/state.h\": lib may not include core" \
        "$tmp/tree"
fi

# Siblings: primary and replica never include each other.
rm -rf "$tmp/tree"
mkdir -p "$tmp/tree/lib" "$tmp/tree/daemon/primary" "$tmp/tree/daemon/replica"
printf '#include "replica/applier.h"\n' >"$tmp/tree/daemon/primary/ship.c"
: >"$tmp/tree/daemon/replica/applier.h"
expect "a sibling include fails" 1 \
    "daemon/primary/ship.c:1: includes \"replica/applier.h\": primary may not include replica" \
    "$tmp/tree"

# Links: libvrd_core.a calls a function only libvrd_net.a defines.
cc=${CC:-cc}
if command -v "$cc" >/dev/null && command -v ar >/dev/null; then
    t=$tmp/tree
    rm -rf "$t"
    mkdir -p "$t/lib" "$t/daemon/core" "$t/daemon/net" \
        "$t/b/daemon/core" "$t/b/daemon/net" "$t/b/daemon/vmreplicad.p"
    printf 'int net_hello(void);\nint core_hi(void) { return net_hello(); }\n' \
        >"$tmp/c.c"
    printf 'int net_hello(void) { return 1; }\n' >"$tmp/n.c"
    printf 'int main(void) { return 0; }\n' >"$tmp/m.c"
    "$cc" -c -o "$tmp/c.o" "$tmp/c.c" && "$cc" -c -o "$tmp/n.o" "$tmp/n.c" &&
        "$cc" -c -o "$t/b/daemon/vmreplicad.p/main.c.o" "$tmp/m.c" &&
        ar rc "$t/b/daemon/core/libvrd_core.a" "$tmp/c.o" &&
        ar rc "$t/b/daemon/net/libvrd_net.a" "$tmp/n.o"
    expect "an upward call fails to pass" 1 \
        "daemon/core/libvrd_core.a: needs net_hello, defined by net: core may not call net" \
        "$t" "$t/b"
    # The other way round is the rule: net may call core.
    printf 'int core_hi(void) { return 2; }\n' >"$tmp/c.c"
    printf 'int core_hi(void);\nint net_hello(void) { return core_hi(); }\n' \
        >"$tmp/n.c"
    rm -f "$t"/b/daemon/*/*.a
    "$cc" -c -o "$tmp/c.o" "$tmp/c.c" && "$cc" -c -o "$tmp/n.o" "$tmp/n.c" &&
        ar rc "$t/b/daemon/core/libvrd_core.a" "$tmp/c.o" &&
        ar rc "$t/b/daemon/net/libvrd_net.a" "$tmp/n.o"
    expect "a downward call passes" 0 "check-layers: ok" "$t" "$t/b"
fi

echo "1..$n"
exit $failed
