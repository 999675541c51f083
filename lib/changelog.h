/* changelog.h: the per-disk change log (docs/formats.md, version 1).
 *
 * A disk's log is the directory DISK.vrlog/ holding one segment per cycle,
 * named by cycle number as 20 decimal digits: "00000000000000000007.open"
 * while it is written, renamed to "00000000000000000007.log" when sealed.
 * A sealed segment is immutable and ends with a CL_SEAL record.  A segment
 * is a 64-byte header followed by records; a record is a 32-byte header
 * followed, for CL_WRITE only, by len bytes of data.  All integers are
 * little-endian.  Each record's CRC32C covers its header (with the crc field
 * zero) and its data, so a torn or corrupt tail is detected and cut.
 */
#ifndef VR_CHANGELOG_H
#define VR_CHANGELOG_H

#include <stdint.h>

#include "vr.h"

#define CL_FORMAT_VERSION 2 /* 2 added CL_WREF and preserve files */
#define CL_SEG_MAGIC      "VRLOGSG1" /* 8 bytes, no NUL */
#define CL_REC_MAGIC      0x31525256u /* "VRR1" */
#define CL_SEG_HDR_BYTES  64
#define CL_REC_HDR_BYTES  32
/* Largest data payload of one CL_WRITE record (NBD requests are smaller). */
#define CL_MAX_DATA_BYTES (64u << 20)

enum cl_kind {
    CL_WRITE = 1, /* data follows */
    CL_ZERO = 2,  /* range reads as zeroes afterwards */
    CL_TRIM = 3,  /* range discarded; vmreplica punches a hole: zeroes */
    CL_SEAL = 4,  /* last record of a sealed segment or cycle payload;
                     offset = number of records before it, len = 0 */
    CL_WREF = 5,  /* a write logged by reference (segments only, never in a
                     cycle payload): no data follows; the data is the
                     disk's content at the segment's seal, read from the
                     disk image or, where a later write has changed it,
                     from the cycle's preserve file */
};

#define CL_F_FUA 0x01 /* the guest asked for FUA */
/* Not a flag on disk: a record written before its change reached the disk
 * and not yet settled (cl_writer_settle).  On disk its CRC field holds the
 * bitwise NOT of its CRC.  Only ever in an open segment: the change may or
 * may not have reached the disk when a crash struck, and reopening hands
 * it to the caller to redo (cl_writer_reopen_redo). */
#define CL_F_PENDING 0x80

/* One decoded record.  data points into the caller's buffer (decode) or is
 * borrowed from the caller (append). */
struct cl_rec {
    uint8_t kind;
    uint8_t flags;
    uint16_t disk;   /* disk index within the VM */
    uint32_t len;    /* bytes affected; data length for CL_WRITE */
    uint64_t offset; /* byte offset on the disk */
    uint64_t seq;    /* per-disk sequence number, +1 per record */
    const void *data;
};

/* Segment header fields (CL_SEG_HDR_BYTES on disk, crc over bytes 0..59). */
struct cl_seg_hdr {
    uint32_t version;
    uint16_t disk;
    uint64_t cycle;
    uint64_t first_seq;
    uint64_t created_ms; /* wall clock */
};

/* Encode r's 32-byte header into out, computing the CRC over header+data. */
void cl_rec_encode(const struct cl_rec *r, uint8_t out[CL_REC_HDR_BYTES]);
/* Decode one record from buf[0..avail): 0 and *used_bytes (header + data)
 * with r->data pointing into buf; -EAGAIN if avail is too short to hold the
 * whole record; -EBADMSG if corrupt (magic, kind, CRC, len over limit). */
int cl_rec_decode(const void *buf, size_t avail, struct cl_rec *r,
                  size_t *used_bytes) VR_WUR;
/* Encode / decode a segment header (decode: -EBADMSG if corrupt,
 * -EPROTONOSUPPORT if a newer version). */
void cl_seg_hdr_encode(const struct cl_seg_hdr *h, uint8_t out[CL_SEG_HDR_BYTES]);
int cl_seg_hdr_decode(const void *buf, struct cl_seg_hdr *h) VR_WUR;

