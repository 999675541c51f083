/* replica-apply.c: staged cycles and the applier.
 *
 * Crash safety: a cycle is received into staging/N.tmp, validated, fsynced
 * and renamed to staging/N.cycle before it is acknowledged; the applier
 * applies N.cycle to the disks, fdatasyncs them, and only then records N as
 * applied in the catalog and deletes the file.  A crash at any step is
 * repaired at start-up by applying N again from the start (idempotent), before
 * the management socket opens, so the disks are only ever seen at a cycle
 * boundary. */
#include "replica-int.h"

/* The disks beneath the storage location, never through a link. */
static int
open_disks(const struct vm *vm, int *fds)
{
    for (unsigned i = 0; i < vm->ndisks; i++) {
        fds[i] = storage_open(vm->dir, vm->disks[i].path, O_RDWR, 0);
        if (fds[i] < 0) {
            int rc = fds[i];
            while (i-- > 0)
                close(fds[i]);
            return rc;
        }
    }
    return 0;
}

/* Apply the payload in pfd to the VM's disks.  Runs without d->lock; vm's
 * disk table is immutable while it is a Replica VM. */
int
apply_payload_fd(const struct vm *vm, int pfd, uint64_t *nrec, bool unsynced)
{
    int fds[MAX_DISKS];
    uint64_t sizes[MAX_DISKS];
    for (unsigned i = 0; i < vm->ndisks; i++)
        sizes[i] = vm->disks[i].size;
    int rc = open_disks(vm, fds);
    if (rc == 0) {
        rc = unsynced
                 ? cyc_apply_file_unsynced(pfd, fds, sizes, vm->ndisks, nrec)
                 : cyc_apply_file(pfd, fds, sizes, vm->ndisks, nrec);
        for (unsigned i = 0; i < vm->ndisks; i++)
            close(fds[i]);
    }
    return rc;
}

int
sync_disks(const struct vm *vm)
{
    int fds[MAX_DISKS];
    int rc = open_disks(vm, fds);
    if (rc < 0)
        return rc;
    for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++)
        if (fdatasync(fds[i]) < 0)
            rc = vr_err(-errno, "sync %s: %s", vm->disks[i].path,
                        strerror(errno));
    for (unsigned i = 0; i < vm->ndisks; i++)
        close(fds[i]);
    return rc;
}

/* The same from a staged file. */
static int
apply_payload(const struct vm *vm, const char *path, uint64_t *nrec)
{
    int pfd = storage_open(vm->dir, path, O_RDONLY, 0);
    if (pfd < 0)
        return pfd;
    int rc = apply_payload_fd(vm, pfd, nrec, false);
    close(pfd);
    return rc;
}

char *
staging_dir(const struct repl *r)
{
    return xasprintf("%s/staging", r->storage);
}

char *
cycle_path(const struct repl *r, uint64_t n)
{
    return xasprintf("%s/staging/%020llu.cycle", r->storage,
                     (unsigned long long)n);
}

/* Delete every file in the VM's staging directory (a link in its place is
 * refused, not followed). */
int
clear_staging(const struct repl *r)
{
    CLEANUP_FREE char *stg = staging_dir(r);
    int n = storage_clear_dir(r->storage, stg);
    return n < 0 ? n : 0;
}

/* --- applier -------------------------------------------------------------- */

/* Test hook: with $VMREPLICA_TEST_APPLYLOG set, append "<cycle> <disk id>
 * <sha256>" per disk after every applied cycle, the same lines the data
 * plane's hashlog writes at each seal on the primary, so a test can check
 * that every state the Replica VM passes through is the primary's state at
 * that cycle's seal. */
static void
test_applylog(const struct vm *vm, uint64_t n)
{
    const char *log = getenv("VMREPLICA_TEST_APPLYLOG");
    if (!log || !*log)
        return;
    FILE *f = fopen(log, "a");
    if (!f)
        return;
    for (unsigned i = 0; i < vm->ndisks; i++) {
        int fd = storage_open(vm->dir, vm->disks[i].path, O_RDONLY, 0);
        gnutls_hash_hd_t h;
        if (fd < 0 || gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0) {
            if (fd >= 0)
                close(fd);
            break;
        }
        uint8_t *buf = xmalloc(1 << 20);
        ssize_t r;
        while ((r = read(fd, buf, 1 << 20)) > 0)
            gnutls_hash(h, buf, (size_t)r);
        free(buf);
        close(fd);
        uint8_t md[32];
        gnutls_hash_deinit(h, md);
        fprintf(f, "%llu %s ", (unsigned long long)n, vm->disks[i].id);
        for (int k = 0; k < 32; k++)
            fprintf(f, "%02x", md[k]);
        fputc('\n', f);
    }
    fclose(f);
}

/* The header of a staged cycle (zeroes if unreadable: applying it will
 * say why). */
