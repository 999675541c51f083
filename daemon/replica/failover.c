/* failover.c: failover of Replica VMs (SPEC §8): test and unplanned.
 *
 * Both start the VM from a recovery point without copying a disk: the
 * plugin serves the Replica disks read-only as they were at the point (a
 * view: live disk plus undo spans, lib/undo.h), qcow2 overlays make them
 * writable, and QEMU boots from the overlays.
 *
 * Test failover (`failover start VM --test [--point ID]`) starts
 * "VM - Test" in STORAGE/test with no network.  Replication into the
 * Replica VM goes on: the point is kept by the retention policy while the
 * test lasts, and before each cycle is applied the applier hands the view
 * the cycle's undo span (REFRESH), so the test VM never sees a later
 * cycle.  `failover stop VM --test` stops it and removes its overlays.
 * While a test starts or stops (VM_OP_TEST) the applier leaves the VM
 * alone.
 *
 * Unplanned failover (`failover start VM [--point ID] [--force]`) starts
 * the VM itself, same name and UUID, in STORAGE/failover; the Replica
 * server stops applying and refuses the primary's cycles (state
 * FailOverWaitingCompletion).  Refused while the primary was in contact
 * within three replication periods (plus 5 s), unless --force: a primary
 * that still runs would go on writing a VM that now runs here too.
 * `failover stop VM` cancels: the overlays go, replication resumes where
 * it stopped, another point may be tried.  `failover complete VM` commits:
 * the VM is shut down, the Replica disks are reverted to the point in
 * place (the undo spans' blocks, lib/undo.h undo_view_revert), the
 * overlays are written into them (qemu-img commit), every recovery point
 * is dropped and the epoch is bumped, so the old primary's messages are
 * refused from then on (state FailedOver; `vm start` runs it).
 *
 * Every step is in the catalog (r->failover_step) before its work, and
 * each step's work can be repeated: at start-up failover_recover() undoes
 * a half-started failover and finishes a half-done cancel or complete.
 * The processes run in their own sessions, like every VM's, and survive a
 * daemon restart.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "replica-int.h"
#include "undo.h"
#include "proc/vmproc.h"
#include "proc/vmspec.h"

#define TEST_STOP_MS 5000
#define FO_STOP_MS 30000 /* a failed-over VM's shutdown at complete */

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

static char *
fo_rundir(const struct repl *r)
{
    return xasprintf("%s/failover", r->storage);
}

static void
disks_of(const struct vm *vm, struct vmproc_disk *disks)
{
    for (unsigned i = 0; i < vm->ndisks; i++) {
        disks[i].id = vm->disks[i].id;
        disks[i].path = vm->disks[i].path;
    }
}

/* d->lock held: the spec of vm as a read-only view of `point` served in
 * rd (name and uuid: the VM's, or the test VM's), its disks in disks[],
 * the view argument in *view (caller frees); NICs on `network` (NULL:
 * their own).  It borrows vm's strings: the caller keeps vm busy. */
static void
view_spec(const struct vm *vm, uint64_t point, const char *rd,
          const char *name, const char *uuid, const char *network,
          struct vmproc_disk *disks, char **view, struct vmproc_spec *spec)
{
    const struct repl *r = vm->repl;
    disks_of(vm, disks);
    *view = xasprintf("%s/undo:%llu:%llu", r->storage,
                      (unsigned long long)point,
                      (unsigned long long)r->applied_cycle);
    *spec = (struct vmproc_spec){
        .name = name,
        .uuid = uuid,
        .cpus = vm->cpus,
        .memory_mib = vm->memory_mib,
        .rundir = rd,
        .ndisks = vm->ndisks,
        .disks = disks,
        .view = *view,
        .kernel = vm->kernel,
        .initrd = vm->initrd,
        .cmdline = vm->cmdline,
    };
    nics_to_spec(vm, spec, network);
}

/* Remove run directory rd (STORAGE/UUID/NAME) and its files, beneath the
 * storage location: a link in its place is not followed (and stays).
 * Unless a process still holds it (its files are that process's). */
