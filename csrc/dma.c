#include "dma.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "sl_fork.h"

/* ---- the IOMMU object ---- */

struct sl_iommu {
    struct sl_fork_node fork_node; /* registry link: the lock is taken around fork() */
    /* Fixed at creation. */
    uint64_t granule;
    unsigned granule_shift;
    /* Under the lock. */
    pthread_mutex_t lock;
    struct iommu_domain *domain;
    struct iova_domain *iovad;
};

int sl_iommu_create(uint32_t granule_bytes, unsigned aperture_bits, struct sl_iommu **out)
{
    struct iommu_domain *domain = NULL;
    struct iova_domain *iovad = NULL;
    struct sl_iommu *iommu = NULL;
    *out = NULL;
    int err = iommu_domain_create(granule_bytes, aperture_bits, &domain);
    if (err)
        return err;
    /* start_pfn 1: IOVA 0 is never handed out.  One depot magazine: one emulated CPU. */
    err = iova_domain_create(granule_bytes, 1, 1, &iovad);
    if (err)
        goto err_free_domain;
    iommu = calloc(1, sizeof(*iommu));
    if (!iommu) {
        err = sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
        goto err_free_iovad;
    }
    if (pthread_mutex_init(&iommu->lock, NULL) != 0) {
        err = sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
        goto err_free_iommu;
    }
    iommu->domain = domain;
    iommu->iovad = iovad;
    iommu->granule = granule_bytes;
    iommu->granule_shift = (unsigned)__builtin_ctz(granule_bytes);
    err = sl_fork_register(&iommu->fork_node, SL_FORK_IOMMU, &iommu->lock);
    if (err)
        goto err_destroy_lock;
    *out = iommu;
    return 0;

err_destroy_lock:
    pthread_mutex_destroy(&iommu->lock);
err_free_iommu:
    free(iommu);
err_free_iovad:
    iova_domain_destroy(iovad);
err_free_domain:
    iommu_domain_destroy(domain);
    return err;
}

void sl_iommu_destroy(struct sl_iommu *iommu)
{
    if (!iommu)
        return;
    sl_fork_unregister(&iommu->fork_node);
    iova_domain_destroy(iommu->iovad);
    iommu_domain_destroy(iommu->domain);
    pthread_mutex_destroy(&iommu->lock);
    free(iommu);
}

struct iommu_domain *sl_iommu_domain(struct sl_iommu *iommu) { return iommu->domain; }
struct iova_domain *sl_iommu_iovad(struct sl_iommu *iommu) { return iommu->iovad; }
void sl_iommu_lock(struct sl_iommu *iommu) { pthread_mutex_lock(&iommu->lock); }
void sl_iommu_unlock(struct sl_iommu *iommu) { pthread_mutex_unlock(&iommu->lock); }

/* ---- devices ---- */

struct dma_device {
    struct sl_fork_node fork_node; /* registry link: the lock is taken around fork() */
    /* Fixed at creation, read without a lock. */
    struct physmem *mem;
    struct sl_iommu *iommu;        /* NULL: direct mapping */
    /* Under the device lock (a leaf: no other lock is taken while it is held). */
    pthread_mutex_t lock;
    struct dma_device_limits limits;
    int bound;                     /* mapping is refused (-ENODEV) while unbound */
    /* Fault injection (dma_device_inject_failures); decided under the lock, once per map. */
    uint64_t inject_countdown;
    uint32_t inject_ppm;
    int inject_errno;
    uint64_t inject_rng_state;
    uint64_t injected_failures;
    /* Under the IOMMU's lock: read and written only by map_iommu while it holds it.  Try IOVAs
     * below 4 GiB first (cleared after one failure, as the kernel does). */
    int pci_32bit_workaround;
    /* Atomic: tables mapped for this device and not unmapped. */
    uint64_t live_mappings;
};

/* The lock is not part of the device's logical state: getters on a const device take it. */
static pthread_mutex_t *device_lock(const struct dma_device *dev)
{
    return &((struct dma_device *)(uintptr_t)dev)->lock;
}

int dma_device_create(struct physmem *mem, struct sl_iommu *iommu, struct dma_device **out)
{
    *out = NULL;
    /* The kernel's IOVA domains need granule <= PAGE_SIZE. */
    if (iommu && iommu->granule > physmem_page_size(mem))
        return sl_fail_limit(EINVAL, SL_REASON_GRANULE_PAGE, 0, iommu->granule,
                             physmem_page_size(mem));
    struct dma_device *dev = calloc(1, sizeof(*dev));
    if (!dev)
        return sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
    int err;
    if (pthread_mutex_init(&dev->lock, NULL) != 0) {
        err = sl_fail(ENOMEM, SL_REASON_NO_MEMORY, 0, 0);
        goto err_free_dev;
    }
    dev->mem = mem;
    dev->iommu = iommu;
    dev->limits = (struct dma_device_limits){
        .dma_mask = UINT32_MAX,
        .max_segment_size = 65536,
        .seg_boundary_mask = UINT64_MAX,
        .max_mapping_size = UINT64_MAX,
    };
    dev->pci_32bit_workaround = 1;
    dev->bound = 1;
    err = sl_fork_register(&dev->fork_node, SL_FORK_DEVICE, &dev->lock);
    if (err)
        goto err_destroy_lock;
    *out = dev;
    return 0;

err_destroy_lock:
    pthread_mutex_destroy(&dev->lock);
err_free_dev:
    free(dev);
    return err;
}

