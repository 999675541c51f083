/* vm.c: "vmreplica vm ..." — create, list, show, start, stop and remove
 * VMs (POST/GET/DELETE /v1/vms...).  Local paths are made absolute here,
 * since the daemon resolves them from its own working directory.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define MIB (1024u * 1024u)

/* "running" (QEMU up), served_label (disks served only) or "stopped".  The
 * daemon may say running+hypervisor:false or running:false+served:true for
 * disks served without QEMU; both read the same here. */
static const char *
vm_state(json_object *vm, const char *served_label)
{
    bool running = cli_bool(vm, "running");
    if (running && (!cli_has(vm, "hypervisor") || cli_bool(vm, "hypervisor")))
        return "running";
    if (running || cli_bool(vm, "served"))
        return served_label;
    return "stopped";
}

/* Print the VM object of GET /v1/vms/VM. */
void
cli_print_vm(json_object *vm)
{
    char sz[32];
    cli_kv("Name", "%s", cli_str(vm, "name"));
    cli_kv("UUID", "%s", cli_str(vm, "uuid"));
    cli_kv("Mode", "%s", cli_str(vm, "mode"));
    cli_kv("CPUs", "%" PRId64, cli_int(vm, "cpus"));
    cli_kv("Memory", "%s",
           cli_fmt_size((uint64_t)cli_int(vm, "memory_mib") * MIB, sz,
                        sizeof sz));
    cli_kv("State", "%s", vm_state(vm, "disks served (no hypervisor)"));
    if (cli_has(vm, "libvirt_domain"))
        cli_kv("Libvirt domain", "%s", cli_str(vm, "libvirt_domain"));

    json_object *disks = NULL;
    if (!json_object_object_get_ex(vm, "disks", &disks) ||
        !json_object_is_type(disks, json_type_array))
        return;
    size_t n = json_object_array_length(disks);
    if (n == 0) {
        cli_kv("Disks", "none");
        return;
    }
    printf("Disks:\n");
    static const char *const hdr[] = { "ID", "SIZE", "PATH", "NBD URI" };
    struct cli_table *t = cli_table_new(4, hdr);
    for (size_t i = 0; i < n; i++) {
        json_object *d = json_object_array_get_idx(disks, i);
        const char *row[4] = {
            cli_str(d, "id"),
            cli_fmt_size((uint64_t)cli_int(d, "size"), sz, sizeof sz),
            cli_str(d, "path"),
            cli_has(d, "nbd_uri") ? cli_str(d, "nbd_uri") : "-",
        };
        cli_table_row(t, row);
    }
    cli_table_print(t, 2);
    cli_table_free(t);
}

static int
show_result(struct cli *c, json_object *o)
{
    if (c->json)
        cli_print_json(o);
    else if (o)
        cli_print_vm(o);
    json_object_put(o);
    return CLI_OK;
}

/* --- create ------------------------------------------------------------ */

/* Memory: a bare number is MiB (as QEMU's -m), else a size with a unit. */
static int
parse_memory(const char *s, unsigned *mib)
{
    uint64_t v;
    if (vr_parse_size(s, &v) < 0)
        return -EINVAL;
    bool bare = s[strspn(s, "0123456789")] == '\0';
    if (!bare) {
        if (v % MIB != 0)
            return -ERANGE;
        v /= MIB;
    }
    if (v == 0 || v > UINT32_MAX)
        return -ERANGE;
    *mib = (unsigned)v;
    return 0;
}

/* --kernel/--initrd/--append into a request body (paths made absolute). */
static void
add_boot(json_object *body, const char *kernel, const char *initrd,
         const char *append)
{
    if (kernel) {
        CLEANUP_FREE char *k = cli_abspath(kernel);
        json_object_object_add(body, "kernel", json_object_new_string(k));
    }
    if (initrd) {
        CLEANUP_FREE char *i = cli_abspath(initrd);
        json_object_object_add(body, "initrd", json_object_new_string(i));
    }
    if (append)
        json_object_object_add(body, "cmdline", json_object_new_string(append));
}

