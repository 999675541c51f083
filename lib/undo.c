/* undo.c: undo data on the Replica server (undo.h, docs/formats.md
 * section 5).
 *
 * An undo file ("span" a..b) is an uncompressed cycle payload flagged
 * CYC_F_UNDO whose records hold, block-aligned, sorted by (disk, offset)
 * and non-overlapping, the content the blocks changed by cycles a..b had
 * at point a-1.  Capture reads a staged payload once to learn which blocks
 * it touches (kept as sorted block ranges per disk, so memory follows the
 * number of records, not their size), then copies those blocks from the
 * replica disk, as holes (CL_ZERO) where SEEK_DATA/SEEK_HOLE say the disk
 * has none.  Merge joins two adjacent spans, the older one winning where
 * both hold a block.  A view indexes the blocks of the spans between a
 * point and the latest cycle (block * 64 + disk -> record) after checking
 * every record of every span, CRC included, so a corrupt span fails the
 * open with -EBADMSG instead of yielding wrong data later.  Revert
 * writes the blocks a view takes from its spans into the live disks, which
 * leaves the view's reads unchanged, so it can be repeated after a crash.
 *
 * Every file is written as NAME.tmp (O_EXCL), fdatasync'ed, renamed and
 * the directory fsync'ed; undo_cleanup removes what a crash leaves.
 */
#include "config.h"

#include "undo.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "u64map.h"

#define UNDO_BLOCK      ((uint64_t)CL_PRE_BLOCK)
#define UNDO_NAME_CHARS 46 /* 20 + 1 + 20 + ".undo" */
#define UNDO_TMP_SUFFIX ".tmp"
/* Room for an undo name plus ".tmp" and the NUL. */
#define UNDO_TMP_BYTES  56

/* --- names ----------------------------------------------------------- */

void
undo_name(uint64_t a, uint64_t b, char out[48])
{
    snprintf(out, 48, "%020" PRIu64 "-%020" PRIu64 ".undo", a, b);
}

