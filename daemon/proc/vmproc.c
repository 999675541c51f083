/* vmproc.c: start, stop and watch the processes behind a running VM.
 *
 * nbdkit (with the vmreplica plugin) serves every disk of the VM as one
 * export on RUNDIR/nbd.sock and answers SEAL/STATUS on RUNDIR/ctl.sock; QEMU,
 * when asked for, attaches to those exports.  Both are started through a
 * double fork (QEMU's -daemonize does the second fork itself), so they are
 * children of init, never zombies of vmreplicad, and survive its restart:
 * their pid files are the only link, and every pid read back is checked
 * against /proc/PID/cmdline so a recycled pid is never signalled.
 *
 * RUNDIR/run.lock (flock) keeps one nbdkit per run directory: vmproc_start
 * takes it before touching the directory, nbdkit inherits it and holds it
 * for its life (its pid written in the file), so neither a second daemon
 * nor a start while an nbdkit we cannot see (no pid file) still serves the
 * disks can start another nbdkit on the same disks and change logs.
 * RUNDIR/qemu.lock does the same for QEMU: one guest per disk.
 *
 * vmreplicad is multithreaded, so everything a child needs (argv, paths) is
 * built before fork() and the child only calls async-signal-safe functions.
 * Nothing here logs: failures go to vr_err() and the caller reports them.
 * Besides the variables in vmproc.h, $VMREPLICA_ACCEL=tcg|kvm forces QEMU's
 * accelerator (tests under nested virtualization want tcg).
 */
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "config.h"
#include "libvirt.h"
#include "proc-int.h"
#include "vmproc.h"

#define START_TIMEOUT_MS  10000
#define NBDKIT_STOP_MS    10000
#define KILL_WAIT_MS      5000
#define CTL_TIMEOUT_MS    30000
#define QEMU_LAUNCH_MS    30000

/* --- nbdkit ------------------------------------------------------------ */

static void
unlink_in(const char *rundir, const char *name)
{
    CLEANUP_FREE char *p = xasprintf("%s/%s", rundir, name);
    unlink(p);
}

/* Take RUNDIR/NAME (run.lock: nbdkit's, qemu.lock: QEMU's) for a start;
 * -EBUSY naming the holder if another process (one without our pid file,
 * another daemon) holds it. */
static int
lock_rundir(const char *rundir, const char *name, int *fd)
{
    CLEANUP_FREE char *path = xasprintf("%s/%s", rundir, name);
    pid_t holder;
    int rc = io_lock_file(path, fd, &holder);
    if (rc == -EWOULDBLOCK)
        return vr_err(-EBUSY, "run directory %s is in use by another "
                      "process (pid %d) that this daemon did not start or "
                      "no longer knows (it holds %s); stop that process "
                      "first", rundir, (int)holder, name);
    return rc;
}

static bool
lock_busy(const char *rundir, const char *name)
{
    int fd;
    CLEANUP_FREE char *path = xasprintf("%s/%s", rundir, name);
    if (access(path, F_OK) < 0)
        return false;
    int rc = lock_rundir(rundir, name, &fd);
    if (rc == 0)
        close(fd);
    else if (rc != -EBUSY)
        vr_err_clear();
    return rc == -EBUSY;
}

bool
vmproc_rundir_busy(const char *rundir)
{
    return lock_busy(rundir, "run.lock") || lock_busy(rundir, "qemu.lock");
}

