/* shipper.c: the primary side of replication — one thread per replicated
 * VM that runs initial replication and then, every frequency, seals a cycle
 * through the data plane, builds the cycle payload (zstd), sends it to the
 * Replica server (net/peer.c), and deletes the sealed logs
 * only once the Replica server has acknowledged them as durably staged.
 *
 * The thread holds d->lock only for bookkeeping; sealing, payload building
 * and sending run unlocked on copies of what they need. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cycle.h"
#include "dirtymap.h"
#include "core/logdir.h"
#include "proc/vmproc.h"
#include "shipper-int.h"

struct primary_ctx pctx;

void
primary_init(struct daemon *d)
{
    pctx.d = d;
}

/* --- change-log segments ------------------------------------------------ */

static void
delete_sealed_upto(const struct job *jb, uint64_t upto)
{
    for (unsigned i = 0; i < jb->ndisks; i++) {
        CLEANUP_FREE char *dir = logdir_of(&jb->disks[i]);
        CLEANUP_FREE uint64_t *cs = NULL;
        size_t n;
        if (logdir_sealed(dir, &cs, &n, NULL) < 0)
            continue;
        for (size_t k = 0; k < n && cs[k] <= upto; k++) {
            char name[32];
            cl_seg_name(cs[k], true, name);
            CLEANUP_FREE char *p = xasprintf("%s/%s", dir, name);
            /* The newest one is kept as the plugin's next segment file:
             * overwriting pages is cheaper than allocating them.  Never
             * over an existing spare: the plugin may have it open and be
             * about to rename it, and must rename the file it opened. */
            bool last = k + 1 == n || cs[k + 1] > upto;
            CLEANUP_FREE char *spare =
                last ? xasprintf("%s/" CL_SPARE_NAME, dir) : NULL;
            if (!last || renameat2(AT_FDCWD, p, AT_FDCWD, spare,
                                   RENAME_NOREPLACE) < 0)
                unlink(p);
        }
    }
}

/* Cycles up to upto are on the Replica server: tell a running data plane
 * (so it stops preserving their blocks), then delete their segments and
 * preserve files.  In that order: until the plugin knows, it may still
 * append to a preserve file; one it recreates after the delete is removed
 * by the next call (preserve files of shipped cycles are also removed when
 * the plugin starts). */
void
release_shipped(const struct job *jb, uint64_t upto)
{
    bool served = false, running = false;
    vmproc_status(jb->rundir, &served, &running);
    if (served && upto > 0 && vmproc_shipped(jb->rundir, upto) < 0) {
        log_warn("shipper", "%s: %s", jb->name, vr_errmsg());
        vr_err_clear();
    }
    delete_sealed_upto(jb, upto);
    for (unsigned i = 0; i < jb->ndisks; i++) {
        CLEANUP_FREE char *dir = logdir_of(&jb->disks[i]);
        DIR *d = opendir(dir);
        if (!d)
            continue;
        struct dirent *de;
        while ((de = readdir(d))) {
            uint64_t c;
            const char *ext = logdir_name(de->d_name, &c);
            if (ext && (!strcmp(ext, "pre") || !strcmp(ext, "app")) &&
                c <= upto)
                unlinkat(dirfd(d), de->d_name, 0);
        }
        closedir(d);
    }
}

