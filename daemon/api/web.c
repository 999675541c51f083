/* web.c: the read-only web listener of `server set --web-listen` — the
 * Prometheus text on GET /metrics (with per-VM health and state gauges),
 * the VMs as JSON on GET /api/vms[/NAME], and the dashboard (daemon/api/web/,
 * embedded at build time) on GET /.  It serves HTTPS with the server's
 * certificate, and requires a client certificate from its CA, whenever
 * the server has one; plain HTTP only on a loopback address.  Nothing it
 * serves changes anything: any method but GET/HEAD is 405, a request
 * with a body 413.  A sampler thread keeps, per VM, a bounded ring of
 * (time, lag, bytes per cycle) samples for the dashboard's charts. */
#include "web.h"

#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "api-int.h"
#include "net/http.h"
#include "replica/replica-int.h"

#define WEB_MAX_URL   512  /* bytes of a request's path and query */
#define WEB_MAX_CONN  32   /* connections at once */
#define WEB_SAMPLE_MS 5000 /* one sample per VM every 5 s ... */
#define WEB_SAMPLES   2160 /* ... for the last 3 hours */
#define WEB_EVENTS    50   /* recent events in /api/vms/NAME */

/* --- addresses ----------------------------------------------------------- */

/* "PORT" (loopback), "IPv4:PORT" or "[IPv6]:PORT" into *ss. */
static int
parse_listen(const char *spec, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[64] = "127.0.0.1";
    const char *port = spec;
    if (spec[0] == '[') {
        const char *end = strchr(spec, ']');
        if (!end || end[1] != ':' || (size_t)(end - spec - 1) >= sizeof host)
            goto bad;
        memcpy(host, spec + 1, (size_t)(end - spec - 1));
        host[end - spec - 1] = '\0';
        port = end + 2;
    } else if (strchr(spec, ':')) {
        const char *colon = strrchr(spec, ':');
        if ((size_t)(colon - spec) >= sizeof host ||
            memchr(spec, ':', (size_t)(colon - spec)))
            goto bad;
        memcpy(host, spec, (size_t)(colon - spec));
        host[colon - spec] = '\0';
        port = colon + 1;
    }
    char *end;
    errno = 0;
    long p = strtol(port, &end, 10);
    if (!*port || *end || errno || p < 1 || p > 65535)
        goto bad;
    struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV,
                              .ai_socktype = SOCK_STREAM };
    struct addrinfo *ai = NULL;
    if (getaddrinfo(host, port, &hints, &ai) != 0 || !ai)
        goto bad;
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    *len = ai->ai_addrlen;
    freeaddrinfo(ai);
    return 0;
bad:
    return vr_err(-EINVAL,
                  "web-listen %s: expected PORT, ADDR:PORT or "
                  "[ADDR]:PORT with an IP address and a port 1-65535",
                  spec);
}

static bool
is_loopback(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
    }
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
    return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr);
}

static bool
has_tls(const struct server_cfg *c)
{
    return c->cert && c->key && c->ca;
}

int
web_check(const struct server_cfg *c)
{
    if (!c->web_listen)
        return 0;
    struct sockaddr_storage ss;
    socklen_t len;
    int rc = parse_listen(c->web_listen, &ss, &len);
    if (rc == 0 && !is_loopback(&ss) && !has_tls(c))
        rc = vr_err(-EINVAL,
                    "web-listen %s: not a loopback address, and "
                    "this server has no certificate to serve HTTPS with "
                    "(set --certificate, --key and --ca, or listen on "
                    "127.0.0.1)",
                    c->web_listen);
    return rc;
}

/* --- samples ------------------------------------------------------------- */

struct sample {
    uint64_t t_ms;  /* wall clock */
    int64_t lag_ms; /* since the last successful cycle; -1: none yet */
    uint64_t bytes; /* wire bytes per cycle over the interval; 0: none */
};

