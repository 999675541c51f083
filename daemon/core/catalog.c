/* catalog.c: the SQLite catalog under STATE_DIR/catalog.db (WAL,
 * synchronous=FULL): server settings, VMs, disks, replication
 * relationships and events.  Every in-memory change is written through here
 * while the daemon's lock is held, so the catalog is always the durable
 * truth.  Callers hold it as an opaque handle (struct catalog, core
 * layer): it knows the state's types and nothing above them. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "log.h"

/* The catalog: one SQLite connection (FULLMUTEX), used under the daemon's
 * lock. */
struct catalog {
    sqlite3 *db;
};

/* NULL before catalog_open and after catalog_close: SQLite then refuses
 * each call (an event logged then is not stored). */
static sqlite3 *
db_of(struct catalog *cat)
{
    return cat ? cat->db : NULL;
}

#define SCHEMA_VERSION 9 /* 2: recovery history (points, two columns)
                            3: failover_point, failover_step,
                               prepared_cycle, app_every
                            4: auth, krb_encrypt (Kerberos mode)
                            5: vms.owner, vms.owner_group (a Replica
                               VM's owner, kept after removal),
                               replications.reset_pending,
                               auth_entries.max_vms
                            6: first_point (the first consistent cycle
                               after an initial replication)
                            7: initial_method, initial_compared (an
                               initial replication by comparison);
                               resync_* (resynchronization), hold_from,
                               hold_to (the replica's apply hold)
                            8: resync_at, resync_window (scheduled
                               resynchronization)
                            9: vms.libvirt_domain (vm create
                               --from-libvirt); initial_at,
                               initial_export (scheduled and
                               external-media initial replication),
                               imported_base */

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);"
    "CREATE TABLE IF NOT EXISTS config(key TEXT PRIMARY KEY, value TEXT);"
    "CREATE TABLE IF NOT EXISTS vms(uuid TEXT PRIMARY KEY, name TEXT UNIQUE "
    "  NOT NULL, cpus INT, memory_mib INT, mode TEXT, dir TEXT, kernel TEXT, "
    "  initrd TEXT, cmdline TEXT, nics TEXT, test_network TEXT, owner TEXT, "
    "  owner_group TEXT, libvirt_domain TEXT);"
    "CREATE TABLE IF NOT EXISTS disks(vm_uuid TEXT, idx INT, id TEXT, "
    "  path TEXT, size INT, PRIMARY KEY(vm_uuid, idx));"
    "CREATE TABLE IF NOT EXISTS replications(vm_uuid TEXT PRIMARY KEY, "
    "  mode TEXT, state TEXT, replica_server TEXT, connect_address TEXT, "
    "  primary_server TEXT, storage TEXT, frequency INT, compression INT, "
    "  epoch INT, initial_done INT, base_cycle INT, initial_disk INT, "
    "  initial_offset INT, initial_seq INT, initial_total INT, "
    "  initial_sent INT, last_cycle INT, applied_cycle INT, last_ok_ms INT, "
    "  errors INT, ok_count INT, missed INT, bytes_raw INT, bytes_wire INT, "
    "  max_size INT, sum_size INT, max_latency_ms INT, sum_latency_ms INT, "
    "  last_error TEXT, recovery_history INT, point_interval INT, "
    "  test_point INT, failover_point INT, failover_step INT, "
    "  prepared_cycle INT, app_every INT, trust_group TEXT, auth TEXT, "
    "  krb_encrypt INT, reset_pending INT, first_point INT, "
    "  initial_method INT, initial_compared INT, resync_step INT, "
    "  resync_void INT, resync_first INT, resync_compared INT, "
    "  resync_sent INT, hold_from INT, hold_to INT, log_budget INT, "
    "  auto_resync_off INT, resync_at INT, resync_window TEXT, "
    "  initial_at INT, initial_export TEXT, "
    "  imported_base INT);"
    "CREATE TABLE IF NOT EXISTS points(vm_uuid TEXT, cycle INT, time_ms INT, "
    "  kind TEXT, undo_bytes INT, PRIMARY KEY(vm_uuid, cycle));"
    "CREATE TABLE IF NOT EXISTS auth_entries(pattern TEXT PRIMARY KEY, "
    "  storage TEXT NOT NULL, trust_group TEXT NOT NULL, max_vms INT);"
    "CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, time_ms INT, "
    "  level TEXT, vm TEXT, message TEXT);";

static int
exec_sql(struct catalog *cat, const char *sql)
{
    char *err = NULL;
    if (sqlite3_exec(db_of(cat), sql, NULL, NULL, &err) != SQLITE_OK) {
        int rc = vr_err(-EIO, "catalog: %s", err ? err : "error");
        sqlite3_free(err);
        return rc;
    }
    return 0;
}

/* Add column col to table unless it has it (a table the schema created
 * just now, in an older catalog, has it already). */
static int
add_column(struct catalog *cat, const char *table, const char *col,
           const char *type)
{
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db_of(cat),
                           "SELECT 1 FROM pragma_table_info(?) WHERE "
                           "name = ?",
                           -1, &st, NULL) != SQLITE_OK)
        return vr_err(-EIO, "catalog: %s", sqlite3_errmsg(db_of(cat)));
    sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, col, -1, SQLITE_STATIC);
    bool have = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    if (have)
        return 0;
    CLEANUP_FREE char *sql =
        xasprintf("ALTER TABLE %s ADD COLUMN %s %s", table, col, type);
    return exec_sql(cat, sql);
}

