/* changelog.c: the per-disk change log, format version 2 (docs/formats.md).
 *
 * The data plane appends one record per guest write, write-zeroes or trim
 * to the disk's open segment (DISK.vrlog/CYCLE.open); sealing appends a
 * CL_SEAL record, makes it durable and renames the segment to CYCLE.log,
 * after which it is immutable.  Each record carries a CRC32C over its
 * header and data, a per-disk sequence number and its disk index, so a
 * reader can tell a complete record from a torn or corrupt one; the writer
 * uses the same reader to cut a torn tail after a crash.
 *
 * Sequence numbers: the first record of a disk's first segment has seq 0;
 * every data record takes the next one, and the next segment's first_seq
 * continues where the previous one ended.  The CL_SEAL record carries the
 * seq the next record would take (it does not consume one) and, as offset,
 * the number of data records before it.
 *
 * Every length read from disk is checked against CL_MAX_DATA_BYTES before
 * anything is allocated; the reader uses buffered pread, never mmap, so a
 * segment that shrinks under it cannot raise SIGBUS.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "changelog.h"
#include "crc32c.h"

#define READ_CHUNK_BYTES (256u << 10)

/* --- little-endian helpers --------------------------------------------- */

static void
put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void
put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void
put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t
get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t
get32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t
get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | ((uint64_t)get32(p + 4) << 32);
}

/* --- records ----------------------------------------------------------- */

void
cl_rec_encode(const struct cl_rec *r, uint8_t out[CL_REC_HDR_BYTES])
{
    put32(out + 0, CL_REC_MAGIC);
    out[4] = r->kind;
    out[5] = r->flags;
    put16(out + 6, r->disk);
    put32(out + 8, r->len);
    put32(out + 12, 0);
    put64(out + 16, r->offset);
    put64(out + 24, r->seq);
    out[5] = r->flags & ~CL_F_PENDING;
    uint32_t crc = crc32c(0, out, CL_REC_HDR_BYTES);
    if (r->kind == CL_WRITE && r->len > 0)
        crc = crc32c(crc, r->data, r->len);
    put32(out + 12, r->flags & CL_F_PENDING ? ~crc : crc);
}

/* Validate the fixed fields of a record header (no CRC); returns the number
 * of data bytes that follow it, or -EBADMSG. */
static int64_t
rec_hdr_check(const uint8_t *p)
{
    uint32_t magic = get32(p);
    uint8_t kind = p[4], flags = p[5];
    uint32_t len = get32(p + 8);
    uint64_t offset = get64(p + 16);

    if (magic != CL_REC_MAGIC)
        return vr_err(-EBADMSG, "change log record: bad magic 0x%08" PRIx32,
                      magic);
    if (kind < CL_WRITE || kind > CL_WREF)
        return vr_err(-EBADMSG, "change log record: unknown kind %u", kind);
    if (flags & ~CL_F_FUA)
        return vr_err(-EBADMSG, "change log record: unknown flags 0x%02x",
                      flags);
    if ((kind == CL_WRITE || kind == CL_WREF) &&
        (len == 0 || len > CL_MAX_DATA_BYTES))
        return vr_err(-EBADMSG, "change log record: write length %" PRIu32
                      " out of range", len);
    if (kind == CL_SEAL && (len != 0 || flags != 0))
        return vr_err(-EBADMSG, "change log record: malformed seal record");
    if (kind != CL_SEAL && offset > (uint64_t)INT64_MAX - len)
        return vr_err(-EBADMSG, "change log record: offset %" PRIu64
                      " + length %" PRIu32 " overflows", offset, len);
    return kind == CL_WRITE ? (int64_t)len : 0;
}

/* cl_rec_decode; with allow_pending, a record whose CRC field is the NOT
 * of its CRC is returned with CL_F_PENDING. */
static int
rec_decode(const void *buf, size_t avail, struct cl_rec *r,
           size_t *used_bytes, bool allow_pending)
{
    const uint8_t *p = buf;
    uint8_t hdr[CL_REC_HDR_BYTES];

    if (avail < CL_REC_HDR_BYTES)
        return -EAGAIN;
    int64_t data_len = rec_hdr_check(p);
    if (data_len < 0)
        return (int)data_len;
    if (avail - CL_REC_HDR_BYTES < (uint64_t)data_len)
        return -EAGAIN;

    memcpy(hdr, p, CL_REC_HDR_BYTES);
    put32(hdr + 12, 0);
    uint32_t crc = crc32c(0, hdr, CL_REC_HDR_BYTES);
    if (data_len > 0)
        crc = crc32c(crc, p + CL_REC_HDR_BYTES, (size_t)data_len);
    uint32_t want = get32(p + 12);
    bool pending = allow_pending && crc == ~want;
    if (crc != want && !pending)
        return vr_err(-EBADMSG, "change log record: crc32c 0x%08" PRIx32
                      ", expected 0x%08" PRIx32, crc, want);

    r->kind = p[4];
    r->flags = p[5] | (pending ? CL_F_PENDING : 0);
    r->disk = get16(p + 6);
    r->len = get32(p + 8);
    r->offset = get64(p + 16);
    r->seq = get64(p + 24);
    r->data = data_len > 0 ? p + CL_REC_HDR_BYTES : NULL;
    *used_bytes = CL_REC_HDR_BYTES + (size_t)data_len;
    return 0;
}

