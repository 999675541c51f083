/* dirtymap.c: see dirtymap.h.
 *
 * File (docs/formats.md §7), little-endian:
 *   0  "VRDIRTY1"   8 magic
 *   8  size        u64 disk bytes
 *  16  grain_shift u32 (12..30)
 *  20  reserved    u32 0
 *  24  nbits       u64 = ceil(size / grain)
 *  32  crc         u32 CRC-32C of the file with this field zero
 *  36  reserved    u32 0
 *  40  bits        ceil(nbits / 64) u64 words, bit i of the map is bit
 *                  i % 64 of word i / 64; bits past nbits are zero
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"
#include "dirtymap.h"

static const char magic[8] = "VRDIRTY1";

static uint64_t
words_of(uint64_t nbits)
{
    return (nbits + 63) / 64;
}

int
dirtymap_init(struct dirtymap *m, uint64_t size, unsigned grain_shift)
{
    memset(m, 0, sizeof *m);
    if (size > DIRTY_SIZE_MAX || grain_shift < 12 || grain_shift > 30)
        return vr_err(-EINVAL, "dirty map of %llu bytes in grains of 2^%u",
                      (unsigned long long)size, grain_shift);
    m->size = size;
    m->grain_shift = grain_shift;
    m->nbits = (size + (1ull << grain_shift) - 1) >> grain_shift;
    m->bits = xcalloc(words_of(m->nbits) ? words_of(m->nbits) : 1,
                      sizeof *m->bits);
    return 0;
}

void
dirtymap_free(struct dirtymap *m)
{
    free(m->bits);
    memset(m, 0, sizeof *m);
}

void
dirtymap_mark(struct dirtymap *m, uint64_t off, uint64_t len)
{
    if (len == 0 || off >= m->size)
        return;
    if (len > m->size - off)
        len = m->size - off;
    uint64_t b0 = off >> m->grain_shift;
    uint64_t b1 = (off + len - 1) >> m->grain_shift;
    for (uint64_t b = b0; b <= b1; b++) {
        uint64_t bit = 1ull << (b % 64);
        /* Plain load first: a marked grain costs no locked instruction. */
        if (!(__atomic_load_n(&m->bits[b / 64], __ATOMIC_RELAXED) & bit))
            __atomic_fetch_or(&m->bits[b / 64], bit, __ATOMIC_RELAXED);
    }
}

void
dirtymap_mark_all(struct dirtymap *m)
{
    dirtymap_mark(m, 0, m->size);
}

void
dirtymap_clear(struct dirtymap *m)
{
    memset(m->bits, 0, words_of(m->nbits) * sizeof *m->bits);
}

bool
dirtymap_test(const struct dirtymap *m, uint64_t off)
{
    if (off >= m->size)
        return false;
    uint64_t b = off >> m->grain_shift;
    return __atomic_load_n(&m->bits[b / 64], __ATOMIC_RELAXED) &
           (1ull << (b % 64));
}

int
dirtymap_next(const struct dirtymap *m, uint64_t from, uint64_t *off,
              uint64_t *len)
{
    if (from >= m->size)
        return 0;
    uint64_t b = from >> m->grain_shift;
    while (b < m->nbits && !dirtymap_test(m, b << m->grain_shift)) {
        if (b % 64 == 0 && m->bits[b / 64] == 0)
            b += 64;
        else
            b++;
    }
    if (b >= m->nbits)
        return 0;
    uint64_t e = b;
    while (e < m->nbits && dirtymap_test(m, e << m->grain_shift))
        e++;
    uint64_t start = b << m->grain_shift;
    uint64_t end = e << m->grain_shift;
    if (start < from)
        start = from;
    if (end > m->size)
        end = m->size;
    *off = start;
    *len = end - start;
    return 1;
}

uint64_t
dirtymap_bytes(const struct dirtymap *m)
{
    uint64_t total = 0, off = 0, len;
    while (dirtymap_next(m, off, &off, &len)) {
        total += len;
        off += len;
    }
    return total;
}

/* CRC-32C of a whole file of len bytes, its own field taken as zero. */
static uint32_t
file_crc(const uint8_t *file, size_t len)
{
    uint8_t h[DIRTY_HDR_BYTES];
    memcpy(h, file, sizeof h);
    memset(h + 32, 0, 4);
    return crc32c(crc32c(0, h, sizeof h), file + DIRTY_HDR_BYTES,
                  len - DIRTY_HDR_BYTES);
}