/* Bring an older catalog to the current version: version 2 added the
 * columns of recovery history and test failover (the points table is
 * created by the schema), version 3 those of failover. */
static int
migrate(struct catalog *cat)
{
    sqlite3_stmt *st = NULL;
    int have = 0;
    if (sqlite3_prepare_v2(db_of(cat), "SELECT value FROM meta WHERE key = "
                           "'schema_version'", -1, &st, NULL) != SQLITE_OK)
        return vr_err(-EIO, "catalog: %s", sqlite3_errmsg(db_of(cat)));
    if (sqlite3_step(st) == SQLITE_ROW)
        have = atoi((const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    if (have > SCHEMA_VERSION)
        return vr_err(-EPROTONOSUPPORT, "catalog schema version %d is newer "
                      "than this vmreplicad (%d)", have, SCHEMA_VERSION);
    int rc = 0;
    if (have == 1)
        rc = exec_sql(cat,
                      "ALTER TABLE replications ADD COLUMN recovery_history "
                      "INT; ALTER TABLE replications ADD COLUMN "
                      "point_interval INT; ALTER TABLE replications ADD "
                      "COLUMN test_point INT;");
    if (rc == 0 && have >= 1 && have <= 2)
        rc = exec_sql(cat, "ALTER TABLE replications ADD COLUMN failover_point "
                      "INT; ALTER TABLE replications ADD COLUMN "
                      "failover_step INT; ALTER TABLE replications ADD "
                      "COLUMN prepared_cycle INT; ALTER TABLE replications "
                      "ADD COLUMN app_every INT; ALTER TABLE replications "
                      "ADD COLUMN trust_group TEXT; ALTER TABLE vms ADD COLUMN "
                      "kernel TEXT; ALTER TABLE vms ADD COLUMN initrd TEXT; "
                      "ALTER TABLE vms ADD COLUMN cmdline TEXT; ALTER TABLE "
                      "vms ADD COLUMN nics TEXT; ALTER TABLE vms ADD COLUMN "
                      "test_network TEXT;");
    if (rc == 0 && have >= 1 && have <= 3)
        rc = exec_sql(cat, "ALTER TABLE replications ADD COLUMN auth TEXT; "
                      "ALTER TABLE replications ADD COLUMN krb_encrypt INT;");
    /* 5: a Replica VM's owner is its live relationship's primary and
     * trust group; one kept from an earlier removal has none (only a
     * local 'vm remove' frees it). */
    if (rc == 0 && have >= 1 && have <= 4)
        rc = add_column(cat, "vms", "owner", "TEXT");
    if (rc == 0 && have >= 1 && have <= 4)
        rc = add_column(cat, "vms", "owner_group", "TEXT");
    if (rc == 0 && have >= 1 && have <= 4)
        rc = add_column(cat, "replications", "reset_pending", "INT");
    if (rc == 0 && have >= 1 && have <= 4)
        rc = add_column(cat, "auth_entries", "max_vms", "INT");
    if (rc == 0 && have >= 1 && have <= 4)
        rc = exec_sql(cat, "UPDATE vms SET owner = (SELECT primary_server FROM "
                      "replications r WHERE r.vm_uuid = vms.uuid), "
                      "owner_group = (SELECT coalesce(trust_group, '') FROM "
                      "replications r WHERE r.vm_uuid = vms.uuid) WHERE "
                      "mode = 'replica';");
    /* 6: the first consistent cycle after an initial replication. */
    if (rc == 0 && have >= 1 && have <= 5)
        rc = add_column(cat, "replications", "first_point", "INT");
    /* 7: how the initial replication goes (full copy or comparison) and
     * how far a comparison got. */
    if (rc == 0 && have >= 1 && have <= 6)
        rc = add_column(cat, "replications", "initial_method", "INT");
    if (rc == 0 && have >= 1 && have <= 6)
        rc = add_column(cat, "replications", "initial_compared", "INT");
    static const char *const v7[] = { "resync_step", "resync_void",
                                      "resync_first", "resync_compared",
                                      "resync_sent", "hold_from", "hold_to",
                                      "log_budget", "auto_resync_off" };
    for (size_t k = 0; rc == 0 && have >= 1 && have <= 6 && k < ARRAY_SIZE(v7);
         k++)
        rc = add_column(cat, "replications", v7[k], "INT");
    /* 8: a scheduled resynchronization and the automatic one's window. */
    if (rc == 0 && have >= 1 && have <= 7)
        rc = add_column(cat, "replications", "resync_at", "INT");
    if (rc == 0 && have >= 1 && have <= 7)
        rc = add_column(cat, "replications", "resync_window", "TEXT");
    /* 9: the libvirt domain a VM was adopted from; a scheduled start, an
     * export's directory, an import's base. */
    if (rc == 0 && have >= 1 && have <= 8)
        rc = add_column(cat, "vms", "libvirt_domain", "TEXT");
    if (rc == 0 && have >= 1 && have <= 8)
        rc = add_column(cat, "replications", "initial_at", "INT");
    if (rc == 0 && have >= 1 && have <= 8)
        rc = add_column(cat, "replications", "initial_export", "TEXT");
    if (rc == 0 && have >= 1 && have <= 8)
        rc = add_column(cat, "replications", "imported_base", "INT");
    if (rc == 0)
        rc = exec_sql(cat,
                      "INSERT OR REPLACE INTO meta VALUES('schema_version', "
                      "'9')");
    return rc;
}

int
catalog_open(const char *path, struct catalog **out)
{
    struct catalog *cat = xcalloc(1, sizeof *cat);
    /* Even on failure: the caller closes it (sqlite3_open_v2 makes a
     * connection that must be closed in any case). */
    *out = cat;
    if (sqlite3_open_v2(path, &cat->db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                            SQLITE_OPEN_FULLMUTEX,
                        NULL) != SQLITE_OK)
        return vr_err(-EIO, "open catalog %s: %s", path,
                      sqlite3_errmsg(cat->db));
    sqlite3_busy_timeout(cat->db, 5000);
    int rc = exec_sql(cat, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;");
    if (rc == 0)
        rc = exec_sql(cat, schema);
    if (rc == 0)
        rc = migrate(cat);
    return rc;
}

void
catalog_close(struct catalog *cat)
{
    if (!cat)
        return;
    if (cat->db)
        sqlite3_close(cat->db);
    free(cat);
}

static sqlite3_stmt *
prep(struct catalog *cat, const char *sql)
{
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db_of(cat), sql, -1, &st, NULL) != SQLITE_OK) {
        vr_err(-EIO, "catalog: %s", sqlite3_errmsg(db_of(cat)));
        return NULL;
    }
    return st;
}

static int
step_done(struct catalog *cat, sqlite3_stmt *st)
{
    int r = sqlite3_step(st);
    sqlite3_finalize(st);
    if (r != SQLITE_DONE)
        return vr_err(-EIO, "catalog write: %s", sqlite3_errmsg(db_of(cat)));
    return 0;
}

static char *
col_str(sqlite3_stmt *st, int i)
{
    const unsigned char *s = sqlite3_column_text(st, i);
    return s ? xstrdup((const char *)s) : NULL;
}

/* --- server config as key/value --------------------------------------- */

static int
config_put(struct catalog *cat, const char *key, const char *value)
{
    sqlite3_stmt *st = prep(cat, "INSERT OR REPLACE INTO config VALUES(?, ?)");
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    if (value)
        sqlite3_bind_text(st, 2, value, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 2);
    return step_done(cat, st);
}

int
catalog_save_server(struct catalog *cat, const struct server_cfg *c)
{
    char port[16], kport[16], mon[16];
    snprintf(port, sizeof port, "%u", c->cert_port);
    snprintf(kport, sizeof kport, "%u", c->krb_port);
    snprintf(mon, sizeof mon, "%u", c->monitoring_interval_s);
    int rc = catalog_begin(cat);
    if (rc < 0)
        return rc;
    if ((rc = config_put(cat, "hostname", c->hostname)) < 0 ||
        (rc = config_put(cat, "replica_enabled",
                         c->replica_enabled ? "1" : "0")) < 0 ||
        (rc = config_put(cat, "auth", c->auth)) < 0 ||
        (rc = config_put(cat, "cert_port", port)) < 0 ||
        (rc = config_put(cat, "krb_port", kport)) < 0 ||
        (rc = config_put(cat, "keytab", c->keytab)) < 0 ||
        (rc = config_put(cat, "krb_encrypt", c->krb_encrypt ? "1" : "0")) < 0 ||
        (rc = config_put(cat, "cert", c->cert)) < 0 ||
        (rc = config_put(cat, "key", c->key)) < 0 ||
        (rc = config_put(cat, "ca", c->ca)) < 0 ||
        (rc = config_put(cat, "crl", c->crl)) < 0 ||
        (rc = config_put(cat, "cert_store", c->cert_store)) < 0 ||
        (rc = config_put(cat, "thumbprint", c->thumbprint)) < 0 ||
        (rc = config_put(cat, "allow_any", c->allow_any ? "1" : "0")) < 0 ||
        (rc = config_put(cat, "default_storage", c->default_storage)) < 0 ||
        (rc = config_put(cat, "monitoring_interval", mon)) < 0 ||
        (rc = config_put(cat, "firewall_enabled",
                         c->firewall_enabled ? "1" : "0")) < 0 ||
        (rc = config_put(cat, "web_listen", c->web_listen)) < 0 ||
        (rc = config_put(cat, "hypervisor",
                         c->hypervisor_libvirt ? "libvirt" : "qemu")) < 0) {
        return catalog_end(cat, rc);
    }
    return catalog_end(cat, 0);
}

static void
load_server(struct catalog *cat, struct server_cfg *c)
{
    sqlite3_stmt *st = prep(cat, "SELECT key, value FROM config");
    if (!st)
        return;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *k = (const char *)sqlite3_column_text(st, 0);
        char *v = col_str(st, 1);
        if (!k || !v) {
            free(v);
            continue;
        }
#define S(name, field)                                                         \
    if (strcmp(k, name) == 0) {                                                \
        free(c->field);                                                        \
        c->field = v;                                                          \
        continue;                                                              \
    }
        S("hostname", hostname)
        S("auth", auth)
        S("cert", cert)
        S("key", key)
        S("ca", ca)
        S("crl", crl)
        S("cert_store", cert_store)
        S("thumbprint", thumbprint)
        S("keytab", keytab)
        S("default_storage", default_storage)
        S("web_listen", web_listen)
#undef S
        if (strcmp(k, "hypervisor") == 0)
            c->hypervisor_libvirt = strcmp(v, "libvirt") == 0;
        if (strcmp(k, "replica_enabled") == 0)
            c->replica_enabled = atoi(v) != 0;
        else if (strcmp(k, "allow_any") == 0)
            c->allow_any = atoi(v) != 0;
        else if (strcmp(k, "cert_port") == 0)
            c->cert_port = (unsigned)atoi(v);
        else if (strcmp(k, "krb_port") == 0)
            c->krb_port = (unsigned)atoi(v);
        else if (strcmp(k, "krb_encrypt") == 0)
            c->krb_encrypt = atoi(v) != 0;
        else if (strcmp(k, "monitoring_interval") == 0)
            c->monitoring_interval_s = (unsigned)atoi(v);
        else if (strcmp(k, "firewall_enabled") == 0)
            c->firewall_enabled = atoi(v) != 0;
        free(v);
    }
    sqlite3_finalize(st);
}

