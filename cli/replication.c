/* replication.c: "vmreplica replication ..." — enable, set, show, list,
 * measure, suspend, resume, reset-stats and remove the replication of a VM
 * (/v1/vms/VM/replication..., /v1/replications), the Enable-, Set-, Get-,
 * Measure-, Suspend-, Resume- and Remove-VMReplication of Hyper-V.
 */
#include <arpa/inet.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "cli.h"

/* SPEC §9: the states a VM's replication can be in, on either side. */
static const char *const states[] = {
    "Disabled",
    "ReadyForInitialReplication",
    "InitialReplicationInProgress",
    "WaitingForInitialReplication",
    "Replicating",
    "Suspended",
    "Error",
    "WaitingForStartResynchronize",
    "Resynchronizing",
    "ResynchronizeSuspended",
    "PreparedForFailover",
    "FailOverWaitingCompletion",
    "FailedOver",
    "TestFailoverInProgress",
};
static const char *const healths[] = { "Normal", "Warning", "Critical" };

static const char *
canonical(const char *s, const char *const *set, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(s, set[i]) == 0)
            return set[i];
    }
    return NULL;
}

/* health_details: strings, or objects with a "message". */
static void
print_details(json_object *r, const char *label)
{
    json_object *d = NULL;
    if (!json_object_object_get_ex(r, "health_details", &d) ||
        !json_object_is_type(d, json_type_array) ||
        json_object_array_length(d) == 0) {
        cli_kv(label, "-");
        return;
    }
    for (size_t i = 0; i < json_object_array_length(d); i++) {
        json_object *e = json_object_array_get_idx(d, i);
        const char *msg = json_object_is_type(e, json_type_object)
                              ? cli_str(e, "message")
                              : json_object_get_string(e);
        cli_kv(i == 0 ? label : "", "%s", msg);
    }
}

static const char *
or_dash(json_object *o, const char *key)
{
    return cli_has(o, key) && *cli_str(o, key) ? cli_str(o, key) : "-";
}

/* The recovery history settings (SPEC §7): how many points besides the
 * latest, at what interval, and which are application-consistent. */
static void
print_history(json_object *r)
{
    char iv[32];
    int64_t n = cli_int(r, "recovery_history");
    int64_t every = cli_int(r, "app_consistent_every");
    int64_t secs = cli_int(r, "point_interval");
    cli_fmt_duration((uint64_t)(secs > 0 ? secs : 3600), iv, sizeof iv);
    if (n > 0)
        cli_kv("Recovery history", "%" PRId64 " point%s besides the latest, "
               "one per %s", n, n == 1 ? "" : "s", iv);
    else
        cli_kv("Recovery history", "the latest point only");
    if (every > 0)
        cli_kv("App-consistent points", "every %" PRId64 " x %s "
               "(guest agent fsfreeze)", every, iv);
    else
        cli_kv("App-consistent points", "off");
}

void
cli_print_replication(json_object *r)
{
    char buf[32];
    bool replica = strcmp(cli_str(r, "mode"), "replica") == 0;
    cli_kv("VM", "%s", cli_str(r, "vm"));
    cli_kv("UUID", "%s", cli_str(r, "uuid"));
    cli_kv("Mode", "%s", cli_str(r, "mode"));
    cli_kv("State", "%s", cli_str(r, "state"));
    cli_kv("Health", "%s", cli_str(r, "health"));
    print_details(r, "Health details");
    if (replica)
        cli_kv("Primary server", "%s", or_dash(r, "primary_server"));
    else
        cli_kv("Replica server", "%s", or_dash(r, "replica_server"));
    if (cli_has(r, "connect_address"))
        cli_kv("Connect address", "%s", or_dash(r, "connect_address"));
    cli_kv("Authentication", "%s", or_dash(r, "auth"));
    cli_kv("Frequency", "%s",
           cli_fmt_duration((uint64_t)cli_int(r, "frequency"), buf,
                            sizeof buf));
    cli_kv("Compression", "%s", cli_bool(r, "compression") ? "on" : "off");
    print_history(r);
    if (!replica)
        cli_kv("Auto-resync", "%s", cli_bool(r, "auto_resync") ? "on" : "off");
    cli_kv("Epoch", "%" PRId64, cli_int(r, "epoch"));
    cli_kv("Last cycle", "%" PRId64, cli_int(r, "last_cycle"));
    cli_kv("Applied cycle", "%" PRId64, cli_int(r, "applied_cycle"));
    cli_kv("Last replication time", "%s", or_dash(r, "last_replication_time"));
}

