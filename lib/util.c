/* util.c: error slot, allocation, full-length I/O, clocks, names and the
 * fault points used by crash tests.  Nothing here logs (lib/ never does). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <linux/openat2.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vr.h"

static __thread char err_slot[1024];

int
vr_err(int rc, const char *fmt, ...)
{
    int saved = errno;
    /* Through a copy: an argument may be vr_errmsg() itself (wrapping the
     * previous error), and vsnprintf's source must not be its target. */
    char buf[sizeof err_slot];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    memcpy(err_slot, buf, sizeof err_slot);
    errno = saved;
    return rc;
}

const char *
vr_errmsg(void)
{
    return err_slot;
}

void
vr_err_clear(void)
{
    err_slot[0] = '\0';
}

const char *
vr_errname(int e)
{
    switch (e) {
#define N(x)                                                                   \
    case x:                                                                    \
        return #x;
        N(EPERM) N(ENOENT) N(EIO) N(E2BIG) N(EBADF) N(EAGAIN) N(ENOMEM)
        N(EACCES) N(EFAULT) N(EBUSY) N(EEXIST) N(EXDEV) N(ENODEV) N(ENOTDIR)
        N(EISDIR) N(EINVAL) N(ENFILE) N(EMFILE) N(EFBIG) N(ENOSPC) N(ESPIPE)
        N(EROFS) N(EPIPE) N(ERANGE) N(ENAMETOOLONG) N(ENOSYS) N(ENOTEMPTY)
        N(ELOOP) N(ENODATA) N(ETIME) N(EPROTO) N(EBADMSG) N(EOVERFLOW)
        N(EMSGSIZE) N(EPROTONOSUPPORT) N(EOPNOTSUPP) N(EADDRINUSE)
        N(ECONNABORTED) N(ECONNRESET) N(ENOTCONN) N(ETIMEDOUT)
        N(ECONNREFUSED) N(EHOSTUNREACH) N(EALREADY) N(EINPROGRESS)
        N(ESTALE) N(ECANCELED) N(EKEYREJECTED)
#undef N
    default:
        return "E?";
    }
}

static void
oom(void)
{
    static const char msg[] = "vmreplica: out of memory\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    abort();
}

void *
xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom();
    return p;
}

void *
xcalloc(size_t nmemb, size_t n)
{
    void *p = calloc(nmemb ? nmemb : 1, n ? n : 1);
    if (!p)
        oom();
    return p;
}

void *
xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        oom();
    return p;
}

char *
xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p)
        oom();
    return p;
}

char *
xstrndup(const char *s, size_t n)
{
    char *p = strndup(s, n);
    if (!p)
        oom();
    return p;
}

char *
xasprintf(const char *fmt, ...)
{
    char *p;
    va_list ap;
    va_start(ap, fmt);
    int r = vasprintf(&p, fmt, ap);
    va_end(ap);
    if (r < 0)
        oom();
    return p;
}

int
io_pwrite_all(int fd, const void *buf, size_t len, off_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += r;
        len -= (size_t)r;
        off += r;
    }
    return 0;
}

int
io_pread_all(int fd, void *buf, size_t len, off_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -ENODATA;
        p += r;
        len -= (size_t)r;
        off += r;
    }
    return 0;
}

int
io_write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t r = write(fd, p, len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += r;
        len -= (size_t)r;
    }
    return 0;
}

ssize_t
io_read_full(int fd, void *buf, size_t len)
{
    char *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, p + got, len - got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

int
io_fsync_dirfd(int dirfd)
{
    if (fsync(dirfd) < 0 && errno != EINVAL)
        return -errno;
    return 0;
}

int
io_fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = io_fsync_dirfd(fd);
    close(fd);
    return rc;
}

int
io_clear_dirfd(int fd, const char *name)
{
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return vr_err(-e, "open %s: %s", name, strerror(e));
    }
    int n = 0, rc = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        if (unlinkat(dirfd(d), de->d_name, 0) == 0)
            n++;
        else if (errno != EISDIR && errno != ENOENT && rc == 0)
            rc = vr_err(-errno, "remove %s/%s: %s", name, de->d_name,
                        strerror(errno));
    }
    if (rc == 0 && (rc = io_fsync_dirfd(dirfd(d))) < 0)
        rc = vr_err(rc, "sync %s: %s", name, strerror(-rc));
    closedir(d);
    return rc < 0 ? rc : n;
}

