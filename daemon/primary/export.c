/* export.c: initial replication by external media on the primary (SPEC §5,
 * `initial-replication start VM --export DIR`): after the base cycle B is
 * sealed (initial.c), every disk is read live, its non-zero 1 MiB chunks
 * compressed one zstd frame each into DIR/diskN.zst, and a manifest
 * (DIR/manifest.json: the VM, the disks' sizes, the chunk size, each
 * stored chunk's offset, compressed length and XXH3-128, B and the first
 * consistent cycle F) written last, durably, by rename.  Zero chunks and
 * holes are not stored: the import makes the rest of each disk zeroes.
 *
 * The copy is fuzzy exactly like the network one (docs/design.md,
 * "Cycles and crash consistency"): a chunk read at time t holds every
 * write before t, every write after B is in a cycle after B, and F is the
 * cycle open after the last read.  So the Replica VM, once the import is
 * in and B + 1 .. F applied, equals this VM at F's seal.  An export
 * interrupted (daemon restart, `initial-replication stop`) is written again
 * from the start with the same base: still exact by the same argument.
 * Runs on the VM's shipper thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "chunkhash.h"
#include "shipper-int.h"

#define EXPORT_CHUNK  CHUNKHASH_COARSE /* bytes of disk per stored chunk */
#define EXPORT_BATCH  (32u << 20)      /* progress saved, stop checked */
#define EXPORT_LEVEL  3

static bool
chunk_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Open DIR for writing an export: made if missing (0750), a directory,
 * no symbolic link as its last component; a manifest of an earlier
 * export is removed first, so a half-written export has none. */
static int
export_dir_open(const char *dir)
{
    if (dir[0] != '/')
        return vr_err(-EINVAL, "export: %s is not an absolute path", dir);
    if (mkdir(dir, 0750) < 0 && errno != EEXIST)
        return vr_err(-errno, "export: create %s: %s", dir, strerror(errno));
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0)
        return vr_err(-errno, "export: open %s: %s", dir, strerror(errno));
    if (unlinkat(dfd, "manifest.json", 0) < 0 && errno != ENOENT) {
        int rc = vr_err(-errno, "export: remove %s/manifest.json: %s", dir,
                        strerror(errno));
        close(dfd);
        return rc;
    }
    return dfd;
}

/* Is the export to go on?  (No stop, still InitialReplicationInProgress.) */
static bool
export_wanted(struct vm *vm)
{
    pthread_mutex_lock(&pctx.d->lock);
    bool on = !vm->repl->stop && !pctx.d->shutting_down &&
              vm->repl->st == REPL_ST_INITIAL;
    pthread_mutex_unlock(&pctx.d->lock);
    return on;
}

/* Add data bytes read to the progress shown by measure. */
static void
export_progress(struct vm *vm, uint64_t data)
{
    pthread_mutex_lock(&pctx.d->lock);
    if (vm->repl->st == REPL_ST_INITIAL)
        vm->repl->initial_sent += data;
    pthread_mutex_unlock(&pctx.d->lock);
}

/* Write disk d of jb to dfd/diskD.zst; its manifest entry into *entry.
 * *stored: compressed bytes written. */
