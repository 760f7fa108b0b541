#include "scatterlist.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "sl_fork.h"

/* ---- entry helpers (the kernel's inline functions, on our layout) ---- */

static inline int sg_is_chain(const struct scatterlist *sg) { return (sg->page_link & SG_CHAIN) != 0; }
static inline int sg_is_last(const struct scatterlist *sg) { return (sg->page_link & SG_END) != 0; }

static inline struct scatterlist *sg_chain_ptr(const struct scatterlist *sg)
{
    return (struct scatterlist *)(uintptr_t)(sg->page_link & ~(uint64_t)SG_PAGE_LINK_MASK);
}

static inline uint64_t sg_pfn(const struct scatterlist *sg) { return sg->page_link >> 2; }

static inline void sg_set_page(struct scatterlist *sg, uint64_t pfn, uint32_t length,
                               uint32_t offset)
{
    sg->page_link = (pfn << 2) | (sg->page_link & SG_PAGE_LINK_MASK);
    sg->offset = offset;
    sg->length = length;
}

static inline void sg_mark_end(struct scatterlist *sg)
{
    sg->page_link = (sg->page_link | SG_END) & ~(uint64_t)SG_CHAIN;
}

static inline void sg_make_chain_link(struct scatterlist *link, struct scatterlist *next_chunk)
{
    link->offset = 0;
    link->length = 0;
    link->page_link = (uint64_t)(uintptr_t)next_chunk | SG_CHAIN;
}

struct scatterlist *sg_next(struct scatterlist *sg)
{
    if (sg_is_last(sg))
        return NULL;
    sg++;
    if (sg_is_chain(sg))
        sg = sg_chain_ptr(sg);
    return sg;
}

/* Largest pfn accepted: physical addresses stay below 2^63, so address + length never wraps. */
static inline uint64_t max_pfn(unsigned page_shift) { return (UINT64_C(1) << (63 - page_shift)) - 1; }

/* ---- chunk cache ----
 * Full chunks (one page of entries) freed by one table are kept for the next: fresh memory
 * costs a page fault per chunk, which was most of the time of building a large table.  The
 * cache is bounded and shared by all tables, so it is guarded by a mutex. */

#define CHUNK_CACHE_MAX_BYTES (UINT64_C(64) << 20)
#define CHUNK_CACHE_CLASSES 5 /* page sizes 4 KiB .. 64 KiB */

struct cached_chunk {
    struct cached_chunk *next;
};

static struct {
    pthread_mutex_t lock;
    struct cached_chunk *head[CHUNK_CACHE_CLASSES];
    uint64_t bytes;
} chunk_cache = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Fills chunks[0..n) with arrays of the planned sizes, or returns -ENOMEM having kept none. */
static int chunks_get(const struct sl_table *table, const uint32_t *plan, uint64_t n,
                      struct sg_chunk *chunks)
{
    unsigned cls = table->page_shift - 12;
    pthread_mutex_lock(&chunk_cache.lock);
    for (uint64_t i = 0; i < n; i++) {
        chunks[i] = (struct sg_chunk){NULL, plan[i]};
        struct cached_chunk *cached = chunk_cache.head[cls];
        if (plan[i] == table->chunk_entries && cached) {
            chunk_cache.head[cls] = cached->next;
            chunk_cache.bytes -= table->page_size;
            chunks[i].entries = (struct scatterlist *)(void *)cached;
        }
    }
    pthread_mutex_unlock(&chunk_cache.lock);
    for (uint64_t i = 0; i < n; i++) {
        if (chunks[i].entries)
            continue;
        chunks[i].entries = malloc((size_t)plan[i] * sizeof(struct scatterlist));
        if (!chunks[i].entries)
            goto err_free_chunks;
    }
    return 0;

err_free_chunks:
    /* Straight to the allocator, cached ones included: this is the rare path. */
    for (uint64_t k = 0; k < n; k++)
        free(chunks[k].entries);
    return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
}

