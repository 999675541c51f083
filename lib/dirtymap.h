/* dirtymap.h: which regions of a disk changed without a change log.
 *
 * When the data plane can no longer log (the log's file system is full or
 * failing), it stops tracking rather than fail the guest's writes
 * (plugin/track.c): from then on each write marks its grains here before
 * it reaches the disk.  When tracking is re-armed, the map (with every
 * range the unshipped, now void, cycles had logged) is saved beside the
 * log, and resynchronization compares and sends only those regions
 * (docs/formats.md §7 has the file format).
 *
 * Marking is lock-free (atomic OR), so any number of request threads may
 * mark while one reads a snapshot.  Everything else is single-threaded.
 */
#ifndef VR_DIRTYMAP_H
#define VR_DIRTYMAP_H

#include <stdbool.h>
#include <stdint.h>

#include "vr.h"

#define DIRTY_GRAIN_SHIFT   16            /* 64 KiB grains */
#define DIRTY_SIZE_MAX      (1ull << 50)  /* 1 PiB: a 2 GiB map at most */
#define DIRTY_HDR_BYTES     40

struct dirtymap {
    uint64_t size;        /* disk bytes covered */
    unsigned grain_shift; /* log2 of the grain */
    uint64_t nbits;       /* grains: size / grain, rounded up */
    uint64_t *bits;       /* nbits bits, in 64-bit words */
};

/* An empty map of a disk of size bytes (aborts when out of memory, like
 * xmalloc).  -EINVAL if size or grain_shift are out of range. */
int dirtymap_init(struct dirtymap *m, uint64_t size,
                  unsigned grain_shift) VR_WUR;
void dirtymap_free(struct dirtymap *m);

/* Mark every grain [off, off + len) touches (clipped to the disk);
 * thread-safe against other markers. */
void dirtymap_mark(struct dirtymap *m, uint64_t off, uint64_t len);
void dirtymap_mark_all(struct dirtymap *m);
void dirtymap_clear(struct dirtymap *m);
bool dirtymap_test(const struct dirtymap *m, uint64_t off);

/* Bytes of the disk in marked grains. */
uint64_t dirtymap_bytes(const struct dirtymap *m);

/* The first run of marked grains at or after byte from, as a byte range
 * clipped to the disk: 1 and *off, *len; 0 when there is none. */
int dirtymap_next(const struct dirtymap *m, uint64_t from, uint64_t *off,
                  uint64_t *len);

/* Save atomically as name in directory dirfd (a temporary file, synced,
 * renamed over name, the directory synced). */
int dirtymap_save(const struct dirtymap *m, int dirfd,
                  const char *name) VR_WUR;

/* Load name from dirfd; every field and the checksum are checked, and the
 * map must cover a disk of size bytes (-EBADMSG otherwise). */
int dirtymap_load(int dirfd, const char *name, uint64_t size,
                  struct dirtymap *m) VR_WUR;

/* The decoder behind dirtymap_load, for a whole file in memory. */
int dirtymap_decode(const void *buf, size_t len, uint64_t size,
                    struct dirtymap *m) VR_WUR;

/* The tracking marker, TRACKING_NAME in each disk's log directory: one
 * preallocated block that says whether the log follows the disk.  The data
 * plane overwrites it in place (no allocation, so it works on a full file
 * system) and syncs it before the first write that is not logged; the
 * shipper reads it before sending a cycle built from the disk. */
#define TRACKING_NAME  "tracking"
#define TRACKING_BYTES 512

/* Open dirfd's marker for reading and writing, creating it (saying
 * "tracking", synced with its directory) if there is none. */
int tracking_marker_open(int dirfd, int *fd) VR_WUR;
/* Rewrite it in place and sync it: stopped (since open cycle, and why)
 * or tracking. */
int tracking_marker_write(int fd, bool stopped, uint64_t cycle,
                          const char *why) VR_WUR;
/* Read it: 0 and *stopped, *cycle and why (NUL-terminated, may be cut);
 * -ENOENT if there is no marker (a log made before markers: tracking);
 * -EBADMSG if it says neither. */
int tracking_marker_read(int fd, bool *stopped, uint64_t *cycle, char *why,
                         size_t n) VR_WUR;

/* While a data plane serves the disks the marker also names the host's
 * boot (/proc/sys/kernel/random/boot_id): found at the next start under
 * another boot, it means the host went down with the disks served, so
 * writes not yet flushed may be on the disks without their records.  A
 * clean stop (everything synced) writes the plain "tracking" back. */
int tracking_marker_served(int fd, const char *boot) VR_WUR;
/* The boot named by a "tracking" marker, or "" if none (a clean stop). */
int tracking_marker_boot(int fd, char *boot, size_t n) VR_WUR;
/* This host's boot id (VMREPLICA_TEST_BOOT_ID overrides it, for tests). */
int vr_boot_id(char out[40]) VR_WUR;

#endif /* VR_DIRTYMAP_H */
