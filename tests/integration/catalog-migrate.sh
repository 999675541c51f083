#!/bin/bash
# catalog-migrate: a catalog written by the first release (schema version 1,
# tests/integration/catalog-v1.sql, the schema exactly as that release
# created it) is brought to the current version at start-up without losing
# a relationship: its VM and replication settings read back unchanged, the
# new recovery-history settings take their defaults, and the recorded
# schema version is the new one.  A catalog from a newer version is refused
# with a clear message rather than opened.
source "$(dirname "$0")/functions.sh"
requires jq python3 curl
requires_build

state=$(state_dir primary)
mkdir -p "$state"
uuid=11111111-2222-3333-4444-555555555555
python3 - "$SOURCE_DIR/tests/integration/catalog-v1.sql" "$state/catalog.db" \
    "$uuid" <<'PY' || fail "could not write a version-1 catalog"
import sqlite3, sys
db = sqlite3.connect(sys.argv[2])
db.executescript(open(sys.argv[1]).read())
db.execute("INSERT INTO meta VALUES('schema_version', '1')")
db.execute("INSERT INTO vms VALUES(?, 'old', 2, 512, 'primary', '/nonexistent')",
           (sys.argv[3],))
db.execute("INSERT INTO replications (vm_uuid, mode, state, replica_server,"
           " frequency, compression, epoch, initial_done, last_cycle)"
           " VALUES(?, 'primary', 'Replicating', 'r.example:443', 30, 0, 7,"
           " 1, 41)", (sys.argv[3],))
db.commit()
PY

start_primary
show=$(vrj primary replication show old) || fail "replication show after migration"
for kv in mode=primary frequency=30 compression=false epoch=7 last_cycle=41 \
          replica_server=r.example:443 recovery_history=0 point_interval=3600; do
    got=$(jq -r ".${kv%%=*}" <<<"$show")
    [ "$got" = "${kv#*=}" ] || fail "${kv%%=*} after migration: '$got', want '${kv#*=}'"
done
[ "$(jget primary .cpus vm show old)" = 2 ] || fail "vm cpus lost"
# Version 7's columns read as a full copy with nothing compared.
m=$(vrj primary replication measure old) || fail "replication measure after migration"
[ "$(jq -r '"\(.initial_replication_method) \(.initial_replication_compared)"' <<<"$m")" = "full 0" ] ||
    fail "initial replication after migration: $(jq -c '{initial_replication_method, initial_replication_compared}' <<<"$m")"
stop_daemon primary
v=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(
    "SELECT value FROM meta WHERE key = '"'"'schema_version'"'"'").fetchone()[0])' \
    "$state/catalog.db")
[ "$v" = 9 ] || fail "schema_version $v after migration, want 9"
log "version-1 catalog migrated to 2, relationship intact"

python3 -c 'import sqlite3,sys; db = sqlite3.connect(sys.argv[1]); db.execute(
    "UPDATE meta SET value = '"'"'99'"'"' WHERE key = '"'"'schema_version'"'"'"); db.commit()' \
    "$state/catalog.db"
spawn_daemon primary
wait_until 10 daemon_dead primary || fail "daemon started on a newer catalog"
grep -q "catalog schema version 99 is newer" "$TESTDIR/primary.log" ||
    fail "no clear message for a newer catalog"
log "a newer catalog is refused"
log "PASS"
