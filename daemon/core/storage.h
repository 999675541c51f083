/* storage.h: the files of a VM beneath its storage location, opened so
 * that no symbolic link leads out of it (storage.c). */
#ifndef VR_STORAGE_H
#define VR_STORAGE_H

#include <sys/types.h>

#include "state.h"
#include "vr.h"

/* storage.c: files of a VM beneath its storage location (the parent of
 * vmdir): opened relative to it with io_open_beneath, so no symbolic link
 * from the VM's directory down is followed (-ELOOP, the message names
 * path).  path is vmdir or a path in it. */
int storage_open(const char *vmdir, const char *path, int flags,
                 mode_t mode) VR_WUR;
/* mkdir -p of path (0750), every component a real directory. */
int storage_mkdir(const char *vmdir, const char *path) VR_WUR;
/* ftruncate path (opened with storage_open) to size bytes. */
int storage_truncate(const char *vmdir, const char *path,
                     uint64_t size) VR_WUR;
/* Remove the files of directory path (a missing one is empty), fsync it;
 * the number removed or -errno. */
int storage_clear_dir(const char *vmdir, const char *path) VR_WUR;
/* Before the disks in vm->dir are handed by path to nbdkit and QEMU: each,
 * and its change log directory if it has one, is opened with storage_open
 * once (a link on the way: -ELOOP). */
int storage_check_disks(const struct vm *vm) VR_WUR;

#endif
