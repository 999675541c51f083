/* r1json.c: checks of the JSON a peer sends (see r1json.h). */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "r1json.h"

/* A JSON string without a NUL inside (json-c keeps one; C stops at it, so
 * the name checked would not be the name sent), or NULL. */
static const char *
plain_string(json_object *v)
{
    if (!v || !json_object_is_type(v, json_type_string))
        return NULL;
    const char *s = json_object_get_string(v);
    if ((size_t)json_object_get_string_len(v) != strlen(s))
        return NULL;
    return s;
}

/* A JSON integer's value, or bad for any other type (json-c would read a
 * string or a double as a number). */
static int64_t
int_or(json_object *v, int64_t bad)
{
    if (!v || !json_object_is_type(v, json_type_int))
        return bad;
    return json_object_get_int64(v);
}

json_object *
r1_json_parse(const char *body, size_t len)
{
    if (!body || len == 0 || len > R1_JSON_MAX)
        return NULL;
    json_tokener *tok = json_tokener_new_ex(R1_JSON_DEPTH);
    if (!tok)
        return NULL;
    json_object *o = json_tokener_parse_ex(tok, body, (int)len);
    size_t used = json_tokener_get_parse_end(tok);
    bool done = json_tokener_get_error(tok) == json_tokener_success;
    json_tokener_free(tok);
    /* The whole body, and nothing after the document but white space. */
    for (size_t i = used; done && i < len; i++)
        if (body[i] != ' ' && body[i] != '\n' && body[i] != '\r' &&
            body[i] != '\t')
            done = false;
    if (!done) {
        json_object_put(o);
        return NULL;
    }
    return o;
}

int
r1_register_parse(json_object *b, struct r1_reg *reg)
{
    memset(reg, 0, sizeof *reg);
    json_object *v = NULL, *disks = NULL;
    if (!b || !json_object_is_type(b, json_type_object))
        return vr_err(-EPROTO, "register: body is not a JSON object");
    json_object_object_get_ex(b, "name", &v);
    reg->name = plain_string(v);
    if (!reg->name || !vr_name_valid(reg->name))
        return vr_err(-EINVAL, "register: invalid vm name");
    if (!json_object_object_get_ex(b, "disks", &disks) ||
        !json_object_is_type(disks, json_type_array) ||
        json_object_array_length(disks) < 1 ||
        json_object_array_length(disks) > MAX_DISKS)
        return vr_err(-EINVAL, "register: 1..%d disks required", MAX_DISKS);
    reg->ndisks = json_object_array_length(disks);
    for (size_t i = 0; i < reg->ndisks; i++) {
        json_object *d = json_object_array_get_idx(disks, i), *s = NULL;
        /* Disks are named diskN here; an id, if sent, must be a name. */
        if (json_object_object_get_ex(d, "id", &s) &&
            (!plain_string(s) || !vr_name_valid(plain_string(s))))
            return vr_err(-EINVAL, "register: disk %zu: invalid id", i);
        int64_t sz = -1;
        if (json_object_object_get_ex(d, "size", &s) &&
            json_object_is_type(s, json_type_int))
            sz = json_object_get_int64(s);
        if (sz <= 0 || sz > (int64_t)1 << 50)
            return vr_err(-EINVAL, "register: disk %zu: bad size", i);
        reg->sizes[i] = (uint64_t)sz;
    }
    reg->cpus = 1;
    reg->memory_mib = 256;
    if (json_object_object_get_ex(b, "cpus", &v))
        reg->cpus = int_or(v, -1);
    if (json_object_object_get_ex(b, "memory_mib", &v))
        reg->memory_mib = int_or(v, -1);
    if (reg->cpus < 1 || reg->cpus > 64 || reg->memory_mib < 16 ||
        reg->memory_mib > 1 << 20)
        return vr_err(-EINVAL, "register: bad cpus or memory");
    if (json_object_object_get_ex(b, "frequency", &v)) {
        int64_t f = int_or(v, -1);
        if (f < 1 || f > R1_MAX_FREQUENCY_S)
            return vr_err(-EINVAL, "register: frequency: must be 1 s .. 24 h "
                          "(1..%d seconds)", R1_MAX_FREQUENCY_S);
        reg->frequency_s = (unsigned)f;
    }
    reg->compression = -1;
    if (json_object_object_get_ex(b, "compression", &v)) {
        if (!json_object_is_type(v, json_type_boolean))
            return vr_err(-EINVAL, "register: compression: must be true or "
                          "false");
        reg->compression = json_object_get_boolean(v);
    }
    if (json_object_object_get_ex(b, "reverse_of", &v) &&
        (reg->reverse_of = int_or(v, -1)) < 1)
        return vr_err(-EINVAL, "register: reverse_of: must be a cycle "
                      "number >= 1");
    if (json_object_object_get_ex(b, "reverse_unplanned", &v)) {
        if (!json_object_is_type(v, json_type_boolean))
            return vr_err(-EINVAL, "register: reverse_unplanned: must be "
                          "true or false");
        reg->reverse_unplanned = json_object_get_boolean(v);
        if (reg->reverse_unplanned && reg->reverse_of)
            return vr_err(-EINVAL, "register: reverse_of and "
                          "reverse_unplanned exclude each other");
    }
    return 0;
}

