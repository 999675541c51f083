/* peer.h: a Replica server as the primary's client sees it, and one
 * request to it (peer.c). */
#ifndef VR_PEER_H
#define VR_PEER_H

#include <json-c/json.h>
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
/* A failure that retrying will not heal (refused, stale, …): replication
 * stops in Error. */
bool peer_unrecoverable(int rc);

#endif
