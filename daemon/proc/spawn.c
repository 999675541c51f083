/* spawn.c: how vmproc.c runs processes — spawn_detached (a double fork:
 * nbdkit outlives the daemon in its own session, its pid reported over a
 * pipe, its stderr in a log whose tail explains an early death),
 * spawn_wait (QEMU, which daemonizes itself: run with the same child set
 * up and waited for with a timeout) and vmproc_run (a short-lived tool,
 * waited for, the last line of its stderr in the error); pid files
 * checked against /proc; unix sockets and line-based control protocols. */
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "config.h"
#include "proc-int.h"
#include "run.h"
#include "vmproc.h"

#define KILL_WAIT_MS      5000
#define LOG_TAIL_BYTES    4096
#define LOG_TAIL_LINES    3

/* Messages from the spawning children to the parent over a pipe; each is
 * smaller than PIPE_BUF so writes from two processes never interleave. */
enum { MSG_PID = 1, MSG_EXEC_ERRNO = 2 };
struct spawn_msg {
    int kind;
    int val;
};

/* --- small helpers ----------------------------------------------------- */

static const char *
env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

const char *
nbdkit_bin(void)
{
    return env_or("VMREPLICA_NBDKIT", "nbdkit");
}

const char *
qemu_bin(void)
{
    return env_or("VMREPLICA_QEMU", "qemu-system-x86_64");
}

static const char *
base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* Resolve a program name through $PATH before fork(): execvp() is not
 * async-signal-safe.  Caller frees. */
char *
resolve_bin(const char *name)
{
    if (strchr(name, '/'))
        return xstrdup(name);
    const char *path = env_or("PATH", "/usr/local/bin:/usr/bin:/bin");
    CLEANUP_FREE char *copy = xstrdup(path);
    char *save = NULL;
    for (char *dir = strtok_r(copy, ":", &save); dir;
         dir = strtok_r(NULL, ":", &save)) {
        char *cand = xasprintf("%s/%s", *dir ? dir : ".", name);
        if (access(cand, X_OK) == 0)
            return cand;
        free(cand);
    }
    return NULL;
}

/* QEMU's option parser splits on ',' and takes ",," as a literal comma. */
char *
qemu_escape(const char *s)
{
    size_t n = 0;
    for (const char *p = s; *p; p++)
        n += *p == ',' ? 2 : 1;
    char *out = xmalloc(n + 1), *o = out;
    for (const char *p = s; *p; p++) {
        *o++ = *p;
        if (*p == ',')
            *o++ = ',';
    }
    *o = '\0';
    return out;
}

/* Prefix the message already in the error slot (which vr_err() cannot read
 * while it writes it). */
int VR_PRINTF(2, 3)
err_wrap(int rc, const char *fmt, ...)
{
    char prefix[512], saved[1024];
    snprintf(saved, sizeof saved, "%s", vr_errmsg());
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    return vr_err(rc, "%s: %s", prefix, saved);
}

/* A close-on-exec pipe whose ends are above stdio, so the child's dup2()
 * onto 0-2 cannot clobber it even if the daemon runs with stdio closed. */
static int
pipe_high(int pfd[2])
{
    int raw[2];
    if (pipe2(raw, O_CLOEXEC) < 0)
        return -errno;
    for (int i = 0; i < 2; i++) {
        pfd[i] = raw[i];
        if (raw[i] < 3) {
            pfd[i] = fcntl(raw[i], F_DUPFD_CLOEXEC, 3);
            if (pfd[i] < 0) {
                int e = errno;
                close(raw[0]);
                close(raw[1]);
                if (i == 1 && pfd[0] != raw[0])
                    close(pfd[0]);
                return -e;
            }
        }
    }
    for (int i = 0; i < 2; i++) {
        if (pfd[i] != raw[i])
            close(raw[i]);
    }
    return 0;
}

/* --- argv vector ------------------------------------------------------- */

void
argv_add(struct argv *a, char *owned)
{
    if (a->n + 2 > a->cap) {
        a->cap = a->cap ? a->cap * 2 : 32;
        a->v = xrealloc(a->v, a->cap * sizeof *a->v);
    }
    a->v[a->n++] = owned;
    a->v[a->n] = NULL;
}

void
argv_addf(struct argv *a, const char *s)
{
    argv_add(a, xstrdup(s));
}

