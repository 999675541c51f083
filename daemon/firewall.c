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
 * Every change is one nft transaction (`nft -f -`): create the table if it
 * is missing, delete it, create it anew — so applying twice gives the same
 * table, and a failure leaves the old one as it was.  nft runs without a
 * shell (posix_spawnp, which does the PATH search and suits a threaded
 * process), with its output bounded and a deadline.
 *
 * State (fw below) is guarded by D->lock, like struct daemon.
 */
#include <assert.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "api-int.h"
#include "daemon.h"

#define FW_TABLE       "inet vmreplica"
#define NFT_OUT_MAX    (64u << 10) /* bytes kept of nft's stdout/stderr */
#define NFT_TIMEOUT_MS 10000
#define FW_ERR_MAX     1024 /* bytes of nft's errors in a message */

extern char **environ;

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

/* --- running nft ---------------------------------------------------------- */

struct sink {
    int fd;
    char *buf; /* NUL-terminated, at most NFT_OUT_MAX bytes kept */
    size_t len;
};

/* Read what is there; false at end of file. */
static bool
sink_read(struct sink *s)
{
    char tmp[4096];
    ssize_t n = read(s->fd, tmp, sizeof tmp);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return true;
    if (n <= 0)
        return false;
    size_t keep = (size_t)n;
    if (s->len + keep > NFT_OUT_MAX)
        keep = NFT_OUT_MAX - s->len; /* drain the rest, keep the head */
    if (keep) {
        s->buf = xrealloc(s->buf, s->len + keep + 1);
        memcpy(s->buf + s->len, tmp, keep);
        s->len += keep;
        s->buf[s->len] = '\0';
    }
    return true;
}

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
static int
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

    int in[2] = { -1, -1 }, po[2] = { -1, -1 }, pe[2] = { -1, -1 };
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(po, O_CLOEXEC) < 0 ||
        pipe2(pe, O_CLOEXEC) < 0) {
        int e = errno;
        for (int i = 0; i < 2; i++) {
            if (in[i] >= 0)
                close(in[i]);
            if (po[i] >= 0)
                close(po[i]);
        }
        return vr_err(-e, "firewall: pipe: %s", strerror(e));
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, po[1], 1);
    posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
    /* The daemon blocks SIGTERM/SIGINT in every thread and ignores
     * SIGPIPE; nft gets the defaults back. */
    posix_spawnattr_t at;
    posix_spawnattr_init(&at);
    sigset_t none, dflt;
    sigemptyset(&none);
    sigemptyset(&dflt);
    sigaddset(&dflt, SIGPIPE);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &dflt);
    posix_spawnattr_setflags(&at,
                             POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid;
    int e = posix_spawnp(&pid, "nft", &fa, &at, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    close(in[0]);
    close(po[1]);
    close(pe[1]);
    if (e != 0) {
        close(in[1]);
        close(po[0]);
        close(pe[0]);
        if (e == ENOENT)
            return vr_err(-ENOENT, "firewall: nft not found in PATH "
                                   "(install nftables)");
        return vr_err(-e, "firewall: run nft: %s", strerror(e));
    }

    /* The script is small (< 1 KiB): the pipe takes it whole.  If nft
     * went early, its status says why. */
    if (input)
        VR_IGNORE(io_write_all(in[1], input, strlen(input)));
    close(in[1]);
    struct sink so = { .fd = po[0] }, se = { .fd = pe[0] };
    bool open_o = true, open_e = true, timed_out = false;
    uint64_t deadline = vr_mono_ms() + NFT_TIMEOUT_MS;
    while (open_o || open_e) {
        uint64_t now = vr_mono_ms();
        if (now >= deadline) {
            timed_out = true;
            kill(pid, SIGKILL);
            break;
        }
        struct pollfd p[2] = { { .fd = open_o ? so.fd : -1, .events = POLLIN },
                               { .fd = open_e ? se.fd : -1,
                                 .events = POLLIN } };
        int r = poll(p, 2, (int)(deadline - now));
        if (r < 0 && errno != EINTR) {
            kill(pid, SIGKILL); /* the wait below must not hang */
            break;
        }
        if (r <= 0)
            continue;
        if (p[0].revents && !sink_read(&so))
            open_o = false;
        if (p[1].revents && !sink_read(&se))
            open_e = false;
    }
    close(po[0]);
    close(pe[0]);
    int rc, st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (timed_out) {
        rc = vr_err(-ETIMEDOUT, "firewall: %s did not finish within %u s", what,
                    NFT_TIMEOUT_MS / 1000);
    } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        CLEANUP_FREE char *msg = nft_errors(se.buf);
        char status[32];
        if (WIFEXITED(st))
            snprintf(status, sizeof status, "exit status %d", WEXITSTATUS(st));
        else
            snprintf(status, sizeof status, "signal %d", WTERMSIG(st));
        rc = vr_err(-EIO, "firewall: %s failed (%s)%s%s", what, status,
                    *msg ? ": " : "", msg);
    } else {
        rc = 0;
        if (out)
            *out = TAKE_PTR(so.buf);
    }
    free(so.buf);
    free(se.buf);
    return rc;
}

