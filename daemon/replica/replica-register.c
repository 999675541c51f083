/* replica-register.c: the replication protocol's JSON endpoints on the
 * Replica server — registration (creating or updating the Replica VM,
 * checking its owner and trust group), reverse replication of a prepared
 * primary, initial-complete, prepared and remove.  Each runs at the end of
 * its request's body, under the daemon's lock. */
#include "replica-int.h"
#include "proc/vmproc.h"

/* --- request handlers (JSON ones run at the end of the body) ------------- */

/* The primary's recovery-history settings travel with each request. */
void
take_history(struct repl *r, const struct rreq *q)
{
    if (!q->has_history)
        return;
    r->recovery_history = q->history;
    r->point_interval_s = q->interval_s;
}

/* Reverse replication (planned.c): the Replica server we prepared a
 * failover to registers the VM the other way round, "reverse_of": N.  If
 * this primary VM is prepared at exactly cycle N, both sides hold the same
 * disks: it becomes a Replica VM of that server as it is, with no reset
 * and no copy.  After an unplanned failover ("reverse_unplanned") the
 * disks differ by what neither side shipped; the VM must not run here,
 * and it becomes a Replica VM that keeps its disks for the initial
 * replication by comparison the sender then runs, which sends only the
 * chunks that differ.  The same registration again (a lost answer) is
 * accepted as is.  d->lock not held. */
/* Are vm's disks served here (nbdkit, with or without QEMU)?  d->lock
 * held. */
static bool
served_here(const struct vm *vm)
{
    CLEANUP_FREE char *rundir = vm_rundir(rctx.d, vm);
    bool served = false, running = false;
    vmproc_status(rundir, &served, &running);
    return served || running;
}

