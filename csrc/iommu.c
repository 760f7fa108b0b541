#include "iommu.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* A table is one granule of 64-bit slots plus a count of the slots in use, so that an unmap can
 * tell at once when a table became empty.  Upper levels store child table addresses; the leaf
 * level stores page entries: the page's physical address (granule-aligned, so the low 12 bits
 * are free) | prot bits | PTE_PRESENT.  A slot of 0 is empty at every level. */
struct pt_table {
    uint64_t n_used;
    uint64_t slot[];
};

#define PTE_PRESENT (UINT64_C(1) << 11) /* above every prot bit, below the smallest granule */
#define MAX_LEVELS 8                    /* 52 pfn bits / 9 bits per level needs 6 */

struct iommu_domain {
    uint32_t granule_bytes;
    unsigned granule_shift;
    unsigned aperture_bits;
    uint64_t aperture_last;   /* highest valid IOVA */
    unsigned levels;          /* the root is level 0, the leaves level levels - 1 */
    unsigned bits_per_level;  /* granule_shift - 3: a granule of 8-byte slots */
    uint64_t level_mask;      /* slots per non-root table - 1 */
    uint64_t root_slots;
    struct pt_table *root;
    uint64_t n_mapped;
    uint64_t n_tables;
    uint64_t fault_total;
    uint32_t fault_head;  /* ring index of the oldest held record */
    uint32_t fault_count; /* records held */
    struct iommu_fault faults[IOMMU_FAULT_LOG_SIZE];
};

static inline struct pt_table *child_of(uint64_t slot)
{
    return (struct pt_table *)(uintptr_t)slot;
}

/* Slot index of iova page pfn in its table at level. */
static inline uint64_t slot_index(const struct iommu_domain *dom, uint64_t pfn, unsigned level)
{
    unsigned shift = dom->bits_per_level * (dom->levels - 1 - level);
    return (pfn >> shift) & dom->level_mask;
}

static struct pt_table *table_alloc(struct iommu_domain *dom, uint64_t n_slots)
{
    struct pt_table *t = calloc(1, sizeof(*t) + n_slots * sizeof(uint64_t));
    if (t)
        dom->n_tables++;
    return t;
}

/* Frees path[from_level] if it is empty (path[0] is the root, path[k] the table at level k on
 * the way to pfn), climbing while a parent becomes empty in turn.  The root stays. */
static void prune(struct iommu_domain *dom, uint64_t pfn, struct pt_table **path,
                  unsigned from_level)
{
    for (unsigned level = from_level; level > 0 && path[level]->n_used == 0; level--) {
        free(path[level]);
        dom->n_tables--;
        struct pt_table *parent = path[level - 1];
        parent->slot[slot_index(dom, pfn, level - 1)] = 0;
        parent->n_used--;
    }
}

/* Returns the leaf table holding pfn, recording the tables on the way in path when path is not
 * NULL.  With create, missing tables are made; NULL then means out of host memory, and any
 * table made on the way has been freed again. */
static struct pt_table *walk(struct iommu_domain *dom, uint64_t pfn, int create,
                             struct pt_table **path)
{
    struct pt_table *local_path[MAX_LEVELS];
    if (!path)
        path = local_path;
    struct pt_table *t = dom->root;
    for (unsigned level = 0; level + 1 < dom->levels; level++) {
        path[level] = t;
        uint64_t *slot = &t->slot[slot_index(dom, pfn, level)];
        if (!*slot) {
            if (!create)
                return NULL;
            struct pt_table *fresh = table_alloc(dom, dom->level_mask + 1);
            if (!fresh) {
                prune(dom, pfn, path, level);
                return NULL;
            }
            *slot = (uint64_t)(uintptr_t)fresh;
            t->n_used++;
        }
        t = child_of(*slot);
    }
    path[dom->levels - 1] = t;
    return t;
}

/* Read-only walk for lookups: the page entry for pfn, or 0. */
static uint64_t pte_of(const struct iommu_domain *dom, uint64_t pfn)
{
    const struct pt_table *t = dom->root;
    for (unsigned level = 0; level + 1 < dom->levels; level++) {
        uint64_t slot = t->slot[slot_index(dom, pfn, level)];
        if (!slot)
            return 0;
        t = child_of(slot);
    }
    return t->slot[slot_index(dom, pfn, dom->levels - 1)];
}

