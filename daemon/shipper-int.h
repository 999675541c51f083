/* shipper-int.h: the primary's jobs (copies of a VM's replication facts
 * for work without the lock) and its peer (net/peer.h) filled from them. */
#ifndef VR_SHIPPER_INT_H
#define VR_SHIPPER_INT_H

#include <json-c/json.h>

#include "daemon.h"
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

/* The peer of replication r: its server, this host's identity from the
 * server settings (caller holds d->lock); release with peer_fini. */
void peer_fill(struct peer *p, const struct repl *r);
void peer_fini(struct peer *p);

/* Fill jb from vm (caller holds d->lock); release with job_fini. */
void job_fill(struct job *jb, const struct vm *vm);
void job_fini(struct job *jb);

#endif