/* vm create NAME --from-libvirt DOMAIN. */
static int
vm_adopt(struct cli *c, const char *name, const char *domain)
{
    json_object *body = json_object_new_object();
    json_object_object_add(body, "name", json_object_new_string(name));
    json_object_object_add(body, "from_libvirt",
                           json_object_new_string(domain));
    json_object *out;
    int rc = cli_call(c, "POST", "/v1/vms", body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("vm %s created from libvirt domain %s; the domain's disks "
               "are now its tracked exports (original definition kept in "
               "the VM's directory as libvirt-original.xml)\n", name, domain);
    json_object_put(out);
    return 0;
}

int
cmd_vm_create(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    struct cli_list disks = { 0 };
    const char *memory = NULL, *cpus = NULL;
    const char *kernel = NULL, *initrd = NULL, *append = NULL;
    struct cli_list nics = { 0 };
    const char *domain = NULL;
    const struct cli_opt opts[] = {
        { "from-libvirt", CLI_OPT_STR, &domain },
        { "nic", CLI_OPT_LIST, &nics },
        { "disk", CLI_OPT_LIST, &disks },
        { "new-disk", CLI_OPT_LIST, &disks },
        { "memory", CLI_OPT_STR, &memory },
        { "cpus", CLI_OPT_STR, &cpus },
        { "kernel", CLI_OPT_STR, &kernel },
        { "initrd", CLI_OPT_STR, &initrd },
        { "append", CLI_OPT_STR, &append },
        { NULL, 0, NULL },
    };
    const char *pos[1];
    int rc = cli_parse_args(c, cmd, argc, argv, opts, pos, 1, "NAME");
    if (rc)
        return rc;
    const char *name = pos[0];
    if (!vr_name_valid(name))
        return cli_usage_error(cmd, "invalid VM name '%s': use 1-64 of "
                               "A-Z a-z 0-9 . _ - and space, not starting "
                               "with '.', '-' or a space", name);
    if (domain && (disks.n || nics.n || memory || cpus || kernel))
        return cli_usage_error(cmd, "--from-libvirt takes the disks, NICs, "
                               "memory and CPUs of the domain: give none of "
                               "--disk, --new-disk, --nic, --memory, --cpus, "
                               "--kernel with it");
    if (domain)
        return vm_adopt(c, name, domain);
    if (disks.n == 0)
        return cli_usage_error(cmd, "vm %s needs at least one --disk FILE or "
                               "--new-disk SIZE", name);

    json_object *body = json_object_new_object();
    json_object_object_add(body, "name", json_object_new_string(name));
    if (cpus) {
        char *end;
        errno = 0;
        unsigned long n = strtoul(cpus, &end, 10);
        if (errno || *end || end == cpus || cpus[0] == '-' || n < 1 ||
            n > 1024) {
            json_object_put(body);
            return cli_usage_error(cmd, "invalid --cpus '%s': expected a "
                                   "number from 1 to 1024", cpus);
        }
        json_object_object_add(body, "cpus", json_object_new_int((int)n));
    }
    if (memory) {
        unsigned mib;
        if (parse_memory(memory, &mib) < 0) {
            json_object_put(body);
            return cli_usage_error(cmd, "invalid --memory '%s': expected a "
                                   "whole number of MiB, e.g. 512M or 2G",
                                   memory);
        }
        json_object_object_add(body, "memory_mib",
                               json_object_new_int64((int64_t)mib));
    }
    add_boot(body, kernel, initrd, append);
    if (nics.n) {
        json_object *na = json_object_new_array();
        for (unsigned i = 0; i < nics.n; i++)
            json_object_array_add(na,
                                  json_object_new_string(nics.items[i].value));
        json_object_object_add(body, "nics", na);
    }
    json_object *arr = json_object_new_array();
    json_object_object_add(body, "disks", arr);
    for (unsigned i = 0; i < disks.n; i++) {
        json_object *d = json_object_new_object();
        json_object_array_add(arr, d);
        if (strcmp(disks.items[i].opt, "disk") == 0) {
            char *abs = cli_abspath(disks.items[i].value);
            json_object_object_add(d, "path", json_object_new_string(abs));
            free(abs);
        } else {
            uint64_t size;
            if (vr_parse_size(disks.items[i].value, &size) < 0 || size == 0 ||
                size > INT64_MAX) {
                json_object_put(body);
                return cli_usage_error(cmd, "invalid --new-disk '%s': "
                                       "expected a size such as 64M or 10G",
                                       disks.items[i].value);
            }
            json_object_object_add(d, "size",
                                   json_object_new_int64((int64_t)size));
        }
    }

    json_object *out;
    rc = cli_call(c, "POST", "/v1/vms", body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    return show_result(c, out);
}

/* --- list / show ------------------------------------------------------- */

int
cmd_vm_list(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, NULL, pos, 0, &npos);
    if (rc)
        return rc;
    json_object *out;
    if ((rc = cli_call(c, "GET", "/v1/vms", NULL, &out)))
        return rc;
    if (c->json) {
        cli_print_json(out);
        json_object_put(out);
        return CLI_OK;
    }
    static const char *const hdr[] = { "NAME", "UUID", "MODE", "CPUS",
                                       "MEMORY", "DISKS", "STATE" };
    struct cli_table *t = cli_table_new(7, hdr);
    json_object *vms = NULL;
    json_object_object_get_ex(out, "vms", &vms);
    size_t n = vms && json_object_is_type(vms, json_type_array)
                   ? json_object_array_length(vms)
                   : 0;
    for (size_t i = 0; i < n; i++) {
        json_object *vm = json_object_array_get_idx(vms, i);
        char cpus[24], mem[32], ndisks[24];
        json_object *d = NULL;
        json_object_object_get_ex(vm, "disks", &d);
        snprintf(cpus, sizeof cpus, "%" PRId64, cli_int(vm, "cpus"));
        cli_fmt_size((uint64_t)cli_int(vm, "memory_mib") * MIB, mem,
                     sizeof mem);
        snprintf(ndisks, sizeof ndisks, "%zu",
                 d && json_object_is_type(d, json_type_array)
                     ? json_object_array_length(d)
                     : (size_t)0);
        const char *state = vm_state(vm, "served");
        const char *row[7] = { cli_str(vm, "name"), cli_str(vm, "uuid"),
                               cli_str(vm, "mode"), cpus, mem, ndisks,
                               state };
        cli_table_row(t, row);
    }
    cli_table_print(t, 0);
    cli_table_free(t);
    json_object_put(out);
    return CLI_OK;
}

int
cli_vm_path(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv,
        const struct cli_opt *opts, const char *suffix, char **path,
        const char **name)
{
    const char *pos[1];
    int rc = cli_parse_args(c, cmd, argc, argv, opts, pos, 1, "VM");
    if (rc)
        return rc;
    CLEANUP_FREE char *esc = cli_escape(pos[0]);
    *path = xasprintf("/v1/vms/%s%s", esc, suffix);
    *name = pos[0];
    return CLI_OK;
}

int
cli_vm_action(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv,
              const char *method, const char *suffix, json_object **out,
              const char **name)
{
    CLEANUP_FREE char *path = NULL;
    int rc = cli_vm_path(c, cmd, argc, argv, NULL, suffix, &path, name);
    if (rc)
        return rc;
    if ((rc = cli_call(c, method, path, NULL, out)))
        return rc;
    if (c->json) {
        cli_print_json(*out);
        json_object_put(*out);
        *out = NULL;
    }
    return CLI_OK;
}

int
cmd_vm_show(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, NULL, "", &path, &name);
    if (rc)
        return rc;
    json_object *out;
    if ((rc = cli_call(c, "GET", path, NULL, &out)))
        return rc;
    return show_result(c, out);
}

