/* shipper-int.h: the primary's HTTPS client to a Replica server. */
#ifndef VR_SHIPPER_INT_H
#define VR_SHIPPER_INT_H

#include <json-c/json.h>

#include "daemon.h"

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

/* Copies of a VM's replication facts for work without d->lock. */
struct job {
    char uuid[37];
    char *name;
    char *rundir;
    unsigned ndisks;
    struct disk disks[MAX_DISKS];
    struct peer peer;
    bool compression;
    uint64_t app_every_ms; /* application-consistent cuts: period, 0 off */
    uint64_t app_last_ms;  /* wall clock of the last one */
};

/* The peer of replication r: its server, this host's identity from the
 * server settings (caller holds d->lock); release with peer_fini. */
void peer_fill(struct peer *p, const struct repl *r);
void peer_fini(struct peer *p);

/* Fill jb from vm (caller holds d->lock); release with job_fini. */
void job_fill(struct job *jb, const struct vm *vm);
void job_fini(struct job *jb);

/* One request to the Replica server.  A JSON body or an upload from
 * upload_fd (upload_len bytes, zstd-encoded if zstd); the JSON answer goes
 * to *resp (may be NULL).  A refusal maps back to its errno (EPERM, ESTALE,
 * …) with the server's message. */
/* A failure that retrying will not heal (refused, stale, …): replication
 * stops in Error. */
bool shipper_unrecoverable(int rc);

int peer_call(const struct peer *p, const char *method, const char *path,
              const char *json_body, int upload_fd, uint64_t upload_len,
              bool zstd, json_object **resp) VR_WUR;

#endif
