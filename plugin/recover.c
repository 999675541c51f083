/* recover.c: start-up recovery of the change log (plugin.h).
 *
 * Recovery at start-up (.get_ready) cuts torn log tails, redoes the
 * pending records a crash left (their requests may or may not have
 * changed the disk), finishes a seal that a crash interrupted, so every
 * disk ends up with the same open cycle, and rebuilds the block owners
 * from the unshipped segments.  docs/design.md "Crash safety of the change
 * log" lists the states a crash or a power loss can leave and how each is
 * opened.
 */
#include "config.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <nbdkit-plugin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "plugin.h"
#include "vr.h"

/* The sequence number after the last record of sealed segment cycle: the
 * seq carried by its CL_SEAL record (the last 32 bytes). */
static int
sealed_next_seq(struct disk *d, unsigned idx, uint64_t cycle, uint64_t *out)
{
    char name[32];
    uint8_t buf[CL_REC_HDR_BYTES];
    struct cl_reader *r;
    struct cl_rec rec;
    size_t used;
    struct stat st;

    cl_seg_name(cycle, true, name);
    int rc = cl_reader_open(d->dirfd, name, &r); /* validates the header */
    if (rc < 0)
        return rc;
    bool hdr_ok = cl_reader_hdr(r)->disk == idx &&
                  cl_reader_hdr(r)->cycle == cycle;
    cl_reader_free(r);
    if (!hdr_ok)
        return vr_err(-EBADMSG, "%s/%s: header of another disk or cycle",
                      d->logdir, name);
    int fd = openat(d->dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "open %s/%s: %m", d->logdir, name);
    if (fstat(fd, &st) < 0 || st.st_size < CL_SEG_HDR_BYTES + CL_REC_HDR_BYTES)
        rc = -EBADMSG;
    else
        rc = io_pread_all(fd, buf, sizeof buf,
                          st.st_size - CL_REC_HDR_BYTES);
    close(fd);
    if (rc == 0)
        rc = cl_rec_decode(buf, sizeof buf, &rec, &used);
    if (rc == 0 && (rec.kind != CL_SEAL || rec.disk != idx))
        rc = -EBADMSG;
    if (rc < 0)
        return vr_err(rc, "%s/%s: no valid seal record at its end",
                      d->logdir, name);
    *out = rec.seq;
    return 0;
}

/* A stream over d's log directory from its start (closedir it), or NULL
 * with vr_err set. */
static DIR *
logdir_open(struct disk *d)
{
    int fd = d->dirfd >= 0 ? dup(d->dirfd) : -1;
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    if (!dir) {
        int e = d->dirfd >= 0 ? errno : EBADF;
        if (fd >= 0)
            close(fd);
        vr_err(-e, "read directory %s: %s", d->logdir, strerror(e));
        return NULL;
    }
    rewinddir(dir);
    return dir;
}

struct scan {
    unsigned nopen;
    uint64_t open_cycle;
    uint64_t open_min;
    uint64_t sealed_max; /* 0: none */
};

static int
scan_dir(struct disk *d, struct scan *s)
{
    DIR *dir = logdir_open(d);
    struct dirent *e;

    memset(s, 0, sizeof *s);
    if (!dir)
        return -EIO;
    while ((e = readdir(dir)) != NULL) {
        char *end;
        if (strlen(e->d_name) < 24 || e->d_name[0] < '0' ||
            e->d_name[0] > '9')
            continue;
        errno = 0;
        uint64_t c = strtoull(e->d_name, &end, 10);
        if (errno || end != e->d_name + 20 || c == 0)
            continue;
        if (strcmp(end, ".open") == 0) {
            s->nopen++;
            if (c > s->open_cycle)
                s->open_cycle = c;
            if (s->open_min == 0 || c < s->open_min)
                s->open_min = c;
        } else if (strcmp(end, ".log") == 0) {
            if (c > s->sealed_max)
                s->sealed_max = c;
        }
    }
    closedir(dir);
    return 0;
}

/* First seq for a new segment of cycle on disk idx, after sealed_max. */
static int
next_first_seq(struct disk *d, unsigned idx, const struct scan *s,
               uint64_t *out)
{
    *out = 0;
    if (s->sealed_max == 0)
        return 0;
    return sealed_next_seq(d, idx, s->sealed_max, out);
}