/* Start nbdkit holding lock_fd (RUNDIR/run.lock) for its life. */
static int
start_nbdkit(const struct vmproc_spec *s, int lock_fd)
{
    const char *rd = s->rundir;
    CLEANUP_FREE char *nbd_sock = xasprintf("%s/nbd.sock", rd);
    CLEANUP_FREE char *ctl_sock = xasprintf("%s/ctl.sock", rd);
    CLEANUP_FREE char *pidfile = xasprintf("%s/nbdkit.pid", rd);
    CLEANUP_FREE char *logpath = xasprintf("%s/nbdkit.log", rd);
    struct sockaddr_un sa;
    if (strlen(nbd_sock) >= sizeof sa.sun_path ||
        strlen(ctl_sock) >= sizeof sa.sun_path)
        return vr_err(-ENAMETOOLONG, "start nbdkit: run directory %s: path "
                      "too long for a unix socket", rd);
    if (s->ndisks == 0)
        return vr_err(-EINVAL, "start nbdkit: vm %s has no disks", s->name);

    CLEANUP_FREE char *bin = resolve_bin(nbdkit_bin());
    if (!bin)
        return vr_err(-ENOENT, "start nbdkit: %s: not found in PATH",
                      nbdkit_bin());

    /* A stale socket would make nbdkit's bind() fail. */
    unlink(nbd_sock);
    unlink(ctl_sock);
    unlink(pidfile);

    struct argv a = { 0 };
    argv_addf(&a, nbdkit_bin());
    argv_addf(&a, "--foreground");
    argv_addf(&a, "--unix");
    argv_addf(&a, nbd_sock);
    argv_addf(&a, "-P");
    argv_addf(&a, pidfile);
    argv_addf(&a, "--threads");
    argv_addf(&a, "16");
    argv_addf(&a, plugin_path());
    for (unsigned i = 0; i < s->ndisks; i++)
        argv_add(&a, xasprintf("disk=%s:%s", s->disks[i].id,
                               s->disks[i].path));
    argv_add(&a, xasprintf("control=%s", ctl_sock));
    const char *hashlog = getenv("VMREPLICA_TEST_HASHLOG");
    if (s->view)
        argv_add(&a, xasprintf("view=%s", s->view));
    else if (hashlog && *hashlog)
        argv_add(&a, xasprintf("hashlog=%s", hashlog));

    /* A death at start is an error, said with how nbdkit ended (a silent
     * one used to be started again: see wait_reparented()). */
    off_t log_start = file_size(logpath);
    pid_t pid = 0;
    int rc = spawn_detached(bin, a.v, logpath, lock_fd, &pid);
    argv_fini(&a);
    if (rc < 0)
        return err_wrap(rc, "start nbdkit for %s", s->name);

    uint64_t deadline = vr_mono_ms() + START_TIMEOUT_MS;
    const char *why = NULL;
    for (;;) {
        /* nbdkit writes its pid file once it accepts connections; probing
         * nbd.sock itself would only log a failed handshake. */
        if (read_pidfile(pidfile) && is_socket(nbd_sock) &&
            sock_accepts(ctl_sock))
            return 0;
        if (!pid_running(pid)) {
            why = "exited";
            break;
        }
        if (vr_mono_ms() >= deadline) {
            why = "sockets not ready after 10 s";
            break;
        }
        vr_sleep_ms(20);
    }
    char death[96] = "";
    if (strcmp(why, "exited") == 0)
        death_of(pid, death, sizeof death);
    if (kill(pid, 0) == 0)
        (void)terminate(pid, SIGKILL, KILL_WAIT_MS, "nbdkit");
    unlink(pidfile);
    CLEANUP_FREE char *tail = log_tail(logpath, log_start);
    return vr_err(-EIO, "start nbdkit for %s: %s%s%s%s: %s", s->name, why,
                  *death ? " (" : "", death, *death ? ")" : "", tail);
}

static int
stop_nbdkit(const char *rundir)
{
    pid_t pid = nbdkit_pid(rundir);
    if (pid) {
        int rc = terminate(pid, SIGTERM, NBDKIT_STOP_MS, "nbdkit");
        if (rc < 0)
            return rc;
    } else if (lock_busy(rundir, "run.lock")) {
        /* Its sockets are another process's: leave them (the error names
         * it). */
        return -EBUSY;
    }
    unlink_in(rundir, "nbdkit.pid");
    unlink_in(rundir, "nbd.sock");
    unlink_in(rundir, "ctl.sock");
    return 0;
}

/* --- QEMU -------------------------------------------------------------- */

/* KVM when /dev/kvm opens read-write, else TCG.  $VMREPLICA_ACCEL=tcg|kvm
 * overrides: under nested virtualization (these test machines) firmware
 * boots 25x faster in TCG than in KVM. */