/* Exactly 20 decimal digits, no overflow. */
static bool
parse_u64_20(const char *p, uint64_t *out)
{
    uint64_t v = 0;

    for (int i = 0; i < 20; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        unsigned d = (unsigned)(p[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

int
undo_parse_name(const char *name, uint64_t *a, uint64_t *b)
{
    uint64_t x, y;

    if (strlen(name) != UNDO_NAME_CHARS || name[20] != '-' ||
        strcmp(name + 41, ".undo") != 0 || !parse_u64_20(name, &x) ||
        !parse_u64_20(name + 21, &y) || x > y)
        return 0;
    *a = x;
    *b = y;
    return 1;
}

static void
tmp_name(uint64_t a, uint64_t b, char out[UNDO_TMP_BYTES])
{
    char name[48];

    undo_name(a, b, name);
    snprintf(out, UNDO_TMP_BYTES, "%s" UNDO_TMP_SUFFIX, name);
}

/* --- directory listing ----------------------------------------------- */

struct span_ent {
    uint64_t a, b;
    bool tmp; /* NAME.tmp */
};

struct span_list {
    struct span_ent *e;
    size_t n, cap;
};

/* Every span and span .tmp file in dirfd; other names are ignored. */
static int
list_spans(int dirfd, struct span_list *l)
{
    struct dirent *de;
    DIR *d;
    int fd, rc = 0;

    memset(l, 0, sizeof *l);
    /* A fresh open file description: readdir must not move dirfd's. */
    fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "undo: open directory: %s", strerror(errno));
    if (!(d = fdopendir(fd))) {
        rc = vr_err(-errno, "undo: open directory: %s", strerror(errno));
        close(fd);
        return rc;
    }
    for (;;) {
        struct span_ent e = { 0 };
        char base[48];
        size_t len;

        errno = 0;
        if (!(de = readdir(d))) {
            if (errno)
                rc =
                    vr_err(-errno, "undo: read directory: %s", strerror(errno));
            break;
        }
        len = strlen(de->d_name);
        if (len == UNDO_NAME_CHARS + strlen(UNDO_TMP_SUFFIX) &&
            strcmp(de->d_name + UNDO_NAME_CHARS, UNDO_TMP_SUFFIX) == 0) {
            memcpy(base, de->d_name, UNDO_NAME_CHARS);
            base[UNDO_NAME_CHARS] = '\0';
            e.tmp = true;
        } else if (len == UNDO_NAME_CHARS) {
            memcpy(base, de->d_name, UNDO_NAME_CHARS + 1);
        } else {
            continue;
        }
        if (!undo_parse_name(base, &e.a, &e.b))
            continue;
        if (l->n == l->cap) {
            l->cap = l->cap ? l->cap * 2 : 32;
            l->e = xrealloc(l->e, l->cap * sizeof *l->e);
        }
        l->e[l->n++] = e;
    }
    closedir(d);
    if (rc < 0) {
        free(l->e);
        memset(l, 0, sizeof *l);
    }
    return rc;
}

/* By a ascending, then b descending (the longer span first). */
static int
cmp_span(const void *x, const void *y)
{
    const struct span_ent *p = x, *q = y;

    if (p->a != q->a)
        return p->a < q->a ? -1 : 1;
    if (p->b != q->b)
        return p->b > q->b ? -1 : 1;
    return 0;
}

/* --- writing a span file --------------------------------------------- */

/* Create NAME.tmp afresh (a stale one from a crash is removed first). */
static int
create_tmp(int dirfd, const char *tmp, int *fd_out)
{
    int fd;

    if (unlinkat(dirfd, tmp, 0) < 0 && errno != ENOENT)
        return vr_err(-errno, "undo: remove stale %s: %s", tmp,
                      strerror(errno));
    fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
                O_CLOEXEC, 0644);
    if (fd < 0)
        return vr_err(-errno, "undo: create %s: %s", tmp, strerror(errno));
    *fd_out = fd;
    return 0;
}

/* fdatasync and close fd (NAME.tmp), hit fault (if any), rename to NAME
 * and fsync the directory.  fd is closed in any case. */
static int
commit_tmp(int dirfd, int fd, const char *tmp, const char *name,
           const char *fault)
{
    int rc = 0;

    if (fdatasync(fd) < 0)
        rc = vr_err(-errno, "undo: sync %s: %s", tmp, strerror(errno));
    if (close(fd) < 0 && rc == 0)
        rc = vr_err(-errno, "undo: close %s: %s", tmp, strerror(errno));
    if (rc < 0)
        return rc;
    if (fault)
        vr_fault_point(fault);
    if (renameat(dirfd, tmp, dirfd, name) < 0)
        return vr_err(-errno, "undo: rename %s to %s: %s", tmp, name,
                      strerror(errno));
    if ((rc = io_fsync_dirfd(dirfd)) < 0)
        return vr_err(rc, "undo: sync directory after %s: %s", name,
                      strerror(-rc));
    return 0;
}

static struct cyc_hdr
span_hdr(uint64_t b, unsigned ndisks)
{
    struct cyc_hdr h = {
        .version = CYC_VERSION,
        .flags = CYC_F_UNDO,
        .cycle = b,
        .ndisks = ndisks,
    };
    return h;
}

/* --- capture --------------------------------------------------------- */

/* Blocks [start, end). */
struct brange {
    uint64_t start, end;
};

struct rangeset {
    struct brange *r;
    size_t n, cap;
};

static int
cmp_brange(const void *x, const void *y)
{
    const struct brange *p = x, *q = y;

    if (p->start != q->start)
        return p->start < q->start ? -1 : 1;
    return 0;
}

/* Sort and join overlapping or adjacent ranges. */
static void
rangeset_normalise(struct rangeset *s)
{
    size_t w = 0;

    if (s->n < 2)
        return;
    qsort(s->r, s->n, sizeof *s->r, cmp_brange);
    for (size_t i = 1; i < s->n; i++) {
        if (s->r[i].start <= s->r[w].end) {
            if (s->r[i].end > s->r[w].end)
                s->r[w].end = s->r[i].end;
        } else {
            s->r[++w] = s->r[i];
        }
    }
    s->n = w + 1;
}

static void
rangeset_add(struct rangeset *s, uint64_t start, uint64_t end)
{
    /* Sequential writes extend the last range without growing the set. */
    if (s->n > 0 && start >= s->r[s->n - 1].start &&
        start <= s->r[s->n - 1].end) {
        if (end > s->r[s->n - 1].end)
            s->r[s->n - 1].end = end;
        return;
    }
    if (s->n == s->cap) {
        /* Repeated writes to the same blocks: squeeze before growing. */
        if (s->cap >= 4096)
            rangeset_normalise(s);
        if (s->cap == 0 || s->n * 2 > s->cap) {
            s->cap = s->cap ? s->cap * 2 : 64;
            s->r = xrealloc(s->r, s->cap * sizeof *s->r);
        }
    }
    s->r[s->n++] = (struct brange){ start, end };
}

struct capture_ctx {
    struct rangeset *sets;
    const uint64_t *sizes;
};

static int
capture_rec(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct capture_ctx *c = arg;
    uint64_t size = c->sizes[r->disk], end;

    (void)file_off;
    /* cyc_payload_foreach has checked r->disk < ndisks and that offset +
     * len does not overflow; apply refuses what lies past the disk. */
    if (r->len == 0 || r->offset >= size)
        return 0;
    end = r->offset + r->len;
    if (end > size)
        end = size;
    rangeset_add(&c->sets[r->disk], r->offset / UNDO_BLOCK,
                 (end + UNDO_BLOCK - 1) / UNDO_BLOCK);
    return 0;
}

/* First offset in [pos, end) of a block that may hold data (end if none):
 * SEEK_DATA rounded down to its block.  *raw is SEEK_DATA's answer. */
static int
find_data(int fd, unsigned disk, uint64_t pos, uint64_t end, uint64_t *out,
          uint64_t *raw)
{
    off_t d = lseek(fd, (off_t)pos, SEEK_DATA);

    if (d < 0) {
        if (errno == ENXIO) { /* only a hole up to EOF */
            *out = *raw = end;
            return 0;
        }
        if (errno == EINVAL || errno == EOPNOTSUPP) { /* no SEEK_DATA */
            *out = *raw = pos;
            return 0;
        }
        return vr_err(-errno, "undo: disk %u: seek data at %" PRIu64 ": %s",
                      disk, pos, strerror(errno));
    }
    *raw = (uint64_t)d;
    uint64_t r = (uint64_t)d / UNDO_BLOCK * UNDO_BLOCK;
    if (r < pos)
        r = pos;
    *out = r < end ? r : end;
    return 0;
}

/* End of the data run starting at raw (SEEK_HOLE), rounded up to a block
 * boundary and clamped to end. */
static int
find_hole(int fd, unsigned disk, uint64_t raw, uint64_t end, uint64_t *out)
{
    off_t h = lseek(fd, (off_t)raw, SEEK_HOLE);
    uint64_t r;

    if (h < 0) {
        if (errno != ENXIO && errno != EINVAL && errno != EOPNOTSUPP)
            return vr_err(-errno, "undo: disk %u: seek hole at %" PRIu64 ": %s",
                          disk, raw, strerror(errno));
        r = end;
    } else {
        r = ((uint64_t)h + UNDO_BLOCK - 1) / UNDO_BLOCK * UNDO_BLOCK;
    }
    *out = r < end ? r : end;
    return 0;
}

static int
emit(struct cyc_builder *bld, uint8_t kind, unsigned disk, uint64_t off,
     uint64_t len, const void *data)
{
    struct cl_rec r = {
        .kind = kind,
        .disk = (uint16_t)disk,
        .len = (uint32_t)len,
        .offset = off,
        .data = data,
    };
    return cyc_builder_add(bld, &r);
}

/* Save [start, end) of disk (start block-aligned, end block-aligned or
 * the disk's end, at most UNDO_MAX_RECORD_BYTES) as ZERO records for its
 * holes and WRITE records for the rest. */
static int
capture_range(struct cyc_builder *bld, int fd, unsigned disk, uint64_t start,
              uint64_t end, uint8_t *buf)
{
    uint64_t pos = start;
    int rc;

    while (pos < end) {
        uint64_t d = 0, raw = 0, h = 0;

        if ((rc = find_data(fd, disk, pos, end, &d, &raw)) < 0)
            return rc;
        if (d > pos && (rc = emit(bld, CL_ZERO, disk, pos, d - pos, NULL)) < 0)
            return rc;
        if (d >= end)
            break;
        if ((rc = find_hole(fd, disk, raw > d ? raw : d, end, &h)) < 0)
            return rc;
        if (h <= d) /* the file changed under us: take a block */
            h = d + UNDO_BLOCK < end ? d + UNDO_BLOCK : end;
        /* Past the file's end (shorter than the disk size) reads zeroes. */
        memset(buf, 0, h - d);
        rc = io_pread_all(fd, buf, h - d, (off_t)d);
        if (rc < 0 && rc != -ENODATA)
            return vr_err(rc, "undo: disk %u: read at %" PRIu64 ": %s", disk, d,
                          strerror(-rc));
        if ((rc = emit(bld, CL_WRITE, disk, d, h - d, buf)) < 0)
            return rc;
        pos = h;
    }
    return 0;
}

static int
capture_write(struct cyc_builder *bld, const int *disk_fds,
              const uint64_t *disk_sizes, unsigned ndisks,
              const struct rangeset *sets)
{
    uint8_t *buf = xmalloc(UNDO_MAX_RECORD_BYTES);
    int rc = 0;

    for (unsigned i = 0; i < ndisks && rc == 0; i++) {
        for (size_t k = 0; k < sets[i].n && rc == 0; k++) {
            uint64_t s = sets[i].r[k].start * UNDO_BLOCK;
            uint64_t e = sets[i].r[k].end * UNDO_BLOCK;
            if (e > disk_sizes[i])
                e = disk_sizes[i];
            while (s < e && rc == 0) {
                uint64_t n = e - s < UNDO_MAX_RECORD_BYTES
                                 ? e - s
                                 : UNDO_MAX_RECORD_BYTES;
                rc = capture_range(bld, disk_fds[i], i, s, s + n, buf);
                s += n;
            }
        }
    }
    free(buf);
    return rc;
}

int
undo_capture(int payload_fd, const int *disk_fds, const uint64_t *disk_sizes,
             unsigned ndisks, int dirfd, uint64_t cycle, uint64_t *undo_bytes)
{
    struct rangeset sets[CYC_MAX_DISKS];
    struct capture_ctx c = { .sets = sets, .sizes = disk_sizes };
    struct cyc_builder *bld = NULL;
    struct cyc_hdr ph, h;
    struct stat st;
    char name[48], tmp[UNDO_TMP_BYTES];
    uint64_t raw = 0;
    int fd = -1, rc;

    if (undo_bytes)
        *undo_bytes = 0;
    if (ndisks == 0 || ndisks > CYC_MAX_DISKS)
        return vr_err(-EINVAL, "undo: %u disks out of range", ndisks);
    if (cycle == 0)
        return vr_err(-EINVAL, "undo: cycle 0 has no undo data");
    undo_name(cycle, cycle, name);
    tmp_name(cycle, cycle, tmp);

    /* Captured before a crash: the disks may have changed since. */
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        /* Only a file we wrote: a link there is never taken as data. */
        if (!S_ISREG(st.st_mode))
            return vr_err(S_ISLNK(st.st_mode) ? -ELOOP : -EINVAL,
                          "undo: %s is %s, not an undo file (refused)", name,
                          S_ISLNK(st.st_mode) ? "a symbolic link"
                                              : "not a regular file");
        if (undo_bytes)
            *undo_bytes = (uint64_t)st.st_size;
        return 0;
    }
    if (errno != ENOENT)
        return vr_err(-errno, "undo: stat %s: %s", name, strerror(errno));

    memset(sets, 0, sizeof sets);
    rc = cyc_payload_foreach(payload_fd, ndisks, &ph, capture_rec, &c);
    if (rc < 0)
        goto out;
    if (ph.cycle != cycle || (ph.flags & (CYC_F_BASE | CYC_F_UNDO))) {
        rc = vr_err(-EINVAL,
                    "undo: capture cycle %" PRIu64 ": payload is for cycle "
                    "%" PRIu64 " with flags 0x%" PRIx32,
                    cycle, ph.cycle, ph.flags);
        goto out;
    }
    for (unsigned i = 0; i < ndisks; i++)
        rangeset_normalise(&sets[i]);

    if ((rc = create_tmp(dirfd, tmp, &fd)) < 0)
        goto out;
    h = span_hdr(cycle, ndisks);
    if ((rc = cyc_builder_new(fd, false, 0, &h, &bld)) < 0 ||
        (rc = capture_write(bld, disk_fds, disk_sizes, ndisks, sets)) < 0 ||
        (rc = cyc_builder_finish(bld, &raw, NULL)) < 0)
        goto out;
    rc = commit_tmp(dirfd, fd, tmp, name, "undo-capture");
    fd = -1;
    if (rc < 0)
        goto out;
    vr_fault_point("undo-captured");
    if (undo_bytes)
        *undo_bytes = raw;
out:
    cyc_builder_free(bld);
    if (fd >= 0)
        close(fd);
    if (rc < 0)
        unlinkat(dirfd, tmp, 0);
    for (unsigned i = 0; i < ndisks; i++)
        free(sets[i].r);
    return rc;
}

/* --- reading span files ---------------------------------------------- */

/* One record of a span file. */
struct urec {
    uint64_t offset;
    uint64_t data_off; /* file offset of the data (CL_WRITE) */
    uint32_t len;
    uint32_t src; /* which open span file */
    uint16_t disk;
    uint8_t kind;
};

struct urec_list {
    struct urec *r;
    size_t n, cap;
};

struct span_read {
    struct urec_list *out;
    size_t first; /* this span's first record in out */
    uint32_t src;
    const uint64_t *sizes; /* NULL: disk sizes unknown (merge) */
};

/* Check one record of a span against the format (undo.h) and keep it. */
static int
span_rec(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct span_read *s = arg;
    struct urec_list *l = s->out;
    uint64_t end = r->offset + r->len; /* cannot overflow: checked */

    if (r->kind != CL_WRITE && r->kind != CL_ZERO)
        return vr_err(-EBADMSG, "record of kind %u", r->kind);
    if (r->len == 0 || r->len > UNDO_MAX_RECORD_BYTES ||
        r->offset % UNDO_BLOCK != 0)
        return vr_err(-EBADMSG,
                      "record at %" PRIu64 " of %" PRIu32
                      " bytes is not block-aligned or too long",
                      r->offset, r->len);
    if (s->sizes && (end > s->sizes[r->disk] ||
                     (r->len % UNDO_BLOCK != 0 && end != s->sizes[r->disk])))
        return vr_err(-EBADMSG,
                      "record at %" PRIu64 " of %" PRIu32
                      " bytes does not fit disk %u",
                      r->offset, r->len, r->disk);
    if (l->n > s->first) {
        const struct urec *p = &l->r[l->n - 1];
        if (r->disk < p->disk ||
            (r->disk == p->disk &&
             (p->offset + p->len > r->offset || p->len % UNDO_BLOCK != 0)))
            return vr_err(-EBADMSG,
                          "record at disk %u offset %" PRIu64
                          " out of order or overlapping",
                          r->disk, r->offset);
    }
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 256;
        l->r = xrealloc(l->r, l->cap * sizeof *l->r);
    }
    l->r[l->n++] = (struct urec){
        .offset = r->offset,
        .data_off = file_off + CL_REC_HDR_BYTES,
        .len = r->len,
        .src = s->src,
        .disk = r->disk,
        .kind = r->kind,
    };
    return 0;
}