int
cl_rec_decode(const void *buf, size_t avail, struct cl_rec *r,
              size_t *used_bytes)
{
    return rec_decode(buf, avail, r, used_bytes, false);
}

/* --- segment header ---------------------------------------------------- */

void
cl_seg_hdr_encode(const struct cl_seg_hdr *h, uint8_t out[CL_SEG_HDR_BYTES])
{
    memset(out, 0, CL_SEG_HDR_BYTES);
    memcpy(out, CL_SEG_MAGIC, 8);
    put32(out + 8, h->version);
    put32(out + 12, CL_SEG_HDR_BYTES);
    put16(out + 16, h->disk);
    put64(out + 24, h->cycle);
    put64(out + 32, h->first_seq);
    put64(out + 40, h->created_ms);
    put32(out + 60, crc32c(0, out, 60));
}

int
cl_seg_hdr_decode(const void *buf, struct cl_seg_hdr *h)
{
    const uint8_t *p = buf;

    if (memcmp(p, CL_SEG_MAGIC, 8) != 0)
        return vr_err(-EBADMSG, "change log segment: bad magic");
    uint32_t version = get32(p + 8);
    if (version > CL_FORMAT_VERSION)
        return vr_err(-EPROTONOSUPPORT,
                      "change log segment: format version %" PRIu32
                      " is newer than %d", version, CL_FORMAT_VERSION);
    uint32_t crc = crc32c(0, p, 60);
    if (crc != get32(p + 60))
        return vr_err(-EBADMSG, "change log segment: header crc32c mismatch");
    if (version == 0 || get32(p + 12) != CL_SEG_HDR_BYTES)
        return vr_err(-EBADMSG, "change log segment: bad version or size");
    h->version = version;
    h->disk = get16(p + 16);
    h->cycle = get64(p + 24);
    h->first_seq = get64(p + 32);
    h->created_ms = get64(p + 40);
    return 0;
}

void
cl_seg_name(uint64_t cycle, bool sealed, char out[32])
{
    snprintf(out, 32, "%020" PRIu64 "%s", cycle, sealed ? ".log" : ".open");
}

void
cl_pre_name(uint64_t cycle, char out[32])
{
    snprintf(out, 32, "%020" PRIu64 ".pre", cycle);
}

/* --- reader ------------------------------------------------------------ */

struct cl_reader {
    int fd;
    bool own_fd;
    bool sealed;        /* a .log segment: must end with CL_SEAL */
    bool pending_ok;    /* reopening: pending records are returned */
    int state;          /* 0 reading, 1 clean end, <0 sticky error */
    struct cl_seg_hdr hdr;
    uint8_t *buf;
    size_t cap, start, end;
    uint64_t buf_off;   /* file offset of buf[0] */
    uint64_t next_seq;
    uint64_t records;
    char name[32];
};

/* Make at least need bytes available from buf[start]; returns how many are
 * available (less than need only at end of file) or -errno.  need is
 * bounded by the caller (a validated record header). */
static ssize_t
reader_fill(struct cl_reader *r, size_t need)
{
    if (r->end - r->start >= need)
        return (ssize_t)(r->end - r->start);
    if (r->start > 0) {
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->buf_off += r->start;
        r->end -= r->start;
        r->start = 0;
    }
    if (need > r->cap) {
        size_t cap = need < READ_CHUNK_BYTES ? READ_CHUNK_BYTES : need;
        r->buf = xrealloc(r->buf, cap);
        r->cap = cap;
    }
    while (r->end < need) {
        ssize_t n = pread(r->fd, r->buf + r->end, r->cap - r->end,
                          (off_t)(r->buf_off + r->end));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return vr_err(-errno, "read change log %s: %s", r->name,
                          strerror(errno));
        }
        if (n == 0)
            break;
        r->end += (size_t)n;
    }
    return (ssize_t)(r->end - r->start);
}

/* Prefix the message vr_err already holds (it cannot format its own slot). */
static int
wrap_err(int rc, const char *what, uint64_t at)
{
    char msg[512];
    snprintf(msg, sizeof msg, "%s", vr_errmsg());
    return vr_err(rc, "change log %s at %" PRIu64 ": %s", what, at, msg);
}

static int
reader_fail(struct cl_reader *r, int rc)
{
    r->state = rc;
    return rc;
}

