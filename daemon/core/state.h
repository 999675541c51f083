/* state.h: vmreplicad's state — VMs, their disks and replications, the
 * server's settings, and the daemon object that holds them.
 *
 * Concurrency: one mutex (struct daemon.lock) guards every field of these
 * objects and the catalog connection.  Threads hold it only for short
 * bookkeeping and never across network or disk transfers: they copy what
 * they need, drop the lock, work, then take it again to record the result.
 * The catalog (SQLite, WAL) is the durable truth; the in-memory objects
 * mirror it and every change is written through.
 */
#ifndef VR_STATE_H
#define VR_STATE_H

#include <json-c/json.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "r1json.h" /* MAX_DISKS */
#include "vr.h"

struct disk {
    char id[16];   /* "disk0" */
    char *path;    /* raw image */
    uint64_t size; /* bytes */
};

enum vm_mode { VM_MODE_NONE, VM_MODE_PRIMARY, VM_MODE_REPLICA };

/* Operations in progress on a VM (vm->ops): each runs with the daemon's
 * lock dropped for its slow part, and marks the VM so that what must not
 * run meanwhile stays away.  Runtime only (never in the catalog).
 *
 * Invariant: an operation is begun (vm_op_begin) only by its owner, under
 * the lock, after it has checked with vm_busy that nothing it excludes is
 * in progress, itself included; it ends it (vm_op_end) under the lock.
 * vm_op_begin checks the "itself included" part for every operation.
 * What refuses to start (EBUSY), skips or waits while which operations run:
 *
 *   starting ...           refused (or waits) while ...
 *   APPLY (the applier)    TEST (skips the VM)
 *   RECEIVE (an upload)    RECEIVE, FAILOVER (own_vm)
 *   CHANGE (start, stop)   CHANGE; PREPARE (vm start)
 *   TEST (test failover)   TEST, FAILOVER; waits for APPLY
 *   FAILOVER (any step)    FAILOVER, TEST; CHANGE (planned); waits for APPLY
 *   PREPARE (primary)      PREPARE, CHANGE, REMOVE
 *   REMOVE (replication)   REMOVE, CHANGE, PREPARE, FAILOVER; then APPLY,
 *                          RECEIVE, TEST
 *   suspend, resume        PREPARE, FAILOVER, CHANGE
 *   registration           APPLY, RECEIVE, FAILOVER, TEST
 *   vm remove              APPLY, CHANGE, TEST
 *   vm set-boot            CHANGE, FAILOVER, TEST
 *
 * (The exact set each caller checks is at its vm_busy call, with its
 * message.)  Two operations can run at once where neither excludes the
 * other: APPLY with RECEIVE (the next cycle is staged while one is
 * applied), CHANGE with PREPARE or FAILOVER (their own start and stop). */
enum vm_op {
    VM_OP_APPLY = 1u << 0,    /* the applier works on the Replica disks */
    VM_OP_RECEIVE = 1u << 1,  /* an upload from the primary is staged */
    VM_OP_CHANGE = 1u << 2,   /* a start, stop or other change of processes */
    VM_OP_TEST = 1u << 3,     /* a test failover starts or stops */
    VM_OP_FAILOVER = 1u << 4, /* a failover step (planned or not) */
    VM_OP_PREPARE = 1u << 5,  /* failover prepare (primary) */
    VM_OP_REMOVE = 1u << 6,   /* replication remove (primary) */
};

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
    /* NICs (api/vm-network.c: JSON array of {mac, network, failover}) or NULL;
     * the network a test failover puts them on (NULL: "none"). */
    json_object *nics;
    char *test_network;
    /* vm create --from-libvirt: the persistent libvirt domain redefined
     * on the tracked exports (docs/libvirt.md), or NULL. */
    char *libvirt_domain;
    bool hypervisor; /* QEMU is asked of the next start (status: vm_to_json,
                      * from the processes) */
    unsigned ops;    /* operations in progress (enum vm_op, vm_busy) */
    /* Replica VMs: the primary that registered it last and the trust
     * group of the authorization entry it was created under ("": none).
     * Kept when the relationship is removed (from either side), so that
     * only that primary, or one of its trust group, may register the VM
     * again (replica/replica-register.c, check_owner).  NULL owner: not
     * known (a VM kept from a removal before the catalog recorded it). */
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
    REPL_ST_RESYNC,          /* "Resynchronizing" (primary) */
    REPL_ST_WAIT_RESYNC,     /* "WaitingForStartResynchronize" (primary):
                              * a resynchronization waits for its time
                              * (--at) or its window (--resync-window) */
    REPL_ST_RESYNC_SUSPENDED, /* "ResynchronizeSuspended" (primary) */
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

