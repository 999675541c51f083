/* r1json.h: checks of what a peer sends as JSON in the replication
 * protocol — a registration's VM (name, disks, CPUs, memory) and its NICs
 * — pure functions of the document, so that they can be fuzzed
 * (fuzz/fuzz-r1json.c). */
#ifndef VR_R1JSON_H
#define VR_R1JSON_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#include "vr.h"

#define MAX_DISKS 16
#define R1_MAX_NICS 8 /* a VM's NICs */

#define R1_JSON_MAX   (64u << 10) /* a JSON request body */
#define R1_JSON_DEPTH 16          /* its nesting */

/* A JSON request body of len bytes (not NUL-terminated): the whole of it
 * one document, at most R1_JSON_MAX bytes and R1_JSON_DEPTH deep; NULL if
 * not. */
json_object *r1_json_parse(const char *body, size_t len);

/* The VM of a registration body b (a JSON object; b keeps ownership of
 * name).  0, or -EINVAL with the reason in vr_errmsg(). */
struct r1_reg {
    const char *name;
    size_t ndisks;
    uint64_t sizes[MAX_DISKS];
    int64_t cpus, memory_mib;
    unsigned frequency_s;   /* 0: not sent */
    int compression;        /* -1: not sent, else 0 or 1 */
    int64_t reverse_of;     /* 0: not a reverse replication */
    bool reverse_unplanned; /* a reverse after an unplanned failover: the
                             * old primary keeps its disks for a comparison */
};
/* Every number a registration carries is bounded here (SPEC §6): disks
 * 1..MAX_DISKS of 1 byte..1 PiB, cpus 1..64, memory_mib 16..1 TiB,
 * frequency 1 s..24 h (as `replication enable`), reverse_of >= 1, each a
 * JSON integer; compression and reverse_unplanned booleans, the latter
 * not with reverse_of. */
#define R1_MAX_FREQUENCY_S 86400
int r1_register_parse(json_object *b, struct r1_reg *reg) VR_WUR;

/* "none", "user", "tap:IFNAME" or "bridge:BRIDGE": 0 or -EINVAL. */
int network_valid(const char *net) VR_WUR;
/* A VM's NICs as stored and as they travel (api/vm-network.c has the format):
 * 0 or -EINVAL. */
int nics_validate(json_object *arr) VR_WUR;

#endif
