/* vm.c: VM objects (lookup, JSON, run directory, the spec of their
 * processes) and the vm endpoints of the management API: create
 * (qemu-img conversion to sparse raw), list, show, start/stop (via
 * vmproc), remove.  The server endpoints are server.c, events events.c. */
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "api-int.h"
#include "proc/libvirt.h"
#include "proc/vmproc.h"
#include "proc/vmspec.h"

/* What runs for vm now, from its processes (never from what was asked at
 * its last start): *running and *hypervisor while its QEMU runs, *served
 * while its nbdkit runs and its socket is there.  The run directory is
 * STORAGE/failover while a Replica VM is failed over (*view: its disks
 * are then a read-only view of the point under QEMU's qcow2 overlays, so
 * no NBD URI is the VM's disk), else STATE/run/UUID.  Caller frees. */
static char *
vm_status(const struct vm *vm, bool *served, bool *running, bool *view)
{
    *view = vm->mode == VM_MODE_REPLICA && vm->repl &&
            vm->repl->failover_point && vm->repl->storage;
    char *rundir = *view ? xasprintf("%s/failover", vm->repl->storage)
                         : vm_rundir(actx.d, vm);
    vmproc_status(rundir, served, running);
    *served = *served && vmproc_nbd_sock_exists(rundir);
    return rundir;
}

json_object *
vm_to_json(const struct vm *vm)
{
    json_object *o = json_object_new_object();
    bool served, running, view;
    CLEANUP_FREE char *rundir = vm_status(vm, &served, &running, &view);
    json_object_object_add(o, "name", json_object_new_string(vm->name));
    json_object_object_add(o, "uuid", json_object_new_string(vm->uuid));
    json_object_object_add(o, "cpus", json_object_new_int((int)vm->cpus));
    if (vm->kernel) {
        json_object_object_add(o, "kernel", json_object_new_string(vm->kernel));
        if (vm->initrd)
            json_object_object_add(o, "initrd",
                                   json_object_new_string(vm->initrd));
        if (vm->cmdline)
            json_object_object_add(o, "cmdline",
                                   json_object_new_string(vm->cmdline));
    }
    json_object_object_add(o, "nics",
                           vm->nics ? json_object_get(vm->nics)
                                    : json_object_new_array());
    json_object_object_add(o, "test_network",
                           json_object_new_string(vm->test_network
                                                      ? vm->test_network
                                                      : "none"));
    json_object_object_add(o, "memory_mib",
                           json_object_new_int((int)vm->memory_mib));
    json_object_object_add(o, "mode",
                           json_object_new_string(vm_mode_name(vm->mode)));
    /* A Replica VM without a relationship: one clear state (the commands
     * that apply to it are in vm_kept_copy_err). */
    json_object_object_add(o, "kept_copy",
                           json_object_new_boolean(vm_is_kept_copy(vm)));
    if (vm->mode == VM_MODE_REPLICA && vm->owner) {
        /* Who may register it (again): replica/replica-register.c,
         * check_owner. */
        json_object_object_add(o, "owner", json_object_new_string(vm->owner));
        json_object_object_add(o, "owner_trust_group",
                               json_object_new_string(vm->owner_group
                                                          ? vm->owner_group
                                                          : ""));
    }
    json_object_object_add(o, "running", json_object_new_boolean(running));
    json_object_object_add(o, "served", json_object_new_boolean(served));
    json_object_object_add(o, "hypervisor", json_object_new_boolean(running));
    if (vm->libvirt_domain)
        json_object_object_add(o, "libvirt_domain",
                               json_object_new_string(vm->libvirt_domain));
    json_object *disks = json_object_new_array();
    for (unsigned i = 0; i < vm->ndisks; i++) {
        json_object *d = json_object_new_object();
        json_object_object_add(d, "id",
                               json_object_new_string(vm->disks[i].id));
        json_object_object_add(d, "index", json_object_new_int((int)i));
        json_object_object_add(d, "path",
                               json_object_new_string(vm->disks[i].path));
        json_object_object_add(
            d, "size", json_object_new_int64((int64_t)vm->disks[i].size));
        if (served && !view) {
            CLEANUP_FREE char *uri = vmproc_nbd_uri(rundir, vm->disks[i].id);
            json_object_object_add(d, "nbd_uri", json_object_new_string(uri));
        }
        json_object_array_add(disks, d);
    }
    json_object_object_add(o, "disks", disks);
    return o;
}

