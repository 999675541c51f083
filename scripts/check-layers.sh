#!/bin/bash
# check-layers.sh: vmreplicad's layers depend one way (docs/design.md).
#
#   scripts/check-layers.sh [SOURCE_DIR [BUILD_DIR]]
#
# The order, lowest first:
#   lib < daemon/core < daemon/proc < daemon/net < daemon/primary,
#   daemon/replica < daemon/api < daemon/main.c (the top: options and the
#   wiring of the layers; no other .c may sit directly in daemon/)
# primary and replica are one rank and never use each other.
#
# 1. Includes: every `#include "..."` of lib/ and of a layer folder must
#    name a file of its own layer or of one below.  "layer/file.h" names
#    the layer; a bare name is the including file's folder, then lib/, then
#    daemon/ itself (the top); config.h is generated and allowed anywhere.
# 2. Links (with BUILD_DIR): no symbol a layer's static library
#    (BUILD_DIR/daemon/LAYER/libvrd_LAYER.a) leaves undefined may be
#    defined only by a higher layer's library or by the top's objects
#    (BUILD_DIR/daemon/vmreplicad.p/*.o).
#
# Each violation is printed as FILE:LINE: or LIBRARY: with the layers
# involved; the exit status is 1 if there was any, 2 on a usage error.
set -u

src=${1:-$(cd "$(dirname "$0")/.." && pwd)}
build=${2:-}
layers="core proc net primary replica api"
bad=0

rank() {
    case $1 in
    lib) echo 0 ;;
    core) echo 1 ;;
    proc) echo 2 ;;
    net) echo 3 ;;
    primary | replica) echo 4 ;;
    api) echo 5 ;;
    top) echo 6 ;;
    *) echo 99 ;;
    esac
}

# may FROM use TO?
allowed() {
    local from=$1 to=$2
    [ "$from" = "$to" ] && return 0
    case "$from/$to" in
    primary/replica | replica/primary) return 1 ;;
    esac
    [ "$(rank "$to")" -le "$(rank "$from")" ]
}

fail() {
    echo "check-layers: $*" >&2
    bad=1
}

[ -d "$src/daemon" ] && [ -d "$src/lib" ] ||
    { echo "check-layers: $src: no daemon/ and lib/ here" >&2; exit 2; }

# The layer of what `#include "$2"` in folder $1 (layer $3) names, or "".
resolve() {
    local dir=$1 inc=$2 layer=$3 first
    case $inc in
    */*)
        first=${inc%%/*}
        for l in $layers; do
            [ "$first" = "$l" ] && [ -e "$src/daemon/$inc" ] &&
                { echo "$l"; return; }
        done
        [ -e "$dir/$inc" ] && { echo "$layer"; return; }
        echo ""
        ;;
    config.h) echo lib ;;
    *)
        if [ -e "$dir/$inc" ]; then echo "$layer"
        elif [ -e "$src/lib/$inc" ]; then echo lib
        elif [ -e "$src/daemon/$inc" ]; then echo top
        else echo ""
        fi
        ;;
    esac
}

check_includes() { # folder layer
    local dir=$1 layer=$2 f line inc to
    for f in "$dir"/*.c "$dir"/*.h; do
        [ -e "$f" ] || continue
        while IFS=: read -r line inc; do
            inc=${inc#*\"}
            inc=${inc%%\"*}
            to=$(resolve "$dir" "$inc" "$layer")
            if [ -z "$to" ]; then
                fail "${f#"$src"/}:$line: includes \"$inc\", which is in" \
                    "no layer"
            elif ! allowed "$layer" "$to"; then
                fail "${f#"$src"/}:$line: includes \"$inc\": $layer may" \
                    "not include $to (a higher layer, or a sibling)"
            fi
        done < <(grep -n '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$f" |
            sed 's/^\([0-9]*\):/\1:/')
    done
}

check_includes "$src/lib" lib
for f in "$src/daemon"/*.c; do
    [ -e "$f" ] || continue
    [ "${f##*/}" = main.c ] ||
        fail "${f#"$src"/}: in no layer folder (only main.c is at the top)"
done
for l in $layers; do
    [ -d "$src/daemon/$l" ] && check_includes "$src/daemon/$l" "$l"
done

if [ -n "$build" ]; then
    command -v nm >/dev/null ||
        { echo "check-layers: nm not found" >&2; exit 2; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    present=""
    for l in $layers; do
        [ -d "$src/daemon/$l" ] || continue
        a=$build/daemon/$l/libvrd_$l.a
        if [ ! -f "$a" ]; then
            fail "$a: missing (build first: ninja -C $build)"
            continue
        fi
        present="$present $l"
        nm -g --defined-only "$a" 2>/dev/null |
            awk 'NF == 3 { print $3 }' | sort -u >"$tmp/def.$l"
        nm -u "$a" 2>/dev/null | awk '{ print $NF }' | sort -u \
            >"$tmp/undef.$l"
    done
    top=$(ls "$build"/daemon/vmreplicad.p/*.o 2>/dev/null)
    if [ -z "$top" ]; then
        fail "$build/daemon/vmreplicad.p: no objects (build first)"
    else
        # shellcheck disable=SC2086
        nm -g --defined-only $top 2>/dev/null |
            awk 'NF == 3 { print $3 }' | sort -u >"$tmp/def.top"
    fi
    for l in $present; do
        for h in $present top; do
            [ -f "$tmp/def.$h" ] || continue
            allowed "$l" "$h" && continue
            # A symbol the lower library defines itself is not upward.
            comm -12 "$tmp/undef.$l" "$tmp/def.$h" |
                comm -23 - "$tmp/def.$l" >"$tmp/up"
            while read -r sym; do
                fail "daemon/$l/libvrd_$l.a: needs $sym, defined by $h:" \
                    "$l may not call $h (a higher layer, or a sibling)"
            done <"$tmp/up"
        done
    done
fi

[ $bad = 0 ] && echo "check-layers: ok (lib < core < proc < net <" \
    "primary, replica < api < main.c)"
exit $bad
