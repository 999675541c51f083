/* vm.c: VM objects and the VM and server endpoints of the management API:
 * create (qemu-img conversion to sparse raw), list, show, start/stop (via
 * vmproc), remove, and server show/set. */
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "api-int.h"
#include "daemon.h"
#include "proc/vmproc.h"

struct vm *
vm_find(const char *key)
{
    for (struct vm *vm = D->vms; vm; vm = vm->next)
        if (strcmp(vm->name, key) == 0 || strcmp(vm->uuid, key) == 0)
            return vm;
    return NULL;
}

struct vm *
vm_find_uuid(const char *uuid)
{
    for (struct vm *vm = D->vms; vm; vm = vm->next)
        if (strcmp(vm->uuid, uuid) == 0)
            return vm;
    return NULL;
}

void
repl_free(struct repl *r)
{
    if (!r)
        return;
    free(r->replica_server);
    free(r->connect_address);
    free(r->primary_server);
    free(r->storage);
    free(r->last_error);
    free(r->trust_group);
    free(r->auth);
    free(r->task);
    free(r);
}

void
vm_free(struct vm *vm)
{
    if (!vm)
        return;
    for (unsigned i = 0; i < vm->ndisks; i++)
        free(vm->disks[i].path);
    repl_free(vm->repl);
    free(vm->name);
    free(vm->dir);
    free(vm->kernel);
    free(vm->initrd);
    free(vm->cmdline);
    json_object_put(vm->nics);
    free(vm->test_network);
    free(vm->owner);
    free(vm->owner_group);
    free(vm);
}

char *
vm_rundir(const struct vm *vm)
{
    return xasprintf("%s/run/%s", D->state_dir, vm->uuid);
}

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
                         : vm_rundir(vm);
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
    if (vm->mode == VM_MODE_REPLICA && vm->owner) {
        /* Who may register it (again): replica.c, check_owner. */
        json_object_object_add(o, "owner", json_object_new_string(vm->owner));
        json_object_object_add(o, "owner_trust_group",
                               json_object_new_string(vm->owner_group
                                                          ? vm->owner_group
                                                          : ""));
    }
    json_object_object_add(o, "running", json_object_new_boolean(running));
    json_object_object_add(o, "served", json_object_new_boolean(served));
    json_object_object_add(o, "hypervisor", json_object_new_boolean(running));
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

const char *
jstr(json_object *o, const char *key)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) ||
        !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

bool
jbool(json_object *o, const char *key, bool dflt)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || !v)
        return dflt;
    return json_object_get_boolean(v);
}

int64_t
jint(json_object *o, const char *key, int64_t dflt)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || !v)
        return dflt;
    return json_object_get_int64(v);
}

int
vm_lookup(const char *key, struct vm **out)
{
    *out = vm_find(key);
    return *out ? 0 : vr_err(-ENOENT, "vm %s: not found", key);
}

/* --- server -------------------------------------------------------------- */

