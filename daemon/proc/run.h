/* run.h: running a command to completion, the one way vmreplicad does it
 * (nft, qemu-img): no shell, argv[0] found in $PATH by posix_spawnp
 * (which suits a threaded process), input on its stdin, its stdout and
 * stderr captured (bounded), an optional deadline.
 *
 * Long-running children that outlive the call (nbdkit, QEMU) are started
 * by spawn_wait (proc-int.h) instead: they need a log file, a lock
 * descriptor inherited, every other descriptor closed and their launch
 * (QEMU's -daemonize parent) waited for, which posix_spawn cannot do.
 */
#ifndef VR_PROC_RUN_H
#define VR_PROC_RUN_H

#include <stdbool.h>
#include <stddef.h>

#include "vr.h"

#define RUN_OUT_MAX (64u << 10) /* bytes kept of stdout and of stderr */

struct run {
    /* In: argv[0] is searched in $PATH; input goes to stdin (NULL:
     * nothing, stdin at end of file); timeout_ms 0 waits for ever. */
    const char *const *argv;
    const char *input;
    unsigned timeout_ms;
    /* Out: what it wrote (NUL-terminated, the first RUN_OUT_MAX bytes),
     * its wait status, and whether the deadline killed it. */
    char *out, *err;
    int status;
    bool timed_out;
};

/* Run r->argv to its end.  0 once it ran (look at status and timed_out);
 * -ENOENT if argv[0] is not found, -errno if it could not be started. */
int run_command(struct run *r) VR_WUR;
void run_fini(struct run *r);

#endif
