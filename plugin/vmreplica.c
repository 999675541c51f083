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
 * Locking: each write-class request holds the process-wide seal_lock for
 * reading.  Under its disk's mutex it waits until no in-flight request
 * shares a 4 KiB block with its byte range, registers its range, reserves
 * its log record (sequence number and place in the segment) and updates
 * the block owners; then, without the mutex, it preserves what older
 * unshipped cycles need and writes its record, in parallel with requests
 * on other blocks (a record without data that needs no preserve, the
 * usual case, is copied into the mapped segment at once, under the
 * mutex).  Requests sharing a block never run at the same time,
 * so the log order equals the order in which writes to the same bytes hit
 * the disk, and a block is preserved before anything changes it.
 *
 * The change log must survive a crash of this process at any instant with
 * every change the disk holds (docs/design.md "Crash safety of the change
 * log"): (1) every record is written before its request changes the disk,
 * whatever its kind; (2) a request changes the disk only once every record
 * reserved before its own is written (wait_logged_prefix), so the records
 * written form a prefix of the reservation order up to the first record
 * not yet written, and no request after that one has changed the disk.
 * Reopening after a crash cuts the segment at its first hole, which keeps
 * every record whose request could have changed the disk, hence every
 * request the guest saw complete.  A request whose disk I/O fails appends
 * a record of what the disk now holds (log_readback); one whose preserve
 * fails fills its place with a record that changes nothing and leaves the
 * disk alone.  SEAL (over the control socket) takes seal_lock for writing:
 * no write is in flight on any disk while every disk's segment is sealed
 * and the next one opened, which gives one crash-consistent cut across all
 * disks of the VM.
 *
 * Control protocol (docs/formats.md): one request line, one reply line, on a
 * unix stream socket: SEAL -> "OK <sealed cycle>", STATUS -> "OK <open
 * cycle> <bytes in open segments> <payload bytes they stand for>",
 * SHIPPED N -> "OK N", PING -> "OK";
 * errors are "ERR <msg>".
 *
 * Recovery at start-up (.get_ready) cuts torn log tails, finishes a seal
 * that a crash interrupted, so every disk ends up with the same open cycle,
 * and rebuilds the block owners from the unshipped segments.  If the log
 * ever cannot follow the disk (a record or a preserve cannot be written),
 * the plugin fails every further write with EIO and SEAL with ERR until it
 * is restarted, rather than let the replica silently diverge.
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include "config.h"

#include <assert.h>
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <nbdkit-plugin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "changelog.h"
#include "u64map.h"
#include "undo.h"
#include "vr.h"

#define MAX_DISKS       64
#define CTL_LINE_MAX    256
#define CTL_TIMEOUT_S   30
#define HASH_CHUNK      (1u << 20)
#define PRE_OPEN        4          /* preserve files kept open per disk */
#define PRE_PIECE_MAX   (32u << 20) /* largest preserve record */

/* A write-class request in progress (on its stack): its byte range,
 * widened to whole CL_PRE_BLOCK blocks (preserving works on blocks, so two
 * requests sharing a block must not run together), and its log record. */
struct range {
    uint64_t start, end;
    uint64_t seq;  /* its record's sequence number */
    bool logged;   /* its record is written to the segment */
    struct range *next;
};

struct disk {
    char *id;
    char *path;
    char *logdir;
    int fd;
    int dirfd;
    pthread_mutex_t lock;  /* guards inflight and log reservations */
    pthread_cond_t idle;   /* signalled when an in-flight range ends */
    struct range *inflight; /* write-class requests now in progress */
    unsigned unlogged;     /* of those, how many have no record written
                              (changed under lock, read atomically) */
    unsigned log_waiters;  /* requests waiting in wait_logged_prefix */
    pthread_cond_t logged; /* signalled when a record is written */
    bool no_punch;         /* the file system cannot punch holes */
    struct cl_writer *w;   /* open segment; replaced under seal_lock (W) */
    uint64_t size;         /* bytes (raw disks do not change size) */
    /* Writes logged by reference (log=ref): block -> the cycle whose
     * CL_WREF record last wrote it, while that cycle is not shipped
     * (values <= shipped are dead).  Guarded by lock. */
    struct u64map owner;
    uint64_t compacted_at; /* shipped when owner was last compacted */
    /* Preserve files being appended, one whole record at a time. */
    pthread_mutex_t pre_lock;
    struct cl_writer *pre[PRE_OPEN];
};

static struct disk disks[MAX_DISKS];
static unsigned ndisks;
static char *control_path;
static char *hashlog_path;

static pthread_rwlock_t seal_lock;
static uint64_t open_cycle;  /* protected by seal_lock */
static uint64_t shipped;     /* cycles <= shipped are shipped (atomic) */
static bool log_ref = true;  /* log=ref (default) or log=data */
static int logio = CL_MMAP_NODATA; /* logio=auto (default), write, mmap */
static uint64_t refmap_max = 1u << 20; /* owner entries per disk */
static int broken;           /* set once the log cannot follow the disk */
static char broken_msg[256];

/* View mode (view=UNDODIR:POINT:LATEST): serve the disks read-only as they
 * were at recovery point POINT of a Replica VM whose latest applied cycle
 * is LATEST, from the live disks plus the undo spans (lib/undo.h); no
 * change log.  REFRESH N on the control socket moves LATEST to N once the
 * span of cycle N is captured, before cycle N is applied, so the view stays
 * at POINT while replication continues. */
static char *view_dir;
static uint64_t view_point, view_latest;
static struct undo_view *view;
static int view_dirfd = -1;
static pthread_rwlock_t view_lock = PTHREAD_RWLOCK_INITIALIZER;
static void do_refresh(const char *arg, char *reply, size_t n);

static int listen_fd = -1;
static pthread_t ctl_thread;
static bool ctl_running;
static volatile int ctl_stop;

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
stop_control(void)
{
    if (listen_fd >= 0) {
        ctl_stop = 1;
        shutdown(listen_fd, SHUT_RDWR);
        if (ctl_running) {
            pthread_join(ctl_thread, NULL);
            ctl_running = false;
        }
        close(listen_fd);
        listen_fd = -1;
        if (control_path)
            unlink(control_path);
    }
}

static void
vmreplica_cleanup(void)
{
    stop_control();
}

static void
vmreplica_unload(void)
{
    stop_control();
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        if (d->w && cl_writer_sync(d->w) < 0)
            nbdkit_error("%s: %s", d->id, vr_errmsg());
        cl_writer_free(d->w);
        for (unsigned k = 0; k < PRE_OPEN; k++)
            cl_writer_free(d->pre[k]);
        u64map_free(&d->owner);
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
    undo_view_free(view);
    view = NULL;
    if (view_dirfd >= 0)
        close(view_dirfd);
    free(view_dir);
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
    "hashlog=FILE        append '<cycle> <id> <sha256>' per disk at each seal\n" \
    "view=DIR:POINT:LATEST  serve the disks read-only at recovery point\n"  \
    "                    POINT from the undo spans in DIR (no tracking)"

/* --- recovery ---------------------------------------------------------- */

/* The sequence number after the last record of sealed segment cycle: the
 * seq carried by its CL_SEAL record (the last 32 bytes). */
static int
sealed_next_seq(struct disk *d, unsigned idx, uint64_t cycle, uint64_t *out)
{
    char name[32];
    uint8_t buf[CL_REC_HDR_BYTES];
    struct cl_reader *r;
    struct cl_rec rec;
    size_t used;
    struct stat st;

    cl_seg_name(cycle, true, name);
    int rc = cl_reader_open(d->dirfd, name, &r); /* validates the header */
    if (rc < 0)
        return rc;
    bool hdr_ok = cl_reader_hdr(r)->disk == idx &&
                  cl_reader_hdr(r)->cycle == cycle;
    cl_reader_free(r);
    if (!hdr_ok)
        return vr_err(-EBADMSG, "%s/%s: header of another disk or cycle",
                      d->logdir, name);
    int fd = openat(d->dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "open %s/%s: %m", d->logdir, name);
    if (fstat(fd, &st) < 0 || st.st_size < CL_SEG_HDR_BYTES + CL_REC_HDR_BYTES)
        rc = -EBADMSG;
    else
        rc = io_pread_all(fd, buf, sizeof buf,
                          st.st_size - CL_REC_HDR_BYTES);
    close(fd);
    if (rc == 0)
        rc = cl_rec_decode(buf, sizeof buf, &rec, &used);
    if (rc == 0 && (rec.kind != CL_SEAL || rec.disk != idx))
        rc = -EBADMSG;
    if (rc < 0)
        return vr_err(rc, "%s/%s: no valid seal record at its end",
                      d->logdir, name);
    *out = rec.seq;
    return 0;
}

struct scan {
    unsigned nopen;
    uint64_t open_cycle;
    uint64_t open_min;
    uint64_t sealed_max; /* 0: none */
};

static int
scan_dir(struct disk *d, struct scan *s)
{
    int fd = dup(d->dirfd);
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    struct dirent *e;

    memset(s, 0, sizeof *s);
    if (!dir) {
        if (fd >= 0)
            close(fd);
        return vr_err(-errno, "read directory %s: %m", d->logdir);
    }
    rewinddir(dir);
    while ((e = readdir(dir)) != NULL) {
        char *end;
        if (strlen(e->d_name) < 24 || e->d_name[0] < '0' ||
            e->d_name[0] > '9')
            continue;
        errno = 0;
        uint64_t c = strtoull(e->d_name, &end, 10);
        if (errno || end != e->d_name + 20 || c == 0)
            continue;
        if (strcmp(end, ".open") == 0) {
            s->nopen++;
            if (c > s->open_cycle)
                s->open_cycle = c;
            if (s->open_min == 0 || c < s->open_min)
                s->open_min = c;
        } else if (strcmp(end, ".log") == 0) {
            if (c > s->sealed_max)
                s->sealed_max = c;
        }
    }
    closedir(dir);
    return 0;
}

/* First seq for a new segment of cycle on disk idx, after sealed_max. */
static int
next_first_seq(struct disk *d, unsigned idx, const struct scan *s,
               uint64_t *out)
{
    *out = 0;
    if (s->sealed_max == 0)
        return 0;
    return sealed_next_seq(d, idx, s->sealed_max, out);
}

static int zero_range(struct disk *d, uint32_t count, uint64_t offset,
                      bool fast);

/* A pending record kept at recovery: its request was in flight when the
 * process died, and may or may not have changed the disk.  No later record
 * shares a block with it (it was in flight), so doing it again is exactly
 * what it says, whether or not it had been done. */
static int
redo_pending(void *opaque, const struct cl_rec *rec)
{
    struct disk *d = opaque;
    int rc;

    if (rec->offset > d->size || rec->len > d->size - rec->offset)
        return vr_err(-EBADMSG, "%s: pending record seq %" PRIu64 " past "
                      "the end of the disk", d->id, rec->seq);
    if (rec->kind == CL_WRITE)
        rc = io_pwrite_all(d->fd, rec->data, rec->len, (off_t)rec->offset);
    else if (rec->kind == CL_ZERO || rec->kind == CL_TRIM)
        rc = zero_range(d, rec->len, rec->offset, false);
    else
        return vr_err(-EBADMSG, "%s: pending record seq %" PRIu64 " of "
                      "kind %u", d->id, rec->seq, rec->kind);
    /* The disk holds it before the record says it is settled. */
    if (rc == 0 && fdatasync(d->fd) < 0)
        rc = -errno;
    if (rc < 0)
        return vr_err(rc, "%s: redo record seq %" PRIu64 ": %s", d->id,
                      rec->seq, strerror(-rc));
    nbdkit_debug("%s: redid %s of %" PRIu32 " bytes at %" PRIu64 " (seq %"
                 PRIu64 ") left pending by a crash", d->id,
                 rec->kind == CL_WRITE ? "write" : rec->kind == CL_ZERO
                                                       ? "zero" : "trim",
                 rec->len, rec->offset, rec->seq);
    return 0;
}

/* Reopen CYCLE.open, recreating it if a crash tore its header. */
static int
reopen_open(struct disk *d, unsigned idx, const struct scan *s,
            uint64_t cycle)
{
    char name[32];
    struct stat st;
    uint64_t cut = 0, first_seq;

    int rc = cl_writer_reopen_redo(d->dirfd, (uint16_t)idx, cycle,
                                   redo_pending, d, &d->w, &cut);
    if (rc == 0) {
        nbdkit_debug("%s: reopened cycle %" PRIu64 " (%" PRIu64 " records, "
                     "torn tail of %" PRIu64 " bytes cut)", d->id, cycle,
                     cl_writer_records(d->w), cut);
        return 0;
    }
    cl_seg_name(cycle, false, name);
    if (rc != -EBADMSG || fstatat(d->dirfd, name, &st, 0) < 0 ||
        st.st_size > CL_SEG_HDR_BYTES)
        return rc;
    /* Creation was interrupted before its header was durable: no record can
     * have been written to it, so start it again. */
    nbdkit_debug("%s: cycle %" PRIu64 " segment has a torn header (%lld "
                 "bytes), recreating it", d->id, cycle,
                 (long long)st.st_size);
    rc = next_first_seq(d, idx, s, &first_seq);
    if (rc < 0)
        return rc;
    if (unlinkat(d->dirfd, name, 0) < 0)
        return vr_err(-errno, "unlink %s/%s: %m", d->logdir, name);
    return cl_writer_create(d->dirfd, (uint16_t)idx, cycle, first_seq, &d->w);
}

/* A crash after a seal's cut and before its commit leaves CYCLE.open,
 * complete with its CL_SEAL record, beside CYCLE+1.open: commit it, after
 * checking it reads as a whole sealed segment. */
static int
commit_cut(struct disk *d, uint64_t cycle)
{
    char from[32], to[32];
    cl_seg_name(cycle, false, from);
    cl_seg_name(cycle, true, to);
    int fd = openat(d->dirfd, from, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fdatasync(fd) < 0) {
        int rc = vr_err(-errno, "%s/%s: %m", d->logdir, from);
        if (fd >= 0)
            close(fd);
        return rc;
    }
    close(fd);
    if (renameat2(d->dirfd, from, d->dirfd, to, RENAME_NOREPLACE) < 0)
        return vr_err(-errno, "rename %s/%s: %m", d->logdir, from);
    struct cl_reader *r = NULL;
    struct cl_rec rec;
    int rc = cl_reader_open(d->dirfd, to, &r);
    while (rc == 0 && (rc = cl_reader_next(r, &rec)) == 1)
        rc = 0;
    cl_reader_free(r);
    if (rc < 0) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        renameat(d->dirfd, to, d->dirfd, from);
        return vr_err(-EBADMSG, "%s/%s: segment of a seal cut short by a "
                      "crash is damaged: %s", d->logdir, from, msg);
    }
    nbdkit_debug("%s: committed the seal of cycle %" PRIu64 " that a crash "
                 "interrupted", d->id, cycle);
    return io_fsync_dirfd(d->dirfd);
}

static int
recover(void)
{
    struct scan scans[MAX_DISKS];
    uint64_t target = 1;

    for (unsigned i = 0; i < ndisks; i++) {
        int rc = scan_dir(&disks[i], &scans[i]);
        if (rc < 0)
            return rc;
        if (scans[i].nopen == 2 &&
            scans[i].open_min + 1 == scans[i].open_cycle) {
            rc = commit_cut(&disks[i], scans[i].open_min);
            if (rc == 0)
                rc = scan_dir(&disks[i], &scans[i]);
            if (rc < 0)
                return rc;
        }
        if (scans[i].nopen > 1)
            return vr_err(-EBADMSG, "%s: %u open segments in %s",
                          disks[i].id, scans[i].nopen, disks[i].logdir);
        uint64_t want = scans[i].nopen ? scans[i].open_cycle
                                       : scans[i].sealed_max + 1;
        if (want > target)
            target = want;
    }
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        struct scan *s = &scans[i];
        uint64_t first_seq;
        int rc;

        if (s->sealed_max >= target)
            return vr_err(-EBADMSG, "%s: sealed cycle %" PRIu64 " is not "
                          "older than open cycle %" PRIu64, d->id,
                          s->sealed_max, target);
        if (s->nopen && s->open_cycle == target) {
            rc = reopen_open(d, i, s, target);
            if (rc < 0)
                return rc;
            continue;
        }
        if (s->nopen && s->open_cycle + 1 == target) {
            /* A crash interrupted a seal of open_cycle: finish it. */
            rc = reopen_open(d, i, s, s->open_cycle);
            if (rc == 0)
                rc = cl_writer_seal(d->w);
            if (rc < 0)
                return rc;
            first_seq = cl_writer_next_seq(d->w);
            nbdkit_debug("%s: finished interrupted seal of cycle %" PRIu64,
                         d->id, s->open_cycle);
            cl_writer_free(d->w);
            d->w = NULL;
        } else if (s->nopen) {
            return vr_err(-EBADMSG, "%s: open cycle %" PRIu64 " is behind "
                          "cycle %" PRIu64 " of another disk", d->id,
                          s->open_cycle, target);
        } else {
            rc = next_first_seq(d, i, s, &first_seq);
            if (rc < 0)
                return rc;
            if (s->sealed_max + 1 != target)
                nbdkit_debug("%s: last sealed cycle %" PRIu64 ", joining at "
                             "cycle %" PRIu64, d->id, s->sealed_max, target);
        }
        rc = cl_writer_create(d->dirfd, (uint16_t)i, target, first_seq,
                              &d->w);
        if (rc < 0)
            return rc;
        nbdkit_debug("%s: opened cycle %" PRIu64 " at seq %" PRIu64, d->id,
                     target, first_seq);
    }
    open_cycle = target;
    return 0;
}

