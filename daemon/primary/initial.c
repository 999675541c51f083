/* initial.c: initial replication on the primary (SPEC §5) — a full copy
 * of the allocated extents, or a comparison of chunk hashes with the copy
 * the Replica server holds (--use-existing) that sends only what differs;
 * both as base chunks after a base cycle, resumable at the position the
 * catalog keeps, then initial-complete with the first consistent cycle
 * (docs/design.md, "Initial replication").  Or by external media
 * (--export DIR, export.c): the copy goes to DIR, and the primary waits
 * until the Replica server's status shows it imported with this base, then
 * sends initial-complete.  A start may be scheduled (--at, at most 7 days
 * ahead: initial_schedule_due), and stopped (initial_stop).  Runs on the
 * VM's shipper thread (shipper.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "chunkhash.h"
#include "cycle.h"
#include "core/logdir.h"
#include "proc/vmproc.h"
#include "shipper-int.h"

#define BASE_CHUNK_BYTES (32u << 20)
#define BASE_REC_BYTES   (1u << 20)
/* A comparison's window: at most this much data differs, so one base
 * chunk holds it (as BASE_CHUNK_BYTES for a full copy). */
#define COMPARE_WINDOW   BASE_CHUNK_BYTES
/* How often a primary whose export is written asks the Replica server
 * whether it was imported. */
#define IMPORT_POLL_MS   2000

/* --- initial replication --------------------------------------------------- */

static uint64_t
allocated_bytes(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    uint64_t total = 0;
    off_t pos = 0;
    for (;;) {
        off_t data = lseek(fd, pos, SEEK_DATA);
        if (data < 0)
            break;
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            break;
        total += (uint64_t)(hole - data);
        pos = hole;
    }
    close(fd);
    return total;
}

/* One base chunk of a full copy: up to BASE_CHUNK_BYTES of disk d's
 * allocated data from offset, built (read, compressed) into fd. */
struct base_chunk {
    const struct job *jb; /* its disks, uuid, compression: read only */
    uint64_t base, epoch;
    unsigned d;
    uint64_t offset;
    uint64_t next;  /* where the next chunk of disk d starts */
    bool done;      /* disk d has no more data after this chunk */
    uint64_t data, raw, wire;
    int fd;
    int rc;
    char msg[512];  /* rc's message (it may be built on another thread) */
};

static int
build_base_chunk(struct base_chunk *c)
{
    const struct job *jb = c->jb;
    const char *path = jb->disks[c->d].path;
    c->data = c->raw = c->wire = 0;
    c->done = false;
    if (ftruncate(c->fd, 0) < 0 || lseek(c->fd, 0, SEEK_SET) < 0)
        return vr_err(-errno, "outgoing payload: %s", strerror(errno));
    int dfd = open(path, O_RDONLY | O_CLOEXEC);
    if (dfd < 0)
        return vr_err(-errno, "open %s: %s", path, strerror(errno));
    struct cyc_hdr h = { .version = CYC_VERSION,
                         .flags = CYC_F_BASE,
                         .cycle = c->base,
                         .epoch = c->epoch,
                         .ndisks = jb->ndisks };
    int rc = cyc_uuid_parse(jb->uuid, h.uuid);
    struct cyc_builder *b = NULL;
    if (rc == 0)
        rc = cyc_builder_new(c->fd, jb->compression, 1, &h, &b);
    char *buf = xmalloc(BASE_REC_BYTES);
    uint64_t size = jb->disks[c->d].size, pos = c->offset, sent = 0;
    while (rc == 0 && sent < BASE_CHUNK_BYTES) {
        off_t data = lseek(dfd, (off_t)pos, SEEK_DATA);
        if (data < 0 || (uint64_t)data >= size) {
            c->done = true;
            pos = size;
            break;
        }
        off_t hole = lseek(dfd, data, SEEK_HOLE);
        uint64_t end = hole < 0 ? size : (uint64_t)hole;
        if (end > size)
            end = size;
        uint64_t p = (uint64_t)data;
        while (rc == 0 && p < end && sent < BASE_CHUNK_BYTES) {
            uint32_t len = (uint32_t)(end - p < BASE_REC_BYTES ? end - p
                                                               : BASE_REC_BYTES);
            rc = io_pread_all(dfd, buf, len, (off_t)p);
            if (rc < 0) {
                rc = vr_err(rc, "read %s: %s", path, strerror(-rc));
                break;
            }
            struct cl_rec r = { .kind = CL_WRITE,
                                .disk = (uint16_t)c->d,
                                .len = len,
                                .offset = p,
                                .data = buf };
            rc = cyc_builder_add(b, &r);
            p += len;
            sent += len;
        }
        pos = p;
    }
    free(buf);
    close(dfd);
    if (rc == 0)
        rc = cyc_builder_finish(b, &c->raw, &c->wire);
    cyc_builder_free(b);
    if (rc == 0) {
        c->next = pos;
        c->data = sent;
    }
    return rc;
}