/* How an initial replication goes: every allocated byte over the network,
 * only the chunks that differ from the Replica server's copy, or written
 * to external media (--export DIR) and imported there. */
enum initial_method { INITIAL_FULL = 0, INITIAL_COMPARE = 1,
                      INITIAL_EXPORT = 2 };

/* Steps of a resynchronization on the primary (resync.c), in
 * repl.resync_step; each is in the catalog before its work starts. */
enum resync_step {
    RESYNC_NONE = 0,
    RESYNC_REQUESTED, /* replication resume --resync: tracking to re-arm */
    RESYNC_COMPARING, /* re-armed after resync_void: compare and send */
    RESYNC_COMPLETING, /* cycles up to resync_void sent: say F */
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
    /* How the copy goes: every allocated byte (full), or only the chunks
     * whose hashes differ from the copy the Replica server has (compare:
     * initial-replication start --use-existing); a comparison's progress
     * is initial_compared of initial_total. */
    enum initial_method initial_method;
    uint64_t initial_compared;
    /* Primary: a scheduled start (initial-replication start --at), wall
     * clock ms; 0 none.  The state stays ReadyForInitialReplication until
     * then (initial.c, initial_schedule_due). */
    uint64_t initial_at_ms;
    /* Primary: the directory an export (--export) writes to; NULL none. */
    char *initial_export;
    /* Replica: the base cycle of the export imported into the disks
     * (initial-replication import); 0 none.  The primary reads it from the
     * status and then sends initial-complete. */
    uint64_t imported_base;
    /* Resynchronization (primary, resync.c): the step reached, the void
     * cycle C after which the data plane re-armed tracking, the first
     * consistent cycle F once the comparison's last read is done, and the
     * bytes compared and sent. */
    enum resync_step resync_step;
    uint64_t resync_void, resync_first, resync_compared, resync_sent;
    /* Replica: cycles from hold_from on are staged but not applied until
     * hold_to is staged (0: not known yet), then applied in one run, so
     * the Replica VM stays at hold_from - 1 until a resynchronization's
     * cut can be reached whole.  hold_from 0: no hold. */
    uint64_t hold_from, hold_to;
    /* Primary: the unsent change log may grow to this many bytes (0: half
     * the disks' size) before it is folded into dirty-region maps and the
     * Replica server, when back, is resynchronized from them (SPEC §3). */
    uint64_t log_budget;
    /* Primary: when change tracking stops, wait for replication resume
     * --resync instead of resynchronizing at once (--auto-resync off). */
    bool auto_resync_off;
    /* Primary: when a scheduled resynchronization starts (Unix seconds;
     * 0: none), and the daily window ("HH:MM-HH:MM", local time; NULL:
     * any time) in which an automatic one may start. */
    int64_t resync_at;
    char *resync_window;
    /* cycles */
    uint64_t last_cycle;    /* primary: last acknowledged; replica: staged */
    uint64_t applied_cycle; /* replica: last applied */
    /* statistics (reset-stats clears them) */
    uint64_t last_ok_ms;
    uint64_t errors, ok_count, missed;
    /* primary: cycles missed since the last successful one (health shows
     * an outage as it happens; not saved, not cleared by reset-stats) */
    uint64_t missed_run;
    uint64_t bytes_raw, bytes_wire;
    uint64_t max_size, sum_size;
    uint64_t max_latency_ms, sum_latency_ms;
    char *last_error;
    bool untracked; /* runtime, primary: the data plane stopped tracking
                       (its log could not follow); cleared by a cycle sent */
    /* recovery history (kept on the Replica server, set on the primary) */
    unsigned recovery_history; /* hourly points kept besides the latest */
    unsigned point_interval_s; /* the "hour"; 3600 unless shortened */
#define REPL_MAX_HISTORY 720
    /* replica: test failover ("NAME - Test" from an overlay on a view of
     * this point, in STORAGE/test); 0 = none.  The point is kept while it
     * lasts, and the applier REFRESHes the view before each cycle. */
    uint64_t test_point;
    /* replica: failover (planned or unplanned, not a test) at this point;
     * 0 = none.  The VM runs as itself from overlays on a view of the
     * point in STORAGE/failover until `failover complete` writes the
     * overlays into its disks or `failover stop` discards them. */
    uint64_t failover_point;
    int failover_step;  /* enum fo_step */
    uint64_t last_contact_ms; /* runtime, wall clock: the primary's last
                                 authenticated request for this VM */
    /* replica, runtime only: base chunk base_unsynced (when
     * base_unsynced_set) was applied by this process and its disks are
     * not yet synced; the next base chunk or initial-complete syncs them
     * and says so (docs/design.md, "When a base chunk is durable"). */
    uint64_t base_unsynced;
    bool base_unsynced_set;
    /* replica, runtime only: this copy's primary takes unsynced answers
     * (it said so when the copy started; a restart forgets it, and the
     * copy goes on with each chunk synced before its answer). */
    bool base_defer_sync;
    /* primary, runtime only: initial-complete is being sent.  replica,
     * runtime only: initial-complete is syncing the last chunk's disks
     * without the daemon's lock (another one waits for it). */
    bool initial_committing;
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
    /* `server set --web-listen`: ADDR:PORT of the read-only web listener
     * (metrics, dashboard; web.c), or NULL: off. */
    char *web_listen;
    /* `server set --hypervisor libvirt`: VMs (and failed-over Replica VMs)
     * start as libvirt domains unless `vm start --hypervisor` says. */
    bool hypervisor_libvirt;
};