/* --- VMs ----------------------------------------------------------------- */

static enum vm_mode
mode_parse(const char *s)
{
    if (s && strcmp(s, "primary") == 0)
        return VM_MODE_PRIMARY;
    if (s && strcmp(s, "replica") == 0)
        return VM_MODE_REPLICA;
    return VM_MODE_NONE;
}

int
catalog_save_vm(struct catalog *cat, const struct vm *vm)
{
    int rc = catalog_begin(cat);
    if (rc < 0)
        return rc;
    sqlite3_stmt *st = prep(
        cat, "INSERT OR REPLACE INTO vms VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
    if (!st)
        return catalog_end(cat, -EIO);
    sqlite3_bind_text(st, 1, vm->uuid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, vm->name, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, (int)vm->cpus);
    sqlite3_bind_int(st, 4, (int)vm->memory_mib);
    sqlite3_bind_text(st, 5, vm_mode_name(vm->mode), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, vm->dir, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, vm->kernel, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 8, vm->initrd, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 9, vm->cmdline, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 10,
                      vm->nics ? json_object_to_json_string_ext(
                                     vm->nics, JSON_C_TO_STRING_PLAIN)
                               : NULL,
                      -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 11, vm->test_network, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 12, vm->owner, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 13, vm->owner_group, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 14, vm->libvirt_domain, -1, SQLITE_STATIC);
    rc = step_done(cat, st);
    if (rc == 0) {
        st = prep(cat, "DELETE FROM disks WHERE vm_uuid = ?");
        if (!st)
            rc = -EIO;
        else {
            sqlite3_bind_text(st, 1, vm->uuid, -1, SQLITE_STATIC);
            rc = step_done(cat, st);
        }
    }
    for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++) {
        st = prep(cat, "INSERT INTO disks VALUES(?,?,?,?,?)");
        if (!st) {
            rc = -EIO;
            break;
        }
        sqlite3_bind_text(st, 1, vm->uuid, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, (int)i);
        sqlite3_bind_text(st, 3, vm->disks[i].id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, vm->disks[i].path, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)vm->disks[i].size);
        rc = step_done(cat, st);
    }
    if (rc < 0) {
        return catalog_end(cat, rc);
    }
    return catalog_end(cat, 0);
}