/* A shipped segment the daemon leaves for reuse: cl_writer_create takes
 * it as the next open segment instead of a new file.  Whoever leaves one
 * must never replace an existing spare (RENAME_NOREPLACE): the writer
 * opens the spare, then renames that name, and must get the file it
 * opened. */
#define CL_SPARE_NAME "spare"

/* Segment file name for a cycle: "%020llu.open" or "%020llu.log". */
void cl_seg_name(uint64_t cycle, bool sealed, char out[32]);
/* Preserve file of a sealed cycle: "%020llu.pre".  A segment-format file
 * (header, then CL_WRITE records, no CL_SEAL) holding the content, as of
 * the cycle's seal, of ranges its CL_WREF records name that the guest
 * overwrote before the cycle was shipped.  Append-only; each record is
 * complete on disk before the disk range it preserves changes, so a torn
 * tail only ever belongs to a write that never reached the disk. */
void cl_pre_name(uint64_t cycle, char out[32]);
/* Preserve records cover whole aligned blocks of this size (the last block
 * of a disk whose size is not a multiple: up to the end). */
#define CL_PRE_BLOCK 4096u

/* --- writer (the data plane) ------------------------------------------- */

struct cl_writer;

/* Create CYCLE.open in dirfd (O_EXCL, or by renaming CL_SPARE_NAME) for
 * disk, with first sequence number first_seq, header durable.  Caller frees
 * with cl_writer_free. */
int cl_writer_create(int dirfd, uint16_t disk, uint64_t cycle,
                     uint64_t first_seq, struct cl_writer **out) VR_WUR;
/* Reopen an existing CYCLE.open after a crash: validate every record, cut a
 * torn or corrupt tail (ftruncate + fdatasync) and position after the last
 * good record.  *cut_bytes says how much was cut. */
int cl_writer_reopen(int dirfd, uint16_t disk, uint64_t cycle,
                     struct cl_writer **out, uint64_t *cut_bytes) VR_WUR;
/* cl_writer_reopen for a segment that may hold pending records: for each
 * one kept, in log order, redo(opaque, rec) makes the disk hold what the
 * record says (rec->data valid for CL_WRITE during the call), then the
 * record is settled.  A redo error fails the reopen.  (cl_writer_reopen
 * refuses a pending record with -EBADMSG.) */
typedef int (*cl_redo_fn)(void *opaque, const struct cl_rec *rec);
int cl_writer_reopen_redo(int dirfd, uint16_t disk, uint64_t cycle,
                          cl_redo_fn redo, void *opaque,
                          struct cl_writer **out, uint64_t *cut_bytes) VR_WUR;
/* Append one record (header + data in one writev).  Not durable until
 * cl_writer_sync.  Not thread-safe: the caller serialises per disk. */
int cl_writer_append(struct cl_writer *w, uint8_t kind, uint8_t flags,
                     uint64_t offset, uint32_t len, const void *data) VR_WUR;
/* Parallel appends: cl_writer_reserve assigns the next record its sequence
 * number and its place in the file (the caller serialises reservations per
 * disk, so the log order is the reservation order); cl_writer_write then
 * writes it there and may run concurrently with other reserved records of
 * the same writer.  Until every reserved record is written the segment has
 * a hole: the caller must not sync-and-rely on or seal it before then.  A
 * failed cl_writer_write leaves a hole that only a restart (reopen cuts the
 * tail at the first bad record) repairs. */
int cl_writer_reserve(struct cl_writer *w, uint8_t kind, uint8_t flags,
                      uint64_t offset, uint32_t len, const void *data,
                      struct cl_rec *rec, uint64_t *file_off) VR_WUR;
int cl_writer_write(struct cl_writer *w, const struct cl_rec *rec,
                    uint64_t file_off) VR_WUR;
/* rec, written at file_off with CL_F_PENDING, is done: write its true CRC
 * (one 4-byte store, so a crash leaves it pending or settled, never
 * torn). */
