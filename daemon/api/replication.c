/* replication.c: the replication endpoints of the management API (enable,
 * set, show, list, measure, suspend, resume, remove, reset-stats, initial
 * replication), health by Hyper-V's rules, and the /metrics text. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api-int.h"
#include "core/logdir.h"

/* initial-replication start --at: at most this far ahead (SPEC §5). */
#define INITIAL_AT_MAX_MS (7ull * 24 * 3600 * 1000)

static int
lookup_repl(struct api_call *call, struct vm **out)
{
    struct vm *vm;
    int rc = vm_lookup(actx.d, call->arg, &vm);
    if (rc < 0)
        return rc;
    if (vm_is_kept_copy(vm))
        return vm_kept_copy_err(vm, "this replication command");
    if (!vm->repl)
        return vr_err(-ENOENT, "vm %s: replication is not enabled",
                      vm->name);
    if (vm_busy(vm, VM_OP_REMOVE))
        return vr_err(-EBUSY, "vm %s: replication is being removed",
                      vm->name);
    *out = vm;
    return 0;
}

json_object *
repl_measure_json(const struct vm *vm)
{
    const struct repl *r = vm->repl;
    json_object *o = json_object_new_object();
    json_object *details = json_object_new_array();
    const char *health = repl_health(r, details);
    json_object_object_add(o, "vm", json_object_new_string(vm->name));
    json_object_object_add(o, "mode",
                           json_object_new_string(vm_mode_name(r->mode)));
    json_object_object_add(o, "state", json_object_new_string(repl_state(r)));
    json_object_object_add(o, "health", json_object_new_string(health));
    json_object_object_add(o, "health_details", details);
    json_add_time(o, "last_replication_time", r->last_ok_ms);
    uint64_t n = r->ok_count ? r->ok_count : 1;
#define I64(k, v) json_object_object_add(o, k, json_object_new_int64((int64_t)(v)))
    I64("average_replication_size", r->sum_size / n);
    I64("maximum_replication_size", r->max_size);
    json_object_object_add(
        o, "average_replication_latency",
        json_object_new_double((double)r->sum_latency_ms / (double)n / 1000.0));
    json_object_object_add(
        o, "maximum_replication_latency",
        json_object_new_double((double)r->max_latency_ms / 1000.0));
    I64("replication_errors", r->errors);
    I64("successful_replication_count", r->ok_count);
    I64("missed_replication_count", r->missed);
    I64("pending_size",
        r->mode == VM_MODE_PRIMARY ? shipper_pending_bytes(vm, NULL) : 0);
    I64("initial_replication_size", r->initial_total);
    I64("initial_replication_sent", r->initial_sent);
    json_object_object_add(
        o, "initial_replication_method",
        json_object_new_string(r->initial_method == INITIAL_COMPARE  ? "compare"
                               : r->initial_method == INITIAL_EXPORT ? "export"
                                                                     : "full"));
    I64("initial_replication_compared", r->initial_compared);
    json_add_time(o, "initial_replication_scheduled", r->initial_at_ms);
    json_object_object_add(
        o, "initial_replication_export",
        r->initial_export ? json_object_new_string(r->initial_export) : NULL);
    /* An export written, waiting for the Replica server's import. */
    json_object_object_add(
        o, "initial_replication_exported",
        json_object_new_boolean(r->initial_method == INITIAL_EXPORT &&
                                r->st == REPL_ST_INITIAL &&
                                r->initial_seq && r->initial_disk >= vm->ndisks));
    I64("resync_compared", r->resync_compared);
    I64("resync_sent", r->resync_sent);
    I64("bytes_sent_raw", r->bytes_raw);
    I64("bytes_sent_wire", r->bytes_wire);
    I64("last_cycle", r->last_cycle);
    I64("applied_cycle",
        r->mode == VM_MODE_REPLICA ? r->applied_cycle : r->last_cycle);
#undef I64
    bool initial = r->st == REPL_ST_INITIAL;
    json_object_object_add(
        o, "current_task",
        json_object_new_string(initial                     ? "InitialReplication"
                               : r->st == REPL_ST_RESYNC ? "Resynchronization"
                                                         : "None"));
    int pct = 100;
    uint64_t done = r->initial_method == INITIAL_COMPARE ? r->initial_compared
                                                         : r->initial_sent;
    if (!r->initial_done)
        pct = r->initial_total ? (int)(done * 100 / r->initial_total) : 0;
    if (pct > 100)
        pct = 100;
    json_object_object_add(o, "progress_percent", json_object_new_int(pct));
    return o;
}

