/* api.c: the management API — JSON over HTTP/1.1 on STATE_DIR/api.sock
 * (docs/api.md).  libmicrohttpd serves the socket with a thread per
 * connection; each request body (<= 1 MiB) is gathered, parsed and routed
 * to a handler that works under d->lock and returns a status and a JSON
 * object, or a negative errno with the message in vr_errmsg(). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "api-int.h"
#include "net/http.h"

#define API_MAX_BODY (1u << 20)

struct api_ctx actx;

void
api_init(struct daemon *d)
{
    actx.d = d;
}

/* --- routing ------------------------------------------------------------ */

struct route {
    const char *method;
    const char *pattern; /* '*' matches one path segment */
    api_handler fn;
};

static const struct route routes[] = {
    { "GET", "/v1/server", api_server_show },
    { "PUT", "/v1/server", api_server_set },
    { "POST", "/v1/server/test-connection", api_test_connection },
    { "GET", "/v1/server/firewall", api_firewall_show },
    { "PUT", "/v1/server/firewall", api_firewall_set },
    { "GET", "/v1/auth-entries", api_auth_list },
    { "POST", "/v1/auth-entries", api_auth_add },
    { "PUT", "/v1/auth-entries/*", api_auth_set },
    { "DELETE", "/v1/auth-entries/*", api_auth_remove },
    { "GET", "/v1/vms", api_vm_list },
    { "POST", "/v1/vms", api_vm_create },
    { "GET", "/v1/vms/*", api_vm_show },
    { "DELETE", "/v1/vms/*", api_vm_remove },
    { "POST", "/v1/vms/*/start", api_vm_start },
    { "POST", "/v1/vms/*/test-network", api_vm_set_test_network },
    { "POST", "/v1/vms/*/boot", api_vm_set_boot },
    { "POST", "/v1/vms/*/failover-network", api_vm_set_failover_network },
    { "POST", "/v1/vms/*/stop", api_vm_stop },
    { "POST", "/v1/vms/*/replication", api_repl_enable },
    { "PATCH", "/v1/vms/*/replication", api_repl_set },
    { "GET", "/v1/vms/*/replication", api_repl_show },
    { "DELETE", "/v1/vms/*/replication", api_repl_remove },
    { "GET", "/v1/vms/*/replication/measure", api_repl_measure },
    { "GET", "/v1/vms/*/points", api_points_list },
    { "POST", "/v1/vms/*/failover/start", api_failover_start },
    { "POST", "/v1/vms/*/failover/stop", api_failover_stop },
    { "POST", "/v1/vms/*/failover/complete", api_failover_complete },
    { "POST", "/v1/vms/*/failover/prepare", api_failover_prepare },
    { "POST", "/v1/vms/*/replication/reverse", api_repl_reverse },
    { "POST", "/v1/vms/*/replication/suspend", api_repl_suspend },
    { "POST", "/v1/vms/*/replication/resume", api_repl_resume },
    { "POST", "/v1/vms/*/replication/stop-resync", api_repl_stop_resync },
    { "POST", "/v1/vms/*/replication/reset-stats", api_repl_reset_stats },
    { "POST", "/v1/vms/*/initial-replication", api_initial_start },
    { "POST", "/v1/vms/*/initial-replication/stop", api_initial_stop },
    { "POST", "/v1/vms/*/initial-replication/import", api_initial_import },
    { "GET", "/v1/replications", api_repl_list },
    { "GET", "/v1/events", api_events },
};

/* Match url against pattern; the '*' segment (URL-decoded) goes to arg. */
static bool
route_match(const char *pattern, const char *url, char *arg, size_t argsz)
{
    arg[0] = '\0';
    while (*pattern && *url) {
        if (*pattern == '*') {
            size_t n = strcspn(url, "/");
            if (n == 0 || n >= argsz)
                return false;
            memcpy(arg, url, n);
            arg[n] = '\0';
            url += n;
            pattern++;
            continue;
        }
        if (*pattern != *url)
            return false;
        pattern++;
        url++;
    }
    return *pattern == '\0' && *url == '\0';
}

struct req {
    char *body;
    size_t len;
    bool too_big;
};

static void
req_done(void *cls VR_UNUSED, struct MHD_Connection *c VR_UNUSED,
         void **con_cls, enum MHD_RequestTerminationCode toe VR_UNUSED)
{
    struct req *r = *con_cls;
    if (r) {
        free(r->body);
        free(r);
    }
    *con_cls = NULL;
}

