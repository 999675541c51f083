/* peer.c: the primary's client of the replication protocol — one request
 * to a Replica server over HTTPS with mutual TLS, or over HTTP with a
 * Kerberos token per request (and, if asked, wrapped bodies), through
 * libcurl.  A JSON body or an upload from a file descriptor goes out; the
 * Replica server's refusal comes back as its errno and message. */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "krb.h"
#include "peer.h"

#define RESP_MAX (64u << 10)

/* --- HTTPS client --------------------------------------------------------- */

struct resp_buf {
    char *data;
    size_t len;
};

static size_t
on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    struct resp_buf *b = ud;
    size_t n = size * nmemb;
    if (b->len + n > RESP_MAX)
        return 0; /* abort: a Replica server's answers are small */
    b->data = xrealloc(b->data, b->len + n + 1);
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

static int
errno_of_name(const char *name)
{
    static const struct {
        const char *n;
        int e;
    } t[] = { { "EPERM", EPERM },   { "EACCES", EACCES },
              { "ENOENT", ENOENT }, { "EEXIST", EEXIST },
              { "EBUSY", EBUSY },   { "ESTALE", ESTALE },
              { "EINVAL", EINVAL }, { "EPROTO", EPROTO },
              { "EFBIG", EFBIG },   { "ENOSPC", ENOSPC },
              { "EBADMSG", EBADMSG }, { "ETIME", ETIME } };
    for (size_t i = 0; name && i < ARRAY_SIZE(t); i++)
        if (strcmp(t[i].n, name) == 0)
            return t[i].e;
    return EIO;
}

/* Certificate mode, once TLS is up and before the request goes out: the
 * Replica server's certificate must carry the serverAuth purpose (SPEC
 * §6).  curl's GnuTLS backend checks the chain and the name, not the
 * purpose. */
struct prereq {
    CURL *h;
    char why[160];
};

static int
check_server_purpose(void *ud, char *ip VR_UNUSED, char *local VR_UNUSED,
                     int rport VR_UNUSED, int lport VR_UNUSED)
{
    struct prereq *pr = ud;
    struct curl_tlssessioninfo *ti = NULL;
    if (curl_easy_getinfo(pr->h, CURLINFO_TLS_SSL_PTR, &ti) != CURLE_OK ||
        !ti || ti->backend != CURLSSLBACKEND_GNUTLS || !ti->internals) {
        snprintf(pr->why, sizeof pr->why, "cannot inspect the TLS session");
        return CURL_PREREQFUNC_ABORT;
    }
    unsigned n = 0;
    const gnutls_datum_t *certs =
        gnutls_certificate_get_peers((gnutls_session_t)ti->internals, &n);
    gnutls_x509_crt_t crt;
    bool server = false;
    if (certs && n > 0 && gnutls_x509_crt_init(&crt) >= 0) {
        if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) >= 0)
            for (unsigned i = 0; i < 32 && !server; i++) {
                char oid[128];
                size_t sz = sizeof oid;
                if (gnutls_x509_crt_get_key_purpose_oid(crt, i, oid, &sz,
                                                        NULL) < 0)
                    break;
                server = strcmp(oid, GNUTLS_KP_TLS_WWW_SERVER) == 0;
            }
        gnutls_x509_crt_deinit(crt);
    }
    if (server)
        return CURL_PREREQFUNC_OK;
    snprintf(pr->why, sizeof pr->why, "its certificate lacks the serverAuth "
             "extended key usage");
    return CURL_PREREQFUNC_ABORT;
}

/* Kerberos mode: does the answer carry HTTP/SERVER's MIC over its status
 * and body?  (Its reason in vr_errmsg() if not.) */
static bool
answer_signed(gss_ctx_id_t ctx, long status, const struct resp_buf *body,
              const char *mic)
{
    if (ctx == GSS_C_NO_CONTEXT) {
        vr_err(-EACCES, "no Kerberos context");
        return false;
    }
    uint8_t sha[32], digest[KRB_DIGEST_LEN];
    gnutls_hash_fast(GNUTLS_DIG_SHA256, body->data ? body->data : "",
                     body->len, sha);
    krb_response_digest((unsigned)status, sha, digest);
    return krb_verify(ctx, digest, mic) == 0;
}

