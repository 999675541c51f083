/* vmproc.c: start, stop and watch the processes behind a running VM.
 *
 * nbdkit (with the vmreplica plugin) serves every disk of the VM as one
 * export on RUNDIR/nbd.sock and answers SEAL/STATUS on RUNDIR/ctl.sock; QEMU,
 * when asked for, attaches to those exports.  Both are started through a
 * double fork (QEMU's -daemonize does the second fork itself), so they are
 * children of init, never zombies of vmreplicad, and survive its restart:
 * their pid files are the only link, and every pid read back is checked
 * against /proc/PID/cmdline so a recycled pid is never signalled.
 *
 * RUNDIR/run.lock (flock) keeps one nbdkit per run directory: vmproc_start
 * takes it before touching the directory, nbdkit inherits it and holds it
 * for its life (its pid written in the file), so neither a second daemon
 * nor a start while an nbdkit we cannot see (no pid file) still serves the
 * disks can start another nbdkit on the same disks and change logs.
 * RUNDIR/qemu.lock does the same for QEMU: one guest per disk.
 *
 * vmreplicad is multithreaded, so everything a child needs (argv, paths) is
 * built before fork() and the child only calls async-signal-safe functions.
 * Nothing here logs: failures go to vr_err() and the caller reports them.
 * Besides the variables in vmproc.h, $VMREPLICA_ACCEL=tcg|kvm forces QEMU's
 * accelerator (tests under nested virtualization want tcg).
 */
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
#include "vmproc.h"

#define START_TIMEOUT_MS  10000
#define NBDKIT_STOP_MS    10000
#define KILL_WAIT_MS      5000
#define CTL_TIMEOUT_MS    30000
#define QEMU_LAUNCH_MS    30000
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

static const char *
nbdkit_bin(void)
{
    return env_or("VMREPLICA_NBDKIT", "nbdkit");
}

static const char *
qemu_bin(void)
{
    return env_or("VMREPLICA_QEMU", "qemu-system-x86_64");
}

static const char *
plugin_path(void)
{
    return env_or("VMREPLICA_PLUGIN", PLUGINDIR "/nbdkit-vmreplica-plugin.so");
}

static const char *
base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* Resolve a program name through $PATH before fork(): execvp() is not
 * async-signal-safe.  Caller frees. */
static char *
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
static char *
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

static void
sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Prefix the message already in the error slot (which vr_err() cannot read
 * while it writes it). */
static int VR_PRINTF(2, 3)
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

struct argv {
    char **v;
    size_t n, cap;
};

static void
argv_add(struct argv *a, char *owned)
{
    if (a->n + 2 > a->cap) {
        a->cap = a->cap ? a->cap * 2 : 32;
        a->v = xrealloc(a->v, a->cap * sizeof *a->v);
    }
    a->v[a->n++] = owned;
    a->v[a->n] = NULL;
}

static void
argv_addf(struct argv *a, const char *s)
{
    argv_add(a, xstrdup(s));
}

static void
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
static pid_t
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
static bool
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
static void
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

static pid_t
nbdkit_pid(const char *rundir)
{
    CLEANUP_FREE char *pf = xasprintf("%s/nbdkit.pid", rundir);
    return live_pid(pf, nbdkit_bin(), "nbdkit");
}

static pid_t
qemu_pid(const char *rundir)
{
    CLEANUP_FREE char *pf = xasprintf("%s/qemu.pid", rundir);
    return live_pid(pf, qemu_bin(), "qemu");
}

/* Wait until pid is gone; true if it went within timeout_ms. */
static bool
wait_gone(pid_t pid, unsigned timeout_ms)
{
    uint64_t deadline = vr_mono_ms() + timeout_ms;
    for (;;) {
        if (!pid_running(pid))
            return true;
        if (vr_mono_ms() >= deadline)
            return false;
        sleep_ms(20);
    }
}

/* SIGTERM (unless sig is SIGKILL already), wait, then SIGKILL and wait. */
static int
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

static int
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

static bool
is_socket(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}

static bool
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
#define LINE_MAX_BYTES (256 * 1024)
struct linebuf {
    int fd;
    size_t len;
    char buf[LINE_MAX_BYTES];
};

/* Read one '\n'-terminated line (without it) into out before the deadline. */
static int
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

static int
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
static char *
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

static off_t
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

