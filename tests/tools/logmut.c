/* logmut.c: seeded mutations of real change-log segments and cycle
 * payloads, fed to the real decoders (docs/reliability.md, "Log
 * mutations").  A test tool, not installed.
 *
 *   logmut seg FILE N SEED [DISK]
 *   logmut cycle LOGDIR CYCLE DISK REPLICA N SEED
 *
 * seg: FILE is a segment (.log, .open) or preserve file (.pre) that reads
 * cleanly.  Each of N mutations (bit flips, byte overwrites, a zeroed
 * 512-byte sector, truncation, a record duplicated, two records swapped,
 * a length or offset field set huge with its CRC recomputed, a kind
 * changed) is written to a scratch directory under the original's name and
 * read with cl_reader (what recovery and the shipper use); an .open
 * segment is also reopened with cl_writer_reopen_redo (what the plugin
 * does at start-up).  Detected: the reader fails, or yields a strict prefix
 * of the original records (a torn tail cut).  With DISK, a sealed segment
 * also gets records rewritten with a valid CRC and a length or offset
 * beyond the disk: the reader cannot know the disk's size, so such a one
 * is detected if the cycle built from it (the shipper's builder) is
 * refused by the Replica server's decoder, which knows it.  Applied: it yields any record
 * the original does not hold at that place, or more records.
 *
 * cycle: builds sealed CYCLE of LOGDIR the way the shipper does
 * (cycapply), raw and zstd-compressed, and applies the clean payload to a
 * copy of REPLICA to get the expected image.  Each mutation of the raw or
 * the compressed payload goes through the Replica server's path: the
 * streaming cyc_decoder (fed in random pieces, disk sizes set) into a
 * staging file, then, only if accepted, cyc_apply_file onto a fresh copy
 * of REPLICA.  Detected: the decoder or the applier refuses it and the
 * copy is unchanged.  Applied: the copy ends different from the clean
 * result, or the header decoded differs.  Accepted with the clean result
 * (a swap of two records on distinct blocks) counts as "inert".
 *
 * Prints "tried T detected D inert I applied A" and exits 1 if A > 0 or a
 * detected mutation changed the replica.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "changelog.h"
#include "cycle.h"

#define MAX_RECS 200000

static uint64_t rng_state;

static uint64_t
rnd(void)
{
    /* splitmix64: small, seeded, reproducible. */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t
below(uint64_t n)
{
    return n ? rnd() % n : 0;
}

static void
die(const char *what)
{
    fprintf(stderr, "logmut: %s: %s\n", what,
            vr_errmsg()[0] ? vr_errmsg() : strerror(errno));
    exit(2);
}

static uint8_t *
read_all(int fd, size_t *len)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat");
    uint8_t *b = malloc((size_t)st.st_size + 1);
    if (!b || pread(fd, b, (size_t)st.st_size, 0) != st.st_size)
        die("read");
    *len = (size_t)st.st_size;
    return b;
}

static void
write_all(int fd, const void *b, size_t len)
{
    if (ftruncate(fd, 0) < 0 || (len && pwrite(fd, b, len, 0) != (ssize_t)len))
        die("write");
}

/* One record as a reader or the payload walk saw it. */
struct rec {
    uint8_t kind, flags;
    uint16_t disk;
    uint32_t len;
    uint64_t offset, seq;
    uint32_t dsum; /* FNV-1a of the data, CL_WRITE */
    uint64_t at, size; /* place in the file (original only) */
};

static uint32_t
fnv(const void *p, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ ((const uint8_t *)p)[i]) * 16777619u;
    return h;
}

static void
rec_from(struct rec *o, const struct cl_rec *r)
{
    *o = (struct rec){ .kind = r->kind, .flags = r->flags, .disk = r->disk,
                       .len = r->len, .offset = r->offset, .seq = r->seq };
    if (r->kind == CL_WRITE && r->data)
        o->dsum = fnv(r->data, r->len);
}

static bool
rec_eq(const struct rec *a, const struct rec *b)
{
    return a->kind == b->kind && a->flags == b->flags && a->disk == b->disk &&
           a->len == b->len && a->offset == b->offset && a->seq == b->seq &&
           a->dsum == b->dsum;
}

/* --- mutations --------------------------------------------------------- */

enum { M_FLIP, M_BYTES, M_SECTOR, M_TRUNC, M_DUP, M_SWAP, M_HUGELEN,
       M_HUGEOFF, M_KIND, M_COUNT };
static const char *mname[M_COUNT] = { "flip", "bytes", "sector", "trunc",
                                      "dup", "swap", "hugelen", "hugeoff",
                                      "kind" };