static json_object *
server_json(void)
{
    const struct server_cfg *c = &D->cfg;
    json_object *o = json_object_new_object();
#define STR(k, v)                                                              \
    json_object_object_add(o, k, (v) ? json_object_new_string(v) : NULL)
    STR("hostname", c->hostname);
    STR("version", VERSION);
    STR("state_dir", D->state_dir);
    json_object_object_add(o, "replica_enabled",
                           json_object_new_boolean(c->replica_enabled));
    STR("auth", c->auth);
    json_object_object_add(o, "certificate_port",
                           json_object_new_int((int)c->cert_port));
    STR("certificate", c->cert);
    STR("key", c->key);
    STR("ca", c->ca);
    STR("crl", c->crl);
    char sha1[41];
    const char *thumb =
        c->cert && tls_thumbprint(c->cert, sha1) == 0 ? sha1 : NULL;
    STR("certificate_thumbprint", thumb);
    STR("certificate_store", c->cert_store);
    json_object_object_add(o, "kerberos_port",
                           json_object_new_int((int)c->krb_port));
    STR("keytab", c->keytab);
    json_object_object_add(o, "kerberos_encrypt",
                           json_object_new_boolean(c->krb_encrypt));
    json_object_object_add(o, "allow_any",
                           json_object_new_boolean(c->allow_any));
    STR("default_storage", c->default_storage);
    json_object_object_add(o, "listening",
                           json_object_new_boolean(D->listener != NULL ||
                                                   D->krb_listener != NULL));
    json_object_object_add(o, "listening_certificate",
                           json_object_new_boolean(D->listener != NULL));
    json_object_object_add(o, "listening_kerberos",
                           json_object_new_boolean(D->krb_listener != NULL));
    json_object_object_add(o, "monitoring_interval",
                           json_object_new_int((int)c->monitoring_interval_s));
    json_object_object_add(o, "firewall_enabled",
                           json_object_new_boolean(c->firewall_enabled));
    STR("firewall_error", firewall_error());
#undef STR
    return o;
}

int
api_server_show(struct api_call *call VR_UNUSED, unsigned *status VR_UNUSED,
                json_object **out)
{
    pthread_mutex_lock(&D->lock);
    *out = server_json();
    pthread_mutex_unlock(&D->lock);
    return 0;
}

static int
abs_path_arg(json_object *body, const char *key, char **field)
{
    const char *v = jstr(body, key);
    if (!v)
        return 0;
    if (v[0] != '/')
        return vr_err(-EINVAL, "%s: must be an absolute path: %s", key, v);
    free(*field);
    *field = xstrdup(v);
    return 0;
}

static int
port_arg(json_object *body, const char *key, unsigned *field)
{
    json_object *v;
    if (!json_object_object_get_ex(body, key, &v))
        return 0;
    int64_t p = json_object_get_int64(v);
    if (p < 1 || p > 65535)
        return vr_err(-EINVAL, "%s: out of range: %lld", key, (long long)p);
    *field = (unsigned)p;
    return 0;
}

/* Give c copies of its strings, so that a refusal can restore the old. */
static void
cfg_copy_strings(struct server_cfg *c)
{
    c->hostname = c->hostname ? xstrdup(c->hostname) : NULL;
    c->auth = c->auth ? xstrdup(c->auth) : NULL;
    c->cert = c->cert ? xstrdup(c->cert) : NULL;
    c->key = c->key ? xstrdup(c->key) : NULL;
    c->ca = c->ca ? xstrdup(c->ca) : NULL;
    c->keytab = c->keytab ? xstrdup(c->keytab) : NULL;
    c->crl = c->crl ? xstrdup(c->crl) : NULL;
    c->cert_store = c->cert_store ? xstrdup(c->cert_store) : NULL;
    c->thumbprint = c->thumbprint ? xstrdup(c->thumbprint) : NULL;
    c->default_storage = c->default_storage ? xstrdup(c->default_storage)
                                            : NULL;
}

static void
cfg_free_strings(struct server_cfg *c)
{
    free(c->hostname);
    free(c->auth);
    free(c->cert);
    free(c->key);
    free(c->ca);
    free(c->keytab);
    free(c->crl);
    free(c->cert_store);
    free(c->thumbprint);
    free(c->default_storage);
}

