/* Emulated physical memory: sparse page frames, a page allocator and byte access.
 *
 * Memory is described by page frame numbers (pfns).  Nothing is allocated for a page until it
 * is written or handed out by the allocator: a 1 TiB memory costs a few MiB of bookkeeping.
 * Frames are grouped in groups of SL_GROUP_PAGES; a group's bookkeeping is created on first
 * use, and a page's backing bytes on first write (reads of unwritten pages see zeros). */
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

/* Thread-safe: every call that touches pages or bytes holds the memory's lock. */
struct physmem;

/* size_bytes must be a positive multiple of page_size; page_size a power of two, 4 KiB..64 KiB. */
int physmem_create(uint64_t size_bytes, uint32_t page_size, struct physmem **out);
void physmem_destroy(struct physmem *mem);

uint32_t physmem_page_size(const struct physmem *mem);
uint64_t physmem_n_pages(const struct physmem *mem);
uint64_t physmem_free_pages(const struct physmem *mem);
uint64_t physmem_resident_pages(const struct physmem *mem); /* pages with backing bytes */

/* Allocates n_pages pages into pfns_out (room for n_pages) or nothing at all (-ENOMEM). */
int physmem_alloc_pages(struct physmem *mem, uint64_t n_pages, int layout, uint64_t seed,
                        uint64_t *pfns_out);
/* Frees every listed page, or none if any is out of range, not allocated, or listed twice. */
int physmem_free_pages_list(struct physmem *mem, const uint64_t *pfns, uint64_t n_pages);

/* Byte access by physical address; the whole range must lie inside the memory. */
int physmem_read(struct physmem *mem, uint64_t phys, void *buf, uint64_t n_bytes);
int physmem_write(struct physmem *mem, uint64_t phys, const void *buf, uint64_t n_bytes);

#endif