static void *
build_thread(void *arg)
{
    struct base_chunk *c = arg;
    vr_thread_name("copy-build");
    c->rc = build_base_chunk(c);
    if (c->rc < 0)
        snprintf(c->msg, sizeof c->msg, "%s", vr_errmsg());
    return NULL;
}

/* A full copy reads and compresses the next chunk while the current one
 * is sent, on a thread of its own, into the other of two unlinked files:
 * one chunk ahead, never recorded (the catalog's position moves only when
 * a chunk is acknowledged; a restart builds the next one again).  It reads
 * the disks a little earlier than a copy one chunk at a time would, still
 * after the base cycle's seal and before the first point is taken. */
struct copier {
    struct base_chunk chunk[2];
    unsigned cur;  /* chunk[cur]: the one being sent */
    pthread_t thread;
    bool ahead;    /* the thread builds chunk[cur ^ 1] */
};

static int
copier_init(struct copier *cp, const struct job *jb, uint64_t base)
{
    memset(cp, 0, sizeof *cp);
    cp->chunk[0].fd = cp->chunk[1].fd = -1;
    int rc = io_mkdir_p(jb->rundir, 0750);
    for (unsigned i = 0; rc == 0 && i < 2; i++) {
        CLEANUP_FREE char *path = xasprintf("%s/outgoing-%u.tmp", jb->rundir,
                                            i);
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0)
            rc = vr_err(-errno, "create %s: %s", path, strerror(errno));
        else
            unlink(path);
        cp->chunk[i] = (struct base_chunk){
            .jb = jb, .base = base, .epoch = jb->peer.epoch, .fd = fd
        };
    }
    return rc;
}

static void
copier_wait(struct copier *cp)
{
    if (cp->ahead)
        pthread_join(cp->thread, NULL);
    cp->ahead = false;
}

static void
copier_fini(struct copier *cp)
{
    copier_wait(cp);
    for (unsigned i = 0; i < 2; i++)
        if (cp->chunk[i].fd >= 0)
            close(cp->chunk[i].fd);
}

/* The chunk of disk d at off: the one built ahead if it is that one, else
 * built now. */
static int
copier_get(struct copier *cp, unsigned d, uint64_t off,
           struct base_chunk **out)
{
    struct base_chunk *c = &cp->chunk[cp->cur ^ 1];
    bool was_ahead = cp->ahead;
    copier_wait(cp);
    if (was_ahead && c->d == d && c->offset == off) {
        cp->cur ^= 1;
        *out = c;
        return c->rc < 0 ? vr_err(c->rc, "%s", c->msg) : 0;
    }
    c = &cp->chunk[cp->cur];
    c->d = d;
    c->offset = off;
    *out = c;
    return build_base_chunk(c);
}

/* Start building the chunk after *c (if there is one) on the thread. */
static void
copier_ahead(struct copier *cp, const struct base_chunk *c)
{
    struct base_chunk *n = &cp->chunk[cp->cur ^ 1];
    n->d = c->done ? c->d + 1 : c->d;
    n->offset = c->done ? 0 : c->next;
    if (n->d >= c->jb->ndisks)
        return;
    cp->ahead = pthread_create(&cp->thread, NULL, build_thread, n) == 0;
}

/* What the Replica server's answer to a base chunk says is durable
 * (replica.c, upload_finish): the chunk itself unless "unsynced"; the
 * chunk it applied before it if "synced_chunk" names it.  A server that
 * says neither synced the chunk before answering. */
struct chunk_ack {
    bool unsynced;
    bool has_synced;
    uint64_t synced;
};

static void
chunk_ack_parse(json_object *resp, struct chunk_ack *a)
{
    json_object *v;
    *a = (struct chunk_ack){ 0 };
    if (resp && json_object_object_get_ex(resp, "unsynced", &v))
        a->unsynced = json_object_get_boolean(v);
    if (resp && json_object_object_get_ex(resp, "synced_chunk", &v) &&
        json_object_is_type(v, json_type_int) && json_object_get_int64(v) > 0) {
        a->has_synced = true;
        a->synced = (uint64_t)json_object_get_int64(v);
    }
}

/* PUT base chunk seq from fd (wire bytes) and read what its answer says. */
static int
put_base_chunk(struct job *jb, uint64_t seq, int fd, uint64_t wire,
               struct chunk_ack *ack)
{
    test_send_delay();
    CLEANUP_FREE char *path = xasprintf(
        "/r1/vms/%s/base/%llu", jb->uuid, (unsigned long long)seq);
    json_object *resp = NULL;
    int rc = peer_call(&jb->peer, "PUT", path, NULL, fd, wire,
                       jb->compression, &resp);
    if (rc == 0)
        chunk_ack_parse(resp, ack);
    json_object_put(resp);
    return rc;
}

