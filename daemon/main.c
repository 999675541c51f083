/* main.c: vmreplicad — options, start-up and shutdown.
 *
 * Start-up order matters for crash safety: lock the state directory (one
 * daemon per state directory: a second one would ship and apply the same
 * VMs and take over api.sock), open the catalog, load it, finish applying
 * any cycle that was staged before a crash (so no Replica disk is ever seen
 * between two cycles), and only then open the management socket, the
 * replication listener and the shipper threads.  main.c owns the daemon
 * object D, the only global of the daemon's state: it hands it to each
 * layer (api_init, primary_init, replica_init) with the calls a lower
 * layer makes upward (struct replica_hooks).  The log is core/log.c. */
#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "api/api.h"
#include "core/catalog.h"
#include "core/log.h"
#include "core/repl.h"
#include "core/state.h"
#include "primary/primary.h"
#include "replica/replica.h"
#include "proc/plugin.h"
#include "proc/vmproc.h"
#include "api/web.h"

static struct daemon daemon_state = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .cond = PTHREAD_COND_INITIALIZER,
};
static struct daemon *const D = &daemon_state;

static void
sd_notify_ready(void)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || (path[0] != '/' && path[0] != '@'))
        return;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    size_t n = strlen(path);
    if (n >= sizeof sa.sun_path)
        return;
    memcpy(sa.sun_path, path, n);
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = '\0';
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    static const char msg[] = "READY=1";
    (void)sendto(fd, msg, sizeof msg - 1, 0, (struct sockaddr *)&sa,
                 (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n));
    close(fd);
}

/* Take STATE_DIR/vmreplicad.lock for the daemon's whole life (the fd is
 * never closed; the kernel drops the lock when the daemon dies, even by
 * SIGKILL), before anything in the state directory is opened, created or
 * removed.  Refuses if another daemon holds it. */
static int
lock_state_dir(const char *dir)
{
    CLEANUP_FREE char *path = xasprintf("%s/vmreplicad.lock", dir);
    int fd;
    pid_t holder;
    int rc = io_lock_file(path, &fd, &holder);
    if (rc == -EWOULDBLOCK) {
        char who[32] = "pid unknown";
        if (holder)
            snprintf(who, sizeof who, "pid %d", (int)holder);
        return vr_err(rc, "state dir %s: vmreplicad is already running "
                      "(%s), holding %s; one daemon per state directory",
                      dir, who, path);
    }
    if (rc == 0)
        rc = io_lock_note_pid(fd, getpid());
    return rc;
}

static void
usage(FILE *f)
{
    fprintf(f, "usage: vmreplicad [--state-dir DIR] [--hostname FQDN] [-v] "
               "[-D SUBSYS,...]\n");
}

/* Options: -1 to go on, else the exit status (--help, --version, a bad
 * option). */
