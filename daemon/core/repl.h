/* repl.h: the replication state machine and the event log (repl.c). */
#ifndef VR_REPL_H
#define VR_REPL_H

#include "catalog.h"
#include "state.h"
#include "vr.h"

/* Record an event (catalog + log).  level: "info", "warning", "error",
 * "audit".  Caller holds the daemon's lock. */
void event_add(struct catalog *cat, const char *level, const char *vm,
               const char *fmt, ...) VR_PRINTF(4, 5);
/* Flags of repl_transition. */
#define REPL_T_SAVE 1u /* persist vm->repl (catalog_save_repl) */
/* The one place a replication's state changes (d->lock held): check that
 * vm->repl may go from its state to `to` (-EINVAL with the message if
 * not: a bug), set it and log the change at debug level; with REPL_T_SAVE
 * persist the replication and return the catalog's result.  Without
 * REPL_T_SAVE the caller persists the state with its other changes (in
 * one transaction, or with a rollback) or keeps it in memory on purpose
 * (start-up recovery). */
int repl_transition(struct catalog *cat, struct vm *vm, enum repl_st to,
                    unsigned flags) VR_WUR;
/* repl_transition, then, if it returned 0, record the event (level, fmt)
 * that tells the user of the change. */
int repl_transition_event(struct catalog *cat, struct vm *vm,
                          enum repl_st to, unsigned flags, const char *level,
                          const char *fmt, ...) VR_PRINTF(6, 7) VR_WUR;

/* A resynchronization window "HH:MM-HH:MM" (local time; it may wrap past
 * midnight, start and end differ): 0 with its minutes of the day, or
 * -EINVAL with the reason. */
int resync_window_parse(const char *s, int *from, int *to) VR_WUR;
/* Is `now` inside window s?  NULL or empty: any time is. */
bool resync_window_open(const char *s, time_t now);

#endif
