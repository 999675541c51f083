/* cycle.c: the cycle payload (cycle.h): built on the primary from the sealed
 * change-log segments of a VM's disks, streamed to the Replica server, where
 * it is validated as it arrives, staged uncompressed and later applied to the
 * replica disks.
 *
 * Every stage is streaming with bounded memory.  The builder pushes records
 * through a zstd stream (or a plain write buffer) straight to its fd.  The
 * decoder decompresses into a small window and reassembles records in a
 * buffer that never holds more than one record (CL_REC_HDR_BYTES +
 * CL_MAX_DATA_BYTES) plus the bytes of the current input chunk, validating
 * each with cl_rec_decode as soon as it is complete.  The uncompressed bytes
 * are written to the staging fd as they come out of the decompressor, so a
 * record may reach the staging file before it has been validated: the
 * staged payload counts only once cyc_decoder_finish has returned 0, and the
 * caller must discard the file on any error.  Apply reads the staged file
 * sequentially through the same reassembly buffer, checks every record
 * again (a staged file is trusted no more than the network) and applies it
 * in place; applying is idempotent, so a crash mid-apply is repaired by
 * applying the whole payload again.  cyc_payload_foreach is the same
 * checked sequential read for other readers of staged payloads (undo files,
 * undo.c).
 */
#include "config.h"

#include "cycle.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#include "crc32c.h"
#include "u64map.h"

#define CYC_KNOWN_FLAGS         (CYC_F_BASE | CYC_F_UNDO | CYC_F_APP | CYC_F_CUT)
/* Plain (uncompressed) builder write buffer and apply read size. */
#define CYC_IO_BYTES            (256u << 10)
/* Largest unit the reassembly buffer must hold. */
#define CYC_REC_MAX             ((size_t)CL_REC_HDR_BYTES + CL_MAX_DATA_BYTES)
/* The decoder refuses zstd frames whose window is over 16 MiB, so a hostile
 * frame header cannot make it allocate more; levels up to 19 stay within
 * 8 MiB windows, so the builder allows no higher level. */
#define CYC_ZSTD_WINDOW_LOG_MAX 24
#define CYC_ZSTD_LEVEL_MAX      19
/* Reassembly buffers start small and double up to what a record needs. */
#define CYC_RBUF_INITIAL        (256u << 10)

/* --- UUID and header ------------------------------------------------- */

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int
cyc_uuid_parse(const char *text, uint8_t out[16])
{
    uint8_t tmp[16];
    size_t j = 0;

    if (!text || strlen(text) != 36)
        return -EINVAL;
    for (size_t i = 0; i < 36;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-')
                return -EINVAL;
            i++;
            continue;
        }
        int hi = hexval(text[i]), lo = hexval(text[i + 1]);
        if (hi < 0 || lo < 0)
            return -EINVAL;
        tmp[j++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    memcpy(out, tmp, 16);
    return 0;
}

void
cyc_uuid_format(const uint8_t in[16], char out[37])
{
    static const char hex[] = "0123456789abcdef";
    size_t j = 0;

    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[j++] = '-';
        out[j++] = hex[in[i] >> 4];
        out[j++] = hex[in[i] & 0xf];
    }
    out[j] = '\0';
}

void
cyc_hdr_encode(const struct cyc_hdr *h, uint8_t out[CYC_HDR_BYTES])
{
    memset(out, 0, CYC_HDR_BYTES);
    memcpy(out, CYC_MAGIC, 8);
    put_le32(out + 8, h->version);
    put_le32(out + 12, h->flags);
    put_le64(out + 16, h->cycle);
    put_le64(out + 24, h->epoch);
    put_le32(out + 32, h->ndisks);
    /* 36..39 reserved */
    memcpy(out + 40, h->uuid, 16);
    if (h->cut_s) {
        put_le32(out + 12, h->flags | CYC_F_CUT);
        put_le32(out + 56, h->cut_s);
    }
    put_le32(out + 60, crc32c(0, out, 60));
}

int
cyc_hdr_decode(const void *buf, struct cyc_hdr *h)
{
    const uint8_t *p = buf;
    struct cyc_hdr t;

    if (memcmp(p, CYC_MAGIC, 8) != 0)
        return vr_err(-EBADMSG, "cycle header: bad magic");
    if (crc32c(0, p, 60) != get_le32(p + 60))
        return vr_err(-EBADMSG, "cycle header: checksum mismatch");
    t.version = get_le32(p + 8);
    t.flags = get_le32(p + 12);
    t.cycle = get_le64(p + 16);
    t.epoch = get_le64(p + 24);
    t.ndisks = get_le32(p + 32);
    memcpy(t.uuid, p + 40, 16);
    t.cut_s = t.flags & CYC_F_CUT ? get_le32(p + 56) : 0;
    if (t.version == 0)
        return vr_err(-EBADMSG, "cycle header: version 0");
    if (t.version > CYC_VERSION)
        return vr_err(-EPROTONOSUPPORT,
                      "cycle header: version %" PRIu32 " is newer than %d",
                      t.version, CYC_VERSION);
    if (t.flags & ~(uint32_t)CYC_KNOWN_FLAGS)
        return vr_err(-EPROTONOSUPPORT,
                      "cycle header: unknown flags 0x%" PRIx32, t.flags);
    if (get_le32(p + 36) != 0 ||
        (!(t.flags & CYC_F_CUT) && get_le32(p + 56) != 0))
        return vr_err(-EBADMSG, "cycle header: reserved bytes not zero");
    if (t.ndisks == 0 || t.ndisks > CYC_MAX_DISKS)
        return vr_err(-EBADMSG, "cycle header: %" PRIu32 " disks out of range",
                      t.ndisks);
    *h = t;
    return 0;
}

/* --- reassembly buffer ----------------------------------------------- */