static void
remove_test_dir(const char *storage, const char *rd)
{
    if (vmproc_rundir_busy(rd)) {
        log_warn("failover", "left %s: %s", rd, vr_errmsg());
        vr_err_clear();
        return;
    }
    if (storage_clear_dir(storage, rd) < 0) {
        log_warn("failover", "%s", vr_errmsg());
        vr_err_clear();
        return;
    }
    int vfd = storage_open(storage, storage, O_RDONLY | O_DIRECTORY, 0);
    if (vfd >= 0) {
        unlinkat(vfd, strrchr(rd, '/') + 1, AT_REMOVEDIR);
        close(vfd);
    }
    vr_err_clear();
}

/* Before a run directory and the disks are handed to nbdkit, QEMU and
 * qemu-img, which take paths: each must be what it seems, beneath the
 * storage location with no link on the way (made if need be).  Between
 * this check and their open only the daemon's user can change what is
 * inside STORAGE/UUID (0750); a link swapped in at STORAGE/UUID itself in
 * that window is the one case left to the storage location's own
 * permissions (docs/security.md). */
static int
check_beneath(const struct vm *vm, const char *rd)
{
    const char *st = vm->repl->storage;
    CLEANUP_FREE char *undo = xasprintf("%s/undo", st);
    int rc = storage_mkdir(st, undo);
    if (rc == 0 && rd)
        rc = storage_mkdir(st, rd);
    for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++) {
        int fd = storage_open(st, vm->disks[i].path, O_RDONLY, 0);
        if (fd < 0)
            rc = fd;
        else
            close(fd);
    }
    return rc;
}

/* --- common ----------------------------------------------------------- */

/* Wait (d->lock held) until the applier is not working on vm. */
static void
wait_applier(struct vm *vm)
{
    while (vm_busy(vm, VM_OP_APPLY))
        pthread_cond_wait(&rctx.d->cond, &rctx.d->lock);
}

/* d->lock held: is vm between the cycles a resynchronization applies in
 * one run (replica-apply.c)?  Its disks are then at no point: a test
 * failover or failover must wait until the run is over. */
static int
check_not_mid_resync(struct vm *vm, enum vm_op op)
{
    const struct repl *r = vm->repl;
    if (!r->hold_from || r->applied_cycle < r->hold_from)
        return 0;
    vm_op_end(vm, op);
    pthread_cond_broadcast(&rctx.d->cond);
    return vr_err(-EBUSY, "vm %s: a resynchronization is being applied "
                  "(cycles %llu to %llu); try again when it is done",
                  vm->name, (unsigned long long)r->hold_from,
                  (unsigned long long)r->hold_to);
}

/* d->lock held: the Replica VM named key, or an error. */
static int
lookup_replica(const char *key, struct vm **out)
{
    struct vm *vm;
    int rc = vm_lookup(rctx.d, key, &vm);
    if (rc < 0)
        return rc;
    if (vm_is_kept_copy(vm))
        return vm_kept_copy_err(vm, "a failover");
    if (vm->mode == VM_MODE_PRIMARY && vm->repl && vm->repl->replica_server)
        return vr_err(-EINVAL, "vm %s is a primary VM here, replicating to "
                      "%s: a failover runs on the Replica server ('vmreplica "
                      "failover start %s' there; for a planned one, "
                      "'vmreplica failover prepare %s' here first)",
                      vm->name, vm->repl->replica_server, vm->name,
                      vm->name);
    if (vm->mode != VM_MODE_REPLICA || !vm->repl || !vm->repl->storage)
        return vr_err(-EINVAL, "vm %s: not a Replica VM on this server",
                      vm->name);
    *out = vm;
    return 0;
}

/* d->lock held: the point to start from — want, or the latest if 0. */
static int
choose_point(const struct vm *vm, int64_t want, uint64_t *point)
{
    struct point *pts = NULL;
    size_t np = 0;
    int rc = catalog_points(rctx.d->cat, vm->uuid, &pts, &np);
    *point = 0;
    for (size_t i = 0; rc == 0 && i < np; i++)
        if (want ? pts[i].cycle == (uint64_t)want : i + 1 == np)
            *point = pts[i].cycle;
    free(pts);
    if (rc == 0 && *point == 0)
        rc = want ? vr_err(-ENOENT, "vm %s: no recovery point %lld (see "
                           "'vmreplica points list %s')", vm->name,
                           (long long)want, vm->name)
                  : vr_err(-ENOENT, "vm %s: no recovery point yet", vm->name);
    return rc;
}

