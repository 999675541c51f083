/* resync.c: resynchronization on the primary (SPEC §5, `replication
 * resume VM --resync`) after change tracking stopped (a full or failing
 * log file system, a damaged log, a host crash: plugin/track.c).
 *
 * The steps, each in the catalog (repl.resync_step) before its work:
 *
 *   REQUESTED  The data plane re-arms tracking (REARM): changes through
 *              the void cycle C are in each disk's C.dirty map (what was
 *              written untracked, and every range the unshipped, now void,
 *              cycles had logged); cycle C + 1 is logged again.
 *   COMPARING  The Replica server freezes its VM at the cycle it applied,
 *              A (POST .../resync: no cycle after A is applied until the
 *              cut is staged whole; staged cycles after A are dropped, they
 *              are void).  Every dirty 64 KiB chunk is hashed on both sides
 *              and the differing ones go into cycle A + 1's payload (a zero
 *              record where this disk reads zeroes); A + 2 .. C are sent
 *              empty, so numbering goes on at C + 1.  F, the first cycle
 *              at whose seal the replica can equal this VM, is the cycle
 *              open after the last read (the argument of the initial copy:
 *              docs/design.md, "Initial replication").
 *   COMPLETING POST .../resync-complete with F: the Replica server records
 *              no point before F and applies A + 1 .. F in one run once F
 *              is staged; until then its VM stays at A, a consistent
 *              point, and its recovery points are kept.
 *
 * Why the replica ends exact: after A's seal the disk changed only in
 * ranges a void cycle logged, ranges written untracked (both in C.dirty),
 * and ranges logged after C.  The comparison makes the first two equal to
 * this disk as read; cycles C + 1 .. F put every later write in order.  A
 * crash of either side at any step repeats that step: the replica is
 * frozen at A, so comparing again is comparing with the same disk, and
 * resending A + 1 .. C replaces what was staged.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "chunkhash.h"
#include "cycle.h"
#include "dirtymap.h"
#include "core/logdir.h"
#include "proc/vmproc.h"
#include "shipper-int.h"

/* Dirty runs are compared in pieces of at most this (64 KiB chunks). */
#define RESYNC_PIECE (64u << 20)

/* The newest C.dirty in disk 0's log: the void cycle of a REARM whose
 * answer a crash lost.  0 if there is none. */
static uint64_t
newest_dirty(const struct job *jb)
{
    CLEANUP_FREE char *dir = logdir_of(&jb->disks[0]);
    DIR *d = opendir(dir);
    uint64_t best = 0;
    if (!d)
        return 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        uint64_t c;
        const char *ext = logdir_name(de->d_name, &c);
        if (ext && strcmp(ext, "dirty") == 0 && c > best)
            best = c;
    }
    closedir(d);
    return best;
}

static void
set_step(struct vm *vm, enum resync_step step, uint64_t c, uint64_t f)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct repl *r = vm->repl;
    r->resync_step = step;
    if (c)
        r->resync_void = c;
    if (f)
        r->resync_first = f;
    VR_IGNORE(catalog_save_repl(pctx.d->cat, r));
    pthread_mutex_unlock(&pctx.d->lock);
}

/* REQUESTED -> COMPARING: re-arm tracking, or find the void cycle of a
 * re-arm done before a crash. */