/* Bytes buf[head..tail) are pending; capacity grows up to CYC_REC_MAX,
 * each growth first allowed by mem (if set; its refusal is kept in err). */
struct rbuf {
    uint8_t *buf;
    size_t cap, head, tail;
    int (*mem)(void *ud, size_t more_bytes);
    void *mem_ud;
    int err;
};

static size_t
rbuf_len(const struct rbuf *rb)
{
    return rb->tail - rb->head;
}

/* Make room for at least want more bytes (want is capped by what one
 * record can need); returns the free space after the tail, 0 if full. */
static size_t
rbuf_reserve(struct rbuf *rb, size_t want)
{
    size_t len = rbuf_len(rb);

    if (rb->head > 0 && rb->cap - rb->tail < want) {
        memmove(rb->buf, rb->buf + rb->head, len);
        rb->head = 0;
        rb->tail = len;
    }
    if (rb->cap - rb->tail < want && rb->cap < CYC_REC_MAX) {
        size_t ncap = rb->cap ? rb->cap : CYC_RBUF_INITIAL;
        while (ncap - rb->tail < want && ncap < CYC_REC_MAX)
            ncap *= 2;
        if (ncap > CYC_REC_MAX)
            ncap = CYC_REC_MAX;
        if (rb->mem && (rb->err = rb->mem(rb->mem_ud, ncap - rb->cap)) < 0)
            return 0;
        rb->buf = xrealloc(rb->buf, ncap);
        rb->cap = ncap;
    }
    return rb->cap - rb->tail;
}

static void
rbuf_consume(struct rbuf *rb, size_t n)
{
    rb->head += n;
    if (rb->head == rb->tail)
        rb->head = rb->tail = 0;
}

static void
rbuf_fini(struct rbuf *rb)
{
    free(rb->buf);
    memset(rb, 0, sizeof *rb);
}

/* cl_rec_decode refused record idx: keep its reason in the message. */
static int
rec_corrupt(uint64_t idx, const char *what)
{
    char why[256];
    snprintf(why, sizeof why, "%s", vr_errmsg());
    return vr_err(-EBADMSG, "%s: record %" PRIu64 ": %s", what, idx,
                  why[0] ? why : "corrupt");
}

/* Record-level checks shared by the decoder and apply. */
static int
check_rec(const struct cl_rec *r, uint32_t ndisks, uint64_t nrecords,
          const char *what)
{
    if (r->disk >= ndisks)
        return vr_err(-EBADMSG, "%s: record %" PRIu64 ": disk %u of %" PRIu32,
                      what, nrecords, r->disk, ndisks);
    switch (r->kind) {
    case CL_WRITE:
    case CL_ZERO:
    case CL_TRIM:
        if (r->offset > UINT64_MAX - r->len || r->offset + r->len > INT64_MAX)
            return vr_err(-EBADMSG,
                          "%s: record %" PRIu64 ": offset %" PRIu64
                          " + %" PRIu32 " overflows",
                          what, nrecords, r->offset, r->len);
        if (nrecords >= CYC_MAX_RECORDS)
            return vr_err(-EBADMSG, "%s: more than %u records", what,
                          CYC_MAX_RECORDS);
        return 0;
    case CL_SEAL:
        if (r->len != 0)
            return vr_err(-EBADMSG, "%s: seal record with length %" PRIu32,
                          what, r->len);
        if (r->offset != nrecords)
            return vr_err(-EBADMSG,
                          "%s: seal record counts %" PRIu64
                          " records, payload has %" PRIu64,
                          what, r->offset, nrecords);
        return 0;
    default:
        return vr_err(-EBADMSG, "%s: record %" PRIu64 ": unknown kind %u", what,
                      nrecords, r->kind);
    }
}

/* --- builder --------------------------------------------------------- */

struct cyc_builder {
    int fd;
    int err; /* sticky: first failure */
    bool finished;
    struct cyc_hdr hdr;
    ZSTD_CCtx *cctx; /* NULL: uncompressed */
    uint8_t *obuf;   /* compressor output or plain write buffer */
    size_t ocap, olen;
    uint64_t raw_bytes, out_bytes, nrecords;
};

static int
b_write(struct cyc_builder *b, const void *buf, size_t len)
{
    int rc = io_write_all(b->fd, buf, len);
    if (rc < 0)
        return vr_err(rc, "cycle payload: write: %s", strerror(-rc));
    b->out_bytes += len;
    return 0;
}

static int
b_flush_plain(struct cyc_builder *b)
{
    int rc = 0;
    if (b->olen > 0)
        rc = b_write(b, b->obuf, b->olen);
    b->olen = 0;
    return rc;
}

/* Push len raw bytes through the compressor (mode ZSTD_e_continue or
 * ZSTD_e_end) or the plain buffer. */
static int
b_emit(struct cyc_builder *b, const void *buf, size_t len,
       ZSTD_EndDirective mode)
{
    int rc;

    b->raw_bytes += len;
    if (!b->cctx) {
        if (len >= b->ocap) {
            if ((rc = b_flush_plain(b)) < 0)
                return rc;
            return b_write(b, buf, len);
        }
        if (b->ocap - b->olen < len && (rc = b_flush_plain(b)) < 0)
            return rc;
        memcpy(b->obuf + b->olen, buf, len);
        b->olen += len;
        if (mode == ZSTD_e_end)
            return b_flush_plain(b);
        return 0;
    }

    ZSTD_inBuffer in = { buf, len, 0 };
    for (;;) {
        ZSTD_outBuffer out = { b->obuf, b->ocap, 0 };
        size_t left = ZSTD_compressStream2(b->cctx, &out, &in, mode);
        if (ZSTD_isError(left))
            return vr_err(-EIO, "cycle payload: zstd compress: %s",
                          ZSTD_getErrorName(left));
        if (out.pos > 0 && (rc = b_write(b, b->obuf, out.pos)) < 0)
            return rc;
        if (mode == ZSTD_e_end ? left == 0 : in.pos == in.size)
            return 0;
    }
}

