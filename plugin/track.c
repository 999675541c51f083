/* track.c: the write path of nbdkit-vmreplica-plugin (plugin.h).
 *
 * Writes are logged by reference (log=ref, the default; docs/design.md):
 * a CL_WREF record without data, written before the disk changes.  The
 * shipper reads the data from the disk image.  Per 4 KiB block the plugin
 * remembers which sealed-but-unshipped cycle's WREF last wrote it (owner);
 * before a request changes such a block it appends the block's content to
 * that cycle's preserve file (PATH.vrlog/CYCLE.pre), so the cycle can still
 * be built as it was at its seal.  SHIPPED N over the control socket ends
 * the protection of cycles <= N.  log=data copies the data into the
 * record instead (format version 1 behaviour).
 *
 * Locking: each write-class request holds the process-wide seal_lock for
 * reading.  Under its disk's mutex it waits until no in-flight request
 * shares a 4 KiB block with its byte range, registers its range, reserves
 * its log record (sequence number and place in the segment) and updates
 * the block owners; then, without the mutex, it preserves what older
 * unshipped cycles need and writes its record, in parallel with requests
 * on other blocks (a record without data that needs no preserve, the
 * usual case, is copied into the mapped segment at once, under the
 * mutex).  Requests sharing a block never run at the same time,
 * so the log order equals the order in which writes to the same bytes hit
 * the disk, and a block is preserved before anything changes it.
 *
 * The change log must survive a crash of this process at any instant with
 * every change the disk holds (docs/design.md "Crash safety of the change
 * log"): (1) every record is written before its request changes the disk,
 * whatever its kind; (2) a request changes the disk only once every record
 * reserved before its own is written (wait_logged_prefix), so the records
 * written form a prefix of the reservation order up to the first record
 * not yet written, and no request after that one has changed the disk.
 * Reopening after a crash cuts the segment at its first hole, which keeps
 * every record whose request could have changed the disk, hence every
 * request the guest saw complete.  A request whose disk I/O fails appends
 * a record of what the disk now holds (log_readback); one whose preserve
 * fails fills its place with a record that changes nothing and leaves the
 * disk alone.  SEAL (over the control socket) takes seal_lock for writing:
 * no write is in flight on any disk while every disk's segment is sealed
 * and the next one opened, which gives one crash-consistent cut across all
 * disks of the VM.
 */
#define NBDKIT_API_VERSION 2
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <nbdkit-plugin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "plugin.h"
#include "vr.h"

#define PRESERVE_STACK 8

static pthread_mutex_t stop_lock = PTHREAD_MUTEX_INITIALIZER;

/* The log cannot follow the disks (msg says why): from now on writes reach
 * the disks untracked, each marked in its disk's dirty map first.  Every
 * disk's tracking marker says so, durably, before `stopped` is set, so no
 * untracked write reaches a disk while a marker still says "tracking": a
 * restart after any crash knows the log is void.  Called with seal_lock
 * held (either way) by whichever request or seal met the failure. */
