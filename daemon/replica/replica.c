/* replica.c: the Replica server's requests — parsing the URL, the state of
 * one request (struct rreq), receiving uploads into staging and
 * dispatching each request to its endpoint (docs/api.md, "Replication
 * protocol").  The listeners are replica-listen.c, the JSON endpoints
 * replica-register.c, the budgets replica-limits.c and the applier
 * replica-apply.c (replica-int.h).
 *
 * Crash safety: a cycle is received into staging/N.tmp, validated, fsynced
 * and renamed to staging/N.cycle before it is acknowledged; the applier
 * applies N.cycle to the disks, fdatasyncs them, and only then records N as
 * applied in the catalog and deletes the file.  A crash at any step is
 * repaired at start-up by applying N again from the start (idempotent), before
 * the management socket opens, so the disks are only ever seen at a cycle
 * boundary. */
#include "replica-int.h"

struct replica_ctx rctx;

void
replica_init(struct daemon *d, const struct replica_hooks *hooks)
{
    rctx.d = d;
    rctx.hooks = *hooks;
}

/* --- per-request state -------------------------------------------------- */

static void
rreq_fail(struct rreq *q, int rc, const char *msg)
{
    if (q->failed)
        return;
    q->failed = true;
    q->rc = rc;
    snprintf(q->msg, sizeof q->msg, "%s", msg);
}


void
rreq_done(void *cls VR_UNUSED, struct MHD_Connection *c,
          void **con_cls, enum MHD_RequestTerminationCode toe VR_UNUSED)
{
    struct rreq *q = *con_cls;
    *con_cls = NULL;
    if (!q)
        return;
    guard_request(c, false);
    cyc_decoder_free(q->dec);
    if (q->fd >= 0)
        close(q->fd);
    if (q->tmp_path) {
        unlinkat(q->stgfd, q->tmp_name, 0);
        free(q->tmp_path);
    }
    if (q->stgfd >= 0)
        close(q->stgfd);
    if (q->holds_busy) {
        pthread_mutex_lock(&rctx.d->lock);
        struct vm *vm = vm_find_uuid(rctx.d, q->uuid);
        if (vm)
            vm_op_end(vm, VM_OP_RECEIVE);
        pthread_mutex_unlock(&rctx.d->lock);
    }
    claim_unlink(q);
    free(q->staging);
    free(q->root);
    free(q->group);
    free(q->body);
    krb_ctx_free(&q->gss);
    if (q->hash)
        gnutls_hash_deinit(q->hash, NULL);
    krb_unframer_free(&q->unf);
    mem_release(q); /* every buffer of q is freed now */
    free(q);
}

/* Parse "/r1/vms/UUID[/rest]". */
static int
parse_url(const char *url, const char *method, struct rreq *q)
{
    static const char pre[] = "/r1/vms/";
    if (strcmp(url, "/r1/test") == 0 && strcmp(method, "GET") == 0) {
        q->kind = R1_TEST; /* server test-connection */
        return 0;
    }
    if (strncmp(url, pre, sizeof pre - 1) != 0)
        return vr_err(-ENOENT, "%s: not found", url);
    url += sizeof pre - 1;
    if (strlen(url) < 36)
        return vr_err(-EINVAL, "bad vm uuid in url");
    memcpy(q->uuid, url, 36);
    q->uuid[36] = '\0';
    if (!vr_uuid_valid(q->uuid))
        return vr_err(-EINVAL, "bad vm uuid in url");
    const char *rest = url + 36;
    char *end;
    if (*rest == '\0') {
        if (strcmp(method, "GET") == 0)
            q->kind = R1_STATUS;
        else if (strcmp(method, "PUT") == 0)
            q->kind = R1_REGISTER;
        else
            return vr_err(-EOPNOTSUPP, "method not allowed");
        return 0;
    }
    if (strcmp(rest, "/initial-complete") == 0 &&
        strcmp(method, "POST") == 0) {
        q->kind = R1_INITIAL_DONE;
        return 0;
    }
    if (strcmp(rest, "/replication") == 0 && strcmp(method, "DELETE") == 0) {
        q->kind = R1_REMOVE;
        return 0;
    }
    if (strcmp(rest, "/prepared") == 0 && strcmp(method, "POST") == 0) {
        q->kind = R1_PREPARED;
        return 0;
    }
    if (strcmp(rest, "/initial") == 0 && strcmp(method, "POST") == 0) {
        q->kind = R1_INITIAL_BEGIN;
        return 0;
    }
    if (strcmp(rest, "/hashes") == 0 && strcmp(method, "POST") == 0) {
        q->kind = R1_HASHES;
        return 0;
    }
    if (strcmp(rest, "/resync") == 0 && strcmp(method, "POST") == 0) {
        q->kind = R1_RESYNC;
        return 0;
    }
    if (strcmp(rest, "/resync-complete") == 0 && strcmp(method, "POST") == 0) {
        q->kind = R1_RESYNC_DONE;
        return 0;
    }
    const char *num = NULL;
    if (strncmp(rest, "/base/", 6) == 0) {
        q->kind = R1_BASE;
        num = rest + 6;
    } else if (strncmp(rest, "/cycles/", 8) == 0) {
        q->kind = R1_CYCLE;
        num = rest + 8;
    } else {
        return vr_err(-ENOENT, "not found");
    }
    if (strcmp(method, "PUT") != 0)
        return vr_err(-EOPNOTSUPP, "method not allowed");
    errno = 0;
    unsigned long long v = strtoull(num, &end, 10);
    /* Cycle numbers are kept as SQLite integers: at most 2^63 - 1. */
    if (errno || end == num || *end || *num == '0' || strlen(num) > 19 ||
        v > INT64_MAX)
        return vr_err(-EINVAL, "bad number in url");
    q->n = v;
    return 0;
}

