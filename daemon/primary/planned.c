/* planned.c: planned failover and reverse replication (SPEC §8).
 *
 * On the primary, `failover prepare VM` (the VM shut down) stops serving
 * the disks, which seals their last writes into a cycle, ships every
 * remaining cycle, then tells the Replica server "my disks are cycle N"
 * (POST /r1/vms/UUID/prepared) and enters PreparedForFailover: the VM no
 * longer starts here.  `failover stop VM` on the primary withdraws the
 * preparation (the Replica server forgets N) and replication resumes.
 *
 * On the Replica server, `failover start VM` for a prepared VM is the
 * planned failover: once cycle N is applied, the recovery points and
 * staged cycles go, the epoch is bumped and the VM starts from its own
 * Replica disks, served by the plugin, so every write from its first one
 * on is tracked (state FailedOver).  No point can be chosen: the disks are
 * exactly the primary's.
 *
 * `replication reverse VM` on that server makes it the primary and the old
 * primary its Replica server with a new epoch and no resynchronization:
 * the registration carries "reverse_of": N, the old primary accepts it only
 * if it is prepared at that very cycle, keeps its disks (they are cycle N)
 * and becomes a Replica VM; then "initial replication" has nothing to copy
 * and completes at the base cycle of the new primary's change log, from
 * which its cycles follow.  Fail-back is the same procedure the other way.
 * After an unplanned failover the registration carries "reverse_unplanned"
 * instead: the old primary (its disks not served) keeps its disks, and the
 * initial replication is a comparison that sends only the chunks that
 * differ — its unshipped writes, what the failover rolled back, and what
 * this server wrote since — not the whole disk.
 *
 * Crash safety: prepare records PreparedForFailover before it tells the
 * Replica server, and `failover prepare` again tells it again (a crash
 * before leaves the VM Replicating, its disks unserved); a planned start
 * is one catalog save, then a VM start that can be repeated; reverse is a
 * registration the old primary accepts again from the same peer and
 * epoch, then one transaction here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shipper-int.h"
#include "proc/vmproc.h"

#define PREPARE_SHIP_MS 60000 /* at least: the remaining cycles' shipping */

/* --- the primary ---------------------------------------------------------- */

/* d->lock held: vm is a primary VM whose replication runs. */
static int
lookup_primary(const char *key, struct vm **out)
{
    struct vm *vm;
    int rc = vm_lookup(pctx.d, key, &vm);
    if (rc < 0)
        return rc;
    if (vm->mode != VM_MODE_PRIMARY || !vm->repl ||
        vm->repl->mode != VM_MODE_PRIMARY)
        return vr_err(-EINVAL, "vm %s: not a primary VM on this server "
                      "(failover prepare runs on the primary server)",
                      vm->name);
    *out = vm;
    return 0;
}

/* Tell the Replica server the prepared cycle (0: withdrawn).  d->lock
 * held; dropped for the call. */
static int
send_prepared(struct vm *vm, uint64_t cycle)
{
    struct job jb;
    job_fill(&jb, vm);
    pthread_mutex_unlock(&pctx.d->lock);
    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s/prepared", jb.uuid);
    CLEANUP_FREE char *body =
        xasprintf("{\"cycle\": %llu}", (unsigned long long)cycle);
    int rc = peer_call(&jb.peer, "POST", path, body, -1, 0, false, NULL);
    job_fini(&jb);
    pthread_mutex_lock(&pctx.d->lock);
    return rc;
}