int
dirtymap_save(const struct dirtymap *m, int dirfd, const char *name)
{
    uint64_t nwords = words_of(m->nbits);
    size_t len = DIRTY_HDR_BYTES + (size_t)nwords * 8;
    uint8_t *buf = xcalloc(len, 1);
    memcpy(buf, magic, sizeof magic);
    put_le64(buf + 8, m->size);
    put_le32(buf + 16, m->grain_shift);
    put_le64(buf + 24, m->nbits);
    for (uint64_t i = 0; i < nwords; i++)
        put_le64(buf + DIRTY_HDR_BYTES + 8 * i,
                 __atomic_load_n(&m->bits[i], __ATOMIC_RELAXED));
    put_le32(buf + 32, file_crc(buf, len));

    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", name);
    int rc = 0;
    int fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC |
                                    O_NOFOLLOW, 0644);
    if (fd < 0)
        rc = vr_err(-errno, "create %s: %m", tmp);
    if (rc == 0)
        rc = io_write_all(fd, buf, len);
    if (rc == 0 && fdatasync(fd) < 0)
        rc = -errno;
    if (fd >= 0 && close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && renameat(dirfd, tmp, dirfd, name) < 0)
        rc = -errno;
    if (rc == 0)
        rc = io_fsync_dirfd(dirfd);
    if (rc < 0) {
        if (fd >= 0)
            unlinkat(dirfd, tmp, 0);
        if (!vr_errmsg()[0])
            vr_err(rc, "save dirty map %s: %s", name, strerror(-rc));
    }
    free(buf);
    return rc;
}

int
dirtymap_decode(const void *buf, size_t len, uint64_t size,
                struct dirtymap *m)
{
    const uint8_t *p = buf;
    memset(m, 0, sizeof *m);
    if (len < DIRTY_HDR_BYTES || memcmp(p, magic, sizeof magic) != 0)
        return vr_err(-EBADMSG, "dirty map: not a dirty map");
    uint64_t fsize = get_le64(p + 8);
    uint32_t shift = get_le32(p + 16);
    uint64_t nbits = get_le64(p + 24);
    if (fsize != size)
        return vr_err(-EBADMSG, "dirty map: of a disk of %llu bytes, not "
                      "%llu", (unsigned long long)fsize,
                      (unsigned long long)size);
    if (shift < 12 || shift > 30 || fsize > DIRTY_SIZE_MAX ||
        get_le32(p + 20) != 0 || get_le32(p + 36) != 0 ||
        nbits != (fsize + (1ull << shift) - 1) >> shift)
        return vr_err(-EBADMSG, "dirty map: bad header");
    uint64_t nwords = words_of(nbits);
    if ((len - DIRTY_HDR_BYTES) / 8 != nwords ||
        (len - DIRTY_HDR_BYTES) % 8 != 0)
        return vr_err(-EBADMSG, "dirty map: %zu bytes, want %llu", len,
                      (unsigned long long)(DIRTY_HDR_BYTES + nwords * 8));
    int rc = dirtymap_init(m, fsize, shift);
    if (rc < 0)
        return rc;
    for (uint64_t i = 0; i < nwords; i++)
        m->bits[i] = get_le64(p + DIRTY_HDR_BYTES + 8 * i);
    if (nbits % 64 && (m->bits[nwords - 1] >> (nbits % 64)) != 0)
        rc = vr_err(-EBADMSG, "dirty map: bits past the end of the disk");
    else if (file_crc(p, len) != get_le32(p + 32))
        rc = vr_err(-EBADMSG, "dirty map: checksum mismatch");
    if (rc < 0)
        dirtymap_free(m);
    return rc;
}

int
dirtymap_load(int dirfd, const char *name, uint64_t size, struct dirtymap *m)
{
    memset(m, 0, sizeof *m);
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return vr_err(-errno, "open %s: %m", name);
    struct stat st;
    uint64_t want = size > DIRTY_SIZE_MAX ? 0 :
        DIRTY_HDR_BYTES + words_of((size + 4095) >> 12) * 8;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        (uint64_t)st.st_size > want) {
        close(fd);
        return vr_err(-EBADMSG, "dirty map %s: not a regular file of at most "
                      "%llu bytes", name, (unsigned long long)want);
    }
    size_t len = (size_t)st.st_size;
    uint8_t *buf = xmalloc(len ? len : 1);
    int rc = io_pread_all(fd, buf, len, 0);
    close(fd);
    if (rc == 0)
        rc = dirtymap_decode(buf, len, size, m);
    else
        vr_err(rc, "read %s: %s", name, strerror(-rc));
    free(buf);
    return rc;
}

/* --- the tracking marker ------------------------------------------------ */

#define MARK_TRACKING "vmreplica tracking\n"
#define MARK_STOPPED  "vmreplica stopped "
#define MARK_SERVED   "served "

