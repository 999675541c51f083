/* api-int.h: what the files of the management API share — the handlers
 * (one per endpoint, one file per CLI noun: server.c with firewall.c,
 * auth-entry.c, vm.c with vm-network.c, replication.c, failover.c,
 * points.c, events.c; api.c routes), their JSON helpers, and the layer's
 * context (struct api_ctx actx), set by api_init. */
#ifndef VR_API_INT_H
#define VR_API_INT_H

#include <json-c/json.h>
#include <microhttpd.h>

#include "core/authz.h"
#include "core/catalog.h"
#include "core/log.h"
#include "core/r1json.h"
#include "core/repl.h"
#include "core/state.h"
#include "core/storage.h"
#include "core/vms.h"
#include "net/peer.h"
#include "net/tls.h"
#include "primary/primary.h"
#include "replica/replica.h"
#include "api.h"
#include "vr.h"

/* The daemon's state this layer works on (api_init); read-only after
 * it. */
struct api_ctx {
    struct daemon *d;
};
extern struct api_ctx actx;

struct api_call {
    struct MHD_Connection *conn;
    const char *arg;   /* the path's VM segment, if any */
    json_object *body; /* request object (empty if no body) */
};

/* A handler: 0 with *status (default 200) and *out, or -errno with the
 * message in vr_errmsg(). */
typedef int (*api_handler)(struct api_call *call, unsigned *status,
                           json_object **out);

/* Query-string parameter, or NULL. */
const char *api_query(const struct api_call *call, const char *key);

int api_server_show(struct api_call *, unsigned *, json_object **);
int api_server_set(struct api_call *, unsigned *, json_object **);
int api_firewall_show(struct api_call *, unsigned *, json_object **);
int api_firewall_set(struct api_call *, unsigned *, json_object **);
int api_vm_list(struct api_call *, unsigned *, json_object **);
int api_vm_create(struct api_call *, unsigned *, json_object **);
int api_vm_show(struct api_call *, unsigned *, json_object **);
int api_vm_remove(struct api_call *, unsigned *, json_object **);
int api_vm_start(struct api_call *, unsigned *, json_object **);
int api_vm_stop(struct api_call *, unsigned *, json_object **);
int api_repl_enable(struct api_call *, unsigned *, json_object **);
int api_repl_set(struct api_call *, unsigned *, json_object **);
int api_repl_show(struct api_call *, unsigned *, json_object **);
int api_repl_remove(struct api_call *, unsigned *, json_object **);
int api_repl_measure(struct api_call *, unsigned *, json_object **);
int api_points_list(struct api_call *, unsigned *, json_object **);
int api_failover_start(struct api_call *, unsigned *, json_object **);
int api_failover_stop(struct api_call *, unsigned *, json_object **);
int api_failover_complete(struct api_call *, unsigned *, json_object **);
int api_failover_prepare(struct api_call *, unsigned *, json_object **);
int api_repl_reverse(struct api_call *, unsigned *, json_object **);
int api_vm_set_test_network(struct api_call *, unsigned *, json_object **);
int api_vm_set_boot(struct api_call *, unsigned *, json_object **);
int api_auth_list(struct api_call *, unsigned *, json_object **);
int api_auth_add(struct api_call *, unsigned *, json_object **);
int api_auth_set(struct api_call *, unsigned *, json_object **);
int api_auth_remove(struct api_call *, unsigned *, json_object **);
int api_test_connection(struct api_call *, unsigned *, json_object **);
int api_vm_set_failover_network(struct api_call *, unsigned *,
                                json_object **);
int api_repl_suspend(struct api_call *, unsigned *, json_object **);
int api_repl_resume(struct api_call *, unsigned *, json_object **);
int api_repl_stop_resync(struct api_call *, unsigned *, json_object **);
int api_repl_reset_stats(struct api_call *, unsigned *, json_object **);
int api_initial_start(struct api_call *, unsigned *, json_object **);
int api_initial_stop(struct api_call *, unsigned *, json_object **);
int api_initial_import(struct api_call *, unsigned *, json_object **);
int api_repl_list(struct api_call *, unsigned *, json_object **);
int api_events(struct api_call *, unsigned *, json_object **);
/* Prometheus text for /metrics; caller frees. */
char *api_metrics_text(void);

/* vm.c, replication.c: GET /v1/vms/VM, GET .../replication/measure. */
json_object *vm_to_json(const struct vm *vm);
json_object *repl_measure_json(const struct vm *vm);
/* vm-network.c: vm create's "nics": ["user", ...] -> NIC objects with new
 * MACs. */
int nics_from_create(json_object *body, json_object **out) VR_WUR;
/* firewall.c: firewall_sync's last failure while enabled, or NULL.
 * d->lock held. */
const char *firewall_error(void);

#endif
