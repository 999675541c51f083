/* activity.c: the activity log of nbdkit-vmreplica-plugin (plugin.h), the
 * idea of DRBD's: which 16 MiB extents of each disk may hold writes that a
 * host crash could leave on the disk without their records.
 *
 * The change log is not synced at every write (sealsync=off: a power loss
 * voids it, formats.md §7), so after a host crash every write since the
 * log was last made durable is suspect.  Before a write reaches an extent
 * not yet in the log, the extent's bit is written into DISK.vrlog/activity
 * and synced; a checkpoint (every alcheckpoint= seconds, at a seal, the
 * first a period after start: it flushes the disk, which at start-up
 * would cost most and buy least) makes
 * the disk and the log durable and rewrites the file with only the extents
 * written since the checkpoint began.  After a host crash the dirty map is
 * the extents of the file plus the ranges of every unshipped record that
 * survived (recover.c), not the whole disk: a resynchronization compares
 * only those (daemon/resync.c).
 *
 * File: ACT_HDR bytes of header ("VRACTIV1", size, grain shift, little
 * endian), then the bitmap, one bit per extent, written in place one page
 * at a time.  Bits only ever get set between checkpoints, so a torn page
 * write mixes two states that both hold every extent written before it
 * began; a checkpoint's rewrite is torn the same way into a superset of the
 * new generation.  An unreadable file at start marks the whole disk.
 *
 * Locking: al_touch tests the in-memory generation (extents whose bit is
 * durable) lock-free; a miss holds d->al_rw (R) while it sets the bit and
 * writes its page under d->al_lock, syncs (concurrent misses share the
 * journal commit) and then marks the generation.  The checkpoint swaps the
 * generation under seal_lock (W), so no tracked write is in flight then;
 * everything written before the swap is made durable, and the file is
 * rewritten under al_rw (W), so no miss is between its write and its
 * sync.
 */
#define NBDKIT_API_VERSION 2
#include "config.h"

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

#define ACT_NAME   "activity"
#define ACT_MAGIC  "VRACTIV1"
#define ACT_HDR    4096u
#define ACT_PAGE   4096u
#define ACT_SHIFT  24 /* 16 MiB extents */

unsigned al_checkpoint_s = 60;
uint64_t al_epoch_ms; /* when the first activity log was opened */

static uint64_t
bitmap_bytes(const struct disk *d)
{
    return (d->act.nbits + 7) / 8;
}

/* Write the header and the whole image, then sync. */
static int
write_all(struct disk *d)
{
    uint8_t hdr[ACT_HDR] = { 0 };
    memcpy(hdr, ACT_MAGIC, 8);
    for (int i = 0; i < 8; i++)
        hdr[8 + i] = (uint8_t)(d->size >> (8 * i));
    hdr[16] = ACT_SHIFT;
    int rc = io_pwrite_all(d->alfd, hdr, sizeof hdr, 0);
    if (rc == 0)
        rc = io_pwrite_all(d->alfd, d->al_img, bitmap_bytes(d), ACT_HDR);
    if (rc == 0 && fdatasync(d->alfd) < 0)
        rc = -errno;
    return rc < 0 ? vr_err(rc, "%s/" ACT_NAME ": %s", d->logdir,
                           strerror(-rc))
                  : 0;
}

int
al_open(struct disk *d, struct dirtymap *crashed)
{
    int rc = dirtymap_init(&d->act, d->size, ACT_SHIFT);
    if (rc < 0)
        return rc;
    if (!al_epoch_ms)
        al_epoch_ms = vr_mono_ms();
    d->al_img = xcalloc(1, bitmap_bytes(d) + ACT_PAGE);
    pthread_mutex_init(&d->al_lock, NULL);
    pthread_rwlock_init(&d->al_rw, NULL);
    d->al_failed = false;
    d->alfd = openat(d->dirfd, ACT_NAME, O_RDWR | O_CREAT | O_CLOEXEC |
                     O_NOFOLLOW, 0644);
    if (d->alfd < 0)
        return vr_err(-errno, "%s/" ACT_NAME ": %m", d->logdir);
    /* What the last run left: extents whose writes may not be durable.
     * After a process crash (same boot) the page cache still holds them,
     * but a host crash later would not: they stay until a checkpoint. */
    uint8_t hdr[ACT_HDR];
    bool ok = pread(d->alfd, hdr, sizeof hdr, 0) == (ssize_t)sizeof hdr &&
              memcmp(hdr, ACT_MAGIC, 8) == 0 && hdr[16] == ACT_SHIFT;
    uint64_t size = 0;
    for (int i = 0; ok && i < 8; i++)
        size |= (uint64_t)hdr[8 + i] << (8 * i);
    ok = ok && size == d->size &&
         pread(d->alfd, d->al_img, bitmap_bytes(d), ACT_HDR) ==
             (ssize_t)bitmap_bytes(d);
    if (!ok) {
        memset(d->al_img, 0, bitmap_bytes(d));
        if (crashed) {
            nbdkit_debug("%s/" ACT_NAME " does not read whole: the whole "
                         "disk is suspect", d->logdir);
            dirtymap_mark_all(crashed);
        }
    }
    for (uint64_t e = 0; e < d->act.nbits; e++) {
        if (!(d->al_img[e / 8] & (1u << (e % 8))))
            continue;
        dirtymap_mark(&d->act, e << ACT_SHIFT, (uint64_t)1 << ACT_SHIFT);
        if (crashed)
            dirtymap_mark(crashed, e << ACT_SHIFT, (uint64_t)1 << ACT_SHIFT);
    }
    return write_all(d);
}

