/* replica.c: the Replica server — the HTTPS listener with mutual X.509
 * authentication and the HTTP listener with Kerberos (krb.h), the
 * replication protocol's server side (docs/api.md,
 * "Replication protocol"), durable staging of cycles, and the applier that
 * applies staged cycles strictly in order.
 *
 * Crash safety: a cycle is received into staging/N.tmp, validated, fsynced
 * and renamed to staging/N.cycle before it is acknowledged; the applier
 * applies N.cycle to the disks, fdatasyncs them, and only then records N as
 * applied in the catalog and deletes the file.  A crash at any step is
 * repaired at start-up by applying N again from the start (idempotent), before
 * the management socket opens, so the disks are only ever seen at a cycle
 * boundary. */
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "cycle.h"
#include "daemon.h"
#include "net/http.h"
#include "net/krb.h"
#include "core/r1json.h"

#define R1_MAX_CYCLE_RAW (16ull << 30)
#define R1_MAX_BASE_RAW  (80ull << 20)

/* Verify the peer of an HTTPS connection: a certificate chaining to our CA,
 * valid now, with the clientAuth purpose.  0 and *identity (caller frees),
 * or -EACCES with the reason in vr_errmsg(). */
/* What a listener's requests need (the access handler's cls): the
 * Kerberos acceptor credential, or the certificate listener's revocation
 * list (with its CAs, to check it), if one is set. */
struct listener_ctx {
    bool kerberos;
    gss_cred_id_t cred;
    gnutls_x509_trust_list_t crl;
};

static int check_revoked(gnutls_x509_trust_list_t tl, const gnutls_datum_t *certs,
                         unsigned n);

static int
verify_peer(struct MHD_Connection *c, const struct listener_ctx *lc,
            char **identity)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    if (!ci || !ci->tls_session)
        return vr_err(-EACCES, "not a TLS connection");
    gnutls_session_t s = (gnutls_session_t)ci->tls_session;
    gnutls_typed_vdata_st vd = { .type = GNUTLS_DT_KEY_PURPOSE_OID,
                                 .data = (void *)GNUTLS_KP_TLS_WWW_CLIENT };
    unsigned status = 0;
    int r = gnutls_certificate_verify_peers(s, &vd, 1, &status);
    if (r == GNUTLS_E_NO_CERTIFICATE_FOUND)
        return vr_err(-EACCES, "no client certificate");
    if (r < 0)
        return vr_err(-EACCES, "client certificate: %s", gnutls_strerror(r));
    if (status != 0) {
        gnutls_datum_t out;
        char why[256] = "invalid";
        if (gnutls_certificate_verification_status_print(
                status, GNUTLS_CRT_X509, &out, 0) >= 0) {
            snprintf(why, sizeof why, "%s", out.data);
            gnutls_free(out.data);
        }
        return vr_err(-EACCES, "client certificate refused: %s", why);
    }
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);
    if (!certs || n == 0)
        return vr_err(-EACCES, "no client certificate");
    if (lc->crl && check_revoked(lc->crl, certs, n) < 0)
        return -EACCES;
    gnutls_x509_crt_t crt;
    gnutls_x509_crt_init(&crt);
    char *name = NULL;
    if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) >= 0)
        name = tls_crt_dns_name(crt);
    gnutls_x509_crt_deinit(crt);
    if (!name)
        return vr_err(-EACCES, "client certificate has no DNS name in its "
                               "subjectAltName");
    *identity = name;
    return 0;
}

/* "ip:port" of a peer's address. */
static void
sockaddr_str(const struct sockaddr *sa, char *out, size_t n)
{
    char host[64] = "?";
    unsigned port = 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
    }
    snprintf(out, n, "%s:%u", host, port);
}

/* The peer's chain against our CAs and their revocation list. */
static int
check_revoked(gnutls_x509_trust_list_t tl, const gnutls_datum_t *certs,
              unsigned n)
{
    if (n > 16)
        return vr_err(-EACCES, "client certificate chain of %u certificates",
                      n);
    gnutls_x509_crt_t crts[16];
    unsigned have = 0;
    int rc = 0;
    for (; have < n; have++) {
        gnutls_x509_crt_init(&crts[have]);
        if (gnutls_x509_crt_import(crts[have], &certs[have],
                                   GNUTLS_X509_FMT_DER) < 0) {
            have++;
            rc = vr_err(-EACCES, "client certificate: cannot parse it");
            break;
        }
    }
    unsigned status = 0;
    if (rc == 0) {
        gnutls_typed_vdata_st vd = { .type = GNUTLS_DT_KEY_PURPOSE_OID,
                                     .data = (void *)GNUTLS_KP_TLS_WWW_CLIENT };
        int r = gnutls_x509_trust_list_verify_crt2(tl, crts, n, &vd, 1, 0,
                                                   &status, NULL);
        if (r < 0)
            rc = vr_err(-EACCES, "client certificate: %s", gnutls_strerror(r));
        else if (status & GNUTLS_CERT_REVOKED)
            rc = vr_err(-EACCES, "client certificate refused: it is revoked "
                                 "(certificate revocation list)");
        else if (status != 0)
            rc = vr_err(-EACCES, "client certificate refused by the "
                                 "revocation check (status 0x%x)", status);
    }
    for (unsigned i = 0; i < have; i++)
        gnutls_x509_crt_deinit(crts[i]);
    return rc;
}

static void
peer_addr(struct MHD_Connection *c, char *out, size_t n)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    snprintf(out, n, "?");
    if (ci && ci->client_addr)
        sockaddr_str(ci->client_addr, out, n);
}

/* --- per-request state -------------------------------------------------- */

enum r1_kind { R1_STATUS, R1_REGISTER, R1_BASE, R1_INITIAL_DONE, R1_CYCLE,
               R1_REMOVE, R1_PREPARED, R1_TEST };

struct rreq {
    bool started;
    bool failed;
    int rc;
    char msg[512];
    enum r1_kind kind;
    char uuid[37];
    char peer[256];     /* the primary's name (certificate or principal) */
    char principal[300]; /* Kerberos: the client principal, for audit */
    char addr[80];      /* ip:port */
    uint64_t n;         /* cycle or base chunk number */
    uint64_t epoch;
    bool has_history;   /* X-Vmreplica-History: N/INTERVAL_S */
    unsigned history, interval_s;
    char *body;         /* JSON bodies */
    size_t len;
    struct cyc_decoder *dec;
    int fd;
    char *tmp_path;     /* STAGING/NAME.tmp, once we created it */
    char *staging;
    int stgfd;          /* the staging directory, opened beneath storage */
    char tmp_name[48];  /* NAME.tmp in stgfd */
    char *root;         /* the peer's storage location (authorization) */
    char *group;        /* the peer's trust group ("" none) */
    bool holds_busy;
    uint64_t disk_sizes[MAX_DISKS]; /* for the decoder's bounds checks */
    /* Server-wide limits (see "limits" below): the request memory this
     * request was charged, and its upload's claim on staging space. */
    uint64_t mem_charged;
    uint64_t buf_bytes, buf_allowance; /* the decoder's buffer, charged */
    struct space_claim {
        struct space_claim *next;
        dev_t dev;
        uint64_t claimed, written;
        unsigned factor; /* 2 for a base chunk: staged, then applied */
        bool linked;
    } claim;
    unsigned ndisks;
    struct MHD_Connection *conn;
    /* Kerberos mode: the request's context, SHA-256 of its plaintext body
     * (for the MIC check at the end) and, when wrapped, its frames. */
    bool krb;
    gss_ctx_id_t gss;
    gnutls_hash_hd_t hash;
    bool wrapped, unframe_failed;
    struct krb_unframer unf;
};

static void
rreq_fail(struct rreq *q, int rc, const char *msg)
{
    if (q->failed)
        return;
    q->failed = true;
    q->rc = rc;
    snprintf(q->msg, sizeof q->msg, "%s", msg);
}

static void guard_request(struct MHD_Connection *c, bool begin);
static void mem_release(struct rreq *q);
static void claim_unlink(struct rreq *q);

static void
rreq_done(void *cls VR_UNUSED, struct MHD_Connection *c,
          void **con_cls, enum MHD_RequestTerminationCode toe VR_UNUSED)
{
    struct rreq *q = *con_cls;
    *con_cls = NULL;
    if (!q)
        return;
    guard_request(c, false);
    cyc_decoder_free(q->dec);
    if (q->fd >= 0)
        close(q->fd);
    if (q->tmp_path) {
        unlinkat(q->stgfd, q->tmp_name, 0);
        free(q->tmp_path);
    }
    if (q->stgfd >= 0)
        close(q->stgfd);
    if (q->holds_busy) {
        pthread_mutex_lock(&D->lock);
        struct vm *vm = vm_find_uuid(q->uuid);
        if (vm && vm->repl)
            vm->repl->busy = false;
        pthread_mutex_unlock(&D->lock);
    }
    claim_unlink(q);
    free(q->staging);
    free(q->root);
    free(q->group);
    free(q->body);
    krb_ctx_free(&q->gss);
    if (q->hash)
        gnutls_hash_deinit(q->hash, NULL);
    krb_unframer_free(&q->unf);
    mem_release(q); /* every buffer of q is freed now */
    free(q);
}

/* Parse "/r1/vms/UUID[/rest]". */
static int
parse_url(const char *url, const char *method, struct rreq *q)
{
    static const char pre[] = "/r1/vms/";
    if (strcmp(url, "/r1/test") == 0 && strcmp(method, "GET") == 0) {
        q->kind = R1_TEST; /* server test-connection */
        return 0;
    }
    if (strncmp(url, pre, sizeof pre - 1) != 0)
        return vr_err(-ENOENT, "%s: not found", url);
    url += sizeof pre - 1;
    if (strlen(url) < 36)
        return vr_err(-EINVAL, "bad vm uuid in url");
    memcpy(q->uuid, url, 36);
    q->uuid[36] = '\0';
    if (!vr_uuid_valid(q->uuid))
        return vr_err(-EINVAL, "bad vm uuid in url");
    const char *rest = url + 36;
    char *end;
    if (*rest == '\0') {
        if (strcmp(method, "GET") == 0)
            q->kind = R1_STATUS;
        else if (strcmp(method, "PUT") == 0)
            q->kind = R1_REGISTER;
        else
            return vr_err(-EOPNOTSUPP, "method not allowed");
        return 0;
    }
    if (strcmp(rest, "/initial-complete") == 0 &&
        strcmp(method, "POST") == 0) {
        q->kind = R1_INITIAL_DONE;
        return 0;
    }
    if (strcmp(rest, "/replication") == 0 && strcmp(method, "DELETE") == 0) {
        q->kind = R1_REMOVE;
        return 0;
    }
    if (strcmp(rest, "/prepared") == 0 && strcmp(method, "POST") == 0) {
        q->kind = R1_PREPARED;
        return 0;
    }
    const char *num = NULL;
    if (strncmp(rest, "/base/", 6) == 0) {
        q->kind = R1_BASE;
        num = rest + 6;
    } else if (strncmp(rest, "/cycles/", 8) == 0) {
        q->kind = R1_CYCLE;
        num = rest + 8;
    } else {
        return vr_err(-ENOENT, "not found");
    }
    if (strcmp(method, "PUT") != 0)
        return vr_err(-EOPNOTSUPP, "method not allowed");
    errno = 0;
    unsigned long long v = strtoull(num, &end, 10);
    /* Cycle numbers are kept as SQLite integers: at most 2^63 - 1. */
    if (errno || end == num || *end || *num == '0' || strlen(num) > 19 ||
        v > INT64_MAX)
        return vr_err(-EINVAL, "bad number in url");
    q->n = v;
    return 0;
}

static json_object *
replica_status_json(const struct vm *vm)
{
    json_object *o = json_object_new_object();
    const struct repl *r = vm->repl;
    json_object_object_add(o, "uuid", json_object_new_string(vm->uuid));
    json_object_object_add(o, "name", json_object_new_string(vm->name));
    json_object_object_add(o, "epoch",
                           json_object_new_int64((int64_t)r->epoch));
    json_object_object_add(o, "initial_done",
                           json_object_new_boolean(r->initial_done));
    json_object_object_add(o, "applied_cycle",
                           json_object_new_int64((int64_t)r->applied_cycle));
    json_object_object_add(o, "staged_cycle",
                           json_object_new_int64((int64_t)r->last_cycle));
    json_object_object_add(o, "state", json_object_new_string(repl_st_name(r->st)));
    return o;
}

