/* enable.c: the primary's side of enabling and removing a replication:
 * registering the VM with the Replica server (PUT /r1/vms/UUID) before the
 * relationship is recorded, and telling it (DELETE .../replication, best
 * effort) when the relationship goes.  The endpoints that parse and answer
 * are the API's (replication.c). */
#include <stdio.h>
#include <stdlib.h>

#include "shipper-int.h"

int
primary_enable(const char *key, struct repl *r, bool start_initial,
               json_object **out)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct vm *vm = NULL;
    int rc = vm_lookup(pctx.d, key, &vm);
    if (rc == 0 && vm->repl)
        rc = vr_err(-EEXIST, "vm %s: replication is already enabled (%s)",
                    vm->name, vm_mode_name(vm->repl->mode));
    if (rc == 0 && vm->mode == VM_MODE_REPLICA)
        rc = vr_err(-EBUSY, "vm %s: is a Replica VM", vm->name);
    if (rc == 0)
        rc = repl_check_identity(&pctx.d->cfg, r);
    struct job jb;
    json_object *reg = NULL;
    if (rc == 0) {
        snprintf(r->vm_uuid, sizeof r->vm_uuid, "%s", vm->uuid);
        struct repl *saved = vm->repl;
        vm->repl = r;
        job_fill(&jb, vm);
        vm->repl = saved;
        reg = repl_register_body(vm, r);
    }
    pthread_mutex_unlock(&pctx.d->lock);
    if (rc < 0) {
        repl_free(r);
        return rc;
    }

    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s", jb.uuid);
    rc = peer_call(&jb.peer, "PUT", path, json_object_to_json_string(reg), -1,
                   0, false, NULL);
    json_object_put(reg);
    job_fini(&jb);

    pthread_mutex_lock(&pctx.d->lock);
    vm = rc == 0 ? vm_find_uuid(pctx.d, r->vm_uuid) : NULL;
    if (rc == 0 && (!vm || vm->repl))
        rc = vr_err(-EBUSY, "vm %s: changed while enabling replication",
                    key);
    if (rc == 0) {
        if (start_initial) {
            r->st = REPL_ST_INITIAL; /* not attached yet */
            r->task = xstrdup("InitialReplication");
        }
        vm->repl = r;
        vm->mode = VM_MODE_PRIMARY;
        rc = catalog_save_vm(pctx.d->cat, vm);
        if (rc == 0)
            rc = catalog_save_repl(pctx.d->cat, r);
        if (rc < 0) {
            vm->repl = NULL;
            vm->mode = VM_MODE_NONE;
        }
    }
    if (rc == 0) {
        event_add(pctx.d->cat, "info", vm->name,
                  "replication enabled to %s every %u s", r->replica_server,
                  r->frequency_s);
        shipper_ensure(vm);
        *out = repl_to_json(vm, pctx.d->cfg.hostname);
    } else {
        repl_free(r);
    }
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

int
primary_unregister(const char *key, struct vm **vmp)
{
    struct vm *vm = *vmp;
    int rc = 0;
    vm_op_begin(vm, VM_OP_REMOVE);
    shipper_stop(vm);
    struct job jb;
    job_fill(&jb, vm);
    char uuid[37];
    snprintf(uuid, sizeof uuid, "%s", vm->uuid);
    pthread_mutex_unlock(&pctx.d->lock);
    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s/replication", uuid);
    CLEANUP_FREE char *told = NULL;
    if (peer_call(&jb.peer, "DELETE", path, NULL, -1, 0, false, NULL) < 0)
        told = xstrdup(vr_errmsg());
    job_fini(&jb);
    pthread_mutex_lock(&pctx.d->lock);
    if (told)
        event_add(pctx.d->cat, "warning", key,
                  "the Replica server was not told of the removal (%s); "
                  "its Replica VM waits for cycles until 'vmreplica "
                  "replication remove %s' is run there",
                  told, key);
    vm = vm_find_uuid(pctx.d, uuid);
    if (!vm || !vm->repl)
        rc = vr_err(-ENOENT, "vm %s: gone", key);
    else
        shipper_stop(vm);
    *vmp = vm;
    return rc;
}