int
cyc_builder_new(int out_fd, bool compress, int zstd_level,
                const struct cyc_hdr *h, struct cyc_builder **out)
{
    struct cyc_builder *b;
    uint8_t hbuf[CYC_HDR_BYTES];
    int rc;

    *out = NULL;
    if (h->ndisks == 0 || h->ndisks > CYC_MAX_DISKS)
        return vr_err(-EINVAL, "cycle payload: %" PRIu32 " disks out of range",
                      h->ndisks);
    if (h->flags & ~(uint32_t)CYC_KNOWN_FLAGS)
        return vr_err(-EINVAL, "cycle payload: unknown flags 0x%" PRIx32,
                      h->flags);

    if (compress &&
        (zstd_level < ZSTD_minCLevel() || zstd_level > CYC_ZSTD_LEVEL_MAX))
        return vr_err(-EINVAL, "cycle payload: zstd level %d out of range",
                      zstd_level);

    b = xcalloc(1, sizeof *b);
    b->fd = out_fd;
    b->hdr = *h;
    b->hdr.version = CYC_VERSION;
    if (compress) {
        b->cctx = ZSTD_createCCtx();
        if (!b->cctx)
            abort(); /* out of memory, as xmalloc */
        size_t zr = ZSTD_CCtx_setParameter(b->cctx, ZSTD_c_compressionLevel,
                                           zstd_level);
        if (!ZSTD_isError(zr))
            zr = ZSTD_CCtx_setParameter(b->cctx, ZSTD_c_checksumFlag, 1);
        if (ZSTD_isError(zr)) {
            rc = vr_err(-EINVAL, "cycle payload: zstd level %d: %s", zstd_level,
                        ZSTD_getErrorName(zr));
            cyc_builder_free(b);
            return rc;
        }
        b->ocap = ZSTD_CStreamOutSize();
    } else {
        b->ocap = CYC_IO_BYTES;
    }
    b->obuf = xmalloc(b->ocap);

    cyc_hdr_encode(&b->hdr, hbuf);
    if ((rc = b_emit(b, hbuf, sizeof hbuf, ZSTD_e_continue)) < 0) {
        cyc_builder_free(b);
        return rc;
    }
    *out = b;
    return 0;
}

int
cyc_builder_add(struct cyc_builder *b, const struct cl_rec *r)
{
    uint8_t rh[CL_REC_HDR_BYTES];
    int rc;

    if (b->err)
        return b->err;
    if (b->finished)
        return vr_err(-EINVAL, "cycle payload: add after finish");
    if (r->kind != CL_WRITE && r->kind != CL_ZERO && r->kind != CL_TRIM)
        return vr_err(-EINVAL, "cycle payload: cannot add record kind %u",
                      r->kind);
    if (r->disk >= b->hdr.ndisks)
        return vr_err(-EINVAL, "cycle payload: disk %u of %" PRIu32, r->disk,
                      b->hdr.ndisks);
    if (r->kind == CL_WRITE && (r->len == 0 || r->len > CL_MAX_DATA_BYTES))
        return vr_err(-EINVAL,
                      "cycle payload: write of %" PRIu32 " bytes out of range",
                      r->len);
    if (r->offset > UINT64_MAX - r->len || r->offset + r->len > INT64_MAX)
        return vr_err(-EINVAL, "cycle payload: offset %" PRIu64 " overflows",
                      r->offset);
    if (b->nrecords >= CYC_MAX_RECORDS)
        return vr_err(-E2BIG, "cycle payload: more than %u records",
                      CYC_MAX_RECORDS);

    cl_rec_encode(r, rh);
    rc = b_emit(b, rh, sizeof rh, ZSTD_e_continue);
    if (rc == 0 && r->kind == CL_WRITE && r->len > 0)
        rc = b_emit(b, r->data, r->len, ZSTD_e_continue);
    if (rc < 0)
        return b->err = rc; /* stream is now inconsistent */
    b->nrecords++;
    return 0;
}

/* --- records logged by reference --------------------------------------- */

/* The preserve file of the cycle being built, indexed by block: value =
 * file offset of the block's data + 1 (0 is "absent" in a u64map). */
struct pre_index {
    int dirfd;
    char name[32];
    uint16_t disk;
    uint64_t cycle;
    int fd;            /* -1 until the file exists */
    uint64_t scanned;  /* file offset after the last good record */
    uint64_t next_seq;
    struct u64map blocks;
    uint8_t *buf;
    size_t cap;
};

/* Index the records appended since the last scan.  Stops quietly at the
 * first record that is not complete and valid: the data plane appends one
 * record at a time and finishes it before the disk range it preserves
 * changes, so such a tail belongs to a write that has not touched the disk
 * yet.  *added says whether anything new was indexed. */
