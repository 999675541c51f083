/* daemon.h: vmreplicad's shared state and the contracts between its parts.
 *
 * Concurrency: one mutex (d->lock) guards every field of struct daemon, the
 * VM and replication objects and the catalog connection.  Threads hold it
 * only for short bookkeeping and never across network or disk transfers:
 * they copy what they need, drop the lock, work, then take it again to
 * record the result.  The catalog (SQLite, WAL) is the durable truth; the
 * in-memory objects mirror it and every change is written through.
 */
#ifndef VR_DAEMON_H
#define VR_DAEMON_H

#include <json-c/json.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdint.h>

#include "r1json.h" /* MAX_DISKS, network_valid, nics_validate */
#include "vr.h"

struct disk {
    char id[16];   /* "disk0" */
    char *path;    /* raw image */
    uint64_t size; /* bytes */
};

enum vm_mode { VM_MODE_NONE, VM_MODE_PRIMARY, VM_MODE_REPLICA };

struct repl;

struct vm {
    struct vm *next;
    char uuid[37];
    char *name;
    unsigned cpus;
    unsigned memory_mib;
    enum vm_mode mode;
    char *dir; /* the VM's directory: rundir, and disks for primary VMs */
    unsigned ndisks;
    struct disk disks[MAX_DISKS];
    /* Direct kernel boot (QEMU -kernel/-initrd/-append), or NULL.  This
     * server's own setting (vm create, vm set-boot): a peer never names a
     * path here, so it does not travel with the registration. */
    char *kernel, *initrd, *cmdline;
    /* NICs (network.c: JSON array of {mac, network, failover}) or NULL;
     * the network a test failover puts them on (NULL: "none"). */
    json_object *nics;
    char *test_network;
    bool hypervisor; /* QEMU is asked of the next start (status: vm_to_json,
                      * from the processes) */
    bool applying;   /* the applier works on its disks without the lock */
    bool changing;   /* a start or stop runs without the lock */
    /* Replica VMs: the primary that registered it last and the trust
     * group of the authorization entry it was created under ("": none).
     * Kept when the relationship is removed (from either side), so that
     * only that primary, or one of its trust group, may register the VM
     * again (replica.c, check_owner).  NULL owner: not known (a VM kept
     * from a removal before the catalog recorded it). */
    char *owner, *owner_group;
    struct repl *repl;
};

/* Replication states (SPEC §9).  The names are what the API, the CLI and
 * the catalog show and store: they never change. */
enum repl_st {
    REPL_ST_DISABLED,        /* "Disabled": a catalog row without a state */
    REPL_ST_READY_INITIAL,   /* "ReadyForInitialReplication" */
    REPL_ST_INITIAL,         /* "InitialReplicationInProgress" */
    REPL_ST_WAITING_INITIAL, /* "WaitingForInitialReplication" */
    REPL_ST_REPLICATING,     /* "Replicating" */
    REPL_ST_SUSPENDED,       /* "Suspended" */
    REPL_ST_ERROR,           /* "Error" */
    REPL_ST_FAILOVER_WAIT,   /* "FailOverWaitingCompletion" */
    REPL_ST_FAILED_OVER,     /* "FailedOver" */
    REPL_ST_PREPARED,        /* "PreparedForFailover" */
    REPL_ST_COUNT
};

/* Steps of a failover (not a test) on the Replica server, in
 * repl.failover_step; each is in the catalog before its work starts, so a
 * crash is resumed or undone from the step it reached (failover.c). */
enum fo_step {
    FO_NONE = 0,
    FO_STARTING,   /* point pinned; view, overlays, QEMU being started */
    FO_RUNNING,    /* the VM runs (or ran) from overlays on the view */
    FO_CANCELLING, /* failover stop: processes and overlays go */
    FO_COMPLETING, /* failover complete: the VM is stopped, disks reverted */
    FO_REVERTED,   /* the Replica disks are at the point: commit overlays */
    FO_COMMITTED,  /* overlays are in the disks: drop points, new epoch */
};