int
io_read_file(const char *path, size_t max_bytes, char **out, size_t *len_out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "open %s: %s", path, strerror(errno));
    char *buf = xmalloc(max_bytes + 1);
    ssize_t n = io_read_full(fd, buf, max_bytes + 1);
    close(fd);
    if (n < 0) {
        free(buf);
        return vr_err((int)n, "read %s: %s", path, strerror((int)-n));
    }
    if ((size_t)n > max_bytes) {
        free(buf);
        return vr_err(-EFBIG, "read %s: larger than %zu bytes", path,
                      max_bytes);
    }
    buf[n] = '\0';
    *out = buf;
    if (len_out)
        *len_out = (size_t)n;
    return 0;
}

static char *
dirname_of(const char *path)
{
    char *d = xstrdup(path);
    char *slash = strrchr(d, '/');
    if (!slash) {
        free(d);
        return xstrdup(".");
    }
    if (slash == d)
        slash[1] = '\0';
    else
        *slash = '\0';
    return d;
}

int
io_write_file_atomic(const char *path, const void *buf, size_t len)
{
    CLEANUP_FREE char *tmp = xasprintf("%s.tmp", path);
    CLEANUP_FREE char *dir = dirname_of(path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return vr_err(-errno, "create %s: %s", tmp, strerror(errno));
    int rc = io_write_all(fd, buf, len);
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    close(fd);
    if (rc == 0 && rename(tmp, path) < 0)
        rc = -errno;
    if (rc == 0)
        rc = io_fsync_dir(dir);
    if (rc < 0) {
        unlink(tmp);
        return vr_err(rc, "write %s: %s", path, strerror(-rc));
    }
    return 0;
}

/* The pid in a lock file, 0 if it holds none (yet: its holder writes it
 * just after taking the lock). */
static pid_t
lock_holder(int fd)
{
    char buf[32];
    for (int tries = 0; tries < 50; tries++) {
        ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
        if (n > 0) {
            buf[n] = '\0';
            char *end;
            long v = strtol(buf, &end, 10);
            if (end != buf && *end == '\n' && v > 0 && v <= INT_MAX)
                return (pid_t)v;
        }
        vr_sleep_ms(20);
    }
    return 0;
}

int
io_lock_file(const char *path, int *fd, pid_t *holder)
{
    *holder = 0;
    int lfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (lfd < 0)
        return vr_err(-errno, "open %s: %s", path, strerror(errno));
    /* A holder that lets go within a second is waited out: a probe (the
     * resource agent's "flock -n -s FILE true") holds it for an instant,
     * and a daemon starting under load met one (a CI flake: "already
     * running" with no daemon running).  A real holder keeps it. */
    int rc, waits = 0;
    while ((rc = flock(lfd, LOCK_EX | LOCK_NB)) < 0) {
        if (errno == EINTR)
            continue;
        if (errno != EWOULDBLOCK || ++waits > 50)
            break;
        vr_sleep_ms(20);
    }
    if (rc < 0) {
        int e = errno;
        if (e == EWOULDBLOCK)
            *holder = lock_holder(lfd);
        close(lfd);
        return e == EWOULDBLOCK
                   ? vr_err(-EWOULDBLOCK, "%s is locked (pid %d)", path,
                            (int)*holder)
                   : vr_err(-e, "lock %s: %s", path, strerror(e));
    }
    *fd = lfd;
    return 0;
}

int
io_lock_note_pid(int fd, pid_t pid)
{
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%d\n", (int)pid);
    if (ftruncate(fd, 0) < 0)
        return vr_err(-errno, "lock file: truncate: %s", strerror(errno));
    int rc = io_pwrite_all(fd, buf, (size_t)n, 0);
    return rc < 0 ? vr_err(rc, "lock file: write: %s", strerror(-rc)) : 0;
}

int
io_mkdir_p(const char *path, mode_t mode)
{
    CLEANUP_FREE char *p = xstrdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = '\0';
        if (mkdir(p, mode) < 0 && errno != EEXIST)
            return vr_err(-errno, "mkdir %s: %s", p, strerror(errno));
        *s = '/';
    }
    if (mkdir(p, mode) < 0 && errno != EEXIST)
        return vr_err(-errno, "mkdir %s: %s", p, strerror(errno));
    return 0;
}