static int
rearm_step(struct vm *vm, struct job *jb, uint64_t last)
{
    bool served = false, running = false;
    vmproc_status(jb->rundir, &served, &running);
    bool intact = tracking_intact(vm, jb, last) == 0;
    vr_err_clear();
    uint64_t c = 0;
    if (intact) {
        c = newest_dirty(jb);
        if (c <= last)
            return vr_err(-EINVAL, "change tracking on this VM's disks is "
                          "intact: there is nothing to resynchronize");
    } else if (!served) {
        return vr_err(-EAGAIN, "tracking stopped on this VM's disks: start "
                      "the VM (vmreplica vm start %s) so the "
                      "resynchronization can restart change tracking",
                      jb->name);
    } else {
        int rc = vmproc_rearm(jb->rundir, &c);
        if (rc < 0)
            return rc;
    }
    vr_fault_point("resync-rearmed");
    pthread_mutex_lock(&pctx.d->lock);
    vm->repl->untracked = false;
    event_add(pctx.d->cat, "info", vm->name, "resynchronization: change "
              "tracking restarted after cycle %llu; the regions changed "
              "through it are compared with the Replica server's copy",
              (unsigned long long)c);
    pthread_mutex_unlock(&pctx.d->lock);
    set_step(vm, RESYNC_COMPARING, c, 0);
    return 0;
}

/* Compare disk d's dirty regions into b. */
static int
compare_disk(struct vm *vm, const struct job *jb, unsigned d, uint64_t c,
             struct cyc_builder *b)
{
    CLEANUP_FREE char *dir = logdir_of(&jb->disks[d]);
    char name[40];
    snprintf(name, sizeof name, "%020llu.dirty", (unsigned long long)c);
    int lfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lfd < 0)
        return vr_err(-errno, "open %s: %s", dir, strerror(errno));
    struct dirtymap m;
    int rc = dirtymap_load(lfd, name, jb->disks[d].size, &m);
    close(lfd);
    if (rc < 0)
        return vr_err(rc, "%s/%s: %s", dir, name, vr_errmsg());
    int dfd = open(jb->disks[d].path, O_RDONLY | O_CLOEXEC);
    if (dfd < 0) {
        dirtymap_free(&m);
        return vr_err(-errno, "open %s: %s", jb->disks[d].path,
                      strerror(errno));
    }
    uint64_t off = 0, len = 0;
    while (rc == 0 && dirtymap_next(&m, off, &off, &len)) {
        uint64_t end = off + len;
        while (rc == 0 && off < end) {
            uint64_t k = end - off < RESYNC_PIECE ? end - off : RESYNC_PIECE;
            uint64_t sent = 0;
            rc = add_differing(jb, d, dfd, off, k, b, &sent);
            if (rc == 0) {
                pthread_mutex_lock(&pctx.d->lock);
                vm->repl->resync_compared += k;
                vm->repl->resync_sent += sent;
                pthread_mutex_unlock(&pctx.d->lock);
            }
            off += k;
        }
    }
    close(dfd);
    dirtymap_free(&m);
    return rc;
}

/* Build and send cycle n: the comparison's differences, or nothing. */
static int
send_resync_cycle(const struct job *jb, uint64_t n, struct vm *vm,
                  uint64_t c, uint64_t *first)
{
    CLEANUP_FREE char *tmp = NULL;
    int fd = tmp_payload(jb, &tmp);
    if (fd < 0)
        return fd;
    struct cyc_hdr h = { .version = CYC_VERSION,
                         .cycle = n,
                         .epoch = jb->peer.epoch,
                         .ndisks = jb->ndisks };
    struct cyc_builder *b = NULL;
    int rc = cyc_uuid_parse(jb->uuid, h.uuid);
    if (rc == 0)
        rc = cyc_builder_new(fd, jb->compression, 1, &h, &b);
    for (unsigned d = 0; rc == 0 && vm && d < jb->ndisks; d++)
        rc = compare_disk(vm, jb, d, c, b);
    /* After the last read: the first cycle the replica can equal. */
    if (rc == 0 && vm)
        rc = first_consistent_cycle(jb, c, first);
    uint64_t raw = 0, wire = 0;
    if (rc == 0)
        rc = cyc_builder_finish(b, &raw, &wire);
    cyc_builder_free(b);
    if (rc == 0) {
        test_send_delay();
        CLEANUP_FREE char *path = xasprintf(
            "/r1/vms/%s/cycles/%llu", jb->uuid, (unsigned long long)n);
        rc = peer_call(&jb->peer, "PUT", path, NULL, fd, wire,
                       jb->compression, NULL);
    }
    close(fd);
    unlink(tmp);
    if (rc == 0 && vm) {
        pthread_mutex_lock(&pctx.d->lock);
        vm->repl->bytes_raw += raw;
        vm->repl->bytes_wire += wire;
        pthread_mutex_unlock(&pctx.d->lock);
    }
    return rc;
}

