/* plugin.h: what the parts of nbdkit-vmreplica-plugin share.
 *
 * vmreplica.c  nbdkit callbacks: configuration, start-up, exports, reads
 * track.c      the write path: logging every change before the disk holds
 *              it, preserving data of unshipped cycles (Locking, crash
 *              safety)
 * recover.c    start-up recovery of the change log after any crash
 * control.c    the control socket: SEAL, STATUS, SHIPPED, PING, REARM, FOLD
 * activity.c   the activity log: extents a host crash may leave suspect
 * view.c       view mode: a recovery point served read-only
 *
 * The state below is set up by configuration and start-up (single
 * threaded) and afterwards guarded as each comment says.
 */
#ifndef VMREPLICA_PLUGIN_H
#define VMREPLICA_PLUGIN_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "changelog.h"
#include "dirtymap.h"
#include "u64map.h"

#define MAX_DISKS       64
#define PRE_OPEN        4          /* preserve files kept open per disk */
#define PRE_PIECE_MAX   (32u << 20) /* largest preserve record */

/* A write-class request in progress (on its stack): its byte range,
 * widened to whole CL_PRE_BLOCK blocks (preserving works on blocks, so two
 * requests sharing a block must not run together), and its log record. */
struct range {
    uint64_t start, end;
    uint64_t seq;  /* its record's sequence number */
    bool logged;   /* its record is written to the segment */
    struct range *next;
};

struct disk {
    char *id;
    char *path;
    char *logdir;
    int fd;
    int dirfd;
    pthread_mutex_t lock;  /* guards inflight and log reservations */
    pthread_cond_t idle;   /* signalled when an in-flight range ends */
    struct range *inflight; /* write-class requests now in progress */
    unsigned unlogged;     /* of those, how many have no record written
                              (changed under lock, read atomically) */
    unsigned log_waiters;  /* requests waiting in wait_logged_prefix */
    pthread_cond_t logged; /* signalled when a record is written */
    bool no_punch;         /* the file system cannot punch holes */
    struct cl_writer *w;   /* open segment; replaced under seal_lock (W) */
    uint64_t size;         /* bytes (raw disks do not change size) */
    /* Writes logged by reference (log=ref): block -> the cycle whose
     * CL_WREF record last wrote it, while that cycle is not shipped
     * (values <= shipped are dead).  Guarded by lock. */
    struct u64map owner;
    uint64_t compacted_at; /* shipped when owner was last compacted */
    /* Preserve files being appended, one whole record at a time. */
    pthread_mutex_t pre_lock;
    struct cl_writer *pre[PRE_OPEN];
    /* Once tracking has stopped (see track.c): the grains written since,
     * marked before each write reaches the disk.  Marked lock-free. */
    struct dirtymap dirty;
    int markfd;            /* its tracking marker (lib/dirtymap.h) */
    /* The activity log (activity.c): extents whose bit is durable in this
     * generation, the file's image, its descriptor (-1: none). */
    struct dirtymap act;
    uint8_t *al_img;
    int alfd;
    pthread_mutex_t al_lock;
    pthread_rwlock_t al_rw;
    bool al_failed;        /* the file could not be written: not used */
};


extern struct disk disks[MAX_DISKS];
extern unsigned ndisks;
extern char *control_path;
extern char *hashlog_path;

extern pthread_rwlock_t seal_lock;
extern uint64_t open_cycle;  /* protected by seal_lock */
extern uint64_t shipped;     /* cycles <= shipped are shipped (atomic) */
extern bool log_ref;         /* log=ref (default) or log=data */
extern int logio;            /* logio=: a CL_MMAP_* of changelog.h */
extern uint64_t refmap_max;  /* owner entries per disk */
/* Set (with release, after every disk's tracking marker says so) once the
 * log cannot follow the disks: writes then reach the disks untracked,
 * marked in the dirty maps, until REARM.  Changed under seal_lock (R) by
 * stop_tracking, cleared under seal_lock (W) by REARM. */
extern int stopped;
extern char stopped_msg[256];
extern char boot_id[40];     /* this host's boot (lib/dirtymap.h) */

/* View mode (view.c); view_dir is set by configuration. */
extern char *view_dir;
extern uint64_t view_point, view_latest;

/* track.c */
int tracked(struct disk *d, uint8_t kind, const void *buf, uint32_t count,
            uint64_t offset, uint32_t flags);
int make_durable(struct disk *d);
int zero_range(struct disk *d, uint32_t count, uint64_t offset, bool fast);
void stop_tracking(const char *msg);
bool tracking_stopped(void);
int fail(int rc, const char *what, struct disk *d);

/* recover.c */
int recover(void);
int rebuild_owner(struct disk *d);
int recover_stopped(uint64_t marker_cycle);
int rearm(uint64_t *voided);

/* activity.c */
extern unsigned al_checkpoint_s; /* alcheckpoint=: seconds, 0 off */
extern uint64_t al_epoch_ms;      /* monotonic ms of the first al_open */
/* Open d's activity log; with crashed, first mark in it the extents the
 * last run's file names (all of them if it does not read whole). */
int al_open(struct disk *d, struct dirtymap *crashed);
void al_close(struct disk *d);
/* After a clean stop made everything durable: nothing is suspect. */
int al_clear(struct disk *d);
/* Before a write-class request changes [offset, offset + len) of d: its
 * extents are in the file, durably.  A failure empties the file (a crash
 * then makes the whole disk suspect) and is returned only to be logged:
 * the request goes on. */
int al_touch(struct disk *d, uint64_t offset, uint64_t len);
/* Under seal_lock (W): start a new generation; *since its start. */
void al_swap(uint64_t *since);
/* After al_swap, outside the lock: make the disks and logs durable and
 * rewrite each file with the new generation. */
int al_checkpoint(void);

/* control.c */
int control_open(void);
int control_start(void);
void control_stop(void);

/* view.c */
int view_open(void);
void view_refresh(const char *arg, char *reply, size_t n);
int view_read(struct disk *d, void *buf, uint64_t offset, uint32_t count);
void view_close(void);

#endif /* VMREPLICA_PLUGIN_H */