json_object *
replica_status_json(const struct vm *vm)
{
    json_object *o = json_object_new_object();
    const struct repl *r = vm->repl;
    json_object_object_add(o, "uuid", json_object_new_string(vm->uuid));
    json_object_object_add(o, "name", json_object_new_string(vm->name));
    json_object_object_add(o, "epoch",
                           json_object_new_int64((int64_t)r->epoch));
    json_object_object_add(o, "initial_done",
                           json_object_new_boolean(r->initial_done));
    json_object_object_add(o, "applied_cycle",
                           json_object_new_int64((int64_t)r->applied_cycle));
    json_object_object_add(o, "staged_cycle",
                           json_object_new_int64((int64_t)r->last_cycle));
    json_object_object_add(o, "state",
                           json_object_new_string(repl_st_name(r->st)));
    json_object_object_add(o, "imported_base",
                           json_object_new_int64((int64_t)r->imported_base));
    return o;
}

/* A request of an older epoch: after a completed failover, say so in the
 * words the old primary's administrator needs (the message becomes its
 * last_error): where the VM runs now, that this copy is stale, and what
 * to run. */
static int
epoch_refused(const struct vm *vm, const struct rreq *q)
{
    const struct repl *r = vm->repl;
    char qn[VR_QNAME_MAX];
    const char *n = vr_qname(vm->name, qn);
    const char *self = rctx.d->cfg.hostname ? rctx.d->cfg.hostname
                                            : "the Replica server";
    if (q->epoch < r->epoch && r->st == REPL_ST_FAILED_OVER)
        return vr_err(-ESTALE, "replica vm %s: epoch %llu refused (current "
                      "%llu): the VM failed over on %s, so the copy on %s "
                      "is stale and its changes are refused; on %s run "
                      "'vmreplica replication remove %s' (its disks are "
                      "kept), and protect the VM again from %s ('vmreplica "
                      "replication reverse %s' there)",
                      n, (unsigned long long)q->epoch,
                      (unsigned long long)r->epoch, self, q->peer, q->peer,
                      n, self, n);
    return vr_err(-ESTALE, "replica vm %s: epoch %llu refused (current "
                  "%llu)", n, (unsigned long long)q->epoch,
                  (unsigned long long)r->epoch);
}

/* Find the Replica VM for q, checking it belongs to this peer and epoch. */
int
own_vm(struct rreq *q, struct vm **out)
{
    struct vm *vm = vm_find_uuid(rctx.d, q->uuid);
    if (!vm || vm->mode != VM_MODE_REPLICA || !vm->repl)
        return vr_err(-ENOENT, "replica vm %s: not found", q->uuid);
    if (!vm->repl->primary_server ||
        strcmp(vm->repl->primary_server, q->peer) != 0)
        return vr_err(-EPERM, "replica vm %s: belongs to primary %s, not %s",
                      vm->name, vm->repl->primary_server, q->peer);
    if (!trust_group_admits(vm->repl->trust_group, q->group))
        return vr_err(-EPERM, "replica vm %s: belongs to trust group '%s'; "
                      "%s is in '%s'", vm->name, vm->repl->trust_group,
                      q->peer, q->group ? q->group : "");
    /* Any request of the VM's primary shows it is reachable (failover
     * start refuses while it recently was). */
    vm->repl->last_contact_ms = vr_wall_ms();
    if (q->kind != R1_STATUS && q->epoch != vm->repl->epoch)
        return epoch_refused(vm, q);
    if (q->kind != R1_STATUS &&
        (vm->repl->failover_point || vm_busy(vm, VM_OP_FAILOVER)))
        return vr_err(-EBUSY, "replica vm %s: failed over on the Replica "
                      "server (point %llu); changes are refused until the "
                      "failover is cancelled", vm->name,
                      (unsigned long long)vm->repl->failover_point);
    *out = vm;
    return 0;
}

