/* powercut.c: an LD_PRELOAD layer for nbdkit that records what a power
 * loss would keep of the files under one directory (tests/integration/
 * power-cut.py, docs/reliability.md "Power loss").  A test tool, not
 * installed.
 *
 *   LD_PRELOAD=libpowercut.so POWERCUT_DIR=/abs/dir POWERCUT_SHADOW=/abs/sh
 *
 * After every fsync or fdatasync of a regular file under POWERCUT_DIR
 * returns (and every msync of a mapping of one), the file's whole content
 * is copied to the same relative path under POWERCUT_SHADOW: the shadow
 * holds at least what the sync made durable (a write racing with the
 * sync may be in it too, which a real sync may also have caught).  The
 * driver kills nbdkit and then builds a power-loss state from the live
 * file (the page cache) and its shadow (the disk): each 512-byte sector
 * where they differ is kept or dropped.  renameat/renameat2/rename and
 * unlink/unlinkat move or remove the shadow with the file.
 *
 * What it cannot do: names, sizes and holes are taken as durable in the
 * order they happen (metadata is not dropped; a directory fsync is not
 * needed for a name to survive), and a sector written twice between syncs
 * is kept at its last content or its synced one, never an intermediate.
 * Data written through a shared mapping counts as unsynced until an
 * fdatasync, fsync or msync of the file, which is what Linux does.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Paths here are short (test directories); keeps frames small. */
#define PLEN 1024

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static const char *
env(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

/* rel: the path of `path` below POWERCUT_DIR, or NULL. */
static const char *
below_dir(const char *path)
{
    const char *dir = env("POWERCUT_DIR");
    size_t n = dir ? strlen(dir) : 0;
    if (!dir || strncmp(path, dir, n) != 0 || path[n] != '/')
        return NULL;
    return path + n + 1;
}

static bool
fd_path(int fd, char *out, size_t len)
{
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, len - 1);
    if (n < 0)
        return false;
    out[n] = 0;
    return true;
}

/* dirfd + name as an absolute path. */
static bool
at_path(int dirfd, const char *name, char *out, size_t len)
{
    if (name[0] == '/' || dirfd == AT_FDCWD) {
        if (name[0] == '/')
            snprintf(out, len, "%s", name);
        else if (!getcwd(out, len) ||
                 strlen(out) + strlen(name) + 2 > len)
            return false;
        else
            strcat(strcat(out, "/"), name);
        return true;
    }
    char d[PLEN];
    if (!fd_path(dirfd, d, sizeof d))
        return false;
    return (size_t)snprintf(out, len, "%s/%s", d, name) < len;
}

static void
shadow_of(const char *rel, char *out, size_t len)
{
    snprintf(out, len, "%s/%s", env("POWERCUT_SHADOW"), rel);
}

static void
mkparents(const char *path)
{
    char p[PLEN];
    snprintf(p, sizeof p, "%s", path);
    for (char *s = strchr(p + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = 0;
        mkdir(p, 0700);
        *s = '/';
    }
}

/* Copy the data extents of the file open as fd to its shadow, holes as
 * holes. */
static void
snapshot_fd(int fd)
{
    char path[PLEN], sh[PLEN];
    struct stat st;
    const char *rel;
    if (!env("POWERCUT_SHADOW") || !fd_path(fd, path, sizeof path) ||
        !(rel = below_dir(path)) || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
        return;
    shadow_of(rel, sh, sizeof sh);
    pthread_mutex_lock(&lock);
    mkparents(sh);
    /* Into a temporary file renamed over the shadow: a SIGKILL during the
     * copy (before the sync returns to its caller) leaves the previous
     * shadow whole. */
    char tmp[PLEN + 8];
    snprintf(tmp, sizeof tmp, "%s.pc-tmp", sh);
    int in = open(path, O_RDONLY | O_CLOEXEC);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    bool ok = false;
    if (in >= 0 && out >= 0 && ftruncate(out, st.st_size) == 0) {
        ok = true;
        static char buf[1 << 16];
        off_t pos = 0;
        while (pos < st.st_size) {
            off_t data = lseek(in, pos, SEEK_DATA);
            if (data < 0)
                break;
            off_t hole = lseek(in, data, SEEK_HOLE);
            if (hole < 0)
                hole = st.st_size;
            for (off_t o = data; o < hole && ok;) {
                size_t k = (size_t)(hole - o) < sizeof buf ?
                           (size_t)(hole - o) : sizeof buf;
                ssize_t r = pread(in, buf, k, o);
                ok = r > 0 && pwrite(out, buf, (size_t)r, o) == r;
                o += r > 0 ? r : 0;
            }
            pos = hole;
        }
    }
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    if (ok)
        syscall(SYS_renameat2, AT_FDCWD, tmp, AT_FDCWD, sh, 0);
    else
        syscall(SYS_unlinkat, AT_FDCWD, tmp, 0);
    pthread_mutex_unlock(&lock);
}

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) \
        real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

int
fsync(int fd)
{
    REAL(int, fsync, int);
    int rc = real_fsync(fd);
    if (rc == 0) {
        int e = errno;
        snapshot_fd(fd);
        errno = e;
    }
    return rc;
}

int
fdatasync(int fd)
{
    REAL(int, fdatasync, int);
    int rc = real_fdatasync(fd);
    if (rc == 0) {
        int e = errno;
        snapshot_fd(fd);
        errno = e;
    }
    return rc;
}

/* Mappings of files under the directory, for msync. */
struct map {
    void *addr;
    size_t len;
    int fd; /* a dup, kept open while mapped */
};
static struct map maps[256];

void *
mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    REAL(void *, mmap, void *, size_t, int, int, int, off_t);
    void *p = real_mmap(addr, len, prot, flags, fd, off);
    char path[PLEN];
    if (p != MAP_FAILED && fd >= 0 && (flags & MAP_SHARED) &&
        fd_path(fd, path, sizeof path) && below_dir(path)) {
        int e = errno;
        pthread_mutex_lock(&lock);
        for (unsigned i = 0; i < sizeof maps / sizeof *maps; i++)
            if (!maps[i].addr) {
                maps[i] = (struct map){ p, len, fcntl(fd, F_DUPFD_CLOEXEC, 0) };
                break;
            }
        pthread_mutex_unlock(&lock);
        errno = e;
    }
    return p;
}