/* d->lock held, op begun and the applier idle: choose_point, ending op
 * if there is none to choose. */
static int
choose_point_held(struct vm *vm, enum vm_op op, int64_t want,
                  uint64_t *point)
{
    int rc = choose_point(vm, want, point);
    if (rc < 0) {
        vm_op_end(vm, op);
        pthread_cond_broadcast(&rctx.d->cond);
    }
    return rc;
}

static void
fault(const char *prefix, const char *step)
{
    char name[64];
    snprintf(name, sizeof name, "%s-%s", prefix, step);
    vr_fault_point(name);
}

/* Start the view of spec->view, its overlays and QEMU in spec->rundir
 * (without d->lock).  Fault points PREFIX-view, -overlays, -qemu.  On
 * failure whatever was started is stopped and the run directory removed. */
static int
launch(const struct vm *vm, struct vmproc_spec *spec,
       struct vmproc_disk *disks, const char *prefix)
{
    const char *storage = vm->repl->storage;
    /* The undo directory exists once history was ever kept; a view of the
     * latest point needs no spans but still opens the directory
     * (check_beneath makes it). */
    int rc = check_beneath(vm, spec->rundir);
    if (rc < 0)
        return rc;
    rc = vmproc_start(spec);
    if (rc == 0) {
        fault(prefix, "view");
        rc = vmproc_make_overlays(spec->rundir, spec->ndisks, disks);
    }
    if (rc == 0) {
        fault(prefix, "overlays");
        spec->hypervisor = true;
        spec->overlays = true;
        rc = vmproc_start(spec);
    }
    if (rc == 0)
        fault(prefix, "qemu");
    if (rc < 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        VR_IGNORE(vmproc_stop(spec->rundir, true, 0));
        remove_test_dir(storage, spec->rundir);
        vr_err(rc, "%s", msg);
    }
    return rc;
}

/* --- unplanned failover: the steps ---------------------------------------- */

/* d->lock held: record the step. */
static int
set_step(struct repl *r, int step)
{
    r->failover_step = step;
    return catalog_save_repl(rctx.d->cat, r);
}

/* d->lock held: the failover is gone; replication resumes. */
static int
finish_cancel(struct vm *vm)
{
    struct repl *r = vm->repl;
    r->failover_point = 0;
    r->failover_step = FO_NONE;
    r->kick = true;
    int rc = repl_transition(rctx.d->cat, vm, REPL_ST_REPLICATING, REPL_T_SAVE);
    pthread_cond_broadcast(&rctx.d->cond);
    return rc;
}

/* d->lock held (dropped for the work): stop the failed-over VM's processes
 * and remove its overlays, then finish_cancel. */
static int
cancel_steps(struct vm *vm)
{
    CLEANUP_FREE char *rd = fo_rundir(vm->repl);
    pthread_mutex_unlock(&rctx.d->lock);
    /* The overlays are thrown away: no point in a clean shutdown. */
    int rc = vmproc_stop(rd, true, 0);
    if (rc == 0) {
        vr_fault_point("failover-stop-stopped");
        remove_test_dir(vm->repl->storage, rd);
        vr_fault_point("failover-stop-removed");
    }
    pthread_mutex_lock(&rctx.d->lock);
    return rc < 0 ? rc : finish_cancel(vm);
}

/* Without d->lock: turn the Replica disks (at cycle latest) back into
 * point `point` in place, from the undo spans. */
