/* web.h: the read-only web listener — Prometheus /metrics, a JSON view of
 * the VMs and the dashboard (web.c), on `server set --web-listen`. */
#ifndef VR_WEB_H
#define VR_WEB_H

#include <stdbool.h>
#include <stddef.h>

#include "vr.h"

struct server_cfg;

/* Is c->web_listen valid, and allowed with c's TLS material (plain HTTP
 * only on loopback)?  0, or -EINVAL with the message. */
int web_check(const struct server_cfg *c) VR_WUR;
/* (Re)start or stop the web listener per d->cfg (d->lock held); starts
 * the sampler of lag and cycle sizes on first use.  0 or -errno. */
int web_apply(void) VR_WUR;
/* Is the web listener running (d->lock held)? */
bool web_listening(void);
/* Stop the listener and the sampler, waiting for them (no lock held). */
void web_stop(void);
/* The per-VM health and state gauges, appended to /metrics (d->lock not
 * held); caller frees. */
char *web_vm_metrics_text(void);

/* The dashboard's files (daemon/api/web/, embedded by embed-assets.py into
 * web-assets.c at build time). */
struct web_asset {
    const char *path; /* URL path: "/", "/dashboard.js", ... */
    const char *type; /* Content-Type */
    const char *data;
    size_t len;
};
extern const struct web_asset web_assets[];
extern const size_t web_assets_count;

#endif