void dma_device_destroy(struct dma_device *dev)
{
    if (!dev)
        return;
    sl_fork_unregister(&dev->fork_node);
    pthread_mutex_destroy(&dev->lock);
    free(dev);
}

void dma_device_get_limits(const struct dma_device *dev, struct dma_device_limits *out)
{
    pthread_mutex_lock(device_lock(dev));
    *out = dev->limits;
    pthread_mutex_unlock(device_lock(dev));
}

static inline int is_low_mask(uint64_t mask) { return (mask & (mask + 1)) == 0; } /* 2^n - 1 */

int dma_device_set_limits(struct dma_device *dev, const struct dma_device_limits *limits)
{
    const uint64_t smallest = (uint64_t)physmem_page_size(dev->mem) - 1;
    if (!is_low_mask(limits->dma_mask) || limits->dma_mask < smallest)
        return sl_fail_limit(EINVAL, SL_REASON_DEVICE_DMA_MASK, 0, limits->dma_mask, smallest);
    if (limits->max_segment_size == 0)
        return sl_fail(EINVAL, SL_REASON_DEVICE_MAX_SEGMENT, 0, limits->max_segment_size);
    if (!is_low_mask(limits->seg_boundary_mask) || limits->seg_boundary_mask < smallest)
        return sl_fail_limit(EINVAL, SL_REASON_DEVICE_SEG_BOUNDARY, 0,
                             limits->seg_boundary_mask, smallest);
    pthread_mutex_lock(&dev->lock);
    dev->limits = *limits;
    pthread_mutex_unlock(&dev->lock);
    return 0;
}

int dma_device_is_bound(const struct dma_device *dev)
{
    pthread_mutex_lock(device_lock(dev));
    int bound = dev->bound;
    pthread_mutex_unlock(device_lock(dev));
    return bound;
}

void dma_device_set_bound(struct dma_device *dev, int bound)
{
    pthread_mutex_lock(&dev->lock);
    dev->bound = bound != 0;
    pthread_mutex_unlock(&dev->lock);
}

uint64_t dma_device_live_mappings(const struct dma_device *dev)
{
    return __atomic_load_n(&dev->live_mappings, __ATOMIC_RELAXED);
}

int dma_device_inject_failures(struct dma_device *dev, uint64_t nth, uint32_t ppm, int err,
                               uint64_t seed)
{
    if (err != ENOMEM && err != EINVAL && err != EIO)
        return sl_fail(EINVAL, SL_REASON_INJECT_ERRNO, 0, (uint64_t)(int64_t)err);
    if (ppm > 1000000u)
        return sl_fail_limit(EINVAL, SL_REASON_INJECT_PPM, 0, ppm, 1000000u);
    pthread_mutex_lock(&dev->lock);
    dev->inject_countdown = nth;
    dev->inject_ppm = ppm;
    dev->inject_errno = err;
    dev->inject_rng_state = seed;
    pthread_mutex_unlock(&dev->lock);
    return 0;
}

uint64_t dma_device_injected_failures(const struct dma_device *dev)
{
    pthread_mutex_lock(device_lock(dev));
    uint64_t n = dev->injected_failures;
    pthread_mutex_unlock(device_lock(dev));
    return n;
}

void dma_device_get_injection(const struct dma_device *dev, struct dma_device_injection *out)
{
    pthread_mutex_lock(device_lock(dev));
    *out = (struct dma_device_injection){dev->inject_countdown, dev->inject_ppm,
                                         dev->inject_errno, dev->inject_rng_state};
    pthread_mutex_unlock(device_lock(dev));
}

/* ---- helpers ---- */

static inline int valid_direction(int dir)
{
    return dir == DMA_BIDIRECTIONAL || dir == DMA_TO_DEVICE || dir == DMA_FROM_DEVICE;
}

/* dma_info_to_prot: what the device may do with the memory. */
static inline uint32_t direction_prot(int dir)
{
    switch (dir) {
    case DMA_BIDIRECTIONAL: return IOMMU_READ | IOMMU_WRITE;
    case DMA_TO_DEVICE: return IOMMU_READ;
    case DMA_FROM_DEVICE: return IOMMU_WRITE;
    default: return 0;
    }
}

/* sg_next on a list that is only read. */
static inline const struct scatterlist *next_entry(const struct scatterlist *sg)
{
    return sg_next((struct scatterlist *)(uintptr_t)sg);
}

static inline uint64_t entry_pfn(const struct scatterlist *sg) { return sg->page_link >> 2; }

static inline uint64_t entry_phys(const struct sl_table *table, const struct scatterlist *sg)
{
    return (entry_pfn(sg) << table->page_shift) + sg->offset;
}

