/* view.c: view mode of nbdkit-vmreplica-plugin (plugin.h).
 *
 * View mode (view=UNDODIR:POINT:LATEST): serve the disks read-only as they
 * were at recovery point POINT of a Replica VM whose latest applied cycle
 * is LATEST, from the live disks plus the undo spans (lib/undo.h); no
 * change log.  REFRESH N on the control socket moves LATEST to N once the
 * span of cycle N is captured, before cycle N is applied, so the view stays
 * at POINT while replication continues.
 */
#define NBDKIT_API_VERSION 2
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <nbdkit-plugin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "plugin.h"
#include "undo.h"
#include "vr.h"

char *view_dir;
uint64_t view_point, view_latest;
static struct undo_view *view;
static int view_dirfd = -1;
static pthread_rwlock_t view_lock = PTHREAD_RWLOCK_INITIALIZER;

int
view_open(void)
{
    uint64_t sizes[MAX_DISKS];
    for (unsigned i = 0; i < ndisks; i++)
        sizes[i] = disks[i].size;
    view_dirfd = open(view_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (view_dirfd < 0) {
        nbdkit_error("view: open %s: %m", view_dir);
        return -1;
    }
    if (undo_view_open(view_dirfd, view_point, view_latest, ndisks, sizes,
                       &view) < 0) {
        nbdkit_error("view of point %" PRIu64 ": %s", view_point,
                     vr_errmsg());
        return -1;
    }
    nbdkit_debug("serving point %" PRIu64 " (latest %" PRIu64 ") of %u "
                 "disks read-only", view_point, view_latest, ndisks);
    return 0;
}

/* REFRESH N: the span of cycle N is in place and cycle N is about to be
 * applied: re-index up to N, so reads keep returning the point's data. */
void
view_refresh(const char *arg, char *reply, size_t n)
{
    char *end;
    errno = 0;
    uint64_t latest = strtoull(arg, &end, 10);
    if (errno || end == arg || *end || latest < view_latest) {
        snprintf(reply, n, "ERR REFRESH wants a cycle >= %" PRIu64,
                 view_latest);
        return;
    }
    uint64_t sizes[MAX_DISKS];
    for (unsigned i = 0; i < ndisks; i++)
        sizes[i] = disks[i].size;
    struct undo_view *nv = NULL;
    pthread_rwlock_wrlock(&view_lock);
    if (undo_view_open(view_dirfd, view_point, latest, ndisks, sizes, &nv) <
        0) {
        snprintf(reply, n, "ERR %s", vr_errmsg());
    } else {
        undo_view_free(view);
        view = nv;
        view_latest = latest;
        snprintf(reply, n, "OK %" PRIu64 " %" PRIu64, view_point, latest);
    }
    pthread_rwlock_unlock(&view_lock);
}

int
view_read(struct disk *d, void *buf, uint64_t offset, uint32_t count)
{
    pthread_rwlock_rdlock(&view_lock);
    int rc = undo_view_read(view, (unsigned)(d - disks), d->fd, buf, offset,
                            count);
    pthread_rwlock_unlock(&view_lock);
    return rc;
}

void
view_close(void)
{
    undo_view_free(view);
    view = NULL;
    if (view_dirfd >= 0)
        close(view_dirfd);
    view_dirfd = -1;
    free(view_dir);
    view_dir = NULL;
}
