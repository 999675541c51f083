/* chunkhash.c: hashes of a disk's chunks (chunkhash.h).
 *
 * A chunk is hashed as a stream: data extents are read, holes fed as
 * zeroes from a static buffer, so the hash depends only on what the chunk
 * reads as.  Extents come from SEEK_DATA / SEEK_HOLE; one lookup is reused
 * while the chunks walk through it, so a large extent costs one pair of
 * lseeks, not one per chunk.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "chunkhash.h"

#define READ_BYTES (1u << 20)

static const uint8_t zeroes[1u << 16];

bool
chunkhash_chunk_ok(uint64_t chunk)
{
    return chunk >= CHUNKHASH_MIN && chunk <= CHUNKHASH_MAX &&
           (chunk & (chunk - 1)) == 0;
}

uint64_t
chunkhash_count(uint64_t size, uint64_t offset, uint64_t length,
                uint64_t chunk)
{
    if (offset >= size || length == 0 || chunk == 0)
        return 0;
    uint64_t end = length > size - offset ? size : offset + length;
    return (end - offset + chunk - 1) / chunk;
}

int
chunkhash_check(uint64_t size, uint64_t offset, uint64_t length,
                uint64_t chunk)
{
    if (!chunkhash_chunk_ok(chunk))
        return vr_err(-EINVAL, "chunk %llu: not a power of two from %u to %u",
                      (unsigned long long)chunk, CHUNKHASH_MIN, CHUNKHASH_MAX);
    if (offset % chunk)
        return vr_err(-EINVAL, "offset %llu: not a multiple of the chunk",
                      (unsigned long long)offset);
    if (offset >= size || length == 0)
        return vr_err(-EINVAL, "range %llu+%llu: not inside the disk (%llu "
                      "bytes)", (unsigned long long)offset,
                      (unsigned long long)length, (unsigned long long)size);
    uint64_t n = chunkhash_count(size, offset, length, chunk);
    if (n > CHUNKHASH_MAX_COUNT || (n - 1) * chunk >= CHUNKHASH_MAX_RANGE)
        return vr_err(-EINVAL, "range %llu+%llu: more than %u chunks or "
                      "%llu bytes",
                      (unsigned long long)offset, (unsigned long long)length,
                      CHUNKHASH_MAX_COUNT,
                      (unsigned long long)CHUNKHASH_MAX_RANGE);
    return 0;
}

/* The first data extent at or after a position: [data, hole), data ==
 * size if there is none.  Remembers the query's position q, since the
 * answer holds for every position in [q, hole). */
struct extents {
    int fd;
    uint64_t size;
    uint64_t q, data, hole;
    bool valid;
};

static int
extent_at(struct extents *x, uint64_t pos, uint64_t *data, uint64_t *hole)
{
    if (!x->valid || pos < x->q || pos >= x->hole) {
        off_t d = lseek(x->fd, (off_t)pos, SEEK_DATA);
        off_t h = -1;
        if (d < 0 && errno != ENXIO)
            return vr_err(-errno, "seek data at %llu: %s",
                          (unsigned long long)pos, strerror(errno));
        if (d < 0 || (uint64_t)d >= x->size) {
            d = (off_t)x->size;
            h = (off_t)x->size;
        } else if ((h = lseek(x->fd, d, SEEK_HOLE)) < 0) {
            return vr_err(-errno, "seek hole at %lld: %s", (long long)d,
                          strerror(errno));
        }
        x->q = pos;
        x->data = (uint64_t)d;
        x->hole = (uint64_t)h > x->size ? x->size : (uint64_t)h;
        x->valid = true;
        if (x->hole <= pos) { /* at the end: nothing more */
            x->data = x->hole = x->size;
        }
    }
    *data = x->data > pos ? x->data : pos;
    *hole = x->hole;
    return 0;
}

static void
feed_zeroes(XXH3_state_t *st, uint64_t n)
{
    while (n > 0) {
        size_t k = n > sizeof zeroes ? sizeof zeroes : (size_t)n;
        XXH3_128bits_update(st, zeroes, k);
        n -= k;
    }
}

static void
put_hash(XXH128_hash_t h, uint8_t *out)
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, CHUNKHASH_BYTES);
}

/* Hash [p, e) of the disk into out. */
static int
hash_one(struct extents *x, uint64_t p, uint64_t e, uint8_t *buf,
         XXH3_state_t *st, uint8_t *out, uint64_t *read_bytes)
{
    XXH3_128bits_reset(st);
    while (p < e) {
        uint64_t d = 0, h = 0;
        int rc = extent_at(x, p, &d, &h);
        if (rc < 0)
            return rc;
        if (d >= e) {
            feed_zeroes(st, e - p);
            break;
        }
        feed_zeroes(st, d - p);
        uint64_t end = h < e ? h : e;
        for (p = d; p < end;) {
            size_t k = end - p > READ_BYTES ? READ_BYTES : (size_t)(end - p);
            rc = io_pread_all(x->fd, buf, k, (off_t)p);
            if (rc < 0)
                return vr_err(rc, "read at %llu: %s", (unsigned long long)p,
                              strerror(-rc));
            XXH3_128bits_update(st, buf, k);
            if (read_bytes)
                *read_bytes += k;
            p += k;
        }
    }
    put_hash(XXH3_128bits_digest(st), out);
    return 0;
}

int
chunkhash_fd(int fd, uint64_t size, uint64_t offset, uint64_t length,
             uint64_t chunk, uint8_t *out, uint64_t *read_bytes)
{
    int rc = chunkhash_check(size, offset, length, chunk);
    if (rc < 0)
        return rc;
    uint64_t n = chunkhash_count(size, offset, length, chunk);
    uint8_t *buf = xmalloc(READ_BYTES);
    XXH3_state_t *st = XXH3_createState();
    if (!st)
        abort();
    struct extents x = { .fd = fd, .size = size };
    for (uint64_t i = 0; rc == 0 && i < n; i++) {
        uint64_t p = offset + i * chunk;
        uint64_t e = size - p < chunk ? size : p + chunk;
        rc = hash_one(&x, p, e, buf, st, out + i * CHUNKHASH_BYTES,
                      read_bytes);
    }
    XXH3_freeState(st);
    free(buf);
    return rc;
}

void
chunkhash_buf(const void *p, size_t n, uint8_t *out)
{
    put_hash(XXH3_128bits(p, n), out);
}

char *
chunkhash_hex(const uint8_t *h, uint64_t n)
{
    static const char digits[] = "0123456789abcdef";
    char *s = xmalloc(2 * n * CHUNKHASH_BYTES + 1);
    for (uint64_t i = 0; i < n * CHUNKHASH_BYTES; i++) {
        s[2 * i] = digits[h[i] >> 4];
        s[2 * i + 1] = digits[h[i] & 15];
    }
    s[2 * n * CHUNKHASH_BYTES] = '\0';
    return s;
}

static int
nibble(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

int
chunkhash_unhex(const char *hex, uint64_t n, uint8_t *out)
{
    if (n > CHUNKHASH_MAX_COUNT || strlen(hex) != 2 * n * CHUNKHASH_BYTES)
        return vr_err(-EINVAL, "hashes: want %llu of them in hex",
                      (unsigned long long)n);
    for (uint64_t i = 0; i < n * CHUNKHASH_BYTES; i++) {
        int a = nibble(hex[2 * i]), b = nibble(hex[2 * i + 1]);
        if (a < 0 || b < 0)
            return vr_err(-EINVAL, "hashes: not lower-case hex at %llu",
                          (unsigned long long)(2 * i));
        out[i] = (uint8_t)(a << 4 | b);
    }
    return 0;
}