/* The samples of one VM, by UUID (a VM renamed keeps its series). */
struct series {
    struct series *next;
    char uuid[37];
    bool seen; /* still a VM at the last sampling */
    unsigned head, count;
    uint64_t ok_count, sum_size; /* at the previous sample */
    struct sample s[WEB_SAMPLES];
};

static pthread_mutex_t samp_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t samp_cond = PTHREAD_COND_INITIALIZER;
static struct series *series;
static pthread_t samp_thread;
static bool samp_running, samp_stop;

static struct series *
series_find(const char *uuid, bool create)
{
    for (struct series *s = series; s; s = s->next)
        if (strcmp(s->uuid, uuid) == 0)
            return s;
    if (!create)
        return NULL;
    struct series *s = xcalloc(1, sizeof *s);
    snprintf(s->uuid, sizeof s->uuid, "%s", uuid);
    s->next = series;
    series = s;
    return s;
}

/* One sample of every replicating VM; the series of VMs gone are freed.
 * actx.d->lock and samp_lock held. */
static void
sample_all(void)
{
    uint64_t now = vr_wall_ms();
    for (struct series *s = series; s; s = s->next)
        s->seen = false;
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next) {
        const struct repl *r = vm->repl;
        if (!r)
            continue;
        struct series *s = series_find(vm->uuid, true);
        s->seen = true;
        uint64_t cycles = r->ok_count - s->ok_count;
        uint64_t bytes = r->sum_size - s->sum_size;
        bool first = s->count == 0;
        struct sample *x = &s->s[(s->head + s->count) % WEB_SAMPLES];
        if (s->count < WEB_SAMPLES)
            s->count++;
        else
            s->head = (s->head + 1) % WEB_SAMPLES;
        x->t_ms = now;
        x->lag_ms = r->last_ok_ms ? (int64_t)(now - r->last_ok_ms) : -1;
        /* Counters reset (replication reset-stats) or a first sample: no
         * rate to tell. */
        x->bytes = !first && cycles && r->ok_count >= s->ok_count &&
                           r->sum_size >= s->sum_size
                       ? bytes / cycles
                       : 0;
        s->ok_count = r->ok_count;
        s->sum_size = r->sum_size;
    }
    for (struct series **p = &series; *p;) {
        struct series *s = *p;
        if (s->seen) {
            p = &s->next;
            continue;
        }
        *p = s->next;
        free(s);
    }
}

static void refresh_tls(void);

static void *
sampler_main(void *arg VR_UNUSED)
{
    vr_thread_name("web-sampler");
    pthread_mutex_lock(&samp_lock);
    while (!samp_stop) {
        pthread_mutex_unlock(&samp_lock);
        pthread_mutex_lock(&actx.d->lock);
        pthread_mutex_lock(&samp_lock);
        sample_all();
        pthread_mutex_unlock(&samp_lock);
        refresh_tls();
        pthread_mutex_unlock(&actx.d->lock);
        pthread_mutex_lock(&samp_lock);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += WEB_SAMPLE_MS / 1000;
        while (!samp_stop &&
               pthread_cond_timedwait(&samp_cond, &samp_lock, &ts) == 0)
            ;
    }
    pthread_mutex_unlock(&samp_lock);
    return NULL;
}

/* The samples of uuid as [[t_ms, lag_s, bytes], ...], oldest first. */
static json_object *
samples_json(const char *uuid)
{
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&samp_lock);
    const struct series *s = series_find(uuid, false);
    for (unsigned i = 0; s && i < s->count; i++) {
        const struct sample *x = &s->s[(s->head + i) % WEB_SAMPLES];
        json_object *t = json_object_new_array();
        json_object_array_add(t, json_object_new_int64((int64_t)x->t_ms));
        json_object_array_add(
            t, x->lag_ms < 0
                   ? NULL
                   : json_object_new_double((double)x->lag_ms / 1000.0));
        json_object_array_add(t, json_object_new_int64((int64_t)x->bytes));
        json_object_array_add(arr, t);
    }
    pthread_mutex_unlock(&samp_lock);
    return arr;
}