/* Rewrite the record header at p with one field changed and its CRC
 * recomputed, so only the decoder's bounds checks can catch it. */
static bool allow_recrc = true;

static bool
recrc(uint8_t *p, const struct rec *o, int field, uint64_t v)
{
    if (!allow_recrc || o->kind == CL_WRITE || o->kind == CL_SEAL)
        return false; /* data CRC would not match: plain corruption */
    struct cl_rec r = { .kind = o->kind, .flags = o->flags, .disk = o->disk,
                        .len = o->len, .offset = o->offset, .seq = o->seq };
    if (field == 0)
        r.len = (uint32_t)v;
    else
        r.offset = v;
    cl_rec_encode(&r, p);
    return true;
}

/* Mutate b (len bytes, the records in recs[0..n) starting at base) into
 * out; returns the new length, or SIZE_MAX if this kind does not apply.
 * used: end of the meaningful bytes (after the last record). */
static size_t
mutate(int kind, const uint8_t *b, size_t len, size_t used,
       const struct rec *recs, size_t n, uint8_t *out)
{
    memcpy(out, b, len);
    size_t i = n ? below(n) : 0;
    switch (kind) {
    case M_FLIP: {
        unsigned k = 1 + (unsigned)below(3);
        for (unsigned j = 0; j < k; j++) {
            size_t at = below(used);
            out[at] ^= (uint8_t)(1u << below(8));
        }
        return len;
    }
    case M_BYTES: {
        size_t at = below(used), k = 1 + below(32);
        for (size_t j = 0; j < k && at + j < len; j++)
            out[at + j] = (uint8_t)rnd();
        return len;
    }
    case M_SECTOR: {
        size_t at = below(used) & ~(size_t)511;
        memset(out + at, 0, at + 512 <= len ? 512 : len - at);
        return len;
    }
    case M_TRUNC:
        return below(used);
    case M_DUP: {
        if (!n || recs[i].kind == CL_SEAL)
            return SIZE_MAX;
        size_t end = recs[i].at + recs[i].size;
        memcpy(out + end, b + recs[i].at, recs[i].size);
        memcpy(out + end + recs[i].size, b + end, len - end);
        return len + recs[i].size;
    }
    case M_SWAP: {
        if (n < 2 || i + 1 >= n || recs[i + 1].kind == CL_SEAL)
            return SIZE_MAX;
        const struct rec *x = &recs[i], *y = &recs[i + 1];
        memcpy(out + x->at, b + y->at, y->size);
        memcpy(out + x->at + y->size, b + x->at, x->size);
        return len;
    }
    case M_HUGELEN: {
        static const uint64_t huge[] = { 0xffffffffu, 0x80000000u,
                                         CL_MAX_DATA_BYTES + 1u, 0x10000000u };
        uint64_t v = huge[below(4)];
        if (!n)
            return SIZE_MAX;
        if (below(2) == 0 && recrc(out + recs[i].at, &recs[i], 0, v))
            return len;
        memcpy(out + recs[i].at + 8, &(uint32_t){ (uint32_t)v }, 4);
        return len;
    }
    case M_HUGEOFF: {
        static const uint64_t huge[] = { UINT64_MAX - 511, 1ull << 62,
                                         1ull << 50, (1ull << 40) + 4096 };
        uint64_t v = huge[below(4)];
        if (!n)
            return SIZE_MAX;
        if (below(2) == 0 && recrc(out + recs[i].at, &recs[i], 1, v))
            return len;
        memcpy(out + recs[i].at + 16, &v, 8);
        return len;
    }
    case M_KIND:
        if (!n)
            return SIZE_MAX;
        out[recs[i].at + 4] = (uint8_t)(recs[i].kind ^ (1 + below(7)));
        return len;
    }
    return SIZE_MAX;
}

/* --- segments ---------------------------------------------------------- */

static int build(int dirfd, uint64_t cycle, int disk, bool compress, int out);
static int receive(const uint8_t *p, size_t len, bool compressed,
                   uint64_t size, int rep, struct cyc_hdr *hdr);
static int memfd_copy(const uint8_t *b, size_t len);

/* A sealed segment whose records all read but differ from the original
 * (a record rewritten with a valid CRC and a length or offset beyond the
 * disk, which the reader cannot know): what the shipper and the Replica
 * server then do with it.  True if the cycle built from it is refused
 * before anything reaches the replica. */