static int
pre_scan(struct pre_index *p, bool *added)
{
    *added = false;
    if (p->fd < 0) {
        p->fd = openat(p->dirfd, p->name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (p->fd < 0)
            return errno == ENOENT ? 0
                                   : vr_err(-errno, "open %s: %s", p->name,
                                            strerror(errno));
    }
    if (p->scanned == 0) {
        uint8_t hb[CL_SEG_HDR_BYTES];
        struct cl_seg_hdr h;
        int rc = io_pread_all(p->fd, hb, sizeof hb, 0);
        if (rc == -ENODATA)
            return 0; /* being created */
        if (rc < 0)
            return vr_err(rc, "read %s: %s", p->name, strerror(-rc));
        if ((rc = cl_seg_hdr_decode(hb, &h)) < 0)
            return rc;
        if (h.disk != p->disk || h.cycle != p->cycle)
            return vr_err(-EBADMSG, "preserve file %s: header says disk %u "
                          "cycle %" PRIu64, p->name, h.disk, h.cycle);
        p->scanned = CL_SEG_HDR_BYTES;
        p->next_seq = h.first_seq;
    }
    for (;;) {
        uint8_t rh[CL_REC_HDR_BYTES];
        struct cl_rec r;
        size_t used;
        if (io_pread_all(p->fd, rh, sizeof rh, (off_t)p->scanned) < 0)
            return 0;
        size_t need = CL_REC_HDR_BYTES + (size_t)(rh[4] == CL_WRITE
                                                      ? (rh[8] | rh[9] << 8 |
                                                         rh[10] << 16 |
                                                         (uint32_t)rh[11] << 24)
                                                      : 0);
        if (need > CL_REC_HDR_BYTES + (size_t)CL_MAX_DATA_BYTES)
            return 0; /* cl_rec_decode would refuse it anyway */
        if (need > p->cap) {
            p->buf = xrealloc(p->buf, need);
            p->cap = need;
        }
        if (io_pread_all(p->fd, p->buf, need, (off_t)p->scanned) < 0 ||
            cl_rec_decode(p->buf, need, &r, &used) < 0) {
            vr_err_clear();
            return 0;
        }
        if (r.kind != CL_WRITE || r.disk != p->disk || r.seq != p->next_seq ||
            r.offset % CL_PRE_BLOCK != 0)
            return vr_err(-EBADMSG, "preserve file %s at %" PRIu64 ": not a "
                          "block-aligned write record in sequence", p->name,
                          p->scanned);
        uint64_t data_off = p->scanned + CL_REC_HDR_BYTES;
        for (uint64_t o = 0; o < r.len; o += CL_PRE_BLOCK) {
            uint64_t blk = (r.offset + o) / CL_PRE_BLOCK;
            /* A block preserved twice (a crash between preserving and
             * writing) holds the same content both times. */
            if (u64map_get(&p->blocks, blk) == 0)
                u64map_put(&p->blocks, blk, data_off + o + 1);
        }
        p->scanned += used;
        p->next_seq++;
        *added = true;
    }
}

/* Fill buf with [off, off+len) as of the seal: blocks the preserve file
 * holds from there, the rest from the disk image (past its end: zeroes). */
static int
fill_ref(struct pre_index *p, int disk_fd, uint64_t off, uint32_t len,
         uint8_t *buf)
{
    uint64_t pos = off, end = off + len;
    while (pos < end) {
        uint64_t blk = pos / CL_PRE_BLOCK;
        uint64_t bend = (blk + 1) * CL_PRE_BLOCK;
        uint64_t n = (bend < end ? bend : end) - pos;
        uint64_t at = u64map_get(&p->blocks, blk);
        int rc;
        if (at) {
            rc = io_pread_all(p->fd, buf + (pos - off), n,
                              (off_t)(at - 1 + pos % CL_PRE_BLOCK));
            if (rc < 0)
                return vr_err(rc == -ENODATA ? -EBADMSG : rc,
                              "read %s: %s", p->name, strerror(-rc));
        } else {
            /* Extend over following blocks the preserve file lacks. */
            while (bend < end &&
                   u64map_get(&p->blocks, bend / CL_PRE_BLOCK) == 0) {
                bend += CL_PRE_BLOCK;
                n = (bend < end ? bend : end) - pos;
            }
            memset(buf + (pos - off), 0, n);
            rc = io_pread_all(disk_fd, buf + (pos - off), n, (off_t)pos);
            if (rc < 0 && rc != -ENODATA)
                return vr_err(rc, "read disk at %" PRIu64 ": %s", pos,
                              strerror(-rc));
        }
        pos += n;
    }
    return 0;
}

/* Records of one segment waiting to be emitted, with their data. */
struct ref_batch {
    struct cl_rec *recs;
    size_t n, cap;
    uint8_t *data;
    size_t used, dcap;
};

#define REF_BATCH_BYTES   (8u << 20)
#define REF_BATCH_RECORDS 4096u

static void (*fill_hook)(void *ud, size_t nread);
static void *fill_hook_ud;

void
cyc_test_set_fill_hook(void (*fn)(void *ud, size_t nread), void *ud)
{
    fill_hook = fn;
    fill_hook_ud = ud;
}

/* Whether a block of WREF record r was indexed by a scan that began at
 * file offset since (its data lies past it). */
static bool
rec_touches_new(const struct pre_index *p, const struct cl_rec *r,
                uint64_t since)
{
    if (r->len == 0)
        return false;
    uint64_t last = (r->offset + r->len - 1) / CL_PRE_BLOCK;
    for (uint64_t blk = r->offset / CL_PRE_BLOCK; blk <= last; blk++)
        if (u64map_get(&p->blocks, blk) > since)
            return true;
    return false;
}

/* Read the WREF records' data, then look for preserve records that came
 * in meanwhile: any such record may cover a block whose disk content we
 * just read after it changed (its record was complete before the disk
 * write began), so read again the records it covers (from the preserve
 * file now, which does not change), and scan again, until a scan finds
 * nothing that covers the batch.  A block no scan after its read found
 * preserved was not overwritten before that read.  (Reading the whole
 * batch again whenever anything at all was preserved made a 1 s cycle
 * take 7-25 s to build under a guest rewriting its disk at 84 MB/s.) */
static int
batch_fill(struct ref_batch *bt, struct pre_index *p, int disk_fd)
{
    bool all = true;
    uint64_t since = 0;
    for (;;) {
        size_t at = 0, nread = 0;
        for (size_t i = 0; i < bt->n; i++) {
            const struct cl_rec *r = &bt->recs[i];
            if (r->kind != CL_WREF)
                continue;
            if (all || rec_touches_new(p, r, since)) {
                int rc = fill_ref(p, disk_fd, r->offset, r->len,
                                  bt->data + at);
                if (rc < 0)
                    return rc;
                nread++;
            }
            at += r->len;
        }
        if (nread == 0)
            return 0;
        if (fill_hook)
            fill_hook(fill_hook_ud, nread);
        all = false;
        since = p->scanned;
        bool added;
        int rc = pre_scan(p, &added);
        if (rc < 0)
            return rc;
        if (!added)
            return 0;
    }
}

static int
batch_emit(struct cyc_builder *b, struct ref_batch *bt, uint16_t disk)
{
    size_t at = 0;
    for (size_t i = 0; i < bt->n; i++) {
        struct cl_rec r = bt->recs[i];
        r.disk = disk;
        if (r.kind == CL_WREF) {
            r.kind = CL_WRITE;
            r.data = bt->data + at;
            at += r.len;
        }
        int rc = cyc_builder_add(b, &r);
        if (rc < 0)
            return rc;
    }
    bt->n = 0;
    bt->used = 0;
    return 0;
}

int
cyc_builder_add_segment(struct cyc_builder *b, int dirfd, const char *name,
                        uint16_t disk)
{
    return cyc_builder_add_segment_ref(b, dirfd, name, disk, -1);
}

int
cyc_builder_add_segment_ref(struct cyc_builder *b, int dirfd,
                            const char *name, uint16_t disk, int disk_fd)
{
    struct cl_reader *rd = NULL;
    struct cl_rec rec;
    struct ref_batch bt = { 0 };
    struct pre_index p = { .dirfd = dirfd, .fd = -1 };
    size_t nlen = strlen(name);
    int rc;

    if (b->err)
        return b->err;
    /* The reader treats EOF of an .open segment as a clean end. */
    if (nlen < 4 || strcmp(name + nlen - 4, ".log") != 0)
        return vr_err(-EBADMSG, "cycle payload: segment %s is not sealed",
                      name);
    if ((rc = cl_reader_open(dirfd, name, &rd)) < 0)
        return rc;
    p.disk = cl_reader_hdr(rd)->disk;
    p.cycle = cl_reader_hdr(rd)->cycle;
    cl_pre_name(p.cycle, p.name);
    bool added;
    if (disk_fd >= 0)
        rc = pre_scan(&p, &added);
    while (rc == 0 && (rc = cl_reader_next(rd, &rec)) > 0) {
        rc = 0;
        if (rec.kind == CL_WREF) {
            if (disk_fd < 0) {
                rc = vr_err(-EBADMSG, "cycle payload: segment %s logs a "
                            "write by reference and no disk was given", name);
                break;
            }
            if (bt.used + rec.len > bt.dcap) {
                size_t cap = bt.dcap ? bt.dcap : REF_BATCH_BYTES;
                while (cap < bt.used + rec.len)
                    cap *= 2;
                bt.data = xrealloc(bt.data, cap);
                bt.dcap = cap;
            }
            bt.used += rec.len;
        } else if (rec.kind == CL_WRITE) {
            /* Inline data points into the reader's buffer: emit what is
             * batched, then this record on its own. */
            if (bt.n > 0 && ((rc = batch_fill(&bt, &p, disk_fd)) < 0 ||
                             (rc = batch_emit(b, &bt, disk)) < 0))
                break;
            rec.disk = disk;
            if ((rc = cyc_builder_add(b, &rec)) < 0)
                break;
            continue;
        }
        if (bt.n == bt.cap) {
            bt.cap = bt.cap ? bt.cap * 2 : 256;
            bt.recs = xrealloc(bt.recs, bt.cap * sizeof *bt.recs);
        }
        bt.recs[bt.n++] = rec;
        if (bt.n >= REF_BATCH_RECORDS || bt.used >= REF_BATCH_BYTES) {
            if ((rc = batch_fill(&bt, &p, disk_fd)) < 0 ||
                (rc = batch_emit(b, &bt, disk)) < 0)
                break;
        }
    }
    if (rc == 0 && bt.n > 0 &&
        ((rc = batch_fill(&bt, &p, disk_fd)) < 0 ||
         (rc = batch_emit(b, &bt, disk)) < 0)) {
        /* rc says */
    }
    cl_reader_free(rd);
    if (p.fd >= 0)
        close(p.fd);
    u64map_free(&p.blocks);
    free(p.buf);
    free(bt.recs);
    free(bt.data);
    if (rc < 0) {
        /* Records already added cannot be taken back: poison the builder. */
        if (!b->err)
            b->err = rc;
        return rc;
    }
    return 0;
}

int
cyc_builder_finish(struct cyc_builder *b, uint64_t *raw_bytes,
                   uint64_t *out_bytes)
{
    uint8_t rh[CL_REC_HDR_BYTES];
    struct cl_rec seal = { .kind = CL_SEAL, .offset = b->nrecords };
    int rc;

    if (b->err)
        return b->err;
    if (b->finished)
        return vr_err(-EINVAL, "cycle payload: finished twice");
    cl_rec_encode(&seal, rh);
    if ((rc = b_emit(b, rh, sizeof rh, ZSTD_e_end)) < 0)
        return b->err = rc;
    b->finished = true;
    if (raw_bytes)
        *raw_bytes = b->raw_bytes;
    if (out_bytes)
        *out_bytes = b->out_bytes;
    return 0;
}

void
cyc_builder_free(struct cyc_builder *b)
{
    if (!b)
        return;
    ZSTD_freeCCtx(b->cctx);
    free(b->obuf);
    free(b);
}

/* --- decoder --------------------------------------------------------- */

struct cyc_decoder {
    bool compressed;
    bool have_hdr, sealed, frame_done;
    int out_fd;
    bool write_behind;    /* cyc_decoder_write_behind */
    uint64_t out_pending; /* io_write_behind's count for out_fd */
    int err; /* sticky */
    char errmsg[256];
    uint64_t max_raw, raw_bytes, nrecords;
    struct cyc_hdr hdr;
    const uint64_t *disk_sizes; /* optional, borrowed */
    unsigned nsizes;
    struct cyc_decoder_hooks hooks;
    ZSTD_DCtx *dctx;
    uint8_t *zout;
    size_t zcap;
    struct rbuf rb;
};

static int
d_fail(struct cyc_decoder *d, int rc)
{
    d->err = rc;
    snprintf(d->errmsg, sizeof d->errmsg, "%s", vr_errmsg());
    return rc;
}

/* Validate every complete unit (header, then records) in the buffer. */
static int
d_parse(struct cyc_decoder *d)
{
    struct rbuf *rb = &d->rb;

    for (;;) {
        size_t avail = rbuf_len(rb), used;
        const uint8_t *p = rb->buf + rb->head;
        struct cl_rec r;
        int rc;

        if (avail == 0)
            return 0;
        if (d->sealed)
            return vr_err(-EBADMSG,
                          "cycle payload: %zu bytes of trailing data after "
                          "the seal record",
                          avail);
        if (!d->have_hdr) {
            if (avail < CYC_HDR_BYTES)
                return 0;
            if ((rc = cyc_hdr_decode(p, &d->hdr)) < 0)
                return rc;
            if (d->hdr.flags & CYC_F_UNDO)
                return vr_err(-EPROTO, "cycle payload: an undo file is not "
                                       "a cycle payload");
            d->have_hdr = true;
            rbuf_consume(rb, CYC_HDR_BYTES);
            continue;
        }
        if (avail < CL_REC_HDR_BYTES)
            return 0;
        rc = cl_rec_decode(p, avail, &r, &used);
        if (rc == -EAGAIN) {
            if (avail >= CYC_REC_MAX)
                return vr_err(-EBADMSG,
                              "cycle payload: record %" PRIu64
                              " larger than %zu bytes",
                              d->nrecords, CYC_REC_MAX);
            return 0;
        }
        if (rc < 0)
            return rec_corrupt(d->nrecords, "cycle payload");
        if ((rc = check_rec(&r, d->hdr.ndisks, d->nrecords, "cycle payload")) <
            0)
            return rc;
        if (r.kind != CL_SEAL && d->disk_sizes &&
            (r.disk >= d->nsizes ||
             r.offset + r.len > d->disk_sizes[r.disk]))
            return vr_err(-EBADMSG,
                          "cycle payload: record %" PRIu64 " ends at %" PRIu64
                          ", beyond disk %u",
                          d->nrecords, r.offset + r.len, r.disk);
        if (r.kind == CL_SEAL)
            d->sealed = true;
        else
            d->nrecords++;
        rbuf_consume(rb, used);
    }
}

/* Take len uncompressed bytes: cap, stage, reassemble and validate. */
static int
d_raw(struct cyc_decoder *d, const uint8_t *buf, size_t len)
{
    int rc;

    if (len > d->max_raw - d->raw_bytes)
        return vr_err(-EFBIG,
                      "cycle payload: more than %" PRIu64 " bytes uncompressed",
                      d->max_raw);
    if (d->hooks.stage &&
        (rc = d->hooks.stage(d->hooks.ud, d->raw_bytes + len)) < 0)
        return rc;
    d->raw_bytes += len;
    if (d->out_fd >= 0 && (rc = io_write_all(d->out_fd, buf, len)) < 0)
        return vr_err(rc, "cycle payload: stage: %s", strerror(-rc));
    if (d->out_fd >= 0 && d->write_behind)
        io_write_behind(d->out_fd, &d->out_pending, len);
    while (len > 0) {
        if (d->sealed)
            return vr_err(-EBADMSG,
                          "cycle payload: %zu bytes of trailing "
                          "data after the seal record",
                          len);
        /* Ask for little: the buffer grows only as a record needs it. */
        size_t room =
            rbuf_reserve(&d->rb, len < CYC_IO_BYTES ? len : CYC_IO_BYTES);
        size_t n = len < room ? len : room;
        if (n == 0 && d->rb.err)
            return d->rb.err; /* the mem hook's refusal, with its message */
        if (n == 0)
            return vr_err(-EBADMSG,
                          "cycle payload: record %" PRIu64
                          " larger than %zu bytes",
                          d->nrecords, CYC_REC_MAX);
        memcpy(d->rb.buf + d->rb.tail, buf, n);
        d->rb.tail += n;
        buf += n;
        len -= n;
        if ((rc = d_parse(d)) < 0)
            return rc;
    }
    return 0;
}

int
cyc_decoder_new(bool compressed, uint64_t max_raw_bytes, int out_fd,
                struct cyc_decoder **out)
{
    struct cyc_decoder *d = xcalloc(1, sizeof *d);

    d->compressed = compressed;
    d->max_raw = max_raw_bytes;
    d->out_fd = out_fd;
    if (compressed) {
        d->dctx = ZSTD_createDCtx();
        if (!d->dctx)
            abort(); /* out of memory, as xmalloc */
        size_t zr = ZSTD_DCtx_setParameter(d->dctx, ZSTD_d_windowLogMax,
                                           CYC_ZSTD_WINDOW_LOG_MAX);
        if (ZSTD_isError(zr)) {
            int rc = vr_err(-EINVAL, "cycle payload: zstd window limit: %s",
                            ZSTD_getErrorName(zr));
            cyc_decoder_free(d);
            *out = NULL;
            return rc;
        }
        d->zcap = ZSTD_DStreamOutSize();
        d->zout = xmalloc(d->zcap);
    }
    *out = d;
    return 0;
}

int
cyc_decoder_feed(struct cyc_decoder *d, const void *buf, size_t len)
{
    int rc;

    if (d->err)
        return vr_err(d->err, "%s", d->errmsg);
    if (!d->compressed) {
        if ((rc = d_raw(d, buf, len)) < 0)
            return d_fail(d, rc);
        return 0;
    }

    ZSTD_inBuffer in = { buf, len, 0 };
    bool pending = false; /* output buffer filled: more may be buffered */
    while (in.pos < in.size || pending) {
        if (d->frame_done) {
            rc = vr_err(-EBADMSG, "cycle payload: trailing data after the "
                                  "zstd frame");
            return d_fail(d, rc);
        }
        ZSTD_outBuffer out = { d->zout, d->zcap, 0 };
        size_t zr = ZSTD_decompressStream(d->dctx, &out, &in);
        if (ZSTD_isError(zr)) {
            rc = vr_err(-EBADMSG, "cycle payload: zstd: %s",
                        ZSTD_getErrorName(zr));
            return d_fail(d, rc);
        }
        if (out.pos > 0 && (rc = d_raw(d, d->zout, out.pos)) < 0)
            return d_fail(d, rc);
        pending = out.pos == out.size;
        if (zr == 0) {
            d->frame_done = true;
            pending = false;
        }
    }
    return 0;
}

int
cyc_decoder_finish(struct cyc_decoder *d, struct cyc_hdr *hdr,
                   uint64_t *nrecords, uint64_t *raw_bytes)
{
    int rc;

    if (d->err)
        return vr_err(d->err, "%s", d->errmsg);
    if (d->compressed && !d->frame_done)
        rc = vr_err(-EBADMSG, "cycle payload: truncated zstd stream");
    else if (!d->have_hdr)
        rc = vr_err(-EBADMSG, "cycle payload: truncated header");
    else if (!d->sealed)
        rc = vr_err(-EBADMSG,
                    "cycle payload: truncated after %" PRIu64
                    " records, no seal record",
                    d->nrecords);
    else
        rc = 0;
    if (rc < 0)
        return d_fail(d, rc);
    if (hdr)
        *hdr = d->hdr;
    if (nrecords)
        *nrecords = d->nrecords;
    if (raw_bytes)
        *raw_bytes = d->raw_bytes;
    return 0;
}

void
cyc_decoder_set_disk_sizes(struct cyc_decoder *d, const uint64_t *sizes,
                           unsigned n)
{
    d->disk_sizes = sizes;
    d->nsizes = n;
}

void
cyc_decoder_write_behind(struct cyc_decoder *d)
{
    d->write_behind = true;
}

void
cyc_decoder_set_hooks(struct cyc_decoder *d,
                      const struct cyc_decoder_hooks *h)
{
    d->hooks = *h;
    d->rb.mem = h->mem;
    d->rb.mem_ud = h->ud;
}

void
cyc_decoder_free(struct cyc_decoder *d)
{
    if (!d)
        return;
    ZSTD_freeDCtx(d->dctx);
    free(d->zout);
    rbuf_fini(&d->rb);
    free(d);
}

/* --- reader of a staged payload --------------------------------------- */

/* Read more of the payload into rb; returns bytes read (0 at EOF, or when
 * the buffer already holds the largest possible record). */
static ssize_t
payload_fill(int fd, struct rbuf *rb, uint64_t *pos, const char *what)
{
    size_t room = rbuf_reserve(rb, CYC_IO_BYTES);
    if (room == 0)
        return 0;
    for (;;) {
        ssize_t n = pread(fd, rb->buf + rb->tail, room, (off_t)*pos);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return vr_err(-errno, "%s: read payload: %s", what,
                          strerror(errno));
        rb->tail += (size_t)n;
        *pos += (uint64_t)n;
        return n;
    }
}

/* cyc_payload_foreach, with what naming the caller in messages.  pos is
 * the file offset just after the buffered bytes, so a record at the head
 * of the buffer starts at pos - rbuf_len. */
static int
payload_walk(int fd, unsigned ndisks, const char *what, struct cyc_hdr *hdr_out,
             int (*fn)(const struct cl_rec *r, uint64_t file_off, void *arg),
             void *arg)
{
    struct rbuf rb = { 0 };
    struct cyc_hdr hdr;
    uint64_t pos = 0, n = 0;
    bool sealed = false;
    ssize_t got;
    int rc;

    if (ndisks > CYC_MAX_DISKS)
        return vr_err(-EINVAL, "%s: %u disks out of range", what, ndisks);

    while (rbuf_len(&rb) < CYC_HDR_BYTES) {
        if ((got = payload_fill(fd, &rb, &pos, what)) < 0) {
            rc = (int)got;
            goto out;
        }
        if (got == 0) {
            rc = vr_err(-EBADMSG, "%s: payload truncated in header", what);
            goto out;
        }
    }
    if ((rc = cyc_hdr_decode(rb.buf + rb.head, &hdr)) < 0)
        goto out;
    if (ndisks != 0 && hdr.ndisks != ndisks) {
        rc = vr_err(-EBADMSG,
                    "%s: payload has %" PRIu32 " disks, replica has %u", what,
                    hdr.ndisks, ndisks);
        goto out;
    }
    if (hdr_out)
        *hdr_out = hdr;
    rbuf_consume(&rb, CYC_HDR_BYTES);

    for (;;) {
        struct cl_rec r;
        size_t used;

        if (sealed) {
            /* Nothing may follow the seal record. */
            if (rbuf_len(&rb) == 0 &&
                (got = payload_fill(fd, &rb, &pos, what)) <= 0) {
                rc = (int)got;
                if (rc < 0)
                    goto out;
                break;
            }
            rc = vr_err(-EBADMSG, "%s: trailing data after the seal record",
                        what);
            goto out;
        }
        rc = rbuf_len(&rb) < CL_REC_HDR_BYTES
                 ? -EAGAIN
                 : cl_rec_decode(rb.buf + rb.head, rbuf_len(&rb), &r, &used);
        if (rc == -EAGAIN) {
            if (rbuf_len(&rb) >= CYC_REC_MAX) {
                rc = vr_err(-EBADMSG,
                            "%s: record %" PRIu64 " larger than %zu bytes",
                            what, n, CYC_REC_MAX);
                goto out;
            }
            got = payload_fill(fd, &rb, &pos, what);
            if (got < 0) {
                rc = (int)got;
                goto out;
            }
            if (got > 0)
                continue;
            rc = vr_err(-EBADMSG,
                        "%s: payload truncated after %" PRIu64 " records", what,
                        n);
            goto out;
        }
        if (rc < 0) {
            rc = rec_corrupt(n, what);
            goto out;
        }
        if ((rc = check_rec(&r, hdr.ndisks, n, what)) < 0)
            goto out;
        if (r.kind == CL_SEAL) {
            sealed = true;
        } else {
            if ((rc = fn(&r, pos - rbuf_len(&rb), arg)) < 0)
                goto out;
            n++;
        }
        rbuf_consume(&rb, used);
    }
    rc = 0;
out:
    rbuf_fini(&rb);
    return rc;
}

int
cyc_payload_foreach(int payload_fd, unsigned ndisks, struct cyc_hdr *hdr,
                    int (*fn)(const struct cl_rec *r, uint64_t file_off,
                              void *arg),
                    void *arg)
{
    return payload_walk(payload_fd, ndisks, "payload", hdr, fn, arg);
}

/* --- apply ----------------------------------------------------------- */

/* Make the range read as zeroes: punch a hole, or write zeroes where the
 * file system or device cannot. */
static int
apply_zero(int fd, uint64_t off, uint32_t len, unsigned disk)
{
    static const uint8_t zeroes[64 << 10];

    if (len == 0)
        return 0;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)len) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return vr_err(-errno, "apply: disk %u: punch hole at %" PRIu64 ": %s",
                      disk, off, strerror(errno));
    while (len > 0) {
        uint32_t n = len < sizeof zeroes ? len : (uint32_t)sizeof zeroes;
        int rc = io_pwrite_all(fd, zeroes, n, (off_t)off);
        if (rc < 0)
            return vr_err(rc, "apply: disk %u: write zeroes at %" PRIu64 ": %s",
                          disk, off, strerror(-rc));
        off += n;
        len -= n;
    }
    return 0;
}