/* Find the Replica VM for q, checking it belongs to this peer and epoch. */
static int
own_vm(struct rreq *q, struct vm **out)
{
    struct vm *vm = vm_find_uuid(q->uuid);
    if (!vm || vm->mode != VM_MODE_REPLICA || !vm->repl)
        return vr_err(-ENOENT, "replica vm %s: not found", q->uuid);
    if (!vm->repl->primary_server ||
        strcmp(vm->repl->primary_server, q->peer) != 0)
        return vr_err(-EPERM, "replica vm %s: belongs to primary %s, not %s",
                      vm->name, vm->repl->primary_server, q->peer);
    if (vm->repl->trust_group && *vm->repl->trust_group &&
        strcmp(vm->repl->trust_group, q->group ? q->group : "") != 0)
        return vr_err(-EPERM, "replica vm %s: belongs to trust group '%s'; "
                      "%s is in '%s'", vm->name, vm->repl->trust_group,
                      q->peer, q->group ? q->group : "");
    /* Any request of the VM's primary shows it is reachable (failover
     * start refuses while it recently was). */
    vm->repl->last_contact_ms = vr_wall_ms();
    if (q->kind != R1_STATUS && q->epoch != vm->repl->epoch)
        return vr_err(-ESTALE, "replica vm %s: epoch %llu refused (current "
                               "%llu)",
                      vm->name, (unsigned long long)q->epoch,
                      (unsigned long long)vm->repl->epoch);
    if (q->kind != R1_STATUS &&
        (vm->repl->failover_point || vm->repl->failover_busy))
        return vr_err(-EBUSY, "replica vm %s: failed over on the Replica "
                      "server (point %llu); changes are refused until the "
                      "failover is cancelled", vm->name,
                      (unsigned long long)vm->repl->failover_point);
    *out = vm;
    return 0;
}

/* The disks beneath the storage location, never through a link. */
static int
open_disks(const struct vm *vm, int *fds)
{
    for (unsigned i = 0; i < vm->ndisks; i++) {
        fds[i] = storage_open(vm->dir, vm->disks[i].path, O_RDWR, 0);
        if (fds[i] < 0) {
            int rc = fds[i];
            while (i-- > 0)
                close(fds[i]);
            return rc;
        }
    }
    return 0;
}

/* Apply the payload in pfd to the VM's disks.  Runs without d->lock; vm's
 * disk table is immutable while it is a Replica VM. */
static int
apply_payload_fd(const struct vm *vm, int pfd, uint64_t *nrec)
{
    int fds[MAX_DISKS];
    uint64_t sizes[MAX_DISKS];
    for (unsigned i = 0; i < vm->ndisks; i++)
        sizes[i] = vm->disks[i].size;
    int rc = open_disks(vm, fds);
    if (rc == 0) {
        rc = cyc_apply_file(pfd, fds, sizes, vm->ndisks, nrec);
        for (unsigned i = 0; i < vm->ndisks; i++)
            close(fds[i]);
    }
    return rc;
}

/* The same from a staged file. */
static int
apply_payload(const struct vm *vm, const char *path, uint64_t *nrec)
{
    int pfd = storage_open(vm->dir, path, O_RDONLY, 0);
    if (pfd < 0)
        return pfd;
    int rc = apply_payload_fd(vm, pfd, nrec);
    close(pfd);
    return rc;
}

static char *
staging_dir(const struct repl *r)
{
    return xasprintf("%s/staging", r->storage);
}

static char *
cycle_path(const struct repl *r, uint64_t n)
{
    return xasprintf("%s/staging/%020llu.cycle", r->storage,
                     (unsigned long long)n);
}

/* Delete every file in the VM's staging directory (a link in its place is
 * refused, not followed). */
static int
clear_staging(const struct repl *r)
{
    CLEANUP_FREE char *stg = staging_dir(r);
    int n = storage_clear_dir(r->storage, stg);
    return n < 0 ? n : 0;
}

/* --- server-wide limits -------------------------------------------------
 *
 * One authenticated primary must not be able to exhaust the Replica server
 * (issue #9): besides the cap on connections (connection guard, below)
 * and on Replica VMs per authorization entry (auth_check_vm_cap), two
 * budgets hold for the whole server, not per connection.
 *
 * Memory.  Every buffer a request holds while it is received — its JSON
 * body, the Kerberos frames, the zstd window and the payload decoder's
 * reassembly buffer (up to a 64 MiB record) — is charged to one budget
 * before it is allocated, and returned when the request ends.  A request
 * that would go over it is refused with 503 EAGAIN and Retry-After, which
 * the primary's shipper retries: memory stays bounded however many
 * connections send big records at once.
 *
 * Space.  An upload claims the bytes it is expected to stage (its
 * Content-Length, then more in steps as it decompresses) before it stages
 * them; a claim is granted only if the staging file system's free space
 * less the reserve margin (a tenth of its size, at most 1 GiB) and less
 * what the uploads in progress have claimed but not written yet can hold
 * it.  So concurrent uploads together never stage into the margin that
 * keeps room for applying cycles; the later ones are refused (507
 * ENOSPC, retried by the primary) while the first completes. */

#define R1_MEM_BUDGET_DEFAULT (512ull << 20)
#define R1_ZSTD_MEM           (17u << 20) /* a 16 MiB window + buffers */
#define R1_KRB_MEM            (2u * KRB_FRAME_MAX)
/* The decoder's buffer: R1_SMALL_BUF is charged with the upload, the rest
 * up to the largest record (R1_BIG_BUF) at once when it needs more. */
#define R1_SMALL_BUF          (1u << 20)
#define R1_BIG_BUF            ((uint64_t)CL_REC_HDR_BYTES + CL_MAX_DATA_BYTES)
#define R1_MEM_WAIT_MS        10000
#define R1_CLAIM_STEP         (16ull << 20)
#define R1_RETRY_AFTER_S      "5"

static pthread_mutex_t limits_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t limits_cond = PTHREAD_COND_INITIALIZER;
static uint64_t mem_budget = R1_MEM_BUDGET_DEFAULT; /* set once at start */
static uint64_t mem_used;
static struct space_claim *claims; /* uploads in progress */

/* Charge bytes of request memory to q before allocating them: 0, or
 * -EAGAIN (nothing charged).  Guarantees mem_used <= mem_budget.  Small
 * charges (request starts, JSON bodies) must leave room for one big
 * buffer and never wait; a big one (a buffer for records over
 * R1_SMALL_BUF) may use all of the budget and waits up to R1_MEM_WAIT_MS
 * for it.  Whoever holds a big charge waits for nothing else, so it
 * completes and releases it: big requests never deadlock each other, and
 * small ones cannot starve them. */
static int
mem_charge(struct rreq *q, uint64_t bytes, bool big)
{
    uint64_t limit = big ? mem_budget : mem_budget - R1_BIG_BUF;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += R1_MEM_WAIT_MS / 1000;
    pthread_mutex_lock(&limits_lock);
    bool ok;
    while (!(ok = mem_used <= limit && bytes <= limit - mem_used) && big)
        if (pthread_cond_timedwait(&limits_cond, &limits_lock, &until) != 0)
            big = false; /* timed out: one last look */
    if (ok) {
        mem_used += bytes;
        q->mem_charged += bytes;
    }
    pthread_mutex_unlock(&limits_lock);
    if (!ok)
        return vr_err(-EAGAIN, "replica server: its memory budget for "
                      "requests (%llu MiB) is in use by other transfers; try "
                      "again later", (unsigned long long)(mem_budget >> 20));
    return 0;
}

/* Give back everything q was charged (its buffers are freed). */
static void
mem_release(struct rreq *q)
{
    pthread_mutex_lock(&limits_lock);
    mem_used -= q->mem_charged;
    q->mem_charged = 0;
    q->buf_allowance = 0;
    pthread_cond_broadcast(&limits_cond);
    pthread_mutex_unlock(&limits_lock);
}

/* The decoder's hook: its reassembly buffer grows by more bytes.  Within
 * the R1_SMALL_BUF charged with the upload it is free; beyond, the rest up
 * to the largest record is charged at once (big). */
static int
decoder_mem(void *ud, size_t more)
{
    struct rreq *q = ud;
    if (q->buf_bytes + more > q->buf_allowance) {
        int rc = mem_charge(q, R1_BIG_BUF - q->buf_allowance, true);
        if (rc < 0)
            return rc;
        q->buf_allowance = R1_BIG_BUF;
    }
    q->buf_bytes += more;
    return 0;
}

/* Bytes claimed on dev by uploads in progress and not written yet.
 * limits_lock held. */
static uint64_t
claims_outstanding(dev_t dev)
{
    uint64_t sum = 0;
    for (const struct space_claim *c = claims; c; c = c->next)
        if (c->dev == dev && c->claimed > c->written)
            sum += c->claimed - c->written;
    return sum;
}

/* Let q's upload stage raw_bytes in all: grow its claim (by at least
 * R1_CLAIM_STEP, so that statvfs is not called for every chunk) if the
 * staging file system can hold it next to the other claims and the
 * reserve margin, else -ENOSPC, nothing claimed.  A base chunk claims its
 * bytes twice: the same request applies it to the disks, which are on
 * that file system too.  begin: the claim of the expected size, before
 * anything is staged. */
static int
space_claim(struct rreq *q, uint64_t raw, bool begin)
{
    struct space_claim *c = &q->claim;
    uint64_t raw_bytes = raw * c->factor;
    if (raw_bytes <= c->claimed) {
        pthread_mutex_lock(&limits_lock);
        c->written = raw;
        pthread_mutex_unlock(&limits_lock);
        return 0;
    }
    struct statvfs sv;
    if (statvfs(q->staging, &sv) < 0)
        return vr_err(-errno, "statvfs %s: %s", q->staging, strerror(errno));
    uint64_t avail = (uint64_t)sv.f_bavail * sv.f_frsize;
    uint64_t size = (uint64_t)sv.f_blocks * sv.f_frsize;
    uint64_t margin = size / 10 < (1ull << 30) ? size / 10 : 1ull << 30;
    pthread_mutex_lock(&limits_lock);
    uint64_t held = claims_outstanding(c->dev) + margin;
    uint64_t room = avail > held ? avail - held : 0;
    uint64_t more = raw_bytes - c->claimed, grant = more;
    if (grant < R1_CLAIM_STEP)
        grant = R1_CLAIM_STEP < room ? R1_CLAIM_STEP : more;
    bool ok = more <= room;
    uint64_t could = c->claimed - c->written + room;
    if (ok) {
        c->claimed += grant;
        c->written = begin ? 0 : raw;
    }
    pthread_mutex_unlock(&limits_lock);
    if (ok)
        return 0;
    if (begin)
        return vr_err(-ENOSPC, "replica storage: the payload needs %llu "
                      "bytes, more than the %llu bytes its file system can "
                      "take now (free space less a reserve and what uploads "
                      "in progress hold)", (unsigned long long)raw_bytes,
                      (unsigned long long)could);
    return vr_err(-ENOSPC, "replica storage: the payload decompresses to "
                  "more than the %llu bytes its file system can take (free "
                  "space less a reserve and what uploads in progress hold)",
                  (unsigned long long)(c->written + could));
}

/* The decoder's hook: raw_bytes in all are about to be staged. */
static int
decoder_stage(void *ud, uint64_t raw_bytes)
{
    return space_claim(ud, raw_bytes, false);
}

/* Enter q's upload, staging on dev, in the claims. */
static void
claim_link(struct rreq *q, dev_t dev)
{
    pthread_mutex_lock(&limits_lock);
    q->claim.dev = dev;
    q->claim.factor = q->kind == R1_BASE ? 2 : 1;
    q->claim.next = claims;
    claims = &q->claim;
    q->claim.linked = true;
    pthread_mutex_unlock(&limits_lock);
}

/* The upload is over (staged, or refused and its file deleted): what it
 * staged is in the file system's free space from now on. */
static void
claim_unlink(struct rreq *q)
{
    pthread_mutex_lock(&limits_lock);
    for (struct space_claim **pp = &claims; q->claim.linked && *pp;
         pp = &(*pp)->next)
        if (*pp == &q->claim) {
            *pp = q->claim.next;
            break;
        }
    q->claim.linked = false;
    q->claim.claimed = q->claim.written = 0;
    pthread_mutex_unlock(&limits_lock);
}

/* --- request handlers (JSON ones run at the end of the body) ------------- */