/* A pending record kept at recovery: its request was in flight when the
 * process died, and may or may not have changed the disk.  No later record
 * shares a block with it (it was in flight), so doing it again is exactly
 * what it says, whether or not it had been done. */
static int
redo_pending(void *opaque, const struct cl_rec *rec)
{
    struct disk *d = opaque;
    int rc;

    if (rec->offset > d->size || rec->len > d->size - rec->offset)
        return vr_err(-EBADMSG, "%s: pending record seq %" PRIu64 " past "
                      "the end of the disk", d->id, rec->seq);
    if (rec->kind == CL_WRITE)
        rc = io_pwrite_all(d->fd, rec->data, rec->len, (off_t)rec->offset);
    else if (rec->kind == CL_ZERO || rec->kind == CL_TRIM)
        rc = zero_range(d, rec->len, rec->offset, false);
    else
        return vr_err(-EBADMSG, "%s: pending record seq %" PRIu64 " of "
                      "kind %u", d->id, rec->seq, rec->kind);
    /* The disk holds it before the record says it is settled. */
    if (rc == 0 && fdatasync(d->fd) < 0)
        rc = -errno;
    if (rc < 0)
        return vr_err(rc, "%s: redo record seq %" PRIu64 ": %s", d->id,
                      rec->seq, strerror(-rc));
    nbdkit_debug("%s: redid %s of %" PRIu32 " bytes at %" PRIu64 " (seq %"
                 PRIu64 ") left pending by a crash", d->id,
                 rec->kind == CL_WRITE ? "write" : rec->kind == CL_ZERO
                                                       ? "zero" : "trim",
                 rec->len, rec->offset, rec->seq);
    return 0;
}

/* Reopen CYCLE.open, recreating it if a crash tore its header. */
static int
reopen_open(struct disk *d, unsigned idx, const struct scan *s,
            uint64_t cycle)
{
    char name[32];
    struct stat st;
    uint64_t cut = 0, first_seq;

    int rc = cl_writer_reopen_redo(d->dirfd, (uint16_t)idx, cycle,
                                   redo_pending, d, &d->w, &cut);
    if (rc == 0) {
        nbdkit_debug("%s: reopened cycle %" PRIu64 " (%" PRIu64 " records, "
                     "torn tail of %" PRIu64 " bytes cut)", d->id, cycle,
                     cl_writer_records(d->w), cut);
        return 0;
    }
    cl_seg_name(cycle, false, name);
    if (rc != -EBADMSG || fstatat(d->dirfd, name, &st, 0) < 0 ||
        st.st_size > CL_SEG_HDR_BYTES)
        return rc;
    /* Creation was interrupted before its header was durable: no record can
     * have been written to it, so start it again. */
    nbdkit_debug("%s: cycle %" PRIu64 " segment has a torn header (%lld "
                 "bytes), recreating it", d->id, cycle,
                 (long long)st.st_size);
    rc = next_first_seq(d, idx, s, &first_seq);
    if (rc < 0)
        return rc;
    if (unlinkat(d->dirfd, name, 0) < 0)
        return vr_err(-errno, "unlink %s/%s: %m", d->logdir, name);
    return cl_writer_create(d->dirfd, (uint16_t)idx, cycle, first_seq, &d->w);
}

/* A crash after a seal's cut and before its commit leaves CYCLE.open,
 * complete with its CL_SEAL record, beside CYCLE+1.open: commit it, after
 * checking it reads as a whole sealed segment. */
static int
commit_cut(struct disk *d, uint64_t cycle)
{
    char from[32], to[32];
    cl_seg_name(cycle, false, from);
    cl_seg_name(cycle, true, to);
    int fd = openat(d->dirfd, from, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fdatasync(fd) < 0) {
        int rc = vr_err(-errno, "%s/%s: %m", d->logdir, from);
        if (fd >= 0)
            close(fd);
        return rc;
    }
    close(fd);
    if (renameat2(d->dirfd, from, d->dirfd, to, RENAME_NOREPLACE) < 0)
        return vr_err(-errno, "rename %s/%s: %m", d->logdir, from);
    struct cl_reader *r = NULL;
    struct cl_rec rec;
    int rc = cl_reader_open(d->dirfd, to, &r);
    while (rc == 0 && (rc = cl_reader_next(r, &rec)) == 1)
        rc = 0;
    cl_reader_free(r);
    if (rc < 0) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        renameat(d->dirfd, to, d->dirfd, from);
        return vr_err(-EBADMSG, "%s/%s: segment of a seal cut short by a "
                      "crash is damaged: %s", d->logdir, from, msg);
    }
    nbdkit_debug("%s: committed the seal of cycle %" PRIu64 " that a crash "
                 "interrupted", d->id, cycle);
    return io_fsync_dirfd(d->dirfd);
}

