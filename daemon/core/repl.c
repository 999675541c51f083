/* repl.c: the replication state machine and the event log.  A
 * replication's state (enum repl_st) changes only in repl_transition,
 * which checks the change against the table of legal next states; an
 * event is one line of the log and one row of the catalog. */
#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "repl.h"

void
event_add(struct catalog *cat, const char *level, const char *vm,
          const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int lv = strcmp(level, "error") == 0     ? LOG_ERROR
             : strcmp(level, "warning") == 0 ? LOG_WARN
             : strcmp(level, "audit") == 0   ? LOG_WARN
                                             : LOG_INFO;
    log_msg(lv, strcmp(level, "audit") == 0 ? "audit" : "event", "%s%s%s",
            vm ? vm : "", vm ? ": " : "", msg);
    catalog_add_event(cat, vr_wall_ms(), level, vm, msg);
}

#define B(st) (1u << (st))
/* Where each state may go, besides staying where it is.  From every state:
 * Error (a cycle or an apply failed for good), WaitingForInitialReplication
 * (a registration starts a relationship afresh, and reverses a prepared
 * primary) and FailOverWaitingCompletion (an unplanned failover starts at
 * whatever the Replica VM reached).  Disabled is only ever read from an
 * old catalog row, so it may go anywhere. */
#define ST_ANY_TO                                                              \
    (B(REPL_ST_ERROR) | B(REPL_ST_WAITING_INITIAL) | B(REPL_ST_FAILOVER_WAIT))
#define ST_RESUME_TO                                                           \
    (B(REPL_ST_REPLICATING) | B(REPL_ST_WAITING_INITIAL) |                     \
     B(REPL_ST_INITIAL) | B(REPL_ST_READY_INITIAL))
static const unsigned st_next[REPL_ST_COUNT] = {
    [REPL_ST_DISABLED] = B(REPL_ST_COUNT) - 1,
    /* initial start; suspend; initial completes after a resume */
    [REPL_ST_READY_INITIAL] =
        B(REPL_ST_INITIAL) | B(REPL_ST_SUSPENDED) | B(REPL_ST_REPLICATING),
    /* the base copy completes; suspend; initial-replication stop */
    [REPL_ST_INITIAL] = B(REPL_ST_REPLICATING) | B(REPL_ST_SUSPENDED) |
                        B(REPL_ST_READY_INITIAL),
    /* initial-complete from the primary; suspend */
    [REPL_ST_WAITING_INITIAL] =
        B(REPL_ST_REPLICATING) | B(REPL_ST_SUSPENDED),
    /* suspend; failover prepare (primary); planned failover (replica) */
    [REPL_ST_REPLICATING] = B(REPL_ST_SUSPENDED) | B(REPL_ST_PREPARED) |
                            B(REPL_ST_FAILED_OVER) | B(REPL_ST_RESYNC) |
                            B(REPL_ST_WAIT_RESYNC),
    /* resume (--resync [--at]) */
    [REPL_ST_SUSPENDED] = ST_RESUME_TO | B(REPL_ST_RESYNC) |
                          B(REPL_ST_WAIT_RESYNC),
    /* resume (--resync [--at]); suspend; a planned failover whose wait
     * saw an apply fail */
    [REPL_ST_ERROR] = ST_RESUME_TO | B(REPL_ST_SUSPENDED) |
                      B(REPL_ST_FAILED_OVER) | B(REPL_ST_RESYNC) |
                      B(REPL_ST_WAIT_RESYNC),
    /* failover complete; failover stop (or its crash recovery) */
    [REPL_ST_FAILOVER_WAIT] = B(REPL_ST_FAILED_OVER) | B(REPL_ST_REPLICATING),
    [REPL_ST_FAILED_OVER] = 0,
    /* failover stop on the primary withdraws the preparation */
    [REPL_ST_PREPARED] = B(REPL_ST_REPLICATING),
    /* the resynchronization completes; suspend */
    [REPL_ST_RESYNC] = B(REPL_ST_REPLICATING) | B(REPL_ST_RESYNC_SUSPENDED) |
                       B(REPL_ST_ERROR),
    /* its time or window came; suspend; stop-resync */
    [REPL_ST_WAIT_RESYNC] = B(REPL_ST_RESYNC) | B(REPL_ST_RESYNC_SUSPENDED) |
                            B(REPL_ST_ERROR),
    /* resume --resync [--continue | --at]; stop-resync */
    [REPL_ST_RESYNC_SUSPENDED] = B(REPL_ST_RESYNC) | B(REPL_ST_WAIT_RESYNC) |
                                 B(REPL_ST_ERROR),
};

int
repl_transition(struct catalog *cat, struct vm *vm, enum repl_st to,
                unsigned flags)
{
    struct repl *r = vm->repl;
    assert((unsigned)to < REPL_ST_COUNT);
    if (to != r->st && !((st_next[r->st] | ST_ANY_TO) & B(to))) {
        int rc = vr_err(-EINVAL, "vm %s: replication state %s cannot change "
                        "to %s", vm->name, repl_st_name(r->st),
                        repl_st_name(to));
        log_error("repl", "%s", vr_errmsg());
        return rc;
    }
    if (to != r->st)
        log_debug("repl", "%s: state %s -> %s", vm->name,
                  repl_st_name(r->st), repl_st_name(to));
    r->st = to;
    return flags & REPL_T_SAVE ? catalog_save_repl(cat, r) : 0;
}

int
repl_transition_event(struct catalog *cat, struct vm *vm, enum repl_st to,
                      unsigned flags, const char *level, const char *fmt,
                      ...)
{
    int rc = repl_transition(cat, vm, to, flags);
    if (rc < 0)
        return rc;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    event_add(cat, level, vm->name, "%s", msg);
    return 0;
}
#undef B

static bool
hhmm(const char *s, int *min)
{
    if (strlen(s) < 5 || s[0] < '0' || s[0] > '2' || s[1] < '0' ||
        s[1] > '9' || s[2] != ':' || s[3] < '0' || s[3] > '5' || s[4] < '0' ||
        s[4] > '9')
        return false;
    int h = (s[0] - '0') * 10 + (s[1] - '0');
    if (h > 23)
        return false;
    *min = h * 60 + (s[3] - '0') * 10 + (s[4] - '0');
    return true;
}

int
resync_window_parse(const char *s, int *from, int *to)
{
    if (strlen(s) != 11 || s[5] != '-' || !hhmm(s, from) ||
        !hhmm(s + 6, to))
        return vr_err(-EINVAL, "resync window '%s': want HH:MM-HH:MM (local "
                      "time, e.g. 22:00-06:00)", s);
    if (*from == *to)
        return vr_err(-EINVAL, "resync window '%s': it starts where it ends "
                      "(leave the window out for any time)", s);
    return 0;
}

bool
resync_window_open(const char *s, time_t now)
{
    int from, to;
    if (!s || !*s || resync_window_parse(s, &from, &to) < 0) {
        vr_err_clear();
        return true;
    }
    struct tm tm;
    localtime_r(&now, &tm);
    int m = tm.tm_hour * 60 + tm.tm_min;
    return from < to ? m >= from && m < to : m >= from || m < to;
}