int
catalog_delete_vm(struct catalog *cat, const char *uuid)
{
    int rc = 0;
    const char *sqls[] = { "DELETE FROM disks WHERE vm_uuid = ?",
                           "DELETE FROM points WHERE vm_uuid = ?",
                           "DELETE FROM replications WHERE vm_uuid = ?",
                           "DELETE FROM vms WHERE uuid = ?" };
    for (size_t i = 0; rc == 0 && i < ARRAY_SIZE(sqls); i++) {
        sqlite3_stmt *st = prep(cat, sqls[i]);
        if (!st)
            return -EIO;
        sqlite3_bind_text(st, 1, uuid, -1, SQLITE_STATIC);
        rc = step_done(cat, st);
    }
    return rc;
}

/* --- replications -------------------------------------------------------- */

int
catalog_save_repl(struct catalog *cat, const struct repl *r)
{
    sqlite3_stmt *st = prep(cat, 
        "INSERT OR REPLACE INTO replications VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,"
        "?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,"
        "?,?,?,?,?,?,?,?,?)");
    if (!st)
        return -EIO;
    int i = 1;
    sqlite3_bind_text(st, i++, r->vm_uuid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, i++, vm_mode_name(r->mode), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, i++, repl_st_name(r->st), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, i++, r->replica_server, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, i++, r->connect_address, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, i++, r->primary_server, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, i++, r->storage, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, i++, r->frequency_s);
    sqlite3_bind_int(st, i++, r->compression);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->epoch);
    sqlite3_bind_int(st, i++, r->initial_done);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->base_cycle);
    sqlite3_bind_int64(st, i++, r->initial_disk);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->initial_offset);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->initial_seq);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->initial_total);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->initial_sent);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->last_cycle);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->applied_cycle);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->last_ok_ms);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->errors);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->ok_count);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->missed);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->bytes_raw);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->bytes_wire);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->max_size);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->sum_size);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->max_latency_ms);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->sum_latency_ms);
    sqlite3_bind_text(st, i++, r->last_error, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, i++, r->recovery_history);
    sqlite3_bind_int64(st, i++, r->point_interval_s);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->test_point);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->failover_point);
    sqlite3_bind_int(st, i++, r->failover_step);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->prepared_cycle);
    sqlite3_bind_int64(st, i++, r->app_every);
    sqlite3_bind_text(st, i++, r->trust_group, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, i++, r->auth, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, i++, r->krb_encrypt);
    sqlite3_bind_int(st, i++, r->reset_pending);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->first_point);
    sqlite3_bind_int(st, i++, r->initial_method);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->initial_compared);
    sqlite3_bind_int(st, i++, r->resync_step);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->resync_void);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->resync_first);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->resync_compared);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->resync_sent);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->hold_from);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->hold_to);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->log_budget);
    sqlite3_bind_int(st, i++, r->auto_resync_off);
    sqlite3_bind_int64(st, i++, r->resync_at);
    sqlite3_bind_text(st, i++, r->resync_window, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->initial_at_ms);
    sqlite3_bind_text(st, i++, r->initial_export, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, i++, (sqlite3_int64)r->imported_base);
    return step_done(cat, st);
}

