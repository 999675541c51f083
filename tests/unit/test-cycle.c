/* test-cycle.c: unit tests for the cycle payload (lib/cycle.c): header and
 * UUID codecs, builder and streaming decoder round trips (compressed or not,
 * fed in chunks of every size), refusal of truncated, corrupt, oversized and
 * trailing input, and apply to real disk files compared with an image built
 * in memory.  Fixed seeds throughout.
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
#include <zstd.h>

#include "changelog.h"
#include "crc32c.h"
#include "cycle.h"
#include "tap.h"
#include "testrand.h"

#define DISK_BYTES (1u << 20)

static int
memfd(void)
{
    int fd = memfd_create("test-cycle", 0);
    if (fd < 0) {
        perror("memfd_create");
        exit(1);
    }
    return fd;
}

/* Whole content of fd into a new buffer. */
static uint8_t *
slurp(int fd, size_t *len)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        abort();
    uint8_t *p = xmalloc((size_t)st.st_size + 1);
    if (st.st_size > 0 && io_pread_all(fd, p, (size_t)st.st_size, 0) < 0)
        abort();
    *len = (size_t)st.st_size;
    return p;
}

static int
fd_of(const uint8_t *buf, size_t len)
{
    int fd = memfd();
    if (len > 0 && io_pwrite_all(fd, buf, len, 0) < 0)
        abort();
    return fd;
}

static struct cyc_hdr
mkhdr(uint32_t ndisks, uint32_t flags)
{
    struct cyc_hdr h = { .version = CYC_VERSION,
                         .flags = flags,
                         .cycle = 42,
                         .epoch = 3,
                         .ndisks = ndisks };
    if (cyc_uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", h.uuid) < 0)
        abort();
    return h;
}

/* Records with their data kept alive by the test. */
struct recset {
    struct cl_rec *r;
    uint8_t **data;
    size_t n, cap;
};

static void
recset_add(struct recset *s, uint8_t kind, uint16_t disk, uint64_t off,
           uint32_t len)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 16;
        s->r = xrealloc(s->r, s->cap * sizeof *s->r);
        s->data = xrealloc(s->data, s->cap * sizeof *s->data);
    }
    struct cl_rec *r = &s->r[s->n];
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->disk = disk;
    r->offset = off;
    r->len = len;
    r->seq = s->n + 1;
    s->data[s->n] = NULL;
    if (kind == CL_WRITE) {
        s->data[s->n] = xmalloc(len ? len : 1);
        fill_random(s->data[s->n], len);
        r->data = s->data[s->n];
    }
    s->n++;
}

static void
recset_free(struct recset *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->data[i]);
    free(s->r);
    free(s->data);
    memset(s, 0, sizeof *s);
}

/* Build a payload from s; returns the wire bytes. */
static uint8_t *
build(const struct recset *s, const struct cyc_hdr *h, bool compress,
      size_t *len)
{
    struct cyc_builder *b;
    uint64_t raw, out;
    int fd = memfd();

    if (cyc_builder_new(fd, compress, 1, h, &b) < 0)
        abort();
    for (size_t i = 0; i < s->n; i++)
        if (cyc_builder_add(b, &s->r[i]) < 0)
            abort();
    if (cyc_builder_finish(b, &raw, &out) < 0)
        abort();
    cyc_builder_free(b);
    uint8_t *p = slurp(fd, len);
    if (out != *len || (!compress && raw != *len))
        abort();
    close(fd);
    return p;
}

/* Feed buf in chunks of chunk bytes (0: all at once) and finish; the first
 * error, or 0. */
static int
decode(const uint8_t *buf, size_t len, bool compressed, size_t chunk,
       uint64_t max_raw, int out_fd, uint64_t *nrecords)
{
    struct cyc_decoder *d;
    struct cyc_hdr h;
    uint64_t raw;
    int rc;

    if ((rc = cyc_decoder_new(compressed, max_raw, out_fd, &d)) < 0)
        return rc;
    if (chunk == 0)
        chunk = len ? len : 1;
    for (size_t pos = 0; pos < len; pos += chunk) {
        size_t n = len - pos < chunk ? len - pos : chunk;
        if ((rc = cyc_decoder_feed(d, buf + pos, n)) < 0)
            goto out;
    }
    rc = cyc_decoder_finish(d, &h, nrecords, &raw);
out:
    cyc_decoder_free(d);
    return rc;
}

/* Append one encoded record to a raw payload under construction. */
static size_t
put_rec(uint8_t *p, const struct cl_rec *r)
{
    cl_rec_encode(r, p);
    if (r->kind == CL_WRITE && r->len > 0)
        memcpy(p + CL_REC_HDR_BYTES, r->data, r->len);
    return CL_REC_HDR_BYTES + (r->kind == CL_WRITE ? r->len : 0);
}

/* A raw payload written by hand, for inputs the builder refuses to make. */
static size_t
handmade(uint8_t *p, const struct cyc_hdr *h, const struct recset *s,
         uint64_t seal_count)
{
    size_t n = CYC_HDR_BYTES;
    cyc_hdr_encode(h, p);
    for (size_t i = 0; i < s->n; i++)
        n += put_rec(p + n, &s->r[i]);
    struct cl_rec seal = { .kind = CL_SEAL, .offset = seal_count };
    n += put_rec(p + n, &seal);
    return n;
}

/* --- header and UUID ---------------------------------------------------- */

