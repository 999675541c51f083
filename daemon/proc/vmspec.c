/* vmspec.c: the spec of a VM's processes (vmproc.h) filled from the VM
 * object: its disks, boot files and NICs. */
#include <stdio.h>

#include "vmproc.h"
#include "vmspec.h"

void
nics_to_spec(const struct vm *vm, struct vmproc_spec *s, const char *override)
{
    s->nnics = 0;
    if (!vm->nics)
        return;
    for (size_t i = 0; i < json_object_array_length(vm->nics) &&
                       s->nnics < VMPROC_MAX_NICS; i++) {
        json_object *n = json_object_array_get_idx(vm->nics, i), *v;
        const char *mac = json_object_object_get_ex(n, "mac", &v)
                              ? json_object_get_string(v) : "";
        const char *net = override ? override
                          : json_object_object_get_ex(n, "network", &v)
                              ? json_object_get_string(v)
                              : "none";
        snprintf(s->nic_mac[s->nnics], sizeof s->nic_mac[0], "%s", mac);
        snprintf(s->nic_net[s->nnics], sizeof s->nic_net[0], "%s", net);
        s->nnics++;
    }
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
                               .hypervisor = vm->hypervisor,
                               /* An adopted domain runs under libvirt
                                * unless vm start says otherwise. */
                               .hv = vm->libvirt_domain ? VMPROC_HV_LIBVIRT
                                                        : VMPROC_HV_DEFAULT,
                               .domain = vm->libvirt_domain };
    nics_to_spec(vm, s, NULL);
}
