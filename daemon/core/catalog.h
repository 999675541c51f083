/* catalog.h: the durable state — server settings, VMs, disks,
 * replications, recovery points, authorization entries and events — in
 * SQLite behind an opaque handle (catalog.c).  Callers hold the daemon's
 * lock. */
#ifndef VR_CATALOG_H
#define VR_CATALOG_H

#include <json-c/json.h>
#include <stddef.h>
#include <stdint.h>

#include "state.h"
#include "vr.h"

struct catalog;

/* Open (create, migrate) the catalog at path: *out is set even on a
 * failure, for catalog_close. */
int catalog_open(const char *path, struct catalog **out) VR_WUR;
/* Close it (NULL: nothing). */
void catalog_close(struct catalog *cat);
/* Load the server config into *cfg, and the VMs with their disks and
 * replications onto the list *vms. */
int catalog_load(struct catalog *cat, struct server_cfg *cfg,
                 struct vm **vms) VR_WUR;
int catalog_save_server(struct catalog *cat,
                        const struct server_cfg *cfg) VR_WUR;
int catalog_save_vm(struct catalog *cat, const struct vm *vm) VR_WUR;
int catalog_delete_vm(struct catalog *cat, const char *uuid) VR_WUR;
int catalog_save_repl(struct catalog *cat, const struct repl *r) VR_WUR;
int catalog_delete_repl(struct catalog *cat, const char *uuid) VR_WUR;
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
int catalog_auth_list(struct catalog *cat, struct auth_entry **out,
                      size_t *n) VR_WUR;
void auth_entries_free(struct auth_entry *e, size_t n);
int catalog_auth_put(struct catalog *cat, const struct auth_entry *e) VR_WUR;
/* -ENOENT if there is no entry for pattern. */
int catalog_auth_delete(struct catalog *cat, const char *pattern) VR_WUR;
/* A transaction around several saves: catalog_end(rc) commits if rc >= 0,
 * else rolls back and returns rc. */
int catalog_begin(struct catalog *cat) VR_WUR;
int catalog_end(struct catalog *cat, int rc) VR_WUR;

/* A recovery point of a Replica VM: the disks after cycle `cycle`. */
struct point {
    uint64_t cycle;
    uint64_t time_ms;  /* when it was applied (wall clock) */
    char kind[32];     /* "standard" (crash-consistent) or
                          "application-consistent" */
    uint64_t undo_bytes; /* undo data kept to reach it from the next one */
};
int catalog_add_point(struct catalog *cat, const char *uuid,
                      const struct point *p) VR_WUR;
/* cycle 0: every point of the VM. */
int catalog_delete_point(struct catalog *cat, const char *uuid,
                         uint64_t cycle) VR_WUR;
/* Points in cycle order; caller frees *out. */
int catalog_points(struct catalog *cat, const char *uuid, struct point **out,
                   size_t *n) VR_WUR;

/* Events, newest last, optional filter by VM name; caller puts them.
 * after_id 0: the newest max; else the first max with an id above it
 * (oldest first, so a follower misses none). */
json_object *catalog_events(struct catalog *cat, const char *vm,
                            int64_t after_id, unsigned max);
void catalog_add_event(struct catalog *cat, uint64_t time_ms, const char *level,
                       const char *vm, const char *msg);

#endif
