/* test-undo.c: unit tests for undo data (lib/undo.c) and the staged payload
 * reader it uses (cyc_payload_foreach): names; a model-based run of random
 * cycles captured and applied to real sparse disk files, with every point
 * read back through a view and compared with the image the model kept;
 * merges (older content wins, exact record layout); capture never redone;
 * crashes at the fault points (a re-executed child, since util.c reads
 * VMREPLICA_FAULT only once per process); cleanup; and refusal of corrupt
 * or malformed undo files.  Fixed seeds throughout.
 */
#include "config.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "changelog.h"
#include "cycle.h"
#include "tap.h"
#include "testrand.h"
#include "undo.h"

#define NDISKS 2
#define MAXC   16
#define BLK    4096u

/* Disk 0 ends inside a block; disk 1 is over UNDO_MAX_RECORD_BYTES. */
static const uint64_t sizes[NDISKS] = { (256u << 10) + 1000,
                                        (3u << 20) + 3 * BLK };

static char tmpdir[64];
static const char *self_path;
static int disk_fds[NDISKS];
static int udir = -1;                  /* the undo directory */
static uint8_t *img[MAXC + 1][NDISKS]; /* expected disks at each point */
static int pfds[MAXC + 1];             /* staged payload of each cycle */
static uint64_t latest;

static void
die(const char *what)
{
    perror(what);
    exit(1);
}

static char *
path_of(const char *fmt, unsigned long long n)
{
    char rel[64];
    snprintf(rel, sizeof rel, fmt, n);
    return xasprintf("%s/%s", tmpdir, rel);
}

static int
open_dir(const char *sub)
{
    char *p = xasprintf("%s/%s", tmpdir, sub);
    if (mkdir(p, 0755) < 0 && errno != EEXIST)
        die("mkdir");
    int fd = open(p, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        die("open dir");
    free(p);
    return fd;
}

static bool
exists(int dirfd, const char *name)
{
    struct stat st;
    return fstatat(dirfd, name, &st, 0) == 0;
}

static bool
span_exists(uint64_t a, uint64_t b)
{
    char name[48];
    undo_name(a, b, name);
    return exists(udir, name);
}

/* Whole content of name in dirfd (NULL if missing). */
static uint8_t *
slurp_at(int dirfd, const char *name, size_t *len)
{
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0)
        return NULL;
    if (fstat(fd, &st) < 0)
        die("fstat");
    uint8_t *p = xmalloc((size_t)st.st_size + 1);
    if (st.st_size > 0 && io_pread_all(fd, p, (size_t)st.st_size, 0) < 0)
        die("read");
    close(fd);
    *len = (size_t)st.st_size;
    return p;
}

static void
put_at(int dirfd, const char *name, const uint8_t *p, size_t len)
{
    int fd =
        openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || io_pwrite_all(fd, p, len, 0) < 0)
        die("write");
    close(fd);
}

static uint64_t
span_size(uint64_t a, uint64_t b)
{
    char name[48];
    struct stat st;
    undo_name(a, b, name);
    return fstatat(udir, name, &st, 0) == 0 ? (uint64_t)st.st_size : 0;
}

/* --- payloads and the model ------------------------------------------- */

/* A payload of records, built with the builder; data kept by the caller. */
struct pl {
    struct cyc_builder *b;
    int fd;
};

static void
pl_new(struct pl *p, int fd, uint64_t cycle, uint32_t flags, uint32_t ndisks)
{
    struct cyc_hdr h = {
        .version = CYC_VERSION, .flags = flags, .cycle = cycle, .ndisks = ndisks
    };
    p->fd = fd;
    if (cyc_builder_new(fd, false, 0, &h, &p->b) < 0)
        die("cyc_builder_new");
}

static void
pl_add(struct pl *p, uint8_t kind, uint16_t disk, uint64_t off, uint32_t len,
       const void *data)
{
    struct cl_rec r = {
        .kind = kind, .disk = disk, .len = len, .offset = off, .data = data
    };
    if (cyc_builder_add(p->b, &r) < 0) {
        fprintf(stderr, "%s\n", vr_errmsg());
        exit(1);
    }
}

static void
pl_finish(struct pl *p)
{
    if (cyc_builder_finish(p->b, NULL, NULL) < 0)
        die("cyc_builder_finish");
    cyc_builder_free(p->b);
}

static void
model_rec(uint8_t *const *im, uint8_t kind, unsigned disk, uint64_t off,
          uint32_t len, const uint8_t *data)
{
    if (kind == CL_WRITE)
        memcpy(im[disk] + off, data, len);
    else
        memset(im[disk] + off, 0, len);
}

/* Random cycle c: payload file "payload-C" (pfds[c]) and img[c]. */
static void
make_cycle(uint64_t c)
{
    char *path = path_of("payload-%02llu", c);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    struct pl p;
    unsigned nrec = 1 + (unsigned)(rng() % 12);

    if (fd < 0)
        die("open payload");
    free(path);
    for (unsigned d = 0; d < NDISKS; d++) {
        img[c][d] = xmalloc(sizes[d]);
        memcpy(img[c][d], img[c - 1][d], sizes[d]);
    }
    pl_new(&p, fd, c, 0, NDISKS);
    for (unsigned i = 0; i <= nrec; i++) {
        unsigned d = (unsigned)(rng() % NDISKS);
        unsigned k = (unsigned)(rng() % 10);
        uint8_t kind = k < 6 ? CL_WRITE : k < 8 ? CL_ZERO : CL_TRIM;
        uint64_t maxlen = rng() % 8 == 0 ? 1500000 : 20000;
        uint64_t off = rng() % sizes[d];
        uint64_t len = 1 + rng() % maxlen;
        if (i == nrec) {
            /* Each cycle also touches the partial last block of disk 0. */
            if (c % 2 != 0)
                continue;
            d = 0;
            off = sizes[0] - 1 - rng() % 3000;
            kind = c % 4 == 0 ? CL_WRITE : CL_TRIM;
        }
        if (len > sizes[d] - off)
            len = sizes[d] - off;
        uint8_t *data = NULL;
        if (kind == CL_WRITE) {
            data = xmalloc(len);
            fill_random(data, len);
        }
        pl_add(&p, kind, (uint16_t)d, off, (uint32_t)len, data);
        model_rec(img[c], kind, d, off, (uint32_t)len, data);
        free(data);
    }
    pl_finish(&p);
    pfds[c] = fd;
}

static int
capture(uint64_t c)
{
    uint64_t ub;
    return undo_capture(pfds[c], disk_fds, sizes, NDISKS, udir, c, &ub);
}

static int
apply(uint64_t c)
{
    uint64_t n;
    return cyc_apply_file(pfds[c], disk_fds, sizes, NDISKS, &n);
}

/* Open a view at point of the disks fds at lat and read every disk whole
 * and in random unaligned pieces: 0 if all match want, 1 if not, or the
 * error. */
