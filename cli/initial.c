/* initial.c: "vmreplica initial-replication start VM [--at TIME]
 * [--export DIR] [--use-existing] [--wait]" — POST
 * /v1/vms/VM/initial-replication, then (with --wait) poll measure until the
 * initial copy is over (an export: until it is written), drawing a progress
 * bar when stderr is a terminal; "initial-replication stop VM" and, on the
 * Replica server, "initial-replication import VM --from DIR".
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

#define POLL_MS        200
#define START_GRACE_MS 10000
#define BAR_WIDTH      40

static void
sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void
draw_bar(const char *vm, int64_t pct)
{
    if (pct < 0)
        pct = 0;
    if (pct > 100)
        pct = 100;
    int fill = (int)(pct * BAR_WIDTH / 100);
    char bar[BAR_WIDTH + 1];
    memset(bar, '#', (size_t)fill);
    memset(bar + fill, '-', (size_t)(BAR_WIDTH - fill));
    bar[BAR_WIDTH] = '\0';
    fprintf(stderr, "\r%s [%s] %3" PRId64 "%%", vm, bar, pct);
    fflush(stderr);
}

static void
clear_bar(void)
{
    fprintf(stderr, "\r\033[K");
    fflush(stderr);
}

static bool
ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* The health details as one line ("; "-joined); caller frees. */
static char *
details(json_object *m)
{
    char *out = xstrdup("");
    json_object *d = NULL;
    if (!json_object_object_get_ex(m, "health_details", &d) ||
        !json_object_is_type(d, json_type_array))
        return out;
    for (size_t i = 0; i < json_object_array_length(d); i++) {
        json_object *e = json_object_array_get_idx(d, i);
        const char *msg = json_object_is_type(e, json_type_object)
                              ? cli_str(e, "message")
                              : json_object_get_string(e);
        char *next = xasprintf("%s%s%s", out, *out ? "; " : "", msg);
        free(out);
        out = next;
    }
    return out;
}

/* TIME of --at as RFC 3339 UTC into out: an RFC 3339 date-time with its
 * zone, or what `replication resume --resync --at` takes (+DURATION,
 * HH:MM — today or, once past, tomorrow — or YYYY-MM-DD HH:MM[:SS], local
 * time). */
static int
parse_at(const char *s, char out[32])
{
    uint64_t ms = 0;
    int64_t t = 0;
    if (vr_parse_rfc3339(s, &ms) == 0) {
        vr_rfc3339(ms, out);
        return CLI_OK;
    }
    if (cli_parse_when(s, &t) < 0 || t < 0)
        return cli_error("--at %s: expected +DURATION (e.g. +2h), HH:MM, "
                         "YYYY-MM-DD HH:MM[:SS] (local time) or an RFC 3339 "
                         "date-time with its zone", s);
    vr_rfc3339((uint64_t)t * 1000, out);
    return CLI_OK;
}

/* The absolute path of --export DIR for the daemon, which does not share
 * our working directory: DIR resolved, or, if it does not exist yet, its
 * parent resolved and its last component appended (the daemon makes it). */
static char *
export_path(const char *dir)
{
    char *p = realpath(dir, NULL);
    if (p || errno != ENOENT)
        return p;
    CLEANUP_FREE char *copy = xstrdup(dir);
    char *slash = strrchr(copy, '/');
    const char *base = slash ? slash + 1 : copy;
    if (slash == copy)
        return xstrdup(dir); /* "/name" */
    if (slash)
        *slash = '\0';
    CLEANUP_FREE char *parent = realpath(slash ? copy : ".", NULL);
    if (!parent)
        return NULL;
    if (!*base || !strcmp(base, ".") || !strcmp(base, "..")) {
        errno = EINVAL;
        return NULL;
    }
    return xasprintf("%s/%s", parent, base);
}