/* Writes logged by reference: record r of cycle c updates the owner map
 * the way the write path does (a CL_WREF makes c the blocks' owner; any
 * other change drops an older owner, whose data it preserved first). */
static void
owner_apply(struct disk *d, const struct cl_rec *r, uint64_t c)
{
    if (r->len == 0)
        return;
    uint64_t b0 = r->offset / CL_PRE_BLOCK;
    uint64_t b1 = (r->offset + r->len - 1) / CL_PRE_BLOCK;
    for (uint64_t b = b0; b <= b1; b++) {
        if (r->kind == CL_WREF)
            u64map_put(&d->owner, b, c);
        else if (u64map_get(&d->owner, b) != c)
            u64map_put(&d->owner, b, 0);
    }
}

/* After a restart: the oldest sealed segment left says what is shipped
 * (the daemon deletes a cycle's segments only once the Replica server has
 * it); replaying the unshipped segments and the open one rebuilds the
 * owner map as it was.  Preserve files of shipped cycles are removed. */
static int
rebuild_owner(struct disk *d)
{
    int fd = dup(d->dirfd);
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    struct dirent *e;
    uint64_t lo = open_cycle;

    if (!dir) {
        if (fd >= 0)
            close(fd);
        return vr_err(-errno, "read directory %s: %m", d->logdir);
    }
    rewinddir(dir);
    while ((e = readdir(dir)) != NULL) {
        char *end;
        if (strlen(e->d_name) != 24 || e->d_name[0] < '0' ||
            e->d_name[0] > '9')
            continue;
        uint64_t c = strtoull(e->d_name, &end, 10);
        if (end == e->d_name + 20 && strcmp(end, ".log") == 0 && c < lo)
            lo = c;
    }
    rewinddir(dir);
    while ((e = readdir(dir)) != NULL) {
        char *end, log[32];
        if (strlen(e->d_name) != 24 || e->d_name[0] < '0' ||
            e->d_name[0] > '9')
            continue;
        uint64_t c = strtoull(e->d_name, &end, 10);
        if (end != e->d_name + 20 || strcmp(end, ".pre") != 0)
            continue;
        cl_seg_name(c, true, log);
        if (c < lo || c >= open_cycle ||
            faccessat(d->dirfd, log, F_OK, 0) < 0) {
            if (unlinkat(d->dirfd, e->d_name, 0) < 0 && errno != ENOENT) {
                int rc = vr_err(-errno, "remove %s/%s: %m", d->logdir,
                                e->d_name);
                closedir(dir);
                return rc;
            }
            nbdkit_debug("%s: removed preserve file %s of a shipped cycle",
                         d->id, e->d_name);
        }
    }
    closedir(dir);

    d->owner.drop_upto = lo - 1;
    d->compacted_at = lo - 1;
    for (uint64_t c = lo; c <= open_cycle; c++) {
        char name[32];
        struct cl_reader *r = NULL;
        struct cl_rec rec;
        cl_seg_name(c, c < open_cycle, name);
        int rc = cl_reader_open(d->dirfd, name, &r);
        if (rc == -ENOENT) {
            vr_err_clear();
            continue;
        }
        while (rc == 0 && (rc = cl_reader_next(r, &rec)) == 1) {
            owner_apply(d, &rec, c);
            rc = 0;
        }
        cl_reader_free(r);
        if (rc < 0)
            return rc;
    }
    nbdkit_debug("%s: %zu blocks logged by reference in cycles %" PRIu64
                 "..%" PRIu64, d->id, d->owner.used, lo, open_cycle);
    return 0;
}