static bool kvm_usable(void);

static const char *
machine_arg(void)
{
    const char *accel = getenv("VMREPLICA_ACCEL");
    if (accel && strcmp(accel, "tcg") == 0)
        return "q35,accel=tcg";
    if (accel && strcmp(accel, "kvm") == 0)
        return "q35,accel=kvm";
    return kvm_usable() ? "q35,accel=kvm" : "q35,accel=tcg";
}

static bool
kvm_usable(void)
{
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return false;
    close(fd);
    return true;
}

/* QEMU's options for the VM itself: name, UUID, machine, memory, CPUs,
 * direct kernel boot, console, QMP and pid file, daemonized. */
static void
qemu_argv_machine(struct argv *a, const struct vmproc_spec *s,
                  const char *erd, const char *pidfile)
{
    CLEANUP_FREE char *ename = qemu_escape(s->name);
    argv_addf(a, qemu_bin());
    argv_addf(a, "-name");
    argv_addf(a, ename);
    if (s->uuid && *s->uuid) {
        argv_addf(a, "-uuid");
        argv_addf(a, s->uuid);
    }
    argv_addf(a, "-machine");
    argv_addf(a, machine_arg());
    argv_addf(a, "-m");
    argv_add(a, xasprintf("%u", s->memory_mib ? s->memory_mib : 256));
    argv_addf(a, "-smp");
    argv_add(a, xasprintf("%u", s->cpus ? s->cpus : 1));
    argv_addf(a, "-nodefaults");
    if (s->kernel) {
        argv_addf(a, "-kernel");
        argv_addf(a, s->kernel);
        if (s->initrd) {
            argv_addf(a, "-initrd");
            argv_addf(a, s->initrd);
        }
        if (s->cmdline) {
            argv_addf(a, "-append");
            argv_addf(a, s->cmdline);
        }
    }
    argv_addf(a, "-display");
    argv_addf(a, "none");
    argv_addf(a, "-serial");
    argv_add(a, xasprintf("file:%s/console.log", erd));
    argv_addf(a, "-qmp");
    argv_add(a, xasprintf("unix:%s/qmp.sock,server=on,wait=off", erd));
    argv_addf(a, "-pidfile");
    argv_addf(a, pidfile);
    argv_addf(a, "-daemonize");
}

/* One virtio-blk device per disk: its NBD export, or its qcow2 overlay. */
static void
qemu_argv_disks(struct argv *a, const struct vmproc_spec *s, const char *erd)
{
    for (unsigned i = 0; i < s->ndisks; i++) {
        CLEANUP_FREE char *id = qemu_escape(s->disks[i].id);
        argv_addf(a, "-blockdev");
        if (s->overlays)
            argv_add(a, xasprintf("driver=qcow2,node-name=%s,"
                                  "file.driver=file,file.filename=%s/%s"
                                  ".qcow2", id, erd, id));
        else
            argv_add(a, xasprintf("driver=nbd,node-name=%s,server.type="
                                  "unix,server.path=%s/nbd.sock,export=%s",
                                  id, erd, id));
        argv_addf(a, "-device");
        argv_add(a, xasprintf("virtio-blk-pci,drive=%s%s", id,
                              /* -kernel boots first: QEMU refuses a
                               * second bootindex 0 */
                              i == 0 && !s->kernel ? ",bootindex=0" : ""));
    }
}

/* One virtio-net device per NIC, on its network. */
static void
qemu_argv_nics(struct argv *a, const struct vmproc_spec *s)
{
    for (unsigned i = 0; i < s->nnics; i++) {
        const char *net = s->nic_net[i];
        argv_addf(a, "-netdev");
        if (strcmp(net, "user") == 0)
            argv_add(a, xasprintf("user,id=net%u", i));
        else if (strncmp(net, "tap:", 4) == 0)
            argv_add(a, xasprintf("tap,id=net%u,ifname=%s,script=no,"
                                  "downscript=no", i, net + 4));
        else if (strncmp(net, "bridge:", 7) == 0)
            argv_add(a, xasprintf("bridge,id=net%u,br=%s", i, net + 7));
        else /* none: a hub of its own, connected to nothing */
            argv_add(a, xasprintf("hubport,id=net%u,hubid=%u", i, 100 + i));
        argv_addf(a, "-device");
        argv_add(a, xasprintf("virtio-net-pci,netdev=net%u,mac=%s", i,
                              s->nic_mac[i]));
    }
}