/* Create NAME afresh in the staging directory stgfd: O_EXCL, so nothing
 * left there is ever written through.  A regular file of that name (an
 * upload whose end we did not see) is replaced; a symbolic link or anything
 * else is refused and left for the administrator to see. */
static int
create_staged(int stgfd, const char *staging, const char *name)
{
    for (int tries = 0; tries < 2; tries++) {
        int fd = openat(stgfd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW |
                        O_CLOEXEC, 0640);
        if (fd >= 0)
            return fd;
        if (errno != EEXIST)
            return vr_err(-errno, "create %s/%s: %s", staging, name,
                          strerror(errno));
        struct stat st;
        if (fstatat(stgfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            !S_ISREG(st.st_mode))
            return vr_err(S_ISLNK(st.st_mode) ? -ELOOP : -EEXIST,
                          "create %s/%s: refused: %s is there (not "
                          "followed)", staging, name,
                          S_ISLNK(st.st_mode) ? "a symbolic link"
                                              : "something not a file");
        if (unlinkat(stgfd, name, 0) < 0 && errno != ENOENT)
            return vr_err(-errno, "remove stale %s/%s: %s", staging, name,
                          strerror(errno));
    }
    return vr_err(-EEXIST, "create %s/%s: it keeps coming back", staging,
                  name);
}

/* The uncompressed bytes an upload is expected to stage: its
 * Content-Length (exact for an identity body, a lower bound for zstd), at
 * most cap; 0 if it sends none. */
static uint64_t
expected_bytes(struct MHD_Connection *c, uint64_t cap)
{
    const char *cl =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    char *end = NULL;
    errno = 0;
    unsigned long long n = cl ? strtoull(cl, &end, 10) : 0;
    if (!cl || errno || end == cl || *end)
        return 0;
    return n < cap ? n : cap;
}

/* First call for an upload: check the VM and its state, open the temp. */
static int
upload_begin(struct rreq *q, struct MHD_Connection *c)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = own_vm(q, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && vm_busy(vm, VM_OP_RECEIVE))
        rc = vr_err(-EBUSY, "replica vm %s: another transfer is in progress",
                    vm->name);
    if (rc == 0 && q->kind == R1_BASE && r->initial_done)
        rc = vr_err(-EPROTO, "replica vm %s: initial replication is already "
                             "complete",
                    vm->name);
    if (rc == 0 && q->kind == R1_CYCLE) {
        if (!r->initial_done)
            rc = vr_err(-EBUSY, "replica vm %s: initial replication not "
                                "complete",
                        vm->name);
        else if (q->n <= r->last_cycle)
            rc = 1; /* duplicate: already staged or applied */
        else if (q->n != r->last_cycle + 1)
            rc = vr_err(-EPROTO, "replica vm %s: cycle %llu out of order "
                                 "(expected %llu)",
                        vm->name, (unsigned long long)q->n,
                        (unsigned long long)r->last_cycle + 1);
    }
    CLEANUP_FREE char *vmdir = NULL;
    if (rc == 0) {
        vm_op_begin(vm, VM_OP_RECEIVE);
        q->holds_busy = true;
        q->staging = staging_dir(r);
        vmdir = xstrdup(r->storage);
        q->ndisks = vm->ndisks;
        for (unsigned i = 0; i < vm->ndisks; i++)
            q->disk_sizes[i] = vm->disks[i].size;
    }
    pthread_mutex_unlock(&rctx.d->lock);
    if (rc != 0)
        return rc;

    const char *enc =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Encoding");
    bool compressed = enc && strcmp(enc, "zstd") == 0;
    if (enc && !compressed && strcmp(enc, "identity") != 0)
        return vr_err(-EINVAL, "content-encoding %s: not supported", enc);
    snprintf(q->tmp_name, sizeof q->tmp_name, "%s-%llu.tmp",
             q->kind == R1_BASE ? "base" : "cycle", (unsigned long long)q->n);
    q->stgfd = storage_open(vmdir, q->staging, O_RDONLY | O_DIRECTORY, 0);
    if (q->stgfd < 0)
        return q->stgfd;
    /* However small the body, what it decompresses to is staged: claim
     * the space it is expected to take and the decoder's memory first
     * (limits, above). */
    struct stat st;
    if (fstat(q->stgfd, &st) < 0)
        return vr_err(-errno, "stat %s: %s", q->staging, strerror(errno));
    claim_link(q, st.st_dev);
    uint64_t cap = q->kind == R1_BASE ? R1_MAX_BASE_RAW : R1_MAX_CYCLE_RAW;
    int rc2 = space_claim(q, expected_bytes(c, cap), true);
    if (rc2 == 0)
        rc2 = mem_charge(q, R1_SMALL_BUF + (compressed ? R1_ZSTD_MEM : 0),
                         false);
    if (rc2 < 0)
        return rc2;
    q->buf_allowance = R1_SMALL_BUF;
    q->fd = create_staged(q->stgfd, q->staging, q->tmp_name);
    if (q->fd < 0)
        return q->fd;
    q->tmp_path = xasprintf("%s/%s", q->staging, q->tmp_name);
    rc2 = cyc_decoder_new(compressed, cap, q->fd, &q->dec);
    if (rc2 == 0) {
        const struct cyc_decoder_hooks hooks = { .mem = decoder_mem,
                                                 .stage = decoder_stage,
                                                 .ud = q };
        cyc_decoder_set_disk_sizes(q->dec, q->disk_sizes, q->ndisks);
        cyc_decoder_set_hooks(q->dec, &hooks);
        /* A cycle's staged file is synced before the answer; a base
         * chunk's is applied, then deleted, never synced. */
        if (q->kind != R1_BASE)
            cyc_decoder_write_behind(q->dec);
    }
    return rc2;
}