/* --- control socket ---------------------------------------------------- */

static int
hash_disk(struct disk *d, char hex[65])
{
    gnutls_hash_hd_t h;
    uint8_t dig[32];
    off_t off = 0;
    int rc = 0;

    if (gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0)
        return vr_err(-EIO, "sha256 init failed");
    uint8_t *buf = xmalloc(HASH_CHUNK);
    for (;;) {
        ssize_t n = pread(d->fd, buf, HASH_CHUNK, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = vr_err(-errno, "read %s: %m", d->path);
            break;
        }
        if (n == 0)
            break;
        gnutls_hash(h, buf, (size_t)n);
        off += n;
    }
    gnutls_hash_deinit(h, dig);
    free(buf);
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", dig[i]);
    return rc;
}

static int
write_hashlog(uint64_t cycle)
{
    int fd = open(hashlog_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                  0644);
    if (fd < 0)
        return vr_err(-errno, "open %s: %m", hashlog_path);
    int rc = 0;
    for (unsigned i = 0; i < ndisks && rc == 0; i++) {
        char hex[65], line[160];
        rc = hash_disk(&disks[i], hex);
        if (rc < 0)
            break;
        int n = snprintf(line, sizeof line, "%" PRIu64 " %s %s\n", cycle,
                         disks[i].id, hex);
        rc = io_write_all(fd, line, (size_t)n);
    }
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    close(fd);
    if (rc < 0 && !vr_errmsg()[0])
        vr_err(rc, "write %s: %s", hashlog_path, strerror(-rc));
    return rc;
}