/* The exit device the guest tests use, and the guest agent's channel. */
static void
qemu_argv_agent(struct argv *a, const char *erd)
{
    argv_addf(a, "-device");
    argv_addf(a, "isa-debug-exit,iobase=0xf4,iosize=0x04");
    argv_addf(a, "-chardev");
    argv_add(a, xasprintf("socket,path=%s/qga.sock,server=on,wait=off,"
                          "id=qga0", erd));
    argv_addf(a, "-device");
    argv_addf(a, "virtio-serial");
    argv_addf(a, "-device");
    argv_addf(a, "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0");
}

/* Start QEMU holding lock_fd (RUNDIR/qemu.lock) for its life.  With
 * -daemonize the process we start exits once the VM is set up (or
 * failed), and the VM itself is reparented to init.  Its pre-daemonize
 * errors land in qemu.log. */
static int
launch_qemu(const struct vmproc_spec *s, int lock_fd)
{
    const char *rd = s->rundir;
    CLEANUP_FREE char *bin = resolve_bin(qemu_bin());
    if (!bin)
        return vr_err(-ENOENT, "start qemu: %s: not found in PATH",
                      qemu_bin());
    CLEANUP_FREE char *erd = qemu_escape(rd);
    CLEANUP_FREE char *pidfile = xasprintf("%s/qemu.pid", rd);
    CLEANUP_FREE char *logpath = xasprintf("%s/qemu.log", rd);
    unlink(pidfile);
    unlink_in(rd, "qmp.sock");
    unlink_in(rd, "qga.sock");

    struct argv a = { 0 };
    qemu_argv_machine(&a, s, erd, pidfile);
    qemu_argv_disks(&a, s, erd);
    qemu_argv_nics(&a, s);
    qemu_argv_agent(&a, erd);

    off_t log_start = file_size(logpath);
    int exec_errno = 0, status = 0;
    int rc = spawn_wait(bin, a.v, logpath, lock_fd, QEMU_LAUNCH_MS,
                        "start qemu", &exec_errno, &status);
    argv_fini(&a);
    if (rc == -ETIMEDOUT)
        return vr_err(-ETIMEDOUT, "start qemu for %s: not ready after %d s",
                      s->name, QEMU_LAUNCH_MS / 1000);
    if (rc < 0)
        return rc;
    if (exec_errno)
        return vr_err(-exec_errno, "start qemu for %s: exec %s: %s", s->name,
                      bin, strerror(exec_errno));
    if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
        !qemu_pid(rd)) {
        CLEANUP_FREE char *tail = log_tail(logpath, log_start);
        return vr_err(-EIO, "start qemu for %s: %s", s->name, tail);
    }
    return 0;
}

static int
start_qemu(const struct vmproc_spec *s)
{
    int lock_fd;
    int rc = lock_rundir(s->rundir, "qemu.lock", &lock_fd);
    if (rc < 0)
        return err_wrap(rc, "vm %s", s->name);
    rc = launch_qemu(s, lock_fd);
    if (rc == 0 && io_lock_note_pid(lock_fd, qemu_pid(s->rundir)) < 0)
        vr_err_clear(); /* only the messages lose the pid */
    close(lock_fd); /* QEMU holds it now */
    return rc;
}