/* Double-fork argv (argv[0] resolved) into its own session with output to
 * logpath, inherit_fd (-1: none) left open in it.  *pid_out is the
 * grandchild's pid.  Fails if exec fails. */
static int
spawn_detached(const char *bin, char *const argv[], const char *logpath,
               int inherit_fd, pid_t *pid_out)
{
    long exit_delay_ms = test_spawn_exit_delay_ms();
    int pfd[2];
    int prc = pipe_high(pfd);
    if (prc < 0)
        return vr_err(prc, "spawn %s: pipe: %s", bin, strerror(-prc));
    pid_t mid = fork();
    if (mid < 0) {
        int e = errno;
        close(pfd[0]);
        close(pfd[1]);
        return vr_err(-e, "spawn %s: fork: %s", bin, strerror(e));
    }
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

/* --- nbdkit ------------------------------------------------------------ */

static void
unlink_in(const char *rundir, const char *name)
{
    CLEANUP_FREE char *p = xasprintf("%s/%s", rundir, name);
    unlink(p);
}

/* Take RUNDIR/NAME (run.lock: nbdkit's, qemu.lock: QEMU's) for a start;
 * -EBUSY naming the holder if another process (one without our pid file,
 * another daemon) holds it. */
static int
lock_rundir(const char *rundir, const char *name, int *fd)
{
    CLEANUP_FREE char *path = xasprintf("%s/%s", rundir, name);
    pid_t holder;
    int rc = io_lock_file(path, fd, &holder);
    if (rc == -EWOULDBLOCK)
        return vr_err(-EBUSY, "run directory %s is in use by another "
                      "process (pid %d) that this daemon did not start or "
                      "no longer knows (it holds %s); stop that process "
                      "first", rundir, (int)holder, name);
    return rc;
}

static bool
lock_busy(const char *rundir, const char *name)
{
    int fd;
    CLEANUP_FREE char *path = xasprintf("%s/%s", rundir, name);
    if (access(path, F_OK) < 0)
        return false;
    int rc = lock_rundir(rundir, name, &fd);
    if (rc == 0)
        close(fd);
    else if (rc != -EBUSY)
        vr_err_clear();
    return rc == -EBUSY;
}

bool
vmproc_rundir_busy(const char *rundir)
{
    return lock_busy(rundir, "run.lock") || lock_busy(rundir, "qemu.lock");
}

/* Start nbdkit holding lock_fd (RUNDIR/run.lock) for its life. */
static int
start_nbdkit(const struct vmproc_spec *s, int lock_fd)
{
    const char *rd = s->rundir;
    CLEANUP_FREE char *nbd_sock = xasprintf("%s/nbd.sock", rd);
    CLEANUP_FREE char *ctl_sock = xasprintf("%s/ctl.sock", rd);
    CLEANUP_FREE char *pidfile = xasprintf("%s/nbdkit.pid", rd);
    CLEANUP_FREE char *logpath = xasprintf("%s/nbdkit.log", rd);
    struct sockaddr_un sa;
    if (strlen(nbd_sock) >= sizeof sa.sun_path ||
        strlen(ctl_sock) >= sizeof sa.sun_path)
        return vr_err(-ENAMETOOLONG, "start nbdkit: run directory %s: path "
                      "too long for a unix socket", rd);
    if (s->ndisks == 0)
        return vr_err(-EINVAL, "start nbdkit: vm %s has no disks", s->name);

    CLEANUP_FREE char *bin = resolve_bin(nbdkit_bin());
    if (!bin)
        return vr_err(-ENOENT, "start nbdkit: %s: not found in PATH",
                      nbdkit_bin());

    /* A stale socket would make nbdkit's bind() fail. */
    unlink(nbd_sock);
    unlink(ctl_sock);
    unlink(pidfile);

    struct argv a = { 0 };
    argv_addf(&a, nbdkit_bin());
    argv_addf(&a, "--foreground");
    argv_addf(&a, "--unix");
    argv_addf(&a, nbd_sock);
    argv_addf(&a, "-P");
    argv_addf(&a, pidfile);
    argv_addf(&a, "--threads");
    argv_addf(&a, "16");
    argv_addf(&a, plugin_path());
    for (unsigned i = 0; i < s->ndisks; i++)
        argv_add(&a, xasprintf("disk=%s:%s", s->disks[i].id,
                               s->disks[i].path));
    argv_add(&a, xasprintf("control=%s", ctl_sock));
    const char *hashlog = getenv("VMREPLICA_TEST_HASHLOG");
    if (s->view)
        argv_add(&a, xasprintf("view=%s", s->view));
    else if (hashlog && *hashlog)
        argv_add(&a, xasprintf("hashlog=%s", hashlog));

    /* A death at start is an error, said with how nbdkit ended (a silent
     * one used to be started again: see wait_reparented()). */
    off_t log_start = file_size(logpath);
    pid_t pid = 0;
    int rc = spawn_detached(bin, a.v, logpath, lock_fd, &pid);
    argv_fini(&a);
    if (rc < 0)
        return err_wrap(rc, "start nbdkit for %s", s->name);

    uint64_t deadline = vr_mono_ms() + START_TIMEOUT_MS;
    const char *why = NULL;
    for (;;) {
        /* nbdkit writes its pid file once it accepts connections; probing
         * nbd.sock itself would only log a failed handshake. */
        if (read_pidfile(pidfile) && is_socket(nbd_sock) &&
            sock_accepts(ctl_sock))
            return 0;
        if (!pid_running(pid)) {
            why = "exited";
            break;
        }
        if (vr_mono_ms() >= deadline) {
            why = "sockets not ready after 10 s";
            break;
        }
        sleep_ms(20);
    }
    char death[96] = "";
    if (strcmp(why, "exited") == 0)
        death_of(pid, death, sizeof death);
    if (kill(pid, 0) == 0)
        (void)terminate(pid, SIGKILL, KILL_WAIT_MS, "nbdkit");
    unlink(pidfile);
    CLEANUP_FREE char *tail = log_tail(logpath, log_start);
    return vr_err(-EIO, "start nbdkit for %s: %s%s%s%s: %s", s->name, why,
                  *death ? " (" : "", death, *death ? ")" : "", tail);
}

static int
stop_nbdkit(const char *rundir)
{
    pid_t pid = nbdkit_pid(rundir);
    if (pid) {
        int rc = terminate(pid, SIGTERM, NBDKIT_STOP_MS, "nbdkit");
        if (rc < 0)
            return rc;
    } else if (lock_busy(rundir, "run.lock")) {
        /* Its sockets are another process's: leave them (the error names
         * it). */
        return -EBUSY;
    }
    unlink_in(rundir, "nbdkit.pid");
    unlink_in(rundir, "nbd.sock");
    unlink_in(rundir, "ctl.sock");
    return 0;
}

/* --- QEMU -------------------------------------------------------------- */

/* KVM when /dev/kvm opens read-write, else TCG.  $VMREPLICA_ACCEL=tcg|kvm
 * overrides: under nested virtualization (these test machines) firmware
 * boots 25x faster in TCG than in KVM. */
static bool kvm_usable(void);

static const char *
machine_arg(void)
{
    const char *accel = getenv("VMREPLICA_ACCEL");
    if (accel && strcmp(accel, "tcg") == 0)
        return "q35,accel=tcg";
    if (accel && strcmp(accel, "kvm") == 0)
        return "q35,accel=kvm";
    return kvm_usable() ? "q35,accel=kvm" : "q35,accel=tcg";
}

static bool
kvm_usable(void)
{
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return false;
    close(fd);
    return true;
}

/* Start QEMU holding lock_fd (RUNDIR/qemu.lock) for its life. */
static int
launch_qemu(const struct vmproc_spec *s, int lock_fd)
{
    const char *rd = s->rundir;
    CLEANUP_FREE char *bin = resolve_bin(qemu_bin());
    if (!bin)
        return vr_err(-ENOENT, "start qemu: %s: not found in PATH",
                      qemu_bin());
    CLEANUP_FREE char *erd = qemu_escape(rd);
    CLEANUP_FREE char *ename = qemu_escape(s->name);
    CLEANUP_FREE char *pidfile = xasprintf("%s/qemu.pid", rd);
    CLEANUP_FREE char *logpath = xasprintf("%s/qemu.log", rd);
    unlink(pidfile);
    unlink_in(rd, "qmp.sock");
    unlink_in(rd, "qga.sock");

    struct argv a = { 0 };
    argv_addf(&a, qemu_bin());
    argv_addf(&a, "-name");
    argv_addf(&a, ename);
    if (s->uuid && *s->uuid) {
        argv_addf(&a, "-uuid");
        argv_addf(&a, s->uuid);
    }
    argv_addf(&a, "-machine");
    argv_addf(&a, machine_arg());
    argv_addf(&a, "-m");
    argv_add(&a, xasprintf("%u", s->memory_mib ? s->memory_mib : 256));
    argv_addf(&a, "-smp");
    argv_add(&a, xasprintf("%u", s->cpus ? s->cpus : 1));
    argv_addf(&a, "-nodefaults");
    if (s->kernel) {
        argv_addf(&a, "-kernel");
        argv_addf(&a, s->kernel);
        if (s->initrd) {
            argv_addf(&a, "-initrd");
            argv_addf(&a, s->initrd);
        }
        if (s->cmdline) {
            argv_addf(&a, "-append");
            argv_addf(&a, s->cmdline);
        }
    }
    argv_addf(&a, "-display");
    argv_addf(&a, "none");
    argv_addf(&a, "-serial");
    argv_add(&a, xasprintf("file:%s/console.log", erd));
    argv_addf(&a, "-qmp");
    argv_add(&a, xasprintf("unix:%s/qmp.sock,server=on,wait=off", erd));
    argv_addf(&a, "-pidfile");
    argv_addf(&a, pidfile);
    argv_addf(&a, "-daemonize");
    for (unsigned i = 0; i < s->ndisks; i++) {
        CLEANUP_FREE char *id = qemu_escape(s->disks[i].id);
        argv_addf(&a, "-blockdev");
        if (s->overlays)
            argv_add(&a, xasprintf("driver=qcow2,node-name=%s,"
                                   "file.driver=file,file.filename=%s/%s"
                                   ".qcow2", id, erd, id));
        else
            argv_add(&a, xasprintf("driver=nbd,node-name=%s,server.type="
                                   "unix,server.path=%s/nbd.sock,export=%s",
                                   id, erd, id));
        argv_addf(&a, "-device");
        argv_add(&a, xasprintf("virtio-blk-pci,drive=%s%s", id,
                               /* -kernel boots first: QEMU refuses a
                                * second bootindex 0 */
                               i == 0 && !s->kernel ? ",bootindex=0" : ""));
    }
    for (unsigned i = 0; i < s->nnics; i++) {
        const char *net = s->nic_net[i];
        argv_addf(&a, "-netdev");
        if (strcmp(net, "user") == 0)
            argv_add(&a, xasprintf("user,id=net%u", i));
        else if (strncmp(net, "tap:", 4) == 0)
            argv_add(&a, xasprintf("tap,id=net%u,ifname=%s,script=no,"
                                   "downscript=no", i, net + 4));
        else if (strncmp(net, "bridge:", 7) == 0)
            argv_add(&a, xasprintf("bridge,id=net%u,br=%s", i, net + 7));
        else /* none: a hub of its own, connected to nothing */
            argv_add(&a, xasprintf("hubport,id=net%u,hubid=%u", i, 100 + i));
        argv_addf(&a, "-device");
        argv_add(&a, xasprintf("virtio-net-pci,netdev=net%u,mac=%s", i,
                               s->nic_mac[i]));
    }
    argv_addf(&a, "-device");
    argv_addf(&a, "isa-debug-exit,iobase=0xf4,iosize=0x04");
    argv_addf(&a, "-chardev");
    argv_add(&a, xasprintf("socket,path=%s/qga.sock,server=on,wait=off,"
                           "id=qga0", erd));
    argv_addf(&a, "-device");
    argv_addf(&a, "virtio-serial");
    argv_addf(&a, "-device");
    argv_addf(&a, "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0");

    /* With -daemonize the process we start exits once the VM is set up (or
     * failed), and the VM itself is reparented to init.  Its pre-daemonize
     * errors land in qemu.log. */
    off_t log_start = file_size(logpath);
    int pfd[2];
    int prc = pipe_high(pfd);
    if (prc < 0) {
        argv_fini(&a);
        return vr_err(prc, "start qemu: pipe: %s", strerror(-prc));
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        argv_fini(&a);
        close(pfd[0]);
        close(pfd[1]);
        return vr_err(-e, "start qemu: fork: %s", strerror(e));
    }
    if (pid == 0) {
        close(pfd[0]);
        child_setup(logpath, pfd[1], lock_fd);
        execv(bin, a.v);
        int e = errno;
        ssize_t w = write(pfd[1], &e, sizeof e);
        (void)w;
        _exit(127);
    }
    argv_fini(&a);
    close(pfd[1]);
    int exec_errno = 0;
    ssize_t n;
    while ((n = read(pfd[0], &exec_errno, sizeof exec_errno)) < 0 &&
           errno == EINTR)
        ;
    close(pfd[0]);
    if (n != (ssize_t)sizeof exec_errno)
        exec_errno = 0;

    int status = 0;
    uint64_t deadline = vr_mono_ms() + QEMU_LAUNCH_MS;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR) {
            status = -1;
            break;
        }
        if (vr_mono_ms() >= deadline) {
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            return vr_err(-ETIMEDOUT, "start qemu for %s: not ready after "
                          "%d s", s->name, QEMU_LAUNCH_MS / 1000);
        }
        sleep_ms(10);
    }
    if (exec_errno)
        return vr_err(-exec_errno, "start qemu for %s: exec %s: %s", s->name,
                      bin, strerror(exec_errno));
    if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
        !qemu_pid(rd)) {
        CLEANUP_FREE char *tail = log_tail(logpath, log_start);
        return vr_err(-EIO, "start qemu for %s: %s", s->name, tail);
    }
    return 0;
}