/* Response headers: the Replica server's MIC in Kerberos mode. */
static size_t
on_header(char *ptr, size_t size, size_t nmemb, void *ud)
{
    char **mic = ud;
    size_t n = size * nmemb;
    static const char name[] = KRB_MIC_HEADER ":";
    if (n > sizeof name - 1 && n < KRB_TOKEN_MAX &&
        strncasecmp(ptr, name, sizeof name - 1) == 0) {
        const char *v = ptr + sizeof name - 1;
        size_t l = n - (sizeof name - 1);
        while (l && (*v == ' ' || *v == '\t'))
            v++, l--;
        while (l && (v[l - 1] == '\r' || v[l - 1] == '\n' || v[l - 1] == ' '))
            l--;
        free(*mic);
        *mic = xstrndup(v, l);
    }
    return n;
}

/* SHA-256 of the first len bytes of fd. */
static int
hash_fd(int fd, uint64_t len, uint8_t out[32])
{
    gnutls_hash_hd_t h;
    if (gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0)
        return vr_err(-ENOMEM, "sha256");
    CLEANUP_FREE char *buf = xmalloc(1 << 20);
    uint64_t off = 0;
    int rc = 0;
    while (off < len) {
        size_t want = len - off < (1 << 20) ? (size_t)(len - off) : 1 << 20;
        ssize_t r = pread(fd, buf, want, (off_t)off);
        if (r <= 0) {
            rc = vr_err(r < 0 ? -errno : -EIO, "read upload: %s",
                        r < 0 ? strerror(errno) : "short file");
            break;
        }
        gnutls_hash(h, buf, (size_t)r);
        off += (uint64_t)r;
    }
    gnutls_hash_deinit(h, out);
    return rc;
}

/* The body of an encrypted upload: wrap frames made on the fly, then the
 * last frame with the request digest. */
struct wrap_src {
    int fd;
    uint64_t off, len;
    gss_ctx_id_t ctx;
    const struct krb_req_fields *fields;
    gnutls_hash_hd_t hash;
    bool done;
    uint8_t *frame;
    size_t flen, fpos;
    char *plain;
    int err;
};

static size_t
read_wrapped(char *out, size_t size, size_t nmemb, void *ud)
{
    struct wrap_src *w = ud;
    size_t room = size * nmemb;
    if (w->fpos == w->flen) {
        free(w->frame);
        w->frame = NULL;
        w->flen = w->fpos = 0;
        if (w->done)
            return 0;
        if (w->off >= w->len) {
            uint8_t sha[32], digest[KRB_DIGEST_LEN];
            gnutls_hash_deinit(w->hash, sha);
            w->hash = NULL;
            krb_request_digest(w->fields, sha, digest);
            w->done = true;
            if (krb_wrap_frame(w->ctx, digest, sizeof digest, true,
                               &w->frame, &w->flen) < 0) {
                w->err = -EIO;
                return CURL_READFUNC_ABORT;
            }
            goto copy;
        }
        size_t want = w->len - w->off < KRB_FRAME_PLAIN
                          ? (size_t)(w->len - w->off)
                          : KRB_FRAME_PLAIN;
        ssize_t r = pread(w->fd, w->plain, want, (off_t)w->off);
        if (r <= 0 ||
            krb_wrap_frame(w->ctx, w->plain, (size_t)r, false, &w->frame,
                           &w->flen) < 0) {
            w->err = r < 0 ? -errno : -EIO;
            return CURL_READFUNC_ABORT;
        }
        gnutls_hash(w->hash, w->plain, (size_t)r);
        w->off += (uint64_t)r;
    }
copy:;
    size_t k = w->flen - w->fpos < room ? w->flen - w->fpos : room;
    memcpy(out, w->frame + w->fpos, k);
    w->fpos += k;
    return k;
}

/* Kerberos: authenticate and sign one request.  Adds the headers to
 * *hdrs.  Wrapped, a JSON body (or none) becomes *postdata (caller frees):
 * its frame and the digest frame; an upload is wrapped while it is sent
 * (read_wrapped). */
