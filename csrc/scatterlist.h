/* Scatter-gather tables with the Linux kernel's layout and rules (the kernel's
 * sg_alloc_append_table_from_pages, sg_next, sg_nents, sg_nents_for_len, sg_copy_buffer and the
 * page iterator), against the emulated memory of physmem.h.
 *
 * A table is a chain of entry arrays ("chunks").  A full chunk holds page_size / 32 entries
 * (128 with 4 KiB pages) and gives its last slot to the link to the next chunk.  Pages are
 * named by page frame number: where the kernel stores a struct page pointer in page_link, this
 * emulation stores pfn << 2, keeping the two low bits for SG_CHAIN and SG_END.
 *
 * Units: lengths, offsets and sizes in bytes; pages as pfns; entry counts as entries.
 *
 * Ownership: sl_table_create hands the caller a table that only sl_table_destroy frees; its
 * chunks are the table's.  The caller's arrays (pfns, rows, outputs) stay the caller's.
 *
 * Errors: 0 or a negative errno with sl_last_error() set (sl_common.h); a failing build call
 * changes nothing.
 *
 * Thread safety: a table is not synchronised; one table must be used by one thread at a time
 * (mapping it for a device included, see dma.h).  Different tables may be used on different
 * threads at once: the only state they share is the chunk cache, behind its own lock (the last
 * lock of the lock order in sl_common.h). */
#ifndef SL_SCATTERLIST_H
#define SL_SCATTERLIST_H

#include <stddef.h>
#include <stdint.h>

#include "physmem.h"
#include "sl_common.h"

#define SG_CHAIN 0x01u
#define SG_END 0x02u
#define SG_PAGE_LINK_MASK 0x03u
#define SG_ENTRY_BYTES 32u
#define SG_MAX_SEGMENT_UNLIMITED UINT32_MAX /* the kernel's UINT_MAX: no segment limit */
#define DMA_MAPPING_ERROR UINT64_MAX

struct scatterlist {
    uint64_t page_link;   /* pfn << 2 | SG_END, or chunk address | SG_CHAIN */
    uint32_t offset;      /* bytes into the first page */
    uint32_t length;      /* CPU length in bytes */
    uint64_t dma_address; /* set by DMA mapping; 0 in a table never mapped, DMA_MAPPING_ERROR
                             after an unmap and past the mapped segments */
    uint32_t dma_length;  /* DMA length in bytes, never an alias of length; 0 where
                             dma_address is not a segment's */
    uint32_t dma_flags;
};

struct sg_table {
    struct scatterlist *sgl;
    uint32_t nents;      /* DMA segments after dma_map_sgtable; orig_nents before and after
                            an unmap */
    uint32_t orig_nents; /* CPU entries holding pages */
};

struct dma_device;

struct sg_chunk {
    struct scatterlist *entries;
    uint32_t n_slots;
};

/* An append table plus what this emulation tracks beside the kernel's fields. */
struct sl_table {
    struct sg_table sgt;
    struct scatterlist *prv;     /* last populated entry */
    uint32_t total_nents;        /* usable slots allocated (data slots, not chain links) */
    uint32_t prv_slot;           /* index of prv inside the last chunk */
    uint32_t page_size;
    unsigned page_shift;
    uint32_t chunk_entries;      /* SG_MAX_SINGLE_ALLOC: page_size / 32 */
    uint32_t max_segment_bytes;  /* already rounded down to whole pages */
    int final;                   /* the last call had left_pages == 0 */
    struct sg_chunk *chunks;     /* every entry array, in chain order */
    uint64_t n_chunks;
    uint64_t chunks_capacity;
    /* DMA mapping state, kept by dma.c: the device the table is mapped for (NULL when not
     * mapped), the direction, and the IOVA block (0/0 for direct mapping).  When the table is
     * not mapped, dma_map_nents, dma_iova, dma_iova_len and dma_mapped_count are 0 (dma_dir
     * keeps the last mapping's direction). */
    struct dma_device *dma_dev;
    int dma_dir;
    uint32_t dma_map_nents;      /* entries passed to the map call */
    uint64_t dma_iova;           /* bytes: first IOVA of the block */
    uint64_t dma_iova_len;       /* bytes: length of the block */
    uint32_t dma_mapped_count;   /* DMA segments of the live mapping (0 when not mapped); also
                                    right after dma_map_sg, which leaves sgt.nents alone */
};