/* Open span a..b in dirfd, check it whole (header, every record) and
 * append its records to out.  ndisks 0: take the file's (*ndisks_out).
 * On success *fd_out is the open file. */
static int
read_span(int dirfd, uint64_t a, uint64_t b, unsigned ndisks,
          const uint64_t *sizes, uint32_t src, struct urec_list *out,
          int *fd_out, unsigned *ndisks_out)
{
    char name[48];
    struct cyc_hdr h;
    struct span_read s = {
        .out = out, .first = out->n, .src = src, .sizes = sizes
    };
    int fd, rc;

    undo_name(a, b, name);
    fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return vr_err(-errno, "undo file %s: open: %s", name, strerror(errno));
    rc = cyc_payload_foreach(fd, ndisks, &h, span_rec, &s);
    if (rc == 0 && (h.flags != CYC_F_UNDO || h.cycle != b))
        rc = vr_err(-EBADMSG, "header says cycle %" PRIu64 " flags 0x%" PRIx32,
                    h.cycle, h.flags);
    if (rc < 0) {
        char why[512];
        snprintf(why, sizeof why, "%s", vr_errmsg());
        out->n = s.first;
        close(fd);
        return vr_err(rc, "undo file %s: %s", name, why);
    }
    *fd_out = fd;
    if (ndisks_out)
        *ndisks_out = h.ndisks;
    return 0;
}