void
argv_fini(struct argv *a)
{
    for (size_t i = 0; i < a->n; i++)
        free(a->v[i]);
    free(a->v);
    a->v = NULL;
    a->n = a->cap = 0;
}

/* --- pids -------------------------------------------------------------- */

/* The pid in a pid file, or 0 if the file is missing or malformed. */
pid_t
read_pidfile(const char *path)
{
    char *buf = NULL;
    if (io_read_file(path, 64, &buf, NULL) < 0) {
        vr_err_clear();
        return 0;
    }
    char *end;
    long v = strtol(buf, &end, 10);
    bool ok = end != buf && (*end == '\0' || *end == '\n') && v > 1 &&
              v <= INT_MAX;
    free(buf);
    return ok ? (pid_t)v : 0;
}

/* Whether argv[0] of a process names the binary we expect: its base name is
 * that of the configured binary or starts with the default's stem (so a
 * process started with a differently configured path is still ours). */
static bool
cmdline_matches(pid_t pid, const char *configured, const char *stem,
                const char *arg)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    size_t cap = 64 << 10; /* a QEMU command line is long */
    CLEANUP_FREE char *buf = xmalloc(cap + 1);
    ssize_t n = io_read_full(fd, buf, cap);
    close(fd);
    if (n <= 0)
        return false;
    buf[n] = '\0'; /* each argument is NUL-terminated inside buf */
    const char *arg0 = base_name(buf);
    if (strcmp(arg0, base_name(configured)) != 0 &&
        strncmp(arg0, stem, strlen(stem)) != 0)
        return false;
    /* Ours only if it was given our pid file: the number in a stale pid
     * file may be another nbdkit's (or QEMU's) by now — another VM's,
     * another program's — and must never be taken for ours (and killed). */
    for (size_t i = strlen(buf) + 1; i < (size_t)n; i += strlen(buf + i) + 1)
        if (strcmp(buf + i, arg) == 0)
            return true;
    return false;
}

/* Alive and not a zombie (the process is init's child once it is ours no
 * more; init may not have reaped it yet). */
bool
pid_running(pid_t pid)
{
    if (pid <= 1 || (kill(pid, 0) < 0 && errno != EPERM))
        return false;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ssize_t n = io_read_full(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return false;
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')'); /* comm may contain spaces */
    if (!rp || rp[1] != ' ')
        return false;
    return rp[2] != 'Z' && rp[2] != 'X';
}

/* How a process that is not our child ended, while it is still a zombie
 * (init has not reaped it yet): /proc/PID/stat's last field is its status
 * as waitpid() reports it.  "" if that cannot be known any more. */
void
death_of(pid_t pid, char *out, size_t n)
{
    char path[64], buf[1024];
    snprintf(out, n, "%s", "");
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t len = io_read_full(fd, buf, sizeof buf - 1);
    close(fd);
    if (len <= 0)
        return;
    buf[len] = '\0';
    const char *rp = strrchr(buf, ')');
    const char *last = strrchr(buf, ' ');
    if (!rp || rp[1] != ' ' || rp[2] != 'Z' || !last)
        return;
    int st = atoi(last + 1);
    if (WIFSIGNALED(st))
        snprintf(out, n, "killed by signal %d (%s)", WTERMSIG(st),
                 strsignal(WTERMSIG(st)));
    else if (WIFEXITED(st))
        snprintf(out, n, "exit status %d", WEXITSTATUS(st));
}

static pid_t
live_pid(const char *pidfile, const char *configured, const char *stem)
{
    pid_t pid = read_pidfile(pidfile);
    if (pid && pid_running(pid) &&
        cmdline_matches(pid, configured, stem, pidfile))
        return pid;
    return 0;
}

pid_t
nbdkit_pid(const char *rundir)
{
    CLEANUP_FREE char *pf = xasprintf("%s/nbdkit.pid", rundir);
    return live_pid(pf, nbdkit_bin(), "nbdkit");
}

pid_t
qemu_pid(const char *rundir)
{
    CLEANUP_FREE char *pf = xasprintf("%s/qemu.pid", rundir);
    return live_pid(pf, qemu_bin(), "qemu");
}

/* Wait until pid is gone; true if it went within timeout_ms. */
bool
wait_gone(pid_t pid, unsigned timeout_ms)
{
    uint64_t deadline = vr_mono_ms() + timeout_ms;
    for (;;) {
        if (!pid_running(pid))
            return true;
        if (vr_mono_ms() >= deadline)
            return false;
        vr_sleep_ms(20);
    }
}

