/* history.c: recovery history of Replica VMs (SPEC §7, lib/undo.h).
 *
 * With recovery history on (recovery_history N > 0), every cycle's undo
 * data is captured before the cycle is applied (STORAGE/undo/a-b.undo), and
 * every applied cycle becomes a recovery point — from the first cycle at
 * whose seal the Replica VM equals the primary on (repl_first_point():
 * cycles sealed while the initial copy read the live disk are not points,
 * see design.md "Cycles and crash consistency").  After each apply the
 * retention policy decides which points stay:
 *
 *   - the latest point, always, and the point of a running test failover;
 *   - a recent window: every point applied within the last interval
 *     (point_interval, an hour unless shortened for tests), so the last
 *     hour can be opened at any cycle boundary;
 *   - one point per interval for the last N intervals: the newest point
 *     of each interval-aligned bucket of wall-clock time, and the newest
 *     application-consistent point of the bucket if there is one.
 *
 * Dropping a point merges the two undo spans on either side of it (the
 * older one's data wins), which frees the data only that point needed;
 * spans older than the oldest kept point are deleted.  The catalog is
 * changed first and the files follow it; history_recover() makes the files
 * agree with the catalog again after a crash at any step.
 *
 * Locking: the catalog work runs under d->lock; file work (capture, merge,
 * delete) runs without it, on the applier thread, which is the only one
 * that changes a VM's undo directory while it runs.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "replica-int.h"
#include "undo.h"

static char *
undo_dir(const struct repl *r)
{
    return xasprintf("%s/undo", r->storage);
}

/* The undo directory, made if need be, opened beneath the storage
 * location: a symbolic link on the way (STORAGE/UUID or undo itself) is
 * refused, never followed.  Its files are then used relative to *dfd. */
static int
open_undo_dir(const struct repl *r, int *dfd)
{
    CLEANUP_FREE char *dir = undo_dir(r);
    int rc = storage_mkdir(r->storage, dir);
    if (rc < 0)
        return rc;
    *dfd = storage_open(r->storage, dir, O_RDONLY | O_DIRECTORY, 0);
    return *dfd < 0 ? *dfd : 0;
}

int
history_reset(struct vm *vm)
{
    struct repl *r = vm->repl;
    int rc = catalog_delete_point(rctx.d->cat, vm->uuid, 0);
    if (rc < 0 || !r || !r->storage)
        return rc;
    CLEANUP_FREE char *dir = undo_dir(r);
    rc = storage_clear_dir(r->storage, dir);
    return rc < 0 ? rc : 0;
}

int
history_capture(struct vm *vm, uint64_t n, const char *payload_path)
{
    /* Called without d->lock by the applier; the VM cannot go away while
     * VM_OP_APPLY is in progress, and its disk table is fixed. */
    if (!vm->repl || vm->repl->recovery_history == 0)
        return 0;
    int dfd = -1, pfd = -1, fds[MAX_DISKS];
    uint64_t sizes[MAX_DISKS], bytes = 0;
    unsigned opened = 0;
    int rc = open_undo_dir(vm->repl, &dfd);
    if (rc == 0) {
        pfd = storage_open(vm->dir, payload_path, O_RDONLY, 0);
        if (pfd < 0)
            rc = pfd;
    }
    for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++) {
        fds[i] = storage_open(vm->dir, vm->disks[i].path, O_RDONLY, 0);
        if (fds[i] < 0) {
            rc = fds[i];
            break;
        }
        sizes[i] = vm->disks[i].size;
        opened++;
    }
    if (rc == 0) {
        rc = undo_capture(pfd, fds, sizes, vm->ndisks, dfd, n, &bytes);
        if (rc < 0)
            rc = vr_err(rc, "capture into %s/undo: %s", vm->repl->storage,
                        vr_errmsg());
    }
    for (unsigned i = 0; i < opened; i++)
        close(fds[i]);
    if (pfd >= 0)
        close(pfd);
    if (dfd >= 0)
        close(dfd);
    return rc;
}

