/* failover.c: failover of Replica VMs (SPEC §8).  So far: test failover.
 *
 * `failover start VM --test [--point ID]` on the Replica server starts
 * "VM - Test": the plugin serves the Replica disks read-only as they were at
 * the point (a view: live disk plus undo spans, lib/undo.h), qcow2 overlays
 * in STORAGE/test make them writable, and QEMU boots from the overlays with
 * no network.  Replication into the Replica VM goes on: the point is kept
 * by the retention policy while the test lasts, and before each cycle is
 * applied the applier hands the view the cycle's undo span (REFRESH), so
 * the test VM never sees a later cycle.  `failover stop VM --test` stops
 * the test VM and removes its overlays.
 *
 * While a test starts or stops (r->test_busy) the applier leaves the VM
 * alone.  The test processes run in their own sessions, like every VM's,
 * and survive a daemon restart; r->test_point is in the catalog.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api-int.h"
#include "daemon.h"
#include "vmproc.h"

#define TEST_STOP_MS 5000

static char *
test_rundir(const struct repl *r)
{
    return xasprintf("%s/test", r->storage);
}

static char *
test_name(const struct vm *vm)
{
    return xasprintf("%s - Test", vm->name);
}

static void
remove_test_dir(const char *rd)
{
    DIR *d = opendir(rd);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)))
        if (de->d_name[0] != '.')
            unlinkat(dirfd(d), de->d_name, 0);
    closedir(d);
    rmdir(rd);
}

int
failover_recover(struct vm *vm)
{
    /* At start-up: a test failover is either whole — its view and QEMU
     * both running — and stays, or it is undone: a crash in the middle of
     * starting or stopping one leaves nothing behind. */
    struct repl *r = vm->repl;
    if (vm->mode != VM_MODE_REPLICA || !r || !r->storage)
        return 0;
    CLEANUP_FREE char *rd = test_rundir(r);
    bool served = false, running = false;
    vmproc_status(rd, &served, &running);
    if (r->test_point && served && running) {
        log_info("failover", "%s: test failover at point %llu is running",
                 vm->name, (unsigned long long)r->test_point);
        return 0;
    }
    if (!r->test_point && access(rd, F_OK) < 0)
        return 0;
    int rc = vmproc_stop(rd, true, TEST_STOP_MS);
    if (rc < 0)
        return rc;
    remove_test_dir(rd);
    if (r->test_point) {
        event_add("warning", vm->name, "test failover at point %llu was cut "
                  "short by a crash; removed it", (unsigned long long)
                  r->test_point);
        r->test_point = 0;
        rc = catalog_save_repl(r);
    }
    return rc;
}

int
failover_test_refresh(struct vm *vm, uint64_t n)
{
    /* Without D->lock, vm->applying set: test_point cannot change (start
     * and stop wait for the applier). */
    struct repl *r = vm->repl;
    if (!r || r->test_point == 0)
        return 0;
    CLEANUP_FREE char *rd = test_rundir(r);
    int rc = vmproc_refresh(rd, n);
    if (rc < 0)
        return vr_err(-EAGAIN, "test failover of %s: %s", vm->name,
                      vr_errmsg());
    return 0;
}

/* Wait (D->lock held) until the applier is not working on vm. */
static void
wait_applier(struct vm *vm)
{
    while (vm->applying)
        pthread_cond_wait(&D->cond, &D->lock);
}


/* D->lock held: the Replica VM named by the call, or an error. */
static int
lookup_replica(struct api_call *call, struct vm **out)
{
    struct vm *vm = vm_find(call->arg);
    if (!vm)
        return vr_err(-ENOENT, "vm %s: not found", call->arg);
    if (vm->mode != VM_MODE_REPLICA || !vm->repl || !vm->repl->storage)
        return vr_err(-EINVAL, "vm %s: not a Replica VM on this server",
                      vm->name);
    *out = vm;
    return 0;
}

