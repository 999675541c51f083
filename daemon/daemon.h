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
#include "primary/primary.h"
#include "replica/replica.h"
#include "vr.h"

extern struct daemon *D;


/* --- vm.c, replication.c ------------------------------------------------ */
json_object *vm_to_json(const struct vm *vm);
json_object *repl_measure_json(const struct vm *vm);

/* --- network.c ---------------------------------------------------------- */
/* vm create's "nics": ["user", ...] -> NIC objects with new MACs. */
int nics_from_create(json_object *body, json_object **out) VR_WUR;

/* --- api.c ------------------------------------------------------------- */
int api_start(const char *sock_path) VR_WUR;
void api_stop(void);
/* Remove sock_path only if it is still the socket api_start bound (same
 * device and inode): never another daemon's. */
void api_unlink_socket(const char *sock_path);



/* --- firewall.c -------------------------------------------------------- */
/* After the listeners changed (start-up, server set), D->lock held: if the
 * firewall is enabled and its table does not hold the running listeners'
 * ports, rewrite it.  A failure is an error event, kept for
 * firewall_error(). */
void firewall_sync(void);
/* firewall_sync's last failure while enabled, or NULL.  D->lock held. */
const char *firewall_error(void);

#endif
