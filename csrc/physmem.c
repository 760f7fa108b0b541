#include "physmem.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "sl_fork.h"

/* Bookkeeping for SL_GROUP_PAGES consecutive pfns, created on first use. */
struct page_group {
    uint8_t *frame[SL_GROUP_PAGES];        /* backing bytes, NULL until written */
    uint64_t allocated[SL_GROUP_PAGES / 64]; /* bit set: page handed out by the allocator */
    uint32_t n_allocated;
};

struct physmem {
    struct sl_fork_node fork_node; /* registry link: the lock is taken around fork() */
    /* Fixed at creation, read without the lock. */
    uint32_t page_size;
    unsigned page_shift;
    uint64_t n_pages;
    uint64_t n_groups;
    /* Everything below: under the lock. */
    uint64_t n_free;
    uint64_t n_resident;
    struct page_group **groups; /* n_groups pointers, NULL for untouched groups */
    /* Devices on several threads share a memory; every public call that reads or changes
     * the bookkeeping or the bytes holds this lock. */
    pthread_mutex_t lock;
};

static int is_valid_page_size(uint32_t page_size)
{
    return page_size >= 4096 && page_size <= 65536 && (page_size & (page_size - 1)) == 0;
}

int physmem_create(uint64_t size_bytes, uint32_t page_size, struct physmem **out)
{
    *out = NULL;
    if (!is_valid_page_size(page_size))
        return sl_fail(EINVAL, SL_REASON_PAGE_SIZE, 0, page_size);
    /* 64 TiB: the group directory stays a lazily backed array of at most 2^25 pointers. */
    if (size_bytes == 0 || size_bytes % page_size != 0 || size_bytes > (UINT64_C(1) << 46))
        return sl_fail(EINVAL, SL_REASON_MEMORY_SIZE, 0, size_bytes);
    struct physmem *mem = calloc(1, sizeof(*mem));
    if (!mem)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    int err;
    mem->page_size = page_size;
    mem->page_shift = (unsigned)__builtin_ctz(page_size);
    mem->n_pages = size_bytes >> mem->page_shift;
    mem->n_groups = (mem->n_pages + SL_GROUP_PAGES - 1) / SL_GROUP_PAGES;
    mem->n_free = mem->n_pages;
    /* calloc of a large array is backed lazily by the OS: untouched groups cost no RAM. */
    mem->groups = calloc(mem->n_groups, sizeof(*mem->groups));
    if (!mem->groups) {
        err = sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
        goto err_free_mem;
    }
    if (pthread_mutex_init(&mem->lock, NULL) != 0) {
        err = sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
        goto err_free_groups;
    }
    err = sl_fork_register(&mem->fork_node, SL_FORK_MEMORY, &mem->lock);
    if (err)
        goto err_destroy_lock;
    *out = mem;
    return 0;

err_destroy_lock:
    pthread_mutex_destroy(&mem->lock);
err_free_groups:
    free(mem->groups);
err_free_mem:
    free(mem);
    return err;
}

void physmem_destroy(struct physmem *mem)
{
    if (!mem)
        return;
    sl_fork_unregister(&mem->fork_node);
    for (uint64_t g = 0; g < mem->n_groups; g++) {
        struct page_group *group = mem->groups[g];
        if (!group)
            continue;
        for (unsigned i = 0; i < SL_GROUP_PAGES; i++)
            free(group->frame[i]);
        free(group);
    }
    free(mem->groups);
    pthread_mutex_destroy(&mem->lock);
    free(mem);
}

uint32_t physmem_page_size(const struct physmem *mem) { return mem->page_size; }
uint64_t physmem_n_pages(const struct physmem *mem) { return mem->n_pages; }

/* The counters change under the lock on other threads, so they are read under it too.  The
 * lock is not part of the memory's logical state, hence the cast on a const memory. */
uint64_t physmem_free_pages(const struct physmem *mem)
{
    pthread_mutex_t *lock = &((struct physmem *)(uintptr_t)mem)->lock;
    pthread_mutex_lock(lock);
    uint64_t n = mem->n_free;
    pthread_mutex_unlock(lock);
    return n;
}

uint64_t physmem_resident_pages(const struct physmem *mem)
{
    pthread_mutex_t *lock = &((struct physmem *)(uintptr_t)mem)->lock;
    pthread_mutex_lock(lock);
    uint64_t n = mem->n_resident;
    pthread_mutex_unlock(lock);
    return n;
}

static struct page_group *group_get(struct physmem *mem, uint64_t pfn, int create)
{
    struct page_group **slot = &mem->groups[pfn / SL_GROUP_PAGES];
    if (!*slot && create)
        *slot = calloc(1, sizeof(**slot));
    return *slot;
}

static int page_is_allocated(const struct physmem *mem, uint64_t pfn)
{
    const struct page_group *group = mem->groups[pfn / SL_GROUP_PAGES];
    if (!group)
        return 0;
    unsigned bit = (unsigned)(pfn % SL_GROUP_PAGES);
    return (int)((group->allocated[bit / 64] >> (bit % 64)) & 1);
}

