/* fuzz-pattern.c: libFuzzer target for the authorization-pattern matcher.
 *
 * The input is "PATTERN\0NAME" (bytes after a second NUL are ignored).
 * Whatever the bytes, vr_fqdn_match must not crash, and a match must be
 * what SPEC §6 allows: the same name, or one more label in front of a
 * "*." pattern's rest. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "vr.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size + 2);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    buf[size] = buf[size + 1] = '\0';
    const char *pattern = buf;
    const char *name = buf + strlen(buf) + 1;
    if (name > buf + size)
        name = buf + size + 1;
    bool m = vr_fqdn_match(pattern, name);
    (void)vr_fqdn_valid(pattern);
    (void)vr_fqdn_pattern_valid(name);
    if (m) {
        assert(vr_fqdn_valid(name) && vr_fqdn_pattern_valid(pattern));
        if (pattern[0] != '*') {
            assert(strcasecmp(pattern, name) == 0);
        } else {
            const char *dot = strchr(name, '.');
            assert(dot && dot > name && strcasecmp(dot + 1, pattern + 2) == 0);
            assert(memchr(name, '.', (size_t)(dot - name)) == NULL);
        }
    }
    free(buf);
    return 0;
}
