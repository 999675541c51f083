/* firewall.c: `server firewall enable|disable|show` — the nftables rules
 * that let primaries reach the Replica server's listener ports (the
 * "Hyper-V Replica HTTP(S) Listener" rules of Windows; docs/security.md).
 *
 * vmreplicad owns one table, `inet vmreplica`, and nothing else of the
 * host's ruleset.  While the setting is off — the default — it never runs
 * nft at all.  While it is on, the table holds a base chain on the input
 * hook at priority filter - 10 (before the usual filter chains) whose one
 * rule marks TCP packets to the ports of the running listeners with
 * FIREWALL_MARK and accepts them; with no listener running the chain is
 * empty.  An accept only ends its own base chain: a drop in any other chain
 * on the hook still drops the packet, so a host whose own ruleset drops by
 * default needs one rule of its own, `meta mark 0x766d72 accept`, which the
 * mark makes possible without naming ports that `server set` may change.
 *
 * Every change is one nft transaction (`nft -f -`, proc/nft.c): create
 * the table if it is missing, delete it, create it anew — so applying
 * twice gives the same table, and a failure leaves the old one as it was.
 *
 * State (fw below) is guarded by d->lock, like struct daemon.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api-int.h"
#include "proc/nft.h"

static const char hint[] =
    "an accept in table " FW_TABLE " cannot override a drop in another "
    "table (a drop anywhere on the input hook is final): if this host's "
    "own ruleset drops by default, add this rule to its input chain (at "
    "priority filter or later): meta mark 0x766d72 accept";

static struct {
    bool written; /* the table holds ports[] (this process wrote it) */
    unsigned ports[2];
    unsigned nports;
    char *error; /* firewall_sync's last failure, or NULL */
} fw;

/* --- the table ------------------------------------------------------------ */

/* The ports of the listeners that run now (d->lock held): the rule follows
 * what accepts connections, not what is configured. */
static unsigned
listener_ports(unsigned ports[2])
{
    unsigned n = 0;
    ports[0] = ports[1] = 0;
    if (actx.d->listener)
        ports[n++] = actx.d->cfg.cert_port;
    if (actx.d->krb_listener)
        ports[n++] = actx.d->cfg.krb_port;
    return n;
}

/* "443, 80", or "none: no listener runs". */
static void
ports_text(const unsigned *ports, unsigned n, char buf[64])
{
    if (n == 0)
        snprintf(buf, 64, "none: no listener runs");
    else if (n == 1)
        snprintf(buf, 64, "%u", ports[0]);
    else
        snprintf(buf, 64, "%u, %u", ports[0], ports[1]);
}

/* Make the host's table match d->cfg.firewall_enabled and the running
 * listeners (d->lock held).  A failure leaves the table as it was. */
static int
firewall_apply(void)
{
    bool on = actx.d->cfg.firewall_enabled;
    unsigned ports[2];
    unsigned n = listener_ports(ports);
    CLEANUP_FREE char *script = nft_table_script(on, ports, n);
    static const char *const args[] = { "-f", "-", NULL };
    int rc = nft_run(args, script, NULL);
    if (rc < 0)
        return rc;
    fw.written = on;
    fw.nports = on ? n : 0;
    memcpy(fw.ports, ports, sizeof ports);
    free(fw.error);
    fw.error = NULL;
    return 0;
}

void
firewall_sync(void)
{
    if (!actx.d->cfg.firewall_enabled)
        return;
    unsigned ports[2];
    unsigned n = listener_ports(ports);
    if (fw.written && fw.nports == n &&
        memcmp(fw.ports, ports, n * sizeof *ports) == 0)
        return;
    char list[64];
    ports_text(ports, n, list);
    if (firewall_apply() < 0) {
        free(fw.error);
        fw.error = xstrdup(vr_errmsg());
        event_add(actx.d->cat, "error", NULL, "%s", fw.error);
        return;
    }
    event_add(actx.d->cat, "info", NULL, "firewall rules applied (ports %s)",
              list);
}