/* --- VMs ------------------------------------------------------------------ */

int
api_vm_list(struct api_call *call VR_UNUSED, unsigned *status VR_UNUSED,
            json_object **out)
{
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&actx.d->lock);
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next) {
        json_object_array_add(arr, vm_to_json(vm));
        json_object *t = failover_test_vm_json(vm);
        if (t)
            json_object_array_add(arr, t);
    }
    pthread_mutex_unlock(&actx.d->lock);
    *out = json_object_new_object();
    json_object_object_add(*out, "vms", arr);
    return 0;
}

int
api_vm_show(struct api_call *call, unsigned *status VR_UNUSED,
            json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    /* "VM - Test": the test VM of a running test failover. */
    static const char sfx[] = " - Test";
    size_t n = strlen(call->arg), k = sizeof sfx - 1;
    if (n > k && strcmp(call->arg + n - k, sfx) == 0) {
        CLEANUP_FREE char *base = xasprintf("%.*s", (int)(n - k), call->arg);
        struct vm *b = vm_find(actx.d, base);
        if (b && (*out = failover_test_vm_json(b))) {
            pthread_mutex_unlock(&actx.d->lock);
            return 0;
        }
    }
    int rc = vm_lookup(actx.d, call->arg, &vm);
    if (rc == 0)
        *out = vm_to_json(vm);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

/* --- vm create --from-libvirt ---------------------------------------------- */

static int
disk_size(const char *path, uint64_t *size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    off_t end = fd >= 0 ? lseek(fd, 0, SEEK_END) : -1;
    int rc = end < 0 ? vr_err(-errno, "disk %s: %s", path, strerror(errno))
                     : 0;
    if (fd >= 0)
        close(fd);
    if (rc == 0)
        *size = (uint64_t)end;
    return rc;
}

/* The adopted domain's disks: a raw file is tracked where it is, any
 * other (qcow2, a block device...) is converted to VMDIR/diskN.raw. */
static int
adopt_disks(struct vm *vm, const struct lv_adopt *a)
{
    for (unsigned i = 0; i < a->ndisks; i++) {
        struct disk *dk = &vm->disks[vm->ndisks++];
        snprintf(dk->id, sizeof dk->id, "disk%u", i);
        int rc = 0;
        if (a->in_place[i]) {
            dk->path = xstrdup(a->path[i]);
            if (access(dk->path, R_OK | W_OK) < 0)
                rc = vr_err(-errno, "disk %s: %s", dk->path, strerror(errno));
        } else {
            dk->path = xasprintf("%s/%s.raw", vm->dir, dk->id);
            char *argv[] = { (char *)"qemu-img", (char *)"convert",
                             (char *)"-f", a->format[i], (char *)"-O",
                             (char *)"raw", a->path[i], dk->path, NULL };
            rc = vmproc_run(argv);
        }
        if (rc == 0)
            rc = disk_size(dk->path, &dk->size);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Undo a failed adoption: converted disks and the VM's directory go (a
 * disk taken in place stays: it is the domain's). */
static void
adopt_undo(struct vm *vm, const struct lv_adopt *a)
{
    for (unsigned i = 0; i < vm->ndisks; i++)
        if (!a->in_place[i])
            unlink(vm->disks[i].path);
    CLEANUP_FREE char *bak = xasprintf("%s/libvirt-original.xml", vm->dir);
    unlink(bak);
    rmdir(vm->dir);
    vm_free(vm);
}

/* The VM of an adopted domain, its disks in place or converted and the
 * original XML kept as VMDIR/libvirt-original.xml. */
static int
adopt_build(const char *name, const char *domain, const struct lv_adopt *a,
            struct vm **out)
{
    struct vm *vm = xcalloc(1, sizeof *vm);
    vr_uuid_new(vm->uuid);
    vm->name = xstrdup(name);
    vm->cpus = a->cpus < 1 ? 1 : a->cpus > 64 ? 64 : a->cpus;
    vm->memory_mib = a->memory_mib < 16 ? 16 : a->memory_mib;
    vm->mode = VM_MODE_NONE;
    vm->dir = xasprintf("%s/vms/%s", actx.d->state_dir, vm->uuid);
    vm->libvirt_domain = xstrdup(domain);
    if (json_object_array_length(a->nics) > 0)
        vm->nics = json_object_get(a->nics);
    int rc = nics_validate(vm->nics);
    if (rc == 0)
        rc = io_mkdir_p(vm->dir, 0750);
    if (rc == 0)
        rc = adopt_disks(vm, a);
    if (rc == 0) {
        CLEANUP_FREE char *bak = xasprintf("%s/libvirt-original.xml",
                                           vm->dir);
        rc = io_write_file_atomic(bak, a->xml, strlen(a->xml));
    }
    if (rc < 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        adopt_undo(vm, a);
        return vr_err(rc, "adopt libvirt domain %s: %s", domain, msg);
    }
    *out = vm;
    return 0;
}

/* The domain redefined on the exports, then the VM recorded; a failure
 * defines the original again. */
static int
adopt_commit(struct vm *vm, const struct lv_adopt *a)
{
    CLEANUP_FREE char *rundir = vm_rundir(actx.d, vm);
    struct vmproc_disk dks[MAX_DISKS];
    for (unsigned i = 0; i < vm->ndisks; i++)
        dks[i] = (struct vmproc_disk){ vm->disks[i].id, vm->disks[i].path };
    int rc = lv_adopt_redefine(a->xml, rundir, vm->ndisks, dks);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&actx.d->lock);
    if (vm_find(actx.d, vm->name))
        rc = vr_err(-EEXIST, "vm %s: already exists", vm->name);
    if (rc == 0)
        rc = catalog_save_vm(actx.d->cat, vm);
    if (rc == 0) {
        vm->next = actx.d->vms;
        actx.d->vms = vm;
        event_add(actx.d->cat, "info", vm->name, "vm created from libvirt "
                  "domain %s with %u disk(s); the domain now runs on the "
                  "tracked exports", vm->libvirt_domain, vm->ndisks);
    }
    pthread_mutex_unlock(&actx.d->lock);
    if (rc < 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        if (lv_define(a->xml) < 0)
            vr_err_clear();
        vr_err(rc, "%s", msg);
    }
    return rc;
}

static int
vm_adopt(const char *name, const char *domain, unsigned *status,
         json_object **out)
{
    pthread_mutex_lock(&actx.d->lock);
    bool exists = vm_find(actx.d, name) != NULL;
    pthread_mutex_unlock(&actx.d->lock);
    if (exists)
        return vr_err(-EEXIST, "vm %s: already exists", name);
    struct lv_adopt a;
    int rc = lv_adopt_read(domain, &a);
    if (rc < 0)
        return rc;
    struct vm *vm = NULL;
    rc = adopt_build(name, domain, &a, &vm);
    if (rc == 0) {
        rc = adopt_commit(vm, &a);
        if (rc < 0)
            adopt_undo(vm, &a);
    }
    lv_adopt_fini(&a);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&actx.d->lock);
    *out = vm_to_json(vm);
    pthread_mutex_unlock(&actx.d->lock);
    *status = 201;
    return 0;
}

int
api_vm_create(struct api_call *call, unsigned *status, json_object **out)
{
    json_object *b = call->body;
    const char *name = jstr(b, "name");
    if (!name || !vr_name_valid(name))
        return vr_err(-EINVAL, "vm name %s: invalid (1-64 of A-Z a-z 0-9 . _ "
                               "- space, not starting with . - or space)",
                      name ? name : "(missing)");
    const char *domain = jstr(b, "from_libvirt");
    if (domain)
        return vm_adopt(name, domain, status, out);
    json_object *disks;
    if (!json_object_object_get_ex(b, "disks", &disks) ||
        !json_object_is_type(disks, json_type_array) ||
        json_object_array_length(disks) < 1)
        return vr_err(-EINVAL, "vm %s: at least one disk is required", name);
    size_t nd = json_object_array_length(disks);
    if (nd > MAX_DISKS)
        return vr_err(-EINVAL, "vm %s: at most %d disks", name, MAX_DISKS);
    int64_t cpus = jint(b, "cpus", 1), mem = jint(b, "memory_mib", 256);
    if (cpus < 1 || cpus > 64 || mem < 16 || mem > 1024 * 1024)
        return vr_err(-EINVAL, "vm %s: cpus 1..64 and memory_mib 16.. only",
                      name);

    char *boot[3];
    json_object *nics = NULL;
    int rc = nics_from_create(b, &nics);
    if (rc < 0)
        return rc;
    rc = vm_boot_parse(b, boot);
    if (rc < 0) {
        json_object_put(nics);
        return rc;
    }

    pthread_mutex_lock(&actx.d->lock);
    bool exists = vm_find(actx.d, name) != NULL;
    pthread_mutex_unlock(&actx.d->lock);
    if (exists) {
        json_object_put(nics);
        for (int k = 0; k < 3; k++)
            free(boot[k]);
        return vr_err(-EEXIST, "vm %s: already exists", name);
    }

    struct vm *vm = xcalloc(1, sizeof *vm);
    vr_uuid_new(vm->uuid);
    vm->name = xstrdup(name);
    vm->cpus = (unsigned)cpus;
    vm->memory_mib = (unsigned)mem;
    vm->mode = VM_MODE_NONE;
    vm->dir = xasprintf("%s/vms/%s", actx.d->state_dir, vm->uuid);
    vm->kernel = boot[0];
    vm->initrd = boot[1];
    vm->cmdline = boot[2];
    vm->nics = nics;
    rc = io_mkdir_p(vm->dir, 0750);
    for (size_t i = 0; rc == 0 && i < nd; i++) {
        json_object *d = json_object_array_get_idx(disks, i);
        struct disk *dk = &vm->disks[vm->ndisks++];
        snprintf(dk->id, sizeof dk->id, "disk%zu", i);
        dk->path = xasprintf("%s/%s.raw", vm->dir, dk->id);
        const char *src = jstr(d, "path");
        int64_t size = jint(d, "size", 0);
        if (src) {
            if (src[0] != '/') {
                rc = vr_err(-EINVAL, "disk %s: must be an absolute path", src);
                break;
            }
            if (access(src, R_OK) < 0) {
                rc = vr_err(-errno, "disk %s: %s", src, strerror(errno));
                break;
            }
            char *argv[] = { (char *)"qemu-img", (char *)"convert",
                             (char *)"-O", (char *)"raw", (char *)src,
                             dk->path, NULL };
            rc = vmproc_run(argv);
        } else if (size > 0) {
            int fd = open(dk->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                          0640);
            if (fd < 0 || ftruncate(fd, size) < 0)
                rc = vr_err(-errno, "create %s: %s", dk->path,
                            strerror(errno));
            if (fd >= 0)
                close(fd);
        } else {
            rc = vr_err(-EINVAL, "disk %zu: needs a path or a size > 0", i);
        }
        if (rc == 0) {
            struct stat st;
            if (stat(dk->path, &st) < 0)
                rc = vr_err(-errno, "stat %s: %s", dk->path, strerror(errno));
            else
                dk->size = (uint64_t)st.st_size;
        }
    }
    pthread_mutex_lock(&actx.d->lock);
    if (rc == 0 && vm_find(actx.d, name))
        rc = vr_err(-EEXIST, "vm %s: already exists", name);
    if (rc == 0)
        rc = catalog_save_vm(actx.d->cat, vm);
    if (rc < 0) {
        pthread_mutex_unlock(&actx.d->lock);
        char saved[1024];
        snprintf(saved, sizeof saved, "%s", vr_errmsg());
        for (unsigned i = 0; i < vm->ndisks; i++)
            unlink(vm->disks[i].path);
        rmdir(vm->dir);
        vm_free(vm);
        return vr_err(rc, "%s", saved);
    }
    vm->next = actx.d->vms;
    actx.d->vms = vm;
    event_add(actx.d->cat, "info", vm->name, "vm created with %u disk(s)",
              vm->ndisks);
    *out = vm_to_json(vm);
    pthread_mutex_unlock(&actx.d->lock);
    *status = 201;
    return 0;
}

/* Start or stop run their processes without the lock (up to the QEMU
 * timeouts); VM_OP_CHANGE keeps a second start, stop or remove out
 * meanwhile. */
static int
begin_change(struct api_call *call, struct vm **out)
{
    int rc = vm_lookup(actx.d, call->arg, out);
    if (rc == 0 && vm_busy(*out, VM_OP_CHANGE))
        rc = vr_err(-EBUSY, "vm %s: a start or stop is in progress",
                    (*out)->name);
    if (rc == 0)
        vm_op_begin(*out, VM_OP_CHANGE);
    return rc;
}

static void
end_change(struct vm *vm)
{
    vm_op_end(vm, VM_OP_CHANGE);
    if (vm->repl)
        vm->repl->kick = true;
    pthread_cond_broadcast(&actx.d->cond);
}

int
api_vm_start(struct api_call *call, unsigned *status VR_UNUSED,
             json_object **out)
{
    struct vm *vm = NULL;
    enum vmproc_hv hv = VMPROC_HV_DEFAULT;
    const char *hvname = jstr(call->body, "hypervisor");
    if (hvname && vmproc_hv_parse(hvname, &hv) < 0)
        return -EINVAL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = begin_change(call, &vm);
    if (rc == 0 && vm->repl && vm->repl->mode == VM_MODE_PRIMARY &&
        (vm_busy(vm, VM_OP_PREPARE) ||
         vm->repl->st == REPL_ST_PREPARED)) {
        vm_op_end(vm, VM_OP_CHANGE);
        char q[VR_QNAME_MAX];
        const char *n = vr_qname(vm->name, q);
        rc = vr_err(-EBUSY, "vm %s: prepared for failover to %s: it starts "
                    "there ('vmreplica failover start %s' on the Replica "
                    "server); 'vmreplica failover stop %s' here undoes the "
                    "preparation", n, vm->repl->replica_server, n, n);
    }
    if (rc == 0 && vm_is_kept_copy(vm)) {
        vm_op_end(vm, VM_OP_CHANGE);
        rc = vm_kept_copy_err(vm, "vm start");
    } else if (rc == 0 && vm->mode == VM_MODE_REPLICA &&
               !(vm->repl && vm->repl->st == REPL_ST_FAILED_OVER)) {
        vm_op_end(vm, VM_OP_CHANGE);
        rc = vr_err(-EBUSY, "vm %s: is a Replica VM; it starts only through "
                            "failover",
                    vm->name);
    }
    if (rc < 0) {
        pthread_mutex_unlock(&actx.d->lock);
        return rc;
    }
    vm->hypervisor = !jbool(call->body, "no_hypervisor", false);
    CLEANUP_FREE char *rundir = vm_rundir(actx.d, vm);
    struct vmproc_spec s;
    struct vmproc_disk dks[MAX_DISKS];
    vm_spec_of(vm, &s, dks, rundir);
    if (hv != VMPROC_HV_DEFAULT)
        s.hv = hv;
    /* The spec borrows vm's strings: a changing VM is neither removed nor
     * altered. */
    pthread_mutex_unlock(&actx.d->lock);
    rc = storage_check_disks(vm);
    if (rc == 0)
        rc = vmproc_start(&s);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", vr_errmsg());
    pthread_mutex_lock(&actx.d->lock);
    end_change(vm);
    if (rc == 0) {
        event_add(actx.d->cat, "info", vm->name, "vm started (%s)",
                  !vm->hypervisor ? "disks served only"
                  : strcmp(vmproc_hv_name(s.hv), "libvirt") == 0
                      ? "libvirt domain"
                      : "qemu");
        *out = vm_to_json(vm);
    } else {
        vr_err(rc, "%s", msg);
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

int
api_vm_stop(struct api_call *call, unsigned *status VR_UNUSED,
            json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = begin_change(call, &vm);
    if (rc < 0) {
        pthread_mutex_unlock(&actx.d->lock);
        return rc;
    }
    CLEANUP_FREE char *rundir = vm_rundir(actx.d, vm);
    bool force = jbool(call->body, "force", false);
    pthread_mutex_unlock(&actx.d->lock);
    rc = vmproc_stop(rundir, force, 30000);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", vr_errmsg());
    pthread_mutex_lock(&actx.d->lock);
    end_change(vm);
    if (rc == 0) {
        vm->hypervisor = false;
        event_add(actx.d->cat, "info", vm->name, "vm stopped");
        *out = vm_to_json(vm);
    } else {
        vr_err(rc, "%s", msg);
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

static void
remove_tree(const char *path)
{
    char *argv[] = { (char *)"rm", (char *)"-rf", (char *)"--",
                     (char *)path, NULL };
    VR_IGNORE(vmproc_run(argv));
}

int
api_vm_remove(struct api_call *call, unsigned *status VR_UNUSED,
              json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = vm_lookup(actx.d, call->arg, &vm);
    if (rc == 0) {
        CLEANUP_FREE char *rundir = vm_rundir(actx.d, vm);
        char q[VR_QNAME_MAX];
        bool served, running;
        vmproc_status(rundir, &served, &running);
        if (served || running)
            rc = vr_err(-EBUSY, "vm %s: is running; stop it first", vm->name);
        else if (vmproc_rundir_busy(rundir))
            rc = vr_err(-EBUSY, "vm %s: %s", vm->name, vr_errmsg());
        else if (vm_busy(vm, VM_OP_APPLY | VM_OP_CHANGE))
            rc = vr_err(-EBUSY, "vm %s: a cycle is being applied or a start "
                                "or stop is in progress; try again",
                        vm->name);
        else if (vm->repl && (vm->repl->test_point || vm_busy(vm, VM_OP_TEST)))
            rc = vr_err(-EBUSY, "vm %s: a test failover is running; run "
                        "'vmreplica failover stop %s --test' first",
                        vr_qname(vm->name, q), vr_qname(vm->name, q));
        else if (vm->repl)
            rc = vr_err(-EBUSY, "vm %s: replication is enabled; remove it "
                                "first",
                        vm->name);
        if (rc == 0)
            rc = catalog_delete_vm(actx.d->cat, vm->uuid);
        if (rc == 0) {
            for (struct vm **p = &actx.d->vms; *p; p = &(*p)->next)
                if (*p == vm) {
                    *p = vm->next;
                    break;
                }
            event_add(actx.d->cat, "info", vm->name, "vm removed");
            if (vm->mode != VM_MODE_REPLICA)
                remove_tree(vm->dir);
            remove_tree(rundir);
            *out = json_object_new_object();
            json_object_object_add(*out, "removed",
                                   json_object_new_string(vm->name));
            vm_free(vm);
        }
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}
