/* cycapply.c: build one cycle of a disk's change log the way the shipper
 * does (writes logged by reference read from the disk image and the
 * cycle's preserve file) and apply it to a replica image, for tests of the
 * data plane without a daemon.
 *
 *   cycapply LOGDIR CYCLE DISK REPLICA
 *
 * Exit status 0 on success, 1 with a message on stderr otherwise.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cycle.h"

int
main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: cycapply LOGDIR CYCLE DISK REPLICA\n");
        return 2;
    }
    uint64_t cycle = strtoull(argv[2], NULL, 10);
    int dirfd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int disk = open(argv[3], O_RDONLY | O_CLOEXEC);
    int rep = open(argv[4], O_RDWR | O_CLOEXEC);
    int out = memfd_create("payload", MFD_CLOEXEC);
    struct stat st;
    if (dirfd < 0 || disk < 0 || rep < 0 || out < 0 || fstat(rep, &st) < 0) {
        perror("cycapply: open");
        return 1;
    }
    struct cyc_hdr h = { .version = CYC_VERSION, .cycle = cycle, .ndisks = 1 };
    struct cyc_builder *b = NULL;
    char name[32];
    uint64_t raw, wire, nrec;
    cl_seg_name(cycle, true, name);
    int rc = cyc_builder_new(out, false, 1, &h, &b);
    if (rc == 0)
        rc = cyc_builder_add_segment_ref(b, dirfd, name, 0, disk);
    if (rc == 0)
        rc = cyc_builder_finish(b, &raw, &wire);
    cyc_builder_free(b);
    uint64_t size = (uint64_t)st.st_size;
    if (rc == 0 && lseek(out, 0, SEEK_SET) == 0)
        rc = cyc_apply_file(out, &rep, &size, 1, &nrec);
    if (rc < 0) {
        fprintf(stderr, "cycapply: cycle %" PRIu64 ": %s\n", cycle,
                vr_errmsg());
        return 1;
    }
    return 0;
}