int
io_mkdir_beneath(const char *root, const char *rel, mode_t mode)
{
    int fd = open(root, O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "open %s: %s", root, strerror(errno));
    CLEANUP_FREE char *p = xstrdup(rel);
    int rc = 0;
    char *save = NULL;
    for (char *c = strtok_r(p, "/", &save); c && rc == 0;
         c = strtok_r(NULL, "/", &save)) {
        if (strcmp(c, ".") == 0 || strcmp(c, "..") == 0) {
            rc = vr_err(-EINVAL, "%s/%s: '%s' in the path", root, rel, c);
            break;
        }
        if (mkdirat(fd, c, mode) < 0 && errno != EEXIST) {
            rc = vr_err(-errno, "mkdir %s/%s: %s", root, rel, strerror(errno));
            break;
        }
        /* The kernel's RESOLVE_NO_SYMLINKS, one component at a time. */
        int next = openat(fd, c, O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (next < 0)
            rc = vr_err(errno == ENOTDIR ? -ELOOP : -errno,
                        "%s/%s: '%s' is a symbolic link or not a directory",
                        root, rel, c);
        close(fd);
        fd = next;
    }
    if (fd >= 0)
        close(fd);
    return rc;
}

/* --- opening beneath a directory ------------------------------------ */

static bool beneath_fallback_only;

void
io_beneath_force_fallback(bool on)
{
    beneath_fallback_only = on;
}

/* A component refused by the per-component walk: say why with -ELOOP for
 * a symbolic link, else the open's own errno. */
static int
beneath_refusal(int dirfd, const char *name, int e, const char *relpath)
{
    struct stat st;
    if ((e == ENOTDIR || e == ELOOP) &&
        fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISLNK(st.st_mode))
        return vr_err(-ELOOP, "%s: '%s' is a symbolic link (not followed)",
                      relpath, name);
    return vr_err(-e, "%s: %s", relpath, strerror(e));
}

/* What openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) does, with one
 * openat(O_NOFOLLOW) per component: for kernels without openat2 (< 5.6)
 * or where a sandbox refuses it.  No component is "..": the caller
 * checked. */
static int
open_beneath_walk(int rootfd, const char *relpath, int flags, mode_t mode)
{
    CLEANUP_FREE char *p = xstrdup(relpath);
    char *save = NULL;
    char *c = strtok_r(p, "/", &save);
    int fd = rootfd;
    while (c) {
        char *after = strtok_r(NULL, "/", &save);
        int next = after ? openat(fd, c, O_PATH | O_DIRECTORY | O_NOFOLLOW |
                                  O_CLOEXEC)
                         : openat(fd, c, flags | O_NOFOLLOW | O_CLOEXEC,
                                  mode);
        if (next < 0)
            next = beneath_refusal(fd, c, errno, relpath);
        if (fd != rootfd)
            close(fd);
        if (next < 0 || !after)
            return next;
        fd = next;
        c = after;
    }
    return vr_err(-EINVAL, "%s: no file named", relpath);
}

int
io_open_beneath(int rootfd, const char *relpath, int flags, mode_t mode)
{
    size_t len = strlen(relpath);
    if (len == 0)
        return vr_err(-EINVAL, "open beneath a directory: empty path");
    if (len >= PATH_MAX)
        return vr_err(-ENAMETOOLONG, "%.64s...: path too long", relpath);
    if (relpath[0] == '/')
        return vr_err(-EXDEV, "%s: an absolute path, not beneath the "
                      "directory", relpath);
    for (const char *c = relpath; *c;) {
        size_t n = strcspn(c, "/");
        if (n == 2 && c[0] == '.' && c[1] == '.')
            return vr_err(-EXDEV, "%s: '..' leads out of the directory",
                          relpath);
        c += n;
        c += strspn(c, "/");
    }
    if (!(flags & (O_CREAT | O_TMPFILE)))
        mode = 0;
#ifdef SYS_openat2
    if (!beneath_fallback_only) {
        struct open_how how = {
            .flags = (uint64_t)(flags | O_CLOEXEC),
            .mode = mode,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                       RESOLVE_NO_MAGICLINKS,
        };
        int fd;
        /* EAGAIN: a rename raced the lookup; it is safe to retry. */
        for (int tries = 0; tries < 8; tries++) {
            fd = (int)syscall(SYS_openat2, rootfd, relpath, &how, sizeof how);
            if (fd >= 0 || errno != EAGAIN)
                break;
        }
        if (fd >= 0)
            return fd;
        int e = errno;
        if (e == ELOOP)
            return vr_err(-ELOOP, "%s: a symbolic link in the path (not "
                          "followed)", relpath);
        if (e == EXDEV)
            return vr_err(-EXDEV, "%s: leads out of the directory", relpath);
        /* ENOSYS: an old kernel; EPERM: a seccomp filter that does not
         * know openat2.  Walk the components instead. */
        if (e != ENOSYS && e != EPERM)
            return vr_err(-e, "%s: %s", relpath, strerror(e));
    }
#endif
    return open_beneath_walk(rootfd, relpath, flags, mode);
}

uint64_t
vr_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

uint64_t
vr_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void
vr_test_delay(const char *env, long max_ms)
{
    const char *v = getenv(env);
    long ms = v ? atol(v) : 0;
    if (ms > 0 && ms < max_ms)
        vr_sleep_ms((unsigned)ms);
}

void
io_write_behind(int fd, uint64_t *pending, uint64_t n)
{
    *pending += n;
    if (*pending < (8u << 20))
        return;
    *pending = 0;
    (void)sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
}

void
vr_sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

void
vr_thread_name(const char *fmt, ...)
{
    char name[16];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    (void)pthread_setname_np(pthread_self(), name);
}

void
vr_rfc3339(uint64_t wall_ms, char out[32])
{
    time_t t = (time_t)(wall_ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* "YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)" (T or a space), as
 * vr_rfc3339 writes it and RFC 3339 allows; the fraction is dropped. */
int
vr_parse_rfc3339(const char *s, uint64_t *wall_ms)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    int n = 0;
    if (strlen(s) > 40 ||
        sscanf(s, "%4d-%2d-%2d%*1[Tt ]%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
               &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6 ||
        n != 19)
        return -EINVAL;
    const char *p = s + n;
    if (*p == '.')
        for (p++; *p >= '0' && *p <= '9'; p++)
            ;
    long off = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int hh, mm, k = 0;
        if (sscanf(p + 1, "%2d:%2d%n", &hh, &mm, &k) != 2 || k != 5 ||
            hh > 23 || mm > 59)
            return -EINVAL;
        off = (*p == '-' ? -1 : 1) * (hh * 3600L + mm * 60L);
        p += 6;
    } else {
        return -EINVAL;
    }
    if (*p || tm.tm_year < 1970 || tm.tm_mon < 1 || tm.tm_mon > 12 ||
        tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 ||
        tm.tm_min > 59 || tm.tm_sec > 60)
        return -EINVAL;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    if (t == (time_t)-1 || t - off < 0)
        return -EINVAL;
    *wall_ms = (uint64_t)(t - off) * 1000;
    return 0;
}

bool
vr_name_valid(const char *name)
{
    size_t n = strlen(name);
    if (n < 1 || n > 64 || name[0] == '.' || name[0] == ' ' ||
        name[0] == '-')
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-' ||
              c == ' '))
            return false;
    }
    return true;
}