static void chunks_put(const struct sl_table *table, struct sg_chunk *chunks, uint64_t n)
{
    unsigned cls = table->page_shift - 12;
    pthread_mutex_lock(&chunk_cache.lock);
    for (uint64_t i = 0; i < n; i++) {
        if (chunks[i].n_slots == table->chunk_entries &&
            chunk_cache.bytes + table->page_size <= CHUNK_CACHE_MAX_BYTES) {
            struct cached_chunk *cached = (struct cached_chunk *)(void *)chunks[i].entries;
            cached->next = chunk_cache.head[cls];
            chunk_cache.head[cls] = cached;
            chunk_cache.bytes += table->page_size;
            chunks[i].entries = NULL;
        }
    }
    pthread_mutex_unlock(&chunk_cache.lock);
    for (uint64_t i = 0; i < n; i++)
        free(chunks[i].entries);
}

uint64_t sl_chunk_cache_bytes(void)
{
    pthread_mutex_lock(&chunk_cache.lock);
    uint64_t bytes = chunk_cache.bytes;
    pthread_mutex_unlock(&chunk_cache.lock);
    return bytes;
}

void sl_chunk_cache_fork_lock(void) { pthread_mutex_lock(&chunk_cache.lock); }
void sl_chunk_cache_fork_unlock(void) { pthread_mutex_unlock(&chunk_cache.lock); }

void sl_chunk_cache_drain(void)
{
    pthread_mutex_lock(&chunk_cache.lock);
    for (unsigned cls = 0; cls < CHUNK_CACHE_CLASSES; cls++) {
        while (chunk_cache.head[cls]) {
            struct cached_chunk *cached = chunk_cache.head[cls];
            chunk_cache.head[cls] = cached->next;
            free(cached);
        }
    }
    chunk_cache.bytes = 0;
    pthread_mutex_unlock(&chunk_cache.lock);
}

/* ---- creation and freeing ---- */

int sl_table_create(uint32_t page_size, uint32_t max_segment_bytes, struct sl_table **out)
{
    *out = NULL;
    if (page_size < 4096 || page_size > 65536 || (page_size & (page_size - 1)) != 0)
        return sl_fail(EINVAL, SL_REASON_PAGE_SIZE, 0, page_size);
    uint32_t rounded = max_segment_bytes & ~(page_size - 1); /* the kernel's ALIGN_DOWN */
    if (rounded < page_size)
        return sl_fail(EINVAL, SL_REASON_MAX_SEGMENT, 0, max_segment_bytes);
    struct sl_table *table = calloc(1, sizeof(*table));
    if (!table)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    table->page_size = page_size;
    table->page_shift = (unsigned)__builtin_ctz(page_size);
    table->chunk_entries = page_size / SG_ENTRY_BYTES;
    table->max_segment_bytes = rounded;
    *out = table;
    return 0;
}

void sl_table_free_entries(struct sl_table *table)
{
    chunks_put(table, table->chunks, table->n_chunks);
    free(table->chunks);
    table->chunks = NULL;
    table->n_chunks = 0;
    table->chunks_capacity = 0;
    table->sgt.sgl = NULL;
    table->prv = NULL;
}

void sl_table_destroy(struct sl_table *table)
{
    if (!table)
        return;
    sl_table_free_entries(table);
    free(table);
}

/* ---- building from pages ---- */

/* Pages [start, end) split the kernel's way: a new segment starts where pfns stop being
 * consecutive or where the segment reaches max_segment (counted in whole pages, ignoring the
 * offset).  Returns the end of the segment that starts at `start`. */
static inline uint64_t segment_end(const struct sl_table *table, const uint64_t *pfns,
                                   uint64_t start, uint64_t end)
{
    uint64_t seg_bytes = 0;
    uint64_t j = start + 1;
    for (; j < end; j++) {
        seg_bytes += table->page_size;
        if (seg_bytes >= table->max_segment_bytes || pfns[j] != pfns[j - 1] + 1)
            break;
    }
    return j;
}

/* Slot-level state of the fill, shared by the planning dry run and the real fill so that the
 * two make the same allocation decisions. */
struct fill_cursor {
    int have_cur;
    uint32_t slot;   /* index of the current entry in its chunk */
    uint32_t n_slots; /* slots of the chunk holding the current entry */
};

/* The kernel's get_next_sg decision: may the entry after the cursor be used, or must a new
 * chunk of min(needed, chunk_entries) slots be allocated?  Returns that size, or 0 to reuse. */
static inline uint32_t next_slot_alloc_size(const struct sl_table *table,
                                            const struct fill_cursor *cur, uint64_t needed)
{
    if (cur->have_cur) {
        int next_is_last = cur->slot + 1 == cur->n_slots - 1;
        if (!next_is_last || needed == 1)
            return 0;
    }
    return needed < table->chunk_entries ? (uint32_t)needed : table->chunk_entries;
}