static bool
refused_downstream(int sdir, const char *name, int disk)
{
    struct stat st;
    int out = memfd_create("payload", MFD_CLOEXEC);
    if (out < 0 || fstat(disk, &st) < 0)
        die("downstream");
    bool refused = build(sdir, strtoull(name, NULL, 10), disk, false,
                         out) < 0;
    if (!refused) {
        size_t plen;
        uint8_t *p = read_all(out, &plen);
        size_t zl = (size_t)st.st_size;
        uint8_t *zero = calloc(1, zl + 1);
        int rep = memfd_copy(zero, zl);
        struct cyc_hdr h;
        refused = receive(p, plen, false, (uint64_t)st.st_size, rep,
                          &h) == -1;
        free(p);
        free(zero);
        close(rep);
    }
    close(out);
    vr_err_clear();
    return refused;
}

/* Read name in dirfd with cl_reader into recs; returns the reader's last
 * result (0 clean end, <0 error) and *n. */
static int
read_seg(int dirfd, const char *name, struct rec *recs, size_t *n,
         bool want_at)
{
    struct cl_reader *r = NULL;
    *n = 0;
    int rc = cl_reader_open(dirfd, name, &r);
    if (rc < 0)
        return rc;
    struct cl_rec cr;
    uint64_t at = CL_SEG_HDR_BYTES;
    while ((rc = cl_reader_next(r, &cr)) == 1) {
        if (*n == MAX_RECS) {
            rc = -E2BIG;
            break;
        }
        rec_from(&recs[*n], &cr);
        if (want_at) {
            recs[*n].at = at;
            recs[*n].size = CL_REC_HDR_BYTES +
                            (cr.kind == CL_WRITE ? cr.len : 0);
            at += recs[*n].size;
        }
        (*n)++;
    }
    cl_reader_free(r);
    return rc;
}

static int redo_count;

static int
count_redo(void *opaque, const struct cl_rec *rec)
{
    (void)opaque;
    (void)rec;
    redo_count++;
    return 0;
}

static int
cmd_seg(const char *path, unsigned long iters, int disk)
{
    char *slash = strrchr(path, '/');
    const char *name = slash ? slash + 1 : path;
    char dir[4096];
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) : 1,
             slash ? path : ".");
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (dirfd < 0 || fd < 0)
        die(path);
    size_t len;
    uint8_t *b = read_all(fd, &len);
    close(fd);
    bool open_seg = strstr(name, ".open") != NULL;
    bool sealed = strstr(name, ".log") != NULL;
    /* Fields rewritten with a valid CRC: only where the cycle built from
     * the segment can be checked against the disk's size. */
    allow_recrc = sealed && disk >= 0;
    unsigned long downstream = 0;

    static struct rec orig[MAX_RECS], got[MAX_RECS];
    size_t norig, ngot;
    int rc = read_seg(dirfd, name, orig, &norig, true);
    if (rc != 0) {
        fprintf(stderr, "logmut: %s does not read cleanly: %s\n", path,
                vr_errmsg());
        return 2;
    }
    size_t used = CL_SEG_HDR_BYTES;
    for (size_t i = 0; i < norig; i++)
        used = orig[i].at + orig[i].size;
    if (sealed) {
        /* The CL_SEAL record the reader checks but does not return. */
        orig[norig] = (struct rec){ .kind = CL_SEAL, .at = used,
                                    .size = CL_REC_HDR_BYTES };
        used += CL_REC_HDR_BYTES;
    }
    size_t nplaces = norig + sealed;

    char tmpl[] = "/tmp/logmut.XXXXXX";
    const char *scratch = mkdtemp(tmpl);
    if (!scratch)
        die("mkdtemp");
    int sdir = open(scratch, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    uint8_t *out = malloc(len * 2 + 64);
    unsigned long tried = 0, detected = 0, applied = 0, by[M_COUNT] = { 0 };
    for (unsigned long it = 0; it < iters; it++) {
        int kind = (int)below(M_COUNT);
        size_t mlen = mutate(kind, b, len, used, orig, nplaces, out);
        if (mlen == SIZE_MAX || (mlen == len && !memcmp(out, b, len))) {
            it--; /* not applicable or no change: draw again */
            continue;
        }
        tried++;
        int wfd = openat(sdir, name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC,
                         0600);
        if (wfd < 0)
            die("scratch");
        write_all(wfd, out, mlen);
        close(wfd);
        rc = read_seg(sdir, name, got, &ngot, false);
        bool bad = ngot > norig;
        for (size_t i = 0; i < ngot && !bad; i++)
            bad = !rec_eq(&got[i], &orig[i]);
        bool ok = !bad && (rc < 0 || ngot < norig);
        if (!bad && open_seg) {
            /* The plugin's path at start-up: reopen, cut, redo pending. */
            struct cl_writer *w = NULL;
            uint64_t cut = 0;
            redo_count = 0;
            int rrc = cl_writer_reopen_redo(sdir, orig[0].disk,
                                            strtoull(name, NULL, 10),
                                            count_redo, NULL, &w, &cut);
            cl_writer_free(w);
            if (rrc == 0) {
                /* What the reopened segment now holds is what recovery
                 * keeps: it must be a prefix too. */
                rc = read_seg(sdir, name, got, &ngot, false);
                for (size_t i = 0; i < ngot && !bad; i++)
                    bad = !rec_eq(&got[i], &orig[i]);
                bad = bad || ngot > norig;
            }
        }
        vr_err_clear();
        if (bad && sealed && ngot == norig && rc == 0 &&
            refused_downstream(sdir, name, disk)) {
            downstream++;
            detected++;
            by[kind]++;
        } else if (bad) {
            applied++;
            fprintf(stderr, "logmut: %s: mutation %lu (%s) applied: %zu "
                    "records read, %zu in the original\n", path, it,
                    mname[kind], ngot, norig);
        } else if (ok) {
            detected++;
            by[kind]++;
        } else {
            applied++;
            fprintf(stderr, "logmut: %s: mutation %lu (%s) not detected\n",
                    path, it, mname[kind]);
        }
    }
    unlinkat(sdir, name, 0);
    rmdir(scratch);
    printf("seg %s records %zu tried %lu detected %lu inert 0 applied %lu "
           "(of the detected, %lu by the Replica server's decoder)\n",
           name, norig, tried, detected, applied, downstream);
    free(out);
    free(b);
    return applied ? 1 : 0;
}

