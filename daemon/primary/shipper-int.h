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

#endif
