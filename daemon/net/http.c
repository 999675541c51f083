/* http.c: JSON responses over libmicrohttpd, shared by the management API
 * and the replication listeners — the HTTP status of a negative errno
 * (docs/api.md), and the {"error", "message"} body of a failure. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "http.h"

unsigned
http_status_for(int rc)
{
    switch (-rc) {
    case EINVAL:
    case EPROTO:
    case EBADMSG:
    case ENAMETOOLONG:
    case ELOOP:
        return 400;
    case EPERM:
    case EACCES:
        return 403;
    case ENOENT:
        return 404;
    case EEXIST:
    case EBUSY:
    case ESTALE:
    case EALREADY:
        return 409;
    case EFBIG:
    case E2BIG:
        return 413;
    case ENOSPC:
        return 507;
    case ECONNREFUSED:
    case EHOSTUNREACH:
    case ETIMEDOUT:
    case ECONNRESET:
        return 502;
    default:
        return 500;
    }
}

MHD_RESULT
http_send_json_ex(struct MHD_Connection *c, unsigned status, json_object *obj,
                  http_decorate_fn decorate, void *ud)
{
    const char *s = json_object_to_json_string_ext(
        obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
    size_t n = strlen(s);
    char *buf = xmalloc(n + 1);
    memcpy(buf, s, n);
    buf[n] = '\n';
    json_object_put(obj);
    struct MHD_Response *r =
        MHD_create_response_from_buffer(n + 1, buf, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (decorate)
        decorate(r, status, buf, n + 1, ud);
    MHD_RESULT ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

MHD_RESULT
http_send_json(struct MHD_Connection *c, unsigned status, json_object *obj)
{
    return http_send_json_ex(c, status, obj, NULL, NULL);
}

json_object *
http_error_obj(int rc, const char *msg)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "error",
                           json_object_new_string(vr_errname(-rc)));
    json_object_object_add(
        o, "message",
        json_object_new_string(msg && *msg ? msg : strerror(-rc)));
    return o;
}

MHD_RESULT
http_send_error(struct MHD_Connection *c, int rc, const char *msg)
{
    return http_send_json(c, http_status_for(rc), http_error_obj(rc, msg));
}

struct retire {
    struct MHD_Daemon *d;
    void (*done)(void *arg);
    void *arg;
};

static void *
retire_main(void *p)
{
    struct retire *r = p;
    vr_thread_name("http-retire");
    MHD_stop_daemon(r->d);
    if (r->done)
        r->done(r->arg);
    free(r);
    return NULL;
}

void
http_daemon_retire(struct MHD_Daemon *d, bool wait, void (*done)(void *arg),
                   void *arg)
{
    struct retire *r = xmalloc(sizeof *r);
    *r = (struct retire){ d, done, arg };
    MHD_socket fd = MHD_quiesce_daemon(d);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
    pthread_t t;
    if (!wait && pthread_create(&t, NULL, retire_main, r) == 0)
        pthread_detach(t);
    else
        retire_main(r);
}
