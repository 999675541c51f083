/* vmspec.h: a VM's process spec (vmproc.h) from its object. */
#ifndef VR_VMSPEC_H
#define VR_VMSPEC_H

#include "core/state.h"
#include "vmproc.h"

/* Fill a vmproc spec from vm, borrowing its strings; dks has room for
 * vm->ndisks, rundir is the run directory to use. */
void vm_spec_of(const struct vm *vm, struct vmproc_spec *s,
                struct vmproc_disk *dks, char *rundir);
/* Fill a spec's NICs from vm; override: every NIC on that network. */
void nics_to_spec(const struct vm *vm, struct vmproc_spec *s,
                  const char *override);

#endif