static int
revert_disks(const struct vm *vm, uint64_t point, uint64_t latest)
{
    const char *st = vm->repl->storage;
    CLEANUP_FREE char *undo = xasprintf("%s/undo", st);
    uint64_t sizes[MAX_DISKS], bytes = 0;
    int fds[MAX_DISKS];
    unsigned opened = 0;
    struct undo_view *v = NULL;
    int rc = 0;
    int dfd = storage_open(st, undo, O_RDONLY | O_DIRECTORY, 0);
    if (dfd < 0)
        return vr_err(dfd, "revert: %s", vr_errmsg());
    for (unsigned i = 0; i < vm->ndisks; i++)
        sizes[i] = vm->disks[i].size;
    rc = undo_view_open(dfd, point, latest, vm->ndisks, sizes, &v);
    for (; rc == 0 && opened < vm->ndisks; opened++) {
        fds[opened] = storage_open(st, vm->disks[opened].path, O_RDWR, 0);
        if (fds[opened] < 0)
            rc = vr_err(fds[opened], "revert: %s", vr_errmsg());
    }
    if (rc == 0)
        rc = undo_view_revert(v, fds, &bytes);
    while (opened-- > 0)
        if (fds[opened] >= 0)
            close(fds[opened]);
    undo_view_free(v);
    close(dfd);
    if (rc == 0)
        log_info("failover", "%s: disks reverted from cycle %llu to point "
                 "%llu (%llu bytes)", vm->name, (unsigned long long)latest,
                 (unsigned long long)point, (unsigned long long)bytes);
    return rc;
}

/* d->lock held (dropped for the work), VM_OP_FAILOVER in progress: carry a
 * complete on from the step it reached. */
static int
complete_steps(struct vm *vm, bool force)
{
    struct repl *r = vm->repl;
    CLEANUP_FREE char *rd = fo_rundir(r);
    struct vmproc_disk disks[MAX_DISKS];
    disks_of(vm, disks);
    uint64_t point = r->failover_point, latest = r->applied_cycle;
    int rc = 0;
    if (r->failover_step == FO_COMPLETING) {
        pthread_mutex_unlock(&rctx.d->lock);
        /* QEMU goes (a clean shutdown first); the view stays for the
         * revert's sake only until then, the disks hold the point after. */
        rc = vmproc_stop(rd, force, FO_STOP_MS);
        if (rc == 0) {
            vr_fault_point("failover-complete-stopped");
            rc = revert_disks(vm, point, latest);
        }
        pthread_mutex_lock(&rctx.d->lock);
        if (rc == 0)
            rc = set_step(r, FO_REVERTED);
        if (rc == 0)
            vr_fault_point("failover-complete-reverted");
    }
    if (rc == 0 && r->failover_step == FO_REVERTED) {
        pthread_mutex_unlock(&rctx.d->lock);
        rc = check_beneath(vm, rd);
        if (rc == 0)
            rc = vmproc_commit_overlays(rd, vm->ndisks, disks);
        pthread_mutex_lock(&rctx.d->lock);
        if (rc == 0)
            rc = set_step(r, FO_COMMITTED);
        if (rc == 0)
            vr_fault_point("failover-complete-committed");
    }
    if (rc == 0 && r->failover_step == FO_COMMITTED) {
        remove_test_dir(r->storage, rd);
        /* Staged cycles of the old primary will never be applied. */
        CLEANUP_FREE char *stg = xasprintf("%s/staging", r->storage);
        int n_rm = storage_clear_dir(r->storage, stg);
        rc = n_rm < 0 ? n_rm : history_reset(vm);
        if (rc == 0) {
            r->failover_point = 0;
            r->failover_step = FO_NONE;
            r->applied_cycle = r->last_cycle = point;
            r->epoch++;
            rc = repl_transition_event(
                rctx.d->cat, vm, REPL_ST_FAILED_OVER, REPL_T_SAVE, "info",
                "failover complete: the disks are point %llu plus the VM's "
                "writes since; recovery points deleted; epoch %llu (the old "
                "primary's changes are refused)", (unsigned long long)point,
                (unsigned long long)r->epoch);
        }
    }
    return rc;
}

