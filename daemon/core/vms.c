/* vms.c: the VM and replication objects every layer above shares —
 * lookup in the daemon's list, freeing, the run directory, the facts of a
 * replication (its state as shown, health, authentication, the peer's
 * name, the registration body), the JSON getters of request bodies, and
 * the wait on the daemon's condition.  Everything that needs the daemon's
 * state takes it as a parameter. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "vms.h"

struct vm *
vm_find(struct daemon *d, const char *key)
{
    for (struct vm *vm = d->vms; vm; vm = vm->next)
        if (strcmp(vm->name, key) == 0 || strcmp(vm->uuid, key) == 0)
            return vm;
    return NULL;
}

struct vm *
vm_find_uuid(struct daemon *d, const char *uuid)
{
    for (struct vm *vm = d->vms; vm; vm = vm->next)
        if (strcmp(vm->uuid, uuid) == 0)
            return vm;
    return NULL;
}

int
vm_lookup(struct daemon *d, const char *key, struct vm **out)
{
    *out = vm_find(d, key);
    char q[VR_QNAME_MAX];
    return *out ? 0 : vr_err(-ENOENT, "vm %s: not found", vr_qname(key, q));
}

bool
vm_is_kept_copy(const struct vm *vm)
{
    return vm->mode == VM_MODE_REPLICA && !vm->repl;
}

int
vm_kept_copy_err(const struct vm *vm, const char *what)
{
    const char *owner = vm->owner ? vm->owner : "its primary";
    return vr_err(-EINVAL, "vm '%s': %s does not apply: it is a kept "
                  "Replica copy (its replication from %s was removed; the "
                  "disks are kept). To replicate it again, run on %s "
                  "'vmreplica replication enable %s …', then "
                  "'vmreplica initial-replication start %s --use-existing' "
                  "(only what differs is sent); to delete it here, "
                  "'vmreplica vm remove %s'", vm->name, what, owner, owner,
                  vm->name, vm->name, vm->name);
}

void
repl_free(struct repl *r)
{
    if (!r)
        return;
    free(r->replica_server);
    free(r->connect_address);
    free(r->primary_server);
    free(r->storage);
    free(r->last_error);
    free(r->trust_group);
    free(r->auth);
    free(r->initial_export);
    free(r->task);
    free(r->resync_window);
    free(r);
}

void
vm_free(struct vm *vm)
{
    if (!vm)
        return;
    for (unsigned i = 0; i < vm->ndisks; i++)
        free(vm->disks[i].path);
    repl_free(vm->repl);
    free(vm->name);
    free(vm->dir);
    free(vm->kernel);
    free(vm->initrd);
    free(vm->cmdline);
    json_object_put(vm->nics);
    free(vm->test_network);
    free(vm->owner);
    free(vm->owner_group);
    free(vm->libvirt_domain);
    free(vm);
}

char *
vm_rundir(const struct daemon *d, const struct vm *vm)
{
    return xasprintf("%s/run/%s", d->state_dir, vm->uuid);
}

int
vm_boot_parse(json_object *b, char *out[3])
{
    static const char *keys[3] = { "kernel", "initrd", "cmdline" };
    out[0] = out[1] = out[2] = NULL;
    for (int k = 0; k < 3; k++) {
        const char *v = jstr(b, keys[k]);
        if (!v || !*v)
            continue;
        size_t len = strlen(v);
        bool ok = len < 4096;
        for (size_t i = 0; ok && i < len; i++)
            ok = v[i] >= 0x20 && v[i] < 0x7f;
        if (ok && k < 2) {
            struct stat st;
            ok = v[0] == '/' && stat(v, &st) == 0 && S_ISREG(st.st_mode);
        }
        if (!ok) {
            for (int j = 0; j < k; j++)
                free(out[j]);
            return vr_err(-EINVAL, "%s: %s", keys[k],
                          k < 2 ? "expected the absolute path of a file"
                                : "expected printable text (< 4 KiB)");
        }
        out[k] = xstrdup(v);
    }
    if (!out[0] && (out[1] || out[2])) {
        free(out[1]);
        free(out[2]);
        return vr_err(-EINVAL, "initrd and cmdline need a kernel");
    }
    return 0;
}

void
daemon_wait_ms(struct daemon *d, uint64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(&d->cond, &d->lock, &ts);
}

/* --- JSON getters ------------------------------------------------------- */