static int
view_check_fds(int dirfd, uint64_t point, uint64_t lat, uint8_t *const *want,
               const int *fds)
{
    struct undo_view *v;
    int rc = undo_view_open(dirfd, point, lat, NDISKS, sizes, &v);
    int bad = 0;

    if (rc < 0)
        return rc;
    for (unsigned d = 0; d < NDISKS && rc == 0; d++) {
        uint8_t *buf = xmalloc(sizes[d]);
        memset(buf, 0xa5, sizes[d]);
        rc = undo_view_read(v, d, fds[d], buf, 0, (uint32_t)sizes[d]);
        if (rc == 0 && memcmp(buf, want[d], sizes[d]) != 0)
            bad = 1;
        memset(buf, 0x5a, sizes[d]);
        for (uint64_t pos = 0; rc == 0 && pos < sizes[d];) {
            uint64_t n = 1 + rng() % 70000;
            if (n > sizes[d] - pos)
                n = sizes[d] - pos;
            rc = undo_view_read(v, d, fds[d], buf + pos, pos, (uint32_t)n);
            pos += n;
        }
        if (rc == 0 && memcmp(buf, want[d], sizes[d]) != 0)
            bad = 1;
        free(buf);
    }
    undo_view_free(v);
    return rc < 0 ? rc : bad;
}

/* The same on the live disks. */
static int
view_check_fd(int dirfd, uint64_t point, uint64_t lat, uint8_t *const *want)
{
    return view_check_fds(dirfd, point, lat, want, disk_fds);
}

static int
view_check(uint64_t point)
{
    return view_check_fd(udir, point, latest, img[point]);
}

/* --- span file properties --------------------------------------------- */

struct props {
    uint64_t n, nzero, nwrite;
    bool bad, have;
    uint16_t pdisk;
    uint64_t pend;
};

static int
props_rec(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct props *p = arg;
    uint64_t end = r->offset + r->len;

    (void)file_off;
    p->n++;
    if (r->kind == CL_ZERO)
        p->nzero++;
    else if (r->kind == CL_WRITE)
        p->nwrite++;
    else
        p->bad = true;
    if (r->offset % BLK != 0 || r->len == 0 || r->len > UNDO_MAX_RECORD_BYTES ||
        end > sizes[r->disk] || (r->len % BLK != 0 && end != sizes[r->disk]))
        p->bad = true;
    if (p->have &&
        (r->disk < p->pdisk || (r->disk == p->pdisk && r->offset < p->pend)))
        p->bad = true;
    p->have = true;
    p->pdisk = r->disk;
    p->pend = end;
    return 0;
}

/* 0 if span a..b in dirfd is well-formed (undo.h), 1 if not, or error. */
static int
span_props(int dirfd, uint64_t a, uint64_t b, struct props *p)
{
    char name[48];
    struct cyc_hdr h;

    memset(p, 0, sizeof *p);
    undo_name(a, b, name);
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = cyc_payload_foreach(fd, NDISKS, &h, props_rec, p);
    close(fd);
    if (rc < 0)
        return rc;
    return p->bad || h.flags != CYC_F_UNDO || h.cycle != b || h.epoch != 0;
}

/* --- crash children ---------------------------------------------------- */

/* Run in a re-executed copy of this program, so VMREPLICA_FAULT is read
 * afresh: "--child DIR capture C", "--child DIR merge A M B", or
 * "--child DIR revert SUB P L" (the copies rev-D of the disks to point P
 * of L with the spans in SUB). */
static int
child_main(int argc, char **argv)
{
    int fds[NDISKS], rc;
    uint64_t ub;

    if (argc < 4)
        return 3;
    snprintf(tmpdir, sizeof tmpdir, "%s", argv[2]);
    bool rev = strcmp(argv[3], "revert") == 0 && argc == 7;
    for (unsigned d = 0; d < NDISKS; d++) {
        char *p = path_of(rev ? "rev-%llu" : "disk-%llu", d);
        if ((fds[d] = open(p, O_RDWR | O_CLOEXEC)) < 0)
            return 3;
        free(p);
    }
    int dirfd = open_dir(rev ? argv[4] : "undo");
    if (strcmp(argv[3], "capture") == 0 && argc == 5) {
        uint64_t c = strtoull(argv[4], NULL, 10);
        char *p = path_of("payload-%02llu", c);
        int pfd = open(p, O_RDONLY | O_CLOEXEC);
        free(p);
        if (pfd < 0)
            return 3;
        rc = undo_capture(pfd, fds, sizes, NDISKS, dirfd, c, &ub);
    } else if (strcmp(argv[3], "merge") == 0 && argc == 7) {
        rc = undo_merge(dirfd, strtoull(argv[4], NULL, 10),
                        strtoull(argv[5], NULL, 10),
                        strtoull(argv[6], NULL, 10), &ub);
    } else if (rev) {
        struct undo_view *v;
        rc = undo_view_open(dirfd, strtoull(argv[5], NULL, 10),
                            strtoull(argv[6], NULL, 10), NDISKS, sizes, &v);
        if (rc == 0) {
            rc = undo_view_revert(v, fds, &ub);
            undo_view_free(v);
        }
    } else {
        return 3;
    }
    if (rc < 0)
        fprintf(stderr, "child: %s\n", vr_errmsg());
    return rc < 0 ? 2 : 0;
}

/* Run the child with VMREPLICA_FAULT=fault; its wait status. */
static int
run_child(const char *fault, const char *op, const char *a1, const char *a2,
          const char *a3)
{
    const char *args[] = { self_path, "--child", tmpdir, op, a1, a2, a3, NULL };
    pid_t pid = fork();
    int status = 0;

    if (pid < 0)
        die("fork");
    if (pid == 0) {
        setenv("VMREPLICA_FAULT", fault, 1);
        execv(self_path, (char *const *)args);
        _exit(127);
    }
    if (waitpid(pid, &status, 0) < 0)
        die("waitpid");
    return status;
}

static bool
killed(int status)
{
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
}

/* --- tests ------------------------------------------------------------- */

static void
test_names(void)
{
    char name[48];
    uint64_t a = 7, b = 7;

    undo_name(1, 2, name);
    is_str(name, "00000000000000000001-00000000000000000002.undo",
           "names: format");
    const uint64_t pairs[][2] = { { 0, 0 },
                                  { 5, 9 },
                                  { 42, 42 },
                                  { 1, UINT64_MAX },
                                  { UINT64_MAX, UINT64_MAX } };
    for (size_t i = 0; i < ARRAY_SIZE(pairs); i++) {
        undo_name(pairs[i][0], pairs[i][1], name);
        ok(undo_parse_name(name, &a, &b) == 1 && a == pairs[i][0] &&
               b == pairs[i][1],
           "names: round trip %zu", i);
    }
    static const char *const bad[] = {
        "00000000000000000002-00000000000000000001.undo", /* a > b */
        "0000000000000000001-00000000000000000002.undo",
        "000000000000000000001-00000000000000000002.undo",
        "00000000000000000001-00000000000000000002.und",
        "00000000000000000001-00000000000000000002.undo.tmp",
        "00000000000000000001-00000000000000000002.UNDO",
        "00000000000000000001_00000000000000000002.undo",
        "0000000000000000000x-00000000000000000002.undo",
        "+0000000000000000001-00000000000000000002.undo",
        "18446744073709551616-18446744073709551616.undo", /* overflow */
        "00000000000000000001-00000000000000000002.undox",
        "",
        "00000000000000000001.log",
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        a = b = 7;
        ok(undo_parse_name(bad[i], &a, &b) == 0 && a == 7 && b == 7,
           "names: refused \"%s\"", bad[i]);
    }
}

