/* vms.h: the VM and replication objects every layer above core shares
 * (core/vms.c).  Functions that read the daemon's list or settings take
 * the daemon's state as their first parameter; the caller holds d->lock
 * where the comment says so. */
#ifndef VR_VMS_H
#define VR_VMS_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#include "state.h"
#include "vr.h"

/* The VM named key (name or UUID) / with that UUID, or NULL (d->lock). */
struct vm *vm_find(struct daemon *d, const char *key);
struct vm *vm_find_uuid(struct daemon *d, const char *uuid);
/* d->lock held: the VM named key (name or UUID) in *out, or -ENOENT with
 * "vm KEY: not found" (*out NULL).  Every API lookup starts here. */
int vm_lookup(struct daemon *d, const char *key, struct vm **out) VR_WUR;
/* Is vm a kept copy: a Replica VM whose replication was removed (its
 * disks kept to seed a new initial replication)? */
bool vm_is_kept_copy(const struct vm *vm);
/* d->lock held: -EINVAL with the one message every command gives a kept
 * copy it does not apply to: what it is and the commands that do. */
int vm_kept_copy_err(const struct vm *vm, const char *what) VR_WUR;
/* Free a VM (and its replication) / a replication; NULL is a no-op. */
void vm_free(struct vm *vm);
void repl_free(struct repl *r);
/* The VM's run directory (sockets, pids). Caller frees. */
char *vm_rundir(const struct daemon *d, const struct vm *vm);
/* "kernel", "initrd", "cmdline" of a VM's JSON (vm create, registration):
 * absolute paths of files and printable text, validated; out[] are NULL or
 * allocated.  -EINVAL with a message. */
int vm_boot_parse(json_object *b, char *out[3]) VR_WUR;
/* Wait on d->cond for at most ms (caller holds d->lock). */
void daemon_wait_ms(struct daemon *d, uint64_t ms);

/* The string / boolean / integer member key of o, or NULL / dflt. */
const char *jstr(json_object *o, const char *key);
bool jbool(json_object *o, const char *key, bool dflt);
int64_t jint(json_object *o, const char *key, int64_t dflt);
/* o[key] = wall-clock time ms as RFC 3339, or null if 0. */
void json_add_time(json_object *o, const char *key, uint64_t ms);

/* The state shown (SPEC §9): r->st's name, or TestFailoverInProgress. */
const char *repl_state(const struct repl *r);
/* The first cycle that may be a recovery point (see first_point). */
uint64_t repl_first_point(const struct repl *r);
/* "Normal", "Warning" or "Critical", with the reasons added to details
 * (an array, or NULL). */
const char *repl_health(const struct repl *r, json_object *details);
/* "FQDN[:PORT]" as --replica-server takes it. */
bool repl_server_name_valid(const char *s);
/* The authentication a replication uses ("certificate" unless set). */
const char *repl_auth(const struct repl *r);
/* "certificate" or "kerberos": 0, else -EINVAL with the message. */
int repl_auth_check(const char *auth) VR_WUR;
/* Does r use Kerberos? */
bool repl_kerberos(const struct repl *r);
/* SERVER with the default port of r's authentication unless it has one.
 * Caller frees. */
char *repl_server_with_port(const char *server, const struct repl *r);
/* Do the server settings c give this host the identity r's
 * authentication needs?  0 or -EINVAL with what to run. */
int repl_check_identity(const struct server_cfg *c,
                        const struct repl *r) VR_WUR;
/* The body of a registration (PUT /r1/vms/UUID) of vm under r. */
json_object *repl_register_body(const struct vm *vm, const struct repl *r);
/* GET .../replication: r's settings, state, health and counters; hostname
 * is this server's name (the primary's, when vm is a primary VM). */
json_object *repl_to_json(const struct vm *vm, const char *hostname);

#endif