static void
test_uuid_hdr(void)
{
    uint8_t u[16], buf[CYC_HDR_BYTES];
    char text[37];
    struct cyc_hdr h = mkhdr(2, CYC_F_BASE), g;

    is_int(cyc_uuid_parse("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", u), 0,
           "uuid: upper case parses");
    cyc_uuid_format(u, text);
    is_str(text, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
           "uuid: formats lower case");
    ok(memcmp(u, h.uuid, 16) == 0, "uuid: same bytes either case");
    is_int(cyc_uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f", u), -EINVAL,
           "uuid: short refused");
    is_int(cyc_uuid_parse("0f1e2d3c04b5a-6978-8796-a5b4c3d2e1f0", u), -EINVAL,
           "uuid: missing dash refused");
    is_int(cyc_uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1g0", u), -EINVAL,
           "uuid: non-hex refused");
    is_int(cyc_uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f00", u), -EINVAL,
           "uuid: long refused");

    cyc_hdr_encode(&h, buf);
    ok(memcmp(buf, CYC_MAGIC, 8) == 0, "hdr: magic first");
    is_int(cyc_hdr_decode(buf, &g), 0, "hdr: round trip decodes");
    ok(g.version == CYC_VERSION && g.flags == CYC_F_BASE && g.cycle == 42 &&
           g.epoch == 3 && g.ndisks == 2 && memcmp(g.uuid, h.uuid, 16) == 0,
       "hdr: round trip fields");

    int bad = 0;
    for (size_t bit = 0; bit < CYC_HDR_BYTES * 8; bit++) {
        buf[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        if (cyc_hdr_decode(buf, &g) == 0)
            bad++;
        buf[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    is_int(bad, 0, "hdr: every bit flip refused");

    struct cyc_hdr v = h;
    v.version = CYC_VERSION + 1;
    cyc_hdr_encode(&v, buf);
    is_int(cyc_hdr_decode(buf, &g), -EPROTONOSUPPORT, "hdr: newer version");
    v = h;
    v.ndisks = 0;
    cyc_hdr_encode(&v, buf);
    is_int(cyc_hdr_decode(buf, &g), -EBADMSG, "hdr: 0 disks refused");
    v.ndisks = CYC_MAX_DISKS + 1;
    cyc_hdr_encode(&v, buf);
    is_int(cyc_hdr_decode(buf, &g), -EBADMSG, "hdr: too many disks refused");
    v.ndisks = CYC_MAX_DISKS;
    cyc_hdr_encode(&v, buf);
    is_int(cyc_hdr_decode(buf, &g), 0, "hdr: CYC_MAX_DISKS accepted");

    /* The cut time: bytes 56..59 under CYC_F_CUT, set by the encoder. */
    v = h;
    v.cut_s = 1796544148u;
    cyc_hdr_encode(&v, buf);
    is_int(cyc_hdr_decode(buf, &g), 0, "hdr: with a cut time decodes");
    ok(g.cut_s == 1796544148u && (g.flags & CYC_F_CUT) &&
           (g.flags & ~CYC_F_CUT) == CYC_F_BASE,
       "hdr: the cut time and its flag round trip");
    is_int(cyc_hdr_decode(buf, &g) == 0 && g.cycle == 42, 1,
           "hdr: the other fields stay");
    v = h;
    cyc_hdr_encode(&v, buf);
    is_int(cyc_hdr_decode(buf, &g), 0, "hdr: no cut time decodes");
    ok(g.cut_s == 0 && !(g.flags & CYC_F_CUT), "hdr: no cut time, no flag");
    /* Bytes 56..59 without the flag are still reserved. */
    buf[57] = 1;
    uint32_t crc = crc32c(0, buf, 60);
    memcpy(buf + 60, &crc, 4); /* little-endian machines */
    is_int(cyc_hdr_decode(buf, &g), -EBADMSG,
           "hdr: bytes 56..59 without CYC_F_CUT refused");
}

/* --- round trips -------------------------------------------------------- */

static void
mixed_records(struct recset *s, uint16_t ndisks, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t disk = (uint16_t)(rng() % ndisks);
        uint32_t len = 1 + (uint32_t)(rng() % 20000);
        uint64_t off = rng() % (DISK_BYTES - len);
        unsigned k = (unsigned)(rng() % 6);
        uint8_t kind = k < 4 ? CL_WRITE : k == 4 ? CL_ZERO : CL_TRIM;
        if (kind != CL_WRITE)
            len = (uint32_t)(rng() % 100000), off = rng() % (DISK_BYTES - len);
        recset_add(s, kind, disk, off, len);
    }
}

static void
test_roundtrip(void)
{
    struct recset s = { .n = 0 };
    struct cyc_hdr h = mkhdr(2, 0);
    size_t rawlen, zlen, outlen;
    static const size_t chunks[] = { 1, 7, 4096, 0 };

    rng_state = 0x9e3779b97f4a7c15ull;
    mixed_records(&s, 2, 60);
    recset_add(&s, CL_WRITE, 0, 4096, 700u << 10); /* grows the buffer */
    memset(s.data[s.n - 1], 'v', 700u << 10);      /* and compresses */

    uint8_t *raw = build(&s, &h, false, &rawlen);
    uint8_t *z = build(&s, &h, true, &zlen);
    ok(zlen < rawlen, "compressed payload smaller (%zu < %zu)", zlen, rawlen);

    for (int c = 0; c < 2; c++) {
        for (size_t i = 0; i < ARRAY_SIZE(chunks); i++) {
            uint64_t nrec = 0;
            int fd = memfd();
            int rc = decode(c ? z : raw, c ? zlen : rawlen, c, chunks[i],
                            UINT64_MAX, fd, &nrec);
            uint8_t *out = slurp(fd, &outlen);
            is_int(rc, 0, "%s, chunk %zu: decodes", c ? "zstd" : "plain",
                   chunks[i]);
            is_int(nrec, s.n, "%s, chunk %zu: record count",
                   c ? "zstd" : "plain", chunks[i]);
            ok(outlen == rawlen && memcmp(out, raw, rawlen) == 0,
               "%s, chunk %zu: output byte-identical", c ? "zstd" : "plain",
               chunks[i]);
            free(out);
            close(fd);
        }
    }

    /* The cap is inclusive: exactly the raw size passes, one less fails. */
    is_int(decode(z, zlen, true, 0, rawlen, -1, NULL), 0,
           "max_raw_bytes == raw size accepted");
    is_int(decode(z, zlen, true, 0, rawlen - 1, -1, NULL), -EFBIG,
           "max_raw_bytes == raw size - 1 refused");
    is_int(decode(raw, rawlen, false, 0, rawlen - 1, -1, NULL), -EFBIG,
           "plain: over max_raw_bytes refused");

    /* Empty payload: just header and seal. */
    struct recset e = { .n = 0 };
    uint8_t *ep = build(&e, &h, true, &zlen);
    recset_free(&e);
    uint64_t nrec = 99;
    is_int(decode(ep, zlen, true, 3, UINT64_MAX, -1, &nrec), 0,
           "empty payload decodes");
    is_int(nrec, 0, "empty payload has no records");
    free(ep);

    free(raw);
    free(z);
    recset_free(&s);
}

static void
test_builder_refusals(void)
{
    struct cyc_hdr h = mkhdr(2, 0);
    struct cyc_builder *b;
    struct cl_rec r = { .kind = CL_ZERO, .disk = 2, .len = 10 };
    int fd = memfd();

    is_int(cyc_builder_new(fd, false, 1, &h, &b), 0, "builder: new");
    is_int(cyc_builder_add(b, &r), -EINVAL, "builder: disk >= ndisks refused");
    r.disk = 1;
    r.kind = CL_SEAL;
    is_int(cyc_builder_add(b, &r), -EINVAL, "builder: explicit seal refused");
    r.kind = CL_WRITE;
    r.len = 0;
    r.data = "";
    is_int(cyc_builder_add(b, &r), -EINVAL, "builder: empty write refused");
    cyc_builder_free(b);

    h.ndisks = 0;
    is_int(cyc_builder_new(fd, false, 1, &h, &b), -EINVAL,
           "builder: 0 disks refused");
    ok(b == NULL, "builder: no object on failure");
    h.ndisks = 1;
    is_int(cyc_builder_new(fd, true, 1000, &h, &b), -EINVAL,
           "builder: bad zstd level refused");
    is_int(cyc_builder_new(fd, true, 20, &h, &b), -EINVAL,
           "builder: zstd level over 19 refused");
    is_int(cyc_builder_new(fd, true, 19, &h, &b), 0,
           "builder: zstd level 19 accepted");
    cyc_builder_free(b);
    is_int(cyc_builder_new(fd, false, 1000, &h, &b), 0,
           "builder: level ignored when not compressing");
    cyc_builder_free(b);
    close(fd);
}

/* --- refusals ----------------------------------------------------------- */

static void
test_truncation_and_flips(void)
{
    struct recset s = { .n = 0 };
    struct cyc_hdr h = mkhdr(2, 0);
    size_t rawlen, zlen, outlen;
    int bad;

    rng_state = 12345;
    recset_add(&s, CL_WRITE, 0, 512, 100);
    recset_add(&s, CL_ZERO, 1, 4096, 8192);
    recset_add(&s, CL_WRITE, 1, 0, 37);
    recset_add(&s, CL_TRIM, 0, 0, 4096);
    uint8_t *raw = build(&s, &h, false, &rawlen);
    uint8_t *z = build(&s, &h, true, &zlen);

    bad = 0;
    for (size_t cut = 0; cut < rawlen; cut++)
        if (decode(raw, cut, false, 0, UINT64_MAX, -1, NULL) != -EBADMSG)
            bad++;
    is_int(bad, 0, "plain: truncation at each of %zu bytes refused", rawlen);
    bad = 0;
    for (size_t cut = 0; cut < rawlen; cut += 3)
        if (decode(raw, cut, false, 1, UINT64_MAX, -1, NULL) != -EBADMSG)
            bad++;
    is_int(bad, 0, "plain: truncation refused, fed bytewise");
    bad = 0;
    for (size_t cut = 0; cut < zlen; cut++)
        if (decode(z, cut, true, 5, UINT64_MAX, -1, NULL) != -EBADMSG)
            bad++;
    is_int(bad, 0, "zstd: truncation at each of %zu bytes refused", zlen);

    uint8_t *m = xmalloc(rawlen + 256);
    bad = 0;
    for (size_t bit = 0; bit < rawlen * 8; bit++) {
        memcpy(m, raw, rawlen);
        m[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        if (decode(m, rawlen, false, 0, UINT64_MAX, -1, NULL) >= 0)
            bad++;
    }
    is_int(bad, 0, "plain: every one of %zu bit flips refused", rawlen * 8);

    /* A flip in zstd framing (say, the window size) may decode to the same
     * payload; that is harmless.  What must never pass is other content. */
    uint8_t *zm = xmalloc(zlen);
    int refused = 0;
    bad = 0;
    for (size_t bit = 0; bit < zlen * 8; bit++) {
        memcpy(zm, z, zlen);
        zm[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        int fd = memfd();
        if (decode(zm, zlen, true, 0, UINT64_MAX, fd, NULL) >= 0) {
            uint8_t *out = slurp(fd, &outlen);
            if (outlen != rawlen || memcmp(out, raw, rawlen) != 0)
                bad++;
            free(out);
        } else {
            refused++;
        }
        close(fd);
    }
    is_int(bad, 0, "zstd: no bit flip yields other content");
    ok(refused > (int)(zlen * 8) * 9 / 10, "zstd: %d of %zu bit flips refused",
       refused, zlen * 8);

    /* Trailing garbage. */
    memcpy(m, raw, rawlen);
    m[rawlen] = 0;
    is_int(decode(m, rawlen + 1, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "plain: one trailing byte refused");
    memcpy(m + rawlen, raw + CYC_HDR_BYTES, CL_REC_HDR_BYTES + 100);
    is_int(decode(m, rawlen + CL_REC_HDR_BYTES + 100, false, 7, UINT64_MAX, -1,
                  NULL),
           -EBADMSG, "plain: a valid record after the seal refused");
    uint8_t *zg = xmalloc(zlen + 8);
    memcpy(zg, z, zlen);
    memcpy(zg + zlen, "garbage!", 8);
    is_int(decode(zg, zlen + 8, true, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "zstd: trailing bytes after the frame refused");
    memcpy(zg + zlen, z, 8);
    is_int(decode(zg, zlen + 8, true, 1, UINT64_MAX, -1, NULL), -EBADMSG,
           "zstd: second frame start refused");
    size_t cap = ZSTD_compressBound(rawlen + 1);
    uint8_t *zt = xmalloc(cap);
    m[rawlen] = 0;
    size_t ztlen = ZSTD_compress(zt, cap, m, rawlen + 1, 1);
    is_int(decode(zt, ztlen, true, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "zstd: trailing raw byte after the seal refused");
    is_int(decode(z, zlen, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "zstd bytes fed as plain refused");
    is_int(decode(raw, rawlen, true, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "plain bytes fed as zstd refused");

    /* Errors are sticky, with the message kept. */
    struct cyc_decoder *d;
    uint64_t nrec;
    is_int(cyc_decoder_new(false, UINT64_MAX, -1, &d), 0, "sticky: new");
    is_int(cyc_decoder_feed(d, z, zlen), -EBADMSG, "sticky: first failure");
    char first[256];
    snprintf(first, sizeof first, "%s", vr_errmsg());
    vr_err_clear();
    is_int(cyc_decoder_feed(d, raw, rawlen), -EBADMSG, "sticky: feed fails");
    is_str(vr_errmsg(), first, "sticky: same message");
    is_int(cyc_decoder_finish(d, NULL, &nrec, NULL), -EBADMSG,
           "sticky: finish fails");
    cyc_decoder_free(d);

    free(zt);
    free(zg);
    free(zm);
    free(m);
    free(raw);
    free(z);
    recset_free(&s);
}

static void
test_handmade(void)
{
    struct recset s = { .n = 0 };
    struct cyc_hdr h = mkhdr(2, 0);
    uint8_t *p = xmalloc(1 << 16);
    size_t n;

    rng_state = 777;
    recset_add(&s, CL_WRITE, 0, 0, 300);
    recset_add(&s, CL_ZERO, 1, 0, 300);
    recset_add(&s, CL_WRITE, 1, 512, 300);

    n = handmade(p, &h, &s, s.n);
    is_int(decode(p, n, false, 0, UINT64_MAX, -1, NULL), 0,
           "handmade: correct seal count accepted");
    n = handmade(p, &h, &s, s.n + 1);
    is_int(decode(p, n, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "handmade: seal count + 1 refused");
    n = handmade(p, &h, &s, s.n - 1);
    is_int(decode(p, n, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "handmade: seal count - 1 refused");
    ok(strstr(vr_errmsg(), "seal") != NULL, "handmade: message names seal: %s",
       vr_errmsg());

    s.r[2].disk = 2;
    n = handmade(p, &h, &s, s.n);
    is_int(decode(p, n, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "handmade: disk == ndisks refused");
    s.r[2].disk = 1;

    /* A seal with nothing after the header, then a missing seal. */
    struct recset e = { .n = 0 };
    n = handmade(p, &h, &e, 0);
    is_int(decode(p, n, false, 0, UINT64_MAX, -1, NULL), 0,
           "handmade: header + seal accepted");
    is_int(decode(p, CYC_HDR_BYTES, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "handmade: header only refused");

    /* A write by reference belongs in a primary's log, never on the
     * wire: the payload must carry the data. */
    s.r[1].kind = CL_WREF;
    n = handmade(p, &h, &s, s.n);
    is_int(decode(p, n, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "handmade: CL_WREF record refused");
    s.r[1].kind = CL_ZERO;

    /* Overflowing offset + len. */
    s.r[1].offset = UINT64_MAX - 10;
    n = handmade(p, &h, &s, s.n);
    is_int(decode(p, n, false, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "handmade: offset + len overflow refused");

    free(p);
    recset_free(&s);
}

static void
test_bomb(void)
{
    struct cyc_hdr h = mkhdr(1, CYC_F_BASE);
    struct cyc_builder *b;
    uint64_t raw, out;
    uint8_t *zero = xcalloc(1, 1 << 20);
    size_t zlen;
    int fd = memfd();

    if (cyc_builder_new(fd, true, 3, &h, &b) < 0)
        abort();
    for (int i = 0; i < 64; i++) {
        struct cl_rec r = { .kind = CL_WRITE,
                            .offset = (uint64_t)i << 20,
                            .len = 1 << 20,
                            .data = zero };
        if (cyc_builder_add(b, &r) < 0)
            abort();
    }
    is_int(cyc_builder_finish(b, &raw, &out), 0, "bomb: built");
    cyc_builder_free(b);
    uint8_t *z = slurp(fd, &zlen);
    close(fd);
    ok(zlen < 64 << 10 && raw > 64u << 20, "bomb: %zu bytes expand to %" PRIu64,
       zlen, raw);
    is_int(decode(z, zlen, true, 0, 4 << 20, -1, NULL), -EFBIG,
           "bomb: refused with -EFBIG");
    is_int(decode(z, zlen, true, 0, raw, -1, NULL), 0,
           "bomb: accepted when the cap allows it");

    /* Plain zeroes compressed: neither a valid payload nor allowed to grow. */
    size_t cap = ZSTD_compressBound(16 << 20);
    uint8_t *zz = xmalloc(cap);
    uint8_t *zeros16 = xcalloc(1, 16 << 20);
    size_t zzlen = ZSTD_compress(zz, cap, zeros16, 16 << 20, 1);
    int rc = decode(zz, zzlen, true, 0, 1 << 20, -1, NULL);
    ok(rc == -EFBIG || rc == -EBADMSG, "bomb: zstd of bare zeroes refused");

    /* A frame asking for a 32 MiB window is refused up front. */
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    ZSTD_outBuffer zo = { zz, cap, 0 };
    ZSTD_inBuffer zi = { zeros16, 1 << 20, 0 };
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_windowLog, 25);
    size_t zr = ZSTD_compressStream2(cctx, &zo, &zi, ZSTD_e_continue);
    zi.size = 2 << 20;
    while (!ZSTD_isError(zr) &&
           (zr = ZSTD_compressStream2(cctx, &zo, &zi, ZSTD_e_end)) != 0)
        ;
    ZSTD_freeCCtx(cctx);
    ok(!ZSTD_isError(zr), "bomb: 32 MiB window frame made");
    is_int(decode(zz, zo.pos, true, 0, UINT64_MAX, -1, NULL), -EBADMSG,
           "bomb: 32 MiB window refused");
    ok(strstr(vr_errmsg(), "zstd") != NULL, "bomb: message: %s", vr_errmsg());
    free(zeros16);
    free(zz);
    free(z);
    free(zero);
}

/* --- segments ----------------------------------------------------------- */

static char tmpdir[64];

static void
test_segment(void)
{
    struct cl_writer *w;
    struct recset s = { .n = 0 };
    int dirfd = open(tmpdir, O_RDONLY | O_DIRECTORY);
    char name[32];

    rng_state = 4242;
    is_int(cl_writer_create(dirfd, 0, 7, 100, &w), 0, "segment: create");
    for (int i = 0; i < 20; i++) {
        uint8_t kind = i % 5 == 3 ? CL_ZERO : i % 5 == 4 ? CL_TRIM : CL_WRITE;
        recset_add(&s, kind, 1, rng() % 65536, 1 + (uint32_t)(rng() % 5000));
        if (cl_writer_append(w, kind, 0, s.r[i].offset, s.r[i].len,
                             s.r[i].data) < 0)
            abort();
    }
    is_int(cl_writer_seal(w), 0, "segment: sealed");
    cl_writer_free(w);

    /* A second, still open segment. */
    is_int(cl_writer_create(dirfd, 0, 8, 120, &w), 0, "segment: open one");
    if (cl_writer_append(w, CL_ZERO, 0, 0, 512, NULL) < 0)
        abort();
    cl_writer_free(w);

    /* A copy of the sealed segment with a flipped byte in its last record
     * but one, so earlier records are added before the reader fails. */
    {
        size_t len;
        cl_seg_name(7, true, name);
        int in = openat(dirfd, name, O_RDONLY);
        uint8_t *seg = slurp(in, &len);
        close(in);
        seg[len - CL_REC_HDR_BYTES - 20] ^= 0x40;
        int cfd = openat(dirfd, "00000000000000000009.log",
                         O_WRONLY | O_CREAT | O_EXCL, 0600);
        if (cfd < 0 || io_pwrite_all(cfd, seg, len, 0) < 0)
            abort();
        close(cfd);
        free(seg);
    }

    struct cyc_hdr h = mkhdr(2, 0);
    for (int c = 0; c < 2; c++) {
        struct cyc_builder *b;
        uint64_t raw, out, nrec;
        int fd = memfd(), sfd = memfd();
        size_t zlen, slen;

        if (cyc_builder_new(fd, c, 2, &h, &b) < 0)
            abort();
        cl_seg_name(7, true, name);
        is_int(cyc_builder_add_segment(b, dirfd, name, 1), 0,
               "segment %d: added", c);
        is_int(cyc_builder_finish(b, &raw, &out), 0, "segment %d: finish", c);
        cyc_builder_free(b);
        uint8_t *z = slurp(fd, &zlen);
        is_int(decode(z, zlen, c, 4096, UINT64_MAX, sfd, &nrec), 0,
               "segment %d: decodes", c);
        is_int(nrec, 20, "segment %d: all records", c);

        /* Walk the staged payload: same records, disk index replaced. */
        uint8_t *st = slurp(sfd, &slen);
        size_t pos = CYC_HDR_BYTES, used;
        int same = 0;
        for (size_t i = 0; i < s.n; i++) {
            struct cl_rec r;
            if (cl_rec_decode(st + pos, slen - pos, &r, &used) < 0)
                break;
            pos += used;
            if (r.kind == s.r[i].kind && r.disk == 1 &&
                r.offset == s.r[i].offset && r.len == s.r[i].len &&
                (r.kind != CL_WRITE || memcmp(r.data, s.data[i], r.len) == 0))
                same++;
        }
        is_int(same, 20, "segment %d: records identical", c);
        free(st);
        free(z);
        close(fd);
        close(sfd);

        fd = memfd();
        if (cyc_builder_new(fd, c, 2, &h, &b) < 0)
            abort();
        cl_seg_name(8, false, name);
        is_int(cyc_builder_add_segment(b, dirfd, name, 0), -EBADMSG,
               "segment %d: unsealed segment refused", c);
        cyc_builder_free(b);
        close(fd);

        /* A sealed segment corrupt near its end: records already added
         * cannot be taken back, so the builder refuses to finish. */
        fd = memfd();
        if (cyc_builder_new(fd, c, 2, &h, &b) < 0)
            abort();
        is_int(cyc_builder_add_segment(b, dirfd, "00000000000000000009.log", 0),
               -EBADMSG, "segment %d: corrupt segment refused", c);
        is_int(cyc_builder_finish(b, &raw, &out), -EBADMSG,
               "segment %d: builder poisoned after failure", c);
        cyc_builder_free(b);
        close(fd);
    }
    close(dirfd);
    recset_free(&s);
}

/* --- segments with writes logged by reference -------------------------- */

#define REF_DISK_BYTES (65536 + 100) /* last block is partial */

static uint8_t
ref_disk_byte(uint64_t i)
{
    return (uint8_t)(i * 7 + 3);
}

/* Build cycle `cycle` of the log in dirfd from the disk in disk_fd and
 * stage it; returns the builder's result and the staged bytes. */
static int
build_ref(int dirfd, uint64_t cycle, int disk_fd, uint8_t **staged,
          size_t *slen)
{
    struct cyc_hdr h = mkhdr(1, 0);
    struct cyc_builder *b;
    uint64_t raw, out, nrec;
    char name[32];
    int fd = memfd(), sfd = memfd();
    size_t zlen;

    if (cyc_builder_new(fd, true, 1, &h, &b) < 0)
        abort();
    cl_seg_name(cycle, true, name);
    int rc = cyc_builder_add_segment_ref(b, dirfd, name, 0, disk_fd);
    if (rc == 0)
        rc = cyc_builder_finish(b, &raw, &out);
    cyc_builder_free(b);
    *staged = NULL;
    if (rc == 0) {
        uint8_t *z = slurp(fd, &zlen);
        rc = decode(z, zlen, true, 0, UINT64_MAX, sfd, &nrec);
        free(z);
        if (rc == 0)
            *staged = slurp(sfd, slen);
    }
    close(fd);
    close(sfd);
    return rc;
}

static void
test_segment_ref(void)
{
    int dirfd = open(tmpdir, O_RDONLY | O_DIRECTORY);
    struct cl_writer *w, *pre;
    char path[96];

    /* The disk as it is now, after later cycles changed blocks 1 and 16
     * (whose content at the seal the preserve file holds). */
    snprintf(path, sizeof path, "%s/ref-disk.raw", tmpdir);
    int disk_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    uint8_t *img = xmalloc(REF_DISK_BYTES);
    for (uint64_t i = 0; i < REF_DISK_BYTES; i++)
        img[i] = ref_disk_byte(i);
    if (disk_fd < 0 || io_pwrite_all(disk_fd, img, REF_DISK_BYTES, 0) < 0)
        abort();

    static const char inline_data[] = "0123456789";
    if (cl_writer_create(dirfd, 0, 5, 0, &w) < 0 ||
        cl_writer_append(w, CL_WREF, 0, 100, 5000, NULL) < 0 ||
        cl_writer_append(w, CL_ZERO, 0, 20000, 4096, NULL) < 0 ||
        cl_writer_append(w, CL_WRITE, 0, 30000, 10, inline_data) < 0 ||
        cl_writer_append(w, CL_WREF, CL_F_FUA, 65536, 100, NULL) < 0 ||
        cl_writer_append(w, CL_WREF, 0, 8192, 8192, NULL) < 0 ||
        cl_writer_seal(w) < 0)
        abort();
    cl_writer_free(w);

    static uint8_t blk1[4096], blk16[100];
    memset(blk1, 0xee, sizeof blk1);
    memset(blk16, 0xdd, sizeof blk16);
    is_int(cl_writer_open_pre(dirfd, 0, 5, &pre), 0, "ref: preserve file");
    is_int(cl_writer_append(pre, CL_WREF, 0, 0, 4096, NULL), -EINVAL,
           "ref: preserve file takes data records only");
    is_int(cl_writer_seal(pre), -EINVAL, "ref: preserve file is never sealed");
    if (cl_writer_append(pre, CL_WRITE, 0, 4096, 4096, blk1) < 0 ||
        cl_writer_append(pre, CL_WRITE, 0, 65536, 100, blk16) < 0)
        abort();
    cl_writer_free(pre);
    /* A torn record after them: a preserve still being written. */
    {
        char pname[32];
        cl_pre_name(5, pname);
        int pfd = openat(dirfd, pname, O_WRONLY | O_APPEND);
        struct cl_rec r = { .kind = CL_WRITE, .offset = 8192, .len = 4096,
                            .seq = 2, .data = blk1 };
        uint8_t rh[CL_REC_HDR_BYTES];
        cl_rec_encode(&r, rh);
        if (pfd < 0 || write(pfd, rh, sizeof rh) != sizeof rh ||
            write(pfd, blk1, 100) != 100)
            abort();
        close(pfd);
    }

    uint8_t *st;
    size_t slen;
    is_int(build_ref(dirfd, 5, disk_fd, &st, &slen), 0,
           "ref: cycle built from disk and preserve file");
    /* Expected records, in log order. */
    uint8_t *want1 = xmalloc(5000), *want5 = xmalloc(8192);
    for (int i = 0; i < 5000; i++)
        want1[i] = 100 + i < 4096 ? ref_disk_byte(100 + (uint64_t)i) : 0xee;
    for (int i = 0; i < 8192; i++)
        want5[i] = ref_disk_byte(8192 + (uint64_t)i);
    struct {
        uint8_t kind;
        uint64_t off;
        uint32_t len;
        const void *data;
    } want[] = {
        { CL_WRITE, 100, 5000, want1 },
        { CL_ZERO, 20000, 4096, NULL },
        { CL_WRITE, 30000, 10, inline_data },
        { CL_WRITE, 65536, 100, blk16 },
        { CL_WRITE, 8192, 8192, want5 },
    };
    size_t pos = CYC_HDR_BYTES, used;
    int same = 0;
    for (size_t i = 0; st && i < sizeof want / sizeof want[0]; i++) {
        struct cl_rec r;
        if (cl_rec_decode(st + pos, slen - pos, &r, &used) < 0)
            break;
        pos += used;
        if (r.kind == want[i].kind && r.offset == want[i].off &&
            r.len == want[i].len &&
            (!want[i].data || memcmp(r.data, want[i].data, r.len) == 0))
            same++;
        else
            diag("a record differs");
    }
    is_int(same, 5, "ref: data as of the seal (preserved blocks from the "
           "preserve file, the rest from the disk)");
    free(st);
    free(want1);
    free(want5);

    /* No preserve file: everything comes from the disk. */
    {
        char pname[32];
        cl_pre_name(5, pname);
        unlinkat(dirfd, pname, 0);
    }
    is_int(build_ref(dirfd, 5, disk_fd, &st, &slen), 0,
           "ref: built without a preserve file");
    {
        struct cl_rec r;
        ok(st && cl_rec_decode(st + CYC_HDR_BYTES, slen - CYC_HDR_BYTES, &r,
                               &used) == 0 &&
               memcmp(r.data, img + 100, 5000) == 0,
           "ref: no preserve file: the disk's content");
    }
    free(st);

    /* A preserve record that is not block-aligned is refused. */
    if (cl_writer_open_pre(dirfd, 0, 5, &pre) < 0 ||
        cl_writer_append(pre, CL_WRITE, 0, 100, 10, blk1) < 0)
        abort();
    cl_writer_free(pre);
    is_int(build_ref(dirfd, 5, disk_fd, &st, &slen), -EBADMSG,
           "ref: misaligned preserve record refused");
    free(st);

    /* Without a disk, a segment with a write by reference is refused. */
    {
        struct cyc_hdr h = mkhdr(1, 0);
        struct cyc_builder *b;
        char name[32];
        int fd = memfd();
        if (cyc_builder_new(fd, false, 1, &h, &b) < 0)
            abort();
        cl_seg_name(5, true, name);
        is_int(cyc_builder_add_segment(b, dirfd, name, 0), -EBADMSG,
               "ref: no disk given: refused");
        cyc_builder_free(b);
        close(fd);
    }
    free(img);
    close(disk_fd);
    close(dirfd);
}

/* A guest writing while a cycle logged by reference is built: a block the
 * builder read from the disk is preserved and overwritten before the
 * builder scans the preserve file again.  The cycle must hold the block as
 * of the seal, and the builder reads again only the record that block
 * covers, and stops once the preserves that came in cover nothing of the
 * batch (a preserve of another block does not make it read all again). */
struct race {
    int dirfd, disk_fd;
    unsigned calls;
    size_t nread[8];
};

static void
race_pre(struct race *rc, uint64_t blk, uint8_t seal_byte)
{
    struct cl_writer *pre;
    uint8_t b[4096];
    memset(b, seal_byte, sizeof b);
    if (cl_writer_open_pre(rc->dirfd, 0, 17, &pre) < 0 ||
        cl_writer_append(pre, CL_WRITE, 0, blk * 4096, 4096, b) < 0)
        abort();
    cl_writer_free(pre);
}

static void
race_hook(void *ud, size_t nread)
{
    struct race *rc = ud;
    if (rc->calls < 8)
        rc->nread[rc->calls] = nread;
    rc->calls++;
    uint8_t b[4096];
    memset(b, 0x99, sizeof b); /* what the guest writes after the seal */
    if (rc->calls == 1) {
        /* Block 3 (in the batch) and block 50 (not): preserved, then
         * overwritten on the disk, as the data plane orders it. */
        race_pre(rc, 3, 3);
        race_pre(rc, 50, 50);
        if (io_pwrite_all(rc->disk_fd, b, 4096, 3 * 4096) < 0 ||
            io_pwrite_all(rc->disk_fd, b, 4096, 50 * 4096) < 0)
            abort();
    } else if (rc->calls == 2) {
        race_pre(rc, 60, 60); /* only a block outside the batch */
        if (io_pwrite_all(rc->disk_fd, b, 4096, 60 * 4096) < 0)
            abort();
    }
}

static void
test_segment_ref_race(void)
{
    int dirfd = open(tmpdir, O_RDONLY | O_DIRECTORY);
    char path[96];
    snprintf(path, sizeof path, "%s/race-disk.raw", tmpdir);
    int disk_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (dirfd < 0 || disk_fd < 0)
        abort();
    /* The disk at the seal: block k filled with byte k. */
    uint8_t b[4096];
    for (uint64_t k = 0; k < 64; k++) {
        memset(b, (int)k, sizeof b);
        if (io_pwrite_all(disk_fd, b, sizeof b, (off_t)(k * 4096)) < 0)
            abort();
    }
    struct cl_writer *w;
    if (cl_writer_create(dirfd, 0, 17, 0, &w) < 0)
        abort();
    for (uint64_t k = 0; k < 10; k++)
        if (cl_writer_append(w, CL_WREF, 0, k * 4096, 4096, NULL) < 0)
            abort();
    if (cl_writer_seal(w) < 0)
        abort();
    cl_writer_free(w);

    struct race rc = { .dirfd = dirfd, .disk_fd = disk_fd };
    cyc_test_set_fill_hook(race_hook, &rc);
    uint8_t *st;
    size_t slen;
    is_int(build_ref(dirfd, 17, disk_fd, &st, &slen), 0,
           "ref race: built while the guest writes");
    cyc_test_set_fill_hook(NULL, NULL);
    size_t pos = CYC_HDR_BYTES, used;
    int same = 0;
    for (uint64_t k = 0; st && k < 10; k++) {
        struct cl_rec r;
        if (cl_rec_decode(st + pos, slen - pos, &r, &used) < 0)
            break;
        pos += used;
        memset(b, (int)k, sizeof b);
        if (r.offset == k * 4096 && r.len == 4096 &&
            memcmp(r.data, b, 4096) == 0)
            same++;
        else
            diag("a block differs from the seal");
    }
    is_int(same, 10, "ref race: every block as of the seal (block 3 from "
           "the preserve file)");
    is_int(rc.calls, 2, "ref race: two passes (the preserve of block 60 "
           "covers nothing of the batch)");
    is_int(rc.nread[0], 10, "ref race: the first pass read every record");
    is_int(rc.nread[1], 1, "ref race: the second read only block 3's");
    free(st);
    close(disk_fd);
    close(dirfd);
}

/* --- apply -------------------------------------------------------------- */

static int
disk_open(int i, const uint8_t *init)
{
    char path[96];
    snprintf(path, sizeof path, "%s/disk%d.img", tmpdir, i);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || io_pwrite_all(fd, init, DISK_BYTES, 0) < 0)
        abort();
    return fd;
}

static bool
disk_equals(int fd, const uint8_t *want)
{
    struct stat st;
    uint8_t *got = xmalloc(DISK_BYTES);
    bool same = fstat(fd, &st) == 0 && st.st_size == DISK_BYTES &&
                io_pread_all(fd, got, DISK_BYTES, 0) == 0 &&
                memcmp(got, want, DISK_BYTES) == 0;
    free(got);
    return same;
}

static void
model_apply(uint8_t *img[], const struct recset *s)
{
    for (size_t i = 0; i < s->n; i++) {
        const struct cl_rec *r = &s->r[i];
        if (r->kind == CL_WRITE)
            memcpy(img[r->disk] + r->offset, r->data, r->len);
        else
            memset(img[r->disk] + r->offset, 0, r->len);
    }
}

static void
test_apply(void)
{
    struct recset s = { .n = 0 };
    struct cyc_hdr h = mkhdr(2, 0);
    uint8_t *init[2], *img[2];
    uint64_t sizes[2] = { DISK_BYTES, DISK_BYTES }, n;
    int fds[2];
    size_t zlen;

    rng_state = 0xdecafbadull;
    for (int i = 0; i < 2; i++) {
        init[i] = xmalloc(DISK_BYTES);
        fill_random(init[i], DISK_BYTES);
        img[i] = xmalloc(DISK_BYTES);
        memcpy(img[i], init[i], DISK_BYTES);
        fds[i] = disk_open(i, init[i]);
    }
    mixed_records(&s, 2, 80);
    /* Overlaps on purpose: write, overwrite, zero over part, write again. */
    recset_add(&s, CL_WRITE, 0, 1000, 10000);
    recset_add(&s, CL_WRITE, 0, 5000, 10000);
    recset_add(&s, CL_ZERO, 0, 4000, 3000);
    recset_add(&s, CL_TRIM, 0, 12000, 70000);
    recset_add(&s, CL_WRITE, 0, 13000, 100);
    recset_add(&s, CL_WRITE, 1, DISK_BYTES - 4096, 4096); /* at the end */
    recset_add(&s, CL_ZERO, 1, 0, DISK_BYTES / 2);
    recset_add(&s, CL_WRITE, 1, 3, 5);
    model_apply(img, &s);

    /* Through the decoder into a staging file, as the receiver does. */
    uint8_t *z = build(&s, &h, true, &zlen);
    int stage = memfd();
    is_int(decode(z, zlen, true, 4096, UINT64_MAX, stage, NULL), 0,
           "apply: staged");

    /* A crash after the 5th record (fault point; this must be the first
     * apply in the process, as util.c reads VMREPLICA_FAULT once). */
    pid_t pid = fork();
    if (pid == 0) {
        setenv("VMREPLICA_FAULT", "apply-record:5", 1);
        if (cyc_apply_file(stage, fds, sizes, 2, &n) < 0)
            _exit(1);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    ok(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
       "apply: fault point apply-record:5 killed the applier");
    ok(!disk_equals(fds[0], init[0]) || !disk_equals(fds[1], init[1]),
       "apply: the crashed apply changed the disks");

    is_int(cyc_apply_file(stage, fds, sizes, 2, &n), 0, "apply: applied");
    is_int(n, s.n, "apply: every record");
    ok(disk_equals(fds[0], img[0]) && disk_equals(fds[1], img[1]),
       "apply: disks match the model");
    is_int(cyc_apply_file(stage, fds, sizes, 2, &n), 0, "apply: again");
    ok(disk_equals(fds[0], img[0]) && disk_equals(fds[1], img[1]),
       "apply: re-apply is idempotent");

    /* A crash half way, repaired by applying the whole payload again. */
    for (int i = 0; i < 2; i++) {
        if (io_pwrite_all(fds[i], init[i], DISK_BYTES, 0) < 0)
            abort();
    }
    struct recset half = s;
    half.n = s.n / 2;
    uint8_t *hz = build(&half, &h, false, &zlen);
    int hfd = fd_of(hz, zlen);
    is_int(cyc_apply_file(hfd, fds, sizes, 2, &n), 0, "apply: first half");
    is_int(cyc_apply_file(stage, fds, sizes, 2, &n), 0, "apply: then whole");
    ok(disk_equals(fds[0], img[0]) && disk_equals(fds[1], img[1]),
       "apply: partial then whole gives the same image");
    close(hfd);
    free(hz);

    /* Refusals, each before touching the disk for that record. */
    for (int i = 0; i < 2; i++) {
        if (io_pwrite_all(fds[i], init[i], DISK_BYTES, 0) < 0)
            abort();
    }
    struct recset b = { .n = 0 };
    uint8_t *p = xmalloc(1 << 20);
    recset_add(&b, CL_WRITE, 1, DISK_BYTES - 100, 4096);
    size_t plen = handmade(p, &h, &b, 1);
    int pfd = fd_of(p, plen);
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), -EBADMSG,
           "apply: write beyond the disk size refused");
    ok(strstr(vr_errmsg(), "beyond") != NULL, "apply: message: %s",
       vr_errmsg());
    is_int(n, 0, "apply: nothing applied");
    ok(disk_equals(fds[1], init[1]), "apply: disk untouched");
    close(pfd);

    b.r[0].kind = CL_ZERO;
    plen = handmade(p, &h, &b, 1);
    pfd = fd_of(p, plen);
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), -EBADMSG,
           "apply: zero beyond the disk size refused");
    ok(disk_equals(fds[1], init[1]), "apply: disk untouched by zero");
    close(pfd);

    b.r[0].kind = CL_WRITE;
    b.r[0].offset = 0;
    b.r[0].disk = 2;
    plen = handmade(p, &h, &b, 1);
    pfd = fd_of(p, plen);
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), -EBADMSG,
           "apply: disk index >= ndisks refused");
    close(pfd);

    b.r[0].disk = 0;
    plen = handmade(p, &h, &b, 1);
    pfd = fd_of(p, plen);
    is_int(cyc_apply_file(pfd, fds, sizes, 1, &n), -EBADMSG,
           "apply: disk count mismatch refused");
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), 0,
           "apply: handmade payload applies");
    close(pfd);

    /* Truncated, trailing, wrong seal: refused. */
    pfd = fd_of(p, plen - 1);
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), -EBADMSG,
           "apply: truncated payload refused");
    close(pfd);
    p[plen] = 'x';
    pfd = fd_of(p, plen + 1);
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), -EBADMSG,
           "apply: trailing byte refused");
    close(pfd);
    plen = handmade(p, &h, &b, 2);
    pfd = fd_of(p, plen);
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), -EBADMSG,
           "apply: wrong seal count refused");
    close(pfd);
    p[3] ^= 1;
    pfd = fd_of(p, plen);
    is_int(cyc_apply_file(pfd, fds, sizes, 2, &n), -EBADMSG,
           "apply: corrupt header refused");
    close(pfd);

    free(p);
    recset_free(&b);
    close(stage);
    free(z);
    for (int i = 0; i < 2; i++) {
        char path[96];
        close(fds[i]);
        snprintf(path, sizeof path, "%s/disk%d.img", tmpdir, i);
        unlink(path);
        free(init[i]);
        free(img[i]);
    }
    recset_free(&s);
}