static int merge_dirty(const struct job *jb, unsigned d, uint64_t from,
                       uint64_t into);

/* Fold the log once more (FOLD) so the comparison covers every change up
 * to now, each region once, and later writes start a new cycle: *c moves
 * to the new void cycle, its maps holding the old ones too.  Also adopts
 * a fold a crash left unrecorded (the newest C.dirty). */
static int
refold(struct vm *vm, struct job *jb, uint64_t *c)
{
    uint64_t nd = newest_dirty(jb);
    int rc = 0;
    if (nd < *c)
        nd = *c;
    bool served = false, running = false;
    vmproc_status(jb->rundir, &served, &running);
    uint64_t f = 0;
    if (served && vmproc_fold(jb->rundir, &f) == 0 && f > nd)
        nd = f;
    vr_err_clear();
    if (nd == *c)
        return 0;
    vr_fault_point("resync-refolded");
    for (unsigned d = 0; rc == 0 && d < jb->ndisks; d++)
        rc = merge_dirty(jb, d, *c, nd);
    if (rc < 0)
        return rc;
    set_step(vm, RESYNC_COMPARING, nd, 0);
    *c = nd;
    return 0;
}

/* COMPARING -> COMPLETING. */
static int
compare_step(struct vm *vm, struct job *jb, uint64_t last, uint64_t c)
{
    CLEANUP_FREE char *body = xasprintf(
        "{\"from\": %llu, \"void_to\": %llu}", (unsigned long long)last + 1,
        (unsigned long long)c);
    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s/resync", jb->uuid);
    json_object *resp = NULL, *v;
    int rc = peer_call(&jb->peer, "POST", path, body, -1, 0, false, &resp);
    int64_t a = -1;
    if (rc == 0 && resp &&
        json_object_object_get_ex(resp, "applied_cycle", &v) &&
        json_object_is_type(v, json_type_int))
        a = json_object_get_int64(v);
    json_object_put(resp);
    if (rc < 0)
        return rc;
    if (a < 0 || (uint64_t)a < last || (uint64_t)a >= c)
        return vr_err(-EPROTO, "resync: the Replica server is at cycle %lld, "
                      "not between %llu and %llu", (long long)a,
                      (unsigned long long)last, (unsigned long long)c - 1);
    /* The Replica server answers and holds its VM: compare from here. */
    rc = refold(vm, jb, &c);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&pctx.d->lock);
    vm->repl->resync_compared = vm->repl->resync_sent = 0;
    pthread_mutex_unlock(&pctx.d->lock);
    uint64_t first = 0;
    rc = send_resync_cycle(jb, (uint64_t)a + 1, vm, c, &first);
    if (rc == 0)
        vr_fault_point("resync-cycle-sent");
    for (uint64_t n = (uint64_t)a + 2; rc == 0 && n <= c; n++)
        rc = send_resync_cycle(jb, n, NULL, c, NULL);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&pctx.d->lock);
    vm->repl->last_cycle = c;
    pthread_mutex_unlock(&pctx.d->lock);
    set_step(vm, RESYNC_COMPLETING, 0, first);
    return 0;
}