static int
finish(struct cli *c, json_object *out)
{
    if (c->json)
        cli_print_json(out);
    else if (out)
        cli_print_replication(out);
    json_object_put(out);
    return CLI_OK;
}

/* --- enable / set ------------------------------------------------------ */

struct repl_opts {
    const char *server, *address, *auth, *frequency, *compression;
    const char *history, *interval, *app, *kencrypt, *budget, *autoresync;
    const char *window;
};

/* Validate the options shared by enable and set into body. */
static int
fill_body(const struct cli_cmd *cmd, const struct repl_opts *o,
          json_object *body)
{
    if (o->server) {
        const char *colon = strrchr(o->server, ':');
        if (o->server[0] == ':' || o->server[0] == '-')
            return cli_usage_error(cmd, "invalid --replica-server '%s': "
                                   "expected FQDN[:PORT]", o->server);
        long port;
        if (colon && cli_parse_port(colon + 1, &port) < 0)
            return cli_usage_error(cmd, "invalid port in "
                                   "--replica-server '%s'", o->server);
        json_object_object_add(body, "replica_server",
                               json_object_new_string(o->server));
    }
    if (o->address) {
        unsigned char tmp[16];
        if (inet_pton(AF_INET, o->address, tmp) != 1 &&
            inet_pton(AF_INET6, o->address, tmp) != 1)
            return cli_usage_error(cmd, "invalid --connect-address '%s': "
                                   "expected an IPv4 or IPv6 address",
                                   o->address);
        json_object_object_add(body, "connect_address",
                               json_object_new_string(o->address));
    }
    if (o->auth) {
        if (strcmp(o->auth, "certificate") != 0 &&
            strcmp(o->auth, "kerberos") != 0)
            return cli_usage_error(cmd, "invalid --auth '%s': expected "
                                   "certificate or kerberos", o->auth);
        json_object_object_add(body, "auth",
                               json_object_new_string(o->auth));
    }
    if (o->kencrypt) {
        if (strcmp(o->kencrypt, "on") != 0 && strcmp(o->kencrypt, "off") != 0)
            return cli_usage_error(cmd, "invalid --kerberos-encrypt '%s': "
                                   "expected on or off", o->kencrypt);
        json_object_object_add(
            body, "kerberos_encrypt",
            json_object_new_boolean(strcmp(o->kencrypt, "on") == 0));
    }
    if (o->frequency) {
        uint64_t s;
        if (vr_parse_duration(o->frequency, &s) < 0 || s < 1 ||
            s > INT32_MAX)
            return cli_usage_error(cmd, "invalid --frequency '%s': expected "
                                   "30s, 5m, 15m or a whole number of "
                                   "seconds >= 1", o->frequency);
        json_object_object_add(body, "frequency",
                               json_object_new_int64((int64_t)s));
    }
    if (o->compression) {
        bool on;
        if (strcmp(o->compression, "on") == 0)
            on = true;
        else if (strcmp(o->compression, "off") == 0)
            on = false;
        else
            return cli_usage_error(cmd, "invalid --compression '%s': "
                                   "expected on or off", o->compression);
        json_object_object_add(body, "compression",
                               json_object_new_boolean(on));
    }
    if (o->history) {
        char *end;
        errno = 0;
        long n = strtol(o->history, &end, 10);
        if (errno || *end || end == o->history || n < 0 || n > 720)
            return cli_usage_error(cmd, "invalid --recovery-history '%s': "
                                   "expected 0 .. 720", o->history);
        json_object_object_add(body, "recovery_history",
                               json_object_new_int((int)n));
    }
    if (o->app) {
        /* K, or "Kh": every K-th point interval (hour). */
        char *end;
        errno = 0;
        long k = strtol(o->app, &end, 10);
        if (*end == 'h' && end[1] == '\0')
            end++;
        if (errno || *end || end == o->app || k < 0 || k > 720)
            return cli_usage_error(cmd, "invalid --app-consistent-every "
                                   "'%s': expected K or Kh, 0 .. 720 (0: "
                                   "off)", o->app);
        json_object_object_add(body, "app_consistent_every",
                               json_object_new_int((int)k));
    }
    if (o->autoresync) {
        if (strcmp(o->autoresync, "on") != 0 &&
            strcmp(o->autoresync, "off") != 0)
            return cli_usage_error(cmd, "invalid --auto-resync '%s': "
                                   "expected on or off", o->autoresync);
        json_object_object_add(
            body, "auto_resync",
            json_object_new_boolean(strcmp(o->autoresync, "on") == 0));
    }
    if (o->window) {
        /* The daemon checks HH:MM-HH:MM ("" or "any": no window). */
        const char *w = strcmp(o->window, "any") == 0 ? "" : o->window;
        json_object_object_add(body, "resync_window",
                               json_object_new_string(w));
    }
    if (o->budget) {
        uint64_t b;
        if (vr_parse_size(o->budget, &b) < 0 ||
            (b != 0 && b < (1u << 20)) || b > (UINT64_MAX >> 2))
            return cli_usage_error(cmd, "invalid --log-budget '%s': "
                                   "expected a size of at least 1M (0: half "
                                   "the disks' size)", o->budget);
        json_object_object_add(body, "log_budget",
                               json_object_new_int64((int64_t)b));
    }
    if (o->interval) {
        uint64_t s;
        if (vr_parse_duration(o->interval, &s) < 0 || s < 1 || s > 86400)
            return cli_usage_error(cmd, "invalid --point-interval '%s': "
                                   "expected 1s .. 24h", o->interval);
        json_object_object_add(body, "point_interval",
                               json_object_new_int64((int64_t)s));
    }
    return CLI_OK;
}