struct walk {
    int fd;
    uint64_t n;
    bool bad;
};

static int
walk_rec(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct walk *w = arg;
    uint8_t want[CL_REC_HDR_BYTES], got[CL_REC_HDR_BYTES];

    /* The header re-encoded is what sits at file_off; data follows it. */
    cl_rec_encode(r, want);
    if (io_pread_all(w->fd, got, sizeof got, (off_t)file_off) < 0 ||
        memcmp(want, got, sizeof got) != 0)
        w->bad = true;
    if (r->kind == CL_WRITE) {
        uint8_t *d = xmalloc(r->len);
        if (io_pread_all(w->fd, d, r->len,
                         (off_t)(file_off + CL_REC_HDR_BYTES)) < 0 ||
            memcmp(d, r->data, r->len) != 0)
            w->bad = true;
        free(d);
    }
    w->n++;
    return w->n == 1000 ? -ECANCELED : 0;
}

static void
test_foreach(void)
{
    char *path = path_of("walk-%llu", 0);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    struct walk w = { .fd = fd };
    struct cyc_hdr h;
    struct pl p;
    uint8_t data[3000];
    size_t len;

    if (fd < 0)
        die("open");
    pl_new(&p, fd, 5, 0, 2);
    for (unsigned i = 0; i < 50; i++) {
        uint32_t n = 1 + (uint32_t)(rng() % sizeof data);
        fill_random(data, n);
        pl_add(&p, (uint8_t)(i % 3 + 1), (uint16_t)(i % 2), rng() % 100000, n,
               data);
    }
    pl_finish(&p);
    is_int(cyc_payload_foreach(fd, 2, &h, walk_rec, &w), 0, "foreach: walk");
    ok(w.n == 50 && !w.bad && h.cycle == 5 && h.ndisks == 2,
       "foreach: every record, at the offsets given");
    is_int(cyc_payload_foreach(fd, 3, NULL, walk_rec, &w), -EBADMSG,
           "foreach: disk count mismatch refused");
    w.n = 999;
    is_int(cyc_payload_foreach(fd, 0, NULL, walk_rec, &w), -ECANCELED,
           "foreach: the callback's error stops the walk");

    uint8_t *all = slurp_at(AT_FDCWD, path, &len);
    int tfd = open(path, O_RDWR | O_CLOEXEC);
    is_int(ftruncate(tfd, (off_t)len - 1), 0, "foreach: truncate");
    w.n = 0;
    is_int(cyc_payload_foreach(tfd, 0, NULL, walk_rec, &w), -EBADMSG,
           "foreach: truncated payload refused");
    all[len / 2] ^= 0x10;
    is_int(io_pwrite_all(tfd, all, len, 0), 0, "foreach: rewrite");
    w.n = 0;
    is_int(cyc_payload_foreach(tfd, 0, NULL, walk_rec, &w), -EBADMSG,
           "foreach: flipped byte refused");
    close(tfd);
    close(fd);
    free(all);
    free(path);

    /* An undo file never travels: the decoder refuses one. */
    int ufd = memfd_create("undo", 0);
    struct cyc_decoder *dec;
    pl_new(&p, ufd, 1, CYC_F_UNDO, 1);
    pl_add(&p, CL_ZERO, 0, 0, BLK, NULL);
    pl_finish(&p);
    struct stat st;
    if (fstat(ufd, &st) < 0)
        die("fstat");
    len = (size_t)st.st_size;
    uint8_t *u = xmalloc(len);
    if (io_pread_all(ufd, u, len, 0) < 0)
        die("pread");
    int rc = cyc_decoder_new(false, 1 << 20, -1, &dec);
    if (rc == 0)
        rc = cyc_decoder_feed(dec, u, len);
    if (rc == 0)
        rc = cyc_decoder_finish(dec, NULL, NULL, NULL);
    cyc_decoder_free(dec);
    is_int(rc, -EPROTO, "decoder: undo file refused");
    free(u);
    close(ufd);
}