/* SIGTERM (unless sig is SIGKILL already), wait, then SIGKILL and wait. */
int
terminate(pid_t pid, int sig, unsigned timeout_ms, const char *what)
{
    if (kill(pid, sig) < 0 && errno != ESRCH)
        return vr_err(-errno, "stop %s (pid %d): %s", what, (int)pid,
                      strerror(errno));
    if (wait_gone(pid, timeout_ms))
        return 0;
    if (sig != SIGKILL && kill(pid, SIGKILL) < 0 && errno != ESRCH)
        return vr_err(-errno, "kill %s (pid %d): %s", what, (int)pid,
                      strerror(errno));
    if (!wait_gone(pid, KILL_WAIT_MS))
        return vr_err(-ETIMEDOUT, "stop %s (pid %d): still running after "
                      "SIGKILL", what, (int)pid);
    return 0;
}

/* --- sockets ----------------------------------------------------------- */

int
unix_connect(const char *path, int *fd_out)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path)
        return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    *fd_out = fd;
    return 0;
}

bool
is_socket(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}

bool
sock_accepts(const char *path)
{
    int fd;
    if (unix_connect(path, &fd) < 0)
        return false;
    close(fd);
    return true;
}

/* A line reader that keeps what follows the first newline: QMP may send
 * an event and a reply in one read. */
/* Bounded: a guest agent's answer (guest-network-get-interfaces with many
 * addresses) may be long, but never more than this. */
/* Read one '\n'-terminated line (without it) into out before the deadline. */
int
read_line(struct linebuf *lb, char *out, size_t cap, uint64_t deadline_ms)
{
    for (;;) {
        char *nl = memchr(lb->buf, '\n', lb->len);
        if (nl) {
            size_t n = (size_t)(nl - lb->buf);
            size_t keep = n > 0 && lb->buf[n - 1] == '\r' ? n - 1 : n;
            if (keep >= cap)
                return -EMSGSIZE;
            memcpy(out, lb->buf, keep);
            out[keep] = '\0';
            lb->len -= n + 1;
            memmove(lb->buf, nl + 1, lb->len);
            return 0;
        }
        if (lb->len == sizeof lb->buf)
            return -EMSGSIZE;
        uint64_t now = vr_mono_ms();
        if (now >= deadline_ms)
            return -ETIMEDOUT;
        struct pollfd p = { .fd = lb->fd, .events = POLLIN };
        int r = poll(&p, 1, (int)(deadline_ms - now));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -ETIMEDOUT;
        ssize_t got = read(lb->fd, lb->buf + lb->len, sizeof lb->buf - lb->len);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        if (got == 0)
            return -ECONNRESET;
        lb->len += (size_t)got;
    }
}

int
send_all(int fd, const char *s)
{
    size_t len = strlen(s);
    while (len > 0) {
        ssize_t n = send(fd, s, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        s += n;
        len -= (size_t)n;
    }
    return 0;
}

/* --- log tail ---------------------------------------------------------- */

/* The last few lines written to a log since offset from, joined with "; "
 * so they fit a one-line error message.  Caller frees. */
char *
log_tail(const char *path, off_t from)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return xstrdup("(no log)");
    struct stat st;
    char buf[LOG_TAIL_BYTES + 1];
    ssize_t n = 0;
    if (fstat(fd, &st) == 0 && st.st_size > from) {
        off_t start = st.st_size - from > LOG_TAIL_BYTES
                          ? st.st_size - LOG_TAIL_BYTES
                          : from;
        n = pread(fd, buf, (size_t)(st.st_size - start), start);
    }
    close(fd);
    if (n <= 0)
        return xstrdup("(log is empty)");
    buf[n] = '\0';
    /* Keep the last LOG_TAIL_LINES non-empty lines. */
    char *lines[LOG_TAIL_LINES] = { 0 };
    unsigned count = 0;
    char *save = NULL;
    for (char *l = strtok_r(buf, "\n", &save); l;
         l = strtok_r(NULL, "\n", &save)) {
        if (!*l)
            continue;
        lines[count % LOG_TAIL_LINES] = l;
        count++;
    }
    if (count == 0)
        return xstrdup("(log is empty)");
    unsigned first = count > LOG_TAIL_LINES ? count - LOG_TAIL_LINES : 0;
    char *out = xstrdup("");
    for (unsigned i = first; i < count; i++) {
        char *next = xasprintf("%s%s%s", out, i > first ? "; " : "",
                               lines[i % LOG_TAIL_LINES]);
        free(out);
        out = next;
    }
    return out;
}