/* Lowest free pfn >= pfn, or n_pages when there is none.  Skips untouched (all free) and full
 * groups without looking at their bits. */
static uint64_t next_free_pfn(const struct physmem *mem, uint64_t pfn)
{
    while (pfn < mem->n_pages) {
        const struct page_group *group = mem->groups[pfn / SL_GROUP_PAGES];
        if (!group || group->n_allocated == 0)
            return pfn;
        if (group->n_allocated == SL_GROUP_PAGES) {
            pfn = (pfn / SL_GROUP_PAGES + 1) * SL_GROUP_PAGES;
            continue;
        }
        if (!page_is_allocated(mem, pfn))
            return pfn;
        pfn++;
    }
    return mem->n_pages;
}

/* splitmix64: tiny, seedable, and easy to reproduce bit for bit in the Python model. */
static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* Chooses pfns without marking them; returns how many it found (n_pages when it succeeded). */
static uint64_t choose_pages(const struct physmem *mem, uint64_t n_pages, int layout,
                             uint64_t seed, uint64_t *pfns_out)
{
    uint64_t found = 0;
    if (layout == SL_LAYOUT_CONTIGUOUS) {
        uint64_t run_start = 0, run_len = 0;
        for (uint64_t pfn = next_free_pfn(mem, 0); pfn < mem->n_pages && run_len < n_pages;) {
            if (run_len == 0 || pfn != run_start + run_len) {
                run_start = pfn;
                run_len = 0;
            }
            run_len++;
            pfn = next_free_pfn(mem, pfn + 1);
        }
        if (run_len < n_pages)
            return 0;
        for (uint64_t i = 0; i < n_pages; i++)
            pfns_out[i] = run_start + i;
        return n_pages;
    }
    if (layout == SL_LAYOUT_SCATTERED) {
        for (uint64_t pfn = next_free_pfn(mem, 0); pfn < mem->n_pages && found < n_pages;
             pfn = next_free_pfn(mem, pfn + 1)) {
            if (found == 0 || pfn != pfns_out[found - 1] + 1)
                pfns_out[found++] = pfn;
        }
        return found;
    }
    /* SL_LAYOUT_RANDOM: alternate a run of 1..16 taken free pages and a gap of 1..4 skipped
     * free pages, lengths drawn from splitmix64(seed). */
    uint64_t rng = seed;
    int taking = 1;
    uint64_t left = 1 + splitmix64(&rng) % 16;
    for (uint64_t pfn = next_free_pfn(mem, 0); pfn < mem->n_pages && found < n_pages;
         pfn = next_free_pfn(mem, pfn + 1)) {
        if (taking)
            pfns_out[found++] = pfn;
        if (--left == 0) {
            taking = !taking;
            left = 1 + splitmix64(&rng) % (taking ? 16 : 4);
        }
    }
    return found;
}

static int physmem_alloc_pages_locked(struct physmem *mem, uint64_t n_pages, int layout,
                                      uint64_t seed, uint64_t *pfns_out)
{
    if (layout != SL_LAYOUT_CONTIGUOUS && layout != SL_LAYOUT_SCATTERED &&
        layout != SL_LAYOUT_RANDOM)
        return sl_fail(EINVAL, SL_REASON_LAYOUT, 0, (uint64_t)layout);
    if (n_pages == 0)
        return sl_fail(EINVAL, SL_REASON_ZERO_PAGES, 0, 0);
    if (n_pages > mem->n_free || choose_pages(mem, n_pages, layout, seed, pfns_out) < n_pages)
        return sl_fail(ENOMEM, SL_REASON_OUT_OF_PAGES, 0, n_pages);
    /* Create every group first so that a failing calloc leaves no page marked. */
    for (uint64_t i = 0; i < n_pages; i++)
        if (!group_get(mem, pfns_out[i], 1))
            return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    for (uint64_t i = 0; i < n_pages; i++) {
        struct page_group *group = mem->groups[pfns_out[i] / SL_GROUP_PAGES];
        unsigned bit = (unsigned)(pfns_out[i] % SL_GROUP_PAGES);
        group->allocated[bit / 64] |= UINT64_C(1) << (bit % 64);
        group->n_allocated++;
    }
    mem->n_free -= n_pages;
    return 0;
}

