/* test-changelog.c: unit tests of lib/changelog.c and lib/crc32c.c.
 *
 * Round trip of many records of every kind; a small sealed segment cut at
 * every byte offset (the reader returns exactly the complete prefix, then an
 * error); cl_writer_reopen after a cut at every byte (the torn tail goes,
 * appends go on); every single-bit flip detected; limits; CRC32C SSE4.2 and
 * table implementations agree.  Fixed seeds throughout.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "changelog.h"
#include "crc32c.h"
#include "tap.h"
#include "testrand.h"

/* Internal entry points of crc32c.c. */
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len);
uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len);
int crc32c_hw_available(void);

struct exp_rec {
    uint8_t kind, flags;
    uint64_t offset;
    uint32_t len;
    uint8_t *data;
};

static char tmpdir[64];
static int dirfd_;

static void
clear_dir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -f %s/*", tmpdir);
    if (system(cmd) != 0)
        abort();
}

static uint8_t *
read_whole(const char *name, size_t *len)
{
    int fd = openat(dirfd_, name, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        abort();
    uint8_t *b = xmalloc((size_t)st.st_size);
    if (io_pread_all(fd, b, (size_t)st.st_size, 0) < 0)
        abort();
    close(fd);
    *len = (size_t)st.st_size;
    return b;
}

static void
write_whole(const char *name, const void *b, size_t len)
{
    int fd = openat(dirfd_, name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || io_pwrite_all(fd, b, len, 0) < 0)
        abort();
    close(fd);
}

static bool
rec_matches(const struct cl_rec *r, const struct exp_rec *e, uint16_t disk,
            uint64_t seq)
{
    if (r->kind != e->kind || r->flags != e->flags || r->disk != disk ||
        r->offset != e->offset || r->len != e->len || r->seq != seq)
        return false;
    if (e->kind == CL_WRITE)
        return r->data && memcmp(r->data, e->data, e->len) == 0;
    return true;
}

static void
gen_recs(struct exp_rec *e, size_t n, uint32_t max_len)
{
    for (size_t i = 0; i < n; i++) {
        static const uint8_t kinds[] = { CL_WRITE, CL_ZERO, CL_TRIM,
                                         CL_WREF };
        e[i].kind = kinds[rng() % 4];
        e[i].flags = (rng() % 4 == 0) ? CL_F_FUA : 0;
        e[i].offset = (rng() % (1u << 30)) * 512;
        e[i].len = (uint32_t)(1 + rng() % max_len);
        e[i].data = NULL;
        if (e[i].kind == CL_WRITE) {
            e[i].data = xmalloc(e[i].len);
            for (uint32_t j = 0; j < e[i].len; j++)
                e[i].data[j] = (uint8_t)rng();
        } else if (e[i].kind != CL_WREF && rng() % 2) {
            e[i].len = (uint32_t)rng(); /* ranges may be large */
            if (e[i].len == 0)
                e[i].len = 1;
        }
    }
}

static void
free_recs(struct exp_rec *e, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(e[i].data);
}

/* Write the records to CYCLE.open (sealed if seal); returns 0 or -errno. */
static int
write_segment(uint16_t disk, uint64_t cycle, uint64_t first_seq,
              const struct exp_rec *e, size_t n, bool seal)
{
    struct cl_writer *w;
    int rc = cl_writer_create(dirfd_, disk, cycle, first_seq, &w);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = cl_writer_append(w, e[i].kind, e[i].flags, e[i].offset,
                              e[i].len, e[i].data);
    if (rc == 0 && seal)
        rc = cl_writer_seal(w);
    cl_writer_free(w);
    return rc;
}

/* Read a segment: how many records match e[] in order, and the final rc. */
static int
read_segment(const char *name, uint16_t disk, uint64_t first_seq,
             const struct exp_rec *e, size_t n, size_t *matched,
             bool *wrong)
{
    struct cl_reader *r;
    struct cl_rec rec;
    int rc = cl_reader_open(dirfd_, name, &r);
    *matched = 0;
    *wrong = false;
    if (rc < 0)
        return rc;
    while ((rc = cl_reader_next(r, &rec)) == 1) {
        if (*matched >= n ||
            !rec_matches(&rec, &e[*matched], disk, first_seq + *matched)) {
            *wrong = true;
            break;
        }
        (*matched)++;
    }
    cl_reader_free(r);
    return rc;
}

static size_t
rec_bytes(const struct exp_rec *e)
{
    return CL_REC_HDR_BYTES + (e->kind == CL_WRITE ? e->len : 0);
}