off_t
file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : 0;
}

/* --- spawning ---------------------------------------------------------- */

/* Close fds [lo, hi); hi ~0U: to the last.  Async-signal-safe. */
static void
close_fds(unsigned lo, unsigned hi)
{
    if (lo >= hi)
        return;
    if (close_range(lo, hi == ~0U ? ~0U : hi - 1, 0) < 0) {
        for (unsigned fd = lo; fd < hi && fd < 65536; fd++)
            close((int)fd);
    }
}

/* In a child: default signal handling, stdin from /dev/null, stdout and
 * stderr appended to logpath, every other fd closed except keep_fd and
 * inherit_fd (-1: none), which the program keeps across exec.
 * Async-signal-safe only. */
static void
child_setup(const char *logpath, int keep_fd, int inherit_fd)
{
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    }
    int in = open("/dev/null", O_RDONLY);
    int log = open(logpath, O_WRONLY | O_CREAT | O_APPEND, 0640);
    if (log < 0)
        log = open("/dev/null", O_WRONLY);
    if (in < 0 || log < 0)
        _exit(126);
    dup2(in, 0);
    dup2(log, 1);
    dup2(log, 2);
    if (in > 2)
        close(in);
    if (log > 2)
        close(log);
    /* inherit_fd moves above keep_fd, without close-on-exec. */
    int inh = -1;
    if (inherit_fd >= 0) {
        inh = fcntl(inherit_fd, F_DUPFD,
                    (keep_fd > inherit_fd ? keep_fd : inherit_fd) + 1);
        if (inh < 0)
            _exit(126);
    }
    /* Close everything else; keep_fd (>= 3) is CLOEXEC and reports exec
     * failure to the parent. */
    unsigned lo = 3;
    if (keep_fd >= 3) {
        close_fds(lo, (unsigned)keep_fd);
        lo = (unsigned)keep_fd + 1;
    }
    if (inh >= 0) {
        close_fds(lo, (unsigned)inh);
        lo = (unsigned)inh + 1;
    }
    close_fds(lo, ~0U);
}

/* In the grandchild: wait until the intermediate child has exited and we
 * are init's (or a subreaper's).  nbdkit sets PR_SET_PDEATHSIG(SIGTERM) at
 * the top of main() (1.32 does, without --exit-with-parent); had it done
 * so before the intermediate child exits, that exit sends it SIGTERM and
 * it quits at once without a word.  The intermediate child exits at once,
 * but on two loaded cores (or under ASan, whose exit is slow) it can lose
 * that race: seen as nbdkit dying silently at its start about once per CI
 * run.  Async-signal-safe; bounded. */
static void
wait_reparented(pid_t parent)
{
    for (unsigned i = 0; i < 10000 && getppid() == parent; i++) {
        struct timespec ts = { 0, 1000000 };
        nanosleep(&ts, NULL);
    }
}

/* Tests: how long the intermediate child lingers before it exits (a slow
 * or descheduled one), read before fork(). */
static long
test_spawn_exit_delay_ms(void)
{
    const char *v = getenv("VMREPLICA_TEST_SPAWN_EXIT_DELAY_MS");
    long ms = v ? atol(v) : 0;
    return ms > 0 && ms < 60000 ? ms : 0;
}

/* A status pipe (above stdio, close-on-exec), then fork: 0 with *pid (0
 * in the child), or -errno with "WHAT: pipe|fork: ..." (nothing open). */
static int
pipe_fork(const char *what, int pfd[2], pid_t *pid)
{
    int prc = pipe_high(pfd);
    if (prc < 0)
        return vr_err(prc, "%s: pipe: %s", what, strerror(-prc));
    *pid = fork();
    if (*pid < 0) {
        int e = errno;
        close(pfd[0]);
        close(pfd[1]);
        return vr_err(-e, "%s: fork: %s", what, strerror(e));
    }
    return 0;
}

/* Double-fork argv (argv[0] resolved) into its own session with output to
 * logpath, inherit_fd (-1: none) left open in it.  *pid_out is the
 * grandchild's pid.  Fails if exec fails. */
