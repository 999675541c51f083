/* vm-network.c: the vm endpoints of a VM's NICs, test network, failover
 * network settings and boot files (SPEC §3, §8), and the NICs of vm create.
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
 * failover settings inside the guest (replica/inject.c).
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api-int.h"
#include "proc/vmproc.h"

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
    pthread_mutex_lock(&actx.d->lock);
    struct vm *vm;
    rc = vm_lookup(actx.d, call->arg, &vm);
    if (rc == 0) {
        free(vm->test_network);
        vm->test_network = xstrdup(net);
        rc = catalog_save_vm(actx.d->cat, vm);
    }
    if (rc == 0) {
        event_add(actx.d->cat, "info", vm->name, "test network: %s", net);
        *out = vm_to_json(vm);
    }
    pthread_mutex_unlock(&actx.d->lock);
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

    pthread_mutex_lock(&actx.d->lock);
    struct vm *vm;
    int rc = vm_lookup(actx.d, call->arg, &vm);
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
        rc = catalog_save_vm(actx.d->cat, vm);
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
        event_add(actx.d->cat, "info", vm->name,
                  "failover network of NIC %lld %s%s%s", (long long)idx,
                  clear ? "cleared" : "set", network ? "; network " : "",
                  network ? network : "");
        *out = vm_to_json(vm);
    }
    pthread_mutex_unlock(&actx.d->lock);
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
    pthread_mutex_lock(&actx.d->lock);
    struct vm *vm;
    rc = vm_lookup(actx.d, call->arg, &vm);
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
        rc = catalog_save_vm(actx.d->cat, vm);
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
        event_add(actx.d->cat, "info", vm->name, "boot: %s",
                  vm->kernel ? vm->kernel : "from disk");
        *out = vm_to_json(vm);
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}
