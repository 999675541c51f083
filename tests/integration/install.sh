#!/bin/bash
# install: `meson install --destdir` puts exactly the files an installed
# system needs in place — the two programs, the nbdkit plugin, the man pages
# built from their scdoc sources, vmreplicad.service, the bash completion
# of vmreplica and the Pacemaker resource agent — and nothing else;
# systemd-analyze verify accepts the unit (where systemd is installed) with
# no warning; the installed daemon notifies readiness on $NOTIFY_SOCKET;
# the installed completion offers the CLI's nouns, verbs, options, option
# values and the VM names of a running daemon.
source "$(dirname "$0")/functions.sh"
requires meson jq python3
requires_build

root=$TESTDIR/root
meson install -C "$BUILD_DIR" --no-rebuild --quiet --destdir "$root" \
    >"$TESTDIR/install.log" 2>&1 || fail "meson install: $(tail -n 3 "$TESTDIR/install.log")"

# The directories as this build was configured (meson's defaults, or a
# packager's -D options).
opts=$(meson introspect "$BUILD_DIR" --buildoptions) || fail "meson introspect"
opt() { jq -r --arg n "$1" '.[] | select(.name == $n) | .value' <<<"$opts"; }
abs() { case $1 in /*) echo "$1" ;; *) echo "$prefix/$1" ;; esac; }
prefix=$(opt prefix)
bindir=$(abs "$(opt bindir)")
sbindir=$(abs "$(opt sbindir)")
libdir=$(abs "$(opt libdir)")
mandir=$(abs "$(opt mandir)")
datadir=$(abs "$(opt datadir)")
unitdir=$(opt systemdsystemunitdir)
[ -n "$unitdir" ] || unitdir=$prefix/lib/systemd/system
compdir=$(opt bashcompletiondir)
[ -n "$compdir" ] || compdir=$datadir/bash-completion/completions
ocfdir=$(opt ocfdir)
[ -n "$ocfdir" ] || ocfdir=$prefix/lib/ocf

want=$(sort <<EOF2
$bindir/vmreplica
$sbindir/vmreplicad
$libdir/nbdkit/plugins/nbdkit-vmreplica-plugin.so
$mandir/man1/vmreplica.1
$mandir/man8/vmreplicad.8
$unitdir/vmreplicad.service
$compdir/vmreplica
$ocfdir/resource.d/vmreplica/vmreplicad
EOF2
)
got=$(cd "$root" && find . ! -type d | sed 's/^\.//' | sort)
[ "$got" = "$want" ] || fail "installed files differ from the list:
$(diff <(echo "$want") <(echo "$got"))"

# The resource agent: executable, and running the installed programs.
agent=$root$ocfdir/resource.d/vmreplica/vmreplicad
[ "$(stat -c %a "$agent")" = 755 ] || fail "resource agent mode $(stat -c %a "$agent")"
grep -qx "OCF_RESKEY_binary_default=$sbindir/vmreplicad" "$agent" ||
    fail "resource agent: wrong default binary"

# Real man pages, rendered by scdoc: the title lines and a section.
grep -qx '\.TH "vmreplica" "1".*' "$root$mandir/man1/vmreplica.1" ||
    fail "vmreplica.1: no .TH line: $(head -n 3 "$root$mandir/man1/vmreplica.1")"
grep -qx '\.TH "vmreplicad" "8".*' "$root$mandir/man8/vmreplicad.8" ||
    fail "vmreplicad.8: no .TH line"
grep -qx '\.SH ENVIRONMENT' "$root$mandir/man8/vmreplicad.8" ||
    fail "vmreplicad.8: no ENVIRONMENT section"

# The unit starts the installed daemon, and says it notifies readiness.
unit=$root$unitdir/vmreplicad.service
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
[ "$exec_start" = "$sbindir/vmreplicad --state-dir /var/lib/vmreplica \$VMREPLICAD_OPTS" ] ||
    fail "ExecStart: '$exec_start'"
for kv in Type=notify StateDirectory=vmreplica KillMode=process \
    WantedBy=multi-user.target; do
    grep -qx "$kv" "$unit" || fail "vmreplicad.service: no '$kv'"
done

# systemd-analyze verify: the unit's keys and values, the binary and (with
# man installed) the man pages it names, found in the destdir, with no
# warning at all.
if command -v systemd-analyze >/dev/null; then
    mkdir "$TESTDIR/unit"
    sed "s|^ExecStart=$sbindir/|ExecStart=$root$sbindir/|" "$unit" \
        >"$TESTDIR/unit/vmreplicad.service"
    man_opt=--man=yes
    command -v man >/dev/null || man_opt=--man=no
    out=$(cd "$TESTDIR" && MANPATH=$root$mandir \
        systemd-analyze verify "$man_opt" "$TESTDIR/unit/vmreplicad.service" 2>&1) ||
        fail "systemd-analyze verify: $out"
    [ -z "$out" ] || fail "systemd-analyze verify warns: $out"
    log "systemd-analyze verify $man_opt: no warning"
else
    log "systemd-analyze not installed: unit not verified"
fi

# The installed daemon tells systemd it is ready (Type=notify): READY=1 on
# $NOTIFY_SOCKET once api.sock accepts.
python3 - "$TESTDIR/notify.sock" >"$TESTDIR/notify.out" 2>&1 <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(30)
print(s.recv(4096).decode())
PY
notify_pid=$!
wait_until 10 test -S "$TESTDIR/notify.sock" || fail "no notify socket"
VMREPLICAD=$root$sbindir/vmreplicad start_daemon primary \
    NOTIFY_SOCKET="$TESTDIR/notify.sock"
wait "$notify_pid" || fail "no readiness notification: $(cat "$TESTDIR/notify.out")"
[ "$(cat "$TESTDIR/notify.out")" = READY=1 ] ||
    fail "notification: '$(cat "$TESTDIR/notify.out")', want READY=1"
log "the installed vmreplicad sent READY=1"

# The installed completion, with the installed CLI, against that daemon.
vr primary vm create web --new-disk 1M >/dev/null || fail "vm create web"
vr primary vm create "db one" --new-disk 1M >/dev/null || fail "vm create 'db one'"
cli=$root$bindir/vmreplica
LD_LIBRARY_PATH= "$cli" --version >/dev/null || fail "installed vmreplica does not run"
complete_words() { # WORD… — what completing the last word offers
    bash -c 'source "$1"; shift
        compopt() { :; }
        COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
        _vmreplica
        printf "%s\n" "${COMPREPLY[@]}"' _ "$root$compdir/vmreplica" "$@" |
        sort | tr '\n' ' ' | sed 's/ $//'
}
check_completion() { # WANT WORD…
    local want=$1 got
    shift
    got=$(complete_words "$@")
    [ "$got" = "$want" ] || fail "completing '${*:2}': '$got', want '$want'"
}
check_completion "auth-entry events failover help initial-replication points replication server vm" "$cli" ""
check_completion "--connect --help --json --version" "$cli" -
check_completion "create list remove set-boot set-failover-network set-test-network show start stop" "$cli" vm ""
check_completion "remove reset-stats resume reverse" "$cli" replication re
check_completion "--recovery-history --replica-server --resync-window" "$cli" replication enable web --re
check_completion "certificate kerberos" "$cli" replication enable web --auth ""
check_completion "15m 30s 5m" "$cli" replication enable web --frequency ""
check_completion "disable enable show" "$cli" server firewall ""
check_completion "--follow --help --json --vm" "$cli" events -
check_completion 'db\ one web' "$cli" --connect "$(api_sock primary)" vm start ""
check_completion "web" "$cli" --connect "$(api_sock primary)" events --vm w
check_completion "" "$cli" --connect "$(api_sock primary)" vm start web ""
log "installed: $(wc -l <<<"$want") files; unit and completion checked"