/* Sparse disks with some data and holes; img[0] is their content. */
static void
make_disks(void)
{
    for (unsigned d = 0; d < NDISKS; d++) {
        char *p = path_of("disk-%llu", d);
        disk_fds[d] = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (disk_fds[d] < 0 || ftruncate(disk_fds[d], (off_t)sizes[d]) < 0)
            die("disk");
        free(p);
        img[0][d] = xcalloc(1, sizes[d]);
    }
    static const struct {
        unsigned disk;
        uint64_t off, len;
    } data[] = {
        { 0, 8192, 32768 }, { 0, 100000, 50000 },   { 0, 262000, 1144 },
        { 1, 0, 1500000 },  { 1, 2200000, 300000 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(data); i++) {
        uint8_t *im = img[0][data[i].disk] + data[i].off;
        fill_random(im, data[i].len);
        if (io_pwrite_all(disk_fds[data[i].disk], im, data[i].len,
                          (off_t)data[i].off) < 0)
            die("pwrite");
    }
    /* A hole inside data. */
    if (fallocate(disk_fds[0], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  16384, 8192) == 0)
        memset(img[0][0] + 16384, 0, 8192);
    if (fallocate(disk_fds[1], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  400000, 600000) == 0)
        memset(img[0][1] + 400000, 0, 600000);
}

static bool
holes_supported(void)
{
    char *p = path_of("holes-%llu", 0);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    bool yes = false;
    if (fd >= 0 && ftruncate(fd, 1 << 20) == 0 &&
        io_pwrite_all(fd, "x", 1, 512 << 10) == 0)
        yes = lseek(fd, 0, SEEK_DATA) > 0;
    if (fd >= 0)
        close(fd);
    unlink(p);
    free(p);
    return yes;
}

static void
test_model(void)
{
    int rc;

    make_disks();
    for (uint64_t c = 1; c <= 8; c++) {
        make_cycle(c);
        is_int(capture(c), 0, "model: capture cycle %llu",
               (unsigned long long)c);
        ok(span_exists(c, c), "model: span %llu..%llu written",
           (unsigned long long)c, (unsigned long long)c);
        is_int(apply(c), 0, "model: apply cycle %llu", (unsigned long long)c);
        latest = c;
    }
    for (unsigned d = 0; d < NDISKS; d++) {
        uint8_t *buf = xmalloc(sizes[d]);
        ok(io_pread_all(disk_fds[d], buf, sizes[d], 0) == 0 &&
               memcmp(buf, img[latest][d], sizes[d]) == 0,
           "model: disk %u matches the model at %llu", d,
           (unsigned long long)latest);
        free(buf);
    }

    uint64_t nzero = 0, nwrite = 0;
    bool well = true;
    for (uint64_t c = 1; c <= latest; c++) {
        struct props p;
        if (span_props(udir, c, c, &p) != 0)
            well = false;
        nzero += p.nzero;
        nwrite += p.nwrite;
    }
    ok(well, "model: spans sorted, non-overlapping, block-aligned");
    ok(nwrite > 0, "model: spans hold old data");
    if (holes_supported())
        ok(nzero > 0, "model: holes saved as ZERO records");
    else
        diag("no SEEK_DATA here: holes are saved as data");

    for (uint64_t pt = 0; pt <= latest; pt++)
        is_int(view_check(pt), 0, "model: view at point %llu is exact",
               (unsigned long long)pt);

    /* Refusals. */
    struct undo_view *v = NULL;
    is_int(undo_view_open(udir, latest + 1, latest, NDISKS, sizes, &v), -EINVAL,
           "view: point after latest refused");
    is_int(undo_view_open(udir, 3, latest + 1, NDISKS, sizes, &v), -ENOENT,
           "view: cycles without undo data refused");
    rc = undo_view_open(udir, 5, latest, NDISKS, sizes, &v);
    is_int(rc, 0, "view: open");
    if (rc == 0) {
        uint8_t b[8];
        is_int(undo_view_read(v, 0, disk_fds[0], b, sizes[0] - 4, 8), -EINVAL,
               "view: read past the disk's end refused");
        is_int(undo_view_read(v, NDISKS, disk_fds[0], b, 0, 8), -EINVAL,
               "view: read of a disk it lacks refused");
        is_int(undo_view_read(v, 0, disk_fds[0], b, UINT64_MAX - 2, 8), -EINVAL,
               "view: overflowing read refused");
        is_int(undo_view_read(v, 0, disk_fds[0], b, sizes[0], 0), 0,
               "view: empty read at the end");
        undo_view_free(v);
    }
    undo_view_free(NULL);
}

/* Capturing again after a crash keeps what was captured. */
static void
test_no_recapture(void)
{
    char name[48];
    size_t l1, l2;
    uint64_t ub = 0;

    undo_name(latest, latest, name);
    uint8_t *before = slurp_at(udir, name, &l1);
    is_int(
        undo_capture(pfds[latest], disk_fds, sizes, NDISKS, udir, latest, &ub),
        0, "recapture: returns 0");
    uint8_t *after = slurp_at(udir, name, &l2);
    ok(before && after && l1 == l2 && memcmp(before, after, l1) == 0,
       "recapture: the file is unchanged");
    is_int(ub, l1, "recapture: reports its size");
    free(before);
    free(after);

    /* A capture really would differ now: the disks have moved on. */
    int sub = open_dir("recapture");
    is_int(
        undo_capture(pfds[latest], disk_fds, sizes, NDISKS, sub, latest, &ub),
        0, "recapture: fresh capture elsewhere");
    after = slurp_at(sub, name, &l2);
    before = slurp_at(udir, name, &l1);
    ok(after && before && (l1 != l2 || memcmp(before, after, l1) != 0),
       "recapture: a fresh capture would differ");
    free(before);
    free(after);
    unlinkat(sub, name, 0);

    /* A symbolic link where the capture goes is not taken as a capture
     * already made, nor written through. */
    char *outside = path_of("outside-%llu", latest);
    int ofd = open(outside, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (ofd < 0 || write(ofd, "keep", 4) != 4)
        die("outside");
    close(ofd);
    if (symlinkat(outside, sub, name) < 0)
        die("symlinkat");
    is_int(
        undo_capture(pfds[latest], disk_fds, sizes, NDISKS, sub, latest, &ub),
        -ELOOP, "capture: a symbolic link at the span's name refused");
    ok(strstr(vr_errmsg(), "symbolic link") != NULL, "capture: says why: %s",
       vr_errmsg());
    struct stat st;
    ok(stat(outside, &st) == 0 && st.st_size == 4,
       "capture: the link's target is unchanged");
    unlinkat(sub, name, 0);
    unlink(outside);
    free(outside);
    close(sub);

    /* The payload is for another cycle. */
    is_int(undo_capture(pfds[latest], disk_fds, sizes, NDISKS, udir, latest + 1,
                        &ub),
           -EINVAL, "capture: payload of another cycle refused");
    ok(!span_exists(latest + 1, latest + 1), "capture: nothing left behind");
    is_int(undo_capture(pfds[latest], disk_fds, sizes, NDISKS, udir, 0, &ub),
           -EINVAL, "capture: cycle 0 refused");
}

static void
test_merge(void)
{
    uint64_t ub = 0, s2 = span_size(2, 2), s3 = span_size(3, 3),
             s4 = span_size(4, 4);
    struct props p;

    is_int(undo_merge(udir, 2, 2, 3, &ub), 0, "merge: 2..2 + 3..3");
    ok(ub == span_size(2, 3) && ub <= s2 + s3, "merge: 2..3 no larger");
    ok(!span_exists(2, 2) && !span_exists(3, 3), "merge: inputs removed");
    is_int(undo_merge(udir, 2, 3, 4, &ub), 0, "merge: 2..3 + 4..4");
    ok(ub <= s2 + s3 + s4, "merge: 2..4 no larger than its parts");
    is_int(span_props(udir, 2, 4, &p), 0, "merge: 2..4 well-formed");
    for (uint64_t pt = 0; pt <= latest; pt++) {
        int want = pt == 2 || pt == 3 ? -ENOENT : 0;
        is_int(view_check(pt), want, "merge: view at point %llu %s",
               (unsigned long long)pt, want ? "dropped" : "exact");
    }

    is_int(undo_merge(udir, 5, 4, 6, &ub), -EINVAL, "merge: a > m refused");
    is_int(undo_merge(udir, 5, 5, 5, &ub), -EINVAL, "merge: m = b refused");
    is_int(undo_merge(udir, 5, 5, 7, &ub), -ENOENT,
           "merge: missing input refused");
    ok(span_exists(5, 5) && !span_exists(5, 7), "merge: nothing changed");
}

/* Older content wins, and the merged layout is exactly the expected one. */
struct seen {
    struct cl_rec r[16];
    uint8_t first[16];
    size_t n;
};

static int
seen_rec(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct seen *s = arg;
    (void)file_off;
    if (s->n < 16) {
        s->r[s->n] = *r;
        s->first[s->n] =
            r->kind == CL_WRITE ? ((const uint8_t *)r->data)[0] : 0;
    }
    s->n++;
    return 0;
}

static void
test_merge_layout(void)
{
    int dir = open_dir("layout");
    uint8_t *a = xmalloc(5 * BLK), *b = xmalloc(5 * BLK);
    char name[48];
    struct pl p;
    uint64_t ub;

    memset(a, 'A', 5 * BLK);
    memset(b, 'B', 5 * BLK);
    undo_name(1, 1, name);
    pl_new(&p, openat(dir, name, O_RDWR | O_CREAT | O_TRUNC, 0644), 1,
           CYC_F_UNDO, NDISKS);
    pl_add(&p, CL_WRITE, 0, 1 * BLK, 2 * BLK, a);
    pl_add(&p, CL_ZERO, 0, 10 * BLK, BLK, NULL);
    pl_add(&p, CL_WRITE, 1, 0, BLK, a);
    pl_finish(&p);
    close(p.fd);
    undo_name(2, 2, name);
    pl_new(&p, openat(dir, name, O_RDWR | O_CREAT | O_TRUNC, 0644), 2,
           CYC_F_UNDO, NDISKS);
    pl_add(&p, CL_WRITE, 0, 0, 5 * BLK, b);
    pl_add(&p, CL_WRITE, 0, 9 * BLK, 3 * BLK, b);
    pl_add(&p, CL_WRITE, 0, 64 * BLK, 1000, b); /* the partial last block */
    pl_finish(&p);
    close(p.fd);

    uint8_t *want[NDISKS];
    for (unsigned d = 0; d < NDISKS; d++) {
        want[d] = xmalloc(sizes[d]);
        if (io_pread_all(disk_fds[d], want[d], sizes[d], 0) < 0)
            die("pread");
    }
    memset(want[0], 'B', 5 * BLK);
    memset(want[0] + BLK, 'A', 2 * BLK);
    memset(want[0] + 9 * BLK, 'B', 3 * BLK);
    memset(want[0] + 10 * BLK, 0, BLK);
    memset(want[0] + 64 * BLK, 'B', 1000);
    memset(want[1], 'A', BLK);
    is_int(view_check_fd(dir, 0, 2, want), 0, "layout: view before merge");

    is_int(undo_merge(dir, 1, 1, 2, &ub), 0, "layout: merge");
    static const struct {
        uint16_t disk;
        uint8_t kind;
        uint64_t off;
        uint32_t len;
        uint8_t c;
    } exp[] = {
        { 0, CL_WRITE, 0, BLK, 'B' },
        { 0, CL_WRITE, BLK, 2 * BLK, 'A' },
        { 0, CL_WRITE, 3 * BLK, 2 * BLK, 'B' },
        { 0, CL_WRITE, 9 * BLK, BLK, 'B' },
        { 0, CL_ZERO, 10 * BLK, BLK, 0 },
        { 0, CL_WRITE, 11 * BLK, BLK, 'B' },
        { 0, CL_WRITE, 64 * BLK, 1000, 'B' },
        { 1, CL_WRITE, 0, BLK, 'A' },
    };
    struct seen s = { .n = 0 };
    struct cyc_hdr h;
    undo_name(1, 2, name);
    int fd = openat(dir, name, O_RDONLY);
    is_int(cyc_payload_foreach(fd, NDISKS, &h, seen_rec, &s), 0,
           "layout: merged file reads");
    close(fd);
    bool same = s.n == ARRAY_SIZE(exp) && h.cycle == 2 && h.flags == CYC_F_UNDO;
    for (size_t i = 0; same && i < s.n; i++)
        same = s.r[i].disk == exp[i].disk && s.r[i].kind == exp[i].kind &&
               s.r[i].offset == exp[i].off && s.r[i].len == exp[i].len &&
               s.first[i] == exp[i].c;
    ok(same, "layout: records are exactly the expected ones");
    is_int(view_check_fd(dir, 0, 2, want), 0, "layout: view after merge");
    is_int(view_check_fd(dir, 1, 2, want), -ENOENT,
           "layout: merged point gone");

    for (unsigned d = 0; d < NDISKS; d++)
        free(want[d]);
    free(a);
    free(b);
    unlinkat(dir, name, 0);
    close(dir);
}

static void
test_crash(void)
{
    char num[24], tmp[64], name[48];
    int st;

    /* Crash before the rename: no span, a .tmp, which cleanup removes. */
    uint64_t c = ++latest;
    make_cycle(c);
    snprintf(num, sizeof num, "%llu", (unsigned long long)c);
    st = run_child("undo-capture:1", "capture", num, NULL, NULL);
    ok(killed(st), "crash: killed at undo-capture (status 0x%x)", st);
    undo_name(c, c, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", name);
    ok(!exists(udir, name) && exists(udir, tmp), "crash: only %s.tmp is left",
       name);
    is_int(undo_cleanup(udir, 0), 1, "crash: cleanup removes the .tmp");
    ok(!exists(udir, tmp), "crash: .tmp gone");
    is_int(capture(c), 0, "crash: capture again");
    is_int(apply(c), 0, "crash: apply");

    /* Crash after the rename: the span stands and is kept as it is. */
    c = ++latest;
    make_cycle(c);
    snprintf(num, sizeof num, "%llu", (unsigned long long)c);
    st = run_child("undo-captured:1", "capture", num, NULL, NULL);
    ok(killed(st), "crash: killed at undo-captured");
    undo_name(c, c, name);
    size_t l1, l2;
    uint8_t *f1 = slurp_at(udir, name, &l1);
    ok(f1 != NULL, "crash: the span is complete");
    is_int(capture(c), 0, "crash: capture again");
    uint8_t *f2 = slurp_at(udir, name, &l2);
    ok(f1 && f2 && l1 == l2 && memcmp(f1, f2, l1) == 0,
       "crash: span kept as it was");
    free(f1);
    free(f2);
    is_int(apply(c), 0, "crash: apply");

    /* Crash between the merged file and removing its inputs. */
    st = run_child("undo-merge:1", "merge", "5", "5", "6");
    ok(killed(st), "crash: killed at undo-merge");
    ok(span_exists(5, 5) && span_exists(6, 6) && span_exists(5, 6),
       "crash: merged file beside its inputs");
    for (uint64_t pt = 4; pt <= latest; pt++)
        is_int(view_check(pt), 0, "crash: view at %llu exact before cleanup",
               (unsigned long long)pt);
    is_int(undo_cleanup(udir, 0), 2, "crash: cleanup removes the inputs");
    ok(!span_exists(5, 5) && !span_exists(6, 6) && span_exists(5, 6),
       "crash: only the merged file is left");
    for (uint64_t pt = 0; pt <= latest; pt++) {
        int want = pt == 2 || pt == 3 || pt == 5 ? -ENOENT : 0;
        is_int(view_check(pt), want, "crash: view at point %llu %s",
               (unsigned long long)pt, want ? "dropped" : "exact");
    }
}

static void
test_cleanup(void)
{
    /* An empty directory (the daemon cleans one after every cycle): this
     * once passed NULL to qsort, which UBSan rightly stopped. */
    int empty = open_dir("cleanup-empty");
    is_int(undo_cleanup(empty, 0), 0, "cleanup: empty directory");
    is_int(undo_cleanup(empty, 7), 0, "cleanup: empty directory, drop_upto");
    uint64_t zsize = 4096;
    struct undo_view *ev = NULL;
    is_int(undo_view_open(empty, 3, 5, 1, &zsize, &ev), -ENOENT,
           "view: no spans in an empty directory");
    undo_view_free(ev);
    close(empty);

    int dir = open_dir("cleanup");
    char name[64];
    static const uint64_t spans[][2] = { { 1, 1 }, { 1, 3 },  { 2, 3 },
                                         { 3, 5 }, { 6, 9 },  { 7, 7 },
                                         { 9, 9 }, { 10, 10 } };

    for (size_t i = 0; i < ARRAY_SIZE(spans); i++) {
        undo_name(spans[i][0], spans[i][1], name);
        put_at(dir, name, (const uint8_t *)"x", 1);
    }
    undo_name(10, 10, name);
    strcat(name, ".tmp");
    put_at(dir, name, (const uint8_t *)"x", 1);
    put_at(dir, "junk.tmp", (const uint8_t *)"x", 1);
    put_at(dir, "README", (const uint8_t *)"x", 1);
    /* 1..1, 2..3 in 1..3; 7..7 and 9..9 in 6..9; the .tmp. */
    is_int(undo_cleanup(dir, 0), 5, "cleanup: contained spans and .tmp");
    bool left = true;
    static const uint64_t keep[][2] = {
        { 1, 3 }, { 3, 5 }, { 6, 9 }, { 10, 10 }
    };
    for (size_t i = 0; i < ARRAY_SIZE(keep); i++) {
        undo_name(keep[i][0], keep[i][1], name);
        left = left && exists(dir, name);
    }
    ok(left && exists(dir, "junk.tmp") && exists(dir, "README"),
       "cleanup: the rest is untouched");
    is_int(undo_cleanup(dir, 0), 0, "cleanup: nothing more");
    is_int(undo_cleanup(dir, 5), 2, "cleanup: drop spans ending at <= 5");
    undo_name(6, 9, name);
    ok(exists(dir, name), "cleanup: 6..9 kept");

    /* On the model: drop the oldest points. */
    is_int(undo_cleanup(udir, 4), 2, "cleanup: drop 1..1 and 2..4");
    ok(!span_exists(1, 1) && !span_exists(2, 4), "cleanup: gone");
    is_int(view_check(0), -ENOENT, "cleanup: point 0 dropped");
    is_int(view_check(4), 0, "cleanup: point 4 still exact");
    close(dir);
}

/* Spans left beside each other by crashes can tile a range in several
 * ways, some of them dead ends. */
static void
test_tiling(void)
{
    int dir = open_dir("tiling");
    static const uint64_t spans[][2] = { { 2, 4 }, { 2, 3 }, { 4, 5 } };
    char name[48];

    for (size_t i = 0; i < ARRAY_SIZE(spans); i++) {
        struct pl q;
        undo_name(spans[i][0], spans[i][1], name);
        pl_new(&q, openat(dir, name, O_RDWR | O_CREAT | O_TRUNC, 0644),
               spans[i][1], CYC_F_UNDO, NDISKS);
        pl_finish(&q);
        close(q.fd);
    }
    static const struct {
        uint64_t point;
        int rc;
    } cases[] = { { 1, 0 },       { 3, 0 }, { 2, -ENOENT },
                  { 4, -ENOENT }, { 5, 0 }, { 0, -ENOENT } };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct undo_view *v = NULL;
        is_int(undo_view_open(dir, cases[i].point, 5, NDISKS, sizes, &v),
               cases[i].rc, "tiling: point %llu of 5",
               (unsigned long long)cases[i].point);
        undo_view_free(v);
    }
    for (size_t i = 0; i < ARRAY_SIZE(spans); i++) {
        undo_name(spans[i][0], spans[i][1], name);
        unlinkat(dir, name, 0);
    }
    close(dir);
}

/* A view refuses a corrupt span rather than read wrong data. */
static void
test_corrupt(void)
{
    char name[48];
    size_t len;
    uint64_t c = latest;

    undo_name(c, c, name);
    uint8_t *orig = slurp_at(udir, name, &len);
    struct props p;
    is_int(span_props(udir, c, c, &p), 0, "corrupt: span well-formed");
    ok(p.nwrite > 0, "corrupt: span holds data");
    uint8_t *bad = xmalloc(len);
    const size_t at[] = { 5, CYC_HDR_BYTES + 3, CYC_HDR_BYTES + 40, len / 2,
                          len - 1 };
    for (size_t i = 0; i < ARRAY_SIZE(at); i++) {
        memcpy(bad, orig, len);
        bad[at[i]] ^= 0x04;
        put_at(udir, name, bad, len);
        is_int(view_check(c - 1), -EBADMSG, "corrupt: byte %zu of %zu flipped",
               at[i], len);
        is_int(view_check(4), -EBADMSG, "corrupt: also from point 4");
    }
    put_at(udir, name, orig, len);
    is_int(view_check(c - 1), 0, "corrupt: restored, exact again");

    /* Cut under an open view: reading its data fails. */
    struct undo_view *v;
    int rc = undo_view_open(udir, c - 1, latest, NDISKS, sizes, &v);
    is_int(rc, 0, "corrupt: open before the cut");
    if (rc == 0) {
        int fd = openat(udir, name, O_WRONLY);
        if (fd < 0 || ftruncate(fd, CYC_HDR_BYTES) < 0)
            die("truncate");
        close(fd);
        int worst = 0;
        for (unsigned d = 0; d < NDISKS; d++) {
            uint8_t *buf = xmalloc(sizes[d]);
            rc = undo_view_read(v, d, disk_fds[d], buf, 0, (uint32_t)sizes[d]);
            if (rc < 0)
                worst = rc;
            free(buf);
        }
        is_int(worst, -EBADMSG, "corrupt: read of cut data fails");
        undo_view_free(v);
        put_at(udir, name, orig, len);
    }
    free(bad);
    free(orig);

    /* Well-checksummed files that break the format rules. */
    int dir = open_dir("malformed");
    static const struct {
        const char *what;
        uint32_t flags, ndisks;
        uint64_t cycle;
        uint8_t kind[2];
        uint16_t disk[2];
        uint64_t off[2];
        uint32_t len[2];
    } cases[] = {
        { "unsorted",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_WRITE, CL_WRITE },
          { 0, 0 },
          { 2 * BLK, 0 },
          { BLK, BLK } },
        { "disks unsorted",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_WRITE, CL_ZERO },
          { 1, 0 },
          { 0, 0 },
          { BLK, BLK } },
        { "overlapping",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_WRITE, CL_ZERO },
          { 0, 0 },
          { 0, BLK },
          { 2 * BLK, BLK } },
        { "unaligned offset",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_WRITE, 0 },
          { 0, 0 },
          { 100, 0 },
          { BLK, 0 } },
        { "short record",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_WRITE, 0 },
          { 0, 0 },
          { 0, 0 },
          { 1000, 0 } },
        { "past the disk",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_ZERO, 0 },
          { 0, 0 },
          { 64 * BLK, 0 },
          { BLK, 0 } },
        { "too long",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_ZERO, 0 },
          { 1, 0 },
          { 0, 0 },
          { UNDO_MAX_RECORD_BYTES + BLK, 0 } },
        { "trim",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_TRIM, 0 },
          { 0, 0 },
          { 0, 0 },
          { BLK, 0 } },
        { "wrong cycle",
          CYC_F_UNDO,
          NDISKS,
          2,
          { CL_ZERO, 0 },
          { 0, 0 },
          { 0, 0 },
          { BLK, 0 } },
        { "not an undo file",
          0,
          NDISKS,
          1,
          { CL_ZERO, 0 },
          { 0, 0 },
          { 0, 0 },
          { BLK, 0 } },
        { "other disk count",
          CYC_F_UNDO,
          1,
          1,
          { CL_ZERO, 0 },
          { 0, 0 },
          { 0, 0 },
          { BLK, 0 } },
        { "valid",
          CYC_F_UNDO,
          NDISKS,
          1,
          { CL_WRITE, CL_ZERO },
          { 0, 1 },
          { 64 * BLK, 0 },
          { 1000, BLK } },
    };
    uint8_t *data = xcalloc(1, UNDO_MAX_RECORD_BYTES + BLK);
    undo_name(1, 1, name);
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct pl q;
        pl_new(&q, openat(dir, name, O_RDWR | O_CREAT | O_TRUNC, 0644),
               cases[i].cycle, cases[i].flags, cases[i].ndisks);
        for (int k = 0; k < 2 && cases[i].kind[k]; k++)
            pl_add(&q, cases[i].kind[k], cases[i].disk[k], cases[i].off[k],
                   cases[i].len[k], data);
        pl_finish(&q);
        close(q.fd);
        struct undo_view *w = NULL;
        rc = undo_view_open(dir, 0, 1, NDISKS, sizes, &w);
        bool valid = i == ARRAY_SIZE(cases) - 1;
        is_int(rc, valid ? 0 : -EBADMSG, "malformed: %s %s", cases[i].what,
               valid ? "accepted" : "refused");
        ok(valid || strstr(vr_errmsg(), name) != NULL,
           "malformed: message names the file (%s)", vr_errmsg());
        undo_view_free(w);
    }
    unlinkat(dir, name, 0);
    free(data);
    close(dir);
}