const char *
vr_qname(const char *name, char buf[VR_QNAME_MAX])
{
    if (*name && strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRST"
                              "UVWXYZ0123456789._-") == strlen(name))
        return name;
    snprintf(buf, VR_QNAME_MAX, "'%s'", name);
    return buf;
}

bool
vr_uuid_valid(const char *u)
{
    if (strlen(u) != 36)
        return false;
    for (int i = 0; i < 36; i++) {
        char c = u[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return false;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return false;
        }
    }
    return true;
}

void
vr_uuid_new(char out[37])
{
    uint8_t b[16];
    size_t got = 0;
    while (got < sizeof b) {
        ssize_t r = getrandom(b + got, sizeof b - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            abort();
        }
        got += (size_t)r;
    }
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
             b[11], b[12], b[13], b[14], b[15]);
}

int
vr_parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (!*s || *s == '-')
        return -EINVAL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return -EINVAL;
    unsigned shift = 0;
    switch (*end) {
    case '\0':
        break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    default:
        return -EINVAL;
    }
    if (*end == 'i' && shift)
        end++;
    if ((*end == 'B' || *end == 'b') && shift)
        end++;
    if (*end != '\0')
        return -EINVAL;
    if (shift && v > (UINT64_MAX >> shift))
        return -ERANGE;
    *out = (uint64_t)v << shift;
    return 0;
}