/* Entries [first, end) get the "no segment here" DMA fields (end <= orig_nents). */
static void clear_dma_fields(struct sl_table *table, uint32_t first, uint32_t end)
{
    if (first >= end)
        return; /* the common case: nothing to walk to */
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < end && sg; i++, sg = sg_next(sg)) {
        if (i < first)
            continue;
        sg->dma_address = DMA_MAPPING_ERROR;
        sg->dma_length = 0;
    }
}

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* What a map works with, taken under the device lock when it starts: it uses nothing else of
 * the device's mutable state, so limit changes on other threads cannot tear it. */
struct map_snapshot {
    struct dma_device_limits limits;
    int inject_errno; /* 0: do not inject */
};

/* Takes the snapshot and decides fault injection, once per map call, under the device lock.
 * Re-checks the bound flag in the same section, so a map never starts on an unbound device. */
static int begin_map(struct dma_device *dev, struct map_snapshot *snap)
{
    int err = 0;
    pthread_mutex_lock(&dev->lock);
    if (!dev->bound) {
        err = sl_fail(ENODEV, SL_REASON_DEVICE_UNBOUND, 0, 0);
        goto out_unlock;
    }
    snap->limits = dev->limits;
    int inject = 0;
    if (dev->inject_countdown)
        inject = --dev->inject_countdown == 0;
    else if (dev->inject_ppm)
        inject = splitmix64(&dev->inject_rng_state) % 1000000u < dev->inject_ppm;
    if (inject)
        dev->injected_failures++;
    snap->inject_errno = inject ? dev->inject_errno : 0;
out_unlock:
    pthread_mutex_unlock(&dev->lock);
    return err;
}

static int check_mappable(const struct dma_device *dev, const struct sl_table *table,
                          uint32_t n_entries, int dir)
{
    if (!valid_direction(dir))
        return sl_fail(EINVAL, SL_REASON_DMA_DIRECTION, 0, (uint64_t)(int64_t)dir);
    if (!dma_device_is_bound(dev))
        return sl_fail(ENODEV, SL_REASON_DEVICE_UNBOUND, 0, 0);
    if (!table->sgt.sgl)
        return sl_fail(EINVAL, SL_REASON_TABLE_FREED, 0, 0);
    if (table->dma_dev)
        return sl_fail(EBUSY, SL_REASON_TABLE_MAPPED, 0, 0);
    if (!table->final)
        return sl_fail(EINVAL, SL_REASON_TABLE_NOT_FINAL, 0, 0);
    if (table->page_size != physmem_page_size(dev->mem))
        return sl_fail_limit(EINVAL, SL_REASON_PAGE_SIZE_MISMATCH, 0,
                             physmem_page_size(dev->mem), table->page_size);
    if (n_entries == 0 || n_entries > table->sgt.orig_nents)
        return sl_fail_limit(EINVAL, SL_REASON_NENTS_RANGE, 0, n_entries,
                             table->sgt.orig_nents);
    uint64_t mem_end = physmem_n_pages(dev->mem) << table->page_shift;
    const struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg))
        if (entry_phys(table, sg) + sg->length > mem_end)
            return sl_fail(EINVAL, SL_REASON_PHYS_RANGE, i, entry_pfn(sg));
    return 0;
}

/* ---- direct mapping ---- */

static int map_direct(const struct map_snapshot *snap, struct sl_table *table,
                      uint32_t n_entries, uint32_t *count_out)
{
    /* Check every entry first: a failure maps nothing and writes no DMA field. */
    const uint64_t mask = snap->limits.dma_mask;
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = sg_next(sg)) {
        uint64_t phys = entry_phys(table, sg);
        if (phys > mask || (uint64_t)sg->length - 1 > mask - phys)
            return sl_fail_limit(EIO, SL_REASON_DMA_MASK, i, phys, mask);
    }
    if (snap->inject_errno)
        return sl_fail(snap->inject_errno, SL_REASON_INJECTED, 0, (uint64_t)snap->inject_errno);
    sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = sg_next(sg)) {
        sg->dma_address = entry_phys(table, sg); /* phys_to_dma is the identity here */
        sg->dma_length = sg->length;
    }
    *count_out = n_entries;
    return 0;
}

/* ---- IOMMU mapping (iommu_dma_map_sg) ----
 *
 * The kernel lays the entries out in place (each entry's CPU fields become whole granules, the
 * in-granule offset and CPU length are stashed in its DMA fields), maps, then __finalise_sg
 * restores the CPU fields and writes the segments; __invalidate_sg undoes the layout on
 * failure.  The net effect on the CPU fields is nil, so here the layout is never stored:
 * layout_next computes each entry's layout from its CPU fields as the passes walk the list.
 * A failed map then has nothing to undo in the table, and every pass but the last only reads
 * it:
 *   1. layout_size: the IOVA bytes needed (refuses an entry past 32 bits);
 *   2. finalise_segments(write = 0), once the IOVA is known: refuses a segment past 32 bits;
 *   3. map_table_runs: the page table;
 *   4. finalise_segments(write = 1): the DMA fields. */