/* The switches, ports and authentication of a `server set` body. */
static int
cfg_set_listener(json_object *b, struct server_cfg *c)
{
    json_object *v;
    if (json_object_object_get_ex(b, "replica_enabled", &v))
        c->replica_enabled = json_object_get_boolean(v);
    if (json_object_object_get_ex(b, "allow_any", &v))
        c->allow_any = json_object_get_boolean(v);
    int rc = port_arg(b, "certificate_port", &c->cert_port);
    if (rc == 0)
        rc = port_arg(b, "kerberos_port", &c->krb_port);
    if (rc < 0)
        return rc;
    if (json_object_object_get_ex(b, "kerberos_encrypt", &v))
        c->krb_encrypt = json_object_get_boolean(v);
    if (json_object_object_get_ex(b, "monitoring_interval", &v))
        c->monitoring_interval_s = (unsigned)json_object_get_int64(v);
    const char *auth = jstr(b, "auth");
    if (!auth)
        return 0;
    if (strcmp(auth, "certificate") != 0 && strcmp(auth, "kerberos") != 0 &&
        strcmp(auth, "both") != 0)
        return vr_err(-EINVAL, "auth %s: expected certificate, kerberos or "
                      "both", auth);
    free(c->auth);
    c->auth = xstrdup(auth);
    return 0;
}

/* Hyper-V's -CertificateThumbprint: one of several certificates (NAME.pem
 * with NAME.key) in the store directory becomes cert and key. */
static int
cfg_set_from_store(json_object *b, struct server_cfg *c)
{
    const char *thumb = jstr(b, "certificate_thumbprint");
    if (!thumb && !jstr(b, "certificate_store"))
        return 0;
    if (!thumb)
        thumb = c->thumbprint;
    if (!thumb || !c->cert_store)
        return vr_err(-EINVAL, "certificate_thumbprint and "
                      "certificate_store go together");
    char *cert = NULL, *key = NULL;
    int rc = tls_find_by_thumbprint(c->cert_store, thumb, &cert, &key);
    if (rc < 0)
        return rc;
    char norm[65];
    VR_IGNORE(tls_thumbprint_norm(thumb, norm));
    free(c->cert);
    free(c->key);
    free(c->thumbprint);
    c->cert = cert;
    c->key = key;
    c->thumbprint = xstrdup(norm);
    return 0;
}

/* This host's identity from a `server set` body: certificate files or a
 * certificate store, CA, keytab, revocation list, default storage and
 * host name. */
static int
cfg_set_identity(json_object *b, struct server_cfg *c)
{
    if (jstr(b, "certificate")) {
        free(c->cert_store); /* files given: no longer from a store */
        free(c->thumbprint);
        c->cert_store = c->thumbprint = NULL;
    }
    int rc = abs_path_arg(b, "certificate", &c->cert);
    if (rc == 0)
        rc = abs_path_arg(b, "key", &c->key);
    if (rc == 0)
        rc = abs_path_arg(b, "certificate_store", &c->cert_store);
    if (rc == 0)
        rc = cfg_set_from_store(b, c);
    if (rc == 0)
        rc = abs_path_arg(b, "ca", &c->ca);
    if (rc == 0)
        rc = abs_path_arg(b, "keytab", &c->keytab);
    const char *crl = jstr(b, "crl");
    if (rc == 0 && crl && !*crl) {
        free(c->crl); /* "": no revocation list */
        c->crl = NULL;
    } else if (rc == 0) {
        rc = abs_path_arg(b, "crl", &c->crl);
    }
    if (rc == 0)
        rc = abs_path_arg(b, "default_storage", &c->default_storage);
    const char *hn = jstr(b, "hostname");
    if (rc == 0 && hn) {
        free(c->hostname);
        c->hostname = xstrdup(hn);
    }
    return rc;
}

/* Do the settings hold together: valid TLS material, and what an enabled
 * Replica server needs (default ports filled in)? */
