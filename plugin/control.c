/* control.c: the control socket of nbdkit-vmreplica-plugin (plugin.h).
 *
 * Control protocol (docs/formats.md): one request line, one reply line, on a
 * unix stream socket: SEAL -> "OK <sealed cycle>", STATUS -> "OK <open
 * cycle> <bytes in open segments> <payload bytes they stand for>",
 * SHIPPED N -> "OK N", PING -> "OK", REARM -> "OK <voided cycle>",
 * FOLD -> "OK <folded cycle>";
 * errors are "ERR <msg>".
 *
 * The socket is bound before nbdkit forks (so it exists once the server
 * is ready) and served by one thread started after the fork; a client
 * is served to the end before the next is accepted.
 */
#define NBDKIT_API_VERSION 2
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <malloc.h>
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

#include "plugin.h"
#include "vr.h"

#define CTL_LINE_MAX    256
#define CTL_TIMEOUT_S   30
#define HASH_CHUNK      (1u << 20)


static int listen_fd = -1;
static pthread_t ctl_thread;
static bool ctl_running;
static volatile int ctl_stop;

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
    bool ok = false, cut_all = false, al_due = false;
    pthread_rwlock_wrlock(&seal_lock);
    uint64_t c = open_cycle;
    if (stopped) {
        snprintf(reply, n, "ERR tracking stopped: %s", stopped_msg);
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
            stop_tracking(msg);
            snprintf(reply, n, "ERR %s", msg);
            goto out;
        }
    }
    open_cycle = c + 1;
    cut_all = ok = true;
    /* Every so often, with no write in flight, a new activity-log
     * generation; made durable below, with writes going on. */
    static uint64_t al_since;
    if (!al_since)
        al_since = al_epoch_ms; /* the first one a period after start */
    al_due = al_checkpoint_s && !tracking_stopped() &&
             vr_mono_ms() - al_since >= al_checkpoint_s * 1000ull;
    if (al_due)
        al_swap(&al_since);
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
            stop_tracking(msg);
            snprintf(reply, n, "ERR %s", msg);
            ok = false;
        }
        cl_writer_free(done[i]);
    }
    if (ok && al_due && al_checkpoint() < 0) {
        nbdkit_error("activity log checkpoint: %s", vr_errmsg());
        vr_err_clear();
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
    if (stopped)
        snprintf(reply, n, "ERR tracking stopped: %s", stopped_msg);
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

/* REARM: tracking stopped (the log could not follow); the daemon is ready
 * to resynchronize.  Start a new log: "OK C" says every change through
 * cycle C is in no usable log, the regions changed are in each disk's
 * C.dirty, and cycle C + 1 is tracked (recover.c, rearm). */
static void
do_rearm(char *reply, size_t n)
{
    uint64_t c = 0;
    pthread_rwlock_wrlock(&seal_lock);
    if (!tracking_stopped())
        snprintf(reply, n, "ERR tracking has not stopped");
    else if (rearm(&c) < 0)
        snprintf(reply, n, "ERR %s", vr_errmsg());
    else
        snprintf(reply, n, "OK %" PRIu64, c);
    pthread_rwlock_unlock(&seal_lock);
}

/* FOLD: the log passed the daemon's budget (the Replica server has been
 * out of reach for long).  As REARM, with tracking going on: every change
 * through the open cycle C goes into each disk's C.dirty, the logs of the
 * unshipped cycles go (their space with them), cycle C + 1 is logged;
 * "OK C".  The daemon resynchronizes from the map (daemon/resync.c).  A
 * fold that fails half-way stops tracking: the map is then whole only in
 * memory, and the markers say so before any write goes on untracked. */
static void
do_fold(char *reply, size_t n)
{
    uint64_t c = 0;
    pthread_rwlock_wrlock(&seal_lock);
    if (tracking_stopped()) {
        snprintf(reply, n, "ERR tracking has stopped: REARM");
    } else if (rearm(&c) < 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "fold of the log failed: %s", vr_errmsg());
        stop_tracking(msg);
        snprintf(reply, n, "ERR %s", msg);
    } else {
        snprintf(reply, n, "OK %" PRIu64, c);
    }
    pthread_rwlock_unlock(&seal_lock);
}

static void
handle_line(char *line, char *reply, size_t n)
{
    size_t len = strlen(line);
    if (len > 0 && line[len - 1] == '\r')
        line[--len] = '\0';
    if (view_dir) {
        if (strncmp(line, "REFRESH ", 8) == 0)
            view_refresh(line + 8, reply, n);
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
    else if (strcmp(line, "REARM") == 0)
        do_rearm(reply, n);
    else if (strcmp(line, "FOLD") == 0)
        do_fold(reply, n);
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
            /* A seal or a release frees what it used (segment names, the
             * preserve index...): give it back to the system, or each
             * idle VM's nbdkit keeps a few hundred KiB of freed heap
             * (bench/run memory). */
            malloc_trim(0);
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

int
control_open(void)
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


void
control_stop(void)
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

/* After nbdkit forks: serve the socket bound by control_open. */
int
control_start(void)
{
    int e = pthread_create(&ctl_thread, NULL, control_main, NULL);
    if (e) {
        nbdkit_error("control thread: %s", strerror(e));
        return -1;
    }
    ctl_running = true;
    return 0;
}
