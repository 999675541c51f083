/* network.c: a VM's NICs, the test network and failover network settings
 * (SPEC §3, §8).
 *
 * vm->nics is a JSON array, one object per NIC:
 *   {"mac": "52:54:00:xx:xx:xx", "network": NET,
 *    "failover": {"ipv4": "A/P", "gateway4": G, "ipv6": "A/P",
 *                 "gateway6": G, "dns": ["A", ...]}}      (optional)
 * NET is "none" (a NIC on a hub of its own: present, connected to
 * nothing), "user" (QEMU's user-mode NAT), "tap:IFNAME" or "bridge:BRIDGE".
 * The NICs travel with the VM (registration); a test failover puts them on
 * the VM's test network (vm->test_network, default "none"); a failover
 * keeps their networks and, once the guest agent answers, sets each NIC's
 * failover settings inside the guest (by MAC) with guest-exec of ip(8) and
 * writes /etc/resolv.conf through guest-file-*: the way Hyper-V injects
 * them through its integration services.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api-int.h"
#include "daemon.h"
#include "proc/vmproc.h"

#define INJECT_WAIT_MS (180 * 1000) /* the guest's boot, up to its agent */

int
nics_from_create(json_object *body, json_object **out)
{
    *out = NULL;
    json_object *nets;
    if (!json_object_object_get_ex(body, "nics", &nets))
        return 0;
    if (!json_object_is_type(nets, json_type_array) ||
        json_object_array_length(nets) > VMPROC_MAX_NICS)
        return vr_err(-EINVAL, "nics: a list of at most %d networks",
                      VMPROC_MAX_NICS);
    json_object *arr = json_object_new_array();
    for (size_t i = 0; i < json_object_array_length(nets); i++) {
        const char *net =
            json_object_get_string(json_object_array_get_idx(nets, i));
        if (network_valid(net) < 0) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s", vr_errmsg());
            json_object_put(arr);
            return vr_err(-EINVAL, "nic %zu: %s", i, msg);
        }
        /* A locally administered address under QEMU's 52:54:00 prefix. */
        char uuid[37], mac[18];
        vr_uuid_new(uuid);
        snprintf(mac, sizeof mac, "52:54:00:%.2s:%.2s:%.2s", uuid, uuid + 2,
                 uuid + 4);
        json_object *n = json_object_new_object();
        json_object_object_add(n, "mac", json_object_new_string(mac));
        json_object_object_add(n, "network", json_object_new_string(net));
        json_object_array_add(arr, n);
    }
    *out = arr;
    return 0;
}

/* --- API ------------------------------------------------------------------ */