struct repl {
    char vm_uuid[37];
    enum vm_mode mode;
    /* Set when the object is made (catalog, enable, reverse); changed
     * only by repl_transition. */
    enum repl_st st;
    char *replica_server;  /* primary: "fqdn:port" */
    char *connect_address; /* primary: optional IP to dial */
    char *primary_server;  /* replica: the primary's certificate name */
    char *storage;         /* replica: the VM's storage directory */
    /* "certificate" or "kerberos": how the primary authenticates to the
     * Replica server (on the Replica server: how the primary registered,
     * which a reverse replication keeps).  krb_encrypt: Kerberos bodies
     * travel as GSS wrap tokens. */
    char *auth;
    bool krb_encrypt;
    unsigned frequency_s;
    bool compression;
    uint64_t epoch;
    /* initial replication */
    bool initial_done;
    uint64_t base_cycle;
    /* The first cycle at whose seal the Replica VM can equal the primary:
     * the cycle open when the base copy's last read was done (cycles
     * sealed during the copy may be older than data it read).  No
     * recovery point before it.  0: base_cycle + 1 (catalogs and primaries
     * from before it was sent). */
    uint64_t first_point;
    unsigned initial_disk;
    uint64_t initial_offset;
    uint64_t initial_seq;
    uint64_t initial_total;
    uint64_t initial_sent; /* raw bytes of data sent so far */
    /* cycles */
    uint64_t last_cycle;    /* primary: last acknowledged; replica: staged */
    uint64_t applied_cycle; /* replica: last applied */
    /* statistics (reset-stats clears them) */
    uint64_t last_ok_ms;
    uint64_t errors, ok_count, missed;
    uint64_t bytes_raw, bytes_wire;
    uint64_t max_size, sum_size;
    uint64_t max_latency_ms, sum_latency_ms;
    char *last_error;
    /* recovery history (kept on the Replica server, set on the primary) */
    unsigned recovery_history; /* hourly points kept besides the latest */
    unsigned point_interval_s; /* the "hour"; 3600 unless shortened */
#define REPL_MAX_HISTORY 720
    /* replica: test failover ("NAME - Test" from an overlay on a view of
     * this point, in STORAGE/test); 0 = none.  The point is kept while it
     * lasts, and the applier REFRESHes the view before each cycle. */
    uint64_t test_point;
    bool test_busy;   /* runtime: a test failover starts or stops */
    /* replica: failover (planned or unplanned, not a test) at this point;
     * 0 = none.  The VM runs as itself from overlays on a view of the
     * point in STORAGE/failover until `failover complete` writes the
     * overlays into its disks or `failover stop` discards them. */
    uint64_t failover_point;
    int failover_step;  /* enum fo_step */
    bool failover_busy; /* runtime: a failover step runs without the lock */
    uint64_t last_contact_ms; /* runtime, wall clock: the primary's last
                                 authenticated request for this VM */
    /* Planned failover: primary — the last cycle it shipped when it was
     * prepared (state PreparedForFailover); replica — the cycle the
     * primary declared its disks to be at, kept after the planned
     * failover so `replication reverse` knows both sides are identical
     * there (0: none). */
    uint64_t prepared_cycle;
    /* replica: the trust group of the authorization entry the VM was
     * created under ("" or NULL: none); only primaries of that group may
     * replicate it (SPEC §6). */
    char *trust_group;
    /* replica: the disks still hold the copy of an earlier relationship
     * (kept at registration: it may seed a comparison); they are reset to
     * zeroes before the first base chunk or initial-complete of a full
     * initial replication. */
    bool reset_pending;
    bool preparing;   /* runtime, primary: failover prepare runs */
    /* Application-consistent points: every app_every-th point interval
     * the cut is made with the guest's file systems frozen through the
     * QEMU guest agent (0: never).  app_last_ms: runtime, wall clock, the
     * last such cut. */
    unsigned app_every;
    uint64_t app_last_ms;
    /* runtime only */
    pthread_t thread;
    bool thread_running;
    bool stop;        /* ask the shipper thread to end */
    bool kick;        /* wake the shipper early */
    bool busy;        /* replica: a receive is in progress */
    bool removing;    /* primary: replication remove runs unlocked */
    uint64_t apply_retry_ms; /* replica: monotonic time to retry an apply */
    char *task;       /* "InitialReplication" or NULL */
};