static MHD_RESULT
access_cb(void *cls VR_UNUSED, struct MHD_Connection *c, const char *url,
          const char *method, const char *version VR_UNUSED,
          const char *upload_data, size_t *upload_size, void **con_cls)
{
    struct req *r = *con_cls;
    if (!r) {
        r = xcalloc(1, sizeof *r);
        *con_cls = r;
        return MHD_YES;
    }
    if (*upload_size) {
        if (r->len + *upload_size > API_MAX_BODY)
            r->too_big = true;
        else {
            r->body = xrealloc(r->body, r->len + *upload_size + 1);
            memcpy(r->body + r->len, upload_data, *upload_size);
            r->len += *upload_size;
            r->body[r->len] = '\0';
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->too_big)
        return http_send_error(c, -EFBIG, "request body larger than 1 MiB");

    if (strcmp(url, "/metrics") == 0 && strcmp(method, "GET") == 0) {
        char *text = api_metrics_text();
        struct MHD_Response *resp = MHD_create_response_from_buffer(
            strlen(text), text, MHD_RESPMEM_MUST_FREE);
        MHD_add_response_header(resp, "Content-Type",
                                "text/plain; version=0.0.4");
        MHD_RESULT ret = MHD_queue_response(c, 200, resp);
        MHD_destroy_response(resp);
        return ret;
    }

    const struct route *rt = NULL;
    char arg[256];
    bool path_found = false;
    for (size_t i = 0; i < ARRAY_SIZE(routes); i++) {
        if (route_match(routes[i].pattern, url, arg, sizeof arg)) {
            path_found = true;
            if (strcmp(routes[i].method, method) == 0) {
                rt = &routes[i];
                break;
            }
        }
    }
    if (!rt) {
        char *m = xasprintf("%s %s: %s", method, url,
                            path_found ? "method not allowed" : "not found");
        MHD_RESULT ret = http_send_error(c, path_found ? -EOPNOTSUPP : -ENOENT,
                                         m);
        free(m);
        return ret;
    }

    json_object *body = NULL;
    if (r->len > 0) {
        enum json_tokener_error jerr;
        body = json_tokener_parse_verbose(r->body, &jerr);
        if (!body || !json_object_is_type(body, json_type_object)) {
            json_object_put(body);
            return http_send_error(c, -EPROTO,
                                   "request body: not a JSON object");
        }
    } else {
        body = json_object_new_object();
    }

    struct api_call call = { .conn = c, .arg = arg, .body = body };
    json_object *out = NULL;
    unsigned status = 200;
    vr_err_clear();
    int rc = rt->fn(&call, &status, &out);
    json_object_put(body);
    if (rc < 0) {
        json_object_put(out);
        return http_send_error(c, rc, vr_errmsg());
    }
    return http_send_json(c, status, out ? out : json_object_new_object());
}

const char *
api_query(const struct api_call *call, const char *key)
{
    return MHD_lookup_connection_value(call->conn, MHD_GET_ARGUMENT_KIND, key);
}

/* The socket api_start bound: api_unlink_socket removes only that one. */
static dev_t sock_dev;
static ino_t sock_ino;
static bool sock_bound;

int
api_start(const char *sock_path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(sock_path) >= sizeof sa.sun_path)
        return vr_err(-ENAMETOOLONG, "api socket path too long: %s",
                      sock_path);
    strcpy(sa.sun_path, sock_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return vr_err(-errno, "socket: %s", strerror(errno));
    unlink(sock_path);
    mode_t old = umask(0117);
    int rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    umask(old);
    struct stat st;
    if (rc < 0 || lstat(sock_path, &st) < 0 || listen(fd, 64) < 0) {
        rc = -errno;
        close(fd);
        return vr_err(rc, "listen on %s: %s", sock_path, strerror(-rc));
    }
    sock_dev = st.st_dev;
    sock_ino = st.st_ino;
    sock_bound = true;
    actx.d->api = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
            MHD_USE_POLL,
        0, NULL, NULL, access_cb, NULL, MHD_OPTION_LISTEN_SOCKET, fd,
        MHD_OPTION_NOTIFY_COMPLETED, req_done, NULL,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
    if (!actx.d->api) {
        close(fd);
        return vr_err(-EIO, "start management API on %s", sock_path);
    }
    return 0;
}

void
api_unlink_socket(const char *sock_path)
{
    struct stat st;
    if (sock_bound && lstat(sock_path, &st) == 0 && st.st_dev == sock_dev &&
        st.st_ino == sock_ino)
        unlink(sock_path);
    else if (sock_bound)
        log_warn("api", "%s is not the socket this daemon bound; left it",
                 sock_path);
}

void
api_stop(void)
{
    if (actx.d->api)
        MHD_stop_daemon(actx.d->api);
    actx.d->api = NULL;
}