/* Like cl_reader_next, but returns 2 (with *rec) for the CL_SEAL record. */
static int
reader_next(struct cl_reader *r, struct cl_rec *rec)
{
    if (r->state != 0)
        return r->state > 0 ? 0 : r->state;

    ssize_t avail = reader_fill(r, CL_REC_HDR_BYTES);
    if (avail < 0)
        return reader_fail(r, (int)avail);
    if (avail == 0) {
        if (r->sealed)
            return reader_fail(r, vr_err(-EBADMSG, "change log %s: ends "
                                         "before its seal record", r->name));
        r->state = 1;
        return 0;
    }
    /* An open segment's writer preallocates: a record header that is all
     * zeroes is space not yet written, the end of the records. */
    if (!r->sealed && avail >= CL_REC_HDR_BYTES) {
        static const uint8_t zero_hdr[CL_REC_HDR_BYTES];
        if (memcmp(r->buf + r->start, zero_hdr, CL_REC_HDR_BYTES) == 0) {
            r->state = 1;
            return 0;
        }
    }
    if (avail < CL_REC_HDR_BYTES)
        return reader_fail(r, vr_err(-EBADMSG, "change log %s: torn record "
                                     "header at %" PRIu64, r->name,
                                     r->buf_off + r->start));
    size_t used;
    int rc = rec_decode(r->buf + r->start, (size_t)avail, rec, &used,
                        r->pending_ok);
    if (rc == -EAGAIN) {
        /* The header is valid, so its length is bounded. */
        size_t need = CL_REC_HDR_BYTES + get32(r->buf + r->start + 8);
        avail = reader_fill(r, need);
        if (avail < 0)
            return reader_fail(r, (int)avail);
        if ((size_t)avail < need)
            return reader_fail(r, vr_err(-EBADMSG, "change log %s: torn "
                                         "record at %" PRIu64, r->name,
                                         r->buf_off + r->start));
        rc = rec_decode(r->buf + r->start, (size_t)avail, rec, &used,
                        r->pending_ok);
    }
    if (rc < 0)
        return reader_fail(r, wrap_err(rc, r->name, r->buf_off + r->start));
    if (rec->disk != r->hdr.disk || rec->seq != r->next_seq)
        return reader_fail(r, vr_err(-EBADMSG, "change log %s at %" PRIu64
                                     ": disk %u seq %" PRIu64 ", expected "
                                     "disk %u seq %" PRIu64, r->name,
                                     r->buf_off + r->start, rec->disk,
                                     rec->seq, r->hdr.disk, r->next_seq));
    if (rec->kind == CL_SEAL) {
        if (rec->offset != r->records)
            return reader_fail(r, vr_err(-EBADMSG, "change log %s: seal "
                                         "counts %" PRIu64 " records, found %"
                                         PRIu64, r->name, rec->offset,
                                         r->records));
        r->start += used;
        if (r->sealed) {
            avail = reader_fill(r, 1);
            if (avail < 0)
                return reader_fail(r, (int)avail);
            if (avail > 0)
                return reader_fail(r, vr_err(-EBADMSG, "change log %s: data "
                                             "after the seal record",
                                             r->name));
        }
        r->state = 1;
        return 2;
    }
    r->start += used;
    r->records++;
    r->next_seq++;
    return 1;
}

static int
reader_new_fd(int fd, bool own_fd, bool sealed, const char *name,
              struct cl_reader **out)
{
    uint8_t hdr[CL_SEG_HDR_BYTES];
    struct cl_seg_hdr h;
    int rc = io_pread_all(fd, hdr, sizeof hdr, 0);
    if (rc == -ENODATA)
        return vr_err(-EBADMSG, "change log %s: truncated segment header",
                      name);
    if (rc < 0)
        return vr_err(rc, "read change log %s: %s", name, strerror(-rc));
    rc = cl_seg_hdr_decode(hdr, &h);
    if (rc < 0)
        return wrap_err(rc, name, 0);

    struct cl_reader *r = xcalloc(1, sizeof *r);
    r->fd = fd;
    r->own_fd = own_fd;
    r->sealed = sealed;
    r->hdr = h;
    r->buf_off = CL_SEG_HDR_BYTES;
    r->next_seq = h.first_seq;
    snprintf(r->name, sizeof r->name, "%s", name);
    *out = r;
    return 0;
}

int
cl_reader_open(int dirfd, const char *name, struct cl_reader **out)
{
    size_t n = strlen(name);
    bool sealed = n > 4 && strcmp(name + n - 4, ".log") == 0;
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "open change log %s: %s", name,
                      strerror(errno));
    int rc = reader_new_fd(fd, true, sealed, name, out);
    if (rc < 0)
        close(fd);
    return rc;
}

const struct cl_seg_hdr *
cl_reader_hdr(const struct cl_reader *r)
{
    return &r->hdr;
}

int
cl_reader_next(struct cl_reader *r, struct cl_rec *rec)
{
    int rc = reader_next(r, rec);
    return rc == 2 ? 0 : rc;
}

void
cl_reader_free(struct cl_reader *r)
{
    if (!r)
        return;
    if (r->own_fd)
        close(r->fd);
    free(r->buf);
    free(r);
}