int
recover(void)
{
    struct scan scans[MAX_DISKS];
    uint64_t target = 1;

    for (unsigned i = 0; i < ndisks; i++) {
        int rc = scan_dir(&disks[i], &scans[i]);
        if (rc < 0)
            return rc;
        if (scans[i].nopen == 2 &&
            scans[i].open_min + 1 == scans[i].open_cycle) {
            rc = commit_cut(&disks[i], scans[i].open_min);
            if (rc == 0)
                rc = scan_dir(&disks[i], &scans[i]);
            if (rc < 0)
                return rc;
        }
        if (scans[i].nopen > 1)
            return vr_err(-EBADMSG, "%s: %u open segments in %s",
                          disks[i].id, scans[i].nopen, disks[i].logdir);
        uint64_t want = scans[i].nopen ? scans[i].open_cycle
                                       : scans[i].sealed_max + 1;
        if (want > target)
            target = want;
    }
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        struct scan *s = &scans[i];
        uint64_t first_seq;
        int rc;

        if (s->sealed_max >= target)
            return vr_err(-EBADMSG, "%s: sealed cycle %" PRIu64 " is not "
                          "older than open cycle %" PRIu64, d->id,
                          s->sealed_max, target);
        if (s->nopen && s->open_cycle == target) {
            rc = reopen_open(d, i, s, target);
            if (rc < 0)
                return rc;
            continue;
        }
        if (s->nopen && s->open_cycle + 1 == target) {
            /* A crash interrupted a seal of open_cycle: finish it. */
            rc = reopen_open(d, i, s, s->open_cycle);
            if (rc == 0)
                rc = cl_writer_seal(d->w);
            if (rc < 0)
                return rc;
            first_seq = cl_writer_next_seq(d->w);
            nbdkit_debug("%s: finished interrupted seal of cycle %" PRIu64,
                         d->id, s->open_cycle);
            cl_writer_free(d->w);
            d->w = NULL;
        } else if (s->nopen) {
            return vr_err(-EBADMSG, "%s: open cycle %" PRIu64 " is behind "
                          "cycle %" PRIu64 " of another disk", d->id,
                          s->open_cycle, target);
        } else {
            rc = next_first_seq(d, i, s, &first_seq);
            if (rc < 0)
                return rc;
            if (s->sealed_max + 1 != target)
                nbdkit_debug("%s: last sealed cycle %" PRIu64 ", joining at "
                             "cycle %" PRIu64, d->id, s->sealed_max, target);
        }
        rc = cl_writer_create(d->dirfd, (uint16_t)i, target, first_seq,
                              &d->w);
        if (rc < 0)
            return rc;
        nbdkit_debug("%s: opened cycle %" PRIu64 " at seq %" PRIu64, d->id,
                     target, first_seq);
    }
    open_cycle = target;
    return 0;
}

/* Writes logged by reference: record r of cycle c updates the owner map
 * the way the write path does (a CL_WREF makes c the blocks' owner; any
 * other change drops an older owner, whose data it preserved first). */
static void
owner_apply(struct disk *d, const struct cl_rec *r, uint64_t c)
{
    if (r->len == 0)
        return;
    uint64_t b0 = r->offset / CL_PRE_BLOCK;
    uint64_t b1 = (r->offset + r->len - 1) / CL_PRE_BLOCK;
    for (uint64_t b = b0; b <= b1; b++) {
        if (r->kind == CL_WREF)
            u64map_put(&d->owner, b, c);
        else if (u64map_get(&d->owner, b) != c)
            u64map_put(&d->owner, b, 0);
    }
}

/* After a restart: the oldest sealed segment left says what is shipped
 * (the daemon deletes a cycle's segments only once the Replica server has
 * it); replaying the unshipped segments and the open one rebuilds the
 * owner map as it was.  Preserve files of shipped cycles are removed. */