static int
cfg_check(struct server_cfg *c)
{
    int rc = 0;
    if (c->cert || c->key || c->ca)
        rc = tls_check_material(c->cert, c->key, c->ca);
    if (rc == 0 && !c->hostname && c->cert)
        c->hostname = tls_cert_dns_name(c->cert);
    if (rc < 0 || !c->replica_enabled)
        return rc;
    bool cert = cfg_wants_certificate(c);
    bool krb = cfg_wants_kerberos(c);
    if (cert && (!c->cert || !c->key || !c->ca))
        return vr_err(-EINVAL, "replica server: certificate, key and ca "
                               "are required to enable it");
    if (krb && (!c->keytab || !c->hostname))
        return vr_err(-EINVAL, "replica server: Kerberos needs --keytab "
                               "(with HTTP/%s) and this host's name "
                               "(--hostname)",
                      c->hostname ? c->hostname : "FQDN");
    if (c->allow_any && !c->default_storage)
        return vr_err(-EINVAL, "replica server: allow_any needs a "
                               "default_storage directory");
    if (!c->cert_port)
        c->cert_port = 443;
    if (!c->krb_port)
        c->krb_port = 80;
    if (cert && krb && c->cert_port == c->krb_port)
        return vr_err(-EINVAL, "replica server: the certificate and "
                      "Kerberos ports must differ (%u)", c->krb_port);
    return 0;
}

/* PUT /v1/server: change the settings, restart the listeners to match,
 * persist; a refusal at any step leaves settings and listeners as they
 * were. */
int
api_server_set(struct api_call *call, unsigned *status VR_UNUSED,
               json_object **out)
{
    json_object *b = call->body;
    pthread_mutex_lock(&D->lock);
    struct server_cfg old = D->cfg;
    struct server_cfg *c = &D->cfg;
    cfg_copy_strings(c);
    int rc = cfg_set_listener(b, c);
    if (rc == 0)
        rc = cfg_set_identity(b, c);
    if (rc == 0)
        rc = cfg_check(c);
    if (rc == 0 && c->default_storage)
        rc = io_mkdir_p(c->default_storage, 0750);
    if (rc == 0)
        rc = replica_listener_apply();
    if (rc == 0)
        rc = catalog_save_server(D->cat, &D->cfg);
    cfg_free_strings(rc == 0 ? &old : c);
    if (rc < 0) {
        *c = old;
        /* Restore the listener that matched the old settings. */
        char saved[1024];
        snprintf(saved, sizeof saved, "%s", vr_errmsg());
        VR_IGNORE(replica_listener_apply());
        vr_err(rc, "%s", saved);
    } else {
        event_add("info", NULL, "server settings changed%s",
                  c->replica_enabled ? " (replica server enabled)" : "");
        /* The settings stand; a firewall that cannot follow them is an
         * error event and shows in firewall_error. */
        firewall_sync();
        *out = server_json();
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* --- VMs ------------------------------------------------------------------ */

int
api_vm_list(struct api_call *call VR_UNUSED, unsigned *status VR_UNUSED,
            json_object **out)
{
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&D->lock);
    for (struct vm *vm = D->vms; vm; vm = vm->next) {
        json_object_array_add(arr, vm_to_json(vm));
        json_object *t = failover_test_vm_json(vm);
        if (t)
            json_object_array_add(arr, t);
    }
    pthread_mutex_unlock(&D->lock);
    *out = json_object_new_object();
    json_object_object_add(*out, "vms", arr);
    return 0;
}

int
api_vm_show(struct api_call *call, unsigned *status VR_UNUSED,
            json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&D->lock);
    /* "VM - Test": the test VM of a running test failover. */
    static const char sfx[] = " - Test";
    size_t n = strlen(call->arg), k = sizeof sfx - 1;
    if (n > k && strcmp(call->arg + n - k, sfx) == 0) {
        CLEANUP_FREE char *base = xasprintf("%.*s", (int)(n - k), call->arg);
        struct vm *b = vm_find(base);
        if (b && (*out = failover_test_vm_json(b))) {
            pthread_mutex_unlock(&D->lock);
            return 0;
        }
    }
    int rc = vm_lookup(call->arg, &vm);
    if (rc == 0)
        *out = vm_to_json(vm);
    pthread_mutex_unlock(&D->lock);
    return rc;
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

    pthread_mutex_lock(&D->lock);
    bool exists = vm_find(name) != NULL;
    pthread_mutex_unlock(&D->lock);
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
    vm->dir = xasprintf("%s/vms/%s", D->state_dir, vm->uuid);
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
    pthread_mutex_lock(&D->lock);
    if (rc == 0 && vm_find(name))
        rc = vr_err(-EEXIST, "vm %s: already exists", name);
    if (rc == 0)
        rc = catalog_save_vm(D->cat, vm);
    if (rc < 0) {
        pthread_mutex_unlock(&D->lock);
        char saved[1024];
        snprintf(saved, sizeof saved, "%s", vr_errmsg());
        for (unsigned i = 0; i < vm->ndisks; i++)
            unlink(vm->disks[i].path);
        rmdir(vm->dir);
        vm_free(vm);
        return vr_err(rc, "%s", saved);
    }
    vm->next = D->vms;
    D->vms = vm;
    event_add("info", vm->name, "vm created with %u disk(s)", vm->ndisks);
    *out = vm_to_json(vm);
    pthread_mutex_unlock(&D->lock);
    *status = 201;
    return 0;
}