static int
do_reverse(struct rreq *q, const struct r1_reg *reg, json_object **out)
{
    int64_t reverse_of = reg->reverse_of;
    size_t nd = reg->ndisks;
    const uint64_t *sizes = reg->sizes;
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = vm_find_uuid(rctx.d, q->uuid);
    struct repl *r = vm ? vm->repl : NULL;
    int rc = 0;
    bool again = vm && r && vm->mode == VM_MODE_REPLICA &&
                 r->primary_server && strcmp(r->primary_server, q->peer) == 0 &&
                 r->epoch == q->epoch;
    size_t hl = r && r->replica_server ? strcspn(r->replica_server, ":") : 0;
    if (!again) {
        if (!vm || !r || vm->mode != VM_MODE_PRIMARY ||
            r->mode != VM_MODE_PRIMARY)
            rc = vr_err(-EPERM, "register: reverse replication of vm %s: "
                        "it is not a primary VM here", q->uuid);
        else if (hl != strlen(q->peer) ||
                 strncmp(r->replica_server, q->peer, hl) != 0)
            rc = vr_err(-EPERM, "register: reverse replication of vm %s: "
                        "it replicates to %s, not %s", vm->name,
                        r->replica_server, q->peer);
        else if (reg->reverse_unplanned && served_here(vm))
            rc = vr_err(-EBUSY, "register: reverse replication of vm %s "
                        "refused: its disks are served here, so it may "
                        "still run here; run 'vmreplica vm stop %s' on %s, "
                        "then 'vmreplica replication reverse %s' on %s "
                        "again", vm->name, vm->name,
                        rctx.d->cfg.hostname, vm->name, q->peer);
        else if (!reg->reverse_unplanned &&
                 (r->st != REPL_ST_PREPARED || reverse_of <= 0 ||
                  r->prepared_cycle != (uint64_t)reverse_of))
            rc = vr_err(-EPERM, "register: reverse replication of vm %s at "
                        "cycle %lld refused: it is %s here (prepared at "
                        "%llu); only a VM prepared with 'failover prepare' "
                        "is reversed without resynchronization", vm->name,
                        (long long)reverse_of, repl_st_name(r->st),
                        (unsigned long long)r->prepared_cycle);
        else if (q->epoch <= r->epoch)
            rc = vr_err(-ESTALE, "register: epoch %llu is not newer than "
                        "%llu", (unsigned long long)q->epoch,
                        (unsigned long long)r->epoch);
        else if (vm->ndisks != nd)
            rc = vr_err(-EINVAL, "register: vm %s has %u disks here, not %zu",
                        vm->name, vm->ndisks, nd);
        for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++)
            if (sizes[i] != vm->disks[i].size)
                rc = vr_err(-EINVAL, "register: vm %s: disk %u is %llu "
                            "bytes here, not %llu", vm->name, i,
                            (unsigned long long)vm->disks[i].size,
                            (unsigned long long)sizes[i]);
        if (rc == 0 &&
            vm_busy(vm, VM_OP_CHANGE | VM_OP_PREPARE | VM_OP_REMOVE))
            rc = vr_err(-EBUSY, "register: vm %s: a change is in progress",
                        vm->name);
        if (rc == 0) {
            /* Its disks are not served (prepare stopped them). */
            rctx.hooks.shipper_stop(vm);
            CLEANUP_FREE char *stg = xasprintf("%s/staging", vm->dir);
            rc = storage_mkdir(vm->dir, stg);
            if (rc < 0)
                rc = vr_err(rc, "register: %s", vr_errmsg());
        }
        if (rc == 0) {
            vr_fault_point("reverse-accepting");
            vm->mode = VM_MODE_REPLICA;
            r->mode = VM_MODE_REPLICA;
            free(r->primary_server);
            r->primary_server = xstrdup(q->peer);
            free(r->storage);
            r->storage = xstrdup(vm->dir);
            free(r->trust_group);
            r->trust_group = xstrdup(q->group ? q->group : "");
            free(vm->owner);
            vm->owner = xstrdup(q->peer);
            free(vm->owner_group);
            vm->owner_group = xstrdup(r->trust_group);
            r->reset_pending = false;
            free(r->auth);
            r->auth = q->krb ? xstrdup("kerberos") : NULL;
            r->krb_encrypt = q->wrapped;
            r->epoch = q->epoch;
            r->initial_done = false;
            r->base_cycle = r->applied_cycle = r->last_cycle = 0;
            r->prepared_cycle = 0;
            /* What it did as a primary is over (its unshipped cycles
             * are in its disks, which the comparison covers). */
            r->untracked = false;
            r->resync_step = RESYNC_NONE;
            r->hold_from = r->hold_to = 0;
            take_history(r, q);
            if (reg->frequency_s)
                r->frequency_s = reg->frequency_s;
            rc = repl_transition(rctx.d->cat, vm, REPL_ST_WAITING_INITIAL, 0);
            if (rc == 0)
                rc = catalog_begin(rctx.d->cat);
            if (rc == 0) {
                rc = history_reset(vm);
                if (rc == 0)
                    rc = catalog_save_vm(rctx.d->cat, vm);
                if (rc == 0)
                    rc = catalog_save_repl(rctx.d->cat, r);
                rc = catalog_end(rctx.d->cat, rc);
            }
            if (rc == 0 && reg->reverse_unplanned)
                event_add(rctx.d->cat, "info", vm->name,
                          "replication reversed by %s (%s) after an "
                          "unplanned failover: this is its Replica server "
                          "now (epoch %llu); the disks are kept, and only "
                          "the chunks that differ from %s's will be sent",
                          q->peer, q->addr, (unsigned long long)q->epoch,
                          q->peer);
            else if (rc == 0)
                event_add(rctx.d->cat, "info", vm->name,
                          "replication reversed by %s "
                          "(%s): this is its Replica server now (epoch "
                          "%llu); the disks are kept as they are (cycle "
                          "%lld on both sides)",
                          q->peer, q->addr, (unsigned long long)q->epoch,
                          (long long)reverse_of);
            else
                event_add(rctx.d->cat, "error", vm->name,
                          "reverse replication: %s (the "
                          "daemon must restart to reload its catalog)",
                          vr_errmsg());
        }
    }
    if (rc == 0)
        *out = replica_status_json(vm);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

/* May the primary of q register vm, an existing Replica VM (with or
 * without a relationship)?  Its owner is the primary that registered it
 * last, its trust group that of the authorization entry it was created
 * under; both outlive `replication remove`, so a removed Replica VM is as
 * closed to other primaries as a live one: only its owner, or any primary
 * of its (non-empty) trust group, may register it (SPEC §6).  0 or -EPERM
 * with the reason. */
