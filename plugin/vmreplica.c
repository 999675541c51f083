/* vmreplica.c: nbdkit-vmreplica-plugin, the data plane (ARCHITECTURE.md).
 *
 * Serves each tracked disk (a raw file) as an NBD export named by its disk
 * id, does the file I/O itself and logs every write, write-zeroes and trim
 * in the disk's open change-log segment (PATH.vrlog/CYCLE.open) before the
 * request completes.  Flush and FUA make the log and then the disk durable
 * before replying.
 *
 * Writes are logged by reference (log=ref, the default; docs/design.md):
 * a CL_WREF record without data, written before the disk changes.  The
 * shipper reads the data from the disk image.  Per 4 KiB block the plugin
 * remembers which sealed-but-unshipped cycle's WREF last wrote it (owner);
 * before a request changes such a block it appends the block's content to
 * that cycle's preserve file (PATH.vrlog/CYCLE.pre), so the cycle can still
 * be built as it was at its seal.  SHIPPED N over the control socket ends
 * the protection of cycles <= N.  log=data copies the data into the
 * record instead (format version 1 behaviour).
 *
 * The write path, its locking and its crash safety: track.c; start-up
 * recovery: recover.c; the control socket: control.c; view mode: view.c.
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <nbdkit-plugin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "changelog.h"
#include "plugin.h"
#include "vr.h"

struct disk disks[MAX_DISKS];
unsigned ndisks;
char *control_path;
char *hashlog_path;

pthread_rwlock_t seal_lock;
uint64_t open_cycle;  /* protected by seal_lock */
uint64_t shipped;     /* cycles <= shipped are shipped (atomic) */
bool log_ref = true;  /* log=ref (default) or log=data */
/* sealsync=on: sync each sealed segment and the next one's creation under
 * the seal, as if a log were trusted after a power loss.  It is not (the
 * tracking marker's boot, formats.md §7), so off by default: the syncs
 * only held every guest write back at each seal. */
static bool seal_sync = false;
int logio = CL_MMAP_NODATA; /* logio=auto (default), write, mmap */
uint64_t refmap_max = 1u << 20; /* owner entries per disk */
int stopped;           /* set once the log cannot follow the disk */
char stopped_msg[256];

/* --- configuration ----------------------------------------------------- */

static void
vmreplica_load(void)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* A SEAL must not starve behind a steady stream of writes. */
    pthread_rwlockattr_setkind_np(&attr,
                                  PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&seal_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    gnutls_global_init();
}

static void
vmreplica_cleanup(void)
{
    control_stop();
}

static void
vmreplica_unload(void)
{
    control_stop();
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        /* A clean stop: everything durable, then the marker no longer
         * names this boot (a host restart after it loses nothing). */
        if (d->markfd >= 0 && !tracking_stopped()) {
            /* make_durable stops tracking if the log cannot sync. */
            int rc = make_durable(d);
            if (rc == 0 && !tracking_stopped())
                rc = al_clear(d);
            if (rc == 0 && !tracking_stopped())
                rc = tracking_marker_write(d->markfd, false, 0, NULL);
            if (rc < 0)
                nbdkit_error("%s: %s", d->id, vr_errmsg());
        }
        cl_writer_free(d->w);
        for (unsigned k = 0; k < PRE_OPEN; k++)
            cl_writer_free(d->pre[k]);
        u64map_free(&d->owner);
        dirtymap_free(&d->dirty);
        al_close(d);
        if (d->markfd >= 0)
            close(d->markfd);
        pthread_mutex_destroy(&d->pre_lock);
        if (d->fd >= 0)
            close(d->fd);
        if (d->dirfd >= 0)
            close(d->dirfd);
        pthread_mutex_destroy(&d->lock);
        pthread_cond_destroy(&d->idle);
        pthread_cond_destroy(&d->logged);
        free(d->id);
        free(d->path);
        free(d->logdir);
    }
    ndisks = 0;
    view_close();
    free(control_path);
    free(hashlog_path);
    pthread_rwlock_destroy(&seal_lock);
    gnutls_global_deinit();
}