/* --- metrics ------------------------------------------------------------- */

/* A Prometheus label value: backslash, double quote and newline escaped. */
static void
put_label(FILE *f, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            fputc('\\', f);
        if (*v == '\n')
            fputs("\\n", f);
        else
            fputc(*v, f);
    }
}

/* "METRIC{vm="NAME",uuid="UUID"" (the brace left open). */
static void
put_vm_labels(FILE *f, const char *metric, const struct vm *vm)
{
    fprintf(f, "%s{vm=\"", metric);
    put_label(f, vm->name);
    fprintf(f, "\",uuid=\"%s\"", vm->uuid);
}

static int
health_level(const char *h)
{
    return strcmp(h, "Critical") == 0 ? 2 : strcmp(h, "Warning") == 0 ? 1 : 0;
}

/* One gauge family: # HELP, # TYPE, a line per VM with replication (the
 * health level, or 1 labelled with the state).  actx.d->lock held. */
static void
put_vm_gauge(FILE *f, const char *metric, const char *help, bool state)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s gauge\n", metric, help, metric);
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next) {
        if (!vm->repl)
            continue;
        put_vm_labels(f, metric, vm);
        if (state) {
            fputs(",state=\"", f);
            put_label(f, repl_state(vm->repl));
            fputs("\"} 1\n", f);
        } else {
            fprintf(f, "} %d\n", health_level(repl_health(vm->repl, NULL)));
        }
    }
}

char *
web_vm_metrics_text(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    pthread_mutex_lock(&actx.d->lock);
    put_vm_gauge(f, "vmreplica_vm_health",
                 "replication health of the VM: 0 Normal, 1 Warning, "
                 "2 Critical",
                 false);
    put_vm_gauge(f, "vmreplica_vm_state",
                 "replication state of the VM (1 for the state it is in)",
                 true);
    pthread_mutex_unlock(&actx.d->lock);
    fclose(f);
    return buf;
}

/* --- JSON ---------------------------------------------------------------- */

/* A VM's line of the dashboard (actx.d->lock held). */
static json_object *
vm_summary_json(const struct vm *vm, uint64_t now)
{
    const struct repl *r = vm->repl;
    json_object *o = json_object_new_object();
    json_object_object_add(o, "name", json_object_new_string(vm->name));
    json_object_object_add(o, "uuid", json_object_new_string(vm->uuid));
    json_object_object_add(
        o, "mode",
        json_object_new_string(vm_mode_name(r ? r->mode : vm->mode)));
    json_object_object_add(
        o, "state", json_object_new_string(r ? repl_state(r) : "Disabled"));
    json_object_object_add(
        o, "health", r ? json_object_new_string(repl_health(r, NULL)) : NULL);
    char ts[32];
    if (r && r->last_ok_ms)
        vr_rfc3339(r->last_ok_ms, ts);
    json_object_object_add(o, "last_replication_time",
                           r && r->last_ok_ms ? json_object_new_string(ts)
                                              : NULL);
    json_object_object_add(
        o, "lag_seconds",
        r && r->last_ok_ms
            ? json_object_new_double((double)(now - r->last_ok_ms) / 1000.0)
            : NULL);
    json_object_object_add(o, "frequency",
                           r ? json_object_new_int((int)r->frequency_s) : NULL);
    return o;
}

static json_object *
vms_json(void)
{
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&actx.d->lock);
    uint64_t now = vr_wall_ms();
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next)
        json_object_array_add(arr, vm_summary_json(vm, now));
    pthread_mutex_unlock(&actx.d->lock);
    json_object *o = json_object_new_object();
    json_object_object_add(
        o, "hostname",
        actx.d->cfg.hostname ? json_object_new_string(actx.d->cfg.hostname) : NULL);
    json_object_object_add(o, "vms", arr);
    return o;
}

/* One VM: its line, replication measure, recovery points, recent events
 * and samples.  0 or -ENOENT. */
