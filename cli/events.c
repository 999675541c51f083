/* events.c: "vmreplica events [--vm VM]" — the daemon's recent events
 * (GET /v1/events), newest last.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int
cmd_events(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    const char *vm = NULL;
    bool follow = false;
    const struct cli_opt opts[] = {
        { "vm", CLI_OPT_STR, &vm },
        { "follow", CLI_OPT_FLAG, &follow },
        { NULL, 0, NULL },
    };
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, opts, pos, 0, &npos);
    if (rc)
        return rc;
    if (follow)
        return cli_error("events --follow is not supported yet");
    CLEANUP_FREE char *path = NULL;
    if (vm) {
        CLEANUP_FREE char *esc = cli_escape(vm);
        path = xasprintf("/v1/events?vm=%s", esc);
    } else {
        path = xstrdup("/v1/events");
    }
    json_object *out;
    if ((rc = cli_call(c, "GET", path, NULL, &out)))
        return rc;
    if (c->json) {
        cli_print_json(out);
        json_object_put(out);
        return CLI_OK;
    }
    static const char *const hdr[] = { "TIME", "LEVEL", "VM", "MESSAGE" };
    struct cli_table *t = cli_table_new(4, hdr);
    json_object *list = NULL;
    json_object_object_get_ex(out, "events", &list);
    size_t n = list && json_object_is_type(list, json_type_array)
                   ? json_object_array_length(list)
                   : 0;
    for (size_t i = 0; i < n; i++) {
        json_object *e = json_object_array_get_idx(list, i);
        const char *row[4] = {
            cli_str(e, "time"), cli_str(e, "level"),
            cli_has(e, "vm") && *cli_str(e, "vm") ? cli_str(e, "vm") : "-",
            cli_str(e, "message"),
        };
        cli_table_row(t, row);
    }
    cli_table_print(t, 0);
    cli_table_free(t);
    json_object_put(out);
    return CLI_OK;
}
