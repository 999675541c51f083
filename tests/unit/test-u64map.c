/* test-u64map.c: unit tests of lib/u64map.c — random puts, exchanges,
 * deletes and retirements (drop_upto) checked against a plain array, across
 * growth and compaction.
 */
#include <stdlib.h>
#include <string.h>

#include "tap.h"
#include "testrand.h"
#include "u64map.h"

#define KEYS 20000

static uint64_t ref[KEYS]; /* value per key, 0 = none */

static int
mismatches(const struct u64map *m)
{
    int bad = 0;
    for (uint64_t k = 0; k < KEYS; k++) {
        uint64_t want = ref[k] > m->drop_upto ? ref[k] : 0;
        bad += u64map_get(m, k) != want;
    }
    return bad;
}

int
main(void)
{
    plan_no_plan();
    rng_state = 7;
    struct u64map m = { 0 };
    is_int(u64map_get(&m, 5), 0, "an empty map has nothing");
    u64map_put(&m, 5, 0);
    is_int(m.cap, 0, "deleting from an empty map allocates nothing");

    int bad_exchange = 0;
    uint64_t cycle = 1;
    for (int round = 0; round < 20; round++) {
        for (int i = 0; i < 5000; i++) {
            uint64_t k = rng() % KEYS;
            uint64_t before = ref[k] > m.drop_upto ? ref[k] : 0;
            switch (rng() % 4) {
            case 0:
                u64map_put(&m, k, cycle);
                ref[k] = cycle;
                break;
            case 1:
                bad_exchange += u64map_exchange(&m, k, cycle) != before;
                ref[k] = cycle;
                break;
            case 2:
                bad_exchange += u64map_exchange(&m, k, 0) != before;
                ref[k] = 0;
                break;
            default:
                u64map_put(&m, k, 0);
                ref[k] = 0;
            }
        }
        cycle++;
        /* Retire every value up to two cycles back, as SHIPPED does. */
        if (cycle > 3)
            m.drop_upto = cycle - 3;
        if (round % 5 == 4) {
            size_t live = u64map_compact(&m);
            size_t want = 0;
            for (uint64_t k = 0; k < KEYS; k++)
                want += ref[k] > m.drop_upto;
            is_int(live, want, "round %d: compaction keeps the live entries",
                   round);
        }
        is_int(mismatches(&m), 0, "round %d: every key as the reference "
               "(cap %zu, used %zu)", round, m.cap, m.used);
    }
    is_int(bad_exchange, 0, "exchange returns what get would have");
    ok(m.used * 2 <= m.cap, "at most half full");
    ok(!m.mapped, "a small table comes from malloc");
    u64map_free(&m);
    ok(m.slots == NULL && m.cap == 0, "freed");

    /* A table of 2 MiB and more is a mapping of its own (huge pages
     * advised); the same contract holds across its growth, compaction
     * and free, and a prefetch of any key, before or after, is harmless. */
    struct u64map big = { 0 };
    u64map_prefetch(&big, 1);
    const uint64_t nbig = 300000; /* 16-byte slots: cap 2^20, 16 MiB */
    int bad_big = 0;
    for (uint64_t k = 0; k < nbig; k++) {
        u64map_prefetch(&big, k * 7);
        bad_big += u64map_exchange(&big, k * 7, 5 + k % 3) != 0;
    }
    ok(big.mapped && big.cap * sizeof *big.slots >= (2u << 20),
       "a large table is mapped (cap %zu)", big.cap);
    ok((uintptr_t)big.slots % (2u << 20) == 0, "aligned to 2 MiB");
    big.drop_upto = 5; /* retire a third */
    size_t live = u64map_compact(&big);
    for (uint64_t k = 0; k < nbig; k++) {
        uint64_t want = 5 + k % 3 > 5 ? 5 + k % 3 : 0;
        bad_big += u64map_get(&big, k * 7) != want;
        bad_big += u64map_get(&big, k * 7 + 1) != 0;
    }
    is_int(bad_big, 0, "every key of the large table as put, after "
           "compaction");
    is_int(live, nbig - (nbig + 2) / 3, "compaction keeps two thirds");
    u64map_free(&big);
    ok(big.slots == NULL && big.cap == 0 && !big.mapped, "large freed");
    u64map_prefetch(&big, 3);
    return done_testing();
}