static int
vmreplica_config(const char *key, const char *value)
{
    if (strcmp(key, "disk") == 0) {
        const char *colon = strchr(value, ':');
        if (!colon || colon == value || !colon[1]) {
            nbdkit_error("disk=%s: expected disk=ID:PATH", value);
            return -1;
        }
        if (ndisks >= MAX_DISKS) {
            nbdkit_error("too many disks (at most %d)", MAX_DISKS);
            return -1;
        }
        char *id = strndup(value, (size_t)(colon - value));
        if (!id || !vr_name_valid(id)) {
            nbdkit_error("disk=%s: invalid disk id", value);
            free(id);
            return -1;
        }
        for (unsigned i = 0; i < ndisks; i++) {
            if (strcmp(disks[i].id, id) == 0) {
                nbdkit_error("disk id %s given twice", id);
                free(id);
                return -1;
            }
        }
        struct disk *d = &disks[ndisks];
        d->id = id;
        d->path = nbdkit_realpath(colon + 1);
        if (!d->path) {
            free(id);
            d->id = NULL;
            return -1;
        }
        d->logdir = xasprintf("%s.vrlog", d->path);
        d->fd = -1;
        d->dirfd = -1;
        d->markfd = -1;
        d->alfd = -1;
        /* Adaptive: the critical section is two short writes; spinning
         * briefly beats a futex sleep and wake-up of a worker thread. */
        pthread_mutexattr_t ma;
        pthread_mutexattr_init(&ma);
        pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
        pthread_mutex_init(&d->lock, &ma);
        pthread_cond_init(&d->idle, NULL);
        pthread_cond_init(&d->logged, NULL);
        pthread_mutex_init(&d->pre_lock, NULL);
        d->inflight = NULL;
        pthread_mutexattr_destroy(&ma);
        ndisks++;
    } else if (strcmp(key, "control") == 0) {
        free(control_path);
        control_path = xstrdup(value);
    } else if (strcmp(key, "logio") == 0) {
        if (strcmp(value, "mmap") == 0)
            logio = CL_MMAP_ALL;
        else if (strcmp(value, "write") == 0)
            logio = CL_MMAP_OFF;
        else if (strcmp(value, "auto") == 0)
            logio = CL_MMAP_NODATA;
        else {
            nbdkit_error("logio=%s: expected auto, write or mmap", value);
            return -1;
        }
    } else if (strcmp(key, "view") == 0) {
        /* UNDODIR:POINT:LATEST (the directory may not contain ':'). */
        const char *c1 = strchr(value, ':');
        const char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        char *e1, *e2;
        if (!c1 || !c2 || c1 == value)
            goto bad_view;
        errno = 0;
        view_point = strtoull(c1 + 1, &e1, 10);
        view_latest = strtoull(c2 + 1, &e2, 10);
        if (errno || e1 != c2 || *e2 || e2 == c2 + 1 ||
            view_point > view_latest) {
        bad_view:
            nbdkit_error("view=%s: expected UNDODIR:POINT:LATEST", value);
            return -1;
        }
        free(view_dir);
        char *d = strndup(value, (size_t)(c1 - value));
        view_dir = d ? nbdkit_realpath(d) : NULL;
        free(d);
        if (!view_dir)
            return -1;
    } else if (strcmp(key, "log") == 0) {
        if (strcmp(value, "ref") == 0)
            log_ref = true;
        else if (strcmp(value, "data") == 0)
            log_ref = false;
        else {
            nbdkit_error("log=%s: expected ref or data", value);
            return -1;
        }
    } else if (strcmp(key, "refmap") == 0) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(value, &end, 10);
        if (errno || end == value || *end || v > (1ull << 32)) {
            nbdkit_error("refmap=%s: expected a number of blocks", value);
            return -1;
        }
        refmap_max = v;
    } else if (strcmp(key, "alcheckpoint") == 0) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(value, &end, 10);
        if (errno || *end || end == value || v > 86400) {
            nbdkit_error("alcheckpoint=%s: expected 0 .. 86400 seconds",
                         value);
            return -1;
        }
        al_checkpoint_s = (unsigned)v;
    } else if (strcmp(key, "sealsync") == 0) {
        if (strcmp(value, "on") == 0)
            seal_sync = true;
        else if (strcmp(value, "off") == 0)
            seal_sync = false;
        else {
            nbdkit_error("sealsync=%s: expected on or off", value);
            return -1;
        }
    } else if (strcmp(key, "hashlog") == 0) {
        free(hashlog_path);
        hashlog_path = nbdkit_absolute_path(value);
        if (!hashlog_path)
            return -1;
    } else {
        nbdkit_error("unknown parameter %s", key);
        return -1;
    }
    return 0;
}