json_object *
failover_test_vm_json(const struct vm *vm)
{
    const struct repl *r = vm->repl;
    if (vm->mode != VM_MODE_REPLICA || !r || !r->test_point || !r->storage)
        return NULL;
    CLEANUP_FREE char *rd = test_rundir(r);
    CLEANUP_FREE char *name = test_name(vm);
    bool served = false, running = false;
    vmproc_status(rd, &served, &running);
    served = served && vmproc_nbd_sock_exists(rd);
    json_object *o = json_object_new_object();
    json_object_object_add(o, "name", json_object_new_string(name));
    json_object_object_add(o, "mode", json_object_new_string("test"));
    json_object_object_add(o, "test_of", json_object_new_string(vm->name));
    json_object_object_add(o, "point",
                           json_object_new_int64((int64_t)r->test_point));
    json_object_object_add(o, "cpus", json_object_new_int((int)vm->cpus));
    json_object_object_add(o, "memory_mib",
                           json_object_new_int((int)vm->memory_mib));
    json_object_object_add(o, "running", json_object_new_boolean(running));
    json_object_object_add(o, "served", json_object_new_boolean(served));
    json_object_object_add(o, "hypervisor", json_object_new_boolean(running));
    json_object_object_add(o, "run_dir", json_object_new_string(rd));
    return o;
}

/* --- start-up ------------------------------------------------------------- */

static int
recover_test(struct vm *vm)
{
    /* A test failover is either whole — its view and QEMU both running —
     * and stays, or it is undone: a crash in the middle of starting or
     * stopping one leaves nothing behind. */
    struct repl *r = vm->repl;
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
    remove_test_dir(r->storage, rd);
    if (r->test_point) {
        event_add(rctx.d->cat, "warning", vm->name,
                  "test failover at point %llu was cut "
                  "short by a crash; removed it",
                  (unsigned long long)r->test_point);
        r->test_point = 0;
        rc = catalog_save_repl(rctx.d->cat, r);
    }
    return rc;
}

static int
recover_failover(struct vm *vm)
{
    struct repl *r = vm->repl;
    CLEANUP_FREE char *rd = fo_rundir(r);
    int rc = 0;
    switch (r->failover_step) {
    case FO_NONE:
        if (access(rd, F_OK) == 0) { /* after a finished complete */
            rc = vmproc_stop(rd, true, 0);
            if (rc == 0)
                remove_test_dir(r->storage, rd);
        }
        return rc;
    case FO_STARTING:
        /* The start did not answer: undo it, whatever it got to. */
        rc = cancel_steps(vm);
        if (rc == 0)
            event_add(rctx.d->cat, "warning", vm->name,
                      "failover at point %llu was cut "
                      "short by a crash while starting; undone",
                      (unsigned long long)r->failover_point);
        return rc;
    case FO_RUNNING: {
        /* The overlays hold the VM's writes: keep them, and serve the
         * view they rest on again if it went (QEMU is not restarted). */
        bool served = false, running = false;
        vmproc_status(rd, &served, &running);
        log_info("failover", "%s: failed over at point %llu (VM %s)",
                 vm->name, (unsigned long long)r->failover_point,
                 running ? "running" : "stopped");
        if (served)
            return 0;
        struct vmproc_disk disks[MAX_DISKS];
        struct vmproc_spec spec;
        CLEANUP_FREE char *view = NULL;
        view_spec(vm, r->failover_point, rd, vm->name, vm->uuid, NULL, disks,
                  &view, &spec);
        rc = check_beneath(vm, rd);
        return rc < 0 ? rc : vmproc_start(&spec);
    }
    case FO_CANCELLING:
        return cancel_steps(vm);
    case FO_COMPLETING:
    case FO_REVERTED:
    case FO_COMMITTED:
        log_info("failover", "%s: finishing the completion of the failover "
                 "at point %llu", vm->name,
                 (unsigned long long)r->failover_point);
        return complete_steps(vm, false);
    default:
        return vr_err(-EINVAL, "vm %s: unknown failover step %d", vm->name,
                      r->failover_step);
    }
}

int
failover_recover(struct vm *vm)
{
    /* At start-up, d->lock held. */
    struct repl *r = vm->repl;
    if (vm->mode != VM_MODE_REPLICA || !r || !r->storage)
        return 0;
    int rc = recover_test(vm);
    int rc2 = recover_failover(vm);
    return rc < 0 ? rc : rc2;
}