/* --- the table ------------------------------------------------------------ */

/* The ports of the listeners that run now (D->lock held): the rule follows
 * what accepts connections, not what is configured. */
static unsigned
listener_ports(unsigned ports[2])
{
    unsigned n = 0;
    ports[0] = ports[1] = 0;
    if (D->listener)
        ports[n++] = D->cfg.cert_port;
    if (D->krb_listener)
        ports[n++] = D->cfg.krb_port;
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

/* The one transaction: (re)create the table, or, with on false, only make
 * sure it is gone.  Caller frees. */
static char *
table_script(bool on, const unsigned *ports, unsigned n)
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

/* Make the host's table match D->cfg.firewall_enabled and the running
 * listeners (D->lock held).  A failure leaves the table as it was. */
static int
firewall_apply(void)
{
    bool on = D->cfg.firewall_enabled;
    unsigned ports[2];
    unsigned n = listener_ports(ports);
    CLEANUP_FREE char *script = table_script(on, ports, n);
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
    if (!D->cfg.firewall_enabled)
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
        event_add("error", NULL, "%s", fw.error);
        return;
    }
    event_add("info", NULL, "firewall rules applied (ports %s)", list);
}

const char *
firewall_error(void)
{
    return D->cfg.firewall_enabled ? fw.error : NULL;
}

/* --- API ------------------------------------------------------------------ */

/* GET /v1/server/firewall's body.  D->lock held on entry; it is dropped
 * while nft lists the table and held again on return. */
static json_object *
firewall_json(void)
{
    bool on = D->cfg.firewall_enabled;
    unsigned ports[2];
    unsigned n = listener_ports(ports);
    CLEANUP_FREE char *error = fw.error && on ? xstrdup(fw.error) : NULL;
    CLEANUP_FREE char *table = NULL;
    if (on) {
        /* Read only, and nft may take a moment: not under the lock. */
        pthread_mutex_unlock(&D->lock);
        static const char *const args[] = { "list", "table", "inet",
                                            "vmreplica", NULL };
        if (nft_run(args, NULL, &table) < 0 && !error)
            error = xstrdup(vr_errmsg());
        pthread_mutex_lock(&D->lock);
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
    pthread_mutex_lock(&D->lock);
    *out = firewall_json();
    pthread_mutex_unlock(&D->lock);
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
    pthread_mutex_lock(&D->lock);
    bool old = D->cfg.firewall_enabled;
    D->cfg.firewall_enabled = want;
    int rc = 0;
    bool changed = false;
    /* Disabled stays disabled without running nft: vmreplica does not
     * touch the host's firewall unless asked to. */
    if (want || old) {
        rc = firewall_apply();
        changed = rc == 0;
    }
    if (rc == 0)
        rc = catalog_save_server(D->cat, &D->cfg);
    if (rc < 0) {
        char saved[1024];
        snprintf(saved, sizeof saved, "%s", vr_errmsg());
        D->cfg.firewall_enabled = old;
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
        event_add("info", NULL, "firewall enabled (ports %s)", list);
    } else if (old) {
        event_add("info", NULL, "firewall disabled");
    }
    if (rc == 0)
        *out = firewall_json();
    pthread_mutex_unlock(&D->lock);
    return rc;
}