/* Savepoints, not BEGIN: they nest (catalog_save_vm inside a caller's
 * transaction). */
int
catalog_begin(struct catalog *cat)
{
    return exec_sql(cat, "SAVEPOINT vr");
}

int
catalog_end(struct catalog *cat, int rc)
{
    if (rc < 0) {
        VR_IGNORE(exec_sql(cat, "ROLLBACK TO vr; RELEASE vr"));
        return rc;
    }
    return exec_sql(cat, "RELEASE vr");
}

int
catalog_delete_repl(struct catalog *cat, const char *uuid)
{
    sqlite3_stmt *st = prep(cat, "DELETE FROM replications WHERE vm_uuid = ?");
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, uuid, -1, SQLITE_STATIC);
    return step_done(cat, st);
}

static struct repl *
load_repl(sqlite3_stmt *st)
{
    struct repl *r = xcalloc(1, sizeof *r);
    int i = 0;
    snprintf(r->vm_uuid, sizeof r->vm_uuid, "%s",
             (const char *)sqlite3_column_text(st, i++));
    r->mode = mode_parse((const char *)sqlite3_column_text(st, i++));
    const unsigned char *state = sqlite3_column_text(st, i++);
    r->st = REPL_ST_DISABLED;
    if (state && !repl_st_parse((const char *)state, &r->st)) {
        /* Only a damaged row names no state: stopped, not guessed. */
        log_warn("catalog", "vm %s: unknown replication state %s; taken as "
                 "Error", r->vm_uuid, (const char *)state);
        r->st = REPL_ST_ERROR;
    }
    r->replica_server = col_str(st, i++);
    r->connect_address = col_str(st, i++);
    r->primary_server = col_str(st, i++);
    r->storage = col_str(st, i++);
    r->frequency_s = (unsigned)sqlite3_column_int64(st, i++);
    r->compression = sqlite3_column_int(st, i++) != 0;
    r->epoch = (uint64_t)sqlite3_column_int64(st, i++);
    r->initial_done = sqlite3_column_int(st, i++) != 0;
    r->base_cycle = (uint64_t)sqlite3_column_int64(st, i++);
    r->initial_disk = (unsigned)sqlite3_column_int64(st, i++);
    r->initial_offset = (uint64_t)sqlite3_column_int64(st, i++);
    r->initial_seq = (uint64_t)sqlite3_column_int64(st, i++);
    r->initial_total = (uint64_t)sqlite3_column_int64(st, i++);
    r->initial_sent = (uint64_t)sqlite3_column_int64(st, i++);
    r->last_cycle = (uint64_t)sqlite3_column_int64(st, i++);
    r->applied_cycle = (uint64_t)sqlite3_column_int64(st, i++);
    r->last_ok_ms = (uint64_t)sqlite3_column_int64(st, i++);
    r->errors = (uint64_t)sqlite3_column_int64(st, i++);
    r->ok_count = (uint64_t)sqlite3_column_int64(st, i++);
    r->missed = (uint64_t)sqlite3_column_int64(st, i++);
    r->bytes_raw = (uint64_t)sqlite3_column_int64(st, i++);
    r->bytes_wire = (uint64_t)sqlite3_column_int64(st, i++);
    r->max_size = (uint64_t)sqlite3_column_int64(st, i++);
    r->sum_size = (uint64_t)sqlite3_column_int64(st, i++);
    r->max_latency_ms = (uint64_t)sqlite3_column_int64(st, i++);
    r->sum_latency_ms = (uint64_t)sqlite3_column_int64(st, i++);
    r->last_error = col_str(st, i++);
    r->recovery_history = (unsigned)sqlite3_column_int64(st, i++);
    r->point_interval_s = (unsigned)sqlite3_column_int64(st, i++);
    r->test_point = (uint64_t)sqlite3_column_int64(st, i++);
    r->failover_point = (uint64_t)sqlite3_column_int64(st, i++);
    r->failover_step = sqlite3_column_int(st, i++);
    r->prepared_cycle = (uint64_t)sqlite3_column_int64(st, i++);
    r->app_every = (unsigned)sqlite3_column_int64(st, i++);
    r->trust_group = col_str(st, i++);
    r->auth = col_str(st, i++);
    r->krb_encrypt = sqlite3_column_int(st, i++) != 0;
    r->reset_pending = sqlite3_column_int(st, i++) != 0;
    r->first_point = (uint64_t)sqlite3_column_int64(st, i++);
    int method = sqlite3_column_int(st, i++);
    r->initial_method = method == INITIAL_COMPARE  ? INITIAL_COMPARE
                        : method == INITIAL_EXPORT ? INITIAL_EXPORT
                                                   : INITIAL_FULL;
    r->initial_compared = (uint64_t)sqlite3_column_int64(st, i++);
    int step = sqlite3_column_int(st, i++);
    r->resync_step = step >= RESYNC_REQUESTED && step <= RESYNC_COMPLETING
                         ? (enum resync_step)step
                         : RESYNC_NONE;
    r->resync_void = (uint64_t)sqlite3_column_int64(st, i++);
    r->resync_first = (uint64_t)sqlite3_column_int64(st, i++);
    r->resync_compared = (uint64_t)sqlite3_column_int64(st, i++);
    r->resync_sent = (uint64_t)sqlite3_column_int64(st, i++);
    r->hold_from = (uint64_t)sqlite3_column_int64(st, i++);
    r->hold_to = (uint64_t)sqlite3_column_int64(st, i++);
    r->log_budget = (uint64_t)sqlite3_column_int64(st, i++);
    r->auto_resync_off = sqlite3_column_int(st, i++) != 0;
    r->resync_at = sqlite3_column_int64(st, i++);
    r->resync_window = col_str(st, i++);
    r->initial_at_ms = (uint64_t)sqlite3_column_int64(st, i++);
    r->initial_export = col_str(st, i++);
    r->imported_base = (uint64_t)sqlite3_column_int64(st, i++);
    if (r->point_interval_s == 0)
        r->point_interval_s = 3600;
    return r;
}