const char *
jstr(json_object *o, const char *key)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) ||
        !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

bool
jbool(json_object *o, const char *key, bool dflt)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || !v)
        return dflt;
    return json_object_get_boolean(v);
}

int64_t
jint(json_object *o, const char *key, int64_t dflt)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || !v)
        return dflt;
    return json_object_get_int64(v);
}

/* --- replications -------------------------------------------------------- */

const char *
repl_state(const struct repl *r)
{
    /* SPEC §9: a Replica VM with a test failover shows it; replication
     * into it goes on (the applier goes by r->st). */
    if (r->mode == VM_MODE_REPLICA && r->test_point &&
        r->st == REPL_ST_REPLICATING)
        return "TestFailoverInProgress";
    return repl_st_name(r->st);
}

uint64_t
repl_first_point(const struct repl *r)
{
    return r->first_point > r->base_cycle ? r->first_point
                                          : r->base_cycle + 1;
}

const char *
repl_health(const struct repl *r, json_object *details)
{
    const char *h = "Normal";
#define ADD(level, msg)                                                        \
    do {                                                                       \
        if (details)                                                           \
            json_object_array_add(details, json_object_new_string(msg));       \
        if (strcmp(level, "Critical") == 0 || strcmp(h, "Normal") == 0)        \
            h = level;                                                         \
    } while (0)
    if (r->st == REPL_ST_ERROR) {
        char buf[1200];
        snprintf(buf, sizeof buf, "replication stopped by an error: %s",
                 r->last_error ? r->last_error : "unknown");
        ADD("Critical", buf);
    }
    if (r->untracked) {
        char buf[1200];
        snprintf(buf, sizeof buf, "change tracking stopped: %s",
                 r->last_error ? r->last_error : "unknown");
        ADD("Critical", buf);
    }
    if (r->hold_from) {
        char buf[300];
        snprintf(buf, sizeof buf, "resynchronizing: the Replica VM stays at "
                 "cycle %llu until the new cut is received whole",
                 (unsigned long long)r->hold_from - 1);
        ADD("Warning", buf);
    }
    if (r->st == REPL_ST_RESYNC)
        ADD("Warning", "resynchronizing");
    if (r->st == REPL_ST_WAIT_RESYNC) {
        char buf[200];
        if (r->resync_at) {
            char when[64];
            struct tm tm;
            time_t t = (time_t)r->resync_at;
            localtime_r(&t, &tm);
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S %z", &tm);
            snprintf(buf, sizeof buf, "resynchronization required: "
                     "scheduled for %s", when);
        } else {
            snprintf(buf, sizeof buf, "resynchronization required: it "
                     "waits for its window %s",
                     r->resync_window ? r->resync_window : "");
        }
        ADD("Critical", buf);
    }
    if (r->st == REPL_ST_RESYNC_SUSPENDED)
        ADD("Warning", "resynchronization suspended");
    if (r->st == REPL_ST_SUSPENDED)
        ADD(r->mode == VM_MODE_REPLICA ? "Critical" : "Warning",
            "replication is suspended");
    if (!r->initial_done)
        ADD("Warning", "initial replication has not completed");
    if (r->initial_at_ms && r->st == REPL_ST_READY_INITIAL) {
        char buf[100], ts[32];
        vr_rfc3339(r->initial_at_ms, ts);
        snprintf(buf, sizeof buf, "initial replication is scheduled for %s",
                 ts);
        ADD("Warning", buf);
    }
    /* Cycles sealed while the base copy read the disk are applied, but
     * the Replica VM equals the primary only from the first cycle sealed
     * after the copy: until that one is applied there is no recovery
     * point.  (Not after a failover: base_cycle is then the VM's own.) */
    uint64_t reached = r->mode == VM_MODE_REPLICA ? r->applied_cycle
                                                  : r->last_cycle;
    if (r->initial_done && reached < repl_first_point(r) &&
        (r->st == REPL_ST_REPLICATING ||
         r->st == REPL_ST_SUSPENDED)) {
        char buf[200];
        snprintf(buf, sizeof buf, "no recovery point yet: the Replica VM is "
                 "consistent from cycle %llu on (%s: %llu)",
                 (unsigned long long)repl_first_point(r),
                 r->mode == VM_MODE_REPLICA ? "applied" : "acknowledged",
                 (unsigned long long)reached);
        ADD("Warning", buf);
    }
    uint64_t now = vr_wall_ms();
    if (r->initial_done && r->last_ok_ms && now > r->last_ok_ms + 3600000)
        ADD("Warning", "more than an hour since the last successful cycle");
    if (r->mode == VM_MODE_PRIMARY && r->st == REPL_ST_REPLICATING &&
        r->missed_run) {
        char buf[1300], when[32] = "never";
        if (r->last_ok_ms)
            vr_rfc3339(r->last_ok_ms, when);
        snprintf(buf, sizeof buf, "%llu cycle(s) missed since the last "
                 "successful one (%s)%s%s",
                 (unsigned long long)r->missed_run, when,
                 r->errors && r->last_error ? "; last error: " : "",
                 r->errors && r->last_error ? r->last_error : "");
        ADD("Warning", buf);
    }
    uint64_t total = r->ok_count + r->missed;
    if (total >= 5 && r->missed * 5 > total)
        ADD("Warning", "more than 20% of cycles were missed");
    if (r->errors && r->last_error && r->st != REPL_ST_ERROR &&
        strcmp(h, "Normal") == 0 && r->last_ok_ms + 60000 < now) {
        char buf[1200];
        snprintf(buf, sizeof buf, "replication is retrying: %s",
                 r->last_error);
        ADD("Warning", buf);
    }
#undef ADD
    return h;
}