/* Creates an empty table.  max_segment_bytes is rounded down to whole pages and must leave at
 * least one page; SG_MAX_SEGMENT_UNLIMITED means no limit. */
int sl_table_create(uint32_t page_size, uint32_t max_segment_bytes, struct sl_table **out);
/* Frees the entry chunks and the table itself. */
void sl_table_destroy(struct sl_table *table);
/* Frees the entry chunks (the kernel's sg_free_table); counters stay as they were, as in the
 * kernel.  A second call does nothing.  The caller unmaps a mapped table first. */
void sl_table_free_entries(struct sl_table *table);

/* sg_alloc_append_table_from_pages: adds n_pages pages, merging into the previous entry where
 * the kernel would.  offset applies to the first page of the first call only; size_bytes must
 * end inside the last page.  left_pages == 0 makes the table final.  On failure nothing
 * changes. */
int sg_alloc_append_table_from_pages(struct sl_table *table, const uint64_t *pfns,
                                     uint64_t n_pages, uint32_t offset, uint64_t size_bytes,
                                     uint64_t left_pages);

/* sg_alloc_table(n_entries) followed by sg_set_page on each entry, as drivers build tables by
 * hand: rows holds (pfn, offset, length) per entry, length >= 1.  The table becomes final. */
int sg_alloc_table_from_entries(struct sl_table *table, const uint64_t *rows,
                                uint64_t n_entries);

struct scatterlist *sg_next(struct scatterlist *sg);
/* Entries reachable from the first one with sg_next (stops at SG_END). */
uint64_t sg_nents(const struct sl_table *table);
/* Entries whose CPU lengths first add up to len_bytes: 0 for 0, -EINVAL NENTS_FOR_LEN if the
 * list is short (value = len_bytes, limit = the list's total CPU bytes). */
int64_t sg_nents_for_len(const struct sl_table *table, uint64_t len_bytes);

/* Rows of (pfn, offset, length) for the first n_entries CPU entries, walked with sg_next.
 * -EINVAL NENTS_RANGE (value = n_entries, limit = the entries the list has) if the list is
 * shorter; the rows before that point are written. */
int sl_table_export_cpu(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out);
/* Rows of (dma_address, dma_length) for the first n_entries entries; errors as export_cpu. */
int sl_table_export_dma(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out);
/* Slot count of each chunk, in chain order (n_chunks values). */
void sl_table_chunk_slots(const struct sl_table *table, uint32_t *slots_out);

/* The page iterator over orig_nents entries (for_each_sgtable_page) starting start_pgoffset
 * pages in: the number of pages it visits, and their pfns. */
uint64_t sl_table_page_count(const struct sl_table *table, uint64_t start_pgoffset);
uint64_t sl_table_page_pfns(const struct sl_table *table, uint64_t start_pgoffset,
                            uint64_t *pfns_out, uint64_t capacity);

/* sg_copy_buffer over orig_nents entries against emulated memory.  to_buffer != 0 copies table
 * -> buf.  *copied_out gets the byte count (0 when skip runs past the end).  -EINVAL
 * PAGE_SIZE_MISMATCH (value = the memory's page size, limit = the table's), -EFAULT PHYS_RANGE
 * (element = entry, value = its pfn) for an entry beyond the memory, before any byte moves. */
int sg_copy_buffer(const struct sl_table *table, struct physmem *mem, void *buf,
                   uint64_t buflen, uint64_t skip, int to_buffer, uint64_t *copied_out);

/* Bytes of freed full chunks kept for reuse, and a way to give them back (tests, leak checks).
 * Thread-safe. */
uint64_t sl_chunk_cache_bytes(void);
void sl_chunk_cache_drain(void);

#endif