static void
test_crc32c(void)
{
    ok(crc32c(0, "123456789", 9) == 0xE3069283u, "crc32c known vector");
    ok(crc32c_sw(0, "123456789", 9) == 0xE3069283u, "table known vector");
    ok(crc32c_hw(0, "123456789", 9) == 0xE3069283u, "sse4.2 known vector");
    printf("# sse4.2 available: %d\n", crc32c_hw_available());

    /* Long enough for several 3-stripe rounds of the SSE4.2 path. */
    enum { BUF_BYTES = 40000 };
    static uint8_t buf[BUF_BYTES];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (uint8_t)rng();
    int bad = 0, split_bad = 0;
    for (size_t off = 0; off < 16; off++) {
        for (size_t len = 0; len + off <= sizeof buf; len += 1 + len / 8) {
            uint32_t a = crc32c_sw(0x12345678u, buf + off, len);
            uint32_t b = crc32c_hw(0x12345678u, buf + off, len);
            bad += a != b;
            size_t cut = len / 3;
            uint32_t c = crc32c(crc32c(0, buf + off, cut), buf + off + cut,
                                len - cut);
            split_bad += c != crc32c_sw(0, buf + off, len);
        }
    }
    /* Exactly the round boundaries, and a large buffer. */
    static const size_t edge[] = { 6143, 6144, 6145, 12288, 12295, 18432 };
    for (size_t i = 0; i < ARRAY_SIZE(edge); i++)
        bad += crc32c_sw(7, buf + 3, edge[i]) != crc32c_hw(7, buf + 3, edge[i]);
    size_t big_len = (1u << 20) + 13;
    uint8_t *big = xmalloc(big_len);
    for (size_t i = 0; i < big_len; i++)
        big[i] = (uint8_t)rng();
    bad += crc32c_sw(0, big, big_len) != crc32c_hw(0, big, big_len);
    free(big);
    is_int(bad, 0, "sse4.2 and table crc32c agree on all lengths/alignments");
    is_int(split_bad, 0, "crc32c extends incrementally");
}

static void
test_seg_hdr(void)
{
    struct cl_seg_hdr h = { .version = 1, .disk = 9, .cycle = 77,
                            .first_seq = 1234, .created_ms = 555 }, g;
    uint8_t b[CL_SEG_HDR_BYTES];
    cl_seg_hdr_encode(&h, b);
    ok(cl_seg_hdr_decode(b, &g) == 0 && g.disk == 9 && g.cycle == 77 &&
           g.first_seq == 1234 && g.created_ms == 555 && g.version == 1,
       "segment header round trip");
    ok(memcmp(b, CL_SEG_MAGIC, 8) == 0 && b[12] == 64, "header layout");
    b[30] ^= 1;
    is_int(cl_seg_hdr_decode(b, &g), -EBADMSG, "header crc mismatch");
    h.version = CL_FORMAT_VERSION + 1;
    cl_seg_hdr_encode(&h, b);
    is_int(cl_seg_hdr_decode(b, &g), -EPROTONOSUPPORT, "newer version");
    char name[32];
    cl_seg_name(7, false, name);
    is_str(name, "00000000000000000007.open", "open segment name");
    cl_seg_name(18446744073709551615ull, true, name);
    is_str(name, "18446744073709551615.log", "sealed segment name");
}

static void
test_round_trip(void)
{
    enum { N = 600 };
    static struct exp_rec e[N];
    gen_recs(e, N, 9000);
    clear_dir();
    struct cl_writer *w;
    int rc = cl_writer_create(dirfd_, 3, 7, 100, &w);
    is_int(rc, 0, "create writer");
    uint64_t bytes = CL_SEG_HDR_BYTES;
    int arc = 0;
    for (size_t i = 0; i < N; i++) {
        arc |= cl_writer_append(w, e[i].kind, e[i].flags, e[i].offset,
                                e[i].len, e[i].data);
        bytes += rec_bytes(&e[i]);
    }
    is_int(arc, 0, "append %d records", N);
    is_int(cl_writer_records(w), N, "records counted");
    is_int(cl_writer_next_seq(w), 100 + N, "next seq");
    is_int(cl_writer_bytes(w), bytes, "bytes counted");
    is_int(cl_writer_cycle(w), 7, "cycle");
    is_int(cl_writer_sync(w), 0, "sync");
    is_int(cl_writer_seal(w), 0, "seal");
    is_int(cl_writer_append(w, CL_ZERO, 0, 0, 1, NULL), -EINVAL,
           "append after seal refused");
    cl_writer_free(w);
    ok(faccessat(dirfd_, "00000000000000000007.open", F_OK, 0) < 0 &&
           faccessat(dirfd_, "00000000000000000007.log", F_OK, 0) == 0,
       "sealed segment renamed to .log");
    size_t matched;
    bool wrong;
    rc = read_segment("00000000000000000007.log", 3, 100, e, N, &matched,
                      &wrong);
    is_int(rc, 0, "sealed segment reads to a clean end");
    ok(matched == N && !wrong, "all %d records read back exactly", N);

    struct cl_reader *r;
    ok(cl_reader_open(dirfd_, "00000000000000000007.log", &r) == 0 &&
           cl_reader_hdr(r)->cycle == 7 && cl_reader_hdr(r)->disk == 3 &&
           cl_reader_hdr(r)->first_seq == 100,
       "reader header");
    cl_reader_free(r);
    rc = cl_writer_create(dirfd_, 3, 7, 0, &w);
    ok(rc < 0, "second create of the same cycle refused");
    free_recs(e, N);
}

/* A small segment for the exhaustive tests. */
enum { SMALL_N = 7 };
static struct exp_rec small[SMALL_N];
static size_t small_end[SMALL_N + 1]; /* file offset after record i-1 */