/* QMP: greeting, qmp_capabilities, then one command.  Replies are lines. */
static int
qmp_command(const char *rundir, const char *cmd)
{
    CLEANUP_FREE char *path = xasprintf("%s/qmp.sock", rundir);
    int fd;
    int rc = unix_connect(path, &fd);
    if (rc < 0)
        return rc;
    uint64_t deadline = vr_mono_ms() + 5000;
    struct linebuf *lb = xcalloc(1, sizeof *lb);
    lb->fd = fd;
    char line[4096];
    const char *msgs[] = { "{\"execute\":\"qmp_capabilities\"}\n", cmd };
    rc = read_line(lb, line, sizeof line, deadline); /* greeting */
    for (unsigned i = 0; rc == 0 && i < ARRAY_SIZE(msgs); i++) {
        rc = send_all(fd, msgs[i]);
        /* Skip asynchronous events until the command's reply. */
        while (rc == 0) {
            rc = read_line(lb, line, sizeof line, deadline);
            if (rc < 0)
                break;
            if (strstr(line, "\"return\""))
                break;
            if (strstr(line, "\"error\"")) {
                rc = -EIO;
                break;
            }
        }
    }
    free(lb);
    close(fd);
    return rc;
}

int
vmproc_guest_command(const char *rundir, const char *cmd, unsigned timeout_ms,
                     int64_t *ret)
{
    json_object *r = NULL;
    int rc = vmproc_guest_call(rundir, cmd, timeout_ms, &r);
    if (rc == 0 && ret)
        *ret = json_object_get_int64(r);
    json_object_put(r);
    return rc;
}

int
vmproc_guest_call(const char *rundir, const char *cmd, unsigned timeout_ms,
                  json_object **ret)
{
    *ret = NULL;
    CLEANUP_FREE char *path = xasprintf("%s/qga.sock", rundir);
    if (!qemu_pid(rundir) && lv_recorded(rundir))
        return lv_agent(rundir, cmd, timeout_ms, ret);
    if (!qemu_pid(rundir))
        return vr_err(-ENOENT, "guest agent: the VM does not run");
    int fd;
    int rc = unix_connect(path, &fd);
    if (rc < 0)
        return vr_err(rc, "guest agent: connect %s: %s", path, strerror(-rc));
    uint64_t deadline = vr_mono_ms() + timeout_ms;
    struct linebuf *lb = xcalloc(1, sizeof *lb);
    lb->fd = fd;
    CLEANUP_FREE char *line = xmalloc(LINE_MAX_BYTES);
    /* guest-sync with a fresh id first: the channel may still hold the
     * reply to an exchange that timed out earlier.  0xff makes the agent
     * drop any partial request it holds. */
    static uint32_t seq;
    uint32_t id = ((uint32_t)getpid() << 16 ^
                   __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED) ^
                   (uint32_t)vr_mono_ms()) & 0x7fffffff;
    char sync[128];
    snprintf(sync, sizeof sync,
             "\xff{\"execute\":\"guest-sync\",\"arguments\":{\"id\":%u}}\n",
             id);
    rc = send_all(fd, sync);
    bool synced = false;
    json_object *j = NULL;
    while (rc == 0 && !synced) {
        rc = read_line(lb, line, LINE_MAX_BYTES, deadline);
        json_object_put(j);
        j = rc == 0 ? json_tokener_parse(line) : NULL;
        json_object *v;
        if (j && json_object_object_get_ex(j, "return", &v) &&
            json_object_get_int64(v) == (int64_t)id)
            synced = true;
    }
    if (!synced) {
        json_object_put(j);
        free(lb);
        close(fd);
        return vr_err(-ENOTCONN, "guest agent: not answering (%s within %u "
                      "ms)", rc == -ETIMEDOUT ? "no reply" : strerror(-rc),
                      timeout_ms);
    }
    rc = send_all(fd, cmd);
    if (rc == 0)
        rc = read_line(lb, line, LINE_MAX_BYTES, deadline);
    json_object_put(j);
    j = rc == 0 ? json_tokener_parse(line) : NULL;
    free(lb);
    close(fd);
    if (rc == -ETIMEDOUT)
        return vr_err(rc, "guest agent: no answer within %u ms", timeout_ms);
    if (rc < 0)
        return vr_err(rc, "guest agent: %s", strerror(-rc));
    json_object *v, *e;
    if (j && json_object_object_get_ex(j, "return", &v)) {
        *ret = json_object_get(v);
    } else if (j && json_object_object_get_ex(j, "error", &e) &&
               json_object_object_get_ex(e, "desc", &v)) {
        rc = vr_err(-EIO, "guest agent: %s", json_object_get_string(v));
    } else {
        rc = vr_err(-EPROTO, "guest agent: unexpected answer '%.80s'", line);
    }
    json_object_put(j);
    return rc;
}

