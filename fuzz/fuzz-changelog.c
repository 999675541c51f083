/* fuzz-changelog.c: libFuzzer target for the change-log decoders.
 *
 * The input is a segment file: its header goes through cl_seg_hdr_decode
 * and the rest through cl_rec_decode, record after record, exactly as the
 * reader walks a segment; every record accepted must be self-consistent. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "changelog.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cl_seg_hdr h;
    if (size < CL_SEG_HDR_BYTES || cl_seg_hdr_decode(data, &h) < 0)
        return 0;
    size_t off = CL_SEG_HDR_BYTES;
    while (off < size) {
        struct cl_rec r;
        size_t used = 0;
        if (cl_rec_decode(data + off, size - off, &r, &used) < 0)
            break;
        assert(used >= CL_REC_HDR_BYTES && used <= size - off);
        assert(used == CL_REC_HDR_BYTES + (r.kind == CL_WRITE ? r.len : 0));
        assert(r.kind == CL_WRITE || r.kind == CL_ZERO || r.kind == CL_TRIM ||
               r.kind == CL_SEAL);
        assert(r.kind != CL_WRITE ||
               (r.len > 0 && r.len <= CL_MAX_DATA_BYTES));
        /* Re-encoding an accepted record gives back the same header. */
        uint8_t again[CL_REC_HDR_BYTES];
        cl_rec_encode(&r, again);
        assert(memcmp(again, data + off, CL_REC_HDR_BYTES) == 0);
        off += used;
    }
    return 0;
}