static int
upload_finish(struct rreq *q, json_object **out)
{
    struct cyc_hdr h;
    uint64_t nrec = 0, raw = 0;
    int rc = cyc_decoder_finish(q->dec, &h, &nrec, &raw);
    if (rc < 0)
        return rc;
    uint8_t want[16];
    if (cyc_uuid_parse(q->uuid, want) < 0 || memcmp(want, h.uuid, 16) != 0)
        return vr_err(-EPROTO, "payload is for another vm");
    if (h.epoch != q->epoch)
        return vr_err(-ESTALE, "payload epoch %llu differs from request's",
                      (unsigned long long)h.epoch);
    bool base = (h.flags & CYC_F_BASE) != 0;
    if (base != (q->kind == R1_BASE) || (!base && h.cycle != q->n))
        return vr_err(-EPROTO, "payload header does not match the request");
    /* A cycle counts once staged: durably.  A base chunk is applied (and
     * the disks synced) before the answer, and a crash before that has the
     * primary send it again: its staging file need not reach the disk. */
    uint64_t t_recv = vr_mono_ms();
    if (!base && fdatasync(q->fd) < 0)
        return vr_err(-errno, "sync %s: %s", q->tmp_path, strerror(errno));
    if (!base)
        log_debug("replica", "cycle %llu: received in %llu ms, synced in "
                  "%llu ms", (unsigned long long)q->n,
                  (unsigned long long)(t_recv - q->t0_ms),
                  (unsigned long long)(vr_mono_ms() - t_recv));

    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    rc = own_vm(q, &vm);
    if (rc == 0 && h.ndisks != vm->ndisks)
        rc = vr_err(-EPROTO, "payload has %u disks, vm %s has %u", h.ndisks,
                    vm->name, vm->ndisks);
    if (rc == 0 && base)
        rc = reset_kept_disks(vm);
    pthread_mutex_unlock(&rctx.d->lock);
    if (rc < 0)
        return rc;

    bool prev_set = false, defer = false;
    uint64_t prev = 0;
    if (base) {
        /* Initial replication chunks go straight to the disks: the Replica
         * VM is not a recovery point until initial replication completes.
         * The decoder goes first: applying reads the payload through a
         * buffer of its own, no larger than the decoder's was, and the
         * request's memory charge stays until it ends.
         *
         * If the primary said it takes unsynced answers (defer_sync at
         * POST initial), the disks are synced when the next chunk (or
         * initial-complete) comes, not before this answer: that sync then
         * finds most of the writeback started here done while the primary
         * sent the next chunk.  The answer says what is durable:
         * "unsynced", not this chunk yet; "synced_chunk", the chunk this
         * process applied just before it, now synced.  A restart of this
         * process, or a power loss that takes an unsynced chunk with it,
         * breaks that chain: the next answer names no chunk, and the
         * primary sends the one it has no word of again (docs/design.md,
         * "When a base chunk is durable"). */
        cyc_decoder_free(q->dec);
        q->dec = NULL;
        pthread_mutex_lock(&rctx.d->lock);
        defer = vm->repl->base_defer_sync;
        prev_set = vm->repl->base_unsynced_set;
        prev = vm->repl->base_unsynced;
        vm->repl->base_unsynced_set = false;
        pthread_mutex_unlock(&rctx.d->lock);
        uint64_t t_sync = vr_mono_ms();
        if (prev_set && (rc = sync_disks(vm)) < 0)
            return rc;
        uint64_t applied, t_apply = vr_mono_ms();
        rc = apply_payload_fd(vm, q->fd, &applied, defer);
        if (rc < 0)
            return rc;
        log_debug("replica", "base chunk %llu: received in %llu ms, the one "
                  "before synced in %llu ms, applied in %llu ms",
                  (unsigned long long)q->n,
                  (unsigned long long)(t_recv - q->t0_ms),
                  (unsigned long long)(t_apply - t_sync),
                  (unsigned long long)(vr_mono_ms() - t_apply));
        pthread_mutex_lock(&rctx.d->lock);
        vm->repl->base_unsynced = q->n;
        vm->repl->base_unsynced_set = defer;
        pthread_mutex_unlock(&rctx.d->lock);
    } else {
        pthread_mutex_lock(&rctx.d->lock);
        CLEANUP_FREE char *final = cycle_path(vm->repl, q->n);
        pthread_mutex_unlock(&rctx.d->lock);
        /* Renaming over a link replaces the link: nothing is followed. */
        if (renameat(q->stgfd, q->tmp_name, q->stgfd,
                     strrchr(final, '/') + 1) < 0)
            return vr_err(-errno, "rename %s: %s", final, strerror(errno));
        free(q->tmp_path);
        q->tmp_path = NULL;
        rc = io_fsync_dirfd(q->stgfd);
        if (rc < 0)
            return vr_err(rc, "sync %s: %s", q->staging, strerror(-rc));
        pthread_mutex_lock(&rctx.d->lock);
        rc = own_vm(q, &vm);
        if (rc == 0) {
            vm->repl->last_cycle = q->n;
            /* How the primary sends now (replication set may change it):
             * what a reverse replication will keep. */
            free(vm->repl->auth);
            vm->repl->auth = q->krb ? xstrdup("kerberos") : NULL;
            vm->repl->krb_encrypt = q->wrapped;
            /* The primary writes again: it is no longer prepared. */
            if (vm->repl->prepared_cycle && q->n > vm->repl->prepared_cycle)
                vm->repl->prepared_cycle = 0;
            take_history(vm->repl, q);
            rc = catalog_save_repl(rctx.d->cat, vm->repl);
            pthread_cond_broadcast(&rctx.d->cond);
        }
        pthread_mutex_unlock(&rctx.d->lock);
        if (rc < 0)
            return rc;
    }
    *out = json_object_new_object();
    json_object_object_add(*out, "records",
                           json_object_new_int64((int64_t)nrec));
    json_object_object_add(*out, "raw_bytes",
                           json_object_new_int64((int64_t)raw));
    if (base) {
        if (defer)
            json_object_object_add(*out, "unsynced",
                                   json_object_new_boolean(1));
        if (prev_set)
            json_object_object_add(*out, "synced_chunk",
                                   json_object_new_int64((int64_t)prev));
    }
    return 0;
}