static int
start_qemu(const struct vmproc_spec *s)
{
    int lock_fd;
    int rc = lock_rundir(s->rundir, "qemu.lock", &lock_fd);
    if (rc < 0)
        return err_wrap(rc, "vm %s", s->name);
    rc = launch_qemu(s, lock_fd);
    if (rc == 0 && io_lock_note_pid(lock_fd, qemu_pid(s->rundir)) < 0)
        vr_err_clear(); /* only the messages lose the pid */
    close(lock_fd); /* QEMU holds it now */
    return rc;
}

/* QMP: greeting, qmp_capabilities, then one command.  Replies are lines. */
static int
qmp_command(const char *rundir, const char *cmd)
{
    CLEANUP_FREE char *path = xasprintf("%s/qmp.sock", rundir);
    int fd;
    int rc = unix_connect(path, &fd);
    if (rc < 0)
        return rc;
    uint64_t deadline = vr_mono_ms() + 5000;
    struct linebuf *lb = xcalloc(1, sizeof *lb);
    lb->fd = fd;
    char line[4096];
    const char *msgs[] = { "{\"execute\":\"qmp_capabilities\"}\n", cmd };
    rc = read_line(lb, line, sizeof line, deadline); /* greeting */
    for (unsigned i = 0; rc == 0 && i < ARRAY_SIZE(msgs); i++) {
        rc = send_all(fd, msgs[i]);
        /* Skip asynchronous events until the command's reply. */
        while (rc == 0) {
            rc = read_line(lb, line, sizeof line, deadline);
            if (rc < 0)
                break;
            if (strstr(line, "\"return\""))
                break;
            if (strstr(line, "\"error\"")) {
                rc = -EIO;
                break;
            }
        }
    }
    free(lb);
    close(fd);
    return rc;
}

