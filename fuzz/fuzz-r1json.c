/* fuzz-r1json.c: libFuzzer target for the JSON a peer sends in the
 * replication protocol (daemon/core/r1json.c): the body parser (whole body,
 * one document, bounded size and depth), a registration's checks and the
 * NIC checks.  Whatever the bytes, nothing may crash or leak, and what is
 * accepted must be within the documented bounds. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "r1json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_object *b = r1_json_parse((const char *)data, size);
    if (!b)
        return 0;
    assert(size <= R1_JSON_MAX);
    struct r1_reg reg;
    if (r1_register_parse(b, &reg) == 0) {
        assert(reg.name && vr_name_valid(reg.name));
        assert(strlen(reg.name) <= 64);
        assert(reg.ndisks >= 1 && reg.ndisks <= MAX_DISKS);
        for (size_t i = 0; i < reg.ndisks; i++)
            assert(reg.sizes[i] > 0 && reg.sizes[i] <= (uint64_t)1 << 50);
        assert(reg.cpus >= 1 && reg.cpus <= 64);
        assert(reg.memory_mib >= 16 && reg.memory_mib <= 1 << 20);
    }
    json_object *nics;
    if (json_object_object_get_ex(b, "nics", &nics) &&
        nics_validate(nics) == 0) {
        assert(json_object_is_type(nics, json_type_array));
        assert(json_object_array_length(nics) <= R1_MAX_NICS);
        for (size_t i = 0; i < json_object_array_length(nics); i++) {
            json_object *n = json_object_array_get_idx(nics, i), *m, *net;
            assert(json_object_object_get_ex(n, "mac", &m));
            assert(strlen(json_object_get_string(m)) == 17);
            assert(json_object_object_get_ex(n, "network", &net));
            assert(network_valid(json_object_get_string(net)) == 0);
        }
    }
    vr_err_clear();
    json_object_put(b);
    return 0;
}
