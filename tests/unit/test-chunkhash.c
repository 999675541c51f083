/* test-chunkhash.c: unit tests of lib/chunkhash.c — hashes against a plain
 * read-everything reference on sparse files, allocation never changing a
 * hash, one changed byte changing exactly its chunk, holes never read, the
 * request bounds and the hex form.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "chunkhash.h"
#include "tap.h"
#include "testrand.h"

#define MIB (1u << 20)

static char tmpdir[] = "/tmp/test-chunkhash.XXXXXX";

static void
bail(const char *what)
{
    printf("Bail out! %s: %m\n", what);
    exit(1);
}

static int
tmpfile_named(const char *name)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        bail(p);
    return fd;
}

/* The reference: read every byte of each chunk and hash it in one go. */
static void
reference(int fd, uint64_t size, uint64_t off, uint64_t len, uint64_t chunk,
          uint8_t *out)
{
    uint64_t n = chunkhash_count(size, off, len, chunk);
    uint8_t *buf = malloc(chunk);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t p = off + i * chunk;
        uint64_t k = size - p < chunk ? size - p : chunk;
        if (pread(fd, buf, k, (off_t)p) != (ssize_t)k)
            bail("pread");
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits(buf, k));
        memcpy(out + i * CHUNKHASH_BYTES, c.digest, CHUNKHASH_BYTES);
    }
    free(buf);
}

/* A sparse file of size bytes: random data runs, some punched again. */
static int
make_sparse(const char *name, uint64_t size)
{
    int fd = tmpfile_named(name);
    if (ftruncate(fd, (off_t)size) < 0)
        bail("ftruncate");
    uint8_t *buf = malloc(3 * MIB);
    for (int i = 0; i < 12; i++) {
        uint64_t len = 1 + rng() % (3 * MIB);
        uint64_t off = rng() % size;
        if (off + len > size)
            len = size - off;
        for (uint64_t k = 0; k < len; k++)
            buf[k] = (uint8_t)rng();
        if (pwrite(fd, buf, len, (off_t)off) != (ssize_t)len)
            bail("pwrite");
    }
    for (int i = 0; i < 4; i++) {
        uint64_t off = rng() % size, len = rng() % MIB;
        (void)fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        (off_t)off, (off_t)len);
    }
    free(buf);
    return fd;
}

/* A fully allocated copy of src (zeroes written, not holes). */
static int
make_dense_copy(int src, uint64_t size)
{
    int fd = tmpfile_named("dense");
    uint8_t *buf = malloc(MIB);
    for (uint64_t p = 0; p < size; p += MIB) {
        size_t k = size - p < MIB ? size - p : MIB;
        if (pread(src, buf, k, (off_t)p) != (ssize_t)k ||
            pwrite(fd, buf, k, (off_t)p) != (ssize_t)k)
            bail("copy");
    }
    free(buf);
    return fd;
}