static struct cyc_hdr
staged_hdr(const struct vm *vm, const char *path)
{
    uint8_t buf[CYC_HDR_BYTES];
    struct cyc_hdr h = { 0 };
    int fd = storage_open(vm->dir, path, O_RDONLY, 0);
    if (fd < 0) {
        vr_err_clear();
        return h;
    }
    ssize_t n = pread(fd, buf, sizeof buf, 0);
    close(fd);
    if (n != (ssize_t)sizeof buf || cyc_hdr_decode(buf, &h) < 0) {
        vr_err_clear();
        memset(&h, 0, sizeof h);
    }
    return h;
}

/* Remove an applied cycle's file from staging (a link on the way is not
 * followed: the staging directory is opened beneath the storage). */
static void
unlink_staged(const struct vm *vm, const char *path)
{
    CLEANUP_FREE char *stg = staging_dir(vm->repl);
    int sfd = storage_open(vm->dir, stg, O_RDONLY | O_DIRECTORY, 0);
    if (sfd < 0) {
        log_warn("applier", "%s: %s", vm->name, vr_errmsg());
        vr_err_clear();
        return;
    }
    unlinkat(sfd, strrchr(path, '/') + 1, 0);
    close(sfd);
}

/* A resynchronization holds the VM at hold_from - 1 until its cut (hold_to)
 * is staged whole: then hold_from .. hold_to are applied in a row and the
 * hold ends (resync.c has why). */
static bool
held(const struct repl *r)
{
    return r->hold_from && r->applied_cycle + 1 >= r->hold_from &&
           (!r->hold_to || r->last_cycle < r->hold_to);
}

/* Apply cycle n of vm from staging, then record it.  Called without the
 * lock; takes it to record. */