static int
stop_qemu(const char *rundir, bool force, unsigned timeout_ms)
{
    int rc = lv_stop(rundir, force, timeout_ms);
    if (rc < 0)
        return rc;
    pid_t pid = qemu_pid(rundir);
    if (pid) {
        bool gone = false;
        if (!force && qmp_command(rundir, "{\"execute\":"
                                          "\"system_powerdown\"}\n") == 0)
            gone = wait_gone(pid, timeout_ms);
        if (!gone) {
            rc = terminate(pid, SIGKILL, KILL_WAIT_MS, "qemu");
            if (rc < 0)
                return rc;
        }
    } else if (lock_busy(rundir, "qemu.lock")) {
        return -EBUSY; /* another process's QEMU: its sockets stay */
    }
    unlink_in(rundir, "qemu.pid");
    unlink_in(rundir, "qmp.sock");
    unlink_in(rundir, "qga.sock");
    return 0;
}

/* --- public ------------------------------------------------------------ */

static enum vmproc_hv default_hv = VMPROC_HV_QEMU;

void
vmproc_set_default_hv(enum vmproc_hv hv)
{
    __atomic_store_n(&default_hv, hv == VMPROC_HV_LIBVIRT
                                      ? VMPROC_HV_LIBVIRT : VMPROC_HV_QEMU,
                     __ATOMIC_RELAXED);
}

int
vmproc_hv_parse(const char *name, enum vmproc_hv *out)
{
    if (name && strcmp(name, "qemu") == 0)
        *out = VMPROC_HV_QEMU;
    else if (name && strcmp(name, "libvirt") == 0)
        *out = VMPROC_HV_LIBVIRT;
    else
        return vr_err(-EINVAL, "hypervisor %s: expected qemu or libvirt",
                      name ? name : "(missing)");
    return 0;
}

const char *
vmproc_hv_name(enum vmproc_hv hv)
{
    if (hv == VMPROC_HV_DEFAULT)
        hv = __atomic_load_n(&default_hv, __ATOMIC_RELAXED);
    return hv == VMPROC_HV_LIBVIRT ? "libvirt" : "qemu";
}

/* The guest: vmreplica's QEMU or a libvirt domain (libvirt.c). */
static int
start_guest(const struct vmproc_spec *s)
{
    if (strcmp(vmproc_hv_name(s->hv), "libvirt") == 0)
        return lv_start(s);
    return start_qemu(s);
}

int
vmproc_start(const struct vmproc_spec *s)
{
    int rc = io_mkdir_p(s->rundir, 0750);
    if (rc < 0)
        return err_wrap(rc, "start vm %s", s->name);

    bool served, running;
    vmproc_status(s->rundir, &served, &running);
    bool started_nbdkit = false;
    if (!served) {
        int lock_fd = -1;
        rc = lock_rundir(s->rundir, "run.lock", &lock_fd);
        if (rc < 0)
            rc = err_wrap(rc, "vm %s", s->name);
        if (rc == 0)
            rc = start_nbdkit(s, lock_fd);
        if (rc == 0) {
            CLEANUP_FREE char *pf = xasprintf("%s/nbdkit.pid", s->rundir);
            if (io_lock_note_pid(lock_fd, read_pidfile(pf)) < 0)
                vr_err_clear(); /* only the messages lose the pid */
        }
        if (lock_fd >= 0)
            close(lock_fd); /* nbdkit holds it now */
        if (rc < 0)
            return rc;
        started_nbdkit = true;
    }
    if (s->hypervisor && !running) {
        rc = start_guest(s);
        if (rc < 0) {
            /* Leave things as they were: a failed start serves nothing it
             * did not serve before. */
            if (started_nbdkit) {
                CLEANUP_FREE char *msg = xstrdup(vr_errmsg());
                (void)stop_nbdkit(s->rundir);
                vr_err(rc, "%s", msg);
            }
            return rc;
        }
    }
    return 0;
}

