/* libvirt.h: VMs run as libvirt domains (vm start --hypervisor libvirt, a
 * failover on a libvirt Replica server), and libvirt domains adopted as
 * VMs (vm create --from-libvirt).  docs/libvirt.md shows the XML.
 *
 * A domain started here has its disks on the VM's NBD exports
 * (RUNDIR/nbd.sock, served by vmproc.c's nbdkit) or, for a failover, on
 * the qcow2 overlays over them; its name is in RUNDIR/libvirt.domain while
 * it is ours, which is how status, stop and the guest agent find it.
 * libvirt is reached at $VMREPLICA_LIBVIRT_URI (default qemu:///system)
 * through its C API; a build without libvirt's headers answers -ENOTSUP.
 */
#ifndef VR_LIBVIRT_H
#define VR_LIBVIRT_H

#include <stdbool.h>

#include <json-c/json.h>

#include "vmproc.h"

/* Start s as a domain: s->domain (persistent, already on the exports) or
 * a transient domain named s->name built from s.  Records it in
 * RUNDIR/libvirt.domain. */
int lv_start(const struct vmproc_spec *s) VR_WUR;
/* Whether RUNDIR/libvirt.domain names a domain (running or not). */
bool lv_recorded(const char *rundir);
/* Whether the domain of RUNDIR/libvirt.domain is active. */
bool lv_running(const char *rundir);
/* ACPI shutdown (unless force) waited up to timeout_ms, then destroy;
 * RUNDIR/libvirt.domain goes.  0 if no domain was recorded. */
int lv_stop(const char *rundir, bool force, unsigned timeout_ms) VR_WUR;
/* One guest agent command through libvirt (vmproc_guest_call's
 * contract: -ENOENT not running, -ENOTCONN no agent, -ETIMEDOUT, -EIO). */
int lv_agent(const char *rundir, const char *cmd, unsigned timeout_ms,
             json_object **ret) VR_WUR;
/* The XML of the transient domain lv_start defines for s; caller frees. */
char *lv_domain_xml(const struct vmproc_spec *s);

/* What vm create --from-libvirt takes of a domain. */
struct lv_adopt {
    unsigned cpus, memory_mib;
    unsigned ndisks;
    char *path[MAX_DISKS];   /* file or block device */
    char *format[MAX_DISKS]; /* driver type: "raw", "qcow2", ... */
    bool in_place[MAX_DISKS]; /* a raw file: tracked where it is */
    json_object *nics;       /* [{mac, network}] (vm-network.c) */
    char *xml;               /* its inactive XML, as it was */
};

/* Read an existing, shut off domain.  -EBUSY if it runs, -ENOTSUP for a
 * disk that is not a file or a block device. */
int lv_adopt_read(const char *domain, struct lv_adopt *a) VR_WUR;
void lv_adopt_fini(struct lv_adopt *a);
/* Define the domain again from its XML with each of its disks (in
 * lv_adopt_read's order) on the export disks[i].id of RUNDIR/nbd.sock,
 * and a guest agent channel if it had none. */
int lv_adopt_redefine(const char *xml, const char *rundir, unsigned ndisks,
                      const struct vmproc_disk *disks) VR_WUR;
/* Define a domain from xml as it is (the original, when an adoption is
 * undone). */
int lv_define(const char *xml) VR_WUR;

#endif
