/* nft.c: nftables for vmreplicad — running nft without a shell
 * (posix_spawnp, which does the PATH search and suits a threaded process),
 * a script on its stdin, its output bounded and a deadline, its errors
 * made one line; and the one transaction that (re)creates table
 * NFT_TABLE (firewall.c decides when). */
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

#include "nft.h"

#define NFT_OUT_MAX    (64u << 10) /* bytes kept of nft's stdout/stderr */
#define NFT_TIMEOUT_MS 10000
#define FW_ERR_MAX     1024 /* bytes of nft's errors in a message */

extern char **environ;

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