/* Clears n_pages consecutive pages from pfn on, stopping at the first that is not mapped, and
 * frees tables left empty.  One walk per leaf table, not per page.  Returns pages cleared. */
static uint64_t clear_pages(struct iommu_domain *dom, uint64_t pfn, uint64_t n_pages)
{
    uint64_t done = 0;
    while (done < n_pages) {
        struct pt_table *path[MAX_LEVELS];
        uint64_t cur = pfn + done;
        struct pt_table *leaf = walk(dom, cur, 0, path);
        if (!leaf)
            break;
        uint64_t first = slot_index(dom, cur, dom->levels - 1);
        uint64_t chunk = dom->level_mask + 1 - first;
        if (chunk > n_pages - done)
            chunk = n_pages - done;
        uint64_t *pte = &leaf->slot[first];
        uint64_t i = 0;
        while (i < chunk && pte[i]) {
            pte[i] = 0;
            i++;
        }
        leaf->n_used -= i;
        done += i;
        if (leaf->n_used == 0)
            prune(dom, cur, path, dom->levels - 1);
        if (i < chunk)
            break;
    }
    return done;
}

static int is_valid_granule(uint32_t granule_bytes)
{
    return granule_bytes >= 4096 && granule_bytes <= 65536 &&
           (granule_bytes & (granule_bytes - 1)) == 0;
}

int iommu_domain_create(uint32_t granule_bytes, unsigned aperture_bits,
                        struct iommu_domain **out)
{
    *out = NULL;
    if (!is_valid_granule(granule_bytes))
        return sl_fail(EINVAL, SL_REASON_GRANULE, 0, granule_bytes);
    unsigned granule_shift = (unsigned)__builtin_ctz(granule_bytes);
    if (aperture_bits <= granule_shift || aperture_bits > 64)
        return sl_fail(EINVAL, SL_REASON_APERTURE_BITS, 0, aperture_bits);
    struct iommu_domain *dom = calloc(1, sizeof(*dom));
    if (!dom)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    dom->granule_bytes = granule_bytes;
    dom->granule_shift = granule_shift;
    dom->aperture_bits = aperture_bits;
    dom->aperture_last = aperture_bits == 64 ? UINT64_MAX : (UINT64_C(1) << aperture_bits) - 1;
    dom->bits_per_level = granule_shift - 3;
    dom->level_mask = (UINT64_C(1) << dom->bits_per_level) - 1;
    unsigned pfn_bits = aperture_bits - granule_shift;
    dom->levels = (pfn_bits + dom->bits_per_level - 1) / dom->bits_per_level;
    unsigned root_bits = pfn_bits - dom->bits_per_level * (dom->levels - 1);
    dom->root_slots = UINT64_C(1) << root_bits;
    dom->root = table_alloc(dom, dom->root_slots);
    if (!dom->root)
        goto err_free_dom;
    *out = dom;
    return 0;

err_free_dom:
    free(dom);
    return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
}

static void free_table(const struct iommu_domain *dom, struct pt_table *t, unsigned level,
                       uint64_t n_slots)
{
    if (level + 1 < dom->levels) {
        for (uint64_t i = 0; i < n_slots && t->n_used; i++) {
            if (t->slot[i]) {
                free_table(dom, child_of(t->slot[i]), level + 1, dom->level_mask + 1);
                t->n_used--;
            }
        }
    }
    free(t);
}

void iommu_domain_destroy(struct iommu_domain *dom)
{
    if (!dom)
        return;
    free_table(dom, dom->root, 0, dom->root_slots);
    free(dom);
}

uint32_t iommu_granule_bytes(const struct iommu_domain *dom) { return dom->granule_bytes; }
unsigned iommu_aperture_bits(const struct iommu_domain *dom) { return dom->aperture_bits; }
uint64_t iommu_aperture_last(const struct iommu_domain *dom) { return dom->aperture_last; }
unsigned iommu_levels(const struct iommu_domain *dom) { return dom->levels; }
uint64_t iommu_mapped_pages(const struct iommu_domain *dom) { return dom->n_mapped; }
uint64_t iommu_table_count(const struct iommu_domain *dom) { return dom->n_tables; }

/* Alignment of a map/unmap request, checked in the order iova, phys, size; value = the first
 * misaligned one, limit = the granule. */