/* --- revert ------------------------------------------------------------ */

/* Fresh copies "rev-D" of the live disks (the live disks stay as they are,
 * so every point can be reverted to from the same start); fds in out. */
static void
copy_disks(int *out)
{
    for (unsigned d = 0; d < NDISKS; d++) {
        char *p = path_of("rev-%llu", d);
        uint8_t *buf = xmalloc(sizes[d]);
        out[d] = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (out[d] < 0 || io_pread_all(disk_fds[d], buf, sizes[d], 0) < 0 ||
            io_pwrite_all(out[d], buf, sizes[d], 0) < 0)
            die("copy disk");
        free(buf);
        free(p);
    }
}

/* fd holds exactly want: size bytes, no more. */
static bool
disk_is(int fd, const uint8_t *want, uint64_t size)
{
    struct stat st;
    uint8_t *buf = xmalloc(size);
    bool same = fstat(fd, &st) == 0 && (uint64_t)st.st_size == size &&
                io_pread_all(fd, buf, size, 0) == 0 &&
                memcmp(buf, want, size) == 0;
    free(buf);
    return same;
}

static bool
disks_are(const int *fds, uint8_t *const *want)
{
    bool same = true;
    for (unsigned d = 0; d < NDISKS; d++)
        same = disk_is(fds[d], want[d], sizes[d]) && same;
    return same;
}

