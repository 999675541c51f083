/* replica-listen.c: the Replica server's listeners — the HTTPS listener
 * with mutual X.509 authentication (verify_peer, revocation) and the HTTP
 * listener with Kerberos (krb.h), started, restarted and stopped per the
 * server's settings — and the connection guard that caps and times out
 * their connections. */
#include "replica-int.h"

static int check_revoked(gnutls_x509_trust_list_t tl, const gnutls_datum_t *certs,
                         unsigned n);

/* Verify the peer of an HTTPS connection: a certificate chaining to our CA,
 * valid now, with the clientAuth purpose.  0 and *identity (caller frees),
 * or -EACCES with the reason in vr_errmsg(). */

int
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

void
peer_addr(struct MHD_Connection *c, char *out, size_t n)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    snprintf(out, n, "?");
    if (ci && ci->client_addr)
        sockaddr_str(ci->client_addr, out, n);
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
    pthread_mutex_lock(&rctx.d->lock);
    event_add(rctx.d->cat, "audit", NULL, "refused connection from %s: %s",
              addr, why);
    pthread_mutex_unlock(&rctx.d->lock);
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
    vr_thread_name("replica-guard");
    for (unsigned tick = 1;; tick++) {
        vr_sleep_ms(250);
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
    replica_limits_init();
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
void
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
 * per d->cfg.auth.  MHD keeps pointers to the PEM strings it was given, and
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

static void
listener_free(void *arg)
{
    listener_clear(arg);
    free(arg);
}

/* Stop a listener (http_daemon_retire: unless wait is set, in a thread of
 * its own, since its connections may wait for D->lock). */
static void
listener_stop(struct listener *cur, struct MHD_Daemon **pub, bool wait)
{
    if (!cur->mhd)
        return;
    struct listener *l = xmalloc(sizeof *l);
    *l = *cur;
    memset(cur, 0, sizeof *cur);
    *pub = NULL;
    http_daemon_retire(l->mhd, wait, listener_free, l);
}

void
replica_listener_stop(void)
{
    listener_stop(&cert_l, &rctx.d->listener, true);
    listener_stop(&krb_l, &rctx.d->krb_listener, true);
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
        if (i > 0)
            vr_sleep_ms(25);
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
    const struct server_cfg *c = &rctx.d->cfg;
    if (!on) {
        listener_stop(&cert_l, &rctx.d->listener, false);
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
    if (rc == 0 && n.crl)
        rc = tls_crl_trust_list(n.ca, n.crl, c->crl, &n.ctx->crl);
    if (rc != 0) {
        listener_clear(&n);
        return rc < 0 ? rc : 0;
    }
    listener_stop(&cert_l, &rctx.d->listener, false);
    n.mhd = start_mhd(true, n.port, n.ctx, &n);
    if (!n.mhd) {
        listener_clear(&n);
        return vr_err(-EADDRINUSE,
                      "replica server: cannot listen on port %u with the "
                      "given certificate",
                      c->cert_port);
    }
    cert_l = n;
    rctx.d->listener = n.mhd;
    log_info("replica", "listening on port %u (certificate%s)", n.port,
             n.crl ? ", with a revocation list" : "");
    return 0;
}

static int
krb_listener_apply(bool on)
{
    const struct server_cfg *c = &rctx.d->cfg;
    if (!on) {
        listener_stop(&krb_l, &rctx.d->krb_listener, false);
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
        xasprintf("file2:%s/krb5.rcache2", rctx.d->state_dir);
    int rc = krb_acceptor_open(c->keytab, c->hostname, rcache, &n.ctx->cred);
    if (rc < 0) {
        listener_clear(&n);
        return rc;
    }
    listener_stop(&krb_l, &rctx.d->krb_listener, false);
    n.mhd = start_mhd(false, n.port, n.ctx, &n);
    if (!n.mhd) {
        listener_clear(&n);
        return vr_err(-EADDRINUSE, "replica server: cannot listen on port "
                      "%u (Kerberos)", c->krb_port);
    }
    krb_l = n;
    rctx.d->krb_listener = n.mhd;
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
    pthread_mutex_lock(&rctx.d->lock);
    const struct server_cfg *c = &rctx.d->cfg;
    bool cert = c->replica_enabled && !rctx.d->shutting_down && c->cert &&
                c->key && c->ca && cfg_wants_certificate(c);
    if (cert && tls_check_material(c->cert, c->key, c->ca) == 0) {
        struct MHD_Daemon *before = rctx.d->listener;
        if (cert_listener_apply(true) < 0)
            log_warn("replica", "reloading the certificate files: %s",
                     vr_errmsg());
        else if (rctx.d->listener != before)
            event_add(rctx.d->cat, "info", NULL,
                      "replica server: certificate files "
                      "changed, reloaded (port %u)",
                      c->cert_port);
    }
    pthread_mutex_unlock(&rctx.d->lock);
}

int
replica_listener_apply(void)
{
    const struct server_cfg *c = &rctx.d->cfg;
    bool on = c->replica_enabled;
    bool cert = on && cfg_wants_certificate(c);
    bool krb = on && cfg_wants_kerberos(c);
    int rc = cert_listener_apply(cert);
    if (rc == 0)
        rc = krb_listener_apply(krb);
    return rc;
}

