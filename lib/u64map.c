/* u64map.c: see u64map.h.  Linear probing; a key is never removed from
 * its slot (a deleted entry keeps its key with value 0), so probe chains
 * stay intact without tombstones; rehashing reclaims such slots.
 *
 * A table of HUGE_BYTES or more is its own mapping, aligned to and
 * advised for 2 MiB pages: the data plane probes it at a random slot
 * once a request, and with 4 KiB pages nearly every probe of a table of
 * a few MiB missed the TLB as well as the cache (docs/benchmarks.md,
 * "The owner map's probe"). */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "u64map.h"
#include "vr.h"

static size_t
slot_in(size_t cap, uint64_t key)
{
    uint64_t h = (key + 1) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    return (size_t)h & (cap - 1);
}

static size_t
slot_of(const struct u64map *m, uint64_t key)
{
    return slot_in(m->cap, key);
}

static bool
live(const struct u64map *m, uint64_t val)
{
    return val != 0 && val > m->drop_upto;
}

#define HUGE_BYTES (2u << 20)

/* cap zeroed slots: calloc, or for a large table an anonymous mapping
 * (zero-filled by the kernel) aligned to HUGE_BYTES; *mapped says which. */
static struct u64map_slot *
slots_alloc(size_t cap, bool *mapped)
{
    size_t bytes = cap * sizeof(struct u64map_slot);
    uint8_t *p = bytes < HUGE_BYTES
                     ? MAP_FAILED
                     : mmap(NULL, bytes + HUGE_BYTES, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    *mapped = p != MAP_FAILED;
    if (!*mapped)
        return xcalloc(cap, sizeof(struct u64map_slot)); /* aborts if out */
    size_t lead = (HUGE_BYTES - (uintptr_t)p % HUGE_BYTES) % HUGE_BYTES;
    if (lead)
        munmap(p, lead);
    munmap(p + lead + bytes, HUGE_BYTES - lead);
    p += lead;
    (void)madvise(p, bytes, MADV_HUGEPAGE); /* a hint: may be refused */
    return (struct u64map_slot *)p;
}

static void
slots_free(struct u64map_slot *slots, size_t cap, bool mapped)
{
    if (mapped)
        munmap(slots, cap * sizeof(struct u64map_slot));
    else
        free(slots);
}

static void
rehash(struct u64map *m, size_t cap)
{
    struct u64map_slot *old = m->slots;
    size_t ocap = m->cap;
    bool omapped = m->mapped;
    /* Relaxed stores: u64map_prefetch reads both without the lock. */
    __atomic_store_n(&m->slots, slots_alloc(cap, &m->mapped),
                     __ATOMIC_RELAXED);
    __atomic_store_n(&m->cap, cap, __ATOMIC_RELAXED);
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
    slots_free(old, ocap, omapped);
}

void
u64map_prefetch(const struct u64map *m, uint64_t key)
{
    /* Racy by design (see u64map.h): a stale pointer is only prefetched,
     * and a prefetch never faults. */
    const struct u64map_slot *slots =
        __atomic_load_n(&m->slots, __ATOMIC_RELAXED);
    size_t cap = __atomic_load_n(&m->cap, __ATOMIC_RELAXED);
    if (slots && cap)
        __builtin_prefetch(&slots[slot_in(cap, key)], 1, 3);
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
    slots_free(m->slots, m->cap, m->mapped);
    memset(m, 0, sizeof *m);
}
