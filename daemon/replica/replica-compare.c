/* replica-compare.c: the Replica server's side of an initial replication
 * that compares instead of copying (SPEC §5: the copy `replication remove`
 * kept, or a backup restored into the Replica VM's storage).
 *
 *   POST /r1/vms/UUID/initial  {"method": "full" | "compare" | "import"}
 *       The primary starts an initial replication afresh.  "full" sends
 *       only its allocated regions, so a kept copy is reset to zeroes
 *       before the first piece (reset_pending); "compare" keeps the copy:
 *       the primary sends what differs, holes included; "import": the
 *       copy comes on external media (replica-import.c), and only then
 *       initial-complete.
 *   POST /r1/vms/UUID/hashes   {"disk": D, "offset": O, "length": L,
 *                               "chunk": C}
 *       -> {"chunk": C, "count": N, "hashes": "<hex>"}: XXH3-128 of each
 *       chunk of that range of the Replica VM's disk (lib/chunkhash.h has
 *       the bounds: at most 4096 chunks and 1 GiB per request).
 *
 *   POST /r1/vms/UUID/resync   {"from": L + 1, "void_to": C}
 *       -> {"applied_cycle": A}: a resynchronization starts (resync.c on
 *       the primary): the VM is held at the cycle it applied, A (at least
 *       L), staged cycles after A are dropped, the next cycle expected is
 *       A + 1; hashes are then of the disks at A.
 *   POST /r1/vms/UUID/resync-complete  {"first_point": F, "void_to": C}
 *       cycles A + 1 .. C are staged: no recovery point before F, and
 *       A + 1 .. F are applied in one run once F is staged.
 *
 * Both only during the initial replication (or the resynchronization),
 * from the VM's own primary.
 * Why the replica stays consistent: before initial-complete the Replica
 * VM has no recovery point and cannot be failed over to; the pieces the
 * comparison sends and the cycles after the base make it equal to the
 * primary at the first point, exactly as a full copy does.
 */
#include "replica-int.h"

#include "chunkhash.h"

/* The VM of q during its initial replication (or, resync, a
 * resynchronization), with no transfer running. */
static int
compare_vm(struct rreq *q, struct vm **vm, bool resync)
{
    int rc = own_vm(q, vm);
    if (rc == 0 && (*vm)->repl->initial_done && !resync)
        rc = vr_err(-EPROTO, "replica vm %s: initial replication is already "
                             "complete", (*vm)->name);
    if (rc == 0 && !(*vm)->repl->initial_done && resync)
        rc = vr_err(-EPROTO, "replica vm %s: initial replication has not "
                             "completed", (*vm)->name);
    if (rc == 0 && vm_busy(*vm, VM_OP_RECEIVE | VM_OP_APPLY))
        rc = vr_err(-EBUSY, "replica vm %s: another transfer is in progress",
                    (*vm)->name);
    return rc;
}

int
do_initial_begin(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    json_object *v;
    const char *method = NULL;
    if (b && json_object_object_get_ex(b, "method", &v) &&
        json_object_is_type(v, json_type_string))
        method = json_object_get_string(v);
    bool compare = method && strcmp(method, "compare") == 0;
    bool import = method && strcmp(method, "import") == 0;
    /* The primary takes "unsynced" answers to base chunks (replica.c,
     * upload_finish); one that does not say so gets each chunk synced
     * before its answer. */
    bool defer = b && json_object_object_get_ex(b, "defer_sync", &v) &&
                 json_object_is_type(v, json_type_boolean) &&
                 json_object_get_boolean(v);
    int rc = 0;
    if (!method || (!compare && !import && strcmp(method, "full") != 0))
        rc = vr_err(-EINVAL, "initial: method must be \"full\", "
                             "\"compare\" or \"import\"");
    json_object_put(b);
    if (rc < 0)
        return rc;

    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    rc = compare_vm(q, &vm, false);
    enum initial_method m = compare  ? INITIAL_COMPARE
                            : import ? INITIAL_EXPORT
                                     : INITIAL_FULL;
    /* A fresh start forgets an earlier import; an import resets nothing
     * (it writes every disk whole). */
    if (rc == 0)
        vm->repl->base_defer_sync = defer;
    if (rc == 0 && (vm->repl->initial_method != m || vm->repl->imported_base)) {
        vm->repl->initial_method = m;
        vm->repl->imported_base = 0;
        rc = catalog_save_repl(rctx.d->cat, vm->repl);
    }
    if (rc == 0 && !import && vm->repl->reset_pending == compare) {
        vm->repl->reset_pending = !compare;
        rc = catalog_save_repl(rctx.d->cat, vm->repl);
        if (rc < 0)
            vm->repl->reset_pending = compare;
    }
    if (rc == 0) {
        event_add(rctx.d->cat, "info", vm->name,
                  compare ? "initial replication by comparison: the disks "
                            "here are kept and only what differs is received"
                  : import ? "initial replication by external media: "
                             "waiting for 'initial-replication import'"
                           : "full initial replication: the disks here are "
                             "reset before the first piece");
        *out = replica_status_json(vm);
    }
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

/* The non-negative integers keys[0..n) of q's JSON body into out, or
 * -EINVAL naming the endpoint (what) and the first one missing. */
static int
body_ints(const struct rreq *q, const char *what, const char *const keys[],
          int64_t out[], size_t n)
{
    json_object *b = r1_json_parse(q->body, q->len), *v;
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++)
        if (!b || !json_object_object_get_ex(b, keys[i], &v) ||
            !json_object_is_type(v, json_type_int) ||
            (out[i] = json_object_get_int64(v)) < 0)
            rc = vr_err(-EINVAL, "%s: %s missing or negative", what, keys[i]);
    json_object_put(b);
    return rc;
}

