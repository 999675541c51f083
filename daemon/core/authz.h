/* authz.h: may this primary replicate here, and into what (authz.c)? */
#ifndef VR_AUTHZ_H
#define VR_AUTHZ_H

#include "catalog.h"
#include "state.h"
#include "vr.h"

/* The daemon's lock held.  May peer (its certificate name) replicate
 * here?  The most specific matching entry (an exact name before a
 * wildcard) gives *storage and *group (caller frees); else "allow any"
 * gives the default storage and group ""; else -EPERM with the reason. */
int authz_decide(struct catalog *cat, const struct server_cfg *cfg,
                 const char *peer, char **storage, char **group) VR_WUR;
/* The daemon's lock held.  May peer create one more Replica VM here?  The
 * Replica VMs of vms whose owner the same entry admits (or "allow any",
 * counted as one entry) are at most its max_vms: 0, or -EPERM with the
 * reason. */
int authz_check_vm_cap(struct catalog *cat, const struct vm *vms,
                       const char *peer) VR_WUR;
/* The Replica VMs entry e's primaries may own (its max_vms, or the default;
 * e NULL: "allow any"). */
unsigned authz_max_vms(const struct auth_entry *e);

#endif
