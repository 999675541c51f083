# shellcheck shell=bash
# libvirtd.sh — a libvirtd of the test's own (sourced by libvirt*.sh after
# functions.sh).
#
# start_libvirtd runs Debian's /usr/sbin/libvirtd as root in a private
# mount namespace (unshare -m) where /run and /var are empty tmpfs and
# /etc/libvirt is a directory of the test (qemu.conf: run QEMU as root, no
# security driver, no cgroups, no namespaces, QEMU's output to files
# instead of virtlogd), with its sockets under $TESTDIR/lv/sock.  The
# system's libvirt (its domains, networks, sockets, /var/lib/libvirt) is
# never touched: a system libvirtd may even run beside it.  At exit its
# domains are destroyed and it is stopped; functions.sh then kills
# anything left whose command line names $TESTDIR (libvirtd, its QEMUs),
# and the namespace and its mounts go with the last of them.
# Sets LV (its directory) and URI (for virsh -c and VMREPLICA_LIBVIRT_URI);
# virsh_ ARGS… is virsh on it.  Skips the test without libvirt or root.
if ! command -v virsh >/dev/null || ! [ -x /usr/sbin/libvirtd ]; then
    skip "libvirt is not installed (apt-get install libvirt-daemon-system libvirt-clients)"
fi
[ "$(id -u)" = 0 ] || skip "not root (libvirtd in a mount namespace)"
requires unshare

LV=$TESTDIR/lv
URI="qemu+unix:///system?socket=$LV/sock/libvirt-sock"
virsh_() { virsh -q -c "$URI" "$@"; }

# Domains first (their QEMU outlives libvirtd), then libvirtd.
stop_libvirtd() {
    local d
    while read -r d; do
        [ -n "$d" ] && virsh_ destroy "$d" >/dev/null 2>&1
    done < <(virsh_ list --name 2>/dev/null)
    [ -s "$LV/libvirtd.pid" ] && kill "$(cat "$LV/libvirtd.pid")" 2>/dev/null
}

start_libvirtd() {
    [ -n "$TESTDIR" ] && [ -d "$TESTDIR" ] || fail "start_libvirtd: no TESTDIR"
    mkdir -p "$LV/etc" "$LV/sock" "$LV/log"
    printf '%s\n' "unix_sock_dir = \"$LV/sock\"" \
        'unix_sock_rw_perms = "0700"' 'auth_unix_rw = "none"' \
        'auth_unix_ro = "none"' \
        "log_outputs = \"3:file:$LV/log/libvirtd.log\"" \
        >"$LV/etc/libvirtd.conf"
    printf '%s\n' 'user = "root"' 'group = "root"' 'dynamic_ownership = 0' \
        'remember_owner = 0' 'security_driver = "none"' \
        'cgroup_controllers = [ ]' 'namespaces = [ ]' \
        'stdio_handler = "file"' >"$LV/etc/qemu.conf"
    cleanup_fn stop_libvirtd
    unshare -m --propagation private sh -c '
        mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /var &&
        mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt \
            /var/log/libvirt /var/tmp &&
        mount --bind "$1/etc" /etc/libvirt &&
        exec /usr/sbin/libvirtd --config "$1/etc/libvirtd.conf" \
            --pid-file "$1/libvirtd.pid"' sh "$LV" \
        >>"$TESTDIR/libvirtd.log" 2>&1 &
    _bg_pids+=($!)
    wait_until 20 virsh_ version >/dev/null 2>&1 ||
        fail "libvirtd did not start: $(tail -n 5 "$TESTDIR/libvirtd.log" "$LV/log/libvirtd.log" 2>/dev/null)"
    log "libvirtd $(virsh_ version | awk '/libvirt/ { print $NF; exit }') on $URI"
}