/* Send the next chunk of the full copy: disk d from *offset.  Advances
 * *offset; *done when the disk is finished. */
static int
send_base_chunk(struct copier *cp, struct job *jb, unsigned d, uint64_t seq,
                uint64_t *offset, bool *done, uint64_t *data_bytes,
                uint64_t *wire_bytes, uint64_t *raw_bytes,
                struct chunk_ack *ack)
{
    struct base_chunk *c;
    uint64_t t0 = vr_mono_ms();
    int rc = copier_get(cp, d, *offset, &c);
    if (rc < 0)
        return rc;
    copier_ahead(cp, c);
    if (c->data > 0) {
        uint64_t t1 = vr_mono_ms();
        rc = put_base_chunk(jb, seq, c->fd, c->wire, ack);
        if (rc < 0)
            return rc;
        log_debug("initial", "%s: base chunk %llu (%llu bytes, %llu on the "
                  "wire): waited %llu ms for its build, sent in %llu ms",
                  jb->name, (unsigned long long)seq,
                  (unsigned long long)c->raw, (unsigned long long)c->wire,
                  (unsigned long long)(t1 - t0),
                  (unsigned long long)(vr_mono_ms() - t1));
    }
    *offset = c->next;
    *done = c->done;
    *data_bytes = c->data;
    *wire_bytes = c->data > 0 ? c->wire : 0;
    *raw_bytes = c->data > 0 ? c->raw : 0;
    return 0;
}

/* --- initial replication by comparison ------------------------------------ */

/* The Replica server's hashes of [off, off + len) of disk d in chunks of
 * chunk bytes, into h (chunkhash_count() of them). */
static int
remote_hashes(const struct job *jb, unsigned d, uint64_t off, uint64_t len,
              uint64_t chunk, uint8_t *h)
{
    uint64_t n = chunkhash_count(jb->disks[d].size, off, len, chunk);
    CLEANUP_FREE char *body = xasprintf(
        "{\"disk\": %u, \"offset\": %llu, \"length\": %llu, \"chunk\": "
        "%llu}", d, (unsigned long long)off, (unsigned long long)len,
        (unsigned long long)chunk);
    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s/hashes", jb->uuid);
    json_object *resp = NULL, *v;
    int rc = peer_call(&jb->peer, "POST", path, body, -1, 0, false, &resp);
    if (rc == 0 && (!resp || !json_object_object_get_ex(resp, "hashes", &v) ||
                    !json_object_is_type(v, json_type_string) ||
                    chunkhash_unhex(json_object_get_string(v), n, h) < 0))
        rc = vr_err(-EPROTO, "hashes of disk %u at %llu from the Replica "
                    "server: not %llu hashes", d, (unsigned long long)off,
                    (unsigned long long)n);
    json_object_put(resp);
    return rc;
}

static bool
all_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* The fine chunks of [off, off + len) of disk d that differ between here
 * and the Replica server go into b: a write, or a zero record where this
 * disk reads as zeroes.  Adds their bytes to *sent. */
int
add_differing(const struct job *jb, unsigned d, int dfd, uint64_t off,
              uint64_t len, struct cyc_builder *b, uint64_t *sent)
{
    uint64_t size = jb->disks[d].size;
    uint64_t n = chunkhash_count(size, off, len, CHUNKHASH_FINE);
    uint8_t *mine = xmalloc(n * CHUNKHASH_BYTES);
    uint8_t *theirs = xmalloc(n * CHUNKHASH_BYTES);
    uint8_t *buf = xmalloc(CHUNKHASH_FINE);
    int rc = chunkhash_fd(dfd, size, off, len, CHUNKHASH_FINE, mine, NULL);
    if (rc < 0)
        rc = vr_err(rc, "%s: %s", jb->disks[d].path, vr_errmsg());
    if (rc == 0)
        rc = remote_hashes(jb, d, off, len, CHUNKHASH_FINE, theirs);
    for (uint64_t i = 0; rc == 0 && i < n; i++) {
        if (memcmp(mine + i * CHUNKHASH_BYTES, theirs + i * CHUNKHASH_BYTES,
                   CHUNKHASH_BYTES) == 0)
            continue;
        uint64_t p = off + i * CHUNKHASH_FINE;
        uint32_t k = (uint32_t)(size - p < CHUNKHASH_FINE ? size - p
                                                          : CHUNKHASH_FINE);
        rc = io_pread_all(dfd, buf, k, (off_t)p);
        if (rc < 0) {
            rc = vr_err(rc, "read %s: %s", jb->disks[d].path, strerror(-rc));
            break;
        }
        struct cl_rec r = { .kind = all_zero(buf, k) ? CL_ZERO : CL_WRITE,
                            .disk = (uint16_t)d,
                            .len = k,
                            .offset = p,
                            .data = buf };
        rc = cyc_builder_add(b, &r);
        *sent += k;
    }
    free(buf);
    free(theirs);
    free(mine);
    return rc;
}