int
cmd_repl_enable(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv)
{
    struct repl_opts o = { 0 };
    const struct cli_opt opts[] = {
        { "replica-server", CLI_OPT_STR, &o.server },
        { "connect-address", CLI_OPT_STR, &o.address },
        { "auth", CLI_OPT_STR, &o.auth },
        { "frequency", CLI_OPT_STR, &o.frequency },
        { "compression", CLI_OPT_STR, &o.compression },
        { "recovery-history", CLI_OPT_STR, &o.history },
        { "point-interval", CLI_OPT_STR, &o.interval },
        { "app-consistent-every", CLI_OPT_STR, &o.app },
        { "kerberos-encrypt", CLI_OPT_STR, &o.kencrypt },
        { "log-budget", CLI_OPT_STR, &o.budget },
        { "auto-resync", CLI_OPT_STR, &o.autoresync },
        { "resync-window", CLI_OPT_STR, &o.window },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/replication", &path,
                         &name);
    if (rc)
        return rc;
    if (!o.server)
        return cli_usage_error(cmd, "missing --replica-server FQDN[:PORT]");
    if (!o.auth)
        return cli_usage_error(cmd, "missing --auth certificate|kerberos");
    json_object *body = json_object_new_object();
    if ((rc = fill_body(cmd, &o, body))) {
        json_object_put(body);
        return rc;
    }
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    return finish(c, out);
}

