/* run.c: running a command to completion (run.h). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "run.h"

extern char **environ;

struct sink {
    int fd;
    char *buf; /* NUL-terminated, at most RUN_OUT_MAX bytes kept */
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
    if (s->len + keep > RUN_OUT_MAX)
        keep = RUN_OUT_MAX - s->len; /* drain the rest, keep the head */
    if (keep) {
        s->buf = xrealloc(s->buf, s->len + keep + 1);
        memcpy(s->buf + s->len, tmp, keep);
        s->len += keep;
        s->buf[s->len] = '\0';
    }
    return true;
}

static void
close_pair(int p[2])
{
    for (int i = 0; i < 2; i++)
        if (p[i] >= 0)
            close(p[i]);
}

/* posix_spawnp argv with stdin, stdout and stderr on the pipes; the
 * daemon blocks SIGTERM/SIGINT in every thread and ignores SIGPIPE: the
 * child gets the defaults back. */
static int
spawn(const struct run *r, int in[2], int po[2], int pe[2], pid_t *pid)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, po[1], 1);
    posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
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
    int e = posix_spawnp(pid, r->argv[0], &fa, &at, (char *const *)r->argv,
                         environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    return -e;
}

int
run_command(struct run *r)
{
    r->out = r->err = NULL;
    r->status = 0;
    r->timed_out = false;
    int in[2] = { -1, -1 }, po[2] = { -1, -1 }, pe[2] = { -1, -1 };
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(po, O_CLOEXEC) < 0 ||
        pipe2(pe, O_CLOEXEC) < 0) {
        int e = errno;
        close_pair(in);
        close_pair(po);
        close_pair(pe);
        return vr_err(-e, "%s: pipe: %s", r->argv[0], strerror(e));
    }
    pid_t pid;
    int rc = spawn(r, in, po, pe, &pid);
    close(in[0]);
    close(po[1]);
    close(pe[1]);
    if (rc < 0) {
        close(in[1]);
        close(po[0]);
        close(pe[0]);
        return vr_err(rc, "run %s: %s", r->argv[0], strerror(-rc));
    }
    /* Inputs are small (< 64 KiB): the pipe takes them whole.  If the
     * command went early, its status says why. */
    if (r->input)
        VR_IGNORE(io_write_all(in[1], r->input, strlen(r->input)));
    close(in[1]);
    struct sink so = { .fd = po[0] }, se = { .fd = pe[0] };
    bool open_o = true, open_e = true;
    uint64_t deadline = r->timeout_ms ? vr_mono_ms() + r->timeout_ms : 0;
    while (open_o || open_e) {
        uint64_t now = vr_mono_ms();
        if (deadline && now >= deadline) {
            r->timed_out = true;
            kill(pid, SIGKILL);
            break;
        }
        struct pollfd p[2] = { { .fd = open_o ? so.fd : -1, .events = POLLIN },
                               { .fd = open_e ? se.fd : -1,
                                 .events = POLLIN } };
        int n = poll(p, 2, deadline ? (int)(deadline - now) : -1);
        if (n < 0 && errno != EINTR) {
            kill(pid, SIGKILL); /* the wait below must not hang */
            break;
        }
        if (n <= 0)
            continue;
        if (p[0].revents && !sink_read(&so))
            open_o = false;
        if (p[1].revents && !sink_read(&se))
            open_e = false;
    }
    close(po[0]);
    close(pe[0]);
    while (waitpid(pid, &r->status, 0) < 0 && errno == EINTR)
        ;
    r->out = so.buf ? so.buf : xcalloc(1, 1);
    r->err = se.buf ? se.buf : xcalloc(1, 1);
    return 0;
}

void
run_fini(struct run *r)
{
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}