int
failover_test_refresh(struct vm *vm, uint64_t n)
{
    /* Without d->lock, VM_OP_APPLY in progress: test_point cannot change (start
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

/* --- the steps the API asks for ------------------------------------------ */

/* d->lock held: refuse anything while another failover kind runs. */
static int
check_idle(const struct vm *vm)
{
    const struct repl *r = vm->repl;
    if (vm_busy(vm, VM_OP_TEST | VM_OP_FAILOVER))
        return vr_err(-EBUSY, "vm %s: a failover is starting or stopping; "
                      "try again", vm->name);
    if (r->test_point)
        return vr_err(-EBUSY, "vm %s: a test failover is running (point "
                      "%llu); run 'vmreplica failover stop %s --test' first",
                      vm->name, (unsigned long long)r->test_point, vm->name);
    if (r->failover_point)
        return vr_err(-EBUSY, "vm %s: failed over at point %llu; run "
                      "'vmreplica failover stop %s' to cancel or 'vmreplica "
                      "failover complete %s' to commit", vm->name,
                      (unsigned long long)r->failover_point, vm->name,
                      vm->name);
    if (r->st == REPL_ST_FAILED_OVER)
        return vr_err(-EINVAL, "vm %s: failover is complete; it is no "
                      "longer a replica", vm->name);
    if (!r->initial_done)
        return vr_err(-EBUSY, "vm %s: initial replication has not "
                      "completed: there is no recovery point yet", vm->name);
    return 0;
}

int
failover_test_start(const char *key, int64_t want, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = lookup_replica(key, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0)
        rc = check_idle(vm);
    if (rc < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    /* Keep the applier away while the test starts, then pin the point:
     * chosen before an apply in progress ends, it could be pruned by it
     * with no undo data kept for it (a CI flake: "point 3 cannot be
     * reconstructed from cycle 4"). */
    vm_op_begin(vm, VM_OP_TEST);
    wait_applier(vm);
    uint64_t point = 0;
    if ((rc = check_not_mid_resync(vm, VM_OP_TEST)) < 0 ||
        (rc = choose_point_held(vm, VM_OP_TEST, want, &point)) < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    r->test_point = point;
    rc = catalog_save_repl(rctx.d->cat, r);
    if (rc == 0)
        vr_fault_point("test-start-pinned");
    CLEANUP_FREE char *rd = test_rundir(r);
    CLEANUP_FREE char *name = test_name(vm);
    CLEANUP_FREE char *view = NULL;
    char uuid[37];
    vr_uuid_new(uuid);
    struct vmproc_disk disks[MAX_DISKS];
    struct vmproc_spec spec;
    /* Its NICs join the test network (none by default). */
    view_spec(vm, point, rd, name, uuid,
              vm->test_network ? vm->test_network : "none", disks, &view,
              &spec);
    pthread_mutex_unlock(&rctx.d->lock);

    if (rc == 0)
        rc = launch(vm, &spec, disks, "test-start");

    pthread_mutex_lock(&rctx.d->lock);
    if (rc < 0) {
        r->test_point = 0;
        VR_IGNORE(catalog_save_repl(rctx.d->cat, r));
        event_add(rctx.d->cat, "error", vm->name,
                  "test failover at point %llu failed: %s",
                  (unsigned long long)point, vr_errmsg());
    } else {
        event_add(rctx.d->cat, "info", vm->name,
                  "test failover started: \"%s\" at point "
                  "%llu",
                  name, (unsigned long long)point);
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "test_vm", json_object_new_string(name));
        json_object_object_add(*out, "test_vm_uuid",
                               json_object_new_string(uuid));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)point));
        json_object_object_add(*out, "run_dir", json_object_new_string(rd));
    }
    vm_op_end(vm, VM_OP_TEST);
    pthread_cond_broadcast(&rctx.d->cond);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

/* The primary is taken as reachable while its last request is younger
 * than three replication periods plus 5 s. */
static uint64_t
contact_window_ms(const struct repl *r)
{
    return 3ULL * (r->frequency_s ? r->frequency_s : 300) * 1000 + 5000;
}

