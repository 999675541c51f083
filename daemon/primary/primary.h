/* primary.h: the primary (daemon/primary/, libvrd_primary.a): each
 * replicated VM's shipper thread (initial replication, then a cycle every
 * frequency), registration with the Replica server, failover prepare and
 * reverse replication.  What main.c and the API use of it. */
#ifndef VR_PRIMARY_H
#define VR_PRIMARY_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/state.h"
#include "net/peer.h"
#include "vr.h"

/* Before anything else of this layer: the daemon's state it works on. */
void primary_init(struct daemon *d);

/* Start the VM's replication thread if replication is on and not running
 * (d->lock held). */
void shipper_ensure(struct vm *vm);
/* Stop and join it (drops and retakes d->lock). */
void shipper_stop(struct vm *vm);
/* Bytes of change log not yet acknowledged; *unsent (if not NULL): sealed
 * cycles not yet acknowledged, empty ones included.  d->lock held. */
uint64_t shipper_pending_bytes(const struct vm *vm, unsigned *unsent);

/* The peer of replication r: its server, this host's identity from the
 * server settings (caller holds d->lock); release with peer_fini. */
void peer_fill(struct peer *p, const struct repl *r);
void peer_fini(struct peer *p);

/* `replication enable` of the VM named key with the settings r (takes
 * ownership): register it with r's Replica server, then record the
 * relationship and start its shipper (start_initial: initial replication
 * at once).  0 and the replication's JSON in *out, or -errno. */
int primary_enable(const char *key, struct repl *r, bool start_initial,
                   json_object **out) VR_WUR;
/* `replication remove` of the primary VM *vmp (d->lock held; dropped for
 * the call): begin VM_OP_REMOVE, stop its shipper, tell the Replica server
 * (best effort).  0 with *vmp found again, or -ENOENT (*vmp NULL: gone). */
int primary_unregister(const char *key, struct vm **vmp) VR_WUR;

/* `initial-replication stop` of primary vm (d->lock held): cancel a
 * scheduled start, or stop a running initial replication (the state goes
 * back to ReadyForInitialReplication; the next start is afresh). */
int initial_stop(struct vm *vm) VR_WUR;

/* `failover prepare` of the primary VM named key (SPEC §8). */
int planned_prepare(const char *key, json_object **out) VR_WUR;
/* Is key a primary VM prepared for failover? */
bool planned_is_prepared(const char *key);
/* `failover stop` of a prepared primary VM: withdraw the preparation. */
int planned_unprepare(const char *key, json_object **out) VR_WUR;
/* `replication reverse` of the failed-over Replica VM named key: become
 * its primary, replicating to server (NULL: the old primary) reached at
 * addr (NULL: as before, "": none). */
int planned_reverse(const char *key, const char *server, const char *addr,
                    json_object **out) VR_WUR;

#endif
