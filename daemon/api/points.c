/* points.c: the points endpoint of the management API (`vmreplica points
 * list`): a Replica VM's recovery points, from its recovery history
 * (replica/history.c). */
#include "api-int.h"

int
api_points_list(struct api_call *call, unsigned *status VR_UNUSED,
                json_object **out)
{
    pthread_mutex_lock(&actx.d->lock);
    struct vm *vm;
    int rc = vm_lookup(actx.d, call->arg, &vm);
    if (rc == 0 && vm->mode != VM_MODE_REPLICA)
        rc = vr_err(-EINVAL, "vm %s: recovery points are kept on the "
                    "Replica server; this is the primary", vm->name);
    else if (rc == 0) {
        *out = json_object_new_object();
        json_object_object_add(*out, "vm", json_object_new_string(vm->name));
        json_object_object_add(*out, "points", history_points_json(vm));
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}