int
spawn_detached(const char *bin, char *const argv[], const char *logpath,
               int inherit_fd, pid_t *pid_out)
{
    long exit_delay_ms = test_spawn_exit_delay_ms();
    CLEANUP_FREE char *what = xasprintf("spawn %s", bin);
    int pfd[2];
    pid_t mid;
    int rc = pipe_fork(what, pfd, &mid);
    if (rc < 0)
        return rc;
    if (mid == 0) {
        /* Intermediate child: fork the real one and exit, so it becomes
         * init's child and is never our zombie. */
        close(pfd[0]);
        if (setsid() < 0)
            _exit(125);
        pid_t self = getpid();
        pid_t pid = fork();
        if (pid < 0)
            _exit(125);
        if (pid == 0) {
            wait_reparented(self);
            child_setup(logpath, pfd[1], inherit_fd);
            execv(bin, argv);
            struct spawn_msg m = { MSG_EXEC_ERRNO, errno };
            ssize_t w = write(pfd[1], &m, sizeof m);
            (void)w;
            _exit(127);
        }
        struct spawn_msg m = { MSG_PID, (int)pid };
        ssize_t w = write(pfd[1], &m, sizeof m);
        (void)w;
        if (exit_delay_ms > 0) {
            struct timespec ts = { exit_delay_ms / 1000,
                                   (exit_delay_ms % 1000) * 1000000L };
            nanosleep(&ts, NULL);
        }
        _exit(0);
    }
    close(pfd[1]);

    int status;
    while (waitpid(mid, &status, 0) < 0 && errno == EINTR)
        ;
    pid_t pid = 0;
    int exec_errno = 0;
    struct spawn_msg m;
    for (;;) {
        ssize_t n = read(pfd[0], &m, sizeof m);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof m)
            break; /* EOF: exec succeeded (CLOEXEC closed the pipe) */
        if (m.kind == MSG_PID)
            pid = (pid_t)m.val;
        else if (m.kind == MSG_EXEC_ERRNO)
            exec_errno = m.val;
    }
    close(pfd[0]);
    if (exec_errno)
        return vr_err(-exec_errno, "exec %s: %s", bin, strerror(exec_errno));
    if (!pid)
        return vr_err(-ECHILD, "spawn %s: fork failed", bin);
    *pid_out = pid;
    return 0;
}

int
spawn_wait(const char *bin, char *const argv[], const char *logpath,
           int inherit_fd, unsigned timeout_ms, const char *what,
           int *exec_errno, int *status)
{
    *exec_errno = 0;
    *status = 0;
    int pfd[2];
    pid_t pid;
    int rc = pipe_fork(what, pfd, &pid);
    if (rc < 0)
        return rc;
    if (pid == 0) {
        close(pfd[0]);
        child_setup(logpath, pfd[1], inherit_fd);
        execv(bin, argv);
        int e = errno;
        ssize_t w = write(pfd[1], &e, sizeof e);
        (void)w;
        _exit(127);
    }
    close(pfd[1]);
    ssize_t n;
    while ((n = read(pfd[0], exec_errno, sizeof *exec_errno)) < 0 &&
           errno == EINTR)
        ;
    close(pfd[0]);
    if (n != (ssize_t)sizeof *exec_errno)
        *exec_errno = 0;

    uint64_t deadline = vr_mono_ms() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid)
            return 0;
        if (r < 0 && errno != EINTR) {
            *status = -1;
            return 0;
        }
        if (vr_mono_ms() >= deadline) {
            kill(pid, SIGKILL);
            while (waitpid(pid, status, 0) < 0 && errno == EINTR)
                ;
            return -ETIMEDOUT;
        }
        vr_sleep_ms(10);
    }
}

/* Run argv, waiting (run.c); on failure the last line of its stderr goes
 * into the error message. */
int
vmproc_run(char *const argv[])
{
    struct run r = { .argv = (const char *const *)argv };
    int rc = run_command(&r);
    if (rc < 0)
        return vr_err(rc == -ENOENT ? -EIO : rc, "%s failed: exec %s: %s",
                      argv[0], argv[0], strerror(-rc));
    char *err = r.err;
    size_t len = strlen(err);
    while (len > 0 && err[len - 1] == '\n')
        err[--len] = '\0';
    char *last = strrchr(err, '\n');
    if (!WIFEXITED(r.status) || WEXITSTATUS(r.status) != 0)
        rc = vr_err(-EIO, "%s failed: %s", argv[0], last ? last + 1 : err);
    run_fini(&r);
    return rc;
}