/* Let the next transfer for this VM in as soon as this one is decided,
 * before the answer is sent: the primary sends the next cycle as soon as
 * it reads our 200.  rreq_done does the same for requests that end
 * otherwise. */
static void
release_busy(struct rreq *q)
{
    /* First the temporary file: the next transfer may reuse its name. */
    if (q->tmp_path) {
        unlinkat(q->stgfd, q->tmp_name, 0);
        free(q->tmp_path);
        q->tmp_path = NULL;
    }
    claim_unlink(q);
    if (!q->holds_busy)
        return;
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = vm_find_uuid(rctx.d, q->uuid);
    if (vm)
        vm_op_end(vm, VM_OP_RECEIVE);
    q->holds_busy = false;
    pthread_mutex_unlock(&rctx.d->lock);
}

/* Kerberos mode: sign every answer of an authenticated request (the
 * primary trusts a 200 only with a valid MIC from HTTP/us); ask for
 * Negotiate when authentication failed. */
static void
sign_response(struct MHD_Response *r, unsigned status, const char *body,
              size_t len, void *ud)
{
    struct rreq *q = ud;
    if (status == 503)
        MHD_add_response_header(r, "Retry-After", R1_RETRY_AFTER_S);
    if (!q->krb)
        return;
    if (q->gss == GSS_C_NO_CONTEXT) {
        if (status == 401)
            MHD_add_response_header(r, "WWW-Authenticate", "Negotiate");
        return;
    }
    uint8_t sha[32], digest[KRB_DIGEST_LEN];
    gnutls_hash_fast(GNUTLS_DIG_SHA256, body, len, sha);
    krb_response_digest(status, sha, digest);
    char *mic = NULL;
    if (krb_sign(q->gss, digest, &mic) == 0) {
        MHD_add_response_header(r, KRB_MIC_HEADER, mic);
        free(mic);
    } else {
        log_warn("replica", "%s", vr_errmsg());
    }
}

static MHD_RESULT
reply(struct MHD_Connection *c, struct rreq *q, unsigned status,
      json_object *obj)
{
    return http_send_json_ex(c, status, obj, sign_response, q);
}

static MHD_RESULT
reply_error(struct MHD_Connection *c, struct rreq *q, int rc,
            const char *msg)
{
    /* Over a server-wide budget: transient, the primary retries. */
    unsigned status = rc == -EAGAIN ? 503 : http_status_for(rc);
    if (q->krb && q->gss == GSS_C_NO_CONTEXT &&
        (rc == -EACCES || rc == -ETIME))
        status = 401;
    return reply(c, q, status, http_error_obj(rc, msg));
}

