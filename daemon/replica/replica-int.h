/* replica-int.h: what the files of the Replica server share — a
 * request's state (struct rreq), a listener's context, and the functions
 * one part calls in another:
 *   replica.c           requests: URL, per-request state, uploads, dispatch
 *   replica-register.c  the JSON endpoints (register, reverse, initial
 *                       complete, prepared, remove)
 *   replica-limits.c    server-wide memory and staging-space budgets
 *   replica-listen.c    listeners, peer verification, connection guard
 *   replica-apply.c     staging files and the applier
 *   history.c           recovery history (points, undo files)
 *   failover.c          test and unplanned failover, cancel, complete
 *   planned.c           the planned failover of a prepared VM
 *   inject.c            failover network settings set in the guest
 * and the layer's context (struct replica_ctx rctx), set by replica_init.
 */
#ifndef VR_REPLICA_INT_H
#define VR_REPLICA_INT_H

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
#include "core/authz.h"
#include "core/catalog.h"
#include "core/log.h"
#include "core/r1json.h"
#include "core/repl.h"
#include "core/state.h"
#include "core/storage.h"
#include "core/vms.h"
#include "replica.h"
#include "net/http.h"
#include "net/krb.h"
#include "net/tls.h"

#define R1_MAX_CYCLE_RAW (16ull << 30)
#define R1_MAX_BASE_RAW  (80ull << 20)

/* Budgets of replica-limits.c. */
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

/* What a listener's requests need (the access handler's cls): the
 * Kerberos acceptor credential, or the certificate listener's revocation
 * list (with its CAs, to check it), if one is set. */
struct listener_ctx {
    bool kerberos;
    gss_cred_id_t cred;
    gnutls_x509_trust_list_t crl;
};

enum r1_kind { R1_STATUS, R1_REGISTER, R1_BASE, R1_INITIAL_DONE, R1_CYCLE,
               R1_REMOVE, R1_PREPARED, R1_TEST, R1_INITIAL_BEGIN, R1_HASHES,
               R1_RESYNC, R1_RESYNC_DONE };

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
    uint64_t t0_ms;     /* when the request began (vr_mono_ms) */
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

/* --- replica.c ----------------------------------------------------------- */
/* The access handler of both listeners (cls: their struct listener_ctx). */
MHD_RESULT r1_access(void *cls, struct MHD_Connection *c, const char *url,
                     const char *method, const char *version VR_UNUSED,
                     const char *upload_data, size_t *upload_size,
                     void **con_cls);
/* MHD's completion callback: free the request, release what it holds. */
void rreq_done(void *cls VR_UNUSED, struct MHD_Connection *c, void **con_cls,
               enum MHD_RequestTerminationCode toe VR_UNUSED);
/* The status body of a Replica VM (registration and GET replies). */
json_object *replica_status_json(const struct vm *vm);
/* d->lock held: the Replica VM q names, if q's peer may use it: 0 and
 * *out, or a negative errno with the message. */
int own_vm(struct rreq *q, struct vm **out);

/* --- replica-compare.c ---------------------------------------------------- */
/* POST .../initial (full or compare) and POST .../hashes: an initial
 * replication that compares with the copy kept here. */
int do_initial_begin(struct rreq *q, json_object **out);
int do_hashes(struct rreq *q, json_object **out);
/* POST .../resync and .../resync-complete: a resynchronization. */
int do_resync_begin(struct rreq *q, json_object **out);
int do_resync_complete(struct rreq *q, json_object **out);

/* --- replica-register.c --------------------------------------------------- */
/* The JSON endpoints, at the end of the body (PUT /r1/vms/UUID, POST
 * .../initial-complete, .../remove, .../prepared). */
int do_register(struct rreq *q, json_object **out);
int do_initial_done(struct rreq *q, json_object **out);
int do_remove(struct rreq *q, json_object **out);
int do_prepared(struct rreq *q, json_object **out);
/* Take the primary's recovery-history settings from q's headers. */
void take_history(struct repl *r, const struct rreq *q);
/* Zero the disks a registration kept, before a full initial replication's
 * first piece (reset_pending). */
int reset_kept_disks(struct vm *vm);