/* "fqdn[:port]" with a sane host name and port. */
bool
repl_server_name_valid(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 260)
        return false;
    const char *colon = strrchr(s, ':');
    size_t hl = colon ? (size_t)(colon - s) : n;
    if (hl == 0 || hl > 253)
        return false;
    for (size_t i = 0; i < hl; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '-'))
            return false;
    }
    if (colon) {
        char *end;
        long p = strtol(colon + 1, &end, 10);
        if (*end || p < 1 || p > 65535)
            return false;
    }
    return true;
}

const char *
repl_auth(const struct repl *r)
{
    return r->auth ? r->auth : "certificate";
}

int
repl_auth_check(const char *auth)
{
    if (strcmp(auth, "certificate") != 0 && strcmp(auth, "kerberos") != 0)
        return vr_err(-EINVAL, "auth %s: expected certificate or kerberos",
                      auth);
    return 0;
}

bool
repl_kerberos(const struct repl *r)
{
    return r->auth && strcmp(r->auth, "kerberos") == 0;
}

char *
repl_server_with_port(const char *server, const struct repl *r)
{
    if (strchr(server, ':'))
        return xstrdup(server);
    return xasprintf("%s:%u", server, repl_kerberos(r) ? 80 : 443);
}

int
repl_check_identity(const struct server_cfg *c, const struct repl *r)
{
    if (repl_kerberos(r)) {
        if (!c->keytab || !c->hostname)
            return vr_err(-EINVAL, "this host has no keytab or host name: "
                          "run 'vmreplica server set --keytab F --hostname "
                          "FQDN' first (the keytab holds host/FQDN)");
        return 0;
    }
    if (!c->cert || !c->key || !c->ca)
        return vr_err(-EINVAL, "this host has no certificate: run "
                      "'vmreplica server set --certificate F --key F --ca F' "
                      "first");
    return 0;
}

json_object *
repl_register_body(const struct vm *vm, const struct repl *r)
{
    json_object *reg = json_object_new_object();
    json_object_object_add(reg, "name", json_object_new_string(vm->name));
    json_object_object_add(reg, "cpus", json_object_new_int((int)vm->cpus));
    json_object_object_add(reg, "memory_mib",
                           json_object_new_int((int)vm->memory_mib));
    json_object_object_add(reg, "frequency",
                           json_object_new_int((int)r->frequency_s));
    json_object_object_add(reg, "compression",
                           json_object_new_boolean(r->compression));
    json_object *disks = json_object_new_array();
    for (unsigned i = 0; i < vm->ndisks; i++) {
        json_object *d = json_object_new_object();
        json_object_object_add(d, "id",
                               json_object_new_string(vm->disks[i].id));
        json_object_object_add(
            d, "size", json_object_new_int64((int64_t)vm->disks[i].size));
        json_object_array_add(disks, d);
    }
    json_object_object_add(reg, "disks", disks);
    if (vm->nics)
        json_object_object_add(reg, "nics", json_tokener_parse(
            json_object_to_json_string(vm->nics)));
    return reg;
}