static int
krb_prepare(const struct peer *p, const char *host,
            const struct krb_req_fields *f, const char *json_body,
            int upload_fd, uint64_t upload_len, gss_ctx_id_t *ctx,
            struct curl_slist **hdrs, uint8_t **postdata, size_t *postlen)
{
    CLEANUP_FREE char *tok = NULL;
    int rc = krb_client_begin(p->keytab, p->self, host, ctx, &tok);
    if (rc < 0)
        return rc;
    CLEANUP_FREE char *h1 = xasprintf("Authorization: Negotiate %s", tok);
    *hdrs = curl_slist_append(*hdrs, h1);
    if (p->krb_encrypt) {
        *hdrs = curl_slist_append(*hdrs,
                                  KRB_WRAP_HEADER ": " KRB_WRAP_VALUE);
        if (upload_fd >= 0)
            return 0;
        const char *b = json_body ? json_body : "";
        uint8_t sha[32], digest[KRB_DIGEST_LEN];
        gnutls_hash_fast(GNUTLS_DIG_SHA256, b, strlen(b), sha);
        krb_request_digest(f, sha, digest);
        CLEANUP_FREE uint8_t *f1 = NULL, *f2 = NULL;
        size_t l1 = 0, l2 = 0;
        if (*b && (rc = krb_wrap_frame(*ctx, b, strlen(b), false, &f1,
                                       &l1)) < 0)
            return rc;
        if ((rc = krb_wrap_frame(*ctx, digest, sizeof digest, true, &f2,
                                 &l2)) < 0)
            return rc;
        *postdata = xmalloc(l1 + l2);
        if (l1)
            memcpy(*postdata, f1, l1);
        memcpy(*postdata + l1, f2, l2);
        *postlen = l1 + l2;
        return 0;
    }
    uint8_t sha[32];
    if (upload_fd >= 0) {
        if ((rc = hash_fd(upload_fd, upload_len, sha)) < 0)
            return rc;
    } else {
        const char *b = json_body ? json_body : "";
        gnutls_hash_fast(GNUTLS_DIG_SHA256, b, strlen(b), sha);
    }
    uint8_t digest[KRB_DIGEST_LEN];
    krb_request_digest(f, sha, digest);
    CLEANUP_FREE char *mic = NULL;
    if ((rc = krb_sign(*ctx, digest, &mic)) < 0)
        return rc;
    CLEANUP_FREE char *h2 = xasprintf(KRB_MIC_HEADER ": %s", mic);
    *hdrs = curl_slist_append(*hdrs, h2);
    return 0;
}

/* --- one request ------------------------------------------------------------
 */

/* What one request holds while it is made. */
struct call {
    const struct peer *p;
    CURL *h;
    char host[256];
    unsigned port;
    char *url;
    char epoch[24], history[32];
    struct curl_slist *hdrs, *resolve;
    struct resp_buf body;
    FILE *upload;
    char errbuf[CURL_ERROR_SIZE];
    struct krb_req_fields fields;
    /* certificate: the server certificate's purpose, checked by curl's
     * pre-request callback */
    struct prereq prereq;
    /* Kerberos: the request's context, its body (token-signed or wrapped),
     * the answer's MIC, and the frames of a wrapped upload. */
    gss_ctx_id_t ctx;
    uint8_t *postdata;
    size_t postlen;
    char *resp_mic;
    struct wrap_src wsrc;
    /* An upload still being written (peer_call_feed): bytes sent so far,
     * and why reading it failed. */
    struct upload_feed *feed;
    uint64_t feed_off;
    int feed_err;
};

/* How a request is authenticated, one table per mode, so that the rest of
 * peer_call has no Kerberos-or-certificate branch: set the handle up (and
 * make the body, for Kerberos), and say whether an answer is the Replica
 * server's (signed by HTTP/SERVER for Kerberos; TLS said so already). */
struct peer_auth_ops {
    int (*setup)(struct call *c, const char *json_body, int upload_fd,
                 uint64_t upload_len);
    bool (*answer_trusted)(struct call *c, long status);
    /* A wrapped upload is framed while it is sent (Kerberos, encrypt). */
    bool (*wraps_upload)(const struct call *c);
};

