/* replica-import.c: `initial-replication import VM --from DIR` on the
 * Replica server (SPEC §5): load an export the primary wrote to external
 * media (daemon/primary/export.c) into the Replica VM's disks.
 *
 * The manifest is read with every length bounded (its own size, the
 * chunk size, each chunk's place and compressed length, the data files'
 * sizes), checked against this Replica VM (its uuid, disk count and
 * sizes), and every chunk is decompressed and its XXH3-128 checked —
 * all before anything is written, so any mismatch leaves the disks
 * untouched.  Then each disk is made zeroes at its size and the chunks
 * are written (checked again as they are read), the disks fsynced, and
 * the import's base cycle recorded (repl.imported_base).  The primary,
 * which polls the status (GET /r1/vms/UUID) while it waits, then sends
 * initial-complete with that base, and its tracked cycles follow.
 *
 * Only while the primary said it expects an import (POST .../initial
 * {"method": "import"}, repl.initial_method), before initial-complete,
 * with no transfer running (VM_OP_RECEIVE is held for the whole import),
 * once.  Before initial-complete the Replica VM has no recovery point:
 * an import that fails half-way (a data file changed between the check
 * and the write) leaves no imported base, and may be run again.
 */
#include "replica-int.h"

#include <zstd.h>

#include "chunkhash.h"

#define IMPORT_MANIFEST_MAX (64u << 20)
#define IMPORT_JSON_DEPTH   8

struct imp_chunk {
    uint64_t off;  /* in the disk */
    uint64_t pos;  /* in the data file */
    uint32_t zlen; /* compressed */
    uint8_t hash[CHUNKHASH_BYTES];
};

struct imp_disk {
    char file[64];
    uint64_t size, file_size;
    struct imp_chunk *chunks;
    size_t n;
};

struct imp {
    const char *dir;
    int dfd;
    uint64_t base, chunk;
    unsigned ndisks;
    struct imp_disk disks[MAX_DISKS];
};

static void
imp_free(struct imp *m)
{
    for (unsigned i = 0; i < MAX_DISKS; i++)
        free(m->disks[i].chunks);
    if (m->dfd >= 0)
        close(m->dfd);
}

/* The manifest of m->dir, parsed (at most IMPORT_MANIFEST_MAX bytes). */
static int
read_manifest(struct imp *m, json_object **out)
{
    int fd = openat(m->dfd, "manifest.json", O_RDONLY | O_NOFOLLOW |
                                                 O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "%s/manifest.json: %s", m->dir,
                      strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) < 0)
        rc = vr_err(-errno, "%s/manifest.json: %s", m->dir, strerror(errno));
    else if (!S_ISREG(st.st_mode) || st.st_size <= 0 ||
             (uint64_t)st.st_size > IMPORT_MANIFEST_MAX)
        rc = vr_err(-EINVAL, "%s/manifest.json: not a regular file of 1 to "
                    "%u bytes", m->dir, IMPORT_MANIFEST_MAX);
    size_t len = rc == 0 ? (size_t)st.st_size : 0;
    char *text = rc == 0 ? xmalloc(len) : NULL;
    if (rc == 0 && (rc = io_pread_all(fd, text, len, 0)) < 0)
        rc = vr_err(rc, "%s/manifest.json: %s", m->dir, strerror(-rc));
    close(fd);
    if (rc == 0) {
        json_tokener *tok = json_tokener_new_ex(IMPORT_JSON_DEPTH);
        *out = tok ? json_tokener_parse_ex(tok, text, (int)len) : NULL;
        if (!*out || json_tokener_get_error(tok) != json_tokener_success ||
            !json_object_is_type(*out, json_type_object)) {
            json_object_put(*out);
            *out = NULL;
            rc = vr_err(-EINVAL, "%s/manifest.json: not a JSON object",
                        m->dir);
        }
        if (tok)
            json_tokener_free(tok);
    }
    free(text);
    return rc;
}

static bool
get_int(json_object *o, const char *key, int64_t *v)
{
    json_object *x;
    if (!json_object_object_get_ex(o, key, &x) ||
        !json_object_is_type(x, json_type_int))
        return false;
    *v = json_object_get_int64(x);
    return *v >= 0;
}

static const char *
get_str(json_object *o, const char *key)
{
    json_object *x;
    if (!json_object_object_get_ex(o, key, &x) ||
        !json_object_is_type(x, json_type_string))
        return NULL;
    return json_object_get_string(x);
}

/* A data file's name: a plain name in DIR, nothing that leads out. */
static bool
plain_name(const char *s)
{
    size_t n = strlen(s);
    return n >= 1 && n < 64 && s[0] != '.' && !strchr(s, '/');
}

/* Disk d's entry e of the manifest into m->disks[d], checked against the
 * Replica VM's disk of size bytes. */
