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
};
int r1_register_parse(json_object *b, struct r1_reg *reg) VR_WUR;

/* "none", "user", "tap:IFNAME" or "bridge:BRIDGE": 0 or -EINVAL. */
int network_valid(const char *net) VR_WUR;
/* A VM's NICs as stored and as they travel (network.c has the format):
 * 0 or -EINVAL. */
int nics_validate(json_object *arr) VR_WUR;

#endif