int
cmd_initial_start(struct cli *c, const struct cli_cmd *cmd, int argc,
                  char **argv)
{
    bool wait = false, use_existing = false;
    const char *at = NULL, *export = NULL;
    const struct cli_opt opts[] = {
        { "wait", CLI_OPT_FLAG, &wait },
        { "use-existing", CLI_OPT_FLAG, &use_existing },
        { "at", CLI_OPT_STR, &at },
        { "export", CLI_OPT_STR, &export },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/initial-replication",
                         &path, &name);
    if (rc)
        return rc;
    char when[32] = "";
    if (at && (rc = parse_at(at, when)))
        return rc;
    if (at && wait)
        return cli_error("--wait: not with --at (the start is scheduled)");
    CLEANUP_FREE char *dir = NULL;
    if (export && !(dir = export_path(export)))
        return cli_error("--export %s: %s", export, strerror(errno));
    json_object *body = json_object_new_object();
    if (use_existing)
        json_object_object_add(body, "use_existing",
                               json_object_new_boolean(true));
    if (at)
        json_object_object_add(body, "at", json_object_new_string(when));
    if (dir)
        json_object_object_add(body, "export", json_object_new_string(dir));
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (!wait) {
        if (c->json)
            cli_print_json(out);
        else if (at)
            printf("initial replication of vm %s scheduled for %s\n", name,
                   when);
        else
            printf("initial replication of vm %s started%s%s\n", name,
                   use_existing ? " by comparison with the Replica server's "
                                  "copy" : dir ? ": exporting to " : "",
                   dir ? dir : "");
        json_object_put(out);
        return CLI_OK;
    }
    json_object_put(out);

    CLEANUP_FREE char *mpath = NULL;
    {
        CLEANUP_FREE char *esc = cli_escape(name);
        mpath = xasprintf("/v1/vms/%s/replication/measure", esc);
    }
    bool tty = isatty(2);
    uint64_t start = vr_mono_ms();
    json_object *m = NULL;
    for (;;) {
        if ((rc = cli_call(c, "GET", mpath, NULL, &m))) {
            if (tty)
                clear_bar();
            return rc;
        }
        const char *task = cli_str(m, "current_task");
        const char *state = cli_str(m, "state");
        bool running = strcmp(task, "InitialReplication") == 0 ||
                       strcmp(state, "InitialReplicationInProgress") == 0;
        /* An export is done once written: the import is elsewhere. */
        json_object *ex = NULL;
        if (dir && json_object_object_get_ex(m, "initial_replication_exported",
                                             &ex) &&
            json_object_get_boolean(ex))
            running = false;
        /* The daemon may not have moved on from "ready" when we first
         * look; give it a moment before taking that as the end. */
        bool not_yet = strcmp(state, "ReadyForInitialReplication") == 0 &&
                       vr_mono_ms() - start < START_GRACE_MS;
        if (!running && !not_yet)
            break;
        if (tty && running)
            draw_bar(name, cli_int(m, "progress_percent"));
        json_object_put(m);
        m = NULL;
        sleep_ms(POLL_MS);
    }
    if (tty)
        clear_bar();

    const char *state = cli_str(m, "state");
    rc = CLI_OK;
    if (ends_with(state, "Error")) {
        CLEANUP_FREE char *why = details(m);
        rc = cli_error("initial replication of vm %s failed: %s", name,
                       *why ? why : state);
    } else if (strcmp(state, "ReadyForInitialReplication") == 0) {
        CLEANUP_FREE char *why = details(m);
        rc = cli_error("initial replication of vm %s did not start%s%s",
                       name, *why ? ": " : "", why);
    }
    if (c->json)
        cli_print_json(m);
    else if (rc == CLI_OK && dir)
        printf("initial replication of vm %s exported to %s; import it on "
               "the Replica server with 'vmreplica initial-replication "
               "import %s --from DIR'\n", name, dir, name);
    else if (rc == CLI_OK)
        printf("initial replication of vm %s complete (state %s)\n", name,
               state);
    json_object_put(m);
    return rc;
}

int
cmd_initial_stop(struct cli *c, const struct cli_cmd *cmd, int argc,
                 char **argv)
{
    const char *name;
    json_object *out;
    int rc = cli_vm_action(c, cmd, argc, argv, "POST",
                           "/initial-replication/stop", &out, &name);
    if (rc || !out)
        return rc;
    printf("initial replication of vm %s stopped; it waits for "
           "'initial-replication start'\n", cli_q(name));
    json_object_put(out);
    return CLI_OK;
}

int
cmd_initial_import(struct cli *c, const struct cli_cmd *cmd, int argc,
                   char **argv)
{
    const char *from = NULL;
    const struct cli_opt opts[] = {
        { "from", CLI_OPT_STR, &from },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts,
                         "/initial-replication/import", &path, &name);
    if (rc)
        return rc;
    if (!from)
        return cli_error("initial-replication import: --from DIR is "
                         "required");
    CLEANUP_FREE char *dir = realpath(from, NULL);
    if (!dir)
        return cli_error("--from %s: %s", from, strerror(errno));
    json_object *body = json_object_new_object();
    json_object_object_add(body, "from", json_object_new_string(dir));
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("initial replication of vm %s imported from %s; the primary "
               "completes it\n", name, dir);
    json_object_put(out);
    return CLI_OK;
}