static int
vm_detail_json(const char *name, json_object **out)
{
    pthread_mutex_lock(&actx.d->lock);
    struct vm *vm;
    int rc = vm_lookup(actx.d, name, &vm);
    if (rc < 0) {
        pthread_mutex_unlock(&actx.d->lock);
        return rc;
    }
    json_object *o = vm_summary_json(vm, vr_wall_ms());
    json_object_object_add(o, "measure",
                           vm->repl ? repl_measure_json(vm) : NULL);
    json_object_object_add(o, "points",
                           vm->repl && vm->repl->mode == VM_MODE_REPLICA
                               ? history_points_json(vm)
                               : json_object_new_array());
    json_object_object_add(o, "events",
                           catalog_events(actx.d->cat, vm->name, 0, WEB_EVENTS));
    char uuid[37];
    snprintf(uuid, sizeof uuid, "%s", vm->uuid);
    pthread_mutex_unlock(&actx.d->lock);
    json_object_object_add(o, "samples", samples_json(uuid));
    json_object_object_add(o, "sample_interval_ms",
                           json_object_new_int(WEB_SAMPLE_MS));
    *out = o;
    return 0;
}

/* The running listener and what it was started with (the PEM strings stay
 * alive as long as MHD uses them). */
struct web_listener {
    struct MHD_Daemon *mhd;
    char *addr;
    char *key, *cert, *ca;  /* NULL: plain HTTP */
    char *crl;              /* the CA's revocation list, or NULL */
    struct listener_ctx lc; /* verify_peer's: the CRL as a trust list */
};

static struct web_listener *cur; /* NULL: not listening */

/* --- requests ------------------------------------------------------------ */

static void
add_common_headers(struct MHD_Response *r)
{
    MHD_add_response_header(r, "Cache-Control", "no-store");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Content-Security-Policy",
                            "default-src 'self'; style-src 'self'; "
                            "img-src 'self' data:; frame-ancestors 'none'");
}

static void
decorate(struct MHD_Response *r, unsigned status, const char *body VR_UNUSED,
         size_t len VR_UNUSED, void *ud VR_UNUSED)
{
    add_common_headers(r);
    if (status == 405)
        MHD_add_response_header(r, "Allow", "GET, HEAD");
}

static MHD_RESULT
send_json(struct MHD_Connection *c, unsigned status, json_object *o)
{
    return http_send_json_ex(c, status, o, decorate, NULL);
}

static MHD_RESULT
send_error(struct MHD_Connection *c, unsigned status, int rc, const char *msg)
{
    return send_json(c, status, http_error_obj(rc, msg));
}

/* Queue len bytes of data (must_free: ours to free) as type. */
static MHD_RESULT
send_body(struct MHD_Connection *c, const char *type, const void *data,
          size_t len, bool must_free)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, (void *)data,
        must_free ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    MHD_add_response_header(r, "Content-Type", type);
    add_common_headers(r);
    MHD_RESULT ret = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    return ret;
}

static MHD_RESULT
send_metrics(struct MHD_Connection *c)
{
    CLEANUP_FREE char *a = api_metrics_text();
    CLEANUP_FREE char *b = web_vm_metrics_text();
    char *text = xasprintf("%s%s", a, b);
    return send_body(c, "text/plain; version=0.0.4; charset=utf-8", text,
                     strlen(text), true);
}