int
vmproc_guest_command(const char *rundir, const char *cmd, unsigned timeout_ms,
                     int64_t *ret)
{
    json_object *r = NULL;
    int rc = vmproc_guest_call(rundir, cmd, timeout_ms, &r);
    if (rc == 0 && ret)
        *ret = json_object_get_int64(r);
    json_object_put(r);
    return rc;
}

int
vmproc_guest_call(const char *rundir, const char *cmd, unsigned timeout_ms,
                  json_object **ret)
{
    *ret = NULL;
    CLEANUP_FREE char *path = xasprintf("%s/qga.sock", rundir);
    if (!qemu_pid(rundir))
        return vr_err(-ENOENT, "guest agent: the VM does not run");
    int fd;
    int rc = unix_connect(path, &fd);
    if (rc < 0)
        return vr_err(rc, "guest agent: connect %s: %s", path, strerror(-rc));
    uint64_t deadline = vr_mono_ms() + timeout_ms;
    struct linebuf *lb = xcalloc(1, sizeof *lb);
    lb->fd = fd;
    CLEANUP_FREE char *line = xmalloc(LINE_MAX_BYTES);
    /* guest-sync with a fresh id first: the channel may still hold the
     * reply to an exchange that timed out earlier.  0xff makes the agent
     * drop any partial request it holds. */
    static uint32_t seq;
    uint32_t id = ((uint32_t)getpid() << 16 ^
                   __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED) ^
                   (uint32_t)vr_mono_ms()) & 0x7fffffff;
    char sync[128];
    snprintf(sync, sizeof sync,
             "\xff{\"execute\":\"guest-sync\",\"arguments\":{\"id\":%u}}\n",
             id);
    rc = send_all(fd, sync);
    bool synced = false;
    json_object *j = NULL;
    while (rc == 0 && !synced) {
        rc = read_line(lb, line, LINE_MAX_BYTES, deadline);
        json_object_put(j);
        j = rc == 0 ? json_tokener_parse(line) : NULL;
        json_object *v;
        if (j && json_object_object_get_ex(j, "return", &v) &&
            json_object_get_int64(v) == (int64_t)id)
            synced = true;
    }
    if (!synced) {
        json_object_put(j);
        free(lb);
        close(fd);
        return vr_err(-ENOTCONN, "guest agent: not answering (%s within %u "
                      "ms)", rc == -ETIMEDOUT ? "no reply" : strerror(-rc),
                      timeout_ms);
    }
    rc = send_all(fd, cmd);
    if (rc == 0)
        rc = read_line(lb, line, LINE_MAX_BYTES, deadline);
    json_object_put(j);
    j = rc == 0 ? json_tokener_parse(line) : NULL;
    free(lb);
    close(fd);
    if (rc == -ETIMEDOUT)
        return vr_err(rc, "guest agent: no answer within %u ms", timeout_ms);
    if (rc < 0)
        return vr_err(rc, "guest agent: %s", strerror(-rc));
    json_object *v, *e;
    if (j && json_object_object_get_ex(j, "return", &v)) {
        *ret = json_object_get(v);
    } else if (j && json_object_object_get_ex(j, "error", &e) &&
               json_object_object_get_ex(e, "desc", &v)) {
        rc = vr_err(-EIO, "guest agent: %s", json_object_get_string(v));
    } else {
        rc = vr_err(-EPROTO, "guest agent: unexpected answer '%.80s'", line);
    }
    json_object_put(j);
    return rc;
}