int
cmd_repl_set(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    struct repl_opts o = { 0 };
    const struct cli_opt opts[] = {
        { "connect-address", CLI_OPT_STR, &o.address },
        { "frequency", CLI_OPT_STR, &o.frequency },
        { "compression", CLI_OPT_STR, &o.compression },
        { "recovery-history", CLI_OPT_STR, &o.history },
        { "point-interval", CLI_OPT_STR, &o.interval },
        { "app-consistent-every", CLI_OPT_STR, &o.app },
        { "kerberos-encrypt", CLI_OPT_STR, &o.kencrypt },
        { "log-budget", CLI_OPT_STR, &o.budget },
        { "auto-resync", CLI_OPT_STR, &o.autoresync },
        { "resync-window", CLI_OPT_STR, &o.window },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/replication", &path,
                         &name);
    if (rc)
        return rc;
    json_object *body = json_object_new_object();
    if ((rc = fill_body(cmd, &o, body))) {
        json_object_put(body);
        return rc;
    }
    if (json_object_object_length(body) == 0) {
        json_object_put(body);
        return cli_usage_error(cmd, "nothing to set");
    }
    json_object *out;
    rc = cli_call(c, "PATCH", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    return finish(c, out);
}

/* --- show / list ------------------------------------------------------- */

int
cmd_repl_show(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, NULL, "/replication", &path,
                         &name);
    if (rc)
        return rc;
    json_object *out;
    if ((rc = cli_call(c, "GET", path, NULL, &out)))
        return rc;
    return finish(c, out);
}

int
cmd_repl_list(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    const char *state = NULL, *health = NULL, *mode = NULL;
    const struct cli_opt opts[] = {
        { "state", CLI_OPT_STR, &state },
        { "health", CLI_OPT_STR, &health },
        { "mode", CLI_OPT_STR, &mode },
        { NULL, 0, NULL },
    };
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, opts, pos, 0, &npos);
    if (rc)
        return rc;
    const char *st = NULL, *he = NULL;
    if (state && !(st = canonical(state, states, ARRAY_SIZE(states))))
        return cli_usage_error(cmd, "invalid --state '%s': expected one of "
                               "the states in vmreplica(1), e.g. "
                               "Replicating", state);
    if (health && !(he = canonical(health, healths, ARRAY_SIZE(healths))))
        return cli_usage_error(cmd, "invalid --health '%s': expected "
                               "Normal, Warning or Critical", health);
    if (mode && strcmp(mode, "primary") != 0 && strcmp(mode, "replica") != 0 &&
        strcmp(mode, "test") != 0)
        return cli_usage_error(cmd, "invalid --mode '%s': expected primary, "
                               "replica or test", mode);

    char query[256] = "";
    size_t qn = 0;
    const char *keys[] = { "state", "health", "mode" };
    const char *vals[] = { st, he, mode };
    for (unsigned i = 0; i < 3; i++) {
        if (vals[i])
            qn += (size_t)snprintf(query + qn, sizeof query - qn, "%c%s=%s",
                                   qn ? '&' : '?', keys[i], vals[i]);
    }
    CLEANUP_FREE char *path = xasprintf("/v1/replications%s", query);
    json_object *out;
    if ((rc = cli_call(c, "GET", path, NULL, &out)))
        return rc;
    if (c->json) {
        cli_print_json(out);
        json_object_put(out);
        return CLI_OK;
    }
    static const char *const hdr[] = { "VM",        "MODE",      "STATE",
                                       "HEALTH",    "PEER",      "FREQUENCY",
                                       "LAST REPLICATION" };
    struct cli_table *t = cli_table_new(7, hdr);
    json_object *list = NULL;
    json_object_object_get_ex(out, "replications", &list);
    size_t n = list && json_object_is_type(list, json_type_array)
                   ? json_object_array_length(list)
                   : 0;
    for (size_t i = 0; i < n; i++) {
        json_object *r = json_object_array_get_idx(list, i);
        char freq[32];
        bool replica = strcmp(cli_str(r, "mode"), "replica") == 0;
        const char *row[7] = {
            cli_str(r, "vm"),
            cli_str(r, "mode"),
            cli_str(r, "state"),
            cli_str(r, "health"),
            or_dash(r, replica ? "primary_server" : "replica_server"),
            cli_fmt_duration((uint64_t)cli_int(r, "frequency"), freq,
                             sizeof freq),
            or_dash(r, "last_replication_time"),
        };
        cli_table_row(t, row);
    }
    cli_table_print(t, 0);
    cli_table_free(t);
    json_object_put(out);
    return CLI_OK;
}

/* --- points ------------------------------------------------------------ */

