/* planned.c (Replica server): the planned failover of a VM its primary
 * prepared (SPEC §8; the primary's half is primary/planned.c).  Once the
 * prepared cycle N is applied, the recovery points and staged cycles go,
 * the epoch is bumped and the VM starts from its own Replica disks,
 * served by the plugin, so every write from its first one on is tracked
 * (state FailedOver).  No point can be chosen: the disks are exactly the
 * primary's.  Crash safety: one catalog save, then a VM start that can be
 * repeated. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "replica-int.h"
#include "core/logdir.h"
#include "proc/vmproc.h"
#include "proc/vmspec.h"

#define PLANNED_APPLY_MS 60000 /* the prepared cycle's apply */

int
failover_planned_start(const char *key, bool start_vm, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = vm_find(rctx.d, key);
    struct repl *r = vm ? vm->repl : NULL;
    int rc = 0;
    if (!vm || vm->mode != VM_MODE_REPLICA || !r || !r->prepared_cycle)
        rc = vr_err(-EINVAL, "vm %s: not prepared for a planned failover",
                    key);
    else if (r->test_point || vm_busy(vm, VM_OP_TEST) || r->failover_point ||
             vm_busy(vm, VM_OP_FAILOVER | VM_OP_CHANGE))
        rc = vr_err(-EBUSY, "vm %s: a test failover or another failover "
                    "step is running", vm->name);
    else if (r->st != REPL_ST_REPLICATING)
        rc = vr_err(-EBUSY, "vm %s: replication is %s", vm->name,
                    repl_st_name(r->st));
    if (rc < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    /* VM_OP_FAILOVER keeps removes, other failovers and the primary's
     * requests (own_vm) away while we wait with the lock dropped. */
    vm_op_begin(vm, VM_OP_FAILOVER);
    /* The prepared cycle may still be being applied. */
    uint64_t deadline = vr_mono_ms() + PLANNED_APPLY_MS;
    while (r->prepared_cycle && r->applied_cycle < r->prepared_cycle &&
           vr_mono_ms() < deadline && r->st == REPL_ST_REPLICATING)
        daemon_wait_ms(rctx.d, 100);
    while (vm_busy(vm, VM_OP_APPLY))
        pthread_cond_wait(&rctx.d->cond, &rctx.d->lock);
    uint64_t n = r->prepared_cycle;
    if (!n)
        rc = vr_err(-EINVAL, "vm %s: the primary withdrew its failover "
                    "preparation", vm->name);
    else if (r->applied_cycle != n)
        rc = vr_err(-EBUSY, "vm %s: the prepared cycle %llu is not applied "
                    "(applied: %llu); try again", vm->name,
                    (unsigned long long)n,
                    (unsigned long long)r->applied_cycle);
    if (rc < 0) {
        vm_op_end(vm, VM_OP_FAILOVER);
        pthread_cond_broadcast(&rctx.d->cond);
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }

    /* Points and staged cycles go; every later write is in a cycle of
     * the VM's own change log after `base`. */
    uint64_t base = 0;
    rc = history_reset(vm);
    if (rc == 0)
        rc = logdir_base(&vm->disks[0], &base);
    if (rc == 0) {
        vr_fault_point("planned-start-reset");
        CLEANUP_FREE char *stg = xasprintf("%s/staging", r->storage);
        int n_rm = storage_clear_dir(r->storage, stg);
        if (n_rm < 0)
            rc = n_rm;
    }
    if (rc == 0) {
        struct repl old = *r;
        r->base_cycle = base;
        r->last_cycle = r->applied_cycle = n;
        r->epoch++;
        rc = repl_transition(rctx.d->cat, vm, REPL_ST_FAILED_OVER, REPL_T_SAVE);
        if (rc < 0) { /* as it was: the catalog is the truth */
            r->base_cycle = old.base_cycle;
            r->last_cycle = old.last_cycle;
            r->applied_cycle = old.applied_cycle;
            r->epoch = old.epoch;
            r->st = old.st; /* a rollback, not a transition */
        }
    }
    if (rc == 0) {
        vr_fault_point("planned-start-saved");
        event_add(rctx.d->cat, "info", vm->name,
                  "planned failover: the VM's disks are "
                  "the primary's at cycle %llu (no data lost); epoch %llu",
                  (unsigned long long)n, (unsigned long long)r->epoch);
    }
    if (rc == 0 && start_vm) {
        vm_op_begin(vm, VM_OP_CHANGE);
        vm->hypervisor = true;
        CLEANUP_FREE char *rundir = vm_rundir(rctx.d, vm);
        struct vmproc_spec s;
        struct vmproc_disk dks[MAX_DISKS];
        vm_spec_of(vm, &s, dks, rundir);
        pthread_mutex_unlock(&rctx.d->lock);
        rc = storage_check_disks(vm);
        if (rc == 0)
            rc = vmproc_start(&s);
        pthread_mutex_lock(&rctx.d->lock);
        vm_op_end(vm, VM_OP_CHANGE);
        if (rc < 0)
            rc = vr_err(rc, "vm %s: failed over, but it did not start: %s "
                        "(try 'vmreplica vm start %s')", vm->name,
                        vr_errmsg(), vm->name);
        else {
            event_add(rctx.d->cat, "info", vm->name, "vm started (qemu)");
            network_inject_start(rctx.d, vm, rundir);
        }
    }
    if (rc == 0) {
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "planned", json_object_new_boolean(1));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)n));
        json_object_object_add(*out, "state",
                               json_object_new_string(repl_st_name(r->st)));
        json_object_object_add(*out, "epoch",
                               json_object_new_int64((int64_t)r->epoch));
        /* For the hint: does `replication reverse` need --replica-server? */
        json_object_object_add(
            *out, "reverse_replica_server",
            r->replica_server ? json_object_new_string(r->replica_server)
                              : NULL);
        json_object_object_add(
            *out, "old_primary",
            r->primary_server ? json_object_new_string(r->primary_server)
                              : NULL);
    }
    vm_op_end(vm, VM_OP_FAILOVER);
    pthread_cond_broadcast(&rctx.d->cond);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