static void
set_broken(const char *msg)
{
    if (!broken)
        snprintf(broken_msg, sizeof broken_msg, "%.*s",
                 (int)sizeof broken_msg - 1, msg);
    __atomic_store_n(&broken, 1, __ATOMIC_RELEASE);
}

static void
do_seal(char *reply, size_t n)
{
    /* The cut happens with every write held back: append CL_SEAL to every
     * disk's segment, make it durable, and open the next ones.  The sync
     * must come before the next segment exists: after a power loss, a
     * next segment beside a sealed one whose seal did not reach the disk
     * is a state recovery could not repair (docs/design.md).  Renaming
     * the sealed segments to .log happens after writes resume; the reply
     * waits for it. */
    struct cl_writer *done[MAX_DISKS] = { NULL };
    bool ok = false, cut_all = false;
    pthread_rwlock_wrlock(&seal_lock);
    uint64_t c = open_cycle;
    if (broken) {
        snprintf(reply, n, "ERR tracking stopped: %s", broken_msg);
        pthread_rwlock_unlock(&seal_lock);
        return;
    }
    vr_fault_point("seal-begin");
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        int rc = cl_writer_seal_cut(d->w);
        if (rc == 0) {
            uint64_t next = cl_writer_next_seq(d->w);
            done[i] = TAKE_PTR(d->w);
            vr_fault_point("seal-disk");
            rc = cl_writer_create(d->dirfd, (uint16_t)i, c + 1, next, &d->w);
        }
        if (rc < 0) {
            /* Some disks may be at c+1 already; a restart finishes the
             * seal (recover()).  Until then nothing may be written. */
            char msg[256];
            snprintf(msg, sizeof msg, "seal of cycle %" PRIu64 " failed on "
                     "disk %s: %s", c, d->id, vr_errmsg());
            nbdkit_error("%s", msg);
            set_broken(msg);
            snprintf(reply, n, "ERR %s", msg);
            goto out;
        }
    }
    open_cycle = c + 1;
    cut_all = ok = true;
    if (hashlog_path && write_hashlog(c) < 0) {
        /* The cut stands (and is committed below); only the answer says
         * the hash log, a test aid, failed. */
        nbdkit_error("hashlog: %s", vr_errmsg());
        snprintf(reply, n, "ERR sealed %" PRIu64 " but hashlog failed: %s", c,
                 vr_errmsg());
        ok = false;
    }
out:
    pthread_rwlock_unlock(&seal_lock);
    for (unsigned i = 0; i < ndisks; i++) {
        if (!done[i])
            continue;
        vr_fault_point("seal-commit");
        if (cut_all && cl_writer_seal_commit(done[i]) < 0) {
            char msg[256];
            snprintf(msg, sizeof msg, "seal of cycle %" PRIu64 " failed on "
                     "disk %s: %s", c, disks[i].id, vr_errmsg());
            nbdkit_error("%s", msg);
            set_broken(msg);
            snprintf(reply, n, "ERR %s", msg);
            ok = false;
        }
        cl_writer_free(done[i]);
    }
    if (ok) {
        nbdkit_debug("sealed cycle %" PRIu64 " on %u disks", c, ndisks);
        snprintf(reply, n, "OK %" PRIu64, c);
    }
}