static int
export_disk(struct vm *vm, const struct job *jb, unsigned d, int dfd,
            json_object **entry, uint64_t *stored)
{
    char name[32];
    snprintf(name, sizeof name, "disk%u.zst", d);
    const char *path = jb->disks[d].path;
    uint64_t size = jb->disks[d].size;
    int in = open(path, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return vr_err(-errno, "export: open %s: %s", path, strerror(errno));
    int out = openat(dfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW |
                                    O_CLOEXEC, 0640);
    if (out < 0) {
        int rc = vr_err(-errno, "export: create %s: %s", name,
                        strerror(errno));
        close(in);
        return rc;
    }
    size_t cap = ZSTD_compressBound(EXPORT_CHUNK);
    uint8_t *buf = xmalloc(EXPORT_CHUNK), *z = xmalloc(cap);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    json_object *chunks = json_object_new_array();
    uint64_t pos = 0, fsize = 0, batch = 0;
    int rc = cctx ? 0 : vr_err(-ENOMEM, "export: zstd context");
    while (rc == 0 && pos < size) {
        off_t data = lseek(in, (off_t)pos, SEEK_DATA);
        if (data < 0 || (uint64_t)data >= size)
            break;
        uint64_t off = (uint64_t)data / EXPORT_CHUNK * EXPORT_CHUNK;
        if (off < pos)
            off = pos;
        size_t len = size - off < EXPORT_CHUNK ? (size_t)(size - off)
                                               : EXPORT_CHUNK;
        rc = io_pread_all(in, buf, len, (off_t)off);
        if (rc < 0) {
            rc = vr_err(rc, "export: read %s: %s", path, strerror(-rc));
            break;
        }
        pos = off + len;
        batch += len;
        if (!chunk_zero(buf, len)) {
            size_t n = ZSTD_compressCCtx(cctx, z, cap, buf, len, EXPORT_LEVEL);
            if (ZSTD_isError(n)) {
                rc = vr_err(-EIO, "export: compress: %s",
                            ZSTD_getErrorName(n));
                break;
            }
            rc = io_write_all(out, z, n);
            if (rc < 0) {
                rc = vr_err(rc, "export: write %s: %s", name, strerror(-rc));
                break;
            }
            uint8_t h[CHUNKHASH_BYTES];
            chunkhash_buf(buf, len, h);
            char *hex = chunkhash_hex(h, 1);
            json_object *c = json_object_new_array();
            json_object_array_add(c, json_object_new_int64((int64_t)off));
            json_object_array_add(c, json_object_new_int64((int64_t)n));
            json_object_array_add(c, json_object_new_string(hex));
            json_object_array_add(chunks, c);
            free(hex);
            fsize += n;
        }
        if (batch >= EXPORT_BATCH) {
            export_progress(vm, batch);
            batch = 0;
            test_send_delay();
            vr_fault_point("export-batch");
            if (!export_wanted(vm))
                rc = -ECANCELED;
        }
    }
    export_progress(vm, batch);
    if (rc == 0 && fsync(out) < 0)
        rc = vr_err(-errno, "export: fsync %s: %s", name, strerror(errno));
    ZSTD_freeCCtx(cctx);
    free(z);
    free(buf);
    close(out);
    close(in);
    if (rc < 0) {
        json_object_put(chunks);
        return rc;
    }
    *entry = json_object_new_object();
    json_object_object_add(*entry, "size", json_object_new_int64((int64_t)size));
    json_object_object_add(*entry, "file", json_object_new_string(name));
    json_object_object_add(*entry, "file_size",
                           json_object_new_int64((int64_t)fsize));
    json_object_object_add(*entry, "chunks", chunks);
    *stored += fsize;
    return 0;
}

/* The manifest m into dfd/manifest.json, durably (temporary file,
 * fsync, rename, fsync of the directory). */
static int
write_manifest(int dfd, json_object *m)
{
    const char *text = json_object_to_json_string_ext(m, JSON_C_TO_STRING_PLAIN);
    int fd = openat(dfd, "manifest.json.tmp",
                    O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
                    0640);
    if (fd < 0)
        return vr_err(-errno, "export: create manifest.json.tmp: %s",
                      strerror(errno));
    int rc = io_write_all(fd, text, strlen(text));
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    close(fd);
    if (rc == 0 && renameat(dfd, "manifest.json.tmp", dfd, "manifest.json") < 0)
        rc = -errno;
    if (rc == 0)
        rc = io_fsync_dirfd(dfd);
    if (rc < 0)
        return vr_err(rc, "export: write manifest.json: %s", strerror(-rc));
    return 0;
}

int
export_write(struct vm *vm, struct job *jb, const char *dir, uint64_t base,
             uint64_t *first, uint64_t *stored)
{
    int dfd = export_dir_open(dir);
    if (dfd < 0)
        return dfd;
    pthread_mutex_lock(&pctx.d->lock);
    vm->repl->initial_sent = 0;
    pthread_mutex_unlock(&pctx.d->lock);
    json_object *disks = json_object_new_array();
    *stored = 0;
    int rc = 0;
    for (unsigned d = 0; rc == 0 && d < jb->ndisks; d++) {
        json_object *e = NULL;
        rc = export_disk(vm, jb, d, dfd, &e, stored);
        if (rc == 0)
            json_object_array_add(disks, e);
    }
    /* After the last read: the first cycle the import plus the cycles
     * after B make consistent. */
    if (rc == 0)
        rc = first_consistent_cycle(jb, base, first);
    if (rc == 0) {
        char ts[32];
        vr_rfc3339(vr_wall_ms(), ts);
        json_object *m = json_object_new_object();
        json_object_object_add(m, "format",
                               json_object_new_string("vmreplica-export"));
        json_object_object_add(m, "version", json_object_new_int(1));
        json_object_object_add(m, "vm_uuid", json_object_new_string(jb->uuid));
        json_object_object_add(m, "vm_name", json_object_new_string(jb->name));
        json_object_object_add(m, "created", json_object_new_string(ts));
        json_object_object_add(m, "base_cycle",
                               json_object_new_int64((int64_t)base));
        json_object_object_add(m, "first_point",
                               json_object_new_int64((int64_t)*first));
        json_object_object_add(m, "chunk_size",
                               json_object_new_int64(EXPORT_CHUNK));
        json_object_object_add(m, "compression",
                               json_object_new_string("zstd"));
        json_object_object_add(m, "hash", json_object_new_string("xxh3-128"));
        json_object_object_add(m, "disks", json_object_get(disks));
        rc = write_manifest(dfd, m);
        json_object_put(m);
    }
    json_object_put(disks);
    close(dfd);
    return rc;
}