/* --- start / stop / remove --------------------------------------------- */

int
cmd_vm_start(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    bool no_hv = false;
    const char *hv = NULL;
    const struct cli_opt opts[] = {
        { "no-hypervisor", CLI_OPT_FLAG, &no_hv },
        { "hypervisor", CLI_OPT_STR, &hv },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/start", &path, &name);
    if (rc)
        return rc;
    if (hv && strcmp(hv, "qemu") != 0 && strcmp(hv, "libvirt") != 0)
        return cli_usage_error(cmd, "invalid --hypervisor '%s': expected "
                               "qemu or libvirt", hv);
    if (hv && no_hv)
        return cli_usage_error(cmd, "--hypervisor and --no-hypervisor "
                               "exclude each other");
    json_object *body = json_object_new_object();
    json_object_object_add(body, "no_hypervisor",
                           json_object_new_boolean(no_hv));
    if (hv)
        json_object_object_add(body, "hypervisor", json_object_new_string(hv));
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json) {
        cli_print_json(out);
    } else if (no_hv) {
        /* What a hypervisor run by hand or by libvirt attaches to. */
        printf("vm %s: disks served (no hypervisor)\n", cli_q(name));
        json_object *disks = NULL;
        if (json_object_object_get_ex(out, "disks", &disks) &&
            json_object_is_type(disks, json_type_array)) {
            for (size_t i = 0; i < json_object_array_length(disks); i++) {
                json_object *d = json_object_array_get_idx(disks, i);
                printf("  %s  %s\n", cli_str(d, "id"), cli_str(d, "nbd_uri"));
            }
        }
    } else {
        printf("vm %s started\n", cli_q(name));
    }
    json_object_put(out);
    return CLI_OK;
}