static inline void cursor_advance(struct fill_cursor *cur, uint32_t alloc_size)
{
    if (alloc_size) {
        cur->have_cur = 1;
        cur->slot = 0;
        cur->n_slots = alloc_size;
    } else {
        cur->slot++;
    }
}

/* Plans the slot decisions for n_entries new entries (a dry run of the fill), then gets every
 * chunk they need before the table is touched: a failed allocation leaves it as it was.
 * *cursor_out is where the fill starts. */
static int reserve_chunks(struct sl_table *table, uint64_t n_entries, uint64_t left_pages,
                          struct fill_cursor *cursor_out)
{
    struct fill_cursor cursor = {table->prv != NULL, table->prv_slot,
                                 table->n_chunks ? table->chunks[table->n_chunks - 1].n_slots : 0};
    *cursor_out = cursor;
    uint64_t max_allocs = n_entries / (table->chunk_entries - 1) + 2;
    uint32_t *plan = malloc(max_allocs * sizeof(*plan));
    if (!plan)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    uint64_t n_allocs = 0;
    /* The same decisions as next_slot_alloc_size per entry, taken a chunk at a time: the
     * slots before a chunk's last one are used in turn; the last one only by an entry that is
     * the last still needed; otherwise a new chunk of min(needed, chunk_entries) slots. */
    for (uint64_t placed = 0; placed < n_entries;) {
        if (cursor.have_cur) {
            uint64_t free_slots = cursor.n_slots - 2 - cursor.slot; /* before the last slot */
            uint64_t take = free_slots < n_entries - placed ? free_slots : n_entries - placed;
            placed += take;
            cursor.slot += (uint32_t)take;
            if (placed == n_entries)
                break;
        }
        uint32_t alloc_size = next_slot_alloc_size(table, &cursor, n_entries - placed + left_pages);
        if (alloc_size)
            plan[n_allocs++] = alloc_size;
        cursor_advance(&cursor, alloc_size);
        placed++;
    }
    int err;
    if (table->n_chunks + n_allocs > table->chunks_capacity) {
        uint64_t capacity = table->chunks_capacity ? table->chunks_capacity : 4;
        while (capacity < table->n_chunks + n_allocs)
            capacity *= 2;
        struct sg_chunk *grown = realloc(table->chunks, capacity * sizeof(*grown));
        if (!grown) {
            err = sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
            goto err_free_plan;
        }
        /* The grown array is the table's from here on, used or not: nothing to undo. */
        table->chunks = grown;
        table->chunks_capacity = capacity;
    }
    err = chunks_get(table, plan, n_allocs, table->chunks + table->n_chunks);
    if (err)
        goto err_free_plan;
    free(plan);
    return 0;

err_free_plan:
    free(plan);
    return err;
}

/* The slot for the next entry after s (NULL: none yet), taking the next reserved chunk where
 * the kernel's get_next_sg would allocate one.  *end_mark_out is SG_END for a chunk's last
 * slot, which keeps the mark sg_init_table gave it.  Slots are written whole by the caller, so
 * every byte of a chunk is written once (the kernel zeroes whole chunks first; the result is
 * the same). */
static struct scatterlist *take_slot(struct sl_table *table, struct fill_cursor *cursor,
                                     struct scatterlist *s, uint64_t needed,
                                     uint64_t *end_mark_out)
{
    uint32_t alloc_size = next_slot_alloc_size(table, cursor, needed);
    if (alloc_size) {
        struct sg_chunk *fresh = &table->chunks[table->n_chunks++];
        if (s) {
            /* The slot after s was the old chunk's last: it becomes the link. */
            sg_make_chain_link(s + 1, fresh->entries);
            table->total_nents += alloc_size - 1;
        } else {
            table->sgt.sgl = fresh->entries;
            table->total_nents = alloc_size;
        }
        s = fresh->entries;
    } else {
        s = s + 1; /* sg_next: the next slot is neither the end nor a link here */
    }
    cursor_advance(cursor, alloc_size);
    *end_mark_out = cursor->slot == cursor->n_slots - 1 ? SG_END : 0;
    return s;
}