static int
marker_put(int fd, const char *buf)
{
    int rc = io_pwrite_all(fd, buf, TRACKING_BYTES, 0);
    if (rc == 0 && fdatasync(fd) < 0)
        rc = -errno;
    if (rc < 0)
        return vr_err(rc, "tracking marker: %s", strerror(-rc));
    return 0;
}

int
tracking_marker_write(int fd, bool stopped, uint64_t cycle, const char *why)
{
    char buf[TRACKING_BYTES];
    memset(buf, 0, sizeof buf);
    if (stopped)
        snprintf(buf, sizeof buf, MARK_STOPPED "%llu\n%s\n",
                 (unsigned long long)cycle, why ? why : "");
    else
        snprintf(buf, sizeof buf, MARK_TRACKING);
    return marker_put(fd, buf);
}

int
tracking_marker_served(int fd, const char *boot)
{
    char buf[TRACKING_BYTES];
    memset(buf, 0, sizeof buf);
    snprintf(buf, sizeof buf, MARK_TRACKING MARK_SERVED "%.64s\n", boot);
    return marker_put(fd, buf);
}

/* The marker's text, NUL-terminated, in buf[TRACKING_BYTES + 1]. */
static int
marker_get(int fd, char *buf)
{
    ssize_t got = pread(fd, buf, TRACKING_BYTES, 0);
    if (got < 0)
        return vr_err(-errno, "read %s: %m", TRACKING_NAME);
    buf[got] = '\0';
    return 0;
}

/* If buf is a "tracking" marker: what follows its first line. */
static const char *
tracking_rest(const char *buf)
{
    size_t n = strlen(MARK_TRACKING);
    return strncmp(buf, MARK_TRACKING, n) == 0 ? buf + n : NULL;
}

int
tracking_marker_boot(int fd, char *boot, size_t n)
{
    char buf[TRACKING_BYTES + 1];
    int rc = marker_get(fd, buf);
    if (rc < 0)
        return rc;
    const char *rest = tracking_rest(buf);
    boot[0] = '\0';
    if (!rest || strncmp(rest, MARK_SERVED, strlen(MARK_SERVED)) != 0)
        return 0;
    rest += strlen(MARK_SERVED);
    size_t len = strcspn(rest, "\n");
    snprintf(boot, n, "%.*s", (int)len, rest);
    return 0;
}

int
vr_boot_id(char out[40])
{
    const char *t = getenv("VMREPLICA_TEST_BOOT_ID");
    if (t && *t) {
        snprintf(out, 40, "%.39s", t);
        return 0;
    }
    char buf[64];
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return vr_err(-EIO, "cannot read the boot id");
    buf[n] = '\0';
    buf[strcspn(buf, "\n")] = '\0';
    snprintf(out, 40, "%.39s", buf);
    return 0;
}

int
tracking_marker_open(int dirfd, int *fd)
{
    *fd = openat(dirfd, TRACKING_NAME, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (*fd >= 0)
        return 0;
    if (errno != ENOENT)
        return vr_err(-errno, "open %s: %m", TRACKING_NAME);
    *fd = openat(dirfd, TRACKING_NAME,
                 O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (*fd < 0)
        return vr_err(-errno, "create %s: %m", TRACKING_NAME);
    int rc = tracking_marker_write(*fd, false, 0, NULL);
    if (rc == 0)
        rc = io_fsync_dirfd(dirfd);
    if (rc < 0) {
        close(*fd);
        *fd = -1;
    }
    return rc;
}

int
tracking_marker_read(int fd, bool *stopped, uint64_t *cycle, char *why,
                     size_t n)
{
    char buf[TRACKING_BYTES + 1];
    int rc = marker_get(fd, buf);
    if (rc < 0)
        return rc;
    *stopped = false;
    *cycle = 0;
    if (n)
        why[0] = '\0';
    const char *rest = tracking_rest(buf);
    if (rest && (!*rest || strncmp(rest, MARK_SERVED, strlen(MARK_SERVED)) == 0))
        return 0;
    if (strncmp(buf, MARK_STOPPED, strlen(MARK_STOPPED)) != 0)
        return vr_err(-EBADMSG, "%s says neither tracking nor stopped",
                      TRACKING_NAME);
    char *p = buf + strlen(MARK_STOPPED), *end;
    errno = 0;
    unsigned long long c = strtoull(p, &end, 10);
    if (errno || end == p || *end != '\n')
        return vr_err(-EBADMSG, "%s: bad cycle", TRACKING_NAME);
    char *msg = end + 1, *nl = strchr(msg, '\n');
    if (nl)
        *nl = '\0';
    if (n)
        snprintf(why, n, "%s", msg);
    *stopped = true;
    *cycle = c;
    return 0;
}
