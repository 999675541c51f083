/* events.c: "vmreplica events [--vm VM] [--follow]" — the daemon's recent
 * events (GET /v1/events), newest last.  --follow then polls for the events
 * that come after the last one shown (GET /v1/events?after=ID) and prints
 * each as it arrives, one line per event (one JSON object per line with
 * --json), until interrupted or the daemon goes away.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#define FOLLOW_POLL_MS 500

static json_object *
event_list(json_object *out, size_t *n)
{
    json_object *list = NULL;
    json_object_object_get_ex(out, "events", &list);
    *n = list && json_object_is_type(list, json_type_array)
             ? json_object_array_length(list)
             : 0;
    return list;
}

static const char *
vm_of(json_object *e)
{
    return *cli_str(e, "vm") ? cli_str(e, "vm") : "-";
}

static void
print_table(json_object *out)
{
    static const char *const hdr[] = { "TIME", "LEVEL", "VM", "MESSAGE" };
    struct cli_table *t = cli_table_new(4, hdr);
    size_t n;
    json_object *list = event_list(out, &n);
    for (size_t i = 0; i < n; i++) {
        json_object *e = json_object_array_get_idx(list, i);
        const char *row[4] = { cli_str(e, "time"), cli_str(e, "level"),
                               vm_of(e), cli_str(e, "message") };
        cli_table_row(t, row);
    }
    cli_table_print(t, 0);
    cli_table_free(t);
}

/* Print the events of one poll as lines; returns the last id seen. */
static int64_t
print_lines(struct cli *c, json_object *out, int64_t last)
{
    size_t n;
    json_object *list = event_list(out, &n);
    for (size_t i = 0; i < n; i++) {
        json_object *e = json_object_array_get_idx(list, i);
        int64_t id = cli_int(e, "id");
        if (id <= last)
            continue;
        last = id;
        if (c->json) {
            puts(json_object_to_json_string_ext(
                e, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
        } else {
            /* One line per event: a newline would split it. */
            CLEANUP_FREE char *msg = xstrdup(cli_str(e, "message"));
            for (char *p = msg; *p; p++) {
                if (*p == '\n' || *p == '\r' || *p == '\t')
                    *p = ' ';
            }
            printf("%-24s %-7s %s  %s\n", cli_str(e, "time"),
                   cli_str(e, "level"), vm_of(e), msg);
        }
    }
    fflush(stdout);
    return last;
}

static int
follow(struct cli *c, const char *esc_vm)
{
    int64_t last = 0;
    for (;;) {
        CLEANUP_FREE char *path = NULL;
        if (last > 0)
            path = xasprintf("/v1/events?after=%" PRId64 "%s%s", last,
                             esc_vm ? "&vm=" : "", esc_vm ? esc_vm : "");
        else
            path = xasprintf("/v1/events%s%s", esc_vm ? "?vm=" : "",
                             esc_vm ? esc_vm : "");
        json_object *out;
        int rc = cli_call(c, "GET", path, NULL, &out);
        if (rc)
            return rc;
        last = print_lines(c, out, last);
        json_object_put(out);
        if (ferror(stdout))
            return cli_error("write to stdout failed");
        struct timespec ts = { 0, FOLLOW_POLL_MS * 1000000L };
        nanosleep(&ts, NULL);
    }
}

int
cmd_events(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    const char *vm = NULL;
    bool follow_flag = false;
    const struct cli_opt opts[] = {
        { "vm", CLI_OPT_STR, &vm },
        { "follow", CLI_OPT_FLAG, &follow_flag },
        { NULL, 0, NULL },
    };
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, opts, pos, 0, &npos);
    if (rc)
        return rc;
    CLEANUP_FREE char *esc = vm ? cli_escape(vm) : NULL;
    if (follow_flag)
        return follow(c, esc);
    CLEANUP_FREE char *path =
        xasprintf("/v1/events%s%s", esc ? "?vm=" : "", esc ? esc : "");
    json_object *out;
    if ((rc = cli_call(c, "GET", path, NULL, &out)))
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        print_table(out);
    json_object_put(out);
    return CLI_OK;
}
