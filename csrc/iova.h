/* IOVA allocator: hands out size-aligned ranges of I/O virtual page numbers, as the kernel's
 * alloc_iova_fast / free_iova_fast / reserve_iova (drivers/iommu/iova.c) do.
 *
 * Units: every pfn and size here counts granules (the IOMMU's smallest page, 4 KiB..64 KiB), not
 * bytes; IOVA address = pfn << granule shift.  Limits are inclusive, as in the kernel's
 * alloc_iova: a range [pfn, pfn + size - 1] fits under limit_pfn when its last pfn <= limit_pfn.
 *
 * Placement: an allocation of size n (rounded up to a power of two first when n < 32, like
 * alloc_iova_fast) starts on a multiple of roundup_pow_of_two(n) and takes the highest such start
 * whose range is free, lies at or above start_pfn and ends at or below limit_pfn.  The kernel
 * reaches the same place in the common case through a cached search position; after frees or
 * failed sizes its cache can make it settle lower, and this allocator does not copy that: the
 * highest fit is always the answer, so a pure-Python model can reproduce every placement.
 *
 * Range cache: freed ranges of up to 32 granules (orders 0..5) go into a per-order cache and
 * stay occupied until an allocation of the same order takes them again, like the kernel's
 * rcache seen from one CPU.  Exactly (a model must follow this to place ranges identically):
 *   - each order has two magazines of up to IOVA_MAG_SIZE ranges, "loaded" and "prev", and a
 *     depot (a stack) of full magazines, at most depot_max_magazines of them;
 *   - put: if loaded is full, swap it with prev when prev is not full; else push loaded onto
 *     the depot and start an empty one; if the depot is full too, every range in loaded goes
 *     back to free space and loaded starts empty (the kernel pushes it and its depot trimming
 *     frees it moments later).  Then push the range onto loaded;
 *   - get: if loaded is empty, swap it with prev when prev is not; else replace it by the
 *     depot's top magazine; else miss.  Then scan loaded from its top for the first range that
 *     ends at or below the limit; the magazine's top entry moves into its slot.  No fit: miss,
 *     and the tree serves the request.
 * An allocation that finds no room (with flushing, the default) empties every cache into free
 * space and tries once more; if that also fails the caches are put back exactly as they were.
 * The kernel's max32_alloc_size shortcut (failing 32-bit requests early) is not modelled.
 *
 * Ownership: iova_domain_create hands the caller a domain that only iova_domain_destroy frees,
 * with every range and cache in it.  Output arrays stay the caller's.
 *
 * Errors: 0 or a negative errno with sl_last_error() set (sl_common.h; the fields each reason
 * fills are listed there); a failing call changes nothing.
 *
 * Not thread-safe: a domain must be used by one thread at a time.  No public function calls
 * another and none takes a lock, so one mutex around each public call is enough to share a
 * domain (struct sl_iommu in dma.h does exactly that with its IOMMU lock). */
#ifndef SL_IOVA_H
#define SL_IOVA_H

#include <stddef.h>
#include <stdint.h>

#include "sl_common.h"

#define IOVA_RANGE_CACHE_MAX_ORDER 6u /* orders 0..5 are cached: sizes up to 32 granules */
#define IOVA_FAST_ROUND_BELOW 32u     /* sizes below this are rounded up to a power of two */
#define IOVA_MAG_SIZE 127u            /* ranges per magazine */

enum iova_range_state {
    IOVA_RANGE_LIVE = 0,     /* handed out by iova_alloc and not freed */
    IOVA_RANGE_RESERVED = 1, /* carved out by iova_reserve; never allocated or freed */
    IOVA_RANGE_CACHED = 2,   /* freed into the range cache; still occupied */
};

/* Bits for iova_ranges' state_mask. */
#define IOVA_MASK_LIVE (1u << IOVA_RANGE_LIVE)
#define IOVA_MASK_RESERVED (1u << IOVA_RANGE_RESERVED)
#define IOVA_MASK_CACHED (1u << IOVA_RANGE_CACHED)
#define IOVA_MASK_ALL (IOVA_MASK_LIVE | IOVA_MASK_RESERVED | IOVA_MASK_CACHED)

struct iova_range {
    uint64_t pfn_lo; /* first granule */
    uint64_t pfn_hi; /* last granule, inclusive */
    uint32_t state;  /* enum iova_range_state */
    uint32_t reserved_pad;
};

struct iova_domain;