static int
check_owner(const struct vm *vm, const struct rreq *q)
{
    const char *group = vm->owner_group ? vm->owner_group : "";
    if (!vm->owner)
        return vr_err(-EPERM, "register: vm %s is kept here from a removed "
                      "replication whose primary is not known; only this "
                      "server's administrator can free it ('vmreplica vm "
                      "remove %s')", vm->name, vm->name);
    if (!trust_group_admits(group, q->group))
        return vr_err(-EPERM, "register: vm %s belongs to trust group '%s'; "
                      "%s is in '%s'", vm->name, group, q->peer,
                      q->group ? q->group : "");
    /* A VM moves between primaries of its trust group (SPEC §6). */
    if (!*group && strcmp(vm->owner, q->peer) != 0)
        return vr_err(-EPERM, "register: vm %s belongs to primary %s, not %s",
                      vm->name, vm->owner, q->peer);
    return 0;
}

/* The other conditions for registering vm, an existing Replica VM, again
 * (its owner checked): a current epoch, the same disks, and nothing in
 * progress on it.  0, or the reason. */
static int
check_reregister(const struct vm *vm, const struct rreq *q, size_t nd)
{
    const struct repl *r = vm->repl;
    if (r && q->epoch < r->epoch)
        return vr_err(-ESTALE, "register: epoch %llu is older than %llu",
                      (unsigned long long)q->epoch,
                      (unsigned long long)r->epoch);
    if (vm->ndisks != nd)
        return vr_err(-EINVAL, "register: vm %s has %u disks here, not %zu",
                      vm->name, vm->ndisks, nd);
    if (vm_busy(vm, VM_OP_APPLY) || (r && vm_busy(vm, VM_OP_RECEIVE)))
        return vr_err(-EBUSY, "register: vm %s: a cycle is being received "
                      "or applied; try again", vm->name);
    if (r && (r->failover_point || vm_busy(vm, VM_OP_FAILOVER) ||
              r->st == REPL_ST_FAILED_OVER))
        return vr_err(-EPERM, "register: vm %s was failed over on the "
                      "Replica server; it no longer replicates from %s",
                      vm->name, q->peer);
    if (r && (r->test_point || vm_busy(vm, VM_OP_TEST)))
        return vr_err(-EBUSY, "register: vm %s: a test failover is running "
                      "on the Replica server", vm->name);
    return 0;
}

/* Make every disk of vm read as zeroes at its size (a full initial
 * replication sends only the primary's allocated regions, so whatever a
 * kept disk holds elsewhere must go), durably.  d->lock held; no apply
 * runs (a base chunk holds the VM's transfer, VM_OP_RECEIVE). */