static int
parse_disk(struct imp *m, unsigned d, json_object *e, uint64_t size)
{
    struct imp_disk *k = &m->disks[d];
    int64_t dsize, fsize;
    const char *file = get_str(e, "file");
    json_object *chunks;
    if (!json_object_is_type(e, json_type_object) ||
        !get_int(e, "size", &dsize) || !get_int(e, "file_size", &fsize) ||
        !file || !json_object_object_get_ex(e, "chunks", &chunks) ||
        !json_object_is_type(chunks, json_type_array))
        return vr_err(-EINVAL, "manifest: disk %u: size, file, file_size or "
                      "chunks missing", d);
    if ((uint64_t)dsize != size)
        return vr_err(-EINVAL, "manifest: disk %u is %lld bytes, the Replica "
                      "VM's is %llu", d, (long long)dsize,
                      (unsigned long long)size);
    if (!plain_name(file))
        return vr_err(-EINVAL, "manifest: disk %u: file '%s' is not a plain "
                      "file name in the export directory", d, file);
    snprintf(k->file, sizeof k->file, "%s", file);
    k->size = size;
    k->file_size = (uint64_t)fsize;
    size_t n = json_object_array_length(chunks);
    uint64_t most = size / m->chunk + 1, pos = 0, zmax =
        ZSTD_compressBound(m->chunk);
    if (n > most)
        return vr_err(-EINVAL, "manifest: disk %u: %zu chunks for %llu "
                      "bytes", d, n, (unsigned long long)size);
    k->chunks = xcalloc(n ? n : 1, sizeof *k->chunks);
    k->n = n;
    for (size_t i = 0; i < n; i++) {
        json_object *c = json_object_array_get_idx(chunks, i);
        json_object *a = NULL, *b = NULL, *h = NULL;
        if (json_object_is_type(c, json_type_array) &&
            json_object_array_length(c) == 3) {
            a = json_object_array_get_idx(c, 0);
            b = json_object_array_get_idx(c, 1);
            h = json_object_array_get_idx(c, 2);
        }
        int64_t off = a && json_object_is_type(a, json_type_int)
                          ? json_object_get_int64(a) : -1;
        int64_t z = b && json_object_is_type(b, json_type_int)
                        ? json_object_get_int64(b) : -1;
        struct imp_chunk *ck = &k->chunks[i];
        if (off < 0 || (uint64_t)off >= size || off % (int64_t)m->chunk ||
            (i > 0 && (uint64_t)off <= k->chunks[i - 1].off) || z < 1 ||
            (uint64_t)z > zmax || !h ||
            !json_object_is_type(h, json_type_string) ||
            chunkhash_unhex(json_object_get_string(h), 1, ck->hash) < 0)
            return vr_err(-EINVAL, "manifest: disk %u: chunk %zu is not "
                          "[offset, length, hash] in order inside the disk",
                          d, i);
        ck->off = (uint64_t)off;
        ck->zlen = (uint32_t)z;
        ck->pos = pos;
        pos += (uint64_t)z;
    }
    if (pos != k->file_size)
        return vr_err(-EINVAL, "manifest: disk %u: its chunks add up to %llu "
                      "bytes, file_size says %llu", d,
                      (unsigned long long)pos,
                      (unsigned long long)k->file_size);
    return 0;
}