static MHD_RESULT
refuse(struct MHD_Connection *c, struct rreq *q, int rc, const char *msg)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = q->uuid[0] ? vm_find_uuid(rctx.d, q->uuid) : NULL;
    event_add(rctx.d->cat, "audit", vm ? vm->name : NULL,
              "refused %s from %s (%s): %s",
              q->kind == R1_CYCLE ? "cycle" : "request",
              q->principal[0] ? q->principal
              : q->peer[0]    ? q->peer
                              : "unauthenticated peer",
              q->addr, msg);
    pthread_mutex_unlock(&rctx.d->lock);
    return reply_error(c, q, rc, msg);
}

/* Kerberos mode: accept the request's AP-REQ; q->peer is the host name of
 * its host/FQDN principal. */
static int
krb_authenticate(struct MHD_Connection *c, const struct listener_ctx *kl,
                 struct rreq *q)
{
    const char *a =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!a || strncasecmp(a, "Negotiate ", 10) != 0)
        return vr_err(-EACCES, "no Kerberos ticket (no 'Authorization: "
                               "Negotiate' header)");
    char *principal = NULL, *fqdn = NULL;
    int rc = krb_accept(kl->cred, a + 10, &q->gss, &principal, &fqdn);
    if (principal)
        snprintf(q->principal, sizeof q->principal, "%s", principal);
    if (fqdn)
        snprintf(q->peer, sizeof q->peer, "%s", fqdn);
    free(principal);
    free(fqdn);
    if (rc < 0)
        return rc;
    const char *w =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, KRB_WRAP_HEADER);
    if (w && strcmp(w, KRB_WRAP_VALUE) != 0)
        return vr_err(-EPROTO, "unknown %s: %s", KRB_WRAP_HEADER, w);
    q->wrapped = w != NULL;
    pthread_mutex_lock(&rctx.d->lock);
    bool need = rctx.d->cfg.krb_encrypt;
    pthread_mutex_unlock(&rctx.d->lock);
    if (need && !q->wrapped)
        return vr_err(-EACCES, "this Replica server accepts Kerberos "
                      "replication only encrypted (on the primary: "
                      "'vmreplica replication set VM --kerberos-encrypt "
                      "on')");
    if (gnutls_hash_init(&q->hash, GNUTLS_DIG_SHA256) < 0)
        return vr_err(-ENOMEM, "sha256");
    return 0;
}

/* Kerberos mode, at the end of the body: the MIC over the request's
 * digest must verify before anything the request carries is used. */
static int
krb_check_request(struct MHD_Connection *c, struct rreq *q, const char *url,
                  const char *method)
{
    int rc;
    if (q->wrapped && (rc = krb_unframe_end(&q->unf)) < 0)
        return rc;
    uint8_t sha[32], digest[KRB_DIGEST_LEN];
    gnutls_hash_deinit(q->hash, sha);
    q->hash = NULL;
#define H(name) MHD_lookup_connection_value(c, MHD_HEADER_KIND, name)
    struct krb_req_fields f = {
        .method = method, .path = url, .epoch = H("X-Vmreplica-Epoch"),
        .history = H("X-Vmreplica-History"),
        .encoding = H("Content-Encoding"), .wrap = H(KRB_WRAP_HEADER),
    };
    krb_request_digest(&f, sha, digest);
    if (!q->wrapped)
        return krb_verify(q->gss, digest, H(KRB_MIC_HEADER));
#undef H
    /* Wrapped: the last frame carried the digest (wrap tokens are signed
     * and were checked in sequence). */
    uint8_t diff = 0;
    for (size_t i = 0; i < KRB_DIGEST_LEN; i++)
        diff |= (uint8_t)(digest[i] ^ q->unf.digest[i]);
    if (diff)
        return vr_err(-EACCES, "kerberos: message integrity check failed: "
                               "the body differs from the one signed");
    return 0;
}

static int body_chunk(void *ud, const char *data, size_t n);

/* The request's epoch (X-Vmreplica-Epoch, required but for the test
 * request) and the primary's recovery-history settings
 * (X-Vmreplica-History: N/INTERVAL_S, optional): 0 or -EPROTO. */