static int
parse_common(json_object *b, struct repl *r)
{
    json_object *v;
    if (json_object_object_get_ex(b, "frequency", &v)) {
        int64_t f = json_object_get_int64(v);
        if (f < 1 || f > 86400)
            return vr_err(-EINVAL, "frequency: must be 1 s .. 24 h");
        r->frequency_s = (unsigned)f;
    }
    if (json_object_object_get_ex(b, "compression", &v))
        r->compression = json_object_get_boolean(v);
    if (json_object_object_get_ex(b, "recovery_history", &v)) {
        int64_t n = json_object_get_int64(v);
        if (n < 0 || n > REPL_MAX_HISTORY)
            return vr_err(-EINVAL, "recovery_history: must be 0 .. %d",
                          REPL_MAX_HISTORY);
        r->recovery_history = (unsigned)n;
    }
    if (json_object_object_get_ex(b, "app_consistent_every", &v)) {
        int64_t n = json_object_get_int64(v);
        if (n < 0 || n > REPL_MAX_HISTORY)
            return vr_err(-EINVAL, "app_consistent_every: must be 0 .. %d",
                          REPL_MAX_HISTORY);
        r->app_every = (unsigned)n;
        r->app_last_ms = 0;
    }
    if (json_object_object_get_ex(b, "auto_resync", &v))
        r->auto_resync_off = !json_object_get_boolean(v);
    const char *win = jstr(b, "resync_window");
    if (win) {
        int from, to;
        if (*win && resync_window_parse(win, &from, &to) < 0)
            return -EINVAL;
        free(r->resync_window);
        r->resync_window = *win ? xstrdup(win) : NULL;
    }
    if (json_object_object_get_ex(b, "log_budget", &v)) {
        int64_t n = json_object_get_int64(v);
        if (n < 0 || (n > 0 && n < (1 << 20)) || n > (INT64_MAX >> 1))
            return vr_err(-EINVAL, "log_budget: must be 0 (half the disks' "
                          "size) or at least 1 MiB");
        r->log_budget = (uint64_t)n;
    }
    if (json_object_object_get_ex(b, "point_interval", &v)) {
        int64_t n = json_object_get_int64(v);
        if (n < 1 || n > 86400)
            return vr_err(-EINVAL, "point_interval: must be 1 s .. 24 h");
        r->point_interval_s = (unsigned)n;
    }
    const char *ca = jstr(b, "connect_address");
    if (ca) {
        free(r->connect_address);
        r->connect_address = *ca ? xstrdup(ca) : NULL;
    }
    const char *auth = jstr(b, "auth");
    if (auth) {
        int rc = repl_auth_check(auth);
        if (rc < 0)
            return rc;
        free(r->auth);
        r->auth = xstrdup(auth);
    }
    if (json_object_object_get_ex(b, "kerberos_encrypt", &v))
        r->krb_encrypt = json_object_get_boolean(v);
    if (r->krb_encrypt && !repl_kerberos(r))
        return vr_err(-EINVAL, "kerberos_encrypt: only with auth kerberos "
                      "(certificate mode is always encrypted)");
    return 0;
}

int
api_repl_enable(struct api_call *call, unsigned *status, json_object **out)
{
    json_object *b = call->body;
    const char *server = jstr(b, "replica_server");
    if (!server || !repl_server_name_valid(server))
        return vr_err(-EINVAL, "replica_server: expected FQDN[:PORT]");
    struct repl *r = xcalloc(1, sizeof *r);
    r->mode = VM_MODE_PRIMARY;
    r->frequency_s = 300;
    r->compression = true;
    r->point_interval_s = 3600;
    r->epoch = 1;
    r->st = REPL_ST_READY_INITIAL;
    int rc = parse_common(b, r);
    r->replica_server = repl_server_with_port(server, r);

    if (rc < 0) {
        repl_free(r);
        return rc;
    }
    rc = primary_enable(call->arg, r, jbool(b, "start_initial", false), out);
    if (rc == 0)
        *status = 201;
    return rc;
}

