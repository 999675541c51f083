/* replica-compare.c: the Replica server's side of an initial replication
 * that compares instead of copying (SPEC §5: the copy `replication remove`
 * kept, or a backup restored into the Replica VM's storage).
 *
 *   POST /r1/vms/UUID/initial  {"method": "full" | "compare"}
 *       The primary starts an initial replication afresh.  "full" sends
 *       only its allocated regions, so a kept copy is reset to zeroes
 *       before the first piece (reset_pending); "compare" keeps the copy:
 *       the primary sends what differs, holes included.
 *   POST /r1/vms/UUID/hashes   {"disk": D, "offset": O, "length": L,
 *                               "chunk": C}
 *       -> {"chunk": C, "count": N, "hashes": "<hex>"}: XXH3-128 of each
 *       chunk of that range of the Replica VM's disk (lib/chunkhash.h has
 *       the bounds: at most 4096 chunks and 1 GiB per request).
 *
 * Both only during the initial replication, from the VM's own primary.
 * Why the replica stays consistent: before initial-complete the Replica
 * VM has no recovery point and cannot be failed over to; the pieces the
 * comparison sends and the cycles after the base make it equal to the
 * primary at the first point, exactly as a full copy does.
 */
#include "replica-int.h"

#include "chunkhash.h"

/* The VM of q during its initial replication, with no transfer running. */
static int
initial_vm(struct rreq *q, struct vm **vm)
{
    int rc = own_vm(q, vm);
    if (rc == 0 && (*vm)->repl->initial_done)
        rc = vr_err(-EPROTO, "replica vm %s: initial replication is already "
                             "complete", (*vm)->name);
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
    int rc = 0;
    if (!method || (!compare && strcmp(method, "full") != 0))
        rc = vr_err(-EINVAL, "initial: method must be \"full\" or "
                             "\"compare\"");
    json_object_put(b);
    if (rc < 0)
        return rc;

    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    rc = initial_vm(q, &vm);
    if (rc == 0 && vm->repl->reset_pending == compare) {
        vm->repl->reset_pending = !compare;
        rc = catalog_save_repl(D->cat, vm->repl);
        if (rc < 0)
            vm->repl->reset_pending = compare;
    }
    if (rc == 0) {
        event_add(D->cat, "info", vm->name,
                  compare ? "initial replication by comparison: the disks "
                            "here are kept and only what differs is received"
                          : "full initial replication: the disks here are "
                            "reset before the first piece");
        *out = replica_status_json(vm);
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

static int
int_field(json_object *b, const char *key, int64_t *out)
{
    json_object *v;
    if (!b || !json_object_object_get_ex(b, key, &v) ||
        !json_object_is_type(v, json_type_int) ||
        (*out = json_object_get_int64(v)) < 0)
        return vr_err(-EINVAL, "hashes: %s missing or negative", key);
    return 0;
}

int
do_hashes(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    int64_t disk = 0, offset = 0, length = 0, chunk = 0;
    int rc = int_field(b, "disk", &disk);
    if (rc == 0)
        rc = int_field(b, "offset", &offset);
    if (rc == 0)
        rc = int_field(b, "length", &length);
    if (rc == 0)
        rc = int_field(b, "chunk", &chunk);
    json_object_put(b);
    if (rc < 0)
        return rc;

    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    rc = initial_vm(q, &vm);
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
    pthread_mutex_unlock(&D->lock);
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
        pthread_mutex_lock(&D->lock);
        if ((vm = vm_find_uuid(q->uuid)) != NULL)
            vm_op_end(vm, VM_OP_RECEIVE);
        pthread_mutex_unlock(&D->lock);
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