static void
do_status(char *reply, size_t n)
{
    uint64_t bytes = 0, payload = 0;
    pthread_rwlock_rdlock(&seal_lock);
    for (unsigned i = 0; i < ndisks; i++) {
        pthread_mutex_lock(&disks[i].lock);
        if (disks[i].w) {
            bytes += cl_writer_bytes(disks[i].w);
            payload += cl_writer_payload(disks[i].w);
        }
        pthread_mutex_unlock(&disks[i].lock);
    }
    if (broken)
        snprintf(reply, n, "ERR tracking stopped: %s", broken_msg);
    else
        snprintf(reply, n, "OK %" PRIu64 " %" PRIu64 " %" PRIu64, open_cycle,
                 bytes, payload);
    pthread_rwlock_unlock(&seal_lock);
}

/* SHIPPED N: the daemon has cycle N (and all before it) on the Replica
 * server; their blocks need no more protection and their preserve files
 * are closed (the daemon removes them with the segments). */
static void
do_shipped(const char *arg, char *reply, size_t n)
{
    char *end;
    errno = 0;
    uint64_t c = strtoull(arg, &end, 10);
    if (errno || end == arg || *end) {
        snprintf(reply, n, "ERR SHIPPED wants a cycle number");
        return;
    }
    pthread_rwlock_rdlock(&seal_lock);
    if (c >= open_cycle) {
        snprintf(reply, n, "ERR cycle %" PRIu64 " is not sealed", c);
        pthread_rwlock_unlock(&seal_lock);
        return;
    }
    for (unsigned i = 0; i < ndisks; i++) {
        struct disk *d = &disks[i];
        pthread_mutex_lock(&d->lock);
        if (c > d->owner.drop_upto)
            __atomic_store_n(&d->owner.drop_upto, c, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&d->lock);
        pthread_mutex_lock(&d->pre_lock);
        for (unsigned k = 0; k < PRE_OPEN; k++) {
            if (d->pre[k] && cl_writer_cycle(d->pre[k]) <= c) {
                cl_writer_free(d->pre[k]);
                d->pre[k] = NULL;
            }
        }
        pthread_mutex_unlock(&d->pre_lock);
    }
    if (c > __atomic_load_n(&shipped, __ATOMIC_ACQUIRE))
        __atomic_store_n(&shipped, c, __ATOMIC_RELEASE);
    pthread_rwlock_unlock(&seal_lock);
    snprintf(reply, n, "OK %" PRIu64, c);
}

static void
handle_line(char *line, char *reply, size_t n)
{
    size_t len = strlen(line);
    if (len > 0 && line[len - 1] == '\r')
        line[--len] = '\0';
    if (view_dir) {
        if (strncmp(line, "REFRESH ", 8) == 0)
            do_refresh(line + 8, reply, n);
        else if (strcmp(line, "STATUS") == 0)
            snprintf(reply, n, "OK view %" PRIu64 " %" PRIu64, view_point,
                     view_latest);
        else if (strcmp(line, "PING") == 0)
            snprintf(reply, n, "OK");
        else
            snprintf(reply, n, "ERR read-only view: unknown command");
        return;
    }
    if (strcmp(line, "SEAL") == 0)
        do_seal(reply, n);
    else if (strcmp(line, "STATUS") == 0)
        do_status(reply, n);
    else if (strcmp(line, "PING") == 0)
        snprintf(reply, n, "OK");
    else if (strncmp(line, "SHIPPED ", 8) == 0)
        do_shipped(line + 8, reply, n);
    else
        snprintf(reply, n, "ERR unknown command");
}

static void
serve_conn(int c)
{
    char buf[CTL_LINE_MAX + 2];
    size_t have = 0;

    for (;;) {
        char *nl;
        while ((nl = memchr(buf, '\n', have)) != NULL) {
            char reply[512];
            *nl = '\0';
            handle_line(buf, reply, sizeof reply - 1);
            strcat(reply, "\n");
            if (io_write_all(c, reply, strlen(reply)) < 0)
                return;
            have -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, have);
        }
        if (have > CTL_LINE_MAX) {
            static const char msg[] = "ERR line too long\n";
            if (io_write_all(c, msg, sizeof msg - 1) < 0)
                return;
            return;
        }
        ssize_t r = read(c, buf + have, sizeof buf - have);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        have += (size_t)r;
    }
}

static void *
control_main(void *arg)
{
    (void)arg;
    while (!ctl_stop) {
        int c = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (ctl_stop || errno == EINVAL || errno == EBADF)
                break;
            nbdkit_error("control socket accept: %m");
            sleep(1);
            continue;
        }
        struct timeval tv = { .tv_sec = CTL_TIMEOUT_S };
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        serve_conn(c);
        close(c);
    }
    return NULL;
}

static int
open_control(void)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    struct stat st;

    snprintf(sun.sun_path, sizeof sun.sun_path, "%s", control_path);
    if (lstat(control_path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            nbdkit_error("control=%s exists and is not a socket",
                         control_path);
            return -1;
        }
        unlink(control_path); /* stale socket of an earlier run */
    }
    listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd < 0) {
        nbdkit_error("control socket: %m");
        return -1;
    }
    if (bind(listen_fd, (struct sockaddr *)&sun, sizeof sun) < 0 ||
        chmod(control_path, 0600) < 0 || listen(listen_fd, 8) < 0) {
        nbdkit_error("control socket %s: %m", control_path);
        close(listen_fd);
        listen_fd = -1;
        return -1;
    }
    return 0;
}

/* --- view mode ---------------------------------------------------------- */

static int
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
static void
do_refresh(const char *arg, char *reply, size_t n)
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

/* --- start-up ---------------------------------------------------------- */

static int
vmreplica_get_ready(void)
{
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
        if (mkdir(d->logdir, 0755) < 0 && errno != EEXIST) {
            nbdkit_error("mkdir %s: %m", d->logdir);
            return -1;
        }
        d->dirfd = open(d->logdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (d->dirfd < 0) {
            nbdkit_error("open %s: %m", d->logdir);
            return -1;
        }
    }
    if (view_dir)
        return view_open() < 0 ? -1 : open_control();
    if (recover() < 0) {
        nbdkit_error("change log recovery: %s", vr_errmsg());
        return -1;
    }
    uint64_t lowest = open_cycle;
    for (unsigned i = 0; i < ndisks; i++) {
        if (rebuild_owner(&disks[i]) < 0) {
            nbdkit_error("change log recovery: %s", vr_errmsg());
            return -1;
        }
        if (disks[i].owner.drop_upto < lowest)
            lowest = disks[i].owner.drop_upto;
    }
    shipped = lowest;
    nbdkit_debug("tracking %u disks at cycle %" PRIu64, ndisks, open_cycle);
    /* Bound before nbdkit forks, so the socket exists once it is ready;
     * the thread is only started after the fork. */
    return open_control();
}