static int check_align(const struct iommu_domain *dom, uint64_t iova, uint64_t phys,
                       uint64_t size_bytes)
{
    uint64_t granule_mask = dom->granule_bytes - 1;
    uint64_t bad = iova & granule_mask ? iova : phys & granule_mask ? phys : size_bytes;
    if ((iova | phys | size_bytes) & granule_mask)
        return sl_fail_limit(EINVAL, SL_REASON_IOMMU_ALIGN, 0, bad, dom->granule_bytes);
    return 0;
}

static int fail_aperture(const struct iommu_domain *dom, uint64_t element, uint64_t iova)
{
    return sl_fail_limit(EINVAL, SL_REASON_IOMMU_APERTURE, element, iova, dom->aperture_last);
}

/* [iova, iova + size_bytes) inside the aperture; size_bytes > 0. */
static int check_aperture(const struct iommu_domain *dom, uint64_t iova, uint64_t size_bytes)
{
    if (iova > dom->aperture_last || size_bytes - 1 > dom->aperture_last - iova)
        return fail_aperture(dom, 0, iova);
    return 0;
}

/* Fills n_pages entries from pfn on with the physical pages of runs (granule-aligned, checked,
 * zero-length runs allowed), all or nothing.  One pass that fills as it checks: the common
 * case (nothing mapped yet) reads each entry once and walks from the root once per leaf table.
 * On a clash the pages filled so far, all of them empty before, are cleared again, which also
 * frees the tables this call created. */
static int map_pages(struct iommu_domain *dom, uint64_t pfn, uint64_t n_pages,
                     const struct iommu_run *runs, uint32_t prot)
{
    uint64_t pte_bits = (uint64_t)prot | PTE_PRESENT;
    const struct iommu_run *run = runs;
    while (run->len_bytes == 0)
        run++;
    uint64_t run_phys = run->phys, run_pages_left = run->len_bytes >> dom->granule_shift;
    uint64_t done = 0;
    while (done < n_pages) {
        uint64_t cur = pfn + done;
        struct pt_table *leaf = walk(dom, cur, 1, NULL);
        if (!leaf) {
            clear_pages(dom, pfn, done);
            return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
        }
        uint64_t first = slot_index(dom, cur, dom->levels - 1);
        uint64_t chunk = dom->level_mask + 1 - first;
        if (chunk > n_pages - done)
            chunk = n_pages - done;
        uint64_t *pte = &leaf->slot[first];
        for (uint64_t i = 0; i < chunk; i++) {
            if (pte[i]) {
                leaf->n_used += i;
                clear_pages(dom, pfn, done + i);
                return sl_fail(EEXIST, SL_REASON_IOMMU_MAPPED, 0,
                               (cur + i) << dom->granule_shift);
            }
            pte[i] = run_phys | pte_bits;
            run_phys += dom->granule_bytes;
            if (--run_pages_left == 0 && done + i + 1 < n_pages) {
                do
                    run++;
                while (run->len_bytes == 0);
                run_phys = run->phys;
                run_pages_left = run->len_bytes >> dom->granule_shift;
            }
        }
        leaf->n_used += chunk;
        done += chunk;
    }
    dom->n_mapped += n_pages;
    return 0;
}

int iommu_map(struct iommu_domain *dom, uint64_t iova, uint64_t phys, uint64_t size_bytes,
              uint32_t prot)
{
    if (prot & ~IOMMU_PROT_MASK)
        return sl_fail(EINVAL, SL_REASON_IOMMU_PROT, 0, prot);
    int err = check_align(dom, iova, phys, size_bytes);
    if (err || size_bytes == 0)
        return err;
    err = check_aperture(dom, iova, size_bytes);
    if (err)
        return err;
    if (size_bytes - 1 > UINT64_MAX - phys)
        return sl_fail(EINVAL, SL_REASON_IOMMU_PHYS_RANGE, 0, phys);
    struct iommu_run run = {phys, size_bytes};
    return map_pages(dom, iova >> dom->granule_shift, size_bytes >> dom->granule_shift, &run,
                     prot);
}