int
do_hashes(struct rreq *q, json_object **out)
{
    static const char *const keys[] = { "disk", "offset", "length", "chunk" };
    int64_t v[4] = { 0 };
    int rc = body_ints(q, "hashes", keys, v, 4);
    if (rc < 0)
        return rc;
    int64_t disk = v[0], offset = v[1], length = v[2], chunk = v[3];

    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = vm_find_uuid(rctx.d, q->uuid);
    /* During a resynchronization the disks are held at a cycle (below). */
    bool resync = vm && vm->repl && vm->repl->initial_done;
    if (resync && vm->repl->hold_from == 0) {
        rc = vr_err(-EPROTO, "replica vm %s: initial replication is already "
                             "complete", vm->name);
        resync = false;
    }
    if (rc == 0)
        rc = compare_vm(q, &vm, resync);
    if (rc == 0 && resync && vm->repl->applied_cycle + 1 != vm->repl->hold_from)
        rc = vr_err(-EPROTO, "hashes: replica vm %s is not held for a "
                    "resynchronization", vm->name);
    if (rc == 0 && (uint64_t)disk >= vm->ndisks)
        rc = vr_err(-EINVAL, "hashes: replica vm %s has no disk %lld",
                    vm->name, (long long)disk);
    uint64_t size = rc == 0 ? vm->disks[disk].size : 0;
    if (rc == 0 && (rc = chunkhash_check(size, (uint64_t)offset,
                                         (uint64_t)length,
                                         (uint64_t)chunk)) < 0)
        rc = vr_err(rc, "hashes: %s", vr_errmsg());
    /* A reset still pending would turn this copy into zeroes: hashes of
     * it would lie.  The primary says "compare" first. */
    if (rc == 0 && vm->repl->reset_pending)
        rc = vr_err(-EPROTO, "hashes: replica vm %s is to be reset for a "
                             "full initial replication", vm->name);
    int fd = -1;
    if (rc == 0) {
        fd = storage_open(vm->dir, vm->disks[disk].path, O_RDONLY, 0);
        rc = fd < 0 ? fd : 0;
    }
    /* No apply or upload while we read (VM_OP_RECEIVE excludes them); the
     * lock is not held for the reading. */
    bool busy = rc == 0;
    if (busy)
        vm_op_begin(vm, VM_OP_RECEIVE);
    pthread_mutex_unlock(&rctx.d->lock);
    if (rc == 0)
        rc = mem_charge(q, 2u << 20, false); /* read buffer and hashes */
    uint64_t n = chunkhash_count(size, (uint64_t)offset, (uint64_t)length,
                                 (uint64_t)chunk);
    uint8_t *h = rc == 0 ? xmalloc(n * CHUNKHASH_BYTES) : NULL;
    if (rc == 0)
        rc = chunkhash_fd(fd, size, (uint64_t)offset, (uint64_t)length,
                          (uint64_t)chunk, h, NULL);
    if (fd >= 0)
        close(fd);
    if (busy) {
        pthread_mutex_lock(&rctx.d->lock);
        if ((vm = vm_find_uuid(rctx.d, q->uuid)) != NULL)
            vm_op_end(vm, VM_OP_RECEIVE);
        pthread_mutex_unlock(&rctx.d->lock);
    }
    if (rc == 0) {
        char *hex = chunkhash_hex(h, n);
        *out = json_object_new_object();
        json_object_object_add(*out, "chunk", json_object_new_int64(chunk));
        json_object_object_add(*out, "count",
                               json_object_new_int64((int64_t)n));
        json_object_object_add(*out, "hashes", json_object_new_string(hex));
        free(hex);
    }
    free(h);
    return rc;
}

