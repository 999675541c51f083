/* failover.c: the failover endpoints of the management API (`vmreplica
 * failover prepare|start|stop|complete`): they parse the request, choose
 * the kind of failover and leave the steps to replica/failover.c and
 * replica/planned.c (test, unplanned, planned, cancel, complete) and to
 * primary/planned.c (the primary's prepare and its withdrawal). */
#include "api-int.h"

int
api_failover_start(struct api_call *call, unsigned *status VR_UNUSED,
                   json_object **out)
{
    int64_t want = jint(call->body, "point", 0);
    if (want < 0)
        return vr_err(-EINVAL, "point: expected a point id");
    if (jbool(call->body, "test", false))
        return failover_test_start(call->arg, want, out);
    /* A VM whose primary prepared it fails over at that point. */
    if (failover_is_planned(call->arg, want))
        return failover_planned_start(
            call->arg, !jbool(call->body, "no_start", false), out);
    return failover_unplanned_start(call->arg, want,
                                    jbool(call->body, "force", false), out);
}

int
api_failover_stop(struct api_call *call, unsigned *status VR_UNUSED,
                  json_object **out)
{
    if (jbool(call->body, "test", false))
        return failover_test_stop(call->arg, out);
    /* On the primary: withdraw a failover preparation. */
    if (planned_is_prepared(call->arg))
        return planned_unprepare(call->arg, out);
    return failover_cancel(call->arg, out);
}

int
api_failover_prepare(struct api_call *call, unsigned *status VR_UNUSED,
                     json_object **out)
{
    return planned_prepare(call->arg, out);
}

int
api_failover_complete(struct api_call *call, unsigned *status VR_UNUSED,
                      json_object **out)
{
    return failover_complete(call->arg, jbool(call->body, "force", false),
                             out);
}