static void
test_against_reference(void)
{
    uint64_t size = 9 * MIB + 12345;
    int fd = make_sparse("sparse", size);
    const uint64_t chunks[] = { CHUNKHASH_FINE, CHUNKHASH_COARSE, 4096 };
    for (size_t c = 0; c < sizeof chunks / sizeof *chunks; c++) {
        uint64_t chunk = chunks[c];
        for (int t = 0; t < 6; t++) {
            uint64_t n0 = chunkhash_count(size, 0, size, chunk);
            uint64_t first = t == 0 ? 0 : rng() % n0;
            uint64_t off = first * chunk;
            uint64_t len = t == 0 ? size : 1 + rng() % (size - off + chunk);
            uint64_t n = chunkhash_count(size, off, len, chunk);
            if (n > CHUNKHASH_MAX_COUNT) {
                len = CHUNKHASH_MAX_COUNT * chunk;
                n = CHUNKHASH_MAX_COUNT;
            }
            uint8_t *a = malloc(n * CHUNKHASH_BYTES);
            uint8_t *b = malloc(n * CHUNKHASH_BYTES);
            reference(fd, size, off, len, chunk, a);
            is_int(chunkhash_fd(fd, size, off, len, chunk, b, NULL), 0,
                   "hash chunk %llu from %llu, %llu bytes",
                   (unsigned long long)chunk, (unsigned long long)off,
                   (unsigned long long)len);
            ok(memcmp(a, b, n * CHUNKHASH_BYTES) == 0,
               "  %llu hashes equal the reference", (unsigned long long)n);
            free(a);
            free(b);
        }
    }

    /* The same bytes allocated differently hash the same. */
    int dense = make_dense_copy(fd, size);
    uint64_t n = chunkhash_count(size, 0, size, CHUNKHASH_FINE);
    uint8_t *a = malloc(n * CHUNKHASH_BYTES), *b = malloc(n * CHUNKHASH_BYTES);
    uint64_t ra = 0, rb = 0;
    is_int(chunkhash_fd(fd, size, 0, size, CHUNKHASH_FINE, a, &ra), 0,
           "hash the sparse file");
    is_int(chunkhash_fd(dense, size, 0, size, CHUNKHASH_FINE, b, &rb), 0,
           "hash its dense copy");
    ok(memcmp(a, b, n * CHUNKHASH_BYTES) == 0,
       "a sparse file and its dense copy have the same hashes");
    is_int(rb, size, "the dense copy is read whole");
    ok(ra < size, "the sparse file's holes are not read (%llu of %llu)",
       (unsigned long long)ra, (unsigned long long)size);

    /* One changed byte changes its chunk's hash and no other. */
    uint64_t at = rng() % size;
    uint8_t byte;
    if (pread(dense, &byte, 1, (off_t)at) != 1)
        bail("pread");
    byte ^= 0x5a;
    if (pwrite(dense, &byte, 1, (off_t)at) != 1)
        bail("pwrite");
    is_int(chunkhash_fd(dense, size, 0, size, CHUNKHASH_FINE, b, NULL), 0,
           "hash after changing byte %llu", (unsigned long long)at);
    uint64_t differ = 0, which = 0;
    for (uint64_t i = 0; i < n; i++)
        if (memcmp(a + i * CHUNKHASH_BYTES, b + i * CHUNKHASH_BYTES,
                   CHUNKHASH_BYTES)) {
            differ++;
            which = i;
        }
    is_int(differ, 1, "exactly one chunk differs");
    is_int(which, at / CHUNKHASH_FINE, "the chunk holding the byte");
    free(a);
    free(b);
    close(dense);
    close(fd);
}

static void
test_all_hole(void)
{
    uint64_t size = 64ull << 30; /* 64 GiB of nothing */
    int fd = tmpfile_named("hole");
    if (ftruncate(fd, (off_t)size) < 0)
        bail("ftruncate");
    uint64_t n = CHUNKHASH_MAX_RANGE / CHUNKHASH_MAX, rd = 0;
    uint8_t *h = malloc(n * CHUNKHASH_BYTES);
    uint64_t off = size - n * (uint64_t)CHUNKHASH_MAX;
    is_int(chunkhash_fd(fd, size, off, n * (uint64_t)CHUNKHASH_MAX,
                        CHUNKHASH_MAX, h, &rd),
           0, "hash the last GiB of a 64 GiB hole in 16 MiB chunks");
    is_int(rd, 0, "nothing read");
    uint8_t *z = calloc(1, CHUNKHASH_MAX);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(z, CHUNKHASH_MAX));
    ok(memcmp(h, c.digest, CHUNKHASH_BYTES) == 0 &&
           memcmp(h + (n - 1) * CHUNKHASH_BYTES, c.digest,
                  CHUNKHASH_BYTES) == 0,
       "each is the hash of 16 MiB of zeroes");
    free(z);
    free(h);
    close(fd);
}