int
vmproc_stop(const char *rundir, bool force, unsigned timeout_ms)
{
    int rc = stop_qemu(rundir, force, timeout_ms);
    if (rc < 0)
        return rc;
    /* Seal the guest's last writes into a cycle of their own so they can
     * be shipped while the VM is off.  Best effort: an unsealed segment
     * is kept and continued at the next start, so nothing is lost. */
    uint64_t cycle;
    if (nbdkit_pid(rundir) && vmproc_seal(rundir, &cycle) < 0)
        vr_err_clear();
    return stop_nbdkit(rundir);
}

bool
vmproc_nbd_sock_exists(const char *rundir)
{
    CLEANUP_FREE char *p = xasprintf("%s/nbd.sock", rundir);
    return is_socket(p);
}

void
vmproc_status(const char *rundir, bool *disks_served, bool *qemu_running)
{
    *disks_served = nbdkit_pid(rundir) != 0;
    *qemu_running = qemu_pid(rundir) != 0 || lv_running(rundir);
}

/* Send one control command; the reply line after "OK " goes to out. */
static int
ctl_request(const char *rundir, const char *cmd, char *out, size_t cap)
{
    CLEANUP_FREE char *path = xasprintf("%s/ctl.sock", rundir);
    int fd;
    int rc = unix_connect(path, &fd);
    if (rc < 0)
        return vr_err(rc, "control socket %s: connect: %s", path,
                      strerror(-rc));
    rc = send_all(fd, cmd);
    if (rc < 0) {
        close(fd);
        return vr_err(rc, "control socket %s: send: %s", path, strerror(-rc));
    }
    struct linebuf *lb = xcalloc(1, sizeof *lb);
    lb->fd = fd;
    rc = read_line(lb, out, cap, vr_mono_ms() + CTL_TIMEOUT_MS);
    free(lb);
    close(fd);
    if (rc < 0)
        return vr_err(rc, "control socket %s: no reply: %s", path,
                      rc == -ETIMEDOUT ? "timed out after 30 s"
                                       : strerror(-rc));
    if (strncmp(out, "ERR", 3) == 0 && (out[3] == ' ' || !out[3]))
        return vr_err(-EIO, "%s", out[3] ? out + 4 : "unknown error");
    if (strncmp(out, "OK ", 3) != 0)
        return vr_err(-EPROTO, "control socket %s: bad reply '%.64s'", path,
                      out);
    memmove(out, out + 3, strlen(out + 3) + 1);
    return 0;
}

static bool
parse_u64(const char *s, char **end, uint64_t *out)
{
    if (*s < '0' || *s > '9')
        return false;
    errno = 0;
    unsigned long long v = strtoull(s, end, 10);
    if (errno)
        return false;
    *out = v;
    return true;
}

/* Send cmd on the control socket; its reply must be "OK N ...": *out = N.
 * what names the request in errors. */
static int
ctl_request_u64(const char *rundir, const char *cmd, const char *what,
                uint64_t *out)
{
    char line[512];
    int rc = ctl_request(rundir, cmd, line, sizeof line);
    if (rc < 0)
        return err_wrap(rc, "%s %s", what, rundir);
    char *end;
    uint64_t v;
    if (!parse_u64(line, &end, &v) || (*end && *end != ' '))
        return vr_err(-EPROTO, "%s %s: bad reply 'OK %.64s'", what, rundir,
                      line);
    *out = v;
    return 0;
}

int
vmproc_seal(const char *rundir, uint64_t *cycle)
{
    return ctl_request_u64(rundir, "SEAL\n", "seal", cycle);
}

int
vmproc_rearm(const char *rundir, uint64_t *voided)
{
    return ctl_request_u64(rundir, "REARM\n", "re-arm tracking", voided);
}

int
vmproc_fold(const char *rundir, uint64_t *folded)
{
    return ctl_request_u64(rundir, "FOLD\n", "fold the change log", folded);
}

