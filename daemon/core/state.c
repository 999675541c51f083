/* state.c: the names of the state's enums, as the API, the CLI and the
 * catalog show and store them (they never change), and the operations in
 * progress on a VM (state.h, enum vm_op), and the trust-group check. */
#include <string.h>

#include "log.h"
#include "state.h"

bool
trust_group_admits(const char *group, const char *peer_group)
{
    return !group || !*group ||
           strcmp(group, peer_group ? peer_group : "") == 0;
}

void
vm_op_begin(struct vm *vm, enum vm_op op)
{
    /* Never begun twice: its owner checked vm_busy first (a bug if not;
     * logged, the operation goes on as it always did). */
    if (vm->ops & op)
        log_error("vm", "%s: operation 0x%x begun while in progress",
                  vm->name, (unsigned)op);
    vm->ops |= op;
}

void
vm_op_end(struct vm *vm, enum vm_op op)
{
    vm->ops &= ~(unsigned)op;
}

const char *
vm_mode_name(enum vm_mode m)
{
    switch (m) {
    case VM_MODE_PRIMARY:
        return "primary";
    case VM_MODE_REPLICA:
        return "replica";
    default:
        return "none";
    }
}

static const char *const st_names[REPL_ST_COUNT] = {
    [REPL_ST_DISABLED] = "Disabled",
    [REPL_ST_READY_INITIAL] = "ReadyForInitialReplication",
    [REPL_ST_INITIAL] = "InitialReplicationInProgress",
    [REPL_ST_WAITING_INITIAL] = "WaitingForInitialReplication",
    [REPL_ST_REPLICATING] = "Replicating",
    [REPL_ST_SUSPENDED] = "Suspended",
    [REPL_ST_ERROR] = "Error",
    [REPL_ST_FAILOVER_WAIT] = "FailOverWaitingCompletion",
    [REPL_ST_FAILED_OVER] = "FailedOver",
    [REPL_ST_PREPARED] = "PreparedForFailover",
    [REPL_ST_RESYNC] = "Resynchronizing",
    [REPL_ST_WAIT_RESYNC] = "WaitingForStartResynchronize",
    [REPL_ST_RESYNC_SUSPENDED] = "ResynchronizeSuspended",
};

const char *
repl_st_name(enum repl_st st)
{
    return (unsigned)st < REPL_ST_COUNT ? st_names[st] : "Unknown";
}

bool
repl_st_parse(const char *s, enum repl_st *out)
{
    for (unsigned i = 0; i < REPL_ST_COUNT; i++)
        if (strcmp(s, st_names[i]) == 0) {
            *out = (enum repl_st)i;
            return true;
        }
    return false;
}
