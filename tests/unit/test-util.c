/* test-util.c: unit tests of lib/util.c — names, sizes, durations, UUIDs,
 * the error slot and the small-file helpers.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tap.h"
#include "vr.h"

static void
test_names(void)
{
    char n64[65], n65[66];
    memset(n64, 'a', 64);
    n64[64] = '\0';
    memset(n65, 'a', 65);
    n65[65] = '\0';

    ok(vr_name_valid("web01"), "plain name valid");
    ok(vr_name_valid("my vm_2.disk-0"), "space, dot, underscore, dash valid");
    ok(vr_name_valid("a"), "one char valid");
    ok(vr_name_valid(n64), "64 chars valid");
    ok(!vr_name_valid(n65), "65 chars invalid");
    ok(!vr_name_valid(""), "empty invalid");
    ok(!vr_name_valid(".."), "\"..\" invalid");
    ok(!vr_name_valid("."), "\".\" invalid");
    ok(!vr_name_valid(".hidden"), "leading dot invalid");
    ok(!vr_name_valid(" x"), "leading space invalid");
    ok(!vr_name_valid("a/b"), "slash invalid");
    ok(!vr_name_valid("/"), "\"/\" invalid");
    ok(!vr_name_valid("a\nb"), "newline invalid");
    ok(!vr_name_valid("a:b"), "colon invalid");
    ok(!vr_name_valid("caf\xc3\xa9"), "non-ASCII invalid");

    char q[VR_QNAME_MAX];
    ok(strcmp(vr_qname("web-01.a_b", q), "web-01.a_b") == 0,
       "qname: a plain name is shown as is");
    ok(strcmp(vr_qname("my vm", q), "'my vm'") == 0,
       "qname: a name with a space is quoted");
    ok(strcmp(vr_qname("", q), "''") == 0, "qname: empty is quoted");
    ok(strlen(vr_qname(n64, q)) == 64, "qname: 64 chars fit");
    n64[3] = ' ';
    ok(strlen(vr_qname(n64, q)) == 66, "qname: 64 chars with a space fit");
}

static void
test_sizes(void)
{
    uint64_t v = 0;
    ok(vr_parse_size("512", &v) == 0 && v == 512, "size 512");
    ok(vr_parse_size("0", &v) == 0 && v == 0, "size 0");
    ok(vr_parse_size("64K", &v) == 0 && v == 65536, "size 64K");
    ok(vr_parse_size("64k", &v) == 0 && v == 65536, "size 64k");
    ok(vr_parse_size("1M", &v) == 0 && v == 1048576, "size 1M");
    ok(vr_parse_size("4G", &v) == 0 && v == 4ull << 30, "size 4G");
    ok(vr_parse_size("2T", &v) == 0 && v == 2ull << 40, "size 2T");
    ok(vr_parse_size("1GiB", &v) == 0 && v == 1ull << 30, "size 1GiB");
    is_int(vr_parse_size("", &v), -EINVAL, "empty size");
    is_int(vr_parse_size("-1", &v), -EINVAL, "negative size");
    is_int(vr_parse_size("1X", &v), -EINVAL, "unknown unit");
    is_int(vr_parse_size("M", &v), -EINVAL, "unit without number");
    is_int(vr_parse_size("1 M", &v), -EINVAL, "space inside");
    is_int(vr_parse_size("12M3", &v), -EINVAL, "trailing digits");
    ok(vr_parse_size("99999999999999999999", &v) < 0, "overflow refused");
    is_int(vr_parse_size("16777216T", &v), -ERANGE, "shift overflow refused");
    ok(vr_parse_size("16777215T", &v) == 0 && v == 16777215ull << 40,
       "largest T");
}

static void
test_durations(void)
{
    uint64_t s = 0;
    ok(vr_parse_duration("30s", &s) == 0 && s == 30, "30s");
    ok(vr_parse_duration("30", &s) == 0 && s == 30, "plain seconds");
    ok(vr_parse_duration("5m", &s) == 0 && s == 300, "5m");
    ok(vr_parse_duration("15m", &s) == 0 && s == 900, "15m");
    ok(vr_parse_duration("2h", &s) == 0 && s == 7200, "2h");
    ok(vr_parse_duration("0", &s) == 0 && s == 0, "zero");
    is_int(vr_parse_duration("", &s), -EINVAL, "empty duration");
    is_int(vr_parse_duration("-5s", &s), -EINVAL, "negative duration");
    is_int(vr_parse_duration("5d", &s), -EINVAL, "unknown unit d");
    is_int(vr_parse_duration("s", &s), -EINVAL, "unit alone");
    is_int(vr_parse_duration("5ms", &s), -EINVAL, "trailing garbage");
    is_int(vr_parse_duration("99999999999h", &s), -EINVAL, "huge refused");
}

static void
test_uuids(void)
{
    char a[37], b[37];
    vr_uuid_new(a);
    vr_uuid_new(b);
    is_int(strlen(a), 36, "uuid length");
    ok(vr_uuid_valid(a), "new uuid valid: %s", a);
    ok(strcmp(a, b) != 0, "two uuids differ");
    ok(a[14] == '4', "version 4");
    ok(strchr("89ab", a[19]) != NULL, "RFC 4122 variant");
    ok(vr_uuid_valid("123e4567-e89b-42d3-a456-426614174000"), "valid text");
    ok(!vr_uuid_valid("123E4567-E89B-42D3-A456-426614174000"),
       "uppercase not canonical");
    ok(!vr_uuid_valid("123e4567e89b42d3a456426614174000"), "no dashes");
    ok(!vr_uuid_valid("123e4567-e89b-42d3-a456-42661417400"), "too short");
    ok(!vr_uuid_valid("123e4567-e89b-42d3-a456-4266141740000"), "too long");
    ok(!vr_uuid_valid("123e4567-e89b-42d3-a456_426614174000"), "bad dash");
    ok(!vr_uuid_valid("g23e4567-e89b-42d3-a456-426614174000"), "bad hex");
    ok(!vr_uuid_valid(""), "empty");
}

static void
test_errors(void)
{
    vr_err_clear();
    is_str(vr_errmsg(), "", "cleared slot empty");
    errno = EAGAIN;
    is_int(vr_err(-EIO, "open %s: %d", "x", 5), -EIO, "vr_err returns rc");
    is_int(errno, EAGAIN, "vr_err keeps errno");
    is_str(vr_errmsg(), "open x: 5", "message stored");
    /* Wrapping the previous message in a new one. */
    vr_err(-EIO, "wrapped (%s) twice: %s", vr_errmsg(), vr_errmsg());
    is_str(vr_errmsg(), "wrapped (open x: 5) twice: open x: 5",
           "a message may wrap vr_errmsg() itself");
    is_str(vr_errname(EBADMSG), "EBADMSG", "errno name");
    is_str(vr_errname(99999), "E?", "unknown errno name");
}

