#!/bin/bash
# point-times: a recovery point's time is when the primary cut its cycle,
# not when the Replica server applied it (issue #12 part 6: two points cut
# 10 s apart used to show the same second after a backlog).
#
# The Replica server is down for about 6 s while the primary cuts a cycle
# every second under a writer; when it is back, the backlog is applied at
# once.  The points of the cycles cut meanwhile must carry times before the
# Replica server came back (no apply happened then), spread over the outage,
# in cycle order.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit
requires_build
setup_pair

vm=pt1
create_vm "$vm" 16M
enable_replication "$vm" --frequency 1s --recovery-history 1 --point-interval 60s
uri=$(nbd_uri primary "$vm")
qemu-io -f raw "$uri" -c 'write -P 1 0 64k' >/dev/null || fail "write"
wait_converged "$vm" 60
before=$(repl replica "$vm" applied_cycle)

stop_daemon replica
for i in 1 2 3 4 5 6; do
    qemu-io -f raw "$uri" -c "write -P $((i + 1)) $((i * 64))k 64k" >/dev/null ||
        fail "write $i"
    sleep 1
done
back=$(date +%s)
start_replica
wait_converged "$vm" 60

pts=$(vrj replica points list "$vm" | jq -c --argjson b "$before" \
    '[.points[] | select(.id > $b) | {id, t: (.time_ms / 1000 | floor)}]')
early=$(jq --argjson back "$back" '[.[] | select(.t < $back)] | length' <<<"$pts")
[ "$early" -ge 3 ] ||
    fail "only $early points of the backlog carry a time before the Replica server came back ($back): $pts"
span=$(jq '(map(.t) | max) - (map(.t) | min)' <<<"$pts")
[ "$span" -ge 3 ] || fail "the backlog's points span $span s: $pts"
jq -e '[.[].t] as $t | $t == ($t | sort)' <<<"$pts" >/dev/null ||
    fail "point times are not in cycle order: $pts"
log "backlog points keep their cut times: $pts"
log "PASS"