/* With the disks' sizes given, the decoder refuses a payload whose record
 * does not fit its disk, so it is never acknowledged and half applied. */
static void
test_disk_bounds(void)
{
    struct recset s = { 0 };
    recset_add(&s, CL_WRITE, 0, 0, 4096);
    recset_add(&s, CL_ZERO, 1, 60000, 5536); /* ends exactly at 65536 */
    struct cyc_hdr h = mkhdr(2, 0);
    size_t len;
    uint8_t *p = build(&s, &h, true, &len);
    static const uint64_t fits[2] = { 4096, 65536 };
    static const uint64_t small[2] = { 4096, 65535 };
    const uint64_t *sizes[2] = { fits, small };
    int rcs[2];
    for (int k = 0; k < 2; k++) {
        struct cyc_decoder *d = NULL;
        struct cyc_hdr out;
        uint64_t nrec, raw;
        rcs[k] = cyc_decoder_new(true, 1 << 20, -1, &d);
        if (rcs[k] == 0) {
            cyc_decoder_set_disk_sizes(d, sizes[k], 2);
            rcs[k] = cyc_decoder_feed(d, p, len);
        }
        if (rcs[k] == 0)
            rcs[k] = cyc_decoder_finish(d, &out, &nrec, &raw);
        cyc_decoder_free(d);
    }
    is_int(rcs[0], 0, "bounds: records that end at their disk's end pass");
    is_int(rcs[1], -EBADMSG, "bounds: a record past its disk's end is refused");
    free(p);
    recset_free(&s);
}