void
stop_tracking(const char *msg)
{
    pthread_mutex_lock(&stop_lock);
    if (!stopped) {
        snprintf(stopped_msg, sizeof stopped_msg, "%.*s",
                 (int)sizeof stopped_msg - 1, msg);
        for (unsigned i = 0; i < ndisks; i++) {
            struct disk *d = &disks[i];
            if (d->markfd < 0 ||
                tracking_marker_write(d->markfd, true, open_cycle, msg) < 0)
                /* Guest writes go on regardless (replication never fails
                 * the guest); only a crash before REARM could now hide
                 * them from a restart, so say it loudly. */
                nbdkit_error("disk %s: cannot record in %s/%s that tracking "
                             "stopped: %s", d->id, d->logdir, TRACKING_NAME,
                             d->markfd < 0 ? "not open" : vr_errmsg());
        }
        nbdkit_error("tracking stopped: %s; guest writes go on and are "
                     "marked for resynchronization", msg);
        __atomic_store_n(&stopped, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&stop_lock);
}

bool
tracking_stopped(void)
{
    return __atomic_load_n(&stopped, __ATOMIC_ACQUIRE);
}


int
fail(int rc, const char *what, struct disk *d)
{
    nbdkit_error("%s %s: %s", what, d->id,
                 vr_errmsg()[0] ? vr_errmsg() : strerror(-rc));
    errno = -rc;
    return -1;
}


int
zero_range(struct disk *d, uint32_t count, uint64_t offset, bool fast)
{
    if (fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, count) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    if (fast)
        return -ENOTSUP;
    if (fallocate(d->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, count) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    static const uint8_t zeroes[65536];
    while (count > 0) {
        uint32_t n = count < sizeof zeroes ? count : sizeof zeroes;
        int rc = io_pwrite_all(d->fd, zeroes, n, (off_t)offset);
        if (rc < 0)
            return rc;
        count -= n;
        offset += n;
    }
    return 0;
}

int
make_durable(struct disk *d)
{
    /* Preserve files first, so a block's saved old content is durable no
     * later than the new content that replaced it on the disk.  A log
     * that cannot be made durable stops tracking; the disk's own flush is
     * the guest's, and its only possible failure. */
    int rc = 0;
    if (!tracking_stopped()) {
        pthread_mutex_lock(&d->pre_lock);
        for (unsigned k = 0; k < PRE_OPEN && rc == 0; k++)
            if (d->pre[k])
                rc = cl_writer_sync(d->pre[k]);
        pthread_mutex_unlock(&d->pre_lock);
        if (rc == 0 && d->w)
            rc = cl_writer_sync(d->w);
        if (rc < 0) {
            char msg[256];
            snprintf(msg, sizeof msg, "disk %s: its change log cannot be "
                     "made durable: %s", d->id, vr_errmsg());
            stop_tracking(msg);
            vr_err_clear();
        }
    }
    if (fdatasync(d->fd) < 0)
        return vr_err(-errno, "fdatasync %s: %m", d->path);
    return 0;
}

static bool
overlaps(const struct disk *d, uint64_t start, uint64_t end)
{
    for (const struct range *r = d->inflight; r; r = r->next)
        if (r->start < end && start < r->end)
            return true;
    return false;
}

/* A run of blocks whose content as of an unshipped cycle's seal must be
 * saved to that cycle's preserve file before a request changes them. */
struct preserve {
    uint64_t cycle, off, len;
};


/* Under d->lock, for a request on [offset, offset + count) in the open
 * cycle: update the owner map and list (in *runs, which starts as the
 * caller's stack array of PRESERVE_STACK and is malloc'd beyond it) the
 * runs of blocks an older, unshipped cycle references.  ref: the request
 * is logged by reference and so becomes the blocks' owner. */
static size_t
owner_update(struct disk *d, bool ref, uint64_t offset, uint32_t count,
             struct preserve **runs)
{
    size_t n = 0, cap = PRESERVE_STACK;
    struct preserve *p = *runs;
    uint64_t b0 = offset / CL_PRE_BLOCK;
    uint64_t b1 = (offset + count - 1) / CL_PRE_BLOCK;

    for (uint64_t b = b0; b <= b1; b++) {
        /* A reference makes the open cycle the owner whatever it was:
         * one probe of the map does both. */
        uint64_t c = ref ? u64map_exchange(&d->owner, b, open_cycle)
                         : u64map_get(&d->owner, b);
        if (c != 0 && c < open_cycle) {
            uint64_t off = b * CL_PRE_BLOCK;
            uint64_t len = d->size - off < CL_PRE_BLOCK ? d->size - off
                                                        : CL_PRE_BLOCK;
            if (n > 0 && p[n - 1].cycle == c &&
                p[n - 1].off + p[n - 1].len == off &&
                p[n - 1].len + len <= PRE_PIECE_MAX) {
                p[n - 1].len += len;
            } else {
                if (n == cap) {
                    struct preserve *np = xmalloc(2 * cap * sizeof *np);
                    memcpy(np, p, n * sizeof *np);
                    if (p != *runs)
                        free(p);
                    p = np;
                    cap *= 2;
                }
                p[n++] = (struct preserve){ c, off, len };
            }
        }
        if (!ref && c != 0 && c != open_cycle)
            u64map_put(&d->owner, b, 0);
    }
    *runs = p;
    return n;
}

/* Save run's current content (its content at the seal of run->cycle: no
 * write has touched it since, or it would no longer be that cycle's) as
 * one record of the cycle's preserve file, complete before returning. */
static int
preserve_run(struct disk *d, const struct preserve *run)
{
    uint8_t *buf = malloc(run->len);
    if (!buf)
        return vr_err(-ENOMEM, "preserve %s: out of memory", d->id);
    memset(buf, 0, run->len);
    int rc = io_pread_all(d->fd, buf, run->len, (off_t)run->off);
    if (rc == -ENODATA)
        rc = 0; /* past the end reads as zeroes */
    if (rc < 0) {
        free(buf);
        return vr_err(rc, "preserve %s at %" PRIu64 ": read: %s", d->id,
                      run->off, strerror(-rc));
    }
    pthread_mutex_lock(&d->pre_lock);
    if (run->cycle <= __atomic_load_n(&d->owner.drop_upto, __ATOMIC_ACQUIRE)) {
        /* Shipped while we read: nothing to keep. */
        pthread_mutex_unlock(&d->pre_lock);
        free(buf);
        return 0;
    }
    struct cl_writer **slot = NULL;
    for (unsigned k = 0; k < PRE_OPEN && !slot; k++)
        if (d->pre[k] && cl_writer_cycle(d->pre[k]) == run->cycle)
            slot = &d->pre[k];
    if (!slot) {
        /* Take a free slot, else close the oldest cycle's file. */
        unsigned pick = 0;
        for (unsigned k = 0; k < PRE_OPEN; k++) {
            if (!d->pre[k]) {
                pick = k;
                break;
            }
            if (cl_writer_cycle(d->pre[k]) < cl_writer_cycle(d->pre[pick]))
                pick = k;
        }
        slot = &d->pre[pick];
        cl_writer_free(*slot);
        *slot = NULL;
        rc = cl_writer_open_pre(d->dirfd, (uint16_t)(d - disks), run->cycle,
                                slot);
    }
    if (rc == 0)
        rc = cl_writer_append(*slot, CL_WRITE, 0, run->off,
                              (uint32_t)run->len, buf);
    pthread_mutex_unlock(&d->pre_lock);
    free(buf);
    return rc;
}

/* A record could not be written (vr_err says why): stop tracking. */
static void
log_cannot_follow(struct disk *d)
{
    char msg[256];
    snprintf(msg, sizeof msg, "disk %s: its change log cannot follow: %s",
             d->id, vr_errmsg());
    stop_tracking(msg);
}

/* Is a record reserved before seq not yet written?  Under d->lock. */
static bool
earlier_unlogged(const struct disk *d, uint64_t seq)
{
    if (d->unlogged == 0)
        return false;
    for (const struct range *r = d->inflight; r; r = r->next)
        if (!r->logged && r->seq < seq)
            return true;
    return false;
}

/* me's record is written (or failed: then tracking is already stopped):
 * say so, then wait until every record reserved before it is written too,
 * so that the records on file are a prefix of the reservation order
 * whenever the disk changes (see Locking).  The requests waited for are
 * past their reservation and write their record without waiting on
 * anything, so this always ends.  False if tracking broke meanwhile: an
 * earlier place may then stay empty, and recovery would cut every record
 * after it, so the caller must leave the disk alone. */
/* Under d->lock: me's record is on file (or given up); wake its waiters. */
static void
set_logged(struct disk *d, struct range *me)
{
    if (!me->logged) {
        me->logged = true;
        __atomic_store_n(&d->unlogged, d->unlogged - 1, __ATOMIC_RELEASE);
        if (d->log_waiters)
            pthread_cond_broadcast(&d->logged);
    }
}

static bool
wait_logged_prefix(struct disk *d, struct range *me)
{
    pthread_mutex_lock(&d->lock);
    set_logged(d, me);
    if (earlier_unlogged(d, me->seq)) {
        d->log_waiters++;
        while (earlier_unlogged(d, me->seq))
            pthread_cond_wait(&d->logged, &d->lock);
        d->log_waiters--;
    }
    pthread_mutex_unlock(&d->lock);
    return !__atomic_load_n(&stopped, __ATOMIC_ACQUIRE);
}

/* wait_logged_prefix without the mutex when nothing reserved is unlogged
 * (every record is written at its reservation in the usual case): the
 * count is stored with release after each record is written, so reading
 * zero means every earlier record is on file. */
static bool
prefix_logged(struct disk *d, struct range *me)
{
    if (me->logged && __atomic_load_n(&d->unlogged, __ATOMIC_ACQUIRE) == 0)
        return !__atomic_load_n(&stopped, __ATOMIC_ACQUIRE);
    return wait_logged_prefix(d, me);
}

/* The disk I/O of in-flight request me on [offset, offset + count) failed
 * after its record said what it would do: append records of what the disk
 * holds now (read back, with data), so the log's replay is the disk again.
 * Nothing else can touch the range meanwhile (me is in flight) and no seal
 * can come (seal_lock is held).  The records are reserved like a new
 * request's, so later requests wait for them before changing the disk. */
static int
log_readback(struct disk *d, struct range *me, uint64_t offset,
             uint64_t count)
{
    int rc = 0;
    while (count > 0 && rc == 0) {
        uint32_t n = count < PRE_PIECE_MAX ? (uint32_t)count : PRE_PIECE_MAX;
        uint8_t *now = malloc(n);
        if (!now)
            return vr_err(-ENOMEM, "read back %s: out of memory", d->path);
        memset(now, 0, n);
        rc = io_pread_all(d->fd, now, n, (off_t)offset);
        if (rc == -ENODATA)
            rc = 0; /* past the end reads as zeroes */
        if (rc < 0) {
            vr_err(rc, "read back %s at %" PRIu64 ": %s", d->path, offset,
                   strerror(-rc));
            free(now);
            return rc;
        }
        struct cl_rec rec;
        uint64_t log_off;
        pthread_mutex_lock(&d->lock);
        rc = cl_writer_reserve(d->w, CL_WRITE, 0, offset, n, now, &rec,
                               &log_off);
        if (rc == 0) {
            /* The request's own owner_update already preserved and
             * released these blocks: nothing older owns them now. */
            struct preserve none[PRESERVE_STACK], *runs = none;
            size_t nruns = owner_update(d, false, offset, n, &runs);
            assert(nruns == 0 && runs == none);
            (void)nruns; /* without assertions (a release build) */
            me->seq = rec.seq;
            me->logged = false;
            __atomic_store_n(&d->unlogged, d->unlogged + 1, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&d->lock);
        if (rc == 0) {
            rc = cl_writer_write(d->w, &rec, log_off);
            if (rc < 0)
                log_cannot_follow(d);
            (void)wait_logged_prefix(d, me);
        }
        free(now);
        offset += n;
        count -= n;
    }
    return rc;
}

/* A request once tracking has stopped: mark its grains, then change the
 * disk.  Its only possible failure is the disk's own. */
static int
untracked_io(struct disk *d, uint8_t kind, const void *buf, uint32_t count,
             uint64_t offset, bool fast, bool fua)
{
    VR_IGNORE(al_touch(d, offset, count));
    dirtymap_mark(&d->dirty, offset, count);
    vr_fault_point("track-untracked");
    int rc = kind == CL_WRITE ? io_pwrite_all(d->fd, buf, count, (off_t)offset)
                              : zero_range(d, count, offset, fast);
    if (rc == -ENOTSUP)
        __atomic_store_n(&d->no_punch, true, __ATOMIC_RELAXED);
    else if (rc < 0)
        vr_err(rc, "%s %s at %" PRIu64 ": %s",
               kind == CL_WRITE ? "write" : kind == CL_ZERO ? "zero" : "trim",
               d->path, offset, strerror(-rc));
    if (rc == 0 && fua && fdatasync(d->fd) < 0)
        rc = vr_err(-errno, "fdatasync %s: %m", d->path);
    return rc;
}

/* me's record is written, failed or given up: release the requests that
 * wait for it, without waiting for earlier ones. */
static void
mark_logged(struct disk *d, struct range *me)
{
    pthread_mutex_lock(&d->lock);
    set_logged(d, me);
    pthread_mutex_unlock(&d->lock);
}

/* One write-class request (see Locking at the top): wait for requests
 * sharing a block, reserve the log record and take the blocks from older
 * cycles' protection, all under the disk mutex; then, without it, preserve
 * what older unshipped cycles still need, write the record, wait until
 * every earlier record is written, and only then change the disk.  FUA
 * makes the log and the disk durable.
 *
 * Replication never fails the guest: wherever the log cannot follow (no
 * space to reserve or preserve, a record or a sync that fails) tracking
 * stops (stop_tracking) and the request goes on untracked, so the only
 * error a guest can see is its disk's own. */
int
tracked(struct disk *d, uint8_t kind, const void *buf, uint32_t count,
        uint64_t offset, uint32_t flags)
{
    bool fua = flags & NBDKIT_FLAG_FUA;
    bool fast = kind == CL_ZERO && (flags & NBDKIT_FLAG_FAST_ZERO);
    int rc = 0;
    const char *what = kind == CL_WRITE ? "write"
                       : kind == CL_ZERO ? "zero" : "trim";
    struct range me = {
        .start = offset / CL_PRE_BLOCK * CL_PRE_BLOCK,
        .end = count ? (offset + count + CL_PRE_BLOCK - 1) / CL_PRE_BLOCK *
                           CL_PRE_BLOCK
                     : offset / CL_PRE_BLOCK * CL_PRE_BLOCK,
    };
    struct cl_rec rec;
    uint64_t log_off;
    struct preserve stack_runs[PRESERVE_STACK], *runs = stack_runs;
    size_t nruns = 0;
    bool ref = false;

    vr_err_clear();
    /* A fast zero this file system cannot do is refused before anything
     * is logged (the client falls back to writing zeroes). */
    if (fast && __atomic_load_n(&d->no_punch, __ATOMIC_RELAXED)) {
        errno = ENOTSUP;
        return -1;
    }
    pthread_rwlock_rdlock(&seal_lock);
    if (tracking_stopped()) {
        rc = untracked_io(d, kind, buf, count, offset, fast, fua);
        goto out;
    }
    /* The owner map's slot for the first block is a cache (and TLB) miss
     * nearly every time: start loading it before taking the lock. */
    if (count > 0)
        u64map_prefetch(&d->owner, offset / CL_PRE_BLOCK);
    /* Before anything of this request can reach the disk, its extents
     * are durably in the activity log (a failure only weakens what a
     * host crash would leave to compare). */
    VR_IGNORE(al_touch(d, offset, count));
    pthread_mutex_lock(&d->lock);
    while (overlaps(d, me.start, me.end))
        pthread_cond_wait(&d->idle, &d->lock);
    if (log_ref && kind == CL_WRITE && count > 0) {
        uint64_t nblocks = (offset + count - 1) / CL_PRE_BLOCK -
                           offset / CL_PRE_BLOCK + 1;
        ref = true;
        if (d->owner.used + nblocks > refmap_max &&
            d->compacted_at != d->owner.drop_upto) {
            u64map_compact(&d->owner);
            d->compacted_at = d->owner.drop_upto;
        }
        /* Past the budget, copy the data instead (log=data costs). */
        if (d->owner.used + nblocks > refmap_max)
            ref = false;
    }
    /* Stopped since the look above: its dirty map is marked only by
     * requests that see `stopped`, so this one must not use the log. */
    rc = tracking_stopped() ? -ECANCELED
                            : cl_writer_reserve(d->w, ref ? CL_WREF : kind,
                                                fua ? CL_F_FUA : 0, offset,
                                                count, buf, &rec, &log_off);
    int lrc = 0;
    if (rc == 0) {
        if (count > 0)
            nruns = owner_update(d, ref, offset, count, &runs);
        me.seq = rec.seq;
        me.next = d->inflight;
        d->inflight = &me;
        /* A record that says what the disk will hold (not a reference to
         * it) is pending until the disk holds it: a crash in between
         * leaves it for recovery to redo (redo_pending). */
        if (!ref)
            rec.flags |= CL_F_PENDING;
        if (nruns == 0 && rec.kind != CL_WRITE && logio != CL_MMAP_OFF) {
            /* The usual case: 32 bytes copied into the mapping, so the
             * record goes in now, in order, and nobody waits for it. */
            lrc = cl_writer_write(d->w, &rec, log_off);
            me.logged = true;
        } else {
            __atomic_store_n(&d->unlogged, d->unlogged + 1, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&d->lock);
    if (rc < 0) {
        /* No place in the log (its file system is full, say): go on
         * without it.  Nothing is registered, so no one waits for us. */
        if (rc != -ECANCELED)
            log_cannot_follow(d);
        rc = untracked_io(d, kind, buf, count, offset, fast, fua);
        goto out;
    }
    if (lrc < 0) {
        log_cannot_follow(d);
        goto untracked;
    }
    vr_fault_point("track-reserved");

    int prc = 0;
    for (size_t i = 0; i < nruns && prc == 0; i++)
        prc = preserve_run(d, &runs[i]);
    if (runs != stack_runs)
        free(runs);
    vr_fault_point("track-preserved");
    if (prc < 0) {
        /* The owner map no longer protects those blocks and the older
         * cycle cannot be kept as it was at its seal: the log cannot
         * follow.  The disk is still unchanged. */
        char why[600];
        snprintf(why, sizeof why, "disk %s: could not preserve data of an "
                 "unshipped cycle: %s", d->id, vr_errmsg());
        stop_tracking(why);
        goto untracked;
    }
    if (!me.logged) {
        lrc = cl_writer_write(d->w, &rec, log_off);
        if (lrc < 0) {
            log_cannot_follow(d);
            goto untracked;
        }
    }
    if (!prefix_logged(d, &me))
        goto untracked; /* stopped meanwhile; the disk is unchanged */
    vr_fault_point("track-logged");

    if (kind == CL_WRITE)
        rc = io_pwrite_all(d->fd, buf, count, (off_t)offset);
    else
        rc = zero_range(d, count, offset, fast);
    if (rc == -ENOTSUP)
        __atomic_store_n(&d->no_punch, true, __ATOMIC_RELAXED);
    vr_fault_point("track-written");
    if (!ref)
        lrc = cl_writer_settle(d->w, &rec, log_off);
    vr_fault_point("track-settled");
    /* A write logged by reference already stands for whatever the disk
     * holds.  Any other record said what the request would do: say what
     * it did, which may be part of it or nothing.  (A crash between the
     * settle and the read-back record, after a failed disk I/O, leaves
     * the record's claim standing: docs/design.md.) */
    if (lrc == 0 && rc < 0 && !ref) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s %s at %" PRIu64 ": %s", what, d->path,
                 offset, strerror(-rc));
        lrc = log_readback(d, &me, offset, count);
        if (lrc == 0 && rc != -ENOTSUP)
            vr_err(rc, "%s", msg);
    } else if (rc < 0) {
        vr_err(rc, "%s %s at %" PRIu64 ": %s", what, d->path, offset,
               strerror(-rc));
    }
    if (lrc < 0) {
        /* The disk I/O is done; the log does not say what it did.  Its
         * grains are marked too, so resynchronization covers them. */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        log_cannot_follow(d);
        dirtymap_mark(&d->dirty, offset, count);
        if (rc < 0)
            vr_err(rc, "%s", msg);
        else
            vr_err_clear();
    }
    goto done;

untracked:
    mark_logged(d, &me);
    rc = untracked_io(d, kind, buf, count, offset, fast, fua);
    fua = false; /* done by untracked_io */

done:
    pthread_mutex_lock(&d->lock);
    for (struct range **p = &d->inflight; *p; p = &(*p)->next)
        if (*p == &me) {
            *p = me.next;
            break;
        }
    pthread_cond_broadcast(&d->idle);
    pthread_mutex_unlock(&d->lock);
    if (rc == 0 && fua)
        rc = make_durable(d);
out:
    pthread_rwlock_unlock(&seal_lock);
    if (rc == -ENOTSUP) {
        errno = ENOTSUP;
        return -1;
    }
    return rc < 0 ? fail(rc, what, d) : 0;
}
