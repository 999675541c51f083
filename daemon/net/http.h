/* http.h: helpers shared by the management API and the replication
 * listener (both libmicrohttpd). */
#ifndef VR_HTTP_H
#define VR_HTTP_H

#include <json-c/json.h>
#include <microhttpd.h>

#include "vr.h"

#if MHD_VERSION < 0x00097002
typedef int MHD_RESULT;
#else
typedef enum MHD_Result MHD_RESULT;
#endif

/* HTTP status for a negative errno (docs/api.md table). */
unsigned http_status_for(int rc);
/* Queue obj (consumed) as a JSON response with status. */
MHD_RESULT http_send_json(struct MHD_Connection *c, unsigned status,
                          json_object *obj);
/* The same, with decorate(response, status, body, len, ud) called before
 * it is queued (to add headers that depend on the body). */
typedef void (*http_decorate_fn)(struct MHD_Response *r, unsigned status,
                                 const char *body, size_t len, void *ud);
MHD_RESULT http_send_json_ex(struct MHD_Connection *c, unsigned status,
                             json_object *obj, http_decorate_fn decorate,
                             void *ud);
/* {"error": NAME, "message": msg} for the negative errno rc. */
json_object *http_error_obj(int rc, const char *msg);
/* Queue {"error": NAME, "message": msg} for the negative errno rc. */
MHD_RESULT http_send_error(struct MHD_Connection *c, int rc, const char *msg);
/* Stop the listener d, then call done(arg) (done may be NULL).  Its
 * connection threads may wait for a lock the caller holds, so unless wait
 * is set d stops listening at once (its port is free again) and finishes
 * its requests, and done runs, in a thread of its own. */
void http_daemon_retire(struct MHD_Daemon *d, bool wait,
                        void (*done)(void *arg), void *arg);

#endif