uint64_t
shipper_pending_bytes(const struct vm *vm, unsigned *unsent)
{
    /* What the unshipped cycles would send, uncompressed: record headers
     * and the data of every write, whether the log holds the data or
     * refers to the disk for it.  The plugin counts its open segments. */
    CLEANUP_FREE char *rundir = vm_rundir(pctx.d, vm);
    bool served = false, running = false;
    uint64_t open_cycle = 0, open_bytes = 0, open_payload = 0;
    vmproc_status(rundir, &served, &running);
    bool from_plugin =
        served && vmproc_open_cycle(rundir, &open_cycle, &open_bytes,
                                    &open_payload) == 0;
    uint64_t total = from_plugin ? open_payload : 0;
    if (unsent)
        *unsent = 0;
    for (unsigned i = 0; i < vm->ndisks; i++) {
        CLEANUP_FREE char *dir = logdir_of(&vm->disks[i]);
        DIR *d = opendir(dir);
        if (!d)
            continue;
        struct dirent *de;
        while ((de = readdir(d))) {
            /* Segments only ("%020llu.open" / ".log"). */
            uint64_t c;
            const char *ext = logdir_name(de->d_name, &c);
            bool sealed = ext && strcmp(ext, "log") == 0;
            if (!sealed && (!ext || strcmp(ext, "open") != 0))
                continue;
            if (vm->repl && c <= vm->repl->last_cycle)
                continue;
            if (!sealed && from_plugin)
                continue;
            uint64_t n = 0;
            if (cl_segment_payload(dirfd(d), de->d_name, &n) == 0)
                total += n;
            if (sealed && i == 0 && unsent)
                (*unsent)++;
        }
        closedir(d);
    }
    vr_err_clear();
    return total;
}

/* --- jobs: copies of what the thread needs ------------------------------- */

static char *
dup_or_null(const char *s)
{
    return s ? xstrdup(s) : NULL;
}

void
peer_fill(struct peer *p, const struct repl *r)
{
    memset(p, 0, sizeof *p);
    p->server = xstrdup(r->replica_server);
    p->connect_address = dup_or_null(r->connect_address);
    p->cert = dup_or_null(pctx.d->cfg.cert);
    p->key = dup_or_null(pctx.d->cfg.key);
    p->ca = dup_or_null(pctx.d->cfg.ca);
    p->kerberos = repl_kerberos(r);
    p->krb_encrypt = r->krb_encrypt;
    p->keytab = dup_or_null(pctx.d->cfg.keytab);
    p->self = dup_or_null(pctx.d->cfg.hostname);
    p->epoch = r->epoch;
    p->recovery_history = r->recovery_history;
    p->point_interval_s = r->point_interval_s;
}

void
peer_fini(struct peer *p)
{
    free(p->server);
    free(p->connect_address);
    free(p->cert);
    free(p->key);
    free(p->ca);
    free(p->keytab);
    free(p->self);
}

void
job_fill(struct job *jb, const struct vm *vm)
{
    memset(jb, 0, sizeof *jb);
    snprintf(jb->uuid, sizeof jb->uuid, "%s", vm->uuid);
    jb->name = xstrdup(vm->name);
    jb->rundir = vm_rundir(pctx.d, vm);
    jb->ndisks = vm->ndisks;
    for (unsigned i = 0; i < vm->ndisks; i++) {
        jb->disks[i] = vm->disks[i];
        jb->disks[i].path = xstrdup(vm->disks[i].path);
    }
    const struct repl *r = vm->repl;
    peer_fill(&jb->peer, r);
    jb->compression = r->compression;
    jb->app_every_ms = (uint64_t)r->app_every *
                       (r->point_interval_s ? r->point_interval_s : 3600) *
                       1000;
    jb->app_last_ms = r->app_last_ms;
}

void
job_fini(struct job *jb)
{
    free(jb->name);
    free(jb->rundir);
    for (unsigned i = 0; i < jb->ndisks; i++)
        free(jb->disks[i].path);
    peer_fini(&jb->peer);
}