int
munmap(void *addr, size_t len)
{
    REAL(int, munmap, void *, size_t);
    pthread_mutex_lock(&lock);
    for (unsigned i = 0; i < sizeof maps / sizeof *maps; i++)
        if (maps[i].addr == addr) {
            close(maps[i].fd);
            maps[i].addr = NULL;
        }
    pthread_mutex_unlock(&lock);
    return real_munmap(addr, len);
}

int
msync(void *addr, size_t len, int flags)
{
    REAL(int, msync, void *, size_t, int);
    int rc = real_msync(addr, len, flags);
    if (rc == 0 && (flags & MS_SYNC)) {
        int fd = -1;
        pthread_mutex_lock(&lock);
        for (unsigned i = 0; i < sizeof maps / sizeof *maps; i++)
            if (maps[i].addr && (char *)addr >= (char *)maps[i].addr &&
                (char *)addr < (char *)maps[i].addr + maps[i].len)
                fd = fcntl(maps[i].fd, F_DUPFD_CLOEXEC, 0);
        pthread_mutex_unlock(&lock);
        if (fd >= 0) {
            snapshot_fd(fd);
            close(fd);
        }
    }
    return rc;
}

/* Move or remove a shadow with its file. */
static void
shadow_rename(const char *from, const char *to)
{
    const char *rf = below_dir(from), *rt = below_dir(to);
    char a[PLEN], b[PLEN];
    if (!env("POWERCUT_SHADOW"))
        return;
    int e = errno;
    pthread_mutex_lock(&lock);
    if (rt) {
        shadow_of(rt, b, sizeof b);
        if (rf) {
            shadow_of(rf, a, sizeof a);
            mkparents(b);
            /* Raw system calls: not this layer's own wrappers. */
            if (syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, 0) < 0)
                syscall(SYS_unlinkat, AT_FDCWD, b, 0); /* never synced */
        } else {
            syscall(SYS_unlinkat, AT_FDCWD, b, 0);
        }
    } else if (rf) {
        shadow_of(rf, a, sizeof a);
        syscall(SYS_unlinkat, AT_FDCWD, a, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = e;
}

int
renameat2(int od, const char *o, int nd, const char *n, unsigned flags)
{
    REAL(int, renameat2, int, const char *, int, const char *, unsigned);
    char a[PLEN], b[PLEN];
    bool ok = at_path(od, o, a, sizeof a) && at_path(nd, n, b, sizeof b);
    int rc = real_renameat2(od, o, nd, n, flags);
    if (rc == 0 && ok)
        shadow_rename(a, b);
    return rc;
}

int
renameat(int od, const char *o, int nd, const char *n)
{
    return renameat2(od, o, nd, n, 0);
}

int
rename(const char *o, const char *n)
{
    return renameat2(AT_FDCWD, o, AT_FDCWD, n, 0);
}

int
unlinkat(int dirfd, const char *name, int flags)
{
    REAL(int, unlinkat, int, const char *, int);
    char a[PLEN];
    bool ok = at_path(dirfd, name, a, sizeof a);
    int rc = real_unlinkat(dirfd, name, flags);
    if (rc == 0 && ok && !(flags & AT_REMOVEDIR))
        shadow_rename(a, "");
    return rc;
}

int
unlink(const char *name)
{
    return unlinkat(AT_FDCWD, name, 0);
}
