/* nft.h: running nft and the script of vmreplicad's table (nft.c). */
#ifndef VR_NFT_H
#define VR_NFT_H

#include <stdbool.h>

#include "vr.h"

/* vmreplicad's one table of the host's ruleset. */
#define FW_TABLE "inet vmreplica"
/* The mark table inet vmreplica sets on packets to the listener ports, for
 * the host's own ruleset to accept ("vmr"). */
#define FIREWALL_MARK 0x766d72u

/* Run nft with args (NULL-terminated), input on its stdin (NULL: none):
 * 0 and, if out, its stdout (caller frees); -ENOENT if nft is missing,
 * -EIO if it failed (its errors in the message), -ETIMEDOUT after 10 s. */
int nft_run(const char *const args[], const char *input, char **out) VR_WUR;
/* The one transaction: (re)create the table marking TCP to ports[0..n),
 * or, with on false, only make sure it is gone.  Caller frees. */
char *nft_table_script(bool on, const unsigned *ports, unsigned n);

#endif