/* COMPLETING -> done. */
static int
complete_step(struct vm *vm, struct job *jb, uint64_t c, uint64_t first)
{
    CLEANUP_FREE char *body = xasprintf(
        "{\"first_point\": %llu, \"void_to\": %llu}",
        (unsigned long long)first, (unsigned long long)c);
    CLEANUP_FREE char *path =
        xasprintf("/r1/vms/%s/resync-complete", jb->uuid);
    int rc = peer_call(&jb->peer, "POST", path, body, -1, 0, false, NULL);
    if (rc < 0)
        return rc;
    release_shipped(jb, c);
    for (unsigned d = 0; d < jb->ndisks; d++) {
        CLEANUP_FREE char *p = xasprintf("%s.vrlog/%020llu.dirty",
                                         jb->disks[d].path,
                                         (unsigned long long)c);
        unlink(p);
    }
    pthread_mutex_lock(&pctx.d->lock);
    struct repl *r = vm->repl;
    r->resync_step = RESYNC_NONE;
    r->last_ok_ms = vr_wall_ms();
    free(r->task);
    r->task = NULL;
    rc = repl_transition_event(
        pctx.d->cat, vm, REPL_ST_REPLICATING, REPL_T_SAVE, "info",
        "resynchronization complete: %llu bytes compared, %llu bytes of "
        "chunks sent; the Replica VM equals this VM again from cycle %llu",
        (unsigned long long)r->resync_compared,
        (unsigned long long)r->resync_sent, (unsigned long long)first);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

/* --- the log budget ---------------------------------------------------------- */

/* Bytes the unsent change log holds: the sealed segments and preserve
 * files of cycles after last, and what the data plane has written into
 * its open segments (their files are preallocated: their size says
 * nothing). */
static uint64_t
log_bytes(const struct job *jb, uint64_t last)
{
    uint64_t total = 0, open_cycle = 0, open_bytes = 0, payload = 0;
    if (vmproc_open_cycle(jb->rundir, &open_cycle, &open_bytes,
                          &payload) == 0)
        total = open_bytes;
    vr_err_clear();
    for (unsigned i = 0; i < jb->ndisks; i++) {
        CLEANUP_FREE char *dir = logdir_of(&jb->disks[i]);
        DIR *d = opendir(dir);
        if (!d)
            continue;
        struct dirent *de;
        while ((de = readdir(d))) {
            uint64_t c;
            const char *ext = logdir_name(de->d_name, &c);
            if (!ext || (strcmp(ext, "log") && strcmp(ext, "pre")) ||
                c <= last)
                continue;
            struct stat st;
            if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                S_ISREG(st.st_mode))
                total += (uint64_t)st.st_size;
        }
        closedir(d);
    }
    return total;
}

/* Merge disk d's from.dirty into into.dirty (both cycles' maps), then
 * remove from.dirty. */
static int
merge_dirty(const struct job *jb, unsigned d, uint64_t from, uint64_t into)
{
    CLEANUP_FREE char *dir = logdir_of(&jb->disks[d]);
    char a[40], b[40];
    snprintf(a, sizeof a, "%020llu.dirty", (unsigned long long)from);
    snprintf(b, sizeof b, "%020llu.dirty", (unsigned long long)into);
    int lfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lfd < 0)
        return vr_err(-errno, "open %s: %s", dir, strerror(errno));
    struct dirtymap ma, mb;
    uint64_t size = jb->disks[d].size;
    int rc = dirtymap_load(lfd, a, size, &ma);
    if (rc == -ENOENT) { /* merged already, before a crash */
        close(lfd);
        vr_err_clear();
        return 0;
    }
    if (rc == 0 && (rc = dirtymap_load(lfd, b, size, &mb)) < 0)
        dirtymap_free(&ma);
    if (rc == 0) {
        uint64_t off = 0, len = 0;
        while (dirtymap_next(&ma, off, &off, &len)) {
            dirtymap_mark(&mb, off, len);
            off += len;
        }
        rc = dirtymap_save(&mb, lfd, b);
        if (rc == 0 && unlinkat(lfd, a, 0) < 0)
            rc = vr_err(-errno, "remove %s/%s: %s", dir, a, strerror(errno));
        dirtymap_free(&ma);
        dirtymap_free(&mb);
    }
    close(lfd);
    return rc;
}