int
api_repl_set(struct api_call *call, unsigned *status VR_UNUSED,
             json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    if (rc == 0) {
        rc = parse_common(call->body, vm->repl);
        if (rc == 0)
            rc = catalog_save_repl(actx.d->cat, vm->repl);
        if (rc == 0) {
            vm->repl->kick = true;
            pthread_cond_broadcast(&actx.d->cond);
            *out = repl_to_json(vm, actx.d->cfg.hostname);
        }
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

/* Render the VM's replication with fn, under the lock. */
static json_object *
repl_json(const struct vm *vm)
{
    return repl_to_json(vm, actx.d->cfg.hostname);
}

static int
render_repl(struct api_call *call, json_object **out,
            json_object *(*fn)(const struct vm *))
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    if (rc == 0)
        *out = fn(vm);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

int
api_repl_show(struct api_call *call, unsigned *status VR_UNUSED,
              json_object **out)
{
    return render_repl(call, out, repl_json);
}

int
api_repl_measure(struct api_call *call, unsigned *status VR_UNUSED,
                 json_object **out)
{
    return render_repl(call, out, repl_measure_json);
}

int
api_repl_list(struct api_call *call, unsigned *status VR_UNUSED,
              json_object **out)
{
    const char *state = api_query(call, "state");
    const char *health = api_query(call, "health");
    const char *mode = api_query(call, "mode");
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&actx.d->lock);
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next) {
        if (!vm->repl)
            continue;
        if (state && strcasecmp(state, repl_state(vm->repl)) != 0)
            continue;
        if (health && strcasecmp(health, repl_health(vm->repl, NULL)) != 0)
            continue;
        /* --mode test: the Replica VMs with a test failover running. */
        bool test = vm->repl->mode == VM_MODE_REPLICA && vm->repl->test_point;
        if (mode && strcasecmp(mode, "test") == 0 ? !test
            : mode && strcasecmp(mode, vm_mode_name(vm->repl->mode)) != 0)
            continue;
        json_object_array_add(arr, repl_to_json(vm, actx.d->cfg.hostname));
    }
    pthread_mutex_unlock(&actx.d->lock);
    *out = json_object_new_object();
    json_object_object_add(*out, "replications", arr);
    return 0;
}

/* d->lock held: the shipper (or applier) waits for a state change. */
static void
wake(struct vm *vm)
{
    vm->repl->kick = true;
    pthread_cond_broadcast(&actx.d->cond);
}

/* d->lock held: suspend and resume leave a failover's states alone (a
 * prepared primary resumed could start its VM while the Replica server
 * fails over at the prepared cycle). */
static int
check_not_failing_over(const struct vm *vm)
{
    const struct repl *r = vm->repl;
    if (vm_busy(vm, VM_OP_PREPARE | VM_OP_FAILOVER | VM_OP_CHANGE))
        return vr_err(-EBUSY, "vm %s: a failover step or another change is "
                      "in progress; try again", vm->name);
    if (r->st == REPL_ST_PREPARED)
        return vr_err(-EBUSY, "vm %s: prepared for failover; 'vmreplica "
                      "failover stop %s' undoes the preparation", vm->name,
                      vm->name);
    if (r->failover_point || r->st == REPL_ST_FAILED_OVER)
        return vr_err(-EBUSY, "vm %s: failed over (%s); replication does "
                      "not suspend or resume in that state", vm->name,
                      repl_st_name(r->st));
    return 0;
}