int
vm_boot_parse(json_object *b, char *out[3])
{
    static const char *keys[3] = { "kernel", "initrd", "cmdline" };
    out[0] = out[1] = out[2] = NULL;
    for (int k = 0; k < 3; k++) {
        const char *v = jstr(b, keys[k]);
        if (!v || !*v)
            continue;
        size_t len = strlen(v);
        bool ok = len < 4096;
        for (size_t i = 0; ok && i < len; i++)
            ok = v[i] >= 0x20 && v[i] < 0x7f;
        if (ok && k < 2) {
            struct stat st;
            ok = v[0] == '/' && stat(v, &st) == 0 && S_ISREG(st.st_mode);
        }
        if (!ok) {
            for (int j = 0; j < k; j++)
                free(out[j]);
            return vr_err(-EINVAL, "%s: %s", keys[k],
                          k < 2 ? "expected the absolute path of a file"
                                : "expected printable text (< 4 KiB)");
        }
        out[k] = xstrdup(v);
    }
    if (!out[0] && (out[1] || out[2])) {
        free(out[1]);
        free(out[2]);
        return vr_err(-EINVAL, "initrd and cmdline need a kernel");
    }
    return 0;
}

void
vm_spec_of(const struct vm *vm, struct vmproc_spec *s,
           struct vmproc_disk *dks, char *rundir)
{
    for (unsigned i = 0; i < vm->ndisks; i++) {
        dks[i].id = vm->disks[i].id;
        dks[i].path = vm->disks[i].path;
    }
    *s = (struct vmproc_spec){ .name = vm->name,
                               .uuid = vm->uuid,
                               .cpus = vm->cpus,
                               .memory_mib = vm->memory_mib,
                               .rundir = rundir,
                               .ndisks = vm->ndisks,
                               .disks = dks,
                               .kernel = vm->kernel,
                               .initrd = vm->initrd,
                               .cmdline = vm->cmdline,
                               .hypervisor = vm->hypervisor };
    nics_to_spec(vm, s, NULL);
}

/* Start or stop run their processes without the lock (up to the QEMU
 * timeouts); VM_OP_CHANGE keeps a second start, stop or remove out
 * meanwhile. */
static int
begin_change(struct api_call *call, struct vm **out)
{
    int rc = vm_lookup(call->arg, out);
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
    pthread_cond_broadcast(&D->cond);
}

