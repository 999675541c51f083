/* logdir.c: a disk's change-log directory (DISK.vrlog) as the plugin
 * writes it: its sealed cycles and the open one.  The shipper reads it,
 * and a planned failover takes the base of the VM's own log from it. */
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "logdir.h"

char *
logdir_of(const struct disk *dk)
{
    return xasprintf("%s.vrlog", dk->path);
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
        size_t len = strlen(de->d_name);
        if (len < 21 || de->d_name[20] != '.')
            continue;
        uint64_t c = strtoull(de->d_name, NULL, 10);
        if (strcmp(de->d_name + 20, ".open") == 0) {
            if (open_cycle)
                *open_cycle = c;
            continue;
        }
        if (strcmp(de->d_name + 20, ".log") != 0)
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