/* --- merge ----------------------------------------------------------- */

/* p before q in (disk, offset) order. */
static bool
urec_before(const struct urec *p, const struct urec *q)
{
    return p->disk != q->disk ? p->disk < q->disk : p->offset < q->offset;
}

/* The parts of each newer record no older record covers.  Both lists are
 * sorted and non-overlapping, so one pass over the older one suffices. */
static void
subtract_older(const struct urec_list *older, const struct urec_list *newer,
               struct urec_list *out)
{
    size_t k = 0;

    for (size_t j = 0; j < newer->n; j++) {
        const struct urec *n = &newer->r[j];
        uint64_t cur = n->offset, end = n->offset + n->len;

        while (k < older->n && (older->r[k].disk < n->disk ||
                                (older->r[k].disk == n->disk &&
                                 older->r[k].offset + older->r[k].len <= cur)))
            k++;
        for (size_t i = k; i <= older->n && cur < end; i++) {
            const struct urec *o = i < older->n ? &older->r[i] : NULL;
            uint64_t stop = end;
            if (o && o->disk == n->disk && o->offset < end)
                stop = o->offset;
            if (stop > cur) {
                struct urec piece = *n;
                piece.offset = cur;
                piece.len = (uint32_t)(stop - cur);
                piece.data_off = n->data_off + (cur - n->offset);
                if (out->n == out->cap) {
                    out->cap = out->cap ? out->cap * 2 : 256;
                    out->r = xrealloc(out->r, out->cap * sizeof *out->r);
                }
                out->r[out->n++] = piece;
            }
            if (!o || o->disk != n->disk || o->offset >= end)
                break;
            uint64_t oend = o->offset + o->len;
            if (oend > cur)
                cur = oend;
        }
    }
}