int
rebuild_owner(struct disk *d)
{
    DIR *dir = logdir_open(d);
    struct dirent *e;
    uint64_t lo = open_cycle;

    if (!dir)
        return -EIO;
    while ((e = readdir(dir)) != NULL) {
        char *end;
        if (strlen(e->d_name) != 24 || e->d_name[0] < '0' ||
            e->d_name[0] > '9')
            continue;
        uint64_t c = strtoull(e->d_name, &end, 10);
        if (end == e->d_name + 20 && strcmp(end, ".log") == 0 && c < lo)
            lo = c;
    }
    rewinddir(dir);
    while ((e = readdir(dir)) != NULL) {
        char *end, log[32];
        if (strlen(e->d_name) != 24 || e->d_name[0] < '0' ||
            e->d_name[0] > '9')
            continue;
        uint64_t c = strtoull(e->d_name, &end, 10);
        if (end != e->d_name + 20 || strcmp(end, ".pre") != 0)
            continue;
        cl_seg_name(c, true, log);
        if (c < lo || c >= open_cycle ||
            faccessat(d->dirfd, log, F_OK, 0) < 0) {
            if (unlinkat(d->dirfd, e->d_name, 0) < 0 && errno != ENOENT) {
                int rc = vr_err(-errno, "remove %s/%s: %m", d->logdir,
                                e->d_name);
                closedir(dir);
                return rc;
            }
            nbdkit_debug("%s: removed preserve file %s of a shipped cycle",
                         d->id, e->d_name);
        }
    }
    closedir(dir);

    d->owner.drop_upto = lo - 1;
    d->compacted_at = lo - 1;
    for (uint64_t c = lo; c <= open_cycle; c++) {
        char name[32];
        struct cl_reader *r = NULL;
        struct cl_rec rec;
        cl_seg_name(c, c < open_cycle, name);
        int rc = cl_reader_open(d->dirfd, name, &r);
        if (rc == -ENOENT) {
            vr_err_clear();
            continue;
        }
        while (rc == 0 && (rc = cl_reader_next(r, &rec)) == 1) {
            owner_apply(d, &rec, c);
            rc = 0;
        }
        cl_reader_free(r);
        if (rc < 0)
            return rc;
    }
    nbdkit_debug("%s: %zu blocks logged by reference in cycles %" PRIu64
                 "..%" PRIu64, d->id, d->owner.used, lo, open_cycle);
    return 0;
}

/* --- tracking stopped ---------------------------------------------------- */

/* Start-up with tracking stopped: no segment is opened or recovered (they
 * are void); the open cycle is the newest cycle any disk's log or marker
 * names, so cycle numbers only ever grow. */
int
recover_stopped(uint64_t marker_cycle)
{
    uint64_t top = marker_cycle;
    int rc = 0;
    for (unsigned i = 0; i < ndisks; i++) {
        struct scan s;
        struct disk *d = &disks[i];
        cl_writer_free(d->w);
        d->w = NULL;
        if (d->dirfd < 0)
            continue;
        if (scan_dir(d, &s) < 0) {
            rc = -1;
            continue;
        }
        if (s.open_cycle > top)
            top = s.open_cycle;
        if (s.sealed_max > top)
            top = s.sealed_max;
    }
    open_cycle = top ? top : 1;
    return rc;
}

/* Mark in d's dirty map every range a record of an unshipped cycle names:
 * the replica has none of them, and their cycles can no longer be built
 * as they were (writes since the stop were not preserved).  An open
 * segment ends at its first hole (no request after it changed the disk
 * while tracked); a sealed segment that does not read whole, or a log
 * that cannot be listed, marks the whole disk. */
static void
mark_unshipped(struct disk *d)
{
    DIR *dir = logdir_open(d);
    struct dirent *e;
    if (!dir) {
        dirtymap_mark_all(&d->dirty);
        return;
    }
    while ((e = readdir(dir)) != NULL) {
        char *end;
        if (strlen(e->d_name) != 24 && strlen(e->d_name) != 25)
            continue;
        uint64_t c = strtoull(e->d_name, &end, 10);
        if (end != e->d_name + 20 || c <= shipped)
            continue;
        bool sealed = strcmp(end, ".log") == 0;
        if (!sealed && strcmp(end, ".open") != 0)
            continue;
        struct cl_reader *r = NULL;
        struct cl_rec rec;
        int rc = cl_reader_open(d->dirfd, e->d_name, &r);
        while (rc == 0 && (rc = cl_reader_next(r, &rec)) == 1) {
            dirtymap_mark(&d->dirty, rec.offset, rec.len);
            rc = 0;
        }
        cl_reader_free(r);
        if (rc < 0 && (sealed || rc != -EBADMSG)) {
            nbdkit_debug("%s: %s/%s does not read whole (%s): the whole "
                         "disk is marked", d->id, d->logdir, e->d_name,
                         vr_errmsg());
            dirtymap_mark_all(&d->dirty);
        }
    }
    closedir(dir);
    vr_err_clear();
}

