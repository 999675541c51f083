/* undo.h: undo data on the Replica server, the storage of recovery history
 * (SPEC §7, ARCHITECTURE.md "Replica storage", docs/formats.md "Undo
 * files").
 *
 * The replica disks are always at the latest applied cycle L.  Before cycle
 * N is applied, the data it will overwrite is saved in an undo file; the
 * undo files of cycles P+1..L together turn the disks at point L back into
 * the disks at point P (the state after applying cycle P).
 *
 * An undo file is a *span*: it covers consecutive cycles a..b (a <= b) and
 * holds, for every block any of those cycles changed, the block's content
 * at point a-1.  It is named "%020llu-%020llu.undo" (a, b) and is an
 * uncompressed cycle payload (cycle.h) with flags CYC_F_UNDO, header cycle
 * = b, the VM's ndisks and a zero UUID, whose records are:
 *   - CL_WRITE with the old data, or CL_ZERO where the old content was a
 *     hole (reads as zeroes);
 *   - block-aligned: offset a multiple of CL_PRE_BLOCK (4096), len a
 *     multiple of it except where the range ends at the disk's end;
 *   - sorted by (disk, offset) and non-overlapping, each at most
 *     UNDO_MAX_RECORD_BYTES;
 * then the CL_SEAL record.  Every record has its CRC32C (cl_rec format).
 *
 * Point P can be reconstructed from the live disks and the spans covering
 * P+1..L exactly when P = L or P = a-1 for some span a..b: a span is never
 * split, so merging spans across a point drops that point.
 *
 * Durability: every file is written as NAME.tmp, fdatasync'ed, renamed to
 * NAME and the directory fsync'ed, so a crash leaves either no file or a
 * whole one (a stray .tmp is removed by undo_cleanup).
 */
#ifndef VR_UNDO_H
#define VR_UNDO_H

#include <stdint.h>

#include "cycle.h"
#include "vr.h"

#define UNDO_MAX_RECORD_BYTES (1u << 20)

/* "%020llu-%020llu.undo" */
void undo_name(uint64_t a, uint64_t b, char out[48]);
/* Parse an undo file name: 1 and *a, *b if name is one (a <= b), else 0. */
int undo_parse_name(const char *name, uint64_t *a, uint64_t *b);

/* Capture the undo data of the staged (uncompressed, validated) cycle
 * payload in payload_fd (read from offset 0; the fd's offset is not
 * used) before it is applied: for every block any of its records touches
 * (CL_WRITE, CL_ZERO, CL_TRIM alike), the current content of the replica
 * disk (disk_fds[i], disk_sizes[i]), as WRITE records, or ZERO records for
 * runs of blocks that are holes (SEEK_DATA/SEEK_HOLE; any block with data
 * in it is a WRITE).  Writes span cycle..cycle in dirfd durably.  If that
 * file already exists (a crash after capture, before the cycle was
 * recorded as applied) it is kept as it is and 0 returned: the disks may
 * already be partly changed, so capturing again would be wrong.
 * Calls vr_fault_point("undo-capture") once the data is written, before
 * the rename, and vr_fault_point("undo-captured") after it.
 * *undo_bytes: size of the undo file. */
int undo_capture(int payload_fd, const int *disk_fds,
                 const uint64_t *disk_sizes, unsigned ndisks, int dirfd,
                 uint64_t cycle, uint64_t *undo_bytes) VR_WUR;

/* Merge adjacent spans a..m and m+1..b in dirfd into a..b (durably), then
 * remove the two inputs; point m is no longer reconstructible.  Blocks in
 * both keep the older span's content (it is older).  Calls
 * vr_fault_point("undo-merge") after the merged file is durable and
 * before the inputs are removed; a crash there leaves a..b beside its
 * inputs, which undo_cleanup resolves (removes the inputs).
 * *undo_bytes: size of the merged file. */
int undo_merge(int dirfd, uint64_t a, uint64_t m, uint64_t b,
               uint64_t *undo_bytes) VR_WUR;

/* Start-up repair of dirfd: remove *.tmp files, and any span that lies
 * inside another span (the inputs of a merge that finished writing), and
 * spans that end at or below drop_upto (older than every retained point;
 * 0: none).  Returns the number of files removed or -errno. */
int undo_cleanup(int dirfd, uint64_t drop_upto) VR_WUR;

/* A read-only view of the disks at point P: live disk plus spans. */
struct undo_view;

/* Open a view at point P of disks whose latest applied cycle is L (P <= L):
 * uses the spans in dirfd that cover P+1..L, which must tile that range
 * exactly (else -ENOENT: P is not reconstructible).  Builds an index of
 * the blocks they hold (memory proportional to the undo data, not to the
 * disk).  The view is only valid while no further cycle is applied. */
int undo_view_open(int dirfd, uint64_t point, uint64_t latest,
                   unsigned ndisks, const uint64_t *disk_sizes,
                   struct undo_view **out) VR_WUR;
/* Read [off, off+len) of disk at the view's point: blocks the spans hold
 * from the span nearest the point (lowest cycle), the rest from disk_fd
 * (the live disk; past its end: zeroes). */
int undo_view_read(struct undo_view *v, unsigned disk, int disk_fd,
                   void *buf, uint64_t off, uint32_t len) VR_WUR;
/* Make the live disks equal to the view's point: write every block the
 * view takes from its spans into disk_fds[i] (records of kind CL_ZERO are
 * holes: punch them with fallocate(PUNCH_HOLE|KEEP_SIZE), falling back to
 * writing zeroes where punching is not supported), then fdatasync every
 * disk.  Idempotent and crash-safe: the view reads the same before and
 * after (the blocks it takes from spans are never read from the disks), so
 * an interrupted revert is simply run again.  Calls
 * vr_fault_point("undo-revert") after the first block run is written (for
 * crash tests).  *bytes (may be NULL): bytes written or punched. */
int undo_view_revert(struct undo_view *v, const int *disk_fds,
                     uint64_t *bytes) VR_WUR;
void undo_view_free(struct undo_view *v);

#endif /* VR_UNDO_H */
