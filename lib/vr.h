/* vr.h: common definitions shared by every part of vmreplica.
 *
 * Error convention (STYLE.md): fallible functions return 0 or a negative
 * errno; where a failure is first detected, vr_err() stores one message in a
 * thread-local slot and returns the code, and only the top levels print it.
 */
#ifndef VR_H
#define VR_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define VR_WUR       __attribute__((warn_unused_result))
#define VR_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define VR_UNUSED    __attribute__((unused))
#define likely(x)    __builtin_expect(!!(x), 1)
#define unlikely(x)  __builtin_expect(!!(x), 0)
/* Discard a warn_unused_result value on purpose (best-effort paths). */
#define VR_IGNORE(expr)                                                        \
    do {                                                                       \
        if ((expr) != 0) {                                                     \
        }                                                                      \
    } while (0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Store a formatted message for the calling thread; return rc unchanged. */
int vr_err(int rc, const char *fmt, ...) VR_PRINTF(2, 3);
/* The last message stored by vr_err() on this thread ("" if none). */
const char *vr_errmsg(void);
/* Clear this thread's message. */
void vr_err_clear(void);
/* Short symbolic name of a positive errno value ("EIO"); "E?" if unknown. */
const char *vr_errname(int errnum);

/* Allocation that aborts on out-of-memory (redis): the daemon restarts and
 * resumes from durable state. */
void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
char *xasprintf(const char *fmt, ...) VR_PRINTF(1, 2);

/* Hand ownership on: yields p and sets it to NULL. */
#define TAKE_PTR(p)                                                            \
    ({                                                                         \
        __typeof__(p) take_ptr_tmp_ = (p);                                     \
        (p) = NULL;                                                            \
        take_ptr_tmp_;                                                         \
    })

static inline void
vr_cleanup_free(void *p)
{
    extern void free(void *);
    free(*(void **)p);
}
#define CLEANUP_FREE __attribute__((cleanup(vr_cleanup_free)))

/* Full-length I/O helpers: retry on EINTR and short transfers.  Return 0 or
 * -errno (a short read at end of file is -ENODATA for pread_all). */
int io_pwrite_all(int fd, const void *buf, size_t len, off_t off) VR_WUR;
int io_pread_all(int fd, void *buf, size_t len, off_t off) VR_WUR;
int io_write_all(int fd, const void *buf, size_t len) VR_WUR;
/* Read up to len bytes; returns bytes read (< len only at EOF) or -errno. */
ssize_t io_read_full(int fd, void *buf, size_t len) VR_WUR;
/* fsync a directory by path or fd, so renames in it are durable. */
int io_fsync_dir(const char *path) VR_WUR;
int io_fsync_dirfd(int dirfd) VR_WUR;
/* Read a whole small file (at most max_bytes) into a NUL-terminated buffer;
 * caller frees *out. */
int io_read_file(const char *path, size_t max_bytes, char **out,
                 size_t *len_out) VR_WUR;
/* Write a file atomically: tmp, fsync, rename, fsync dir. */
int io_write_file_atomic(const char *path, const void *buf, size_t len) VR_WUR;
/* Take an exclusive flock(2) on the lock file path (created 0640 if
 * missing, never through a symbolic link), waiting at most 1 s: 0 and *fd
 * (close-on-exec; the lock lasts while any copy of that open file does,
 * across fork and exec too, and the kernel drops it when the last holder
 * dies).  -EWOULDBLOCK if another open file still holds it after 1 s,
 * *holder then being the pid written in the file by its holder (0 if none
 * within 1 s). */
int io_lock_file(const char *path, int *fd, pid_t *holder) VR_WUR;
/* Make a held lock file's content "PID\n" (who holds it, for messages). */
int io_lock_note_pid(int fd, pid_t pid) VR_WUR;
/* mkdir -p with mode; existing directories are fine. */
int io_mkdir_p(const char *path, mode_t mode) VR_WUR;
/* mkdir -p of ROOT/REL, every component of REL a real directory beneath
 * ROOT (a symbolic link, "." or ".." is refused: -ELOOP, -EINVAL). */
int io_mkdir_beneath(const char *root, const char *rel, mode_t mode) VR_WUR;
/* Open RELPATH beneath the directory rootfd as openat(2) would with flags
 * and mode (O_CLOEXEC added), but no component of RELPATH may be a symbolic
 * link (-ELOOP) and none may be ".." nor RELPATH absolute (-EXDEV): the
 * kernel's openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), or the same done
 * one component at a time with O_NOFOLLOW where openat2 is missing.  The
 * directory rootfd itself was opened by the caller (its own path may hold
 * links).  Returns the new fd or -errno. */
int io_open_beneath(int rootfd, const char *relpath, int flags,
                    mode_t mode) VR_WUR;
/* Tests: make io_open_beneath walk components even where openat2 works. */
void io_beneath_force_fallback(bool on);
/* Remove every entry of the open directory fd except "." ones (files
 * only: a subdirectory is left), then fsync it; fd is closed.  name is for
 * messages.  Returns the number removed or -errno (vr_err says why). */
int io_clear_dirfd(int fd, const char *name) VR_WUR;

/* Write-behind: count n more bytes written to fd and, every 8 MiB, start
 * the writeback of its dirty pages (sync_file_range WRITE, not waiting),
 * so that the fdatasync that makes the file durable finds little left and
 * the disk works while the writer does.  *pending is the caller's count,
 * starting at 0.  Only a hint: a failure is ignored (the fdatasync will
 * report the error that matters). */
void io_write_behind(int fd, uint64_t *pending, uint64_t n);

/* Clocks. */
uint64_t vr_mono_ms(void);
uint64_t vr_wall_ms(void);
/* Format wall-clock ms as RFC 3339 UTC ("2026-11-26T05:00:00Z"). */
void vr_rfc3339(uint64_t wall_ms, char out[32]);
/* Sleep ms milliseconds (restarted on EINTR). */
void vr_sleep_ms(unsigned ms);
/* Name the calling thread (what ps -L, top -H and perf show; at most 15
 * bytes are kept).  A thread otherwise inherits its creator's name, so a
 * shipper started from an API request would show as "MHD-connection". */
void vr_thread_name(const char *fmt, ...) VR_PRINTF(1, 2);
/* Test hooks: sleep as many milliseconds as environment variable env says,
 * if it says 1 .. max_ms - 1; else return at once. */
void vr_test_delay(const char *env, long max_ms);
/* Parse an RFC 3339 date-time (Z or a numeric offset) into wall-clock ms;
 * -EINVAL if it is not one. */
int vr_parse_rfc3339(const char *s, uint64_t *wall_ms) VR_WUR;

/* Names of VMs and disks: 1..64 chars of [A-Za-z0-9._ -], not starting with
 * '.' or ' ', so a name can never form a path component like "..". */
bool vr_name_valid(const char *name);
/* A name as messages show it, so that it can be pasted into a command: as
 * is, or in single quotes if it holds anything but [A-Za-z0-9._-] (a valid
 * name's only such character is the space).  Returns buf, or name itself
 * if it needs no quotes; a quoted name longer than cap is cut. */
#define VR_QNAME_MAX 80
const char *vr_qname(const char *name, char buf[VR_QNAME_MAX]);
/* A host name as certificates and Kerberos principals carry it: labels of
 * 1-63 of [A-Za-z0-9-] (not starting or ending with '-') joined by '.',
 * 253 bytes at most, no trailing dot. */
bool vr_fqdn_valid(const char *name);
/* An authorization entry's pattern: an FQDN, or "*." followed by one
 * (SPEC §6: '*' only as the whole first label). */
bool vr_fqdn_pattern_valid(const char *pattern);
/* Does a (valid) pattern match a peer's name?  Case-insensitive; "*"
 * stands for exactly one label: "*.example.com" matches "a.example.com",
 * not "example.com", "a.b.example.com", "badexample.com" or
 * "example.com.evil.net".  False if either is invalid. */
bool vr_fqdn_match(const char *pattern, const char *name);
/* Canonical textual UUID (36 chars, lowercase). */
bool vr_uuid_valid(const char *uuid);
/* New random v4 UUID in canonical form. */
void vr_uuid_new(char out[37]);

/* Parse sizes "512", "64K", "1M", "4G", "2T" (binary units); 0 or -EINVAL. */
int vr_parse_size(const char *s, uint64_t *out) VR_WUR;
/* Parse a duration "30s", "5m", "15m", "2h" or plain seconds into seconds. */
int vr_parse_duration(const char *s, uint64_t *out_s) VR_WUR;

/* Fault points for crash tests: VMREPLICA_FAULT="name:N[,name:N]" makes the
 * N-th hit of the point named raise SIGKILL (N counts from 1);
 * "name:N:pause=MS" makes that hit sleep MS milliseconds instead (the
 * thread stalls there, as on a slow disk).  Costs one branch when the
 * variable is unset. */
void vr_fault_point(const char *name);

/* Little-endian fields of the on-disk and wire formats. */
static inline void
put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void
put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t
get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline uint64_t
get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#endif /* VR_H */