/* Remove the void segments and preserve files of cycles <= c. */
static int
remove_void(struct disk *d, uint64_t c)
{
    DIR *dir = logdir_open(d);
    struct dirent *e;
    int rc = 0;
    if (!dir)
        return -EIO;
    while ((e = readdir(dir)) != NULL) {
        char *end;
        uint64_t n = strtoull(e->d_name, &end, 10);
        if (end != e->d_name + 20 || n > c ||
            (strcmp(end, ".log") && strcmp(end, ".open") &&
             strcmp(end, ".pre")))
            continue;
        if (unlinkat(d->dirfd, e->d_name, 0) < 0 && errno != ENOENT && !rc)
            rc = vr_err(-errno, "remove %s/%s: %m", d->logdir, e->d_name);
    }
    closedir(dir);
    return rc;
}

/* REARM, under seal_lock (W) with tracking stopped at open cycle c: every
 * change through cycle c is in no log the replica can use.  Save each
 * disk's dirty map (what changed untracked, plus what the void cycles had
 * logged) as C.dirty, remove the void logs, open cycle c + 1 and say
 * "tracking" in every marker; *voided = c.  Until every step is done the
 * markers say stopped, so a crash anywhere in between starts stopped
 * again; on failure nothing new is left open. */
int
rearm(uint64_t *voided)
{
    uint64_t c = open_cycle;
    uint64_t next_seq[MAX_DISKS];
    char name[40];
    int rc = 0;

    snprintf(name, sizeof name, "%020" PRIu64 ".dirty", c);
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        if (d->dirfd < 0 || d->markfd < 0)
            return vr_err(-EIO, "disk %s: its log directory is not open; "
                          "restart the data plane", d->id);
        next_seq[i] = d->w ? cl_writer_next_seq(d->w) : 0;
        cl_writer_free(d->w);
        d->w = NULL;
        pthread_mutex_lock(&d->pre_lock);
        for (unsigned k = 0; k < PRE_OPEN; k++) {
            cl_writer_free(d->pre[k]);
            d->pre[k] = NULL;
        }
        pthread_mutex_unlock(&d->pre_lock);
        mark_unshipped(d);
    }
    for (unsigned i = 0; i < ndisks && rc == 0; i++) {
        struct disk *d = &disks[i];
        rc = remove_void(d, c);
        if (rc == 0)
            rc = dirtymap_save(&d->dirty, d->dirfd, name);
    }
    for (unsigned i = 0; i < ndisks && rc == 0; i++)
        rc = cl_writer_create(disks[i].dirfd, (uint16_t)i, c + 1,
                              next_seq[i], &disks[i].w);
    for (unsigned i = 0; i < ndisks && rc == 0; i++)
        rc = tracking_marker_served(disks[i].markfd, boot_id);
    if (rc < 0) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        for (unsigned i = 0; i < ndisks; i++) {
            struct disk *d = &disks[i];
            if (tracking_marker_write(d->markfd, true, c, stopped_msg) < 0)
                nbdkit_error("disk %s: %s", d->id, vr_errmsg());
            if (d->w) {
                char open_name[32];
                cl_seg_name(c + 1, false, open_name);
                cl_writer_free(d->w);
                d->w = NULL;
                unlinkat(d->dirfd, open_name, 0);
            }
        }
        return vr_err(rc, "rearm: %s", msg);
    }
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        u64map_free(&d->owner);
        d->owner.drop_upto = c;
        d->compacted_at = c;
        dirtymap_clear(&d->dirty);
    }
    __atomic_store_n(&shipped, c, __ATOMIC_RELEASE);
    open_cycle = c + 1;
    stopped_msg[0] = '\0';
    __atomic_store_n(&stopped, 0, __ATOMIC_RELEASE);
    *voided = c;
    nbdkit_debug("tracking re-armed at cycle %" PRIu64 "; changes through "
                 "cycle %" PRIu64 " are in %s of each disk", c + 1, c, name);
    return 0;
}
