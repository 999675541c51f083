/* daemon.h: the contracts between the parts of vmreplicad that are not yet
 * in a layer folder (core/, proc/, net/: see docs/design.md), and the
 * daemon object D they share.  The state and its lock are described in
 * core/state.h.
 */
#ifndef VR_DAEMON_H
#define VR_DAEMON_H

#include <json-c/json.h>
#include <pthread.h>
#include <stdint.h>

#include "core/authz.h"
#include "core/catalog.h"
#include "core/log.h"
#include "core/repl.h"
#include "core/r1json.h" /* MAX_DISKS, network_valid, nics_validate */
#include "core/state.h"
#include "core/storage.h"
#include "core/vms.h"
#include "net/tls.h"
#include "vr.h"

extern struct daemon *D;

/* history.c: recovery history of Replica VMs. */
/* Forget every point and undo file (a fresh relationship); D->lock held. */
int history_reset(struct vm *vm) VR_WUR;
/* Before applying cycle n from payload_path: save what it overwrites (if
 * recovery history is on).  Without D->lock, VM_OP_APPLY in progress. */
int history_capture(struct vm *vm, uint64_t n,
                    const char *payload_path) VR_WUR;
/* After cycle n was recorded as applied: make it a point (app: an
 * application-consistent one), apply the retention policy, prune.  D->lock held (dropped for file work). */
int history_after_apply(struct vm *vm, uint64_t n, bool app) VR_WUR;
/* At start-up: repair points and undo files after a crash. */
int history_recover(struct vm *vm) VR_WUR;
/* failover.c: before cycle n is applied (without D->lock, VM_OP_APPLY
 * set), hand a running test failover's view the cycle's undo span;
 * -EAGAIN if the view does not answer (the cycle waits). */
int failover_test_refresh(struct vm *vm, uint64_t n) VR_WUR;
/* At start-up, before the applier: keep a whole test failover, undo a
 * half-started or half-stopped one. */
int failover_recover(struct vm *vm) VR_WUR;
/* GET /v1/vms/VM/points body (an array). D->lock held. */
json_object *history_points_json(struct vm *vm);

/* --- vm.c, replication.c ------------------------------------------------ */
json_object *vm_to_json(const struct vm *vm);
json_object *repl_measure_json(const struct vm *vm);
/* failover.c: "VM - Test" while a test failover of vm runs (its name,
 * mode "test", the point, run directory and whether QEMU runs), else
 * NULL.  D->lock held. */
json_object *failover_test_vm_json(const struct vm *vm);

/* --- network.c ---------------------------------------------------------- */
/* vm create's "nics": ["user", ...] -> NIC objects with new MACs. */
int nics_from_create(json_object *body, json_object **out) VR_WUR;
/* After a failover started the VM in rundir (D->lock held): set its NICs'
 * failover settings in the guest once its agent answers (a thread). */
void network_inject_start(const struct vm *vm, const char *rundir);

/* --- api.c ------------------------------------------------------------- */
int api_start(const char *sock_path) VR_WUR;
void api_stop(void);
/* Remove sock_path only if it is still the socket api_start bound (same
 * device and inode): never another daemon's. */
void api_unlink_socket(const char *sock_path);

/* --- shipper.c (primary) ----------------------------------------------- */
/* Start the VM's replication thread if replication is on and not running. */
void shipper_ensure(struct vm *vm);
/* Stop and join it (drops and retakes d->lock). */
void shipper_stop(struct vm *vm);
/* POST /v1/vms/VM/replication: contact the Replica server, register. */
int shipper_enable(struct vm *vm, json_object *req, json_object **out) VR_WUR;
/* Tell the Replica server replication was removed (best effort). */
void shipper_remote_remove(struct vm *vm);
/* Bytes of change log not yet acknowledged; *unsent (if not NULL): sealed
 * cycles not yet acknowledged, empty ones included. */
uint64_t shipper_pending_bytes(const struct vm *vm, unsigned *unsent);

/* --- replica.c (Replica server) ---------------------------------------- */
/* Whether the auth setting ("certificate", "kerberos", "both"; unset is
 * certificate) asks for the HTTPS / the Kerberos listener. */
bool cfg_wants_certificate(const struct server_cfg *c);
bool cfg_wants_kerberos(const struct server_cfg *c);
/* (Re)start or stop the HTTPS listener per D->cfg. */
int replica_listener_apply(void) VR_WUR;
/* Stop it and wait for its requests (shutdown; caller holds no lock). */
void replica_listener_stop(void);
/* Apply every staged cycle of every Replica VM (startup recovery). */
int replica_recover(void) VR_WUR;
int replica_applier_start(void) VR_WUR;
void replica_applier_stop(void);

/* --- firewall.c -------------------------------------------------------- */
/* After the listeners changed (start-up, server set), D->lock held: if the
 * firewall is enabled and its table does not hold the running listeners'
 * ports, rewrite it.  A failure is an error event, kept for
 * firewall_error(). */
void firewall_sync(void);
/* firewall_sync's last failure while enabled, or NULL.  D->lock held. */
const char *firewall_error(void);

#endif