/* After n_added entries ending at s: initialise the unused tail of the last chunk as
 * sg_init_table leaves it, update the counters, and mark the end if the call was final. */
static void finish_fill(struct sl_table *table, const struct fill_cursor *cursor,
                        struct scatterlist *s, uint64_t n_added, uint64_t left_pages)
{
    if (n_added && cursor->slot + 1 < cursor->n_slots) {
        memset(s + 1, 0, (size_t)(cursor->n_slots - 1 - cursor->slot) * sizeof(*s));
        sg_mark_end(s + (cursor->n_slots - 1 - cursor->slot));
    }
    table->sgt.nents += (uint32_t)n_added;
    table->sgt.orig_nents = table->sgt.nents;
    table->prv = s;
    table->prv_slot = cursor->slot;
    if (left_pages == 0) {
        sg_mark_end(s);
        table->final = 1;
    }
}

int sg_alloc_append_table_from_pages(struct sl_table *table, const uint64_t *pfns,
                                     uint64_t n_pages, uint32_t offset, uint64_t size_bytes,
                                     uint64_t left_pages)
{
    const uint64_t page_size = table->page_size;
    if (table->final)
        return sl_fail(EINVAL, SL_REASON_TABLE_FINAL, 0, 0);
    if (n_pages == 0)
        return sl_fail(EINVAL, SL_REASON_ZERO_PAGES, 0, 0);
    if (table->prv && offset != 0)
        return sl_fail(EINVAL, SL_REASON_APPEND_OFFSET, 0, offset);
    if (offset >= page_size)
        return sl_fail(EINVAL, SL_REASON_OFFSET, 0, offset);
    if (n_pages > (UINT64_MAX >> table->page_shift))
        return sl_fail(EINVAL, SL_REASON_SIZE, 0, size_bytes);
    if (left_pages > UINT32_MAX) /* the kernel's unsigned int; also keeps the planner exact */
        return sl_fail(EINVAL, SL_REASON_TOO_MANY_ENTRIES, 0, left_pages);
    const uint64_t pages_bytes = n_pages << table->page_shift;
    /* size must end inside the last page: the kernel's wrap-around for other sizes is nonsense. */
    if (size_bytes > pages_bytes - offset || size_bytes + offset <= pages_bytes - page_size)
        return sl_fail(EINVAL, SL_REASON_SIZE, 0, size_bytes);

    /* Merge into the previous call's last entry, as far as the pfns continue it. */
    uint64_t merged = 0;
    uint64_t merged_length = 0;
    if (table->prv) {
        struct scatterlist *prv = table->prv;
        uint64_t prv_end = (sg_pfn(prv) << table->page_shift) + prv->offset + prv->length;
        uint64_t next_pfn = prv_end >> table->page_shift;
        if (pfns[0] == next_pfn) {
            /* The kernel would stretch prv over the rest of a page it already ends inside. */
            if (prv_end & (page_size - 1))
                return sl_fail(EINVAL, SL_REASON_MID_PAGE_REPEAT, 0, pfns[0]);
            uint64_t last_pfn = next_pfn - 1;
            merged_length = prv->length;
            while (merged < n_pages && pfns[merged] == last_pfn + 1 &&
                   merged_length + page_size <= table->max_segment_bytes) {
                merged_length += page_size;
                last_pfn = pfns[merged];
                merged++;
            }
            /* Merged pages always count whole, so a partial size would be silently ignored. */
            if (merged && size_bytes != pages_bytes)
                return sl_fail(EINVAL, SL_REASON_MERGE_PARTIAL, 0, size_bytes);
        }
    }

    /* One pass checks every pfn and counts the entries (the kernel's "chunks"): a new entry
     * starts where pfns stop being consecutive or the entry reaches max_segment, counted in
     * whole pages, ignoring the offset. */
    const uint64_t pfn_limit = max_pfn(table->page_shift);
    if (pfns[0] > pfn_limit)
        return sl_fail(EINVAL, SL_REASON_PFN_RANGE, 0, pfns[0]);
    uint64_t chunks = merged < n_pages;
    uint64_t seg_bytes = 0;
    for (uint64_t i = 1; i < n_pages; i++) {
        if (pfns[i] > pfn_limit)
            return sl_fail(EINVAL, SL_REASON_PFN_RANGE, i, pfns[i]);
        if (i <= merged)
            continue;
        seg_bytes += page_size;
        if (seg_bytes >= table->max_segment_bytes || pfns[i] != pfns[i - 1] + 1) {
            chunks++;
            seg_bytes = 0;
        }
    }
    if ((uint64_t)table->total_nents + chunks + table->chunk_entries > UINT32_MAX)
        return sl_fail(EINVAL, SL_REASON_TOO_MANY_ENTRIES, 0, chunks);

    struct fill_cursor cursor;
    int err = reserve_chunks(table, chunks, left_pages, &cursor);
    if (err)
        return err;

    /* Nothing can fail from here on.  Each slot is written whole when it is used, and the
     * unused tail of the last chunk is initialised at the end, so every byte of a chunk is
     * written once (the kernel zeroes whole chunks first; the result is the same). */
    struct scatterlist *s = table->prv;
    if (merged)
        s->length = (uint32_t)merged_length;
    uint64_t remaining_size = size_bytes;
    uint32_t entry_offset = offset;
    uint64_t cur_page = merged;
    for (uint64_t i = 0; i < chunks; i++) {
        uint64_t end_mark;
        s = take_slot(table, &cursor, s, chunks - i + left_pages, &end_mark);
        uint64_t seg_end = segment_end(table, pfns, cur_page, n_pages);
        uint32_t chunk_bytes = (uint32_t)(((seg_end - cur_page) << table->page_shift) - entry_offset);
        uint64_t entry_length = remaining_size < chunk_bytes ? remaining_size : chunk_bytes;
        *s = (struct scatterlist){.page_link = (pfns[cur_page] << 2) | end_mark,
                                  .offset = entry_offset,
                                  .length = (uint32_t)entry_length};
        remaining_size -= entry_length;
        entry_offset = 0;
        cur_page = seg_end;
    }
    finish_fill(table, &cursor, s, chunks, left_pages);
    return 0;
}

