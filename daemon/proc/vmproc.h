/* vmproc.h: the processes behind a running VM — one nbdkit serving every
 * disk through the vmreplica plugin, and optionally one QEMU attached to it.
 *
 * Everything lives in the VM's run directory RUNDIR:
 *   RUNDIR/nbd.sock      NBD exports, one per disk, export name = disk id
 *   RUNDIR/ctl.sock      the plugin's control socket (SEAL, STATUS)
 *   RUNDIR/nbdkit.pid    nbdkit's pid      RUNDIR/nbdkit.log its stderr
 *   RUNDIR/qemu.pid      QEMU's pid        RUNDIR/console.log COM1 output
 *   RUNDIR/qmp.sock      QEMU's QMP socket
 *   RUNDIR/run.lock      flock held by nbdkit for its life (its pid inside)
 *   RUNDIR/qemu.lock     the same for QEMU
 * nbdkit runs in its own session (setsid), not tied to vmreplicad, so a
 * restart of the daemon never stalls a VM's I/O; vmproc_status() re-adopts
 * it from the pid file.
 *
 * Binaries: $VMREPLICA_NBDKIT (default "nbdkit"), $VMREPLICA_PLUGIN (default:
 * the build tree's or the installed plugin, plugin.h), $VMREPLICA_QEMU (default
 * "qemu-system-x86_64").  $VMREPLICA_ACCEL=tcg|kvm forces QEMU's
 * accelerator.  $VMREPLICA_TEST_HASHLOG=FILE passes hashlog=FILE to the
 * plugin (crash tests record every disk's SHA-256 at each seal).
 * QEMU's early errors go to RUNDIR/qemu.log; RUNDIR/qga.sock is the guest
 * agent's channel.
 */
#ifndef VR_VMPROC_H
#define VR_VMPROC_H

#include <stdint.h>

#include <json-c/json.h>

#include "core/r1json.h"
#include "vr.h"

struct vmproc_disk {
    const char *id;   /* export name, e.g. "disk0" */
    const char *path; /* sparse raw image; its log is PATH.vrlog/ */
};

#define VMPROC_MAX_NICS R1_MAX_NICS

/* What runs the guest: vmreplica's own QEMU, or a libvirt domain
 * (libvirt.h).  VMPROC_HV_DEFAULT: the server's default
 * (vmproc_set_default_hv, `server set --hypervisor`). */
enum vmproc_hv { VMPROC_HV_DEFAULT = 0, VMPROC_HV_QEMU, VMPROC_HV_LIBVIRT };

struct vmproc_spec {
    const char *name;
    const char *uuid;
    unsigned cpus;
    unsigned memory_mib;
    const char *rundir; /* created if missing */
    unsigned ndisks;
    const struct vmproc_disk *disks;
    bool hypervisor; /* also start the guest (QEMU or a libvirt domain) */
    enum vmproc_hv hv;
    /* libvirt: the persistent domain adopted by `vm create --from-libvirt`
     * to start (its disks already the exports), or NULL: a transient domain
     * named name, built from this spec. */
    const char *domain;
    /* Direct kernel boot, or NULL. */
    const char *kernel, *initrd, *cmdline;
    /* NICs: MAC and network (api/vm-network.c: none, user, tap:IF,
     * bridge:BR). */
    unsigned nnics;
    char nic_mac[VMPROC_MAX_NICS][18];
    char nic_net[VMPROC_MAX_NICS][64];
    /* Test failover: serve the disks read-only at a recovery point
     * (the plugin's view=UNDODIR:POINT:LATEST) ... */
    const char *view;
    /* ... and give QEMU the qcow2 overlays RUNDIR/ID.qcow2 over them
     * (vmproc_make_overlays) instead of the exports themselves. */
    bool overlays;
};

/* The server's default hypervisor (VMPROC_HV_QEMU until set). */
void vmproc_set_default_hv(enum vmproc_hv hv);
/* "qemu" or "libvirt" to the enum: -EINVAL (message) otherwise. */
int vmproc_hv_parse(const char *name, enum vmproc_hv *out) VR_WUR;
const char *vmproc_hv_name(enum vmproc_hv hv);

/* Serve the disks (start nbdkit unless already running) and, when
 * s->hypervisor, start QEMU (or the libvirt domain, s->hv) attached to the
 * exports (KVM if /dev/kvm is usable, else TCG).  Returns once nbd.sock and ctl.sock accept connections
 * (at most 10 s). */
