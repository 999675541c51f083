/* logdir.h: a disk's change-log directory (core/logdir.c). */
#ifndef VR_LOGDIR_H
#define VR_LOGDIR_H

#include <stddef.h>
#include <stdint.h>

#include "state.h"
#include "vr.h"

/* DISK.vrlog of dk. Caller frees. */
char *logdir_of(const struct disk *dk);
/* Sealed cycle numbers of the log in dir, sorted (caller frees *out);
 * *open_cycle (if not NULL): the open cycle, 0 if none. */
int logdir_sealed(const char *dir, uint64_t **out, size_t *n,
                  uint64_t *open_cycle) VR_WUR;
/* The last cycle of a disk's change log that holds no write made after
 * now (its last sealed cycle, or the open one's predecessor; 0 if there is
 * no log): every later write is in a cycle after it.  Disks not served. */
int logdir_base(const struct disk *dk, uint64_t *base) VR_WUR;

#endif