static int
vmreplica_config_complete(void)
{
    cl_writer_use_mmap(logio);
    cl_writer_seal_syncs(seal_sync);
    if (ndisks == 0) {
        nbdkit_error("at least one disk=ID:PATH is required");
        return -1;
    }
    if (!control_path) {
        nbdkit_error("control=SOCKETPATH is required");
        return -1;
    }
    if (strlen(control_path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        nbdkit_error("control=%s: path too long", control_path);
        return -1;
    }
    return 0;
}

#define vmreplica_config_help                                                  \
    "disk=ID:PATH        (required, repeatable) raw disk file to track\n"       \
    "control=SOCKET      (required) control socket (SEAL, STATUS, PING)\n"      \
    "logio=auto|write|mmap  how records reach the log: auto (default)\n"   \
    "                    maps records without data and writes the rest;\n"   \
    "                    mmap maps all (faster on tmpfs, slower on ext4)\n"   \
    "log=ref|data        log writes by reference to the disk (default) or\n"  \
    "                    copy their data into the log\n"                      \
    "refmap=N            blocks tracked by reference per disk before writes\n"\
    "                    fall back to log=data (default 1048576)\n"           \
    "alcheckpoint=S      forget activity-log extents not written for S\n"   \
    "                    seconds, at a seal (default 60; 0: never)\n"        \
    "sealsync=on|off     sync each seal as if the log were trusted after a\n" \
    "                    power loss (default off: it is not, formats.md §7)\n" \
    "hashlog=FILE        append '<cycle> <id> <sha256>' per disk at each seal\n" \
    "view=DIR:POINT:LATEST  serve the disks read-only at recovery point\n"  \
    "                    POINT from the undo spans in DIR (no tracking)"

/* --- start-up ---------------------------------------------------------- */

/* Open disk d's log directory and its tracking marker, and say whether the
 * marker says tracking stopped (why and since when).  A log that cannot
 * be opened stops tracking too: the disks are served regardless. */
char boot_id[40];

static int
open_log(struct disk *d, bool *was_stopped, uint64_t *cycle, char *why,
         size_t n)
{
    *was_stopped = false;
    if (dirtymap_init(&d->dirty, d->size, DIRTY_GRAIN_SHIFT) < 0) {
        nbdkit_error("%s: %s", d->path, vr_errmsg());
        return -1;
    }
    if (mkdir(d->logdir, 0755) < 0 && errno != EEXIST) {
        snprintf(why, n, "mkdir %s: %m", d->logdir);
        return 1;
    }
    d->dirfd = open(d->logdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d->dirfd < 0) {
        snprintf(why, n, "open %s: %m", d->logdir);
        return 1;
    }
    if (tracking_marker_open(d->dirfd, &d->markfd) < 0) {
        snprintf(why, n, "%s: %s", d->logdir, vr_errmsg());
        return 1;
    }
    int rc = tracking_marker_read(d->markfd, was_stopped, cycle, why, n);
    if (rc < 0) {
        snprintf(why, n, "%s: %s", d->logdir, vr_errmsg());
        return 1;
    }
    char then[64];
    if (!*was_stopped &&
        tracking_marker_boot(d->markfd, then, sizeof then) == 0 && then[0] &&
        strcmp(then, boot_id) != 0) {
        snprintf(why, n, "the host went down while the disks were served "
                 "(boot %.36s; now %.36s): writes not yet flushed may be on "
                 "the disks without their records", then, boot_id);
        return 1;
    }
    return 0;
}

/* Start with tracking stopped (msg says why): the extents the activity
 * log names may differ from what the log says (al_open marked them), or
 * every grain of a disk whose activity log is not there. */
static void
start_stopped(const char *msg)
{
    for (unsigned i = 0; i < ndisks; i++)
        if (disks[i].alfd < 0)
            dirtymap_mark_all(&disks[i].dirty);
    stop_tracking(msg);
}

static int
vmreplica_get_ready(void)
{
    char why[256] = "", msg[512] = "";
    uint64_t marker_cycle = 0;
    /* Test hook (the daemon passes no plugin options through): a shorter
     * activity-log checkpoint period, as alcheckpoint= would set. */
    const char *alc = getenv("VMREPLICA_TEST_ALCHECKPOINT");
    if (alc && *alc)
        al_checkpoint_s = (unsigned)strtoul(alc, NULL, 10);
    if (!view_dir && vr_boot_id(boot_id) < 0)
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        struct stat st;
        d->fd = open(d->path, (view_dir ? O_RDONLY : O_RDWR) | O_CLOEXEC);
        if (d->fd < 0 || fstat(d->fd, &st) < 0) {
            nbdkit_error("open %s: %m", d->path);
            return -1;
        }
        if (!S_ISREG(st.st_mode)) {
            nbdkit_error("%s: not a regular file", d->path);
            return -1;
        }
        d->size = (uint64_t)st.st_size;
        if (view_dir)
            continue; /* no change log in view mode */
        bool was_stopped;
        uint64_t c = 0;
        int rc = open_log(d, &was_stopped, &c, why, sizeof why);
        if (rc < 0)
            return -1;
        if (rc > 0 && !msg[0])
            snprintf(msg, sizeof msg, "disk %s: %s%s", d->id,
                     d->markfd >= 0 ? "" : "its change log cannot be opened: ",
                     why);
        if (was_stopped && !msg[0]) {
            snprintf(msg, sizeof msg, "%s", why);
            nbdkit_debug("tracking had stopped before this start: %s", why);
        }
        /* After a crash, or with tracking stopped before, the extents the
         * activity log names are suspect: into the dirty map with them. */
        if (d->dirfd >= 0 && al_open(d, rc > 0 || was_stopped ? &d->dirty
                                                              : NULL) < 0) {
            nbdkit_error("%s: %s; a host crash would mark the whole disk",
                         d->id, vr_errmsg());
            al_close(d);
        }
        if (c > marker_cycle)
            marker_cycle = c;
    }
    if (view_dir)
        return view_open() < 0 ? -1 : control_open();
    /* Replication never keeps the VM from starting: a log that cannot be
     * opened or recovered stops tracking instead (track.c). */
    if (!msg[0] && recover() < 0)
        snprintf(msg, sizeof msg, "change log recovery: %s", vr_errmsg());
    uint64_t lowest = open_cycle;
    for (unsigned i = 0; i < ndisks && !msg[0]; i++) {
        if (rebuild_owner(&disks[i]) < 0)
            snprintf(msg, sizeof msg, "change log recovery: %s",
                     vr_errmsg());
        if (disks[i].owner.drop_upto < lowest)
            lowest = disks[i].owner.drop_upto;
    }
    /* From now until a clean stop the markers name this boot. */
    for (unsigned i = 0; i < ndisks && !msg[0]; i++)
        if (tracking_marker_served(disks[i].markfd, boot_id) < 0)
            snprintf(msg, sizeof msg, "disk %s: %s", disks[i].id,
                     vr_errmsg());
    if (msg[0]) {
        if (recover_stopped(marker_cycle) < 0)
            nbdkit_debug("%s", vr_errmsg());
        start_stopped(msg);
        nbdkit_debug("serving %u disks untracked after cycle %" PRIu64,
                     ndisks, open_cycle);
    } else {
        shipped = lowest;
        nbdkit_debug("tracking %u disks at cycle %" PRIu64, ndisks,
                     open_cycle);
    }
    /* Bound before nbdkit forks, so the socket exists once it is ready;
     * the thread is only started after the fork. */
    return control_open();
}

