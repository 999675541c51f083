#!/bin/bash
# plugin-path: vmreplicad finds its nbdkit plugin by itself and checks it at
# start-up.  Run from a build tree with no VMREPLICA_PLUGIN, it serves disks
# with that build's plugin; given a file nbdkit cannot load, or run outside
# a build tree with no plugin installed, it still starts but says at once,
# in its log and as a warning event, what is wrong and how to fix it.
source "$(dirname "$0")/functions.sh"
requires jq meson nbdkit
requires_build

hint="vm start will fail: set VMREPLICA_PLUGIN to the plugin's path, or install vmreplica (meson install, or the Debian package)"
build_plugin=$(cd "$BUILD_DIR" && pwd -P)/plugin/nbdkit-vmreplica-plugin.so

# log_has NAME LINE — daemon NAME's log has LINE after its timestamp.
log_has() {
    sed 's/^[^ ]* //' "$TESTDIR/$1.log" | grep -qxF -- "$2"
}
# event_has NAME TEXT — `events` on daemon NAME shows a warning with TEXT.
event_has() {
    vrj "$1" events | jq -e --arg m "$2" \
        '[.events[] | select(.level == "warning" and .message == $m)] | length == 1' >/dev/null
}

# 1. From the build tree, no VMREPLICA_PLUGIN: this build's plugin.
start_daemon primary -u VMREPLICA_PLUGIN
log_has primary "vmreplicad info: main: nbdkit plugin: $build_plugin (from this build tree)" ||
    fail "no log line naming the build tree's plugin"
grep -q 'warning' "$TESTDIR/primary.log" && fail "warning with a good plugin: $(grep warning "$TESTDIR/primary.log")"
vr primary vm create web --new-disk 1M >/dev/null || fail "vm create"
vr primary vm start web --no-hypervisor >/dev/null || fail "vm start with the build tree's plugin"
grep -qF -- "$build_plugin" "/proc/$(cat "$(state_dir primary)"/run/*/nbdkit.pid)/cmdline" ||
    fail "nbdkit does not run the build tree's plugin"
vr primary vm stop web >/dev/null || fail "vm stop"
stop_daemon primary

# 2. A file nbdkit cannot load: a warning at start, and vm start fails.
printf "not a plugin %0200d\n" 0 >"$TESTDIR/bad.so" # longer than an ELF header
msg="nbdkit plugin $TESTDIR/bad.so (from VMREPLICA_PLUGIN): nbdkit cannot load it: cannot open plugin '$TESTDIR/bad.so': $TESTDIR/bad.so: invalid ELF header; $hint"
start_daemon primary VMREPLICA_PLUGIN="$TESTDIR/bad.so"
wait_until 10 log_has primary "vmreplicad warning: main: $msg" ||
    fail "no warning for a plugin nbdkit cannot load"
event_has primary "$msg" || fail "no warning event: $(vr primary events | tail -n 3)"
vr primary vm start web --no-hypervisor >/dev/null 2>&1 && fail "vm start with a bad plugin succeeded"
stop_daemon primary

# 3. A plain file path that does not exist.
msg="nbdkit plugin $TESTDIR/none.so (from VMREPLICA_PLUGIN): No such file or directory; $hint"
start_daemon primary VMREPLICA_PLUGIN="$TESTDIR/none.so"
wait_until 10 log_has primary "vmreplicad warning: main: $msg" ||
    fail "no warning for a missing plugin"
event_has primary "$msg" || fail "no warning event for a missing plugin"
stop_daemon primary

# 4. Outside a build tree (a copy of the binary): the installed path.
opts=$(meson introspect "$BUILD_DIR" --buildoptions) || fail "meson introspect"
opt() { jq -r --arg n "$1" '.[] | select(.name == $n) | .value' <<<"$opts"; }
libdir=$(opt libdir)
[[ $libdir == /* ]] || libdir=$(opt prefix)/$libdir
installed=$libdir/nbdkit/plugins/nbdkit-vmreplica-plugin.so
mkdir "$TESTDIR/bin"
cp "$VMREPLICAD" "$TESTDIR/bin/vmreplicad"
VMREPLICAD=$TESTDIR/bin/vmreplicad start_daemon primary -u VMREPLICA_PLUGIN
log_has primary "vmreplicad info: main: nbdkit plugin: $installed (the installed path)" ||
    fail "a daemon outside a build tree does not use the installed path"
if [ -e "$installed" ]; then
    log "$installed exists here: its absence is not checked"
else
    msg="nbdkit plugin $installed (the installed path): No such file or directory; $hint"
    wait_until 10 log_has primary "vmreplicad warning: main: $msg" ||
        fail "no warning for a plugin that is not installed"
    event_has primary "$msg" || fail "no warning event for a plugin that is not installed"
fi
log "build tree, bad, missing and installed plugins: found and checked"