struct catalog;

struct daemon {
    pthread_mutex_t lock;
    pthread_cond_t cond; /* broadcast on any change the threads wait for */
    char *state_dir;
    struct catalog *cat; /* core/catalog.h */
    struct server_cfg cfg;
    struct vm *vms;
    bool shutting_down;
    struct MHD_Daemon *api;
    struct MHD_Daemon *listener;     /* certificate port (HTTPS) */
    struct MHD_Daemon *krb_listener; /* Kerberos port (HTTP) */
    pthread_t applier;
};

/* Is any of the operations in mask (enum vm_op bits) in progress on vm? */
static inline bool
vm_busy(const struct vm *vm, unsigned mask)
{
    return (vm->ops & mask) != 0;
}
/* Mark op in progress on vm / ended (the daemon's lock held). */
void vm_op_begin(struct vm *vm, enum vm_op op);
void vm_op_end(struct vm *vm, enum vm_op op);

/* The one trust-group check (SPEC §6): may a primary of peer_group (NULL:
 * none) use a Replica VM of group (NULL or "": none, any primary)? */
bool trust_group_admits(const char *group, const char *peer_group);

/* "primary", "replica" or "none". */
const char *vm_mode_name(enum vm_mode m);
/* A replication state's name as shown and stored ("Replicating"). */
const char *repl_st_name(enum repl_st st);
/* The state named s; false if s names none. */
bool repl_st_parse(const char *s, enum repl_st *out);

#endif