int
failover_unplanned_start(const char *key, int64_t want, bool force,
                         json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = lookup_replica(key, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0)
        rc = check_idle(vm);
    uint64_t now = vr_wall_ms();
    uint64_t seen = 0;
    if (rc == 0) {
        seen = r->last_contact_ms > r->last_ok_ms ? r->last_contact_ms
                                                   : r->last_ok_ms;
        if (!force && !r->prepared_cycle && seen && seen <= now &&
            now - seen < contact_window_ms(r))
            rc = vr_err(-EBUSY, "vm %s: the primary server %s was in "
                        "contact %llu s ago and may still run the VM; shut "
                        "it down first (or 'failover prepare' it), or use "
                        "--force", vm->name, r->primary_server,
                        (unsigned long long)((now - seen) / 1000));
    }
    if (rc < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    /* The point is chosen once no apply runs (as for a test failover). */
    vm_op_begin(vm, VM_OP_FAILOVER);
    wait_applier(vm);
    uint64_t point = 0;
    if ((rc = check_not_mid_resync(vm, VM_OP_FAILOVER)) < 0 ||
        (rc = choose_point_held(vm, VM_OP_FAILOVER, want, &point)) < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    r->failover_point = point;
    r->failover_step = FO_STARTING;
    /* The VM will hold its own writes on top of the point: the old
     * primary's disks (prepared or not) no longer match them. */
    r->prepared_cycle = 0;
    rc = repl_transition(rctx.d->cat, vm, REPL_ST_FAILOVER_WAIT, REPL_T_SAVE);
    if (rc == 0)
        vr_fault_point("failover-start-pinned");
    CLEANUP_FREE char *rd = fo_rundir(r);
    CLEANUP_FREE char *view = NULL;
    struct vmproc_disk disks[MAX_DISKS];
    struct vmproc_spec spec;
    view_spec(vm, point, rd, vm->name, vm->uuid, NULL, disks, &view, &spec);
    pthread_mutex_unlock(&rctx.d->lock);

    if (rc == 0)
        rc = launch(vm, &spec, disks, "failover-start");

    pthread_mutex_lock(&rctx.d->lock);
    if (rc == 0)
        rc = set_step(r, FO_RUNNING);
    if (rc < 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        VR_IGNORE(cancel_steps(vm));
        vr_err(rc, "%s", msg);
        event_add(rctx.d->cat, "error", vm->name,
                  "failover at point %llu failed: %s",
                  (unsigned long long)point, msg);
    } else {
        network_inject_start(rctx.d, vm, rd);
        event_add(rctx.d->cat, "warning", vm->name,
                  "failover started%s: the VM runs "
                  "from point %llu; the primary's changes are refused until "
                  "'failover stop' cancels or 'failover complete' commits",
                  force && seen ? " (forced while the primary was in "
                                  "contact)"
                                : "",
                  (unsigned long long)point);
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)point));
        json_object_object_add(*out, "state",
                               json_object_new_string(repl_st_name(r->st)));
        json_object_object_add(*out, "run_dir", json_object_new_string(rd));
    }
    vm_op_end(vm, VM_OP_FAILOVER);
    pthread_cond_broadcast(&rctx.d->cond);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}


int
failover_test_stop(const char *key, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = lookup_replica(key, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && !r->test_point)
        rc = vr_err(-ENOENT, "vm %s: no test failover is running",
                    vm->name);
    if (rc == 0 && vm_busy(vm, VM_OP_TEST))
        rc = vr_err(-EBUSY, "vm %s: a test failover is starting or "
                    "stopping", vm->name);
    if (rc < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    vm_op_begin(vm, VM_OP_TEST);
    wait_applier(vm);
    uint64_t point = r->test_point;
    CLEANUP_FREE char *rd = test_rundir(r);
    pthread_mutex_unlock(&rctx.d->lock);

    rc = vmproc_stop(rd, true, TEST_STOP_MS);
    if (rc == 0) {
        vr_fault_point("test-stop-stopped");
        remove_test_dir(r->storage, rd);
        vr_fault_point("test-stop-removed");
    }

    pthread_mutex_lock(&rctx.d->lock);
    if (rc == 0) {
        r->test_point = 0;
        rc = catalog_save_repl(rctx.d->cat, r);
        event_add(rctx.d->cat, "info", vm->name,
                  "test failover at point %llu stopped",
                  (unsigned long long)point);
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)point));
    }
    vm_op_end(vm, VM_OP_TEST);
    pthread_cond_broadcast(&rctx.d->cond);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