int
cmd_points_list(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv)
{
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, NULL, "/points", &path, &name);
    if (rc)
        return rc;
    json_object *resp, *arr = NULL;
    if ((rc = cli_call(c, "GET", path, NULL, &resp)))
        return rc;
    if (c->json) {
        cli_print_json(resp);
        json_object_put(resp);
        return CLI_OK;
    }
    if (!json_object_object_get_ex(resp, "points", &arr) ||
        !json_object_is_type(arr, json_type_array)) {
        json_object_put(resp);
        return cli_error("GET %s: no points in the response", path);
    }
    printf("%-8s %-20s %-22s %-12s %s\n", "ID", "CUT (UTC)", "KIND",
           "UNDO SIZE", "NOTE");
    size_t n = json_object_array_length(arr);
    for (size_t i = 0; i < n; i++) {
        json_object *p = json_object_array_get_idx(arr, i);
        char when[32], size[32];
        time_t t = (time_t)(cli_int(p, "time_ms") / 1000);
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
        cli_fmt_size((uint64_t)cli_int(p, "undo_bytes"), size, sizeof size);
        const char *note = cli_bool(p, "latest")   ? "latest"
                           : cli_bool(p, "recent") ? "recent (every cycle)"
                                                   : "hourly";
        printf("%-8" PRId64 " %-20s %-22s %-12s %s\n", cli_int(p, "id"), when,
               cli_str(p, "kind"), size, note);
    }
    json_object_put(resp);
    return CLI_OK;
}

/* --- failover ---------------------------------------------------------- */

/* A planned failover's answer: does `replication reverse` need
 * --replica-server (no listener remembered for the old primary)? */
static bool
reverse_server_hint(json_object *out)
{
    return !cli_str(out, "reverse_replica_server")[0] &&
           cli_str(out, "old_primary")[0];
}

