/* bench-view.c: how long opening the oldest of 24 retained recovery points
 * takes (lib/undo.h undo_view_open plus the first read), for a small and a
 * large sparse replica disk holding the same data and the same history, so
 * the ratio shows whether it depends on the disk's size.  For comparison,
 * the time a copy of the disk takes with `cp --sparse=always` (what opening
 * a point would cost without undo views).
 *
 *   bench-view [-s] DIR [SMALL_GIB LARGE_GIB]     (default 1 16)
 *
 * Each disk gets 256 MiB of data at random 1 MiB-aligned places in its
 * first GiB, then 25 cycles of 256 random 64 KiB writes (16 MiB each) are
 * captured and applied, so spans 2..25 hold the way back to point 1.
 * Warm page cache; median of 5 opens.  -s (bench/run --smoke): a sixteenth
 * of it all (16 MiB of data in the first 64 MiB, 16 writes a cycle), so
 * the suite's smoke run stays short; not a measurement.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cycle.h"
#include "undo.h"

#define CYCLES    25
#define WRITE_LEN (64u << 10)

/* The workload's scale: 16 with -s. */
static unsigned scale_div = 1;
#define DATA_MIB  (256u / scale_div)  /* data written first */
#define SPAN_MIB  (1024u / scale_div) /* where data and writes land */
#define PER_CYCLE (256u / scale_div)  /* 64 KiB writes a cycle */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t
rng(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static double
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void
die(const char *what)
{
    fprintf(stderr, "bench-view: %s: %s\n", what, vr_errmsg());
    exit(1);
}

/* Build one disk of size GiB with its history; returns open ms (median). */
static double
run(const char *dir, unsigned gib, double *copy_ms, uint64_t *undo_bytes)
{
    char path[1024], udir[1024], cmd[4096];
    uint64_t size = (uint64_t)gib << 30;
    snprintf(path, sizeof path, "%s/disk-%ug.raw", dir, gib);
    snprintf(udir, sizeof udir, "%s/undo-%ug", dir, gib);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s' && mkdir '%s'", path, udir,
             udir);
    if (system(cmd) != 0)
        exit(1);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    int ufd = open(udir, O_RDONLY | O_DIRECTORY);
    if (fd < 0 || ufd < 0 || ftruncate(fd, (off_t)size) < 0)
        exit(1);
    uint8_t *buf = malloc(1u << 20);
    rng_state = 0x9e3779b97f4a7c15ull; /* same data on every disk size */
    for (unsigned i = 0; i < DATA_MIB; i++) {
        for (size_t k = 0; k < (1u << 20) / 8; k++)
            ((uint64_t *)buf)[k] = rng();
        uint64_t off = (rng() % SPAN_MIB) << 20;
        if (io_pwrite_all(fd, buf, 1u << 20, (off_t)off) < 0)
            exit(1);
    }
    *undo_bytes = 0;
    for (uint64_t c = 1; c <= CYCLES; c++) {
        int pfd = memfd_create("payload", 0);
        struct cyc_hdr h = { .version = CYC_VERSION, .cycle = c,
                             .ndisks = 1 };
        struct cyc_builder *b;
        if (cyc_builder_new(pfd, false, 1, &h, &b) < 0)
            die("builder");
        for (unsigned i = 0; i < PER_CYCLE; i++) {
            for (size_t k = 0; k < WRITE_LEN / 8; k++)
                ((uint64_t *)buf)[k] = rng();
            struct cl_rec r = { .kind = CL_WRITE, .len = WRITE_LEN,
                                .offset = (rng() % (SPAN_MIB * 16u)) *
                                          WRITE_LEN,
                                .data = buf };
            if (cyc_builder_add(b, &r) < 0)
                die("add");
        }
        uint64_t raw, out, nrec, ub;
        if (cyc_builder_finish(b, &raw, &out) < 0)
            die("finish");
        cyc_builder_free(b);
        if (undo_capture(pfd, &fd, &size, 1, ufd, c, &ub) < 0)
            die("capture");
        if (cyc_apply_file(pfd, &fd, &size, 1, &nrec) < 0)
            die("apply");
        close(pfd);
        if (c > 1)
            *undo_bytes += ub; /* span 1 restores point 0: not kept */
    }
    char name[48];
    undo_name(1, 1, name);
    unlinkat(ufd, name, 0);

    double t[5];
    for (int i = 0; i < 5; i++) {
        struct undo_view *v;
        double t0 = now_ms();
        if (undo_view_open(ufd, 1, CYCLES, 1, &size, &v) < 0)
            die("view open");
        if (undo_view_read(v, 0, fd, buf, 0, 4096) < 0)
            die("view read");
        t[i] = now_ms() - t0;
        undo_view_free(v);
    }
    qsort(t, 5, sizeof t[0], cmp_double);

    snprintf(cmd, sizeof cmd, "cp --sparse=always '%s' '%s.copy' && sync "
             "'%s.copy'", path, path, path);
    double t0 = now_ms();
    if (system(cmd) != 0)
        exit(1);
    *copy_ms = now_ms() - t0;
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s.copy' '%s'", path, path, udir);
    if (system(cmd) != 0)
        exit(1);
    free(buf);
    close(fd);
    close(ufd);
    return t[2];
}

int
main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "-s") == 0) {
        scale_div = 16;
        argc--;
        argv++;
    }
    if (argc != 2 && argc != 4) {
        fprintf(stderr, "usage: bench-view [-s] DIR [SMALL_GIB LARGE_GIB]\n");
        return 2;
    }
    unsigned small = argc == 4 ? (unsigned)atoi(argv[2]) : 1;
    unsigned large = argc == 4 ? (unsigned)atoi(argv[3]) : 16;
    double cs, cl;
    uint64_t us, ul;
    double s = run(argv[1], small, &cs, &us);
    double l = run(argv[1], large, &cl, &ul);
    printf("# open the oldest of 24 points (undo_view_open + first read), "
           "median of 5, warm cache; %d cycles of %u x 64 KiB writes\n",
           CYCLES, PER_CYCLE);
    printf("%-10s %14s %12s %16s %10s\n", "disk", "undo bytes", "open ms",
           "cp --sparse ms", "cp/open");
    printf("%-10s %14" PRIu64 " %12.1f %16.0f %9.0fx\n", "small", us, s, cs,
           cs / s);
    printf("%-10s %14" PRIu64 " %12.1f %16.0f %9.0fx\n", "large", ul, l, cl,
           cl / l);
    printf("# %u GiB vs %u GiB: open time ratio %.2f (1.00 = independent of "
           "disk size)\n", large, small, l / s);
    return 0;
}
