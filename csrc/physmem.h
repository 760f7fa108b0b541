/* Emulated physical memory: sparse page frames, a page allocator and byte access.
 *
 * Memory is described by page frame numbers (pfns); physical address = pfn * page_size + offset.
 * Nothing is allocated for a page until it is written or handed out by the allocator: a 1 TiB
 * memory costs a few MiB of bookkeeping.  Frames are grouped in groups of SL_GROUP_PAGES; a
 * group's bookkeeping is created on first use, and a page's backing bytes on first write (reads
 * of unwritten pages see zeros).
 *
 * Units: sizes and physical addresses in bytes, pages as pfns and page counts.
 *
 * Ownership: physmem_create hands the caller a memory that only physmem_destroy frees; tables,
 * devices and IOMMUs refer to it without owning it, so it must outlive them.  Buffers passed to
 * the calls below stay the caller's.
 *
 * Errors: 0 or a negative errno with sl_last_error() set (sl_common.h); a failing call changes
 * nothing (a failed write moves no byte).
 *
 * Thread safety: every call may be made from any thread at any time, except that destroy must
 * not race with any other use of the memory.  The page size and page count are fixed at
 * creation; everything else (allocation bits, backing frames, the free and resident counters)
 * is read and written under the memory's lock, which is a level-4 lock of the lock order in
 * sl_common.h (no other lock is taken under it).  The memory is registered for fork safety
 * (sl_fork.h). */
#ifndef SL_PHYSMEM_H
#define SL_PHYSMEM_H

#include <stddef.h>
#include <stdint.h>

#include "sl_common.h"

#define SL_GROUP_PAGES 512u

enum sl_layout {
    SL_LAYOUT_CONTIGUOUS = 0, /* one run of consecutive pfns, lowest fit */
    SL_LAYOUT_SCATTERED = 1,  /* ascending free pfns, no two neighbours in the result */
    SL_LAYOUT_RANDOM = 2,     /* runs of 1..16 pages separated by gaps of 1..4 free pages */
};

struct physmem;

/* size_bytes must be a positive multiple of page_size, at most 64 TiB (-EINVAL MEMORY_SIZE);
 * page_size a power of two, 4 KiB..64 KiB (-EINVAL PAGE_SIZE).  -ENOMEM NO_MEMORY when the host
 * allocator fails.  *out is NULL on failure. */
int physmem_create(uint64_t size_bytes, uint32_t page_size, struct physmem **out);
/* Frees the memory and every page's bytes.  NULL is accepted. */
void physmem_destroy(struct physmem *mem);

uint32_t physmem_page_size(const struct physmem *mem);
uint64_t physmem_n_pages(const struct physmem *mem);
/* Counters, read under the lock (a snapshot: other threads may change them right after). */
uint64_t physmem_free_pages(const struct physmem *mem);
uint64_t physmem_resident_pages(const struct physmem *mem); /* pages with backing bytes */

/* Allocates n_pages pages into pfns_out (room for n_pages) or nothing at all: -EINVAL LAYOUT or
 * ZERO_PAGES, -ENOMEM OUT_OF_PAGES (no fit) or NO_MEMORY. */
int physmem_alloc_pages(struct physmem *mem, uint64_t n_pages, int layout, uint64_t seed,
                        uint64_t *pfns_out);
/* Frees every listed page, or none: -EINVAL PHYS_RANGE (out of range), NOT_ALLOCATED or
 * DUPLICATE_PFN (listed twice).  Freed pages lose their bytes. */
int physmem_free_pages_list(struct physmem *mem, const uint64_t *pfns, uint64_t n_pages);

/* Byte access by physical address; the whole range must lie inside the memory (-EFAULT
 * PHYS_RANGE, value = phys).  A write can fail with -ENOMEM NO_MEMORY creating backing bytes,
 * before any byte moves. */
int physmem_read(struct physmem *mem, uint64_t phys, void *buf, uint64_t n_bytes);
int physmem_write(struct physmem *mem, uint64_t phys, const void *buf, uint64_t n_bytes);

#endif