static int
failover_call(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv,
              const char *verb)
{
    bool test = false, force = false;
    const char *point = NULL;
    bool start = strcmp(verb, "start") == 0;
    const struct cli_opt opts_start[] = {
        { "test", CLI_OPT_FLAG, &test },
        { "point", CLI_OPT_STR, &point },
        { "force", CLI_OPT_FLAG, &force },
        { NULL, 0, NULL },
    };
    const struct cli_opt opts_stop[] = {
        { "test", CLI_OPT_FLAG, &test },
        { NULL, 0, NULL },
    };
    const struct cli_opt opts_force[] = {
        { "force", CLI_OPT_FLAG, &force },
        { NULL, 0, NULL },
    };
    const struct cli_opt opts_none[] = { { NULL, 0, NULL } };
    bool complete = strcmp(verb, "complete") == 0;
    const struct cli_opt *opts = start                         ? opts_start
                                 : strcmp(verb, "stop") == 0 ? opts_stop
                                 : complete                  ? opts_force
                                                             : opts_none;
    CLEANUP_FREE char *path = NULL;
    const char *name;
    CLEANUP_FREE char *suffix = xasprintf("/failover/%s", verb);
    int rc = cli_vm_path(c, cmd, argc, argv, opts, suffix, &path, &name);
    if (rc)
        return rc;
    if (test && force)
        return cli_usage_error(cmd, "--force is for a failover, not a test "
                               "failover");
    json_object *body = json_object_new_object();
    json_object_object_add(body, "test", json_object_new_boolean(test));
    if (force)
        json_object_object_add(body, "force", json_object_new_boolean(true));
    if (point) {
        char *end;
        errno = 0;
        long long id = strtoll(point, &end, 10);
        if (errno || *end || end == point || id < 1) {
            json_object_put(body);
            return cli_usage_error(cmd, "invalid --point '%s': expected a "
                                   "point id from 'points list'", point);
        }
        json_object_object_add(body, "point", json_object_new_int64(id));
    }
    CLEANUP_FREE char *note =
        complete && !force
            ? xasprintf("waiting for the failed-over guest of %s to shut "
                        "down: it was sent the ACPI power button and is "
                        "killed if it still runs after 30 s; 'vmreplica "
                        "failover complete %s --force' kills it at once",
                        cli_q(name), cli_q(name))
            : NULL;
    c->slow_note = note;
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    c->slow_note = NULL;
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else if (strcmp(verb, "prepare") == 0)
        printf("%s: prepared for failover: every change is on the Replica "
               "server (cycle %" PRId64 ")\n", name,
               cli_int(out, "prepared_cycle"));
    else if (cli_has(out, "planned"))
        printf("%s: planned failover at cycle %" PRId64 " (%s, epoch %"
               PRId64 "); to replicate back, run 'vmreplica replication "
               "reverse %s%s%s%s'%s\n", cli_str(out, "vm"),
               cli_int(out, "point"), cli_str(out, "state"),
               cli_int(out, "epoch"), cli_str(out, "vm"),
               reverse_server_hint(out) ? " --replica-server " : "",
               reverse_server_hint(out) ? cli_str(out, "old_primary") : "",
               reverse_server_hint(out) ? ":PORT" : "",
               reverse_server_hint(out)
                   ? " (PORT: the old primary's Replica server listener)"
                   : "");
    else if (!cli_has(out, "point"))
        printf("%s: failover preparation withdrawn (%s)\n", name,
               cli_str(out, "state"));
    else if (cli_has(out, "test_vm"))
        printf("%s: test failover \"%s\" started at point %" PRId64 "\n",
               cli_str(out, "vm"), cli_str(out, "test_vm"),
               cli_int(out, "point"));
    else if (test)
        printf("%s: test failover at point %" PRId64 " stopped\n",
               cli_str(out, "vm"), cli_int(out, "point"));
    else if (start)
        printf("%s: failed over to point %" PRId64 " (%s): 'failover "
               "complete' commits, 'failover stop' cancels\n",
               cli_str(out, "vm"), cli_int(out, "point"),
               cli_str(out, "state"));
    else if (strcmp(verb, "stop") == 0)
        printf("%s: failover to point %" PRId64 " cancelled (%s)\n",
               cli_str(out, "vm"), cli_int(out, "point"),
               cli_str(out, "state"));
    else
        printf("%s: failover to point %" PRId64 " complete (%s, epoch %"
               PRId64 "); once the old primary is back, with the VM shut "
               "down there, 'vmreplica replication reverse %s "
               "--replica-server OLD-PRIMARY[:PORT]' replicates back and "
               "sends only what differs\n", cli_str(out, "vm"),
               cli_int(out, "point"), cli_str(out, "state"),
               cli_int(out, "epoch"), cli_str(out, "vm"));
    json_object_put(out);
    return CLI_OK;
}

int
cmd_failover_start(struct cli *c, const struct cli_cmd *cmd, int argc,
                   char **argv)
{
    return failover_call(c, cmd, argc, argv, "start");
}

int
cmd_failover_stop(struct cli *c, const struct cli_cmd *cmd, int argc,
                  char **argv)
{
    return failover_call(c, cmd, argc, argv, "stop");
}

int
cmd_failover_prepare(struct cli *c, const struct cli_cmd *cmd, int argc,
                     char **argv)
{
    return failover_call(c, cmd, argc, argv, "prepare");
}

int
cmd_repl_reverse(struct cli *c, const struct cli_cmd *cmd, int argc,
                 char **argv)
{
    const char *server = NULL, *addr = NULL;
    const struct cli_opt opts[] = {
        { "replica-server", CLI_OPT_STR, &server },
        { "connect-address", CLI_OPT_STR, &addr },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/replication/reverse",
                         &path, &name);
    if (rc)
        return rc;
    json_object *body = json_object_new_object();
    if (server)
        json_object_object_add(body, "replica_server",
                               json_object_new_string(server));
    if (addr)
        json_object_object_add(body, "connect_address",
                               json_object_new_string(addr));
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("replication of vm %s reversed: this server is the primary, "
               "replicating to %s\n", cli_q(name), cli_str(out, "replica_server"));
    json_object_put(out);
    return CLI_OK;
}

int
cmd_failover_complete(struct cli *c, const struct cli_cmd *cmd, int argc,
                      char **argv)
{
    return failover_call(c, cmd, argc, argv, "complete");
}

/* --- measure ----------------------------------------------------------- */

