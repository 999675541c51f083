#!/bin/bash
# app-consistent: application-consistent recovery points through the QEMU
# guest agent, and what happens when the guest cannot be quiesced.
#
# With --app-consistent-every 1 and a 4 s point interval, the primary asks
# the guest agent to freeze the guest's file systems (guest-fsfreeze-freeze)
# around a cut every 4 s.  A VM that boots nothing has no agent: the
# freeze times out (bounded, 10 s), the cut is made anyway as a
# crash-consistent cycle, a warning names the reason, and replication goes
# on.  The boot-sector test guest (no agent either) keeps running to its
# end while cuts are attempted — a failed quiesce never leaves it stuck.
# Every point on the Replica server is "standard".
source "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64
requires qemu-img jq curl openssl nbdkit python3 cmp
requires_build

VR_TIMEOUT=60
GUEST_TIMEOUT=${GUEST_TIMEOUT:-120}
PRIMARY_ENV=("VMREPLICA_ACCEL=${VMREPLICA_ACCEL:-tcg}")
guest_params

setup_pair
create_guest_vm g1 --frequency 1s --recovery-history 2 --point-interval 4s \
    --app-consistent-every 1
[ "$(repl primary g1 app_consistent_every)" = 1 ] || fail "app_consistent_every not set"
err=$(vr primary replication set g1 --app-consistent-every x 2>&1) &&
    fail "a bad --app-consistent-every accepted"
grep -q "invalid --app-consistent-every 'x'" <<<"$err" || fail "bad value: $err"

log "a guest without an agent: the quiesce times out, the cut is crash-consistent"
# e1 boots nothing (an empty disk): QEMU runs, nobody answers on the
# agent's channel.
create_vm e1 8M
enable_replication e1 --frequency 1s --recovery-history 2 --point-interval 4s \
    --app-consistent-every 1
vr primary vm start e1 >/dev/null || fail "vm start e1 (QEMU)"
warned() { # VM REASON-REGEX
    vrj primary events --vm "$1" | jq -r '.events[].message' |
        grep -Eq "application-consistent point not possible \($2\): cycle [0-9]+ is crash-consistent"
}
wait_until 40 warned e1 "guest agent: not answering \\(no reply within 10000 ms\\)" ||
    fail "no warning about the timed-out quiesce: $(vrj primary events --vm e1 | jq -c '.events[-3:]')"
a0=$(repl replica e1 applied_cycle)
wait_until 20 eval '[ "$(repl replica e1 applied_cycle)" -gt "$a0" ]' ||
    fail "replication stalled after a timed-out quiesce"
kinds=$(vrj replica points list e1 | jq -r '[.points[].kind] | unique | join(",")')
[ "$kinds" = standard ] || fail "e1 point kinds: $kinds"
log "e1: the quiesce gave up after 10 s; cycles go on, all crash-consistent"

# g1 writes while cuts are attempted: a failed quiesce never stops it.
UUID=$(jget primary .uuid vm show g1)
CONSOLE=$(state_dir primary)/run/$UUID/console.log
vr primary vm start g1 >/dev/null || fail "vm start g1"
wait_until "$GUEST_TIMEOUT" grep -q '^done' "$CONSOLE" ||
    fail "the guest did not run to its end: it was left frozen or stuck"
wait_until 30 vm_stopped primary g1 || fail "QEMU did not exit"
warned g1 "guest agent: .*" || fail "g1: no warning: $(vrj primary events --vm g1 | jq -c '.events[-3:]')"
vr primary vm start g1 --no-hypervisor >/dev/null || fail "serve g1 again"
wait_converged g1 60
assert_identical g1
kinds=$(vrj replica points list g1 | jq -r '[.points[].kind] | unique | join(",")')
[ "$kinds" = standard ] || fail "g1 point kinds after failed quiesces: $kinds"
log "g1 ran to its end; every point is crash-consistent"
log "PASS"