/* The primary's recovery-history settings travel with each request. */
static void
take_history(struct repl *r, const struct rreq *q)
{
    if (!q->has_history)
        return;
    r->recovery_history = q->history;
    r->point_interval_s = q->interval_s;
}

/* Reverse replication (planned.c): the Replica server we prepared a
 * failover to registers the VM the other way round, "reverse_of": N.  If
 * this primary VM is prepared at exactly cycle N, both sides hold the same
 * disks: it becomes a Replica VM of that server as it is, with no reset
 * and no copy.  The same registration again (a lost answer) is accepted
 * as is.  D->lock not held. */
static int
do_reverse(struct rreq *q, const struct r1_reg *reg, json_object **out)
{
    int64_t reverse_of = reg->reverse_of;
    size_t nd = reg->ndisks;
    const uint64_t *sizes = reg->sizes;
    pthread_mutex_lock(&D->lock);
    struct vm *vm = vm_find_uuid(q->uuid);
    struct repl *r = vm ? vm->repl : NULL;
    int rc = 0;
    bool again = vm && r && vm->mode == VM_MODE_REPLICA &&
                 r->primary_server && strcmp(r->primary_server, q->peer) == 0 &&
                 r->epoch == q->epoch;
    size_t hl = r && r->replica_server ? strcspn(r->replica_server, ":") : 0;
    if (!again) {
        if (!vm || !r || vm->mode != VM_MODE_PRIMARY ||
            r->mode != VM_MODE_PRIMARY)
            rc = vr_err(-EPERM, "register: reverse replication of vm %s: "
                        "it is not a primary VM here", q->uuid);
        else if (hl != strlen(q->peer) ||
                 strncmp(r->replica_server, q->peer, hl) != 0)
            rc = vr_err(-EPERM, "register: reverse replication of vm %s: "
                        "it replicates to %s, not %s", vm->name,
                        r->replica_server, q->peer);
        else if (r->st != REPL_ST_PREPARED || reverse_of <= 0 ||
                 r->prepared_cycle != (uint64_t)reverse_of)
            rc = vr_err(-EPERM, "register: reverse replication of vm %s at "
                        "cycle %lld refused: it is %s here (prepared at "
                        "%llu); only a VM prepared with 'failover prepare' "
                        "is reversed without resynchronization", vm->name,
                        (long long)reverse_of, repl_st_name(r->st),
                        (unsigned long long)r->prepared_cycle);
        else if (q->epoch <= r->epoch)
            rc = vr_err(-ESTALE, "register: epoch %llu is not newer than "
                        "%llu", (unsigned long long)q->epoch,
                        (unsigned long long)r->epoch);
        else if (vm->ndisks != nd)
            rc = vr_err(-EINVAL, "register: vm %s has %u disks here, not %zu",
                        vm->name, vm->ndisks, nd);
        for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++)
            if (sizes[i] != vm->disks[i].size)
                rc = vr_err(-EINVAL, "register: vm %s: disk %u is %llu "
                            "bytes here, not %llu", vm->name, i,
                            (unsigned long long)vm->disks[i].size,
                            (unsigned long long)sizes[i]);
        if (rc == 0 && (vm->changing || r->preparing || r->removing))
            rc = vr_err(-EBUSY, "register: vm %s: a change is in progress",
                        vm->name);
        if (rc == 0) {
            /* Its disks are not served (prepare stopped them). */
            shipper_stop(vm);
            CLEANUP_FREE char *stg = xasprintf("%s/staging", vm->dir);
            rc = storage_mkdir(vm->dir, stg);
            if (rc < 0)
                rc = vr_err(rc, "register: %s", vr_errmsg());
        }
        if (rc == 0) {
            vr_fault_point("reverse-accepting");
            vm->mode = VM_MODE_REPLICA;
            r->mode = VM_MODE_REPLICA;
            free(r->primary_server);
            r->primary_server = xstrdup(q->peer);
            free(r->storage);
            r->storage = xstrdup(vm->dir);
            free(r->trust_group);
            r->trust_group = xstrdup(q->group ? q->group : "");
            free(vm->owner);
            vm->owner = xstrdup(q->peer);
            free(vm->owner_group);
            vm->owner_group = xstrdup(r->trust_group);
            r->reset_pending = false;
            free(r->auth);
            r->auth = q->krb ? xstrdup("kerberos") : NULL;
            r->krb_encrypt = q->wrapped;
            r->epoch = q->epoch;
            r->initial_done = false;
            r->base_cycle = r->applied_cycle = r->last_cycle = 0;
            r->prepared_cycle = 0;
            take_history(r, q);
            if (reg->frequency_s)
                r->frequency_s = reg->frequency_s;
            rc = repl_transition(vm, REPL_ST_WAITING_INITIAL, 0);
            if (rc == 0)
                rc = catalog_begin(D->cat);
            if (rc == 0) {
                rc = history_reset(vm);
                if (rc == 0)
                    rc = catalog_save_vm(D->cat, vm);
                if (rc == 0)
                    rc = catalog_save_repl(D->cat, r);
                rc = catalog_end(D->cat, rc);
            }
            if (rc == 0)
                event_add("info", vm->name, "replication reversed by %s "
                          "(%s): this is its Replica server now (epoch "
                          "%llu); the disks are kept as they are (cycle "
                          "%lld on both sides)", q->peer, q->addr,
                          (unsigned long long)q->epoch,
                          (long long)reverse_of);
            else
                event_add("error", vm->name, "reverse replication: %s (the "
                          "daemon must restart to reload its catalog)",
                          vr_errmsg());
        }
    }
    if (rc == 0)
        *out = replica_status_json(vm);
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* May the primary of q register vm, an existing Replica VM (with or
 * without a relationship)?  Its owner is the primary that registered it
 * last, its trust group that of the authorization entry it was created
 * under; both outlive `replication remove`, so a removed Replica VM is as
 * closed to other primaries as a live one: only its owner, or any primary
 * of its (non-empty) trust group, may register it (SPEC §6).  0 or -EPERM
 * with the reason. */
static int
check_owner(const struct vm *vm, const struct rreq *q)
{
    const char *group = vm->owner_group ? vm->owner_group : "";
    if (!vm->owner)
        return vr_err(-EPERM, "register: vm %s is kept here from a removed "
                      "replication whose primary is not known; only this "
                      "server's administrator can free it ('vmreplica vm "
                      "remove %s')", vm->name, vm->name);
    if (*group && strcmp(group, q->group ? q->group : "") != 0)
        return vr_err(-EPERM, "register: vm %s belongs to trust group '%s'; "
                      "%s is in '%s'", vm->name, group, q->peer,
                      q->group ? q->group : "");
    /* A VM moves between primaries of its trust group (SPEC §6). */
    if (!*group && strcmp(vm->owner, q->peer) != 0)
        return vr_err(-EPERM, "register: vm %s belongs to primary %s, not %s",
                      vm->name, vm->owner, q->peer);
    return 0;
}

/* The other conditions for registering vm, an existing Replica VM, again
 * (its owner checked): a current epoch, the same disks, and nothing in
 * progress on it.  0, or the reason. */
static int
check_reregister(const struct vm *vm, const struct rreq *q, size_t nd)
{
    const struct repl *r = vm->repl;
    if (r && q->epoch < r->epoch)
        return vr_err(-ESTALE, "register: epoch %llu is older than %llu",
                      (unsigned long long)q->epoch,
                      (unsigned long long)r->epoch);
    if (vm->ndisks != nd)
        return vr_err(-EINVAL, "register: vm %s has %u disks here, not %zu",
                      vm->name, vm->ndisks, nd);
    if (vm->applying || (r && r->busy))
        return vr_err(-EBUSY, "register: vm %s: a cycle is being received "
                      "or applied; try again", vm->name);
    if (r && (r->failover_point || r->failover_busy ||
              r->st == REPL_ST_FAILED_OVER))
        return vr_err(-EPERM, "register: vm %s was failed over on the "
                      "Replica server; it no longer replicates from %s",
                      vm->name, q->peer);
    if (r && (r->test_point || r->test_busy))
        return vr_err(-EBUSY, "register: vm %s: a test failover is running "
                      "on the Replica server", vm->name);
    return 0;
}

/* Make every disk of vm read as zeroes at its size (a full initial
 * replication sends only the primary's allocated regions, so whatever a
 * kept disk holds elsewhere must go), durably.  D->lock held; no apply
 * runs (a base chunk holds the VM's transfer, repl->busy). */
