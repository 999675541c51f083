/* cldump.c: print a change-log segment, one record per line, for tests.
 *
 *   cldump [-H] [-F] SEGMENT...
 *
 * Each record prints as "kind disk offset len seq" with kind one of write,
 * wref (a write logged by reference), zero, trim (the CL_SEAL record is checked, not printed); -F appends " fua"
 * to records written with FUA.  -H first prints "# cycle C disk D
 * first_seq S" per segment.  Exit status: 0 if every
 * segment read to a clean end, 1 if one is corrupt or torn (the message goes
 * to stderr after the records that were good), 2 on usage errors.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "changelog.h"

static const char *
kind_name(uint8_t kind)
{
    switch (kind) {
    case CL_WRITE:
        return "write";
    case CL_ZERO:
        return "zero";
    case CL_TRIM:
        return "trim";
    case CL_WREF:
        return "wref";
    default:
        return "?";
    }
}

static int
dump(const char *path, bool header, bool flags)
{
    char *p1 = xstrdup(path), *p2 = xstrdup(path);
    const char *dir = dirname(p1), *name = basename(p2);
    struct cl_reader *r = NULL;
    struct cl_rec rec;
    int rc = -1;

    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        fprintf(stderr, "cldump: %s: %m\n", dir);
        goto out;
    }
    rc = cl_reader_open(dirfd, name, &r);
    if (rc < 0) {
        fprintf(stderr, "cldump: %s: %s\n", path, vr_errmsg());
        goto out;
    }
    if (header)
        printf("# cycle %" PRIu64 " disk %u first_seq %" PRIu64 "\n",
               cl_reader_hdr(r)->cycle, cl_reader_hdr(r)->disk,
               cl_reader_hdr(r)->first_seq);
    while ((rc = cl_reader_next(r, &rec)) == 1)
        printf("%s %u %" PRIu64 " %" PRIu32 " %" PRIu64 "%s\n",
               kind_name(rec.kind), rec.disk, rec.offset, rec.len, rec.seq,
               flags && (rec.flags & CL_F_FUA) ? " fua" : "");
    if (rc < 0)
        fprintf(stderr, "cldump: %s: %s\n", path, vr_errmsg());
out:
    cl_reader_free(r);
    if (dirfd >= 0)
        close(dirfd);
    free(p1);
    free(p2);
    return rc;
}

int
main(int argc, char **argv)
{
    bool header = false, flags = false;
    int opt, status = 0;

    while ((opt = getopt(argc, argv, "HF")) != -1) {
        if (opt == 'H') {
            header = true;
        } else if (opt == 'F') {
            flags = true;
        } else {
            fprintf(stderr, "usage: cldump [-H] [-F] SEGMENT...\n");
            return 2;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "usage: cldump [-H] [-F] SEGMENT...\n");
        return 2;
    }
    for (int i = optind; i < argc; i++)
        if (dump(argv[i], header, flags) < 0)
            status = 1;
    return status;
}