struct layout {
    uint64_t granule_mask;
    uint64_t boundary_mask;
    uint64_t iova_len; /* bytes laid out so far, padding included */
    uint64_t prev_len; /* the previous entry's granule-rounded length, its padding excluded */
};

struct layout_step {
    uint64_t iova_off; /* offset of the entry's data in its first granule */
    uint64_t length;   /* its CPU length */
    uint64_t iova_len; /* its data rounded out to whole granules */
    uint64_t pad;      /* boundary padding appended to the previous entry, before this one */
};

static void layout_init(struct layout *lay, uint64_t granule, uint64_t boundary_mask)
{
    *lay = (struct layout){granule - 1, boundary_mask, 0, 0};
}

/* The layout of entry i, following lay's state from entry i - 1.  The kernel keeps lengths in
 * 32 bits: an entry whose rounded length, or the previous entry's length with its padding,
 * would not fit is refused (DMA_SEGMENT_LENGTH; the kernel would truncate it). */
static int layout_next(struct layout *lay, const struct scatterlist *sg, uint32_t i,
                       struct layout_step *st)
{
    st->iova_off = sg->offset & lay->granule_mask;
    st->length = sg->length;
    st->iova_len = (st->length + st->iova_off + lay->granule_mask) & ~lay->granule_mask;
    /* Padding so that no segment crosses a boundary: the block is size-aligned, so it starts
     * on a boundary whenever it is larger than one.  Never before the first entry. */
    uint64_t pad_len = (lay->boundary_mask - lay->iova_len + 1) & lay->boundary_mask;
    st->pad = pad_len && pad_len < st->iova_len - 1 ? pad_len : 0;
    if (st->iova_len > UINT32_MAX)
        return sl_fail_limit(EINVAL, SL_REASON_DMA_SEGMENT_LENGTH, i, st->iova_len, UINT32_MAX);
    if (st->pad && lay->prev_len + st->pad > UINT32_MAX)
        return sl_fail_limit(EINVAL, SL_REASON_DMA_SEGMENT_LENGTH, i - 1,
                             lay->prev_len + st->pad, UINT32_MAX);
    lay->iova_len += st->pad + st->iova_len;
    lay->prev_len = st->iova_len;
    return 0;
}

/* Pass 1: the IOVA bytes the first n_entries need, and the longest CPU entry among them. */
static int layout_size(const struct dma_device_limits *limits, uint64_t granule,
                       const struct sl_table *table, uint32_t n_entries, uint64_t *iova_len_out,
                       uint64_t *longest_out)
{
    struct layout lay;
    layout_init(&lay, granule, limits->seg_boundary_mask);
    uint64_t longest = 0;
    const struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = next_entry(sg)) {
        struct layout_step st;
        int err = layout_next(&lay, sg, i, &st);
        if (err)
            return err;
        if (st.length > longest)
            longest = st.length;
    }
    *iova_len_out = lay.iova_len;
    *longest_out = longest;
    return 0;
}

/* __finalise_sg over the layout of a block at iova: merges the entries into DMA segments and
 * gives the segment count.  One function for both passes, so that the check and the result
 * cannot disagree:
 *   - write == 0 reads the table only, and refuses with DMA_SEGMENT_LENGTH a segment whose
 *     length would pass 0xFFFFFFFF (where the kernel's 32-bit length would wrap);
 *   - write != 0 stores the segments (segment k in entry k, DMA_MAPPING_ERROR / 0 in the other
 *     entries up to n_entries); after a successful check with the same arguments it cannot
 *     fail.
 * Segment lengths merge with the kernel's 32-bit unsigned arithmetic, including where
 * max_len - cur_len wraps (an entry already longer than max_len lets the next ones merge). */
static int finalise_segments(const struct dma_device_limits *limits, uint64_t granule,
                             struct sl_table *table, uint32_t n_entries, uint64_t iova,
                             int write, uint32_t *count_out)
{
    struct layout lay;
    layout_init(&lay, granule, limits->seg_boundary_mask);
    const uint64_t seg_mask = limits->seg_boundary_mask;
    const uint32_t max_len = limits->max_segment_size;
    uint64_t dma_addr = iova;
    uint64_t cur_len = 0; /* the open segment's length, <= UINT32_MAX; 0: nothing merges on */
    uint32_t count = 0;
    struct scatterlist *cur = table->sgt.sgl;
    struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries; i++, sg = sg_next(sg)) {
        struct layout_step st;
        int err = layout_next(&lay, sg, i, &st);
        if (err)
            return err;
        if (st.pad) {
            /* The previous entry was padded: it ends before its laid-out length does, so
             * nothing merges onto its segment, and the padding moves the address on. */
            dma_addr += st.pad;
            cur_len = 0;
        }
        if (write) {
            sg->dma_address = DMA_MAPPING_ERROR;
            sg->dma_length = 0;
        }
        /* Merge only onto an open segment, from a granule start, not at a boundary, within
         * the length limit (32-bit unsigned, as the kernel computes it). */
        if (cur_len && !st.iova_off && (dma_addr & seg_mask) &&
            (uint32_t)(max_len - (uint32_t)cur_len) >= st.length) {
            cur_len += st.length;
            if (cur_len > UINT32_MAX)
                return sl_fail_limit(EINVAL, SL_REASON_DMA_SEGMENT_LENGTH, i, cur_len,
                                     UINT32_MAX);
        } else {
            if (i > 0)
                cur = sg_next(cur);
            cur_len = st.length;
            count++;
            if (write)
                cur->dma_address = dma_addr + st.iova_off;
        }
        if (write)
            cur->dma_length = (uint32_t)cur_len;
        dma_addr += st.iova_len;
        if (st.length + st.iova_off < st.iova_len)
            cur_len = 0; /* ends before its granule does: nothing merges on */
    }
    *count_out = count;
    return 0;
}