/* --- replica-limits.c ----------------------------------------------------- */
/* Set the memory budget (once, before the listeners start;
 * $VMREPLICA_TEST_MEM_BUDGET_MIB lowers it for tests). */
void replica_limits_init(void);
/* Charge q bytes of request memory (big: may use the whole budget):
 * 0, or -EAGAIN after waiting (nothing charged). */
int mem_charge(struct rreq *q, uint64_t bytes, bool big);
/* Return all that q was charged. */
void mem_release(struct rreq *q);
/* The payload decoder's callbacks: more buffer memory, bytes staged. */
int decoder_mem(void *ud, size_t more);
int decoder_stage(void *ud, uint64_t raw_bytes);
/* Claim staging space for raw more bytes (begin: the upload's first
 * claim): 0 or -ENOSPC. */
int space_claim(struct rreq *q, uint64_t raw, bool begin);
/* Enter q's claim in the list of its file system dev / take it out. */
void claim_link(struct rreq *q, dev_t dev);
void claim_unlink(struct rreq *q);

/* --- replica-listen.c ----------------------------------------------------- */
/* The peer's address "ip:port" of connection c. */
void peer_addr(struct MHD_Connection *c, char *out, size_t n);
/* Verify the peer of an HTTPS connection: a certificate chaining to our
 * CA, valid now, not revoked, with the clientAuth purpose.  0 and
 * *identity (caller frees), or -EACCES with the reason in vr_errmsg(). */
int verify_peer(struct MHD_Connection *c, const struct listener_ctx *lc,
                char **identity);
/* A request on connection c begins / ends (the connection guard). */
void guard_request(struct MHD_Connection *c, bool begin);

/* --- replica-apply.c ------------------------------------------------------ */
/* STORAGE/staging and STORAGE/staging/N.cycle of r (caller frees). */
char *staging_dir(const struct repl *r);
char *cycle_path(const struct repl *r, uint64_t n);
/* Remove every staged file of r. */
int clear_staging(const struct repl *r);
/* Apply the payload open on pfd to vm's disks; *nrec: records applied.
 * unsynced: leave the disks' sync to the caller (sync_disks). */
int apply_payload_fd(const struct vm *vm, int pfd, uint64_t *nrec,
                     bool unsynced);
/* fdatasync every disk of vm. */
int sync_disks(const struct vm *vm);

/* --- the layer's context -------------------------------------------------- */
/* The daemon's state this layer works on and main.c's hooks
 * (replica_init); read-only after it. */
struct replica_ctx {
    struct daemon *d;
    struct replica_hooks hooks;
};
extern struct replica_ctx rctx;

/* --- history.c, failover.c ------------------------------------------------ */
/* Forget every point and undo file (a fresh relationship); d->lock held. */
int history_reset(struct vm *vm) VR_WUR;
/* Before applying cycle n from payload_path: save what it overwrites (if
 * recovery history is on).  Without d->lock, VM_OP_APPLY in progress. */
int history_capture(struct vm *vm, uint64_t n,
                    const char *payload_path) VR_WUR;
/* After cycle n was recorded as applied: make it a point (app: an
 * application-consistent one), apply the retention policy, prune.
 * d->lock held (dropped for file work). */
/* cut_ms: when the primary cut cycle n (0: not known, the apply time is
 * the point's time). */
int history_after_apply(struct vm *vm, uint64_t n, bool app,
                        uint64_t cut_ms) VR_WUR;
/* At start-up: repair points and undo files after a crash. */
int history_recover(struct vm *vm) VR_WUR;
/* failover.c: before cycle n is applied (without d->lock, VM_OP_APPLY
 * set), hand a running test failover's view the cycle's undo span;
 * -EAGAIN if the view does not answer (the cycle waits). */
int failover_test_refresh(struct vm *vm, uint64_t n) VR_WUR;
/* At start-up, before the applier: keep a whole test failover, undo a
 * half-started or half-stopped one. */
int failover_recover(struct vm *vm) VR_WUR;

/* --- inject.c ------------------------------------------------------------- */
/* After a failover started the VM in rundir (d->lock held): set its NICs'
 * failover settings in the guest once its agent answers (a thread). */
void network_inject_start(struct daemon *d, const struct vm *vm,
                          const char *rundir);

#endif