static int
vmreplica_after_fork(void)
{
    int e = pthread_create(&ctl_thread, NULL, control_main, NULL);
    if (e) {
        nbdkit_error("control thread: %s", strerror(e));
        return -1;
    }
    ctl_running = true;
    return 0;
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

/* --- I/O --------------------------------------------------------------- */

static int
fail(int rc, const char *what, struct disk *d)
{
    nbdkit_error("%s %s: %s", what, d->id,
                 vr_errmsg()[0] ? vr_errmsg() : strerror(-rc));
    errno = -rc;
    return -1;
}

static int
vmreplica_pread(void *h, void *buf, uint32_t count, uint64_t offset,
                uint32_t flags)
{
    struct disk *d = h;
    (void)flags;
    vr_err_clear();
    if (view_dir) {
        pthread_rwlock_rdlock(&view_lock);
        int vrc = undo_view_read(view, (unsigned)(d - disks), d->fd, buf,
                                 offset, count);
        pthread_rwlock_unlock(&view_lock);
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
zero_range(struct disk *d, uint32_t count, uint64_t offset, bool fast)
{
    if (fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, count) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    if (fast)
        return -ENOTSUP;
    if (fallocate(d->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, count) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    static const uint8_t zeroes[65536];
    while (count > 0) {
        uint32_t n = count < sizeof zeroes ? count : sizeof zeroes;
        int rc = io_pwrite_all(d->fd, zeroes, n, (off_t)offset);
        if (rc < 0)
            return rc;
        count -= n;
        offset += n;
    }
    return 0;
}

static int
make_durable(struct disk *d)
{
    /* Preserve files first, so a block's saved old content is durable no
     * later than the new content that replaced it on the disk. */
    int rc = 0;
    pthread_mutex_lock(&d->pre_lock);
    for (unsigned k = 0; k < PRE_OPEN && rc == 0; k++)
        if (d->pre[k])
            rc = cl_writer_sync(d->pre[k]);
    pthread_mutex_unlock(&d->pre_lock);
    if (rc == 0)
        rc = cl_writer_sync(d->w);
    if (rc == 0 && fdatasync(d->fd) < 0)
        rc = vr_err(-errno, "fdatasync %s: %m", d->path);
    return rc;
}

static bool
overlaps(const struct disk *d, uint64_t start, uint64_t end)
{
    for (const struct range *r = d->inflight; r; r = r->next)
        if (r->start < end && start < r->end)
            return true;
    return false;
}

/* Write the reserved record of a request whose disk I/O failed, so that
 * the log has no hole and says what the disk now holds: a write's range as
 * read back from the disk, or an empty zero (a no-op) for zero and trim.
 * The guest was told the request failed. */
static int
write_neutral(struct disk *d, struct cl_rec *rec, uint64_t log_off)
{
    rec->flags &= ~CL_F_PENDING; /* it says what the disk holds already */
    if (rec->kind != CL_WRITE) {
        rec->kind = CL_ZERO;
        rec->len = 0;
        rec->flags = 0;
        return cl_writer_write(d->w, rec, log_off);
    }
    void *now = malloc(rec->len);
    if (!now)
        return vr_err(-ENOMEM, "read back %s: out of memory", d->path);
    int rc = io_pread_all(d->fd, now, rec->len, (off_t)rec->offset);
    if (rc == -ENODATA)
        rc = 0; /* past the end reads as zeroes; pread filled what it could */
    if (rc == 0) {
        rec->data = now;
        rc = cl_writer_write(d->w, rec, log_off);
    } else {
        vr_err(rc, "read back %s at %" PRIu64 ": %s", d->path, rec->offset,
               strerror(-rc));
    }
    free(now);
    return rc;
}

/* A run of blocks whose content as of an unshipped cycle's seal must be
 * saved to that cycle's preserve file before a request changes them. */
struct preserve {
    uint64_t cycle, off, len;
};

#define PRESERVE_STACK 8

/* Under d->lock, for a request on [offset, offset + count) in the open
 * cycle: update the owner map and list (in *runs, which starts as the
 * caller's stack array of PRESERVE_STACK and is malloc'd beyond it) the
 * runs of blocks an older, unshipped cycle references.  ref: the request
 * is logged by reference and so becomes the blocks' owner. */
static size_t
owner_update(struct disk *d, bool ref, uint64_t offset, uint32_t count,
             struct preserve **runs)
{
    size_t n = 0, cap = PRESERVE_STACK;
    struct preserve *p = *runs;
    uint64_t b0 = offset / CL_PRE_BLOCK;
    uint64_t b1 = (offset + count - 1) / CL_PRE_BLOCK;

    for (uint64_t b = b0; b <= b1; b++) {
        uint64_t c = u64map_get(&d->owner, b);
        if (c != 0 && c < open_cycle) {
            uint64_t off = b * CL_PRE_BLOCK;
            uint64_t len = d->size - off < CL_PRE_BLOCK ? d->size - off
                                                        : CL_PRE_BLOCK;
            if (n > 0 && p[n - 1].cycle == c &&
                p[n - 1].off + p[n - 1].len == off &&
                p[n - 1].len + len <= PRE_PIECE_MAX) {
                p[n - 1].len += len;
            } else {
                if (n == cap) {
                    struct preserve *np = xmalloc(2 * cap * sizeof *np);
                    memcpy(np, p, n * sizeof *np);
                    if (p != *runs)
                        free(p);
                    p = np;
                    cap *= 2;
                }
                p[n++] = (struct preserve){ c, off, len };
            }
        }
        uint64_t nv = ref ? open_cycle : c == open_cycle ? c : 0;
        if (nv != c)
            u64map_put(&d->owner, b, nv);
    }
    *runs = p;
    return n;
}

/* Save run's current content (its content at the seal of run->cycle: no
 * write has touched it since, or it would no longer be that cycle's) as
 * one record of the cycle's preserve file, complete before returning. */
static int
preserve_run(struct disk *d, const struct preserve *run)
{
    uint8_t *buf = malloc(run->len);
    if (!buf)
        return vr_err(-ENOMEM, "preserve %s: out of memory", d->id);
    memset(buf, 0, run->len);
    int rc = io_pread_all(d->fd, buf, run->len, (off_t)run->off);
    if (rc == -ENODATA)
        rc = 0; /* past the end reads as zeroes */
    if (rc < 0) {
        free(buf);
        return vr_err(rc, "preserve %s at %" PRIu64 ": read: %s", d->id,
                      run->off, strerror(-rc));
    }
    pthread_mutex_lock(&d->pre_lock);
    if (run->cycle <= __atomic_load_n(&d->owner.drop_upto, __ATOMIC_ACQUIRE)) {
        /* Shipped while we read: nothing to keep. */
        pthread_mutex_unlock(&d->pre_lock);
        free(buf);
        return 0;
    }
    struct cl_writer **slot = NULL;
    for (unsigned k = 0; k < PRE_OPEN && !slot; k++)
        if (d->pre[k] && cl_writer_cycle(d->pre[k]) == run->cycle)
            slot = &d->pre[k];
    if (!slot) {
        /* Take a free slot, else close the oldest cycle's file. */
        unsigned pick = 0;
        for (unsigned k = 0; k < PRE_OPEN; k++) {
            if (!d->pre[k]) {
                pick = k;
                break;
            }
            if (cl_writer_cycle(d->pre[k]) < cl_writer_cycle(d->pre[pick]))
                pick = k;
        }
        slot = &d->pre[pick];
        cl_writer_free(*slot);
        *slot = NULL;
        rc = cl_writer_open_pre(d->dirfd, (uint16_t)(d - disks), run->cycle,
                                slot);
    }
    if (rc == 0)
        rc = cl_writer_append(*slot, CL_WRITE, 0, run->off,
                              (uint32_t)run->len, buf);
    pthread_mutex_unlock(&d->pre_lock);
    free(buf);
    return rc;
}

/* A record could not be written (vr_err says why): stop tracking. */
static void
log_cannot_follow(struct disk *d)
{
    char msg[256];
    snprintf(msg, sizeof msg, "disk %s: its change log cannot follow: %s",
             d->id, vr_errmsg());
    set_broken(msg);
}

/* Is a record reserved before seq not yet written?  Under d->lock. */
static bool
earlier_unlogged(const struct disk *d, uint64_t seq)
{
    if (d->unlogged == 0)
        return false;
    for (const struct range *r = d->inflight; r; r = r->next)
        if (!r->logged && r->seq < seq)
            return true;
    return false;
}

/* me's record is written (or failed: then tracking is already broken):
 * say so, then wait until every record reserved before it is written too,
 * so that the records on file are a prefix of the reservation order
 * whenever the disk changes (see Locking).  The requests waited for are
 * past their reservation and write their record without waiting on
 * anything, so this always ends.  False if tracking broke meanwhile: an
 * earlier place may then stay empty, and recovery would cut every record
 * after it, so the caller must leave the disk alone. */
static bool
wait_logged_prefix(struct disk *d, struct range *me)
{
    pthread_mutex_lock(&d->lock);
    if (!me->logged) {
        me->logged = true;
        __atomic_store_n(&d->unlogged, d->unlogged - 1, __ATOMIC_RELEASE);
        if (d->log_waiters)
            pthread_cond_broadcast(&d->logged);
    }
    if (earlier_unlogged(d, me->seq)) {
        d->log_waiters++;
        while (earlier_unlogged(d, me->seq))
            pthread_cond_wait(&d->logged, &d->lock);
        d->log_waiters--;
    }
    pthread_mutex_unlock(&d->lock);
    return !__atomic_load_n(&broken, __ATOMIC_ACQUIRE);
}

/* wait_logged_prefix without the mutex when nothing reserved is unlogged
 * (every record is written at its reservation in the usual case): the
 * count is stored with release after each record is written, so reading
 * zero means every earlier record is on file. */
static bool
prefix_logged(struct disk *d, struct range *me)
{
    if (me->logged && __atomic_load_n(&d->unlogged, __ATOMIC_ACQUIRE) == 0)
        return !__atomic_load_n(&broken, __ATOMIC_ACQUIRE);
    return wait_logged_prefix(d, me);
}

/* The disk I/O of in-flight request me on [offset, offset + count) failed
 * after its record said what it would do: append records of what the disk
 * holds now (read back, with data), so the log's replay is the disk again.
 * Nothing else can touch the range meanwhile (me is in flight) and no seal
 * can come (seal_lock is held).  The records are reserved like a new
 * request's, so later requests wait for them before changing the disk. */
static int
log_readback(struct disk *d, struct range *me, uint64_t offset,
             uint64_t count)
{
    int rc = 0;
    while (count > 0 && rc == 0) {
        uint32_t n = count < PRE_PIECE_MAX ? (uint32_t)count : PRE_PIECE_MAX;
        uint8_t *now = malloc(n);
        if (!now)
            return vr_err(-ENOMEM, "read back %s: out of memory", d->path);
        memset(now, 0, n);
        rc = io_pread_all(d->fd, now, n, (off_t)offset);
        if (rc == -ENODATA)
            rc = 0; /* past the end reads as zeroes */
        if (rc < 0) {
            vr_err(rc, "read back %s at %" PRIu64 ": %s", d->path, offset,
                   strerror(-rc));
            free(now);
            return rc;
        }
        struct cl_rec rec;
        uint64_t log_off;
        pthread_mutex_lock(&d->lock);
        rc = cl_writer_reserve(d->w, CL_WRITE, 0, offset, n, now, &rec,
                               &log_off);
        if (rc == 0) {
            /* The request's own owner_update already preserved and
             * released these blocks: nothing older owns them now. */
            struct preserve none[PRESERVE_STACK], *runs = none;
            size_t nruns = owner_update(d, false, offset, n, &runs);
            assert(nruns == 0 && runs == none);
            me->seq = rec.seq;
            me->logged = false;
            __atomic_store_n(&d->unlogged, d->unlogged + 1, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&d->lock);
        if (rc == 0) {
            rc = cl_writer_write(d->w, &rec, log_off);
            if (rc < 0)
                log_cannot_follow(d);
            (void)wait_logged_prefix(d, me);
        }
        free(now);
        offset += n;
        count -= n;
    }
    return rc;
}

/* One write-class request (see Locking at the top): wait for requests
 * sharing a block, reserve the log record and take the blocks from older
 * cycles' protection, all under the disk mutex; then, without it, preserve
 * what older unshipped cycles still need, write the record, wait until
 * every earlier record is written, and only then change the disk.  FUA
 * makes the log and the disk durable.  Reserving first means a full log
 * file system fails the request before the disk changes. */
static int
tracked(struct disk *d, uint8_t kind, const void *buf, uint32_t count,
        uint64_t offset, uint32_t flags)
{
    bool fua = flags & NBDKIT_FLAG_FUA;
    bool fast = kind == CL_ZERO && (flags & NBDKIT_FLAG_FAST_ZERO);
    int rc = 0;
    const char *what = kind == CL_WRITE ? "write"
                       : kind == CL_ZERO ? "zero" : "trim";
    struct range me = {
        .start = offset / CL_PRE_BLOCK * CL_PRE_BLOCK,
        .end = count ? (offset + count + CL_PRE_BLOCK - 1) / CL_PRE_BLOCK *
                           CL_PRE_BLOCK
                     : offset / CL_PRE_BLOCK * CL_PRE_BLOCK,
    };
    struct cl_rec rec;
    uint64_t log_off;
    struct preserve stack_runs[PRESERVE_STACK], *runs = stack_runs;
    size_t nruns = 0;
    bool ref = false;

    vr_err_clear();
    /* A fast zero this file system cannot do is refused before anything
     * is logged (the client falls back to writing zeroes). */
    if (fast && __atomic_load_n(&d->no_punch, __ATOMIC_RELAXED)) {
        errno = ENOTSUP;
        return -1;
    }
    pthread_rwlock_rdlock(&seal_lock);
    if (__atomic_load_n(&broken, __ATOMIC_ACQUIRE)) {
        rc = vr_err(-EIO, "tracking stopped: %s", broken_msg);
        goto out;
    }
    pthread_mutex_lock(&d->lock);
    while (overlaps(d, me.start, me.end))
        pthread_cond_wait(&d->idle, &d->lock);
    if (log_ref && kind == CL_WRITE && count > 0) {
        uint64_t nblocks = (offset + count - 1) / CL_PRE_BLOCK -
                           offset / CL_PRE_BLOCK + 1;
        ref = true;
        if (d->owner.used + nblocks > refmap_max &&
            d->compacted_at != d->owner.drop_upto) {
            u64map_compact(&d->owner);
            d->compacted_at = d->owner.drop_upto;
        }
        /* Past the budget, copy the data instead (log=data costs). */
        if (d->owner.used + nblocks > refmap_max)
            ref = false;
    }
    rc = cl_writer_reserve(d->w, ref ? CL_WREF : kind, fua ? CL_F_FUA : 0,
                           offset, count, buf, &rec, &log_off);
    int lrc = 0;
    if (rc == 0) {
        if (count > 0)
            nruns = owner_update(d, ref, offset, count, &runs);
        me.seq = rec.seq;
        me.next = d->inflight;
        d->inflight = &me;
        /* A record that says what the disk will hold (not a reference to
         * it) is pending until the disk holds it: a crash in between
         * leaves it for recovery to redo (redo_pending). */
        if (!ref)
            rec.flags |= CL_F_PENDING;
        if (nruns == 0 && rec.kind != CL_WRITE && logio != CL_MMAP_OFF) {
            /* The usual case: 32 bytes copied into the mapping, so the
             * record goes in now, in order, and nobody waits for it. */
            lrc = cl_writer_write(d->w, &rec, log_off);
            if (lrc < 0)
                log_cannot_follow(d);
            me.logged = true;
        } else {
            __atomic_store_n(&d->unlogged, d->unlogged + 1, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&d->lock);
    if (rc < 0)
        goto out;
    if (lrc < 0)
        goto done; /* the disk is left unchanged; tracking stops below */
    vr_fault_point("track-reserved");

    int prc = 0;
    for (size_t i = 0; i < nruns && prc == 0; i++)
        prc = preserve_run(d, &runs[i]);
    if (runs != stack_runs)
        free(runs);
    vr_fault_point("track-preserved");
    if (prc < 0) {
        /* The owner map no longer protects those blocks: stop tracking
         * before anything overwrites them.  The disk is left unchanged
         * and the reserved record changes nothing: after a restart the
         * blocks still belong to the older cycle, which is then preserved
         * as it must be. */
        char why[600];
        snprintf(why, sizeof why, "disk %s: could not preserve data of an "
                 "unshipped cycle: %s", d->id, vr_errmsg());
        set_broken(why);
        lrc = write_neutral(d, &rec, log_off);
        (void)wait_logged_prefix(d, &me);
        rc = vr_err(-EIO, "%s", why);
        goto done;
    }
    if (!me.logged) {
        lrc = cl_writer_write(d->w, &rec, log_off);
        if (lrc < 0)
            log_cannot_follow(d);
    }
    if (!prefix_logged(d, &me)) {
        /* The disk is left unchanged; tracking stops below. */
        if (lrc == 0)
            rc = vr_err(-EIO, "tracking stopped: %s", broken_msg);
        goto done;
    }
    vr_fault_point("track-logged");

    if (kind == CL_WRITE)
        rc = io_pwrite_all(d->fd, buf, count, (off_t)offset);
    else
        rc = zero_range(d, count, offset, fast);
    if (rc == -ENOTSUP)
        __atomic_store_n(&d->no_punch, true, __ATOMIC_RELAXED);
    vr_fault_point("track-written");
    if (!ref)
        lrc = cl_writer_settle(d->w, &rec, log_off);
    vr_fault_point("track-settled");
    /* A write logged by reference already stands for whatever the disk
     * holds.  Any other record said what the request would do: say what
     * it did, which may be part of it or nothing.  (A crash between the
     * settle and the read-back record, after a failed disk I/O, leaves
     * the record's claim standing: docs/design.md.) */
    if (lrc == 0 && rc < 0 && !ref) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s %s at %" PRIu64 ": %s", what, d->path,
                 offset, strerror(-rc));
        lrc = log_readback(d, &me, offset, count);
        if (lrc == 0 && rc != -ENOTSUP)
            vr_err(rc, "%s", msg);
    } else if (rc < 0) {
        vr_err(rc, "%s %s at %" PRIu64 ": %s", what, d->path, offset,
               strerror(-rc));
    }

done:
    pthread_mutex_lock(&d->lock);
    for (struct range **p = &d->inflight; *p; p = &(*p)->next)
        if (*p == &me) {
            *p = me.next;
            break;
        }
    pthread_cond_broadcast(&d->idle);
    pthread_mutex_unlock(&d->lock);

    if (lrc < 0) {
        log_cannot_follow(d);
        rc = vr_err(-EIO, "%s", broken_msg);
        goto out;
    }
    if (rc == 0 && fua)
        rc = make_durable(d);
out:
    pthread_rwlock_unlock(&seal_lock);
    if (rc == -ENOTSUP) {
        errno = ENOTSUP;
        return -1;
    }
    return rc < 0 ? fail(rc, what, d) : 0;
}

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
