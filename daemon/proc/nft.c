/* nft.c: nftables for vmreplicad — running nft (run.c: no shell, a
 * script on its stdin, its output bounded and a deadline), its errors
 * made one line; and the one transaction that (re)creates table
 * NFT_TABLE (firewall.c decides when). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "nft.h"
#include "run.h"

#define NFT_TIMEOUT_MS 10000
#define FW_ERR_MAX     1024 /* bytes of nft's errors in a message */

/* --- running nft ---------------------------------------------------------- */

/* nft's stderr as one line: its "Error:" lines (nft follows each with the
 * offending input and carets), else every non-empty line; "; " between. */
static char *
nft_errors(const char *err)
{
    char *out = xcalloc(1, FW_ERR_MAX + 1);
    size_t n = 0;
    bool any_error = err && strstr(err, "Error:");
    for (const char *p = err ? err : ""; *p;) {
        size_t len = strcspn(p, "\n");
        bool take = len > 0 && (!any_error || memmem(p, len, "Error:", 6));
        if (take && n + len + 2 < FW_ERR_MAX) {
            if (n) {
                memcpy(out + n, "; ", 2);
                n += 2;
            }
            memcpy(out + n, p, len);
            n += len;
        }
        p += len + (p[len] == '\n');
    }
    out[n] = '\0';
    return out;
}

/* Run `nft ARGS…` with input on its stdin; its stdout into *out (caller
 * frees; may be NULL).  -ENOENT if there is no nft, -EIO if it fails (its
 * errors in the message), -ETIMEDOUT after NFT_TIMEOUT_MS. */
int
nft_run(const char *const args[], const char *input, char **out)
{
    const char *argv[8] = { "nft" };
    char what[64] = "nft";
    size_t argc = 1;
    for (; args[argc - 1]; argc++) {
        assert(argc + 1 < ARRAY_SIZE(argv));
        argv[argc] = args[argc - 1];
        size_t w = strlen(what);
        snprintf(what + w, sizeof what - w, " %s", argv[argc]);
    }
    argv[argc] = NULL;
    if (out)
        *out = NULL;

    struct run r = { .argv = argv, .input = input,
                     .timeout_ms = NFT_TIMEOUT_MS };
    int rc = run_command(&r);
    if (rc == -ENOENT)
        return vr_err(-ENOENT, "firewall: nft not found in PATH (install "
                               "nftables)");
    if (rc < 0)
        return vr_err(rc, "firewall: %s", vr_errmsg());
    int st = r.status;
    if (r.timed_out) {
        rc = vr_err(-ETIMEDOUT, "firewall: %s did not finish within %u s", what,
                    NFT_TIMEOUT_MS / 1000);
    } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        CLEANUP_FREE char *msg = nft_errors(r.err);
        char status[32];
        if (WIFEXITED(st))
            snprintf(status, sizeof status, "exit status %d", WEXITSTATUS(st));
        else
            snprintf(status, sizeof status, "signal %d", WTERMSIG(st));
        rc = vr_err(-EIO, "firewall: %s failed (%s)%s%s", what, status,
                    *msg ? ": " : "", msg);
    } else if (out) {
        *out = TAKE_PTR(r.out);
    }
    run_fini(&r);
    return rc;
}

/* The one transaction: (re)create the table, or, with on false, only make
 * sure it is gone.  Caller frees. */
char *
nft_table_script(bool on, const unsigned *ports, unsigned n)
{
    /* "delete" alone fails on a missing table: declare it first. */
    static const char reset[] = "table " FW_TABLE " {}\n"
                                "delete table " FW_TABLE "\n";
    if (!on)
        return xstrdup(reset);
    char rule[160] = "";
    if (n > 0) {
        char list[64];
        if (n == 1)
            snprintf(list, sizeof list, "%u", ports[0]);
        else
            snprintf(list, sizeof list, "{ %u, %u }", ports[0], ports[1]);
        snprintf(rule, sizeof rule,
                 "\t\ttcp dport %s meta mark set 0x%x accept "
                 "comment \"vmreplica listeners\"\n",
                 list, FIREWALL_MARK);
    }
    return xasprintf("%s"
                     "table " FW_TABLE " {\n"
                     "\tchain input {\n"
                     "\t\ttype filter hook input priority filter - 10; "
                     "policy accept;\n"
                     "%s"
                     "\t}\n"
                     "}\n",
                     reset, rule);
}