static int
reset_disks(const struct vm *vm)
{
    for (unsigned i = 0; i < vm->ndisks; i++) {
        /* Beneath the storage location, never through a link. */
        int fd = storage_open(vm->dir, vm->disks[i].path, O_RDWR, 0);
        int rc = fd < 0 ? fd : 0;
        if (fd >= 0 && (ftruncate(fd, 0) < 0 ||
                        ftruncate(fd, (off_t)vm->disks[i].size) < 0 ||
                        fsync(fd) < 0))
            rc = vr_err(-errno, "reset %s: %s", vm->disks[i].path,
                        strerror(errno));
        if (fd >= 0)
            close(fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Before the first piece of a full initial replication (a base chunk or
 * initial-complete): a kept copy is reset, and that is recorded.  The
 * reset comes first, so a crash between repeats it, which is harmless:
 * nothing of this relationship was applied yet.  D->lock held. */
static int
reset_kept_disks(struct vm *vm)
{
    if (!vm->repl || !vm->repl->reset_pending)
        return 0;
    int rc = reset_disks(vm);
    if (rc == 0) {
        vm->repl->reset_pending = false;
        rc = catalog_save_repl(D->cat, vm->repl);
        if (rc < 0)
            vm->repl->reset_pending = true;
    }
    if (rc == 0)
        log_info("replica", "%s: initial replication: the kept disks are "
                 "reset", vm->name);
    return rc;
}

static int
do_register(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    struct r1_reg reg;
    int rc = r1_register_parse(b, &reg);
    if (rc < 0) {
        json_object_put(b);
        return rc;
    }
    const char *name = reg.name;
    size_t nd = reg.ndisks;
    uint64_t *sizes = reg.sizes;
    int64_t cpus = reg.cpus, mem = reg.memory_mib;
    json_object *v;
    if (reg.reverse_of) {
        rc = do_reverse(q, &reg, out);
        json_object_put(b);
        return rc;
    }

    pthread_mutex_lock(&D->lock);
    struct vm *vm = vm_find_uuid(q->uuid);
    struct vm *byname = vm_find(name);
    if (byname && byname != vm)
        rc = vr_err(-EEXIST, "register: another vm is named %s here", name);
    else if (vm && vm->mode != VM_MODE_REPLICA)
        rc = vr_err(-EEXIST, "register: vm %s is not a Replica VM here",
                    vm->name);
    else if (vm)
        rc = check_owner(vm, q);
    else
        rc = auth_check_vm_cap(q->peer);
    if (rc == 0 && vm)
        rc = check_reregister(vm, q, nd);
    bool created = rc == 0 && !vm;
    if (created) {
        /* New Replica VM beneath the default storage location. */
        vm = xcalloc(1, sizeof *vm);
        snprintf(vm->uuid, sizeof vm->uuid, "%s", q->uuid);
        vm->name = xstrdup(name);
        vm->mode = VM_MODE_REPLICA;
        vm->dir = xasprintf("%s/%s", q->root, q->uuid);
        vm->ndisks = (unsigned)nd;
        for (unsigned i = 0; i < vm->ndisks; i++) {
            snprintf(vm->disks[i].id, sizeof vm->disks[i].id, "disk%u", i);
            vm->disks[i].path = xasprintf("%s/disk%u.raw", vm->dir, i);
        }
        /* Nothing may lead out of the storage location: no symbolic link
         * on the way (a peer names no path, but one may be left there),
         * checked again at every open (storage.c). */
        CLEANUP_FREE char *stg = xasprintf("%s/staging", vm->dir);
        rc = storage_mkdir(vm->dir, stg);
        for (unsigned i = 0; rc == 0 && i < vm->ndisks; i++) {
            int fd = storage_open(vm->dir, vm->disks[i].path,
                                  O_RDWR | O_CREAT, 0640);
            if (fd < 0)
                rc = fd;
            else if (ftruncate(fd, (off_t)sizes[i]) < 0 || fsync(fd) < 0)
                rc = vr_err(-errno, "create %s: %s", vm->disks[i].path,
                            strerror(errno));
            if (fd >= 0)
                close(fd);
            vm->disks[i].size = sizes[i];
        }
        if (rc == 0) {
            int dfd = storage_open(vm->dir, vm->dir, O_RDONLY | O_DIRECTORY,
                                   0);
            rc = dfd < 0 ? dfd : io_fsync_dirfd(dfd);
            if (dfd >= 0)
                close(dfd);
        }
        if (rc < 0)
            rc = vr_err(rc, "register: %s", vr_errmsg());
        if (rc < 0) {
            vm_free(vm);
            vm = NULL;
        } else {
            vm->next = D->vms;
            D->vms = vm;
        }
    }
    if (rc == 0) {
        /* Disk sizes may have grown on the primary. */
        for (unsigned i = 0; i < vm->ndisks; i++)
            if (sizes[i] != vm->disks[i].size) {
                rc = storage_truncate(vm->dir, vm->disks[i].path, sizes[i]);
                if (rc < 0) {
                    rc = vr_err(rc, "register: %s", vr_errmsg());
                    break;
                }
                vm->disks[i].size = sizes[i];
            }
    }
    if (rc == 0) {
        vm->cpus = (unsigned)cpus;
        vm->memory_mib = (unsigned)mem;
        /* The NICs travel with their failover settings; what was set
         * here for a MAC (its network, its failover settings) wins, and a
         * new NIC the peer puts on a host interface (tap:, bridge:) is
         * not connected here: a peer names nothing on this host (SPEC
         * §6); `vm set-failover-network --network` connects it. */
        json_object *nics = NULL;
        bool have_nics = json_object_object_get_ex(b, "nics", &v);
        if (have_nics) {
            nics = json_tokener_parse(json_object_to_json_string(v));
            if (nics_validate(nics) < 0) {
                log_warn("replica", "%s: NICs not kept: %s", name,
                         vr_errmsg());
                vr_err_clear();
                json_object_put(nics);
                nics = NULL;
            }
        }
        for (size_t i = 0; nics && vm->nics &&
                           i < json_object_array_length(nics); i++) {
            json_object *n = json_object_array_get_idx(nics, i), *m, *f;
            const char *mac = json_object_object_get_ex(n, "mac", &m)
                                  ? json_object_get_string(m) : "";
            bool known = false;
            for (size_t j = 0; j < json_object_array_length(vm->nics); j++) {
                json_object *o = json_object_array_get_idx(vm->nics, j), *om,
                            *on;
                if (!json_object_object_get_ex(o, "mac", &om) ||
                    strcmp(json_object_get_string(om), mac) != 0)
                    continue;
                known = true;
                if (json_object_object_get_ex(o, "failover", &f))
                    json_object_object_add(n, "failover", json_object_get(f));
                if (json_object_object_get_ex(o, "network", &on))
                    json_object_object_add(n, "network", json_object_get(on));
            }
            json_object *net;
            if (!known && json_object_object_get_ex(n, "network", &net) &&
                (strncmp(json_object_get_string(net), "tap:", 4) == 0 ||
                 strncmp(json_object_get_string(net), "bridge:", 7) == 0))
                json_object_object_add(n, "network",
                                       json_object_new_string("none"));
        }
        for (size_t i = 0; nics && !vm->nics &&
                           i < json_object_array_length(nics); i++) {
            json_object *n = json_object_array_get_idx(nics, i), *net;
            if (json_object_object_get_ex(n, "network", &net) &&
                (strncmp(json_object_get_string(net), "tap:", 4) == 0 ||
                 strncmp(json_object_get_string(net), "bridge:", 7) == 0))
                json_object_object_add(n, "network",
                                       json_object_new_string("none"));
        }
        if (have_nics) {
            json_object_put(vm->nics);
            vm->nics = nics;
        }
        /* Direct kernel boot does not travel: a peer names no path here
         * (SPEC §6).  The Replica server's administrator sets it with
         * `vm set-boot`. */
        free(vm->name);
        vm->name = xstrdup(name);
        /* The owner: this primary now (check_owner admitted it), in the
         * trust group the VM was created under. */
        free(vm->owner);
        vm->owner = xstrdup(q->peer);
        if (!vm->owner_group)
            vm->owner_group = xstrdup(q->group);
        struct repl *r = vm->repl;
        bool fresh = !r;
        if (fresh) {
            r = xcalloc(1, sizeof *r);
            snprintf(r->vm_uuid, sizeof r->vm_uuid, "%s", vm->uuid);
            r->mode = VM_MODE_REPLICA;
            r->storage = xstrdup(vm->dir);
            r->trust_group = xstrdup(vm->owner_group);
            vm->repl = r;
        }
        free(r->auth);
        r->auth = q->krb ? xstrdup("kerberos") : NULL;
        r->krb_encrypt = q->wrapped;
        /* Possibly another primary of the VM's trust group. */
        free(r->primary_server);
        r->primary_server = xstrdup(q->peer);
        r->epoch = q->epoch;
        take_history(r, q);
        if (!r->point_interval_s)
            r->point_interval_s = 3600;
        if (reg.frequency_s)
            r->frequency_s = reg.frequency_s;
        if (reg.compression >= 0)
            r->compression = reg.compression;
        /* A registration starts a relationship afresh (the primary
         * registers only when replication is enabled), even over one this
         * side still thinks is replicating: the primary may have removed
         * it while we were unreachable, and changed the disk since. */
        r->initial_done = false;
        rc = repl_transition(vm, REPL_ST_WAITING_INITIAL, 0);
        r->applied_cycle = r->last_cycle = 0;
        r->prepared_cycle = 0;
        /* The disks of an existing VM are kept as they are (they may seed
         * a comparison, SPEC §5); a full initial replication resets them
         * before its first piece (reset_kept_disks). */
        r->reset_pending = !created;
        if (rc == 0)
            rc = clear_staging(r);
        /* The recovery history of the old relationship goes. */
        if (rc == 0)
            rc = history_reset(vm);
        if (rc == 0)
            rc = catalog_save_vm(D->cat, vm);
        if (rc == 0)
            rc = catalog_save_repl(D->cat, r);
        if (rc == 0) {
            event_add("info", vm->name,
                      "replica vm %s registered by primary %s (%s)%s",
                      created ? "created" : "updated", q->peer, q->addr,
                      created ? "" : "; its disks are kept until a full "
                                     "initial replication starts");
            *out = replica_status_json(vm);
        }
    }
    pthread_mutex_unlock(&D->lock);
    json_object_put(b);
    return rc;
}

static int
do_initial_done(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    json_object *v;
    int64_t base = -1, first = 0;
    if (b && json_object_object_get_ex(b, "base_cycle", &v) &&
        json_object_is_type(v, json_type_int))
        base = json_object_get_int64(v);
    /* The first cycle that can be a recovery point (the primary's copy
     * read the disk until that cycle was open); absent from older
     * primaries: the one after the base. */
    if (b && json_object_object_get_ex(b, "first_point", &v))
        first = json_object_is_type(v, json_type_int)
                    ? json_object_get_int64(v) : -1;
    json_object_put(b);
    if (base < 0 || base >= INT64_MAX / 2)
        return vr_err(-EINVAL, "initial-complete: base_cycle missing or out "
                               "of range");
    if (first < 0)
        return vr_err(-EINVAL, "initial-complete: first_point is not a "
                               "cycle number");
    if (first == 0)
        first = base + 1;
    if (first <= base || first - base > INT32_MAX)
        return vr_err(-EINVAL, "initial-complete: first_point %lld is not "
                      "after base_cycle %lld (or too far)", (long long)first,
                      (long long)base);
    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    int rc = own_vm(q, &vm);
    bool again = rc == 0 && vm->repl->initial_done &&
                 vm->repl->base_cycle == (uint64_t)base;
    if (rc == 0 && !again &&
        (vm->repl->initial_done || vm->applying || vm->repl->busy))
        rc = vr_err(-EPROTO, "initial-complete: vm %s is not in initial "
                             "replication",
                    vm->name);
    if (rc == 0 && again) {
        /* The primary did not hear our answer and asks again. */
        *out = replica_status_json(vm);
    } else if (rc == 0 && (rc = reset_kept_disks(vm)) == 0) {
        struct repl *r = vm->repl;
        r->base_cycle = (uint64_t)base;
        r->first_point = (uint64_t)first;
        r->applied_cycle = (uint64_t)base;
        r->last_cycle = (uint64_t)base;
        r->initial_done = true;
        rc = repl_transition_event(
            vm, REPL_ST_REPLICATING, REPL_T_SAVE, "info",
            "initial replication complete at cycle %lld; recovery points "
            "from cycle %lld on", (long long)base, (long long)first);
        if (rc == 0)
            *out = replica_status_json(vm);
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* The primary shut the VM down and shipped everything up to cycle N: a
 * planned failover may start at N (0: the preparation is withdrawn). */
static int
do_prepared(struct rreq *q, json_object **out)
{
    json_object *b = r1_json_parse(q->body, q->len);
    json_object *v;
    int64_t n = -1;
    if (b && json_object_object_get_ex(b, "cycle", &v) &&
        json_object_is_type(v, json_type_int))
        n = json_object_get_int64(v);
    json_object_put(b);
    if (n < 0)
        return vr_err(-EINVAL, "prepared: cycle missing");
    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    int rc = own_vm(q, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && !r->initial_done)
        rc = vr_err(-EPROTO, "prepared: vm %s has not completed initial "
                    "replication", vm->name);
    if (rc == 0 && n && (uint64_t)n != r->last_cycle)
        rc = vr_err(-EPROTO, "prepared: vm %s: cycle %lld declared, but the "
                    "last cycle received is %llu", vm->name, (long long)n,
                    (unsigned long long)r->last_cycle);
    if (rc == 0 && r->prepared_cycle != (uint64_t)n) {
        r->prepared_cycle = (uint64_t)n;
        rc = catalog_save_repl(D->cat, r);
        if (rc == 0 && n)
            event_add("info", vm->name, "primary %s prepared for failover at "
                      "cycle %lld: 'vmreplica failover start %s' fails over "
                      "with no data loss", q->peer, (long long)n, vm->name);
        else if (rc == 0)
            event_add("info", vm->name, "primary %s withdrew its failover "
                      "preparation", q->peer);
    }
    if (rc == 0)
        *out = replica_status_json(vm);
    pthread_mutex_unlock(&D->lock);
    return rc;
}

static int
do_remove(struct rreq *q, json_object **out)
{
    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    int rc = own_vm(q, &vm);
    if (rc == 0 && (vm->repl->busy || vm->applying))
        rc = vr_err(-EBUSY, "replica vm %s: a transfer or an apply is in "
                            "progress; try again",
                    vm->name);
    if (rc == 0) {
        rc = catalog_delete_repl(D->cat, vm->uuid);
        if (rc == 0) {
            repl_free(vm->repl);
            vm->repl = NULL;
            event_add("info", vm->name,
                      "replication removed by primary %s; replica disks kept",
                      q->peer);
            *out = json_object_new_object();
        }
    }
    pthread_mutex_unlock(&D->lock);
    return rc;
}

/* Create NAME afresh in the staging directory stgfd: O_EXCL, so nothing
 * left there is ever written through.  A regular file of that name (an
 * upload whose end we did not see) is replaced; a symbolic link or anything
 * else is refused and left for the administrator to see. */
static int
create_staged(int stgfd, const char *staging, const char *name)
{
    for (int tries = 0; tries < 2; tries++) {
        int fd = openat(stgfd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW |
                        O_CLOEXEC, 0640);
        if (fd >= 0)
            return fd;
        if (errno != EEXIST)
            return vr_err(-errno, "create %s/%s: %s", staging, name,
                          strerror(errno));
        struct stat st;
        if (fstatat(stgfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            !S_ISREG(st.st_mode))
            return vr_err(S_ISLNK(st.st_mode) ? -ELOOP : -EEXIST,
                          "create %s/%s: refused: %s is there (not "
                          "followed)", staging, name,
                          S_ISLNK(st.st_mode) ? "a symbolic link"
                                              : "something not a file");
        if (unlinkat(stgfd, name, 0) < 0 && errno != ENOENT)
            return vr_err(-errno, "remove stale %s/%s: %s", staging, name,
                          strerror(errno));
    }
    return vr_err(-EEXIST, "create %s/%s: it keeps coming back", staging,
                  name);
}

/* The uncompressed bytes an upload is expected to stage: its
 * Content-Length (exact for an identity body, a lower bound for zstd), at
 * most cap; 0 if it sends none. */
static uint64_t
expected_bytes(struct MHD_Connection *c, uint64_t cap)
{
    const char *cl =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    char *end = NULL;
    errno = 0;
    unsigned long long n = cl ? strtoull(cl, &end, 10) : 0;
    if (!cl || errno || end == cl || *end)
        return 0;
    return n < cap ? n : cap;
}

/* First call for an upload: check the VM and its state, open the temp. */
static int
upload_begin(struct rreq *q, struct MHD_Connection *c)
{
    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    int rc = own_vm(q, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (rc == 0 && r->busy)
        rc = vr_err(-EBUSY, "replica vm %s: another transfer is in progress",
                    vm->name);
    if (rc == 0 && q->kind == R1_BASE && r->initial_done)
        rc = vr_err(-EPROTO, "replica vm %s: initial replication is already "
                             "complete",
                    vm->name);
    if (rc == 0 && q->kind == R1_CYCLE) {
        if (!r->initial_done)
            rc = vr_err(-EBUSY, "replica vm %s: initial replication not "
                                "complete",
                        vm->name);
        else if (q->n <= r->last_cycle)
            rc = 1; /* duplicate: already staged or applied */
        else if (q->n != r->last_cycle + 1)
            rc = vr_err(-EPROTO, "replica vm %s: cycle %llu out of order "
                                 "(expected %llu)",
                        vm->name, (unsigned long long)q->n,
                        (unsigned long long)r->last_cycle + 1);
    }
    CLEANUP_FREE char *vmdir = NULL;
    if (rc == 0) {
        r->busy = true;
        q->holds_busy = true;
        q->staging = staging_dir(r);
        vmdir = xstrdup(r->storage);
        q->ndisks = vm->ndisks;
        for (unsigned i = 0; i < vm->ndisks; i++)
            q->disk_sizes[i] = vm->disks[i].size;
    }
    pthread_mutex_unlock(&D->lock);
    if (rc != 0)
        return rc;

    const char *enc =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Encoding");
    bool compressed = enc && strcmp(enc, "zstd") == 0;
    if (enc && !compressed && strcmp(enc, "identity") != 0)
        return vr_err(-EINVAL, "content-encoding %s: not supported", enc);
    snprintf(q->tmp_name, sizeof q->tmp_name, "%s-%llu.tmp",
             q->kind == R1_BASE ? "base" : "cycle", (unsigned long long)q->n);
    q->stgfd = storage_open(vmdir, q->staging, O_RDONLY | O_DIRECTORY, 0);
    if (q->stgfd < 0)
        return q->stgfd;
    /* However small the body, what it decompresses to is staged: claim
     * the space it is expected to take and the decoder's memory first
     * (limits, above). */
    struct stat st;
    if (fstat(q->stgfd, &st) < 0)
        return vr_err(-errno, "stat %s: %s", q->staging, strerror(errno));
    claim_link(q, st.st_dev);
    uint64_t cap = q->kind == R1_BASE ? R1_MAX_BASE_RAW : R1_MAX_CYCLE_RAW;
    int rc2 = space_claim(q, expected_bytes(c, cap), true);
    if (rc2 == 0)
        rc2 = mem_charge(q, R1_SMALL_BUF + (compressed ? R1_ZSTD_MEM : 0),
                         false);
    if (rc2 < 0)
        return rc2;
    q->buf_allowance = R1_SMALL_BUF;
    q->fd = create_staged(q->stgfd, q->staging, q->tmp_name);
    if (q->fd < 0)
        return q->fd;
    q->tmp_path = xasprintf("%s/%s", q->staging, q->tmp_name);
    rc2 = cyc_decoder_new(compressed, cap, q->fd, &q->dec);
    if (rc2 == 0) {
        const struct cyc_decoder_hooks hooks = { .mem = decoder_mem,
                                                 .stage = decoder_stage,
                                                 .ud = q };
        cyc_decoder_set_disk_sizes(q->dec, q->disk_sizes, q->ndisks);
        cyc_decoder_set_hooks(q->dec, &hooks);
    }
    return rc2;
}

static int
upload_finish(struct rreq *q, json_object **out)
{
    struct cyc_hdr h;
    uint64_t nrec = 0, raw = 0;
    int rc = cyc_decoder_finish(q->dec, &h, &nrec, &raw);
    if (rc < 0)
        return rc;
    uint8_t want[16];
    if (cyc_uuid_parse(q->uuid, want) < 0 || memcmp(want, h.uuid, 16) != 0)
        return vr_err(-EPROTO, "payload is for another vm");
    if (h.epoch != q->epoch)
        return vr_err(-ESTALE, "payload epoch %llu differs from request's",
                      (unsigned long long)h.epoch);
    bool base = (h.flags & CYC_F_BASE) != 0;
    if (base != (q->kind == R1_BASE) || (!base && h.cycle != q->n))
        return vr_err(-EPROTO, "payload header does not match the request");
    if (fdatasync(q->fd) < 0)
        return vr_err(-errno, "sync %s: %s", q->tmp_path, strerror(errno));

    pthread_mutex_lock(&D->lock);
    struct vm *vm = NULL;
    rc = own_vm(q, &vm);
    if (rc == 0 && h.ndisks != vm->ndisks)
        rc = vr_err(-EPROTO, "payload has %u disks, vm %s has %u", h.ndisks,
                    vm->name, vm->ndisks);
    if (rc == 0 && base)
        rc = reset_kept_disks(vm);
    pthread_mutex_unlock(&D->lock);
    if (rc < 0)
        return rc;

    if (base) {
        /* Initial replication chunks go straight to the disks: the Replica
         * VM is not a recovery point until initial replication completes.
         * The decoder goes first: applying reads the payload through a
         * buffer of its own, no larger than the decoder's was, and the
         * request's memory charge stays until it ends. */
        cyc_decoder_free(q->dec);
        q->dec = NULL;
        uint64_t applied;
        rc = apply_payload_fd(vm, q->fd, &applied);
        if (rc < 0)
            return rc;
    } else {
        pthread_mutex_lock(&D->lock);
        CLEANUP_FREE char *final = cycle_path(vm->repl, q->n);
        pthread_mutex_unlock(&D->lock);
        /* Renaming over a link replaces the link: nothing is followed. */
        if (renameat(q->stgfd, q->tmp_name, q->stgfd,
                     strrchr(final, '/') + 1) < 0)
            return vr_err(-errno, "rename %s: %s", final, strerror(errno));
        free(q->tmp_path);
        q->tmp_path = NULL;
        rc = io_fsync_dirfd(q->stgfd);
        if (rc < 0)
            return vr_err(rc, "sync %s: %s", q->staging, strerror(-rc));
        pthread_mutex_lock(&D->lock);
        rc = own_vm(q, &vm);
        if (rc == 0) {
            vm->repl->last_cycle = q->n;
            /* How the primary sends now (replication set may change it):
             * what a reverse replication will keep. */
            free(vm->repl->auth);
            vm->repl->auth = q->krb ? xstrdup("kerberos") : NULL;
            vm->repl->krb_encrypt = q->wrapped;
            /* The primary writes again: it is no longer prepared. */
            if (vm->repl->prepared_cycle && q->n > vm->repl->prepared_cycle)
                vm->repl->prepared_cycle = 0;
            take_history(vm->repl, q);
            rc = catalog_save_repl(D->cat, vm->repl);
            pthread_cond_broadcast(&D->cond);
        }
        pthread_mutex_unlock(&D->lock);
        if (rc < 0)
            return rc;
    }
    *out = json_object_new_object();
    json_object_object_add(*out, "records",
                           json_object_new_int64((int64_t)nrec));
    json_object_object_add(*out, "raw_bytes",
                           json_object_new_int64((int64_t)raw));
    return 0;
}

/* Let the next transfer for this VM in as soon as this one is decided,
 * before the answer is sent: the primary sends the next cycle as soon as
 * it reads our 200.  rreq_done does the same for requests that end
 * otherwise. */
static void
release_busy(struct rreq *q)
{
    /* First the temporary file: the next transfer may reuse its name. */
    if (q->tmp_path) {
        unlinkat(q->stgfd, q->tmp_name, 0);
        free(q->tmp_path);
        q->tmp_path = NULL;
    }
    claim_unlink(q);
    if (!q->holds_busy)
        return;
    pthread_mutex_lock(&D->lock);
    struct vm *vm = vm_find_uuid(q->uuid);
    if (vm && vm->repl)
        vm->repl->busy = false;
    q->holds_busy = false;
    pthread_mutex_unlock(&D->lock);
}

/* Kerberos mode: sign every answer of an authenticated request (the
 * primary trusts a 200 only with a valid MIC from HTTP/us); ask for
 * Negotiate when authentication failed. */
static void
sign_response(struct MHD_Response *r, unsigned status, const char *body,
              size_t len, void *ud)
{
    struct rreq *q = ud;
    if (status == 503)
        MHD_add_response_header(r, "Retry-After", R1_RETRY_AFTER_S);
    if (!q->krb)
        return;
    if (q->gss == GSS_C_NO_CONTEXT) {
        if (status == 401)
            MHD_add_response_header(r, "WWW-Authenticate", "Negotiate");
        return;
    }
    uint8_t sha[32], digest[KRB_DIGEST_LEN];
    gnutls_hash_fast(GNUTLS_DIG_SHA256, body, len, sha);
    krb_response_digest(status, sha, digest);
    char *mic = NULL;
    if (krb_sign(q->gss, digest, &mic) == 0) {
        MHD_add_response_header(r, KRB_MIC_HEADER, mic);
        free(mic);
    } else {
        log_warn("replica", "%s", vr_errmsg());
    }
}

static MHD_RESULT
reply(struct MHD_Connection *c, struct rreq *q, unsigned status,
      json_object *obj)
{
    return http_send_json_ex(c, status, obj, sign_response, q);
}

static MHD_RESULT
reply_error(struct MHD_Connection *c, struct rreq *q, int rc,
            const char *msg)
{
    /* Over a server-wide budget: transient, the primary retries. */
    unsigned status = rc == -EAGAIN ? 503 : http_status_for(rc);
    if (q->krb && q->gss == GSS_C_NO_CONTEXT &&
        (rc == -EACCES || rc == -ETIME))
        status = 401;
    return reply(c, q, status, http_error_obj(rc, msg));
}

static MHD_RESULT
refuse(struct MHD_Connection *c, struct rreq *q, int rc, const char *msg)
{
    pthread_mutex_lock(&D->lock);
    struct vm *vm = q->uuid[0] ? vm_find_uuid(q->uuid) : NULL;
    event_add("audit", vm ? vm->name : NULL, "refused %s from %s (%s): %s",
              q->kind == R1_CYCLE ? "cycle" : "request",
              q->principal[0] ? q->principal
              : q->peer[0]    ? q->peer
                              : "unauthenticated peer",
              q->addr, msg);
    pthread_mutex_unlock(&D->lock);
    return reply_error(c, q, rc, msg);
}

/* Kerberos mode: accept the request's AP-REQ; q->peer is the host name of
 * its host/FQDN principal. */
static int
krb_authenticate(struct MHD_Connection *c, const struct listener_ctx *kl,
                 struct rreq *q)
{
    const char *a =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!a || strncasecmp(a, "Negotiate ", 10) != 0)
        return vr_err(-EACCES, "no Kerberos ticket (no 'Authorization: "
                               "Negotiate' header)");
    char *principal = NULL, *fqdn = NULL;
    int rc = krb_accept(kl->cred, a + 10, &q->gss, &principal, &fqdn);
    if (principal)
        snprintf(q->principal, sizeof q->principal, "%s", principal);
    if (fqdn)
        snprintf(q->peer, sizeof q->peer, "%s", fqdn);
    free(principal);
    free(fqdn);
    if (rc < 0)
        return rc;
    const char *w =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, KRB_WRAP_HEADER);
    if (w && strcmp(w, KRB_WRAP_VALUE) != 0)
        return vr_err(-EPROTO, "unknown %s: %s", KRB_WRAP_HEADER, w);
    q->wrapped = w != NULL;
    pthread_mutex_lock(&D->lock);
    bool need = D->cfg.krb_encrypt;
    pthread_mutex_unlock(&D->lock);
    if (need && !q->wrapped)
        return vr_err(-EACCES, "this Replica server accepts Kerberos "
                      "replication only encrypted (on the primary: "
                      "'vmreplica replication set VM --kerberos-encrypt "
                      "on')");
    if (gnutls_hash_init(&q->hash, GNUTLS_DIG_SHA256) < 0)
        return vr_err(-ENOMEM, "sha256");
    return 0;
}

/* Kerberos mode, at the end of the body: the MIC over the request's
 * digest must verify before anything the request carries is used. */
static int
krb_check_request(struct MHD_Connection *c, struct rreq *q, const char *url,
                  const char *method)
{
    int rc;
    if (q->wrapped && (rc = krb_unframe_end(&q->unf)) < 0)
        return rc;
    uint8_t sha[32], digest[KRB_DIGEST_LEN];
    gnutls_hash_deinit(q->hash, sha);
    q->hash = NULL;
#define H(name) MHD_lookup_connection_value(c, MHD_HEADER_KIND, name)
    struct krb_req_fields f = {
        .method = method, .path = url, .epoch = H("X-Vmreplica-Epoch"),
        .history = H("X-Vmreplica-History"),
        .encoding = H("Content-Encoding"), .wrap = H(KRB_WRAP_HEADER),
    };
    krb_request_digest(&f, sha, digest);
    if (!q->wrapped)
        return krb_verify(q->gss, digest, H(KRB_MIC_HEADER));
#undef H
    /* Wrapped: the last frame carried the digest (wrap tokens are signed
     * and were checked in sequence). */
    uint8_t diff = 0;
    for (size_t i = 0; i < KRB_DIGEST_LEN; i++)
        diff |= (uint8_t)(digest[i] ^ q->unf.digest[i]);
    if (diff)
        return vr_err(-EACCES, "kerberos: message integrity check failed: "
                               "the body differs from the one signed");
    return 0;
}

static int body_chunk(void *ud, const char *data, size_t n);

static MHD_RESULT
r1_access(void *cls, struct MHD_Connection *c, const char *url,
          const char *method, const char *version VR_UNUSED,
          const char *upload_data, size_t *upload_size, void **con_cls)
{
    struct rreq *q = *con_cls;
    if (!q) {
        q = xcalloc(1, sizeof *q);
        q->fd = -1;
        q->stgfd = -1;
        q->conn = c;
        const struct listener_ctx *lc = cls;
        q->krb = lc->kerberos;
        *con_cls = q;
        guard_request(c, true);
        peer_addr(c, q->addr, sizeof q->addr);
        char *id = NULL;
        vr_err_clear();
        int arc = q->krb ? krb_authenticate(c, lc, q)
                         : verify_peer(c, lc, &id);
        if (arc < 0) {
            /* An unauthenticated peer learns nothing, not even whether the
             * URL exists, and none of its body is read. */
            char msg[512];
            snprintf(msg, sizeof msg, "%s", vr_errmsg());
            return refuse(c, q,
                          arc == -EPROTO || arc == -ETIME ? arc : -EACCES,
                          msg);
        }
        if (id)
            snprintf(q->peer, sizeof q->peer, "%s", id);
        free(id);
        /* Kerberos-wrapped bodies: the unframer's frame buffers. */
        if (q->wrapped && mem_charge(q, R1_KRB_MEM, false) < 0) {
            rreq_fail(q, -EAGAIN, vr_errmsg());
            return MHD_YES;
        }
        if (parse_url(url, method, q) < 0) {
            rreq_fail(q, -EINVAL, vr_errmsg());
            return MHD_YES;
        }
        const char *ep =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Vmreplica-Epoch");
        char *end = NULL;
        errno = 0;
        q->epoch = ep && ep[0] >= '1' && ep[0] <= '9' ? strtoull(ep, &end, 10)
                                                      : 0;
        if (q->kind != R1_TEST && (!ep || !end || *end || errno ||
                                   q->epoch == 0 || q->epoch > INT64_MAX)) {
            rreq_fail(q, -EPROTO, "missing or bad X-Vmreplica-Epoch");
            return MHD_YES;
        }
        const char *hist = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                       "X-Vmreplica-History");
        if (hist) {
            unsigned long n, iv;
            char *e1, *e2;
            n = strtoul(hist, &e1, 10);
            iv = *e1 == '/' ? strtoul(e1 + 1, &e2, 10) : 0;
            if (*e1 != '/' || *e2 || n > REPL_MAX_HISTORY || iv < 1 ||
                iv > 86400) {
                rreq_fail(q, -EPROTO, "bad X-Vmreplica-History");
                return MHD_YES;
            }
            q->has_history = true;
            q->history = (unsigned)n;
            q->interval_s = (unsigned)iv;
        }
        pthread_mutex_lock(&D->lock);
        bool enabled = D->cfg.replica_enabled;
        arc = enabled ? auth_authorize(q->peer, &q->root, &q->group) : 0;
        pthread_mutex_unlock(&D->lock);
        if (!enabled)
            rreq_fail(q, -EPERM, "replication is not enabled on this server");
        else if (arc < 0)
            rreq_fail(q, arc, vr_errmsg());
        return MHD_YES;
    }

    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (q->wrapped) {
            if (!q->unframe_failed) {
                int rc = krb_unframe(&q->unf, q->gss, upload_data, n,
                                     body_chunk, q);
                if (rc < 0) {
                    q->unframe_failed = true;
                    rreq_fail(q, rc, vr_errmsg());
                }
            }
        } else {
            VR_IGNORE(body_chunk(q, upload_data, n));
        }
        return MHD_YES;
    }

    /* End of request. */
    if (q->krb && !q->unframe_failed) {
        /* Checked even when the request already failed: a body changed on
         * the way is the cause to report, not what it made us refuse. */
        vr_err_clear();
        int rc = krb_check_request(c, q, url, method);
        if (rc < 0) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", vr_errmsg());
            release_busy(q);
            return refuse(c, q, rc, msg);
        }
    }
    if (q->failed) {
        release_busy(q);
        return refuse(c, q, q->rc, q->msg);
    }
    json_object *out = NULL;
    int rc = 0;
    vr_err_clear();
    switch (q->kind) {
    case R1_STATUS: {
        pthread_mutex_lock(&D->lock);
        struct vm *vm;
        q->epoch = 0;
        rc = own_vm(q, &vm);
        if (rc == 0)
            out = replica_status_json(vm);
        pthread_mutex_unlock(&D->lock);
        break;
    }
    case R1_REGISTER:
        rc = do_register(q, &out);
        break;
    case R1_INITIAL_DONE:
        rc = do_initial_done(q, &out);
        break;
    case R1_REMOVE:
        rc = do_remove(q, &out);
        break;
    case R1_PREPARED:
        rc = do_prepared(q, &out);
        break;
    case R1_TEST:
        /* Authenticated and authorized (or refused) like any request. */
        out = json_object_new_object();
        pthread_mutex_lock(&D->lock);
        json_object_object_add(out, "server", D->cfg.hostname
                                   ? json_object_new_string(D->cfg.hostname)
                                   : NULL);
        pthread_mutex_unlock(&D->lock);
        json_object_object_add(out, "primary", json_object_new_string(q->peer));
        json_object_object_add(out, "storage", json_object_new_string(q->root));
        json_object_object_add(out, "trust_group",
                               json_object_new_string(q->group));
        break;
    case R1_BASE:
    case R1_CYCLE:
        if (!q->dec) {
            rc = upload_begin(q, c);
            if (rc == 1) {
                rc = 0;
                out = json_object_new_object();
                break;
            }
        }
        if (rc == 0)
            rc = upload_finish(q, &out);
        release_busy(q);
        break;
    }
    if (rc < 0) {
        json_object_put(out);
        char msg[512];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        /* What the peer sent or may not do is audited; a failure of ours
         * (5xx: no space, I/O) is logged. */
        if (http_status_for(rc) < 500 || rc == -ENOSPC || rc == -EAGAIN)
            return refuse(c, q, rc, msg);
        log_warn("replica", "%s %s from %s: %s", method, url, q->peer, msg);
        return reply_error(c, q, rc, msg);
    }
    return reply(c, q, 200, out ? out : json_object_new_object());
}

/* An upload refused while its body still arrives (drained until its end,
 * to answer): its decoder, temporary file, space claim and memory charge
 * go now, not when the peer has sent the rest, so that concurrent
 * transfers can have them. */
static void
upload_abort(struct rreq *q)
{
    cyc_decoder_free(q->dec);
    q->dec = NULL;
    if (q->fd >= 0) {
        close(q->fd);
        q->fd = -1;
    }
    if (q->tmp_path) {
        unlinkat(q->stgfd, q->tmp_name, 0);
        free(q->tmp_path);
        q->tmp_path = NULL;
    }
    claim_unlink(q);
    mem_release(q);
}

/* A piece of the request's (plaintext) body. */
static int
body_chunk(void *ud, const char *data, size_t n)
{
    struct rreq *q = ud;
    if (q->hash)
        gnutls_hash(q->hash, data, n);
    if (q->failed)
        return 0; /* drain; answer at the end */
    vr_fault_point("receive-chunk");
    if (q->kind == R1_BASE || q->kind == R1_CYCLE) {
        int rc = 0;
        if (!q->dec && (rc = upload_begin(q, q->conn)) != 0) {
            if (rc == 1) {
                q->kind = R1_STATUS; /* duplicate cycle: ignore body */
                return 0;
            }
            rreq_fail(q, rc, vr_errmsg());
            upload_abort(q);
            return 0;
        }
        if ((rc = cyc_decoder_feed(q->dec, data, n)) < 0) {
            rreq_fail(q, rc, vr_errmsg());
            upload_abort(q);
        }
    } else if (q->kind != R1_STATUS) {
        if (q->len + n > R1_JSON_MAX) {
            rreq_fail(q, -EFBIG, "request body too large");
            return 0;
        }
        if (mem_charge(q, n + (q->body ? 0 : 1), false) < 0) {
            rreq_fail(q, -EAGAIN, vr_errmsg());
            return 0;
        }
        q->body = xrealloc(q->body, q->len + n + 1);
        memcpy(q->body + q->len, data, n);
        q->len += n;
        q->body[q->len] = '\0';
    }
    return 0;
}

/* --- connection guard ---------------------------------------------------- */

/* Every connection of the listeners is tracked so that a peer cannot hold
 * the Replica server with connections that never finish a request
 * (slowloris: MHD's timeout only ends idle connections, and one byte a
 * second is not idle), nor exceed a cap on connections, and so that a
 * connection refused before any request (a failed TLS handshake: an old
 * protocol version, plaintext on the TLS port, …) is still audited with the
 * peer's address. */
struct conn_guard {
    struct conn_guard *next;
    int fd;
    char addr[80];
    uint64_t start_ms; /* of the request being received, or of the idle */
    bool in_request;   /* the access handler has the request's headers */
    unsigned requests; /* completed on this connection */
    bool cut;          /* shut down by the watchdog */
    bool hs_failed;    /* a TLS handshake failed while it had sent bytes */
};

static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;
static struct conn_guard *guards;
static unsigned guard_count;
static unsigned header_deadline_s = 30; /* a request's headers, whole */
static unsigned max_connections = 64;
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
/* A failed TLS handshake: MHD says so in its log, from the connection's
 * thread, and tells us of the close from another, with neither the reason
 * nor the connection.  So each connection still without a request that has
 * sent bytes (TCP_INFO) is marked then, and audited if it closes without a
 * request: a port probe (connect, close) sends nothing and is not audited;
 * wrong only for a peer that had sent part of its handshake at that
 * moment and then gives up without a request. */

static void
guard_audit(const char *addr, const char *why)
{
    pthread_mutex_lock(&D->lock);
    event_add("audit", NULL, "refused connection from %s: %s", addr, why);
    pthread_mutex_unlock(&D->lock);
}

static void listener_refresh(void);

/* Is fd still the connection from addr?  (Should MHD close a socket before
 * it tells us, its number could be another's by now.) */
static bool
same_peer(int fd, const char *addr)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char now[80];
    if (fd < 0 || getpeername(fd, (struct sockaddr *)&ss, &len) < 0)
        return false;
    sockaddr_str((const struct sockaddr *)&ss, now, sizeof now);
    return strcmp(now, addr) == 0;
}

static void *
guard_main(void *arg VR_UNUSED)
{
    for (unsigned tick = 1;; tick++) {
        struct timespec ts = { 0, 250 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        if (tick % 20 == 0)
            listener_refresh();
        uint64_t now = vr_mono_ms();
        pthread_mutex_lock(&guard_lock);
        for (struct conn_guard *g = guards; g; g = g->next) {
            /* Headers not complete in time.  (shutdown, not close: the fd
             * stays MHD's; its next read sees the end.) */
            if (!g->in_request && !g->cut &&
                now - g->start_ms > (uint64_t)header_deadline_s * 1000 &&
                same_peer(g->fd, g->addr)) {
                g->cut = true;
                shutdown(g->fd, SHUT_RDWR);
            }
        }
        pthread_mutex_unlock(&guard_lock);
    }
    return NULL;
}

static void
guard_start(void)
{
    const char *v = getenv("VMREPLICA_TEST_IDLE_TIMEOUT");
    if (v && atoi(v) > 0)
        header_deadline_s = (unsigned)atoi(v);
    v = getenv("VMREPLICA_TEST_MAX_CONNECTIONS");
    if (v && atoi(v) > 0)
        max_connections = (unsigned)atoi(v);
    v = getenv("VMREPLICA_TEST_MEM_BUDGET_MIB");
    if (v && atoi(v) > 0)
        mem_budget = (uint64_t)atoi(v) << 20;
    /* Room for one upload of the largest record, and some small ones. */
    if (mem_budget < 2 * R1_BIG_BUF)
        mem_budget = 2 * R1_BIG_BUF;
    pthread_t t;
    if (pthread_create(&t, NULL, guard_main, NULL) == 0)
        pthread_detach(t);
}

/* Has the peer sent anything yet?  (False when it cannot be told: the
 * socket is gone or no longer this peer's.) */
static bool
sent_something(const struct conn_guard *g)
{
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    memset(&ti, 0, sizeof ti);
    if (!same_peer(g->fd, g->addr) ||
        getsockopt(g->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
        len < offsetof(struct tcp_info, tcpi_bytes_received) +
                  sizeof ti.tcpi_bytes_received)
        return false;
    return ti.tcpi_bytes_received > 1; /* (a FIN counts one) */
}

static void
mhd_logger(void *cls VR_UNUSED, const char *fmt, va_list ap)
{
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '.'))
        msg[--n] = '\0';
    if (strstr(msg, "handshake")) {
        pthread_mutex_lock(&guard_lock);
        for (struct conn_guard *g = guards; g; g = g->next)
            if (!g->in_request && g->requests == 0 && sent_something(g))
                g->hs_failed = true;
        pthread_mutex_unlock(&guard_lock);
    }
    log_debug("replica", "libmicrohttpd: %s", msg);
}

static MHD_RESULT
accept_policy(void *cls VR_UNUSED, const struct sockaddr *sa,
              socklen_t len VR_UNUSED)
{
    pthread_mutex_lock(&guard_lock);
    bool full = guard_count >= max_connections;
    pthread_mutex_unlock(&guard_lock);
    if (!full)
        return MHD_YES;
    char addr[96], why[64];
    sockaddr_str(sa, addr, sizeof addr);
    snprintf(why, sizeof why, "too many connections (%u)", max_connections);
    guard_audit(addr, why);
    return MHD_NO;
}

static void
notify_connection(void *cls VR_UNUSED, struct MHD_Connection *c,
                  void **socket_context,
                  enum MHD_ConnectionNotificationCode code)
{
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        struct conn_guard *g = xcalloc(1, sizeof *g);
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        g->fd = ci ? ci->connect_fd : -1;
        peer_addr(c, g->addr, sizeof g->addr);
        g->start_ms = vr_mono_ms();
        pthread_mutex_lock(&guard_lock);
        g->next = guards;
        guards = g;
        guard_count++;
        pthread_mutex_unlock(&guard_lock);
        *socket_context = g;
        return;
    }
    struct conn_guard *g = *socket_context;
    if (!g)
        return;
    *socket_context = NULL;
    pthread_mutex_lock(&guard_lock);
    for (struct conn_guard **pp = &guards; *pp; pp = &(*pp)->next)
        if (*pp == g) {
            *pp = g->next;
            guard_count--;
            break;
        }
    bool hs_failed = g->hs_failed;
    pthread_mutex_unlock(&guard_lock);
    if (g->requests == 0 && !g->in_request) {
        char why[320];
        if (g->cut)
            snprintf(why, sizeof why, "no complete request within %u s",
                     header_deadline_s);
        else if (hs_failed)
            snprintf(why, sizeof why, "TLS handshake failed: an old "
                     "protocol version, not TLS at all, or cut short");
        else
            why[0] = '\0';
        if (why[0])
            guard_audit(g->addr, why);
    }
    free(g);
}

