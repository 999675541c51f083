/* auth.c: the management API of authorization entries (SPEC §6): auth-entry
 * list, add, set, remove, and server test-connection.  The decision itself
 * is core/authz.c.
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
#include "daemon.h"

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
    pthread_mutex_lock(&D->lock);
    int rc = catalog_auth_list(D->cat, &e, &n);
    pthread_mutex_unlock(&D->lock);
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
    pthread_mutex_lock(&D->lock);
    struct auth_entry *e = NULL;
    size_t n = 0;
    int rc = catalog_auth_list(D->cat, &e, &n);
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
        rc = catalog_auth_put(D->cat, &ne);
    if (rc == 0) {
        event_add(D->cat, "info", NULL,
                  "authorization entry %s %s: storage %s, trust "
                  "group '%s', at most %u Replica VMs",
                  ne.pattern, add ? "added" : "changed", ne.storage,
                  ne.trust_group, authz_max_vms(&ne));
        *out = entry_json(&ne);
        if (add)
            *status = 201;
    }
    auth_entries_free(e, n);
    pthread_mutex_unlock(&D->lock);
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
    pthread_mutex_lock(&D->lock);
    int rc = catalog_auth_delete(D->cat, call->arg);
    if (rc == 0) {
        event_add(D->cat, "info", NULL, "authorization entry %s removed",
                  call->arg);
        *out = json_object_new_object();
        json_object_object_add(*out, "removed",
                               json_object_new_string(call->arg));
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* --- server test-connection ----------------------------------------------- */

/* Test-VMReplicationConnection: reach a Replica server the way replication
 * would (same authentication, same client code) and ask it whether it
 * would accept this host.  Each failure says at which step it happened. */
int
api_test_connection(struct api_call *call, unsigned *status VR_UNUSED,
                    json_object **out)
{
    json_object *b = call->body;
    const char *server = jstr(b, "replica_server");
    const char *auth = jstr(b, "auth");
    const char *addr = jstr(b, "connect_address");
    if (!server || !repl_server_name_valid(server))
        return vr_err(-EINVAL, "replica_server: expected FQDN[:PORT]");
    int rc = auth ? repl_auth_check(auth) : 0;
    if (rc < 0)
        return rc;
    /* A replication of a moment, as `replication enable` would make it. */
    struct repl r = { .auth = (char *)(auth ? auth : "certificate"),
                      .connect_address = (char *)(addr && *addr ? addr
                                                                : NULL),
                      .epoch = 1, .point_interval_s = 3600 };
    CLEANUP_FREE char *with_port = repl_server_with_port(server, &r);
    r.replica_server = with_port;
    struct peer p = { 0 };
    pthread_mutex_lock(&D->lock);
    rc = repl_check_identity(&D->cfg, &r);
    if (rc == 0)
        peer_fill(&p, &r);
    pthread_mutex_unlock(&D->lock);
    json_object *resp = NULL;
    if (rc == 0) {
        rc = peer_call(&p, "GET", "/r1/test", NULL, -1, 0, false, &resp);
        if (rc < 0) {
            const char *step =
                rc == -ECONNREFUSED || rc == -ETIMEDOUT ||
                        rc == -EHOSTUNREACH || rc == -ECONNRESET
                    ? "cannot reach it"
                : rc == -ETIME ? "Kerberos: clocks differ"
                : rc == -EPERM ? "it does not accept this host"
                : rc == -EACCES ? "authentication failed"
                                : "it answered with an error";
            rc = vr_err(rc, "test-connection %s (%s auth): %s: %s", p.server,
                        r.auth, step, vr_errmsg());
        }
    }
    if (rc == 0) {
        *out = resp;
        json_object_object_add(*out, "replica_server",
                               json_object_new_string(p.server));
        json_object_object_add(*out, "auth", json_object_new_string(r.auth));
    }
    peer_fini(&p);
    return rc;
}