static void
test_files(void)
{
    char dir[] = "/tmp/test-util.XXXXXX";
    if (!mkdtemp(dir))
        abort();
    char *path = xasprintf("%s/sub/dir", dir);
    is_int(io_mkdir_p(path, 0755), 0, "mkdir -p");
    is_int(io_mkdir_p(path, 0755), 0, "mkdir -p again");
    free(path);

    path = xasprintf("%s/sub/file.json", dir);
    const char text[] = "{\"hello\": 1}\n";
    is_int(io_write_file_atomic(path, text, sizeof text - 1), 0,
           "atomic write");
    char *tmp = xasprintf("%s.tmp", path);
    ok(access(tmp, F_OK) < 0, "no temporary left behind");
    free(tmp);

    char *buf = NULL;
    size_t len = 0;
    is_int(io_read_file(path, 100, &buf, &len), 0, "read back");
    ok(buf && len == sizeof text - 1 && strcmp(buf, text) == 0,
       "content and NUL terminator");
    free(buf);
    buf = NULL;
    is_int(io_read_file(path, sizeof text - 1, &buf, &len), 0,
           "read with max == size");
    free(buf);
    buf = NULL;
    is_int(io_read_file(path, 4, &buf, &len), -EFBIG, "larger than max");
    ok(buf == NULL, "no buffer on error");
    ok(strstr(vr_errmsg(), "larger than") != NULL, "message says why: %s",
       vr_errmsg());

    is_int(io_write_file_atomic(path, "x", 1), 0, "atomic overwrite");
    is_int(io_read_file(path, 100, &buf, &len), 0, "read overwritten");
    ok(len == 1 && buf[0] == 'x', "old content replaced");
    free(buf);
    buf = NULL;

    is_int(io_write_file_atomic(path, "", 0), 0, "empty file");
    is_int(io_read_file(path, 0, &buf, &len), 0, "read empty with max 0");
    ok(len == 0 && buf && buf[0] == '\0', "empty content");
    free(buf);
    buf = NULL;

    char *missing = xasprintf("%s/nope", dir);
    is_int(io_read_file(missing, 10, &buf, &len), -ENOENT, "missing file");
    free(missing);
    char *baddir = xasprintf("%s/nodir/file", dir);
    ok(io_write_file_atomic(baddir, "x", 1) < 0, "write into missing dir");
    free(baddir);

    /* Full-length helpers. */
    int fd = open(path, O_RDWR);
    static uint8_t w[10000], r[10000];
    for (size_t i = 0; i < sizeof w; i++)
        w[i] = (uint8_t)(i * 7);
    is_int(io_pwrite_all(fd, w, sizeof w, 100), 0, "pwrite_all");
    is_int(io_pread_all(fd, r, sizeof r, 100), 0, "pread_all");
    ok(memcmp(w, r, sizeof w) == 0, "round trip");
    is_int(io_pread_all(fd, r, sizeof r, 200), -ENODATA,
           "short read at EOF is -ENODATA");
    close(fd);
    is_int(io_fsync_dir(dir), 0, "fsync dir");

    char *cmd = xasprintf("rm -rf %s", dir);
    if (system(cmd) != 0)
        abort();
    free(cmd);
    free(path);
}

