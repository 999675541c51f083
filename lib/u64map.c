/* u64map.c: see u64map.h.  Linear probing; a key is never removed from
 * its slot (a deleted entry keeps its key with value 0), so probe chains
 * stay intact without tombstones; rehashing reclaims such slots. */
#include <stdlib.h>
#include <string.h>

#include "u64map.h"
#include "vr.h"

static size_t
slot_of(const struct u64map *m, uint64_t key)
{
    uint64_t h = (key + 1) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    return (size_t)h & (m->cap - 1);
}

static bool
live(const struct u64map *m, uint64_t val)
{
    return val != 0 && val > m->drop_upto;
}

static void
rehash(struct u64map *m, size_t cap)
{
    uint64_t *ok = m->keys, *ov = m->vals;
    size_t ocap = m->cap;
    m->keys = xcalloc(cap, sizeof *m->keys);
    m->vals = xcalloc(cap, sizeof *m->vals);
    m->cap = cap;
    m->used = 0;
    for (size_t i = 0; i < ocap; i++) {
        if (ok[i] == 0 || !live(m, ov[i]))
            continue;
        size_t j = slot_of(m, ok[i] - 1);
        while (m->keys[j] != 0)
            j = (j + 1) & (cap - 1);
        m->keys[j] = ok[i];
        m->vals[j] = ov[i];
        m->used++;
    }
    free(ok);
    free(ov);
}

uint64_t
u64map_get(const struct u64map *m, uint64_t key)
{
    if (m->cap == 0)
        return 0;
    for (size_t j = slot_of(m, key);; j = (j + 1) & (m->cap - 1)) {
        if (m->keys[j] == 0)
            return 0;
        if (m->keys[j] == key + 1)
            return live(m, m->vals[j]) ? m->vals[j] : 0;
    }
}

void
u64map_put(struct u64map *m, uint64_t key, uint64_t val)
{
    if (m->cap > 0) {
        for (size_t j = slot_of(m, key);; j = (j + 1) & (m->cap - 1)) {
            if (m->keys[j] == 0)
                break;
            if (m->keys[j] == key + 1) {
                m->vals[j] = val;
                return;
            }
        }
    }
    if (val == 0)
        return;
    if ((m->used + 1) * 2 > m->cap) {
        /* Reclaim dead slots first; grow unless that left the table at
         * most a third full, so the next rehash is cap/6 inserts away
         * (amortised O(1) however entries come and go). */
        size_t cap = m->cap ? m->cap : 1024;
        rehash(m, cap);
        while ((m->used + 1) * 3 > cap)
            cap *= 2;
        if (cap != m->cap)
            rehash(m, cap);
    }
    size_t j = slot_of(m, key);
    while (m->keys[j] != 0)
        j = (j + 1) & (m->cap - 1);
    m->keys[j] = key + 1;
    m->vals[j] = val;
    m->used++;
}

size_t
u64map_compact(struct u64map *m)
{
    if (m->cap > 0)
        rehash(m, m->cap);
    return m->used;
}

void
u64map_free(struct u64map *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}