int
vmproc_shipped(const char *rundir, uint64_t cycle)
{
    char line[512], cmd[64];
    snprintf(cmd, sizeof cmd, "SHIPPED %llu\n", (unsigned long long)cycle);
    int rc = ctl_request(rundir, cmd, line, sizeof line);
    if (rc < 0)
        return err_wrap(rc, "shipped %s", rundir);
    return 0;
}

int
vmproc_refresh(const char *rundir, uint64_t latest)
{
    char line[512], cmd[64];
    snprintf(cmd, sizeof cmd, "REFRESH %llu\n", (unsigned long long)latest);
    int rc = ctl_request(rundir, cmd, line, sizeof line);
    return rc < 0 ? err_wrap(rc, "refresh view %s", rundir) : 0;
}

int
vmproc_make_overlays(const char *rundir, unsigned ndisks,
                     const struct vmproc_disk *disks)
{
    for (unsigned i = 0; i < ndisks; i++) {
        CLEANUP_FREE char *ov = xasprintf("%s/%s.qcow2", rundir, disks[i].id);
        CLEANUP_FREE char *uri = vmproc_nbd_uri(rundir, disks[i].id);
        unlink(ov);
        char *argv[] = { (char *)"qemu-img", (char *)"create", (char *)"-q",
                         (char *)"-f", (char *)"qcow2", (char *)"-F",
                         (char *)"raw", (char *)"-b", uri, ov, NULL };
        int rc = vmproc_run(argv);
        if (rc < 0)
            return err_wrap(rc, "overlay %s on %s", ov, uri);
    }
    return 0;
}

int
vmproc_commit_overlays(const char *rundir, unsigned ndisks,
                       const struct vmproc_disk *disks)
{
    for (unsigned i = 0; i < ndisks; i++) {
        CLEANUP_FREE char *ov = xasprintf("%s/%s.qcow2", rundir, disks[i].id);
        CLEANUP_FREE char *base = xstrdup(disks[i].path);
        /* The overlay's backing file becomes the disk itself (same
         * content: the caller reverted it to the view's point), then its
         * clusters go into the disk.  Both steps can be repeated. */
        char *rebase[] = { (char *)"qemu-img", (char *)"rebase", (char *)"-q",
                           (char *)"-u", (char *)"-f", (char *)"qcow2",
                           (char *)"-F", (char *)"raw", (char *)"-b", base,
                           ov, NULL };
        char *commit[] = { (char *)"qemu-img", (char *)"commit", (char *)"-q",
                           (char *)"-f", (char *)"qcow2", ov, NULL };
        int rc = vmproc_run(rebase);
        if (rc == 0)
            rc = vmproc_run(commit);
        if (rc < 0)
            return err_wrap(rc, "commit overlay %s into %s", ov, base);
        int fd = open(base, O_RDWR | O_CLOEXEC);
        if (fd < 0 || fdatasync(fd) < 0)
            rc = vr_err(-errno, "commit overlay: sync %s: %s", base,
                        strerror(errno));
        if (fd >= 0)
            close(fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int
vmproc_open_cycle(const char *rundir, uint64_t *cycle, uint64_t *open_bytes,
                  uint64_t *open_payload)
{
    char line[512];
    int rc = ctl_request(rundir, "STATUS\n", line, sizeof line);
    if (rc < 0)
        return err_wrap(rc, "status %s", rundir);
    char *end, *end2, *end3;
    uint64_t c, b, p;
    if (!parse_u64(line, &end, &c) || *end != ' ' ||
        !parse_u64(end + 1, &end2, &b) || *end2 != ' ' ||
        !parse_u64(end2 + 1, &end3, &p) || (*end3 && *end3 != ' '))
        return vr_err(-EPROTO, "status %s: bad reply 'OK %.64s'", rundir,
                      line);
    *cycle = c;
    *open_bytes = b;
    *open_payload = p;
    return 0;
}

char *
vmproc_nbd_uri(const char *rundir, const char *disk_id)
{
    return xasprintf("nbd+unix:///%s?socket=%s/nbd.sock", disk_id, rundir);
}