static int
cert_setup(struct call *c, const char *json_body VR_UNUSED,
           int upload_fd VR_UNUSED, uint64_t upload_len VR_UNUSED)
{
    CURL *h = c->h;
    curl_easy_setopt(h, CURLOPT_PREREQFUNCTION, check_server_purpose);
    curl_easy_setopt(h, CURLOPT_PREREQDATA, &c->prereq);
    curl_easy_setopt(h, CURLOPT_SSLCERT, c->p->cert);
    curl_easy_setopt(h, CURLOPT_SSLKEY, c->p->key);
    curl_easy_setopt(h, CURLOPT_CAINFO, c->p->ca);
    curl_easy_setopt(h, CURLOPT_CAPATH, NULL);
    curl_easy_setopt(h, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "https");
    return 0;
}

static bool
cert_answer_trusted(struct call *c VR_UNUSED, long status VR_UNUSED)
{
    return true;
}

static bool
cert_wraps_upload(const struct call *c VR_UNUSED)
{
    return false;
}

static int
krb_setup(struct call *c, const char *json_body, int upload_fd,
          uint64_t upload_len)
{
    int rc = krb_prepare(c->p, c->host, &c->fields, json_body, upload_fd,
                         upload_len, &c->ctx, &c->hdrs, &c->postdata,
                         &c->postlen);
    curl_easy_setopt(c->h, CURLOPT_PROTOCOLS_STR, "http");
    curl_easy_setopt(c->h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c->h, CURLOPT_HEADERDATA, &c->resp_mic);
    return rc;
}

static bool
krb_answer_trusted(struct call *c, long status)
{
    return answer_signed(c->ctx, status, &c->body, c->resp_mic);
}

static bool
krb_wraps_upload(const struct call *c)
{
    return c->p->krb_encrypt;
}

static const struct peer_auth_ops cert_ops = {
    cert_setup, cert_answer_trusted, cert_wraps_upload
};
static const struct peer_auth_ops krb_ops = {
    krb_setup, krb_answer_trusted, krb_wraps_upload
};

/* The URL of path on p's server (port: the mode's default unless given),
 * the headers every request carries, and the pinned address if any. */
static void
call_target(struct call *c, const char *path)
{
    const struct peer *p = c->p;
    snprintf(c->host, sizeof c->host, "%s", p->server);
    char *colon = strrchr(c->host, ':');
    c->port = p->kerberos ? 80 : 443;
    if (colon) {
        c->port = (unsigned)atoi(colon + 1);
        *colon = '\0';
    }
    c->url = xasprintf("%s://%s:%u%s", p->kerberos ? "http" : "https",
                       c->host, c->port, path);
    snprintf(c->epoch, sizeof c->epoch, "%llu", (unsigned long long)p->epoch);
    snprintf(c->history, sizeof c->history, "%u/%u", p->recovery_history,
             p->point_interval_s ? p->point_interval_s : 3600);
    CLEANUP_FREE char *ep = xasprintf("X-Vmreplica-Epoch: %s", c->epoch);
    CLEANUP_FREE char *hist = xasprintf("X-Vmreplica-History: %s",
                                        c->history);
    c->hdrs = curl_slist_append(c->hdrs, ep);
    c->hdrs = curl_slist_append(c->hdrs, hist);
    c->hdrs = curl_slist_append(c->hdrs, "Expect:");
    if (p->connect_address) {
        CLEANUP_FREE char *r =
            xasprintf("%s:%u:%s", c->host, c->port, p->connect_address);
        c->resolve = curl_slist_append(c->resolve, r);
        curl_easy_setopt(c->h, CURLOPT_RESOLVE, c->resolve);
    }
}

/* --- an upload still being written ------------------------------------- */

void
feed_init(struct upload_feed *f, int fd)
{
    f->fd = fd;
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->cond, NULL);
    f->done = false;
    f->rc = 0;
    f->msg[0] = '\0';
}

void
feed_finish(struct upload_feed *f, int rc)
{
    pthread_mutex_lock(&f->lock);
    if (rc < 0)
        snprintf(f->msg, sizeof f->msg, "%s", vr_errmsg());
    f->done = true;
    f->rc = rc;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

void
feed_destroy(struct upload_feed *f)
{
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->cond);
}

/* How many bytes after off may go now: while the writer works, all it has
 * written but the last byte (so the body cannot end whole); once it has
 * finished well, the rest.  -ECANCELED once it has failed (abort), -errno
 * if its file cannot be looked at; 0 with *end once everything is sent. */