const char *
firewall_error(void)
{
    return actx.d->cfg.firewall_enabled ? fw.error : NULL;
}

/* --- API ------------------------------------------------------------------ */

/* GET /v1/server/firewall's body.  d->lock held on entry; it is dropped
 * while nft lists the table and held again on return. */
static json_object *
firewall_json(void)
{
    bool on = actx.d->cfg.firewall_enabled;
    unsigned ports[2];
    unsigned n = listener_ports(ports);
    CLEANUP_FREE char *error = fw.error && on ? xstrdup(fw.error) : NULL;
    CLEANUP_FREE char *table = NULL;
    if (on) {
        /* Read only, and nft may take a moment: not under the lock. */
        pthread_mutex_unlock(&actx.d->lock);
        static const char *const args[] = { "list", "table", "inet",
                                            "vmreplica", NULL };
        if (nft_run(args, NULL, &table) < 0 && !error)
            error = xstrdup(vr_errmsg());
        pthread_mutex_lock(&actx.d->lock);
    }
    json_object *o = json_object_new_object();
    json_object_object_add(o, "enabled", json_object_new_boolean(on));
    json_object *arr = json_object_new_array();
    for (unsigned i = 0; i < n; i++)
        json_object_array_add(arr, json_object_new_int((int)ports[i]));
    json_object_object_add(o, "ports", arr);
    json_object_object_add(o, "table_name", json_object_new_string(FW_TABLE));
    json_object_object_add(o, "table",
                           table ? json_object_new_string(table) : NULL);
    char mark[16];
    snprintf(mark, sizeof mark, "0x%x", FIREWALL_MARK);
    json_object_object_add(o, "mark", json_object_new_string(mark));
    json_object_object_add(o, "hint", json_object_new_string(hint));
    json_object_object_add(o, "error",
                           error ? json_object_new_string(error) : NULL);
    return o;
}

int
api_firewall_show(struct api_call *call VR_UNUSED, unsigned *status VR_UNUSED,
                  json_object **out)
{
    pthread_mutex_lock(&actx.d->lock);
    *out = firewall_json();
    pthread_mutex_unlock(&actx.d->lock);
    return 0;
}

int
api_firewall_set(struct api_call *call, unsigned *status VR_UNUSED,
                 json_object **out)
{
    json_object *v;
    if (!json_object_object_get_ex(call->body, "enabled", &v) ||
        !json_object_is_type(v, json_type_boolean))
        return vr_err(-EINVAL, "firewall: \"enabled\": expected true or "
                               "false");
    bool want = json_object_get_boolean(v);
    pthread_mutex_lock(&actx.d->lock);
    bool old = actx.d->cfg.firewall_enabled;
    actx.d->cfg.firewall_enabled = want;
    int rc = 0;
    bool changed = false;
    /* Disabled stays disabled without running nft: vmreplica does not
     * touch the host's firewall unless asked to. */
    if (want || old) {
        rc = firewall_apply();
        changed = rc == 0;
    }
    if (rc == 0)
        rc = catalog_save_server(actx.d->cat, &actx.d->cfg);
    if (rc < 0) {
        char saved[1024];
        snprintf(saved, sizeof saved, "%s", vr_errmsg());
        actx.d->cfg.firewall_enabled = old;
        if (changed && want != old) {
            VR_IGNORE(firewall_apply()); /* put the old table back */
        } else if (old && want && !changed) {
            /* Enabled, and its table could not be written again. */
            free(fw.error);
            fw.error = xstrdup(saved);
        }
        vr_err(rc, "%s", saved);
    } else if (want) {
        char list[64];
        ports_text(fw.ports, fw.nports, list);
        event_add(actx.d->cat, "info", NULL, "firewall enabled (ports %s)",
                  list);
    } else if (old) {
        event_add(actx.d->cat, "info", NULL, "firewall disabled");
    }
    if (rc == 0)
        *out = firewall_json();
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}
