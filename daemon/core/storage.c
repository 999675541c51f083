/* storage.c: the files of a VM beneath its storage location.
 *
 * A Replica VM lives in STORAGE/UUID (vm->dir, r->storage), STORAGE being
 * the storage location of the authorization entry that admitted its
 * primary (or state_dir/vms for a VM that became a Replica VM by reverse
 * replication).  Whatever the daemon opens in it — disks, staged cycles and
 * their temporaries, undo files, the run directories of a failover — is
 * opened here, relative to a descriptor of STORAGE, with io_open_beneath:
 * no component from UUID on may be a symbolic link, and nothing leads out.
 * A link left under the storage location is refused (-ELOOP), never
 * followed; each open checks afresh, so a link swapped in after a mkdir
 * is refused too.  STORAGE's own path is the administrator's and may hold
 * links.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "storage.h"

/* Split path (vmdir or a path in it) into STORAGE (caller frees) and the
 * part beneath it, "UUID[/...]" (points into path or vmdir). */
static int
split(const char *vmdir, const char *path, char **root, char **rel)
{
    size_t n = strlen(vmdir);
    while (n > 1 && vmdir[n - 1] == '/')
        n--;
    const char *slash = memrchr(vmdir, '/', n);
    if (vmdir[0] != '/' || !slash || slash + 1 == vmdir + n ||
        strncmp(path, vmdir, n) != 0 || (path[n] != '\0' && path[n] != '/'))
        return vr_err(-EXDEV, "%s: not in the vm's directory %s", path,
                      vmdir);
    *root = slash == vmdir ? xstrdup("/")
                           : xstrndup(vmdir, (size_t)(slash - vmdir));
    *rel = xasprintf("%.*s%s", (int)(vmdir + n - slash - 1), slash + 1,
                     path + n);
    return 0;
}

static int
refused(int rc, const char *what, const char *path, const char *root)
{
    if (rc == -ELOOP)
        return vr_err(rc, "%s %s: refused: a symbolic link in the path "
                      "beneath %s (not followed)", what, path, root);
    if (rc == -EXDEV)
        return vr_err(rc, "%s %s: refused: it leads out of %s", what, path,
                      root);
    return vr_err(rc, "%s %s: %s", what, path, strerror(-rc));
}

int
storage_open(const char *vmdir, const char *path, int flags, mode_t mode)
{
    CLEANUP_FREE char *root = NULL;
    CLEANUP_FREE char *rel = NULL;
    int rc = split(vmdir, path, &root, &rel);
    if (rc < 0)
        return rc;
    int rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0)
        return vr_err(-errno, "open %s: %s", root, strerror(errno));
    int fd = io_open_beneath(rootfd, rel, flags, mode);
    close(rootfd);
    return fd < 0 ? refused(fd, "open", path, root) : fd;
}

int
storage_mkdir(const char *vmdir, const char *path)
{
    CLEANUP_FREE char *root = NULL;
    CLEANUP_FREE char *rel = NULL;
    int rc = split(vmdir, path, &root, &rel);
    if (rc == 0)
        rc = io_mkdir_beneath(root, rel, 0750);
    return rc < 0 ? refused(rc, "mkdir", path, root ? root : vmdir) : 0;
}

int
storage_truncate(const char *vmdir, const char *path, uint64_t size)
{
    int fd = storage_open(vmdir, path, O_WRONLY, 0);
    if (fd < 0)
        return fd;
    int rc = 0;
    if (ftruncate(fd, (off_t)size) < 0)
        rc = vr_err(-errno, "resize %s: %s", path, strerror(errno));
    close(fd);
    return rc;
}

int
storage_clear_dir(const char *vmdir, const char *path)
{
    int fd = storage_open(vmdir, path, O_RDONLY | O_DIRECTORY, 0);
    if (fd == -ENOENT)
        return 0;
    if (fd < 0)
        return fd;
    return io_clear_dirfd(fd, path);
}

int
storage_check_disks(const struct vm *vm)
{
    for (unsigned i = 0; vm->dir && i < vm->ndisks; i++) {
        CLEANUP_FREE char *root = NULL;
        CLEANUP_FREE char *rel = NULL;
        if (split(vm->dir, vm->disks[i].path, &root, &rel) < 0) {
            vr_err_clear(); /* not in the VM's directory: not ours */
            continue;
        }
        int fd = storage_open(vm->dir, vm->disks[i].path, O_RDONLY, 0);
        if (fd < 0)
            return fd;
        close(fd);
        /* The data plane's change log beside it, once there is one. */
        CLEANUP_FREE char *log = xasprintf("%s.vrlog", vm->disks[i].path);
        fd = storage_open(vm->dir, log, O_RDONLY | O_DIRECTORY, 0);
        if (fd < 0 && fd != -ENOENT)
            return fd;
        if (fd >= 0)
            close(fd);
        vr_err_clear();
    }
    return 0;
}