/* --- writer ------------------------------------------------------------ */

/* With cl_writer_use_mmap(CL_MMAP_ALL), records are copied into a shared
 * mapping of the segment rather than written with pwritev: no system call
 * and no inode lock per record.  For records with data that wins on tmpfs
 * but loses badly on ext4, where every first store to a clean shared page
 * faults into the file system (docs/benchmarks.md); for 32-byte records
 * without data (CL_MMAP_NODATA: WREF, ZERO, TRIM) one fault serves 128
 * records and it wins everywhere.  Preserve files are never mapped.
 * The file is mapped in fixed chunks that never move, so a writer copying
 * into one chunk is never disturbed by another thread mapping the next;
 * each chunk is fallocated before it is mapped, so a full file system is an
 * error at reservation (ENOSPC), never a SIGBUS while copying.  The mapping
 * and the file share the page cache: fdatasync makes mapped records
 * durable, and readers use plain reads. */
#define MAP_CHUNK_BYTES (2u << 20)
#define MAP_MAX_CHUNKS  16384 /* 32 GiB per segment, then pwritev */

struct cl_writer {
    int dirfd; /* our own dup */
    int fd;
    uint16_t disk;
    uint64_t cycle;
    uint64_t next_seq;
    uint64_t bytes;
    uint64_t records;
    bool finished; /* sealed */
    bool cut;      /* CL_SEAL appended, not yet renamed */
    bool pre;      /* a preserve file: never sealed */
    uint64_t payload; /* cl_rec_payload of the records */
    uint8_t **chunks;   /* MAP_MAX_CHUNKS slots, mapped prefix */
    unsigned nchunks;   /* chunks mapped: file [0, nchunks * CHUNK) */
    bool map_failed;    /* fall back to pwritev for good */
};

static int use_mmap = CL_MMAP_OFF;
static bool seal_syncs = true;

void
cl_writer_seal_syncs(bool on)
{
    seal_syncs = on;
}

void
cl_writer_use_mmap(int mode)
{
    use_mmap = mode;
}

/* Map chunks until [0, end) is covered (caller serialises, as for
 * reservations).  On failure the writer falls back to pwritev. */
static int
map_cover(struct cl_writer *w, uint64_t end)
{
    if (use_mmap == CL_MMAP_OFF || w->pre)
        return 0;
    while (!w->map_failed && (uint64_t)w->nchunks * MAP_CHUNK_BYTES < end) {
        if (w->nchunks == MAP_MAX_CHUNKS) {
            w->map_failed = true;
            break;
        }
        if (!w->chunks)
            w->chunks = xcalloc(MAP_MAX_CHUNKS, sizeof *w->chunks);
        off_t off = (off_t)w->nchunks * MAP_CHUNK_BYTES;
        if (fallocate(w->fd, 0, off, MAP_CHUNK_BYTES) < 0) {
            if (errno == ENOSPC || errno == EDQUOT)
                return vr_err(-errno, "change log cycle %" PRIu64
                              ": extend: %s", w->cycle, strerror(errno));
            w->map_failed = true; /* e.g. EOPNOTSUPP */
            break;
        }
        void *p = mmap(NULL, MAP_CHUNK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_POPULATE, w->fd, off);
        if (p == MAP_FAILED) {
            w->map_failed = true;
            break;
        }
        w->chunks[w->nchunks] = p;
        /* Publish the chunk before the count that lets writers use it. */
        __atomic_store_n(&w->nchunks, w->nchunks + 1, __ATOMIC_RELEASE);
    }
    return 0;
}

static void
map_drop(struct cl_writer *w)
{
    for (unsigned i = 0; i < w->nchunks; i++)
        munmap(w->chunks[i], MAP_CHUNK_BYTES);
    w->nchunks = 0;
    free(w->chunks);
    w->chunks = NULL;
}

/* Copy len bytes to file offset off through the mapping. */
static void
map_copy(struct cl_writer *w, uint64_t off, const void *src, size_t len)
{
    const uint8_t *p = src;
    while (len > 0) {
        uint64_t c = off / MAP_CHUNK_BYTES, in = off % MAP_CHUNK_BYTES;
        size_t n = MAP_CHUNK_BYTES - in < len ? MAP_CHUNK_BYTES - in : len;
        memcpy(w->chunks[c] + in, p, n);
        p += n;
        off += n;
        len -= n;
    }
}