int
api_vm_set_test_network(struct api_call *call, unsigned *status VR_UNUSED,
                        json_object **out)
{
    const char *net = jstr(call->body, "network");
    int rc = network_valid(net);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&D->lock);
    struct vm *vm;
    rc = vm_lookup(D, call->arg, &vm);
    if (rc == 0) {
        free(vm->test_network);
        vm->test_network = xstrdup(net);
        rc = catalog_save_vm(D->cat, vm);
    }
    if (rc == 0) {
        event_add(D->cat, "info", vm->name, "test network: %s", net);
        *out = vm_to_json(vm);
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

int
api_vm_set_failover_network(struct api_call *call, unsigned *status VR_UNUSED,
                            json_object **out)
{
    json_object *b = call->body, *v;
    int64_t idx = jint(b, "nic", 0);
    json_object *f = json_object_new_object();
    static const char *keys[] = { "ipv4", "gateway4", "ipv6", "gateway6" };
    for (size_t k = 0; k < ARRAY_SIZE(keys); k++) {
        const char *s = jstr(b, keys[k]);
        if (s && *s)
            json_object_object_add(f, keys[k], json_object_new_string(s));
    }
    if (json_object_object_get_ex(b, "dns", &v))
        json_object_object_add(f, "dns", json_object_get(v));
    bool clear = jbool(b, "clear", false);
    const char *network = jstr(b, "network");
    if (network && network_valid(network) < 0) {
        json_object_put(f);
        return -EINVAL;
    }
    if (!clear && !network && json_object_object_length(f) == 0) {
        json_object_put(f);
        return vr_err(-EINVAL, "nothing to set: give --ipv4, --gateway4, "
                      "--ipv6, --gateway6 or --dns (--clear removes the "
                      "settings)");
    }

    pthread_mutex_lock(&D->lock);
    struct vm *vm;
    int rc = vm_lookup(D, call->arg, &vm);
    size_t n = vm && vm->nics ? json_object_array_length(vm->nics) : 0;
    if (rc == 0 && (idx < 0 || (size_t)idx >= n))
        rc = vr_err(-EINVAL, "vm %s: no NIC %lld (it has %zu)", vm->name,
                    (long long)idx, n);
    json_object *copy = NULL;
    if (rc == 0) {
        /* Validate on a copy, then swap it in. */
        copy = json_tokener_parse(json_object_to_json_string(vm->nics));
        json_object *nic = json_object_array_get_idx(copy, (size_t)idx);
        if (network)
            json_object_object_add(nic, "network",
                                   json_object_new_string(network));
        if (clear || json_object_object_length(f) > 0)
            json_object_object_del(nic, "failover");
        if (!clear && json_object_object_length(f) > 0)
            json_object_object_add(nic, "failover", json_object_get(f));
        rc = nics_validate(copy);
    }
    if (rc == 0) {
        json_object *old = vm->nics;
        vm->nics = copy;
        copy = NULL;
        rc = catalog_save_vm(D->cat, vm);
        if (rc < 0) {
            copy = vm->nics;
            vm->nics = old;
        } else {
            json_object_put(old);
        }
    }
    json_object_put(copy);
    json_object_put(f);
    if (rc == 0) {
        event_add(D->cat, "info", vm->name,
                  "failover network of NIC %lld %s%s%s", (long long)idx,
                  clear ? "cleared" : "set", network ? "; network " : "",
                  network ? network : "");
        *out = vm_to_json(vm);
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* POST /v1/vms/VM/boot {"kernel","initrd","cmdline"}: direct kernel boot
 * of a VM on this server (all absent: boot from the disks).  Local paths,
 * named by this server's administrator only. */
int
api_vm_set_boot(struct api_call *call, unsigned *status VR_UNUSED,
                json_object **out)
{
    char *boot[3];
    int rc = vm_boot_parse(call->body, boot);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&D->lock);
    struct vm *vm;
    rc = vm_lookup(D, call->arg, &vm);
    /* Starts borrow these strings with the lock dropped. */
    if (rc == 0 && (vm_busy(vm, VM_OP_CHANGE) ||
                    (vm->repl && vm_busy(vm, VM_OP_FAILOVER | VM_OP_TEST))))
        rc = vr_err(-EBUSY, "vm %s: a start, stop or failover step is in "
                    "progress; try again", vm->name);
    if (rc == 0) {
        char *old[3] = { vm->kernel, vm->initrd, vm->cmdline };
        vm->kernel = boot[0];
        vm->initrd = boot[1];
        vm->cmdline = boot[2];
        rc = catalog_save_vm(D->cat, vm);
        if (rc < 0) {
            boot[0] = vm->kernel;
            boot[1] = vm->initrd;
            boot[2] = vm->cmdline;
            vm->kernel = old[0];
            vm->initrd = old[1];
            vm->cmdline = old[2];
        } else {
            memcpy(boot, old, sizeof boot);
        }
    }
    for (int k = 0; k < 3; k++)
        free(boot[k]);
    if (rc == 0) {
        event_add(D->cat, "info", vm->name, "boot: %s", vm->kernel ? vm->kernel
                                                           : "from disk");
        *out = vm_to_json(vm);
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* --- injection into the guest --------------------------------------------- */

struct inject {
    char *name;
    char *rundir;
    json_object *nics;
};

/* The guest's interface name for a MAC, from guest-network-get-interfaces. */
static char *
guest_ifname(json_object *ifaces, const char *mac)
{
    for (size_t i = 0; ifaces && i < json_object_array_length(ifaces); i++) {
        json_object *o = json_object_array_get_idx(ifaces, i), *v, *nm;
        if (json_object_object_get_ex(o, "hardware-address", &v) &&
            strcasecmp(json_object_get_string(v), mac) == 0 &&
            json_object_object_get_ex(o, "name", &nm))
            return xstrdup(json_object_get_string(nm));
    }
    return NULL;
}

/* Run argv in the guest (guest-exec, then guest-exec-status until it
 * ends); 0 if it exited 0. */
static int
guest_run(const char *rundir, const char *script)
{
    json_object *cmd = json_object_new_object();
    json_object *args = json_object_new_object();
    json_object *argv = json_object_new_array();
    json_object_array_add(argv, json_object_new_string("-c"));
    json_object_array_add(argv, json_object_new_string(script));
    json_object_object_add(args, "path", json_object_new_string("/bin/sh"));
    json_object_object_add(args, "arg", argv);
    json_object_object_add(args, "capture-output",
                           json_object_new_boolean(1));
    json_object_object_add(cmd, "execute",
                           json_object_new_string("guest-exec"));
    json_object_object_add(cmd, "arguments", args);
    CLEANUP_FREE char *line = xasprintf(
        "%s\n", json_object_to_json_string_ext(cmd, JSON_C_TO_STRING_PLAIN));
    json_object_put(cmd);
    json_object *ret = NULL, *v;
    int rc = vmproc_guest_call(rundir, line, 10000, &ret);
    int64_t pid = rc == 0 && json_object_object_get_ex(ret, "pid", &v)
                      ? json_object_get_int64(v) : -1;
    json_object_put(ret);
    if (rc == 0 && pid < 0)
        rc = vr_err(-EPROTO, "guest-exec: no pid");
    for (int k = 0; rc == 0 && k < 100; k++) {
        CLEANUP_FREE char *st = xasprintf(
            "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":%lld}}"
            "\n", (long long)pid);
        ret = NULL;
        rc = vmproc_guest_call(rundir, st, 5000, &ret);
        bool exited = rc == 0 && json_object_object_get_ex(ret, "exited", &v) &&
                      json_object_get_boolean(v);
        int64_t code = exited && json_object_object_get_ex(ret, "exitcode", &v)
                           ? json_object_get_int64(v) : 0;
        json_object_put(ret);
        if (exited)
            return code == 0 ? 0 : vr_err(-EIO, "'%s' exited %lld in the "
                                          "guest", script, (long long)code);
        if (rc == 0)
            usleep(100 * 1000);
    }
    return rc < 0 ? rc : vr_err(-ETIMEDOUT, "'%s' did not end in the guest",
                                script);
}

static int
write_guest_file(const char *rundir, const char *path, const char *text)
{
    json_object *ret = NULL, *v;
    CLEANUP_FREE char *open_cmd = xasprintf(
        "{\"execute\":\"guest-file-open\",\"arguments\":{\"path\":\"%s\","
        "\"mode\":\"w\"}}\n", path);
    int rc = vmproc_guest_call(rundir, open_cmd, 5000, &ret);
    int64_t h = rc == 0 ? json_object_get_int64(ret) : -1;
    json_object_put(ret);
    if (rc < 0)
        return rc;
    /* base64 of text */
    static const char b64[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = strlen(text);
    char *enc = xmalloc(4 * ((n + 2) / 3) + 1), *e = enc;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t w = (uint32_t)(unsigned char)text[i] << 16;
        if (i + 1 < n)
            w |= (uint32_t)(unsigned char)text[i + 1] << 8;
        if (i + 2 < n)
            w |= (unsigned char)text[i + 2];
        *e++ = b64[(w >> 18) & 63];
        *e++ = b64[(w >> 12) & 63];
        *e++ = i + 1 < n ? b64[(w >> 6) & 63] : '=';
        *e++ = i + 2 < n ? b64[w & 63] : '=';
    }
    *e = '\0';
    CLEANUP_FREE char *wr = xasprintf(
        "{\"execute\":\"guest-file-write\",\"arguments\":{\"handle\":%lld,"
        "\"buf-b64\":\"%s\"}}\n", (long long)h, enc);
    free(enc);
    ret = NULL;
    rc = vmproc_guest_call(rundir, wr, 5000, &ret);
    json_object_put(ret);
    CLEANUP_FREE char *cl = xasprintf(
        "{\"execute\":\"guest-file-close\",\"arguments\":{\"handle\":%lld}}\n",
        (long long)h);
    ret = NULL;
    int rc2 = vmproc_guest_call(rundir, cl, 5000, &ret);
    json_object_put(ret);
    (void)v;
    return rc < 0 ? rc : rc2;
}

static int
inject_nic(const char *rundir, json_object *ifaces, json_object *nic,
           char *done, size_t cap)
{
    json_object *v, *f;
    const char *mac = json_object_object_get_ex(nic, "mac", &v)
                          ? json_object_get_string(v) : "";
    if (!json_object_object_get_ex(nic, "failover", &f))
        return 0;
    CLEANUP_FREE char *ifn = guest_ifname(ifaces, mac);
    if (!ifn)
        return vr_err(-ENOENT, "no interface with MAC %s in the guest", mac);
    char script[1024];
    bool addr = json_object_object_get_ex(f, "ipv4", NULL) ||
                json_object_object_get_ex(f, "ipv6", NULL);
    /* Addresses replace the NIC's; DNS or a gateway alone keep them. */
    size_t len;
    if (addr) {
        len = (size_t)snprintf(script, sizeof script,
                               "ip addr flush dev %s && ip link set %s up",
                               ifn, ifn);
    } else {
        len = (size_t)snprintf(script, sizeof script, "ip link set %s up",
                               ifn);
    }
    static const char *keys[] = { "ipv4", "ipv6" };
    for (size_t k = 0; k < 2; k++)
        if (json_object_object_get_ex(f, keys[k], &v))
            len += (size_t)snprintf(script + len, sizeof script - len,
                                    " && ip addr add %s dev %s",
                                    json_object_get_string(v), ifn);
    static const char *gws[] = { "gateway4", "gateway6" };
    for (size_t k = 0; k < 2; k++)
        if (json_object_object_get_ex(f, gws[k], &v))
            len += (size_t)snprintf(script + len, sizeof script - len,
                                    " && ip %sroute replace default via %s "
                                    "dev %s", k ? "-6 " : "",
                                    json_object_get_string(v), ifn);
    int rc = guest_run(rundir, script);
    if (rc == 0 && json_object_object_get_ex(f, "dns", &v) &&
        json_object_array_length(v) > 0) {
        char conf[512] = "# written by vmreplica at failover\n";
        for (size_t j = 0; j < json_object_array_length(v); j++) {
            size_t cl = strlen(conf);
            snprintf(conf + cl, sizeof conf - cl, "nameserver %s\n",
                     json_object_get_string(json_object_array_get_idx(v, j)));
        }
        rc = write_guest_file(rundir, "/etc/resolv.conf", conf);
    }
    if (rc == 0)
        snprintf(done, cap, "%s", ifn);
    return rc;
}

static void *
inject_main(void *arg)
{
    struct inject *in = arg;
    /* Wait for the guest's agent (its boot). */
    uint64_t deadline = vr_mono_ms() + INJECT_WAIT_MS;
    json_object *ifaces = NULL;
    int rc;
    for (;;) {
        rc = vmproc_guest_call(in->rundir,
                               "{\"execute\":\"guest-network-get-"
                               "interfaces\"}\n", 3000, &ifaces);
        if (rc == 0 || rc == -ENOENT || vr_mono_ms() >= deadline)
            break;
        sleep(2);
    }
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", rc < 0 ? vr_errmsg() : "");
    for (size_t i = 0; rc == 0 && i < json_object_array_length(in->nics);
         i++) {
        char ifn[64] = "";
        json_object *nic = json_object_array_get_idx(in->nics, i);
        int r = inject_nic(in->rundir, ifaces, nic, ifn, sizeof ifn);
        pthread_mutex_lock(&D->lock);
        if (r < 0)
            event_add(D->cat, "warning", in->name,
                      "failover network of NIC %zu not "
                      "set: %s",
                      i, vr_errmsg());
        else if (*ifn)
            event_add(D->cat, "info", in->name,
                      "failover network of NIC %zu set in "
                      "the guest (%s): %s",
                      i, ifn,
                      json_object_to_json_string_ext(
                          json_object_object_get(nic, "failover"),
                          JSON_C_TO_STRING_PLAIN));
        pthread_mutex_unlock(&D->lock);
        vr_err_clear();
    }
    if (rc < 0) {
        pthread_mutex_lock(&D->lock);
        event_add(D->cat, "warning", in->name,
                  "failover network settings not set: "
                  "%s",
                  msg);
        pthread_mutex_unlock(&D->lock);
    }
    json_object_put(ifaces);
    json_object_put(in->nics);
    free(in->name);
    free(in->rundir);
    free(in);
    vr_err_clear();
    return NULL;
}

void
network_inject_start(const struct vm *vm, const char *rundir)
{
    /* D->lock held.  Only if some NIC has failover settings. */
    bool any = false;
    for (size_t i = 0; vm->nics && i < json_object_array_length(vm->nics);
         i++)
        any |= json_object_object_get(json_object_array_get_idx(vm->nics, i),
                                      "failover") != NULL;
    if (!any)
        return;
    struct inject *in = xcalloc(1, sizeof *in);
    in->name = xstrdup(vm->name);
    in->rundir = xstrdup(rundir);
    in->nics = json_tokener_parse(json_object_to_json_string(vm->nics));
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &a, inject_main, in) != 0) {
        event_add(D->cat, "warning", vm->name,
                  "failover network settings not set: "
                  "no thread");
        json_object_put(in->nics);
        free(in->name);
        free(in->rundir);
        free(in);
    }
    pthread_attr_destroy(&a);
}