/* Which points to keep (see the top of the file); keep[i] for pts[i]. */
static void
retention(const struct repl *r, const struct point *pts, size_t n,
          bool *keep)
{
    if (n == 0)
        return;
    const struct point *last = &pts[n - 1];
    uint64_t iv = (uint64_t)(r->point_interval_s ? r->point_interval_s
                                                 : 3600) * 1000;
    uint64_t blast = last->time_ms / iv;
    for (size_t i = 0; i < n; i++) {
        /* The latest, and the point a test failover or a failover is
         * looking at. */
        keep[i] = i == n - 1 ||
                  (r->test_point && pts[i].cycle == r->test_point) ||
                  (r->failover_point && pts[i].cycle == r->failover_point);
        if (r->recovery_history == 0 || keep[i])
            continue;
        if (pts[i].time_ms + iv >= last->time_ms)
            keep[i] = true; /* recent window */
        uint64_t b = pts[i].time_ms / iv;
        bool newest_in_bucket = pts[i + 1].time_ms / iv != b;
        if (newest_in_bucket && b + r->recovery_history >= blast)
            keep[i] = true; /* the interval's point */
        /* An interval's application-consistent point is kept too: it is
         * the one to prefer for applications (SPEC §7). */
        bool app = strcmp(pts[i].kind, "application-consistent") == 0;
        bool newest_app_in_bucket = app;
        for (size_t j = i + 1; app && j < n && pts[j].time_ms / iv == b; j++)
            if (strcmp(pts[j].kind, "application-consistent") == 0)
                newest_app_in_bucket = false;
        if (newest_app_in_bucket && b + r->recovery_history >= blast)
            keep[i] = true;
    }
}

/* Make the undo files agree with the kept points: drop spans older than
 * the oldest point, merge spans across cycles that are not points. */
static int
reconcile_files(struct vm *vm, const struct point *pts, size_t n)
{
    int dfd = -1;
    int rc = open_undo_dir(vm->repl, &dfd);
    if (rc < 0)
        return rc;
    uint64_t oldest = n ? pts[0].cycle : vm->repl->applied_cycle;
    rc = undo_cleanup(dfd, oldest);
    while (rc >= 0) {
        /* Spans sorted by start; find two adjacent ones split at a cycle
         * that is not a point. */
        /* A fresh handle: a dup would share (and keep) the position. */
        int lfd = openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *d = lfd >= 0 ? fdopendir(lfd) : NULL;
        if (!d) {
            int e = errno;
            if (lfd >= 0)
                close(lfd);
            rc = vr_err(-e, "read undo directory: %s", strerror(e));
            break;
        }
        struct dirent *de;
        uint64_t a1 = 0, m1 = 0, b1 = 0;
        bool found = false;
        uint64_t (*spans)[2] = NULL;
        size_t ns = 0, cap = 0;
        while ((de = readdir(d))) {
            uint64_t a, b;
            if (!undo_parse_name(de->d_name, &a, &b))
                continue;
            if (ns == cap) {
                cap = cap ? 2 * cap : 32;
                spans = xrealloc(spans, cap * sizeof *spans);
            }
            spans[ns][0] = a;
            spans[ns][1] = b;
            ns++;
        }
        closedir(d);
        for (size_t i = 0; i < ns && !found; i++)
            for (size_t j = 0; j < ns && !found; j++) {
                if (spans[j][0] != spans[i][1] + 1)
                    continue;
                uint64_t m = spans[i][1];
                bool is_point = false;
                for (size_t k = 0; k < n; k++)
                    if (pts[k].cycle == m)
                        is_point = true;
                if (!is_point) {
                    a1 = spans[i][0];
                    m1 = m;
                    b1 = spans[j][1];
                    found = true;
                }
            }
        free(spans);
        if (!found)
            break;
        uint64_t bytes;
        rc = undo_merge(dfd, a1, m1, b1, &bytes);
    }
    close(dfd);
    return rc < 0 ? rc : 0;
}

int
history_after_apply(struct vm *vm, uint64_t n, bool app, uint64_t cut_ms)
{
    /* Called with d->lock held and VM_OP_APPLY in progress; drops the lock for
     * the file work and takes it again before returning. */
    struct point *pts = NULL;
    size_t np = 0;
    int rc = 0;
    struct repl *r = vm->repl;

    if (r && r->initial_done && n >= repl_first_point(r)) {
        /* The point's time is the cut's (two cycles cut 10 s apart stay
         * 10 s apart after a backlog); the apply time if not known. */
        struct point p = { .cycle = n,
                           .time_ms = cut_ms ? cut_ms : vr_wall_ms() };
        snprintf(p.kind, sizeof p.kind, "%s",
                 app ? "application-consistent" : "standard");
        rc = catalog_add_point(rctx.d->cat, vm->uuid, &p);
    }
    if (rc == 0)
        rc = catalog_points(rctx.d->cat, vm->uuid, &pts, &np);
    if (rc == 0 && np > 0) {
        bool *keep = xcalloc(np, sizeof *keep);
        retention(r, pts, np, keep);
        size_t w = 0;
        for (size_t i = 0; i < np && rc == 0; i++) {
            if (keep[i])
                pts[w++] = pts[i];
            else
                rc = catalog_delete_point(rctx.d->cat, vm->uuid, pts[i].cycle);
        }
        np = w;
        free(keep);
    }
    if (rc == 0 && r && (r->recovery_history > 0 || np > 0)) {
        pthread_mutex_unlock(&rctx.d->lock);
        vr_fault_point("prune-after-catalog");
        rc = reconcile_files(vm, pts, np);
        pthread_mutex_lock(&rctx.d->lock);
    }
    free(pts);
    return rc;
}

