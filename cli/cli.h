/* cli.h: shared pieces of the vmreplica command-line client — the command
 * table, option parsing, the API call over HTTP and output helpers.
 *
 * Commands return an exit status: CLI_OK, CLI_ERR (one line "vmreplica:
 * error: ..." already printed), CLI_USAGE (error and usage printed),
 * CLI_UNREACHABLE (the daemon's socket could not be reached) or
 * CLI_NOTFOUND (the daemon answered 404: no such VM, entry or point).
 * vmreplica(1) "EXIT STATUS" documents them: keep the two in step.
 */
#ifndef VR_CLI_H
#define VR_CLI_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "vr.h"

enum {
    CLI_OK = 0,
    CLI_ERR = 1,
    CLI_USAGE = 2,
    CLI_UNREACHABLE = 3,
    CLI_NOTFOUND = 4,
};

struct cli {
    const char *connect; /* socket path or https://HOST:PORT */
    bool json;           /* --json: print the server's JSON */
    /* Printed on stderr ("vmreplica: NOTE") once a call has waited
     * CLI_SLOW_NOTE_MS for its answer, or NULL: says what the daemon is
     * waiting for (a guest's shutdown) and how not to wait. */
    const char *slow_note;
};

#define CLI_SLOW_NOTE_MS 3000

struct cli_cmd;
typedef int (*cli_fn)(struct cli *c, const struct cli_cmd *cmd, int argc,
                      char **argv);

struct cli_cmd {
    const char *noun;
    const char *verb;    /* NULL for a noun used alone ("events") */
    cli_fn fn;
    const char *args;    /* synopsis after "vmreplica NOUN VERB" */
    const char *summary; /* one line for "vmreplica help" */
    const char *help;    /* option descriptions, or NULL */
};

/* --- option parsing ---------------------------------------------------- */

enum cli_opt_kind {
    CLI_OPT_FLAG, /* --name: sets *(bool *)dest */
    CLI_OPT_STR,  /* --name VALUE or --name=VALUE: *(const char **)dest */
    CLI_OPT_LIST, /* repeatable, ordered: appended to (struct cli_list *) */
};

struct cli_opt {
    const char *name; /* without the leading "--" */
    enum cli_opt_kind kind;
    void *dest;
};

struct cli_list_item {
    const char *opt; /* option name it came from */
    const char *value;
};

struct cli_list {
    unsigned n;
    struct cli_list_item items[64];
};

/* Parse argv (after NOUN VERB) against opts; positionals go to pos (at most
 * max_pos of them, their count in *npos).  "--json" is accepted anywhere,
 * "--help"/"-h" prints the command's usage.  Returns CLI_OK, CLI_USAGE
 * (message printed) or -1 after printing help (exit 0). */
int cli_parse(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv,
              const struct cli_opt *opts, const char **pos, unsigned max_pos,
              unsigned *npos);

/* Print "vmreplica: error: MSG" and the command's usage; CLI_USAGE. */
int cli_usage_error(const struct cli_cmd *cmd, const char *fmt, ...)
    VR_PRINTF(2, 3);
/* Print "vmreplica: error: MSG"; CLI_ERR. */
int cli_error(const char *fmt, ...) VR_PRINTF(1, 2);
/* Print the usage of one command to f. */
void cli_print_usage(const struct cli_cmd *cmd, FILE *f);

/* Require exactly n positionals (named in what, e.g. "VM"). */
int cli_want_args(const struct cli_cmd *cmd, unsigned npos, unsigned n,
                  const char *what);
/* cli_parse with exactly n positionals (WHAT names them in the error). */
int cli_parse_args(struct cli *c, const struct cli_cmd *cmd, int argc,
                   char **argv, const struct cli_opt *opts, const char **pos,
                   unsigned n, const char *what);

/* --- API --------------------------------------------------------------- */

/* Call the API: method, path (already escaped), optional body (borrowed).
 * On success *out is the parsed response (caller puts; NULL when the body
 * is empty).  On failure prints the error and returns CLI_ERR. */
int cli_call(struct cli *c, const char *method, const char *path,
             json_object *body, json_object **out);
/* Escape one path segment or query value; caller frees. */
char *cli_escape(const char *s);

/* --json: print obj pretty on stdout (nothing for NULL). */
void cli_print_json(json_object *obj);

/* --- output helpers ---------------------------------------------------- */