int
resync_check_budget(struct vm *vm, struct job *jb)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct repl *r = vm->repl;
    bool may = r->initial_done &&
               (r->st == REPL_ST_REPLICATING ||
                (r->st == REPL_ST_RESYNC && r->resync_step == RESYNC_COMPARING));
    uint64_t last = r->st == REPL_ST_RESYNC ? r->resync_void : r->last_cycle;
    uint64_t prev = r->st == REPL_ST_RESYNC ? r->resync_void : 0;
    uint64_t budget = r->log_budget;
    if (!budget)
        for (unsigned i = 0; i < vm->ndisks; i++)
            budget += vm->disks[i].size / 2;
    pthread_mutex_unlock(&pctx.d->lock);
    if (!may)
        return 0;
    uint64_t used = log_bytes(jb, last);
    bool served = false, running = false;
    if (used <= budget)
        return 0;
    vmproc_status(jb->rundir, &served, &running);
    if (!served)
        return 0; /* nothing grows the log; it folds when served again */
    uint64_t c = 0;
    int rc = vmproc_fold(jb->rundir, &c);
    if (rc < 0)
        return rc;
    vr_fault_point("resync-folded");
    for (unsigned d = 0; rc == 0 && prev && d < jb->ndisks; d++)
        rc = merge_dirty(jb, d, prev, c);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&pctx.d->lock);
    r = vm->repl;
    r->resync_step = RESYNC_COMPARING;
    r->resync_void = c;
    r->resync_compared = r->resync_sent = 0;
    free(r->task);
    r->task = xstrdup("Resynchronization");
    rc = repl_transition_event(
        pctx.d->cat, vm, REPL_ST_RESYNC, REPL_T_SAVE, "warning",
        "the unsent change log passed its budget (%llu bytes of %llu): "
        "folded into dirty-region maps through cycle %llu; only the regions "
        "changed are compared and sent when the Replica server answers",
        (unsigned long long)used, (unsigned long long)budget,
        (unsigned long long)c);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

void
resync_start_if_due(struct vm *vm)
{
    struct repl *r = vm->repl;
    time_t now = time(NULL);
    bool due = r->resync_at ? now >= r->resync_at
                            : resync_window_open(r->resync_window, now);
    if (r->st != REPL_ST_WAIT_RESYNC || !due)
        return;
    bool scheduled = r->resync_at != 0;
    r->resync_at = 0;
    if (r->resync_step == RESYNC_NONE) {
        r->resync_step = RESYNC_REQUESTED;
        r->resync_compared = r->resync_sent = 0;
    }
    free(r->task);
    r->task = xstrdup("Resynchronization");
    VR_IGNORE(repl_transition_event(
        pctx.d->cat, vm, REPL_ST_RESYNC, REPL_T_SAVE, "info",
        scheduled ? "scheduled resynchronization started"
                  : "resynchronization started: its window %s is open",
        r->resync_window ? r->resync_window : ""));
}

int
run_resync(struct vm *vm, struct job *jb)
{
    for (;;) {
        pthread_mutex_lock(&pctx.d->lock);
        struct repl *r = vm->repl;
        bool stop = r->stop || r->st != REPL_ST_RESYNC;
        enum resync_step step = r->resync_step;
        uint64_t last = r->last_cycle, c = r->resync_void,
                 first = r->resync_first;
        pthread_mutex_unlock(&pctx.d->lock);
        if (stop)
            return -ECANCELED;
        int rc;
        switch (step) {
        case RESYNC_REQUESTED:
            rc = rearm_step(vm, jb, last);
            break;
        case RESYNC_COMPARING:
            rc = compare_step(vm, jb, last, c);
            break;
        case RESYNC_COMPLETING:
            vr_fault_point("resync-completing");
            return complete_step(vm, jb, c, first);
        default:
            return vr_err(-EINVAL, "resync: no resynchronization requested");
        }
        if (rc < 0)
            return rc;
    }
}