int
planned_prepare(const char *key, json_object **out)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct vm *vm = NULL;
    int rc = lookup_primary(key, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    CLEANUP_FREE char *rundir = rc == 0 ? vm_rundir(pctx.d, vm) : NULL;
    if (rc == 0 && r->st == REPL_ST_PREPARED && !vm_busy(vm, VM_OP_PREPARE)) {
        /* Asked again: tell the Replica server again (a crash may have
         * come between recording the state and telling it). */
        vm_op_begin(vm, VM_OP_PREPARE);
        rc = send_prepared(vm, r->prepared_cycle);
        vm_op_end(vm, VM_OP_PREPARE);
        if (rc == 0)
            *out = repl_to_json(vm, pctx.d->cfg.hostname);
        pthread_mutex_unlock(&pctx.d->lock);
        return rc;
    }
    if (rc == 0 && r->st != REPL_ST_REPLICATING)
        rc = vr_err(-EBUSY,
                    "vm %s: replication is %s; it must be "
                    "Replicating to prepare a failover",
                    vm->name, repl_st_name(r->st));
    if (rc == 0 && (vm_busy(vm, VM_OP_CHANGE | VM_OP_PREPARE | VM_OP_REMOVE)))
        rc = vr_err(-EBUSY, "vm %s: a start, stop or other change is in "
                    "progress; try again", vm->name);
    if (rc == 0) {
        bool served, running;
        vmproc_status(rundir, &served, &running);
        if (running)
            rc = vr_err(-EBUSY, "vm %s: is running; shut it down first "
                        "('vmreplica vm stop %s')", vm->name, vm->name);
    }
    if (rc < 0) {
        pthread_mutex_unlock(&pctx.d->lock);
        return rc;
    }
    /* No start, stop or write from here on: the disks stop being served,
     * which seals their last writes into a cycle of their own. */
    vm_op_begin(vm, VM_OP_PREPARE);
    vm_op_begin(vm, VM_OP_CHANGE);
    pthread_mutex_unlock(&pctx.d->lock);
    rc = vmproc_stop(rundir, true, 0);
    pthread_mutex_lock(&pctx.d->lock);
    if (rc == 0)
        vr_fault_point("prepare-stopped");

    /* Ship everything: wake the shipper until nothing is pending. */
    uint64_t limit = (uint64_t)r->frequency_s * 3000;
    uint64_t deadline = vr_mono_ms() + (limit > PREPARE_SHIP_MS
                                            ? limit : PREPARE_SHIP_MS);
    while (rc == 0) {
        if (r->st != REPL_ST_REPLICATING) {
            rc = vr_err(-EIO, "vm %s: replication stopped while preparing: "
                        "%s", vm->name, r->last_error ? r->last_error
                                                      : repl_st_name(r->st));
            break;
        }
        /* An empty sealed cycle has nothing pending but is still sent:
         * wait for it too, or the cycle declared below would be one fewer
         * than the Replica server gets. */
        unsigned unsent = 0;
        if (shipper_pending_bytes(vm, &unsent) == 0 && unsent == 0)
            break;
        if (vr_mono_ms() >= deadline) {
            rc = vr_err(-ETIMEDOUT, "vm %s: the last changes were not "
                        "shipped in time (last error: %s); try again",
                        vm->name, r->last_error ? r->last_error : "none");
            break;
        }
        r->kick = true;
        pthread_cond_broadcast(&pctx.d->cond);
        daemon_wait_ms(pctx.d, 100);
    }
    /* Recorded before the Replica server is told, so that after a crash
     * in between the VM cannot start here while the Replica server may
     * already fail over; `failover prepare` again tells it again. */
    uint64_t n = r->last_cycle;
    if (rc == 0) {
        vr_fault_point("prepare-shipped");
        r->prepared_cycle = n;
        rc = repl_transition(pctx.d->cat, vm, REPL_ST_PREPARED, REPL_T_SAVE);
        if (rc == 0)
            vr_fault_point("prepare-saved");
        /* If the Replica server does not answer, it may still have
         * recorded N: the VM stays prepared (it does not start here) until
         * `failover prepare` tells it again or `failover stop` undoes
         * both sides. */
        if (rc == 0 && (rc = send_prepared(vm, n)) < 0)
            rc = vr_err(rc, "vm %s: prepared here, but the Replica server "
                        "was not told (%s); run 'vmreplica failover prepare "
                        "%s' again, or 'vmreplica failover stop %s' to undo",
                        vm->name, vr_errmsg(), vm->name, vm->name);
    }
    if (rc == 0) {
        event_add(pctx.d->cat, "info", vm->name,
                  "prepared for failover: every change is "
                  "on %s (cycle %llu); the VM does not start here until the "
                  "failover is undone ('vmreplica failover stop %s')",
                  r->replica_server, (unsigned long long)n, vm->name);
        *out = repl_to_json(vm, pctx.d->cfg.hostname);
    }
    vm_op_end(vm, VM_OP_PREPARE);
    vm_op_end(vm, VM_OP_CHANGE);
    pthread_cond_broadcast(&pctx.d->cond);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

bool
planned_is_prepared(const char *key)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct vm *pvm = vm_find(pctx.d, key);
    bool prepared = pvm && pvm->mode == VM_MODE_PRIMARY && pvm->repl &&
                    pvm->repl->st == REPL_ST_PREPARED;
    pthread_mutex_unlock(&pctx.d->lock);
    return prepared;
}