static int64_t
feed_avail(struct upload_feed *f, uint64_t off, bool *end)
{
    *end = false;
    pthread_mutex_lock(&f->lock);
    /* The writer does not signal each write: look again every few ms. */
    struct stat st;
    for (;;) {
        bool done = f->done;
        int rc = f->rc;
        if (done && rc < 0) {
            pthread_mutex_unlock(&f->lock);
            return -ECANCELED;
        }
        /* After reading done: everything written before it is seen. */
        if (fstat(f->fd, &st) < 0) {
            int e = errno;
            pthread_mutex_unlock(&f->lock);
            return -e;
        }
        uint64_t size = (uint64_t)st.st_size;
        uint64_t usable = done ? size : size > 0 ? size - 1 : 0;
        if (usable > off) {
            pthread_mutex_unlock(&f->lock);
            return (int64_t)(usable - off);
        }
        if (done) {
            pthread_mutex_unlock(&f->lock);
            *end = true;
            return 0;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 5 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&f->cond, &f->lock, &ts);
    }
}

static size_t
read_feed(char *out, size_t size, size_t nmemb, void *ud)
{
    struct call *c = ud;
    bool end;
    int64_t avail = feed_avail(c->feed, c->feed_off, &end);
    if (avail < 0) {
        c->feed_err = (int)avail;
        return CURL_READFUNC_ABORT;
    }
    if (end)
        return 0;
    size_t want = size * nmemb;
    if ((uint64_t)avail < want)
        want = (size_t)avail;
    ssize_t r = pread(c->feed->fd, out, want, (off_t)c->feed_off);
    if (r <= 0) {
        c->feed_err = r < 0 ? -errno : -EIO;
        return CURL_READFUNC_ABORT;
    }
    c->feed_off += (uint64_t)r;
    return (size_t)r;
}

/* An upload from upload_fd: framed while sent (wrapped), or read from a
 * duplicate of the descriptor. */
static int
call_upload(struct call *c, const struct peer_auth_ops *ops, int upload_fd,
            uint64_t upload_len, bool zstd)
{
    CURL *h = c->h;
    c->hdrs = curl_slist_append(c->hdrs, zstd ? "Content-Encoding: zstd"
                                              : "Content-Encoding: identity");
    c->hdrs = curl_slist_append(c->hdrs,
                                "Content-Type: application/octet-stream");
    curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
    if (c->feed) {
        /* Written while sent: chunked, as long as the writer takes. */
        curl_easy_setopt(h, CURLOPT_READFUNCTION, read_feed);
        curl_easy_setopt(h, CURLOPT_READDATA, c);
        curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)-1);
        curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, 512L << 10);
        return 0;
    }
    if (ops->wraps_upload(c)) {
        /* Frames made while sending: the length is not known ahead,
         * so the body goes chunked. */
        c->wsrc.fd = upload_fd;
        c->wsrc.len = upload_len;
        c->wsrc.ctx = c->ctx;
        c->wsrc.fields = &c->fields;
        c->wsrc.plain = xmalloc(KRB_FRAME_PLAIN);
        if (gnutls_hash_init(&c->wsrc.hash, GNUTLS_DIG_SHA256) < 0)
            abort();
        curl_easy_setopt(h, CURLOPT_READFUNCTION, read_wrapped);
        curl_easy_setopt(h, CURLOPT_READDATA, &c->wsrc);
        curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)-1);
        return 0;
    }
    int dupfd = dup(upload_fd);
    c->upload = dupfd >= 0 ? fdopen(dupfd, "rb") : NULL;
    if (!c->upload) {
        int rc = vr_err(-errno, "upload: %s", strerror(errno));
        if (dupfd >= 0)
            close(dupfd);
        return rc;
    }
    rewind(c->upload);
    curl_easy_setopt(h, CURLOPT_READDATA, c->upload);
    curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)upload_len);
    return 0;
}