int iommu_map_runs(struct iommu_domain *dom, uint64_t iova, const struct iommu_run *runs,
                   uint64_t n_runs, uint32_t prot)
{
    if (prot & ~IOMMU_PROT_MASK)
        return sl_fail(EINVAL, SL_REASON_IOMMU_PROT, 0, prot);
    uint64_t granule_mask = dom->granule_bytes - 1;
    if (iova & granule_mask)
        return sl_fail_limit(EINVAL, SL_REASON_IOMMU_ALIGN, 0, iova, dom->granule_bytes);
    /* Every run is checked first (element = the run), then the whole range against the
     * aperture. */
    uint64_t total = 0;
    for (uint64_t i = 0; i < n_runs; i++) {
        if ((runs[i].phys | runs[i].len_bytes) & granule_mask)
            return sl_fail_limit(EINVAL, SL_REASON_IOMMU_ALIGN, i,
                                 runs[i].phys & granule_mask ? runs[i].phys : runs[i].len_bytes,
                                 dom->granule_bytes);
        if (runs[i].len_bytes == 0)
            continue;
        if (runs[i].len_bytes - 1 > UINT64_MAX - runs[i].phys)
            return sl_fail(EINVAL, SL_REASON_IOMMU_PHYS_RANGE, i, runs[i].phys);
        if (runs[i].len_bytes > UINT64_MAX - total)
            return fail_aperture(dom, i, iova);
        total += runs[i].len_bytes;
    }
    if (total == 0)
        return 0;
    if (iova > dom->aperture_last || total - 1 > dom->aperture_last - iova) {
        /* element = the first run that reaches past the aperture's end. */
        uint64_t k = 0, end = 0;
        for (; k < n_runs; k++) {
            end += runs[k].len_bytes;
            if (runs[k].len_bytes && (iova > dom->aperture_last ||
                                      end - 1 > dom->aperture_last - iova))
                break;
        }
        return fail_aperture(dom, k, iova);
    }
    return map_pages(dom, iova >> dom->granule_shift, total >> dom->granule_shift, runs, prot);
}

int64_t iommu_unmap(struct iommu_domain *dom, uint64_t iova, uint64_t size_bytes)
{
    int err = check_align(dom, iova, 0, size_bytes);
    if (err || size_bytes == 0)
        return err;
    err = check_aperture(dom, iova, size_bytes);
    if (err)
        return err;
    /* The byte count is returned as int64_t. */
    if (size_bytes > (uint64_t)INT64_MAX)
        return fail_aperture(dom, 0, iova);
    uint64_t cleared = clear_pages(dom, iova >> dom->granule_shift,
                                   size_bytes >> dom->granule_shift);
    dom->n_mapped -= cleared;
    return (int64_t)(cleared << dom->granule_shift);
}

static int log_fault(struct iommu_domain *dom, uint64_t iova, uint32_t access,
                     enum iommu_fault_reason reason, uint32_t prot)
{
    uint32_t slot;
    if (dom->fault_count < IOMMU_FAULT_LOG_SIZE) {
        slot = (dom->fault_head + dom->fault_count) % IOMMU_FAULT_LOG_SIZE;
        dom->fault_count++;
    } else {
        slot = dom->fault_head; /* overwrite the oldest */
        dom->fault_head = (dom->fault_head + 1) % IOMMU_FAULT_LOG_SIZE;
    }
    struct iommu_fault *f = &dom->faults[slot];
    f->seq = dom->fault_total++;
    f->iova = iova;
    f->access = access;
    f->reason = (uint32_t)reason;
    f->prot = prot;
    f->reserved_pad = 0;
    int sl_reason = reason == IOMMU_FAULT_NOT_MAPPED      ? SL_REASON_IOMMU_FAULT_NOT_MAPPED
                    : reason == IOMMU_FAULT_NO_PERMISSION ? SL_REASON_IOMMU_FAULT_PERMISSION
                                                          : SL_REASON_IOMMU_FAULT_APERTURE;
    return sl_fail_access(EFAULT, sl_reason, access, iova, 0);
}

/* Checks one page entry for an access at iova; 0 or the logged fault. */
static inline int check_pte(struct iommu_domain *dom, uint64_t pte, uint64_t iova,
                            uint32_t access)
{
    if (!pte)
        return log_fault(dom, iova, access, IOMMU_FAULT_NOT_MAPPED, 0);
    if (!(pte & access))
        return log_fault(dom, iova, access, IOMMU_FAULT_NO_PERMISSION,
                         (uint32_t)(pte & IOMMU_PROT_MASK));
    return 0;
}