int
planned_unprepare(const char *key, json_object **out)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct vm *vm = NULL;
    int rc = lookup_primary(key, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && r->st != REPL_ST_PREPARED)
        rc = vr_err(-ENOENT, "vm %s: not prepared for failover (state %s)",
                    vm->name, repl_st_name(r->st));
    if (rc == 0 && (vm_busy(vm, VM_OP_CHANGE | VM_OP_PREPARE)))
        rc = vr_err(-EBUSY, "vm %s: a change is in progress; try again",
                    vm->name);
    if (rc == 0) {
        vm_op_begin(vm, VM_OP_CHANGE);
        rc = send_prepared(vm, 0);
        vm_op_end(vm, VM_OP_CHANGE);
        if (rc == -ESTALE)
            rc = vr_err(rc, "vm %s: the Replica server has already failed "
                        "over (%s); the VM runs there now", vm->name,
                        vr_errmsg());
    }
    if (rc == 0) {
        r->prepared_cycle = 0;
        r->kick = true;
        rc = repl_transition(pctx.d->cat, vm, REPL_ST_REPLICATING, REPL_T_SAVE);
    }
    if (rc == 0) {
        event_add(pctx.d->cat, "info", vm->name,
                  "failover preparation withdrawn; "
                  "replication resumes");
        *out = repl_to_json(vm, pctx.d->cfg.hostname);
    }
    pthread_cond_broadcast(&pctx.d->cond);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

/* --- reverse replication -------------------------------------------------- */