struct server_cfg {
    char *hostname;
    bool replica_enabled;
    char *auth; /* "certificate", "kerberos" or "both" */
    unsigned cert_port;
    unsigned krb_port;
    char *keytab;     /* host/FQDN (primary) and HTTP/FQDN (replica) keys */
    bool krb_encrypt; /* replica: refuse Kerberos bodies sent in clear */
    char *cert, *key, *ca;
    char *crl; /* certificate revocation list of the ca (PEM), or NULL */
    /* --certificate-thumbprint: cert and key were chosen from this
     * directory by this thumbprint (NULL: given as files) */
    char *cert_store, *thumbprint;
    bool allow_any;
    char *default_storage;
    unsigned monitoring_interval_s;
    /* `server firewall enable`: vmreplicad keeps nftables table inet
     * vmreplica open for its listener ports (firewall.c); off by default. */
    bool firewall_enabled;
};

struct daemon {
    pthread_mutex_t lock;
    pthread_cond_t cond; /* broadcast on any change the threads wait for */
    char *state_dir;
    sqlite3 *db;
    struct server_cfg cfg;
    struct vm *vms;
    bool shutting_down;
    struct MHD_Daemon *api;
    struct MHD_Daemon *listener;     /* certificate port (HTTPS) */
    struct MHD_Daemon *krb_listener; /* Kerberos port (HTTP) */
    pthread_t applier;
};

extern struct daemon *D;

/* --- logging (daemon only) ------------------------------------------- */
void log_msg(int level, const char *component, const char *fmt, ...)
    VR_PRINTF(3, 4);
#define LOG_ERROR 0
#define LOG_WARN  1
#define LOG_INFO  2
#define LOG_DEBUG 3
extern int log_level;
#define log_error(c, ...) log_msg(LOG_ERROR, c, __VA_ARGS__)
#define log_warn(c, ...)  log_msg(LOG_WARN, c, __VA_ARGS__)
#define log_info(c, ...)  log_msg(LOG_INFO, c, __VA_ARGS__)
#define log_debug(c, ...)                                                      \
    do {                                                                       \
        if (unlikely(log_level >= LOG_DEBUG))                                  \
            log_msg(LOG_DEBUG, c, __VA_ARGS__);                                \
    } while (0)

/* Wait on D->cond for at most ms (caller holds D->lock). */
void daemon_wait_ms(uint64_t ms);

/* Record an event (catalog + log).  level: "info", "warning", "error",
 * "audit".  Caller holds d->lock. */
void event_add(const char *level, const char *vm, const char *fmt, ...)
    VR_PRINTF(3, 4);

/* --- catalog.c --------------------------------------------------------- */
int catalog_open(const char *path) VR_WUR;
void catalog_close(void);
/* Load server config, VMs, disks and replications into D. */
int catalog_load(void) VR_WUR;
int catalog_save_server(void) VR_WUR;
int catalog_save_vm(const struct vm *vm) VR_WUR;
int catalog_delete_vm(const char *uuid) VR_WUR;
int catalog_save_repl(const struct repl *r) VR_WUR;
int catalog_delete_repl(const char *uuid) VR_WUR;
/* Authorization entries (SPEC §6): which primaries may replicate here,
 * where their Replica VMs are stored, their trust group. */
struct auth_entry {
    char *pattern;     /* FQDN or *.FQDN (vr_fqdn_pattern_valid) */
    char *storage;     /* absolute directory */
    char *trust_group; /* "" for none */
    unsigned max_vms;  /* Replica VMs its primaries may own; 0: default */
};
#define AUTH_DEFAULT_MAX_VMS 256
#define AUTH_MAX_MAX_VMS     65536
int catalog_auth_list(struct auth_entry **out, size_t *n) VR_WUR;
void auth_entries_free(struct auth_entry *e, size_t n);
int catalog_auth_put(const struct auth_entry *e) VR_WUR;
/* -ENOENT if there is no entry for pattern. */
int catalog_auth_delete(const char *pattern) VR_WUR;
/* auth.c: D->lock held.  May peer (its certificate name) replicate here?
 * The most specific matching entry (an exact name before a wildcard)
 * gives *storage and *group (caller frees); else "allow any" gives the
 * default storage and group ""; else -EPERM with the reason. */
