/* auth-entry.c: the management API of authorization entries (SPEC §6):
 * auth-entry list, add, set, remove.  The decision itself is
 * core/authz.c.
 *
 * The Replica server accepts a primary (its certificate's name) if an
 * authorization entry matches it — `auth-entry add --primary PATTERN
 * --storage DIR [--trust-group NAME]`, PATTERN an FQDN or "*." and one
 * (vr_fqdn_match: '*' is exactly one first label) — or else if "allow any
 * authenticated server" is on, with the default storage location.  The
 * entry says where that primary's new Replica VMs are stored and their
 * trust group: a Replica VM created under a group refuses primaries of
 * another, and may move between primaries of its own (SPEC §6).  Every
 * request is authorized afresh, so a removed entry refuses that primary's
 * next request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api-int.h"

static json_object *
entry_json(const struct auth_entry *e)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "primary", json_object_new_string(e->pattern));
    json_object_object_add(o, "storage", json_object_new_string(e->storage));
    json_object_object_add(o, "trust_group",
                           json_object_new_string(e->trust_group
                                                      ? e->trust_group : ""));
    json_object_object_add(o, "max_vms",
                           json_object_new_int64(authz_max_vms(e)));
    return o;
}

static bool
group_valid(const char *g)
{
    return g && (*g == '\0' || vr_name_valid(g));
}

int
api_auth_list(struct api_call *call VR_UNUSED, unsigned *status VR_UNUSED,
              json_object **out)
{
    struct auth_entry *e = NULL;
    size_t n = 0;
    pthread_mutex_lock(&actx.d->lock);
    int rc = catalog_auth_list(actx.d->cat, &e, &n);
    pthread_mutex_unlock(&actx.d->lock);
    if (rc < 0)
        return rc;
    json_object *arr = json_object_new_array();
    for (size_t i = 0; i < n; i++)
        json_object_array_add(arr, entry_json(&e[i]));
    auth_entries_free(e, n);
    *out = json_object_new_object();
    json_object_object_add(*out, "entries", arr);
    return 0;
}

/* d->lock held, the entry just changed: the Replica VMs whose primary the
 * catalog's entries now put in a trust group their VM refuses.  NULL if
 * none, else a warning naming them (caller frees). */
static char *
cut_off_warning(const struct auth_entry *ne)
{
    char *list = NULL;
    unsigned n = 0;
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next) {
        const struct repl *r = vm->repl;
        if (vm->mode != VM_MODE_REPLICA || !r || !r->primary_server ||
            !r->trust_group || !*r->trust_group ||
            !vr_fqdn_match(ne->pattern, r->primary_server))
            continue;
        char *storage = NULL, *group = NULL;
        int rc = authz_decide(actx.d->cat, &actx.d->cfg, r->primary_server,
                              &storage, &group);
        bool cut = rc == 0 && !trust_group_admits(r->trust_group, group);
        free(storage);
        free(group);
        if (!cut)
            continue;
        char q[VR_QNAME_MAX];
        char *next = xasprintf("%s%s%s (vm %s, trust group '%s')",
                               list ? list : "", list ? ", " : "",
                               r->primary_server, vr_qname(vm->name, q),
                               r->trust_group);
        free(list);
        list = next;
        if (++n == 16) /* enough to act on; the rest are alike */
            break;
    }
    if (!list)
        return NULL;
    char *w = xasprintf("authorization entry %s: trust group '%s' cuts off "
                        "the primaries already replicating here under "
                        "another group, whose cycles are now refused: %s; "
                        "'vmreplica auth-entry set %s --trust-group GROUP' "
                        "with their group lets them in again",
                        ne->pattern, ne->trust_group, list, ne->pattern);
    free(list);
    return w;
}

/* add (pattern from the body, must not exist) or set (pattern from the
 * path, must exist; absent fields kept). */