struct held {
    uint8_t *blk[NDISKS]; /* 1: some span holds the block */
};

static int
held_rec(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct held *h = arg;
    (void)file_off;
    for (uint64_t b = r->offset / BLK; b * BLK < r->offset + r->len; b++)
        h->blk[r->disk][b] = 1;
    return 0;
}

/* What a revert to point of lat writes: every block the spans in dirfd
 * inside point+1..lat hold, once however many hold it, the partial last
 * block by its length. */
static uint64_t
held_bytes(int dirfd, uint64_t point, uint64_t lat)
{
    struct held h;
    uint64_t total = 0;

    for (unsigned d = 0; d < NDISKS; d++)
        h.blk[d] = xcalloc(1, sizes[d] / BLK + 1);
    for (uint64_t a = point + 1; a <= lat; a++) {
        for (uint64_t b = a; b <= lat; b++) {
            char name[48];
            undo_name(a, b, name);
            int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            if (cyc_payload_foreach(fd, NDISKS, NULL, held_rec, &h) < 0)
                die("held_bytes");
            close(fd);
        }
    }
    for (unsigned d = 0; d < NDISKS; d++) {
        for (uint64_t b = 0; b * BLK < sizes[d]; b++) {
            if (h.blk[d][b])
                total += sizes[d] - b * BLK < BLK ? sizes[d] - b * BLK : BLK;
        }
        free(h.blk[d]);
    }
    return total;
}