/* The body: an upload, the body the mode made (Kerberos), or the JSON. */
static int
call_body(struct call *c, const struct peer_auth_ops *ops,
          const char *json_body, int upload_fd, uint64_t upload_len,
          bool zstd)
{
    if (upload_fd >= 0)
        return call_upload(c, ops, upload_fd, upload_len, zstd);
    if (c->postdata) {
        if (json_body)
            c->hdrs = curl_slist_append(c->hdrs,
                                        "Content-Type: application/json");
        curl_easy_setopt(c->h, CURLOPT_POSTFIELDSIZE_LARGE,
                         (curl_off_t)c->postlen);
        curl_easy_setopt(c->h, CURLOPT_POSTFIELDS, c->postdata);
    } else if (json_body) {
        c->hdrs = curl_slist_append(c->hdrs, "Content-Type: application/json");
        curl_easy_setopt(c->h, CURLOPT_POSTFIELDS, json_body);
    }
    return 0;
}

/* A transfer that failed (cr): a handshake the peer refused (a TLS alert:
 * our certificate is unknown, expired, revoked) will not heal by retrying;
 * one cut short (the Replica server restarting, a reset) will. */
static int
transfer_error(const struct call *c, CURLcode cr)
{
    bool refused = cr == CURLE_SSL_CONNECT_ERROR &&
                   strcasestr(c->errbuf, "alert") != NULL;
    int e = cr == CURLE_COULDNT_CONNECT       ? ECONNREFUSED
            : cr == CURLE_OPERATION_TIMEDOUT  ? ETIMEDOUT
            : cr == CURLE_PEER_FAILED_VERIFICATION ||
                    cr == CURLE_SSL_CERTPROBLEM || refused
                ? EACCES
                : ECONNRESET;
    /* curl's text names the host, not the address dialled in its stead:
     * say which one was, and for a name that does not resolve, how to
     * give one. */
    char via[96] = "";
    if (c->p->connect_address)
        snprintf(via, sizeof via, " (dialled at --connect-address %s)",
                 c->p->connect_address);
    const char *hint =
        cr == CURLE_COULDNT_RESOLVE_HOST && !c->p->connect_address
            ? "; if this host cannot resolve that name, give the address "
              "to dial with --connect-address IP"
            : "";
    return vr_err(-e, "replica server %s%s: %s%s%s%s", c->p->server, via,
                  curl_easy_strerror(cr), *c->errbuf ? ": " : "", c->errbuf,
                  hint);
}

/* A refusal (status not 2xx) maps back to its errno with the server's
 * message.  Kerberos mode is plain HTTP: anyone on the path can answer, so
 * a refusal the mode does not trust must not stop replication; it is
 * retried like a lost connection. */
static int
refusal_error(struct call *c, const struct peer_auth_ops *ops, long status,
              json_object *j)
{
    json_object *v;
    const char *name = NULL, *msg = NULL;
    if (j && json_object_object_get_ex(j, "error", &v))
        name = json_object_get_string(v);
    if (j && json_object_object_get_ex(j, "message", &v))
        msg = json_object_get_string(v);
    int rc = vr_err(-errno_of_name(name), "replica server %s: %s",
                    c->p->server, msg ? msg : "unexpected answer");
    if ((status == 403 || status == 401) && !name)
        rc = -EACCES;
    if (peer_unrecoverable(rc) && !ops->answer_trusted(c, status))
        rc = vr_err(-ECONNRESET, "replica server %s: an unsigned answer "
                    "%ld (not trusted, retrying): %s", c->p->server, status,
                    msg ? msg : "no message");
    return rc;
}

/* What the request came to: 0, or the errno of the failure, with the
 * message. */
static int
call_result(struct call *c, const struct peer_auth_ops *ops, int rc,
            CURLcode cr, long status, json_object *j)
{
    if (rc == 0 && cr != CURLE_OK && c->wsrc.err < 0)
        rc = vr_err(c->wsrc.err, "kerberos: wrapping the upload failed");
    if (rc == 0 && cr != CURLE_OK && c->feed_err < 0) {
        /* The writer failed (it said why) or its file could not be read. */
        if (c->feed_err == -ECANCELED)
            return vr_err(c->feed->rc, "%s", c->feed->msg);
        rc = vr_err(c->feed_err, "upload: %s", strerror(-c->feed_err));
    }
    if (rc < 0)
        return vr_err(rc, "replica server %s: %s", c->p->server,
                      vr_errmsg());
    if (cr == CURLE_ABORTED_BY_CALLBACK && c->prereq.why[0])
        return vr_err(-EACCES, "replica server %s: %s", c->p->server,
                      c->prereq.why);
    if (cr != CURLE_OK)
        return transfer_error(c, cr);
    if (status != 200 && status != 201)
        return refusal_error(c, ops, status, j);
    if (!ops->answer_trusted(c, status))
        /* Only HTTP/SERVER could sign the answer: this is what
         * authenticates the Replica server to us.  An answer without its
         * signature (or with a wrong one) is not the Replica server's: it
         * is ignored and the request retried, so a forger on the path can
         * delay replication but not stop it. */
        return vr_err(-ECONNRESET, "replica server %s: an unsigned answer "
                      "%ld (not trusted, retrying): not signed by HTTP/%s: "
                      "%s", c->p->server, status, c->host, vr_errmsg());
    return 0;
}

