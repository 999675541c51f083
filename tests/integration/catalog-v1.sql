-- The catalog schema of the first release (version 1), as it created it;
-- tests/integration/catalog-migrate.sh upgrades a catalog made from it.
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS config(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS vms(uuid TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, cpus INT, memory_mib INT, mode TEXT, dir TEXT);
CREATE TABLE IF NOT EXISTS disks(vm_uuid TEXT, idx INT, id TEXT, path TEXT, size INT, PRIMARY KEY(vm_uuid, idx));
CREATE TABLE IF NOT EXISTS replications(vm_uuid TEXT PRIMARY KEY, mode TEXT, state TEXT, replica_server TEXT, connect_address TEXT, primary_server TEXT, storage TEXT, frequency INT, compression INT, epoch INT, initial_done INT, base_cycle INT, initial_disk INT, initial_offset INT, initial_seq INT, initial_total INT, initial_sent INT, last_cycle INT, applied_cycle INT, last_ok_ms INT, errors INT, ok_count INT, missed INT, bytes_raw INT, bytes_wire INT, max_size INT, sum_size INT, max_latency_ms INT, sum_latency_ms INT, last_error TEXT);
CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, time_ms INT, level TEXT, vm TEXT, message TEXT);