static int
apply_rec(const struct cl_rec *r, const int *disk_fds,
          const uint64_t *disk_sizes, uint64_t idx)
{
    int fd = disk_fds[r->disk];
    int rc;

    /* check_rec has ruled out overflow of offset + len. */
    if (r->offset + r->len > disk_sizes[r->disk])
        return vr_err(-EBADMSG,
                      "apply: record %" PRIu64 ": disk %u: %" PRIu64
                      " + %" PRIu32 " beyond the disk size %" PRIu64,
                      idx, r->disk, r->offset, r->len, disk_sizes[r->disk]);
    if (r->kind == CL_WRITE) {
        if (r->len == 0)
            return 0;
        rc = io_pwrite_all(fd, r->data, r->len, (off_t)r->offset);
        if (rc < 0)
            return vr_err(rc, "apply: disk %u: write at %" PRIu64 ": %s",
                          r->disk, r->offset, strerror(-rc));
        return 0;
    }
    return apply_zero(fd, r->offset, r->len, r->disk);
}

struct apply_ctx {
    const int *disk_fds;
    const uint64_t *disk_sizes;
    uint64_t n;
    uint64_t *records_applied;
};

static int
apply_one(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct apply_ctx *c = arg;
    int rc;

    (void)file_off;
    if ((rc = apply_rec(r, c->disk_fds, c->disk_sizes, c->n)) < 0)
        return rc;
    c->n++;
    if (c->records_applied)
        *c->records_applied = c->n;
    vr_fault_point("apply-record");
    return 0;
}