static int
apply_one(struct vm *vm, uint64_t n, bool locked)
{
    CLEANUP_FREE char *path = cycle_path(vm->repl, n);
    uint64_t nrec = 0;
    uint64_t t0 = vr_mono_ms();
    /* While the lock is dropped, VM_OP_APPLY keeps the VM and its
     * replication from being removed under us. */
    vm_op_begin(vm, VM_OP_APPLY);
    if (locked)
        pthread_mutex_unlock(&rctx.d->lock);
    struct cyc_hdr sh = staged_hdr(vm, path);
    bool app = (sh.flags & CYC_F_APP) != 0;
    int rc = history_capture(vm, n, path);
    uint64_t t_cap = vr_mono_ms() - t0;
    if (rc == 0)
        rc = failover_test_refresh(vm, n);
    if (rc == 0)
        rc = apply_payload(vm, path, &nrec);
    if (rc == 0) {
        /* Tests: each apply lingers (a slow disk), so a removal meets
         * an apply in progress. */
        vr_test_delay("VMREPLICA_TEST_APPLY_DELAY_MS", 60000);
        test_applylog(vm, n);
        vr_fault_point("apply-before-commit");
    }
    pthread_mutex_lock(&rctx.d->lock);
    if (rc == 0) {
        vm->repl->applied_cycle = n;
        vm->repl->last_ok_ms = vr_wall_ms();
        bool held_end = vm->repl->hold_to && n >= vm->repl->hold_to;
        if (held_end)
            vm->repl->hold_from = vm->repl->hold_to = 0;
        rc = catalog_save_repl(rctx.d->cat, vm->repl);
        if (rc == 0 && held_end)
            event_add(rctx.d->cat, "info", vm->name, "resynchronization applied: "
                      "the Replica VM is at cycle %llu",
                      (unsigned long long)n);
    }
    if (rc == 0) {
        unlink_staged(vm, path);
        log_debug("applier", "%s: applied cycle %llu (%llu records, %llu ms, "
                  "%llu of them capturing undo data)",
                  vm->name, (unsigned long long)n, (unsigned long long)nrec,
                  (unsigned long long)(vr_mono_ms() - t0),
                  (unsigned long long)t_cap);
        /* The cycle is applied whatever happens to its point: a failure
         * here is retried by history_recover at the next start. */
        if (history_after_apply(vm, n, app, (uint64_t)sh.cut_s * 1000) < 0) {
            event_add(rctx.d->cat, "warning", vm->name,
                      "recovery history after cycle "
                      "%llu: %s",
                      (unsigned long long)n, vr_errmsg());
            vr_err_clear();
        }
        pthread_cond_broadcast(&rctx.d->cond);
    } else {
        vm->repl->errors++;
        free(vm->repl->last_error);
        vm->repl->last_error = xstrdup(vr_errmsg());
        event_add(rctx.d->cat, "error", vm->name, "apply cycle %llu: %s",
                  (unsigned long long)n, vr_errmsg());
    }
    vm_op_end(vm, VM_OP_APPLY);
    pthread_cond_broadcast(&rctx.d->cond);
    if (!locked)
        pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

int
replica_recover(void)
{
    for (struct vm *vm = rctx.d->vms; vm; vm = vm->next) {
        struct repl *r = vm->repl;
        if (vm->mode != VM_MODE_REPLICA || !r || !r->storage)
            continue;
        CLEANUP_FREE char *stg = staging_dir(r);
        int sfd = storage_open(r->storage, stg, O_RDONLY | O_DIRECTORY, 0);
        DIR *dir = sfd >= 0 ? fdopendir(sfd) : NULL;
        if (sfd < 0 && sfd != -ENOENT)
            log_warn("applier", "%s: %s", vm->name, vr_errmsg());
        if (sfd >= 0 && !dir)
            close(sfd);
        vr_err_clear();
        if (dir) {
            struct dirent *de;
            while ((de = readdir(dir))) {
                size_t n = strlen(de->d_name);
                bool tmp = n > 4 && strcmp(de->d_name + n - 4, ".tmp") == 0;
                unsigned long long c = strtoull(de->d_name, NULL, 10);
                bool old = n == 26 && strcmp(de->d_name + 20, ".cycle") == 0 &&
                           c <= r->applied_cycle;
                if (tmp || old)
                    unlinkat(dirfd(dir), de->d_name, 0);
            }
            closedir(dir);
        }
        if (failover_recover(vm) < 0) {
            log_warn("failover", "%s: failover: %s", vm->name,
                     vr_errmsg());
            vr_err_clear();
        }
        if (history_recover(vm) < 0) {
            log_warn("applier", "%s: recovery history: %s", vm->name,
                     vr_errmsg());
            vr_err_clear();
        }
        /* A failover's view must not change under it. */
        while (r->initial_done && r->applied_cycle < r->last_cycle &&
               !r->failover_point && !held(r)) {
            uint64_t n = r->applied_cycle + 1;
            log_info("applier", "%s: recovering: applying staged cycle %llu",
                     vm->name, (unsigned long long)n);
            int rc = apply_one(vm, n, true);
            if (rc < 0) {
                /* In memory only: the next start tries again. */
                VR_IGNORE(repl_transition(rctx.d->cat, vm, REPL_ST_ERROR, 0));
                break;
            }
        }
    }
    return 0;
}

static bool applier_stop;

static void *
applier_main(void *arg VR_UNUSED)
{
    vr_thread_name("applier");
    pthread_mutex_lock(&rctx.d->lock);
    while (!applier_stop) {
        struct vm *todo = NULL;
        uint64_t now = vr_mono_ms(), next_retry = 0;
        for (struct vm *vm = rctx.d->vms; vm && !todo; vm = vm->next) {
            struct repl *r = vm->repl;
            if (vm->mode != VM_MODE_REPLICA || !r || !r->initial_done ||
                r->st != REPL_ST_REPLICATING ||
                r->applied_cycle >= r->last_cycle || vm_busy(vm, VM_OP_TEST) ||
                held(r))
                continue;
            if (r->apply_retry_ms > now) {
                if (!next_retry || r->apply_retry_ms < next_retry)
                    next_retry = r->apply_retry_ms;
                continue;
            }
            todo = vm;
        }
        if (!todo) {
            if (next_retry) {
                daemon_wait_ms(rctx.d, next_retry - now);
            } else {
                pthread_cond_wait(&rctx.d->cond, &rctx.d->lock);
            }
            continue;
        }
        struct repl *r = todo->repl;
        int rc = apply_one(todo, r->applied_cycle + 1, true);
        if (!todo->repl)
            continue; /* removed meanwhile */
        r = todo->repl;
        if (rc == -ENOSPC || rc == -EDQUOT || rc == -EAGAIN) {
            /* A full Replica disk is recoverable (SPEC §4): the staged
             * cycle stays, applying again from its start is idempotent.
             * Retry every frequency, at least 1 s and at most 30 s. */
            uint64_t delay_ms = (uint64_t)r->frequency_s * 1000;
            if (delay_ms < 1000 || delay_ms > 30000)
                delay_ms = delay_ms < 1000 ? 1000 : 30000;
            r->apply_retry_ms = vr_mono_ms() + delay_ms;
            log_warn("applier", "%s: %s; retrying in %llu s", todo->name,
                     rc == -EAGAIN ? "the test failover's view is not "
                                     "answering"
                                   : "replica storage full",
                     (unsigned long long)delay_ms / 1000);
        } else if (rc < 0) {
            VR_IGNORE(
                repl_transition(rctx.d->cat, todo, REPL_ST_ERROR, REPL_T_SAVE));
        } else {
            r->apply_retry_ms = 0;
        }
    }
    pthread_mutex_unlock(&rctx.d->lock);
    return NULL;
}

int
replica_applier_start(void)
{
    applier_stop = false;
    if (pthread_create(&rctx.d->applier, NULL, applier_main, NULL) != 0)
        return vr_err(-EAGAIN, "start applier thread");
    return 0;
}

void
replica_applier_stop(void)
{
    pthread_mutex_lock(&rctx.d->lock);
    applier_stop = true;
    pthread_cond_broadcast(&rctx.d->cond);
    pthread_mutex_unlock(&rctx.d->lock);
    pthread_join(rctx.d->applier, NULL);
}