int auth_authorize(const char *peer, char **storage, char **group) VR_WUR;
/* auth.c: D->lock held.  May peer create one more Replica VM here?  The
 * Replica VMs whose owner the same entry admits (or "allow any", counted
 * as one entry) are at most its max_vms: 0, or -EPERM with the reason. */
int auth_check_vm_cap(const char *peer) VR_WUR;

/* A transaction around several saves: catalog_end(rc) commits if rc >= 0,
 * else rolls back and returns rc. */
int catalog_begin(void) VR_WUR;
int catalog_end(int rc) VR_WUR;

/* A recovery point of a Replica VM: the disks after cycle `cycle`. */
struct point {
    uint64_t cycle;
    uint64_t time_ms;  /* when it was applied (wall clock) */
    char kind[32];     /* "standard" (crash-consistent) or
                          "application-consistent" */
    uint64_t undo_bytes; /* undo data kept to reach it from the next one */
};
int catalog_add_point(const char *uuid, const struct point *p) VR_WUR;
/* cycle 0: every point of the VM. */
int catalog_delete_point(const char *uuid, uint64_t cycle) VR_WUR;
/* Points in cycle order; caller frees *out. */
int catalog_points(const char *uuid, struct point **out, size_t *n) VR_WUR;

/* storage.c: files of a VM beneath its storage location (the parent of
 * vmdir): opened relative to it with io_open_beneath, so no symbolic link
 * from the VM's directory down is followed (-ELOOP, the message names
 * path).  path is vmdir or a path in it. */
int storage_open(const char *vmdir, const char *path, int flags,
                 mode_t mode) VR_WUR;
/* mkdir -p of path (0750), every component a real directory. */
int storage_mkdir(const char *vmdir, const char *path) VR_WUR;
/* ftruncate path (opened with storage_open) to size bytes. */
int storage_truncate(const char *vmdir, const char *path,
                     uint64_t size) VR_WUR;
/* Remove the files of directory path (a missing one is empty), fsync it;
 * the number removed or -errno. */
int storage_clear_dir(const char *vmdir, const char *path) VR_WUR;
/* Before the disks in vm->dir are handed by path to nbdkit and QEMU: each,
 * and its change log directory if it has one, is opened with storage_open
 * once (a link on the way: -ELOOP). */
int storage_check_disks(const struct vm *vm) VR_WUR;

/* history.c: recovery history of Replica VMs. */
/* Forget every point and undo file (a fresh relationship); D->lock held. */
int history_reset(struct vm *vm) VR_WUR;
/* Before applying cycle n from payload_path: save what it overwrites (if
 * recovery history is on).  Without D->lock, vm->applying set. */
int history_capture(struct vm *vm, uint64_t n,
                    const char *payload_path) VR_WUR;
/* After cycle n was recorded as applied: make it a point (app: an
 * application-consistent one), apply the retention policy, prune.  D->lock held (dropped for file work). */
int history_after_apply(struct vm *vm, uint64_t n, bool app) VR_WUR;
/* At start-up: repair points and undo files after a crash. */
int history_recover(struct vm *vm) VR_WUR;
/* failover.c: before cycle n is applied (without D->lock, vm->applying
 * set), hand a running test failover's view the cycle's undo span;
 * -EAGAIN if the view does not answer (the cycle waits). */
int failover_test_refresh(struct vm *vm, uint64_t n) VR_WUR;
/* At start-up, before the applier: keep a whole test failover, undo a
 * half-started or half-stopped one. */
int failover_recover(struct vm *vm) VR_WUR;
/* GET /v1/vms/VM/points body (an array). D->lock held. */
json_object *history_points_json(struct vm *vm);
/* Events, newest last, optional filter by VM name; caller puts them. */
json_object *catalog_events(const char *vm, unsigned max);
void catalog_add_event(uint64_t time_ms, const char *level, const char *vm,
                       const char *msg);