static int
stop_qemu(const char *rundir, bool force, unsigned timeout_ms)
{
    pid_t pid = qemu_pid(rundir);
    if (pid) {
        bool gone = false;
        if (!force && qmp_command(rundir, "{\"execute\":"
                                          "\"system_powerdown\"}\n") == 0)
            gone = wait_gone(pid, timeout_ms);
        if (!gone) {
            int rc = terminate(pid, SIGKILL, KILL_WAIT_MS, "qemu");
            if (rc < 0)
                return rc;
        }
    } else if (lock_busy(rundir, "qemu.lock")) {
        return -EBUSY; /* another process's QEMU: its sockets stay */
    }
    unlink_in(rundir, "qemu.pid");
    unlink_in(rundir, "qmp.sock");
    unlink_in(rundir, "qga.sock");
    return 0;
}

/* --- public ------------------------------------------------------------ */

int
vmproc_start(const struct vmproc_spec *s)
{
    int rc = io_mkdir_p(s->rundir, 0750);
    if (rc < 0)
        return err_wrap(rc, "start vm %s", s->name);

    bool served, running;
    vmproc_status(s->rundir, &served, &running);
    bool started_nbdkit = false;
    if (!served) {
        int lock_fd = -1;
        rc = lock_rundir(s->rundir, "run.lock", &lock_fd);
        if (rc < 0)
            rc = err_wrap(rc, "vm %s", s->name);
        if (rc == 0)
            rc = start_nbdkit(s, lock_fd);
        if (rc == 0) {
            CLEANUP_FREE char *pf = xasprintf("%s/nbdkit.pid", s->rundir);
            if (io_lock_note_pid(lock_fd, read_pidfile(pf)) < 0)
                vr_err_clear(); /* only the messages lose the pid */
        }
        if (lock_fd >= 0)
            close(lock_fd); /* nbdkit holds it now */
        if (rc < 0)
            return rc;
        started_nbdkit = true;
    }
    if (s->hypervisor && !running) {
        rc = start_qemu(s);
        if (rc < 0) {
            /* Leave things as they were: a failed start serves nothing it
             * did not serve before. */
            if (started_nbdkit) {
                CLEANUP_FREE char *msg = xstrdup(vr_errmsg());
                (void)stop_nbdkit(s->rundir);
                vr_err(rc, "%s", msg);
            }
            return rc;
        }
    }
    return 0;
}