static void
test_misc(void)
{
    char ts[32];
    vr_rfc3339(0, ts);
    is_str(ts, "1970-01-01T00:00:00Z", "rfc3339 epoch");
    vr_rfc3339(1795496400000ull, ts);
    is_str(ts, "2026-11-24T05:00:00Z", "rfc3339 2026");
    uint64_t ms = 0;
    ok(vr_parse_rfc3339("2026-11-24T05:00:00Z", &ms) == 0 &&
           ms == 1795496400000ull, "parse rfc3339 back");
    ok(vr_parse_rfc3339("2026-11-24 06:30:00.25+01:30", &ms) == 0 &&
           ms == 1795496400000ull, "parse rfc3339: space, fraction, offset");
    ok(vr_parse_rfc3339("2026-11-24T03:00:00-02:00", &ms) == 0 &&
           ms == 1795496400000ull, "parse rfc3339: negative offset");
    ok(vr_parse_rfc3339("2026-11-24T05:00:00", &ms) == -EINVAL,
       "parse rfc3339: no zone refused");
    ok(vr_parse_rfc3339("2026-13-24T05:00:00Z", &ms) == -EINVAL,
       "parse rfc3339: month 13 refused");
    ok(vr_parse_rfc3339("2026-11-24T05:00:00Zjunk", &ms) == -EINVAL,
       "parse rfc3339: trailing junk refused");
    ok(vr_parse_rfc3339("07:30", &ms) == -EINVAL,
       "parse rfc3339: HH:MM is not one");
    uint64_t a = vr_mono_ms(), b = vr_mono_ms();
    ok(b >= a, "monotonic clock");
    ok(vr_wall_ms() > 1600000000000ull, "wall clock plausible");
    char *s = xasprintf("%d-%s", 42, "x");
    is_str(s, "42-x", "xasprintf");
    char *t = TAKE_PTR(s);
    ok(s == NULL && t != NULL, "TAKE_PTR moves ownership");
    free(t);
}

static void
test_fqdn(void)
{
    static const struct {
        const char *pattern, *name;
        bool match;
    } cases[] = {
        /* SPEC §6's wildcard edge cases */
        { "*.example.com", "a.example.com", true },
        { "*.example.com", "A.Example.COM", true },
        { "*.example.com", "example.com", false },
        { "*.example.com", "a.b.example.com", false },
        { "*.example.com", "badexample.com", false },
        { "*.example.com", "example.com.evil.net", false },
        { "*.example.com", "a.example.com.", false },
        { "*.example.com", ".example.com", false },
        { "primary.example.com", "primary.example.com", true },
        { "primary.example.com", "PRIMARY.example.com", true },
        { "primary.example.com", "primary.example.co", false },
        { "primary.example.com", "xprimary.example.com", false },
        /* patterns that are not allowed match nothing */
        { "*", "a", false },
        { "*.", "a.", false },
        { "a*.example.com", "ab.example.com", false },
        { "foo.*.com", "foo.x.com", false },
        { "**.example.com", "a.example.com", false },
        { "*.*.example.com", "a.b.example.com", false },
        { "", "", false },
        /* names that are not host names */
        { "*.example.com", "a b.example.com", false },
        { "*.example.com", "-a.example.com", false },
        { "*.example.com", "a-.example.com", false },
        { "*.example.com", "a..example.com", false },
        { "*.example.com", "a/../example.com", false },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++)
        ok(vr_fqdn_match(cases[i].pattern, cases[i].name) == cases[i].match,
           "match('%s', '%s') is %s", cases[i].pattern, cases[i].name,
           cases[i].match ? "true" : "false");
    char label[80], longname[300];
    memset(label, 'a', 63);
    label[63] = '\0';
    ok(vr_fqdn_valid(label), "a 63-byte label is valid");
    memset(label, 'a', 64);
    label[64] = '\0';
    ok(!vr_fqdn_valid(label), "a 64-byte label is not");
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    for (size_t i = 63; i < sizeof longname - 1; i += 64)
        longname[i] = '.';
    longname[253] = '\0';
    ok(vr_fqdn_valid(longname) == (longname[252] != '.'),
       "253 bytes of labels are valid");
    longname[253] = 'a';
    longname[254] = '\0';
    ok(!vr_fqdn_valid(longname), "254 bytes are not");
    ok(vr_fqdn_pattern_valid("*.example.com"), "*.example.com is a pattern");
    ok(!vr_fqdn_pattern_valid("*example.com"), "*example.com is not");
    ok(!vr_fqdn_pattern_valid(NULL), "NULL is not");
}