/* Parse and check the manifest against vm (uuid, disks). */
static int
parse_manifest(struct imp *m, json_object *j, const char *uuid,
               unsigned ndisks, const uint64_t *sizes)
{
    const char *fmt = get_str(j, "format"), *vu = get_str(j, "vm_uuid");
    const char *comp = get_str(j, "compression"), *hash = get_str(j, "hash");
    int64_t version, base, chunk;
    json_object *disks;
    if (!fmt || strcmp(fmt, "vmreplica-export") != 0 ||
        !get_int(j, "version", &version) || version != 1)
        return vr_err(-EINVAL, "manifest: not a vmreplica export of version "
                      "1");
    if (!vu || !get_int(j, "base_cycle", &base) ||
        !get_int(j, "chunk_size", &chunk) || !comp || !hash ||
        !json_object_object_get_ex(j, "disks", &disks) ||
        !json_object_is_type(disks, json_type_array))
        return vr_err(-EINVAL, "manifest: vm_uuid, base_cycle, chunk_size, "
                      "compression, hash or disks missing");
    if (strcmp(vu, uuid) != 0)
        return vr_err(-EINVAL, "the export is of vm %s, not of this Replica "
                      "VM (%s)", vu, uuid);
    if (strcmp(comp, "zstd") != 0 || strcmp(hash, "xxh3-128") != 0)
        return vr_err(-EINVAL, "manifest: compression %s, hash %s: only zstd "
                      "and xxh3-128 are known", comp, hash);
    if (base < 1 || base >= INT64_MAX / 2 || !chunkhash_chunk_ok((uint64_t)chunk))
        return vr_err(-EINVAL, "manifest: base_cycle %lld or chunk_size %lld "
                      "out of range", (long long)base, (long long)chunk);
    m->base = (uint64_t)base;
    m->chunk = (uint64_t)chunk;
    if (json_object_array_length(disks) != ndisks)
        return vr_err(-EINVAL, "manifest: %zu disks, the Replica VM has %u",
                      json_object_array_length(disks), ndisks);
    m->ndisks = ndisks;
    for (unsigned d = 0; d < ndisks; d++) {
        int rc = parse_disk(m, d, json_object_array_get_idx(disks, d),
                            sizes[d]);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Read chunk ck of disk k from fd (its data file) into out (the chunk's
 * length), decompressed and its hash checked. */
static int
read_chunk(const struct imp *m, const struct imp_disk *k,
           const struct imp_chunk *ck, int fd, ZSTD_DCtx *dctx, uint8_t *z,
           uint8_t *out, size_t *len)
{
    *len = k->size - ck->off < m->chunk ? (size_t)(k->size - ck->off)
                                        : (size_t)m->chunk;
    int rc = io_pread_all(fd, z, ck->zlen, (off_t)ck->pos);
    if (rc < 0)
        return vr_err(rc, "%s: read at %llu: %s", k->file,
                      (unsigned long long)ck->pos, strerror(-rc));
    unsigned long long want = ZSTD_getFrameContentSize(z, ck->zlen);
    size_t got = want == *len
                     ? ZSTD_decompressDCtx(dctx, out, *len, z, ck->zlen) : 0;
    if (want != *len || ZSTD_isError(got) || got != *len)
        return vr_err(-EINVAL, "%s: chunk at offset %llu: not a zstd frame "
                      "of %zu bytes", k->file, (unsigned long long)ck->off,
                      *len);
    uint8_t h[CHUNKHASH_BYTES];
    chunkhash_buf(out, *len, h);
    if (memcmp(h, ck->hash, sizeof h) != 0)
        return vr_err(-EINVAL, "%s: chunk at offset %llu: checksum mismatch",
                      k->file, (unsigned long long)ck->off);
    return 0;
}

/* Check (wfd < 0) or write into wfd every chunk of disk d. */
static int
import_disk(const struct imp *m, unsigned d, int wfd)
{
    const struct imp_disk *k = &m->disks[d];
    int fd = openat(m->dfd, k->file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "%s: %s", k->file, strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) < 0)
        rc = vr_err(-errno, "%s: %s", k->file, strerror(errno));
    else if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != k->file_size)
        rc = vr_err(-EINVAL, "%s is %lld bytes, the manifest says %llu",
                    k->file, (long long)st.st_size,
                    (unsigned long long)k->file_size);
    uint8_t *z = xmalloc(ZSTD_compressBound(m->chunk));
    uint8_t *buf = xmalloc(m->chunk);
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    if (rc == 0 && !dctx)
        rc = vr_err(-ENOMEM, "zstd context");
    /* The window a frame may ask for is bounded (16 MiB chunks at most
     * are in a frame, and a frame is decompressed whole into the chunk). */
    if (rc == 0)
        ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, 24);
    for (size_t i = 0; rc == 0 && i < k->n; i++) {
        size_t len = 0;
        rc = read_chunk(m, k, &k->chunks[i], fd, dctx, z, buf, &len);
        if (rc == 0 && wfd >= 0 &&
            (rc = io_pwrite_all(wfd, buf, len, (off_t)k->chunks[i].off)) < 0)
            rc = vr_err(rc, "write disk %u: %s", d, strerror(-rc));
    }
    ZSTD_freeDCtx(dctx);
    free(buf);
    free(z);
    close(fd);
    return rc;
}

/* Make disk d (path under vmdir) zeroes at its size, write its chunks,
 * fsync. */
static int
load_disk(const struct imp *m, unsigned d, const char *vmdir,
          const char *path)
{
    int fd = storage_open(vmdir, path, O_RDWR, 0);
    if (fd < 0)
        return fd;
    int rc = 0;
    if (ftruncate(fd, 0) < 0 ||
        ftruncate(fd, (off_t)m->disks[d].size) < 0)
        rc = vr_err(-errno, "reset %s: %s", path, strerror(errno));
    if (rc == 0)
        rc = import_disk(m, d, fd);
    if (rc == 0 && fsync(fd) < 0)
        rc = vr_err(-errno, "fsync %s: %s", path, strerror(errno));
    close(fd);
    return rc;
}