static int
merge_emit(struct cyc_builder *bld, const struct urec *r, const int *fds,
           uint8_t *buf, const char *what)
{
    int rc;

    if (r->kind == CL_WRITE) {
        rc = io_pread_all(fds[r->src], buf, r->len, (off_t)r->data_off);
        if (rc < 0)
            return vr_err(rc == -ENODATA ? -EBADMSG : rc,
                          "undo: merge %s: read input: %s", what,
                          strerror(-rc));
    }
    return emit(bld, r->kind, r->disk, r->offset, r->len,
                r->kind == CL_WRITE ? buf : NULL);
}

int
undo_merge(int dirfd, uint64_t a, uint64_t m, uint64_t b, uint64_t *undo_bytes)
{
    struct urec_list older = { 0 }, newer = { 0 }, rest = { 0 };
    struct cyc_builder *bld = NULL;
    struct cyc_hdr h;
    char name[48], tmp[UNDO_TMP_BYTES], in1[48], in2[48];
    int fds[2] = { -1, -1 }, fd = -1, rc;
    unsigned ndisks = 0;
    uint8_t *buf = NULL;
    uint64_t raw = 0;

    if (undo_bytes)
        *undo_bytes = 0;
    if (a > m || m >= b)
        return vr_err(-EINVAL,
                      "undo: cannot merge %" PRIu64 "..%" PRIu64
                      " with %" PRIu64 "..%" PRIu64,
                      a, m, m + 1, b);
    undo_name(a, b, name);
    tmp_name(a, b, tmp);
    undo_name(a, m, in1);
    undo_name(m + 1, b, in2);

    if ((rc = read_span(dirfd, a, m, 0, NULL, 0, &older, &fds[0], &ndisks)) <
            0 ||
        (rc = read_span(dirfd, m + 1, b, ndisks, NULL, 1, &newer, &fds[1],
                        NULL)) < 0)
        goto out;
    subtract_older(&older, &newer, &rest);

    if ((rc = create_tmp(dirfd, tmp, &fd)) < 0)
        goto out;
    h = span_hdr(b, ndisks);
    if ((rc = cyc_builder_new(fd, false, 0, &h, &bld)) < 0)
        goto out;
    buf = xmalloc(UNDO_MAX_RECORD_BYTES);
    for (size_t i = 0, j = 0; i < older.n || j < rest.n;) {
        const struct urec *r;
        if (j == rest.n ||
            (i < older.n && urec_before(&older.r[i], &rest.r[j])))
            r = &older.r[i++];
        else
            r = &rest.r[j++];
        if ((rc = merge_emit(bld, r, fds, buf, name)) < 0)
            goto out;
    }
    if ((rc = cyc_builder_finish(bld, &raw, NULL)) < 0)
        goto out;
    rc = commit_tmp(dirfd, fd, tmp, name, NULL);
    fd = -1;
    if (rc < 0)
        goto out;
    vr_fault_point("undo-merge");
    if (unlinkat(dirfd, in1, 0) < 0 && errno != ENOENT) {
        rc = vr_err(-errno, "undo: remove %s: %s", in1, strerror(errno));
        goto out;
    }
    if (unlinkat(dirfd, in2, 0) < 0 && errno != ENOENT) {
        rc = vr_err(-errno, "undo: remove %s: %s", in2, strerror(errno));
        goto out;
    }
    if ((rc = io_fsync_dirfd(dirfd)) < 0) {
        rc = vr_err(rc, "undo: sync directory after merging %s: %s", name,
                    strerror(-rc));
        goto out;
    }
    if (undo_bytes)
        *undo_bytes = raw;
out:
    cyc_builder_free(bld);
    if (fd >= 0) {
        close(fd);
        unlinkat(dirfd, tmp, 0);
    }
    for (int i = 0; i < 2; i++) {
        if (fds[i] >= 0)
            close(fds[i]);
    }
    free(buf);
    free(older.r);
    free(newer.r);
    free(rest.r);
    return rc;
}

