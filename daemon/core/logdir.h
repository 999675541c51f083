/* logdir.h: a disk's change-log directory (core/logdir.c). */
#ifndef VR_LOGDIR_H
#define VR_LOGDIR_H

#include <stddef.h>
#include <stdint.h>

#include "state.h"
#include "vr.h"

/* DISK.vrlog of dk. Caller frees. */
char *logdir_of(const struct disk *dk);
/* A file of a change-log directory named "<20-digit cycle>.<ext>": ext
 * (after the dot, e.g. "log", "open", "pre", "app", "dirty") and *cycle;
 * NULL for any other name. */
const char *logdir_name(const char *name, uint64_t *cycle);
/* Does the tracking marker of any of vm's disks say tracking stopped (or
 * not read)?  A log made before markers has none: tracking. */
bool logdir_tracking_stopped(const struct vm *vm);
/* Sealed cycle numbers of the log in dir, sorted (caller frees *out);
 * *open_cycle (if not NULL): the open cycle, 0 if none. */
int logdir_sealed(const char *dir, uint64_t **out, size_t *n,
                  uint64_t *open_cycle) VR_WUR;
/* The last cycle of a disk's change log that holds no write made after
 * now (its last sealed cycle, or the open one's predecessor; 0 if there is
 * no log): every later write is in a cycle after it.  Disks not served. */
int logdir_base(const struct disk *dk, uint64_t *base) VR_WUR;

#endif
