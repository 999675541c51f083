/* chunkhash.h: hashes of a disk's fixed-size chunks, for comparing two
 * copies of a disk without sending either (SPEC §5: an initial replication
 * that uses an existing copy, and resynchronization).
 *
 * Each chunk's hash is XXH3-128 of its bytes, holes read as zeroes, so two
 * copies that read the same have the same hashes however each is
 * allocated.  Holes are never read: a whole-hole chunk costs no I/O.
 *
 * The comparison goes coarse then fine: CHUNKHASH_COARSE (1 MiB) chunks
 * over a window, then CHUNKHASH_FINE (64 KiB, the dirty map's grain)
 * chunks inside the coarse ones that differ; only fine chunks that differ
 * are sent.
 */
#ifndef VR_CHUNKHASH_H
#define VR_CHUNKHASH_H

#include <stdbool.h>
#include <stdint.h>

#include "vr.h"

#define CHUNKHASH_BYTES     16
#define CHUNKHASH_COARSE    (1u << 20)
#define CHUNKHASH_FINE      (1u << 16)
#define CHUNKHASH_MIN       (1u << 12)
#define CHUNKHASH_MAX       (1u << 24)
/* At most this many hashes, and this many bytes hashed, per call (a
 * request's answer stays small and quick). */
#define CHUNKHASH_MAX_COUNT 4096u
#define CHUNKHASH_MAX_RANGE (1ull << 30)

/* Is chunk a power of two in [CHUNKHASH_MIN, CHUNKHASH_MAX]? */
bool chunkhash_chunk_ok(uint64_t chunk);

/* How many chunks of size chunk cover [offset, offset + length) of a disk
 * of size bytes: the last one is cut at the disk's end.  0 if the range is
 * empty or starts at or past the end. */
uint64_t chunkhash_count(uint64_t size, uint64_t offset, uint64_t length,
                         uint64_t chunk);

/* Check a request for hashes: chunk valid, offset a multiple of it and
 * inside the disk, at most CHUNKHASH_MAX_COUNT chunks covering at most
 * CHUNKHASH_MAX_RANGE bytes.  -EINVAL with the
 * reason in vr_errmsg() otherwise. */
int chunkhash_check(uint64_t size, uint64_t offset, uint64_t length,
                    uint64_t chunk) VR_WUR;

/* Hash the chunks of [offset, offset + length) of fd, a disk of size
 * bytes, into out (chunkhash_count() * CHUNKHASH_BYTES bytes).  Adds the
 * bytes actually read to *read_bytes when it is not NULL.  Arguments as
 * chunkhash_check() accepts; -errno on a read error. */
int chunkhash_fd(int fd, uint64_t size, uint64_t offset, uint64_t length,
                 uint64_t chunk, uint8_t *out, uint64_t *read_bytes) VR_WUR;

/* The hash of n bytes at p (a chunk read whole) into out
 * (CHUNKHASH_BYTES), as chunkhash_fd would hash them. */
void chunkhash_buf(const void *p, size_t n, uint8_t *out);

/* Lower-case hex of n hashes (2 * n * CHUNKHASH_BYTES characters and a
 * NUL, malloc'd), and back: -EINVAL unless hex is exactly n hashes. */
char *chunkhash_hex(const uint8_t *h, uint64_t n);
int chunkhash_unhex(const char *hex, uint64_t n, uint8_t *out) VR_WUR;

#endif