static int
put_entry(struct api_call *call, bool add, unsigned *status,
          json_object **out)
{
    const char *pattern = add ? jstr(call->body, "primary") : call->arg;
    const char *storage = jstr(call->body, "storage");
    const char *group = jstr(call->body, "trust_group");
    if (!vr_fqdn_pattern_valid(pattern))
        return vr_err(-EINVAL, "primary %s: expected an FQDN or *.FQDN ('*' "
                      "only as the whole first label)",
                      pattern ? pattern : "(missing)");
    if (storage && storage[0] != '/')
        return vr_err(-EINVAL, "storage %s: expected an absolute directory",
                      storage);
    if (group && !group_valid(group))
        return vr_err(-EINVAL, "trust_group %s: 1-64 of A-Z a-z 0-9 . _ - "
                      "and space", group);
    if (add && !storage)
        return vr_err(-EINVAL, "storage: required (where this primary's "
                      "Replica VMs are kept)");
    json_object *mv = NULL;
    int64_t max_vms = 0;
    if (call->body && json_object_object_get_ex(call->body, "max_vms", &mv) &&
        (!json_object_is_type(mv, json_type_int) ||
         (max_vms = json_object_get_int64(mv)) < 1 ||
         max_vms > AUTH_MAX_MAX_VMS))
        return vr_err(-EINVAL, "max_vms: expected 1..%d", AUTH_MAX_MAX_VMS);
    pthread_mutex_lock(&actx.d->lock);
    struct auth_entry *e = NULL;
    size_t n = 0;
    int rc = catalog_auth_list(actx.d->cat, &e, &n);
    struct auth_entry *found = NULL;
    for (size_t i = 0; rc == 0 && i < n; i++)
        if (strcasecmp(e[i].pattern, pattern) == 0)
            found = &e[i];
    if (rc == 0 && add && found)
        rc = vr_err(-EEXIST, "an authorization entry for %s exists; use "
                    "'vmreplica auth-entry set'", pattern);
    if (rc == 0 && !add && !found)
        rc = vr_err(-ENOENT, "no authorization entry for %s", pattern);
    struct auth_entry ne = {
        .pattern = (char *)(found ? found->pattern : pattern),
        .storage = (char *)(storage ? storage : found ? found->storage : ""),
        .trust_group = (char *)(group ? group
                                : found ? found->trust_group : ""),
        .max_vms = mv ? (unsigned)max_vms : found ? found->max_vms : 0,
    };
    if (rc == 0) {
        rc = io_mkdir_p(ne.storage, 0750);
        if (rc < 0)
            rc = vr_err(rc, "storage %s: %s", ne.storage, strerror(-rc));
    }
    if (rc == 0)
        rc = catalog_auth_put(actx.d->cat, &ne);
    if (rc == 0) {
        event_add(actx.d->cat, "info", NULL,
                  "authorization entry %s %s: storage %s, trust "
                  "group '%s', at most %u Replica VMs",
                  ne.pattern, add ? "added" : "changed", ne.storage,
                  ne.trust_group, authz_max_vms(&ne));
        *out = entry_json(&ne);
        if (add)
            *status = 201;
        CLEANUP_FREE char *w = group ? cut_off_warning(&ne) : NULL;
        if (w) {
            event_add(actx.d->cat, "warning", NULL, "%s", w);
            json_object_object_add(*out, "warning",
                                   json_object_new_string(w));
        }
    }
    auth_entries_free(e, n);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

int
api_auth_add(struct api_call *call, unsigned *status, json_object **out)
{
    return put_entry(call, true, status, out);
}

int
api_auth_set(struct api_call *call, unsigned *status, json_object **out)
{
    return put_entry(call, false, status, out);
}

int
api_auth_remove(struct api_call *call, unsigned *status VR_UNUSED,
                json_object **out)
{
    pthread_mutex_lock(&actx.d->lock);
    int rc = catalog_auth_delete(actx.d->cat, call->arg);
    if (rc == 0) {
        event_add(actx.d->cat, "info", NULL, "authorization entry %s removed",
                  call->arg);
        *out = json_object_new_object();
        json_object_object_add(*out, "removed",
                               json_object_new_string(call->arg));
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}