int
cmd_repl_measure(struct cli *c, const struct cli_cmd *cmd, int argc,
                 char **argv)
{
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, NULL, "/replication/measure",
                         &path, &name);
    if (rc)
        return rc;
    json_object *m;
    if ((rc = cli_call(c, "GET", path, NULL, &m)))
        return rc;
    if (c->json) {
        cli_print_json(m);
        json_object_put(m);
        return CLI_OK;
    }
    char a[32], b[32];
    cli_kv("VM", "%s", cli_str(m, "vm"));
    cli_kv("State", "%s", cli_str(m, "state"));
    cli_kv("Health", "%s", cli_str(m, "health"));
    print_details(m, "Health details");
    cli_kv("Last replication time", "%s", or_dash(m, "last_replication_time"));
    cli_kv("Pending size", "%s",
           cli_fmt_size((uint64_t)cli_int(m, "pending_size"), a, sizeof a));
    cli_kv("Average replication size", "%s",
           cli_fmt_size((uint64_t)cli_int(m, "average_replication_size"), a,
                        sizeof a));
    cli_kv("Maximum replication size", "%s",
           cli_fmt_size((uint64_t)cli_int(m, "maximum_replication_size"), a,
                        sizeof a));
    cli_kv("Average latency", "%.2f s",
           cli_double(m, "average_replication_latency"));
    cli_kv("Maximum latency", "%.2f s",
           cli_double(m, "maximum_replication_latency"));
    cli_kv("Replication errors", "%" PRId64, cli_int(m, "replication_errors"));
    cli_kv("Successful cycles", "%" PRId64,
           cli_int(m, "successful_replication_count"));
    cli_kv("Missed cycles", "%" PRId64,
           cli_int(m, "missed_replication_count"));
    cli_kv("Initial replication size", "%s",
           cli_fmt_size((uint64_t)cli_int(m, "initial_replication_size"), a,
                        sizeof a));
    cli_kv("Bytes sent", "%s raw, %s on the wire",
           cli_fmt_size((uint64_t)cli_int(m, "bytes_sent_raw"), a, sizeof a),
           cli_fmt_size((uint64_t)cli_int(m, "bytes_sent_wire"), b,
                        sizeof b));
    cli_kv("Current task", "%s", or_dash(m, "current_task"));
    if (strcmp(cli_str(m, "current_task"), "None") != 0 &&
        cli_has(m, "progress_percent"))
        cli_kv("Progress", "%" PRId64 " %%", cli_int(m, "progress_percent"));
    json_object_put(m);
    return CLI_OK;
}

/* --- suspend / resume / remove ----------------------------------------- */

static int
simple(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv,
       const char *method, const char *suffix, const char *done)
{
    const char *name;
    json_object *out;
    int rc = cli_vm_action(c, cmd, argc, argv, method, suffix, &out, &name);
    if (rc || !out)
        return rc;
    printf("replication of vm %s %s\n", cli_q(name), done);
    json_object_put(out);
    return CLI_OK;
}

int
cmd_repl_suspend(struct cli *c, const struct cli_cmd *cmd, int argc,
                 char **argv)
{
    return simple(c, cmd, argc, argv, "POST", "/replication/suspend",
                  "suspended");
}

/* TIME of --at: "+DURATION" (from now, e.g. +90m), "HH:MM" (its next
 * occurrence, local time) or "YYYY-MM-DD HH:MM[:SS]" / "YYYY-MM-DDTHH:MM[:SS]"
 * (local time).  0 with Unix seconds, or -EINVAL.  (Also initial.c's.) */
