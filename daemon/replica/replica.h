/* replica.h: the Replica server (daemon/replica/, libvrd_replica.a):
 * the protocol's listeners and endpoints (registration, uploads), the
 * applier and its start-up recovery, the recovery history, and failover
 * (test, planned, unplanned).  What main.c and the API use of it. */
#ifndef VR_REPLICA_H
#define VR_REPLICA_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/state.h"
#include "vr.h"

/* What the Replica server needs from above it, set by main.c. */
struct replica_hooks {
    /* Stop and join a VM's shipper thread (the old primary accepting a
     * reverse registration; drops and retakes d->lock). */
    void (*shipper_stop)(struct vm *vm);
};

/* Before anything else of this layer: the daemon's state it works on and
 * its hooks (copied). */
void replica_init(struct daemon *d, const struct replica_hooks *hooks);

/* Whether the auth setting ("certificate", "kerberos", "both"; unset is
 * certificate) asks for the HTTPS / the Kerberos listener. */
bool cfg_wants_certificate(const struct server_cfg *c);
bool cfg_wants_kerberos(const struct server_cfg *c);
/* (Re)start or stop the listeners per d->cfg (d->lock held). */
int replica_listener_apply(void) VR_WUR;
/* Stop them and wait for their requests (shutdown; caller holds no lock). */
void replica_listener_stop(void);
/* Apply every staged cycle of every Replica VM (startup recovery). */
int replica_recover(void) VR_WUR;
int replica_applier_start(void) VR_WUR;
void replica_applier_stop(void);

/* GET /v1/vms/VM/points body (an array). d->lock held. */
json_object *history_points_json(struct vm *vm);
/* "VM - Test" while a test failover of vm runs (its name, mode "test",
 * the point, run directory and whether QEMU runs), else NULL.  d->lock
 * held. */
json_object *failover_test_vm_json(const struct vm *vm);

/* The failover steps (`vmreplica failover ...` on the Replica server) of
 * the Replica VM named key: 0 and the reply in *out, or -errno with the
 * message.  Each takes and drops d->lock itself. */
/* Start a test failover at point want (0: the latest). */
int failover_test_start(const char *key, int64_t want,
                        json_object **out) VR_WUR;
/* Stop the running test failover. */
int failover_test_stop(const char *key, json_object **out) VR_WUR;
/* Is a failover of key at point want a planned one (its primary prepared
 * it, no point asked for)? */
bool failover_is_planned(const char *key, int64_t want);
/* The planned failover of a prepared VM (start_vm: run QEMU after it). */
int failover_planned_start(const char *key, bool start_vm,
                           json_object **out) VR_WUR;
/* An unplanned failover at point want (force: even while the primary
 * was in contact recently). */
int failover_unplanned_start(const char *key, int64_t want, bool force,
                             json_object **out) VR_WUR;
/* Cancel / complete a running (not test) failover; complete with force
 * kills the failed-over guest instead of an ACPI shutdown. */
int failover_cancel(const char *key, json_object **out) VR_WUR;
int failover_complete(const char *key, bool force, json_object **out) VR_WUR;

/* `initial-replication import` of the Replica VM named key from the
 * export in dir (replica-import.c): checked whole, then loaded into its
 * disks; its base cycle is then in the status the primary polls.  Takes
 * and drops d->lock itself. */
int replica_import(const char *key, const char *dir, json_object **out) VR_WUR;

#endif