/* --- objects ----------------------------------------------------------- */
struct vm *vm_find(const char *name_or_uuid);
struct vm *vm_find_uuid(const char *uuid);
void vm_free(struct vm *vm);
void repl_free(struct repl *r);
const char *vm_mode_name(enum vm_mode m);
json_object *vm_to_json(const struct vm *vm);
json_object *repl_to_json(const struct vm *vm);
json_object *repl_measure_json(const struct vm *vm);
/* "FQDN[:PORT]" as --replica-server takes it. */
bool repl_server_name_valid(const char *s);
/* The body of a registration (PUT /r1/vms/UUID) of vm under r. */
json_object *repl_register_body(const struct vm *vm, const struct repl *r);
/* The authentication a replication uses ("certificate" unless set). */
const char *repl_auth(const struct repl *r);
bool repl_kerberos(const struct repl *r);
/* "certificate" or "kerberos": 0, else -EINVAL with the message. */
int repl_auth_check(const char *auth) VR_WUR;
/* SERVER with the default port of r's authentication unless it has one. */
char *repl_server_with_port(const char *server, const struct repl *r);
/* Does this host have the identity r's authentication needs (caller holds
 * d->lock)?  0 or -EINVAL with what to run. */
int repl_check_identity(const struct repl *r) VR_WUR;
const char *repl_health(const struct repl *r, json_object *details);
/* The first cycle that may be a recovery point (see first_point). */
uint64_t repl_first_point(const struct repl *r);
/* The state shown (SPEC §9): r->st's name, or TestFailoverInProgress. */
const char *repl_state(const struct repl *r);
/* A state's name as shown and stored ("Replicating"). */
const char *repl_st_name(enum repl_st st);
/* The state named s; false if s names none. */
bool repl_st_parse(const char *s, enum repl_st *out);
/* Flags of repl_transition. */
#define REPL_T_SAVE 1u /* persist vm->repl (catalog_save_repl) */
/* The one place a replication's state changes (D->lock held): check that
 * vm->repl may go from its state to `to` (-EINVAL with the message if
 * not: a bug), set it and log the change at debug level; with REPL_T_SAVE
 * persist the replication and return the catalog's result.  Without
 * REPL_T_SAVE the caller persists the state with its other changes (in
 * one transaction, or with a rollback) or keeps it in memory on purpose
 * (start-up recovery). */
int repl_transition(struct vm *vm, enum repl_st to, unsigned flags) VR_WUR;
/* repl_transition, then, if it returned 0, record the event (level, fmt)
 * that tells the user of the change. */
int repl_transition_event(struct vm *vm, enum repl_st to, unsigned flags,
                          const char *level, const char *fmt, ...)
    VR_PRINTF(5, 6) VR_WUR;
/* failover.c: "VM - Test" while a test failover of vm runs (its name,
 * mode "test", the point, run directory and whether QEMU runs), else
 * NULL.  D->lock held. */
json_object *failover_test_vm_json(const struct vm *vm);
/* The VM's run directory (sockets, pids). Caller frees. */
char *vm_rundir(const struct vm *vm);
/* Fill a vmproc spec (vmproc.h) from vm, borrowing its strings. */
struct vmproc_spec;
struct vmproc_disk;
void vm_spec_of(const struct vm *vm, struct vmproc_spec *s,
                struct vmproc_disk *dks, char *rundir);
/* "kernel", "initrd", "cmdline" of a VM's JSON (vm create, registration):
 * absolute paths of files and printable text, validated; out[] are NULL or
 * allocated.  -EINVAL with a message. */
int vm_boot_parse(json_object *b, char *out[3]) VR_WUR;

/* --- network.c ---------------------------------------------------------- */
/* vm create's "nics": ["user", ...] -> NIC objects with new MACs. */
int nics_from_create(json_object *body, json_object **out) VR_WUR;
/* Fill a spec's NICs from vm; override: every NIC on that network. */
void nics_to_spec(const struct vm *vm, struct vmproc_spec *s,
                  const char *override);
