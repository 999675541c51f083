/* plugin.c: find the nbdkit plugin and check that nbdkit loads it.
 *
 * The plugin is $VMREPLICA_PLUGIN when set; else, when vmreplicad runs
 * from a meson build tree (BUILD/daemon/vmreplicad, BUILD/build.ninja), that
 * build's BUILD/plugin/nbdkit-vmreplica-plugin.so, so a daemon built from a
 * checkout serves disks with the plugin built beside it; else the installed
 * one in PLUGINDIR.  The choice is made once, on first use.
 *
 * A plugin nbdkit cannot load would fail only the first `vm start`, with
 * nbdkit's words; plugin_check() lets the daemon say it at start-up, with
 * the way out. */
#include "config.h"

#include "plugin.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "proc-int.h"

#define PLUGIN_NAME "nbdkit-vmreplica-plugin.so"

static pthread_once_t found_once = PTHREAD_ONCE_INIT;
static char found_path[PATH_MAX];
static const char *found_origin;

/* BUILD/plugin/PLUGIN_NAME if this executable is BUILD/SUBDIR/NAME in a
 * meson build tree and the plugin was built there. */
static bool
build_tree_plugin(char *out, size_t n)
{
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0)
        return false;
    exe[len] = '\0';
    for (int up = 0; up < 2; up++) { /* drop NAME, then SUBDIR */
        char *slash = strrchr(exe, '/');
        if (!slash || slash == exe)
            return false;
        *slash = '\0';
    }
    CLEANUP_FREE char *ninja = xasprintf("%s/build.ninja", exe);
    if (access(ninja, F_OK) != 0)
        return false;
    if ((size_t)snprintf(out, n, "%s/plugin/" PLUGIN_NAME, exe) >= n)
        return false;
    return access(out, F_OK) == 0;
}

static void
find_plugin(void)
{
    const char *env = getenv("VMREPLICA_PLUGIN");
    if (env && *env) {
        snprintf(found_path, sizeof found_path, "%s", env);
        found_origin = "from VMREPLICA_PLUGIN";
    } else if (build_tree_plugin(found_path, sizeof found_path)) {
        found_origin = "from this build tree";
    } else {
        snprintf(found_path, sizeof found_path, "%s",
                 PLUGINDIR "/" PLUGIN_NAME);
        found_origin = "the installed path";
    }
}

const char *
plugin_path(void)
{
    pthread_once(&found_once, find_plugin);
    return found_path;
}

const char *
plugin_origin(void)
{
    pthread_once(&found_once, find_plugin);
    return found_origin;
}

/* Run nbdkit --dump-plugin PATH: its exit status (-1: not run) and its
 * stdout and stderr together in out. */
static int
dump_plugin(const char *nbdkit, const char *path, char *out, size_t n)
{
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        return -1;
    }
    char *const argv[] = { (char *)nbdkit, (char *)"--dump-plugin",
                           (char *)path, NULL };
    if (pid == 0) { /* async-signal-safe calls only: threads may run */
        int devnull = open("/dev/null", O_RDONLY);
        dup2(devnull, 0);
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
        execv(nbdkit, argv);
        _exit(127);
    }
    close(pipefd[1]);
    size_t len = 0;
    char discard[512];
    for (;;) { /* keep the first n - 1 bytes, drain the rest */
        bool keep = len + 1 < n;
        ssize_t r = read(pipefd[0], keep ? out + len : discard,
                         keep ? n - 1 - len : sizeof discard);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        if (keep)
            len += (size_t)r;
    }
    out[len] = '\0';
    close(pipefd[0]);
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The line of nbdkit's output after "nbdkit: error: ", or its first line;
 * in buf itself. */
static const char *
nbdkit_reason(char *buf)
{
    char *p = strstr(buf, "error: ");
    p = p ? p + 7 : buf;
    p[strcspn(p, "\n")] = '\0';
    return p;
}

#define PLUGIN_HINT                                                      \
    "vm start will fail: set VMREPLICA_PLUGIN to the plugin's path, or " \
    "install vmreplica (meson install, or the Debian package)"

int
plugin_check(void)
{
    const char *path = plugin_path();
    struct stat st;
    if (stat(path, &st) < 0)
        return vr_err(-errno, "nbdkit plugin %s (%s): %s; " PLUGIN_HINT, path,
                      plugin_origin(), strerror(errno));
    CLEANUP_FREE char *nbdkit = resolve_bin(nbdkit_bin());
    if (!nbdkit)
        return vr_err(-ENOENT,
                      "nbdkit (%s) not found in PATH: vm start "
                      "will fail: install nbdkit, or set VMREPLICA_NBDKIT",
                      nbdkit_bin());
    char out[4096];
    int rc = dump_plugin(nbdkit, path, out, sizeof out);
    if (rc != 0)
        return vr_err(-ENOEXEC,
                      "nbdkit plugin %s (%s): nbdkit cannot load "
                      "it: %s; " PLUGIN_HINT,
                      path, plugin_origin(),
                      rc < 0 ? strerror(errno) : nbdkit_reason(out));
    if (!strstr(out, "\nname=vmreplica\n"))
        return vr_err(-ENOEXEC,
                      "nbdkit plugin %s (%s): not the vmreplica "
                      "plugin; " PLUGIN_HINT,
                      path, plugin_origin());
    return 0;
}
