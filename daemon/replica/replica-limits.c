/* replica-limits.c: the Replica server's budgets for all requests
 * together — request memory, and the staging space uploads claim before
 * they stage it (see the section below). */
#include "replica-int.h"

/* --- server-wide limits -------------------------------------------------
 *
 * One authenticated primary must not be able to exhaust the Replica server
 * (issue #9): besides the cap on connections (connection guard, below)
 * and on Replica VMs per authorization entry (authz_check_vm_cap), two
 * budgets hold for the whole server, not per connection.
 *
 * Memory.  Every buffer a request holds while it is received — its JSON
 * body, the Kerberos frames, the zstd window and the payload decoder's
 * reassembly buffer (up to a 64 MiB record) — is charged to one budget
 * before it is allocated, and returned when the request ends.  A request
 * that would go over it is refused with 503 EAGAIN and Retry-After, which
 * the primary's shipper retries: memory stays bounded however many
 * connections send big records at once.
 *
 * Space.  An upload claims the bytes it is expected to stage (its
 * Content-Length, then more in steps as it decompresses) before it stages
 * them; a claim is granted only if the staging file system's free space
 * less the reserve margin (a tenth of its size, at most 1 GiB) and less
 * what the uploads in progress have claimed but not written yet can hold
 * it.  So concurrent uploads together never stage into the margin that
 * keeps room for applying cycles; the later ones are refused (507
 * ENOSPC, retried by the primary) while the first completes. */

static pthread_mutex_t limits_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t limits_cond = PTHREAD_COND_INITIALIZER;
static uint64_t mem_budget = R1_MEM_BUDGET_DEFAULT; /* set once at start */

void
replica_limits_init(void)
{
    const char *v = getenv("VMREPLICA_TEST_MEM_BUDGET_MIB");
    if (v && atoi(v) > 0)
        mem_budget = (uint64_t)atoi(v) << 20;
    /* Room for one upload of the largest record, and some small ones. */
    if (mem_budget < 2 * R1_BIG_BUF)
        mem_budget = 2 * R1_BIG_BUF;
}
static uint64_t mem_used;
static struct space_claim *claims; /* uploads in progress */

/* Charge bytes of request memory to q before allocating them: 0, or
 * -EAGAIN (nothing charged).  Guarantees mem_used <= mem_budget.  Small
 * charges (request starts, JSON bodies) must leave room for one big
 * buffer and never wait; a big one (a buffer for records over
 * R1_SMALL_BUF) may use all of the budget and waits up to R1_MEM_WAIT_MS
 * for it.  Whoever holds a big charge waits for nothing else, so it
 * completes and releases it: big requests never deadlock each other, and
 * small ones cannot starve them. */
int
mem_charge(struct rreq *q, uint64_t bytes, bool big)
{
    uint64_t limit = big ? mem_budget : mem_budget - R1_BIG_BUF;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += R1_MEM_WAIT_MS / 1000;
    pthread_mutex_lock(&limits_lock);
    bool ok;
    while (!(ok = mem_used <= limit && bytes <= limit - mem_used) && big)
        if (pthread_cond_timedwait(&limits_cond, &limits_lock, &until) != 0)
            big = false; /* timed out: one last look */
    if (ok) {
        mem_used += bytes;
        q->mem_charged += bytes;
    }
    pthread_mutex_unlock(&limits_lock);
    if (!ok)
        return vr_err(-EAGAIN, "replica server: its memory budget for "
                      "requests (%llu MiB) is in use by other transfers; try "
                      "again later", (unsigned long long)(mem_budget >> 20));
    return 0;
}

/* Give back everything q was charged (its buffers are freed). */
void
mem_release(struct rreq *q)
{
    pthread_mutex_lock(&limits_lock);
    mem_used -= q->mem_charged;
    q->mem_charged = 0;
    q->buf_allowance = 0;
    pthread_cond_broadcast(&limits_cond);
    pthread_mutex_unlock(&limits_lock);
}

/* The decoder's hook: its reassembly buffer grows by more bytes.  Within
 * the R1_SMALL_BUF charged with the upload it is free; beyond, the rest up
 * to the largest record is charged at once (big). */