/* The access handler has a request's headers / the request is over. */
static void
guard_request(struct MHD_Connection *c, bool begin)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    struct conn_guard *g = ci ? ci->socket_context : NULL;
    if (!g)
        return;
    pthread_mutex_lock(&guard_lock);
    g->in_request = begin;
    if (!begin) {
        g->requests++;
        g->start_ms = vr_mono_ms(); /* the next request's headers */
    }
    pthread_mutex_unlock(&guard_lock);
}

/* --- listeners ----------------------------------------------------------- */

/* The certificate listener (HTTPS) and the Kerberos listener (HTTP) run
 * per D->cfg.auth.  MHD keeps pointers to the PEM strings it was given, and
 * the Kerberos listener's connections use its credential, until it stops. */
struct listener {
    struct MHD_Daemon *mhd;
    unsigned port;
    struct listener_ctx *ctx;
    char *key, *cert, *ca, *crl; /* certificate (crl: NULL if none) */
    char *keytab, *self;         /* Kerberos */
};

static struct listener cert_l, krb_l;

/* Free what l holds (not l itself). */
static void
listener_clear(struct listener *l)
{
    free(l->key);
    free(l->cert);
    free(l->ca);
    free(l->crl);
    if (l->ctx) {
        krb_acceptor_close(&l->ctx->cred);
        if (l->ctx->crl)
            gnutls_x509_trust_list_deinit(l->ctx->crl, 1);
        free(l->ctx);
    }
    free(l->keytab);
    free(l->self);
    memset(l, 0, sizeof *l);
}

