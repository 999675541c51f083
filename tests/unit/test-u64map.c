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
    u64map_free(&m);
    ok(m.slots == NULL && m.cap == 0, "freed");
    return done_testing();
}