int
decoder_mem(void *ud, size_t more)
{
    struct rreq *q = ud;
    if (q->buf_bytes + more > q->buf_allowance) {
        int rc = mem_charge(q, R1_BIG_BUF - q->buf_allowance, true);
        if (rc < 0)
            return rc;
        q->buf_allowance = R1_BIG_BUF;
    }
    q->buf_bytes += more;
    return 0;
}

/* Bytes claimed on dev by uploads in progress and not written yet.
 * limits_lock held. */
static uint64_t
claims_outstanding(dev_t dev)
{
    uint64_t sum = 0;
    for (const struct space_claim *c = claims; c; c = c->next)
        if (c->dev == dev && c->claimed > c->written)
            sum += c->claimed - c->written;
    return sum;
}

/* Let q's upload stage raw_bytes in all: grow its claim (by at least
 * R1_CLAIM_STEP, so that statvfs is not called for every chunk) if the
 * staging file system can hold it next to the other claims and the
 * reserve margin, else -ENOSPC, nothing claimed.  A base chunk claims its
 * bytes twice: the same request applies it to the disks, which are on
 * that file system too.  begin: the claim of the expected size, before
 * anything is staged. */
int
space_claim(struct rreq *q, uint64_t raw, bool begin)
{
    struct space_claim *c = &q->claim;
    uint64_t raw_bytes = raw * c->factor;
    if (raw_bytes <= c->claimed) {
        pthread_mutex_lock(&limits_lock);
        c->written = raw;
        pthread_mutex_unlock(&limits_lock);
        return 0;
    }
    struct statvfs sv;
    if (statvfs(q->staging, &sv) < 0)
        return vr_err(-errno, "statvfs %s: %s", q->staging, strerror(errno));
    uint64_t avail = (uint64_t)sv.f_bavail * sv.f_frsize;
    uint64_t size = (uint64_t)sv.f_blocks * sv.f_frsize;
    uint64_t margin = size / 10 < (1ull << 30) ? size / 10 : 1ull << 30;
    pthread_mutex_lock(&limits_lock);
    uint64_t held = claims_outstanding(c->dev) + margin;
    uint64_t room = avail > held ? avail - held : 0;
    uint64_t more = raw_bytes - c->claimed, grant = more;
    if (grant < R1_CLAIM_STEP)
        grant = R1_CLAIM_STEP < room ? R1_CLAIM_STEP : more;
    bool ok = more <= room;
    uint64_t could = c->claimed - c->written + room;
    if (ok) {
        c->claimed += grant;
        c->written = begin ? 0 : raw;
    }
    pthread_mutex_unlock(&limits_lock);
    if (ok)
        return 0;
    if (begin)
        return vr_err(-ENOSPC, "replica storage: the payload needs %llu "
                      "bytes, more than the %llu bytes its file system can "
                      "take now (free space less a reserve and what uploads "
                      "in progress hold)", (unsigned long long)raw_bytes,
                      (unsigned long long)could);
    return vr_err(-ENOSPC, "replica storage: the payload decompresses to "
                  "more than the %llu bytes its file system can take (free "
                  "space less a reserve and what uploads in progress hold)",
                  (unsigned long long)(c->written + could));
}

/* The decoder's hook: raw_bytes in all are about to be staged. */
int
decoder_stage(void *ud, uint64_t raw_bytes)
{
    return space_claim(ud, raw_bytes, false);
}

/* Enter q's upload, staging on dev, in the claims. */
void
claim_link(struct rreq *q, dev_t dev)
{
    pthread_mutex_lock(&limits_lock);
    q->claim.dev = dev;
    q->claim.factor = q->kind == R1_BASE ? 2 : 1;
    q->claim.next = claims;
    claims = &q->claim;
    q->claim.linked = true;
    pthread_mutex_unlock(&limits_lock);
}

/* The upload is over (staged, or refused and its file deleted): what it
 * staged is in the file system's free space from now on. */
void
claim_unlink(struct rreq *q)
{
    pthread_mutex_lock(&limits_lock);
    for (struct space_claim **pp = &claims; q->claim.linked && *pp;
         pp = &(*pp)->next)
        if (*pp == &q->claim) {
            *pp = q->claim.next;
            break;
        }
    q->claim.linked = false;
    q->claim.claimed = q->claim.written = 0;
    pthread_mutex_unlock(&limits_lock);
}