/* io_open_beneath: a file beneath a directory, never through a link. */
static void
beneath_cases(const char *mode_name)
{
    char dir[] = "/tmp/test-beneath.XXXXXX";
    char out[] = "/tmp/test-outside.XXXXXX";
    if (!mkdtemp(dir) || !mkdtemp(out))
        abort();
    char *p = xasprintf("%s/a/b", dir);
    if (io_mkdir_p(p, 0755) < 0)
        abort();
    free(p);
    p = xasprintf("%s/a/b/file", dir);
    VR_IGNORE(io_write_file_atomic(p, "inside", 6));
    free(p);
    char *secret = xasprintf("%s/secret", out);
    VR_IGNORE(io_write_file_atomic(secret, "outside", 7));
    int root = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0)
        abort();

    /* Normal files: read, create, directories. */
    int fd = io_open_beneath(root, "a/b/file", O_RDONLY, 0);
    char buf[16] = "";
    ok(fd >= 0 && read(fd, buf, sizeof buf) == 6 &&
       memcmp(buf, "inside", 6) == 0, "%s: a/b/file opened and read",
       mode_name);
    ok(fd < 0 || (fcntl(fd, F_GETFD) & FD_CLOEXEC), "%s: close-on-exec",
       mode_name);
    if (fd >= 0)
        close(fd);
    fd = io_open_beneath(root, "a/b/new", O_RDWR | O_CREAT | O_EXCL, 0640);
    ok(fd >= 0, "%s: a/b/new created", mode_name);
    struct stat st;
    ok(fd >= 0 && fstat(fd, &st) == 0 && (st.st_mode & 0777) == 0640,
       "%s: created with its mode", mode_name);
    if (fd >= 0)
        close(fd);
    is_int(io_open_beneath(root, "a/b/new", O_RDWR | O_CREAT | O_EXCL, 0640),
           -EEXIST, "%s: O_EXCL on an existing file", mode_name);
    fd = io_open_beneath(root, "a//b/", O_RDONLY | O_DIRECTORY, 0);
    ok(fd >= 0, "%s: a//b/ as a directory", mode_name);
    if (fd >= 0)
        close(fd);
    is_int(io_open_beneath(root, "a/missing", O_RDONLY, 0), -ENOENT,
           "%s: missing file", mode_name);

    /* A symbolic link at the last component: to a file outside, to one
     * inside, dangling (O_CREAT must not create its target). */
    p = xasprintf("%s/a/b/link", dir);
    if (symlink(secret, p) < 0)
        abort();
    free(p);
    is_int(io_open_beneath(root, "a/b/link", O_RDWR, 0), -ELOOP,
           "%s: link at the last component refused", mode_name);
    ok(strstr(vr_errmsg(), "a/b/link") && strstr(vr_errmsg(), "symbolic"),
       "%s: message names it: %s", mode_name, vr_errmsg());
    is_int(io_open_beneath(root, "a/b/link", O_RDWR | O_CREAT | O_TRUNC, 0640),
           -ELOOP, "%s: O_CREAT|O_TRUNC through a link refused", mode_name);
    p = xasprintf("%s/a/b/inlink", dir);
    if (symlink("file", p) < 0)
        abort();
    free(p);
    is_int(io_open_beneath(root, "a/b/inlink", O_RDONLY, 0), -ELOOP,
           "%s: even a link that stays inside is refused", mode_name);
    char *dangling_target = xasprintf("%s/created", out);
    p = xasprintf("%s/a/b/dangling", dir);
    if (symlink(dangling_target, p) < 0)
        abort();
    free(p);
    is_int(io_open_beneath(root, "a/b/dangling", O_WRONLY | O_CREAT, 0640),
           -ELOOP, "%s: O_CREAT on a dangling link refused", mode_name);
    ok(access(dangling_target, F_OK) < 0 && errno == ENOENT,
       "%s: nothing created outside", mode_name);
    free(dangling_target);

    /* A symbolic link at a middle component (to a directory outside). */
    p = xasprintf("%s/a/mid", dir);
    if (symlink(out, p) < 0)
        abort();
    free(p);
    is_int(io_open_beneath(root, "a/mid/secret", O_RDWR, 0), -ELOOP,
           "%s: link at a middle component refused", mode_name);
    is_int(io_open_beneath(root, "a/mid/new", O_RDWR | O_CREAT, 0640), -ELOOP,
           "%s: create beneath a linked directory refused", mode_name);
    is_int(io_open_beneath(root, "a/mid", O_RDONLY | O_DIRECTORY, 0), -ELOOP,
           "%s: a linked directory itself refused", mode_name);

    /* Out of the directory: "..", absolute paths, empty. */
    is_int(io_open_beneath(root, "../outside", O_RDONLY, 0), -EXDEV,
           "%s: '..' refused", mode_name);
    is_int(io_open_beneath(root, "a/../a/b/file", O_RDONLY, 0), -EXDEV,
           "%s: '..' refused even when it stays inside", mode_name);
    is_int(io_open_beneath(root, secret, O_RDONLY, 0), -EXDEV,
           "%s: absolute path refused", mode_name);
    is_int(io_open_beneath(root, "", O_RDONLY, 0), -EINVAL,
           "%s: empty path refused", mode_name);

    /* The outside file is as it was. */
    char *got = NULL;
    size_t len = 0;
    ok(io_read_file(secret, 100, &got, &len) == 0 && len == 7 &&
       memcmp(got, "outside", 7) == 0, "%s: the file outside is unchanged",
       mode_name);
    free(got);
    close(root);
    char *cmd = xasprintf("rm -rf '%s' '%s'", dir, out);
    VR_IGNORE(system(cmd));
    free(cmd);
    free(secret);
}