int
tmp_payload(const struct job *jb, char **path)
{
    *path = xasprintf("%s/outgoing.tmp", jb->rundir);
    int rc = io_mkdir_p(jb->rundir, 0750);
    if (rc < 0)
        return rc;
    int fd = open(*path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return vr_err(-errno, "create %s: %s", *path, strerror(errno));
    return fd;
}

/* --- one cycle ------------------------------------------------------------ */

/* Test hook: $VMREPLICA_TEST_SEND_DELAY_MS delays every upload (cycles and
 * initial-replication chunks), so a test can make a cycle outlast the
 * frequency (missed cycles) or write during a long initial copy. */
void
test_send_delay(void)
{
    vr_test_delay("VMREPLICA_TEST_SEND_DELAY_MS", 600000);
}

/* The marker of a cycle cut with the guest quiesced, beside disk 0's
 * segments (the plugin ignores the name). */
static char *
app_marker(const struct job *jb, uint64_t cycle)
{
    CLEANUP_FREE char *dir = logdir_of(&jb->disks[0]);
    return xasprintf("%s/%020llu.app", dir, (unsigned long long)cycle);
}

#define QGA_FREEZE_MS 10000 /* a guest that cannot freeze in 10 s won't */
#define QGA_THAW_MS   5000

/* Seal the disks' change logs; if an application-consistent cut is due
 * and QEMU runs, with the guest's file systems frozen through its agent
 * around the seal, and the cycle marked.  A freeze that fails or hangs
 * gives a crash-consistent cycle and a warning; a thaw is sent whatever
 * happened, and retried, so the guest is never left frozen. */
static int
seal_cycle(struct vm *vm, struct job *jb, bool running)
{
    /* Once per period-aligned window (K point intervals), so every K-th
     * interval gets its point whatever the attempts cost. */
    uint64_t now = vr_wall_ms();
    bool due = jb->app_every_ms && running &&
               (jb->app_last_ms == 0 ||
                now / jb->app_every_ms != jb->app_last_ms / jb->app_every_ms);
    bool frozen = false, sent = false;
    char why[512] = "";
    if (due) {
        int64_t nfs = 0;
        int frc = vmproc_guest_command(
            jb->rundir, "{\"execute\":\"guest-fsfreeze-freeze\"}\n",
            QGA_FREEZE_MS, &nfs);
        /* Not sent when no agent answered: nothing to thaw then. */
        sent = frc != -ENOTCONN && frc != -ENOENT;
        if (frc < 0)
            snprintf(why, sizeof why, "%s", vr_errmsg());
        else if (nfs <= 0)
            snprintf(why, sizeof why, "the guest agent froze no file "
                     "system");
        frozen = frc == 0 && nfs > 0;
        vr_fault_point("app-frozen");
    }
    uint64_t c = 0;
    int rc = vmproc_seal(jb->rundir, &c);
    char sealmsg[512];
    snprintf(sealmsg, sizeof sealmsg, "%s", vr_errmsg());
    if (due) {
        /* Thaw even after a failed freeze: it may have frozen some file
         * systems, or still be freezing when we gave up. */
        int trc = sent ? -1 : 0;
        for (int k = 0; k < 3 && trc < 0; k++)
            trc = vmproc_guest_command(
                jb->rundir, "{\"execute\":\"guest-fsfreeze-thaw\"}\n",
                QGA_THAW_MS, NULL);
        pthread_mutex_lock(&pctx.d->lock);
        if (trc < 0)
            event_add(pctx.d->cat, "error", jb->name,
                      "guest agent: thaw failed: %s; the "
                      "guest's file systems may still be frozen (a thaw is "
                      "sent again at the next cut and when the daemon "
                      "starts)",
                      vr_errmsg());
        if (!frozen && rc == 0)
            event_add(pctx.d->cat, "warning", jb->name,
                      "application-consistent point "
                      "not possible (%s): cycle %llu is crash-consistent",
                      why, (unsigned long long)c);
        /* Either way, the next try is in the next window. */
        vm->repl->app_last_ms = jb->app_last_ms = now;
        pthread_mutex_unlock(&pctx.d->lock);
        vr_err_clear();
    }
    if (rc < 0)
        return vr_err(rc, "%s", sealmsg);
    if (frozen) {
        CLEANUP_FREE char *m = app_marker(jb, c);
        int fd = open(m, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        if (fd < 0 || fsync(fd) < 0) {
            log_warn("shipper", "%s: %s: %s", jb->name, m, strerror(errno));
        } else {
            CLEANUP_FREE char *dir = logdir_of(&jb->disks[0]);
            VR_IGNORE(io_fsync_dir(dir));
            log_info("shipper", "%s: cycle %llu is application-consistent",
                     jb->name, (unsigned long long)c);
        }
        if (fd >= 0)
            close(fd);
    }
    return 0;
}

/* Tests: hold the shipper between seeing the disks served and sealing,
 * so a `vm stop` can come in between. */
static void
test_seal_delay(void)
{
    vr_test_delay("VMREPLICA_TEST_SEAL_DELAY_MS", 600000);
}

/* Seal the open cycle if the disks are served.  A `vm stop` since the
 * look seals the last writes itself: ship what is sealed.  Otherwise a
 * failed seal (control socket gone or refusing) is retried (-EAGAIN),
 * never the end of replication: -ENOENT from a vanished socket would read
 * as unrecoverable. */
/* Did the data plane stop tracking any of the job's disks (the log could
 * not follow them: a full or failing log file system, a host crash)?  Its
 * tracking marker says so before the first write it did not log, so once
 * it does, no unshipped cycle may be sent: its blocks may have changed
 * since its seal without being preserved.  -EAGAIN (retried, never the
 * end of replication) saying what to do; 0 if every disk is tracked.
 * Sets the relationship's untracked flag either way (health Critical). */
int
tracking_intact(struct vm *vm, const struct job *jb, uint64_t last_cycle)
{
    int rc = 0;
    for (unsigned i = 0; i < jb->ndisks; i++) {
        CLEANUP_FREE char *dir = logdir_of(&jb->disks[i]);
        CLEANUP_FREE char *path = xasprintf("%s/" TRACKING_NAME, dir);
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 && errno == ENOENT)
            continue; /* a log made before markers */
        bool stopped = true;
        uint64_t c = 0;
        char why[300] = "its tracking marker cannot be read";
        if (fd >= 0) {
            if (tracking_marker_read(fd, &stopped, &c, why, sizeof why) < 0)
                snprintf(why, sizeof why, "%s", vr_errmsg());
            close(fd);
        }
        if (stopped) {
            rc = vr_err(-EAGAIN, "tracking stopped on this primary (%s): "
                        "the Replica VM stays at cycle %llu; to "
                        "resynchronize only what changed, run 'vmreplica "
                        "replication resume %s --resync'", why,
                        (unsigned long long)last_cycle, jb->name);
            break;
        }
    }
    pthread_mutex_lock(&pctx.d->lock);
    if (vm->repl)
        vm->repl->untracked = rc < 0;
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

static int
seal_if_served(struct vm *vm, struct job *jb)
{
    bool served = false, running = false;
    vmproc_status(jb->rundir, &served, &running);
    if (!served)
        return 0;
    test_seal_delay();
    if (seal_cycle(vm, jb, running) == 0)
        return 0;
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", vr_errmsg());
    vmproc_status(jb->rundir, &served, &running);
    if (served)
        return vr_err(-EAGAIN, "%s", msg);
    log_info("shipper", "%s: not sealed, the disks stopped being "
             "served meanwhile: %s", jb->name, msg);
    vr_err_clear();
    return 0;
}

/* When cycle N was cut: the data plane renames the open segment to its
 * sealed name at the seal, which sets its ctime (nothing changes the
 * sealed file after).  0 if unknown. */
static uint32_t
cut_time_s(const struct job *jb, uint64_t N)
{
    CLEANUP_FREE char *dir = logdir_of(&jb->disks[0]);
    char name[32];
    cl_seg_name(N, true, name);
    CLEANUP_FREE char *path = xasprintf("%s/%s", dir, name);
    struct stat st;
    if (stat(path, &st) < 0 || st.st_ctim.tv_sec <= 0 ||
        st.st_ctim.tv_sec > (time_t)UINT32_MAX)
        return 0;
    return (uint32_t)st.st_ctim.tv_sec;
}

/* The payload of cycle N into fd: every disk's sealed segment, writes
 * logged by reference read from the disk image (and the cycle's preserve
 * file) as of the seal.  *raw, *wire: its data and encoded sizes. */
static int
build_cycle(const struct job *jb, uint64_t N, int fd, uint64_t *raw,
            uint64_t *wire)
{
    struct cyc_hdr h = { .version = CYC_VERSION,
                         .cycle = N,
                         .epoch = jb->peer.epoch,
                         .ndisks = jb->ndisks,
                         .cut_s = cut_time_s(jb, N) };
    CLEANUP_FREE char *marker = app_marker(jb, N);
    if (access(marker, F_OK) == 0)
        h.flags |= CYC_F_APP;
    int rc = cyc_uuid_parse(jb->uuid, h.uuid);
    struct cyc_builder *b = NULL;
    if (rc == 0)
        rc = cyc_builder_new(fd, jb->compression, 1, &h, &b);
    for (unsigned i = 0; rc == 0 && i < jb->ndisks; i++) {
        CLEANUP_FREE char *dir = logdir_of(&jb->disks[i]);
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0) {
            rc = vr_err(-errno, "open %s: %s", dir, strerror(errno));
            break;
        }
        char name[32];
        cl_seg_name(N, true, name);
        int disk_fd = open(jb->disks[i].path, O_RDONLY | O_CLOEXEC);
        if (disk_fd < 0) {
            rc = vr_err(-errno, "open %s: %s", jb->disks[i].path,
                        strerror(errno));
            close(dfd);
            break;
        }
        rc = cyc_builder_add_segment_ref(b, dfd, name, (uint16_t)i, disk_fd);
        close(disk_fd);
        close(dfd);
    }
    if (rc == 0)
        rc = cyc_builder_finish(b, raw, wire);
    cyc_builder_free(b);
    return rc;
}

/* Cycle N built into fd (build_cycle), then checked: if tracking had
 * stopped by the end of the build, its reads of the disks may hold
 * untracked writes and it must not be sent whole. */
struct cycle_build {
    struct vm *vm;
    const struct job *jb;
    uint64_t N;
    int fd;
    uint64_t raw, wire, ms;
    int rc;
    struct upload_feed feed; /* certificate mode: sent while built */
};

static int
build_checked(struct cycle_build *cb)
{
    uint64_t t0 = vr_mono_ms();
    int rc = build_cycle(cb->jb, cb->N, cb->fd, &cb->raw, &cb->wire);
    if (rc == 0)
        rc = tracking_intact(cb->vm, cb->jb, cb->N - 1);
    vr_fault_point("cycle-built");
    cb->ms = vr_mono_ms() - t0;
    return cb->rc = rc;
}

static void *
build_main(void *arg)
{
    struct cycle_build *cb = arg;
    vr_thread_name("ship-build");
    feed_finish(&cb->feed, build_checked(cb));
    return NULL;
}

/* Build cycle N and send it (PUT /r1/vms/UUID/cycles/N).  In certificate
 * mode the payload goes out while it is built (its compression on one
 * core, the transfer and the Replica server's decoding on the other): the
 * builder thread writes the file, peer_call_feed sends what is written,
 * and ends the body only once the build finished and checked well (a
 * failed one aborts the transfer; the Replica server stages nothing).
 * Kerberos mode signs or wraps a body it has whole: built, then sent. */
static int
send_cycle(struct vm *vm, const struct job *jb, uint64_t N, uint64_t *raw,
           uint64_t *wire, uint64_t *build_ms)
{
    CLEANUP_FREE char *tmp = NULL;
    int fd = tmp_payload(jb, &tmp);
    if (fd < 0)
        return fd;
    CLEANUP_FREE char *path = xasprintf("/r1/vms/%s/cycles/%llu", jb->uuid,
                                        (unsigned long long)N);
    struct cycle_build cb = { .vm = vm, .jb = jb, .N = N, .fd = fd };
    pthread_t t;
    int rc;
    feed_init(&cb.feed, fd);
    if (!jb->peer.kerberos &&
        pthread_create(&t, NULL, build_main, &cb) == 0) {
        test_send_delay();
        rc = peer_call_feed(&jb->peer, "PUT", path, &cb.feed,
                            jb->compression, NULL);
        pthread_join(t, NULL);
        /* The build's failure is the cause whatever the transfer met. */
        if (cb.rc < 0)
            rc = vr_err(cb.rc, "%s", cb.feed.msg);
    } else {
        rc = build_checked(&cb);
        if (rc == 0) {
            test_send_delay();
            rc = peer_call(&jb->peer, "PUT", path, NULL, fd, cb.wire,
                           jb->compression, NULL);
        }
    }
    feed_destroy(&cb.feed);
    if (rc == 0)
        vr_fault_point("cycle-sent");
    *raw = cb.raw;
    *wire = cb.wire;
    *build_ms = cb.ms;
    close(fd);
    unlink(tmp);
    return rc;
}

/* Record cycle N as acknowledged, with its statistics (d->lock taken). */
static int
record_sent(struct vm *vm, uint64_t N, uint64_t raw, uint64_t wire,
            uint64_t lat)
{
    pthread_mutex_lock(&pctx.d->lock);
    struct repl *r = vm->repl;
    r->last_cycle = N;
    r->last_ok_ms = vr_wall_ms();
    r->ok_count++;
    r->bytes_raw += raw;
    r->bytes_wire += wire;
    r->sum_size += wire;
    if (wire > r->max_size)
        r->max_size = wire;
    r->sum_latency_ms += lat;
    if (lat > r->max_latency_ms)
        r->max_latency_ms = lat;
    int rc = catalog_save_repl(pctx.d->cat, r);
    pthread_mutex_unlock(&pctx.d->lock);
    return rc;
}

/* Seal (if the disks are served) and send every sealed cycle after
 * last_cycle, in order. */
static int
ship_cycles(struct vm *vm, struct job *jb, uint64_t last_cycle)
{
    int rc = seal_if_served(vm, jb);
    if (rc < 0) {
        int trc = tracking_intact(vm, jb, last_cycle);
        return trc < 0 ? trc : rc;
    }
    CLEANUP_FREE char *dir0 = logdir_of(&jb->disks[0]);
    CLEANUP_FREE uint64_t *cs = NULL;
    size_t n;
    rc = logdir_sealed(dir0, &cs, &n, NULL);
    if (rc < 0)
        return rc;
    release_shipped(jb, last_cycle);
    for (size_t k = 0; k < n; k++) {
        uint64_t N = cs[k];
        if (N <= last_cycle)
            continue;
        if (N != last_cycle + 1)
            return vr_err(-EBADMSG, "change log: cycle %llu missing",
                          (unsigned long long)last_cycle + 1);
        uint64_t t0 = vr_mono_ms();
        uint64_t raw = 0, wire = 0, build_ms = 0;
        rc = send_cycle(vm, jb, N, &raw, &wire, &build_ms);
        if (rc < 0)
            return rc;
        uint64_t lat = vr_mono_ms() - t0;
        rc = record_sent(vm, N, raw, wire, lat);
        if (rc < 0)
            return rc;
        release_shipped(jb, N);
        last_cycle = N;
        log_debug("shipper", "%s: cycle %llu sent (%llu raw, %llu wire, %llu "
                             "ms; built in %llu ms, %s)",
                  jb->name, (unsigned long long)N, (unsigned long long)raw,
                  (unsigned long long)wire, (unsigned long long)lat,
                  (unsigned long long)build_ms,
                  jb->peer.kerberos ? "then sent" : "sent meanwhile");
    }
    return 0;
}

/* --- the thread ----------------------------------------------------------- */

static const unsigned backoff_s[] = { 60, 120, 240, 480, 600, 1800 };

/* d->lock held, after a failed attempt: if it failed because change
 * tracking stopped, resynchronize at once (--auto-resync on). */
static bool
auto_resync(struct vm *vm, const char *msg)
{
    struct repl *r = vm->repl;
    if (!r->untracked || r->auto_resync_off || r->st != REPL_ST_REPLICATING ||
        !r->initial_done || r->resync_step != RESYNC_NONE)
        return false;
    r->resync_step = RESYNC_REQUESTED;
    r->resync_compared = r->resync_sent = 0;
    if (!resync_window_open(r->resync_window, time(NULL))) {
        VR_IGNORE(repl_transition_event(
            pctx.d->cat, vm, REPL_ST_WAIT_RESYNC, REPL_T_SAVE, "warning",
            "change tracking stopped (%s); the resynchronization of the "
            "regions changed waits for its window %s", msg,
            r->resync_window));
        return true;
    }
    free(r->task);
    r->task = xstrdup("Resynchronization");
    VR_IGNORE(repl_transition_event(
        pctx.d->cat, vm, REPL_ST_RESYNC, REPL_T_SAVE, "warning",
        "change tracking stopped (%s); resynchronizing the regions changed",
        msg));
    return true;
}

static void *
shipper_main(void *arg)
{
    struct vm *vm = arg;
    struct repl *r = vm->repl;
    unsigned failures = 0;
    vr_thread_name("ship %s", vm->name);
    /* next_due: when to try next (a retry comes sooner); sched_due: when
     * the next cycle is due by the schedule, moved only by a successful
     * cycle (or a missed one), so that retries through an outage still
     * count the cycles it costs. */
    uint64_t next_due = 0, sched_due = 0;
    pthread_mutex_lock(&pctx.d->lock);
    if (r->app_every) {
        /* A crash between a freeze and its thaw would leave the guest
         * frozen: thaw once at start (harmless if it is not). */
        CLEANUP_FREE char *rundir = vm_rundir(pctx.d, vm);
        pthread_mutex_unlock(&pctx.d->lock);
        bool served = false, running = false;
        vmproc_status(rundir, &served, &running);
        int64_t n = 0;
        if (running &&
            vmproc_guest_command(rundir, "{\"execute\":"
                                         "\"guest-fsfreeze-thaw\"}\n",
                                 QGA_THAW_MS, &n) == 0 && n > 0)
            log_warn("shipper", "%s: thawed %lld file system(s) left frozen",
                     vm->name, (long long)n);
        vr_err_clear();
        pthread_mutex_lock(&pctx.d->lock);
    }
    while (!r->stop && !pctx.d->shutting_down) {
        if (r->st == REPL_ST_WAIT_RESYNC)
            resync_start_if_due(vm);
        initial_schedule_due(vm); /* a scheduled start (--at) */
        /* The initial copy and a resynchronization run to their end, as
         * one step (each resumes where it stopped). */
        bool initial = r->st == REPL_ST_INITIAL || r->st == REPL_ST_RESYNC;
        bool replicating = r->st == REPL_ST_REPLICATING;
        /* Time spent suspended or in error is not missed cycles. */
        if (!initial && !replicating) {
            next_due = sched_due = 0;
            r->missed_run = 0;
        }
        uint64_t now = vr_mono_ms();
        if ((!initial && !replicating) || (now < next_due && !r->kick)) {
            uint64_t wait_ms = (initial || replicating) && next_due > now
                                   ? next_due - now
                                   : 1000;
            daemon_wait_ms(pctx.d, wait_ms > 1000 ? 1000 : wait_ms);
            continue;
        }
        r->kick = false;
        unsigned freq_ms = (r->frequency_s ? r->frequency_s : 300) * 1000;
        /* A cycle is missed when the next one falls due before it was
         * sent: still being sent, or failing and retried. */
        if (replicating && sched_due && now >= sched_due + freq_ms) {
            uint64_t k = (now - sched_due) / freq_ms;
            r->missed += k;
            r->missed_run += k;
            sched_due += k * freq_ms;
        }
        uint64_t started = now;
        struct job jb;
        job_fill(&jb, vm);
        pthread_mutex_unlock(&pctx.d->lock);

        vr_err_clear();
        int rc = resync_check_budget(vm, &jb);
        if (rc < 0) {
            log_warn("shipper", "%s: %s", vm->name, vr_errmsg());
            vr_err_clear();
        }
        pthread_mutex_lock(&pctx.d->lock);
        uint64_t last = r->last_cycle;
        bool resync = r->st == REPL_ST_RESYNC;
        pthread_mutex_unlock(&pctx.d->lock);
        rc = resync        ? run_resync(vm, &jb)
                 : initial ? run_initial(vm, &jb)
                           : ship_cycles(vm, &jb, last);
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        job_fini(&jb);

        pthread_mutex_lock(&pctx.d->lock);
        if (rc == 0 || rc == -ECANCELED) {
            if (failures)
                event_add(pctx.d->cat, "info", vm->name,
                          "replication recovered after %u "
                          "failed attempt(s)",
                          failures);
            failures = 0;
            next_due = sched_due = initial ? 0 : started + freq_ms;
            r->missed_run = 0;
            continue;
        }
        if (replicating && !sched_due)
            sched_due = started;
        r->errors++;
        free(r->last_error);
        r->last_error = xstrdup(msg);
        if (auto_resync(vm, msg)) {
            next_due = 0;
            continue;
        }
        if (peer_unrecoverable(rc)) {
            /* Saved below with the error counters. */
            VR_IGNORE(repl_transition_event(pctx.d->cat, vm, REPL_ST_ERROR, 0,
                                            "error", "replication stopped: %s",
                                            msg));
        } else {
            unsigned idx = failures < ARRAY_SIZE(backoff_s)
                               ? failures
                               : ARRAY_SIZE(backoff_s) - 1;
            uint64_t delay_ms = (uint64_t)backoff_s[idx] * 1000;
            if (delay_ms > freq_ms)
                delay_ms = freq_ms;
            if (failures == 0 || failures % 10 == 0)
                event_add(pctx.d->cat, "warning", vm->name,
                          "replication failed, retrying "
                          "in %llu s: %s",
                          (unsigned long long)delay_ms / 1000, msg);
            failures++;
            next_due = vr_mono_ms() + delay_ms;
        }
        VR_IGNORE(catalog_save_repl(pctx.d->cat, r));
    }
    r->thread_running = false;
    pthread_cond_broadcast(&pctx.d->cond);
    pthread_mutex_unlock(&pctx.d->lock);
    return NULL;
}

void
shipper_ensure(struct vm *vm)
{
    struct repl *r = vm->repl;
    if (!r || r->mode != VM_MODE_PRIMARY || r->thread_running ||
        vm_busy(vm, VM_OP_REMOVE) || pctx.d->shutting_down)
        return;
    if (r->st == REPL_ST_INITIAL && !r->task)
        r->task = xstrdup("InitialReplication");
    r->stop = false;
    r->thread_running = true;
    if (pthread_create(&r->thread, NULL, shipper_main, vm) != 0) {
        r->thread_running = false;
        log_error("shipper", "%s: cannot start thread", vm->name);
        return;
    }
    pthread_detach(r->thread);
}

void
shipper_stop(struct vm *vm)
{
    struct repl *r = vm->repl;
    if (!r)
        return;
    r->stop = true;
    pthread_cond_broadcast(&pctx.d->cond);
    while (r->thread_running)
        pthread_cond_wait(&pctx.d->cond, &pctx.d->lock);
}