int
vmproc_stop(const char *rundir, bool force, unsigned timeout_ms)
{
    int rc = stop_qemu(rundir, force, timeout_ms);
    if (rc < 0)
        return rc;
    /* Seal the guest's last writes into a cycle of their own so they can
     * be shipped while the VM is off.  Best effort: an unsealed segment
     * is kept and continued at the next start, so nothing is lost. */
    uint64_t cycle;
    if (nbdkit_pid(rundir) && vmproc_seal(rundir, &cycle) < 0)
        vr_err_clear();
    return stop_nbdkit(rundir);
}

bool
vmproc_nbd_sock_exists(const char *rundir)
{
    CLEANUP_FREE char *p = xasprintf("%s/nbd.sock", rundir);
    return is_socket(p);
}

void
vmproc_status(const char *rundir, bool *disks_served, bool *qemu_running)
{
    *disks_served = nbdkit_pid(rundir) != 0;
    *qemu_running = qemu_pid(rundir) != 0;
}

/* Send one control command; the reply line after "OK " goes to out. */
static int
ctl_request(const char *rundir, const char *cmd, char *out, size_t cap)
{
    CLEANUP_FREE char *path = xasprintf("%s/ctl.sock", rundir);
    int fd;
    int rc = unix_connect(path, &fd);
    if (rc < 0)
        return vr_err(rc, "control socket %s: connect: %s", path,
                      strerror(-rc));
    rc = send_all(fd, cmd);
    if (rc < 0) {
        close(fd);
        return vr_err(rc, "control socket %s: send: %s", path, strerror(-rc));
    }
    struct linebuf *lb = xcalloc(1, sizeof *lb);
    lb->fd = fd;
    rc = read_line(lb, out, cap, vr_mono_ms() + CTL_TIMEOUT_MS);
    free(lb);
    close(fd);
    if (rc < 0)
        return vr_err(rc, "control socket %s: no reply: %s", path,
                      rc == -ETIMEDOUT ? "timed out after 30 s"
                                       : strerror(-rc));
    if (strncmp(out, "ERR", 3) == 0 && (out[3] == ' ' || !out[3]))
        return vr_err(-EIO, "%s", out[3] ? out + 4 : "unknown error");
    if (strncmp(out, "OK ", 3) != 0)
        return vr_err(-EPROTO, "control socket %s: bad reply '%.64s'", path,
                      out);
    memmove(out, out + 3, strlen(out + 3) + 1);
    return 0;
}