/* --- cleanup --------------------------------------------------------- */

int
undo_cleanup(int dirfd, uint64_t drop_upto)
{
    struct span_list l;
    uint64_t maxb = 0;
    bool any = false;
    int removed = 0, rc;

    if ((rc = list_spans(dirfd, &l)) < 0)
        return rc;
    if (l.n > 1) /* qsort(NULL, 0, ...) is undefined */
        qsort(l.e, l.n, sizeof *l.e, cmp_span);
    for (size_t i = 0; i < l.n; i++) {
        const struct span_ent *e = &l.e[i];
        char name[UNDO_TMP_BYTES];
        bool drop;

        if (e->tmp) {
            tmp_name(e->a, e->b, name);
            drop = true;
        } else {
            undo_name(e->a, e->b, name);
            /* Spans come by a, the longest first: an earlier span reaching
             * at least as far contains this one (names are unique). */
            drop =
                (any && maxb >= e->b) || (drop_upto > 0 && e->b <= drop_upto);
            if (!any || e->b > maxb)
                maxb = e->b;
            any = true;
        }
        if (!drop)
            continue;
        if (unlinkat(dirfd, name, 0) < 0 && errno != ENOENT) {
            rc = vr_err(-errno, "undo: remove %s: %s", name, strerror(errno));
            goto out;
        }
        removed++;
    }
    if (removed > 0 && (rc = io_fsync_dirfd(dirfd)) < 0) {
        rc = vr_err(rc, "undo: sync directory: %s", strerror(-rc));
        goto out;
    }
    rc = removed;
out:
    free(l.e);
    return rc;
}

/* --- views ----------------------------------------------------------- */

struct undo_view {
    unsigned ndisks;
    uint64_t sizes[CYC_MAX_DISKS];
    int *fds; /* one per span, by src */
    size_t nspans;
    struct urec_list recs;
    struct u64map index; /* block * CYC_MAX_DISKS + disk -> record + 1 */
};

static uint64_t
view_key(uint64_t block, unsigned disk)
{
    return block * CYC_MAX_DISKS + disk;
}

