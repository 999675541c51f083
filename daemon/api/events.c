/* events.c: the events endpoint of the management API (`vmreplica events
 * [--vm VM]`): the newest 1000 events of the catalog, oldest first. */
#include "api-int.h"

int
api_events(struct api_call *call, unsigned *status VR_UNUSED,
           json_object **out)
{
    pthread_mutex_lock(&actx.d->lock);
    json_object *arr = catalog_events(actx.d->cat, api_query(call, "vm"), 1000);
    pthread_mutex_unlock(&actx.d->lock);
    *out = json_object_new_object();
    json_object_object_add(*out, "events", arr);
    return 0;
}