/* --- recovery points ------------------------------------------------------ */

int
catalog_add_point(struct catalog *cat, const char *uuid, const struct point *p)
{
    sqlite3_stmt *st =
        prep(cat, "INSERT OR REPLACE INTO points VALUES(?,?,?,?,?)");
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, uuid, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)p->cycle);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)p->time_ms);
    sqlite3_bind_text(st, 4, p->kind, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)p->undo_bytes);
    return step_done(cat, st);
}

int
catalog_delete_point(struct catalog *cat, const char *uuid, uint64_t cycle)
{
    sqlite3_stmt *st = prep(
        cat, "DELETE FROM points WHERE vm_uuid = ? AND (cycle = ? OR ? = 0)");
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, uuid, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)cycle);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)cycle);
    return step_done(cat, st);
}

int
catalog_points(struct catalog *cat, const char *uuid, struct point **out,
               size_t *n)
{
    *out = NULL;
    *n = 0;
    sqlite3_stmt *st = prep(cat, "SELECT cycle, time_ms, kind, undo_bytes FROM "
                            "points WHERE vm_uuid = ? ORDER BY cycle");
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, uuid, -1, SQLITE_STATIC);
    size_t cap = 0;
    int r;
    while ((r = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == cap) {
            cap = cap ? 2 * cap : 32;
            *out = xrealloc(*out, cap * sizeof **out);
        }
        struct point *p = &(*out)[(*n)++];
        memset(p, 0, sizeof *p);
        p->cycle = (uint64_t)sqlite3_column_int64(st, 0);
        p->time_ms = (uint64_t)sqlite3_column_int64(st, 1);
        const unsigned char *k = sqlite3_column_text(st, 2);
        snprintf(p->kind, sizeof p->kind, "%s",
                 k ? (const char *)k : "standard");
        p->undo_bytes = (uint64_t)sqlite3_column_int64(st, 3);
    }
    sqlite3_finalize(st);
    if (r != SQLITE_DONE) {
        free(*out);
        *out = NULL;
        *n = 0;
        return vr_err(-EIO, "catalog read: %s", sqlite3_errmsg(db_of(cat)));
    }
    return 0;
}