static void
make_small(void)
{
    static const uint8_t kinds[SMALL_N] = { CL_WRITE, CL_ZERO,  CL_WRITE,
                                            CL_TRIM,  CL_WRITE, CL_ZERO,
                                            CL_WRITE };
    static const uint32_t lens[SMALL_N] = { 5, 4096, 1, 1u << 20, 17, 512, 3 };
    small_end[0] = CL_SEG_HDR_BYTES;
    for (size_t i = 0; i < SMALL_N; i++) {
        small[i].kind = kinds[i];
        small[i].flags = i % 3 == 0 ? CL_F_FUA : 0;
        small[i].offset = 4096 * i + 512;
        small[i].len = lens[i];
        small[i].data = NULL;
        if (kinds[i] == CL_WRITE) {
            small[i].data = xmalloc(lens[i]);
            for (uint32_t j = 0; j < lens[i]; j++)
                small[i].data[j] = (uint8_t)(i * 31 + j);
        }
        small_end[i + 1] = small_end[i] + rec_bytes(&small[i]);
    }
}

static size_t
complete_in(size_t k)
{
    size_t n = 0;
    while (n < SMALL_N && small_end[n + 1] <= k)
        n++;
    return n;
}

static void
test_truncation(void)
{
    clear_dir();
    ok(write_segment(1, 5, 40, small, SMALL_N, true) == 0,
       "write small sealed segment");
    size_t len;
    uint8_t *img = read_whole("00000000000000000005.log", &len);
    is_int(len, small_end[SMALL_N] + CL_REC_HDR_BYTES, "small segment size");
    size_t matched;
    bool wrong;
    int bad = 0;
    for (size_t k = 0; k < len; k++) {
        write_whole("00000000000000000006.log", img, k);
        int rc = read_segment("00000000000000000006.log", 1, 40, small,
                              SMALL_N, &matched, &wrong);
        if (k < CL_SEG_HDR_BYTES) {
            if (rc != -EBADMSG)
                bad++, printf("# k=%zu open rc=%d\n", k, rc);
            continue;
        }
        if (wrong || rc != -EBADMSG || matched != complete_in(k)) {
            bad++;
            printf("# k=%zu rc=%d matched=%zu want %zu wrong=%d\n", k, rc,
                   matched, complete_in(k), wrong);
        }
    }
    is_int(bad, 0, "sealed segment cut at each of %zu offsets: exact prefix, "
           "then -EBADMSG", len);

    /* The same bytes as an .open segment: the prefix, then a clean end only
     * at a record boundary. */
    bad = 0;
    for (size_t k = CL_SEG_HDR_BYTES; k <= small_end[SMALL_N]; k++) {
        write_whole("00000000000000000006.open", img, k);
        int rc = read_segment("00000000000000000006.open", 1, 40, small,
                              SMALL_N, &matched, &wrong);
        size_t n = complete_in(k);
        int want = small_end[n] == k ? 0 : -EBADMSG;
        if (wrong || rc != want || matched != n)
            bad++;
    }
    is_int(bad, 0, "open segment cut at every offset: prefix then end/error");
    unlinkat(dirfd_, "00000000000000000006.open", 0);
    unlinkat(dirfd_, "00000000000000000006.log", 0);
    free(img);
}

static void
test_reopen(void)
{
    clear_dir();
    ok(write_segment(2, 9, 1000, small, SMALL_N, true) == 0,
       "write segment for reopen tests");
    size_t len;
    uint8_t *img = read_whole("00000000000000000009.log", &len);
    uint8_t extra[33];
    for (size_t i = 0; i < sizeof extra; i++)
        extra[i] = (uint8_t)(0xa0 + i);
    struct exp_rec all[SMALL_N + 1];
    int bad = 0, rejected_short = 0;

    for (size_t k = 0; k <= len; k++) {
        clear_dir();
        write_whole("00000000000000000009.open", img, k);
        struct cl_writer *w = NULL;
        uint64_t cut = 0;
        int rc = cl_writer_reopen(dirfd_, 2, 9, &w, &cut);
        if (k < CL_SEG_HDR_BYTES) {
            rejected_short += rc == -EBADMSG;
            continue;
        }
        size_t n = complete_in(k);
        if (rc != 0 || cut != k - small_end[n] ||
            cl_writer_records(w) != n || cl_writer_next_seq(w) != 1000 + n ||
            cl_writer_bytes(w) != small_end[n]) {
            bad++;
            printf("# reopen k=%zu rc=%d cut=%" PRIu64 "\n", k, rc, cut);
            cl_writer_free(w);
            continue;
        }
        struct stat st;
        if (fstatat(dirfd_, "00000000000000000009.open", &st, 0) < 0 ||
            (size_t)st.st_size != small_end[n])
            bad++;
        rc = cl_writer_append(w, CL_WRITE, 0, 777, sizeof extra, extra);
        if (rc == 0)
            rc = cl_writer_seal(w);
        cl_writer_free(w);
        memcpy(all, small, sizeof small);
        all[n] = (struct exp_rec){ .kind = CL_WRITE, .offset = 777,
                                   .len = sizeof extra, .data = extra };
        size_t matched;
        bool wrong;
        rc = read_segment("00000000000000000009.log", 2, 1000, all, n + 1,
                          &matched, &wrong);
        if (rc != 0 || wrong || matched != n + 1) {
            bad++;
            printf("# reread k=%zu rc=%d matched=%zu\n", k, rc, matched);
        }
    }
    is_int(rejected_short, CL_SEG_HDR_BYTES,
           "reopen refuses a segment with a torn header");
    is_int(bad, 0, "reopen after a cut at each of %zu offsets cuts exactly "
           "and appends continue", len - CL_SEG_HDR_BYTES + 1);

    /* Wrong disk or cycle in the header. */
    clear_dir();
    write_whole("00000000000000000009.open", img, small_end[2]);
    struct cl_writer *w = NULL;
    is_int(cl_writer_reopen(dirfd_, 3, 9, &w, NULL), -EBADMSG,
           "reopen with a different disk refused");
    free(img);
}