void
json_add_time(json_object *o, const char *key, uint64_t ms)
{
    if (!ms) {
        json_object_object_add(o, key, NULL);
        return;
    }
    char ts[32];
    vr_rfc3339(ms, ts);
    json_object_object_add(o, key, json_object_new_string(ts));
}

json_object *
repl_to_json(const struct vm *vm, const char *hostname)
{
    const struct repl *r = vm->repl;
    json_object *o = json_object_new_object();
    json_object *details = json_object_new_array();
    const char *health = repl_health(r, details);
    json_object_object_add(o, "vm", json_object_new_string(vm->name));
    json_object_object_add(o, "uuid", json_object_new_string(vm->uuid));
    json_object_object_add(o, "mode",
                           json_object_new_string(vm_mode_name(r->mode)));
    json_object_object_add(o, "state", json_object_new_string(repl_state(r)));
    json_object_object_add(o, "health", json_object_new_string(health));
    json_object_object_add(o, "health_details", details);
#define STR(k, v)                                                              \
    json_object_object_add(o, k, (v) ? json_object_new_string(v) : NULL)
    STR("replica_server", r->replica_server);
    STR("connect_address", r->connect_address);
    STR("primary_server",
        r->mode == VM_MODE_PRIMARY ? hostname : r->primary_server);
    STR("storage", r->storage);
    STR("last_error", r->last_error);
#undef STR
    json_object_object_add(o, "auth",
                           json_object_new_string(repl_auth(r)));
    json_object_object_add(o, "kerberos_encrypt",
                           json_object_new_boolean(r->krb_encrypt));
    json_object_object_add(o, "frequency",
                           json_object_new_int((int)r->frequency_s));
    json_object_object_add(o, "compression",
                           json_object_new_boolean(r->compression));
    if (r->mode == VM_MODE_REPLICA) {
        json_object_object_add(o, "test_failover_point",
                               r->test_point ? json_object_new_int64(
                                                   (int64_t)r->test_point)
                                             : NULL);
        json_object_object_add(o, "failover_point",
                               r->failover_point
                                   ? json_object_new_int64(
                                         (int64_t)r->failover_point)
                                   : NULL);
    }
    json_object_object_add(o, "prepared_cycle",
                           r->prepared_cycle
                               ? json_object_new_int64(
                                     (int64_t)r->prepared_cycle)
                               : NULL);
    json_object_object_add(o, "recovery_history",
                           json_object_new_int((int)r->recovery_history));
    json_object_object_add(o, "app_consistent_every",
                           json_object_new_int((int)r->app_every));
    json_object_object_add(o, "point_interval",
                           json_object_new_int((int)r->point_interval_s));
    json_object_object_add(o, "log_budget",
                           json_object_new_int64((int64_t)r->log_budget));
    json_object_object_add(o, "auto_resync",
                           json_object_new_boolean(!r->auto_resync_off));
    json_object_object_add(o, "resync_window",
                           r->resync_window
                               ? json_object_new_string(r->resync_window)
                               : NULL);
    json_object_object_add(o, "resync_at",
                           json_object_new_int64(r->resync_at));
    json_object_object_add(o, "epoch",
                           json_object_new_int64((int64_t)r->epoch));
    json_object_object_add(o, "initial_done",
                           json_object_new_boolean(r->initial_done));
    json_object_object_add(o, "base_cycle",
                           json_object_new_int64((int64_t)r->base_cycle));
    json_add_time(o, "initial_replication_scheduled", r->initial_at_ms);
    json_object_object_add(o, "first_point",
                           r->initial_done
                               ? json_object_new_int64(
                                     (int64_t)repl_first_point(r))
                               : NULL);
    json_object_object_add(o, "last_cycle",
                           json_object_new_int64((int64_t)r->last_cycle));
    json_object_object_add(
        o, "applied_cycle",
        json_object_new_int64((int64_t)(r->mode == VM_MODE_REPLICA
                                            ? r->applied_cycle
                                            : r->last_cycle)));
    json_add_time(o, "last_replication_time", r->last_ok_ms);
    return o;
}