int
catalog_load(struct catalog *cat, struct server_cfg *cfg, struct vm **vms)
{
    load_server(cat, cfg);
    sqlite3_stmt *st =
        prep(cat, "SELECT uuid, name, cpus, memory_mib, mode, dir, "
                  "kernel, initrd, cmdline, nics, test_network, "
                  "owner, owner_group, libvirt_domain FROM vms ORDER BY "
                  "name DESC");
    if (!st)
        return -EIO;
    while (sqlite3_step(st) == SQLITE_ROW) {
        struct vm *vm = xcalloc(1, sizeof *vm);
        snprintf(vm->uuid, sizeof vm->uuid, "%s",
                 (const char *)sqlite3_column_text(st, 0));
        vm->name = col_str(st, 1);
        vm->cpus = (unsigned)sqlite3_column_int(st, 2);
        vm->memory_mib = (unsigned)sqlite3_column_int(st, 3);
        vm->mode = mode_parse((const char *)sqlite3_column_text(st, 4));
        vm->dir = col_str(st, 5);
        vm->kernel = col_str(st, 6);
        vm->initrd = col_str(st, 7);
        vm->cmdline = col_str(st, 8);
        const unsigned char *nics = sqlite3_column_text(st, 9);
        vm->nics = nics ? json_tokener_parse((const char *)nics) : NULL;
        if (vm->nics && nics_validate(vm->nics) < 0) {
            log_warn("catalog", "vm %s: NICs ignored: %s", vm->name,
                     vr_errmsg());
            vr_err_clear();
            json_object_put(vm->nics);
            vm->nics = NULL;
        }
        vm->test_network = col_str(st, 10);
        vm->owner = col_str(st, 11);
        vm->owner_group = col_str(st, 12);
        vm->libvirt_domain = col_str(st, 13);
        vm->next = *vms;
        *vms = vm;
    }
    sqlite3_finalize(st);

    for (struct vm *vm = *vms; vm; vm = vm->next) {
        st =
            prep(cat, "SELECT idx, id, path, size FROM disks WHERE vm_uuid = ? "
                      "ORDER BY idx");
        if (!st)
            return -EIO;
        sqlite3_bind_text(st, 1, vm->uuid, -1, SQLITE_STATIC);
        while (sqlite3_step(st) == SQLITE_ROW && vm->ndisks < MAX_DISKS) {
            struct disk *dk = &vm->disks[vm->ndisks++];
            snprintf(dk->id, sizeof dk->id, "%s",
                     (const char *)sqlite3_column_text(st, 1));
            dk->path = col_str(st, 2);
            dk->size = (uint64_t)sqlite3_column_int64(st, 3);
        }
        sqlite3_finalize(st);

        st = prep(cat, "SELECT * FROM replications WHERE vm_uuid = ?");
        if (!st)
            return -EIO;
        sqlite3_bind_text(st, 1, vm->uuid, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW)
            vm->repl = load_repl(st);
        sqlite3_finalize(st);
    }
    return 0;
}

