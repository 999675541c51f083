/* pointcat.c: write out the disks of a Replica VM as they were at a
 * recovery point, from the live disks and the undo files (lib/undo.h), for
 * tests that compare every retained point with the primary's disk at that
 * cycle.
 *
 *   pointcat UNDODIR POINT LATEST OUTPREFIX DISK...
 *
 * writes OUTPREFIX.0, OUTPREFIX.1, ... (one per DISK).  Exit status 0 on
 * success, 1 with a message on stderr otherwise (e.g. the point cannot be
 * reconstructed).
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "undo.h"

#define CHUNK (1u << 20)

int
main(int argc, char **argv)
{
    if (argc < 6 || argc - 5 > 64) {
        fprintf(stderr, "usage: pointcat UNDODIR POINT LATEST OUTPREFIX "
                        "DISK...\n");
        return 2;
    }
    unsigned ndisks = (unsigned)(argc - 5);
    uint64_t point = strtoull(argv[2], NULL, 10);
    uint64_t latest = strtoull(argv[3], NULL, 10);
    int dirfd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int fds[64];
    uint64_t sizes[64];
    if (dirfd < 0) {
        perror(argv[1]);
        return 1;
    }
    for (unsigned i = 0; i < ndisks; i++) {
        struct stat st;
        fds[i] = open(argv[5 + i], O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0 || fstat(fds[i], &st) < 0) {
            perror(argv[5 + i]);
            return 1;
        }
        sizes[i] = (uint64_t)st.st_size;
    }
    struct undo_view *v = NULL;
    if (undo_view_open(dirfd, point, latest, ndisks, sizes, &v) < 0) {
        fprintf(stderr, "pointcat: point %" PRIu64 ": %s\n", point,
                vr_errmsg());
        return 1;
    }
    uint8_t *buf = malloc(CHUNK);
    for (unsigned i = 0; i < ndisks && buf; i++) {
        char out[4096];
        snprintf(out, sizeof out, "%s.%u", argv[4], i);
        int ofd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (ofd < 0) {
            perror(out);
            return 1;
        }
        for (uint64_t off = 0; off < sizes[i]; off += CHUNK) {
            uint32_t n = sizes[i] - off < CHUNK ? (uint32_t)(sizes[i] - off)
                                                : CHUNK;
            if (undo_view_read(v, i, fds[i], buf, off, n) < 0 ||
                io_pwrite_all(ofd, buf, n, (off_t)off) < 0) {
                fprintf(stderr, "pointcat: disk %u at %" PRIu64 ": %s\n", i,
                        off, vr_errmsg());
                return 1;
            }
        }
        close(ofd);
    }
    free(buf);
    undo_view_free(v);
    return 0;
}