int
al_clear(struct disk *d)
{
    /* A clean stop: the disk and the log are durable, nothing is suspect. */
    if (d->alfd < 0 || __atomic_load_n(&d->al_failed, __ATOMIC_ACQUIRE))
        return 0;
    memset(d->al_img, 0, bitmap_bytes(d));
    dirtymap_clear(&d->act);
    return write_all(d);
}

void
al_close(struct disk *d)
{
    if (d->alfd >= 0)
        close(d->alfd);
    d->alfd = -1;
    dirtymap_free(&d->act);
    free(d->al_img);
    d->al_img = NULL;
}

/* The file cannot follow: empty it, so that a restart after a crash
 * finds it unreadable and takes the whole disk as suspect (al_open), and
 * stop using it.  Guest writes go on. */
static void
al_fail(struct disk *d, int rc)
{
    pthread_mutex_lock(&d->al_lock);
    if (!__atomic_load_n(&d->al_failed, __ATOMIC_ACQUIRE)) {
        nbdkit_error("%s/" ACT_NAME ": %s; a host crash now makes the whole "
                     "disk suspect", d->logdir, strerror(-rc));
        if (ftruncate(d->alfd, 0) < 0 || fdatasync(d->alfd) < 0)
            nbdkit_error("%s/" ACT_NAME ": cannot even empty it: %m",
                         d->logdir);
        __atomic_store_n(&d->al_failed, true, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&d->al_lock);
}

int
al_touch(struct disk *d, uint64_t offset, uint64_t len)
{
    if (d->alfd < 0 || len == 0 ||
        __atomic_load_n(&d->al_failed, __ATOMIC_ACQUIRE))
        return 0;
    uint64_t first = offset >> ACT_SHIFT;
    uint64_t last = (offset + len - 1) >> ACT_SHIFT;
    if (last >= d->act.nbits)
        last = d->act.nbits - 1;
    /* d->act holds the extents whose bit is durable in this generation:
     * only then may a write go to them. */
    bool miss = false;
    for (uint64_t e = first; e <= last && !miss; e++)
        miss = !dirtymap_test(&d->act, e << ACT_SHIFT);
    if (!miss)
        return 0;
    int rc = 0;
    pthread_rwlock_rdlock(&d->al_rw);
    for (uint64_t e = first; e <= last && rc == 0; e++) {
        pthread_mutex_lock(&d->al_lock);
        if (!(d->al_img[e / 8] & (1u << (e % 8)))) {
            d->al_img[e / 8] |= (uint8_t)(1u << (e % 8));
            uint64_t page = e / 8 / ACT_PAGE * ACT_PAGE;
            uint64_t n = bitmap_bytes(d) - page;
            if (n > ACT_PAGE)
                n = ACT_PAGE;
            rc = io_pwrite_all(d->alfd, d->al_img + page, n, ACT_HDR + page);
        }
        pthread_mutex_unlock(&d->al_lock);
    }
    /* Another request's page write may be ours too: sync either way. */
    if (rc == 0 && fdatasync(d->alfd) < 0)
        rc = -errno;
    if (rc == 0)
        dirtymap_mark(&d->act, first << ACT_SHIFT,
                      (last - first + 1) << ACT_SHIFT);
    pthread_rwlock_unlock(&d->al_rw);
    vr_fault_point("al-touched");
    if (rc < 0)
        al_fail(d, rc);
    return rc;
}

void
al_swap(uint64_t *since)
{
    /* seal_lock (W) held: no tracked write is in flight. */
    for (unsigned i = 0; i < ndisks; i++)
        if (disks[i].alfd >= 0)
            dirtymap_clear(&disks[i].act);
    *since = vr_mono_ms();
}

int
al_checkpoint(void)
{
    /* Everything written before the swap reaches the disks and the log,
     * then the file forgets the extents not written since. */
    int rc = 0;
    for (unsigned i = 0; i < ndisks && rc == 0; i++) {
        struct disk *d = &disks[i];
        if (d->alfd < 0 || __atomic_load_n(&d->al_failed, __ATOMIC_ACQUIRE))
            continue;
        rc = make_durable(d);
        if (rc == 0 && tracking_stopped())
            return 0; /* the log could not be made durable: keep all */
        if (rc < 0)
            break;
        /* No miss between its page write and its sync meanwhile (it
         * holds al_rw), so the image keeps every extent being written. */
        pthread_rwlock_wrlock(&d->al_rw);
        pthread_mutex_lock(&d->al_lock);
        memset(d->al_img, 0, bitmap_bytes(d));
        for (uint64_t e = 0; e < d->act.nbits; e++)
            if (dirtymap_test(&d->act, e << ACT_SHIFT))
                d->al_img[e / 8] |= (uint8_t)(1u << (e % 8));
        rc = write_all(d);
        pthread_mutex_unlock(&d->al_lock);
        pthread_rwlock_unlock(&d->al_rw);
        if (rc < 0) {
            al_fail(d, rc);
            rc = 0;
        }
    }
    return rc;
}