int cl_writer_settle(struct cl_writer *w, const struct cl_rec *rec,
                     uint64_t file_off) VR_WUR;
/* Process-wide: copy records through a shared mapping of each segment
 * (preallocated in 2 MiB chunks) instead of pwritev: all records
 * (faster on tmpfs, much slower on ext4 for records with data), or only
 * those without data (cheaper than pwritev everywhere).  Off by default;
 * never for preserve files. */
enum { CL_MMAP_OFF = 0, CL_MMAP_ALL = 1, CL_MMAP_NODATA = 2 };
void cl_writer_use_mmap(int mode);
/* Whether cutting a seal and creating a segment sync the files and the
 * directory (default on), so that every power-loss state opens by itself.
 * The data plane turns it off: after a power loss it trusts no log (the
 * tracking marker's boot, lib/dirtymap.h) and resynchronizes, so those
 * syncs would only hold every guest write back at each seal. */
void cl_writer_seal_syncs(bool on);
/* Open the preserve file of cycle for appending: create it (header
 * durable) or, after a restart, reopen it with a torn tail cut. */
int cl_writer_open_pre(int dirfd, uint16_t disk, uint64_t cycle,
                       struct cl_writer **out) VR_WUR;
/* fdatasync the segment. */
int cl_writer_sync(struct cl_writer *w) VR_WUR;
/* Append CL_SEAL, fdatasync, rename .open to .log, fsync the directory.
 * The writer is finished afterwards; free it. */
int cl_writer_seal(struct cl_writer *w) VR_WUR;
/* cl_writer_seal in two halves: _cut appends CL_SEAL, cuts the file (no
 * append after it) and fdatasyncs it, so that a next segment created
 * afterwards never survives a power loss without this one whole; _commit
 * renames .open to .log and fsyncs the directory, so a caller need not hold
 * writers back for that.  Between the two the segment is complete but
 * still named .open; after a crash there, a newer .open segment beside it
 * says the cut happened (the plugin's recovery then commits it). */
int cl_writer_seal_cut(struct cl_writer *w) VR_WUR;
int cl_writer_seal_commit(struct cl_writer *w) VR_WUR;
uint64_t cl_writer_cycle(const struct cl_writer *w);
uint64_t cl_writer_next_seq(const struct cl_writer *w);
/* Bytes in the segment file so far (header included). */
uint64_t cl_writer_bytes(const struct cl_writer *w);
uint64_t cl_writer_records(const struct cl_writer *w);
/* Sum of cl_rec_payload over the records so far. */
uint64_t cl_writer_payload(const struct cl_writer *w);
/* What a record adds to a cycle payload: its header, plus its data for
 * CL_WRITE and CL_WREF (which the shipper sends with data); 0 for
 * CL_SEAL.  The measure of "pending" change data. */
uint64_t cl_rec_payload(const struct cl_rec *r);
/* Sum of cl_rec_payload over the records of segment name in dirfd, from
 * record headers only (data is skipped, not checked), up to the first
 * CL_SEAL or invalid header. */
int cl_segment_payload(int dirfd, const char *name, uint64_t *out) VR_WUR;
/* Close without sealing (the file is cut to its records).  NULL is a
 * no-op. */
void cl_writer_free(struct cl_writer *w);

/* --- reader ------------------------------------------------------------ */

struct cl_reader;

/* Open segment file name in dirfd for reading; validates the header. */
int cl_reader_open(int dirfd, const char *name, struct cl_reader **out) VR_WUR;
const struct cl_seg_hdr *cl_reader_hdr(const struct cl_reader *r);
/* Next record: 1 and *rec (data valid until the next call), 0 at the clean
 * end (after CL_SEAL, which is not returned; or at EOF of an .open segment
 * or .pre file),
 * -EBADMSG on a corrupt or torn record, or on EOF before CL_SEAL in a sealed
 * (.log) segment, or a CL_SEAL whose count disagrees. */
int cl_reader_next(struct cl_reader *r, struct cl_rec *rec) VR_WUR;
void cl_reader_free(struct cl_reader *r);

#endif /* VR_CHANGELOG_H */