int
history_recover(struct vm *vm)
{
    /* At start-up, before the API opens: the latest applied cycle is a
     * point (a crash may have come between recording it and the point),
     * and the files follow the catalog. */
    struct repl *r = vm->repl;
    if (!r || !r->storage || vm->mode != VM_MODE_REPLICA)
        return 0;
    /* A completed failover has no points: its disks are its own. */
    if (r->st == REPL_ST_FAILED_OVER)
        return 0;
    struct point *pts = NULL;
    size_t np = 0;
    int rc = catalog_points(rctx.d->cat, vm->uuid, &pts, &np);
    bool have_last = np > 0 && pts[np - 1].cycle == r->applied_cycle;
    free(pts);
    if (rc < 0)
        return rc;
    if (!have_last && r->initial_done &&
        r->applied_cycle >= repl_first_point(r)) {
        struct point p = { .cycle = r->applied_cycle,
                           .time_ms = vr_wall_ms() };
        snprintf(p.kind, sizeof p.kind, "standard");
        rc = catalog_add_point(rctx.d->cat, vm->uuid, &p);
        if (rc < 0)
            return rc;
    }
    /* Spans of cycles not applied yet (captured, then the crash) stay:
     * the re-apply reuses them. */
    rc = catalog_points(rctx.d->cat, vm->uuid, &pts, &np);
    if (rc == 0 && (np > 0 || r->recovery_history > 0))
        rc = reconcile_files(vm, pts, np);
    free(pts);
    return rc;
}

json_object *
history_points_json(struct vm *vm)
{
    struct point *pts = NULL;
    size_t np = 0;
    json_object *arr = json_object_new_array();
    if (catalog_points(rctx.d->cat, vm->uuid, &pts, &np) < 0)
        return arr;
    /* The undo data that leads from the next point back to this one. */
    CLEANUP_FREE char *dir = vm->repl ? undo_dir(vm->repl) : NULL;
    int dfd = dir ? storage_open(vm->repl->storage, dir,
                                 O_RDONLY | O_DIRECTORY, 0) : -1;
    if (dfd < 0)
        vr_err_clear();
    uint64_t iv = vm->repl && vm->repl->point_interval_s
                      ? (uint64_t)vm->repl->point_interval_s * 1000
                      : 3600000;
    for (size_t i = 0; i < np; i++) {
        uint64_t size = 0;
        if (dfd >= 0 && i + 1 < np) {
            char name[48];
            undo_name(pts[i].cycle + 1, pts[i + 1].cycle, name);
            struct stat st;
            if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                S_ISREG(st.st_mode))
                size = (uint64_t)st.st_size;
        }
        bool recent = i + 1 == np ||
                      pts[i].time_ms + iv >= pts[np - 1].time_ms;
        json_object *o = json_object_new_object();
        json_object_object_add(o, "id",
                               json_object_new_int64((int64_t)pts[i].cycle));
        /* RFC 3339 as everywhere else in the API; time_ms (the same
         * instant) stays for the dashboard's charts. */
        char ts[32];
        vr_rfc3339(pts[i].time_ms, ts);
        json_object_object_add(o, "time", json_object_new_string(ts));
        json_object_object_add(o, "time_ms",
                               json_object_new_int64((int64_t)pts[i].time_ms));
        json_object_object_add(o, "kind", json_object_new_string(pts[i].kind));
        json_object_object_add(o, "latest",
                               json_object_new_boolean(i + 1 == np));
        json_object_object_add(o, "recent", json_object_new_boolean(recent));
        json_object_object_add(o, "undo_bytes",
                               json_object_new_int64((int64_t)size));
        json_object_array_add(arr, o);
    }
    free(pts);
    if (dfd >= 0)
        close(dfd);
    return arr;
}