int
planned_reverse(const char *key, const char *server, const char *addr,
                json_object **out)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct vm *vm;
    int rc = vm_lookup(pctx.d, key, &vm);
    struct repl *r = vm ? vm->repl : NULL;
    if (rc == 0 && vm_is_kept_copy(vm))
        rc = vm_kept_copy_err(vm, "replication reverse");
    else if (rc == 0 && vm->mode == VM_MODE_PRIMARY && r && r->replica_server)
        rc = vr_err(-EINVAL, "vm %s is a primary VM here: 'replication "
                    "reverse' runs on the server it failed over to (%s), "
                    "after 'vmreplica failover start %s' there", vm->name,
                    r->replica_server, vm->name);
    else if (rc == 0 && (vm->mode != VM_MODE_REPLICA || !r ||
                         r->st != REPL_ST_FAILED_OVER))
        rc = vr_err(-EINVAL, "vm %s: not a failed-over Replica VM (run "
                    "'vmreplica failover start %s' on this server first)",
                    vm->name, vm->name);
    else if (rc == 0 && vm_busy(vm, VM_OP_CHANGE | VM_OP_FAILOVER))
        rc = vr_err(-EBUSY, "vm %s: a change is in progress; try again",
                    vm->name);
    else if (rc == 0 && !server && !r->replica_server)
        rc = vr_err(-EINVAL, "vm %s: where the old primary %s listens is "
                    "not known here: give --replica-server FQDN[:PORT]",
                    vm->name, r->primary_server);
    if (rc == 0)
        rc = repl_check_identity(&pctx.d->cfg, r);
    if (rc < 0) {
        pthread_mutex_unlock(&pctx.d->lock);
        return rc;
    }
    struct repl *nr = xcalloc(1, sizeof *nr);
    snprintf(nr->vm_uuid, sizeof nr->vm_uuid, "%s", vm->uuid);
    nr->mode = VM_MODE_PRIMARY;
    /* Back the way the primary came: its authentication (recorded when it
     * registered) and, with Kerberos, its choice of encryption. */
    nr->auth = r->auth ? xstrdup(r->auth) : NULL;
    nr->krb_encrypt = r->krb_encrypt;
    nr->replica_server = server ? repl_server_with_port(server, nr)
                                : xstrdup(r->replica_server);
    nr->connect_address = addr ? (*addr ? xstrdup(addr) : NULL)
                               : r->connect_address
                                     ? xstrdup(r->connect_address)
                                     : NULL;
    nr->frequency_s = r->frequency_s ? r->frequency_s : 300;
    nr->compression = r->compression;
    nr->recovery_history = r->recovery_history;
    nr->app_every = r->app_every;
    nr->point_interval_s = r->point_interval_s ? r->point_interval_s : 3600;
    nr->epoch = r->epoch + 1;
    uint64_t prepared = r->prepared_cycle;
    if (prepared) {
        /* Both sides hold cycle prepared_cycle: "initial replication"
         * has nothing to copy and completes at the base of our change
         * log. */
        nr->base_cycle = nr->last_cycle = r->base_cycle;
        nr->initial_seq = 1;
        nr->initial_disk = vm->ndisks;
    } else {
        /* After an unplanned failover the old primary's disks are ours
         * at the point, but for what it wrote and never shipped, what
         * the failover rolled back, and what we wrote since: an initial
         * replication by comparison (initial.c) sends exactly the chunks
         * that differ, from a base it takes as any initial replication
         * does. */
        nr->initial_method = INITIAL_COMPARE;
    }
    nr->st = REPL_ST_INITIAL;
    nr->task = xstrdup("InitialReplication");
    /* The old primary's name stays, for a fail-back's default. */
    nr->primary_server = r->primary_server ? xstrdup(r->primary_server)
                                           : NULL;
    json_object *reg = repl_register_body(vm, nr);
    if (prepared)
        json_object_object_add(reg, "reverse_of",
                               json_object_new_int64((int64_t)prepared));
    else
        json_object_object_add(reg, "reverse_unplanned",
                               json_object_new_boolean(1));
    struct job jb;
    struct repl *saved = vm->repl;
    vm->repl = nr;
    job_fill(&jb, vm);
    vm->repl = saved;
    vm_op_begin(vm, VM_OP_CHANGE);
    pthread_mutex_unlock(&pctx.d->lock);

    vr_fault_point("reverse-registering");
    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s", jb.uuid);
    rc = peer_call(&jb.peer, "PUT", path, json_object_to_json_string(reg), -1,
                   0, false, NULL);
    json_object_put(reg);
    job_fini(&jb);
    if (rc == 0)
        vr_fault_point("reverse-registered");

    pthread_mutex_lock(&pctx.d->lock);
    vm_op_end(vm, VM_OP_CHANGE);
    if (rc == 0) {
        rc = catalog_begin(pctx.d->cat);
        if (rc == 0) {
            vm->mode = VM_MODE_PRIMARY;
            rc = catalog_save_vm(pctx.d->cat, vm);
            if (rc == 0)
                rc = catalog_save_repl(pctx.d->cat, nr);
            rc = catalog_end(pctx.d->cat, rc);
            if (rc < 0)
                vm->mode = VM_MODE_REPLICA;
        }
    }
    if (rc == 0) {
        vm->repl = nr;
        repl_free(r);
        if (prepared)
            event_add(pctx.d->cat, "info", vm->name,
                      "replication reversed: this server is the primary "
                      "now, replicating to %s (epoch %llu) with no "
                      "resynchronization",
                      nr->replica_server, (unsigned long long)nr->epoch);
        else
            event_add(pctx.d->cat, "info", vm->name,
                      "replication reversed after an unplanned failover: "
                      "this server is the primary now, replicating to %s "
                      "(epoch %llu); its disks are compared with the old "
                      "primary's and only the chunks that differ are sent",
                      nr->replica_server, (unsigned long long)nr->epoch);
        shipper_ensure(vm);
        *out = repl_to_json(vm, pctx.d->cfg.hostname);
    } else {
        repl_free(nr);
    }
    pthread_cond_broadcast(&pctx.d->cond);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}