static MHD_RESULT
web_access(void *cls, struct MHD_Connection *c, const char *url,
           const char *method, const char *version VR_UNUSED,
           const char *upload_data VR_UNUSED, size_t *upload_size,
           void **con_cls)
{
    /* Everything is decided on the first call, before any body is read;
     * a response queued then ends the connection if a body follows. */
    static int first;
    if (*con_cls || *upload_size) {
        *upload_size = 0;
        return MHD_YES; /* a body we already refused, being drained */
    }
    *con_cls = &first;
    char msg[WEB_MAX_URL + 64];
    if (strlen(url) > WEB_MAX_URL)
        return send_error(c, 414, -ENAMETOOLONG, "request URL too long");
    const struct web_listener *l = cls; /* valid until MHD stops */
    if (l->key) {
        CLEANUP_FREE char *who = NULL;
        if (verify_peer(c, &l->lc, &who) < 0)
            return send_error(c, 403, -EACCES, vr_errmsg());
    }
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    if (!get) {
        snprintf(msg, sizeof msg, "%s %s: method not allowed (read-only)",
                 method, url);
        return send_error(c, 405, -EOPNOTSUPP, msg);
    }
    if (MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length") ||
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Transfer-Encoding"))
        return send_error(c, 413, -EFBIG, "a request body is not accepted");

    for (size_t i = 0; i < web_assets_count; i++)
        if (strcmp(url, web_assets[i].path) == 0)
            return send_body(c, web_assets[i].type, web_assets[i].data,
                             web_assets[i].len, false);
    if (strcmp(url, "/metrics") == 0)
        return send_metrics(c);
    if (strcmp(url, "/api/vms") == 0)
        return send_json(c, 200, vms_json());
    const char *prefix = "/api/vms/";
    size_t n = strlen(prefix);
    if (strncmp(url, prefix, n) == 0 && url[n] && !strchr(url + n, '/')) {
        json_object *o = NULL;
        vr_err_clear();
        int rc = vm_detail_json(url + n, &o);
        if (rc < 0)
            return send_error(c, http_status_for(rc), rc, vr_errmsg());
        return send_json(c, 200, o);
    }
    snprintf(msg, sizeof msg, "%s %s: not found", method, url);
    return send_error(c, 404, -ENOENT, msg);
}

/* --- the listener -------------------------------------------------------- */

/* Free l and what it holds (after its daemon stopped). */
static void
listener_free(void *arg)
{
    struct web_listener *l = arg;
    free(l->addr);
    free(l->key);
    free(l->cert);
    free(l->ca);
    free(l->crl);
    if (l->lc.crl)
        gnutls_x509_trust_list_deinit(l->lc.crl, 1);
    free(l);
}

static void
mhd_logger(void *cls VR_UNUSED, const char *fmt, va_list ap)
{
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    buf[strcspn(buf, "\n")] = '\0';
    log_debug("web", "libmicrohttpd: %s", buf);
}

static struct MHD_Daemon *
start_once(struct web_listener *n, const struct sockaddr_storage *ss)
{
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL |
                     MHD_USE_ITC | MHD_USE_ERROR_LOG;
    if (ss->ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    if (!n->key)
        return MHD_start_daemon(
            flags, 0, NULL, NULL, web_access, (void *)n, MHD_OPTION_SOCK_ADDR,
            ss, MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
            MHD_OPTION_CONNECTION_LIMIT, (unsigned)WEB_MAX_CONN,
            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(32 * 1024),
            MHD_OPTION_END);
    return MHD_start_daemon(
        flags | MHD_USE_TLS, 0, NULL, NULL, web_access, (void *)n,
        MHD_OPTION_SOCK_ADDR, ss, MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
        MHD_OPTION_HTTPS_MEM_KEY, n->key, MHD_OPTION_HTTPS_MEM_CERT, n->cert,
        MHD_OPTION_HTTPS_MEM_TRUST, n->ca, MHD_OPTION_HTTPS_PRIORITIES,
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2",
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)WEB_MAX_CONN,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(32 * 1024),
        MHD_OPTION_END);
}

static bool
same(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

int
web_apply(void)
{
    const struct server_cfg *c = &actx.d->cfg;
    pthread_mutex_lock(&samp_lock);
    if (!samp_running && !samp_stop &&
        pthread_create(&samp_thread, NULL, sampler_main, NULL) == 0)
        samp_running = true;
    pthread_mutex_unlock(&samp_lock);
    if (!c->web_listen || actx.d->shutting_down) {
        if (cur) {
            log_info("web", "stopped listening on %s", cur->addr);
            /* Its connections may wait for actx.d->lock, which we hold. */
            http_daemon_retire(cur->mhd, false, listener_free, cur);
            cur = NULL;
        }
        return 0;
    }
    struct sockaddr_storage ss;
    socklen_t sslen;
    int rc = parse_listen(c->web_listen, &ss, &sslen);
    if (rc < 0)
        return rc;
    struct web_listener *n = xcalloc(1, sizeof *n);
    n->addr = xstrdup(c->web_listen);
    if (has_tls(c)) {
        rc = io_read_file(c->key, 1 << 20, &n->key, NULL);
        if (rc == 0)
            rc = io_read_file(c->cert, 1 << 20, &n->cert, NULL);
        if (rc == 0)
            rc = io_read_file(c->ca, 4 << 20, &n->ca, NULL);
        if (rc == 0 && c->crl)
            rc = io_read_file(c->crl, 64 << 20, &n->crl, NULL);
        if (rc == 0 && n->crl)
            rc = tls_crl_trust_list(n->ca, n->crl, c->crl, &n->lc.crl);
    } else if (!is_loopback(&ss)) {
        rc = web_check(c);
    }
    if (rc == 0 && cur && same(cur->addr, n->addr) && same(cur->key, n->key) &&
        same(cur->cert, n->cert) && same(cur->ca, n->ca) &&
        same(cur->crl, n->crl))
        rc = 1; /* unchanged */
    if (rc != 0) {
        listener_free(n);
        return rc < 0 ? rc : 0;
    }
    if (cur)
        http_daemon_retire(cur->mhd, false, listener_free, cur);
    cur = NULL;
    /* The old listener's polling thread may hold its socket a moment. */
    for (int i = 0; i < 40 && !n->mhd; i++) {
        if (i > 0) {
            struct timespec ts = { 0, 25 * 1000 * 1000 };
            nanosleep(&ts, NULL);
        }
        n->mhd = start_once(n, &ss);
    }
    if (!n->mhd) {
        rc = vr_err(-EADDRINUSE,
                    "web-listen %s: cannot listen there "
                    "(address in use or not on this host)",
                    n->addr);
        listener_free(n);
        return rc;
    }
    cur = n;
    log_info("web", "listening on %s (%s)", n->addr,
             n->key ? "HTTPS, client certificates from the ca"
                    : "plain HTTP, loopback");
    return 0;
}

/* Every sample (actx.d->lock held): renewed certificate files are picked up
 * without a `server set`.  web_apply restarts the listener only if a
 * file's content changed, and only once certificate and key match again
 * (a renewal half written is left alone until it is complete). */
static void
refresh_tls(void)
{
    const struct server_cfg *c = &actx.d->cfg;
    if (!cur || !cur->key || actx.d->shutting_down || !has_tls(c) ||
        tls_check_material(c->cert, c->key, c->ca) < 0)
        return;
    struct web_listener *before = cur;
    if (web_apply() < 0)
        log_warn("web", "reloading the certificate files: %s", vr_errmsg());
    else if (cur != before)
        event_add(actx.d->cat, "info", NULL,
                  "web listener: certificate files changed, reloaded (%s)",
                  cur->addr);
}

bool
web_listening(void)
{
    return cur != NULL;
}

void
web_stop(void)
{
    pthread_mutex_lock(&actx.d->lock);
    struct web_listener *l = cur;
    cur = NULL;
    pthread_mutex_unlock(&actx.d->lock);
    if (l)
        http_daemon_retire(l->mhd, true, listener_free, l);
    pthread_mutex_lock(&samp_lock);
    samp_stop = true;
    bool join = samp_running;
    samp_running = false;
    pthread_cond_broadcast(&samp_cond);
    pthread_mutex_unlock(&samp_lock);
    if (join)
        pthread_join(samp_thread, NULL);
    while (series) {
        struct series *s = series;
        series = s->next;
        free(s);
    }
}