/* Revert copies of the live disks (at lat) to point with the spans in
 * dirfd, check them against want, revert again, and read them through a
 * view at point.  Returns the bytes the first revert wrote. */
static uint64_t
revert_check(const char *what, int dirfd, uint64_t point, uint64_t lat,
             uint8_t *const *want)
{
    unsigned long long pt = (unsigned long long)point;
    struct undo_view *v = NULL;
    uint64_t b1 = UINT64_MAX, b2 = UINT64_MAX;
    int rfds[NDISKS], rc;

    copy_disks(rfds);
    rc = undo_view_open(dirfd, point, lat, NDISKS, sizes, &v);
    if (rc == 0)
        rc = undo_view_revert(v, rfds, &b1);
    undo_view_free(v);
    is_int(rc, 0, "%s: revert to point %llu", what, pt);
    ok(disks_are(rfds, want), "%s: disks at %llu equal the model", what, pt);
    is_int(b1, held_bytes(dirfd, point, lat),
           "%s: every block the spans hold written once", what);

    /* As after a crash: a new view of the disks reverted already. */
    v = NULL;
    rc = undo_view_open(dirfd, point, lat, NDISKS, sizes, &v);
    if (rc == 0)
        rc = undo_view_revert(v, rfds, &b2);
    undo_view_free(v);
    ok(rc == 0 && b2 == b1 && disks_are(rfds, want),
       "%s: reverting to %llu again changes nothing", what, pt);
    is_int(view_check_fds(dirfd, point, lat, want, rfds), 0,
           "%s: view at %llu of the reverted disks is exact", what, pt);
    for (unsigned d = 0; d < NDISKS; d++)
        close(rfds[d]);
    return b1;
}

