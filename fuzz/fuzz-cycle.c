/* fuzz-cycle.c: libFuzzer target for the cycle payload decoder, the first
 * code that touches what a peer sends.
 *
 * Byte 0 picks compressed or not and the chunk size the body is fed in;
 * the rest is the body.  The decoder must never crash, never write more
 * than its cap, and accept only a payload whose output it can account for. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cycle.h"

#define CAP_BYTES (1u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool compressed = data[0] & 1;
    size_t chunk = 1 + (data[0] >> 1) * 37;
    data++;
    size--;
    struct cyc_decoder *d = NULL;
    if (cyc_decoder_new(compressed, CAP_BYTES, -1, &d) < 0)
        return 0;
    int rc = 0;
    for (size_t off = 0; off < size && rc == 0; off += chunk) {
        size_t n = size - off < chunk ? size - off : chunk;
        rc = cyc_decoder_feed(d, data + off, n);
    }
    if (rc == 0) {
        struct cyc_hdr h;
        uint64_t nrec = 0, raw = 0;
        if (cyc_decoder_finish(d, &h, &nrec, &raw) == 0) {
            assert(raw <= CAP_BYTES);
            assert(raw >= CYC_HDR_BYTES + CL_REC_HDR_BYTES);
            assert(h.ndisks >= 1 && h.ndisks <= CYC_MAX_DISKS);
            assert(nrec <= CYC_MAX_RECORDS);
            assert(compressed || raw == size);
        }
    }
    cyc_decoder_free(d);
    return 0;
}