/* d->lock held: the VM's failover, ready for `verb` ("cancel" or
 * "complete"; a cancel or complete that failed half-way may be run
 * again). */
static int
lookup_failover(const char *key, const char *verb, struct vm **out)
{
    int rc = lookup_replica(key, out);
    if (rc < 0)
        return rc;
    struct vm *vm = *out;
    struct repl *r = vm->repl;
    if (vm_busy(vm, VM_OP_FAILOVER))
        return vr_err(-EBUSY, "vm %s: a failover step is running; try "
                      "again", vm->name);
    if (!r->failover_point)
        return vr_err(-ENOENT, "vm %s: no failover to %s%s", vm->name, verb,
                      r->test_point ? " (a test failover runs: add --test)"
                                    : "");
    bool cancel = strcmp(verb, "cancel") == 0;
    bool cancelling = r->failover_step == FO_CANCELLING;
    bool completing = r->failover_step >= FO_COMPLETING;
    if ((cancel && completing) || (!cancel && cancelling))
        return vr_err(-EBUSY, "vm %s: the failover is being %s", vm->name,
                      cancelling ? "cancelled" : "completed");
    /* A start that failed and could not clean up: only a cancel. */
    if (!cancel && r->failover_step == FO_STARTING)
        return vr_err(-EBUSY, "vm %s: the failover did not start completely; "
                      "cancel it with 'vmreplica failover stop %s'", vm->name,
                      vm->name);
    return 0;
}

bool
failover_is_planned(const char *key, int64_t want)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = vm_find(rctx.d, key);
    bool planned = !want && vm && vm->mode == VM_MODE_REPLICA && vm->repl &&
                   vm->repl->prepared_cycle &&
                   vm->repl->st == REPL_ST_REPLICATING;
    pthread_mutex_unlock(&rctx.d->lock);
    return planned;
}

int
failover_cancel(const char *key, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = lookup_failover(key, "cancel", &vm);
    if (rc < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    struct repl *r = vm->repl;
    uint64_t point = r->failover_point;
    vm_op_begin(vm, VM_OP_FAILOVER);
    if (r->failover_step == FO_RUNNING || r->failover_step == FO_STARTING)
        rc = set_step(r, FO_CANCELLING);
    if (rc == 0) {
        vr_fault_point("failover-stop-marked");
        rc = cancel_steps(vm);
    }
    if (rc == 0) {
        event_add(rctx.d->cat, "info", vm->name,
                  "failover at point %llu cancelled; "
                  "replication resumes",
                  (unsigned long long)point);
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)point));
        json_object_object_add(*out, "state",
                               json_object_new_string(repl_st_name(r->st)));
    }
    vm_op_end(vm, VM_OP_FAILOVER);
    pthread_cond_broadcast(&rctx.d->cond);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

int
failover_complete(const char *key, bool force, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = lookup_failover(key, "complete", &vm);
    if (rc < 0) {
        pthread_mutex_unlock(&rctx.d->lock);
        return rc;
    }
    struct repl *r = vm->repl;
    uint64_t point = r->failover_point;
    vm_op_begin(vm, VM_OP_FAILOVER);
    if (r->failover_step == FO_RUNNING)
        rc = set_step(r, FO_COMPLETING);
    if (rc == 0) {
        vr_fault_point("failover-complete-marked");
        rc = complete_steps(vm, force);
    }
    if (rc == 0) {
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "point",
                               json_object_new_int64((int64_t)point));
        json_object_object_add(*out, "state",
                               json_object_new_string(repl_st_name(r->st)));
        json_object_object_add(*out, "epoch",
                               json_object_new_int64((int64_t)r->epoch));
    } else {
        event_add(rctx.d->cat, "error", vm->name,
                  "failover complete: %s (it goes on "
                  "with the next 'failover complete' or at a restart)",
                  vr_errmsg());
    }
    vm_op_end(vm, VM_OP_FAILOVER);
    pthread_cond_broadcast(&rctx.d->cond);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}
