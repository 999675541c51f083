/* shipper-int.h: what the files of the primary share:
 *   shipper.c   the replication thread of each VM (initial, cycles)
 *   enable.c    registration with the Replica server, and its removal
 *   planned.c   failover prepare, its withdrawal, reverse replication
 * — the primary's jobs (copies of a VM's replication facts for work
 * without the lock), its peer (net/peer.h) filled from them, and the
 * layer's context (struct primary_ctx pctx), set by primary_init. */
#ifndef VR_SHIPPER_INT_H
#define VR_SHIPPER_INT_H

#include <json-c/json.h>

#include "core/catalog.h"
#include "core/log.h"
#include "core/repl.h"
#include "core/state.h"
#include "core/vms.h"
#include "primary.h"
#include "net/peer.h"

/* Copies of a VM's replication facts for work without d->lock. */
struct job {
    char uuid[37];
    char *name;
    char *rundir;
    unsigned ndisks;
    struct disk disks[MAX_DISKS];
    struct peer peer;
    bool compression;
    uint64_t app_every_ms; /* application-consistent cuts: period, 0 off */
    uint64_t app_last_ms;  /* wall clock of the last one */
};

/* The daemon's state this layer works on (primary_init); read-only after
 * it. */
struct primary_ctx {
    struct daemon *d;
};
extern struct primary_ctx pctx;

/* Fill jb from vm (caller holds d->lock); release with job_fini. */
void job_fill(struct job *jb, const struct vm *vm);
void job_fini(struct job *jb);

/* --- shipper.c: what initial.c and resync.c share with it ------------------ */

/* The outgoing payload's temporary file in the VM's run directory. */
int tmp_payload(const struct job *jb, char **path);
/* Test hook: $VMREPLICA_TEST_SEND_DELAY_MS before every upload. */
void test_send_delay(void);
/* Cycles up to upto are on the Replica server: tell the data plane, delete
 * their logs. */
void release_shipped(const struct job *jb, uint64_t upto);
/* 0 if every disk's tracking marker says tracking; else -EAGAIN saying
 * what to do (and the relationship's untracked flag set). */
int tracking_intact(struct vm *vm, const struct job *jb, uint64_t last_cycle);

/* --- initial.c ------------------------------------------------------------- */

/* Run (or resume) the initial replication of vm; 0 once it is complete,
 * -ECANCELED if stopped. */
int run_initial(struct vm *vm, struct job *jb);
/* Add to b the 64 KiB chunks of [off, off + len) of disk d (open as dfd)
 * whose hashes differ from the Replica server's (at most
 * CHUNKHASH_MAX_COUNT chunks); adds their bytes to *sent. */
struct cyc_builder;
int add_differing(const struct job *jb, unsigned d, int dfd, uint64_t off,
                  uint64_t len, struct cyc_builder *b, uint64_t *sent);
/* The first cycle at whose seal the Replica VM equals this VM once a copy
 * or comparison that read the live disk after base is done: the cycle
 * open now. */
int first_consistent_cycle(const struct job *jb, uint64_t base,
                           uint64_t *first);

/* d->lock held: a start scheduled (--at) and due is made now (state
 * InitialReplicationInProgress); true if it was. */
bool initial_schedule_due(struct vm *vm);

/* --- export.c -------------------------------------------------------------- */

/* Write the export of jb's disks to dir (base cycle base): each disk's
 * non-zero chunks compressed, then the manifest; *first: the first
 * consistent cycle, *stored: bytes of the data files.  -ECANCELED if
 * stopped. */
int export_write(struct vm *vm, struct job *jb, const char *dir,
                 uint64_t base, uint64_t *first, uint64_t *stored);

/* --- resync.c -------------------------------------------------------------- */

/* Run (or resume) the resynchronization of vm (replication resume
 * --resync): 0 once complete. */
int run_resync(struct vm *vm, struct job *jb);
/* d->lock held: a resynchronization waiting for its time (--at) or its
 * window starts if that has come (state Resynchronizing). */
void resync_start_if_due(struct vm *vm);
/* The unsent log passed the relationship's budget: fold it into dirty
 * maps (the data plane's FOLD) and resynchronize from them when the
 * Replica server answers.  0 if under budget or folded. */
int resync_check_budget(struct vm *vm, struct job *jb);

#endif
