/* Scatter-gather tables with the Linux kernel's layout and rules (see
 * shared/spec/kernel-semantics.md, sections 1-5).
 *
 * A table is a chain of entry arrays ("chunks").  A full chunk holds page_size / 32 entries
 * (128 with 4 KiB pages) and gives its last slot to the link to the next chunk.  Pages are
 * named by page frame number: where the kernel stores a struct page pointer in page_link, this
 * emulation stores pfn << 2, keeping the two low bits for SG_CHAIN and SG_END. */
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
    uint64_t dma_address; /* filled by DMA mapping */
    uint32_t dma_length;  /* DMA length in bytes, never an alias of length */
    uint32_t dma_flags;
};

struct sg_table {
    struct scatterlist *sgl;
    uint32_t nents;      /* DMA entries once mapped; equals orig_nents before */
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
     * mapped), the direction, and the IOVA block (0/0 for direct mapping). */
    struct dma_device *dma_dev;
    int dma_dir;
    uint32_t dma_map_nents;      /* entries passed to the map call */
    uint64_t dma_iova;
    uint64_t dma_iova_len;
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
/* Entries whose CPU lengths first add up to len_bytes: 0 for 0, -EINVAL if the list is short. */
int64_t sg_nents_for_len(const struct sl_table *table, uint64_t len_bytes);

/* Rows of (pfn, offset, length) for the first n_entries CPU entries, walked with sg_next. */
int sl_table_export_cpu(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out);
/* Rows of (dma_address, dma_length) for the first n_entries entries. */
int sl_table_export_dma(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out);
/* Slot count of each chunk, in chain order (n_chunks values). */
void sl_table_chunk_slots(const struct sl_table *table, uint32_t *slots_out);

/* The page iterator over orig_nents entries (for_each_sgtable_page) starting start_pgoffset
 * pages in: the number of pages it visits, and their pfns. */
uint64_t sl_table_page_count(const struct sl_table *table, uint64_t start_pgoffset);
uint64_t sl_table_page_pfns(const struct sl_table *table, uint64_t start_pgoffset,
                            uint64_t *pfns_out, uint64_t capacity);

/* sg_copy_buffer over orig_nents entries against emulated memory.  to_buffer != 0 copies table
 * -> buf.  *copied_out gets the byte count (0 when skip runs past the end). */
int sg_copy_buffer(const struct sl_table *table, struct physmem *mem, void *buf,
                   uint64_t buflen, uint64_t skip, int to_buffer, uint64_t *copied_out);

/* Bytes of freed full chunks kept for reuse, and a way to give them back (tests, leak checks). */
uint64_t sl_chunk_cache_bytes(void);
void sl_chunk_cache_drain(void);

#endif