static void
test_bit_flips(void)
{
    clear_dir();
    ok(write_segment(4, 11, 0, small, SMALL_N, true) == 0,
       "write segment for bit flips");
    size_t len;
    uint8_t *img = read_whole("00000000000000000011.log", &len);
    int undetected = 0, wrong_returned = 0;
    size_t flips = 0;
    for (size_t bit = 0; bit < len * 8; bit++) {
        img[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        write_whole("00000000000000000012.log", img, len);
        img[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        size_t matched;
        bool wrong;
        int rc = read_segment("00000000000000000012.log", 4, 0, small,
                              SMALL_N, &matched, &wrong);
        flips++;
        if (wrong)
            wrong_returned++;
        else if (rc >= 0)
            undetected++;
    }
    is_int(wrong_returned, 0, "no flipped record returned (%zu flips)", flips);
    is_int(undetected, 0, "every single-bit flip detected");
    free(img);
}

static void
test_limits(void)
{
    uint8_t b[CL_REC_HDR_BYTES + 64];
    struct cl_rec r = { .kind = CL_WRITE, .len = 8, .offset = 4096, .seq = 1,
                        .data = "abcdefgh" }, g;
    size_t used;

    cl_rec_encode(&r, b);
    memcpy(b + CL_REC_HDR_BYTES, "abcdefgh", 8);
    ok(cl_rec_decode(b, CL_REC_HDR_BYTES + 8, &g, &used) == 0 &&
           used == CL_REC_HDR_BYTES + 8 && g.len == 8 &&
           memcmp(g.data, "abcdefgh", 8) == 0,
       "decode valid write");
    is_int(cl_rec_decode(b, CL_REC_HDR_BYTES + 7, &g, &used), -EAGAIN,
           "short data -> EAGAIN");
    is_int(cl_rec_decode(b, 31, &g, &used), -EAGAIN, "short header -> EAGAIN");

    /* Over-long lengths are patched in after encoding (encode would read
     * that much data); the length check comes before the CRC. */
    cl_rec_encode(&r, b);
    b[8] = 1, b[9] = 0, b[10] = 0, b[11] = 4; /* 64 MiB + 1 */
    is_int(cl_rec_decode(b, CL_REC_HDR_BYTES, &g, &used), -EBADMSG,
           "write len over CL_MAX_DATA_BYTES rejected before data");
    memset(b + 8, 0xff, 4);
    is_int(cl_rec_decode(b, CL_REC_HDR_BYTES, &g, &used), -EBADMSG,
           "write len 4 GiB-1 rejected");
    r.len = 0;
    cl_rec_encode(&r, b);
    is_int(cl_rec_decode(b, sizeof b, &g, &used), -EBADMSG,
           "write len 0 rejected");

    r = (struct cl_rec){ .kind = CL_ZERO, .len = 100,
                         .offset = UINT64_MAX - 10 };
    cl_rec_encode(&r, b);
    is_int(cl_rec_decode(b, sizeof b, &g, &used), -EBADMSG,
           "offset + len overflow rejected");
    r.offset = 1ull << 40;
    r.len = 0xffffffffu;
    cl_rec_encode(&r, b);
    ok(cl_rec_decode(b, sizeof b, &g, &used) == 0 &&
           used == CL_REC_HDR_BYTES && g.data == NULL,
       "zero record carries no data bytes, len is the range");
    r.kind = 5;
    cl_rec_encode(&r, b);
    is_int(cl_rec_decode(b, sizeof b, &g, &used), -EBADMSG,
           "unknown kind 5 rejected");
    r.kind = 0;
    cl_rec_encode(&r, b);
    is_int(cl_rec_decode(b, sizeof b, &g, &used), -EBADMSG,
           "unknown kind 0 rejected");
    r.kind = CL_TRIM;
    r.flags = 0x80;
    cl_rec_encode(&r, b);
    is_int(cl_rec_decode(b, sizeof b, &g, &used), -EBADMSG,
           "unknown flag rejected");
    r = (struct cl_rec){ .kind = CL_SEAL, .len = 4 };
    cl_rec_encode(&r, b);
    is_int(cl_rec_decode(b, sizeof b, &g, &used), -EBADMSG,
           "seal with a length rejected");
    r = (struct cl_rec){ .kind = CL_TRIM, .len = 4 };
    cl_rec_encode(&r, b);
    b[0] ^= 0xff;
    is_int(cl_rec_decode(b, sizeof b, &g, &used), -EBADMSG,
           "bad magic rejected");

    /* Writer-side limits. */
    clear_dir();
    struct cl_writer *w;
    if (cl_writer_create(dirfd_, 0, 1, 0, &w) < 0)
        abort();
    is_int(cl_writer_append(w, CL_WRITE, 0, 0, CL_MAX_DATA_BYTES + 1, b),
           -EINVAL, "append over the limit refused");
    is_int(cl_writer_append(w, CL_WRITE, 0, 0, 0, b), -EINVAL,
           "append of an empty write refused");
    is_int(cl_writer_append(w, CL_SEAL, 0, 0, 0, NULL), -EINVAL,
           "append of a seal record refused");
    is_int(cl_writer_append(w, CL_ZERO, 0, UINT64_MAX - 1, 4, NULL), -EINVAL,
           "append with overflowing range refused");
    /* Data bytes after a zero record are not part of it: the reader sees
     * garbage where the next record should be. */
    ok(cl_writer_append(w, CL_ZERO, 0, 0, 4096, NULL) == 0, "append zero");
    cl_writer_free(w);
    int fd = openat(dirfd_, "00000000000000000001.open", O_WRONLY | O_APPEND);
    if (fd < 0 || io_write_all(fd, "datadatadatadatadatadatadatadata", 32))
        abort();
    close(fd);
    size_t matched;
    bool wrong;
    struct exp_rec z = { .kind = CL_ZERO, .offset = 0, .len = 4096 };
    int rc = read_segment("00000000000000000001.open", 0, 0, &z, 1, &matched,
                          &wrong);
    ok(rc == -EBADMSG && matched == 1 && !wrong,
       "bytes after a zero record rejected");

    /* A header announcing the largest allowed write on a short file. */
    clear_dir();
    if (cl_writer_create(dirfd_, 0, 2, 0, &w) < 0)
        abort();
    cl_writer_free(w);
    r = (struct cl_rec){ .kind = CL_WRITE, .len = CL_MAX_DATA_BYTES,
                         .data = NULL };
    /* Encode by hand: cl_rec_encode would read the data. */
    r.len = 1;
    r.data = "x";
    cl_rec_encode(&r, b);
    b[8] = 0;
    b[9] = 0;
    b[10] = 0;
    b[11] = 4; /* len = 64 MiB, CRC now wrong, but we never get that far */
    fd = openat(dirfd_, "00000000000000000002.open", O_WRONLY | O_APPEND);
    if (fd < 0 || io_write_all(fd, b, CL_REC_HDR_BYTES + 1))
        abort();
    close(fd);
    rc = read_segment("00000000000000000002.open", 0, 0, NULL, 0, &matched,
                      &wrong);
    ok(rc == -EBADMSG && matched == 0 && !wrong,
       "torn 64 MiB record rejected");
}

/* Reserved records may be written in any order (the plugin copies them in
 * parallel); the log order is the reservation order.  A reserved record
 * never written (a crash) ends the segment there at recovery. */
static void
test_parallel_slots(void)
{
    clear_dir();
    static uint8_t a[4096], b[8192], c[100];
    memset(a, 1, sizeof a);
    memset(b, 2, sizeof b);
    memset(c, 3, sizeof c);
    struct cl_writer *w = NULL;
    struct cl_rec r1, r2, r3;
    uint64_t o1 = 0, o2 = 0, o3 = 0;
    int rc = cl_writer_create(dirfd_, 0, 5, 0, &w);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WRITE, 0, 0, sizeof a, a, &r1, &o1);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WRITE, CL_F_FUA, 4096, sizeof b, b, &r2,
                               &o2);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WRITE, 0, 100, sizeof c, c, &r3, &o3);
    is_int(rc, 0, "slots: three reservations");
    ok(o2 == o1 + CL_REC_HDR_BYTES + sizeof a &&
       o3 == o2 + CL_REC_HDR_BYTES + sizeof b,
       "slots: places follow reservation order");
    rc = cl_writer_write(w, &r3, o3);
    if (rc == 0)
        rc = cl_writer_write(w, &r1, o1);
    if (rc == 0)
        rc = cl_writer_write(w, &r2, o2);
    if (rc == 0)
        rc = cl_writer_seal(w);
    cl_writer_free(w);
    is_int(rc, 0, "slots: written in reverse order and sealed");
    char name[32];
    cl_seg_name(5, true, name);
    struct cl_reader *r = NULL;
    struct cl_rec rec;
    int n = 0, good = 0;
    if (cl_reader_open(dirfd_, name, &r) == 0) {
        while (cl_reader_next(r, &rec) == 1) {
            const uint8_t *d = rec.data;
            good += (n == 0 && rec.offset == 0 && rec.len == 4096 && d[0] == 1) ||
                    (n == 1 && rec.offset == 4096 && rec.flags == CL_F_FUA &&
                     d[8191] == 2) ||
                    (n == 2 && rec.offset == 100 && rec.len == 100 &&
                     d[99] == 3);
            n++;
        }
        cl_reader_free(r);
    }
    ok(n == 3 && good == 3, "slots: read back in reservation order");

    /* A hole: the middle record never written. */
    w = NULL;
    rc = cl_writer_create(dirfd_, 0, 6, 3, &w);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WRITE, 0, 0, sizeof a, a, &r1, &o1);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WRITE, 0, 4096, sizeof b, b, &r2, &o2);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WRITE, 0, 100, sizeof c, c, &r3, &o3);
    if (rc == 0)
        rc = cl_writer_write(w, &r1, o1);
    if (rc == 0)
        rc = cl_writer_write(w, &r3, o3);
    is_int(rc, 0, "hole: first and last written");
    struct cl_writer *w2 = NULL;
    uint64_t cut = 0;
    is_int(cl_writer_reopen(dirfd_, 0, 6, &w2, &cut), 0, "hole: reopen");
    is_int(w2 ? cl_writer_records(w2) : 99, 1,
           "hole: recovery keeps the records before the hole only");
    is_int(w2 ? cl_writer_next_seq(w2) : 0, 4, "hole: sequence resumes");
    cl_writer_free(w);
    cl_writer_free(w2);
}

