/* testrand.h: a seeded xorshift64 generator for the unit tests
 * (header-only).  Set rng_state to a fixed seed, then call rng() or
 * fill_random(): runs are repeatable.  The state must never be 0. */
#ifndef VR_TESTRAND_H
#define VR_TESTRAND_H

#include <stddef.h>
#include <stdint.h>

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static inline uint64_t
rng(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static inline void
fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)rng();
}

#endif /* VR_TESTRAND_H */
