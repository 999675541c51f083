/* crc32c.c: CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the
 * checksum of every change-log record and cycle payload header.
 *
 * Two implementations that must agree bit for bit: the SSE4.2 crc32
 * instruction (about 10 GB/s per core here) chosen at run time with
 * __builtin_cpu_supports, and a slicing-by-8 table fallback for CPUs (or
 * emulators) without it.  Both are exported under internal names so
 * tests/unit/test-changelog.c can compare them; everything else calls
 * crc32c().
 */
#include <stdint.h>
#include <string.h>

#include "crc32c.h"

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

/* Internal entry points, for the unit test only. */
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len);
uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len);
int crc32c_hw_available(void);

#define POLY 0x82F63B78u

static uint32_t table[8][256];
static int table_ready;

static void
table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = table[0][i];
        for (int t = 1; t < 8; t++) {
            c = table[0][c & 0xff] ^ (c >> 8);
            table[t][i] = c;
        }
    }
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

uint32_t
crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    /* Racing initialisers compute the same table, so this is benign. */
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE))
        table_init();
    crc = ~crc;
    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        crc = table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        w ^= crc;
        crc = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^
              table[5][(w >> 16) & 0xff] ^ table[4][(w >> 24) & 0xff] ^
              table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^
              table[1][(w >> 48) & 0xff] ^ table[0][(w >> 56) & 0xff];
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        crc = table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    return ~crc;
}

#if defined(__x86_64__)

/* The crc32 instruction has a latency of 3 cycles and a throughput of 1, so
 * one dependency chain uses a third of it.  Long buffers are cut into rounds
 * of three STRIPE-byte stripes computed side by side and joined with
 * crc(A || B) = shift(crc(A), |B|) ^ crc0(B), where shift (appending
 * STRIPE zero bytes to the raw register) is linear and so a 4 x 256 table,
 * and crc0 starts from a zero register.  About 2.5x faster at 1 MiB. */
#define STRIPE 2048

static uint32_t shift_tab[4][256];
static int shift_ready;

__attribute__((target("sse4.2"))) static uint32_t
zeroes_raw(uint32_t c, size_t n)
{
    uint64_t x = c;
    for (size_t i = 0; i < n / 8; i++)
        x = _mm_crc32_u64(x, 0);
    return (uint32_t)x;
}

static void
shift_init(void)
{
    for (unsigned k = 0; k < 4; k++)
        for (uint32_t i = 0; i < 256; i++)
            shift_tab[k][i] = zeroes_raw(i << (8 * k), STRIPE);
    __atomic_store_n(&shift_ready, 1, __ATOMIC_RELEASE);
}

static inline uint32_t
shift_stripe(uint32_t c)
{
    return shift_tab[0][c & 0xff] ^ shift_tab[1][(c >> 8) & 0xff] ^
           shift_tab[2][(c >> 16) & 0xff] ^ shift_tab[3][c >> 24];
}

__attribute__((target("sse4.2"))) uint32_t
crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    uint64_t c = (uint32_t)~crc;

    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    if (len >= 3 * STRIPE) {
        /* Racing initialisers compute the same table: benign. */
        if (!__atomic_load_n(&shift_ready, __ATOMIC_ACQUIRE))
            shift_init();
        while (len >= 3 * STRIPE) {
            uint64_t c1 = 0, c2 = 0;
            for (size_t i = 0; i < STRIPE; i += 8) {
                uint64_t w0, w1, w2;
                memcpy(&w0, p + i, 8);
                memcpy(&w1, p + STRIPE + i, 8);
                memcpy(&w2, p + 2 * STRIPE + i, 8);
                c = _mm_crc32_u64(c, w0);
                c1 = _mm_crc32_u64(c1, w1);
                c2 = _mm_crc32_u64(c2, w2);
            }
            c = shift_stripe(shift_stripe((uint32_t)c) ^ (uint32_t)c1) ^
                (uint32_t)c2;
            p += 3 * STRIPE;
            len -= 3 * STRIPE;
        }
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    return ~(uint32_t)c;
}

int
crc32c_hw_available(void)
{
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

#else

uint32_t
crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
    return crc32c_sw(crc, buf, len);
}

int
crc32c_hw_available(void)
{
    return 0;
}

#endif

uint32_t
crc32c(uint32_t crc, const void *buf, size_t len)
{
    if (crc32c_hw_available())
        return crc32c_hw(crc, buf, len);
    return crc32c_sw(crc, buf, len);
}