/* --- authorization entries ------------------------------------------------ */

int
catalog_auth_list(struct catalog *cat, struct auth_entry **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    sqlite3_stmt *st =
        prep(cat, "SELECT pattern, storage, trust_group, max_vms "
                  "FROM auth_entries ORDER BY pattern");
    if (!st)
        return -EIO;
    size_t cap = 0;
    int r;
    while ((r = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == cap) {
            cap = cap ? 2 * cap : 8;
            *out = xrealloc(*out, cap * sizeof **out);
        }
        struct auth_entry *e = &(*out)[(*n)++];
        e->pattern = col_str(st, 0);
        e->storage = col_str(st, 1);
        e->trust_group = col_str(st, 2);
        e->max_vms = (unsigned)sqlite3_column_int64(st, 3);
    }
    sqlite3_finalize(st);
    if (r != SQLITE_DONE) {
        auth_entries_free(*out, *n);
        *out = NULL;
        *n = 0;
        return vr_err(-EIO, "catalog: %s", sqlite3_errmsg(db_of(cat)));
    }
    return 0;
}

void
auth_entries_free(struct auth_entry *e, size_t n)
{
    for (size_t i = 0; e && i < n; i++) {
        free(e[i].pattern);
        free(e[i].storage);
        free(e[i].trust_group);
    }
    free(e);
}

int
catalog_auth_put(struct catalog *cat, const struct auth_entry *e)
{
    sqlite3_stmt *st =
        prep(cat, "INSERT OR REPLACE INTO auth_entries VALUES(?,?,?,?)");
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, e->pattern, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, e->storage, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, e->trust_group ? e->trust_group : "", -1,
                      SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, e->max_vms);
    return step_done(cat, st);
}

int
catalog_auth_delete(struct catalog *cat, const char *pattern)
{
    sqlite3_stmt *st = prep(cat, "DELETE FROM auth_entries WHERE pattern = ?");
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, pattern, -1, SQLITE_STATIC);
    int rc = step_done(cat, st);
    if (rc == 0 && sqlite3_changes(db_of(cat)) == 0)
        rc = vr_err(-ENOENT, "no authorization entry for %s", pattern);
    return rc;
}

/* --- events -------------------------------------------------------------- */

void
catalog_add_event(struct catalog *cat, uint64_t time_ms, const char *level,
                  const char *vm, const char *msg)
{
    sqlite3_stmt *st =
        prep(cat, "INSERT INTO events(time_ms, level, vm, message) "
                  "VALUES(?,?,?,?)");
    if (!st)
        return;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)time_ms);
    sqlite3_bind_text(st, 2, level, -1, SQLITE_STATIC);
    if (vm)
        sqlite3_bind_text(st, 3, vm, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 3);
    sqlite3_bind_text(st, 4, msg, -1, SQLITE_STATIC);
    (void)step_done(cat, st);
    /* Keep the table bounded. */
    (void)exec_sql(cat, "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM "
                   "events) - 10000");
}

json_object *
catalog_events(struct catalog *cat, const char *vm, int64_t after_id,
               unsigned max)
{
    json_object *arr = json_object_new_array();
    sqlite3_stmt *st = prep(cat, after_id > 0
        ? "SELECT time_ms, level, vm, message, id FROM events "
          "WHERE (?1 IS NULL OR vm = ?1) AND id > ?3 ORDER BY id LIMIT ?2"
        : "SELECT * FROM (SELECT time_ms, level, vm, message, id FROM events "
          "WHERE (?1 IS NULL OR vm = ?1) ORDER BY id DESC LIMIT ?2) ORDER BY "
          "id");
    if (!st)
        return arr;
    if (vm)
        sqlite3_bind_text(st, 1, vm, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 1);
    sqlite3_bind_int(st, 2, (int)max);
    if (after_id > 0)
        sqlite3_bind_int64(st, 3, after_id);
    while (sqlite3_step(st) == SQLITE_ROW) {
        json_object *e = json_object_new_object();
        char ts[32];
        vr_rfc3339((uint64_t)sqlite3_column_int64(st, 0), ts);
        json_object_object_add(e, "id",
                               json_object_new_int64(sqlite3_column_int64(st, 4)));
        json_object_object_add(e, "time", json_object_new_string(ts));
        json_object_object_add(
            e, "level",
            json_object_new_string((const char *)sqlite3_column_text(st, 1)));
        const unsigned char *v = sqlite3_column_text(st, 2);
        json_object_object_add(
            e, "vm", v ? json_object_new_string((const char *)v) : NULL);
        json_object_object_add(
            e, "message",
            json_object_new_string((const char *)sqlite3_column_text(st, 3)));
        json_object_array_add(arr, e);
    }
    sqlite3_finalize(st);
    return arr;
}
