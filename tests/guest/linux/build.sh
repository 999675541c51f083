#!/bin/bash
# tests/guest/linux/build.sh OUTDIR — build the Linux test guest: a Debian
# kernel (OUTDIR/vmlinuz) and a busybox initramfs (OUTDIR/initrd.img) whose
# /init mounts /dev/vda (ext4) at /data, runs the real QEMU guest agent
# (qemu-ga) on the virtio-serial port org.qemu.guest_agent.0 and an
# application that appends "seq N" lines to /data/app.log.  See README.md.
#
# Debian 12 packages it needs (apt-get install -y ...):
#
#     busybox-static qemu-guest-agent python3
#
# (the self test, selftest.sh, also needs qemu-system-x86 and e2fsprogs)
#
# The kernel is NOT installed system-wide: the script downloads the package
# that linux-image-amd64 currently depends on (linux-image-6.1.0-N-amd64)
# with `apt-get download` (this needs the apt package lists, i.e. an
# `apt-get update` once, which any `apt-get install` run implies) and keeps
# the kernel and the few module directories it needs, extracted, in a cache:
#
#     $VMREPLICA_GUEST_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/vmreplica/guest-linux)
#
# Alternatives: if linux-image-amd64 is installed, its kernel in /boot and
# /lib/modules is used instead; VMREPLICA_GUEST_KERNEL_ROOT=DIR uses an
# extracted kernel package (DIR/boot/vmlinuz-K, DIR/lib/modules/K), with
# VMREPLICA_GUEST_KVER=K to choose among several.
#
# Exit status: 0 built, 77 a prerequisite is missing (what to install is
# printed), 1 any other error.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PROG=build.sh
PACKAGES="busybox-static qemu-guest-agent python3"
# Modules the guest needs, besides what they depend on (computed from the
# modules' own depends= fields; softdeps are followed where they name a
# module file).  crc32c_generic comes first: ext4/jbd2 only softdep on the
# alias crypto-crc32c, and the initramfs has no modprobe helper to resolve
# it when the kernel asks.
WANT_MODULES=(crc32c_generic virtio_pci virtio_blk virtio_console ext4
    virtio_net)
# Where in the kernel package those modules live (what the cache keeps).
MODULE_DIRS=(kernel/drivers/virtio kernel/drivers/block kernel/drivers/char
    kernel/fs kernel/lib kernel/crypto kernel/arch/x86/crypto)
# Single modules outside those directories (virtio_net and its deps).
MODULE_FILES=(kernel/drivers/net/virtio_net kernel/drivers/net/net_failover
    kernel/net/core/failover)
# Bumped whenever the lists above change: a new cache directory.
CACHE_LAYOUT=2

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { say "error: $*"; exit 1; }
missing() {
    say "missing: $*"
    say "install on Debian 12 with:  apt-get install -y $PACKAGES"
    exit 77
}

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
OUT=$1