int
cli_parse_when(const char *s, int64_t *out)
{
    time_t now = time(NULL);
    if (s[0] == '+') {
        uint64_t d;
        if (vr_parse_duration(s + 1, &d) < 0 || d > 30 * 86400)
            return -EINVAL;
        *out = (int64_t)now + (int64_t)d;
        return 0;
    }
    struct tm tm;
    localtime_r(&now, &tm);
    int y, mo, d, h, mi, sec = 0, n = 0;
    if (sscanf(s, "%2d:%2d%n", &h, &mi, &n) == 2 && s[n] == '\0' &&
        n == 5) {
        tm.tm_hour = h;
        tm.tm_min = mi;
        tm.tm_sec = 0;
    } else if ((sscanf(s, "%4d-%2d-%2d%*1[ T]%2d:%2d%n", &y, &mo, &d, &h, &mi,
                       &n) == 5 && s[n] == '\0') ||
               (sscanf(s, "%4d-%2d-%2d%*1[ T]%2d:%2d:%2d%n", &y, &mo, &d, &h,
                       &mi, &sec, &n) == 6 && s[n] == '\0')) {
        if (mo < 1 || mo > 12 || d < 1 || d > 31 || sec < 0 || sec > 59)
            return -EINVAL;
        tm.tm_year = y - 1900;
        tm.tm_mon = mo - 1;
        tm.tm_mday = d;
        tm.tm_hour = h;
        tm.tm_min = mi;
        tm.tm_sec = sec;
    } else {
        return -EINVAL;
    }
    if (h < 0 || h > 23 || mi < 0 || mi > 59)
        return -EINVAL;
    tm.tm_isdst = -1;
    time_t t = mktime(&tm);
    if (t == (time_t)-1)
        return -EINVAL;
    if (n == 5 && t <= now) /* HH:MM passed today: tomorrow */
        t += 86400;
    *out = (int64_t)t;
    return 0;
}

int
cmd_repl_resume(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv)
{
    bool resync = false, cont = false;
    const char *at = NULL;
    const struct cli_opt opts[] = {
        { "resync", CLI_OPT_FLAG, &resync },
        { "at", CLI_OPT_STR, &at },
        { "continue", CLI_OPT_FLAG, &cont },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/replication/resume",
                         &path, &name);
    if (rc)
        return rc;
    if ((at || cont) && !resync)
        return cli_usage_error(cmd, "--at and --continue go with --resync");
    if (at && cont)
        return cli_usage_error(cmd, "--at or --continue, not both");
    int64_t when = 0;
    if (at && cli_parse_when(at, &when) < 0)
        return cli_usage_error(cmd, "invalid --at '%s': expected +DURATION "
                               "(e.g. +2h), HH:MM or YYYY-MM-DD HH:MM[:SS] "
                               "(local time)", at);
    json_object *body = json_object_new_object(), *out;
    if (resync)
        json_object_object_add(body, "resync", json_object_new_boolean(true));
    if (at)
        json_object_object_add(body, "at", json_object_new_int64(when));
    if (cont)
        json_object_object_add(body, "continue",
                               json_object_new_boolean(true));
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else if (resync && at)
        printf("resynchronization of vm %s scheduled (state %s); 'vmreplica "
               "replication stop-resync %s' cancels it\n", cli_q(name),
               cli_str(out, "state"), cli_q(name));
    else if (resync)
        printf("resynchronization of vm %s %s: only the regions "
               "changed while tracking was stopped are compared; follow "
               "it with 'vmreplica replication measure %s'\n", cli_q(name),
               cont ? "continued" : "started", cli_q(name));
    else
        printf("replication of vm %s resumed\n", cli_q(name));
    json_object_put(out);
    return CLI_OK;
}

int
cmd_repl_stop_resync(struct cli *c, const struct cli_cmd *cmd, int argc,
                     char **argv)
{
    const char *name;
    json_object *out;
    int rc = cli_vm_action(c, cmd, argc, argv, "POST",
                           "/replication/stop-resync", &out, &name);
    if (rc || !out)
        return rc;
    printf("resynchronization of vm %s stopped (state %s); 'vmreplica "
           "replication resume %s --resync' starts it again\n", cli_q(name),
           cli_str(out, "state"), cli_q(name));
    json_object_put(out);
    return CLI_OK;
}

int
cmd_repl_reset_stats(struct cli *c, const struct cli_cmd *cmd, int argc,
                     char **argv)
{
    return simple(c, cmd, argc, argv, "POST", "/replication/reset-stats",
                  "statistics cleared");
}

int
cmd_repl_remove(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv)
{
    return simple(c, cmd, argc, argv, "DELETE", "/replication", "removed");
}
