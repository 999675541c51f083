/* cycle.h: the cycle payload, the unit that travels from primary to Replica
 * server and is staged there (docs/formats.md).
 *
 * Uncompressed layout: a 64-byte cycle header, then change-log records
 * (cl_rec encoding, any disk; each disk's records keep their log order),
 * then one CL_SEAL record whose offset is the number of records before it.
 * On the wire the payload is optionally one zstd stream.  The same payload,
 * with CYC_F_BASE, carries a chunk of initial replication (allocated regions
 * of a disk as CL_WRITE records).
 *
 * Header: magic "VRCYCLE1"(8) | version u32 | flags u32 | cycle u64 |
 * epoch u64 | ndisks u32 | reserved u32 | vm uuid 16 bytes (binary) |
 * reserved 4 | crc32c u32 of bytes 0..59.
 */
#ifndef VR_CYCLE_H
#define VR_CYCLE_H

#include <stdint.h>

#include "changelog.h"
#include "vr.h"

#define CYC_MAGIC         "VRCYCLE1"
#define CYC_VERSION       1
#define CYC_HDR_BYTES     64
#define CYC_F_BASE        0x1 /* initial-replication chunk, not a cycle */
#define CYC_F_UNDO        0x2 /* an undo file (undo.h), never on the wire */
#define CYC_F_APP         0x4 /* cut while the guest's file systems were
                                 quiesced: an application-consistent point */
#define CYC_F_CUT         0x8 /* bytes 56..59 hold cut_s */
#define CYC_MAX_DISKS     64
/* Records in one payload, bounded so a hostile count cannot exhaust. */
#define CYC_MAX_RECORDS   (1u << 24)

struct cyc_hdr {
    uint32_t version;
    uint32_t flags;
    uint64_t cycle;
    uint64_t epoch;
    uint32_t ndisks;
    uint8_t uuid[16];
    /* When the primary cut the cycle (Unix seconds; with CYC_F_CUT, which
     * cyc_hdr_encode sets when it is not 0): the recovery point's time. */
    uint32_t cut_s;
};

/* Text UUID <-> 16 bytes. */
int cyc_uuid_parse(const char *text, uint8_t out[16]) VR_WUR;
void cyc_uuid_format(const uint8_t in[16], char out[37]);

void cyc_hdr_encode(const struct cyc_hdr *h, uint8_t out[CYC_HDR_BYTES]);
/* -EBADMSG if corrupt or ndisks out of range, -EPROTONOSUPPORT if newer. */
int cyc_hdr_decode(const void *buf, struct cyc_hdr *h) VR_WUR;

/* --- builder (primary) ------------------------------------------------- */

struct cyc_builder;

/* Start a payload written to out_fd, zstd-compressed at zstd_level when
 * compress.  Caller frees with cyc_builder_free (after finish or to abort). */
int cyc_builder_new(int out_fd, bool compress, int zstd_level,
                    const struct cyc_hdr *h, struct cyc_builder **out) VR_WUR;
/* Add one record (r->disk must be < ndisks). */
int cyc_builder_add(struct cyc_builder *b, const struct cl_rec *r) VR_WUR;
/* Add every record of the sealed segment `name` in dirfd, with its disk
 * index replaced by disk; -EBADMSG if the segment is not cleanly sealed. */
int cyc_builder_add_segment(struct cyc_builder *b, int dirfd,
                            const char *name, uint16_t disk) VR_WUR;
/* The same for a segment that may hold CL_WREF records (writes logged by
 * reference), sent as CL_WRITE records with the disk's content as of the
 * seal: from the cycle's preserve file (cl_pre_name, in dirfd) where it
 * holds the block, else read from disk_fd, the disk image, which the data
 * plane may be writing meanwhile.  The data plane completes a preserve
 * record before it changes the block, so data read from the disk is kept
 * only once a rescan of the preserve file after the read finds nothing
 * new (docs/design.md, "Writes logged by reference").  disk_fd -1: a
 * CL_WREF record is an error (-EBADMSG). */
int cyc_builder_add_segment_ref(struct cyc_builder *b, int dirfd,
                                const char *name, uint16_t disk,
                                int disk_fd) VR_WUR;
/* Write the CL_SEAL record and flush the compressor.  *raw_bytes is the
 * uncompressed size, *out_bytes what was written to out_fd. */
int cyc_builder_finish(struct cyc_builder *b, uint64_t *raw_bytes,
                       uint64_t *out_bytes) VR_WUR;
void cyc_builder_free(struct cyc_builder *b);

/* Tests only: fn(ud, n) after each pass that read n records logged by
 * reference, before the preserve file is scanned again (a test plays a
 * guest write there).  NULL: none. */
void cyc_test_set_fill_hook(void (*fn)(void *ud, size_t nread), void *ud);