static void
test_beneath(void)
{
    beneath_cases("openat2");
    io_beneath_force_fallback(true);
    beneath_cases("walk");
    io_beneath_force_fallback(false);
}

/* io_lock_file: one holder at a time, the holder's pid told, released
 * with the last copy of the open file, never through a symbolic link. */
static void
test_lock(void)
{
    char dir[] = "/tmp/test-util-lock.XXXXXX";
    if (!mkdtemp(dir))
        abort();
    char *path = xasprintf("%s/x.lock", dir);
    int fd = -1, fd2 = -1;
    pid_t holder = -1;
    is_int(io_lock_file(path, &fd, &holder), 0, "lock a new lock file");
    is_int(io_lock_note_pid(fd, 4242), 0, "note the holder's pid");
    is_int(io_lock_file(path, &fd2, &holder), -EWOULDBLOCK,
           "a second open file does not get it");
    is_int(holder, 4242, "the holder's pid is told");
    ok(strstr(vr_errmsg(), "(pid 4242)") != NULL, "message: %s", vr_errmsg());
    int dup_fd = dup(fd);
    close(fd);
    is_int(io_lock_file(path, &fd2, &holder), -EWOULDBLOCK,
           "held while a copy of the open file is");
    close(dup_fd);
    is_int(io_lock_file(path, &fd2, &holder), 0, "free once all are closed");
    char *buf = NULL;
    is_int(io_read_file(path, 100, &buf, NULL), 0, "read the lock file");
    is_str(buf, "4242\n", "the previous holder's pid stays until replaced");
    free(buf);
    close(fd2);
    char *link = xasprintf("%s/link.lock", dir);
    if (symlink(path, link) < 0)
        abort();
    is_int(io_lock_file(link, &fd, &holder), -ELOOP,
           "a symbolic link is not followed");
    unlink(link);
    unlink(path);
    rmdir(dir);
    free(link);
    free(path);
}

int
main(void)
{
    plan_no_plan();
    test_names();
    test_sizes();
    test_durations();
    test_uuids();
    test_errors();
    test_files();
    test_beneath();
    test_misc();
    test_fqdn();
    test_lock();
    return done_testing();
}