/* iommu_map_sg: the laid-out entries back to back from iova, physically contiguous ones merged
 * into runs, handed to the page table in batches (each batch all or nothing).  *mapped_out gets
 * the bytes mapped by the batches that succeeded, whatever the result. */
static int map_table_runs(struct sl_iommu *iommu, const struct dma_device_limits *limits,
                          const struct sl_table *table, uint32_t n_entries, uint64_t iova,
                          uint32_t prot, uint64_t *mapped_out)
{
    enum { RUN_BATCH = 512 };
    struct iommu_run runs[RUN_BATCH];
    struct layout lay;
    layout_init(&lay, iommu->granule, limits->seg_boundary_mask);
    uint64_t n_runs = 0, batch_bytes = 0, mapped = 0;
    int err = 0;
    const struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < n_entries && !err; i++, sg = next_entry(sg)) {
        struct layout_step st;
        err = layout_next(&lay, sg, i, &st);
        if (err)
            break;
        /* Padding belongs to the previous entry, the last run's end (pad is 0 for entry 0,
         * and from entry 1 on the array always holds a run). */
        if (st.pad) {
            runs[n_runs - 1].len_bytes += st.pad;
            batch_bytes += st.pad;
        }
        uint64_t phys = entry_phys(table, sg) - st.iova_off;
        if (n_runs && phys == runs[n_runs - 1].phys + runs[n_runs - 1].len_bytes) {
            runs[n_runs - 1].len_bytes += st.iova_len;
        } else {
            if (n_runs == RUN_BATCH) {
                err = iommu_map_runs(iommu->domain, iova + mapped, runs, n_runs, prot);
                if (err)
                    break;
                mapped += batch_bytes;
                n_runs = 0;
                batch_bytes = 0;
            }
            runs[n_runs++] = (struct iommu_run){phys, st.iova_len};
        }
        batch_bytes += st.iova_len;
    }
    if (!err && n_runs) {
        err = iommu_map_runs(iommu->domain, iova + mapped, runs, n_runs, prot);
        if (!err)
            mapped += batch_bytes;
    }
    *mapped_out = mapped;
    return err;
}

/* Unmaps [iova, iova + len) page run by page run, stepping over holes (a page someone unmapped
 * by hand), so that teardown always leaves nothing of the block mapped. */
static void unmap_block(struct sl_iommu *iommu, uint64_t iova, uint64_t len)
{
    uint64_t done = 0;
    while (done < len) {
        int64_t unmapped = iommu_unmap(iommu->domain, iova + done, len - done);
        if (unmapped < 0)
            return;
        done += (uint64_t)unmapped;
        if (done < len)
            done += iommu->granule; /* the hole */
    }
}

/* Gives an IOVA block back: unmaps its first mapped_bytes and frees it.  Called with the IOMMU
 * lock held, on a live block of ours, so neither step can fail; the thread's error record is
 * kept as it was (it describes the failure being unwound, if any). */
static void release_block(struct sl_iommu *iommu, uint64_t iova, uint64_t iova_len,
                          uint64_t mapped_bytes)
{
    const struct sl_error_detail saved = *sl_last_error();
    unmap_block(iommu, iova, mapped_bytes);
    iova_free(iommu->iovad, iova >> iommu->granule_shift, iova_len >> iommu->granule_shift);
    sl_fail_record(0, &saved);
}

static int map_iommu(struct dma_device *dev, const struct map_snapshot *snap,
                     struct sl_table *table, uint32_t n_entries, int dir, uint32_t *count_out)
{
    struct sl_iommu *iommu = dev->iommu;
    const struct dma_device_limits *limits = &snap->limits;
    uint64_t iova_len = 0, longest = 0, iova_pfn = 0, iova = 0, mapped = 0;
    uint32_t count = 0;

    int err = layout_size(limits, iommu->granule, table, n_entries, &iova_len, &longest);
    if (err)
        return err;

    sl_iommu_lock(iommu);
    /* One IOVA block under the DMA mask, trying below 4 GiB first for PCI devices. */
    uint64_t limit = limits->dma_mask;
    if (limit > iommu_aperture_last(iommu->domain))
        limit = iommu_aperture_last(iommu->domain);
    const uint64_t n_granules = iova_len >> iommu->granule_shift;
    err = -ENOMEM;
    if (dev->pci_32bit_workaround && limit > UINT32_MAX) {
        err = iova_alloc_noflush(iommu->iovad, n_granules, UINT32_MAX >> iommu->granule_shift,
                                 &iova_pfn);
        if (err)
            dev->pci_32bit_workaround = 0; /* the kernel's "Using %d-bit DMA addresses" */
    }
    if (err)
        err = iova_alloc(iommu->iovad, n_granules, limit >> iommu->granule_shift, &iova_pfn);
    if (err) {
        err = sl_fail_limit(ENOMEM, SL_REASON_IOVA_SPACE, 0, iova_len, limit);
        goto err_unlock;
    }
    iova = iova_pfn << iommu->granule_shift;