/* Compare one window of disk d from *offset (COMPARE_WINDOW bytes) with
 * the Replica server's copy and send what differs as base chunk seq:
 * coarse hashes first, then fine ones over the coarse chunks that differ.
 * As send_base_chunk: the window is read live, the cycles after the base
 * put later writes in order.  *compared and *data_bytes: bytes compared
 * and sent. */
static int
send_compare_chunk(struct job *jb, unsigned d, uint64_t base, uint64_t seq,
                   uint64_t *offset, bool *done, uint64_t *compared,
                   uint64_t *data_bytes, uint64_t *wire_bytes,
                   uint64_t *raw_bytes, struct chunk_ack *ack)
{
    uint64_t size = jb->disks[d].size, off = *offset;
    *done = false;
    if (off >= size) {
        *done = true;
        *compared = *data_bytes = *wire_bytes = *raw_bytes = 0;
        return 0;
    }
    uint64_t len = size - off < COMPARE_WINDOW ? size - off : COMPARE_WINDOW;
    uint64_t n = chunkhash_count(size, off, len, CHUNKHASH_COARSE);
    int dfd = open(jb->disks[d].path, O_RDONLY | O_CLOEXEC);
    if (dfd < 0)
        return vr_err(-errno, "open %s: %s", jb->disks[d].path,
                      strerror(errno));
    uint8_t *mine = xmalloc(n * CHUNKHASH_BYTES);
    uint8_t *theirs = xmalloc(n * CHUNKHASH_BYTES);
    int rc = chunkhash_fd(dfd, size, off, len, CHUNKHASH_COARSE, mine, NULL);
    if (rc < 0)
        rc = vr_err(rc, "%s: %s", jb->disks[d].path, vr_errmsg());
    if (rc == 0)
        rc = remote_hashes(jb, d, off, len, CHUNKHASH_COARSE, theirs);

    CLEANUP_FREE char *tmp = NULL;
    int fd = -1;
    struct cyc_builder *b = NULL;
    uint64_t sent = 0;
    for (uint64_t i = 0; rc == 0 && i < n; i++) {
        /* A run of differing coarse chunks is refined in one request. */
        uint64_t j = i;
        while (j < n && memcmp(mine + j * CHUNKHASH_BYTES,
                               theirs + j * CHUNKHASH_BYTES,
                               CHUNKHASH_BYTES) != 0)
            j++;
        if (j == i)
            continue;
        if (!b) {
            fd = tmp_payload(jb, &tmp);
            rc = fd < 0 ? fd : 0;
            struct cyc_hdr h = { .version = CYC_VERSION,
                                 .flags = CYC_F_BASE,
                                 .cycle = base,
                                 .epoch = jb->peer.epoch,
                                 .ndisks = jb->ndisks };
            if (rc == 0)
                rc = cyc_uuid_parse(jb->uuid, h.uuid);
            if (rc == 0)
                rc = cyc_builder_new(fd, jb->compression, 1, &h, &b);
        }
        uint64_t p = off + i * CHUNKHASH_COARSE;
        uint64_t e = off + j * CHUNKHASH_COARSE;
        if (e > off + len)
            e = off + len;
        if (rc == 0)
            rc = add_differing(jb, d, dfd, p, e - p, b, &sent);
        i = j;
    }
    free(theirs);
    free(mine);
    close(dfd);
    uint64_t raw = 0, wire = 0;
    bool built = b != NULL;
    if (rc == 0 && built)
        rc = cyc_builder_finish(b, &raw, &wire);
    cyc_builder_free(b);
    if (rc == 0 && built)
        rc = put_base_chunk(jb, seq, fd, wire, ack);
    if (fd >= 0) {
        close(fd);
        unlink(tmp);
    }
    if (rc == 0) {
        *offset = off + len;
        *done = *offset >= size;
        *compared = len;
        *data_bytes = sent;
        *wire_bytes = wire;
        *raw_bytes = raw;
    }
    return rc;
}

/* The first cycle at whose seal the Replica VM equals this VM, once the
 * copy has read everything: the cycle open now.  A cycle sealed while the
 * copy still read the disk is not one (the copy may have read data written
 * after its seal, which only a later cycle puts in order); every cycle
 * sealed after the last read is (each block is then as the copy read it
 * or as the last cycle that wrote it left it, both as of that seal).
 * Called after the last read, so the cycle open now is at worst later
 * than the first such cycle.  With the disks not served, nothing writes
 * them: the cycle after the log's last seal. */
