/* inject.c: after a failover started a VM, set its NICs' failover
 * settings (api/vm-network.c's "failover" object of each NIC: addresses,
 * gateways, DNS) inside the guest once its agent answers: guest-exec of
 * ip(8) by MAC and /etc/resolv.conf through guest-file-*, the way Hyper-V
 * injects them through its integration services.  One detached thread per
 * start, which logs what it set as events. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "replica-int.h"
#include "proc/vmproc.h"

#define INJECT_WAIT_MS (180 * 1000) /* the guest's boot, up to its agent */

struct inject {
    struct daemon *d;
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
    vr_thread_name("inject");
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
        pthread_mutex_lock(&in->d->lock);
        if (r < 0)
            event_add(in->d->cat, "warning", in->name,
                      "failover network of NIC %zu not "
                      "set: %s",
                      i, vr_errmsg());
        else if (*ifn)
            event_add(in->d->cat, "info", in->name,
                      "failover network of NIC %zu set in "
                      "the guest (%s): %s",
                      i, ifn,
                      json_object_to_json_string_ext(
                          json_object_object_get(nic, "failover"),
                          JSON_C_TO_STRING_PLAIN));
        pthread_mutex_unlock(&in->d->lock);
        vr_err_clear();
    }
    if (rc < 0) {
        pthread_mutex_lock(&in->d->lock);
        event_add(in->d->cat, "warning", in->name,
                  "failover network settings not set: "
                  "%s",
                  msg);
        pthread_mutex_unlock(&in->d->lock);
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
network_inject_start(struct daemon *d, const struct vm *vm,
                     const char *rundir)
{
    /* d->lock held.  Only if some NIC has failover settings. */
    bool any = false;
    for (size_t i = 0; vm->nics && i < json_object_array_length(vm->nics);
         i++)
        any |= json_object_object_get(json_object_array_get_idx(vm->nics, i),
                                      "failover") != NULL;
    if (!any)
        return;
    struct inject *in = xcalloc(1, sizeof *in);
    in->d = d;
    in->name = xstrdup(vm->name);
    in->rundir = xstrdup(rundir);
    in->nics = json_tokener_parse(json_object_to_json_string(vm->nics));
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &a, inject_main, in) != 0) {
        event_add(d->cat, "warning", vm->name,
                  "failover network settings not set: "
                  "no thread");
        json_object_put(in->nics);
        free(in->name);
        free(in->rundir);
        free(in);
    }
    pthread_attr_destroy(&a);
}