static bool
ifname_valid(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 15)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '-' || s[i] == '_' ||
              s[i] == '.'))
            return false;
    return true;
}

int
network_valid(const char *net)
{
    if (net && (strcmp(net, "none") == 0 || strcmp(net, "user") == 0 ||
                (strncmp(net, "tap:", 4) == 0 && ifname_valid(net + 4)) ||
                (strncmp(net, "bridge:", 7) == 0 && ifname_valid(net + 7))))
        return 0;
    return vr_err(-EINVAL, "network %s: expected none, user, tap:IFNAME or "
                  "bridge:BRIDGE", net ? net : "(missing)");
}

static bool
mac_valid(const char *m)
{
    unsigned b[6];
    char tail;
    return m && strlen(m) == 17 &&
           sscanf(m, "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3],
                  &b[4], &b[5], &tail) == 6 &&
           !(b[0] & 1);
}

/* "A/P" of the family, or a plain address (prefix: false). */
static bool
addr_valid(const char *s, int af, bool prefix)
{
    char buf[64];
    unsigned char tmp[16];
    if (!s || strlen(s) >= sizeof buf)
        return false;
    snprintf(buf, sizeof buf, "%s", s);
    char *slash = strchr(buf, '/');
    if (prefix != (slash != NULL))
        return false;
    if (slash) {
        *slash = '\0';
        char *end;
        long p = strtol(slash + 1, &end, 10);
        if (*end || end == slash + 1 || p < 0 || p > (af == AF_INET ? 32 : 128))
            return false;
    }
    return inet_pton(af, buf, tmp) == 1;
}

/* Validate one NIC object as stored (registration, catalog). */
static int
nic_valid(json_object *n, size_t i)
{
    json_object *v, *f;
    if (!json_object_is_type(n, json_type_object) ||
        !json_object_object_get_ex(n, "mac", &v) ||
        !mac_valid(json_object_get_string(v)))
        return vr_err(-EINVAL, "nic %zu: bad or missing mac", i);
    if (!json_object_object_get_ex(n, "network", &v) ||
        network_valid(json_object_get_string(v)) < 0) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", vr_errmsg());
        return vr_err(-EINVAL, "nic %zu: %s", i, msg);
    }
    if (!json_object_object_get_ex(n, "failover", &f))
        return 0;
    static const struct {
        const char *key;
        int af;
        bool prefix;
    } k[] = { { "ipv4", AF_INET, true }, { "gateway4", AF_INET, false },
              { "ipv6", AF_INET6, true }, { "gateway6", AF_INET6, false } };
    for (size_t j = 0; j < ARRAY_SIZE(k); j++)
        if (json_object_object_get_ex(f, k[j].key, &v) &&
            !addr_valid(json_object_get_string(v), k[j].af, k[j].prefix))
            return vr_err(-EINVAL, "nic %zu: failover %s: bad address", i,
                          k[j].key);
    if (json_object_object_get_ex(f, "dns", &v)) {
        if (!json_object_is_type(v, json_type_array) ||
            json_object_array_length(v) > 4)
            return vr_err(-EINVAL, "nic %zu: failover dns: up to 4 "
                          "addresses", i);
        for (size_t j = 0; j < json_object_array_length(v); j++) {
            const char *a =
                json_object_get_string(json_object_array_get_idx(v, j));
            if (!addr_valid(a, AF_INET, false) &&
                !addr_valid(a, AF_INET6, false))
                return vr_err(-EINVAL, "nic %zu: failover dns: bad address",
                              i);
        }
    }
    return 0;
}

int
nics_validate(json_object *arr)
{
    if (!arr)
        return 0;
    if (!json_object_is_type(arr, json_type_array) ||
        json_object_array_length(arr) > R1_MAX_NICS)
        return vr_err(-EINVAL, "nics: at most %d", R1_MAX_NICS);
    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        int rc = nic_valid(json_object_array_get_idx(arr, i), i);
        if (rc < 0)
            return rc;
    }
    return 0;
}