int
vr_parse_duration(const char *s, uint64_t *out_s)
{
    char *end;
    errno = 0;
    if (!*s || *s == '-')
        return -EINVAL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return -EINVAL;
    uint64_t mul = 1;
    if (*end == 's')
        end++;
    else if (*end == 'm')
        mul = 60, end++;
    else if (*end == 'h')
        mul = 3600, end++;
    if (*end != '\0' || v > UINT32_MAX)
        return -EINVAL;
    *out_s = v * mul;
    return 0;
}

/* --- fault points ------------------------------------------------------ */

static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
static int fault_state = -1; /* -1 unparsed, 0 none, 1 some */
static struct {
    char name[48];
    long when;
    long hits;
    long pause_ms; /* > 0: sleep this long at the hit instead of dying */
} faults[8];
static unsigned nfaults;

static void
fault_parse(void)
{
    const char *env = getenv("VMREPLICA_FAULT");
    fault_state = 0;
    if (!env || !*env)
        return;
    CLEANUP_FREE char *copy = xstrdup(env);
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok && nfaults < 8;
         tok = strtok_r(NULL, ",", &save)) {
        /* name:N or name:N:pause=MS */
        long pause_ms = 0;
        char *colon = strrchr(tok, ':');
        if (colon && strncmp(colon + 1, "pause=", 6) == 0) {
            pause_ms = atol(colon + 7);
            *colon = '\0';
            colon = strrchr(tok, ':');
        }
        if (!colon || colon - tok >= 48)
            continue;
        *colon = '\0';
        snprintf(faults[nfaults].name, sizeof faults[0].name, "%s", tok);
        faults[nfaults].when = atol(colon + 1);
        faults[nfaults].pause_ms = pause_ms;
        nfaults++;
    }
    fault_state = nfaults > 0;
}

void
vr_fault_point(const char *name)
{
    if (likely(fault_state == 0))
        return;
    pthread_mutex_lock(&fault_lock);
    if (fault_state < 0)
        fault_parse();
    long pause_ms = 0;
    for (unsigned i = 0; i < nfaults; i++) {
        if (strcmp(faults[i].name, name) == 0 &&
            ++faults[i].hits == faults[i].when) {
            char msg[96];
            int n = snprintf(msg, sizeof msg, "vmreplica: fault point %s "
                             "hit%s\n", name,
                             faults[i].pause_ms ? ", pausing" : "");
            ssize_t r = write(2, msg, (size_t)n);
            (void)r;
            if (!faults[i].pause_ms)
                raise(SIGKILL);
            pause_ms = faults[i].pause_ms;
        }
    }
    pthread_mutex_unlock(&fault_lock);
    if (pause_ms > 0)
        vr_sleep_ms((unsigned)pause_ms);
}

/* --- host names and authorization patterns --------------------------------- */

bool
vr_fqdn_valid(const char *name)
{
    size_t n = name ? strlen(name) : 0, label = 0;
    if (n == 0 || n > 253)
        return false;
    for (size_t i = 0; i <= n; i++) {
        char c = name[i];
        if (c == '.' || c == '\0') {
            if (label == 0 || label > 63 || name[i - 1] == '-')
                return false;
            label = 0;
            continue;
        }
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                  (c >= '0' && c <= '9') || (c == '-' && label > 0);
        if (!ok)
            return false;
        label++;
    }
    return true;
}

bool
vr_fqdn_pattern_valid(const char *pattern)
{
    if (pattern && pattern[0] == '*')
        return pattern[1] == '.' && vr_fqdn_valid(pattern + 2);
    return vr_fqdn_valid(pattern);
}

bool
vr_fqdn_match(const char *pattern, const char *name)
{
    if (!vr_fqdn_pattern_valid(pattern) || !vr_fqdn_valid(name))
        return false;
    if (pattern[0] != '*')
        return strcasecmp(pattern, name) == 0;
    /* "*.rest": name is one label, a dot, then exactly rest. */
    const char *dot = strchr(name, '.');
    return dot && strcasecmp(dot + 1, pattern + 2) == 0;
}
