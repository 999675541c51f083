/* api.h: the management API (daemon/api/, libvrd_api.a): the socket, the
 * route table and one file of handlers per CLI noun.  What main.c uses of
 * it. */
#ifndef VR_API_H
#define VR_API_H

#include "core/state.h"
#include "vr.h"

/* Before anything else of this layer: the daemon's state it works on. */
void api_init(struct daemon *d);
/* Listen on the management socket sock_path (d->lock held). */
int api_start(const char *sock_path) VR_WUR;
void api_stop(void);
/* Remove sock_path only if it is still the socket api_start bound (same
 * device and inode): never another daemon's. */
void api_unlink_socket(const char *sock_path);
/* After the listeners changed (start-up, server set), d->lock held: if the
 * firewall is enabled and its table does not hold the running listeners'
 * ports, rewrite it.  A failure is an error event, kept for
 * firewall_error(). */
void firewall_sync(void);

#endif