static bool
parse_u64(const char *s, char **end, uint64_t *out)
{
    if (*s < '0' || *s > '9')
        return false;
    errno = 0;
    unsigned long long v = strtoull(s, end, 10);
    if (errno)
        return false;
    *out = v;
    return true;
}

int
vmproc_seal(const char *rundir, uint64_t *cycle)
{
    char line[512];
    int rc = ctl_request(rundir, "SEAL\n", line, sizeof line);
    if (rc < 0)
        return err_wrap(rc, "seal %s", rundir);
    char *end;
    uint64_t v;
    if (!parse_u64(line, &end, &v) || (*end && *end != ' '))
        return vr_err(-EPROTO, "seal %s: bad reply 'OK %.64s'", rundir, line);
    *cycle = v;
    return 0;
}

int
vmproc_shipped(const char *rundir, uint64_t cycle)
{
    char line[512], cmd[64];
    snprintf(cmd, sizeof cmd, "SHIPPED %llu\n", (unsigned long long)cycle);
    int rc = ctl_request(rundir, cmd, line, sizeof line);
    if (rc < 0)
        return err_wrap(rc, "shipped %s", rundir);
    return 0;
}

int
vmproc_refresh(const char *rundir, uint64_t latest)
{
    char line[512], cmd[64];
    snprintf(cmd, sizeof cmd, "REFRESH %llu\n", (unsigned long long)latest);
    int rc = ctl_request(rundir, cmd, line, sizeof line);
    return rc < 0 ? err_wrap(rc, "refresh view %s", rundir) : 0;
}