/* d->lock held: may vm take an import now? */
static int
import_admit(const struct vm *vm)
{
    const struct repl *r = vm->repl;
    if (vm->mode != VM_MODE_REPLICA || !r)
        return vr_err(-EINVAL, "vm %s: not a Replica VM; an export is "
                      "imported on the Replica server", vm->name);
    if (r->initial_done)
        return vr_err(-EALREADY, "vm %s: initial replication is already "
                      "complete", vm->name);
    if (r->initial_method != INITIAL_EXPORT)
        return vr_err(-EINVAL, "vm %s: its primary has not started an "
                      "initial replication by export ('initial-replication "
                      "start %s --export DIR' on the primary)", vm->name,
                      vm->name);
    if (r->imported_base)
        return vr_err(-EALREADY, "vm %s: an export of base cycle %llu is "
                      "imported already; the primary completes the initial "
                      "replication", vm->name,
                      (unsigned long long)r->imported_base);
    if (vm_busy(vm, VM_OP_RECEIVE | VM_OP_APPLY | VM_OP_FAILOVER |
                        VM_OP_TEST))
        return vr_err(-EBUSY, "vm %s: another transfer is in progress",
                      vm->name);
    return 0;
}

/* Check everything, then write: the import proper, unlocked. */
static int
import_run(struct imp *m, const char *uuid, const char *vmdir,
           unsigned ndisks, const uint64_t *sizes, char *const *paths,
           uint64_t *data)
{
    m->dfd = open(m->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (m->dfd < 0)
        return vr_err(-errno, "%s: %s", m->dir, strerror(errno));
    json_object *j = NULL;
    int rc = read_manifest(m, &j);
    if (rc == 0)
        rc = parse_manifest(m, j, uuid, ndisks, sizes);
    json_object_put(j);
    for (unsigned d = 0; rc == 0 && d < ndisks; d++)
        rc = import_disk(m, d, -1);
    vr_fault_point("import-checked");
    for (unsigned d = 0; rc == 0 && d < ndisks; d++)
        rc = load_disk(m, d, vmdir, paths[d]);
    *data = 0;
    for (unsigned d = 0; rc == 0 && d < ndisks; d++)
        for (size_t i = 0; i < m->disks[d].n; i++)
            *data += m->disks[d].size - m->disks[d].chunks[i].off < m->chunk
                         ? m->disks[d].size - m->disks[d].chunks[i].off
                         : m->chunk;
    return rc;
}

int
replica_import(const char *key, const char *dir, json_object **out)
{
    pthread_mutex_lock(&rctx.d->lock);
    struct vm *vm = NULL;
    int rc = vm_lookup(rctx.d, key, &vm);
    if (rc == 0)
        rc = import_admit(vm);
    char uuid[37] = "";
    unsigned ndisks = 0;
    uint64_t sizes[MAX_DISKS];
    char *paths[MAX_DISKS] = { NULL };
    CLEANUP_FREE char *vmdir = NULL;
    if (rc == 0) {
        vm_op_begin(vm, VM_OP_RECEIVE);
        snprintf(uuid, sizeof uuid, "%s", vm->uuid);
        vmdir = xstrdup(vm->dir);
        ndisks = vm->ndisks;
        for (unsigned d = 0; d < ndisks; d++) {
            sizes[d] = vm->disks[d].size;
            paths[d] = xstrdup(vm->disks[d].path);
        }
    }
    pthread_mutex_unlock(&rctx.d->lock);
    if (rc < 0)
        return rc;

    struct imp m = { .dir = dir, .dfd = -1 };
    uint64_t data = 0;
    rc = import_run(&m, uuid, vmdir, ndisks, sizes, paths, &data);
    if (rc < 0)
        rc = vr_err(rc, "import vm %s from %s: %s", key, dir, vr_errmsg());
    uint64_t base = m.base;
    imp_free(&m);
    for (unsigned d = 0; d < ndisks; d++)
        free(paths[d]);

    pthread_mutex_lock(&rctx.d->lock);
    vm = vm_find_uuid(rctx.d, uuid);
    if (vm) {
        vm_op_end(vm, VM_OP_RECEIVE);
        if (rc == 0 && vm->repl) {
            vm->repl->imported_base = base;
            vm->repl->reset_pending = false;
            rc = catalog_save_repl(rctx.d->cat, vm->repl);
            if (rc < 0)
                vm->repl->imported_base = 0;
        }
        if (rc == 0 && vm->repl) {
            event_add(rctx.d->cat, "info", vm->name,
                      "initial replication imported from %s: %llu bytes of "
                      "data, base cycle %llu; the primary completes it and "
                      "sends the changes since", dir,
                      (unsigned long long)data, (unsigned long long)base);
            *out = replica_status_json(vm);
        }
        pthread_cond_broadcast(&rctx.d->cond);
    } else if (rc == 0) {
        rc = vr_err(-ENOENT, "vm %s: removed during the import", key);
    }
    pthread_mutex_unlock(&rctx.d->lock);
    return rc;
}