/* --- cycle payloads ---------------------------------------------------- */

struct walk {
    struct rec *recs;
    size_t n;
};

static int
walk_rec(const struct cl_rec *r, uint64_t file_off, void *arg)
{
    struct walk *w = arg;
    if (w->n == MAX_RECS)
        return -E2BIG;
    rec_from(&w->recs[w->n], r);
    w->recs[w->n].at = file_off;
    w->recs[w->n].size = CL_REC_HDR_BYTES + (r->kind == CL_WRITE ? r->len : 0);
    w->n++;
    return 0;
}

static int
build(int dirfd, uint64_t cycle, int disk, bool compress, int out)
{
    struct cyc_hdr h = { .version = CYC_VERSION, .cycle = cycle, .ndisks = 1,
                         .epoch = 3 };
    struct cyc_builder *bld = NULL;
    char name[32];
    uint64_t raw, wire;
    cl_seg_name(cycle, true, name);
    int rc = cyc_builder_new(out, compress, 1, &h, &bld);
    if (rc == 0)
        rc = cyc_builder_add_segment_ref(bld, dirfd, name, 0, disk);
    if (rc == 0)
        rc = cyc_builder_finish(bld, &raw, &wire);
    cyc_builder_free(bld);
    return rc;
}

/* The Replica server's path for one payload: decode into a staging file,
 * then apply it to rep (a copy of the base).  Returns 0 if applied,
 * -1 if refused by the decoder, -2 if refused by the applier. */
static int
receive(const uint8_t *p, size_t len, bool compressed, uint64_t size,
        int rep, struct cyc_hdr *hdr)
{
    int stage = memfd_create("stage", MFD_CLOEXEC);
    struct cyc_decoder *d = NULL;
    uint64_t nrec, raw;
    if (stage < 0 || cyc_decoder_new(compressed, 64u << 20, stage, &d) < 0)
        die("decoder");
    cyc_decoder_set_disk_sizes(d, &size, 1);
    int rc = 0;
    for (size_t at = 0; at < len && rc == 0;) {
        size_t k = 1 + below(len - at < 9000 ? len - at : 9000);
        rc = cyc_decoder_feed(d, p + at, k);
        at += k;
    }
    if (rc == 0)
        rc = cyc_decoder_finish(d, hdr, &nrec, &raw);
    cyc_decoder_free(d);
    if (rc < 0) {
        close(stage);
        return -1;
    }
    uint64_t sz = size;
    rc = cyc_apply_file(stage, &rep, &sz, 1, &nrec);
    close(stage);
    return rc < 0 ? -2 : 0;
}

static int
memfd_copy(const uint8_t *b, size_t len)
{
    int fd = memfd_create("replica", MFD_CLOEXEC);
    if (fd < 0)
        die("memfd");
    write_all(fd, b, len);
    return fd;
}