static int
vmreplica_after_fork(void)
{
    return control_start();
}

/* --- exports ----------------------------------------------------------- */

static int
vmreplica_list_exports(int readonly, int is_tls, struct nbdkit_exports *ex)
{
    (void)readonly;
    (void)is_tls;
    for (unsigned i = 0; i < ndisks; i++)
        if (nbdkit_add_export(ex, disks[i].id, NULL) < 0)
            return -1;
    return 0;
}

static const char *
vmreplica_default_export(int readonly, int is_tls)
{
    (void)readonly;
    (void)is_tls;
    return disks[0].id;
}

static void *
vmreplica_open(int readonly)
{
    (void)readonly;
    const char *name = nbdkit_export_name();
    if (!name || !*name)
        return &disks[0];
    for (unsigned i = 0; i < ndisks; i++)
        if (strcmp(disks[i].id, name) == 0)
            return &disks[i];
    nbdkit_error("no disk with id \"%s\"", name);
    errno = ENOENT;
    return NULL;
}

static int
vmreplica_thread_model(void)
{
    return NBDKIT_THREAD_MODEL_PARALLEL;
}

static int64_t
vmreplica_get_size(void *h)
{
    struct disk *d = h;
    struct stat st;
    if (fstat(d->fd, &st) < 0) {
        nbdkit_error("stat %s: %m", d->path);
        return -1;
    }
    return st.st_size;
}

static int
yes(void *h)
{
    (void)h;
    return 1;
}

/* Writes, and extents (the live disk's holes are not the point's), only
 * when tracking, not in view mode. */
static int
tracking(void *h)
{
    (void)h;
    return !view_dir;
}