/* First index in l (sorted by cmp_span) whose a is >= a. */
static size_t
lower_bound(const struct span_ent *e, size_t n, uint64_t a)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (e[mid].a < a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Choose spans tiling point+1..latest from l (only spans inside that
 * range, sorted by cmp_span).  Normally there is one way; when a merge's
 * inputs are still beside its output there are several, and any does.
 * good[i]: from span i on, latest can be reached. */
static int
choose_spans(const struct span_ent *e, size_t n, uint64_t point,
             uint64_t latest, size_t **out, size_t *nout)
{
    bool *good = xcalloc(n, sizeof *good);
    size_t *pick = xmalloc((n ? n : 1) * sizeof *pick), np = 0;
    uint64_t cur = point + 1;

    for (size_t i = n; i-- > 0;) {
        if (e[i].b == latest) {
            good[i] = true;
            continue;
        }
        for (size_t k = lower_bound(e, n, e[i].b + 1);
             k < n && e[k].a == e[i].b + 1 && !good[i]; k++)
            good[i] = good[k];
    }
    for (;;) {
        size_t k = lower_bound(e, n, cur);
        while (k < n && e[k].a == cur && !good[k])
            k++;
        if (k == n || e[k].a != cur) {
            free(good);
            free(pick);
            return vr_err(-ENOENT,
                          "undo: point %" PRIu64 " cannot be reconstructed "
                          "from cycle %" PRIu64 ": no undo file leads from "
                          "cycle %" PRIu64 " to %" PRIu64,
                          point, latest, cur, latest);
        }
        pick[np++] = k;
        if (e[k].b == latest)
            break;
        cur = e[k].b + 1;
    }
    free(good);
    *out = pick;
    *nout = np;
    return 0;
}

int
undo_view_open(int dirfd, uint64_t point, uint64_t latest, unsigned ndisks,
               const uint64_t *disk_sizes, struct undo_view **out)
{
    struct undo_view *v;
    struct span_list l;
    size_t *pick = NULL, np = 0, w = 0;
    int rc;

    *out = NULL;
    if (ndisks == 0 || ndisks > CYC_MAX_DISKS)
        return vr_err(-EINVAL, "undo: %u disks out of range", ndisks);
    if (point > latest)
        return vr_err(-EINVAL,
                      "undo: point %" PRIu64 " is after the latest cycle "
                      "%" PRIu64,
                      point, latest);
    for (unsigned i = 0; i < ndisks; i++) {
        if (disk_sizes[i] > INT64_MAX)
            return vr_err(-EINVAL, "undo: disk %u size out of range", i);
    }

    v = xcalloc(1, sizeof *v);
    v->ndisks = ndisks;
    memcpy(v->sizes, disk_sizes, ndisks * sizeof *disk_sizes);
    if (point == latest) {
        *out = v;
        return 0;
    }

    if ((rc = list_spans(dirfd, &l)) < 0)
        goto fail;
    for (size_t i = 0; i < l.n; i++) {
        if (!l.e[i].tmp && l.e[i].a > point && l.e[i].b <= latest)
            l.e[w++] = l.e[i];
    }
    l.n = w;
    if (l.n > 1) /* qsort(NULL, 0, ...) is undefined */
        qsort(l.e, l.n, sizeof *l.e, cmp_span);
    rc = choose_spans(l.e, l.n, point, latest, &pick, &np);
    if (rc < 0) {
        free(l.e);
        goto fail;
    }

    /* Lowest cycles first: the span nearest the point wins a block. */
    v->fds = xmalloc(np * sizeof *v->fds);
    for (size_t i = 0; i < np; i++) {
        const struct span_ent *e = &l.e[pick[i]];
        rc = read_span(dirfd, e->a, e->b, ndisks, v->sizes, (uint32_t)i,
                       &v->recs, &v->fds[i], NULL);
        if (rc < 0)
            break;
        v->nspans++;
    }
    free(pick);
    free(l.e);
    if (rc < 0)
        goto fail;

    for (size_t i = 0; i < v->recs.n; i++) {
        const struct urec *r = &v->recs.r[i];
        uint64_t first = r->offset / UNDO_BLOCK;
        uint64_t last = (r->offset + r->len - 1) / UNDO_BLOCK;
        for (uint64_t blk = first; blk <= last; blk++) {
            uint64_t key = view_key(blk, r->disk);
            if (u64map_get(&v->index, key) == 0)
                u64map_put(&v->index, key, i + 1);
        }
    }
    *out = v;
    return 0;
fail:
    undo_view_free(v);
    return rc;
}

int
undo_view_read(struct undo_view *v, unsigned disk, int disk_fd, void *buf,
               uint64_t off, uint32_t len)
{
    uint8_t *p = buf;
    uint64_t pos = off, end;
    int rc;

    if (disk >= v->ndisks)
        return vr_err(-EINVAL, "undo: view has no disk %u", disk);
    if (off > v->sizes[disk] || len > v->sizes[disk] - off)
        return vr_err(-EINVAL,
                      "undo: read disk %u at %" PRIu64 " + %" PRIu32
                      " beyond its size %" PRIu64,
                      disk, off, len, v->sizes[disk]);
    end = off + len;
    while (pos < end) {
        uint64_t blk = pos / UNDO_BLOCK;
        uint64_t at = u64map_get(&v->index, view_key(blk, disk));
        uint64_t bend = (blk + 1) * UNDO_BLOCK, n;

        /* Take following blocks from the same source in one go. */
        while (bend < end &&
               u64map_get(&v->index, view_key(bend / UNDO_BLOCK, disk)) == at)
            bend += UNDO_BLOCK;
        n = (bend < end ? bend : end) - pos;
        if (at == 0) {
            memset(p, 0, n);
            rc = io_pread_all(disk_fd, p, n, (off_t)pos);
            if (rc < 0 && rc != -ENODATA)
                return vr_err(rc, "undo: read disk %u at %" PRIu64 ": %s", disk,
                              pos, strerror(-rc));
        } else {
            const struct urec *r = &v->recs.r[at - 1];
            if (r->kind == CL_ZERO) {
                memset(p, 0, n);
            } else {
                rc = io_pread_all(v->fds[r->src], p, n,
                                  (off_t)(r->data_off + (pos - r->offset)));
                if (rc < 0)
                    return vr_err(rc == -ENODATA ? -EBADMSG : rc,
                                  "undo: read undo data of disk %u at "
                                  "%" PRIu64 ": %s",
                                  disk, pos, strerror(-rc));
            }
        }
        p += n;
        pos += n;
    }
    return 0;
}

/* Make [off, off+len) of disk read as zeroes: punch a hole, or write
 * zeroes where the file system or device cannot (as apply does). */
static int
revert_zero(int fd, unsigned disk, uint64_t off, uint64_t len)
{
    static const uint8_t zeroes[64 << 10];

    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)len) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return vr_err(-errno,
                      "undo: revert disk %u: punch hole at %" PRIu64 ": %s",
                      disk, off, strerror(errno));
    while (len > 0) {
        size_t n = len < sizeof zeroes ? (size_t)len : sizeof zeroes;
        int rc = io_pwrite_all(fd, zeroes, n, (off_t)off);
        if (rc < 0)
            return vr_err(
                rc, "undo: revert disk %u: write zeroes at %" PRIu64 ": %s",
                disk, off, strerror(-rc));
        off += n;
        len -= n;
    }
    return 0;
}

