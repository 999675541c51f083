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
    struct u64map_slot *old = m->slots;
    size_t ocap = m->cap;
    m->slots = xcalloc(cap, sizeof *m->slots);
    m->cap = cap;
    m->used = 0;
    for (size_t i = 0; i < ocap; i++) {
        if (old[i].key == 0 || !live(m, old[i].val))
            continue;
        size_t j = slot_of(m, old[i].key - 1);
        while (m->slots[j].key != 0)
            j = (j + 1) & (cap - 1);
        m->slots[j] = old[i];
        m->used++;
    }
    free(old);
}

/* The slot holding key, or NULL. */
static struct u64map_slot *
find(const struct u64map *m, uint64_t key)
{
    if (m->cap == 0)
        return NULL;
    for (size_t j = slot_of(m, key);; j = (j + 1) & (m->cap - 1)) {
        if (m->slots[j].key == 0)
            return NULL;
        if (m->slots[j].key == key + 1)
            return &m->slots[j];
    }
}

uint64_t
u64map_get(const struct u64map *m, uint64_t key)
{
    const struct u64map_slot *s = find(m, key);
    return s && live(m, s->val) ? s->val : 0;
}

uint64_t
u64map_exchange(struct u64map *m, uint64_t key, uint64_t val)
{
    struct u64map_slot *s = find(m, key);
    if (s) {
        uint64_t old = live(m, s->val) ? s->val : 0;
        s->val = val;
        return old;
    }
    if (val == 0)
        return 0;
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
    while (m->slots[j].key != 0)
        j = (j + 1) & (m->cap - 1);
    m->slots[j] = (struct u64map_slot){ key + 1, val };
    m->used++;
    return 0;
}

void
u64map_put(struct u64map *m, uint64_t key, uint64_t val)
{
    (void)u64map_exchange(m, key, val);
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
    free(m->slots);
    memset(m, 0, sizeof *m);
}