static int
parse_headers(struct MHD_Connection *c, struct rreq *q)
{
    const char *ep =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Vmreplica-Epoch");
    char *end = NULL;
    errno = 0;
    q->epoch = ep && ep[0] >= '1' && ep[0] <= '9' ? strtoull(ep, &end, 10)
                                                  : 0;
    if (q->kind != R1_TEST && (!ep || !end || *end || errno ||
                               q->epoch == 0 || q->epoch > INT64_MAX))
        return vr_err(-EPROTO, "missing or bad X-Vmreplica-Epoch");
    const char *hist = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                   "X-Vmreplica-History");
    if (hist) {
        unsigned long n, iv;
        char *e1, *e2;
        n = strtoul(hist, &e1, 10);
        iv = *e1 == '/' ? strtoul(e1 + 1, &e2, 10) : 0;
        if (*e1 != '/' || *e2 || n > REPL_MAX_HISTORY || iv < 1 ||
            iv > 86400)
            return vr_err(-EPROTO, "bad X-Vmreplica-History");
        q->has_history = true;
        q->history = (unsigned)n;
        q->interval_s = (unsigned)iv;
    }
    return 0;
}

/* The first call of a request: authenticate the peer (its listener's
 * way), then parse the URL and headers and authorize the peer.  A peer
 * that fails authentication is refused at once; any later failure is
 * kept in q and answered once the body has been read. */
static MHD_RESULT
request_begin(struct MHD_Connection *c, const struct listener_ctx *lc,
              const char *url, const char *method, struct rreq *q)
{
    guard_request(c, true);
    peer_addr(c, q->addr, sizeof q->addr);
    char *id = NULL;
    vr_err_clear();
    int arc = q->krb ? krb_authenticate(c, lc, q) : verify_peer(c, lc, &id);
    if (arc < 0) {
        /* An unauthenticated peer learns nothing, not even whether the
         * URL exists, and none of its body is read. */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        return refuse(c, q, arc == -EPROTO || arc == -ETIME ? arc : -EACCES,
                      msg);
    }
    if (id)
        snprintf(q->peer, sizeof q->peer, "%s", id);
    free(id);
    /* Kerberos-wrapped bodies: the unframer's frame buffers. */
    if (q->wrapped && mem_charge(q, R1_KRB_MEM, false) < 0) {
        rreq_fail(q, -EAGAIN, vr_errmsg());
        return MHD_YES;
    }
    if (parse_url(url, method, q) < 0) {
        rreq_fail(q, -EINVAL, vr_errmsg());
        return MHD_YES;
    }
    if (parse_headers(c, q) < 0) {
        rreq_fail(q, -EPROTO, vr_errmsg());
        return MHD_YES;
    }
    pthread_mutex_lock(&rctx.d->lock);
    bool enabled = rctx.d->cfg.replica_enabled;
    arc = enabled ? authz_decide(rctx.d->cat, &rctx.d->cfg, q->peer, &q->root,
                                 &q->group)
                  : 0;
    pthread_mutex_unlock(&rctx.d->lock);
    if (!enabled)
        rreq_fail(q, -EPERM, "replication is not enabled on this server");
    else if (arc < 0)
        rreq_fail(q, arc, vr_errmsg());
    return MHD_YES;
}

/* A piece of the body: unwrapped first if it travels wrapped. */
static void
request_data(struct rreq *q, const char *data, size_t n)
{
    if (!q->wrapped) {
        VR_IGNORE(body_chunk(q, data, n));
        return;
    }
    if (q->unframe_failed)
        return;
    int rc = krb_unframe(&q->unf, q->gss, data, n, body_chunk, q);
    if (rc < 0) {
        q->unframe_failed = true;
        rreq_fail(q, rc, vr_errmsg());
    }
}

/* --- endpoints: one handler per kind of request -----------------------------
 */

/* GET /r1/vms/UUID: the Replica VM's status (any epoch). */
static int
ep_status(struct rreq *q, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm;
    q->epoch = 0;
    int rc = own_vm(q, &vm);
    if (rc == 0)
        *out = replica_status_json(vm);
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}

/* GET /r1/test (server test-connection): authenticated and authorized
 * (or refused) like any request; tells who we are and what the peer may. */
static int
ep_test(struct rreq *q, json_object **out)
{
    *out = json_object_new_object();
    pthread_mutex_lock(&rctx.d->lock);
    json_object_object_add(*out, "server", rctx.d->cfg.hostname
                               ? json_object_new_string(rctx.d->cfg.hostname)
                               : NULL);
    pthread_mutex_unlock(&rctx.d->lock);
    json_object_object_add(*out, "primary", json_object_new_string(q->peer));
    json_object_object_add(*out, "storage", json_object_new_string(q->root));
    json_object_object_add(*out, "trust_group",
                           json_object_new_string(q->group));
    return 0;
}

/* PUT of a base chunk or a cycle: staged at the end of its body (an
 * upload that had nothing to stage is answered {} at once). */
static int
ep_upload(struct rreq *q, json_object **out)
{
    int rc = 0;
    if (!q->dec) {
        rc = upload_begin(q, q->conn);
        if (rc == 1) {
            /* A duplicate, already staged or applied: answered {}. */
            *out = json_object_new_object();
            return 0;
        }
    }
    if (rc == 0)
        rc = upload_finish(q, out);
    release_busy(q);
    return rc;
}