static int
cmd_cycle(const char *logdir, uint64_t cycle, const char *diskp,
          const char *replicap, unsigned long iters)
{
    int dirfd = open(logdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int disk = open(diskp, O_RDONLY | O_CLOEXEC);
    int repfd = open(replicap, O_RDONLY | O_CLOEXEC);
    int rawfd = memfd_create("raw", MFD_CLOEXEC);
    int zfd = memfd_create("wire", MFD_CLOEXEC);
    if (dirfd < 0 || disk < 0 || repfd < 0 || rawfd < 0 || zfd < 0)
        die("open");
    if (build(dirfd, cycle, disk, false, rawfd) < 0 ||
        build(dirfd, cycle, disk, true, zfd) < 0)
        die("build");
    size_t rawlen, zlen, replen;
    uint8_t *raw = read_all(rawfd, &rawlen), *z = read_all(zfd, &zlen);
    uint8_t *base = read_all(repfd, &replen);

    static struct rec recs[MAX_RECS];
    struct walk w = { recs, 0 };
    struct cyc_hdr h0;
    if (cyc_payload_foreach(rawfd, 1, &h0, walk_rec, &w) < 0)
        die("walk");
    /* The seal record, last, for structural mutations. */
    recs[w.n] = (struct rec){ .kind = CL_SEAL, .at = rawlen - CL_REC_HDR_BYTES,
                              .size = CL_REC_HDR_BYTES };

    int rep = memfd_copy(base, replen);
    struct cyc_hdr h;
    if (receive(raw, rawlen, false, replen, rep, &h) < 0)
        die("clean payload refused");
    size_t explen;
    uint8_t *expect = read_all(rep, &explen);
    close(rep);

    uint8_t *out = malloc(rawlen * 2 + zlen + 64);
    unsigned long tried = 0, detected = 0, inert = 0, applied = 0;
    unsigned long inert_by[M_COUNT] = { 0 };
    for (unsigned long it = 0; it < iters; it++) {
        bool compressed = below(3) == 0;
        int kind = (int)below(M_COUNT);
        size_t mlen;
        if (compressed) {
            if (kind >= M_DUP)
                kind = (int)below(M_DUP);
            mlen = mutate(kind, z, zlen, zlen, NULL, 0, out);
        } else {
            mlen = mutate(kind, raw, rawlen, rawlen, recs, w.n + 1, out);
        }
        const uint8_t *src = compressed ? z : raw;
        size_t srclen = compressed ? zlen : rawlen;
        if (mlen == SIZE_MAX || (mlen == srclen && !memcmp(out, src, mlen))) {
            it--;
            continue;
        }
        tried++;
        rep = memfd_copy(base, replen);
        int rc = receive(out, mlen, compressed, replen, rep, &h);
        size_t glen;
        uint8_t *got = read_all(rep, &glen);
        close(rep);
        vr_err_clear();
        if (rc < 0 && glen == replen && !memcmp(got, base, replen)) {
            detected++;
        } else if (rc == 0 && glen == explen && !memcmp(got, expect, glen) &&
                   h.cycle == h0.cycle && h.epoch == h0.epoch &&
                   h.flags == h0.flags && h.ndisks == h0.ndisks) {
            inert++;
            inert_by[kind]++;
        } else {
            applied++;
            fprintf(stderr, "logmut: cycle %" PRIu64 ": mutation %lu (%s, %s) "
                    "%s\n", cycle, it, mname[kind],
                    compressed ? "compressed" : "raw",
                    rc == -2 ? "refused by the applier after changing the "
                               "replica" : "accepted with a different result");
        }
        free(got);
    }
    printf("cycle %" PRIu64 " records %zu tried %lu detected %lu inert %lu "
           "applied %lu (inert:", cycle, w.n, tried, detected, inert, applied);
    for (int k = 0; k < M_COUNT; k++)
        if (inert_by[k])
            printf(" %s %lu", mname[k], inert_by[k]);
    printf(")\n");
    return applied ? 1 : 0;
}

int
main(int argc, char **argv)
{
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "seg") == 0) {
        rng_state = strtoull(argv[4], NULL, 10);
        int disk = argc == 6 ? open(argv[5], O_RDONLY | O_CLOEXEC) : -1;
        if (argc == 6 && disk < 0)
            die(argv[5]);
        return cmd_seg(argv[2], strtoul(argv[3], NULL, 10), disk);
    }
    if (argc == 8 && strcmp(argv[1], "cycle") == 0) {
        rng_state = strtoull(argv[7], NULL, 10);
        return cmd_cycle(argv[2], strtoull(argv[3], NULL, 10), argv[4],
                         argv[5], strtoul(argv[6], NULL, 10));
    }
    fprintf(stderr, "usage: logmut seg FILE N SEED [DISK]\n"
                    "       logmut cycle LOGDIR CYCLE DISK REPLICA N SEED\n");
    return 2;
}