static void *
retire_main(void *arg)
{
    struct listener *l = arg;
    MHD_stop_daemon(l->mhd);
    listener_clear(l);
    free(l);
    return NULL;
}

/* Stop a listener.  Its connection threads may be waiting for d->lock,
 * which our caller may hold, so unless wait is set the old daemon stops
 * listening at once (its port is free again) and finishes its requests in
 * a thread of its own. */
static void
listener_stop(struct listener *cur, struct MHD_Daemon **pub, bool wait)
{
    if (!cur->mhd)
        return;
    struct listener *l = xmalloc(sizeof *l);
    *l = *cur;
    memset(cur, 0, sizeof *cur);
    *pub = NULL;
    MHD_socket fd = MHD_quiesce_daemon(l->mhd);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
    pthread_t t;
    if (!wait && pthread_create(&t, NULL, retire_main, l) == 0)
        pthread_detach(t);
    else
        retire_main(l);
}

void
replica_listener_stop(void)
{
    listener_stop(&cert_l, &D->listener, true);
    listener_stop(&krb_l, &D->krb_listener, true);
}

static struct MHD_Daemon *start_mhd_once(bool tls, unsigned port, void *cls,
                                         const struct listener *l);

/* A listener restarted on its port: the old one's socket may still be held
 * for a moment by its polling thread (a poll() keeps a closed socket alive
 * until it returns), so binding is retried briefly. */