static void
cleanup_tmpdir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        diag("cannot remove the temporary directory");
}

/* The limits hooks (cyc_decoder_set_hooks): mem sees every growth of the
 * reassembly buffer before it happens, stage the running total of staged
 * bytes before they are written; a refusal of either fails the payload
 * with its code and message, and nothing more is staged. */
struct hook_log {
    uint64_t mem_total, last_stage, staged_limit;
    size_t mem_limit;
    unsigned mem_calls, stage_calls;
};

static int
hook_mem(void *ud, size_t more)
{
    struct hook_log *l = ud;
    l->mem_calls++;
    if (l->mem_total + more > l->mem_limit)
        return vr_err(-EAGAIN, "test: memory budget");
    l->mem_total += more;
    return 0;
}

static int
hook_stage(void *ud, uint64_t raw)
{
    struct hook_log *l = ud;
    l->stage_calls++;
    if (raw < l->last_stage)
        abort(); /* must be a running total */
    if (raw > l->staged_limit)
        return vr_err(-ENOSPC, "test: no space");
    l->last_stage = raw;
    return 0;
}

static int
decode_hooked(const uint8_t *buf, size_t len, bool compressed, int out_fd,
              struct hook_log *l)
{
    struct cyc_decoder *d;
    struct cyc_hdr h;
    uint64_t nrec, raw;
    if (cyc_decoder_new(compressed, UINT64_MAX, out_fd, &d) < 0)
        abort();
    const struct cyc_decoder_hooks hk = { hook_mem, hook_stage, l };
    cyc_decoder_set_hooks(d, &hk);
    int rc = 0;
    for (size_t pos = 0; rc == 0 && pos < len; pos += 4096)
        rc = cyc_decoder_feed(d, buf + pos, len - pos < 4096 ? len - pos
                                                              : 4096);
    if (rc == 0)
        rc = cyc_decoder_finish(d, &h, &nrec, &raw);
    cyc_decoder_free(d);
    return rc;
}