int
api_failover_start(struct api_call *call, unsigned *status VR_UNUSED,
                   json_object **out)
{
    json_object *b = call->body, *v;
    bool test = json_object_object_get_ex(b, "test", &v) &&
                json_object_get_boolean(v);
    int64_t want = json_object_object_get_ex(b, "point", &v)
                       ? json_object_get_int64(v) : 0;
    if (!test)
        return vr_err(-ENOTSUP, "failover start without --test is not "
                      "available yet (planned and unplanned failover: #3)");
    if (want < 0)
        return vr_err(-EINVAL, "point: expected a point id");

    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    int rc = lookup_replica(call, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && !r->initial_done)
        rc = vr_err(-EBUSY, "vm %s: initial replication has not completed: "
                    "there is no recovery point yet", vm->name);
    if (rc == 0 && r->test_point)
        rc = vr_err(-EBUSY, "vm %s: a test failover is running (point "
                    "%llu); run 'vmreplica failover stop %s --test' first",
                    vm->name, (unsigned long long)r->test_point, vm->name);
    if (rc == 0 && r->test_busy)
        rc = vr_err(-EBUSY, "vm %s: a test failover is starting or "
                    "stopping", vm->name);
    uint64_t point = 0;
    if (rc == 0) {
        struct point *pts = NULL;
        size_t np = 0;
        rc = catalog_points(vm->uuid, &pts, &np);
        for (size_t i = 0; rc == 0 && i < np; i++)
            if (want ? pts[i].cycle == (uint64_t)want : i + 1 == np)
                point = pts[i].cycle;
        free(pts);
        if (rc == 0 && point == 0)
            rc = want ? vr_err(-ENOENT, "vm %s: no recovery point %lld "
                               "(see 'vmreplica points list %s')", vm->name,
                               (long long)want, vm->name)
                      : vr_err(-ENOENT, "vm %s: no recovery point yet",
                               vm->name);
    }
    if (rc < 0) {
        pthread_mutex_unlock(&D->lock);
        return rc;
    }
    /* Pin the point and keep the applier away while the test starts. */
    r->test_busy = true;
    wait_applier(vm);
    r->test_point = point;
    rc = catalog_save_repl(r);
    if (rc == 0)
        vr_fault_point("test-start-pinned");
    CLEANUP_FREE char *rd = test_rundir(r);
    CLEANUP_FREE char *name = test_name(vm);
    CLEANUP_FREE char *view =
        xasprintf("%s/undo:%llu:%llu", r->storage, (unsigned long long)point,
                  (unsigned long long)r->applied_cycle);
    char uuid[37];
    vr_uuid_new(uuid);
    struct vmproc_disk disks[MAX_DISKS];
    for (unsigned i = 0; i < vm->ndisks; i++) {
        disks[i].id = vm->disks[i].id;
        disks[i].path = vm->disks[i].path;
    }
    struct vmproc_spec spec = {
        .name = name,
        .uuid = uuid,
        .cpus = vm->cpus,
        .memory_mib = vm->memory_mib,
        .rundir = rd,
        .ndisks = vm->ndisks,
        .disks = disks,
        .view = view,
    };
    pthread_mutex_unlock(&D->lock);

    /* The undo directory exists once history was ever kept; a view of the
     * latest point needs no spans but still opens the directory. */
    CLEANUP_FREE char *undo = xasprintf("%s/undo", r->storage);
    if (rc == 0)
        rc = io_mkdir_p(undo, 0750);
    if (rc == 0)
        rc = vmproc_start(&spec);
    if (rc == 0) {
        vr_fault_point("test-start-view");
        rc = vmproc_make_overlays(rd, vm->ndisks, disks);
    }
    if (rc == 0) {
        vr_fault_point("test-start-overlays");
        spec.hypervisor = true;
        spec.overlays = true;
        rc = vmproc_start(&spec);
    }
    if (rc == 0)
        vr_fault_point("test-start-qemu");
    if (rc < 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        VR_IGNORE(vmproc_stop(rd, true, 0));
        remove_test_dir(rd);
        vr_err(rc, "%s", msg);
    }

    pthread_mutex_lock(&D->lock);
    if (rc < 0) {
        r->test_point = 0;
        VR_IGNORE(catalog_save_repl(r));
        event_add("error", vm->name, "test failover at point %llu failed: %s",
                  (unsigned long long)point, vr_errmsg());
    } else {
        event_add("info", vm->name, "test failover started: \"%s\" at point "
                  "%llu", name, (unsigned long long)point);
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "test_vm", json_object_new_string(name));
        json_object_object_add(*out, "test_vm_uuid",
                               json_object_new_string(uuid));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)point));
        json_object_object_add(*out, "run_dir", json_object_new_string(rd));
    }
    r->test_busy = false;
    pthread_cond_broadcast(&D->cond);
    pthread_mutex_unlock(&D->lock);
    return rc;
}

int
api_failover_stop(struct api_call *call, unsigned *status VR_UNUSED,
                  json_object **out)
{
    json_object *b = call->body, *v;
    bool test = json_object_object_get_ex(b, "test", &v) &&
                json_object_get_boolean(v);
    if (!test)
        return vr_err(-ENOTSUP, "failover stop without --test is not "
                      "available yet (#3)");
    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    int rc = lookup_replica(call, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && !r->test_point)
        rc = vr_err(-ENOENT, "vm %s: no test failover is running",
                    vm->name);
    if (rc == 0 && r->test_busy)
        rc = vr_err(-EBUSY, "vm %s: a test failover is starting or "
                    "stopping", vm->name);
    if (rc < 0) {
        pthread_mutex_unlock(&D->lock);
        return rc;
    }
    r->test_busy = true;
    wait_applier(vm);
    uint64_t point = r->test_point;
    CLEANUP_FREE char *rd = test_rundir(r);
    pthread_mutex_unlock(&D->lock);

    rc = vmproc_stop(rd, true, TEST_STOP_MS);
    if (rc == 0) {
        vr_fault_point("test-stop-stopped");
        remove_test_dir(rd);
        vr_fault_point("test-stop-removed");
    }

    pthread_mutex_lock(&D->lock);
    if (rc == 0) {
        r->test_point = 0;
        rc = catalog_save_repl(r);
        event_add("info", vm->name, "test failover at point %llu stopped",
                  (unsigned long long)point);
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)point));
    }
    r->test_busy = false;
    pthread_cond_broadcast(&D->cond);
    pthread_mutex_unlock(&D->lock);
    return rc;
}