int
first_consistent_cycle(const struct job *jb, uint64_t base, uint64_t *first)
{
    bool served = false, running = false;
    uint64_t open = 0, bytes, payload;
    vmproc_status(jb->rundir, &served, &running);
    if (!served ||
        vmproc_open_cycle(jb->rundir, &open, &bytes, &payload) < 0) {
        /* Not served, or stopped since (a stop seals first). */
        vr_err_clear();
        uint64_t last = 0;
        int rc = logdir_base(&jb->disks[0], &last);
        if (rc < 0)
            return rc;
        open = last + 1;
    }
    *first = open > base ? open : base + 1;
    return 0;
}

/* The start of a fresh initial replication: the base cycle (a seal, or a
 * new log if tracking had stopped), the method told to the Replica
 * server before its first piece, the position recorded. */
static int
initial_begin(struct vm *vm, struct job *jb)
{
    struct repl *r = vm->repl;
    /* The base: seal so every later write is in a cycle after it.  If
     * tracking had stopped, a new log is started instead: every write
     * after the base is in it, and the copy below sends the rest. */
    bool served = false, running = false;
    uint64_t base = 0;
    vmproc_status(jb->rundir, &served, &running);
    bool intact = tracking_intact(vm, jb, 0) == 0;
    if (!intact && !served)
        return vr_err(-EAGAIN, "tracking stopped on this VM's disks: "
                      "start the VM so initial replication can start a "
                      "new change log");
    vr_err_clear();
    if (!intact) {
        int rc = vmproc_rearm(jb->rundir, &base);
        if (rc < 0)
            return rc;
        pthread_mutex_lock(&pctx.d->lock);
        vm->repl->untracked = false;
        event_add(pctx.d->cat, "info", vm->name, "change tracking restarted "
                  "after cycle %llu for the initial replication",
                  (unsigned long long)base);
        pthread_mutex_unlock(&pctx.d->lock);
    } else if (served) {
        int rc = vmproc_seal(jb->rundir, &base);
        if (rc < 0)
            return rc;
    } else {
        int rc = logdir_base(&jb->disks[0], &base);
        if (rc < 0)
            return rc;
    }
    release_shipped(jb, base);
    pthread_mutex_lock(&pctx.d->lock);
    bool compare = r->initial_method == INITIAL_COMPARE;
    bool export = r->initial_method == INITIAL_EXPORT;
    CLEANUP_FREE char *dir = export ? xstrdup(r->initial_export) : NULL;
    pthread_mutex_unlock(&pctx.d->lock);
    /* Before the first piece: the Replica server keeps its copy for a
     * comparison, resets it for a full copy, or expects an import. */
    CLEANUP_FREE char *ipath = xasprintf("/r1/vms/%s/initial", jb->uuid);
    int rc = peer_call(&jb->peer, "POST", ipath,
                       compare  ? "{\"method\": \"compare\", "
                                  "\"defer_sync\": true}"
                       : export ? "{\"method\": \"import\"}"
                                : "{\"method\": \"full\", "
                                  "\"defer_sync\": true}",
                       -1, 0, false, NULL);
    if (rc < 0)
        return rc;
    uint64_t total = 0;
    for (unsigned i = 0; i < jb->ndisks; i++)
        total += compare ? jb->disks[i].size
                         : allocated_bytes(jb->disks[i].path);
    pthread_mutex_lock(&pctx.d->lock);
    if (r->st != REPL_ST_INITIAL) { /* initial-replication stop */
        pthread_mutex_unlock(&pctx.d->lock);
        return -ECANCELED;
    }
    r->base_cycle = base;
    r->first_point = 0;
    r->initial_seq = 1;
    r->initial_disk = 0;
    r->initial_offset = 0;
    r->initial_total = total;
    r->initial_sent = 0;
    r->initial_compared = 0;
    r->last_cycle = base;
    rc = catalog_save_repl(pctx.d->cat, r);
    if (export)
        event_add(pctx.d->cat, "info", vm->name,
                  "initial replication to external media started: %s, "
                  "%llu bytes allocated, base cycle %llu", dir,
                  (unsigned long long)total, (unsigned long long)base);
    else if (compare)
        event_add(pctx.d->cat, "info", vm->name,
                  "initial replication started by comparison with the "
                  "Replica server's copy: %llu bytes to compare, base "
                  "cycle %llu",
                  (unsigned long long)total, (unsigned long long)base);
    else
        event_add(pctx.d->cat, "info", vm->name,
                  "initial replication started: %llu bytes allocated, "
                  "base cycle %llu",
                  (unsigned long long)total, (unsigned long long)base);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

/* --- initial replication by external media -------------------------------- */

/* The base cycle of the export the Replica server imported (0: none). */
static int
remote_imported(const struct job *jb, uint64_t *imported)
{
    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s", jb->uuid);
    json_object *resp = NULL, *v;
    int rc = peer_call(&jb->peer, "GET", path, NULL, -1, 0, false, &resp);
    *imported = 0;
    if (rc == 0 && resp && json_object_object_get_ex(resp, "imported_base", &v) &&
        json_object_is_type(v, json_type_int) && json_object_get_int64(v) > 0)
        *imported = (uint64_t)json_object_get_int64(v);
    json_object_put(resp);
    return rc;
}

/* An export: write it unless written (initial_disk past the last disk
 * records that it is), then wait for the Replica server's import of this
 * base.  1 once imported (initial-complete follows), 0 to be called again
 * (still waiting), -errno (-ECANCELED: stopped). */
static int
export_phase(struct vm *vm, struct job *jb)
{
    struct repl *r = vm->repl;
    pthread_mutex_lock(&pctx.d->lock);
    bool written = r->initial_disk >= jb->ndisks;
    uint64_t base = r->base_cycle;
    CLEANUP_FREE char *dir = xstrdup(r->initial_export ? r->initial_export
                                                       : "");
    pthread_mutex_unlock(&pctx.d->lock);
    if (!written) {
        uint64_t first = 0, stored = 0;
        int rc = export_write(vm, jb, dir, base, &first, &stored);
        if (rc < 0)
            return rc;
        pthread_mutex_lock(&pctx.d->lock);
        if (r->st != REPL_ST_INITIAL) {
            pthread_mutex_unlock(&pctx.d->lock);
            return -ECANCELED;
        }
        r->initial_disk = jb->ndisks;
        r->initial_offset = 0;
        r->first_point = first;
        rc = catalog_save_repl(pctx.d->cat, r);
        event_add(pctx.d->cat, "info", vm->name,
                  "initial replication exported to %s: %llu bytes read, "
                  "%llu bytes stored, base cycle %llu; import it on the "
                  "Replica server with 'vmreplica initial-replication "
                  "import %s --from DIR'", dir, (unsigned long long)r->initial_sent,
                  (unsigned long long)stored, (unsigned long long)base,
                  vm->name);
        pthread_mutex_unlock(&pctx.d->lock);
        if (rc < 0)
            return rc;
        vr_fault_point("export-written");
    }
    uint64_t imported = 0;
    int rc = remote_imported(jb, &imported);
    if (rc < 0)
        return rc;
    if (imported == base)
        return 1;
    /* Not yet: look again in a while (a stop or a shutdown wakes us). */
    pthread_mutex_lock(&pctx.d->lock);
    if (!r->stop && !pctx.d->shutting_down && r->st == REPL_ST_INITIAL)
        daemon_wait_ms(pctx.d, IMPORT_POLL_MS);
    bool go = !r->stop && r->st == REPL_ST_INITIAL;
    pthread_mutex_unlock(&pctx.d->lock);
    return go ? 0 : -ECANCELED;
}

/* --- schedule and stop ------------------------------------------------------ */

bool
initial_schedule_due(struct vm *vm)
{
    struct repl *r = vm->repl;
    if (r->st != REPL_ST_READY_INITIAL || !r->initial_at_ms ||
        vr_wall_ms() < r->initial_at_ms)
        return false;
    char ts[32];
    vr_rfc3339(r->initial_at_ms, ts);
    r->initial_at_ms = 0;
    r->initial_seq = 0;
    free(r->task);
    r->task = xstrdup("InitialReplication");
    if (repl_transition_event(pctx.d->cat, vm, REPL_ST_INITIAL, REPL_T_SAVE,
                              "info", "scheduled initial replication "
                              "started (it was set for %s)", ts) < 0) {
        log_warn("shipper", "%s: %s", vm->name, vr_errmsg());
        vr_err_clear();
        return false;
    }
    return true;
}

int
initial_stop(struct vm *vm)
{
    struct repl *r = vm->repl;
    if (r->mode != VM_MODE_PRIMARY)
        return vr_err(-EBUSY, "vm %s: initial replication is stopped on "
                      "the primary", vm->name);
    if (r->initial_done)
        return vr_err(-EALREADY, "vm %s: initial replication is already "
                      "done", vm->name);
    if (r->st == REPL_ST_READY_INITIAL && r->initial_at_ms) {
        char ts[32];
        vr_rfc3339(r->initial_at_ms, ts);
        r->initial_at_ms = 0;
        free(r->initial_export);
        r->initial_export = NULL;
        int rc = catalog_save_repl(pctx.d->cat, r);
        if (rc == 0)
            event_add(pctx.d->cat, "info", vm->name, "initial replication "
                      "scheduled for %s cancelled", ts);
        return rc;
    }
    if (r->st != REPL_ST_INITIAL)
        return vr_err(-EINVAL, "vm %s: no initial replication is scheduled "
                      "or running (state %s)", vm->name,
                      repl_st_name(r->st));
    /* A copy already past its last piece only has initial-complete left:
     * the Replica server may have taken it already. */
    if (r->initial_seq &&
        (r->initial_disk >= vm->ndisks || r->initial_committing) &&
        r->initial_method != INITIAL_EXPORT)
        return vr_err(-EBUSY, "vm %s: the initial copy is complete and "
                      "being committed; it cannot be stopped", vm->name);
    uint64_t sent = r->initial_method == INITIAL_COMPARE ? r->initial_compared
                                                         : r->initial_sent;
    r->initial_seq = 0;
    r->initial_disk = 0;
    r->initial_offset = 0;
    r->initial_sent = r->initial_compared = r->initial_total = 0;
    r->first_point = 0;
    free(r->initial_export);
    r->initial_export = NULL;
    free(r->task);
    r->task = NULL;
    r->kick = true;
    pthread_cond_broadcast(&pctx.d->cond);
    return repl_transition_event(pctx.d->cat, vm, REPL_ST_READY_INITIAL,
                                 REPL_T_SAVE, "info", "initial replication "
                                 "stopped after %llu bytes; it starts "
                                 "afresh with 'initial-replication start'",
                                 (unsigned long long)sent);
}

/* Send the chunks of the copy or comparison from the catalog's position
 * to the end of the last disk.  The catalog's position (initial_disk,
 * initial_offset, initial_seq) is where a restart goes on: every chunk
 * before it is durable on the Replica server.  A chunk answered
 * "unsynced" is pending: the position stays at its start until the next
 * answer names it synced (then its bytes count), and an answer that does
 * not (the Replica server restarted meanwhile) has it sent again.  Bytes
 * on the wire count as they are sent.  At the end, *last: the chunk still
 * pending (0: none), for initial-complete to confirm, and held[0..1] its
 * data and compared bytes, to count once it has. */
struct chunk_pos {
    unsigned d;
    uint64_t off, seq;
};

static void
set_position(struct repl *r, const struct chunk_pos *p)
{
    r->initial_disk = p->d;
    r->initial_offset = p->off;
    r->initial_seq = p->seq;
}

static int
send_chunks(struct repl *r, struct job *jb, struct copier *cp, uint64_t *last,
            uint64_t held[2])
{
    struct chunk_pos cur, pend_at = { 0 };
    bool pending = false;
    uint64_t pend_data = 0, pend_compared = 0;

    pthread_mutex_lock(&pctx.d->lock);
    cur = (struct chunk_pos){ r->initial_disk, r->initial_offset,
                              r->initial_seq };
    pthread_mutex_unlock(&pctx.d->lock);
    for (;;) {
        pthread_mutex_lock(&pctx.d->lock);
        bool stop = r->stop || r->st != REPL_ST_INITIAL;
        bool compare = r->initial_method == INITIAL_COMPARE;
        uint64_t base = r->base_cycle;
        pthread_mutex_unlock(&pctx.d->lock);
        if (stop)
            return -ECANCELED;
        if (cur.d >= jb->ndisks) {
            *last = pending ? pend_at.seq : 0;
            held[0] = pending ? pend_data : 0;
            held[1] = pending ? pend_compared : 0;
            return 0;
        }
        bool done = false;
        uint64_t off = cur.off, data = 0, wire = 0, raw = 0, compared = 0;
        struct chunk_ack ack = { 0 };
        int rc = compare ? send_compare_chunk(jb, cur.d, base, cur.seq, &off,
                                              &done, &compared, &data, &wire,
                                              &raw, &ack)
                         : send_base_chunk(cp, jb, cur.d, cur.seq, &off, &done,
                                           &data, &wire, &raw, &ack);
        if (rc < 0)
            return rc;
        struct chunk_pos at = cur;
        if (wire > 0)
            cur.seq++;
        if (done) {
            cur.d++;
            cur.off = 0;
        } else {
            cur.off = off;
        }
        pthread_mutex_lock(&pctx.d->lock);
        if (r->st != REPL_ST_INITIAL) { /* stopped meanwhile: forgotten */
            pthread_mutex_unlock(&pctx.d->lock);
            return -ECANCELED;
        }
        r->bytes_wire += wire;
        r->bytes_raw += raw;
        bool rewind = false;
        if (wire > 0 && pending) {
            if (ack.has_synced && ack.synced == pend_at.seq) {
                r->initial_sent += pend_data;
                r->initial_compared += pend_compared;
                pending = false;
            } else {
                rewind = true;
            }
        }
        if (rewind) {
            log_info("initial", "%s: the Replica server has no word of base "
                     "chunk %llu being durable (did it restart?): sending it "
                     "again", jb->name, (unsigned long long)pend_at.seq);
            cur = pend_at; /* the position is there already */
            pending = false;
        } else if (wire > 0 && ack.unsynced) {
            pending = true;
            pend_at = at;
            pend_data = data;
            pend_compared = compared;
            set_position(r, &at);
        } else if (pending) {
            /* Nothing sent (no data, no difference) behind the pending
             * chunk: it goes with it. */
            pend_data += data;
            pend_compared += compared;
        } else {
            r->initial_sent += data;
            r->initial_compared += compared;
            set_position(r, &cur);
        }
        rc = catalog_save_repl(pctx.d->cat, r);
        pthread_mutex_unlock(&pctx.d->lock);
        if (rc < 0)
            return rc;
        vr_fault_point("base-chunk-sent");
    }
}

int
run_initial(struct vm *vm, struct job *jb)
{
    pthread_mutex_lock(&pctx.d->lock);
    bool fresh = vm->repl->initial_seq == 0;
    struct repl *r = vm->repl;
    pthread_mutex_unlock(&pctx.d->lock);

    if (fresh) {
        int rc = initial_begin(vm, jb);
        if (rc < 0)
            return rc;
    }
    pthread_mutex_lock(&pctx.d->lock);
    bool export = r->initial_method == INITIAL_EXPORT;
    pthread_mutex_unlock(&pctx.d->lock);
    if (export) {
        int rc = export_phase(vm, jb);
        if (rc <= 0)
            return rc;
    }

    pthread_mutex_lock(&pctx.d->lock);
    uint64_t base = r->base_cycle;
    pthread_mutex_unlock(&pctx.d->lock);
    uint64_t first = 0, held[2] = { 0, 0 };
    int rc;
    /* initial-complete confirms the last chunk if it was answered unsynced;
     * a Replica server that restarted since refuses (-EAGAIN), and the
     * chunk goes again from the position, which is still at it. */
    for (unsigned attempt = 0;; attempt++) {
        uint64_t last = 0;
        struct copier cp;
        rc = copier_init(&cp, jb, base);
        if (rc == 0)
            rc = send_chunks(r, jb, &cp, &last, held);
        copier_fini(&cp);
        if (rc < 0)
            return rc;

        pthread_mutex_lock(&pctx.d->lock);
        first = r->first_point;
        r->initial_committing = true;
        pthread_mutex_unlock(&pctx.d->lock);
        /* An export took F after its last read; a copy takes it now. */
        rc = export && first > base ? 0
                                    : first_consistent_cycle(jb, base, &first);
        if (rc == 0) {
            CLEANUP_FREE char *body = xasprintf(
                "{\"base_cycle\": %llu, \"first_point\": %llu, "
                "\"last_chunk\": %llu}",
                (unsigned long long)base, (unsigned long long)first,
                (unsigned long long)last);
            CLEANUP_FREE char *path =
                xasprintf("/r1/vms/%s/initial-complete", jb->uuid);
            rc = peer_call(&jb->peer, "POST", path, body, -1, 0, false, NULL);
        }
        pthread_mutex_lock(&pctx.d->lock);
        r->initial_committing = false;
        pthread_mutex_unlock(&pctx.d->lock);
        if (rc == -EAGAIN && last && attempt < 2) {
            log_info("initial", "%s: %s", vm->name, vr_errmsg());
            continue;
        }
        if (rc < 0)
            return rc;
        break;
    }
    pthread_mutex_lock(&pctx.d->lock);
    r->initial_sent += held[0];
    r->initial_compared += held[1];
    r->initial_done = true;
    r->first_point = first;
    r->last_cycle = base;
    r->last_ok_ms = vr_wall_ms();
    free(r->task);
    r->task = NULL;
    rc = repl_transition(pctx.d->cat, vm, REPL_ST_REPLICATING, REPL_T_SAVE);
    free(r->initial_export);
    r->initial_export = NULL;
    if (r->initial_method == INITIAL_EXPORT)
        event_add(pctx.d->cat, "info", vm->name,
                  "initial replication from external media complete: the "
                  "Replica server imported base cycle %llu",
                  (unsigned long long)base);
    else if (r->initial_method == INITIAL_COMPARE)
        event_add(pctx.d->cat, "info", vm->name,
                  "initial replication by comparison complete: %llu bytes "
                  "compared, %llu bytes of data sent",
                  (unsigned long long)r->initial_compared,
                  (unsigned long long)r->initial_sent);
    else
        event_add(pctx.d->cat, "info", vm->name,
                  "initial replication complete: %llu bytes of data sent",
                  (unsigned long long)r->initial_sent);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