static void
call_fini(struct call *c)
{
    curl_easy_cleanup(c->h);
    curl_slist_free_all(c->hdrs);
    curl_slist_free_all(c->resolve);
    if (c->upload)
        fclose(c->upload);
    free(c->wsrc.frame);
    free(c->wsrc.plain);
    if (c->wsrc.hash)
        gnutls_hash_deinit(c->wsrc.hash, NULL);
}

static int
call_run(const struct peer *p, const char *method, const char *path,
         const char *json_body, int upload_fd, uint64_t upload_len,
         struct upload_feed *feed, bool zstd, json_object **resp)
{
    struct call c = { .p = p, .ctx = GSS_C_NO_CONTEXT, .wsrc = { .fd = -1 },
                      .feed = feed };
    c.h = curl_easy_init();
    if (!c.h)
        return vr_err(-ENOMEM, "curl init");
    const struct peer_auth_ops *ops = p->kerberos ? &krb_ops : &cert_ops;
    c.prereq.h = c.h;
    call_target(&c, path);
    curl_easy_setopt(c.h, CURLOPT_ERRORBUFFER, c.errbuf);
    curl_easy_setopt(c.h, CURLOPT_URL, c.url);
    c.fields = (struct krb_req_fields){
        .method = method, .path = path, .epoch = c.epoch,
        .history = c.history,
        .encoding = upload_fd >= 0 ? (zstd ? "zstd" : "identity") : NULL,
        .wrap = p->krb_encrypt ? KRB_WRAP_VALUE : NULL,
    };
    int rc = ops->setup(&c, json_body, upload_fd, upload_len);
    curl_easy_setopt(c.h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c.h, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(c.h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(c.h, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(c.h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c.h, CURLOPT_WRITEDATA, &c.body);
    if (rc == 0)
        rc = call_body(&c, ops, json_body, upload_fd, upload_len, zstd);
    curl_easy_setopt(c.h, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c.h, CURLOPT_HTTPHEADER, c.hdrs);

    CURLcode cr = CURLE_OK;
    long status = 0;
    if (rc == 0) {
        cr = curl_easy_perform(c.h);
        curl_easy_getinfo(c.h, CURLINFO_RESPONSE_CODE, &status);
    }
    call_fini(&c);

    json_object *j = c.body.data ? json_tokener_parse(c.body.data) : NULL;
    rc = call_result(&c, ops, rc, cr, status, j);
    krb_ctx_free(&c.ctx);
    if (rc == 0 && resp)
        *resp = j ? j : json_object_new_object();
    else
        json_object_put(j);
    free(c.body.data);
    free(c.url);
    free(c.postdata);
    free(c.resp_mic);
    return rc;
}

int
peer_call(const struct peer *p, const char *method, const char *path,
          const char *json_body, int upload_fd, uint64_t upload_len,
          bool zstd, json_object **resp)
{
    return call_run(p, method, path, json_body, upload_fd, upload_len, NULL,
                    zstd, resp);
}

int
peer_call_feed(const struct peer *p, const char *method, const char *path,
               struct upload_feed *f, bool zstd, json_object **resp)
{
    if (p->kerberos)
        return vr_err(-ENOTSUP, "kerberos mode sends a body it has whole");
    return call_run(p, method, path, NULL, f->fd, UINT64_MAX, f, zstd, resp);
}

bool
peer_unrecoverable(int rc)
{
    return rc == -EPERM || rc == -EACCES || rc == -ESTALE || rc == -ENOENT ||
           rc == -EBADMSG || rc == -EPROTO || rc == -EINVAL;
}