static int
pwritev_all(int fd, struct iovec *iov, int iovcnt, off_t off)
{
    while (iovcnt > 0) {
        ssize_t n = pwritev(fd, iov, iovcnt, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        off += n;
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

static struct cl_writer *
writer_new(int dirfd, int fd, uint16_t disk, uint64_t cycle)
{
    int dfd = fcntl(dirfd, F_DUPFD_CLOEXEC, 3);
    if (dfd < 0)
        return NULL;
    struct cl_writer *w = xcalloc(1, sizeof *w);
    w->dirfd = dfd;
    w->fd = fd;
    w->disk = disk;
    w->cycle = cycle;
    return w;
}

/* Reuse the segment file the shipper left as CL_SPARE_NAME: writing over
 * pages a file already has is about twice as fast as appending new ones
 * (tmpfs and ext4 alike).  The new header goes in before the rename, so a
 * crash never leaves an .open segment with an old header; older records
 * after the tail are never read, since sequence numbers must continue.
 * Returns the open fd, or -1 to create a fresh file instead. */
static int
reuse_spare(int dirfd, const char *name, const uint8_t *hdr)
{
    int fd = openat(dirfd, CL_SPARE_NAME, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        io_pwrite_all(fd, hdr, CL_SEG_HDR_BYTES, 0) < 0 ||
        (seal_syncs && fdatasync(fd) < 0) ||
        renameat2(dirfd, CL_SPARE_NAME, dirfd, name, RENAME_NOREPLACE) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Create name in dirfd with header h (O_EXCL, or from the spare), header
 * and directory durable. */
static int
writer_create_name(int dirfd, const char *name, const struct cl_seg_hdr *h,
                   bool try_spare, const char *what, struct cl_writer **out)
{
    uint8_t hdr[CL_SEG_HDR_BYTES];
    int rc = 0;

    cl_seg_hdr_encode(h, hdr);
    int fd = try_spare ? reuse_spare(dirfd, name, hdr) : -1;
    if (fd < 0) {
        fd = openat(dirfd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0)
            return vr_err(-errno, "create %s %s: %s", what, name,
                          strerror(errno));
        rc = io_pwrite_all(fd, hdr, sizeof hdr, 0);
        if (rc == 0 && seal_syncs && fdatasync(fd) < 0)
            rc = -errno;
    }
    if (rc == 0 && seal_syncs)
        rc = io_fsync_dirfd(dirfd);
    struct cl_writer *w = NULL;
    if (rc == 0 && !(w = writer_new(dirfd, fd, h->disk, h->cycle)))
        rc = -errno;
    if (rc < 0) {
        close(fd);
        unlinkat(dirfd, name, 0);
        return vr_err(rc, "create %s %s: %s", what, name, strerror(-rc));
    }
    w->next_seq = h->first_seq;
    w->bytes = CL_SEG_HDR_BYTES;
    *out = w;
    return 0;
}

int
cl_writer_create(int dirfd, uint16_t disk, uint64_t cycle, uint64_t first_seq,
                 struct cl_writer **out)
{
    char name[32];
    struct cl_seg_hdr h = {
        .version = CL_FORMAT_VERSION,
        .disk = disk,
        .cycle = cycle,
        .first_seq = first_seq,
        .created_ms = vr_wall_ms(),
    };

    /* A sealed segment of this cycle must never get a second life. */
    cl_seg_name(cycle, true, name);
    if (faccessat(dirfd, name, F_OK, 0) == 0)
        return vr_err(-EEXIST, "create change log: %s already exists", name);
    cl_seg_name(cycle, false, name);
    return writer_create_name(dirfd, name, &h, true, "change log", out);
}

/* Write the true CRC of pending record rec at file offset off of fd. */
static int
settle_fd(int fd, const struct cl_rec *rec, uint64_t off)
{
    uint8_t hdr[CL_REC_HDR_BYTES];
    struct cl_rec done = *rec;
    done.flags &= ~CL_F_PENDING;
    cl_rec_encode(&done, hdr);
    return io_pwrite_all(fd, hdr + 12, 4, (off_t)(off + 12));
}

static int
writer_reopen_name(int dirfd, const char *name, uint16_t disk, uint64_t cycle,
                   cl_redo_fn redo, void *opaque, struct cl_writer **out,
                   uint64_t *cut_bytes)
{
    struct cl_reader *r = NULL;
    struct cl_rec rec;
    struct stat st;
    int rc;

    int fd = openat(dirfd, name, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return vr_err(-errno, "open change log %s: %s", name,
                      strerror(errno));
    rc = reader_new_fd(fd, false, false, name, &r);
    if (rc < 0)
        goto out;
    if (r->hdr.disk != disk || r->hdr.cycle != cycle) {
        rc = vr_err(-EBADMSG, "change log %s: header says disk %u cycle %"
                    PRIu64, name, r->hdr.disk, r->hdr.cycle);
        goto out;
    }
    /* Keep every complete, valid record; a CL_SEAL left by a seal that did
     * not finish its rename is cut too: the segment is still open.  A
     * pending record is redone and settled (CL_F_PENDING). */
    uint64_t good_end = CL_SEG_HDR_BYTES, payload = 0;
    r->pending_ok = true;
    while ((rc = reader_next(r, &rec)) == 1) {
        if (rec.flags & CL_F_PENDING) {
            if (!redo) {
                rc = vr_err(-EBADMSG, "change log %s: pending record seq %"
                            PRIu64, name, rec.seq);
                goto out;
            }
            rc = redo(opaque, &rec);
            if (rc == 0 && (rc = settle_fd(fd, &rec, good_end)) < 0)
                vr_err(rc, "settle change log %s at %" PRIu64 ": %s", name,
                       good_end, strerror(-rc));
            if (rc < 0)
                goto out;
        }
        good_end = r->buf_off + r->start;
        payload += cl_rec_payload(&rec);
    }
    if (rc < 0 && rc != -EBADMSG)
        goto out;
    if (fstat(fd, &st) < 0) {
        rc = vr_err(-errno, "stat change log %s: %s", name, strerror(errno));
        goto out;
    }
    uint64_t cut = (uint64_t)st.st_size > good_end
                       ? (uint64_t)st.st_size - good_end : 0;
    if (cut > 0) {
        if (ftruncate(fd, (off_t)good_end) < 0 || fdatasync(fd) < 0) {
            rc = vr_err(-errno, "cut change log %s: %s", name,
                        strerror(errno));
            goto out;
        }
    }
    struct cl_writer *w = writer_new(dirfd, fd, disk, cycle);
    if (!w) {
        rc = vr_err(-errno, "reopen change log %s: %s", name,
                    strerror(errno));
        goto out;
    }
    w->next_seq = r->next_seq;
    w->records = r->records;
    w->payload = payload;
    w->bytes = good_end;
    fd = -1;
    *out = w;
    if (cut_bytes)
        *cut_bytes = cut;
    rc = 0;
out:
    cl_reader_free(r);
    if (fd >= 0)
        close(fd);
    return rc;
}

int
cl_writer_reopen(int dirfd, uint16_t disk, uint64_t cycle,
                 struct cl_writer **out, uint64_t *cut_bytes)
{
    return cl_writer_reopen_redo(dirfd, disk, cycle, NULL, NULL, out,
                                 cut_bytes);
}

int
cl_writer_reopen_redo(int dirfd, uint16_t disk, uint64_t cycle,
                      cl_redo_fn redo, void *opaque, struct cl_writer **out,
                      uint64_t *cut_bytes)
{
    char name[32];
    cl_seg_name(cycle, false, name);
    return writer_reopen_name(dirfd, name, disk, cycle, redo, opaque, out,
                              cut_bytes);
}

int
cl_writer_open_pre(int dirfd, uint16_t disk, uint64_t cycle,
                   struct cl_writer **out)
{
    char name[32];
    struct cl_seg_hdr h = {
        .version = CL_FORMAT_VERSION,
        .disk = disk,
        .cycle = cycle,
        .first_seq = 0,
        .created_ms = vr_wall_ms(),
    };
    struct cl_writer *w = NULL;
    struct stat st;
    int rc;

    cl_pre_name(cycle, name);
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        st.st_size < CL_SEG_HDR_BYTES) {
        /* A crash while creating it: no record can be in it yet. */
        if (unlinkat(dirfd, name, 0) < 0)
            return vr_err(-errno, "remove torn preserve file %s: %s", name,
                          strerror(errno));
    }
    if (faccessat(dirfd, name, F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
        uint64_t cut = 0;
        rc = writer_reopen_name(dirfd, name, disk, cycle, NULL, NULL, &w,
                                &cut);
    } else {
        rc = writer_create_name(dirfd, name, &h, false, "preserve file", &w);
    }
    if (rc < 0)
        return rc;
    w->pre = true;
    *out = w;
    return 0;
}

/* Append rec at the end (the seal record; callers hold the writer alone). */
static int
writer_put(struct cl_writer *w, const struct cl_rec *rec)
{
    int rc = cl_writer_write(w, rec, w->bytes);
    if (rc < 0) {
        /* Leave no partial record behind if we can help it. */
        if (ftruncate(w->fd, (off_t)w->bytes) < 0) {
            /* reopen will cut it after a restart */
        }
        return rc;
    }
    w->bytes += CL_REC_HDR_BYTES + (rec->kind == CL_WRITE ? rec->len : 0);
    return 0;
}

int
cl_writer_reserve(struct cl_writer *w, uint8_t kind, uint8_t flags,
                  uint64_t offset, uint32_t len, const void *data,
                  struct cl_rec *rec, uint64_t *file_off)
{
    if (w->finished || w->cut)
        return vr_err(-EINVAL, "change log cycle %" PRIu64 ": already sealed",
                      w->cycle);
    if ((kind < CL_WRITE || kind > CL_WREF || kind == CL_SEAL) ||
        (flags & ~CL_F_FUA) ||
        (kind == CL_WRITE &&
         (len == 0 || len > CL_MAX_DATA_BYTES || !data)) ||
        (kind == CL_WREF && (len == 0 || len > CL_MAX_DATA_BYTES)) ||
        (w->pre && kind != CL_WRITE) ||
        offset > (uint64_t)INT64_MAX - len)
        return vr_err(-EINVAL, "change log append: invalid record (kind %u "
                      "offset %" PRIu64 " len %" PRIu32 ")", kind, offset,
                      len);
    *rec = (struct cl_rec){
        .kind = kind,
        .flags = flags,
        .disk = w->disk,
        .len = len,
        .offset = offset,
        .seq = w->next_seq,
        .data = data,
    };
    uint64_t end = w->bytes + CL_REC_HDR_BYTES + (kind == CL_WRITE ? len : 0);
    int rc = map_cover(w, end);
    if (rc < 0)
        return rc;
    *file_off = w->bytes;
    w->bytes = end;
    w->next_seq++;
    w->records++;
    w->payload += cl_rec_payload(rec);
    return 0;
}

int
cl_writer_write(struct cl_writer *w, const struct cl_rec *rec,
                uint64_t file_off)
{
    uint8_t hdr[CL_REC_HDR_BYTES];
    struct iovec iov[2];
    int n = 1;

    cl_rec_encode(rec, hdr);
    uint64_t end = file_off + CL_REC_HDR_BYTES +
                   (rec->kind == CL_WRITE ? rec->len : 0);
    /* Reserved records below the mapped end are copied; nchunks only grows
     * while reservations are serialised, and a reserved record is covered
     * before its reservation returns. */
    if ((rec->kind != CL_WRITE || use_mmap == CL_MMAP_ALL) &&
        end <= (uint64_t)__atomic_load_n(&w->nchunks, __ATOMIC_ACQUIRE) *
                   MAP_CHUNK_BYTES) {
        if (rec->kind == CL_WRITE)
            map_copy(w, file_off + CL_REC_HDR_BYTES, rec->data, rec->len);
        /* The header last: a torn record is cut at recovery either way,
         * but this keeps a half-copied one from ever looking whole. */
        map_copy(w, file_off, hdr, sizeof hdr);
        return 0;
    }
    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof hdr;
    if (rec->kind == CL_WRITE) {
        iov[1].iov_base = (void *)(uintptr_t)rec->data;
        iov[1].iov_len = rec->len;
        n = 2;
    }
    int rc = pwritev_all(w->fd, iov, n, (off_t)file_off);
    if (rc < 0)
        return vr_err(rc, "append to change log cycle %" PRIu64 ": %s",
                      w->cycle, strerror(-rc));
    return 0;
}

int
cl_writer_settle(struct cl_writer *w, const struct cl_rec *rec,
                 uint64_t file_off)
{
    uint8_t hdr[CL_REC_HDR_BYTES];
    struct cl_rec done = *rec;
    done.flags &= ~CL_F_PENDING;
    cl_rec_encode(&done, hdr);
    /* Through the mapping where it covers the field (one 4-byte store),
     * else one pwrite: the page cache is shared either way. */
    if (file_off + 16 <= (uint64_t)__atomic_load_n(&w->nchunks,
                                                    __ATOMIC_ACQUIRE) *
                             MAP_CHUNK_BYTES) {
        uint64_t c = (file_off + 12) / MAP_CHUNK_BYTES;
        uint64_t in = (file_off + 12) % MAP_CHUNK_BYTES;
        if (in + 4 <= MAP_CHUNK_BYTES) {
            /* A constant 4-byte copy is one (possibly unaligned) store
             * instruction: a crash sees the old or the new CRC. */
            memcpy(w->chunks[c] + in, hdr + 12, 4);
            return 0;
        }
    }
    int rc = io_pwrite_all(w->fd, hdr + 12, 4, (off_t)(file_off + 12));
    if (rc < 0)
        return vr_err(rc, "settle change log cycle %" PRIu64 ": %s",
                      w->cycle, strerror(-rc));
    return 0;
}

int
cl_writer_append(struct cl_writer *w, uint8_t kind, uint8_t flags,
                 uint64_t offset, uint32_t len, const void *data)
{
    struct cl_rec rec;
    uint64_t off;
    int rc = cl_writer_reserve(w, kind, flags, offset, len, data, &rec, &off);
    if (rc < 0)
        return rc;
    rc = cl_writer_write(w, &rec, off);
    if (rc < 0) {
        /* Serial use: leave no partial record behind if we can help it
         * (reopen would cut it after a restart anyway). */
        if (ftruncate(w->fd, (off_t)off) == 0) {
            w->bytes = off;
            w->next_seq--;
            w->records--;
        }
    }
    return rc;
}

int
cl_writer_sync(struct cl_writer *w)
{
    if (fdatasync(w->fd) < 0)
        return vr_err(-errno, "sync change log cycle %" PRIu64 ": %s",
                      w->cycle, strerror(errno));
    return 0;
}

int
cl_writer_seal_cut(struct cl_writer *w)
{
    char name[32];
    uint64_t before = w->bytes;
    struct cl_rec rec = {
        .kind = CL_SEAL,
        .disk = w->disk,
        .offset = w->records,
        .seq = w->next_seq,
    };

    if (w->finished || w->cut || w->pre)
        return vr_err(-EINVAL, "change log cycle %" PRIu64 ": already sealed",
                      w->cycle);
    cl_seg_name(w->cycle, false, name);
    int rc = writer_put(w, &rec);
    /* A reused spare or a fallocated chunk holds bytes past the seal: drop
     * them so the sealed file is exactly the segment. */
    if (rc == 0)
        map_drop(w);
    if (rc == 0 && ftruncate(w->fd, (off_t)w->bytes) < 0)
        rc = -errno;
    /* Durable before anything can depend on it: the caller creates the
     * next segment next, and a next segment that survives a power loss
     * must find this one whole, seal included (unless the caller does not
     * trust a log across a power loss at all: cl_writer_seal_syncs). */
    if (rc == 0 && seal_syncs && fdatasync(w->fd) < 0)
        rc = -errno;
    if (rc < 0) {
        /* Still open: take the seal record back so appends may go on. */
        if (ftruncate(w->fd, (off_t)before) == 0)
            w->bytes = before;
        return vr_err(rc, "seal change log %s: %s", name, strerror(-rc));
    }
    w->cut = true;
    return 0;
}

int
cl_writer_seal_commit(struct cl_writer *w)
{
    char from[32], to[32];

    if (!w->cut || w->finished)
        return vr_err(-EINVAL, "change log cycle %" PRIu64 ": not cut",
                      w->cycle);
    cl_seg_name(w->cycle, false, from);
    cl_seg_name(w->cycle, true, to);
    if (fdatasync(w->fd) < 0 || renameat(w->dirfd, from, w->dirfd, to) < 0)
        return vr_err(-errno, "seal change log %s: %s", from,
                      strerror(errno));
    w->finished = true;
    int rc = io_fsync_dirfd(w->dirfd);
    if (rc < 0)
        return vr_err(rc, "seal change log %s: fsync directory: %s", to,
                      strerror(-rc));
    return 0;
}

int
cl_writer_seal(struct cl_writer *w)
{
    int rc = cl_writer_seal_cut(w);
    if (rc == 0) {
        rc = cl_writer_seal_commit(w);
        if (rc < 0 && !w->finished) {
            /* Still open: take the seal record back so appends may go on. */
            uint64_t before = w->bytes - CL_REC_HDR_BYTES;
            if (ftruncate(w->fd, (off_t)before) == 0) {
                w->bytes = before;
                w->cut = false;
            }
        }
    }
    return rc;
}

uint64_t
cl_writer_cycle(const struct cl_writer *w)
{
    return w->cycle;
}

uint64_t
cl_writer_next_seq(const struct cl_writer *w)
{
    return w->next_seq;
}

uint64_t
cl_writer_bytes(const struct cl_writer *w)
{
    return w->bytes;
}

uint64_t
cl_writer_records(const struct cl_writer *w)
{
    return w->records;
}

uint64_t
cl_writer_payload(const struct cl_writer *w)
{
    return w->payload;
}

uint64_t
cl_rec_payload(const struct cl_rec *r)
{
    if (r->kind == CL_SEAL)
        return 0;
    return CL_REC_HDR_BYTES +
           (r->kind == CL_WRITE || r->kind == CL_WREF ? r->len : 0);
}

int
cl_segment_payload(int dirfd, const char *name, uint64_t *out)
{
    /* Headers only, data skipped: an estimate, not a validation.  Read in
     * chunks: a segment of writes logged by reference is all headers. */
    enum { CHUNK = 64 << 10 };
    uint8_t *buf = xmalloc(CHUNK);
    uint64_t pos = CL_SEG_HDR_BYTES, sum = 0, buf_off = 0;
    size_t have = 0;
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        free(buf);
        return vr_err(-errno, "open change log %s: %s", name,
                      strerror(errno));
    }
    for (;;) {
        if (pos < buf_off || pos + CL_REC_HDR_BYTES > buf_off + have) {
            ssize_t n = pread(fd, buf, CHUNK, (off_t)pos);
            if (n < CL_REC_HDR_BYTES)
                break;
            buf_off = pos;
            have = (size_t)n;
        }
        const uint8_t *h = buf + (pos - buf_off);
        if (rec_hdr_check(h) < 0 || h[4] == CL_SEAL)
            break;
        struct cl_rec r = { .kind = h[4], .len = get32(h + 8) };
        sum += cl_rec_payload(&r);
        pos += CL_REC_HDR_BYTES + (r.kind == CL_WRITE ? r.len : 0);
    }
    vr_err_clear();
    close(fd);
    free(buf);
    *out = sum;
    return 0;
}

void
cl_writer_free(struct cl_writer *w)
{
    if (!w)
        return;
    /* An open segment made from a spare may be longer than its records:
     * leave it exactly its size, so its length on disk says what is
     * pending while no writer has it open. */
    map_drop(w);
    if (!w->finished && ftruncate(w->fd, (off_t)w->bytes) < 0) {
        /* reopen cuts the tail after a restart anyway */
    }
    close(w->fd);
    close(w->dirfd);
    free(w);
}