/* Revert to every point the spans in udir keep (from latest). */
static void
revert_points(const char *what)
{
    unsigned n = 0;

    for (uint64_t pt = 0; pt < latest; pt++) {
        struct undo_view *v = NULL;
        if (undo_view_open(udir, pt, latest, NDISKS, sizes, &v) < 0)
            continue; /* dropped by a merge or cleanup */
        undo_view_free(v);
        ok(revert_check(what, udir, pt, latest, img[pt]) > 0,
           "%s: reverting to %llu writes something", what,
           (unsigned long long)pt);
        n++;
    }
    ok(n >= 2, "%s: %u points reverted to", what, n);
    /* The latest point: no spans, nothing to write. */
    is_int(revert_check(what, udir, latest, latest, img[latest]), 0,
           "%s: reverting to the latest point writes nothing", what);
}

/* Start a new model: fresh disks and undo directory sub, seed. */
static void
model_reset(const char *sub, uint64_t seed)
{
    for (uint64_t c = 1; c <= latest; c++)
        close(pfds[c]);
    for (uint64_t c = 0; c <= latest; c++) {
        for (unsigned d = 0; d < NDISKS; d++) {
            free(img[c][d]);
            img[c][d] = NULL;
        }
    }
    for (unsigned d = 0; d < NDISKS; d++)
        close(disk_fds[d]);
    close(udir);
    udir = open_dir(sub);
    latest = 0;
    rng_state = seed;
    make_disks();
}

/* Some block the model turns back from data into zeroes (a hole or a
 * zeroed range at the point, data on the live disk). */
static bool
zeroes_come_back(uint64_t point)
{
    for (unsigned d = 0; d < NDISKS; d++) {
        for (uint64_t i = 0; i < sizes[d]; i++) {
            if (img[point][d][i] == 0 && img[latest][d][i] != 0)
                return true;
        }
    }
    return false;
}

/* Revert copies of the live disks to point in a child that dies after
 * the first run, then finish the job; true if the child left the disks
 * between latest and point (its first run may change nothing: a hole
 * punched where the live disk has one too). */
static bool
revert_crash(const char *sub, uint64_t point)
{
    unsigned long long pt = (unsigned long long)point;
    char pnum[24], lnum[24];
    int rfds[NDISKS], st;
    uint64_t bytes = 0;

    snprintf(pnum, sizeof pnum, "%llu", pt);
    snprintf(lnum, sizeof lnum, "%llu", (unsigned long long)latest);
    copy_disks(rfds);
    st = run_child("undo-revert:1", "revert", sub, pnum, lnum);
    ok(killed(st), "revert crash: killed at undo-revert (status 0x%x)", st);
    ok(!disks_are(rfds, img[point]), "revert crash: not yet at point %llu", pt);
    bool between = !disks_are(rfds, img[latest]);
    is_int(view_check_fds(udir, point, latest, img[point], rfds), 0,
           "revert crash: the view at %llu reads the same meanwhile", pt);
    struct undo_view *v = NULL;
    int rc = undo_view_open(udir, point, latest, NDISKS, sizes, &v);
    if (rc == 0)
        rc = undo_view_revert(v, rfds, &bytes);
    undo_view_free(v);
    is_int(rc, 0, "revert crash: revert to %llu again", pt);
    ok(disks_are(rfds, img[point]),
       "revert crash: disks equal the model at %llu", pt);
    for (unsigned d = 0; d < NDISKS; d++)
        close(rfds[d]);
    return between;
}

static void
test_revert(void)
{
    bool between = false;

    /* The history the tests above left: merged spans, dropped points. */
    revert_points("revert");

    /* Fresh random histories, one span merged in each. */
    static const struct {
        uint64_t seed, ncycles, merge_a, merge_b;
    } hist[] = {
        { 0x1234567887654321ull, 6, 2, 3 },
        { 0xdeadbeefcafef00dull, 8, 3, 6 },
        { 0x0123456789abcdefull, 5, 1, 4 },
    };
    for (size_t h = 0; h < ARRAY_SIZE(hist); h++) {
        char sub[32], what[32];
        bool built = true, back = false;
        snprintf(sub, sizeof sub, "revert-%zu", h);
        snprintf(what, sizeof what, "revert %zu", h);
        model_reset(sub, hist[h].seed);
        for (uint64_t c = 1; c <= hist[h].ncycles; c++) {
            make_cycle(c);
            built = built && capture(c) == 0 && apply(c) == 0;
            latest = c;
        }
        uint64_t a = hist[h].merge_a, b = hist[h].merge_b;
        for (uint64_t k = a; k < b; k++) /* a..k + k+1..k+1 */
            built = built && undo_merge(udir, a, k, k + 1, NULL) == 0;
        ok(built, "%s: history of %llu cycles, %llu..%llu merged", what,
           (unsigned long long)latest, (unsigned long long)a,
           (unsigned long long)b);
        for (uint64_t pt = 0; pt < latest; pt++)
            back = back || zeroes_come_back(pt);
        ok(back, "%s: some data goes back to zeroes", what);
        revert_points(what);
        /* Point 0, the oldest, has the most to write. */
        between = revert_crash(sub, 0) || between;
    }

    ok(between, "revert crash: some crash left the disks between the points");
}

static void
cleanup_tmpdir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        diag("cannot remove the temporary directory");
}

int
main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--child") == 0)
        return child_main(argc, argv);
    /* Re-executed for crash tests; argv[0] names this program. */
    self_path = strchr(argv[0], '/') ? argv[0] : "/proc/self/exe";

    plan_no_plan();
    rng_state = 0x9e3779b97f4a7c15ull;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test-undo.XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    udir = open_dir("undo");
    test_names();
    test_foreach();
    test_model();
    test_no_recapture();
    test_merge();
    test_merge_layout();
    test_crash();
    test_cleanup();
    test_tiling();
    test_corrupt();
    test_revert();

    for (uint64_t c = 1; c <= latest; c++)
        close(pfds[c]);
    for (uint64_t c = 0; c <= latest; c++)
        for (unsigned d = 0; d < NDISKS; d++)
            free(img[c][d]);
    for (unsigned d = 0; d < NDISKS; d++)
        close(disk_fds[d]);
    close(udir);
    cleanup_tmpdir();
    return done_testing();
}