int vmproc_start(const struct vmproc_spec *s) VR_WUR;
/* Stop QEMU (QMP system_powerdown, then SIGKILL after timeout_ms; at once if
 * force), then seal the open cycle (so the guest's last writes can be
 * shipped while it is off) and stop nbdkit (SIGTERM, wait). */
int vmproc_stop(const char *rundir, bool force, unsigned timeout_ms) VR_WUR;
/* Whether a process holds RUNDIR/run.lock or qemu.lock (an nbdkit or a
 * QEMU: ours, or one without our pid file); vr_errmsg() then names its
 * pid. */
bool vmproc_rundir_busy(const char *rundir);
/* Whether RUNDIR/nbd.sock, the exports' socket, is there. */
bool vmproc_nbd_sock_exists(const char *rundir);
/* Whether nbdkit (disks served) and QEMU (or the libvirt domain recorded
 * in RUNDIR/libvirt.domain) are alive, from their pid files and libvirt. */
void vmproc_status(const char *rundir, bool *disks_served, bool *qemu_running);
/* Ask the plugin to seal the open cycle of every disk at one instant.
 * *cycle is the number sealed: every disk now has CYCLE.log. */
int vmproc_seal(const char *rundir, uint64_t *cycle) VR_WUR;
/* Tell the data plane cycles up to cycle are on the Replica server: the
 * blocks they logged by reference need no more protection. */
int vmproc_shipped(const char *rundir, uint64_t cycle) VR_WUR;
/* Tracking had stopped (the log could not follow the disks): start a new
 * log.  *voided: every change through that cycle is in no usable log;
 * the regions changed are in each disk's log directory as VOIDED.dirty
 * (lib/dirtymap.h), and the next cycle is tracked. */
int vmproc_rearm(const char *rundir, uint64_t *voided) VR_WUR;
/* The unshipped log passed its budget: fold it, as a re-arm does, into
 * each disk's FOLDED.dirty, with tracking going on from the next cycle. */
int vmproc_fold(const char *rundir, uint64_t *folded) VR_WUR;
/* The plugin's open cycle number, bytes in the open segments and the
 * payload bytes their records stand for (cl_rec_payload). */
int vmproc_open_cycle(const char *rundir, uint64_t *cycle,
                      uint64_t *open_bytes, uint64_t *open_payload) VR_WUR;
/* Create RUNDIR/ID.qcow2 for every disk, backed by its NBD export (a view
 * served by vmproc_start), with qemu-img. */
int vmproc_make_overlays(const char *rundir, unsigned ndisks,
                         const struct vmproc_disk *disks) VR_WUR;
/* Write RUNDIR/ID.qcow2 into each disk's raw image (disks[i].path), which
 * must hold the overlay's backing content: qemu-img rebase -u, commit,
 * fdatasync.  Repeatable after a crash. */
int vmproc_commit_overlays(const char *rundir, unsigned ndisks,
                           const struct vmproc_disk *disks) VR_WUR;
/* One QEMU guest agent command (a JSON line, e.g.
 * {"execute":"guest-fsfreeze-freeze"}) to the VM in rundir, over its
 * virtio-serial channel: synchronized first with guest-sync, bounded by
 * timeout_ms.  *ret (may be NULL): an integer "return" value.  -ENOENT if
 * QEMU does not run, -ENOTCONN if no agent answers guest-sync (the
 * command was not sent), -ETIMEDOUT if the command got no answer, -EIO if
 * the agent answered an error (its description in vr_errmsg()). */
int vmproc_guest_command(const char *rundir, const char *cmd,
                         unsigned timeout_ms, int64_t *ret) VR_WUR;
/* The same, with the "return" value as JSON (*ret: caller puts it). */
int vmproc_guest_call(const char *rundir, const char *cmd,
                      unsigned timeout_ms, json_object **ret) VR_WUR;
/* Run argv (PATH lookup) and wait; on failure the last line of its stderr
 * is in the error message. */
int vmproc_run(char *const argv[]) VR_WUR;
/* Tell a view (vmproc_spec.view) that the undo span of cycle latest is in
 * place, before that cycle is applied (the plugin's REFRESH). */
int vmproc_refresh(const char *rundir, uint64_t latest) VR_WUR;
/* "nbd+unix:///ID?socket=RUNDIR/nbd.sock"; caller frees. */
char *vmproc_nbd_uri(const char *rundir, const char *disk_id);

#endif
