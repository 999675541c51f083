/* u64map.h: an open-addressing hash map from uint64_t to uint64_t, for the
 * data plane's per-block bookkeeping (which unshipped cycle last wrote a
 * block) and the shipper's preserve-file index.
 *
 * A value of 0 means "no entry".  Values at or below drop_upto are dead
 * too: raising drop_upto retires every entry with such a value at once
 * (their slots are reclaimed at the next rehash).  Not thread-safe.
 */
#ifndef VR_U64MAP_H
#define VR_U64MAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct u64map_slot {
    uint64_t key;   /* key + 1; 0 = empty slot */
    uint64_t val;   /* beside its key: one cache line per probe */
};

struct u64map {
    struct u64map_slot *slots;
    size_t cap;     /* power of two, or 0 */
    size_t used;    /* slots holding a key (live or dead) */
    uint64_t drop_upto;
    bool mapped;    /* slots are an mmap of their own, not from malloc */
};

/* Keys are < UINT64_MAX.  0 if key has no live entry. */
uint64_t u64map_get(const struct u64map *m, uint64_t key);
/* Set key's value (0 deletes).  Grows as needed (aborts when out of
 * memory, like xmalloc). */
void u64map_put(struct u64map *m, uint64_t key, uint64_t val);
/* u64map_put, returning what u64map_get would have (one probe for both). */
uint64_t u64map_exchange(struct u64map *m, uint64_t key, uint64_t val);
/* A hint that key is about to be looked up: start loading its slot into
 * the cache.  Safe to call without the lock that serialises the calls
 * above, while they run: it only reads the table's address and size
 * (atomically) and prefetches, which never faults. */
void u64map_prefetch(const struct u64map *m, uint64_t key);
/* Rehash, dropping dead entries; returns the live entries kept. */
size_t u64map_compact(struct u64map *m);
void u64map_free(struct u64map *m);

#endif /* VR_U64MAP_H */