int
api_repl_suspend(struct api_call *call, unsigned *status VR_UNUSED,
                 json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    if (rc == 0 && vm->repl->mode == VM_MODE_REPLICA) {
        /* Pausing here would only leave the cycles staged unapplied, and
         * the primary would keep sending them: pause at the source. */
        char q[VR_QNAME_MAX];
        const char *n = vr_qname(vm->name, q);
        rc = vr_err(-EINVAL, "vm %s: a Replica VM is not suspended on the "
                    "Replica server; run 'vmreplica replication suspend %s' "
                    "on its primary server (%s)", n, n,
                    vm->repl->primary_server ? vm->repl->primary_server
                                             : "unknown");
    }
    if (rc == 0)
        rc = check_not_failing_over(vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (r && (r->st == REPL_ST_RESYNC || r->st == REPL_ST_WAIT_RESYNC)) {
        /* Where it got stays (resync_step): --continue goes on from it. */
        wake(vm);
        r->resync_at = 0;
        rc = repl_transition_event(
            actx.d->cat, vm, REPL_ST_RESYNC_SUSPENDED, REPL_T_SAVE, "info",
            "resynchronization suspended; 'vmreplica replication resume %s "
            "--resync --continue' goes on from where it stopped", vm->name);
    } else if (r && r->st != REPL_ST_SUSPENDED &&
               r->st != REPL_ST_RESYNC_SUSPENDED) {
        wake(vm);
        rc =
            repl_transition_event(actx.d->cat, vm, REPL_ST_SUSPENDED,
                                  REPL_T_SAVE, "info", "replication suspended");
    }
    if (rc == 0)
        *out = repl_to_json(vm, actx.d->cfg.hostname);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

/* The longest a resynchronization is scheduled ahead (as initial
 * replication's --at). */
#define RESYNC_AT_MAX_S (7 * 86400)

/* replication resume --resync [--at T] [--continue] (d->lock held): start
 * a resynchronization (primary/resync.c) of a primary whose change
 * tracking stopped, now or at T (at > 0, Unix seconds), or go on with a
 * suspended one. */
static int
resync_begin(struct vm *vm, int64_t at, bool cont)
{
    struct repl *r = vm->repl;
    time_t now = time(NULL);
    if (at < 0 || at > (int64_t)now + RESYNC_AT_MAX_S)
        return vr_err(-EINVAL, "vm %s: a resynchronization is scheduled at "
                      "most 7 days ahead", vm->name);
    if (at <= (int64_t)now)
        at = 0;
    if (cont && r->st != REPL_ST_RESYNC_SUSPENDED && r->st != REPL_ST_RESYNC)
        return vr_err(-EINVAL, "vm %s: no suspended resynchronization to "
                      "continue (state %s); start one with 'vmreplica "
                      "replication resume %s --resync'", vm->name,
                      repl_st_name(r->st), vm->name);
    if (r->mode != VM_MODE_PRIMARY)
        return vr_err(-EINVAL, "vm %s: a resynchronization is started on "
                      "the primary", vm->name);
    if (!r->initial_done)
        return vr_err(-EINVAL, "vm %s: initial replication has not "
                      "completed; resume it with 'vmreplica "
                      "initial-replication start %s'", vm->name, vm->name);
    if (r->st == REPL_ST_RESYNC)
        return 0;
    if (r->st != REPL_ST_REPLICATING && r->st != REPL_ST_SUSPENDED &&
        r->st != REPL_ST_ERROR && r->st != REPL_ST_RESYNC_SUSPENDED &&
        r->st != REPL_ST_WAIT_RESYNC)
        return vr_err(-EBUSY, "vm %s: cannot resynchronize in state %s",
                      vm->name, repl_st_name(r->st));
    /* The shipper learns it at its next attempt; the markers say it now
     * (after a restart, before any attempt). */
    if (!r->untracked && r->resync_step == RESYNC_NONE &&
        !logdir_tracking_stopped(vm))
        return vr_err(-EINVAL, "vm %s: change tracking is intact, there is "
                      "nothing to resynchronize (if it stopped since the "
                      "last cycle, the next one will say so)", vm->name);
    if (r->resync_step == RESYNC_NONE) {
        r->resync_step = RESYNC_REQUESTED;
        r->resync_compared = r->resync_sent = 0;
    }
    wake(vm);
    int rc;
    r->resync_at = at;
    if (at) {
        char when[64];
        struct tm tm;
        time_t t = (time_t)at;
        localtime_r(&t, &tm);
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S %z", &tm);
        rc = repl_transition_event(actx.d->cat, vm, REPL_ST_WAIT_RESYNC,
                                   REPL_T_SAVE, "info",
                                   "resynchronization scheduled for %s",
                                   when);
    } else {
        bool again = r->st == REPL_ST_RESYNC_SUSPENDED;
        free(r->task);
        r->task = xstrdup("Resynchronization");
        rc = repl_transition_event(actx.d->cat, vm, REPL_ST_RESYNC,
                                   REPL_T_SAVE, "info", "%s",
                                   again ? "resynchronization continued"
                                         : "resynchronization started");
    }
    if (rc == 0)
        shipper_ensure(vm);
    return rc;
}

/* POST /v1/vms/VM/replication/stop-resync: a resynchronization (running,
 * waiting or suspended) stops; the VM is left in Error, "resynchronization
 * required", and what the comparison did stays: the next resume --resync
 * goes on from its step (repeating a step is safe: resync.c). */
int
api_repl_stop_resync(struct api_call *call, unsigned *status VR_UNUSED,
                     json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    struct repl *r = rc == 0 ? vm->repl : NULL;
    if (r && r->mode != VM_MODE_PRIMARY)
        rc = vr_err(-EINVAL, "vm %s: a resynchronization runs on the "
                    "primary; stop it there", vm->name);
    else if (r && r->st != REPL_ST_RESYNC && r->st != REPL_ST_WAIT_RESYNC &&
             r->st != REPL_ST_RESYNC_SUSPENDED)
        rc = vr_err(-EINVAL, "vm %s: no resynchronization to stop (state "
                    "%s)", vm->name, repl_st_name(r->st));
    if (rc == 0) {
        wake(vm);
        r->resync_at = 0;
        free(r->last_error);
        r->last_error = xasprintf(
            "resynchronization required: stopped by the administrator; "
            "'vmreplica replication resume %s --resync' starts it again",
            vm->name);
        free(r->task);
        r->task = NULL;
        rc = repl_transition_event(actx.d->cat, vm, REPL_ST_ERROR,
                                   REPL_T_SAVE, "warning",
                                   "resynchronization stopped; the Replica VM "
                                   "stays at its last consistent cycle until "
                                   "one completes");
    }
    if (rc == 0)
        *out = repl_to_json(vm, actx.d->cfg.hostname);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

int
api_repl_resume(struct api_call *call, unsigned *status VR_UNUSED,
                json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    if (rc == 0)
        rc = check_not_failing_over(vm);
    json_object *atv = NULL;
    int64_t at = 0;
    if (call->body && json_object_object_get_ex(call->body, "at", &atv)) {
        at = json_object_is_type(atv, json_type_int)
                 ? json_object_get_int64(atv)
                 : -1;
        if (at < 1)
            rc = rc < 0 ? rc
                        : vr_err(-EINVAL, "at: must be a time (Unix seconds)");
    }
    bool resync = jbool(call->body, "resync", false);
    bool cont = jbool(call->body, "continue", false);
    if (rc == 0 && !resync && (at || cont))
        rc = vr_err(-EINVAL, "--at and --continue go with --resync");
    if (rc == 0 && resync)
        rc = resync_begin(vm, at, cont);
    else if (rc == 0 && vm->repl->resync_step != RESYNC_NONE &&
             vm->repl->mode == VM_MODE_PRIMARY)
        rc = vr_err(-EINVAL, "vm %s: a resynchronization is pending (%s); "
                    "go on with it: 'vmreplica replication resume %s "
                    "--resync'", vm->name, repl_st_name(vm->repl->st),
                    vm->name);
    else if (rc == 0 && (vm->repl->st == REPL_ST_SUSPENDED ||
                         vm->repl->st == REPL_ST_ERROR)) {
        struct repl *r = vm->repl;
        wake(vm);
        rc = repl_transition_event(actx.d->cat, vm,
                                   r->initial_done ? REPL_ST_REPLICATING
                                   : r->mode == VM_MODE_REPLICA
                                       ? REPL_ST_WAITING_INITIAL
                                   : r->initial_seq ? REPL_ST_INITIAL
                                                    : REPL_ST_READY_INITIAL,
                                   REPL_T_SAVE, "info", "replication resumed");
        if (rc == 0)
            shipper_ensure(vm);
    }
    if (rc == 0)
        *out = repl_to_json(vm, actx.d->cfg.hostname);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

int
api_repl_reset_stats(struct api_call *call, unsigned *status VR_UNUSED,
                     json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    if (rc == 0) {
        struct repl *r = vm->repl;
        r->errors = r->ok_count = r->missed = 0;
        r->max_size = r->sum_size = 0;
        r->max_latency_ms = r->sum_latency_ms = 0;
        rc = catalog_save_repl(actx.d->cat, r);
        if (rc == 0)
            *out = repl_measure_json(vm);
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

/* The start time of body's "at" (RFC 3339, or Unix seconds as
 * replication resume takes) into *at_ms (0: none): at most 7 days ahead
 * and not in the past. */
static int
initial_at(const struct vm *vm, json_object *body, uint64_t *at_ms)
{
    json_object *v = NULL;
    *at_ms = 0;
    if (!body || !json_object_object_get_ex(body, "at", &v))
        return 0;
    uint64_t now = vr_wall_ms(), t = 0;
    char buf[32];
    const char *at = buf;
    if (json_object_is_type(v, json_type_int) &&
        json_object_get_int64(v) > 0 &&
        json_object_get_int64(v) < INT64_MAX / 1000) {
        t = (uint64_t)json_object_get_int64(v) * 1000;
        vr_rfc3339(t, buf);
    } else if (!json_object_is_type(v, json_type_string) ||
               vr_parse_rfc3339((at = json_object_get_string(v)), &t) < 0) {
        return vr_err(-EINVAL, "vm %s: start time '%s' is not an RFC 3339 "
                      "date-time", vm->name, json_object_get_string(v));
    }
    if (t < now)
        return vr_err(-EINVAL, "vm %s: start time %s is in the past",
                      vm->name, at);
    if (t > now + INITIAL_AT_MAX_MS)
        return vr_err(-EINVAL, "vm %s: start time %s is more than 7 days "
                      "ahead", vm->name, at);
    *at_ms = t;
    return 0;
}

int
api_initial_start(struct api_call *call, unsigned *status VR_UNUSED,
                  json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    if (rc == 0 && vm->repl->mode != VM_MODE_PRIMARY)
        rc = vr_err(-EBUSY, "vm %s: initial replication starts on the "
                            "primary",
                    vm->name);
    if (rc == 0 && vm->repl->initial_done)
        rc = vr_err(-EALREADY, "vm %s: initial replication is already done",
                    vm->name);
    bool compare = jbool(call->body, "use_existing", false);
    const char *export = jstr(call->body, "export");
    enum initial_method method = compare  ? INITIAL_COMPARE
                                 : export ? INITIAL_EXPORT
                                          : INITIAL_FULL;
    uint64_t at = 0;
    if (rc == 0 && compare && export)
        rc = vr_err(-EINVAL, "vm %s: --export and --use-existing are two "
                    "methods; choose one", vm->name);
    if (rc == 0 && export && (export[0] != '/' || strlen(export) > 1024))
        rc = vr_err(-EINVAL, "vm %s: export directory '%s' is not an "
                    "absolute path", vm->name, export);
    if (rc == 0)
        rc = initial_at(vm, call->body, &at);
    /* The method is chosen when the copy starts afresh; one under way
     * goes on as it began (its progress means nothing to the other). */
    if (rc == 0 && vm->repl->initial_seq != 0 &&
        vm->repl->initial_method != method)
        rc = vr_err(-EBUSY, "vm %s: an initial replication %s is under way "
                    "(%llu bytes done); it resumes as it began", vm->name,
                    vm->repl->initial_method == INITIAL_COMPARE
                        ? "by comparison"
                    : vm->repl->initial_method == INITIAL_EXPORT
                        ? "by export" : "by full copy",
                    (unsigned long long)(vm->repl->initial_method ==
                                                 INITIAL_COMPARE
                                             ? vm->repl->initial_compared
                                             : vm->repl->initial_sent));
    if (rc == 0 && export && vm->repl->st == REPL_ST_INITIAL &&
        (!vm->repl->initial_export ||
         strcmp(vm->repl->initial_export, export) != 0))
        rc = vr_err(-EBUSY, "vm %s: an export to %s is under way; stop it "
                    "first", vm->name, vm->repl->initial_export
                                           ? vm->repl->initial_export : "?");
    if (rc == 0 && at && vm->repl->st != REPL_ST_READY_INITIAL)
        rc = vr_err(-EBUSY, "vm %s: cannot schedule initial replication in "
                    "state %s", vm->name, repl_st_name(vm->repl->st));
    if (rc == 0 && vm->repl->st != REPL_ST_INITIAL) {
        struct repl *r = vm->repl;
        if (r->st != REPL_ST_READY_INITIAL)
            rc = vr_err(-EBUSY, "vm %s: cannot start initial replication in "
                                "state %s",
                        vm->name, repl_st_name(r->st));
        else {
            r->initial_method = method;
            free(r->initial_export);
            r->initial_export = export ? xstrdup(export) : NULL;
            r->initial_at_ms = at;
            wake(vm);
            if (at) {
                char ts[32];
                vr_rfc3339(at, ts);
                rc = catalog_save_repl(actx.d->cat, r);
                if (rc == 0)
                    event_add(actx.d->cat, "info", vm->name,
                              "initial replication scheduled for %s", ts);
            } else {
                free(r->task);
                r->task = xstrdup("InitialReplication");
                rc = repl_transition(actx.d->cat, vm, REPL_ST_INITIAL,
                                     REPL_T_SAVE);
            }
            shipper_ensure(vm);
        }
    }
    if (rc == 0)
        *out = repl_to_json(vm, actx.d->cfg.hostname);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

int
api_initial_stop(struct api_call *call, unsigned *status VR_UNUSED,
                 json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    int rc = lookup_repl(call, &vm);
    if (rc == 0)
        rc = initial_stop(vm);
    if (rc == 0)
        *out = repl_to_json(vm, actx.d->cfg.hostname);
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

int
api_initial_import(struct api_call *call, unsigned *status VR_UNUSED,
                   json_object **out)
{
    const char *from = jstr(call->body, "from");
    if (!from || from[0] != '/' || strlen(from) > 1024)
        return vr_err(-EINVAL, "import: 'from' must be the absolute path of "
                      "an export directory");
    return replica_import(call->arg, from, out);
}

int
api_repl_remove(struct api_call *call, unsigned *status VR_UNUSED,
                json_object **out)
{
    struct vm *vm = NULL;
    pthread_mutex_lock(&actx.d->lock);
    /* On the Replica server a cycle being received or applied ends within
     * moments: wait for it (bounded) rather than refuse; a test failover
     * or a failover is said at once, below. */
    uint64_t deadline = vr_mono_ms() + 30000;
    int rc;
    while ((rc = lookup_repl(call, &vm)) == 0 &&
           vm->repl->mode == VM_MODE_REPLICA && !vm->repl->test_point &&
           !vm->repl->failover_point &&
           vm_busy(vm, VM_OP_APPLY | VM_OP_RECEIVE) &&
           vr_mono_ms() < deadline)
        daemon_wait_ms(actx.d, 100);
    /* Steps that hold the repl with the lock dropped must end first. */
    if (rc == 0 && (vm_busy(vm, VM_OP_CHANGE | VM_OP_PREPARE | VM_OP_FAILOVER)))
        rc = vr_err(-EBUSY, "vm %s: a failover step or another change is "
                    "in progress; try again", vm->name);
    if (rc == 0 && vm->repl->mode == VM_MODE_PRIMARY) {
        /* VM_OP_REMOVE keeps every other call (resume, initial start, a
         * second remove) away from this repl while we talk to the Replica
         * server unlocked; it is freed below. */
        rc = primary_unregister(call->arg, &vm);
    }
    if (rc == 0 && (vm->repl->test_point || vm_busy(vm, VM_OP_TEST)))
        rc = vr_err(-EBUSY, "vm %s: a test failover is running; run "
                    "'vmreplica failover stop %s --test' first", vm->name,
                    vm->name);
    if (rc == 0 && (vm->repl->failover_point || vm_busy(vm, VM_OP_FAILOVER)))
        rc = vr_err(-EBUSY, "vm %s: failed over at point %llu; cancel "
                    "('vmreplica failover stop %s') or commit ('vmreplica "
                    "failover complete %s') first", vm->name,
                    (unsigned long long)vm->repl->failover_point, vm->name,
                    vm->name);
    if (rc == 0 && (vm_busy(vm, VM_OP_APPLY | VM_OP_RECEIVE)))
        rc = vr_err(-EBUSY, "vm %s: a cycle is being received or applied; "
                            "try again",
                    vm->name);
    bool failed_over = rc == 0 &&
                       vm->repl->st == REPL_ST_FAILED_OVER;
    if (rc == 0) {
        rc = catalog_delete_repl(actx.d->cat, vm->uuid);
        if (rc == 0) {
            repl_free(vm->repl);
            vm->repl = NULL;
            /* A completed failover leaves a VM of this server's own. */
            if (vm->mode == VM_MODE_PRIMARY || failed_over)
                vm->mode = VM_MODE_NONE;
            rc = catalog_save_vm(actx.d->cat, vm);
        }
        if (rc == 0) {
            event_add(actx.d->cat, "info", vm->name, "replication removed");
            *out = vm_to_json(vm);
        }
    }
    if (vm && vm_busy(vm, VM_OP_REMOVE)) {
        vm_op_end(vm, VM_OP_REMOVE);
        if (rc < 0 && vm->repl)
            shipper_ensure(vm); /* still there: carry on */
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

char *
api_metrics_text(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    fputs("# HELP vmreplica_lag_seconds seconds since the last successful "
          "cycle\n# TYPE vmreplica_lag_seconds gauge\n",
          f);
    pthread_mutex_lock(&actx.d->lock);
    uint64_t now = vr_wall_ms();
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next) {
        const struct repl *r = vm->repl;
        if (!r)
            continue;
        fprintf(f, "vmreplica_lag_seconds{vm=\"%s\",mode=\"%s\"} %.3f\n",
                vm->uuid, vm_mode_name(r->mode),
                r->last_ok_ms ? (double)(now - r->last_ok_ms) / 1000.0 : -1.0);
    }
    fputs("# TYPE vmreplica_bytes_sent_total counter\n", f);
    for (struct vm *vm = actx.d->vms; vm; vm = vm->next) {
        const struct repl *r = vm->repl;
        if (!r || r->mode != VM_MODE_PRIMARY)
            continue;
        fprintf(f, "vmreplica_bytes_sent_total{vm=\"%s\",kind=\"raw\"} %llu\n",
                vm->uuid, (unsigned long long)r->bytes_raw);
        fprintf(f, "vmreplica_bytes_sent_total{vm=\"%s\",kind=\"wire\"} "
                   "%llu\n",
                vm->uuid, (unsigned long long)r->bytes_wire);
        fprintf(f, "vmreplica_pending_bytes{vm=\"%s\"} %llu\n", vm->uuid,
                (unsigned long long)shipper_pending_bytes(vm, NULL));
        fprintf(f, "vmreplica_errors_total{vm=\"%s\"} %llu\n", vm->uuid,
                (unsigned long long)r->errors);
        fprintf(f, "vmreplica_cycles_total{vm=\"%s\",result=\"ok\"} %llu\n",
                vm->uuid, (unsigned long long)r->ok_count);
        fprintf(f, "vmreplica_cycles_total{vm=\"%s\",result=\"missed\"} "
                   "%llu\n",
                vm->uuid, (unsigned long long)r->missed);
        fprintf(f, "vmreplica_cycle_duration_seconds_sum{vm=\"%s\"} %.3f\n",
                vm->uuid, (double)r->sum_latency_ms / 1000.0);
        fprintf(f, "vmreplica_cycle_duration_seconds_max{vm=\"%s\"} %.3f\n",
                vm->uuid, (double)r->max_latency_ms / 1000.0);
    }
    pthread_mutex_unlock(&actx.d->lock);
    fclose(f);
    return buf;
}

int
api_repl_reverse(struct api_call *call, unsigned *status VR_UNUSED,
                 json_object **out)
{
    json_object *b = call->body;
    const char *server = jstr(b, "replica_server");
    const char *addr = jstr(b, "connect_address");
    if (server && !repl_server_name_valid(server))
        return vr_err(-EINVAL, "replica_server: expected FQDN[:PORT]");
    return planned_reverse(call->arg, server, addr, out);
}