static int
parse_options(int argc, char **argv, const char **state_dir,
              const char **hostname)
{
    static const struct option opts[] = {
        { "state-dir", required_argument, NULL, 's' },
        { "hostname", required_argument, NULL, 'H' },
        { "verbose", no_argument, NULL, 'v' },
        { "debug", required_argument, NULL, 'D' },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "vD:h", opts, NULL)) != -1) {
        switch (c) {
        case 's':
            *state_dir = optarg;
            break;
        case 'H':
            *hostname = optarg;
            break;
        case 'v':
        case 'D':
            log_level = LOG_DEBUG;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("vmreplicad %s\n", VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    return -1;
}

/* Take the state directory (created if need be) for this daemon alone:
 * D->state_dir is its real path.  The error is logged. */
static int
take_state_dir(const char *state_dir)
{
    if (io_mkdir_p(state_dir, 0750) < 0) {
        log_error("main", "%s", vr_errmsg());
        return -1;
    }
    char real[4096];
    if (!realpath(state_dir, real)) {
        log_error("main", "state dir %s: %s", state_dir, strerror(errno));
        return -1;
    }
    if (lock_state_dir(real) < 0) {
        log_error("main", "%s", vr_errmsg());
        return -1;
    }
    D->state_dir = xstrdup(real);
    return 0;
}

/* Open and load the catalog, then finish applying what was staged before
 * a crash: nothing may see a Replica disk between two cycles. */
/* The layers' contexts: the state they work on and the calls they make
 * upward, wired here (docs/design.md). */
static void
wire_layers(void)
{
    static const struct replica_hooks rh = { .shipper_stop = shipper_stop };
    api_init(D);
    primary_init(D);
    replica_init(D, &rh);
}

static int
load_state(const char *hostname)
{
    CLEANUP_FREE char *db = xasprintf("%s/catalog.db", D->state_dir);
    pthread_mutex_lock(&D->lock);
    int rc = catalog_open(db, &D->cat);
    if (rc == 0)
        rc = catalog_load(D->cat, &D->cfg, &D->vms);
    if (rc == 0 && !D->cfg.monitoring_interval_s)
        D->cfg.monitoring_interval_s = 12 * 3600; /* Hyper-V's default */
    if (rc == 0) /* before replica_recover may start a failed-over VM */
        vmproc_set_default_hv(D->cfg.hypervisor_libvirt ? VMPROC_HV_LIBVIRT
                                                        : VMPROC_HV_QEMU);
    if (rc == 0 && hostname) {
        free(D->cfg.hostname);
        D->cfg.hostname = xstrdup(hostname);
        rc = catalog_save_server(D->cat, &D->cfg);
    }
    if (rc == 0)
        rc = replica_recover();
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* The applier, the management socket, the listeners, the firewall table
 * and the shippers, in that order. */
static int
start_services(const char *sock)
{
    pthread_mutex_lock(&D->lock);
    int rc = replica_applier_start();
    if (rc == 0)
        rc = api_start(sock);
    if (rc == 0 && D->cfg.replica_enabled) {
        rc = replica_listener_apply();
        if (rc < 0) {
            /* Keep the API up so the administrator can fix the settings. */
            log_error("main", "replica listener: %s", vr_errmsg());
            rc = 0;
        }
    }
    if (rc == 0 && web_apply() < 0)
        log_error("main", "web listener: %s", vr_errmsg()); /* API stays */
    /* After the listeners, whose ports it opens; a failure is an error
     * event, and the daemon runs on. */
    if (rc == 0)
        firewall_sync();
    if (rc == 0)
        for (struct vm *vm = D->vms; vm; vm = vm->next)
            shipper_ensure(vm);
    if (rc == 0)
        event_add(D->cat, "info", NULL, "vmreplicad %s started (state dir %s)",
                  VERSION, D->state_dir);
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* Log which nbdkit plugin serves disks; one nbdkit cannot load fails
 * every vm start, so say it now, with the way out, in the log and as a
 * warning event. */
static void
check_plugin(void)
{
    log_info("main", "nbdkit plugin: %s (%s)", plugin_path(), plugin_origin());
    if (plugin_check() == 0)
        return;
    CLEANUP_FREE char *msg = xstrdup(vr_errmsg());
    log_warn("main", "%s", msg);
    pthread_mutex_lock(&D->lock);
    event_add(D->cat, "warning", NULL, "%s", msg);
    pthread_mutex_unlock(&D->lock);
}

/* The shippers, the applier, the management socket and the listeners
 * stop; the catalog closes last. */
static void
stop_services(const char *sock)
{
    pthread_mutex_lock(&D->lock);
    D->shutting_down = true;
    pthread_cond_broadcast(&D->cond);
    for (struct vm *vm = D->vms; vm; vm = vm->next)
        shipper_stop(vm);
    pthread_mutex_unlock(&D->lock);
    replica_applier_stop();
    api_stop();
    web_stop();
    replica_listener_stop();
    api_unlink_socket(sock);
    pthread_mutex_lock(&D->lock);
    catalog_close(D->cat);
    D->cat = NULL;
    pthread_mutex_unlock(&D->lock);
}

int
main(int argc, char **argv)
{
    const char *state_dir = "/var/lib/vmreplica";
    const char *hostname = NULL;
    int status = parse_options(argc, argv, &state_dir, &hostname);
    if (status >= 0)
        return status;

    /* Two malloc arenas, not glibc's eight per CPU: each shipper thread
     * (one a VM) and each request thread would otherwise come to hold an
     * arena of its own, with what its last cycle or transfer freed still
     * in it.  Measured with the memory row (bench/run memory, 1 TiB
     * sparse disks at 1 s): vmreplicad at 10 VMs 30 MiB by default, 21
     * MiB with 4 arenas, 14 with 2, 13 with 1; at 50 VMs 55, 26, 20, 20.
     * No allocation here is on a per-byte path, so two do not contend.
     * MALLOC_ARENA_MAX in the environment still decides if set. */
    if (!getenv("MALLOC_ARENA_MAX"))
        mallopt(M_ARENA_MAX, 2);

    /* Every thread inherits this mask; main alone takes the signals. */
    signal(SIGPIPE, SIG_IGN);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    if (take_state_dir(state_dir) < 0)
        return 1;
    wire_layers();
    CLEANUP_FREE char *sock = xasprintf("%s/api.sock", D->state_dir);
    if (load_state(hostname) < 0) {
        log_error("main", "%s", vr_errmsg());
        return 1;
    }
    /* Before the management socket opens: its warning is there for the
     * first command, and no `vm start` races its nbdkit --dump-plugin. */
    check_plugin();
    if (start_services(sock) < 0) {
        log_error("main", "%s", vr_errmsg());
        return 1;
    }
    sd_notify_ready();

    siginfo_t si;
    int sig;
    while ((sig = sigwaitinfo(&sigs, &si)) < 0)
        ;
    /* Who asked: a stop by a service manager or an agent shows its pid. */
    char comm[64] = "?";
    CLEANUP_FREE char *cpath = xasprintf("/proc/%d/comm", (int)si.si_pid);
    FILE *cf = si.si_pid > 0 ? fopen(cpath, "re") : NULL;
    if (cf) {
        if (fgets(comm, sizeof comm, cf))
            comm[strcspn(comm, "\n")] = '\0';
        fclose(cf);
    }
    log_info("main", "signal %d from pid %d (%s): shutting down", sig,
             (int)si.si_pid, comm);
    stop_services(sock);
    return 0;
}