/* Drop staged cycles after a (void, or to be replaced) and expect a + 1. */
static int
drop_staged_after(struct vm *vm, uint64_t a)
{
    struct repl *r = vm->repl;
    if (r->last_cycle <= a) {
        r->last_cycle = a;
        return 0;
    }
    CLEANUP_FREE char *stg = staging_dir(r);
    int sfd = storage_open(vm->dir, stg, O_RDONLY | O_DIRECTORY, 0);
    if (sfd < 0)
        return sfd;
    int rc = 0;
    for (uint64_t n = a + 1; rc == 0 && n <= r->last_cycle; n++) {
        CLEANUP_FREE char *p = cycle_path(r, n);
        if (unlinkat(sfd, strrchr(p, '/') + 1, 0) < 0 && errno != ENOENT)
            rc = vr_err(-errno, "remove %s: %s", p, strerror(errno));
    }
    close(sfd);
    if (rc == 0)
        r->last_cycle = a;
    return rc;
}

int
do_resync_begin(struct rreq *q, json_object **out)
{
    static const char *const keys[] = { "from", "void_to" };
    int64_t v[2] = { 0 };
    int rc = body_ints(q, "resync", keys, v, 2);
    int64_t from = v[0], void_to = v[1];
    if (rc == 0 && (from < 1 || void_to < from || void_to >= INT64_MAX / 2))
        rc = vr_err(-EINVAL, "resync: from %lld and void_to %lld out of "
                    "range", (long long)from, (long long)void_to);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    rc = compare_vm(q, &vm, true);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && r->st != REPL_ST_REPLICATING)
        rc = vr_err(-EBUSY, "replica vm %s: cannot resynchronize in state %s",
                    vm->name, repl_st_name(r->st));
    uint64_t a = rc == 0 ? (r->hold_from ? r->hold_from - 1
                                         : r->applied_cycle) : 0;
    /* Every cycle the primary had acknowledged is applied first. */
    if (rc == 0 && !r->hold_from && a + 1 < (uint64_t)from)
        rc = vr_err(-EAGAIN, "replica vm %s: applying cycles %llu to %llu "
                    "before the resynchronization", vm->name,
                    (unsigned long long)a + 1,
                    (unsigned long long)from - 1);
    if (rc == 0 && a >= (uint64_t)void_to)
        rc = vr_err(-EPROTO, "replica vm %s: at cycle %llu, past the void "
                    "cycle %lld", vm->name, (unsigned long long)a,
                    (long long)void_to);
    if (rc == 0) {
        bool fresh = r->hold_from == 0;
        uint64_t last = r->last_cycle;
        r->hold_from = a + 1;
        r->hold_to = 0;
        rc = drop_staged_after(vm, a);
        if (rc == 0)
            rc = catalog_save_repl(rctx.d->cat, r);
        if (rc < 0) {
            r->last_cycle = last;
            if (fresh)
                r->hold_from = 0;
        } else if (fresh) {
            event_add(rctx.d->cat, "info", vm->name,
                      "resynchronization by primary %s: the Replica VM "
                      "stays at cycle %llu until the new cut is received "
                      "whole; its recovery points are kept", q->peer,
                      (unsigned long long)a);
        }
    }
    if (rc == 0) {
        *out = json_object_new_object();
        json_object_object_add(*out, "applied_cycle",
                               json_object_new_int64((int64_t)a));
    }
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

int
do_resync_complete(struct rreq *q, json_object **out)
{
    static const char *const keys[] = { "first_point", "void_to" };
    int64_t v[2] = { 0 };
    int rc = body_ints(q, "resync-complete", keys, v, 2);
    int64_t first = v[0], void_to = v[1];
    if (rc == 0 && (first <= void_to || first - void_to > INT32_MAX))
        rc = vr_err(-EINVAL, "resync-complete: first_point %lld is not after "
                    "void_to %lld (or too far)", (long long)first,
                    (long long)void_to);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    rc = compare_vm(q, &vm, true);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    bool again = rc == 0 && !r->hold_from && r->first_point == (uint64_t)first;
    if (rc == 0 && !again && !r->hold_from)
        rc = vr_err(-EPROTO, "resync-complete: replica vm %s is not "
                    "resynchronizing", vm->name);
    if (rc == 0 && !again && r->last_cycle < (uint64_t)void_to)
        rc = vr_err(-EPROTO, "resync-complete: replica vm %s has cycles up "
                    "to %llu, not %lld", vm->name,
                    (unsigned long long)r->last_cycle, (long long)void_to);
    if (rc == 0 && !again) {
        uint64_t f0 = r->first_point;
        r->first_point = (uint64_t)first;
        r->hold_to = (uint64_t)first;
        rc = catalog_save_repl(rctx.d->cat, r);
        if (rc < 0) {
            r->first_point = f0;
            r->hold_to = 0;
        } else {
            event_add(rctx.d->cat, "info", vm->name,
                      "resynchronization received: cycles %llu to %lld are "
                      "applied together once cycle %lld is here",
                      (unsigned long long)r->hold_from, (long long)first,
                      (long long)first);
            pthread_cond_broadcast(&rctx.d->cond);
        }
    }
    if (rc == 0)
        *out = replica_status_json(vm);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}