static struct MHD_Daemon *
start_mhd(bool tls, unsigned port, void *cls, const struct listener *l)
{
    struct MHD_Daemon *d = NULL;
    for (int i = 0; i < 40 && !d; i++) {
        if (i > 0) {
            struct timespec ts = { 0, 25 * 1000 * 1000 };
            nanosleep(&ts, NULL);
        }
        d = start_mhd_once(tls, port, cls, l);
    }
    return d;
}

static struct MHD_Daemon *
start_mhd_once(bool tls, unsigned port, void *cls, const struct listener *l)
{
    pthread_once(&guard_once, guard_start);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL |
                     MHD_USE_ITC | MHD_USE_ERROR_LOG;
    /* MHD's own limits sit above ours (accept_policy), as a backstop. */
    unsigned limit = max_connections + 8;
    if (!tls)
        return MHD_start_daemon(
            flags, (uint16_t)port, accept_policy, NULL, r1_access, cls,
            MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
            MHD_OPTION_NOTIFY_COMPLETED, rreq_done, NULL,
            MHD_OPTION_NOTIFY_CONNECTION, notify_connection, NULL,
            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
            MHD_OPTION_CONNECTION_LIMIT, limit,
            MHD_OPTION_PER_IP_CONNECTION_LIMIT, limit, MHD_OPTION_END);
    return MHD_start_daemon(
        flags | MHD_USE_TLS, (uint16_t)port, accept_policy, NULL, r1_access,
        cls, MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
        MHD_OPTION_HTTPS_MEM_KEY, l->key, MHD_OPTION_HTTPS_MEM_CERT,
        l->cert, MHD_OPTION_HTTPS_MEM_TRUST, l->ca,
        MHD_OPTION_HTTPS_PRIORITIES,
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2",
        MHD_OPTION_NOTIFY_COMPLETED, rreq_done, NULL,
        MHD_OPTION_NOTIFY_CONNECTION, notify_connection, NULL,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
        MHD_OPTION_CONNECTION_LIMIT, limit,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, limit, MHD_OPTION_END);
}

