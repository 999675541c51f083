/* proc-int.h: what vmproc.c uses of spawn.c — running processes, their
 * pid files, unix sockets and line protocols, and the tail of a log. */
#ifndef VR_PROC_INT_H
#define VR_PROC_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "plugin.h" /* plugin_path */
#include "vr.h"

/* A NULL-terminated argv being built; argv_fini frees it. */
struct argv {
    char **v;
    size_t n, cap;
};

/* A buffered reader of lines from fd. */
#define LINE_MAX_BYTES (256 * 1024)
struct linebuf {
    int fd;
    size_t len;
    char buf[LINE_MAX_BYTES];
};

/* Resolve a program name through $PATH before fork(): execvp() is not
 * async-signal-safe.  Caller frees. */
char *resolve_bin(const char *name);
/* $VMREPLICA_NBDKIT, or "nbdkit". */
const char *nbdkit_bin(void);
/* Append a copy of s. */
void argv_addf(struct argv *a, const char *s);
/* Append owned (takes ownership). */
void argv_add(struct argv *a, char *owned);
/* The size of path, 0 if it cannot be read. */
off_t file_size(const char *path);
/* Double-fork argv (argv[0] resolved) into its own session with output to
 * logpath, inherit_fd (-1: none) left open in it.  *pid_out is the
 * grandchild's pid.  Fails if exec fails. */
int spawn_detached(const char *bin, char *const argv[], const char *logpath,
                   int inherit_fd, pid_t *pid_out);
/* Free the vector and its strings. */
void argv_fini(struct argv *a);
/* Prefix the message already in the error slot (which vr_err() cannot read
 * while it writes it). */
int VR_PRINTF(2, 3) err_wrap(int rc, const char *fmt, ...);
/* The pid in a pid file, or 0 if the file is missing or malformed. */
pid_t read_pidfile(const char *path);
/* Whether path is a unix socket. */
bool is_socket(const char *path);
/* Whether a unix socket at path accepts a connection. */
bool sock_accepts(const char *path);
/* Alive and not a zombie (the process is init's child once it is ours no
 * more; init may not have reaped it yet). */
bool pid_running(pid_t pid);
/* How a process that is not our child ended, while it is still a zombie
 * (init has not reaped it yet): /proc/PID/stat's last field is its status
 * as waitpid() reports it.  "" if that cannot be known any more. */
void death_of(pid_t pid, char *out, size_t n);
/* SIGTERM (unless sig is SIGKILL already), wait, then SIGKILL and wait. */
int terminate(pid_t pid, int sig, unsigned timeout_ms, const char *what);
/* The last few lines written to a log since offset from, joined with "; "
 * so they fit a one-line error message.  Caller frees. */
char *log_tail(const char *path, off_t from);
/* The live nbdkit of rundir, or 0. */
pid_t nbdkit_pid(const char *rundir);
/* $VMREPLICA_QEMU, or "qemu-system-x86_64". */
const char *qemu_bin(void);
/* QEMU's option parser splits on ',' and takes ",," as a literal comma. */
char *qemu_escape(const char *s);
/* The live QEMU of rundir, or 0. */
pid_t qemu_pid(const char *rundir);
/* Connect to the unix socket at path: 0 and *fd_out, or -errno. */
int unix_connect(const char *path, int *fd_out);
/* Read one '\n'-terminated line (without it) into out before the deadline. */
int read_line(struct linebuf *lb, char *out, size_t cap, uint64_t deadline_ms);
/* Write all of s to fd: 0 or -errno. */
int send_all(int fd, const char *s);
/* Wait until pid is gone; true if it went within timeout_ms. */
bool wait_gone(pid_t pid, unsigned timeout_ms);
/* Run bin (argv) in a child as spawn_detached sets it up (default
 * signals, stdin from /dev/null, output appended to logpath, every fd
 * closed but inherit_fd) and wait up to timeout_ms for it to exit: 0 with its
 * wait status in *status (-1 if waiting failed) and exec's errno in
 * *exec_errno (0: it ran); -ETIMEDOUT (killed, no message); or -errno of
 * the pipe or fork, with the message "WHAT: pipe|fork: ...". */
int spawn_wait(const char *bin, char *const argv[], const char *logpath,
               int inherit_fd, unsigned timeout_ms, const char *what,
               int *exec_errno, int *status);

#endif