static int
apply_file(int payload_fd, const int *disk_fds, const uint64_t *disk_sizes,
           unsigned ndisks, uint64_t *records_applied, bool sync)
{
    struct apply_ctx c = { .disk_fds = disk_fds,
                           .disk_sizes = disk_sizes,
                           .records_applied = records_applied };
    int rc;

    if (records_applied)
        *records_applied = 0;
    if (ndisks == 0 || ndisks > CYC_MAX_DISKS)
        return vr_err(-EINVAL, "apply: %u disks out of range", ndisks);
    if ((rc = payload_walk(payload_fd, ndisks, "apply", NULL, apply_one, &c)) <
        0)
        return rc;
    for (unsigned i = 0; i < ndisks; i++) {
        if (!sync) {
            /* Start the writeback the caller's later fdatasync waits for. */
            (void)sync_file_range(disk_fds[i], 0, 0, SYNC_FILE_RANGE_WRITE);
            continue;
        }
        if (fdatasync(disk_fds[i]) < 0)
            return vr_err(-errno, "apply: disk %u: fdatasync: %s", i,
                          strerror(errno));
    }
    return 0;
}

int
cyc_apply_file(int payload_fd, const int *disk_fds, const uint64_t *disk_sizes,
               unsigned ndisks, uint64_t *records_applied)
{
    return apply_file(payload_fd, disk_fds, disk_sizes, ndisks,
                      records_applied, true);
}

int
cyc_apply_file_unsynced(int payload_fd, const int *disk_fds,
                        const uint64_t *disk_sizes, unsigned ndisks,
                        uint64_t *records_applied)
{
    return apply_file(payload_fd, disk_fds, disk_sizes, ndisks,
                      records_applied, false);
}
