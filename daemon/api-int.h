/* api-int.h: the management API's handlers (one per endpoint). */
#ifndef VR_API_INT_H
#define VR_API_INT_H

#include <json-c/json.h>
#include <microhttpd.h>

#include "vr.h"

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
int api_repl_reset_stats(struct api_call *, unsigned *, json_object **);
int api_initial_start(struct api_call *, unsigned *, json_object **);
int api_repl_list(struct api_call *, unsigned *, json_object **);
int api_events(struct api_call *, unsigned *, json_object **);
/* Prometheus text for /metrics; caller frees. */
char *api_metrics_text(void);

/* JSON helpers for handlers. */
const char *jstr(json_object *o, const char *key);
bool jbool(json_object *o, const char *key, bool dflt);
int64_t jint(json_object *o, const char *key, int64_t dflt);

#endif