    /* The merge decisions depend on the IOVA: check them before mapping anything.  A segment
     * only grows past 32 bits once the kernel's max_len - cur_len has wrapped, which needs an
     * entry longer than max_segment_size; without one, the check pass is skipped. */
    if (longest > limits->max_segment_size) {
        err = finalise_segments(limits, iommu->granule, table, n_entries, iova, 0, &count);
        if (err)
            goto err_release;
    }
    err = map_table_runs(iommu, limits, table, n_entries, iova, direction_prot(dir), &mapped);
    if (err) {
        /* __invalidate_sg passes -ENOMEM through and turns anything else into -EINVAL; the
         * page table's record stays as it is. */
        err = err == -ENOMEM ? -ENOMEM : -EINVAL;
        goto err_release;
    }
    if (snap->inject_errno) {
        /* Everything is mapped: the rollback has all of it to undo. */
        err = sl_fail(snap->inject_errno, SL_REASON_INJECTED, 0, (uint64_t)snap->inject_errno);
        goto err_release;
    }
    sl_iommu_unlock(iommu);

    /* Cannot fail: the same arguments passed the check above. */
    finalise_segments(limits, iommu->granule, table, n_entries, iova, 1, &count);
    table->dma_iova = iova;
    table->dma_iova_len = iova_len;
    *count_out = count;
    return 0;

err_release:
    release_block(iommu, iova, iova_len, mapped);
err_unlock:
    sl_iommu_unlock(iommu);
    return err;
}

/* Decides everything (checks, snapshot, the whole IOMMU or direct map) before it writes the
 * table's mapping state: map_direct and map_iommu leave the table untouched when they fail, so
 * there is nothing to unwind here. */
static int map_entries(struct dma_device *dev, struct sl_table *table, uint32_t n_entries,
                       int dir, uint32_t *count_out)
{
    int err = check_mappable(dev, table, n_entries, dir);
    if (err)
        return err;
    struct map_snapshot snap = {.inject_errno = 0};
    err = begin_map(dev, &snap);
    if (err)
        return err;
    uint32_t count = 0;
    err = dev->iommu ? map_iommu(dev, &snap, table, n_entries, dir, &count)
                     : map_direct(&snap, table, n_entries, &count);
    if (err)
        return err;
    /* A map defines every DMA field it exposes (the kernel leaves the rest as it was). */
    clear_dma_fields(table, n_entries, table->sgt.orig_nents);
    table->dma_map_nents = n_entries;
    table->dma_mapped_count = count;
    table->dma_dev = dev;
    table->dma_dir = dir;
    /* Tables of one device may be mapped on several threads at once. */
    __atomic_add_fetch(&dev->live_mappings, 1, __ATOMIC_RELAXED);
    *count_out = count;
    return 0;
}

int dma_map_sgtable(struct dma_device *dev, struct sl_table *table, int dir)
{
    uint32_t count = 0;
    int err = map_entries(dev, table, table->sgt.orig_nents, dir, &count);
    if (!err)
        table->sgt.nents = count;
    return err;
}

int64_t dma_map_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir)
{
    uint32_t count = 0;
    int err = map_entries(dev, table, nents, dir, &count);
    return err ? err : (int64_t)count;
}

static int check_mapped_for(const struct dma_device *dev, const struct sl_table *table,
                            uint32_t n_entries, int dir)
{
    if (!valid_direction(dir))
        return sl_fail(EINVAL, SL_REASON_DMA_DIRECTION, 0, (uint64_t)(int64_t)dir);
    if (!table->dma_dev)
        return sl_fail(EINVAL, SL_REASON_NOT_MAPPED, 0, 0);
    if (table->dma_dev != dev)
        return sl_fail(EINVAL, SL_REASON_WRONG_DEVICE, 0, 0);
    /* A count past the table would walk off its end in the kernel. */
    if (n_entries == 0 || n_entries > table->sgt.orig_nents)
        return sl_fail_limit(EINVAL, SL_REASON_NENTS_RANGE, 0, n_entries,
                             table->sgt.orig_nents);
    return 0;
}

int dma_unmap_sgtable(struct dma_device *dev, struct sl_table *table, int dir)
{
    return dma_unmap_sg(dev, table, table->sgt.orig_nents, dir);
}