# --- prerequisites ---------------------------------------------------------
BUSYBOX=${VMREPLICA_GUEST_BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || missing "busybox (package busybox-static)"
applets=$("$BUSYBOX" --list 2>/dev/null) || applets=
grep -qx cpio <<<"$applets" ||
    missing "a busybox with the cpio applet (package busybox-static)"
QGA=${VMREPLICA_GUEST_QGA:-/usr/sbin/qemu-ga}
[ -x "$QGA" ] || missing "qemu-ga (package qemu-guest-agent)"
command -v python3 >/dev/null || missing "python3 (package python3)"
for t in gzip ldd; do
    command -v "$t" >/dev/null || die "$t not found (packages gzip, libc-bin)"
done

# --- the kernel --------------------------------------------------------------
CACHE=${VMREPLICA_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmreplica/guest-linux}

# fetch_kernel PKG VERSION DIR — download PKG=VERSION and extract into DIR
# the kernel, its config and MODULE_DIRS (about 55 MB of the 400 MB).
fetch_kernel() {
    local pkg=$1 ver=$2 dir=$3 tmp deb
    mkdir -p "$CACHE"
    tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
    # _apt must be able to write there, or apt warns about an unsandboxed
    # download (harmless, but noisy).
    chmod 755 "$tmp"
    say "downloading $pkg $ver (once; cached in $dir)"
    if ! (cd "$tmp" && apt-get download -q "$pkg=$ver") >"$tmp/apt.log" 2>&1; then
        cat "$tmp/apt.log" >&2
        rm -rf "$tmp"
        return 1
    fi
    deb=$(ls "$tmp"/*.deb)
    local pat='^\./(boot/(vmlinuz|config)-[^/]*|lib/modules/[^/]*/modules\.(builtin|order))$'
    local d
    for d in "${MODULE_DIRS[@]}"; do
        pat+="|^\./lib/modules/[^/]*/${d//./\\.}/.*\.ko(\.xz|\.zst|\.gz)?\$"
    done
    for d in "${MODULE_FILES[@]}"; do
        pat+="|^\./lib/modules/[^/]*/$d\.ko(\.xz|\.zst|\.gz)?\$"
    done
    dpkg-deb -c "$deb" | awk '{print $NF}' | grep -E "$pat" >"$tmp/members" ||
        die "$pkg: no kernel files found in $deb"
    mkdir -p "$tmp/root"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/root" -T "$tmp/members" ||
        die "$pkg: extraction failed"
    rm -rf "$dir"
    mv "$tmp/root" "$dir"
    rm -rf "$tmp"
    # older kernels' caches are not needed any more
    local o
    for o in "$CACHE"/linux-image-*; do
        [ "$o" = "$dir" ] || rm -rf "$o"
    done
}

if [ -n "${VMREPLICA_GUEST_KERNEL_ROOT:-}" ]; then
    KROOT=$VMREPLICA_GUEST_KERNEL_ROOT
    KSRC="$KROOT (VMREPLICA_GUEST_KERNEL_ROOT)"
elif [ "$(dpkg-query -W -f='${db:Status-Abbrev}' linux-image-amd64 2>/dev/null)" = "ii " ]; then
    KROOT=/
    pkg=$(dpkg-query -W -f='${Depends}' linux-image-amd64 |
        grep -o 'linux-image-[^ ,]*' | head -1)
    VMREPLICA_GUEST_KVER=${VMREPLICA_GUEST_KVER:-${pkg#linux-image-}}
    KSRC="installed $pkg"
else
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
        missing "apt-get/dpkg-deb to fetch the kernel (or set" \
            "VMREPLICA_GUEST_KERNEL_ROOT to an extracted kernel package)"
    dep=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
        sed -n 's/^Depends: *//p' | head -1)
    pkg=$(grep -o 'linux-image-[^ ,]*' <<<"$dep" | head -1 || true)
    [ -n "$pkg" ] || {
        say "apt knows no linux-image-amd64: run 'apt-get update' first"
        exit 77
    }
    ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null |
        sed -n 's/^Version: *//p' | head -1)
    [ -n "$ver" ] || { say "apt knows no $pkg: run 'apt-get update'"; exit 77; }
    KROOT=$CACHE/${pkg}_${ver}_$CACHE_LAYOUT
    if [ ! -d "$KROOT/boot" ]; then
        # one download at a time (tests may build in parallel)
        mkdir -p "$CACHE"
        exec 9>"$CACHE/.lock"
        flock 9
        if [ ! -d "$KROOT/boot" ] && ! fetch_kernel "$pkg" "$ver" "$KROOT"; then
            # offline with stale package lists: an older cached kernel will do
            old=$(ls -d "$CACHE"/linux-image-*/boot 2>/dev/null | sort -V | tail -1)
            if [ -z "$old" ]; then
                say "could not download $pkg: run 'apt-get update', or install" \
                    "linux-image-amd64 (then its /boot and /lib/modules are used)"
                exit 77
            fi
            KROOT=${old%/boot}
            pkg=${KROOT##*/}
            ver=${pkg#*_}
            pkg=${pkg%%_*}
            say "could not download; using the cached $pkg $ver"
        fi
        exec 9>&-
    fi
    VMREPLICA_GUEST_KVER=${pkg#linux-image-}
    KSRC="$pkg $ver (cache $KROOT)"
fi
KVER=${VMREPLICA_GUEST_KVER:-$(ls "$KROOT/lib/modules" 2>/dev/null | sort -V | tail -1)}
[ -n "$KVER" ] || die "no kernel modules in $KROOT/lib/modules"
VMLINUZ=$KROOT/boot/vmlinuz-$KVER
MODDIR=$KROOT/lib/modules/$KVER
[ -r "$VMLINUZ" ] || die "no readable kernel $VMLINUZ"
[ -d "$MODDIR/kernel" ] || die "no modules in $MODDIR"
KCONFIG=$KROOT/boot/config-$KVER

# --- staging -----------------------------------------------------------------
mkdir -p "$OUT"
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/vmreplica-guest.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
R=$STAGE/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,etc,proc,sys,dev,run,tmp,data,var,root}
ln -s ../run "$R/var/run"

# busybox and its applets as symlinks
cp "$BUSYBOX" "$R/bin/busybox"
while read -r a; do
    case $a in
    bin/busybox | linuxrc | sbin/init) continue ;;
    esac
    [ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done < <("$BUSYBOX" --list-full)

# qemu-ga and every shared library it loads (same paths as on the host; the
# initramfs has a real /lib, so /lib/x86_64-linux-gnu/... works as is)
cp "$QGA" "$R/usr/sbin/qemu-ga"
copy_lib() {
    local src=$1
    mkdir -p "$R$(dirname "$src")"
    cp -L "$src" "$R$src"
}
# (a dynamically linked busybox, package busybox, gets its libraries too)
for exe in "$QGA" "$BUSYBOX"; do
    libs=$(LC_ALL=C ldd "$exe" 2>&1) || {
        grep -q "not a dynamic executable" <<<"$libs" && continue
        die "ldd $exe failed: $libs"
    }
    while read -r l; do
        case $l in
        *"=> not found"*) die "$exe: library missing: $l" ;;
        *"=> /"*) l=${l#*=> }; copy_lib "${l%% (*}" ;;
        /*) copy_lib "${l%% (*}" ;;
        esac
    done <<<"$libs"
done
mkdir -p "$R/etc/qemu"
: >"$R/etc/qemu/qemu-ga.conf"

# --- kernel modules ----------------------------------------------------------
declare -A MOD_PATH=() BUILTIN=() SEEN=()
ORDER=()
while read -r p; do
    b=${p##*/}
    b=${b%%.ko*}
    MOD_PATH[${b//-/_}]=$p
done < <(cd "$MODDIR" && find kernel -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
if [ -r "$MODDIR/modules.builtin" ]; then
    while read -r p; do
        b=${p##*/}
        b=${b%.ko}
        BUILTIN[${b//-/_}]=1
    done <"$MODDIR/modules.builtin"
fi

# Decompress if needed (busybox insmod reads plain .ko only).
unpack_module() {
    local src=$1 dst=$2
    case $src in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" >"$dst" || die "xz -d $src (install xz-utils)" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" || die "zstd -d $src (install zstd)" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    esac
}
modinfo_field() { # FILE FIELD — a .modinfo key=value (NUL-separated)
    LC_ALL=C tr '\0' '\n' <"$1" | sed -n "s/^$2=//p" | head -1
}
visit() {
    local n=${1//-/_} f d pre
    [ -z "${SEEN[$n]:-}" ] || return 0
    SEEN[$n]=1
    if [ -z "${MOD_PATH[$n]:-}" ]; then
        [ -n "${BUILTIN[$n]:-}" ] && { say "module $n: built in"; return 0; }
        die "module $n: neither built in nor found under $MODDIR"
    fi
    f=$R/lib/modules/$n.ko
    unpack_module "$MODDIR/${MOD_PATH[$n]}" "$f"
    for d in $(modinfo_field "$f" depends | tr ',' ' '); do
        visit "$d"
    done
    # softdep=pre: a b post: c — follow the pre: names that are module files
    pre=$(modinfo_field "$f" softdep | sed -n 's/.*pre:\(.*\)/\1/p' | sed 's/post:.*//')
    for d in $pre; do
        [ -n "${MOD_PATH[${d//-/_}]:-}" ] && visit "$d"
    done
    ORDER+=("$n")
}
for m in "${WANT_MODULES[@]}"; do
    visit "$m"
done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/load-order"
if [ -r "$KCONFIG" ]; then
    cfg=$(grep -E '^CONFIG_(VIRTIO|VIRTIO_PCI|VIRTIO_BLK|VIRTIO_CONSOLE|EXT4_FS|DEVTMPFS|SERIAL_8250_CONSOLE)=' "$KCONFIG" | tr '\n' ' ')
    say "kernel config: $cfg"
fi

# --- /init ---------------------------------------------------------------------
cp "$HERE/init.sh" "$R/init"
chmod 755 "$R/init"
printf 'kernel=%s\nsource=%s\nmodules=%s\n' "$KVER" "$KSRC" "${ORDER[*]}" \
    >"$R/etc/vmreplica-guest"

# --- output --------------------------------------------------------------------
cp "$VMLINUZ" "$OUT/vmlinuz.tmp"
# OUTDIR/vmlinux: the same kernel, decompressed from the bzImage into the ELF
# it carries.  A kernel with CONFIG_PVH=y (Debian's) boots from it through
# QEMU's PVH entry, which skips the firmware's decompression of the kernel:
# under TCG that halves the boot time (about 6 s instead of 12 s).
rm -f "$OUT/vmlinux"
if grep -qx 'CONFIG_PVH=y' "$KCONFIG" 2>/dev/null; then
    python3 - "$VMLINUZ" "$OUT/vmlinux.tmp" <<'PY' || die "cannot extract vmlinux from $VMLINUZ"
import lzma, gzip, struct, subprocess, sys, zlib
src, dst = sys.argv[1], sys.argv[2]
b = open(src, "rb").read()
if b[0x202:0x206] != b"HdrS":
    sys.exit("not a bzImage")
setup = (b[0x1f1] or 4) + 1
off, length = struct.unpack_from("<II", b, 0x248)
data = b[setup * 512 + off:setup * 512 + off + length]
if data.startswith(b"\xfd7zXZ\x00"):
    out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
elif data.startswith(b"\x1f\x8b"):
    out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
elif data.startswith(b"\x5d\x00"):
    out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
elif data.startswith(b"\x28\xb5\x2f\xfd"):
    out = subprocess.run(["zstd", "-qdc"], input=data, stdout=subprocess.PIPE,
                         check=True).stdout
else:
    sys.exit("unknown kernel compression %s" % data[:4].hex())
if not out.startswith(b"\x7fELF"):
    sys.exit("the payload is not an ELF file")
open(dst, "wb").write(out)
PY
    chmod 644 "$OUT/vmlinux.tmp"
    mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
else
    say "kernel without CONFIG_PVH=y: no vmlinux (use vmlinuz)"
fi
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort |
    "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -6n >"$OUT/initrd.img.tmp"
[ -s "$OUT/initrd.img.tmp" ] || die "cpio failed"
chmod 644 "$OUT/vmlinuz.tmp" "$OUT/initrd.img.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
say "kernel $KVER from $KSRC"
say "modules (load order): ${ORDER[*]}"
for f in vmlinuz vmlinux initrd.img; do
    [ -e "$OUT/$f" ] && say "wrote $OUT/$f ($(stat -c %s "$OUT/$f") bytes)"
done
exit 0
