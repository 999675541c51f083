/* events.c: the events endpoint of the management API (`vmreplica events
 * [--vm VM] [--follow]`): the newest 1000 events of the catalog, oldest
 * first, or with ?after=ID those that came after event ID (what
 * `events --follow` polls for). */
#include <errno.h>
#include <stdlib.h>

#include "api-int.h"

int
api_events(struct api_call *call, unsigned *status VR_UNUSED,
           json_object **out)
{
    int64_t after = 0;
    const char *a = api_query(call, "after");
    if (a) {
        char *end;
        errno = 0;
        long long v = strtoll(a, &end, 10);
        if (errno || end == a || *end || v < 0)
            return vr_err(-EINVAL, "after: '%s' is not an event id", a);
        after = v;
    }
    pthread_mutex_lock(&actx.d->lock);
    json_object *arr =
        catalog_events(actx.d->cat, api_query(call, "vm"), after, 1000);
    pthread_mutex_unlock(&actx.d->lock);
    *out = json_object_new_object();
    json_object_object_add(*out, "events", arr);
    return 0;
}