int sg_alloc_table_from_entries(struct sl_table *table, const uint64_t *rows,
                                uint64_t n_entries)
{
    if (table->final || table->prv)
        return sl_fail(EINVAL, SL_REASON_TABLE_FINAL, 0, 0);
    if (n_entries == 0)
        return sl_fail(EINVAL, SL_REASON_ZERO_PAGES, 0, 0);
    const uint64_t pfn_limit = max_pfn(table->page_shift);
    for (uint64_t i = 0; i < n_entries; i++) {
        const uint64_t *row = rows + 3 * i;
        if (row[0] > pfn_limit)
            return sl_fail(EINVAL, SL_REASON_PFN_RANGE, i, row[0]);
        if (row[1] > UINT32_MAX)
            return sl_fail(EINVAL, SL_REASON_OFFSET, i, row[1]);
        if (row[2] == 0 || row[2] > UINT32_MAX)
            return sl_fail(EINVAL, SL_REASON_ENTRY_LENGTH, i, row[2]);
    }
    if (n_entries + table->chunk_entries > UINT32_MAX)
        return sl_fail(EINVAL, SL_REASON_TOO_MANY_ENTRIES, 0, n_entries);
    struct fill_cursor cursor;
    int err = reserve_chunks(table, n_entries, 0, &cursor);
    if (err)
        return err;
    struct scatterlist *s = NULL;
    for (uint64_t i = 0; i < n_entries; i++) {
        uint64_t end_mark;
        s = take_slot(table, &cursor, s, n_entries - i, &end_mark);
        *s = (struct scatterlist){.page_link = (rows[3 * i] << 2) | end_mark,
                                  .offset = (uint32_t)rows[3 * i + 1],
                                  .length = (uint32_t)rows[3 * i + 2]};
    }
    finish_fill(table, &cursor, s, n_entries, 0);
    return 0;
}

/* ---- walking ---- */

uint64_t sg_nents(const struct sl_table *table)
{
    uint64_t count = 0;
    for (struct scatterlist *sg = table->sgt.sgl; sg; sg = sg_next(sg))
        count++;
    return count;
}

int64_t sg_nents_for_len(const struct sl_table *table, uint64_t len_bytes)
{
    if (len_bytes == 0)
        return 0;
    uint64_t total = 0;
    int64_t count = 0;
    for (struct scatterlist *sg = table->sgt.sgl; sg; sg = sg_next(sg)) {
        count++;
        total += sg->length;
        if (total >= len_bytes)
            return count;
    }
    return sl_fail_limit(EINVAL, SL_REASON_NENTS_FOR_LEN, 0, len_bytes, total);
}