int dma_unmap_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir)
{
    int err = check_mapped_for(dev, table, nents, dir);
    if (err)
        return err;
    if (dev->iommu) {
        /* The whole block at once, as iommu_dma_unmap_sg does from the first to the last
         * non-empty DMA segment. */
        sl_iommu_lock(dev->iommu);
        release_block(dev->iommu, table->dma_iova, table->dma_iova_len, table->dma_iova_len);
        sl_iommu_unlock(dev->iommu);
    }
    /* Unlike the kernel, clear the DMA view: a stale field would lead a device to IOVAs that
     * another table may own by now.  The map left DMA_MAPPING_ERROR / 0 in every entry past
     * the segments, so only the segments need it. */
    clear_dma_fields(table, 0, table->dma_mapped_count);
    table->sgt.nents = table->sgt.orig_nents;
    table->dma_dev = NULL;
    table->dma_iova = 0;
    table->dma_iova_len = 0;
    table->dma_map_nents = 0;
    table->dma_mapped_count = 0;
    __atomic_sub_fetch(&dev->live_mappings, 1, __ATOMIC_RELAXED);
    return 0;
}

int dma_sync_sgtable(struct dma_device *dev, struct sl_table *table, int dir, int for_cpu)
{
    return dma_sync_sg(dev, table, table->sgt.orig_nents, dir, for_cpu);
}

int dma_sync_sg(struct dma_device *dev, struct sl_table *table, uint32_t nents, int dir,
                int for_cpu)
{
    (void)for_cpu; /* coherent memory: ownership moves, bytes do not */
    return check_mapped_for(dev, table, nents, dir);
}

/* ---- device-side access ----
 *
 * An access walks its pieces (one range, or one piece per DMA segment of a table) and
 * translates them into physically contiguous runs held in a fixed batch on the stack.  The
 * first pass checks everything (mask, translation, memory) and, if every run fitted in the
 * batch, the bytes move from there; otherwise the runs were dropped batch by batch and a second
 * pass translates again, moving each batch's bytes as it fills.  Through an IOMMU the IOMMU
 * lock is held from the first translation to the last byte, so both passes see the same page
 * table. */

enum { ACCESS_BATCH = 256 };

struct access {
    struct dma_device *dev;
    uint32_t access;   /* IOMMU_READ or IOMMU_WRITE */
    uint64_t dma_mask; /* snapshot taken when the access started */
    uint64_t mem_end;  /* bytes of memory */
    uint8_t *buf;      /* moving pass: where the next run's bytes go or come from */
    int moving;        /* 0: checking pass; 1: moving pass */
    int dropped;       /* the checking pass dropped full batches: the moving pass retranslates */
    uint64_t n_runs;
    struct iommu_run runs[ACCESS_BATCH];
};

/* Moves the bytes of the held runs (moving pass). */
static int move_runs(struct access *a)
{
    for (uint64_t r = 0; r < a->n_runs; r++) {
        const struct iommu_run *run = &a->runs[r];
        int err = a->access == IOMMU_WRITE
                      ? physmem_write(a->dev->mem, run->phys, a->buf, run->len_bytes)
                      : physmem_read(a->dev->mem, run->phys, a->buf, run->len_bytes);
        if (err)
            return err;
        a->buf += run->len_bytes;
    }
    a->n_runs = 0;
    return 0;
}

/* The batch is full: move its bytes, or (checking pass) drop its runs. */
static int flush_batch(struct access *a)
{
    if (a->moving)
        return move_runs(a);
    a->dropped = 1;
    a->n_runs = 0;
    return 0;
}

/* Notes the first run in [first, n_runs) that reaches past the memory. */
static void note_outside(const struct access *a, uint64_t first, int *outside,
                         uint64_t *outside_phys)
{
    for (uint64_t r = first; r < a->n_runs && !*outside; r++) {
        if (a->runs[r].phys > a->mem_end || a->runs[r].len_bytes > a->mem_end - a->runs[r].phys) {
            *outside = 1;
            *outside_phys = a->runs[r].phys;
        }
    }
}

/* One piece: mask, then translation (faults logged), then memory, in that order. */
static int walk_piece(struct access *a, uint64_t dma_addr, uint64_t n_bytes)
{
    if (n_bytes == 0)
        return 0;
    /* A device cannot emit an address above its mask, behind an IOMMU or not: the access
     * never reaches the IOMMU, so it is not in the fault log. */
    if (dma_addr > a->dma_mask || n_bytes - 1 > a->dma_mask - dma_addr)
        return sl_fail_access(EFAULT, SL_REASON_DMA_ACCESS_MASK, a->access, dma_addr,
                              a->dma_mask);
    int outside = 0, err = 0;
    uint64_t outside_phys = 0;
    if (!a->dev->iommu) {
        if (a->n_runs == ACCESS_BATCH && (err = flush_batch(a)) != 0)
            return err;
        a->runs[a->n_runs++] = (struct iommu_run){dma_addr, n_bytes};
        note_outside(a, a->n_runs - 1, &outside, &outside_phys);
    } else {
        uint64_t addr = dma_addr, left = n_bytes;
        for (;;) {
            uint64_t first = a->n_runs, added = 0, done = 0;
            err = iommu_translate_range(a->dev->iommu->domain, addr, left, a->access,
                                        a->runs + first, ACCESS_BATCH - first, &added, &done);
            a->n_runs += added;
            note_outside(a, first, &outside, &outside_phys);
            if (err != -ENOSPC)
                break;
            /* The runs held are complete: hand them on and go on from where it stopped. */
            err = flush_batch(a);
            if (err)
                break;
            addr += done;
            left -= done;
        }
        if (err)
            return err;
    }
    if (outside)
        return sl_fail_access(EFAULT, SL_REASON_DMA_ACCESS_MEMORY, a->access, outside_phys,
                              a->mem_end);
    return 0;
}