/* After a failover started the VM in rundir (D->lock held): set its NICs'
 * failover settings in the guest once its agent answers (a thread). */
void network_inject_start(const struct vm *vm, const char *rundir);

/* --- api.c ------------------------------------------------------------- */
int api_start(const char *sock_path) VR_WUR;
void api_stop(void);
/* Remove sock_path only if it is still the socket api_start bound (same
 * device and inode): never another daemon's. */
void api_unlink_socket(const char *sock_path);

/* --- shipper.c (primary) ----------------------------------------------- */
/* Start the VM's replication thread if replication is on and not running. */
void shipper_ensure(struct vm *vm);
/* Stop and join it (drops and retakes d->lock). */
void shipper_stop(struct vm *vm);
/* POST /v1/vms/VM/replication: contact the Replica server, register. */
int shipper_enable(struct vm *vm, json_object *req, json_object **out) VR_WUR;
/* Tell the Replica server replication was removed (best effort). */
void shipper_remote_remove(struct vm *vm);
/* The last cycle of a disk's change log that holds no write made after
 * now (its last sealed cycle, or the open one's predecessor; 0 if there is
 * no log): every later write is in a cycle after it.  Disks not served. */
int shipper_log_base(const struct disk *dk, uint64_t *base) VR_WUR;
/* Bytes of change log not yet acknowledged. */
uint64_t shipper_pending_bytes(const struct vm *vm);

/* --- replica.c (Replica server) ---------------------------------------- */
/* Whether the auth setting ("certificate", "kerberos", "both"; unset is
 * certificate) asks for the HTTPS / the Kerberos listener. */
bool cfg_wants_certificate(const struct server_cfg *c);
bool cfg_wants_kerberos(const struct server_cfg *c);
/* (Re)start or stop the HTTPS listener per D->cfg. */
int replica_listener_apply(void) VR_WUR;
/* Stop it and wait for its requests (shutdown; caller holds no lock). */
void replica_listener_stop(void);
/* Apply every staged cycle of every Replica VM (startup recovery). */
int replica_recover(void) VR_WUR;
int replica_applier_start(void) VR_WUR;
void replica_applier_stop(void);

/* --- tls.c ------------------------------------------------------------- */
/* Validate certificate material: 0 or -EINVAL with a message. */
int tls_check_material(const char *cert, const char *key, const char *ca) VR_WUR;
/* First DNS SAN of a certificate file / certificate; caller frees. */
char *tls_cert_dns_name(const char *cert_path);
struct gnutls_x509_crt_int;
char *tls_crt_dns_name(struct gnutls_x509_crt_int *crt);
/* A thumbprint as given, normalized to lower-case hex: false unless it is
 * a SHA-1 (40 digits) or SHA-256 (64) one. */
bool tls_thumbprint_norm(const char *in, char out[65]);
/* SHA-1 thumbprint (hex) of a certificate file: 0 or -errno. */
int tls_thumbprint(const char *cert_path, char sha1[41]) VR_WUR;
/* The certificate of DIR (NAME.pem, its key NAME.key) whose SHA-1 or
 * SHA-256 thumbprint is THUMBPRINT: 0 and both paths (caller frees), or
 * -ENOENT/-EINVAL/-EEXIST with a message. */
int tls_find_by_thumbprint(const char *dir, const char *thumbprint,
                           char **cert, char **key) VR_WUR;

/* --- firewall.c -------------------------------------------------------- */
/* The mark table inet vmreplica sets on packets to the listener ports, for
 * the host's own ruleset to accept ("vmr"). */
#define FIREWALL_MARK 0x766d72u
/* After the listeners changed (start-up, server set), D->lock held: if the
 * firewall is enabled and its table does not hold the running listeners'
 * ports, rewrite it.  A failure is an error event, kept for
 * firewall_error(). */
void firewall_sync(void);
/* firewall_sync's last failure while enabled, or NULL.  D->lock held. */
const char *firewall_error(void);

#endif
