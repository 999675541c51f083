/* authz.c: the authorization decision of the Replica server (SPEC §6) —
 * which authorization entry admits a primary (the most specific match), or
 * "allow any"; where its Replica VMs are stored and their trust group; and
 * whether it may create one more.  Pure of the network and the API: the
 * catalog and the settings are passed in. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "authz.h"

/* The entry of e[0..n) that admits peer: the most specific match, or
 * NULL. */
static const struct auth_entry *
best_entry(const struct auth_entry *e, size_t n, const char *peer)
{
    const struct auth_entry *best = NULL;
    for (size_t i = 0; i < n; i++) {
        if (!vr_fqdn_match(e[i].pattern, peer))
            continue;
        /* An exact name is more specific than a wildcard. */
        if (!best || (best->pattern[0] == '*' && e[i].pattern[0] != '*'))
            best = &e[i];
    }
    return best;
}

unsigned
authz_max_vms(const struct auth_entry *e)
{
    return e && e->max_vms ? e->max_vms : AUTH_DEFAULT_MAX_VMS;
}

int
authz_decide(struct catalog *cat, const struct server_cfg *cfg,
             const char *peer, char **storage, char **group)
{
    *storage = *group = NULL;
    struct auth_entry *e = NULL;
    size_t n = 0;
    int rc = catalog_auth_list(cat, &e, &n);
    if (rc < 0)
        return rc;
    const struct auth_entry *best = best_entry(e, n, peer);
    if (best) {
        *storage = xstrdup(best->storage);
        *group = xstrdup(best->trust_group ? best->trust_group : "");
    } else if (cfg->allow_any && cfg->default_storage) {
        *storage = xstrdup(cfg->default_storage);
        *group = xstrdup("");
    } else {
        rc = vr_err(-EPERM, "primary %s is not authorized on this server "
                    "(no authorization entry matches it%s)", peer,
                    cfg->allow_any ? "" : " and any server is not allowed");
    }
    auth_entries_free(e, n);
    return rc;
}

/* Guarantees that no authorization entry (nor "allow any") lets its
 * primaries own more than its max_vms Replica VMs: each Replica VM counts
 * for the entry that admits its owner now. */
int
authz_check_vm_cap(struct catalog *cat, const struct vm *vms,
                   const char *peer)
{
    struct auth_entry *e = NULL;
    size_t n = 0;
    int rc = catalog_auth_list(cat, &e, &n);
    if (rc < 0)
        return rc;
    const struct auth_entry *best = best_entry(e, n, peer);
    unsigned cap = authz_max_vms(best), have = 0;
    for (const struct vm *vm = vms; vm; vm = vm->next)
        if (vm->mode == VM_MODE_REPLICA && vm->owner &&
            best_entry(e, n, vm->owner) == best)
            have++;
    if (have >= cap)
        rc = vr_err(-EPERM, "register: %s may not create another Replica VM "
                    "here: %s%s allows %u (max-vms), and %u exist", peer,
                    best ? "authorization entry " : "'allow any'",
                    best ? best->pattern : "", cap, have);
    auth_entries_free(e, n);
    return rc;
}
