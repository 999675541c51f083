/* test-dirtymap.c: unit tests of lib/dirtymap.c — marking against a plain
 * reference array, runs, concurrent marking, the file round trip and every
 * corruption of the file refused.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dirtymap.h"
#include "tap.h"
#include "testrand.h"

#define G (1u << DIRTY_GRAIN_SHIFT)

/* Marks random ranges in m and in ref (one byte per grain), then checks
 * test, next and bytes against ref. */
static void
test_against_reference(uint64_t size)
{
    struct dirtymap m;
    is_int(dirtymap_init(&m, size, DIRTY_GRAIN_SHIFT), 0, "init %llu bytes",
           (unsigned long long)size);
    uint64_t ngr = (size + G - 1) / G;
    uint8_t *ref = calloc(ngr ? ngr : 1, 1);
    for (int i = 0; i < 200; i++) {
        uint64_t off = size ? rng() % (size + G) : 0;
        uint64_t len = rng() % (8 * (uint64_t)G);
        dirtymap_mark(&m, off, len);
        if (len && off < size) {
            uint64_t end = off + len > size ? size : off + len;
            for (uint64_t g = off / G; g <= (end - 1) / G; g++)
                ref[g] = 1;
        }
    }
    int bad = 0;
    uint64_t want_bytes = 0;
    for (uint64_t g = 0; g < ngr; g++) {
        if (dirtymap_test(&m, g * G) != (ref[g] != 0))
            bad++;
        if (ref[g])
            want_bytes += (g + 1) * G > size ? size - g * G : G;
    }
    is_int(bad, 0, "every grain as the reference says");
    is_int(dirtymap_bytes(&m), want_bytes, "bytes covered");
    /* The runs cover exactly the marked grains, in order, clipped. */
    uint64_t off = 0, len, seen = 0, last_end = 0;
    bool ordered = true;
    while (dirtymap_next(&m, off, &off, &len)) {
        ordered &= off >= last_end && len > 0 && off + len <= size;
        for (uint64_t b = off; b < off + len; b += G)
            ordered &= ref[b / G] != 0;
        seen += len;
        last_end = off + len;
        off += len;
    }
    ok(ordered, "runs in order, inside the disk, on marked grains only");
    is_int(seen, want_bytes, "runs add up to the bytes covered");
    free(ref);
    dirtymap_free(&m);
}

static void
test_edges(void)
{
    struct dirtymap m;
    is_int(dirtymap_init(&m, DIRTY_SIZE_MAX + 1, DIRTY_GRAIN_SHIFT), -EINVAL,
           "a disk past 1 PiB refused");
    is_int(dirtymap_init(&m, 1 << 20, 11), -EINVAL, "grain under 4 KiB refused");
    is_int(dirtymap_init(&m, 3 * G + 5, DIRTY_GRAIN_SHIFT), 0, "odd size");
    dirtymap_mark(&m, 3 * G + 4, 100);
    uint64_t off, len;
    ok(dirtymap_next(&m, 0, &off, &len) == 1 && off == 3 * G && len == 5,
       "last partial grain clipped to the disk (got %llu+%llu)",
       (unsigned long long)off, (unsigned long long)len);
    dirtymap_mark(&m, 10 * G, G);
    is_int(dirtymap_bytes(&m), 5, "a mark past the end is ignored");
    dirtymap_mark_all(&m);
    is_int(dirtymap_bytes(&m), 3 * G + 5, "mark_all covers the disk");
    ok(dirtymap_next(&m, G + 7, &off, &len) == 1 && off == G + 7 &&
       len == 2 * G - 2, "next from inside a run starts there");
    is_int(dirtymap_next(&m, 3 * G + 5, &off, &len), 0,
           "nothing from the end of the disk, inside its last grain");
    dirtymap_clear(&m);
    is_int(dirtymap_next(&m, 0, &off, &len), 0, "clear empties it");
    dirtymap_free(&m);
}

struct marker_arg {
    struct dirtymap *m;
    unsigned id;
};

static void *
marker(void *p)
{
    struct marker_arg *a = p;
    /* Each thread marks every fourth grain of its own; all share words. */
    for (uint64_t g = a->id; g < 4096; g += 4)
        dirtymap_mark(a->m, g * G, 1);
    return NULL;
}

