/* peer.h: a Replica server as the primary's client sees it, and one
 * request to it (peer.c). */
#ifndef VR_PEER_H
#define VR_PEER_H

#include <json-c/json.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "vr.h"

struct peer {
    char *server;          /* "fqdn:port" */
    char *connect_address; /* pinned IP, or NULL */
    char *cert, *key, *ca; /* this host's identity and trusted CA */
    /* Kerberos mode (HTTP): this host's keytab and name (host/SELF), and
     * whether bodies travel wrapped (encrypted). */
    bool kerberos, krb_encrypt;
    char *keytab, *self;
    uint64_t epoch;
    /* Recovery-history settings, sent on every request as
     * "X-Vmreplica-History: N/INTERVAL_S" (the Replica server keeps the
     * points). */
    unsigned recovery_history, point_interval_s;
};

/* One request to the Replica server.  A JSON body or an upload from
 * upload_fd (upload_len bytes, zstd-encoded if zstd); the JSON answer goes
 * to *resp (may be NULL).  A refusal maps back to its errno (EPERM, ESTALE,
 * …) with the server's message. */
int peer_call(const struct peer *p, const char *method, const char *path,
              const char *json_body, int upload_fd, uint64_t upload_len,
              bool zstd, json_object **resp) VR_WUR;
/* An upload that another thread is still writing into fd (from offset 0,
 * only appending): peer_call_feed sends it while it grows, chunked.  The
 * writer ends with feed_finish: with rc 0 the upload is completed; with rc
 * < 0 the transfer is aborted before its last byte and before the chunked
 * body's end, so the Replica server never holds a whole body of a failed
 * build (it only stages a body that ends and decodes whole). */
struct upload_feed {
    int fd;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    int rc;
    char msg[512]; /* the writer's vr_errmsg when rc < 0 */
};
void feed_init(struct upload_feed *f, int fd);
/* Called by the writer's thread (its vr_errmsg goes with rc < 0). */
void feed_finish(struct upload_feed *f, int rc);
void feed_destroy(struct upload_feed *f);
/* peer_call with an upload from f (certificate mode only: Kerberos signs
 * or wraps a body it has whole; -ENOTSUP there). */
int peer_call_feed(const struct peer *p, const char *method, const char *path,
                   struct upload_feed *f, bool zstd, json_object **resp) VR_WUR;

/* A failure that retrying will not heal (refused, stale, …): replication
 * stops in Error. */
bool peer_unrecoverable(int rc);

#endif