static bool
same(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static int
cert_listener_apply(bool on)
{
    const struct server_cfg *c = &D->cfg;
    if (!on) {
        listener_stop(&cert_l, &D->listener, false);
        return 0;
    }
    struct listener n = { .port = c->cert_port };
    int rc = io_read_file(c->key, 1 << 20, &n.key, NULL);
    if (rc == 0)
        rc = io_read_file(c->cert, 1 << 20, &n.cert, NULL);
    if (rc == 0)
        rc = io_read_file(c->ca, 4 << 20, &n.ca, NULL);
    if (rc == 0 && c->crl)
        rc = io_read_file(c->crl, 64 << 20, &n.crl, NULL);
    if (rc == 0 && cert_l.mhd && cert_l.port == n.port &&
        same(n.key, cert_l.key) && same(n.cert, cert_l.cert) &&
        same(n.ca, cert_l.ca) && same(n.crl, cert_l.crl))
        rc = 1; /* unchanged */
    n.ctx = xcalloc(1, sizeof *n.ctx);
    if (rc == 0 && n.crl) {
        /* The CRL is checked against the CAs: one they did not sign is
         * refused here, not ignored later. */
        gnutls_datum_t ca = { (unsigned char *)n.ca, (unsigned)strlen(n.ca) };
        gnutls_datum_t crl = { (unsigned char *)n.crl,
                               (unsigned)strlen(n.crl) };
        gnutls_x509_trust_list_init(&n.ctx->crl, 0);
        int r = gnutls_x509_trust_list_add_trust_mem(
            n.ctx->crl, &ca, NULL, GNUTLS_X509_FMT_PEM, 0, 0);
        if (r > 0)
            r = gnutls_x509_trust_list_add_trust_mem(
                n.ctx->crl, NULL, &crl, GNUTLS_X509_FMT_PEM,
                GNUTLS_TL_VERIFY_CRL | GNUTLS_TL_FAIL_ON_INVALID_CRL, 0);
        if (r <= 0)
            rc = vr_err(-EINVAL, "crl %s: %s", c->crl,
                        r < 0 ? gnutls_strerror(r)
                              : "no revocation list signed by the ca");
    }
    if (rc != 0) {
        listener_clear(&n);
        return rc < 0 ? rc : 0;
    }
    listener_stop(&cert_l, &D->listener, false);
    n.mhd = start_mhd(true, n.port, n.ctx, &n);
    if (!n.mhd) {
        listener_clear(&n);
        return vr_err(-EADDRINUSE,
                      "replica server: cannot listen on port %u with the "
                      "given certificate",
                      c->cert_port);
    }
    cert_l = n;
    D->listener = n.mhd;
    log_info("replica", "listening on port %u (certificate%s)", n.port,
             n.crl ? ", with a revocation list" : "");
    return 0;
}

static int
krb_listener_apply(bool on)
{
    const struct server_cfg *c = &D->cfg;
    if (!on) {
        listener_stop(&krb_l, &D->krb_listener, false);
        return 0;
    }
    if (krb_l.mhd && krb_l.port == c->krb_port &&
        same(krb_l.keytab, c->keytab) && same(krb_l.self, c->hostname))
        return 0;
    struct listener n = { .port = c->krb_port };
    n.ctx = xcalloc(1, sizeof *n.ctx);
    n.ctx->kerberos = true;
    n.keytab = xstrdup(c->keytab);
    n.self = xstrdup(c->hostname);
    CLEANUP_FREE char *rcache =
        xasprintf("file2:%s/krb5.rcache2", D->state_dir);
    int rc = krb_acceptor_open(c->keytab, c->hostname, rcache, &n.ctx->cred);
    if (rc < 0) {
        listener_clear(&n);
        return rc;
    }
    listener_stop(&krb_l, &D->krb_listener, false);
    n.mhd = start_mhd(false, n.port, n.ctx, &n);
    if (!n.mhd) {
        listener_clear(&n);
        return vr_err(-EADDRINUSE, "replica server: cannot listen on port "
                      "%u (Kerberos)", c->krb_port);
    }
    krb_l = n;
    D->krb_listener = n.mhd;
    log_info("replica", "listening on port %u (Kerberos, HTTP/%s)", n.port,
             n.self);
    return 0;
}

bool
cfg_wants_certificate(const struct server_cfg *c)
{
    return !c->auth || strcmp(c->auth, "kerberos") != 0;
}

bool
cfg_wants_kerberos(const struct server_cfg *c)
{
    return c->auth && strcmp(c->auth, "certificate") != 0;
}

/* Every 5 s (from the guard's thread): a renewed certificate, key, CA or
 * revocation list file is picked up without a restart.  The listener is
 * re-applied, which restarts it only if a file's content changed, and only
 * once the certificate and key match again (a renewal half written is
 * left alone until it is complete). */
static void
listener_refresh(void)
{
    pthread_mutex_lock(&D->lock);
    const struct server_cfg *c = &D->cfg;
    bool cert = c->replica_enabled && !D->shutting_down && c->cert &&
                c->key && c->ca && cfg_wants_certificate(c);
    if (cert && tls_check_material(c->cert, c->key, c->ca) == 0) {
        struct MHD_Daemon *before = D->listener;
        if (cert_listener_apply(true) < 0)
            log_warn("replica", "reloading the certificate files: %s",
                     vr_errmsg());
        else if (D->listener != before)
            event_add("info", NULL, "replica server: certificate files "
                      "changed, reloaded (port %u)", c->cert_port);
    }
    pthread_mutex_unlock(&D->lock);
}

int
replica_listener_apply(void)
{
    const struct server_cfg *c = &D->cfg;
    bool on = c->replica_enabled;
    bool cert = on && cfg_wants_certificate(c);
    bool krb = on && cfg_wants_kerberos(c);
    int rc = cert_listener_apply(cert);
    if (rc == 0)
        rc = krb_listener_apply(krb);
    return rc;
}

/* --- applier -------------------------------------------------------------- */

/* Test hook: with $VMREPLICA_TEST_APPLYLOG set, append "<cycle> <disk id>
 * <sha256>" per disk after every applied cycle, the same lines the data
 * plane's hashlog writes at each seal on the primary, so a test can check
 * that every state the Replica VM passes through is the primary's state at
 * that cycle's seal. */
static void
test_applylog(const struct vm *vm, uint64_t n)
{
    const char *log = getenv("VMREPLICA_TEST_APPLYLOG");
    if (!log || !*log)
        return;
    FILE *f = fopen(log, "a");
    if (!f)
        return;
    for (unsigned i = 0; i < vm->ndisks; i++) {
        int fd = storage_open(vm->dir, vm->disks[i].path, O_RDONLY, 0);
        gnutls_hash_hd_t h;
        if (fd < 0 || gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0) {
            if (fd >= 0)
                close(fd);
            break;
        }
        uint8_t *buf = xmalloc(1 << 20);
        ssize_t r;
        while ((r = read(fd, buf, 1 << 20)) > 0)
            gnutls_hash(h, buf, (size_t)r);
        free(buf);
        close(fd);
        uint8_t md[32];
        gnutls_hash_deinit(h, md);
        fprintf(f, "%llu %s ", (unsigned long long)n, vm->disks[i].id);
        for (int k = 0; k < 32; k++)
            fprintf(f, "%02x", md[k]);
        fputc('\n', f);
    }
    fclose(f);
}

/* The header flags of a staged cycle (0 if unreadable: applying it will
 * say why). */
static uint32_t
staged_flags(const struct vm *vm, const char *path)
{
    uint8_t buf[CYC_HDR_BYTES];
    struct cyc_hdr h;
    int fd = storage_open(vm->dir, path, O_RDONLY, 0);
    if (fd < 0) {
        vr_err_clear();
        return 0;
    }
    ssize_t n = pread(fd, buf, sizeof buf, 0);
    close(fd);
    if (n != (ssize_t)sizeof buf || cyc_hdr_decode(buf, &h) < 0) {
        vr_err_clear();
        return 0;
    }
    return h.flags;
}

/* Remove an applied cycle's file from staging (a link on the way is not
 * followed: the staging directory is opened beneath the storage). */
static void
unlink_staged(const struct vm *vm, const char *path)
{
    CLEANUP_FREE char *stg = staging_dir(vm->repl);
    int sfd = storage_open(vm->dir, stg, O_RDONLY | O_DIRECTORY, 0);
    if (sfd < 0) {
        log_warn("applier", "%s: %s", vm->name, vr_errmsg());
        vr_err_clear();
        return;
    }
    unlinkat(sfd, strrchr(path, '/') + 1, 0);
    close(sfd);
}

/* Apply cycle n of vm from staging, then record it.  Called without the
 * lock; takes it to record. */
static int
apply_one(struct vm *vm, uint64_t n, bool locked)
{
    CLEANUP_FREE char *path = cycle_path(vm->repl, n);
    uint64_t nrec = 0;
    uint64_t t0 = vr_mono_ms();
    /* While the lock is dropped, vm->applying keeps the VM and its
     * replication from being removed under us. */
    vm->applying = true;
    if (locked)
        pthread_mutex_unlock(&D->lock);
    bool app = (staged_flags(vm, path) & CYC_F_APP) != 0;
    int rc = history_capture(vm, n, path);
    if (rc == 0)
        rc = failover_test_refresh(vm, n);
    if (rc == 0)
        rc = apply_payload(vm, path, &nrec);
    if (rc == 0) {
        test_applylog(vm, n);
        vr_fault_point("apply-before-commit");
    }
    pthread_mutex_lock(&D->lock);
    if (rc == 0) {
        vm->repl->applied_cycle = n;
        vm->repl->last_ok_ms = vr_wall_ms();
        rc = catalog_save_repl(D->cat, vm->repl);
    }
    if (rc == 0) {
        unlink_staged(vm, path);
        log_debug("applier", "%s: applied cycle %llu (%llu records, %llu ms)",
                  vm->name, (unsigned long long)n, (unsigned long long)nrec,
                  (unsigned long long)(vr_mono_ms() - t0));
        /* The cycle is applied whatever happens to its point: a failure
         * here is retried by history_recover at the next start. */
        if (history_after_apply(vm, n, app) < 0) {
            event_add("warning", vm->name, "recovery history after cycle "
                      "%llu: %s", (unsigned long long)n, vr_errmsg());
            vr_err_clear();
        }
        pthread_cond_broadcast(&D->cond);
    } else {
        vm->repl->errors++;
        free(vm->repl->last_error);
        vm->repl->last_error = xstrdup(vr_errmsg());
        event_add("error", vm->name, "apply cycle %llu: %s",
                  (unsigned long long)n, vr_errmsg());
    }
    vm->applying = false;
    pthread_cond_broadcast(&D->cond);
    if (!locked)
        pthread_mutex_unlock(&D->lock);
    return rc;
}

int
replica_recover(void)
{
    for (struct vm *vm = D->vms; vm; vm = vm->next) {
        struct repl *r = vm->repl;
        if (vm->mode != VM_MODE_REPLICA || !r || !r->storage)
            continue;
        CLEANUP_FREE char *stg = staging_dir(r);
        int sfd = storage_open(r->storage, stg, O_RDONLY | O_DIRECTORY, 0);
        DIR *dir = sfd >= 0 ? fdopendir(sfd) : NULL;
        if (sfd < 0 && sfd != -ENOENT)
            log_warn("applier", "%s: %s", vm->name, vr_errmsg());
        if (sfd >= 0 && !dir)
            close(sfd);
        vr_err_clear();
        if (dir) {
            struct dirent *de;
            while ((de = readdir(dir))) {
                size_t n = strlen(de->d_name);
                bool tmp = n > 4 && strcmp(de->d_name + n - 4, ".tmp") == 0;
                unsigned long long c = strtoull(de->d_name, NULL, 10);
                bool old = n == 26 && strcmp(de->d_name + 20, ".cycle") == 0 &&
                           c <= r->applied_cycle;
                if (tmp || old)
                    unlinkat(dirfd(dir), de->d_name, 0);
            }
            closedir(dir);
        }
        if (failover_recover(vm) < 0) {
            log_warn("failover", "%s: failover: %s", vm->name,
                     vr_errmsg());
            vr_err_clear();
        }
        if (history_recover(vm) < 0) {
            log_warn("applier", "%s: recovery history: %s", vm->name,
                     vr_errmsg());
            vr_err_clear();
        }
        /* A failover's view must not change under it. */
        while (r->initial_done && r->applied_cycle < r->last_cycle &&
               !r->failover_point) {
            uint64_t n = r->applied_cycle + 1;
            log_info("applier", "%s: recovering: applying staged cycle %llu",
                     vm->name, (unsigned long long)n);
            int rc = apply_one(vm, n, true);
            if (rc < 0) {
                /* In memory only: the next start tries again. */
                VR_IGNORE(repl_transition(vm, REPL_ST_ERROR, 0));
                break;
            }
        }
    }
    return 0;
}

static bool applier_stop;

static void *
applier_main(void *arg VR_UNUSED)
{
    pthread_mutex_lock(&D->lock);
    while (!applier_stop) {
        struct vm *todo = NULL;
        uint64_t now = vr_mono_ms(), next_retry = 0;
        for (struct vm *vm = D->vms; vm && !todo; vm = vm->next) {
            struct repl *r = vm->repl;
            if (vm->mode != VM_MODE_REPLICA || !r || !r->initial_done ||
                r->st != REPL_ST_REPLICATING ||
                r->applied_cycle >= r->last_cycle || r->test_busy)
                continue;
            if (r->apply_retry_ms > now) {
                if (!next_retry || r->apply_retry_ms < next_retry)
                    next_retry = r->apply_retry_ms;
                continue;
            }
            todo = vm;
        }
        if (!todo) {
            if (next_retry) {
                daemon_wait_ms(next_retry - now);
            } else {
                pthread_cond_wait(&D->cond, &D->lock);
            }
            continue;
        }
        struct repl *r = todo->repl;
        int rc = apply_one(todo, r->applied_cycle + 1, true);
        if (!todo->repl)
            continue; /* removed meanwhile */
        r = todo->repl;
        if (rc == -ENOSPC || rc == -EDQUOT || rc == -EAGAIN) {
            /* A full Replica disk is recoverable (SPEC §4): the staged
             * cycle stays, applying again from its start is idempotent.
             * Retry every frequency, at least 1 s and at most 30 s. */
            uint64_t delay_ms = (uint64_t)r->frequency_s * 1000;
            if (delay_ms < 1000 || delay_ms > 30000)
                delay_ms = delay_ms < 1000 ? 1000 : 30000;
            r->apply_retry_ms = vr_mono_ms() + delay_ms;
            log_warn("applier", "%s: %s; retrying in %llu s", todo->name,
                     rc == -EAGAIN ? "the test failover's view is not "
                                     "answering"
                                   : "replica storage full",
                     (unsigned long long)delay_ms / 1000);
        } else if (rc < 0) {
            VR_IGNORE(repl_transition(todo, REPL_ST_ERROR, REPL_T_SAVE));
        } else {
            r->apply_retry_ms = 0;
        }
    }
    pthread_mutex_unlock(&D->lock);
    return NULL;
}

int
replica_applier_start(void)
{
    applier_stop = false;
    if (pthread_create(&D->applier, NULL, applier_main, NULL) != 0)
        return vr_err(-EAGAIN, "start applier thread");
    return 0;
}

void
replica_applier_stop(void)
{
    pthread_mutex_lock(&D->lock);
    applier_stop = true;
    pthread_cond_broadcast(&D->cond);
    pthread_mutex_unlock(&D->lock);
    pthread_join(D->applier, NULL);
}