static void
test_concurrent(void)
{
    struct dirtymap m;
    pthread_t t[4];
    struct marker_arg a[4];
    VR_IGNORE(dirtymap_init(&m, 4096ull * G, DIRTY_GRAIN_SHIFT));
    for (unsigned i = 0; i < 4; i++) {
        a[i] = (struct marker_arg){ &m, i };
        pthread_create(&t[i], NULL, marker, &a[i]);
    }
    for (unsigned i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    is_int(dirtymap_bytes(&m), 4096ull * G,
           "four threads marking grains of the same words lose no mark");
    dirtymap_free(&m);
}

static void
test_file(void)
{
    char dir[] = "/tmp/test-dirtymap.XXXXXX";
    ok(mkdtemp(dir) != NULL, "temporary directory");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    uint64_t size = 1000 * (uint64_t)G + 123;
    struct dirtymap m, l;
    VR_IGNORE(dirtymap_init(&m, size, DIRTY_GRAIN_SHIFT));
    for (int i = 0; i < 50; i++)
        dirtymap_mark(&m, rng() % size, rng() % (3 * G));
    dirtymap_mark(&m, size - 1, 1);
    is_int(dirtymap_save(&m, dfd, "dirty"), 0, "saved");
    ok(faccessat(dfd, "dirty.tmp", F_OK, 0) < 0, "no temporary left");
    is_int(dirtymap_load(dfd, "dirty", size, &l), 0, "loaded");
    ok(l.nbits == m.nbits && memcmp(l.bits, m.bits, (m.nbits + 63) / 64 * 8) == 0,
       "the same map back");
    dirtymap_free(&l);
    is_int(dirtymap_load(dfd, "dirty", size + G, &l), -EBADMSG,
           "a map of another disk size refused: %s", vr_errmsg());

    /* Every single-byte change of the file is refused. */
    int fd = openat(dfd, "dirty", O_RDONLY);
    struct stat st;
    fstat(fd, &st);
    size_t len = (size_t)st.st_size;
    uint8_t *buf = malloc(len);
    VR_IGNORE(io_pread_all(fd, buf, len, 0));
    close(fd);
    int accepted = 0;
    for (size_t i = 0; i < len; i++) {
        buf[i] ^= (uint8_t)(1u << (i % 8));
        if (dirtymap_decode(buf, len, size, &l) == 0) {
            accepted++;
            dirtymap_free(&l);
        }
        buf[i] ^= (uint8_t)(1u << (i % 8));
    }
    is_int(accepted, 0, "all %zu one-bit corruptions refused", len);
    int cut = 0;
    for (size_t n = 0; n < len; n++)
        if (dirtymap_decode(buf, n, size, &l) == 0) {
            cut++;
            dirtymap_free(&l);
        }
    is_int(cut, 0, "every truncation refused");
    is_int(dirtymap_decode(buf, len, size, &l), 0, "the intact file decodes");
    dirtymap_free(&l);
    free(buf);

    /* A symlink in its place is not followed. */
    ok(symlinkat("/etc/passwd", dfd, "link") == 0, "symlink made");
    is_int(dirtymap_load(dfd, "link", size, &l), -ELOOP, "symlink refused");
    unlinkat(dfd, "link", 0);
    unlinkat(dfd, "dirty", 0);
    close(dfd);
    rmdir(dir);
    dirtymap_free(&m);
}

static void
test_marker(void)
{
    char dir[] = "/tmp/test-marker.XXXXXX";
    ok(mkdtemp(dir) != NULL, "temporary directory");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    int fd = -1, fd2 = -1;
    bool stopped = true;
    uint64_t c = 99;
    char why[64];
    is_int(tracking_marker_open(dfd, &fd), 0, "marker created");
    struct stat st;
    ok(fstat(fd, &st) == 0 && st.st_size == TRACKING_BYTES,
       "one preallocated block of %d bytes", TRACKING_BYTES);
    ok(tracking_marker_read(fd, &stopped, &c, why, sizeof why) == 0 &&
       !stopped && c == 0, "a new marker says tracking");
    is_int(tracking_marker_write(fd, true, 17, "log full: ENOSPC"), 0,
           "stopped written");
    is_int(tracking_marker_open(dfd, &fd2), 0, "existing marker opened");
    ok(tracking_marker_read(fd2, &stopped, &c, why, sizeof why) == 0 &&
       stopped && c == 17 && strcmp(why, "log full: ENOSPC") == 0,
       "it says stopped at 17 and why (%s)", why);
    ok(fstat(fd, &st) == 0 && st.st_size == TRACKING_BYTES,
       "rewritten in place");
    char small[5];
    ok(tracking_marker_read(fd2, &stopped, &c, small, sizeof small) == 0 &&
       strcmp(small, "log ") == 0, "a short buffer gets the reason cut");
    char boot[40];
    is_int(tracking_marker_served(fd, "b-1"), 0, "served under boot b-1");
    ok(tracking_marker_read(fd2, &stopped, &c, why, sizeof why) == 0 &&
       !stopped, "a served marker says tracking");
    ok(tracking_marker_boot(fd2, boot, sizeof boot) == 0 &&
       strcmp(boot, "b-1") == 0, "and names its boot (%s)", boot);
    setenv("VMREPLICA_TEST_BOOT_ID", "test-boot", 1);
    ok(vr_boot_id(boot) == 0 && strcmp(boot, "test-boot") == 0,
       "the boot id can be set for tests");
    unsetenv("VMREPLICA_TEST_BOOT_ID");
    ok(vr_boot_id(boot) == 0 && strlen(boot) == 36,
       "this host's boot id: %s", boot);
    is_int(tracking_marker_write(fd, false, 0, NULL), 0, "tracking again");
    ok(tracking_marker_boot(fd2, boot, sizeof boot) == 0 && boot[0] == 0,
       "a plain tracking marker names no boot (a clean stop)");
    ok(tracking_marker_read(fd2, &stopped, &c, why, sizeof why) == 0 &&
       !stopped, "it says tracking");
    VR_IGNORE(io_pwrite_all(fd, "vmreplica stopped x\n", 20, 0));
    is_int(tracking_marker_read(fd2, &stopped, &c, why, sizeof why), -EBADMSG,
           "a stopped marker without a cycle is refused");
    VR_IGNORE(io_pwrite_all(fd, "garbage", 7, 0));
    is_int(tracking_marker_read(fd2, &stopped, &c, why, sizeof why), -EBADMSG,
           "a marker saying neither is refused");
    close(fd);
    close(fd2);
    unlinkat(dfd, TRACKING_NAME, 0);
    ok(symlinkat("/etc/passwd", dfd, TRACKING_NAME) == 0, "symlink made");
    is_int(tracking_marker_open(dfd, &fd), -ELOOP, "a symlink is not followed");
    unlinkat(dfd, TRACKING_NAME, 0);
    close(dfd);
    rmdir(dir);
}

int
main(void)
{
    plan_no_plan();
    rng_state = 42;
    test_against_reference(0);
    test_against_reference(G);
    test_against_reference(100 * (uint64_t)G + 1);
    test_against_reference(5000 * (uint64_t)G - 7);
    test_edges();
    test_concurrent();
    test_file();
    test_marker();
    return done_testing();
}