/* A shipped segment renamed to CL_SPARE_NAME becomes the next open segment
 * (same inode); the older records in it are never read back, whether the
 * segment is sealed, closed cleanly, or reopened after a crash. */
static void
test_spare_reuse(void)
{
    clear_dir();
    static uint8_t data[8192];
    memset(data, 0xab, sizeof data);
    struct cl_writer *w = NULL;
    int rc = cl_writer_create(dirfd_, 3, 10, 100, &w);
    for (int i = 0; rc == 0 && i < 20; i++)
        rc = cl_writer_append(w, CL_WRITE, 0, (uint64_t)i * 8192, 8192, data);
    if (rc == 0)
        rc = cl_writer_seal(w);
    uint64_t next = w ? cl_writer_next_seq(w) : 0;
    cl_writer_free(w);
    is_int(rc, 0, "spare: first segment written and sealed");
    char name[32];
    cl_seg_name(10, true, name);
    ok(renameat(dirfd_, name, dirfd_, CL_SPARE_NAME) == 0, "spare: shipped");
    struct stat st0, st1;
    ok(fstatat(dirfd_, CL_SPARE_NAME, &st0, 0) == 0, "spare: exists");

    w = NULL;
    rc = cl_writer_create(dirfd_, 3, 11, next, &w);
    is_int(rc, 0, "spare: next segment created");
    cl_seg_name(11, false, name);
    ok(fstatat(dirfd_, name, &st1, 0) == 0 && st1.st_ino == st0.st_ino,
       "spare: reused as the open segment (same inode)");
    ok(faccessat(dirfd_, CL_SPARE_NAME, F_OK, 0) < 0, "spare: consumed");
    for (int i = 0; rc == 0 && i < 3; i++)
        rc = cl_writer_append(w, CL_ZERO, 0, (uint64_t)i * 4096, 4096, NULL);
    /* A crash now: the file still has the old segment's bytes after the
     * three new records; reopen must see exactly three. */
    uint64_t cut = 0;
    struct cl_writer *w2 = NULL;
    is_int(cl_writer_reopen(dirfd_, 3, 11, &w2, &cut), 0,
           "spare: reopen after a crash");
    is_int(cl_writer_records(w2), 3, "spare: only the new records survive");
    ok(cut > 0, "spare: the older bytes were cut (%llu)",
       (unsigned long long)cut);
    cl_writer_free(w);
    rc = cl_writer_append(w2, CL_TRIM, 0, 0, 512, NULL);
    if (rc == 0)
        rc = cl_writer_seal(w2);
    cl_writer_free(w2);
    is_int(rc, 0, "spare: sealed after reopen");

    struct cl_reader *r = NULL;
    cl_seg_name(11, true, name);
    int n = 0, last = 0;
    struct cl_rec rec;
    if (cl_reader_open(dirfd_, name, &r) == 0) {
        while ((last = cl_reader_next(r, &rec)) == 1)
            n++;
        cl_reader_free(r);
    }
    is_int(last, 0, "spare: sealed segment ends cleanly");
    is_int(n, 4, "spare: sealed segment holds exactly the 4 new records");
    ok(fstatat(dirfd_, name, &st1, 0) == 0 &&
       st1.st_size == CL_SEG_HDR_BYTES + 5 * CL_REC_HDR_BYTES,
       "spare: sealed file is exactly its records");

    /* Closed cleanly without a seal: cut to its records too. */
    cl_seg_name(11, true, name);
    ok(renameat(dirfd_, name, dirfd_, CL_SPARE_NAME) == 0, "spare: again");
    w = NULL;
    is_int(cl_writer_create(dirfd_, 3, 12, next + 4, &w), 0,
           "spare: third segment");
    cl_writer_free(w);
    cl_seg_name(12, false, name);
    ok(fstatat(dirfd_, name, &st1, 0) == 0 && st1.st_size == CL_SEG_HDR_BYTES,
       "spare: clean close leaves the open segment exactly its header");
}