/* Every piece of the access, in order: the range [dma_addr, dma_addr + n_bytes), or with a
 * table the first n_bytes of its DMA segments (which hold at least that much). */
static int walk_pieces(struct access *a, const struct sl_table *table, uint64_t dma_addr,
                       uint64_t n_bytes)
{
    if (!table)
        return walk_piece(a, dma_addr, n_bytes);
    uint64_t total = 0;
    const struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->dma_mapped_count && total < n_bytes;
         i++, sg = next_entry(sg)) {
        uint64_t piece = n_bytes - total < sg->dma_length ? n_bytes - total : sg->dma_length;
        int err = walk_piece(a, sg->dma_address, piece);
        if (err)
            return err;
        total += piece;
    }
    return 0;
}

/* A whole access: checks every piece, then (move) moves the bytes.  buf is only read when
 * access is IOMMU_WRITE. */
static int device_transfer(struct dma_device *dev, const struct sl_table *table,
                           uint64_t dma_addr, uint8_t *buf, uint64_t n_bytes, uint32_t access,
                           int move)
{
    struct access a;
    a.dev = dev;
    a.access = access;
    a.buf = buf;
    a.moving = 0;
    a.dropped = 0;
    a.n_runs = 0;
    a.mem_end = physmem_n_pages(dev->mem) * physmem_page_size(dev->mem);
    pthread_mutex_lock(&dev->lock);
    a.dma_mask = dev->limits.dma_mask;
    pthread_mutex_unlock(&dev->lock);

    if (dev->iommu)
        sl_iommu_lock(dev->iommu);
    int err = walk_pieces(&a, table, dma_addr, n_bytes);
    if (err || !move)
        goto out_unlock;
    if (a.dropped) {
        /* The same page table (the lock was held throughout): the same runs, no failure. */
        a.moving = 1;
        a.n_runs = 0;
        err = walk_pieces(&a, table, dma_addr, n_bytes);
        if (err)
            goto out_unlock;
    }
    a.moving = 1;
    err = move_runs(&a);
out_unlock:
    if (dev->iommu)
        sl_iommu_unlock(dev->iommu);
    return err;
}

int dma_device_read(struct dma_device *dev, uint64_t dma_addr, void *buf, uint64_t n_bytes)
{
    if (n_bytes == 0)
        return 0;
    return device_transfer(dev, NULL, dma_addr, buf, n_bytes, IOMMU_READ, 1);
}

int dma_device_write(struct dma_device *dev, uint64_t dma_addr, const void *buf,
                     uint64_t n_bytes)
{
    if (n_bytes == 0)
        return 0;
    /* The buffer is only read when writing memory. */
    return device_transfer(dev, NULL, dma_addr, (uint8_t *)(uintptr_t)buf, n_bytes,
                           IOMMU_WRITE, 1);
}

int dma_device_check_access(struct dma_device *dev, uint64_t dma_addr, uint64_t n_bytes,
                            uint32_t access)
{
    if (access != IOMMU_READ && access != IOMMU_WRITE)
        return sl_fail(EINVAL, SL_REASON_IOMMU_ACCESS, 0, access);
    if (n_bytes == 0)
        return 0;
    return device_transfer(dev, NULL, dma_addr, NULL, n_bytes, access, 0);
}

static int device_transfer_sg(struct dma_device *dev, const struct sl_table *table,
                              uint8_t *buf, uint64_t n_bytes, uint32_t access)
{
    if (!table->dma_dev)
        return sl_fail(EINVAL, SL_REASON_NOT_MAPPED, 0, 0);
    if (table->dma_dev != dev)
        return sl_fail(EINVAL, SL_REASON_WRONG_DEVICE, 0, 0);
    uint64_t total = 0;
    const struct scatterlist *sg = table->sgt.sgl;
    for (uint32_t i = 0; i < table->dma_mapped_count; i++, sg = next_entry(sg))
        total += sg->dma_length;
    if (total < n_bytes)
        return sl_fail_limit(EINVAL, SL_REASON_DMA_LENGTH, 0, n_bytes, total);
    if (n_bytes == 0)
        return 0;
    return device_transfer(dev, table, 0, buf, n_bytes, access, 1);
}

int dma_device_read_sg(struct dma_device *dev, const struct sl_table *table, void *buf,
                       uint64_t n_bytes)
{
    return device_transfer_sg(dev, table, buf, n_bytes, IOMMU_READ);
}

int dma_device_write_sg(struct dma_device *dev, const struct sl_table *table, const void *buf,
                        uint64_t n_bytes)
{
    return device_transfer_sg(dev, table, (uint8_t *)(uintptr_t)buf, n_bytes, IOMMU_WRITE);
}
