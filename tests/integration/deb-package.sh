#!/bin/bash
# deb-package: `dpkg-buildpackage -b -us -uc` on a copy of the checkout
# builds vmreplica_VERSION_ARCH.deb holding exactly the installed files
# (programs, plugin in nbdkit's plugin directory, man pages, unit, bash
# completion, Debian docs), whose Depends pull the libraries (from
# ${shlibs:Depends}), nbdkit, QEMU and nftables, and whose postinst
# enables and starts vmreplicad.service.  It builds the project once more
# (about 40 s on 2 idle cores, 2 min on busy ones; VMREPLICA_SKIP_DEB=1
# skips it).
source "$(dirname "$0")/functions.sh"
requires dpkg-buildpackage dpkg-checkbuilddeps dh dpkg-deb git
[ "${VMREPLICA_SKIP_DEB:-0}" != 1 ] || skip "VMREPLICA_SKIP_DEB=1"

src=$TESTDIR/src
mkdir "$src"
# The checkout's files as they are now (committed or not), no build dirs.
git -C "$SOURCE_DIR" ls-files -z -co --exclude-standard |
    (cd "$SOURCE_DIR" && tar --null -T - -cf -) | tar -xf - -C "$src" ||
    fail "cannot copy the checkout"
missing=$(cd "$src" && dpkg-checkbuilddeps 2>&1) ||
    skip "build dependencies not installed: ${missing#*: }"

version=$(cd "$src" && dpkg-parsechangelog -S Version)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
log "building vmreplica $version for $arch"
# nocheck: the unit tests that debian/rules runs are in this suite already.
(cd "$src" && DEB_BUILD_OPTIONS="nocheck noddebs parallel=$(nproc)" \
    dpkg-buildpackage -b -us -uc) >"$TESTDIR/build.log" 2>&1 ||
    fail "dpkg-buildpackage failed: $(tail -n 20 "$TESTDIR/build.log")"
deb=$TESTDIR/vmreplica_${version}_$arch.deb
[ -f "$deb" ] || fail "no $deb: $(ls "$TESTDIR")"

# The package's files, exactly.
got=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $6 }' | sort)
want=$(sort <<EOF2
./lib/systemd/system/vmreplicad.service
./usr/bin/vmreplica
./usr/lib/$multiarch/nbdkit/plugins/nbdkit-vmreplica-plugin.so
./usr/lib/ocf/resource.d/vmreplica/vmreplicad
./usr/sbin/vmreplicad
./usr/share/bash-completion/completions/vmreplica
./usr/share/doc/vmreplica/changelog.gz
./usr/share/doc/vmreplica/copyright
./usr/share/man/man1/vmreplica.1.gz
./usr/share/man/man8/vmreplicad.8.gz
EOF2
)
[ "$got" = "$want" ] || fail "package contents differ:
$(diff <(echo "$want") <(echo "$got"))"
dpkg-deb -c "$deb" >"$TESTDIR/contents.txt"
log "contents of $(basename "$deb"):"
awk '$1 !~ /^d/ { print "  " $1, $6 }' "$TESTDIR/contents.txt"

# The unit starts the packaged daemon.
dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./lib/systemd/system/vmreplicad.service |
    grep -qx 'ExecStart=/usr/sbin/vmreplicad --state-dir /var/lib/vmreplica $VMREPLICAD_OPTS' ||
    fail "the packaged unit does not start /usr/sbin/vmreplicad"

# Depends: each library the binaries link (shlibs), and the programs the
# daemon runs.
depends=$(dpkg-deb -f "$deb" Depends)
for p in libc6 libcurl3-gnutls libgnutls30 libgssapi-krb5-2 libjson-c5 \
    libmicrohttpd12 libsqlite3-0 libzstd1 nbdkit qemu-system-x86 \
    qemu-utils nftables; do
    [[ ", $depends," == *", $p "* || ", $depends," == *", $p,"* ]] ||
        fail "Depends lacks $p: $depends"
done

# postinst: enable, then start (restart on upgrade) the service.
mkdir "$TESTDIR/control"
dpkg-deb -e "$deb" "$TESTDIR/control"
for l in "deb-systemd-helper enable 'vmreplicad.service'" \
    "deb-systemd-invoke \$_dh_action 'vmreplicad.service'"; do
    grep -qF -- "$l" "$TESTDIR/control/postinst" ||
        fail "postinst lacks: $l"
done
log "package built, contents and dependencies as expected"