static void
test_hooks(void)
{
    struct recset s = { 0 };
    recset_add(&s, CL_WRITE, 0, 0, 4096);
    recset_add(&s, CL_WRITE, 0, 8192, 600 << 10); /* a 600 KiB record */
    struct cyc_hdr h = mkhdr(1, 0);
    for (int compress = 0; compress <= 1; compress++) {
        size_t len, rawlen;
        uint8_t *p = build(&s, &h, compress, &len);
        uint8_t *raw = build(&s, &h, false, &rawlen);
        struct hook_log l = { .mem_limit = SIZE_MAX,
                              .staged_limit = UINT64_MAX };
        int fd = memfd();
        is_int(decode_hooked(p, len, compress, fd, &l), 0,
               "hooks (%s): accepted", compress ? "zstd" : "plain");
        ok(l.mem_calls > 0 && l.mem_total >= (600u << 10),
           "hooks: the buffer's growth was asked for (%llu bytes)",
           (unsigned long long)l.mem_total);
        is_int((int64_t)l.last_stage, (int64_t)rawlen,
               "hooks: stage saw the raw total");
        close(fd);

        /* Memory refused: the payload fails with the hook's code. */
        struct hook_log lm = { .mem_limit = 300 << 10,
                               .staged_limit = UINT64_MAX };
        vr_err_clear();
        is_int(decode_hooked(p, len, compress, -1, &lm), -EAGAIN,
               "hooks: a refused growth fails with -EAGAIN");
        is_str(vr_errmsg(), "test: memory budget", "hooks: its message");

        /* Space refused: nothing past the refusal is staged. */
        struct hook_log ls = { .mem_limit = SIZE_MAX,
                               .staged_limit = 100 << 10 };
        fd = memfd();
        vr_err_clear();
        is_int(decode_hooked(p, len, compress, fd, &ls), -ENOSPC,
               "hooks: a refused stage fails with -ENOSPC");
        struct stat st;
        if (fstat(fd, &st) < 0)
            abort();
        ok((uint64_t)st.st_size <= ls.staged_limit,
           "hooks: %lld bytes staged, within the limit",
           (long long)st.st_size);
        close(fd);
        free(p);
        free(raw);
    }
    recset_free(&s);
}

int
main(void)
{
    plan_no_plan();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test-cycle.XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_uuid_hdr();
    test_roundtrip();
    test_builder_refusals();
    test_truncation_and_flips();
    test_handmade();
    test_bomb();
    test_segment();
    test_segment_ref();
    test_segment_ref_race();
    test_apply();
    test_disk_bounds();
    test_hooks();
    cleanup_tmpdir();
    return done_testing();
}