static int physmem_free_pages_list_locked(struct physmem *mem, const uint64_t *pfns,
                                          uint64_t n_pages)
{
    for (uint64_t i = 0; i < n_pages; i++) {
        if (pfns[i] >= mem->n_pages)
            return sl_fail(EINVAL, SL_REASON_PHYS_RANGE, i, pfns[i]);
        if (!page_is_allocated(mem, pfns[i]))
            return sl_fail(EINVAL, SL_REASON_NOT_ALLOCATED, i, pfns[i]);
    }
    /* Clear as we go; a pfn listed twice is found already clear and everything done so far is
     * put back, so the call still changes nothing. */
    for (uint64_t i = 0; i < n_pages; i++) {
        struct page_group *group = mem->groups[pfns[i] / SL_GROUP_PAGES];
        unsigned bit = (unsigned)(pfns[i] % SL_GROUP_PAGES);
        uint64_t mask = UINT64_C(1) << (bit % 64);
        if (!(group->allocated[bit / 64] & mask)) {
            for (uint64_t k = 0; k < i; k++) {
                struct page_group *g = mem->groups[pfns[k] / SL_GROUP_PAGES];
                unsigned b = (unsigned)(pfns[k] % SL_GROUP_PAGES);
                g->allocated[b / 64] |= UINT64_C(1) << (b % 64);
                g->n_allocated++;
            }
            return sl_fail(EINVAL, SL_REASON_DUPLICATE_PFN, i, pfns[i]);
        }
        group->allocated[bit / 64] &= ~mask;
        group->n_allocated--;
    }
    /* Freed pages lose their contents, like fresh pages, and stop costing RAM. */
    for (uint64_t i = 0; i < n_pages; i++) {
        struct page_group *group = mem->groups[pfns[i] / SL_GROUP_PAGES];
        unsigned bit = (unsigned)(pfns[i] % SL_GROUP_PAGES);
        if (group->frame[bit]) {
            free(group->frame[bit]);
            group->frame[bit] = NULL;
            mem->n_resident--;
        }
    }
    mem->n_free += n_pages;
    return 0;
}

static int check_range(const struct physmem *mem, uint64_t phys, uint64_t n_bytes)
{
    uint64_t limit = mem->n_pages << mem->page_shift;
    if (phys > limit || n_bytes > limit - phys)
        return sl_fail(EFAULT, SL_REASON_PHYS_RANGE, 0, phys);
    return 0;
}

static int physmem_read_locked(struct physmem *mem, uint64_t phys, void *buf,
                               uint64_t n_bytes)
{
    int err = check_range(mem, phys, n_bytes);
    if (err)
        return err;
    uint8_t *dst = buf;
    while (n_bytes) {
        uint64_t pfn = phys >> mem->page_shift;
        uint64_t in_page = phys & (mem->page_size - 1);
        uint64_t piece = mem->page_size - in_page;
        if (piece > n_bytes)
            piece = n_bytes;
        const struct page_group *group = mem->groups[pfn / SL_GROUP_PAGES];
        const uint8_t *frame = group ? group->frame[pfn % SL_GROUP_PAGES] : NULL;
        if (frame)
            memcpy(dst, frame + in_page, piece);
        else
            memset(dst, 0, piece);
        dst += piece;
        phys += piece;
        n_bytes -= piece;
    }
    return 0;
}

static int physmem_write_locked(struct physmem *mem, uint64_t phys, const void *buf,
                                uint64_t n_bytes)
{
    int err = check_range(mem, phys, n_bytes);
    if (err)
        return err;
    /* Create all backing first: a failed write changes no byte. */
    uint64_t first_pfn = phys >> mem->page_shift;
    uint64_t end_pfn = n_bytes ? ((phys + n_bytes - 1) >> mem->page_shift) + 1 : first_pfn;
    for (uint64_t pfn = first_pfn; pfn < end_pfn; pfn++) {
        struct page_group *group = group_get(mem, pfn, 1);
        if (!group)
            return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
        uint8_t **frame = &group->frame[pfn % SL_GROUP_PAGES];
        if (!*frame) {
            *frame = calloc(1, mem->page_size);
            if (!*frame)
                return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
            mem->n_resident++;
        }
    }
    const uint8_t *src = buf;
    while (n_bytes) {
        uint64_t pfn = phys >> mem->page_shift;
        uint64_t in_page = phys & (mem->page_size - 1);
        uint64_t piece = mem->page_size - in_page;
        if (piece > n_bytes)
            piece = n_bytes;
        memcpy(mem->groups[pfn / SL_GROUP_PAGES]->frame[pfn % SL_GROUP_PAGES] + in_page, src,
               piece);
        src += piece;
        phys += piece;
        n_bytes -= piece;
    }
    return 0;
}

/* ---- locked entry points ---- */

int physmem_alloc_pages(struct physmem *mem, uint64_t n_pages, int layout, uint64_t seed,
                        uint64_t *pfns_out)
{
    pthread_mutex_lock(&mem->lock);
    int err = physmem_alloc_pages_locked(mem, n_pages, layout, seed, pfns_out);
    pthread_mutex_unlock(&mem->lock);
    return err;
}

int physmem_free_pages_list(struct physmem *mem, const uint64_t *pfns, uint64_t n_pages)
{
    pthread_mutex_lock(&mem->lock);
    int err = physmem_free_pages_list_locked(mem, pfns, n_pages);
    pthread_mutex_unlock(&mem->lock);
    return err;
}

int physmem_read(struct physmem *mem, uint64_t phys, void *buf, uint64_t n_bytes)
{
    pthread_mutex_lock(&mem->lock);
    int err = physmem_read_locked(mem, phys, buf, n_bytes);
    pthread_mutex_unlock(&mem->lock);
    return err;
}

int physmem_write(struct physmem *mem, uint64_t phys, const void *buf, uint64_t n_bytes)
{
    pthread_mutex_lock(&mem->lock);
    int err = physmem_write_locked(mem, phys, buf, n_bytes);
    pthread_mutex_unlock(&mem->lock);
    return err;
}