int sl_table_export_cpu(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out)
{
    struct scatterlist *sg = table->sgt.sgl;
    for (uint64_t i = 0; i < n_entries; i++, sg = sg_next(sg)) {
        if (!sg)
            return sl_fail_limit(EINVAL, SL_REASON_NENTS_RANGE, 0, n_entries, i);
        rows_out[3 * i] = sg_pfn(sg);
        rows_out[3 * i + 1] = sg->offset;
        rows_out[3 * i + 2] = sg->length;
    }
    return 0;
}

int sl_table_export_dma(const struct sl_table *table, uint64_t n_entries, uint64_t *rows_out)
{
    struct scatterlist *sg = table->sgt.sgl;
    for (uint64_t i = 0; i < n_entries; i++, sg = sg_next(sg)) {
        if (!sg)
            return sl_fail_limit(EINVAL, SL_REASON_NENTS_RANGE, 0, n_entries, i);
        rows_out[2 * i] = sg->dma_address;
        rows_out[2 * i + 1] = sg->dma_length;
    }
    return 0;
}

void sl_table_chunk_slots(const struct sl_table *table, uint32_t *slots_out)
{
    for (uint64_t i = 0; i < table->n_chunks; i++)
        slots_out[i] = table->chunks[i].n_slots;
}

static inline uint64_t sg_page_count(const struct sl_table *table, const struct scatterlist *sg)
{
    return ((uint64_t)sg->offset + sg->length + table->page_size - 1) >> table->page_shift;
}

uint64_t sl_table_page_count(const struct sl_table *table, uint64_t start_pgoffset)
{
    uint64_t total = 0;
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->sgt.orig_nents && sg; i++, sg = sg_next(sg))
        total += sg_page_count(table, sg);
    return total > start_pgoffset ? total - start_pgoffset : 0;
}

uint64_t sl_table_page_pfns(const struct sl_table *table, uint64_t start_pgoffset,
                            uint64_t *pfns_out, uint64_t capacity)
{
    uint64_t written = 0;
    uint64_t to_skip = start_pgoffset;
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->sgt.orig_nents && sg; i++, sg = sg_next(sg)) {
        uint64_t n_pages = sg_page_count(table, sg);
        if (to_skip >= n_pages) {
            to_skip -= n_pages;
            continue;
        }
        /* The kernel's page iterator ignores the sub-page offset: it starts at the entry's page. */
        for (uint64_t k = to_skip; k < n_pages && written < capacity; k++)
            pfns_out[written++] = sg_pfn(sg) + k;
        to_skip = 0;
    }
    return written;
}

int sg_copy_buffer(const struct sl_table *table, struct physmem *mem, void *buf,
                   uint64_t buflen, uint64_t skip, int to_buffer, uint64_t *copied_out)
{
    *copied_out = 0;
    if (physmem_page_size(mem) != table->page_size)
        return sl_fail_limit(EINVAL, SL_REASON_PAGE_SIZE_MISMATCH, 0, physmem_page_size(mem),
                             table->page_size);
    /* Check every entry against the memory before moving a byte. */
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->sgt.orig_nents && sg; i++, sg = sg_next(sg)) {
        uint64_t end = (sg_pfn(sg) << table->page_shift) + sg->offset + sg->length;
        if (end > (physmem_n_pages(mem) << table->page_shift))
            return sl_fail(EFAULT, SL_REASON_PHYS_RANGE, i, sg_pfn(sg));
    }
    uint8_t *cursor = buf;
    uint64_t copied = 0;
    sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->sgt.orig_nents && sg && copied < buflen;
         i++, sg = sg_next(sg)) {
        if (skip >= sg->length) {
            skip -= sg->length;
            continue;
        }
        uint64_t phys = (sg_pfn(sg) << table->page_shift) + sg->offset + skip;
        uint64_t piece = sg->length - skip;
        if (piece > buflen - copied)
            piece = buflen - copied;
        skip = 0;
        int err = to_buffer ? physmem_read(mem, phys, cursor + copied, piece)
                            : physmem_write(mem, phys, cursor + copied, piece);
        if (err)
            return err;
        copied += piece;
    }
    *copied_out = copied;
    return 0;
}