/* Run argv, waiting; on failure the last line of its stderr goes into the
 * error message. */
int
vmproc_run(char *const argv[])
{
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return vr_err(-errno, "pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        return vr_err(-errno, "fork: %s", strerror(errno));
    }
    if (pid == 0) {
        dup2(pipefd[1], 2);
        int devnull = open("/dev/null", O_RDWR);
        dup2(devnull, 0);
        dup2(devnull, 1);
        execvp(argv[0], argv);
        dprintf(2, "exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(pipefd[1]);
    char buf[4096];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(pipefd[0], buf + len, sizeof buf - 1 - len);
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == sizeof buf - 1) {
            memmove(buf, buf + len / 2, len - len / 2);
            len -= len / 2;
        }
    }
    close(pipefd[0]);
    buf[len] = '\0';
    while (len > 0 && buf[len - 1] == '\n')
        buf[--len] = '\0';
    char *last = strrchr(buf, '\n');
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return vr_err(-EIO, "%s failed: %s", argv[0], last ? last + 1 : buf);
    return 0;
}

int
vmproc_make_overlays(const char *rundir, unsigned ndisks,
                     const struct vmproc_disk *disks)
{
    for (unsigned i = 0; i < ndisks; i++) {
        CLEANUP_FREE char *ov = xasprintf("%s/%s.qcow2", rundir, disks[i].id);
        CLEANUP_FREE char *uri = vmproc_nbd_uri(rundir, disks[i].id);
        unlink(ov);
        char *argv[] = { (char *)"qemu-img", (char *)"create", (char *)"-q",
                         (char *)"-f", (char *)"qcow2", (char *)"-F",
                         (char *)"raw", (char *)"-b", uri, ov, NULL };
        int rc = vmproc_run(argv);
        if (rc < 0)
            return err_wrap(rc, "overlay %s on %s", ov, uri);
    }
    return 0;
}

int
vmproc_commit_overlays(const char *rundir, unsigned ndisks,
                       const struct vmproc_disk *disks)
{
    for (unsigned i = 0; i < ndisks; i++) {
        CLEANUP_FREE char *ov = xasprintf("%s/%s.qcow2", rundir, disks[i].id);
        CLEANUP_FREE char *base = xstrdup(disks[i].path);
        /* The overlay's backing file becomes the disk itself (same
         * content: the caller reverted it to the view's point), then its
         * clusters go into the disk.  Both steps can be repeated. */
        char *rebase[] = { (char *)"qemu-img", (char *)"rebase", (char *)"-q",
                           (char *)"-u", (char *)"-f", (char *)"qcow2",
                           (char *)"-F", (char *)"raw", (char *)"-b", base,
                           ov, NULL };
        char *commit[] = { (char *)"qemu-img", (char *)"commit", (char *)"-q",
                           (char *)"-f", (char *)"qcow2", ov, NULL };
        int rc = vmproc_run(rebase);
        if (rc == 0)
            rc = vmproc_run(commit);
        if (rc < 0)
            return err_wrap(rc, "commit overlay %s into %s", ov, base);
        int fd = open(base, O_RDWR | O_CLOEXEC);
        if (fd < 0 || fdatasync(fd) < 0)
            rc = vr_err(-errno, "commit overlay: sync %s: %s", base,
                        strerror(errno));
        if (fd >= 0)
            close(fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int
vmproc_open_cycle(const char *rundir, uint64_t *cycle, uint64_t *open_bytes,
                  uint64_t *open_payload)
{
    char line[512];
    int rc = ctl_request(rundir, "STATUS\n", line, sizeof line);
    if (rc < 0)
        return err_wrap(rc, "status %s", rundir);
    char *end, *end2, *end3;
    uint64_t c, b, p;
    if (!parse_u64(line, &end, &c) || *end != ' ' ||
        !parse_u64(end + 1, &end2, &b) || *end2 != ' ' ||
        !parse_u64(end2 + 1, &end3, &p) || (*end3 && *end3 != ' '))
        return vr_err(-EPROTO, "status %s: bad reply 'OK %.64s'", rundir,
                      line);
    *cycle = c;
    *open_bytes = b;
    *open_payload = p;
    return 0;
}

char *
vmproc_nbd_uri(const char *rundir, const char *disk_id)
{
    return xasprintf("nbd+unix:///%s?socket=%s/nbd.sock", disk_id, rundir);
}