/* Write [pos, pos+n) of record r (n <= r->len, inside it) to its disk. */
static int
revert_run(struct undo_view *v, const struct urec *r, const int *disk_fds,
           uint64_t pos, uint64_t n, uint8_t **buf)
{
    int fd = disk_fds[r->disk];
    int rc;

    if (r->kind == CL_ZERO)
        return revert_zero(fd, r->disk, pos, n);
    /* A record is at most UNDO_MAX_RECORD_BYTES, so is any run in it. */
    if (!*buf)
        *buf = xmalloc(UNDO_MAX_RECORD_BYTES);
    rc = io_pread_all(v->fds[r->src], *buf, n,
                      (off_t)(r->data_off + (pos - r->offset)));
    if (rc < 0)
        return vr_err(rc == -ENODATA ? -EBADMSG : rc,
                      "undo: revert: read undo data of disk %u at %" PRIu64
                      ": %s",
                      r->disk, pos, strerror(-rc));
    rc = io_pwrite_all(fd, *buf, n, (off_t)pos);
    if (rc < 0)
        return vr_err(rc, "undo: revert disk %u: write at %" PRIu64 ": %s",
                      r->disk, pos, strerror(-rc));
    return 0;
}

int
undo_view_revert(struct undo_view *v, const int *disk_fds, uint64_t *bytes)
{
    uint8_t *buf = NULL;
    uint64_t done = 0;
    bool first = true;
    int rc = 0;

    if (bytes)
        *bytes = 0;
    /* Each block goes to the disk once, from the record the index names
     * (the span nearest the point): the blocks of a record that a nearer
     * span also holds are skipped, the rest written in runs.  Only blocks
     * the view never reads from the disk change, so the view is the same
     * throughout and a revert cut short can simply be run again. */
    for (size_t i = 0; i < v->recs.n && rc == 0; i++) {
        const struct urec *r = &v->recs.r[i];
        uint64_t end = r->offset + r->len;
        uint64_t pos = r->offset;

        while (pos < end && rc == 0) {
            uint64_t run = pos;

            while (run < end &&
                   u64map_get(&v->index, view_key(run / UNDO_BLOCK, r->disk)) ==
                       i + 1)
                run = run + UNDO_BLOCK < end ? run + UNDO_BLOCK : end;
            if (run == pos) { /* a nearer span's block */
                pos += UNDO_BLOCK;
                continue;
            }
            /* run - pos <= r->len: the last block may be partial (the
             * record ends at the disk's end), and is written exactly. */
            rc = revert_run(v, r, disk_fds, pos, run - pos, &buf);
            if (rc < 0)
                break;
            done += run - pos;
            pos = run;
            if (first) {
                first = false;
                vr_fault_point("undo-revert");
            }
        }
    }
    free(buf);
    if (rc < 0)
        return rc;
    for (unsigned d = 0; d < v->ndisks; d++) {
        if (fdatasync(disk_fds[d]) < 0)
            return vr_err(-errno, "undo: revert: sync disk %u: %s", d,
                          strerror(errno));
    }
    if (bytes)
        *bytes = done;
    return 0;
}

void
undo_view_free(struct undo_view *v)
{
    if (!v)
        return;
    for (size_t i = 0; i < v->nspans; i++)
        close(v->fds[i]);
    free(v->fds);
    free(v->recs.r);
    u64map_free(&v->index);
    free(v);
}