static int
vmreplica_can_fua(void *h)
{
    (void)h;
    return NBDKIT_FUA_NATIVE;
}

static int
vmreplica_can_cache(void *h)
{
    (void)h;
    return NBDKIT_CACHE_NONE;
}

static int
vmreplica_pread(void *h, void *buf, uint32_t count, uint64_t offset,
                uint32_t flags)
{
    struct disk *d = h;
    (void)flags;
    vr_err_clear();
    if (view_dir) {
        int vrc = view_read(d, buf, offset, count);
        return vrc < 0 ? fail(vrc, "read", d) : 0;
    }
    int rc = io_pread_all(d->fd, buf, count, (off_t)offset);
    if (rc == -ENODATA) { /* the file shrank under us */
        memset(buf, 0, count);
        rc = 0;
    }
    return rc < 0 ? fail(rc, "read", d) : 0;
}

/* Make [offset, offset+count) read as zeroes: punch a hole, else zero the
 * range, else write zeroes (unless a fast zero was asked for). */

static int
vmreplica_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
    return tracked(h, CL_WRITE, buf, count, offset, flags);
}

static int
vmreplica_zero(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    return tracked(h, CL_ZERO, NULL, count, offset, flags);
}

static int
vmreplica_trim(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    return tracked(h, CL_TRIM, NULL, count, offset, flags);
}

static int
vmreplica_flush(void *h, uint32_t flags)
{
    struct disk *d = h;
    (void)flags;
    vr_err_clear();
    pthread_rwlock_rdlock(&seal_lock);
    int rc = make_durable(d);
    pthread_rwlock_unlock(&seal_lock);
    return rc < 0 ? fail(rc, "flush", d) : 0;
}

static int
vmreplica_extents(void *h, uint32_t count, uint64_t offset, uint32_t flags,
                  struct nbdkit_extents *ex)
{
    struct disk *d = h;
    bool req_one = flags & NBDKIT_FLAG_REQ_ONE;
    uint64_t end = offset + count;

    while (offset < end) {
        off_t pos = lseek(d->fd, (off_t)offset, SEEK_DATA);
        if (pos < 0) {
            if (errno == ENXIO) /* only a hole up to the end of the file */
                return nbdkit_add_extent(ex, offset, end - offset,
                                         NBDKIT_EXTENT_HOLE |
                                             NBDKIT_EXTENT_ZERO);
            nbdkit_error("lseek %s: %m", d->path);
            return -1;
        }
        if ((uint64_t)pos > offset) {
            if (nbdkit_add_extent(ex, offset, (uint64_t)pos - offset,
                                  NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) < 0)
                return -1;
            if (req_one)
                return 0;
            offset = (uint64_t)pos;
            continue;
        }
        pos = lseek(d->fd, (off_t)offset, SEEK_HOLE);
        if (pos < 0) {
            nbdkit_error("lseek %s: %m", d->path);
            return -1;
        }
        if (nbdkit_add_extent(ex, offset, (uint64_t)pos - offset, 0) < 0)
            return -1;
        if (req_one)
            return 0;
        offset = (uint64_t)pos;
    }
    return 0;
}

static struct nbdkit_plugin plugin = {
    .name = "vmreplica",
    .longname = "vmreplica change-tracking data plane",
    .version = VERSION,
    .description = "Serves raw disks and logs every change for replication",
    .load = vmreplica_load,
    .unload = vmreplica_unload,
    .cleanup = vmreplica_cleanup,
    .config = vmreplica_config,
    .config_complete = vmreplica_config_complete,
    .config_help = vmreplica_config_help,
    .magic_config_key = "disk",
    .thread_model = vmreplica_thread_model,
    .get_ready = vmreplica_get_ready,
    .after_fork = vmreplica_after_fork,
    .list_exports = vmreplica_list_exports,
    .default_export = vmreplica_default_export,
    .open = vmreplica_open,
    .get_size = vmreplica_get_size,
    .can_write = tracking,
    .can_flush = tracking,
    .can_trim = tracking,
    .can_zero = tracking,
    .can_fast_zero = tracking,
    .can_multi_conn = yes,
    .can_extents = tracking,
    .can_fua = vmreplica_can_fua,
    .can_cache = vmreplica_can_cache,
    .pread = vmreplica_pread,
    .pwrite = vmreplica_pwrite,
    .zero = vmreplica_zero,
    .trim = vmreplica_trim,
    .flush = vmreplica_flush,
    .extents = vmreplica_extents,
    .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN(plugin)