static int
reset_disks(const struct vm *vm)
{
    for (unsigned i = 0; i < vm->ndisks; i++) {
        /* Beneath the storage location, never through a link. */
        int fd = storage_open(vm->dir, vm->disks[i].path, O_RDWR, 0);
        int rc = fd < 0 ? fd : 0;
        if (fd >= 0 && (ftruncate(fd, 0) < 0 ||
                        ftruncate(fd, (off_t)vm->disks[i].size) < 0 ||
                        fsync(fd) < 0))
            rc = vr_err(-errno, "reset %s: %s", vm->disks[i].path,
                        strerror(errno));
        if (fd >= 0)
            close(fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Before the first piece of a full initial replication (a base chunk or
 * initial-complete): a kept copy is reset, and that is recorded.  The
 * reset comes first, so a crash between repeats it, which is harmless:
 * nothing of this relationship was applied yet.  d->lock held. */
int
reset_kept_disks(struct vm *vm)
{
    if (!vm->repl || !vm->repl->reset_pending)
        return 0;
    int rc = reset_disks(vm);
    if (rc == 0) {
        vm->repl->reset_pending = false;
        rc = catalog_save_repl(rctx.d->cat, vm->repl);
        if (rc < 0)
            vm->repl->reset_pending = true;
    }
    if (rc == 0)
        log_info("replica", "%s: initial replication: the kept disks are "
                 "reset", vm->name);
    return rc;
}

/* d->lock held: may q's peer register the VM q->uuid named name with nd
 * disks?  *vm: the existing Replica VM, or NULL for a new one. */
static int
admit_registration(struct rreq *q, const char *name, size_t nd,
                   struct vm **vm)
{
    int rc;
    *vm = vm_find_uuid(rctx.d, q->uuid);
    struct vm *byname = vm_find(rctx.d, name);
    if (byname && byname != *vm)
        rc = vr_err(-EEXIST, "register: another vm is named %s here", name);
    else if (*vm && (*vm)->mode != VM_MODE_REPLICA)
        rc = vr_err(-EEXIST, "register: vm %s is not a Replica VM here",
                    (*vm)->name);
    else if (*vm)
        rc = check_owner(*vm, q);
    else
        rc = authz_check_vm_cap(rctx.d->cat, rctx.d->vms, q->peer);
    if (rc == 0 && *vm)
        rc = check_reregister(*vm, q, nd);
    return rc;
}

/* d->lock held: a new Replica VM beneath the peer's storage location, its
 * disks created at their sizes and made durable, put on d->vms. */
static int
create_replica_vm(const struct rreq *q, const struct r1_reg *reg,
                  struct vm **out)
{
    struct vm *vm = xcalloc(1, sizeof *vm);
    snprintf(vm->uuid, sizeof vm->uuid, "%s", q->uuid);
    vm->name = xstrdup(reg->name);
    vm->mode = VM_MODE_REPLICA;
    vm->dir = xasprintf("%s/%s", q->root, q->uuid);
    vm->ndisks = (unsigned)reg->ndisks;
    for (unsigned i = 0; i < vm->ndisks; i++) {
        snprintf(vm->disks[i].id, sizeof vm->disks[i].id, "disk%u", i);
        vm->disks[i].path = xasprintf("%s/disk%u.raw", vm->dir, i);
    }
    /* Nothing may lead out of the storage location: no symbolic link
     * on the way (a peer names no path, but one may be left there),
     * checked again at every open (storage.c). */
    CLEANUP_FREE char *stg = xasprintf("%s/staging", vm->dir);
    int rc = storage_mkdir(vm->dir, stg);
    for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++) {
        int fd = storage_open(vm->dir, vm->disks[i].path,
                              O_RDWR | O_CREAT, 0640);
        if (fd < 0)
            rc = fd;
        else if (ftruncate(fd, (off_t)reg->sizes[i]) < 0 || fsync(fd) < 0)
            rc = vr_err(-errno, "create %s: %s", vm->disks[i].path,
                        strerror(errno));
        if (fd >= 0)
            close(fd);
        vm->disks[i].size = reg->sizes[i];
    }
    if (rc == 0) {
        int dfd = storage_open(vm->dir, vm->dir, O_RDONLY | O_DIRECTORY, 0);
        rc = dfd < 0 ? dfd : io_fsync_dirfd(dfd);
        if (dfd >= 0)
            close(dfd);
    }
    if (rc < 0) {
        rc = vr_err(rc, "register: %s", vr_errmsg());
        vm_free(vm);
        return rc;
    }
    vm->next = rctx.d->vms;
    rctx.d->vms = vm;
    *out = vm;
    return 0;
}

/* Disk sizes may have grown on the primary. */
static int
grow_disks(struct vm *vm, const uint64_t *sizes)
{
    for (unsigned i = 0; i < vm->ndisks; i++)
        if (sizes[i] != vm->disks[i].size) {
            int rc = storage_truncate(vm->dir, vm->disks[i].path, sizes[i]);
            if (rc < 0)
                return vr_err(rc, "register: %s", vr_errmsg());
            vm->disks[i].size = sizes[i];
        }
    return 0;
}

/* Whether a NIC's network is on a host interface (tap:, bridge:). */
static bool
on_host_interface(json_object *n)
{
    json_object *net;
    return json_object_object_get_ex(n, "network", &net) &&
           (strncmp(json_object_get_string(net), "tap:", 4) == 0 ||
            strncmp(json_object_get_string(net), "bridge:", 7) == 0);
}

/* The NICs of registration body b (if it has "nics") replace vm's.  They
 * travel with their failover settings; what was set here for a MAC (its
 * network, its failover settings) wins, and a new NIC the peer puts on a
 * host interface (tap:, bridge:) is not connected here: a peer names
 * nothing on this host (SPEC §6); `vm set-failover-network --network`
 * connects it.  Invalid NICs are logged and not kept. */
static void
merge_peer_nics(struct vm *vm, json_object *b, const char *name)
{
    json_object *v;
    if (!json_object_object_get_ex(b, "nics", &v))
        return;
    json_object *nics = json_tokener_parse(json_object_to_json_string(v));
    if (nics_validate(nics) < 0) {
        log_warn("replica", "%s: NICs not kept: %s", name, vr_errmsg());
        vr_err_clear();
        json_object_put(nics);
        nics = NULL;
    }
    for (size_t i = 0; nics && i < json_object_array_length(nics); i++) {
        json_object *n = json_object_array_get_idx(nics, i), *m, *f;
        const char *mac = json_object_object_get_ex(n, "mac", &m)
                              ? json_object_get_string(m) : "";
        bool known = false;
        for (size_t j = 0; vm->nics && j < json_object_array_length(vm->nics);
             j++) {
            json_object *o = json_object_array_get_idx(vm->nics, j), *om,
                        *on;
            if (!json_object_object_get_ex(o, "mac", &om) ||
                strcmp(json_object_get_string(om), mac) != 0)
                continue;
            known = true;
            if (json_object_object_get_ex(o, "failover", &f))
                json_object_object_add(n, "failover", json_object_get(f));
            if (json_object_object_get_ex(o, "network", &on))
                json_object_object_add(n, "network", json_object_get(on));
        }
        if (!known && on_host_interface(n))
            json_object_object_add(n, "network",
                                   json_object_new_string("none"));
    }
    json_object_put(vm->nics);
    vm->nics = nics;
}

/* d->lock held: the VM's relationship starts afresh with q's peer, saved
 * with the VM (created: the disks are new, else they are kept). */
static int
start_relationship(struct vm *vm, const struct rreq *q,
                   const struct r1_reg *reg, bool created)
{
    struct repl *r = vm->repl;
    if (!r) {
        r = xcalloc(1, sizeof *r);
        snprintf(r->vm_uuid, sizeof r->vm_uuid, "%s", vm->uuid);
        r->mode = VM_MODE_REPLICA;
        r->storage = xstrdup(vm->dir);
        r->trust_group = xstrdup(vm->owner_group);
        vm->repl = r;
    }
    free(r->auth);
    r->auth = q->krb ? xstrdup("kerberos") : NULL;
    r->krb_encrypt = q->wrapped;
    /* Possibly another primary of the VM's trust group. */
    free(r->primary_server);
    r->primary_server = xstrdup(q->peer);
    r->epoch = q->epoch;
    take_history(r, q);
    if (!r->point_interval_s)
        r->point_interval_s = 3600;
    if (reg->frequency_s)
        r->frequency_s = reg->frequency_s;
    if (reg->compression >= 0)
        r->compression = reg->compression;
    /* A registration starts a relationship afresh (the primary
     * registers only when replication is enabled), even over one this
     * side still thinks is replicating: the primary may have removed
     * it while we were unreachable, and changed the disk since. */
    r->initial_done = false;
    int rc = repl_transition(rctx.d->cat, vm, REPL_ST_WAITING_INITIAL, 0);
    r->applied_cycle = r->last_cycle = 0;
    r->prepared_cycle = 0;
    /* The disks of an existing VM are kept as they are (they may seed
     * a comparison, SPEC §5); a full initial replication resets them
     * before its first piece (reset_kept_disks). */
    r->reset_pending = !created;
    if (rc == 0)
        rc = clear_staging(r);
    /* The recovery history of the old relationship goes. */
    if (rc == 0)
        rc = history_reset(vm);
    if (rc == 0)
        rc = catalog_save_vm(rctx.d->cat, vm);
    if (rc == 0)
        rc = catalog_save_repl(rctx.d->cat, r);
    return rc;
}

/* PUT /r1/vms/UUID: admit the peer, create or update the Replica VM (its
 * disks, CPUs, memory, NICs, name, owner), and start the relationship. */
int
do_register(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    struct r1_reg reg;
    int rc = r1_register_parse(b, &reg);
    bool reverse = reg.reverse_of || reg.reverse_unplanned;
    if (rc == 0 && reverse)
        rc = do_reverse(q, &reg, out);
    if (rc < 0 || reverse) {
        json_object_put(b);
        return rc;
    }

    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    rc = admit_registration(q, reg.name, reg.ndisks, &vm);
    bool created = rc == 0 && !vm;
    if (created)
        rc = create_replica_vm(q, &reg, &vm);
    if (rc == 0)
        rc = grow_disks(vm, reg.sizes);
    if (rc == 0) {
        vm->cpus = (unsigned)reg.cpus;
        vm->memory_mib = (unsigned)reg.memory_mib;
        merge_peer_nics(vm, b, reg.name);
        /* Direct kernel boot does not travel: a peer names no path here
         * (SPEC §6).  The Replica server's administrator sets it with
         * `vm set-boot`. */
        free(vm->name);
        vm->name = xstrdup(reg.name);
        /* The owner: this primary now (check_owner admitted it), in the
         * trust group the VM was created under. */
        free(vm->owner);
        vm->owner = xstrdup(q->peer);
        if (!vm->owner_group)
            vm->owner_group = xstrdup(q->group);
        rc = start_relationship(vm, q, &reg, created);
    }
    if (rc == 0) {
        event_add(rctx.d->cat, "info", vm->name,
                  "replica vm %s registered by primary %s (%s)%s",
                  created ? "created" : "updated", q->peer, q->addr,
                  created ? "" : "; its disks are kept until a full "
                                 "initial replication starts");
        *out = replica_status_json(vm);
    }
    pthread_mutex_unlock(&rctx.d->lock);
    json_object_put(b);
    return rc;
}

/* How long initial-complete waits for another one's sync (see below). */
#define COMPLETE_WAIT_MS 60000

int
do_initial_done(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    json_object *v;
    int64_t base = -1, first = 0;
    if (b && json_object_object_get_ex(b, "base_cycle", &v) &&
        json_object_is_type(v, json_type_int))
        base = json_object_get_int64(v);
    /* The first cycle that can be a recovery point (the primary's copy
     * read the disk until that cycle was open); absent from older
     * primaries: the one after the base. */
    if (b && json_object_object_get_ex(b, "first_point", &v))
        first = json_object_is_type(v, json_type_int)
                    ? json_object_get_int64(v) : -1;
    /* The base chunk the primary sent last and has no word of being
     * durable (upload_finish); absent or 0: none. */
    int64_t last = 0;
    if (b && json_object_object_get_ex(b, "last_chunk", &v))
        last = json_object_is_type(v, json_type_int)
                   ? json_object_get_int64(v) : -1;
    json_object_put(b);
    if (last < 0)
        return vr_err(-EINVAL, "initial-complete: last_chunk is not a chunk "
                               "number");
    if (base < 0 || base >= INT64_MAX / 2)
        return vr_err(-EINVAL, "initial-complete: base_cycle missing or out "
                               "of range");
    if (first < 0)
        return vr_err(-EINVAL, "initial-complete: first_point is not a "
                               "cycle number");
    if (first == 0)
        first = base + 1;
    if (first <= base || first - base > INT32_MAX)
        return vr_err(-EINVAL, "initial-complete: first_point %lld is not "
                      "after base_cycle %lld (or too far)", (long long)first,
                      (long long)base);
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = own_vm(q, &vm);
    /* The same request again (the primary did not hear the answer) while
     * the first still syncs: wait for it, then answer as it did. */
    uint64_t deadline = vr_mono_ms() + COMPLETE_WAIT_MS;
    while (rc == 0 && vm->repl->initial_committing &&
           vr_mono_ms() < deadline) {
        daemon_wait_ms(rctx.d, 100);
        rc = own_vm(q, &vm);
    }
    if (rc == 0 && vm->repl->initial_committing)
        rc = vr_err(-EBUSY, "initial-complete: vm %s: the last chunk's "
                            "sync is still in progress; try again",
                    vm->name);
    bool again = rc == 0 && vm->repl->initial_done &&
                 vm->repl->base_cycle == (uint64_t)base;
    if (rc == 0 && !again &&
        (vm->repl->initial_done || vm_busy(vm, VM_OP_APPLY | VM_OP_RECEIVE)))
        rc = vr_err(-EPROTO, "initial-complete: vm %s is not in initial "
                             "replication",
                    vm->name);
    if (rc == 0 && !again) {
        /* The last base chunk's disks are synced now, and it must be the
         * one the primary sent last.  The sync runs without the daemon's
         * lock (on slow storage a chunk's fdatasync would hold up every
         * other request and VM meanwhile), the VM marked RECEIVE as for an
         * upload: no other upload, initial-complete, registration or
         * removal can change it, and the VM stays (vm remove refuses a VM
         * with replication). */
        struct repl *r = vm->repl;
        bool set = r->base_unsynced_set;
        uint64_t unsynced = r->base_unsynced;
        r->base_unsynced_set = false;
        if (set) {
            vm_op_begin(vm, VM_OP_RECEIVE);
            r->initial_committing = true;
            pthread_mutex_unlock(&rctx.d->lock);
            rc = sync_disks(vm);
            vr_fault_point("initial-complete-synced");
            pthread_mutex_lock(&rctx.d->lock);
            r->initial_committing = false;
            vm_op_end(vm, VM_OP_RECEIVE);
            struct vm *same = NULL;
            if (rc == 0 && (rc = own_vm(q, &same)) == 0 && same != vm)
                rc = vr_err(-ESTALE, "initial-complete: vm %s changed "
                            "meanwhile", vm->name);
        }
        if (rc == 0 && last > 0 && !(set && unsynced == (uint64_t)last))
            rc = vr_err(-EAGAIN, "initial-complete: vm %s: base chunk %lld "
                        "was not applied since this server started (or its "
                        "sync failed): it must be sent again", vm->name,
                        (long long)last);
    }
    if (rc == 0 && again) {
        /* The primary did not hear our answer and asks again. */
        *out = replica_status_json(vm);
    } else if (rc == 0 && (rc = reset_kept_disks(vm)) == 0) {
        struct repl *r = vm->repl;
        r->base_cycle = (uint64_t)base;
        r->first_point = (uint64_t)first;
        r->applied_cycle = (uint64_t)base;
        r->last_cycle = (uint64_t)base;
        r->initial_done = true;
        rc = repl_transition_event(
            rctx.d->cat, vm, REPL_ST_REPLICATING, REPL_T_SAVE, "info",
            "initial replication complete at cycle %lld; recovery points "
            "from cycle %lld on", (long long)base, (long long)first);
        if (rc == 0)
            *out = replica_status_json(vm);
    }
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

/* The primary shut the VM down and shipped everything up to cycle N: a
 * planned failover may start at N (0: the preparation is withdrawn). */
int
do_prepared(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    json_object *v;
    int64_t n = -1;
    if (b && json_object_object_get_ex(b, "cycle", &v) &&
        json_object_is_type(v, json_type_int))
        n = json_object_get_int64(v);
    json_object_put(b);
    if (n < 0)
        return vr_err(-EINVAL, "prepared: cycle missing");
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = own_vm(q, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && !r->initial_done)
        rc = vr_err(-EPROTO, "prepared: vm %s has not completed initial "
                    "replication", vm->name);
    if (rc == 0 && n && (uint64_t)n != r->last_cycle)
        rc = vr_err(-EPROTO, "prepared: vm %s: cycle %lld declared, but the "
                    "last cycle received is %llu", vm->name, (long long)n,
                    (unsigned long long)r->last_cycle);
    if (rc == 0 && r->prepared_cycle != (uint64_t)n) {
        r->prepared_cycle = (uint64_t)n;
        rc = catalog_save_repl(rctx.d->cat, r);
        if (rc == 0 && n)
            event_add(rctx.d->cat, "info", vm->name,
                      "primary %s prepared for failover at "
                      "cycle %lld: 'vmreplica failover start %s' fails over "
                      "with no data loss",
                      q->peer, (long long)n, vm->name);
        else if (rc == 0)
            event_add(rctx.d->cat, "info", vm->name,
                      "primary %s withdrew its failover "
                      "preparation",
                      q->peer);
    }
    if (rc == 0)
        *out = replica_status_json(vm);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

/* How long a removal waits for the cycle being received or applied: the
 * primary stopped its shipper before asking, and a primary that gets
 * EBUSY has already forgotten the relationship (a kept relationship
 * here would wait for cycles forever). */
#define REMOVE_WAIT_MS 30000

int
do_remove(struct rreq *q, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    uint64_t deadline = vr_mono_ms() + REMOVE_WAIT_MS;
    int rc;
    while ((rc = own_vm(q, &vm)) == 0 &&
           vm_busy(vm, VM_OP_RECEIVE | VM_OP_APPLY) &&
           vr_mono_ms() < deadline)
        daemon_wait_ms(rctx.d, 100);
    if (rc == 0 && (vm_busy(vm, VM_OP_RECEIVE | VM_OP_APPLY)))
        rc = vr_err(-EBUSY, "replica vm %s: a transfer or an apply is in "
                            "progress; try again",
                    vm->name);
    if (rc == 0) {
        rc = catalog_delete_repl(rctx.d->cat, vm->uuid);
        if (rc == 0) {
            repl_free(vm->repl);
            vm->repl = NULL;
            event_add(rctx.d->cat, "info", vm->name,
                      "replication removed by primary %s; replica disks kept",
                      q->peer);
            *out = json_object_new_object();
        }
    }
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