int
api_vm_start(struct api_call *call, unsigned *status VR_UNUSED,
             json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&D->lock);
    int rc = begin_change(call, &vm);
    if (rc == 0 && vm->repl && vm->repl->mode == VM_MODE_PRIMARY &&
        (vm_busy(vm, VM_OP_PREPARE) ||
         vm->repl->st == REPL_ST_PREPARED)) {
        vm_op_end(vm, VM_OP_CHANGE);
        rc = vr_err(-EBUSY, "vm %s: prepared for failover to %s: it starts "
                    "there ('vmreplica failover start %s' on the Replica "
                    "server); 'vmreplica failover stop %s' here undoes the "
                    "preparation", vm->name, vm->repl->replica_server,
                    vm->name, vm->name);
    }
    if (rc == 0 && vm->mode == VM_MODE_REPLICA &&
        !(vm->repl && vm->repl->st == REPL_ST_FAILED_OVER)) {
        vm_op_end(vm, VM_OP_CHANGE);
        rc = vr_err(-EBUSY, "vm %s: is a Replica VM; it starts only through "
                            "failover",
                    vm->name);
    }
    if (rc < 0) {
        pthread_mutex_unlock(&D->lock);
        return rc;
    }
    vm->hypervisor = !jbool(call->body, "no_hypervisor", false);
    CLEANUP_FREE char *rundir = vm_rundir(vm);
    struct vmproc_spec s;
    struct vmproc_disk dks[MAX_DISKS];
    vm_spec_of(vm, &s, dks, rundir);
    /* The spec borrows vm's strings: a changing VM is neither removed nor
     * altered. */
    pthread_mutex_unlock(&D->lock);
    rc = storage_check_disks(vm);
    if (rc == 0)
        rc = vmproc_start(&s);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", vr_errmsg());
    pthread_mutex_lock(&D->lock);
    end_change(vm);
    if (rc == 0) {
        event_add("info", vm->name, "vm started (%s)",
                  vm->hypervisor ? "qemu" : "disks served only");
        *out = vm_to_json(vm);
    } else {
        vr_err(rc, "%s", msg);
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

int
api_vm_stop(struct api_call *call, unsigned *status VR_UNUSED,
            json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&D->lock);
    int rc = begin_change(call, &vm);
    if (rc < 0) {
        pthread_mutex_unlock(&D->lock);
        return rc;
    }
    CLEANUP_FREE char *rundir = vm_rundir(vm);
    bool force = jbool(call->body, "force", false);
    pthread_mutex_unlock(&D->lock);
    rc = vmproc_stop(rundir, force, 30000);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", vr_errmsg());
    pthread_mutex_lock(&D->lock);
    end_change(vm);
    if (rc == 0) {
        vm->hypervisor = false;
        event_add("info", vm->name, "vm stopped");
        *out = vm_to_json(vm);
    } else {
        vr_err(rc, "%s", msg);
    }
    pthread_mutex_unlock(&D->lock);
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
    pthread_mutex_lock(&D->lock);
    int rc = vm_lookup(call->arg, &vm);
    if (rc == 0) {
        CLEANUP_FREE char *rundir = vm_rundir(vm);
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
                        vm->name, vm->name);
        else if (vm->repl)
            rc = vr_err(-EBUSY, "vm %s: replication is enabled; remove it "
                                "first",
                        vm->name);
        if (rc == 0)
            rc = catalog_delete_vm(D->cat, vm->uuid);
        if (rc == 0) {
            for (struct vm **p = &D->vms; *p; p = &(*p)->next)
                if (*p == vm) {
                    *p = vm->next;
                    break;
                }
            event_add("info", vm->name, "vm removed");
            if (vm->mode != VM_MODE_REPLICA)
                remove_tree(vm->dir);
            remove_tree(rundir);
            *out = json_object_new_object();
            json_object_object_add(*out, "removed",
                                   json_object_new_string(vm->name));
            vm_free(vm);
        }
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

int
api_events(struct api_call *call, unsigned *status VR_UNUSED,
           json_object **out)
{
    pthread_mutex_lock(&D->lock);
    json_object *arr = catalog_events(D->cat, api_query(call, "vm"), 1000);
    pthread_mutex_unlock(&D->lock);
    *out = json_object_new_object();
    json_object_object_add(*out, "events", arr);
    return 0;
}