int iommu_translate(struct iommu_domain *dom, uint64_t iova, uint32_t access,
                    uint64_t *phys_out)
{
    if (access != IOMMU_READ && access != IOMMU_WRITE)
        return sl_fail(EINVAL, SL_REASON_IOMMU_ACCESS, 0, access);
    if (iova > dom->aperture_last)
        return log_fault(dom, iova, access, IOMMU_FAULT_OUT_OF_APERTURE, 0);
    uint64_t pte = pte_of(dom, iova >> dom->granule_shift);
    int err = check_pte(dom, pte, iova, access);
    if (err)
        return err;
    uint64_t granule_mask = dom->granule_bytes - 1;
    *phys_out = (pte & ~granule_mask) | (iova & granule_mask);
    return 0;
}

int iommu_translate_range(struct iommu_domain *dom, uint64_t iova, uint64_t len_bytes,
                          uint32_t access, struct iommu_run *runs_out, uint64_t capacity,
                          uint64_t *n_runs_out, uint64_t *done_bytes_out)
{
    *n_runs_out = 0;
    *done_bytes_out = 0;
    if (access != IOMMU_READ && access != IOMMU_WRITE)
        return sl_fail(EINVAL, SL_REASON_IOMMU_ACCESS, 0, access);
    if (len_bytes == 0)
        return 0;
    if (len_bytes - 1 > UINT64_MAX - iova)
        return fail_aperture(dom, 0, iova);

    uint64_t granule_mask = dom->granule_bytes - 1;
    uint64_t addr = iova, left = len_bytes, n_runs = 0;
    const struct pt_table *leaf = NULL;
    uint64_t leaf_key = UINT64_MAX; /* pfn >> bits_per_level of the leaf in hand */
    int err = 0;
    while (left) {
        if (addr > dom->aperture_last) {
            err = log_fault(dom, addr, access, IOMMU_FAULT_OUT_OF_APERTURE, 0);
            break;
        }
        uint64_t pfn = addr >> dom->granule_shift;
        /* Walk from the root once per leaf table, not once per page. */
        if (pfn >> dom->bits_per_level != leaf_key) {
            leaf = walk(dom, pfn, 0, NULL);
            leaf_key = pfn >> dom->bits_per_level;
        }
        uint64_t pte = leaf ? leaf->slot[slot_index(dom, pfn, dom->levels - 1)] : 0;
        err = check_pte(dom, pte, addr, access);
        if (err)
            break;
        uint64_t in_page = addr & granule_mask;
        uint64_t piece = dom->granule_bytes - in_page;
        if (piece > left)
            piece = left;
        uint64_t phys = (pte & ~granule_mask) | in_page;
        if (n_runs && runs_out[n_runs - 1].phys + runs_out[n_runs - 1].len_bytes == phys) {
            runs_out[n_runs - 1].len_bytes += piece;
        } else if (n_runs == capacity) {
            err = sl_fail_limit(ENOSPC, SL_REASON_IOMMU_RUNS_CAPACITY, 0, addr, capacity);
            break;
        } else {
            runs_out[n_runs].phys = phys;
            runs_out[n_runs].len_bytes = piece;
            n_runs++;
        }
        addr += piece;
        left -= piece;
    }
    *n_runs_out = n_runs;
    *done_bytes_out = len_bytes - left;
    return err;
}

int iommu_lookup(const struct iommu_domain *dom, uint64_t iova, uint64_t *phys_out,
                 uint32_t *prot_out)
{
    uint64_t pte = iova > dom->aperture_last ? 0 : pte_of(dom, iova >> dom->granule_shift);
    uint64_t granule_mask = dom->granule_bytes - 1;
    *phys_out = pte ? (pte & ~granule_mask) | (iova & granule_mask) : 0;
    *prot_out = (uint32_t)(pte & IOMMU_PROT_MASK);
    return pte != 0;
}

uint64_t iommu_fault_total(const struct iommu_domain *dom) { return dom->fault_total; }
uint32_t iommu_fault_count(const struct iommu_domain *dom) { return dom->fault_count; }

uint32_t iommu_faults_read(const struct iommu_domain *dom, struct iommu_fault *out,
                           uint32_t capacity)
{
    uint32_t n = dom->fault_count < capacity ? dom->fault_count : capacity;
    for (uint32_t i = 0; i < n; i++)
        out[i] = dom->faults[(dom->fault_head + i) % IOMMU_FAULT_LOG_SIZE];
    return n;
}

void iommu_faults_clear(struct iommu_domain *dom)
{
    dom->fault_head = 0;
    dom->fault_count = 0;
}