/* Field accessors tolerant of missing keys: "" / 0 / false. */
const char *cli_str(json_object *o, const char *key);
int64_t cli_int(json_object *o, const char *key);
double cli_double(json_object *o, const char *key);
bool cli_bool(json_object *o, const char *key);
bool cli_has(json_object *o, const char *key);

/* "1.5 GiB"-style size into buf. */
const char *cli_fmt_size(uint64_t bytes, char *buf, size_t cap);
/* "30s", "5m", "1h30m" into buf. */
const char *cli_fmt_duration(uint64_t secs, char *buf, size_t cap);

/* Aligned key/value lines: "Key:  value". */
void cli_kv(const char *key, const char *fmt, ...) VR_PRINTF(2, 3);

/* A table of strings printed with aligned columns. */
struct cli_table;
struct cli_table *cli_table_new(unsigned ncols, const char *const *headers);
/* Add a row of ncols strings (copied). */
void cli_table_row(struct cli_table *t, const char *const *cells);
/* Print to stdout, each line indented by indent spaces. */
void cli_table_print(struct cli_table *t, unsigned indent);
void cli_table_free(struct cli_table *t);

/* name as messages show it: quoted if it holds a space (vr_qname); valid
 * until the fourth call after this one. */
const char *cli_q(const char *name);

/* A TCP port 1-65535 into *out: 0, or -1 if s is not one. */
int cli_parse_port(const char *s, long *out);

/* Make a local path absolute against the current directory; caller frees. */
char *cli_abspath(const char *path);

/* Parse "VM" (the one positional) with opts; *path = "/v1/vms/VM" + suffix
 * (caller frees), *name = the VM as given. */
int cli_vm_path(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv, const struct cli_opt *opts, const char *suffix,
                char **path, const char **name);
/* "VM" as cli_vm_path, then METHOD /v1/vms/VM SUFFIX without a body: 0
 * with *name and the answer in *out — or, with --json, the answer printed
 * and *out NULL (the caller prints its own line only when *out is set and
 * frees it). */
int cli_vm_action(struct cli *c, const struct cli_cmd *cmd, int argc,
                  char **argv, const char *method, const char *suffix,
                  json_object **out, const char **name);

/* --- commands (one file per noun) -------------------------------------- */

int cmd_server_show(struct cli *, const struct cli_cmd *, int, char **);
int cmd_server_set(struct cli *, const struct cli_cmd *, int, char **);
int cmd_server_test_connection(struct cli *, const struct cli_cmd *, int,
                               char **);
int cmd_server_firewall(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_create(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_list(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_show(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_start(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_stop(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_remove(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_enable(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_set(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_show(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_stop_resync(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_list(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_measure(struct cli *, const struct cli_cmd *, int, char **);
int cmd_points_list(struct cli *, const struct cli_cmd *, int, char **);
int cmd_failover_start(struct cli *, const struct cli_cmd *, int, char **);
int cmd_failover_stop(struct cli *, const struct cli_cmd *, int, char **);
int cmd_failover_complete(struct cli *, const struct cli_cmd *, int, char **);
int cmd_failover_prepare(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_set_test_network(struct cli *, const struct cli_cmd *, int,
                            char **);
int cmd_vm_set_boot(struct cli *, const struct cli_cmd *, int, char **);
int cmd_auth_add(struct cli *, const struct cli_cmd *, int, char **);
int cmd_auth_set(struct cli *, const struct cli_cmd *, int, char **);
int cmd_auth_list(struct cli *, const struct cli_cmd *, int, char **);
int cmd_auth_remove(struct cli *, const struct cli_cmd *, int, char **);
int cmd_vm_set_failover_network(struct cli *, const struct cli_cmd *, int,
                                char **);
int cmd_repl_reverse(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_suspend(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_resume(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_reset_stats(struct cli *, const struct cli_cmd *, int, char **);
int cmd_repl_remove(struct cli *, const struct cli_cmd *, int, char **);
/* TIME of an --at option (replication.c): +DURATION, HH:MM or
 * YYYY-MM-DD HH:MM[:SS], local time; Unix seconds, or -EINVAL. */
int cli_parse_when(const char *s, int64_t *out);
int cmd_initial_start(struct cli *, const struct cli_cmd *, int, char **);
int cmd_initial_stop(struct cli *, const struct cli_cmd *, int, char **);
int cmd_initial_import(struct cli *, const struct cli_cmd *, int, char **);
int cmd_events(struct cli *, const struct cli_cmd *, int, char **);

/* Shared printers. */
void cli_print_vm(json_object *vm);
void cli_print_replication(json_object *r);

#endif /* VR_CLI_H */