static int (*const endpoints[])(struct rreq *q, json_object **out) = {
    [R1_STATUS] = ep_status,         [R1_REGISTER] = do_register,
    [R1_BASE] = ep_upload,           [R1_INITIAL_DONE] = do_initial_done,
    [R1_CYCLE] = ep_upload,          [R1_REMOVE] = do_remove,
    [R1_PREPARED] = do_prepared,     [R1_TEST] = ep_test,
    [R1_INITIAL_BEGIN] = do_initial_begin, [R1_HASHES] = do_hashes,
    [R1_RESYNC] = do_resync_begin,   [R1_RESYNC_DONE] = do_resync_complete,
};

/* The end of a request: check a Kerberos request's signature, then answer
 * a failure kept in q, or run its endpoint and answer what it returns. */
static MHD_RESULT
request_end(struct MHD_Connection *c, struct rreq *q, const char *url,
            const char *method)
{
    if (q->krb && !q->unframe_failed) {
        /* Checked even when the request already failed: a body changed on
         * the way is the cause to report, not what it made us refuse. */
        vr_err_clear();
        int rc = krb_check_request(c, q, url, method);
        if (rc < 0) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", vr_errmsg());
            release_busy(q);
            return refuse(c, q, rc, msg);
        }
    }
    if (q->failed) {
        release_busy(q);
        return refuse(c, q, q->rc, q->msg);
    }
    json_object *out = NULL;
    vr_err_clear();
    int rc = endpoints[q->kind](q, &out);
    if (rc < 0) {
        json_object_put(out);
        char msg[512];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        /* What the peer sent or may not do is audited; a failure of ours
         * (5xx: no space, I/O) is logged. */
        if (http_status_for(rc) < 500 || rc == -ENOSPC || rc == -EAGAIN)
            return refuse(c, q, rc, msg);
        log_warn("replica", "%s %s from %s: %s", method, url, q->peer, msg);
        return reply_error(c, q, rc, msg);
    }
    return reply(c, q, 200, out ? out : json_object_new_object());
}

MHD_RESULT
r1_access(void *cls, struct MHD_Connection *c, const char *url,
          const char *method, const char *version VR_UNUSED,
          const char *upload_data, size_t *upload_size, void **con_cls)
{
    struct rreq *q = *con_cls;
    if (!q) {
        q = xcalloc(1, sizeof *q);
        q->t0_ms = vr_mono_ms();
        q->fd = -1;
        q->stgfd = -1;
        q->conn = c;
        const struct listener_ctx *lc = cls;
        q->krb = lc->kerberos;
        *con_cls = q;
        return request_begin(c, lc, url, method, q);
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        request_data(q, upload_data, n);
        return MHD_YES;
    }
    return request_end(c, q, url, method);
}

/* An upload refused while its body still arrives (drained until its end,
 * to answer): its decoder, temporary file, space claim and memory charge
 * go now, not when the peer has sent the rest, so that concurrent
 * transfers can have them. */
static void
upload_abort(struct rreq *q)
{
    cyc_decoder_free(q->dec);
    q->dec = NULL;
    if (q->fd >= 0) {
        close(q->fd);
        q->fd = -1;
    }
    if (q->tmp_path) {
        unlinkat(q->stgfd, q->tmp_name, 0);
        free(q->tmp_path);
        q->tmp_path = NULL;
    }
    claim_unlink(q);
    mem_release(q);
}

/* A piece of the request's (plaintext) body. */
static int
body_chunk(void *ud, const char *data, size_t n)
{
    struct rreq *q = ud;
    if (q->hash)
        gnutls_hash(q->hash, data, n);
    if (q->failed)
        return 0; /* drain; answer at the end */
    vr_fault_point("receive-chunk");
    if (q->kind == R1_BASE || q->kind == R1_CYCLE) {
        int rc = 0;
        if (!q->dec && (rc = upload_begin(q, q->conn)) != 0) {
            if (rc == 1) {
                q->kind = R1_STATUS; /* duplicate cycle: ignore body */
                return 0;
            }
            rreq_fail(q, rc, vr_errmsg());
            upload_abort(q);
            return 0;
        }
        if ((rc = cyc_decoder_feed(q->dec, data, n)) < 0) {
            rreq_fail(q, rc, vr_errmsg());
            upload_abort(q);
        }
    } else if (q->kind != R1_STATUS) {
        if (q->len + n > R1_JSON_MAX) {
            rreq_fail(q, -EFBIG, "request body too large");
            return 0;
        }
        if (mem_charge(q, n + (q->body ? 0 : 1), false) < 0) {
            rreq_fail(q, -EAGAIN, vr_errmsg());
            return 0;
        }
        q->body = xrealloc(q->body, q->len + n + 1);
        memcpy(q->body + q->len, data, n);
        q->len += n;
        q->body[q->len] = '\0';
    }
    return 0;
}

