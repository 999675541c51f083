/* logdir.c: a disk's change-log directory (DISK.vrlog) as the plugin
 * writes it: its sealed cycles and the open one.  The shipper reads it,
 * and a planned failover takes the base of the VM's own log from it. */
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <fcntl.h>
#include <unistd.h>

#include "dirtymap.h"
#include "logdir.h"

char *
logdir_of(const struct disk *dk)
{
    return xasprintf("%s.vrlog", dk->path);
}

const char *
logdir_name(const char *name, uint64_t *cycle)
{
    uint64_t c = 0;
    for (int i = 0; i < 20; i++) {
        if (name[i] < '0' || name[i] > '9')
            return NULL;
        c = c * 10 + (uint64_t)(name[i] - '0');
    }
    if (name[20] != '.' || name[21] == '\0')
        return NULL;
    *cycle = c;
    return name + 21;
}

int
logdir_sealed(const char *dir, uint64_t **out, size_t *n,
              uint64_t *open_cycle)
{
    *out = NULL;
    *n = 0;
    if (open_cycle)
        *open_cycle = 0;
    DIR *d = opendir(dir);
    if (!d)
        return errno == ENOENT ? 0 : vr_err(-errno, "open %s: %s", dir,
                                            strerror(errno));
    size_t cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        uint64_t c;
        const char *ext = logdir_name(de->d_name, &c);
        if (ext && strcmp(ext, "open") == 0) {
            if (open_cycle)
                *open_cycle = c;
            continue;
        }
        if (!ext || strcmp(ext, "log") != 0)
            continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            *out = xrealloc(*out, cap * sizeof **out);
        }
        (*out)[(*n)++] = c;
    }
    closedir(d);
    for (size_t i = 1; i < *n; i++)
        for (size_t j = i; j > 0 && (*out)[j - 1] > (*out)[j]; j--) {
            uint64_t t = (*out)[j];
            (*out)[j] = (*out)[j - 1];
            (*out)[j - 1] = t;
        }
    return 0;
}

int
logdir_base(const struct disk *dk, uint64_t *base)
{
    CLEANUP_FREE char *dir = logdir_of(dk);
    CLEANUP_FREE uint64_t *cs = NULL;
    size_t n;
    uint64_t open_cycle = 0;
    int rc = logdir_sealed(dir, &cs, &n, &open_cycle);
    if (rc < 0)
        return rc;
    *base = n ? cs[n - 1] : 0;
    if (open_cycle && open_cycle - 1 > *base)
        *base = open_cycle - 1;
    return 0;
}

bool
logdir_tracking_stopped(const struct vm *vm)
{
    bool any = false;
    for (unsigned i = 0; i < vm->ndisks && !any; i++) {
        CLEANUP_FREE char *path = xasprintf("%s.vrlog/" TRACKING_NAME,
                                            vm->disks[i].path);
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) {
            any = errno != ENOENT;
            continue;
        }
        bool stopped = true;
        uint64_t c = 0;
        char why[8];
        if (tracking_marker_read(fd, &stopped, &c, why, sizeof why) < 0)
            stopped = true;
        close(fd);
        any = stopped;
    }
    vr_err_clear();
    return any;
}