/* --- decoder (Replica server) ------------------------------------------ */

struct cyc_decoder;

/* Streaming decoder: feed the wire bytes as they arrive; each record is
 * validated as it completes and the uncompressed payload is written to
 * out_fd (-1: discard).  More than max_raw_bytes of uncompressed output is
 * refused with -EFBIG (decompression bomb). */
int cyc_decoder_new(bool compressed, uint64_t max_raw_bytes, int out_fd,
                    struct cyc_decoder **out) VR_WUR;
/* Also refuse any record that does not fit its disk (sizes[disk], n
 * disks), so a payload that could not be applied whole is never accepted.
 * sizes is borrowed and must outlive the decoder. */
void cyc_decoder_set_disk_sizes(struct cyc_decoder *d, const uint64_t *sizes,
                                unsigned n);
/* Limits the caller enforces while a payload arrives: before the
 * reassembly buffer grows by more_bytes, mem(ud, more_bytes); before
 * uncompressed bytes are staged, stage(ud, raw_bytes) with the total
 * staged once they are.  Each returns 0, or a negative errno (its message
 * set with vr_err) that fails the payload.  Either may be NULL. */
struct cyc_decoder_hooks {
    int (*mem)(void *ud, size_t more_bytes);
    int (*stage)(void *ud, uint64_t raw_bytes);
    void *ud;
};
/* h is copied. */
void cyc_decoder_set_hooks(struct cyc_decoder *d,
                           const struct cyc_decoder_hooks *h);
/* Start the writeback of out_fd as the payload is staged (io_write_behind),
 * for a caller that will fdatasync it: the sync then finds little left.
 * Not for a file that is read back and deleted without a sync (base
 * chunks): its pages need never reach the disk at all. */
void cyc_decoder_write_behind(struct cyc_decoder *d);
/* -EBADMSG / -EPROTO on corrupt input, -EFBIG over the cap, or a hook's
 * error; the message is in vr_errmsg().  After an error further feeds keep
 * failing. */
int cyc_decoder_feed(struct cyc_decoder *d, const void *buf,
                     size_t len) VR_WUR;
/* All input given: require a complete payload ending in a valid CL_SEAL
 * record with nothing after it. */
int cyc_decoder_finish(struct cyc_decoder *d, struct cyc_hdr *hdr,
                       uint64_t *nrecords, uint64_t *raw_bytes) VR_WUR;
void cyc_decoder_free(struct cyc_decoder *d);

/* --- apply (Replica server) -------------------------------------------- */

/* Apply a staged, already validated, uncompressed payload in payload_fd to
 * the disks: CL_WRITE pwrite, CL_ZERO and CL_TRIM punch a hole (reads as
 * zeroes, as on the primary).  Every record is checked again: disk index <
 * ndisks, offset + len <= disk_sizes[disk].  Calls
 * vr_fault_point("apply-record") after each record.  fdatasyncs every disk
 * before returning 0.  Re-applying the same payload from the start is
 * idempotent, which is how a crash during apply is repaired. */
int cyc_apply_file(int payload_fd, const int *disk_fds,
                   const uint64_t *disk_sizes, unsigned ndisks,
                   uint64_t *records_applied) VR_WUR;
/* The same without the fdatasync: the disks' writeback is only started
 * (sync_file_range), and the caller syncs them before it tells anyone the
 * payload is durable (a base chunk: docs/design.md, "When a base chunk
 * is durable"). */
int cyc_apply_file_unsynced(int payload_fd, const int *disk_fds,
                            const uint64_t *disk_sizes, unsigned ndisks,
                            uint64_t *records_applied) VR_WUR;

/* --- reader of a staged payload ---------------------------------------- */

/* Read the staged, uncompressed payload in payload_fd sequentially from
 * offset 0 (the fd's offset is not used), checking it as cyc_apply_file
 * does: the header (its ndisks must equal ndisks unless ndisks is 0; *hdr,
 * if not NULL, is filled in before fn is first called), every record
 * (cl_rec_decode: magic, kind, CRC, length; disk index, offset + len
 * overflow, at most CYC_MAX_RECORDS), a valid CL_SEAL and nothing after it.
 * fn is called for every record but the seal, in file order, with the file
 * offset of the record's header (CL_WRITE data follows at file_off +
 * CL_REC_HDR_BYTES); r->data is valid only during the call.  fn returns 0
 * to go on or a negative errno, which stops the walk and is returned.
 * Records are passed as they are read: a fault found later (-EBADMSG)
 * means the whole payload is bad, whatever fn was already given. */
int cyc_payload_foreach(int payload_fd, unsigned ndisks, struct cyc_hdr *hdr,
                        int (*fn)(const struct cl_rec *r, uint64_t file_off,
                                  void *arg),
                        void *arg) VR_WUR;

#endif /* VR_CYCLE_H */