/* Writes logged by reference (CL_WREF) and preserve files. */
static void
test_wref_and_pre(void)
{
    clear_dir();
    struct cl_writer *w = NULL;
    struct cl_rec rec;
    uint64_t off;
    is_int(cl_writer_create(dirfd_, 0, 3, 0, &w), 0, "wref: segment");
    is_int(cl_writer_reserve(w, CL_WREF, 0, 0, 0, NULL, &rec, &off), -EINVAL,
           "wref: empty range refused");
    is_int(cl_writer_reserve(w, CL_WREF, 0, 0, CL_MAX_DATA_BYTES + 1, NULL,
                             &rec, &off), -EINVAL, "wref: over the limit");
    is_int(cl_writer_reserve(w, CL_SEAL, 0, 0, 0, NULL, &rec, &off), -EINVAL,
           "wref: a seal record cannot be reserved");
    is_int(cl_writer_append(w, CL_WREF, 0, 4096, 65536, NULL), 0,
           "wref: appended");
    is_int(cl_writer_bytes(w), CL_SEG_HDR_BYTES + CL_REC_HDR_BYTES,
           "wref: a header and no data");
    cl_writer_free(w);

    /* cl_segment_payload: what the records stand for, across read chunks
     * (5000 headers are more than one 64 KiB chunk) and over data. */
    {
        static uint8_t d7[7000];
        uint64_t want = 0, got = 0;
        int rc = cl_writer_create(dirfd_, 0, 9, 0, &w);
        for (int i = 0; rc == 0 && i < 5000; i++) {
            rc = cl_writer_append(w, CL_WREF, 0, (uint64_t)i * 4096, 4096,
                                  NULL);
            want += CL_REC_HDR_BYTES + 4096;
            if (i == 2500) {
                rc = cl_writer_append(w, CL_WRITE, 0, 0, sizeof d7, d7);
                want += CL_REC_HDR_BYTES + sizeof d7;
                if (rc == 0)
                    rc = cl_writer_append(w, CL_ZERO, 0, 0, 1u << 20, NULL);
                want += CL_REC_HDR_BYTES;
            }
        }
        ok(rc == 0 && cl_writer_payload(w) == want,
           "payload: the writer counts %llu", (unsigned long long)want);
        if (rc == 0)
            rc = cl_writer_seal(w);
        cl_writer_free(w);
        char seg[32];
        cl_seg_name(9, true, seg);
        if (rc == 0)
            rc = cl_segment_payload(dirfd_, seg, &got);
        ok(rc == 0 && got == want, "payload: read back %llu, want %llu",
           (unsigned long long)got, (unsigned long long)want);
    }

    /* A record with an over-limit length fails its header check. */
    uint8_t hb[CL_REC_HDR_BYTES];
    struct cl_rec big = { .kind = CL_WREF, .len = CL_MAX_DATA_BYTES + 1 };
    size_t used;
    cl_rec_encode(&big, hb);
    is_int(cl_rec_decode(hb, sizeof hb, &rec, &used), -EBADMSG,
           "wref: decode refuses an over-limit length");
    big.kind = 6;
    big.len = 1;
    cl_rec_encode(&big, hb);
    is_int(cl_rec_decode(hb, sizeof hb, &rec, &used), -EBADMSG,
           "wref: decode refuses kind 6");

    /* Preserve files: created, appended, reopened with a torn tail cut. */
    static uint8_t data[4096];
    memset(data, 0x5a, sizeof data);
    char name[32];
    cl_pre_name(3, name);
    is_str(name, "00000000000000000003.pre", "pre: name");
    is_int(cl_writer_open_pre(dirfd_, 0, 3, &w), 0, "pre: created");
    is_int(cl_writer_append(w, CL_WRITE, 0, 0, 4096, data), 0, "pre: record");
    is_int(cl_writer_seal_cut(w), -EINVAL, "pre: cannot be sealed");
    cl_writer_free(w);
    int fd = openat(dirfd_, name, O_WRONLY | O_APPEND);
    ok(fd >= 0 && write(fd, data, 100) == 100, "pre: torn tail added");
    close(fd);
    is_int(cl_writer_open_pre(dirfd_, 0, 3, &w), 0, "pre: reopened");
    is_int(cl_writer_records(w), 1, "pre: the good record kept");
    is_int(cl_writer_append(w, CL_WRITE, 0, 8192, 4096, data), 0,
           "pre: appends after the cut");
    cl_writer_free(w);
    struct cl_reader *r = NULL;
    int n = 0, last = -1;
    if (cl_reader_open(dirfd_, name, &r) == 0) {
        while ((last = cl_reader_next(r, &rec)) == 1)
            n++;
        cl_reader_free(r);
    }
    ok(last == 0 && n == 2, "pre: reads back 2 records to a clean end");

    /* A crash while creating one leaves a short header: started again. */
    cl_pre_name(4, name);
    fd = openat(dirfd_, name, O_WRONLY | O_CREAT, 0644);
    ok(fd >= 0 && write(fd, "VRLOG", 5) == 5, "pre: torn header");
    close(fd);
    is_int(cl_writer_open_pre(dirfd_, 0, 4, &w), 0,
           "pre: torn header replaced");
    is_int(cl_writer_bytes(w), CL_SEG_HDR_BYTES, "pre: fresh file");
    cl_writer_free(w);
}