int
cmd_vm_stop(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    bool force = false;
    const struct cli_opt opts[] = {
        { "force", CLI_OPT_FLAG, &force },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/stop", &path, &name);
    if (rc)
        return rc;
    json_object *body = json_object_new_object();
    json_object_object_add(body, "force", json_object_new_boolean(force));
    CLEANUP_FREE char *note =
        force ? NULL
              : xasprintf("waiting for vm %s to shut down: its guest was "
                          "sent the ACPI power button and is killed if it "
                          "still runs after 30 s; 'vmreplica vm stop %s "
                          "--force' kills it at once", cli_q(name),
                          cli_q(name));
    c->slow_note = note;
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    c->slow_note = NULL;
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("vm %s stopped\n", cli_q(name));
    json_object_put(out);
    return CLI_OK;
}

int
cmd_vm_set_boot(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv)
{
    const char *kernel = NULL, *initrd = NULL, *append = NULL;
    const struct cli_opt opts[] = {
        { "kernel", CLI_OPT_STR, &kernel },
        { "initrd", CLI_OPT_STR, &initrd },
        { "append", CLI_OPT_STR, &append },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/boot", &path, &name);
    if (rc)
        return rc;
    json_object *body = json_object_new_object();
    add_boot(body, kernel, initrd, append);
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("vm %s: boots %s\n", cli_q(name), kernel ? kernel : "from its disk");
    json_object_put(out);
    return CLI_OK;
}

int
cmd_vm_set_test_network(struct cli *c, const struct cli_cmd *cmd, int argc,
                        char **argv)
{
    const char *pos[2];
    int rc = cli_parse_args(c, cmd, argc, argv, NULL, pos, 2, "VM NETWORK");
    if (rc)
        return rc;
    CLEANUP_FREE char *esc = cli_escape(pos[0]);
    CLEANUP_FREE char *path = xasprintf("/v1/vms/%s/test-network", esc);
    json_object *body = json_object_new_object();
    json_object_object_add(body, "network", json_object_new_string(pos[1]));
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("vm %s: test network %s\n", cli_q(pos[0]), pos[1]);
    json_object_put(out);
    return CLI_OK;
}

int
cmd_vm_set_failover_network(struct cli *c, const struct cli_cmd *cmd,
                            int argc, char **argv)
{
    const char *nic = "0", *ipv4 = NULL, *gw4 = NULL, *ipv6 = NULL,
               *gw6 = NULL, *dns = NULL, *network = NULL;
    bool clear = false;
    const struct cli_opt opts[] = {
        { "nic", CLI_OPT_STR, &nic },
        { "ipv4", CLI_OPT_STR, &ipv4 },
        { "gateway4", CLI_OPT_STR, &gw4 },
        { "ipv6", CLI_OPT_STR, &ipv6 },
        { "gateway6", CLI_OPT_STR, &gw6 },
        { "dns", CLI_OPT_STR, &dns },
        { "network", CLI_OPT_STR, &network },
        { "clear", CLI_OPT_FLAG, &clear },
        { NULL, 0, NULL },
    };
    CLEANUP_FREE char *path = NULL;
    const char *name;
    int rc = cli_vm_path(c, cmd, argc, argv, opts, "/failover-network",
                         &path, &name);
    if (rc)
        return rc;
    char *end;
    errno = 0;
    long idx = strtol(nic, &end, 10);
    if (errno || *end || end == nic || idx < 0 || idx > 7)
        return cli_usage_error(cmd, "invalid --nic '%s': expected 0 .. 7",
                               nic);
    json_object *body = json_object_new_object();
    json_object_object_add(body, "nic", json_object_new_int((int)idx));
    json_object_object_add(body, "clear", json_object_new_boolean(clear));
    const char *vals[] = { ipv4, gw4, ipv6, gw6, network };
    const char *keys[] = { "ipv4", "gateway4", "ipv6", "gateway6",
                           "network" };
    for (int k = 0; k < 5; k++)
        if (vals[k])
            json_object_object_add(body, keys[k],
                                   json_object_new_string(vals[k]));
    if (dns) {
        json_object *a = json_object_new_array();
        CLEANUP_FREE char *copy = xstrdup(dns);
        char *save = NULL;
        for (char *t = strtok_r(copy, ",", &save); t;
             t = strtok_r(NULL, ",", &save))
            json_object_array_add(a, json_object_new_string(t));
        json_object_object_add(body, "dns", a);
    }
    json_object *out;
    rc = cli_call(c, "POST", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("vm %s: failover network of NIC %ld %s\n", cli_q(name), idx,
               clear ? "cleared" : "set");
    json_object_put(out);
    return CLI_OK;
}

int
cmd_vm_remove(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    const char *name;
    json_object *out;
    int rc = cli_vm_action(c, cmd, argc, argv, "DELETE", "", &out, &name);
    if (rc || !out)
        return rc;
    printf("vm %s removed\n", cli_q(name));
    json_object_put(out);
    return CLI_OK;
}