/* granule_bytes: a power of two in [4 KiB, 64 KiB] (-EINVAL GRANULE).  start_pfn >= 1 (-EINVAL
 * IOVA_START_PFN): no range starts below it, so IOVA 0 is never handed out.
 * depot_max_magazines: full magazines each order's depot keeps (the kernel trims to the number
 * of online CPUs; 1 models one CPU).  -ENOMEM NO_MEMORY; *out is NULL on failure. */
int iova_domain_create(uint32_t granule_bytes, uint64_t start_pfn, uint32_t depot_max_magazines,
                       struct iova_domain **out);
/* Frees the domain and every range in it, live or not.  NULL is accepted. */
void iova_domain_destroy(struct iova_domain *dom);

uint32_t iova_granule_bytes(const struct iova_domain *dom);
uint64_t iova_start_pfn(const struct iova_domain *dom);
/* The highest pfn whose address fits in 64 bits; larger limits are treated as this one. */
uint64_t iova_max_pfn(const struct iova_domain *dom);

/* alloc_iova_fast with flush_rcache = true: *pfn_out gets the first pfn of a new live range of
 * size_granules (rounded up to a power of two when below 32).  -EINVAL IOVA_SIZE for size 0,
 * -ENOMEM IOVA_EXHAUSTED when no range fits under limit_pfn (value = the rounded size, limit =
 * limit_pfn clamped to iova_max_pfn), -ENOMEM NO_MEMORY; a failure changes nothing, the range
 * cache included. */
int iova_alloc(struct iova_domain *dom, uint64_t size_granules, uint64_t limit_pfn,
               uint64_t *pfn_out);
/* The same with flush_rcache = false: on failure the cached ranges are not tried (the kernel's
 * first, 32-bit-limited attempt). */
int iova_alloc_noflush(struct iova_domain *dom, uint64_t size_granules, uint64_t limit_pfn,
                       uint64_t *pfn_out);

/* free_iova_fast: pfn must be the first pfn of a live range and size_granules the size passed
 * to iova_alloc (or any size that rounds to the same allocation).  Ranges of order < 6 go into
 * the range cache, larger ones back to free space.  Where the kernel would trust the caller and
 * corrupt its cache, this refuses: -ENOENT IOVA_NOT_FOUND if no range holds pfn, -EINVAL
 * IOVA_NOT_LIVE (a reserved or cached range), IOVA_NOT_START (pfn inside its range) or
 * IOVA_SIZE_MISMATCH (value = size passed, limit = the allocation's size), IOVA_SIZE for size
 * 0.  A failure changes nothing. */
int iova_free(struct iova_domain *dom, uint64_t pfn, uint64_t size_granules);

/* reserve_iova: marks [lo_pfn, hi_pfn] (inclusive) reserved, merged with every reserved range
 * it overlaps or touches.  Cached ranges inside are released from the cache first (all caches
 * are emptied).  -EINVAL IOVA_RANGE if lo_pfn > hi_pfn or hi_pfn == UINT64_MAX (value = lo_pfn,
 * limit = hi_pfn); -EBUSY IOVA_BUSY if a live range overlaps (value/limit = its pfn_lo/pfn_hi);
 * -ENOMEM NO_MEMORY.  A failure changes nothing. */
int iova_reserve(struct iova_domain *dom, uint64_t lo_pfn, uint64_t hi_pfn);

/* find_iova: the range (live, reserved or cached) holding pfn, or -ENOENT IOVA_NOT_FOUND. */
int iova_find(const struct iova_domain *dom, uint64_t pfn, struct iova_range *out);

/* Returns every cached range to free space (free_cpu_cached_iovas + free_global_cached_iovas). */
void iova_flush_rcache(struct iova_domain *dom);

uint64_t iova_live_ranges(const struct iova_domain *dom);
uint64_t iova_live_granules(const struct iova_domain *dom);
uint64_t iova_cached_ranges(const struct iova_domain *dom);
uint64_t iova_reserved_ranges(const struct iova_domain *dom);

/* Ranges whose state bit is in state_mask and whose pfn_hi >= from_pfn, in ascending order, up
 * to capacity of them.  Returns how many were written; to page through, call again with
 * from_pfn = last pfn_hi + 1. */
uint64_t iova_ranges(const struct iova_domain *dom, uint64_t from_pfn, uint32_t state_mask,
                     struct iova_range *out, uint64_t capacity);

/* Checks every internal invariant (tree order and balance, gap bookkeeping, counters, cache
 * contents).  Returns 0, or -EIO IOVA_INCONSISTENT when something is inconsistent (value = the
 * first pfn_lo or cache order found broken, 0 for a counter): for tests. */
int iova_check(const struct iova_domain *dom);

#endif