/* Pending records (CL_F_PENDING): written before their change reaches the
 * disk, settled after.  A reopen hands each pending one it keeps to the
 * redo callback, in log order, then settles it; a plain reopen, a sealed
 * segment's reader and cl_rec_decode refuse one. */
struct redo_seen {
    unsigned n;
    uint64_t seq[8];
    uint8_t kind[8];
    uint32_t len[8];
    int fail;
};

static int
redo_cb(void *opaque, const struct cl_rec *rec)
{
    struct redo_seen *s = opaque;
    if (s->n < 8) {
        s->seq[s->n] = rec->seq;
        s->kind[s->n] = rec->kind;
        s->len[s->n] = rec->len;
    }
    s->n++;
    return s->fail;
}

static void
test_pending(void)
{
    clear_dir();
    static uint8_t a[4096];
    memset(a, 0x5a, sizeof a);
    struct cl_writer *w = NULL;
    struct cl_rec r1, r2, r3, r4;
    uint64_t o1, o2, o3, o4;
    int rc = cl_writer_create(dirfd_, 1, 20, 50, &w);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_ZERO, 0, 0, 8192, NULL, &r1, &o1);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WRITE, CL_F_FUA, 8192, sizeof a, a, &r2,
                               &o2);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_TRIM, 0, 65536, 512, NULL, &r3, &o3);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_WREF, 0, 1 << 20, 4096, NULL, &r4, &o4);
    r1.flags |= CL_F_PENDING;
    r2.flags |= CL_F_PENDING;
    r3.flags |= CL_F_PENDING;
    if (rc == 0)
        rc = cl_writer_write(w, &r1, o1);
    if (rc == 0)
        rc = cl_writer_write(w, &r2, o2);
    if (rc == 0)
        rc = cl_writer_write(w, &r3, o3);
    if (rc == 0)
        rc = cl_writer_write(w, &r4, o4);
    /* The trim is done: settled.  The zero and the write are in flight. */
    if (rc == 0)
        rc = cl_writer_settle(w, &r3, o3);
    is_int(rc, 0, "pending: three pending records written, one settled");

    size_t len;
    char name[32];
    cl_seg_name(20, false, name);
    uint8_t *raw = read_whole(name, &len);
    struct cl_rec g;
    size_t used;
    is_int(cl_rec_decode(raw + o1, len - o1, &g, &used), -EBADMSG,
           "pending: cl_rec_decode refuses a pending record");
    ok(cl_rec_decode(raw + o3, len - o3, &g, &used) == 0 && g.kind == CL_TRIM,
       "pending: a settled record decodes");
    free(raw);

    struct cl_writer *w2 = NULL;
    is_int(cl_writer_reopen(dirfd_, 1, 20, &w2, NULL), -EBADMSG,
           "pending: a plain reopen refuses a pending record");
    cl_writer_free(w2);
    w2 = NULL;

    struct redo_seen seen = { .fail = -EIO };
    is_int(cl_writer_reopen_redo(dirfd_, 1, 20, redo_cb, &seen, &w2, NULL),
           -EIO, "pending: a failed redo fails the reopen");
    cl_writer_free(w2);
    w2 = NULL;

    memset(&seen, 0, sizeof seen);
    uint64_t cut = 99;
    is_int(cl_writer_reopen_redo(dirfd_, 1, 20, redo_cb, &seen, &w2, &cut), 0,
           "pending: reopen with redo");
    ok(seen.n == 2 && seen.seq[0] == 50 && seen.kind[0] == CL_ZERO &&
       seen.len[0] == 8192 && seen.seq[1] == 51 && seen.kind[1] == CL_WRITE &&
       seen.len[1] == sizeof a,
       "pending: the zero and the write are redone, in log order (%u)",
       seen.n);
    is_int(w2 ? cl_writer_records(w2) : 0, 4, "pending: all four kept");
    cl_writer_free(w2);
    w2 = NULL;

    memset(&seen, 0, sizeof seen);
    is_int(cl_writer_reopen_redo(dirfd_, 1, 20, redo_cb, &seen, &w2, NULL), 0,
           "pending: reopen again");
    is_int(seen.n, 0, "pending: nothing left to redo: they were settled");
    if (w2 && cl_writer_seal(w2) == 0) {
        struct cl_reader *rd = NULL;
        int n = 0;
        cl_seg_name(20, true, name);
        rc = cl_reader_open(dirfd_, name, &rd);
        while (rc == 0 && (rc = cl_reader_next(rd, &g)) == 1) {
            rc = 0;
            n++;
        }
        cl_reader_free(rd);
        ok(rc == 0 && n == 4, "pending: sealed afterwards, reads whole");
    } else {
        ok(0, "pending: sealed afterwards");
    }
    cl_writer_free(w2);
    cl_writer_free(w);

    /* A pending record after the first hole is cut, not redone: its
     * request could not have changed the disk (the plugin's rule). */
    clear_dir();
    w = NULL;
    rc = cl_writer_create(dirfd_, 1, 21, 0, &w);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_ZERO, 0, 0, 512, NULL, &r1, &o1);
    if (rc == 0)
        rc = cl_writer_reserve(w, CL_ZERO, 0, 4096, 512, NULL, &r2, &o2);
    r2.flags |= CL_F_PENDING;
    if (rc == 0)
        rc = cl_writer_write(w, &r2, o2);
    memset(&seen, 0, sizeof seen);
    w2 = NULL;
    if (rc == 0)
        rc = cl_writer_reopen_redo(dirfd_, 1, 21, redo_cb, &seen, &w2, NULL);
    ok(rc == 0 && seen.n == 0 && cl_writer_records(w2) == 0,
       "pending: after a hole, cut and not redone");
    cl_writer_free(w2);
    cl_writer_free(w);
}

int
main(void)
{
    plan_no_plan();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test-changelog.XXXXXX");
    if (!mkdtemp(tmpdir))
        abort();
    dirfd_ = open(tmpdir, O_RDONLY | O_DIRECTORY);
    if (dirfd_ < 0)
        abort();

    test_crc32c();
    test_seg_hdr();
    test_round_trip();
    make_small();
    test_truncation();
    test_reopen();
    test_bit_flips();
    test_limits();
    test_parallel_slots();
    test_spare_reuse();
    test_wref_and_pre();
    test_pending();
    diag("again with records copied through a mapping (logio=mmap)");
    cl_writer_use_mmap(CL_MMAP_ALL);
    test_round_trip();
    test_parallel_slots();
    test_spare_reuse();
    test_pending();
    diag("again with only records without data mapped (logio=auto)");
    cl_writer_use_mmap(CL_MMAP_NODATA);
    test_round_trip();
    test_parallel_slots();
    test_spare_reuse();
    test_wref_and_pre();
    test_pending();
    cl_writer_use_mmap(CL_MMAP_OFF);

    clear_dir();
    close(dirfd_);
    rmdir(tmpdir);
    free_recs(small, SMALL_N);
    return done_testing();
}