static void
test_bounds(void)
{
    uint64_t size = 10 * MIB;
    is_int(chunkhash_check(size, 0, size, 3000), -EINVAL, "chunk 3000 refused");
    is_int(chunkhash_check(size, 0, size, 0), -EINVAL, "chunk 0 refused");
    is_int(chunkhash_check(size, 0, size, 2048), -EINVAL, "chunk 2 KiB refused");
    is_int(chunkhash_check(size, 0, size, 32 * MIB), -EINVAL,
           "chunk 32 MiB refused");
    is_int(chunkhash_check(size, 4096, MIB, CHUNKHASH_FINE), -EINVAL,
           "unaligned offset refused");
    is_int(chunkhash_check(size, size, MIB, CHUNKHASH_FINE), -EINVAL,
           "offset at the end refused");
    is_int(chunkhash_check(size, 0, 0, CHUNKHASH_FINE), -EINVAL,
           "empty range refused");
    is_int(chunkhash_check(1ull << 40, 0, (CHUNKHASH_MAX_COUNT + 1ull) * 4096,
                           4096),
           -EINVAL, "%u chunks refused", CHUNKHASH_MAX_COUNT + 1);
    is_int(chunkhash_check(1ull << 40, 0, CHUNKHASH_MAX_COUNT * 4096ull, 4096),
           0, "%u chunks accepted", CHUNKHASH_MAX_COUNT);
    is_int(chunkhash_check(1ull << 40, 0, CHUNKHASH_MAX_RANGE, CHUNKHASH_MAX),
           0, "1 GiB accepted");
    is_int(chunkhash_check(1ull << 40, 0, CHUNKHASH_MAX_RANGE + 1,
                           CHUNKHASH_MAX),
           -EINVAL, "1 GiB and a byte refused");
    is_int(chunkhash_check(size, 0, UINT64_MAX, CHUNKHASH_COARSE), 0,
           "a length past the end is cut at the end");
    is_int(chunkhash_count(size, 9 * MIB, UINT64_MAX, CHUNKHASH_COARSE), 1,
           "  to one chunk");
    is_int(chunkhash_count(size + 1, 9 * MIB, UINT64_MAX, CHUNKHASH_COARSE), 2,
           "a last chunk of one byte counts");
    int fd = tmpfile_named("bounds");
    uint8_t h[CHUNKHASH_BYTES];
    is_int(chunkhash_fd(fd, size, 1, 1, CHUNKHASH_FINE, h, NULL), -EINVAL,
           "chunkhash_fd checks its arguments");
    close(fd);
}

static void
test_hex(void)
{
    uint8_t h[3 * CHUNKHASH_BYTES], back[3 * CHUNKHASH_BYTES];
    for (size_t i = 0; i < sizeof h; i++)
        h[i] = (uint8_t)rng();
    char *s = chunkhash_hex(h, 3);
    is_int(strlen(s), 96, "3 hashes are 96 hex digits");
    is_int(chunkhash_unhex(s, 3, back), 0, "read back");
    ok(memcmp(h, back, sizeof h) == 0, "the same hashes");
    is_int(chunkhash_unhex(s, 2, back), -EINVAL, "too many digits refused");
    is_int(chunkhash_unhex(s, 4, back), -EINVAL, "too few digits refused");
    s[7] = 'G';
    is_int(chunkhash_unhex(s, 3, back), -EINVAL, "a non-hex digit refused");
    s[7] = 'A';
    is_int(chunkhash_unhex(s, 3, back), -EINVAL, "upper case refused");
    free(s);
    is_int(chunkhash_unhex("", CHUNKHASH_MAX_COUNT + 1, back), -EINVAL,
           "a count over the limit refused");
}

/* chunkhash_buf (the export's hash of a chunk read whole) equals
 * chunkhash_fd's hash of the same bytes in a file, a partial last chunk
 * too. */
static void
test_buf(void)
{
    size_t size = 3 * CHUNKHASH_FINE / 2;
    uint8_t *buf = malloc(size);
    for (size_t i = 0; i < size; i++)
        buf[i] = (uint8_t)rng();
    int fd = tmpfile_named("buf");
    if (pwrite(fd, buf, size, 0) != (ssize_t)size)
        bail("pwrite");
    uint8_t f[2 * CHUNKHASH_BYTES], b[2 * CHUNKHASH_BYTES];
    is_int(chunkhash_fd(fd, size, 0, size, CHUNKHASH_FINE, f, NULL), 0,
           "hash the file");
    chunkhash_buf(buf, CHUNKHASH_FINE, b);
    chunkhash_buf(buf + CHUNKHASH_FINE, size - CHUNKHASH_FINE,
                  b + CHUNKHASH_BYTES);
    ok(memcmp(f, b, sizeof f) == 0, "chunkhash_buf == chunkhash_fd");
    buf[5] ^= 1;
    chunkhash_buf(buf, CHUNKHASH_FINE, b);
    ok(memcmp(f, b, CHUNKHASH_BYTES) != 0, "a flipped bit changes it");
    close(fd);
    free(buf);
}

int
main(void)
{
    plan_no_plan();
    if (!mkdtemp(tmpdir))
        bail("mkdtemp");
    test_against_reference();
    test_all_hole();
    test_bounds();
    test_hex();
    test_buf();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        diag("could not remove the temporary directory");
    return done_testing();
}
